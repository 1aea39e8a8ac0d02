"""Precompiled fast-path functions: a later process loads each captured function from disk instead of tracing it.

Why: with Inductor's cache warm, a new process still runs dynamo over every fast-path function it calls (the
tower, the prefill, the decode step): 8-9 s of Python tracing at 32 decoder layers on a CPU, most of a second
process's time to its first tokens (the compile-depth measurements under docs/results/). PyTorch's ahead-of-time
capture (``torch.compile(fn).aot_compile``, ``torch.compiler.load_compiled_function``) saves the traced function:
the generated code, the bytecode that feeds it and dynamo's guards. Loading it traces nothing.

What dynamo's guards would check is checked here instead, by the file's key. The guards of a fast-path function
reach through the fast path's object to the engine, the method and the model; PyTorch cannot serialise most of them
(object identities, dict versions, the marked layers' forwards), so every guard is dropped and the key stands for
them. A function's file is named by the SHA-256 of

- the build: torch (with its CUDA / Triton: :func:`llava.fast.compile.cache_key`), transformers, Python;
- the code that is traced: every ``.py`` file of this repository's packages (``llava``, the method packages,
  ``baselines``) and the method class's own file (a user's method from a file; other files of the user's that it
  imports are not read: after changing them, point ``fast_cache`` at a new folder); transformers by its version;
- the model: its full configuration (the architecture), the parameters' dtype and device type, the attention
  implementations;
- the method: its class, :meth:`~llava.method.PruningMethod.config` (name, budget, named options) and every other
  plain attribute; the family adapter's plain attributes; the fast path's backend and options;
- the model's layout: every module's class, every parameter's and buffer's name, shape, dtype and device type;
- the call: every argument's structure, each tensor's shape, dtype, stride and device type, and every other value
  itself (the plan ``_Spec``: bucket, batch, samples, the plan's segments); grad mode, autocast and the default dtype.

Weights are inputs of the generated code, never part of it: the same architecture with other weights reuses a file,
correctly. A value whose text names an object's address (``<... at 0x...>``) would make a key no later process can
match: that function is compiled in memory the regular way and not saved (a warning says which). A file that fails
to load (another build wrote it, a truncated write) is compiled again and rewritten.

Every file begins with :data:`MAGIC` and one line of JSON naming what it was saved for, part by part (build,
device, code, model, layout, method, adapter, engine, the fast path's options, the call structure; by digest). A load
compares them with the caller's before anything of the file runs: a file that differs (copied or renamed over
another's name, written by an earlier format) is never run; the warning names the parts that differ, and the
function is compiled afresh and the file rewritten. The device part is a GPU's name and compute capability, or a
CPU's architecture, model and instruction-set flags: a cache folder shared by nodes of other devices keys their
files apart.

Used by :class:`llava.fast.path.FastPath` **by default** (:func:`precompile_folder`) where it can be: the
``inductor`` backend (or ``aot_eager`` without regions) on a torch that has the capture, the files in the
``precompiled/`` subfolder of the compile cache folder (:func:`llava.fast.compile.use_cache_dir`: ``fast_cache=`` /
``VTPRUNE_COMPILE_CACHE`` where one is named, else the user's ``~/.cache/vtprune/compile``, or
``$XDG_CACHE_HOME/vtprune/compile``); elsewhere the regular compile, as without it. Processes may fill one folder at
once: each file is written under a temporary name beside its final one and then renamed, so a reader finds a whole
file or none (two processes that compile the same function each write it whole; the last rename wins), and a
file that does not load is compiled again. ``load(..., fast_precompile=False)`` or ``VTPRUNE_FAST_PRECOMPILE=0``
turn it off; ``True`` / ``=1`` make a backend or folder that cannot hold it an error. On a GPU the reload of
Inductor's CUDA graphs is checked by ``gpu_session.sh one-call`` (its step 3). On a CPU a loading process still needs
Inductor's choice of vector instructions (each kernel's library is found in the cache by its compile command, which
holds the chosen set's flags); the fast path keeps the verdicts of the check behind that choice in the cache folder
(:func:`llava.fast.compile.vec_isa`), so a later process reads them instead of loading a test program per
instruction set in a child Python (about 1 s a process on our 2-core CPU).

A torch without the ahead-of-time capture (:func:`missing`: feature detection, not versions; torch 2.11 has
``aot_compile`` only behind dynamo's experimental ``enable_aot_compile`` flag, off, which is left alone) compiles the
regular way instead: one warning per process where they were asked for explicitly (:func:`active`), then ``torch.compile`` with the same backend and
options as without precompile; ``load`` records the request and what was resolved (``rt.info["fast"]``:
``precompile`` and ``precompile_active``; the fast path's ``precompile_requested`` and ``precompile``).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import inspect
import json
import logging
import os
import platform
import threading
import time

import torch

__all__ = ["MAGIC", "Precompiled", "PRECOMPILE_BACKENDS", "active", "compile_function", "describe", "file_header",
           "mismatch", "missing", "precompile_folder", "requested", "static_description", "static_key",
           "source_digest", "wanted"]

log = logging.getLogger(__name__)

#: the backends whose compiled functions PyTorch can serialise (dynamo's "eager" returns plain bytecode)
PRECOMPILE_BACKENDS = ("inductor", "aot_eager")
#: this repository's packages, whose code a fast-path function traces
_PACKAGES = ("llava", "consensusdrop", "visiondrop", "attnmix", "baselines")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository (llava/fast/../..)


@functools.lru_cache(maxsize=None)
def source_digest(extra: tuple = ()) -> str:
    """SHA-256 of every ``.py`` file of the repository's packages and of the ``extra`` files (paths, sorted)."""
    h = hashlib.sha256()
    files = []
    for pkg in _PACKAGES:
        for d, subdirs, names in os.walk(os.path.join(_ROOT, pkg)):
            subdirs[:] = sorted(s for s in subdirs if s != "__pycache__")
            files += [os.path.join(d, n) for n in names if n.endswith(".py")]
    for f in sorted(files) + [e for e in extra if e not in files]:
        h.update(os.path.relpath(f, _ROOT).encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()


def _plain(x, depth: int = 0):
    """A JSON-able description of a plain value (numbers, text, enums, containers, dataclasses, tensors by shape,
    dtype and a digest of small contents); anything else by its type's name only."""
    if depth > 6:
        return "..."
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, enum.Enum):
        return f"{type(x).__qualname__}.{x.name}"
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    if isinstance(x, torch.Tensor):  # a method's tensor attribute: read to the host once per fast path (its key)
        small = x.numel() <= 4096 and x.device.type != "meta"
        digest = hashlib.sha256(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                                ).hexdigest()[:16] if small else None
        return ["tensor", list(x.shape), str(x.dtype), digest]
    if isinstance(x, dict):
        return {str(k): _plain(v, depth + 1) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))}
    if isinstance(x, (list, tuple, set, frozenset)):
        items = sorted(x, key=repr) if isinstance(x, (set, frozenset)) else x
        return [_plain(v, depth + 1) for v in items]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name), depth + 1) for f in dataclasses.fields(x)}
    return f"<{type(x).__module__}.{type(x).__qualname__}>"


