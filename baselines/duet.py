"""DUET-VLM (CVPR 2026, arXiv 2602.18846): a VisionZip-like vision stage, then PyramidDrop-like text-guided
dropping inside the LLM.

Official code: AMD-AGI/DUET-VLM @ cd69e489f39a2a51e3b278a470dc8dc32c00e0fb (study:
docs/methods/studies-2026-leaders.md section 1). Stage 1: ``visionzip/clip_encoder_cw.py``
(``CLIPVisionTower_VisionZip.forward``, lines 50-144), ``visionzip/utils.py`` (the key metric: the head mean
of the select layer's raw ``k_proj`` output) and ``visionzip/main.py`` (``visionzip(model, dominant,
contextual, cluster_width)`` hands ``dominant - 1`` patches to the tower: the [CLS] fills one slot). Stage 2:
``llava/model/modeling_llama_pdrop.py`` (``LlamaModel.pdrop_forward``: the rank after layer l - 1 with layer
l's own q / k; ``pdrop_rank_drop``: the query rows, means, ``topk``, splice, re-indexed positions).

Stage 1, per unit (LLaVA-1.5 image / LLaVA-NeXT crop / Video-LLaVA frame), on the CLIP select layer (-2)::

    s     = [CLS] attention row summed over heads                                  (one score per patch)
    dom   = [CLS] + the top-(D-1) patches by s, [CLS] first, then ascending index         D tokens
    R     = the other patches, ascending (M of them)
    pool  = the top-P of R by s, best first, P = min(max(1, w*C), M)           (w = cluster_width)
    tgt   = pool[0], pool[step], pool[2 step], ... (first C; step = max(1, P // C))  in pool-rank order
    each other pool token joins the target of highest key cosine (head-mean keys; first max on ties)
    ctx_c = x[tgt_c] + mean(x of its members)        (a target without members stays x[tgt_c])
    R minus the pool is DISCARDED (neither kept nor merged; VisionZip merges every leftover)
    out   = [dom..., ctx_1..ctx_C]   (vision-feature space, then the projector; positions contiguous)

Stage 2, prefill only, before each decoder layer l_s of ``layer_list`` (official 16, 24 of 32) with ratios
r_s (official 0.5, 0.0)::

    N     = the sample's visual tokens entering the LLM;  k_s = int(N * r_s)
    a     = causal softmax rows of layer l_s's own input_layernorm + q / k + RoPE on the hidden states after
            layer l_s - 1, queries = every text row after the image   -> LLMSignals.attention("text_after")
    score = mean over query rows of (mean over heads of a), visual columns
    keep the top-k_s visual tokens, ascending; positions re-indexed ("reindex"); k_s = 0 drops them all

Budget (our convention, the official settings mapped onto it): ``budget`` = the layer-average visual tokens
**per unit** on a 32-layer LLM under the default schedule, E = N1 * (16 + 8 * 0.5 + 8 * 0) / 32 = 0.625 N1 with
N1 = D + C the stage-1 tokens per unit, so N1 = 1.6 B. Official splits: 192 -> 300 + 7 (E = 191.75, the eval
scripts), 128 -> 170 + 35 (E = 128.0, README example); 64 -> 85 + 17 (E = 63.75) is our design (no official
setting). Any other budget: N1 = round(1.6 B) (with other ``layer_list`` / ``ratios``: N1 = round(B / f), f the
schedule's layer fraction), C = round(N1 / 6), D = N1 - C (our design; gives 160 + 32 for 120 per frame, the
official Video-LLaVA setting, and 85 + 17 for 64). ``dominant`` / ``contextual`` override the split; with
neither and no budget, the official loader default 300 + 7. A unit with at most D + C tokens is kept whole
in stage 1. Stage 2's ratios apply to the sample's whole visual block (all units, NeXT newlines included).

Other depths: stage layers are stated for 32 layers and mapped with :func:`llava.ops.scale_layers` (16 / 24 ->
2 / 3 on the tiny 4-layer LLM, 20 / 30 on 40 layers, 14 / 21 on 28): the ratios are kept.

Reference mode (option ``numerics="official"``; default ``"ours"``): stage 1 in fp32 (the official tower is
not cast), ``torch.topk`` for the dominant patches and the pool (official tie order), the assignment by the
unclamped ``m / m.norm()`` and ``torch.bmm``; stage 2 with the per-head probabilities cast to the run's dtype
(the official fp32 softmax is cast ``.to(query_states.dtype)``: fp16 under its builder's fp16 LLM, fp32 in an
fp32 run), both means in that dtype, ``torch.topk``. The default mode
scores in fp32 with ties to the lower index. The salient-word queries (``queries="salient"``: spaCy + NLTK
on the host, DUET-finetuned checkpoints only) are not built. See docs/methods/duet.md.
"""

