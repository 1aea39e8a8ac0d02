"""The capture-only backend of the fast path (``fast_backend="cudagraphs"``, llava/fast/graphs.py): the plumbing
around the CUDA graph (keys, inputs copied into the key's buffers, outputs cloned out, side effects once per call)
on the CPU, where the function runs again on the buffers instead of a replay; kernels-only constants
(``llava.ops.device_ints``) and the upload counter that keeps the captured functions recordable; and the fast path
on the backend, tokens == the eager engine. The graphs themselves: ``bench.gpu_check --fast-backend cudagraphs``."""

import gc
import weakref

import pytest
import torch
from fastpath_util import assert_same_as_eager, generate, inputs

from llava.fast.graphs import CapturedFunction
from llava.models import load
from llava.ops import device_ints
from llava.syncs import SyncCounter


class _State:  # a non-tensor leaf holding device state, as the static cache does
    def __init__(self):
        self.count = torch.zeros((), dtype=torch.long)


def _fn(x, y, state, scale: int = 2):
    state.count.add_(1)  # a side effect on held state: once per call
    return {"out": x * scale + y, "sum": (x + y).sum()}


def test_a_key_is_reused_with_its_inputs_copied_in_and_outputs_cloned_out():
    f = CapturedFunction(_fn, name="fn")
    st = _State()
    x1, y1 = torch.arange(4.0), torch.ones(4)
    a = f(x1, y1, st)
    assert f.last_new and len(f._entries) == 1
    x2, y2 = torch.tensor([10.0, 20.0, 30.0, 40.0]), torch.full((4,), 0.5)
    b = f(x2, y2, st)
    assert not f.last_new and len(f._entries) == 1  # the same key: the same buffers
    assert torch.equal(b["out"], torch.tensor([20.5, 40.5, 60.5, 80.5])) and b["sum"].item() == 102.0
    assert torch.equal(a["out"], torch.tensor([1.0, 3.0, 5.0, 7.0])) and a["sum"].item() == 10.0  # not rewritten
    entry = next(iter(f._entries.values()))
    assert entry.inputs[0] is not x2 and torch.equal(entry.inputs[0], x2)  # the key's own buffer, holding x2
    x2.add_(1)  # the caller's tensor changing afterwards does not reach the buffer until the next call copies it
    assert torch.equal(entry.inputs[0], torch.tensor([10.0, 20.0, 30.0, 40.0]))
    assert st.count.item() == 2  # each call ran the function's side effect once


def test_a_new_shape_dtype_or_static_argument_is_a_new_key():
    f = CapturedFunction(_fn)
    st = _State()
    f(torch.zeros(4), torch.zeros(4), st)
    f(torch.zeros(5), torch.zeros(5), st)  # shape
    f(torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), st)  # dtype
    f(torch.zeros(4), torch.zeros(4), st, scale=3)  # a static (non-tensor) argument
    f(torch.zeros(4), torch.zeros(4), _State())  # another state object (another static cache)
    assert len(f._entries) == 5 and f.last_new
    out = f(torch.ones(4), torch.zeros(4), st, scale=3)
    assert len(f._entries) == 5 and not f.last_new and torch.equal(out["out"], torch.full((4,), 3.0))


def test_an_entry_holds_its_static_objects_alive():
    # a graph writes into its cache's tensors: the object must not be freed (and its id reused) while the key lives
    f = CapturedFunction(_fn)
    st = _State()
    ref = weakref.ref(st)
    f(torch.zeros(2), torch.zeros(2), st)
    del st
    gc.collect()
    assert ref() is not None
    f.reset()
    gc.collect()
    assert ref() is None and not f._entries


def test_while_recording_an_indexed_write_of_a_python_scalar_writes_a_device_scalar():
    from torch.utils._python_dispatch import TorchDispatchMode

    from llava.fast.graphs import DeviceScalars

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func._overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    for mode in (False, True):
        x, idx = torch.zeros(5), torch.tensor([1, 3])
        with Ops() as seen:
            if mode:
                with DeviceScalars():
                    x[idx] = 2.5
            else:
                x[idx] = 2.5
        assert x.tolist() == [0.0, 2.5, 0.0, 2.5, 0.0]
        # plain: the scalar lifted from a host tensor (a copy a recording refuses); recorded: a fill kernel
        assert ("lift_fresh" in seen.ops) != mode and ("full" in seen.ops) == mode and "index_put_" in seen.ops


def test_device_ints_builds_host_lists_with_kernels_only():
    dev = torch.device("cpu")
    for vals in ([3, 4, 5, 7, 7, 7, 2], [0], [5, 5], [9, 8, 7], list(range(10)) + [3, 3, 4, 5]):
        with SyncCounter(ops=True) as c:
            got = device_ints(vals, dev)
        assert got.dtype == torch.long and got.tolist() == vals
        assert not c.uploads and c.sync_total == 0
    assert device_ints([], dev).shape == (0,)
    # runs: [3 4 5] [7 7 7] [2] -> arange, full, arange of one + one cat
    with SyncCounter(ops=True) as c:
        device_ints([3, 4, 5, 7, 7, 7, 2], dev)
    assert c.ops == {"arange": 2, "full": 1, "cat": 1}