def _attrs(obj) -> dict:
    """An object's attributes as :func:`_plain` describes them (modules and callables left out: they are the model's
    or code, keyed elsewhere)."""
    out = {}
    for k, v in sorted(vars(obj).items()):
        if k.startswith("__") or callable(v) or isinstance(v, torch.nn.Module):
            continue
        out[k] = _plain(v)
    return out


def _device(model) -> list:
    """The device the generated code was made for: a GPU by its name and compute capability (Triton's kernels are
    built for one), a CPU by its architecture, model and instruction-set flags (Inductor's C++ kernels by the vector
    instructions it picked): a cache folder shared by nodes of other devices keys their files apart."""
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return ["cuda", props.name, [props.major, props.minor]]
    if dev.type == "cpu":
        from .compile import _machine

        return ["cpu", *_machine()]
    return [dev.type]


def static_description(fast) -> dict:
    """What every file of this fast path shares (see the module docstring), part by part: build, device, code,
    model, layout, method, adapter, engine and the fast path's options."""
    e = fast.env
    model = e.model
    par = next(model.parameters())
    impls = {}
    layout = hashlib.sha256()  # every module's class, every parameter's and buffer's shape and dtype (a tower kept
    for name, mod in model.named_modules():  # in fp32, a partial load's absent layers, a swapped module)
        layout.update(f"{name}:{type(mod).__module__}.{type(mod).__qualname__};".encode())
        cfg = getattr(mod, "config", None)
        if cfg is not None and name.count(".") < 3:
            impls[name] = getattr(cfg, "_attn_implementation", None)
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        layout.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{t.device.type};".encode())
    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = None
    from .compile import cache_key

    try:
        method_file = inspect.getsourcefile(type(e.method))
    except TypeError:  # a class without a file (defined in an interactive session): its attributes only
        method_file = None
    return {
        "build": [cache_key(), torch.__version__, tf, platform.python_version()],
        "device": _device(model),
        "layout": layout.hexdigest(),
        "code": source_digest((os.path.abspath(method_file),) if method_file else ()),
        "model": [model.config.to_json_string(use_diff=False), str(par.dtype), par.device.type, impls],
        "method": [f"{type(e.method).__module__}.{type(e.method).__qualname__}", _plain(e.method.config()),
                   _attrs(e.method)],
        "adapter": [f"{type(e.adapter).__module__}.{type(e.adapter).__qualname__}", _attrs(e.adapter)],
        "engine": [e.family, _plain(e.reindex)],
        "fast": [fast.backend, fast.cuda_graphs, fast.regional, fast.attention, list(fast.buckets)],
    }


