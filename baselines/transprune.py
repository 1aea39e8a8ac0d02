"""TransPrune (CVPR 2026, arXiv 2507.20630), docs/methods/transprune.md.

Official code: liaolea/TransPrune - ``llava/model/modeling_llama_transprune.py``
(``LlamaDecoderLayer_TransPrune.forward`` / ``compute_transf_weight``, ``LlamaModel.transprune_forward`` /
``transprune_rank_drop``), a PyramidDrop-based LLaVA fork: PyramidDrop's stages and re-indexed positions, with a
score that adds the visual tokens' accumulated *token transition* to the instruction's attention.

Algorithm (prefill only):

1. every decoder layer in the accumulating list (official ``--accmulating_layer_list [7..12]``, 1-based: our
   0-based layers 6..11) gives each token a transition weight for its attention sub-block and for its feed-forward
   sub-block, ``w = (|after| / |before|) * exp(1 - cos(before, after)) / sum over the sequence of exp(1 - cos)``
   (before = the sub-block's normed input, after = its output before the residual add; :func:`transition_weight`),
   and the layer's weight is the sum of the two (:func:`layer_transition`);
2. at each stage (official ``--pruning_layer_list [7, 9, 12]``, 1-based "after layer l" = our "before 0-based
   layer l"): the visual tokens' weights of every accumulating layer run so far are summed (gathered along the
   earlier stages' kept tokens) and normalised to sum 1 (``/ (sum + 1e-8)``); the instruction-guided attention is
   the stage layer's own norm + q/k + RoPE on the current hidden states (as PyramidDrop), rows = every token after
   the image, the causal softmax, the mean over heads, the visual columns, the mean over the rows, normalised to sum
   1; score = the two added (:func:`transprune_scores`);
3. keep the top ``int(N * ratio_s)`` visual tokens (N = the sample's visual count entering the LLM; official
   ``--image_token_ratio_list [0.875, 0.625, 0.125]``), ascending; positions re-indexed 0..len-1 (PyramidDrop's
   ``reindex``; decode positions shift by what each stage dropped).

Budgets (equivalent tokens: the average number of visual tokens per decoder layer, for 576 candidates):

* none: the official lists, E = (7 * 576 + 2 * 504 + 3 * 360 + 20 * 72) / 32 = 236.25;
* 192 / 128 / 64: PyramidDrop's table in our repository (``llava.ops.IN_LLM_BUDGET_TABLE``: stages before layers
  2 / 6 / 16 keeping 300/200/110, 303/110/36, 66/30/17 of 576; E = 191 / 126.25 / 62.125; our design): the two
  methods then share one schedule and differ in the score only; the accumulating layers follow the stages
  (layers 1..15);
* any other budget B: the official stage layers and the official ratios scaled by one factor so that the layer
  average is B (our design, :func:`scale_ratios`; on 32 layers B from 126 = 7 * 576 / 32, every ratio 0, to 252,
  the first ratio 1);
* ``ratios`` (+ ``layer_list``): explicit official lists (no budget).

Other depths: stage layers stated for 32 layers are mapped with ``llava.ops.scale_layers`` (the tiny 4-layer LLM:
7 / 9 / 12 -> 1 / 2 / 3); the derived accumulating layers follow the mapped stages (the layer before the first
stage through the layer before the last); table counts are fitted to the depth as PyramidDrop's
(``llava.ops.fit_stage_counts``).

The sub-block states are the engine's ``LLMSignals.subblocks`` (``Method.llm_subblock_layers``: forward hooks on
each accumulating layer's attention and feed-forward sub-modules, llava/subblocks.py).

Numerics: ``numerics="ours"`` computes the transition weights, their sums and the attention in fp32 with ties to
the lower index; ``"official"`` (reference mode) reproduces the official arithmetic: the weights in the model's
dtype (norms, ``F.cosine_similarity``, ``exp``, the sum over the sequence, the products, attention + FFN), summed
into an fp32 accumulator layer by layer, the attention logits in the model's dtype with the softmax in fp32 cast
back to it, the means and the attention's normalisation in that dtype, ``torch.topk``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from llava.method import Method, register
from llava.ops import NUMERICS_OPTION
from llava.ops import (IN_LLM_BUDGET_TABLE, REFERENCE_DEPTH, REFERENCE_TOKENS, fit_stage_counts,
                       scale_layers, scaled_count, stage_layer_counts, topk_desc)
from llava.selection import Selection

#: the official eval scripts' switches (scripts/transprune/v1_5_test/*.sh), 1-based "after layer l" = our stage
#: "before 0-based layer l", stated for 32 layers
OFFICIAL_LAYERS = (7, 9, 12)
OFFICIAL_RATIOS = (0.875, 0.625, 0.125)
#: the official ``--accmulating_layer_list [7..12]`` (1-based) as 0-based decoder layers
OFFICIAL_ACCUMULATE = (6, 7, 8, 9, 10, 11)
#: the official normalisation's epsilon (``/ (x.sum() + 1e-8)``)
EPS = 1e-8
#: ``F.cosine_similarity``'s default eps (the floor of each row's norm)
COS_EPS = 1e-8
#: where the sub-block hooks run: every family whose decoder layers have attention everywhere
FAMILIES = ("llava", "llava_next", "video_llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "internvl")


# ----------------------------------------------------------------------------------------------
# The algorithm
# ----------------------------------------------------------------------------------------------


def transition_weight(before: torch.Tensor, after: torch.Tensor, numerics: str = "ours") -> torch.Tensor:
    """Token transition weight of one sub-block over the S rows of one sequence: (S, D) before / after -> (S,)
    ``|after| / |before| * exp(1 - cos(before, after)) / sum_S exp(1 - cos)``. ``"ours"``: in fp32; ``"official"``:
    in the inputs' dtype, the official expression order (``compute_transf_weight``)."""
    if numerics == "official":
        ratio = torch.norm(after, dim=-1) / torch.norm(before, dim=-1)
        e = torch.exp(1 - F.cosine_similarity(before, after, dim=-1))
        return ratio * (e / e.sum())
    b, a = before.float(), after.float()
    nb, na = torch.norm(b, dim=-1), torch.norm(a, dim=-1)
    e = torch.exp(1 - _cosine(b, a, nb, na, own=b is not before and a is not after))
    return (na / nb) * (e / e.sum())


