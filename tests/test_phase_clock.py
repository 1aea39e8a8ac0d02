"""The engine's phase clock (``PrefillStats.timings``): each phase edge is an opaque mark, and the phases
are worked out once at the end of the prefill. With a callable ``engine.clock`` (bench.efficiency's op
count) or on a CPU (``time.perf_counter``) the marks are readings; on CUDA they are events resolved after
ONE synchronisation. CUDA is simulated here with a stand-in event class (tests run on a CPU)."""

import types

import pytest
import torch
from conftest import make_batch

import llava
import llava.engine as engine_mod
import llava.stats as stats_mod
from llava.stats import _PhaseClock

#: the edges one prefill marks, in order, for a method without llm stages and for one llm stage (FastV)
PRE_LLM_EDGES = ["start", "vision_start", "vision_end", "inputs_end", "end"]
ONE_STAGE_EDGES = ["start", "vision_start", "vision_end", "inputs_end", "stage_start", "stage_end", "end"]


@pytest.fixture(scope="module")
def rt():
    return llava.load("tiny:llava", seed=1)


@pytest.fixture(scope="module")
def batch(rt):
    return make_batch(rt)


class Counter:
    """A clock whose k-th reading (k = 1, 2, ...) is ``step(k)``."""

    def __init__(self, step=lambda k: float(k)):
        self.step, self.reads = step, 0

    def __call__(self) -> float:
        self.reads += 1
        return self.step(self.reads)


def prefill(rt, batch, method, budget, clock=None):
    eng = llava.prune(rt, method, budget=budget)
    eng.clock = clock
    try:
        with torch.no_grad():
            rt.model(**batch)
    finally:
        eng.clock = None
        rt.unprune()
    return eng


# counter +1 per reading: start=1, vision_start=2, vision_end=3, inputs_end=4, end=5 -> vision 3-2 = 1,
# selection (4-1) - 1 = 2, llm 5-4 = 1, total 5-1 = 4
PRE_LLM_UNIT = {"vision": 1.0, "selection": 2.0, "llm": 1.0, "prefill_total": 4.0}
# + stage_start=5, stage_end=6, end=7: the stage's 6-5 = 1 moves from llm to selection -> vision 1,
# selection (4-1) - 1 + 1 = 3, llm (7-4) - 1 = 2, total 7-1 = 6
ONE_STAGE_UNIT = {"vision": 1.0, "selection": 3.0, "llm": 2.0, "prefill_total": 6.0}
# readings 2**k tell every edge apart: start=2, vision_start=4, vision_end=8, inputs_end=16, stage 32 / 64,
# end=128 -> vision 4, selection (16-2) - 4 + 32 = 42, llm (128-16) - 32 = 80, total 126
ONE_STAGE_POW2 = {"vision": 4.0, "selection": 42.0, "llm": 80.0, "prefill_total": 126.0}


@pytest.mark.parametrize("method,budget,expected,reads", [
    ("visionzip", 4, PRE_LLM_UNIT, 5),
    ("fastervlm", 4, PRE_LLM_UNIT, 5),
    ("none", None, PRE_LLM_UNIT, 5),  # the unpruned prefill: the same edges
    ("fastv", 8, ONE_STAGE_UNIT, 7),
])
def test_counter_clock_gives_the_worked_out_phases(rt, batch, method, budget, expected, reads):
    clock = Counter()
    eng = prefill(rt, batch, method, budget, clock)
    assert len(eng.llm_layers) == (reads - 5) // 2  # FastV: one llm stage (K scaled to the tiny LLM)
    assert eng.stats.timings == expected
    assert clock.reads == reads  # one reading per phase edge


def test_each_edge_lands_in_its_phase(rt, batch):
    eng = prefill(rt, batch, "fastv", 8, Counter(lambda k: float(2 ** k)))
    assert eng.stats.timings == ONE_STAGE_POW2


def test_every_llm_stage_counts_as_selection(rt, batch):
    clock = Counter()
    eng = prefill(rt, batch, "pdrop", 192, clock)
    n = len(eng.llm_layers)
    assert n >= 2 and clock.reads == 5 + 2 * n
    # every stage takes 1 reading-unit of the llm phase's span and gives it to selection
    assert eng.stats.timings == {"vision": 1.0, "selection": 2.0 + n, "llm": 1.0 + n, "prefill_total": 4.0 + 2 * n}


