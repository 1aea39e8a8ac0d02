"""What a prefill reports: its token accounting (``SampleStats`` per sample, ``PrefillStats``: ``engine.stats``)
and the phase clock of ``PrefillStats.timings`` (``_PhaseClock``). Apart from :mod:`llava.engine` so that the
stages name the clock they are handed (:mod:`llava.prefill`) without importing the engine."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .plan import PrefillPlan


@dataclass
class SampleStats:
    """Token accounting of one sample (one row of the batch) for the last prefill."""

    visual_candidates: int  # visual tokens the unpruned model would feed to the LLM
    visual_per_layer: list[int]  # visual tokens in the input of each decoder layer
    vision_noop: bool = False  # the vision stage kept everything (budget >= tokens)

    @property
    def visual_entering_llm(self) -> int:
        return self.visual_per_layer[0]

    @property
    def visual_layer_avg(self) -> float:
        return sum(self.visual_per_layer) / len(self.visual_per_layer)

    def as_dict(self) -> dict[str, Any]:
        return {
            "visual_candidates": self.visual_candidates,
            "visual_entering_llm": self.visual_entering_llm,
            "visual_layer_avg": self.visual_layer_avg,
            "visual_per_layer": list(self.visual_per_layer),
            "vision_noop": self.vision_noop,
        }


@dataclass
class PrefillStats:
    samples: list[SampleStats]
    seq_len_per_layer: list[int]  # padded sequence length each decoder layer ran on (= its KV length)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: vision, selection, llm
    #: which path ran the prefill: "eager" (this engine) or "fast" (llava.fast.path, one captured function)
    path: str = "eager"
    path_reason: str = ""  # why eager when the engine has a fast path
    bucket: int | None = None  # fast path: the length bucket the rows were padded to
    new_graph: bool = False  # fast path: the first prefill of its bucket / signature (compiled or captured)
    graphs: int = 0  # fast path: captured functions run (2: the tower, then the rest; piecewise: graph -> one read
    # of the counts -> graph)
    plan: PrefillPlan | None = None  # what the prefill ran, segment by segment of decoder layers (str: readable)

    @classmethod
    def of(cls, plan: PrefillPlan, noop: list | None = None, **fields) -> "PrefillStats":
        """The stats of a prefill that ran ``plan`` (per sample ``noop``: its vision stage kept everything), its
        per-layer counts read from the plan; ``fields``: the other fields."""
        noop = noop or [False] * len(plan.candidates)
        return cls(samples=[SampleStats(c, plan.visual_per_layer(b), noop[b]) for b, c in enumerate(plan.candidates)],
                   seq_len_per_layer=plan.width_per_layer(), plan=plan, **fields)

    @property
    def visual_entering_llm(self) -> float:
        return sum(s.visual_entering_llm for s in self.samples) / len(self.samples)

    @property
    def visual_layer_avg(self) -> float:
        return sum(s.visual_layer_avg for s in self.samples) / len(self.samples)


class _PhaseClock:
    """The phase clock of ``PrefillStats.timings``. Each phase edge of a prefill is a :meth:`mark`, an opaque
    reading: ``clock()`` when the engine has one (e.g. bench.efficiency counts ops per phase with it), else a
    CUDA event recorded on the device's stream (``torch.cuda.Event(enable_timing=True)``), else
    ``time.perf_counter()``. :meth:`timings` turns them into phases once, at the end of the prefill: on
    CUDA after ONE synchronisation (on the last event; the stream has then passed every earlier one), so
    the clock never stalls the device between phases.

    Edges, in order: ``start``, ``vision_start``, ``vision_end`` (the tower + projector + splice),
    ``inputs_end`` (the vision stage's inputs to the LLM are ready), each llm stage's ``stage_start`` /
    ``stage_end``, ``end`` (the decoder's output)."""

    def __init__(self, device: torch.device, clock=None):
        self.clock = clock
        self.device = device
        self.cuda = clock is None and device.type == "cuda"
        self.marks: list[tuple[str, Any]] = []  # (edge, reading) in the order read

    def _event(self):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def mark(self, edge: str) -> None:
        if self.clock is not None:
            reading = self.clock()
        elif self.cuda:
            reading = self._event()
        else:
            reading = time.perf_counter()
        self.marks.append((edge, reading))

    def readings(self) -> dict[str, list[float]]:
        """Every edge's readings as numbers, in order: the clock's, or seconds (CUDA: since the first mark)."""
        marks = self.marks
        if self.cuda:
            marks[-1][1].synchronize()  # the one wait of the clock
            first = marks[0][1]
            marks = [(edge, first.elapsed_time(ev) / 1e3) for edge, ev in marks]  # ms -> s
        out: dict[str, list[float]] = {}
        for edge, t in marks:
            out.setdefault(edge, []).append(t)
        return out

    def timings(self) -> dict[str, float]:
        """vision = tower + projector + splice; selection = signals, the method, re-splicing / re-padding
        and the in-LLM stages' scoring; llm = the decoder layers (+ norm). They sum to prefill_total."""
        t = self.readings()
        (t0,), (v0,), (v1,), (t1,), (t2,) = (t[e] for e in ("start", "vision_start", "vision_end", "inputs_end", "end"))
        stages = 0.0
        for a, z in zip(t.get("stage_start", ()), t.get("stage_end", ())):
            stages += z - a
        vision = v1 - v0
        return {"vision": vision, "selection": (t1 - t0 - vision) + stages, "llm": (t2 - t1) - stages,
                "prefill_total": t2 - t0}
