"""What keeps the fast path's compile cheap: regional compilation (each repeated layer class compiled once and
stamped out) and a compile cache in a folder of the user's (reused by later processes, other nodes, Slurm tasks).

A whole-prefill ``torch.compile`` traces and generates code for every decoder layer again, so the cold compile
grows with the model's depth (the compile-depth measurements under docs/results/: 4 -> 32 layers, 1.73x on the
tiny LLaVA). :func:`mark_regions` runs every layer of the language model's decoder and of each vision tower's
encoder through ``torch.compiler.nested_compile_region``, one region per layer class: dynamo traces a layer once and
stamps its subgraph out for the other layers of that class whose inputs match (shapes, dtypes, guards; a layer
that differs gets its own entry). A region is reused only when its inputs are tensors, constants or modules, and
a decoder layer's ``past_key_values`` is a cache object: the fast path's static cache gets one :class:`CacheSlot`
module per layer (:func:`add_cache_slots`), and a marked decoder layer hands its region its own slot. Outside a
compile the region is a plain call, and a marked layer given any other cache (the eager engine's) runs its
class's forward: the eager engine and the uncompiled backends run the layers as unmarked ones.

Used by :class:`llava.fast.path.FastPath` for the compiling backends (``inductor``, ``eager``, ``aot_eager``)
unless ``load(..., fast_regional=False)``; :func:`region_count` says how many layers a model has marked.

The compile cache: Inductor keeps the code it generates (and AOTAutograd its graphs) in ``TORCHINDUCTOR_CACHE_DIR``,
by default a folder under the machine's temporary directory, which a cluster's node often wipes between jobs. The
fast path points it at a folder that lasts (:func:`use_cache_dir`): ``load(..., fast_cache=DIR)`` or the variable
``VTPRUNE_COMPILE_CACHE=DIR`` names ``DIR``; where neither does, the user's cache folder
(:func:`default_cache_dir`: ``$XDG_CACHE_HOME/vtprune/compile``, else ``~/.cache/vtprune/compile``, beside Hugging
Face's and torch's caches). Inside it, the subfolder ``<key>`` names the torch version, its CUDA and Triton builds: a
second process, or a Slurm task on another node, compiles from that cache instead of from scratch, and loads the
functions saved there ahead of time (:mod:`llava.fast.precompile`, its ``precompiled/`` subfolder). Where
``TORCHINDUCTOR_CACHE_DIR`` already names a folder other than Inductor's temporary one and no folder is named, that
folder is kept as it is and used. Every file
is written under a temporary name in its folder and then renamed (Inductor's, the saved functions, the checks below),
so processes that fill one folder at once each read whole files. Within a key, each entry is keyed by
Inductor on the traced graph itself (the ops, shapes, dtypes and devices: the model's architecture, the method,
the bucket) and its configuration, never on the weights' values, which are inputs: a changed model, dtype or
method traces another graph and misses; the same architecture with other weights reuses the code, correctly.

On a CPU, Inductor first checks which vector instructions its C++ code may use (a small program per instruction set,
compiled once and loaded in a child Python every process: about 1 s a process here), also in a process that only
loads precompiled functions; :func:`vec_isa` keeps those verdicts in the cache folder under everything they depend
on (compiler, torch, Python, Inductor's C++ options, the CPU), so a later process reads them instead of checking.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
import threading
import time
import types

import torch

__all__ = ["REGIONAL_BACKENDS", "CacheSlot", "add_cache_slots", "mark_regions", "region_count", "layer_lists",
           "cache_key", "default_cache_dir", "use_cache_dir", "vec_isa", "vec_isa_key"]

log = logging.getLogger(__name__)

#: the fast path's backends that trace with dynamo (the others: "cudagraphs" records the uncompiled function,
#: "none" runs it as it is)
REGIONAL_BACKENDS = ("inductor", "eager", "aot_eager")
#: per layer class, its one region (shared by every model of the process: the same code, compiled once)
_REGIONS: dict[type, object] = {}
#: distinct guard sets one region may hold: a model's layers of one class share one entry; a hybrid decoder's
#: layer types, prefill vs decode shapes and the buckets each take their own
_REUSE_ENTRIES = 64
_REGION_ARGS = inspect.signature(torch.compiler.nested_compile_region).parameters


def layer_lists(lm, towers) -> list[torch.nn.ModuleList]:
    """The stacks of repeated layers: the decoder's ``layers`` and, per vision tower, its longest ModuleList of
    one module class (CLIP's ``encoder.layers``, the Qwen towers' ``blocks``, InternViT's ``encoder.layer``)."""
    out = [lm.layers]
    for tower in towers:
        best = None
        for mod in tower.modules():
            if isinstance(mod, torch.nn.ModuleList) and len(mod) > 1 and len({type(m) for m in mod}) == 1:
                if best is None or len(mod) > len(best):
                    best = mod
        if best is not None and all(best is not o for o in out):
            out.append(best)
    return out


class CacheSlot(torch.nn.Module):
    """One layer of a :class:`~transformers.StaticCache` handed to a decoder layer's region as its
    ``past_key_values``. A region is reused only for inputs it can compare (tensors, constants, modules): the cache
    object is none of these, so every decoder layer would be traced again. The slot is a module whose buffers are
    the cache layer's own tensors (not copies: the decode and the eager code read the same), and whose ``update``
    is the static layer's: the new keys and values written in place at the layer's current length, which then
    grows by their count. The next layer's call maps onto that layer's slot (its buffers, by module source)."""

    def __init__(self, layer):
        super().__init__()
        self.register_buffer("keys", layer.keys, persistent=False)
        self.register_buffer("values", layer.values, persistent=False)
        self.register_buffer("cumulative_length", layer.cumulative_length, persistent=False)

    def update(self, key_states, value_states, *args, **kwargs):
        at = torch.arange(key_states.shape[-2], device=key_states.device) + self.cumulative_length
        self.cumulative_length.add_(key_states.shape[-2])
        self.keys.index_copy_(2, at, key_states)
        self.values.index_copy_(2, at, value_states)
        return self.keys, self.values


def add_cache_slots(cache) -> None:
    """Give a static cache its slots (:class:`CacheSlot`, one per layer; a hybrid decoder's linear-attention layers
    none: those decoders are not marked)."""
    cache._vtprune_slots = [CacheSlot(layer) if hasattr(layer, "keys") else None for layer in cache.layers]


def _region(cls):
    """The one nested compile region of a layer class: its ``forward``, as the class defines it."""
    if cls not in _REGIONS:
        def call(layer, *args, **kwargs):
            return cls.forward(layer, *args, **kwargs)

        call.__name__ = call.__qualname__ = f"region_{cls.__name__}"
        # torch < 2.13 (the device image's 2.11) has no max_reuse_entries: its regions reuse without that bound
        kw = {"max_reuse_entries": _REUSE_ENTRIES} if "max_reuse_entries" in _REGION_ARGS else {}
        _REGIONS[cls] = torch.compiler.nested_compile_region(call, **kw)
    return _REGIONS[cls]


def _decoder_forward(self, *args, past_key_values=None, **kwargs):
    """A marked decoder layer: with a static cache that has slots, the region on this layer's slot; with any other
    cache (the eager engine's), the class's forward as it is."""
    slots = getattr(past_key_values, "_vtprune_slots", None)
    if slots is None:
        return type(self).forward(self, *args, past_key_values=past_key_values, **kwargs)
    at = getattr(getattr(self, "self_attn", None), "layer_idx", None)  # the cache layer the stock forward updates
    return _REGIONS[type(self)](self, *args, past_key_values=slots[self._vtprune_slot if at is None else at], **kwargs)


def _encoder_forward(self, *args, **kwargs):
    return _REGIONS[type(self)](self, *args, **kwargs)


def mark_regions(lists, decoder: bool = True) -> int:
    """Run every layer of ``lists`` through its class's nested compile region (idempotent). The first list is the
    decoder's (``decoder=False``: left as it is, e.g. a hybrid decoder whose linear-attention layers keep other
    states in the cache), its layer ``i`` on the cache's slot ``i``. Returns the layers marked now."""
    n = 0
    for at, layers in enumerate(lists):
        if at == 0 and not decoder:
            continue
        for i, layer in enumerate(layers):
            if at == 0:  # its cache slot (again on a marked layer: the list may have changed, e.g. a copied layer)
                layer._vtprune_slot = i
            if getattr(layer, "_vtprune_region", False):
                continue
            _region(type(layer))  # made here, outside any trace (dynamo reads the table, never writes it)
            layer.forward = types.MethodType(_decoder_forward if at == 0 else _encoder_forward, layer)
            layer._vtprune_region = True
            n += 1
    return n


def region_count(model) -> int:
    """Layers of ``model`` that run as a nested compile region."""
    return sum(bool(getattr(m, "_vtprune_region", False)) for m in model.modules())


def cache_key() -> str:
    """The compile cache's subfolder: torch's version, its CUDA build (or cpu) and Triton's version, the parts
    that change every generated file while the graphs stay the same."""
    try:
        import triton

        tri = f"-triton{triton.__version__}"
    except ImportError:
        tri = ""
    cuda = f"cuda{torch.version.cuda}" if torch.version.cuda else "cpu"
    return f"torch{torch.__version__.split('+')[0]}-{cuda}{tri}"


def default_cache_dir() -> str:
    """The compile cache folder where none is named: ``$XDG_CACHE_HOME/vtprune/compile``, else
    ``~/.cache/vtprune/compile`` (where Hugging Face and torch keep theirs; a relative ``XDG_CACHE_HOME`` is ignored,
    as the XDG base directory specification asks)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vtprune", "compile")


def _inductor_default() -> str | None:
    """Inductor's own folder where ``TORCHINDUCTOR_CACHE_DIR`` is unset (under the temporary directory; Inductor writes
    it into the variable at its first use, and child processes inherit it: that value names no folder)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir as inductor_default

        return os.path.abspath(inductor_default())
    except Exception:  # noqa: BLE001 - an Inductor without it: every value set counts as named
        return None