from __future__ import annotations

import math

import torch

from llava.method import Method, register
from llava.ops import NUMERICS_OPTION
from llava.ops import (check_numerics, contextual_merge, isin_small, masked_take, official_contextual_merge, per_unit_selection,
                       scale_layers, topk_desc, unit_layout)
from llava.options import Option
from llava.selection import Selection

#: (dominant incl. [CLS], contextual) per unit for the budgets with a setting; 64 is our design
SPLITS = {192: (300, 7), 128: (170, 35), 64: (85, 17)}
#: the official loader's defaults when no flag is given (``model_vqa_loader.py``): the 192 setting
DEFAULT_SPLIT = (300, 7)
OFFICIAL_CLUSTER_WIDTH = 4
OFFICIAL_LAYERS = (16, 24)  # of a 32-layer LLM
OFFICIAL_RATIOS = (0.5, 0.0)  # of the visual tokens entering the LLM
REFERENCE_DEPTH = 32
#: stage-1 dtype of the official tower (fp32: loaded with device_map='auto' and not cast)
OFFICIAL_VISION_DTYPE = torch.float32
#: stage-2 dtype of the official probabilities and means under the official builder (the fp16 LLM's query dtype);
#: the method passes the run's own, ``sig.hidden.dtype`` (the official ``.to(query_states.dtype)``)
OFFICIAL_LLM_DTYPE = torch.float16
QUERIES = ("text_after", "last")
ORDERS = ("unit", "spatial", "grid_raster")


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def layer_fraction(layers, ratios, depth: int = REFERENCE_DEPTH) -> float:
    """The layer-average share of the stage-1 tokens under a schedule (before the floors): (l_1 + sum_s
    (l_{s+1} - l_s) r_s) / depth, with l_{S+1} = depth (official 16 / 24, 0.5 / 0.0: 20 / 32 = 0.625)."""
    bounds = [*layers, depth]
    return (bounds[0] + sum((bounds[s + 1] - bounds[s]) * float(r) for s, r in enumerate(ratios))) / depth


def budget_split(budget: int, layers=OFFICIAL_LAYERS, ratios=OFFICIAL_RATIOS) -> tuple[int, int]:
    """(dominant, contextual) per unit for ``budget`` layer-average tokens per unit: the table where the
    schedule is the official one, else N1 = round(B / f), C = round(N1 / 6), D = N1 - C (halves up; our
    design, reproducing 85 + 17 at 64 and the Video-LLaVA 160 + 32 at 120)."""
    official = tuple(layers) == OFFICIAL_LAYERS and tuple(float(r) for r in ratios) == OFFICIAL_RATIOS
    if official and budget in SPLITS:
        return SPLITS[budget]
    n1 = max(1, _half_up(budget / layer_fraction(layers, ratios)))
    c = _half_up(n1 / 6)
    return n1 - c, c


# ----------------------------------------------------------------------------------------------
# Stage 1
# ----------------------------------------------------------------------------------------------


