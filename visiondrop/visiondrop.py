"""VisionDrop (arXiv 2506.22283, AAAI 2026): visual-only, progressive dominant-token selection with
contextual merging, in the vision encoder and inside the LLM.

Follows the official code (Ruixxxx/VisionDrop: the encoder stage is VisionZip's code, the LLM stage
a modified PyramidDrop LlamaModel; docs/methods/visiondrop.md):

stage 0 (CLIP select layer, per image / crop / frame):
    a_j = sum_h A_h[CLS, j];  dominant = [CLS] + top-(D0 - 1) patches by a (index order, [CLS] first)
    the rest -> C0 contextual tokens: uniform targets over the remaining list, each other token to
    its most cosine-similar target by head-mean CLIP keys, contextual = x_target + mean(x_assigned)
stage s = 1..3 (before decoder layers 8 / 16 / 24, prefill only):
    S(j) = mean_h mean_{i in visual} softmax(q_i k^T)_j  with the next layer's norm + q/k + RoPE
    dominant = top-D_s visual tokens by S (current order); the rest merged into C_s tokens with the
    same rule, metric = RoPE-rotated head-mean keys of that layer, merged vectors = hidden states;
    positions re-indexed contiguously.

``budget`` = the average visual tokens over the LLM's layers (the paper's "average token retention")
per image (LLaVA-1.5), per crop (LLaVA-NeXT) or per frame (Video-LLaVA).

Reference mode (option ``numerics="official"``; default ``"ours"``): the official numerics of each signal.
Stage 0 runs on the fp32 CLIP tower (the official loader leaves it fp32 with ``device_map='auto'``): the
head-summed [CLS] row, the key metric and the merge stay fp32, the dominant patches are chosen by
``torch.topk`` and the assignment uses the unclamped ``m / m.norm()`` with ``torch.bmm`` (VisionZip's
``CLIPVisionTower_VisionZip.forward``). The LLM stages run in the fp16 LLM (``visiondrop_rank_drop``): the
probabilities are cast to float16 and averaged over heads, then over the visual queries, in fp16;
``torch.topk`` picks the dominant tokens; the key metric is the head mean of the fp16 keys in fp16,
normalised without clamp, ``torch.matmul`` similarity in fp16, ``argmax``. The merges themselves are the
engine's fp32 merges (the official stage-0 merge is fp32 up to summation order; the official LLM-stage
merge is fp16, which ours matches within that fp16 formula's own rounding). "fp16" is the official builder's
LLM: the official code computes in its LLM's dtype (``.to(query_states.dtype)``), so the LLM stages' score,
metric and assignment run in the run's own dtype (``sig.hidden``): fp16 in an fp16 run, fp32 in an fp32 run.
"""

from __future__ import annotations

import torch

from llava.method import Method, register
from llava.ops import NUMERICS_OPTION
from llava.ops import check_numerics, per_unit_selection, scale_layers
from llava.selection import Selection

#: The official schedule for an average budget of 32: (dominant, contextual) entering the LLM, then
#: kept after layers 8, 16, 24 (README and all nine eval scripts of the official code).
OFFICIAL_32 = ((42, 6), (30, 5), (22, 4), (16, 3))
LAYERS_32 = (8, 16, 24)

#: official dtype of the stage-0 scores, key metric and merge (the fp32 CLIP tower)
OFFICIAL_TOWER_DTYPE = torch.float32
#: official dtype of the LLM stages' probabilities, means, key metric and similarity under the official builder
#: (the fp16 LLM); the method passes the run's own, ``sig.hidden.dtype``
OFFICIAL_LLM_DTYPE = torch.float16