_default_refused: str | None = None  # why the default folder could not be used (warned once per process)


def use_cache_dir(folder: str | os.PathLike | None = None) -> str | None:
    """Point Inductor's cache at the compile cache folder and return it. The folder: ``folder/<cache_key()>``
    (``folder``: the argument, else the variable ``VTPRUNE_COMPILE_CACHE``); neither named, the folder Inductor
    already uses where ``TORCHINDUCTOR_CACHE_DIR`` names one other than Inductor's own default (set by the user, or
    by an earlier fast path of this process or of its parent), kept as it is; else
    ``default_cache_dir()/<cache_key()>``. A default folder that cannot be made or
    written leaves Inductor's own (one warning a process; returns None: no precompiled functions). Process-wide, as
    Inductor's cache is; its in-memory caches are cleared when the folder changes."""
    global _default_refused
    folder = folder or os.environ.get("VTPRUNE_COMPILE_CACHE")
    if folder:
        path = os.path.join(os.path.abspath(os.path.expanduser(str(folder))), cache_key())
        os.makedirs(path, exist_ok=True)
    else:
        current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if current and os.path.abspath(os.path.expanduser(current)) != _inductor_default():
            return os.path.abspath(os.path.expanduser(current))
        path = os.path.join(default_cache_dir(), cache_key())
        try:
            os.makedirs(path, exist_ok=True)
            if not os.access(path, os.W_OK | os.X_OK):
                raise PermissionError(f"{path} is not writable")
        except OSError as err:
            if _default_refused is None:
                _default_refused = str(err)
                log.warning("compile cache: the default folder cannot be used (%s); Inductor's own temporary folder "
                            "is used and no function is precompiled: name one with load(..., fast_cache=DIR) or "
                            "VTPRUNE_COMPILE_CACHE=DIR", err)
            return None
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") != path:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
        from torch._inductor.utils import clear_caches

        clear_caches()
    return path