def _digest(x) -> str:
    return hashlib.sha256(json.dumps(x, sort_keys=True, default=str).encode()).hexdigest()


def static_key(fast) -> str:
    """The SHA-256 of :func:`static_description`: what every file of this fast path shares."""
    return _digest(static_description(fast))


#: the first line of every saved function: the format, then one line of JSON (what the function was saved for, part
#: by part), then PyTorch's serialised function
MAGIC = b"vtprune-precompiled 1\n"


def file_header(name: str, static: dict, call: str) -> dict:
    """What a saved function was saved for: its name, each part of the static description and the call structure,
    by digest. A load compares them with the caller's and names the parts that differ."""
    return {"function": name, "static": {k: _digest(v)[:16] for k, v in sorted(static.items())},
            "call": _digest(call)[:16]}


def mismatch(saved: dict | None, wanted_header: dict) -> list[str]:
    """The parts of ``wanted_header`` that ``saved`` (a file's header; None: no header of this format) differs in."""
    if not isinstance(saved, dict):
        return ["format"]
    out = [] if saved.get("function") == wanted_header["function"] else ["function"]
    got = saved.get("static") if isinstance(saved.get("static"), dict) else {}
    out += [k for k, v in wanted_header["static"].items() if got.get(k) != v]
    out += [k for k in got if k not in wanted_header["static"]]
    if saved.get("call") != wanted_header["call"]:
        out.append("call (argument shapes, dtypes, strides, values)")
    return out


def describe(x):
    """The structure of a call's arguments (hashable): tensors by shape, dtype, stride and device type, containers
    by their items, a static cache by its layers' tensors (remembered on the cache: its tensors keep their shapes),
    any other value by its type and itself (its ``repr`` in the file's key). Not the capture backend's in-process key
    (``llava.fast.graphs._leaf_key``): a file's key must read the same in another process, so the cache is described
    by its tensors (not its identity), and strides and types (``True`` vs ``1``) enter it."""
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.dtype, x.stride(), x.device.type)
    if isinstance(x, dict):
        return ("D",) + tuple((k, describe(v)) for k, v in sorted(x.items(), key=lambda kv: str(kv[0])))
    if isinstance(x, (list, tuple)):
        return ("L" if isinstance(x, list) else "U",) + tuple(describe(v) for v in x)
    layers = getattr(x, "layers", None)
    if layers is not None and hasattr(x, "get_seq_length"):  # a transformers cache
        d = getattr(x, "_vtprune_desc", None)
        if d is None:
            d = ("C", type(x).__qualname__, bool(getattr(x, "_vtprune_slots", None))) + tuple(
                describe({k: v for k, v in vars(layer).items() if isinstance(v, torch.Tensor)}) for layer in layers)
            x._vtprune_desc = d
        return d
    try:
        hash(x)
    except TypeError:
        return ("V", type(x).__qualname__, repr(x))
    return ("V", type(x).__qualname__, x)  # the plan (a frozen dataclass), numbers: their text is for the file's key


