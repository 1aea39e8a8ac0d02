"""What the executors are given: the attached engine's fixed resources (`EngineEnv`, read by the eager executor's two
parts, the vision stage :class:`llava.layout.VisionStage` and the decoder :class:`llava.staged.StagedDecoder`, and by
the captured one, :mod:`llava.fast`), what the eager vision stage tells the rest of a prefill (`VisionOut`) and one
eager prefill's scratch (`_Prefill`), dropped with the prefill. Apart from llava/engine.py so that the executors name
what they receive without importing the engine that builds them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from .stats import _PhaseClock

if TYPE_CHECKING:
    import torch

    from .families.base import FamilyAdapter
    from .method import Method
    from .needs import Needs, TowerCall
    from .plan import PrefillPlan, PromptSpec
    from .selection_rows import DeepStack


@dataclass(frozen=True)
class EngineEnv:
    """What both executors read of the attached engine, fixed at attach: the model and its ``family`` (the
    registry's id), the family's adapter, the method and what it needs, what the vision tower computes for it
    (``tower``, the adapter's ``encode`` argument), the prompt spec (where the question lies), whether llm stages
    renumber positions (``reindex``), and the engine's ``select(key, ask)`` (eager: the method's selection, or with
    ``engine.replay`` the recorded one)."""

    model: torch.nn.Module
    family: str
    adapter: FamilyAdapter
    method: Method
    needs: Needs
    tower: TowerCall
    prompt_spec: PromptSpec
    reindex: bool
    select: Callable

    @property
    def lm(self) -> torch.nn.Module:
        return self.adapter.lm


@dataclass
class VisionOut:
    """What the vision stage tells the rest of a prefill (and :meth:`llava.engine.PruningEngine.vision_inputs`'s
    caller): ``plan`` the :class:`llava.plan.PrefillPlan` that starts on its rows (per sample its stock visual tokens,
    its rows and visual tokens entering decoder layer 0, their width), per sample ``noop`` whether the stage left it
    as the stock model has it, ``layouts`` its rows' host layout (:class:`llava.plan.RowLayout`) after the stage,
    ``origin`` each visual token's source candidate when the rows were rebuilt (None: they were not), ``pos_shift``
    (B,) the original less the LLM-space position (for decode), ``deepstack`` the DeepStack rows at the visual rows
    (Qwen3-VL), ``sizes`` per sample how many stock tokens each visual row stands for, in row order (a method with an
    attention bias; None: not counted, or every row 1)."""

    plan: PrefillPlan
    noop: list
    layouts: list
    pos_shift: torch.Tensor
    origin: list | None = None
    deepstack: DeepStack | None = None
    sizes: list | None = None

    @property
    def candidates(self) -> list:
        """Per sample its stock visual tokens (the plan's candidates)."""
        return list(self.plan.candidates)


@dataclass
class _Prefill:
    """Per-prefill scratch, passed through the stages and dropped with the prefill (the engine keeps
    no tensor of a finished prefill)."""

    probe_inputs: tuple | None = None  # (embeds, mask, positions) of the unpruned spliced batch
    probe_deepstack: DeepStack | None = None  # Qwen3-VL: the unpruned batch's DeepStack state (the probe adds it)
    probe_cache: dict = field(default_factory=dict)  # decoder layer k -> hidden states entering it (probe)
    vision_sigs: list = field(default_factory=list)  # per sample: VisionSignals (or None)
    entry: list | None = None  # per sample: what its llm stages read of the prefill (llava.llm_stage.StageEntry)
    clock: _PhaseClock | None = None  # the phase clock of this prefill's timings
    subblocks: dict = field(default_factory=dict)  # layer -> SubBlockStates (B, L, D) recorded since the last stage
    cache: Any = None  # the prompt's KV cache, whose layers an llm stage reads (llava.attention_rows.cached_kv)
    sample_keys: list | None = None  # per row: the caller's key of the sample (engine.sample_keys), None: a hash

    def release(self) -> None:
        """Drop every tensor of the finished prefill: the engine keeps none, and a signal's probe kept by a method
        then says the prefill is over."""
        self.probe_inputs = self.probe_deepstack = self.entry = self.cache = None
        self.probe_cache.clear()
        self.vision_sigs = []
        self.subblocks = {}