# ---------------------------------------------------------------- Inductor's CPU vector-ISA check, its verdicts kept
#: this process's :func:`vec_isa`: its seconds (None: it has not run), the checks it made and the verdicts it read
vec_isa_stats: dict = {"seconds": None, "checked": 0, "read": 0}
_VEC_ISA_LOCK = threading.Lock()


@functools.cache
def _machine() -> list:
    """The CPU a check ran on: its architecture, model and instruction-set flags (Linux's /proc/cpuinfo, its first
    processor). A cache folder shared by nodes with other CPUs keys their checks apart."""
    import platform

    out = [platform.machine(), sys.platform]
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                k = line.split(":", 1)[0].strip()
                if k in ("model name", "flags", "Features", "cpu model", "isa") and k not in out:
                    out += [k, line.split(":", 1)[1].strip()]
                if not line.strip() and len(out) > 2:  # the first processor's block only
                    break
    except OSError:
        pass
    return out


@functools.cache
def _torch_library() -> list:
    """torch's install as a compiled probe links and loads against it: its folder, version, commit and its CPU
    library's size and modification time (a reinstall in place changes them)."""
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    stats = []
    try:
        for name in sorted(os.listdir(lib)):
            if name.startswith(("libtorch_cpu.", "libc10.")):
                st = os.stat(os.path.join(lib, name))
                stats.append([name, st.st_size, st.st_mtime_ns])
    except OSError:
        pass
    return [lib, torch.__version__, getattr(torch.version, "git_version", None), stats]


