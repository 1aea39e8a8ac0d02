"""One prefill's scratch (`_Prefill`), handed through the engine's stages and dropped with the prefill. Apart from
llava/engine.py so that the stages (llava/layout.py, llava/staged.py) name the scratch they receive without
importing the engine that imports them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .stats import _PhaseClock


@dataclass
class _Prefill:
    """Per-prefill scratch, passed through the stages and dropped with the prefill (the engine keeps
    no tensor of a finished prefill)."""

    probe_inputs: tuple | None = None  # (embeds, mask, positions) of the unpruned spliced batch
    probe_deepstack: dict | None = None  # Qwen3-VL: the unpruned batch's DeepStack state (the probe adds it)
    probe_cache: dict = field(default_factory=dict)  # decoder layer k -> hidden states entering it (probe)
    vision_sigs: list = field(default_factory=list)  # per sample: VisionSignals (or None)
    entry: list | None = None  # per sample: (visual tokens', text-after tokens') inputs to layer 0
    llm_state: list | None = None  # per sample: the method's scratch shared by its llm stages
    clock: _PhaseClock | None = None  # the phase clock of this prefill's timings
    past_from: int = 0  # the first decoder layer whose cache an llm stage prunes (Method.past_cache_from)
    subblocks: dict = field(default_factory=dict)  # layer -> SubBlockStates (B, L, D) recorded since the last stage
    cache: Any = None  # the prompt's KV cache, whose layers an llm stage reads (llava.attention_rows.cached_kv)
