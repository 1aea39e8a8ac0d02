"""Precompiled fast-path functions: a later process loads each captured function from disk instead of tracing it.

Why: with Inductor's cache warm, a new process still runs dynamo over every fast-path function it calls (the
tower, the prefill, the decode step): 8-9 s of Python tracing at 32 decoder layers on a CPU, most of a second
process's time to its first tokens (docs/results/2026-11-26-compile-depth-cpu.md). PyTorch's ahead-of-time capture
(``torch.compile(fn).aot_compile``, ``torch.compiler.load_compiled_function``) saves the traced function: the
generated code, the bytecode that feeds it and dynamo's guards. Loading it traces nothing.

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
  itself (the plan ``_Spec``: bucket, batch, samples, stages); grad mode, autocast and the default dtype.

Weights are inputs of the generated code, never part of it: the same architecture with other weights reuses a file,
correctly. A value whose text names an object's address (``<... at 0x...>``) would make a key no later process can
match: that function is compiled in memory as before and not saved (a warning says which). A file that fails to
load (another build wrote it, a truncated write) is compiled again and rewritten.

Used by :class:`llava.fast.path.FastPath` when ``load(..., fast_precompile=True)`` (or the variable
``VTPRUNE_FAST_PRECOMPILE=1``) with the ``inductor`` or ``aot_eager`` backend and a compile cache folder
(``fast_cache=`` / ``VTPRUNE_COMPILE_CACHE``): the files go to its ``precompiled/`` subfolder. Off by default: on a
GPU the reload of Inductor's CUDA graphs is not yet checked (``gpu_session.sh fast-precompile``). On a CPU a loading
process still needs Inductor's choice of vector instructions (each kernel's library is found in the cache by its
compile command, which holds the chosen set's flags); the fast path keeps the verdicts of the check behind that
choice in the cache folder (:func:`llava.fast.compile.vec_isa`), so a later process reads them instead of loading a
test program per instruction set in a child Python (about 1 s a process on our 2-core CPU).

A torch without the ahead-of-time capture (:func:`missing`: feature detection, not versions; torch 2.11 has
``aot_compile`` only behind dynamo's experimental ``enable_aot_compile`` flag, off, which is left alone) compiles the
regular way instead: one warning per process (:func:`active`), then ``torch.compile`` with the same backend and
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
import time

import torch

__all__ = ["Precompiled", "PRECOMPILE_BACKENDS", "active", "compile_function", "describe", "missing",
           "precompile_folder", "static_key", "source_digest", "wanted"]

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


def static_key(fast) -> str:
    """What every file of this fast path shares (see the module docstring): build, code, model, method, options."""
    e = fast.engine
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
    desc = {
        "build": [cache_key(), torch.__version__, tf, platform.python_version()],
        "layout": layout.hexdigest(),
        "code": source_digest((os.path.abspath(method_file),) if method_file else ()),
        "model": [model.config.to_json_string(use_diff=False), str(par.dtype), par.device.type, impls],
        "method": [f"{type(e.method).__module__}.{type(e.method).__qualname__}", _plain(e.method.config()),
                   _attrs(e.method)],
        "adapter": [f"{type(e.adapter).__module__}.{type(e.adapter).__qualname__}", _attrs(e.adapter)],
        "engine": [e.family, _plain(getattr(e, "_reindex", None))],
        "fast": [fast.backend, fast.cuda_graphs, fast.regional, fast.attention, list(fast.buckets)],
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


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
        static = getattr(self.fast, "_precompile_key", None)
        if static is None:  # one per fast path, made at its first call (its functions share it)
            static = self.fast._precompile_key = static_key(self.fast)
        text = repr(k)
        digest = hashlib.sha256((static + "\0" + self.name + "\0" + text).encode()).hexdigest()[:32]
        path = os.path.join(self.folder, f"{self.name}-{digest}.bin")
        if " at 0x" in text:
            path = None
            if self.refused is None:
                self.refused = f"an argument of {self.name} has no stable text (an object's address)"
                log.warning("fast_precompile: %s; compiled in memory, not saved", self.refused)
        if path and os.path.exists(path):
            from torch.compiler import load_compiled_function

            t0 = time.perf_counter()
            try:
                with open(path, "rb") as fh, torch._inductor.config.patch(self.options):  # as it was compiled
                    f = load_compiled_function(fh, f_globals=self.fn.__globals__)
                f.disable_guard_check()
                self.loaded += 1
                return f
            except Exception as err:  # written by another build, truncated: compile again, rewrite
                log.warning("fast_precompile: %s did not load (%s: %s); compiling it again", path,
                            type(err).__name__, err)
            finally:
                self.load_s += time.perf_counter() - t0
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
                os.makedirs(self.folder, exist_ok=True)
                f.save_compiled_function(path)  # written to a temporary file, then renamed: never half a file
            except Exception as err:
                self.refused = f"{self.name} could not be saved ({type(err).__name__}: {err})"
                log.warning("fast_precompile: %s; compiled in memory", self.refused)
        return f


def wanted(precompile: bool | None) -> bool:
    """``precompile``, or when None the variable ``VTPRUNE_FAST_PRECOMPILE`` (set and not "0")."""
    if precompile is None:
        return os.environ.get("VTPRUNE_FAST_PRECOMPILE", "") not in ("", "0")
    return bool(precompile)


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
    """Whether precompiled functions are used: :func:`wanted`, and this torch has what they need (:func:`missing`).
    Wanted on a torch that lacks it: False, after one warning per process (the regular compile runs instead)."""
    global _warned
    if not wanted(precompile):
        return False
    lacks = missing()
    if lacks is None:
        return True
    if not _warned:
        _warned = True
        log.warning("fast_precompile: precompiled functions need a newer torch (torch %s lacks %s); the regular "
                    "compile (torch.compile with the same backend, e.g. Inductor, traced in every process) is used "
                    "instead", torch.__version__, lacks)
    return False


def precompile_folder(precompile, backend: str, cache_dir: str | None, regional: bool = False) -> str | None:
    """Where a fast path's precompiled functions go (None: not precompiled). ``precompile`` True, or None with the
    variable ``VTPRUNE_FAST_PRECOMPILE=1``; it needs a precompiling backend and a compile cache folder (refused the
    same on every torch), and a torch that has the capture (:func:`active`; else None: the regular compile)."""
    if not wanted(precompile):
        return None
    if backend not in PRECOMPILE_BACKENDS:
        raise ValueError(f"fast_precompile needs the {' or '.join(PRECOMPILE_BACKENDS)} backend, not {backend!r}")
    if backend == "aot_eager" and regional:  # torch 2.13: a saved aot_eager graph with regions fails when it runs
        raise ValueError("fast_precompile with the aot_eager backend needs fast_regional=False (its saved regions do "
                         "not run after loading: auto_functionalized inside invoke_subgraph); inductor keeps them")
    if not cache_dir:
        raise ValueError("fast_precompile needs a compile cache folder: load(..., fast_cache=DIR) or the variable "
                         "VTPRUNE_COMPILE_CACHE")
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