def duet_vision(cls_attn: torch.Tensor, keys: torch.Tensor, unit: torch.Tensor, patch: torch.Tensor,
                dominant: int, contextual: int, cluster_width: int = OFFICIAL_CLUSTER_WIDTH, *,
                keep_newlines: bool = True, num_stock: int | None = None, unit_pos: torch.Tensor | None = None,
                order: str = "unit", numerics: str = "ours", layout=None, captured: bool = False) -> Selection:
    """DUET-VLM's stage 1 for one sample (all its units; see the module doc).

    cls_attn: (H, T) [CLS] -> token attention of the select layer, per head; keys: (T, d) its head-mean keys
    (the merge metric); unit: (T,) unit id (-1: NeXT newline, kept as layout after the unit blocks when
    ``keep_newlines``); patch: (T,) patch index (-1: [CLS]); tokens ``num_stock``.. are extra [CLS] candidates
    (LLaVA-1.5 / NeXT, whose stock model drops [CLS]); ``layout``: the planned
    :func:`llava.ops.unit_layout` (else computed: one host read). A unit without a [CLS] (Qwen, OneVision,
    InternVL signals) gives the slot to the next-best patch.

    Returns a Selection: ``keep`` = per unit [CLS] + dominant patches (ascending), then newlines; ``targets``
    = the anchors in pool-rank order; ``assign`` = each pool member's anchor slot, -1 for every other token
    (the leftovers outside the pool are dropped); rule ``target_plus_mean`` in vision space; ``order``:
    :func:`llava.ops.block_order` (``unit``: per unit [dominant..., contextual...]). ``captured``: inside a
    captured prefill or its host plan (the order is never compared with the identity on the host).
    """
    check_numerics("duet", numerics)
    if order not in ORDERS:
        raise ValueError(f"duet: order must be one of {ORDERS}, got {order!r}")
    n = unit.numel()
    num_stock = n if num_stock is None else int(num_stock)
    dev = unit.device
    lay = layout if layout is not None else unit_layout(unit, patch, num_stock, unit_pos)
    if all(dominant + contextual >= lay.num_stock[u] for u in range(lay.num_units)):
        return Selection(keep=torch.arange(num_stock, device=dev))  # every unit fits: nothing pruned
    official = numerics == "official"
    if official:  # the official (B, H, N) [CLS] slice summed over dim 1, fp32 tower
        scores = cls_attn.to(OFFICIAL_VISION_DTYPE)[None].sum(dim=1)[0]
    else:
        scores = cls_attn.float().sum(0)

    def top(cand: torch.Tensor, k: int) -> torch.Tensor:
        """Positions in ``cand`` of its k best scores, best first."""
        if official:
            return scores[cand][None].topk(k, dim=1).indices[0]
        return topk_desc(scores[cand], k)

    per_unit, assign, num_targets = [], torch.full((n,), -1, dtype=torch.long, device=dev), 0
    for u in range(lay.num_units):
        own = lay.tokens[u][: lay.num_stock[u]]  # the unit's tokens in the stock LLM input (ascending)
        if dominant + contextual >= own.numel():  # this unit fits: kept whole
            per_unit.append((u, own, own[:0]))
            continue
        cls = lay.cls[u][:1]  # the unit's [CLS]: a stock token (video) or an extra candidate
        patches = lay.patches[u][: lay.num_patch_stock[u]]
        n_top = max(0, min(dominant - cls.numel(), patches.numel()))
        dom_p = patches[top(patches, n_top)].sort().values
        dom = torch.cat([cls, dom_p])  # [CLS] first, then ascending (official masked_select order)
        rest = masked_take(patches, ~isin_small(patches, dom_p), patches.numel() - n_top)  # ascending
        m = rest.numel()
        pool_size = min(max(1, cluster_width * contextual), m) if contextual > 0 else 0
        pool = rest[top(rest, pool_size)]  # best first
        merge = official_contextual_merge if official else contextual_merge
        tg, a = merge(keys, pool, contextual, n)
        assign = torch.where(a >= 0, a + num_targets, assign)
        num_targets += tg.numel()
        per_unit.append((u, dom, tg))
    newlines = lay.newlines[: lay.num_newline_stock] if keep_newlines else unit.new_zeros(0)
    return per_unit_selection(per_unit, newlines, assign, lay.unit_pos, patch, order, grid=lay.grid,
                              captured=captured)


# ----------------------------------------------------------------------------------------------
# Stage 2
# ----------------------------------------------------------------------------------------------


def duet_rank(rows: torch.Tensor, visual: torch.Tensor, k: int, numerics: str = "ours",
              row_mask: torch.Tensor | None = None, dtype: torch.dtype = OFFICIAL_LLM_DTYPE) -> torch.Tensor:
    """One stage-2 ranking: ``rows`` (H, Q, S) = the attention probabilities of the Q query rows (every text
    row after the image), ``visual`` (N,) the visual columns. Returns the indices (into ``visual``) of the
    top-``k`` visual tokens by the mean over query rows of the head mean, ascending (ties: lower index).
    ``row_mask`` (Q,) bool: the real query rows of a padded block (the fast path's captured prefill; the
    pads' rows may be NaN): the mean over those only. ``numerics="official"``: the probabilities cast to
    ``dtype``, the mean over heads, the visual columns, the mean over rows (both in ``dtype``), ``torch.topk``.
    ``dtype``: the official ``.to(query_states.dtype)``, fp16 under its builder, fp32 in an fp32 run (the method
    passes the run's own)."""
    check_numerics("duet", numerics)
    k = max(0, min(int(k), visual.numel()))
    if row_mask is not None:  # padded query rows (the reference mode is eager: no mask there)
        per_row = torch.where(row_mask[:, None], rows.float().mean(0)[:, visual], 0.0)  # (Q, N)
        score = per_row.sum(0) / row_mask.sum().clamp(min=1)
        return topk_desc(score, k).sort().values
    if numerics == "official":
        per_row = rows.to(dtype).mean(dim=0)  # (Q, S): heads
        score = per_row[:, visual].mean(dim=0)  # (N,): query rows
        return score.topk(k).indices.sort().values
    score = rows.float().mean(0)[:, visual].mean(0)
    return topk_desc(score, k).sort().values


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------