def _cosine(x1: torch.Tensor, x2: torch.Tensor, n1: torch.Tensor, n2: torch.Tensor, own: bool) -> torch.Tensor:
    """``F.cosine_similarity(x1, x2, dim=-1)`` (eps 1e-8) from the rows' norms ``n1`` / ``n2`` already computed: the
    same arithmetic as torch's (each row divided by max(norm, eps), the product summed over the row), without
    computing the two norms again. ``own``: x1 and x2 are scratch copies, divided and multiplied in place."""
    d1, d2 = n1.clamp_min(COS_EPS)[..., None], n2.clamp_min(COS_EPS)[..., None]
    if own:
        return x1.div_(d1).mul_(x2.div_(d2)).sum(-1)
    return ((x1 / d1) * (x2 / d2)).sum(-1)


def layer_transition(st, numerics: str = "ours") -> torch.Tensor:
    """One layer's weight (S,): the attention sub-block's + the feed-forward sub-block's
    (``st``: a :class:`llava.subblocks.SubBlockStates`)."""
    return transition_weight(st.attn_in, st.attn_out, numerics) + transition_weight(st.mlp_in, st.mlp_out, numerics)


def accumulate(acc: torch.Tensor | None, weights: Sequence[torch.Tensor], visual: torch.Tensor) -> torch.Tensor:
    """The visual tokens' accumulated weight (Nv,) fp32: ``acc`` (the earlier layers', already gathered to the
    current visual tokens; None = zeros) plus each layer's weight at ``visual``, one layer at a time in layer order
    (the official ``accmulate_transf_weight += weight[...]`` into an fp32 zeros tensor)."""
    out = torch.zeros(visual.numel(), dtype=torch.float32, device=visual.device) if acc is None else acc.clone()
    for w in weights:
        out += w[visual]
    return out


