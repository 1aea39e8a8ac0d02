"""The fast path's capture-only backend (``fast_backend="cudagraphs"``): each static-shape function of
:class:`llava.fast.path.FastPath` (prefill, piecewise graphs, decode step) recorded as a CUDA graph of the
*uncompiled* function, without dynamo tracing or Inductor code generation.

Why: at batch 1 a 7B prefill on a current GPU is bound by kernel launches, not FLOPs; a CUDA graph removes
the launches and costs one eager run to record (seconds), where Inductor's code generation for a 32-layer
decoder takes minutes. The kernels are the eager engine's (no fusion): the graph is a replay of exactly what the
uncompiled fast function (backend ``"none"``) launches, which the fast-path tests hold to the eager engine's tokens
with zero host syncs inside the prefill (a host sync is what a capture cannot hold).

How one function is run (:class:`CapturedFunction`, one per fast-path function):

key
    the call's pytree structure, every tensor's shape / dtype / device and every other leaf itself (the plan
    ``_Spec``, the static cache object, layer tuples): a new key is a new graph, as a new bucket or signature
    is a new Inductor graph;
first call of a key (warm-up)
    the inputs are copied into buffers owned by the key, and the function runs eagerly on them on a side stream:
    a real call (its outputs are returned), and the lazy initialisations (cuBLAS workspaces, SDPA kernel
    choice) happen outside any capture;
second call (capture)
    the inputs copied in, the function recorded into a graph (recording runs nothing), then replayed once: a
    real call again; a recording that fails (a host sync the uncompiled function still makes) is a
    ``RuntimeError`` naming the function and, where the device gave up without an error of its own, the op after
    which it did and the frames of this repository that called it (:class:`CaptureWatch`);
later calls (replay)
    one device copy per input tensor into the key's buffers, one replay, the outputs cloned out of the graph's
    memory (the next replay rewrites them; a piecewise prefill's graph 2 reads graph 1's outputs).

Every call runs the function's side effects exactly once (the static cache's rows and its length counter:
device tensors the graph reads and writes in place). All graphs of one fast path share one memory pool: a
graph's intermediates are dead when it ends (its outputs are held and cloned), so replays in any order are safe.

On a CPU there is nothing to capture: the same buffers, the function run again on them at every call (the
plumbing - keys, copies in, clones out - is what the CPU tests check; the graphs themselves are checked on a
GPU, ``bench.gpu_check --fast-backend cudagraphs``).

Also here, for the Inductor backend on a GPU (CUDA graphs through ``mode="reduce-overhead"``):
:class:`WatchedCompile`, which reports a graph Inductor declined to capture (silent otherwise).
"""

from __future__ import annotations

import logging
import os
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = ["CaptureInvalidated", "CaptureWatch", "CapturedFunction", "DeviceScalars", "WatchedCompile"]