@register
class DUET(Method):
    """DUET-VLM: per unit [CLS] + dominant patches and a few contextual tokens merged from a pool of the best
    leftovers (the rest dropped), then before LLM layers 16 and 24 (of 32) the visual tokens the text after
    the image attends to most are kept (half, then none).

    ``budget``: layer-average visual tokens per image / crop / frame on a 32-layer LLM (192 -> 300 + 7,
    128 -> 170 + 35, 64 -> 85 + 17 per unit after the vision stage; module doc)."""

    name = "duet"
    vision_stage = True
    needs_vision_attention = True
    include_cls_candidates = True  # the official tower feeds the [CLS] (LLaVA-1.5 / NeXT drop it)
    position_mode = "reindex"
    llm_reads = ("next",)  # each stage layer's own q / k
    #: the fast path plans its stages in the prefill's segments; the text rows after the image (its queries)
    #: are planned padded to a text bucket with their mask; their count never changes a stage's count (0 below:
    #: one graph per bucket whatever the question's length)
    capturable = "full"
    llm_text_rows = True
    llm_text_cap = 0

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            # stage 1 per unit (dominant includes the [CLS]); None = from the budget (module doc)
            "dominant": None,
            "contextual": None,
            # the pool of leftovers the contextual tokens come from: cluster_width x contextual (official 4)
            "cluster_width": OFFICIAL_CLUSTER_WIDTH,
            # stage-2 layers, stated for a 32-layer LLM (official 16, 24), and the kept share of the visual
            # tokens entering the LLM after each (official 0.5, 0.0)
            "layer_list": OFFICIAL_LAYERS,
            "ratios": OFFICIAL_RATIOS,
            # map the stage layers from 32 layers onto the model's depth (llava.ops.scale_layers)
            "scale_layers": True,
            # stage-2 query rows: "text_after" (official with the public checkpoints: every text row after the
            # image), "last" (PyramidDrop's last prompt token; our ablation); "salient" is not built
            "queries": "text_after",
            "order": Option("unit", ORDERS,
                            doc="multi-unit output order (llava.ops.block_order): unit (per unit [dominant, "
                                "contextual]; our design, no official NeXT / video path), spatial, grid_raster "
                                "(VisionZip's NeXT re-assembly)"),
            # LLaVA-NeXT 'spatial_unpad' newline tokens: kept as layout in stage 1 (ranked in stage 2) or dropped
            "keep_newlines": True,
            # "ours" (fp32, ties to the lower index) or "official" (reference mode, module doc)
            "numerics": NUMERICS_OPTION,
        }

    def __init__(self, budget=None, **options):
        super().__init__(budget, **options)
        layers, ratios = tuple(self.layer_list), tuple(self.ratios)
        if len(layers) != len(ratios) or not layers:
            raise ValueError("duet: layer_list and ratios must be non-empty and of the same length")
        if any(isinstance(k, bool) or int(k) != k for k in layers) or \
                any(not 1 <= int(k) < REFERENCE_DEPTH for k in layers) or list(layers) != sorted(set(layers)):
            raise ValueError(f"duet: layer_list must be strictly increasing decoder layers in 1..31 (of 32), "
                             f"got {list(layers)}")
        if any(not 0.0 <= float(r) <= 1.0 for r in ratios) or \
                any(float(a) < float(b) for a, b in zip(ratios, ratios[1:])):
            raise ValueError(f"duet: ratios must be non-increasing values in [0, 1], got {list(ratios)}")
        self.layer_list, self.ratios = tuple(int(k) for k in layers), tuple(float(r) for r in ratios)
        if self.queries == "salient":
            raise ValueError("duet: queries='salient' is not built: the official salient words come from spaCy's "
                             "en_core_web_sm and NLTK stop words on the host and are only read by DUET-finetuned "
                             "checkpoints (config.use_salient_tokens); the public checkpoints use every text row "
                             "after the image ('text_after')")
        if self.queries not in QUERIES:
            raise ValueError(f"duet: queries must be one of {QUERIES}, got {self.queries!r}")
        if self.numerics == "official":  # stage 1's [CLS] rows as the official eager tower computes them
            self.vision_attention_logits = "model"
        w = self.cluster_width
        if isinstance(w, bool) or int(w) != w or w < 1:
            raise ValueError(f"duet: cluster_width must be a whole number >= 1, got {w!r}")
        self.cluster_width = int(w)
        d, c = self.dominant, self.contextual
        if self.budget is not None:
            bd, bc = budget_split(self.budget, self.layer_list, self.ratios)
            if d is None and c is None:
                d, c = bd, bc
            elif d is None:
                d = bd + bc - c
            elif c is None:
                c = bd + bc - d
            elif d + c != bd + bc:
                raise ValueError(f"duet: dominant {d} + contextual {c} != the {bd + bc} tokens per unit of "
                                 f"budget {self.budget}")
        elif d is None and c is None:
            d, c = DEFAULT_SPLIT
        elif d is None or c is None:
            raise ValueError("duet: without a budget give both dominant= and contextual= (or neither: 300 + 7)")
        if any(isinstance(v, bool) or int(v) != v for v in (d, c)) or d < 1 or c < 0:
            raise ValueError(f"duet: need dominant >= 1 and contextual >= 0 (whole numbers), got {d}, {c}")
        self.dominant, self.contextual = int(d), int(c)
        self.setup(num_layers=REFERENCE_DEPTH, num_vision_layers=24, family="llava")

    def setup(self, *, num_layers, num_vision_layers, family):
        super().setup(num_layers=num_layers, num_vision_layers=num_vision_layers, family=family)
        layers = scale_layers(self.layer_list, num_layers) if self.scale_layers else self.layer_list
        if layers[-1] >= num_layers:
            raise ValueError(f"duet: stage layers {list(layers)} do not fit a {num_layers}-layer LLM")
        self._layers = tuple(layers)

    @property
    def llm_layers(self):
        return self._layers

    def stage_counts(self, n_visual: int) -> tuple[int, ...]:
        """Visual tokens kept after each stage for a sample entering the LLM with ``n_visual``: int(N r_s),
        as the official ``int(image_tokens * ratio)``."""
        return tuple(int(int(n_visual) * r) for r in self.ratios)

    def layer_counts(self, n_visual: int) -> list[int]:
        """Predicted visual tokens per decoder layer."""
        bounds, cur = [*self._layers, self.num_layers], int(n_visual)
        out = [cur] * bounds[0]
        for s, k in enumerate(self.stage_counts(n_visual)):
            cur = min(cur, k)
            out += [cur] * (bounds[s + 1] - bounds[s])
        return out

    def select_vision(self, sig):
        return duet_vision(sig.cls_attn, sig.keys, sig.unit, sig.patch, self.dominant, self.contextual,
                           self.cluster_width, keep_newlines=self.keep_newlines, num_stock=sig.num_stock,
                           unit_pos=sig.unit_pos, order=self.order, numerics=self.numerics,
                           layout=sig.unit_layout(patch=True, stock=True, pos=True), captured=sig.captured)

    def select_llm(self, stage, sig):
        k = self.stage_counts(sig.num_visual_entry)[stage]
        dev = sig.visual.device
        if k >= sig.num_visual:
            return Selection(keep=torch.arange(sig.num_visual, device=dev))
        if k == 0:  # the official topk(0): nothing kept, no signal needed
            return Selection(keep=torch.zeros(0, dtype=torch.long, device=dev))
        # (H, Q, S): layer K's q / k; reference mode: the official eager attention's fp16 logits
        rows = sig.attention(self.queries, layer="next", logits="model" if self.numerics == "official" else "fp32")
        mask = sig.text_mask if self.queries == "text_after" else None  # padded rows on the fast path
        # reference mode in the run's dtype, as the official .to(query_states.dtype)
        return Selection(keep=duet_rank(rows, sig.visual, k, self.numerics, row_mask=mask, dtype=sig.hidden.dtype))