def instruction_attention(attn: torch.Tensor, visual: torch.Tensor, numerics: str = "ours",
                          dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Instruction-guided attention (Nv,) from ``attn`` (H, T, S): the probabilities of the T rows after the image
    under the stage layer's q/k; mean over heads, the visual columns, mean over the rows, normalised to sum 1.
    ``"official"``: cast to ``dtype`` (the official ``.to(query_states.dtype)``) and every step in it."""
    if numerics == "official":
        a = attn.to(dtype).mean(dim=0)[:, visual].mean(dim=0)
    else:
        a = attn.float().mean(dim=0)[:, visual].mean(dim=0)
    return a / (a.sum() + EPS)


def transprune_scores(acc: torch.Tensor, iga: torch.Tensor) -> torch.Tensor:
    """score = the accumulated transition normalised to sum 1 (fp32) + the normalised attention (fp32 result)."""
    return acc / (acc.sum() + EPS) + iga


def transprune_keep(score: torch.Tensor, k: int, numerics: str = "ours") -> torch.Tensor:
    """The top-``k`` indices, ascending (``"ours"``: ties to the lower index; ``"official"``: ``torch.topk``)."""
    k = max(0, min(int(k), score.numel()))
    if numerics == "official":
        return score.topk(k).indices.sort().values
    return topk_desc(score, k).sort().values


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------


def equivalent_tokens(per_layer: Sequence[int]) -> float:
    """E = mean over decoder layers of the visual tokens each layer processes."""
    return sum(per_layer) / len(per_layer)


def scale_ratios(layers: Sequence[int], num_layers: int, retention: float,
                 shape: Sequence[float] = OFFICIAL_RATIOS) -> tuple[float, ...]:
    """The ratios ``alpha * shape`` whose layer average (before the floors) is ``retention`` = B / 576 with stages
    before ``layers`` of a ``num_layers``-layer LLM: alpha = (retention * L - K_1) / sum_s len_s * shape_s (our
    design; the official list's shape kept). Raises where a ratio would leave [0, 1]."""
    bounds = [*layers, num_layers]
    spans = [bounds[s + 1] - bounds[s] for s in range(len(layers))]
    alpha = (retention * num_layers - layers[0]) / sum(sp * r for sp, r in zip(spans, shape))
    if alpha < 0 or alpha * max(shape) > 1 + 1e-12:
        lo = layers[0] / num_layers * REFERENCE_TOKENS
        hi = (layers[0] + sum(sp * r / max(shape) for sp, r in zip(spans, shape))) / num_layers * REFERENCE_TOKENS
        raise ValueError(f"transprune: a budget of {retention * REFERENCE_TOKENS:g} equivalent tokens is out of reach "
                         f"of the official ratio shape with stages before layers {tuple(layers)} of {num_layers} "
                         f"(from {lo:g} to {hi:g}); give layer_list / ratios, or 192 / 128 / 64 (the table)")
    return tuple(alpha * r for r in shape)


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------


@register
class TransPrune(Method):
    """TransPrune: PyramidDrop's stages, scored by each visual token's accumulated token transition (attention and
    feed-forward sub-blocks of the accumulating layers) plus the instruction's attention under the stage layer's
    q/k; positions re-indexed.

    ``budget``: equivalent visual tokens for 576 candidates. None: the official lists (E = 236.25); 192 / 128 / 64:
    PyramidDrop's table; other budgets: the official ratio shape scaled to the budget."""

    name = "transprune"
    llm_reads = ("next",)  # each stage layer's own q / k
    position_mode = "reindex"
    families = FAMILIES
    unsupported_reason = ("its token transitions hook every accumulating decoder layer's attention sub-block, and the "
                          "hybrid Qwen3.5's Gated DeltaNet layers have none (nor an attention map for the stages)")
    capture_reason = ("transprune: the decoder layers' sub-block states are recorded on the eager engine (the fast "
                      "path does not plan them)")

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            # stage layers (prune before these 0-based decoder layers = the official 1-based "after layer"),
            # stated for a 32-layer LLM; None = the official [7, 9, 12], or the table's [2, 6, 16] for 192/128/64
            "layer_list": None,
            # kept fraction of the sample's original visual tokens after each stage (the official
            # image_token_ratio_list without its leading 1.0); None = derived. Explicit ratios exclude a budget
            "ratios": None,
            # 0-based decoder layers whose token transitions are accumulated, on the model's own depth; None = the
            # layer before the first stage through the layer before the last (official [7..12] 1-based)
            "accumulate_layers": None,
            # map stage layers from 32 layers onto the model's depth (llava.ops.scale_layers)
            "scale_layers": True,
            # "ours" (fp32 weights and attention, ties to the lower index) or "official" (reference mode)
            "numerics": NUMERICS_OPTION,
        }

    def __init__(self, budget=None, **options):
        if budget is not None and options.get("ratios") is not None:
            raise ValueError("transprune: give either a budget or explicit ratios, not both")
        super().__init__(budget, **options)
        if self.ratios is not None:
            if self.layer_list is None:
                self.layer_list = list(OFFICIAL_LAYERS)
            if len(self.ratios) != len(self.layer_list):
                raise ValueError("transprune: ratios and layer_list must have the same length")
            if any(not 0.0 <= float(r) <= 1.0 for r in self.ratios):
                raise ValueError("transprune: ratios must be in [0, 1]")
        self.setup(num_layers=REFERENCE_DEPTH, num_vision_layers=24, family="llava")

    def setup(self, *, num_layers, num_vision_layers, family):
        super().setup(num_layers=num_layers, num_vision_layers=num_vision_layers, family=family)
        table = self.budget in IN_LLM_BUDGET_TABLE and self.layer_list is None and self.ratios is None
        if table:
            self._layers_ref, self._table_counts = IN_LLM_BUDGET_TABLE[self.budget]
        else:
            self._layers_ref = tuple(int(k) for k in (self.layer_list or OFFICIAL_LAYERS))
            self._table_counts = None
        self._layers = (scale_layers(self._layers_ref, num_layers) if self.scale_layers
                        else tuple(self._layers_ref))
        if self.ratios is not None:
            self._ratios = tuple(float(r) for r in self.ratios)
        elif table:
            self._ratios = None
        elif self.budget is not None:
            self._ratios = scale_ratios(self._layers, num_layers, self.budget / REFERENCE_TOKENS)
        else:
            self._ratios = OFFICIAL_RATIOS
        if self.accumulate_layers is not None:
            acc = tuple(sorted(set(int(i) for i in self.accumulate_layers)))
            if any(not 0 <= i < self._layers[-1] for i in acc):
                raise ValueError(f"transprune: accumulate_layers {acc} must run before the last stage "
                                 f"(0..{self._layers[-1] - 1})")
        else:
            acc = tuple(range(self._layers[0] - 1, self._layers[-1]))
        self._accumulate = acc
        self._stage_memo: dict = {}

    @property
    def llm_layers(self):
        return self._layers

    @property
    def llm_subblock_layers(self):
        return self._accumulate

    def stage_counts(self, n_visual: int) -> tuple[int, ...]:
        """Visual tokens kept after each stage for a sample with ``n_visual`` visual tokens: ``int(N * ratio)`` (the
        official ``int(cur_image_token * ratio)``), or the table's counts fitted to the depth."""
        key = (int(n_visual), self.num_layers, self._layers)
        if key not in self._stage_memo:
            if self._table_counts is not None:
                counts = [scaled_count(n_visual, c) for c in self._table_counts]
                out = fit_stage_counts(n_visual, counts, self._layers_ref, self._layers, self.num_layers)
            else:
                out = tuple(min(int(n_visual), int(int(n_visual) * r)) for r in self._ratios)
            self._stage_memo[key] = tuple(out)
        return self._stage_memo[key]

    def layer_counts(self, n_visual: int) -> list[int]:
        """Predicted visual tokens per decoder layer."""
        return stage_layer_counts(n_visual, self._layers, self.stage_counts(n_visual), self.num_layers)

    def select_llm(self, stage, sig):
        official = self.numerics == "official"
        mode = "official" if official else "ours"
        weights = [layer_transition(st, mode) for i, st in sorted(sig.subblocks.items()) if i in self._accumulate]
        acc = accumulate(sig.state.get("transprune_acc"), weights, sig.visual)
        k = self.stage_counts(sig.num_visual_entry)[stage]
        if k >= sig.num_visual:
            keep = torch.arange(sig.num_visual, device=sig.visual.device)
        elif k == 0:  # the official top-0: nothing kept, no instruction attention needed
            keep = torch.zeros(0, dtype=torch.long, device=sig.visual.device)
        else:
            attn = sig.attention("text_after", layer="next", logits="model" if official else "fp32")
            iga = instruction_attention(attn, sig.visual, mode, dtype=sig.hidden.dtype)
            keep = transprune_keep(transprune_scores(acc, iga), k, mode)
        sig.state["transprune_acc"] = acc[keep]  # the kept tokens' accumulated weights, for the next stage
        return Selection(keep=keep)