def test_cpu_reads_perf_counter_and_never_touches_cuda(rt, batch, monkeypatch):
    calls = []

    def forbidden(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"torch.cuda.{name} called on a CPU prefill")
        return f

    for name in ("synchronize", "Event", "current_stream", "default_stream", "Stream", "set_sync_debug_mode"):
        monkeypatch.setattr(torch.cuda, name, forbidden(name))
    # real seconds: the phases are non-negative and add up
    t = prefill(rt, batch, "fastv", 8).stats.timings
    assert set(t) == {"vision", "selection", "llm", "prefill_total"} and all(v >= 0 for v in t.values())
    assert t["vision"] + t["selection"] + t["llm"] == pytest.approx(t["prefill_total"], rel=1e-6, abs=1e-9)
    # the CPU clock is time.perf_counter, read once per edge
    fake = Counter()
    monkeypatch.setattr(stats_mod, "time", types.SimpleNamespace(perf_counter=fake))
    assert prefill(rt, batch, "fastv", 8).stats.timings == ONE_STAGE_UNIT and fake.reads == 7
    assert prefill(rt, batch, "visionzip", 4).stats.timings == PRE_LLM_UNIT and fake.reads == 12
    assert not calls


class FakeGPU:
    """Stand-ins for ``torch.cuda.Event`` / ``current_stream``: the k-th recorded event's timestamp is 2**k ms;
    an event completes when the host waits on it or on a later event of the stream (stream order), and
    ``elapsed_time`` of an unfinished event fails as CUDA's does."""

    def __init__(self):
        self.recorded, self.syncs, self.device_syncs = [], [], 0
        gpu = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing
                self.t, self.done = None, False

            def record(self, stream=None):
                assert stream == "stream"
                gpu.recorded.append(self)
                self.t = float(2 ** len(gpu.recorded))

            def synchronize(self):
                gpu.syncs.append(self)
                for ev in gpu.recorded[:gpu.recorded.index(self) + 1]:
                    ev.done = True

            def elapsed_time(self, end):
                if not (self.done and end.done):
                    raise RuntimeError("cudaErrorNotReady")
                return end.t - self.t

        self.Event = Event

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "Event", self.Event)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "stream")

        def synchronize(*a, **k):
            self.device_syncs += 1
        monkeypatch.setattr(torch.cuda, "synchronize", synchronize)


def test_cuda_events_resolve_with_one_synchronisation(monkeypatch):
    gpu = FakeGPU()
    gpu.install(monkeypatch)
    clock = _PhaseClock(torch.device("cuda", 0))
    for edge in ONE_STAGE_EDGES:
        clock.mark(edge)
    assert len(gpu.recorded) == 7 and not gpu.syncs  # marking never waits
    t = clock.timings()
    assert gpu.syncs == [gpu.recorded[-1]] and gpu.device_syncs == 0  # one wait, on the last event
    # 2**k ms since the first event (2 ms): the same worked example as ONE_STAGE_POW2, in ms -> s
    assert t == pytest.approx({k: v / 1e3 for k, v in ONE_STAGE_POW2.items()})


def test_a_user_clock_wins_over_cuda_events(monkeypatch):
    gpu = FakeGPU()
    gpu.install(monkeypatch)
    clock = _PhaseClock(torch.device("cuda", 0), Counter())
    for edge in PRE_LLM_EDGES:
        clock.mark(edge)
    assert clock.timings() == PRE_LLM_UNIT and not gpu.recorded and not gpu.syncs and gpu.device_syncs == 0


@pytest.mark.parametrize("method,budget,edges", [("visionzip", 4, PRE_LLM_EDGES), ("fastv", 8, ONE_STAGE_EDGES)])
def test_a_cuda_prefill_synchronises_once(rt, batch, monkeypatch, method, budget, edges):
    """The engine's forward on CUDA, simulated: the prefill runs on the CPU, its clock takes the CUDA path."""
    gpu = FakeGPU()
    gpu.install(monkeypatch)
    marked = []

    class CudaClock(_PhaseClock):
        def __init__(self, device, clock=None):
            super().__init__(torch.device("cuda", 0), clock)

        def mark(self, edge):
            marked.append(edge)
            super().mark(edge)

    monkeypatch.setattr(engine_mod, "_PhaseClock", CudaClock)
    eng = prefill(rt, batch, method, budget)
    assert marked == edges and len(gpu.recorded) == len(edges)
    assert gpu.syncs == [gpu.recorded[-1]] and gpu.device_syncs == 0
    expected = ONE_STAGE_POW2 if method == "fastv" else {"vision": 4.0, "selection": 10.0, "llm": 16.0,
                                                         "prefill_total": 30.0}
    assert eng.stats.timings == pytest.approx({k: v / 1e3 for k, v in expected.items()})