def _global_state() -> tuple:
    """What dynamo's global-state guard would compare at a call: grad mode, autocast, the default dtype."""
    return (torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda"),
            torch.get_default_dtype())


def _drop_guards(entries):
    return [False] * len(entries)  # the file's key stands for them (module docstring)


class Precompiled:
    """One fast-path function (a bound method of the fast path), compiled ahead of time per call structure, saved
    under ``folder``, and loaded from there by later processes. ``last_new``: the last call compiled or loaded;
    ``loaded`` / ``compiled``: how many files this wrapper loaded / compiled, ``load_s`` / ``compile_s`` the seconds
    they took (a load: the file read, its generated code imported, its kernels' libraries loaded)."""

    def __init__(self, fn, folder: str, fast, backend: str, options: dict | None = None):
        self.fn, self.owner, self.folder, self.fast = fn.__func__, fn.__self__, folder, fast
        self.name = fn.__name__.strip("_")
        self.backend, self.options = backend, dict(options or {})
        self._mem: dict = {}  # call structure -> AOTCompiledFunction
        self.last_new = False
        self.loaded = self.compiled = 0
        self.stale = 0  # files found under this function's name saved for something else (never run)
        self.load_s = self.compile_s = 0.0
        self.refused: str | None = None  # why this function's files are not written (one warning)

    def __call__(self, *args):
        k = (describe(args), _global_state())
        f = self._mem.get(k)
        self.last_new = f is None
        if f is None:
            f = self._mem[k] = self._get(k, args)
        return f(self.owner, *args)

    def _get(self, k, args):
        fast = self.fast
        static = getattr(fast, "_precompile_key", None)
        if static is None:  # one per fast path, made at its first call (its functions share it)
            desc = static_description(fast)
            static = fast._precompile_key = _digest(desc)
            fast._precompile_desc = desc
        desc = getattr(fast, "_precompile_desc", None)
        text = repr(k)
        digest = hashlib.sha256((static + "\0" + self.name + "\0" + text).encode()).hexdigest()[:32]
        path = os.path.join(self.folder, f"{self.name}-{digest}.bin")
        header = file_header(self.name, desc if desc is not None else {"key": static}, text)
        if " at 0x" in text:
            path = None
            if self.refused is None:
                self.refused = f"an argument of {self.name} has no stable text (an object's address)"
                log.warning("fast_precompile: %s; compiled in memory, not saved", self.refused)
        if path and os.path.exists(path):
            f = self._load(path, header)
            if f is not None:
                return f
        opts = {**self.options, "guard_filter_fn": _drop_guards}
        c = torch.compile(self.fn, fullgraph=True, dynamic=False, backend=self.backend, options=opts)
        t0 = time.perf_counter()
        f = c.aot_compile(((self.owner, *args), {}))
        f.disable_guard_check()
        self.compiled += 1
        self.compile_s += time.perf_counter() - t0
        log.info("fast_precompile: %s compiled in %.1f s", self.name, time.perf_counter() - t0)
        if path:
            try:
                self._save(f, path, header)
            except Exception as err:
                self.refused = f"{self.name} could not be saved ({type(err).__name__}: {err})"
                log.warning("fast_precompile: %s; compiled in memory", self.refused)
        return f

    def _load(self, path: str, header: dict):
        """The function saved at ``path`` when its header matches ``header`` (else None, after a warning naming what
        differs: it is never run); a file that does not load (truncated, another build's format) is None too."""
        from torch.compiler import load_compiled_function

        t0 = time.perf_counter()
        try:
            with open(path, "rb") as fh:
                saved = None  # a file without the first line: another version's format
                if fh.readline() == MAGIC:
                    line = fh.readline()
                    if not line.endswith(b"\n"):
                        raise ValueError("its header is cut short")
                    saved = json.loads(line)  # an unreadable header: damaged, as a truncated function
                differ = mismatch(saved, header)
                if differ:
                    log.warning("fast_precompile: %s was saved for another %s; it is not run: compiling it afresh",
                                path, ", ".join(differ))
                    self.stale += 1
                    return None
                with torch._inductor.config.patch(self.options):  # as it was compiled
                    f = load_compiled_function(fh, f_globals=self.fn.__globals__)
            f.disable_guard_check()
            self.loaded += 1
            return f
        except Exception as err:  # truncated, unreadable: compile again, rewrite
            log.warning("fast_precompile: %s did not load (%s: %s); compiling it again", path, type(err).__name__, err)
            return None
        finally:
            self.load_s += time.perf_counter() - t0

    def _save(self, f, path: str, header: dict) -> None:
        """``f`` at ``path``: :data:`MAGIC`, ``header`` as one line of JSON, then PyTorch's serialised function;
        written to a temporary file of this process and thread in the same folder, then renamed (never half a file
        under the name, also while other processes write the same one)."""
        os.makedirs(self.folder, exist_ok=True)
        tmp = f"{path}.{os.getpid()}-{threading.get_ident()}.tmp"
        try:
            f.save_compiled_function(tmp)
            with open(tmp, "rb") as fh:
                payload = fh.read()
            with open(tmp, "wb") as fh:
                fh.write(MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def requested(precompile: bool | None) -> bool | None:
    """What the user asked for: ``precompile`` when given, else the variable ``VTPRUNE_FAST_PRECOMPILE`` ("0": False,
    any other value: True); None when neither says (the default: on where it can be, :func:`precompile_folder`)."""
    if precompile is not None:
        return bool(precompile)
    value = os.environ.get("VTPRUNE_FAST_PRECOMPILE", "")
    return None if value == "" else value != "0"


def wanted(precompile: bool | None) -> bool:
    """Whether precompiled functions are wanted: on unless turned off (``fast_precompile=False`` or
    ``VTPRUNE_FAST_PRECOMPILE=0``)."""
    return requested(precompile) is not False


def _probe(x):  # a function to wrap when asking what torch.compile's wrapper offers (never called)
    return x


@functools.lru_cache(maxsize=None)
def missing() -> str | None:
    """What this torch lacks of the ahead-of-time capture :class:`Precompiled` uses (None: nothing), by feature:
    the compiled wrapper's ``aot_compile`` (not a compile: ``torch.compile`` wraps lazily), the loader
    ``torch.compiler.load_compiled_function``, and the saved function's ``save_compiled_function`` and
    ``disable_guard_check``. Torch 2.11 lacks the first: it sets ``aot_compile`` only under dynamo's experimental
    ``enable_aot_compile`` flag (off by default), which this module does not turn on."""
    lacks = []
    if not hasattr(torch.compile(_probe, backend="eager"), "aot_compile"):
        lacks.append("torch.compile(fn).aot_compile")
    if not callable(getattr(torch.compiler, "load_compiled_function", None)):
        lacks.append("torch.compiler.load_compiled_function")
    try:
        from torch._dynamo.aot_compile import AOTCompiledFunction
    except ImportError:
        lacks.append("torch._dynamo.aot_compile.AOTCompiledFunction")
    else:
        lacks += [f"AOTCompiledFunction.{n}" for n in ("save_compiled_function", "disable_guard_check")
                  if not hasattr(AOTCompiledFunction, n)]
    return ", ".join(lacks) or None


_warned = False  # the missing-feature warning: once per process


def active(precompile: bool | None) -> bool:
    """Whether this torch gives the precompiled functions :func:`wanted` (:func:`missing`: nothing lacking). Asked
    for explicitly on a torch that lacks the capture: False, after one warning per process (the regular compile runs
    instead); by default: False without a word (the regular compile, as where the default cannot apply)."""
    global _warned
    req = requested(precompile)
    if req is False:
        return False
    lacks = missing()
    if lacks is None:
        return True
    if req and not _warned:
        _warned = True
        log.warning("fast_precompile: precompiled functions need a newer torch (torch %s lacks %s); the regular "
                    "compile (torch.compile with the same backend, e.g. Inductor, traced in every process) is used "
                    "instead", torch.__version__, lacks)
    return False


def precompile_folder(precompile, backend: str, cache_dir: str | None, regional: bool = False) -> str | None:
    """Where a fast path's precompiled functions go (None: not precompiled, the regular compile).

    On by default (:func:`requested` None) wherever they can be: a precompiling backend (``inductor``, or
    ``aot_eager`` without regions), a compile cache folder (``cache_dir``: the fast path's, named or the default one,
    None only where the default could not be made) and a torch that has the capture (:func:`missing`);
    elsewhere the default quietly compiles the regular way. Asked for explicitly (``fast_precompile=True`` or
    ``VTPRUNE_FAST_PRECOMPILE=1``), a backend or folder that cannot hold them is an error (the same on every torch),
    and a torch without the capture compiles the regular way after one warning (:func:`active`). Turned off
    (``False`` / ``0``): None."""
    req = requested(precompile)
    if req is False:
        return None
    can = backend in PRECOMPILE_BACKENDS and bool(cache_dir) and not (backend == "aot_eager" and regional)
    if req is None:  # the default: where it can be, on a torch that has it
        return os.path.join(cache_dir, "precompiled") if can and missing() is None else None
    if backend not in PRECOMPILE_BACKENDS:
        raise ValueError(f"fast_precompile needs the {' or '.join(PRECOMPILE_BACKENDS)} backend, not {backend!r}")
    if backend == "aot_eager" and regional:  # torch 2.13: a saved aot_eager graph with regions fails when it runs
        raise ValueError("fast_precompile with the aot_eager backend needs fast_regional=False (its saved regions do "
                         "not run after loading: auto_functionalized inside invoke_subgraph); inductor keeps them")
    if not cache_dir:
        raise ValueError("fast_precompile needs a compile cache folder (the default one could not be used): "
                         "load(..., fast_cache=DIR) or the variable VTPRUNE_COMPILE_CACHE=DIR")
    if not active(True):  # this torch lacks the capture: one warning, the regular compile
        return None
    return os.path.join(cache_dir, "precompiled")


def compile_function(fast, fn, log):
    """``fn`` (a fast-path function) as the fast path's backend runs it: as it is ("none"), recorded as CUDA graphs
    ("cudagraphs": :class:`llava.fast.graphs.CapturedFunction`), precompiled (:class:`Precompiled`), or through
    ``torch.compile`` (Inductor with CUDA graphs on a GPU, watched for the graphs it declines to capture)."""
    if fast.backend == "none":
        return fn
    if fast.backend == "cudagraphs":  # capture only: the uncompiled function recorded per key (llava.fast.graphs)
        from .graphs import CapturedFunction

        if fast._pool is None and torch.cuda.is_available():
            fast._pool = torch.cuda.graph_pool_handle()
        return CapturedFunction(fn, name=fn.__name__.strip("_"), pool=fast._pool)
    # every (bucket, batch, signature) is one entry of the same function: allow many
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)
    graphs = fast.cuda_graphs and fast.backend == "inductor"
    options = {"triton.cudagraphs": True} if graphs else {}  # what mode="reduce-overhead" sets
    if fast.precompile:
        out = Precompiled(fn, fast.precompile, fast, fast.backend, options)
    else:
        out = torch.compile(fn, fullgraph=True, dynamic=False, backend=fast.backend, options=options or None)
    if not graphs:
        return out
    from .graphs import WatchedCompile  # Inductor + CUDA graphs: a graph it declines to capture is reported

    return WatchedCompile(out, fn.__name__.strip("_"), fast.cudagraph_skips, log)