def _split_targets(x: torch.Tensor, contextual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the rows of ``x`` (the R remaining tokens, in order) into VisionZip's uniform targets
    (positions 0, s, 2s, ... of the remaining list, the first C; s = max(1, R // C), as
    :func:`llava.ops.uniform_targets`) and the other rows, in order. Views where possible: strided
    slices, no index tensor (at most a copy and a concatenation for the others)."""
    r = x.shape[0]
    if contextual <= 0 or r <= 0:
        return x[:0], x
    step = max(1, r // contextual)
    if step == 1:  # the first min(C, R) rows are the targets
        return x[:contextual], x[contextual:]
    # R >= 2C: exactly C targets, one at the head of each block of ``step`` rows
    blocks = x[: contextual * step].unflatten(0, (contextual, step))
    others = blocks[:, 1:].flatten(0, 1)
    if r > contextual * step:
        others = torch.cat([others, x[contextual * step:]])
    return blocks[:, 0], others


def _merge(unit_metric: torch.Tensor, rest: torch.Tensor, contextual: int, assign: torch.Tensor,
           offset: int = 0) -> torch.Tensor:
    """VisionZip's contextual tokens over the ``rest`` token indices (ascending): the uniform targets,
    every other token joined to its most cosine-similar target (argmax, ties to the lowest slot), as
    :func:`llava.ops.contextual_merge` with ``metric`` already normalised (``unit_metric``, rows =
    all tokens). Writes the slots (+ ``offset``) into ``assign`` in place; returns the targets."""
    targets, others = _split_targets(rest, contextual)
    if others.numel() and targets.numel():
        sim = unit_metric[others] @ unit_metric[targets].T  # (R - C, C)
        slot = sim.argmax(dim=1)
        assign[others] = slot + offset if offset else slot
    return targets


def _normalised(metric: torch.Tensor) -> torch.Tensor:
    """Cosine-similarity metric rows: ``m / max(||m||, 1e-12)`` in fp32 (:func:`llava.ops.contextual_merge`)."""
    m = metric.float()
    return m / m.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _official_merge(metric: torch.Tensor, remaining: torch.Tensor, contextual: int, assign: torch.Tensor,
                    dtype: torch.dtype, batched: bool, offset: int = 0) -> torch.Tensor:
    """:func:`_merge` with the official numerics: ``metric`` (n, d) rows of the ``remaining`` tokens
    cast to ``dtype``, normalised without clamp (``m / m.norm()``), similarity by ``torch.bmm``
    (``batched``, the encoder stage) or ``torch.matmul`` (the LLM stages) in that dtype, ``argmax``
    (first maximum = lowest target slot). Same targets / assign convention."""
    targets, others = _split_targets(remaining, contextual)
    if targets.numel() == 0 or others.numel() == 0:
        return targets
    m = metric[remaining].to(dtype)
    m = m / m.norm(dim=-1, keepdim=True)
    m_tg, m_ot = _split_targets(m, contextual)
    m_tg = m_tg.contiguous()  # the gathered rows, as the official code multiplies them
    if batched:
        slot = torch.bmm(m_ot[None], m_tg[None].transpose(1, 2))[0].argmax(dim=1)
    else:
        slot = torch.matmul(m_ot, m_tg.T).argmax(dim=1, keepdim=True)[:, 0]
    assign[others] = slot + offset if offset else slot
    return targets


def _top_rest(scores: torch.Tensor, k: int, numerics: str, batched: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the top-``k`` scores and of the rest, each ascending. ``ours``: one stable
    descending sort (ties to the lower index, :func:`llava.ops.topk_desc`); ``official``:
    ``torch.topk`` (its tie order; ``batched``: on the (1, n) row, as the encoder stage calls it). ``k``
    clipped to the number of scores."""
    n = scores.numel()
    k = max(0, min(int(k), n))
    if numerics == "official":
        flag = torch.zeros(n, dtype=torch.uint8, device=scores.device)
        flag.index_fill_(0, scores[None].topk(k).indices[0] if batched else scores.topk(k).indices, 1)
        order = torch.sort(flag, stable=True).indices  # [rest ascending, top ascending]
        return order[n - k:], order[: n - k]
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[:k].sort().values, order[k:].sort().values


def stage0_scores(cls_attn: torch.Tensor, agg: str = "sum", numerics: str = "ours") -> torch.Tensor:
    """Stage-0 score per token: the [CLS] row (H, T) summed (official) or averaged over heads; fp32.
    ``numerics="official"``: as the official (B, H, N) slice's ``.sum(dim=1)`` in the tower dtype."""
    check_numerics("visiondrop", numerics)
    if numerics == "official":
        ca = cls_attn.to(OFFICIAL_TOWER_DTYPE)[None]
        return (ca.sum(dim=1) if agg == "sum" else ca.mean(dim=1))[0]
    ca = cls_attn.float()
    return ca.sum(0) if agg == "sum" else ca.mean(0)


def llm_stage_score(probs: torch.Tensor, visual: torch.Tensor, numerics: str = "ours",
                    dtype: torch.dtype = OFFICIAL_LLM_DTYPE) -> torch.Tensor:
    """LLM-stage score S(j) (Nv,) from ``probs`` (H, Nv, S): the visual queries' causal attention
    probabilities over all S tokens; ``visual`` (Nv,) the visual columns. Mean over heads, then over the
    queries, of the visual columns (fp32). ``numerics="official"``: the probabilities cast to ``dtype`` (the official
    ``query_states.dtype``: fp16 as its builder loads the LLM; the method passes the run's own), the head mean of
    the full rows, the visual columns, the query mean, in that dtype (``visiondrop_rank_drop``'s order and
    layout)."""
    check_numerics("visiondrop", numerics)
    if numerics == "official":
        return probs.to(dtype).mean(dim=0)[:, visual].mean(dim=0)
    return probs[:, :, visual].mean(0).mean(0)


def llm_stage_metric(keys: torch.Tensor, numerics: str = "ours",
                     dtype: torch.dtype = OFFICIAL_LLM_DTYPE) -> torch.Tensor:
    """LLM-stage merge metric (Nv, d) from the RoPE-rotated keys (Nv, H_kv, d): head mean in fp32, or
    (``numerics="official"``) the keys in ``dtype`` (fp16 as the official builder loads the LLM; the method passes
    the run's own) and the head mean in it (``cur_key_states.mean(0)``)."""
    check_numerics("visiondrop", numerics)
    if numerics == "official":
        return keys.to(dtype).transpose(0, 1).mean(dim=0)
    return keys.float().mean(1)


def _round(x: float) -> int:
    return int(x + 0.5)


def image_schedule(budget: int) -> tuple[tuple[int, int], ...]:
    """Per image / crop: the official 32-token schedule scaled linearly by budget / 32 (exact for
    64 / 128 / 192: 84+12, 60+10, 44+8, 32+6 ...; our design beyond 32, docs/methods/visiondrop.md)."""
    f = budget / 32
    return tuple((_round(d * f), _round(c * f)) for d, c in OFFICIAL_32)


def video_schedule(per_frame: int, frames: int = 8) -> tuple[tuple[int, int], ...]:
    """Video-LLaVA (our design, docs/methods/visiondrop.md): stage 0 keeps 3a per frame; the LLM stages act on
    all frames together with totals ~ frames x (a/2, 0.3 a, 0.2 a) rounded to multiples of
    ``frames`` so that the four stage groups average exactly a per frame; contextual share 1/8.
    Returns stage 0 per frame, then the totals after each LLM stage."""
    a = per_frame
    s0 = 3 * a
    t1 = frames * _round(a / 2)
    t2 = frames * _round(0.3 * a)
    t3 = 4 * frames * a - frames * s0 - t1 - t2
    if t3 <= 0:
        raise ValueError(f"visiondrop: per-frame budget {a} too small for the video schedule")
    split = lambda t: (t - max(1, _round(t / 8)), max(1, _round(t / 8)))  # noqa: E731
    return (split(s0),) + tuple(split(t) for t in (t1, t2, t3))


def stage0_unit(a: torch.Tensor, keys: torch.Tensor, cand: torch.Tensor, cls_idx: torch.Tensor, dominant: int,
                contextual: int, n: int, numerics: str = "ours", assign: torch.Tensor | None = None,
                offset: int = 0, metric: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One unit of the encoder stage. a: (n,) [CLS] attention; cand: the unit's patch indices
    (ascending); cls_idx: its [CLS] index ((1,) or empty). Returns (dominant [CLS first, then
    ascending], targets, assign over n). ``numerics="official"``: ``torch.topk`` and the official
    fp32 bmm assignment. For the per-sample loop: ``assign`` (n,) is written in place with the slots
    + ``offset`` (the targets of the units before), ``metric`` = the sample's keys already normalised."""
    check_numerics("visiondrop", numerics)
    if assign is None:
        assign = torch.full((n,), -1, dtype=torch.long, device=keys.device)
    scores = a[cand]
    if numerics == "official":
        scores = scores.to(OFFICIAL_TOWER_DTYPE)
    top, rest = _top_rest(scores, dominant - cls_idx.numel(), numerics, batched=True)  # [CLS] is never a candidate
    top, rest = cand[top], cand[rest]
    dom = torch.cat([cls_idx, top]) if cls_idx.numel() else top
    if numerics == "official":
        targets = _official_merge(keys, rest, contextual, assign, OFFICIAL_TOWER_DTYPE, batched=True, offset=offset)
    else:
        targets = _merge(_normalised(keys) if metric is None else metric, rest, contextual, assign, offset)
    return dom, targets, assign


def llm_stage_select(score: torch.Tensor, keys: torch.Tensor, dominant: int, contextual: int,
                     numerics: str = "ours", dtype: torch.dtype = OFFICIAL_LLM_DTYPE) -> Selection:
    """One LLM stage over the Nv current visual tokens: top-``dominant`` by score kept in current
    order, the rest merged into ``contextual`` tokens by key similarity (target + mean); ``keys`` is
    the (Nv, d) merge metric. ``numerics="official"``: ``torch.topk`` and the official matmul assignment
    in ``dtype`` (metric cast to it, unclamped normalisation): the official LLM's, fp16 under its builder, fp32
    in an fp32 run (the method passes the run's own)."""
    check_numerics("visiondrop", numerics)
    n = score.numel()
    keep, rest = _top_rest(score, dominant, numerics)
    assign = torch.full((n,), -1, dtype=torch.long, device=score.device)
    if numerics == "official":
        targets = _official_merge(keys, rest, contextual, assign, dtype, batched=False)
    else:
        targets = _merge(_normalised(keys), rest, contextual, assign)
    if targets.numel() == 0:
        return Selection(keep=keep)
    if numerics == "official":  # the official one-hot matmul in the model's dtype, / counts, + target: its roundings
        return Selection(keep=keep, targets=targets, assign=assign, rule="target_plus_mean", arithmetic="sequential")
    return Selection(keep=keep, targets=targets, assign=assign, rule="target_plus_mean")


@register
class VisionDrop(Method):
    """VisionDrop. ``budget``: average visual tokens over the LLM layers per image / crop / frame."""

    name = "visiondrop"
    llm_reads = ("next",)  # the stage layer's attention and keys
    capturable = "full"  # its llm stages are captured per segment (llava.fast.llm)
    vision_stage = True
    needs_vision_attention = True
    position_mode = "reindex"

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            "position_mode": "reindex",
            "layer_list": LAYERS_32,  # stated for 32-layer LLMs; scaled to other depths
            "schedule": None,  # explicit ((D0, C0), (D1, C1), (D2, C2), (D3, C3)) per image / crop
            "cls_token": True,  # official: the [CLS] is one of the stage-0 dominant tokens and enters the LLM
            "encoder_head_agg": "sum",  # official: heads summed (same ranking as mean)
            "merge": True,  # False: pure selection at every stage (ablation; contextual slots go to dominant)
            "next_order": "grid_raster",  # official NeXT re-assembly; "unit" = per crop [dominant, contextual]
            "keep_newlines": True,  # LLaVA-NeXT 'spatial_unpad' newlines at stage 0 (official runs 'spatial')
            # "ours" (fp32 scores / metrics, ties to the lower index) or "official" (reference mode: fp32
            # tower stage, fp16 LLM stages, torch.topk, unclamped bmm / matmul similarity; see module doc)
            "numerics": NUMERICS_OPTION,
        }

    def __init__(self, budget=None, **options):
        if budget is None:
            raise ValueError("visiondrop: a budget (average tokens per image / crop / frame) is required")
        super().__init__(budget, **options)
        if self.schedule is not None and len(self.schedule) != len(self.layer_list) + 1:
            raise ValueError("visiondrop: schedule needs one (D, C) pair per stage (encoder + each LLM layer)")

    def setup(self, *, num_layers, num_vision_layers, family):
        super().setup(num_layers=num_layers, num_vision_layers=num_vision_layers, family=family)
        self._layers = scale_layers(self.layer_list, num_layers)
        self.include_cls_candidates = bool(self.cls_token) and family != "video_llava"
        if family == "video_llava" and self.schedule is None:
            self._sched, self._video = video_schedule(self.budget), True
        else:
            self._sched, self._video = (tuple(self.schedule) if self.schedule else image_schedule(self.budget)), False
        if not self.merge:
            self._sched = tuple((d + c, 0) for d, c in self._sched)

    @property
    def llm_layers(self):
        return self._layers

    def stage_counts(self, n_units: int) -> list[tuple[int, int]]:
        """(D, C) for the whole sample at each LLM stage (stage 0 is per unit)."""
        return [s if self._video else (s[0] * n_units, s[1] * n_units) for s in self._sched[1:]]

    def select_vision(self, sig):
        n = sig.num_tokens
        dev = sig.unit.device
        d0, c0 = self._sched[0]
        lay = sig.unit_layout(patch=True, stock=True, pos=True)  # planned on the fast path, else one host read
        if all(d0 + c0 >= lay.num_stock[u] for u in range(lay.num_units)):
            return Selection(keep=torch.arange(sig.num_stock, device=dev))  # every unit fits: unpruned entry
        a = stage0_scores(sig.cls_attn, self.encoder_head_agg, self.numerics)
        metric = _normalised(sig.keys) if self.numerics == "ours" else None  # once per sample, not per unit
        per_unit, assign, n_tgt = [], torch.full((n,), -1, dtype=torch.long, device=dev), 0
        for u in range(lay.num_units):
            cls_idx = lay.cls[u] if self.cls_token else lay.cls[u][:0]
            cand = lay.patches[u][: lay.num_patch_stock[u]]  # the unit's stock patches
            dom, tg, _ = stage0_unit(a, sig.keys, cand, cls_idx, d0, c0, n, self.numerics, assign=assign,
                                     offset=n_tgt, metric=metric)
            n_tgt += tg.numel()
            per_unit.append((u, dom, tg))
        newlines = lay.newlines if self.keep_newlines else lay.newlines[:0]
        mode = "grid_raster" if self.next_order == "grid_raster" else "unit"
        return per_unit_selection(per_unit, newlines, assign, lay.unit_pos, sig.patch, mode, grid=lay.grid,
                                  captured=sig.captured)

    def _num_units(self, sig) -> int:
        """The sample's units, read once per prefill and kept in ``sig.state`` for the later stages."""
        if "visiondrop_units" not in sig.state:
            sig.state["visiondrop_units"] = sig.vision.num_units if sig.vision is not None else 1
        return sig.state["visiondrop_units"]

    def select_llm(self, stage, sig):
        n_units = self._num_units(sig)
        d, c = self.stage_counts(n_units)[stage]
        if sig.num_visual <= d + c:
            return Selection(keep=torch.arange(sig.num_visual, device=sig.visual.device))
        p = sig.attention("visual", layer="next")  # (H, Nv, S): visual queries -> all keys
        score = llm_stage_score(p, sig.visual, self.numerics, dtype=sig.hidden.dtype)  # the run's dtype
        keys = llm_stage_metric(sig.keys("next", rope=True)[sig.visual], self.numerics,
                                dtype=sig.hidden.dtype)  # (Nv, d) head mean, rotated
        return llm_stage_select(score, keys, d, c, self.numerics, dtype=sig.hidden.dtype)  # the run's dtype