def test_the_upload_counter():
    x = torch.ones(3, device="cpu")
    with SyncCounter() as c:
        torch.tensor([1, 2], device=x.device)  # host data to the device
        torch.as_tensor([0.5], device=x.device)
        torch.arange(3).to(x.device)  # a host tensor moved
        torch.as_tensor(x, device=x.device)  # already a device tensor: nothing moves
        torch.full((2,), 7, device=x.device)  # a kernel
        torch.tensor([1, 2])  # stays on the host
    assert dict(c.uploads) == {"tensor": 1, "as_tensor": 1, "to": 1}
    assert c.total == 0


@pytest.fixture(scope="module")
def runtimes():
    return (load("tiny:llava", seed=1, fast=True, fast_max_new_tokens=16, fast_backend="cudagraphs"),
            load("tiny:llava", seed=1))


@pytest.mark.parametrize("method,budget", [("none", None), ("visionzip", 6), ("fastv", 6), ("prumerge", None),
                                           ("consensusdrop", 6)])
def test_the_fast_path_on_the_capture_backend_gives_the_eager_tokens(runtimes, method, budget):
    # a pre-LLM method, an llm stage, a piecewise prefill (two functions, a host read between), an LLM probe
    fast, eager = runtimes
    eng = fast.prune(method, budget)
    eager.prune(method, budget)
    assert eng.fast.backend == "cudagraphs" and not eng.fast.cuda_graphs  # a CPU: nothing is recorded
    batch = inputs(fast, 0, n=3)
    assert_same_as_eager(fast, eager, eng, batch)
    assert eng.stats.new_graph
    fns = [eng.fast._vision, eng.fast._llm] if eng.fast.piecewise else [eng.fast._prefill]
    keys = [len(f._entries) for f in fns]
    assert keys == [1] * len(fns)
    toks = generate(fast, inputs(fast, 0, n=3))[0]  # the same shapes: the same keys, nothing new
    assert not eng.stats.new_graph and [len(f._entries) for f in fns] == keys
    assert torch.equal(toks, generate(eager, inputs(eager, 0, n=3))[0])
    assert len(eng.fast._decode._entries) >= 1


def test_a_graph_inductor_does_not_capture_is_reported_once_with_its_reason(caplog):
    """Inductor + CUDA graphs: a function Inductor compiles without a CUDA graph (it decides at compile time and says
    so only in its own log, off by default) is reported - its name and Inductor's reason, in ``skips`` and as one
    warning - and a later call of the compiled function reports nothing again. The compile is stood in for by a
    function that does what Inductor does on a skip (torch's own ``log_cudagraph_skip_and_bump_counter``)."""
    import logging

    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    from llava.fast.graphs import WatchedCompile

    calls = []

    def compiled(x):
        if not calls:  # the first call compiles: Inductor declines the CUDA graph
            log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (1 instances)")
        calls.append(x)
        return x + 1

    skips = []
    f = WatchedCompile(compiled, "prefill_fn", skips, logging.getLogger("llava.fast.path"))
    with caplog.at_level(logging.WARNING, logger="llava.fast.path"):
        assert f(torch.ones(2)).tolist() == [2.0, 2.0] and f(torch.zeros(2)).tolist() == [1.0, 1.0]
    assert skips == [{"function": "prefill_fn", "reason": "skipping cudagraphs due to mutated inputs (1 instances)"}]
    (rec,) = [r for r in caplog.records if r.name == "llava.fast.path"]
    assert "prefill_fn" in rec.getMessage() and "mutated inputs" in rec.getMessage()
    assert len(calls) == 2


def _pipeline(x):
    y = x * 2
    z = y.sum()  # the op after which the (simulated) capture is gone
    return z + 1


def test_the_capture_watch_names_the_op_that_ended_the_capture_and_the_line_that_called_it():
    """On a GPU an op the device cannot record (a pageable upload, a sync in a kernel's host code) can end a capture
    silently; the next op fails with "operation failed due to a previous error during capture". The watch checks
    after every op that the stream still captures: here the check is simulated (capturing until the third op)."""
    from llava.fast.graphs import CaptureInvalidated, CaptureWatch

    calls = []

    def capturing():
        calls.append(1)
        return len(calls) < 2  # true after the first op (mul), false after the second (sum)

    watch, x = CaptureWatch(capturing=capturing), torch.arange(4.0)
    with pytest.raises(CaptureInvalidated) as err, watch:
        _pipeline(x)
    line = _pipeline.__code__.co_firstlineno + 2  # z = y.sum()
    assert watch.culprit.startswith("aten.sum.default at tests/test_fast_graphs.py:" + str(line) + " in _pipeline")
    assert str(err.value) == f"the capture was invalidated by {watch.culprit}"
    assert len(calls) == 2  # nothing ran after the culprit
    ok = CaptureWatch(capturing=lambda: True)  # a capture that holds: every op passes, nothing named
    with ok:
        assert _pipeline(x).item() == 13.0
    assert ok.culprit is None