def vec_isa_key(isa, code: str) -> str:
    """What one of Inductor's compile-and-load checks of ``isa`` on ``code`` depends on, as a SHA-256: Inductor's own
    fingerprint of the check's compile (the C++ compiler's ``-v`` text, the ISA's flags, torch's version), the
    ISA, its flags and macros, the code, Inductor's ``cpp.*`` options, torch's install (:func:`_torch_library`),
    the Python that loads the library and its library path, and the CPU (:func:`_machine`)."""
    import hashlib
    import json

    from torch._inductor import config
    from torch._inductor import cpu_vec_isa as isa_mod

    flags = isa.build_arch_flags()
    fingerprint = getattr(isa_mod, "_get_isa_dry_compile_fingerprint", None)
    if fingerprint is not None:
        fingerprint = fingerprint(flags)
    else:  # another torch: the compiler by its own words
        from torch._inductor.cpp_builder import get_compiler_version_info, get_cpp_compiler

        fingerprint = get_compiler_version_info(get_cpp_compiler())
    desc = {
        "fingerprint": fingerprint,
        "isa": [f"{type(isa).__module__}.{type(isa).__qualname__}", str(isa), flags, list(isa.build_macro())],
        "code": hashlib.sha256(code.encode()).hexdigest(),
        "cpp": {k: repr(v) for k, v in sorted(config.get_config_copy().items()) if k.startswith("cpp.")},
        "torch": _torch_library(),
        "python": [sys.executable, sys.version, sys.platform, os.environ.get("LD_LIBRARY_PATH", ""),
                   os.environ.get("CXX", ""), os.environ.get("CC", "")],
        "machine": _machine(),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


def cached_check(check, isa, code: str, folder: str) -> bool:
    """``check(isa, code)`` (Inductor's ``VecISA.check_build``: compile ``code`` with the ISA's flags, load the
    library in a child Python), its verdict read from ``folder/<vec_isa_key>.json`` when a process already made it
    there, else made and written (to a temporary file, then renamed). A file that does not read is made again; a
    key that cannot be made (an Inductor whose internals moved) leaves the check as Inductor runs it, unkept."""
    import json

    try:
        path = os.path.join(folder, vec_isa_key(isa, code) + ".json")
    except Exception:  # noqa: BLE001 - the check itself still answers
        vec_isa_stats["checked"] += 1
        return bool(check(isa, code))
    try:
        with open(path) as fh:
            ok = json.load(fh)["ok"]
        if isinstance(ok, bool):
            vec_isa_stats["read"] += 1
            return ok
    except (OSError, ValueError, KeyError, TypeError):
        pass
    ok = bool(check(isa, code))
    vec_isa_stats["checked"] += 1
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"ok": ok, "isa": str(isa), "flags": isa.build_arch_flags(), "torch": torch.__version__}, fh)
        os.replace(tmp, path)
    except OSError:  # a read-only folder: the verdict is still right, the next process checks again
        pass
    return ok


def vec_isa(folder: str | None = None):
    """Inductor's choice of CPU vector instructions for the code it generates and loads (``pick_vec_isa``), made once
    per process as Inductor makes it, with each of its checks' verdicts kept on disk.

    Inductor checks every instruction set the CPU reports (AVX-512 with its BF16 / VNNI / AMX parts, AVX2, ...) by
    compiling a small C++ program with that set's flags and loading the library in a child Python: about 1 s per
    process on our 2-core CPU, also in a process that only loads precompiled functions (the loader recomputes each
    kernel's compile command, the chosen set's flags in it, to find its library in the cache). It already keeps the
    compiled program (keyed by the compiler, the flags and torch's version) but loads it again every process. Here
    each verdict is read from ``folder`` (default: ``vec_isa/`` in Inductor's cache folder, which the fast path sets:
    :func:`use_cache_dir`) under a key of everything the check depends on (:func:`vec_isa_key`: a new
    compiler, torch, Python, Inductor option or CPU checks again); a missing one is checked as Inductor does and
    written. The check itself is Inductor's (its ``check_build``, swapped in for this one call): nothing is skipped,
    every verdict read was made by that check under the same key. No-op when this process already chose (a
    compile or a load ran).
    Returns the chosen set (None on a torch whose check is not the one described here: it then runs as it is)."""
    from torch._inductor import cpu_vec_isa as isa_mod

    info = getattr(isa_mod.valid_vec_isa_list, "cache_info", None)
    if info is None or not callable(getattr(isa_mod.VecISA, "check_build", None)):  # another torch: its own way
        return None
    if info().currsize:  # chosen already in this process
        return isa_mod.pick_vec_isa()
    if folder is None:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        folder = cache_dir()
    folder = os.path.join(folder, "vec_isa")
    original = isa_mod.VecISA.check_build
    t0 = time.perf_counter()
    with _VEC_ISA_LOCK:
        isa_mod.VecISA.check_build = lambda self, code: cached_check(original, self, code, folder)
        try:
            chosen = isa_mod.pick_vec_isa()
        finally:
            isa_mod.VecISA.check_build = original
    vec_isa_stats["seconds"] = time.perf_counter() - t0
    return chosen
