"""PyramidDrop (CVPR 2025, arXiv 2410.17247), docs/methods/pdrop.md.

Official code: Cooperx521/PyramidDrop - ``llava/model/modeling_llama_pdrop.py``
(``LlamaModel.pdrop_forward`` / ``LlamaModel.pdrop_rank_drop``): at each stage boundary a detached
copy of the hidden states goes through the boundary layer's ``input_layernorm``, ``q_proj`` /
``k_proj`` and RoPE; the last instruction token's row (causal softmax in fp32, mean over heads)
ranks the visual tokens and ``int(N * ratio)`` of them are kept.

Algorithm (prefill only), for each stage s = 1..S before decoder layer ``layer_list[s-1]``:

1. query = the last prompt token, keys = all tokens, with **that layer's own** norm + q/k + RoPE
   on the current hidden states (``LLMSignals.attention("last", layer="next")``);
2. keep the top k_s = floor(N_orig * ratio_s) visual tokens by head-mean attention (N_orig = the
   sample's visual count entering the LLM), in ascending order; text untouched;
3. re-index positions 0..len-1 (``reindex``); decode positions shift down by what each passed stage
   dropped (the engine does this).

Schedules (every count floor(N * c / 576) for a sample with N visual tokens, "ratios apply to the
sample's full visual count", docs/methods/pdrop.md):

* no budget: ``layer_list`` [8, 16, 24] and ratios [lam, lam^2, lam^3] with the official lam = 0.5
  (0.5 / 0.25 / 0.125; E = (576 + 288 + 144 + 72) / 4 = 270);
* budget 192 / 128 / 64: the spec's table (our design): stages before layers 2 / 6 / 16 keeping
  300/200/110, 303/110/36, 66/30/17 of 576 (SparseVLM v1's counts), E = 191 / 126.25 / 62.125;
* any other budget B: ``layer_list`` (default [8, 16, 24]) with the geometric ratios lam^s and lam
  solved so that the layer average is B/576 of the visual tokens (our design; needs
  B >= 576 * layer_list[0] / 32, i.e. 144 with the default layers).

Other depths (13B's 40 layers, the 4-layer tiny LLM): stage layers are stated for 32 layers and
mapped with ``llava.ops.scale_layers``; the budget-table counts are then rescaled by one common
factor so that the layer average on the model's depth equals the table's 32-layer average
(:func:`fit_stage_counts`). The geometric schedules keep their ratios (solved on the model's depth).

The schedule helpers shared with SparseVLM (``stage_layer_counts``, ``fit_stage_counts``) and the stage rule
shared with VScan (``last_row_topk``) live in llava/ops/.

Reference mode (option ``numerics="official"``; default ``"ours"``): the official numerics of
``pdrop_rank_drop`` - the per-head probabilities of the last instruction token cast to float16 (the
official softmax runs in fp32 and is cast ``.to(query_states.dtype)``, fp16: the LLM is loaded in fp16),
the mean over heads and then over the (single) query row in fp16 (``torch.mean(attn, dim=0)`` twice), and
``torch.topk`` (official tie order) instead of the fp32 head mean with ties to the lower index.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from llava.method import Method, register
from llava.ops import NUMERICS_OPTION
from llava.ops import (IN_LLM_BUDGET_TABLE, REFERENCE_DEPTH, REFERENCE_TOKENS, fit_stage_counts,  # noqa: F401
                       last_row_topk,
                       scale_layers, scaled_count, stage_layer_counts)
from llava.selection import Selection

#: Budgets of the spec's table (docs/methods/pdrop.md): stage layers and kept counts of 576 (``llava.ops``, shared
#: with TransPrune).
PDROP_TABLE = IN_LLM_BUDGET_TABLE
DEFAULT_LAYERS = (8, 16, 24)


# ----------------------------------------------------------------------------------------------
# The algorithm
# ----------------------------------------------------------------------------------------------


def pdrop_select(last_row_attn: torch.Tensor, visual: torch.Tensor, k: int, numerics: str = "ours",
                 dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """One PyramidDrop stage: the top-``k`` visual tokens by the last instruction token's head-mean attention
    (:func:`llava.ops.last_row_topk`, where the official numerics are described; ``dtype``: the reference mode's,
    the run's own)."""
    return last_row_topk(last_row_attn, visual, k, numerics, method="pdrop", dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Schedules and equivalent tokens
# ----------------------------------------------------------------------------------------------


def equivalent_tokens(per_layer: Sequence[int]) -> float:
    """E = mean over decoder layers of the visual tokens each layer processes (docs/methods/README.md, budget conventions)."""
    return sum(per_layer) / len(per_layer)


def solve_lambda(layers: Sequence[int], num_layers: int, retention: float) -> float:
    """PyramidDrop's lam for a target layer-average retention (E / N): the root of
    (len_0 + sum_s len_s * lam^s) / L = retention on [0, 1] (bisection; continuous, before the floors).
    Raises if the target is below len_0 / L (the first stage comes too late)."""
    bounds = [0, *layers, num_layers]
    spans = [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
    lo_ret = spans[0] / num_layers
    if retention >= 1.0:
        return 1.0
    if retention < lo_ret:
        raise ValueError(f"pdrop: a layer average of {retention:.4f} of the visual tokens is unreachable with "
                         f"the first stage before layer {layers[0]} of {num_layers} (minimum {lo_ret:.4f})")

    def avg(lam: float) -> float:
        return sum(sp * lam ** s for s, sp in enumerate(spans)) / num_layers

    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if avg(mid) < retention else (lo, mid)
    return (lo + hi) / 2


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------


@register
class PyramidDrop(Method):
    """PyramidDrop: at each stage boundary keep the visual tokens the last instruction token attends
    to most under the boundary layer's q/k; positions re-indexed.

    ``budget``: equivalent visual tokens for 576 candidates (the layer average; a sample with N
    visual tokens averages B * N / 576). 192 / 128 / 64 use the spec's table; other budgets the
    geometric schedule with a solved lam; no budget: the official lam = 0.5 schedule (E = 270)."""

    name = "pdrop"
    llm_reads = ("next",)  # each stage layer's own q / k
    capturable = "full"  # its stages are captured per segment (llava.fast.llm)
    position_mode = "reindex"

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            # stage layers (prune before these decoder layers), stated for a 32-layer LLM; None =
            # [8, 16, 24] (official) or the table's [2, 6, 16] for budgets 192/128/64
            "layer_list": None,
            # kept fraction of the sample's original visual tokens after each stage; None = derived
            # (lam^s, or the budget table). Explicit ratios exclude a budget.
            "ratios": None,
            # PyramidDrop's geometric ratio lambda (official 0.5); solved when a budget needs it
            "lam": 0.5,
            # map stage layers from 32 layers onto the model's depth (llava.ops.scale_layers)
            "scale_layers": True,
            # "ours" (fp32 head mean, ties to the lower index) or "official" (reference mode: fp16
            # probabilities and means, torch.topk)
            "numerics": NUMERICS_OPTION,
        }

    def __init__(self, budget=None, **options):
        if budget is not None and options.get("ratios") is not None:
            raise ValueError("pdrop: give either a budget or explicit ratios, not both")
        super().__init__(budget, **options)
        if self.ratios is not None:
            if self.layer_list is None:
                self.layer_list = list(DEFAULT_LAYERS)
            if len(self.ratios) != len(self.layer_list):
                raise ValueError("pdrop: ratios and layer_list must have the same length")
            if any(not 0.0 <= float(r) <= 1.0 for r in self.ratios):
                raise ValueError("pdrop: ratios must be in [0, 1]")
        if not 0.0 <= float(self.lam) <= 1.0:
            raise ValueError("pdrop: lam must be in [0, 1]")
        self.setup(num_layers=REFERENCE_DEPTH, num_vision_layers=24, family="llava")

    def setup(self, *, num_layers, num_vision_layers, family):
        super().setup(num_layers=num_layers, num_vision_layers=num_vision_layers, family=family)
        table = self.budget in PDROP_TABLE and self.layer_list is None and self.ratios is None
        if table:
            self._layers_ref, self._table_counts = PDROP_TABLE[self.budget]
            self._ratios = None
        else:
            self._layers_ref = tuple(int(k) for k in (self.layer_list or DEFAULT_LAYERS))
            self._table_counts = None
        self._layers = (scale_layers(self._layers_ref, num_layers) if self.scale_layers
                        else tuple(self._layers_ref))
        self._stage_memo: dict = {}  # (N, depth, layers) -> stage_counts, filled on the host (the fast path's dry run)
        if not table:
            if self.ratios is not None:
                self._ratios = tuple(float(r) for r in self.ratios)
            else:
                lam = float(self.lam)
                if self.budget is not None:
                    lam = solve_lambda(self._layers, num_layers, self.budget / REFERENCE_TOKENS)
                self._ratios = tuple(lam ** (s + 1) for s in range(len(self._layers)))

    @property
    def llm_layers(self):
        return self._layers

    def stage_counts(self, n_visual: int) -> tuple[int, ...]:
        """Visual tokens kept after each stage for a sample with ``n_visual`` visual tokens. Memoised per N (and
        depth): the fast path's dry run fills it on the host, so a captured stage only looks it up (torch 2.11's
        dynamo cannot trace the exact ``Fraction`` arithmetic of ``fit_stage_counts``)."""
        key = (int(n_visual), self.num_layers, self._layers)
        memo = self._stage_memo
        if key not in memo:
            if self._table_counts is not None:
                counts = [scaled_count(n_visual, c) for c in self._table_counts]
                memo[key] = tuple(fit_stage_counts(n_visual, counts, self._layers_ref, self._layers, self.num_layers))
            else:
                memo[key] = tuple(min(int(n_visual), math.floor(n_visual * r + 1e-9)) for r in self._ratios)
        return memo[key]

    def layer_counts(self, n_visual: int) -> list[int]:
        """Predicted visual tokens per decoder layer."""
        return stage_layer_counts(n_visual, self._layers, self.stage_counts(n_visual), self.num_layers)

    def select_llm(self, stage, sig):
        k = self.stage_counts(sig.num_visual_entry)[stage]  # N_orig * ratio of this stage
        if k >= sig.num_visual:
            return Selection(keep=torch.arange(sig.num_visual, device=sig.visual.device))
        if k == 0:  # the official topk(0): nothing kept, no signal needed
            return Selection(keep=torch.zeros(0, dtype=torch.long, device=sig.visual.device))
        # (H, S): this layer's q/k, last prompt token; reference mode: the official eager attention's fp16 logits
        row = sig.attention("last", layer="next", logits="model" if self.numerics == "official" else "fp32")[:, 0]
        return Selection(keep=pdrop_select(row, sig.visual, k, self.numerics, dtype=sig.hidden.dtype))