class DeviceScalars(TorchFunctionMode):
    """While a graph is recorded: ``x[index] = 0.5`` writes a device scalar (``torch.full``, a kernel) instead of
    the Python number, which ``index_put_`` would copy from a host tensor - a copy a recording refuses ("Cannot copy
    between CPU and CUDA tensors during CUDA graph capture"). The same values; the fast-path tests also count the
    pattern (``llava.syncs``: ``setitem_scalar``) so that methods avoid it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "__setitem__" and len(args) == 3 and isinstance(args[0], torch.Tensor) \
                and isinstance(args[2], (bool, int, float)):
            x = args[0]
            args = (x, args[1], torch.full((), args[2], dtype=x.dtype, device=x.device))
        return func(*args, **kwargs)


class CaptureInvalidated(RuntimeError):
    """A recording the device gave up on, with the op after which it did and the frames of this repository that
    called it (:class:`CaptureWatch`)."""


#: the repository's root: frames from its files name a culprit (not torch's or transformers' own)
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _our_frames(limit: int = 4, stack=None) -> list[str]:
    """The innermost ``limit`` frames of ``stack`` (default: the current one) in this repository's files (not this
    module), as ``path:line in function``."""
    out = []
    for f in reversed(traceback.extract_stack()[:-2] if stack is None else stack):
        path = os.path.abspath(f.filename)
        rel = os.path.relpath(path, _ROOT)
        if path.startswith(_ROOT + os.sep) and path != os.path.abspath(__file__) and not rel.startswith(".") \
                and "site-packages" not in rel:  # not a virtual environment inside the checkout
            out.append(f"{rel}:{f.lineno} in {f.name}")
            if len(out) == limit:
                break
    return out


class CaptureWatch(TorchDispatchMode):
    """While a graph is recorded: after every op, whether the stream is still capturing. An op the device cannot
    record (a copy from pageable host memory, a synchronisation inside a kernel's host code, work on another stream)
    ends the capture as invalidated, often without an error of its own; the next op then fails with "operation
    failed due to a previous error during capture", which names neither. The watch names the first op after which
    the capture is gone and the frames of this repository that called it (:class:`CaptureInvalidated`).
    ``capturing``: the check (``torch.cuda.is_current_stream_capturing``; the tests pass their own)."""

    def __init__(self, capturing=None):
        super().__init__()
        self.capturing = capturing or torch.cuda.is_current_stream_capturing
        self.culprit: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.culprit is None and not self.capturing():
            frames = _our_frames()
            self.culprit = f"{func} at " + (" <- ".join(frames) if frames else "(no frame of this repository)")
            raise CaptureInvalidated(f"the capture was invalidated by {self.culprit}")
        return out


def _leaf_key(x):
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.dtype, str(x.device))
    try:
        hash(x)
    except TypeError:  # an unhashable object (none so far): by identity, held by the entry
        return ("id", id(x))
    return ("v", x)


class _Entry:
    __slots__ = ("inputs", "spec", "leaves", "cuda", "graph", "outputs", "calls")

    def __init__(self, inputs, spec, leaves):
        self.inputs, self.spec, self.leaves = inputs, spec, leaves  # leaves: held (the cache object stays alive)
        self.cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in leaves)  # devices are part of the key
        self.graph = None
        self.outputs = None
        self.calls = 0


class CapturedFunction:
    """``fn`` run as one CUDA graph per key (see the module's docstring). ``last_new``: the last call warmed up
    or captured a graph (the fast path's ``new_graph``)."""

    def __init__(self, fn, name: str | None = None, pool=None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "fn")
        self._entries: dict = {}
        self._pool = pool
        self.last_new = False

    def __call__(self, *args, **kwargs):
        leaves, spec = tree_flatten((args, kwargs))
        key = (spec, tuple(_leaf_key(x) for x in leaves))
        entry = self._entries.get(key)
        if entry is None:  # buffers owned by this key: the graph reads its inputs from them
            inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
            entry = self._entries[key] = _Entry(inputs, spec, leaves)
        else:
            for buf, x in zip(entry.inputs, leaves):
                if isinstance(x, torch.Tensor) and buf is not x:
                    buf.copy_(x)
        entry.calls += 1
        self.last_new = entry.calls <= 2 if entry.cuda else entry.calls == 1
        if not entry.cuda:  # nothing to capture: the function on the key's buffers
            return self._clone(self._run(entry))
        if entry.calls == 1:  # warm-up, a real call, on a side stream (as torch.cuda.graphs asks)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = self._clone(self._run(entry))
            torch.cuda.current_stream().wait_stream(stream)
            return out
        if entry.graph is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            watch = CaptureWatch()
            try:
                with torch.cuda.graph(graph, pool=self._pool), DeviceScalars(), watch:
                    outputs = self._run(entry)
            except RuntimeError as e:  # the watch's finding first: the device's own error names no op
                where = "" if isinstance(e, CaptureInvalidated) else (
                    f"{watch.culprit}; " if watch.culprit else  # else the op that raised: its frames of ours
                    "at " + " <- ".join(_our_frames(stack=traceback.extract_tb(e.__traceback__))) + ": ")
                raise RuntimeError(f"the fast path's {self.name} could not be captured as a CUDA graph "
                                   f"(fast_backend='cudagraphs'): {where}{e}") from e
            entry.graph, entry.outputs = graph, outputs
        entry.graph.replay()
        return self._clone(entry.outputs)

    def _run(self, entry: _Entry):
        args, kwargs = tree_unflatten(entry.inputs, entry.spec)
        return self.fn(*args, **kwargs)

    @staticmethod
    def _clone(out):
        return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)

    def reset(self) -> None:
        """Drop every graph and buffer (the static caches they hold are released with them)."""
        self._entries.clear()
        self.last_new = False


def _inductor_skips() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


class _SkipLog(logging.Handler):
    """Inductor's CUDA-graph log (``torch._inductor.cudagraph_utils``'s artifact logger, where every skip on a GPU is
    written as "skipping cudagraphs due to ..."): its last message."""

    last = None

    def emit(self, record):
        _SkipLog.last = record.getMessage()


def _watch_skip_log() -> None:
    from torch._inductor.cudagraph_utils import cudagraphs_log

    if not any(isinstance(h, _SkipLog) for h in cudagraphs_log.handlers):
        cudagraphs_log.addHandler(_SkipLog(logging.WARNING))


def _last_skip_reason() -> str:
    """The reason Inductor gave for the skip just counted: its log's message, else the metrics of the compile that
    just ended (a CPU graph is skipped without a message); never an earlier compile's reason, which would name
    another function's skip."""
    if _SkipLog.last:
        return _SkipLog.last
    from torch._dynamo.utils import get_compilation_metrics

    metrics = get_compilation_metrics()
    reason = getattr(metrics[-1], "cudagraph_skip_reason", None) if metrics else None
    return reason or "reason not recorded: TORCH_LOGS=cudagraphs prints it"


class WatchedCompile:
    """A function compiled by Inductor with CUDA graphs (``mode="reduce-overhead"``), watched for the graphs Inductor
    declines to capture. Inductor decides at compile time and says so only in a log that is off by default (its
    ``cudagraph_skips`` counter): a skipped graph runs its kernels one by one, launch-bound at batch 1, the very cost
    the fast path exists to remove. Each skip is appended to ``skips`` (the function's name and Inductor's reason) and
    logged once as a warning; ``bench.efficiency`` reports them beside the fast rows."""

    def __init__(self, fn, name: str, skips: list, log):
        self.fn, self.name, self.skips, self.log = fn, name, skips, log
        _watch_skip_log()

    @property
    def last_new(self) -> bool:  # a precompiled function's (llava.fast.precompile): compiled or loaded this call
        return getattr(self.fn, "last_new", False)

    def __call__(self, *args, **kwargs):
        before = _inductor_skips()
        _SkipLog.last = None
        out = self.fn(*args, **kwargs)
        if _inductor_skips() != before:  # a compile of this call skipped CUDA graphs (a later call reuses it)
            reason = _last_skip_reason()
            self.skips.append({"function": self.name, "reason": reason})
            self.log.warning("Inductor did not capture the fast path's %s as a CUDA graph (%s): its kernels run one "
                             "by one; fast_backend='cudagraphs' records the uncompiled function instead", self.name,
                             reason)
        return out
