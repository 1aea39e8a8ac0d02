"""VisionTrim (ICLR 2026, arXiv 2601.22674, "VisionTrim: Unified Vision Token Compression for Training-Free
MLLM Acceleration"): per image / crop / frame keep the *dominant* tokens (DVTS: [CLS] attention + the
attention each patch receives), then pick a few more tokens by their similarity to the question and merge
every remaining token into them along the text (TGVC); pre-LLM.

Official code: hanxunyu/VisionTrim at commit 22b686d (the model code was deleted from the repository at
5e299c0; HEAD 5590673 has none), ``llava/model/multimodal_encoder/clip_encoder.py``
``CLIPVisionTower.token_prune_visiontrim`` (line 393, called by ``forward(method="VisionTrim")`` from
``llava_arch.py`` ``encode_images`` with ``DVTS_token_num`` / ``TGVC_token_num`` and the question string
``original_qs``, ``llava_llama.py`` / ``eval/model_vqa_loader.py``). Our own implementation of what that
function computes; docs/methods/visiontrim.md.

Algorithm, per unit of n patches (official n = 576, the select layer -2 = ``attentions[-2]``), budget
B = D + C (``DVTS_token_num`` D, ``TGVC_token_num`` C; official defaults 48 + 16):

DVTS (option ``dvts_score="code"``, what the released code runs):
1. a_j = head-mean [CLS] -> patch j attention; r_j = head-mean attention patch j receives from the other
   patches (column sum without the [CLS] query row and without the diagonal, / (n - 1));
2. m = alpha a / |a| + (1 - alpha) r / |r| (L2 over the unit's patches, alpha = 0.5);
3. dominant = top-D of m, in ascending index order.
(``dvts_score="global_local"``: the abstract's "global-local view" as the code writes it in helpers whose
result it overwrites: m = variance-weighted softmax(a) and softmax(LTAM), LTAM the local affinity of each
patch to its window x window neighbours in feature and grid position; :func:`local_affinity`.)

TGVC (text-guided complement; active in the released code):
4. the other n - D patches (ascending) O, their comparison-space rows E (official: CLIP
   ``visual_projection`` of the select-layer features; ``text="llm"``: the projected LLM-input rows);
   text rows T (official: CLIP text tower's per-token ``last_hidden_state`` -> ``text_projection`` of the
   question; ``text="llm"``: the question's LLM input embeddings); hats = L2-normalised;
5. s_o = mean_t <T^_t, E^_o>; targets = top-C of s (ascending); the rest R is merged into them:
6. ``vtc_times`` (official 3) rounds: c^ = normalised comparison rows of the current targets; each h in R
   joins argmax_c sum_t <E^_h, T^_t><T^_t, c^_c> (its text-mediated similarity); every target adds the
   mean of its members: V_c <- V_c + mean(V_members) (vision space; the members stay the same tokens and
   are re-assigned each round against the updated targets);
7. output [dominant (ascending)..., complement (ascending)...] -> projector -> LLM.

Numerics (option ``numerics``): ``"ours"`` (default): fp32, F.normalize with its 1e-12 floor, ties to the
lower index (stable sorts, first argmax), the logit scale and the row normalisation of the assignment
metric dropped (positive factors: the same ranking). ``"official"`` (reference mode): the official
arithmetic in the official model's dtype, the run's own (the LLM's): fp16 as the official builder casts the
whole tower, its CLIP model and text tower to float16, fp32 in a model cast to fp32 as the official code then
computes: the [CLS] row cast to that dtype and head-averaged there, the received term in it,
``F.normalize`` / sums in it, ``torch.topk`` (official tie order), the similarities multiplied by CLIP's
``logit_scale.exp()`` (the parameter cast, exp in that dtype) and the assignment metric divided by its row
norm (fp16 overflow included), the one-hot merge in it; with ``text="clip"`` the CLIP text tower runs in it
too, and the question is cut where the official ``truncation=True`` cuts it (the CLIP tokenizer's
``model_max_length``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from llava.clip_route import ClipTextRoute
from llava.families import registry
from llava.method import Method, register
from llava.ops import NUMERICS_OPTION
from llava.ops import check_numerics, device_ints, unit_layout
from llava.options import Option
from llava.selection import Selection

#: the CLIP-tower families (a [CLS] token and its attention: llava.families.registry's ``tower``), asked at each use
SUPPORTED_FAMILIES = registry.where(tower="clip")
TEXT_MODES = ("llm", "clip")
DVTS_SCORES = ("code", "global_local")
RECEIVED_QUERIES = ("patches", "all")
CLS_TOKEN_MODES = ("drop", "keep")
#: dtype of every official signal: the VisionTrim builder casts the tower (and its CLIP model / text tower) to fp16
OFFICIAL_DTYPE = torch.float16
#: CLIP ViT-L/14's ``logit_scale.exp()`` (the official similarities' factor; fp16 in the reference mode)
CLIP_LOGIT_SCALE = 100.0
CLIP_TEXT_LEN = 77
REFUSAL = ("VisionTrim's DVTS reads the select layer's [CLS] attention row and the attention each patch receives "
           "(Method.vision_attention_layers), which the engine computes for the CLIP towers of "
           f"{', '.join(SUPPORTED_FAMILIES)} only (Qwen2.5-VL / Qwen3-VL's ViT, OneVision's SigLIP and InternViT "
           "give no such pair of signals)")


# ------------------------------------------------------------------------------------------- budget


def split_budget(budget: int, tgvc_tokens: int | None = None) -> tuple[int, int]:
    """(D, C) for a unit budget B: C = ``tgvc_tokens`` (capped at B) or B // 4 (our rule; it gives the
    official loader default 48 + 16 at B = 64, then 96 + 32 at 128, 144 + 48 at 192), D = B - C."""
    c = budget // 4 if tgvc_tokens is None else min(int(tgvc_tokens), budget)
    return budget - c, c


# ------------------------------------------------------------------------------------------- DVTS


def received_from_patches(recv: torch.Tensor, cls_row: torch.Tensor, num_queries: int,
                          queries: str = "patches") -> torch.Tensor:
    """The received-attention term r (..., n) from the engine's signals of one layer, head-averaged:
    ``recv`` (H, ..., n) the mean over all ``num_queries`` query rows ([CLS] included) per head,
    ``cls_row`` (H, ..., n) the [CLS] row. ``"patches"`` (official): the [CLS] query removed,
    (S recv - cls) / (S - 2); the diagonal (a patch's attention to itself), which the official code also
    removes, stays in (the engine gives no diagonal): r = official r + mean_h A_h[j, j] / (n - 1).
    ``"all"``: the engine's column mean as it is."""
    if queries == "all":
        return recv.float().mean(0)
    s = num_queries
    return (s * recv.float() - cls_row.float()).mean(0) / max(s - 2, 1)


def dvts_code_score(a: torch.Tensor, r: torch.Tensor, alpha: float = 0.5, numerics: str = "ours",
                    official_dtype: torch.dtype = OFFICIAL_DTYPE) -> torch.Tensor:
    """m = alpha a / |a| + (1 - alpha) r / |r| over the last dim (B, n). ``official``: a, r in
    ``official_dtype`` (the official model's: fp16 under its builder) and ``F.normalize`` there."""
    if numerics == "official":
        a, r = a.to(official_dtype), r.to(official_dtype)
        return alpha * F.normalize(a, dim=-1) + (1 - alpha) * F.normalize(r, dim=-1)
    return alpha * F.normalize(a.float(), dim=-1) + (1 - alpha) * F.normalize(r.float(), dim=-1)


def local_affinity(feats: torch.Tensor, rows: int, cols: int, window: int = 3, w1: float = 1.0, w2: float = 1.0,
                   w3: float = 0.5, patch: torch.Tensor | None = None) -> torch.Tensor:
    """LTAM (the official ``build_token_affinity``), vectorised: feats (B, n, C) of the patches at grid indices
    ``patch`` (B, n) (row-major on a rows x cols grid; None: the full grid 0..n-1). For patch p and each
    neighbour q present in its window (itself included):
    kappa = -|f_p - f_q|^2 / (w1 var(F)) - w3 |pos_p - pos_q|^2 / (w2 var(P)), var(F) the unbiased variance
    of all the unit's feature values, var(P) that of its 2n grid coordinates; importance = softmax over the
    unit of sum(kappa) / window^2 (the official mean over window^2 slots, empty slots 0). fp32. (A NeXT
    'spatial_unpad' crop lacks some grid cells: they count as outside the grid; our extension.)"""
    b, n, c = feats.shape
    dev = feats.device
    if patch is None:
        if n != rows * cols:
            raise ValueError(f"visiontrim: LTAM needs a full {rows}x{cols} patch grid, got {n} patches")
        patch = torch.arange(n, device=dev).expand(b, n)
    f = feats.float()
    var_f = f.reshape(b, -1).var(dim=1)  # (B,)
    var_p = torch.cat([patch // cols, patch % cols], dim=1).float().var(dim=1)  # (B,)
    grid = torch.zeros(b, rows * cols, c, device=dev).scatter_(1, patch[..., None].expand(b, n, c), f)
    grid = grid.reshape(b, rows, cols, c)
    present = torch.zeros(b, rows * cols, device=dev).scatter_(1, patch, 1.0).reshape(b, rows, cols)
    pad = window // 2
    total = torch.zeros(b, rows, cols, device=dev)
    for di in range(-pad, pad + 1):
        for dj in range(-pad, pad + 1):
            # neighbour (i + di, j + dj) of every (i, j) where it lies in the grid
            i0, i1 = max(0, -di), min(rows, rows - di)
            j0, j1 = max(0, -dj), min(cols, cols - dj)
            if i0 >= i1 or j0 >= j1:
                continue
            here = grid[:, i0:i1, j0:j1]
            there = grid[:, i0 + di:i1 + di, j0 + dj:j1 + dj]
            k_feat = -((here - there) ** 2).sum(-1) / (w1 * var_f[:, None, None])
            k_pos = -float(di * di + dj * dj) / (w2 * var_p[:, None, None])
            total[:, i0:i1, j0:j1] += (k_feat + w3 * k_pos) * present[:, i0 + di:i1 + di, j0 + dj:j1 + dj]
    return torch.softmax(total.reshape(b, -1).gather(1, patch) / (window * window), dim=-1)


def combine_adaptive(a: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """The official ``combine_importance(method='adaptive')``: softmax both over the unit, weight each by
    the other's (unbiased) variance: (var_l softmax(a) + var_a softmax(l)) / (var_a + var_l). fp32."""
    pa, pl = torch.softmax(a.float(), dim=-1), torch.softmax(local.float(), dim=-1)
    va, vl = pa.var(dim=-1, keepdim=True), pl.var(dim=-1, keepdim=True)
    return (vl * pa + va * pl) / (va + vl)


def _top_ascending(score: torch.Tensor, k: int, official: bool) -> torch.Tensor:
    """(B, k) indices of the k largest per row, ascending; ties: lower index (ours) / ``torch.topk``."""
    if official:
        idx = torch.topk(score, k, dim=-1).indices
    else:
        idx = torch.sort(score.float(), dim=-1, descending=True, stable=True).indices[:, :k]
    return idx.sort(dim=-1).values


def _complement(idx: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n - k) the indices 0..n-1 not in ``idx`` (B, k), ascending (a stable sort, no boolean index)."""
    taken = torch.zeros(idx.shape[0], n, dtype=torch.uint8, device=idx.device).scatter_(1, idx, 1)
    return torch.sort(taken, dim=-1, stable=True).indices[:, :n - idx.shape[1]]


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx[..., None].expand(*idx.shape, x.shape[-1]))


# ------------------------------------------------------------------------------------------- TGVC


def tgvc(values: torch.Tensor, embeds: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None, c: int, *,
         vtc_times: int = 3, embed_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
         logit_scale: float = CLIP_LOGIT_SCALE, numerics: str = "ours",
         official_dtype: torch.dtype = OFFICIAL_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-guided complement of a batch of units. values (B, R, Dv) the vision-space rows of the R
    candidates (the patches DVTS left, ascending), embeds (B, R, De) their comparison-space rows, text
    (L, De) the text rows, text_mask (L,) bool (None: all). ``embed_fn``: recompute a target's comparison
    row from its updated vision row each round (official, a linear CLIP ``visual_projection``); None:
    update it like the vision row (target + mean of its members' rows; our ``text="llm"`` route, the
    projector being non-linear and not a signal). Returns (targets (B, c) indices into R ascending, their
    merged vision rows (B, c, Dv) fp32). ``official_dtype``: the reference mode's arithmetic (the official
    model's dtype)."""
    b, r, _ = values.shape
    c = min(int(c), r)
    if c <= 0:
        return values.new_zeros((b, 0), dtype=torch.long), values.new_zeros((b, 0, values.shape[-1])).float()
    if numerics == "official":
        return _tgvc_official(values, embeds, text, text_mask, c, vtc_times, embed_fn, logit_scale, official_dtype)
    e = F.normalize(embeds.float(), dim=-1)
    w = (torch.ones(text.shape[0], device=text.device) if text_mask is None
         else text_mask.to(device=text.device, dtype=torch.float32))
    t = F.normalize(text.float(), dim=-1) * w[:, None]  # padded / non-question rows: zero, no boolean index
    et = e @ t.T  # (B, R, L)
    score = et.sum(-1) / w.sum().clamp(min=1)  # mean over the real text rows
    tgt = _top_ascending(score, c, official=False)  # (B, c)
    rest = _complement(tgt, r)  # (B, R - c)
    v = values.float()
    tv = _gather(v, tgt)
    te = None if embed_fn is not None else _gather(embeds.float(), tgt)
    hv, ht = _gather(v, rest), _gather(et, rest)  # members: vision rows, their text similarities
    he = None if embed_fn is not None else _gather(embeds.float(), rest)
    for _ in range(vtc_times):
        ce = embed_fn(tv).float() if embed_fn is not None else te
        tc = t @ F.normalize(ce, dim=-1).transpose(1, 2)  # (B, L, c)
        metric = ht @ tc  # (B, R - c, c): sum_t <e_h, t><t, c>
        # first maximum; a scatter, not F.one_hot (which reads the indices' range back to the host)
        hot = torch.zeros_like(metric).scatter_(2, metric.argmax(-1, keepdim=True), 1.0)
        counts = hot.sum(1).clamp(min=1)[..., None]  # (B, c, 1)
        tv = tv + hot.transpose(1, 2) @ hv / counts
        if embed_fn is None:
            te = te + hot.transpose(1, 2) @ he / counts
    return tgt, tv


def _tgvc_official(values, embeds, text, text_mask, c, vtc_times, embed_fn, logit_scale, dt=OFFICIAL_DTYPE):
    """Reference mode of :func:`tgvc`: the official ops in the official order and in the official model's dtype
    ``dt`` (fp16 under its builder; ``torch.topk``, the logit scale, the assignment metric divided by its row
    norm, the one-hot merge in ``dt``). Eager only (it indexes the real text rows by a boolean mask)."""
    t = text if text_mask is None else text[text_mask.to(text.device)]
    tn = F.normalize(t.to(dt), dim=-1)  # (L, De)
    scale = torch.tensor(logit_scale, dtype=dt, device=values.device)
    v = values.to(dt)
    e = embed_fn(v).to(dt) if embed_fn is not None else embeds.to(dt)
    en = F.normalize(e, dim=-1)
    score = (tn @ en.transpose(1, 2) * scale).mean(dim=1)  # (B, R): mean over the text rows
    tgt = torch.topk(score, c, dim=1).indices.sort(dim=1).values
    rest = _complement(tgt, v.shape[1])
    tv, hv = _gather(v, tgt), _gather(v, rest)
    te = None if embed_fn is not None else _gather(e, tgt)
    he = None if embed_fn is not None else _gather(e, rest)
    for _ in range(vtc_times):
        cn = F.normalize(embed_fn(tv).to(dt) if embed_fn is not None else te, dim=-1)
        t2c = tn @ cn.transpose(1, 2) * scale  # (B, L, c)
        hn = F.normalize(embed_fn(hv).to(dt) if embed_fn is not None else he, dim=-1)
        h2t = hn @ tn.T * scale  # (B, R - c, L)
        m = h2t @ t2c
        m = m / m.norm(dim=-1, keepdim=True)
        hot = torch.zeros(*m.shape, dtype=dt, device=m.device).scatter_(2, m.argmax(dim=2)[..., None], 1)
        counts = hot.sum(dim=1).clamp(min=1)[..., None]
        tv = tv + hot.transpose(1, 2) @ hv / counts
        if embed_fn is None:
            te = te + hot.transpose(1, 2) @ he / counts
    return tgt, tv.float()


# ------------------------------------------------------------------------------------------- one sample


def visiontrim_units(a: torch.Tensor, r: torch.Tensor, values: torch.Tensor, embeds: torch.Tensor,
                     text: torch.Tensor, text_mask: torch.Tensor | None, d: int, c: int, *,
                     grid: tuple[int, int] | None = None, patch: torch.Tensor | None = None,
                     dvts_score: str = "code", alpha: float = 0.5, ltam_window: int = 3, vtc_times: int = 3,
                     embed_fn=None, logit_scale: float = CLIP_LOGIT_SCALE, numerics: str = "ours",
                     official_dtype: torch.dtype = OFFICIAL_DTYPE,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DVTS + TGVC on a batch of B units of n patches each (raster order): a (B, n) head-mean [CLS] row,
    r (B, n) received term, values (B, n, Dv) select-layer features, embeds (B, n, De) comparison rows,
    patch (B, n) their grid indices (``global_local`` only; None: the full grid).
    Returns (dominant (B, d) ascending, targets (B, c) ascending, the dominant rows (B, d, Dv) and the
    merged targets' rows (B, c, Dv)); indices local to the unit. ``official_dtype``: the reference mode's
    arithmetic."""
    official = numerics == "official"
    n = a.shape[1]
    if dvts_score == "code":
        m = dvts_code_score(a, r, alpha, numerics, official_dtype)
    else:
        rows, cols = grid
        m = combine_adaptive(a, local_affinity(values, rows, cols, ltam_window, patch=patch))
    dom = _top_ascending(m, d, official)
    others = _complement(dom, n)
    dv = _gather(values.to(official_dtype) if official else values, dom).float()
    if c <= 0 or others.shape[1] == 0:
        return dom, others[:, :0], dv, values.new_zeros((a.shape[0], 0, values.shape[-1])).float()
    tgt, tv = tgvc(_gather(values, others), _gather(embeds, others), text, text_mask, c, vtc_times=vtc_times,
                   embed_fn=embed_fn, logit_scale=logit_scale, numerics=numerics, official_dtype=official_dtype)
    return dom, others.gather(1, tgt), dv, tv


def visiontrim(cls_attn: torch.Tensor, recv: torch.Tensor, vision_features: torch.Tensor, embeds: torch.Tensor,
               text: torch.Tensor, text_mask: torch.Tensor | None, unit: torch.Tensor, patch: torch.Tensor,
               budget: int, *, grid: tuple[int, int] | None = None, tgvc_tokens: int | None = None,
               dvts_score: str = "code", alpha: float = 0.5, received_queries: str = "patches",
               ltam_window: int = 3, vtc_times: int = 3, cls_token: str = "drop", embed_fn=None,
               logit_scale: float = CLIP_LOGIT_SCALE, numerics: str = "ours", layout=None,
               received: torch.Tensor | None = None, official_dtype: torch.dtype | None = None) -> Selection:
    """VisionTrim's selection for one sample: per unit ``budget`` = D + C outputs (:func:`split_budget`).

    cls_attn (H, T) / recv (H, T): the select layer's [CLS] row and received attention (mean over all
    query rows) per head; ``received`` (T,): instead of ``recv``, the official received term itself (the
    engine's ``received_patches`` signal: head mean per entry, the [CLS] query and the diagonal left out; the
    reference mode reads it in the tower's fp16, as the official code); vision_features (T, Dv); embeds (T, De)
    comparison rows; text (L, De) / text_mask;
    unit (T,) (-1 = NeXT newline); patch (T,) (-1 = [CLS] / newline). A unit with at most ``budget``
    tokens is kept whole; when every unit is, the selection keeps everything (the identity). Otherwise
    the outputs are computed here (``Selection.values``, vision space): per unit ([CLS] when
    ``cls_token="keep"``,) dominant (ascending), complement (ascending); NeXT newline tokens are dropped
    (an output is projected from vision features; a newline has none). ``keep`` / ``targets`` give each
    output's provenance (targets: the complement tokens; ``assign`` all -1). ``official_dtype``: the reference
    mode's arithmetic, the official model's dtype (None: fp16, what its builder casts to; the method passes the
    run's own dtype, the LLM's, as the official model after ``.float()`` computes in fp32)."""
    check_numerics("visiontrim", numerics)
    official = numerics == "official"
    odt = OFFICIAL_DTYPE if official_dtype is None else official_dtype
    dev = unit.device
    lay = layout if layout is not None else unit_layout(unit, patch)  # host read (none when planned)
    plan = []  # per unit: (forced [CLS], patch candidates, d, c) or None when kept whole
    for u in range(lay.num_units):
        if budget >= lay.tokens[u].numel():
            plan.append(None)
            continue
        forced = lay.cls[u] if cls_token == "keep" else lay.cls[u][:0]
        cand = lay.patches[u]
        k = budget - int(forced.numel())
        whole = k >= cand.numel() and forced.numel() == lay.cls[u].numel()  # nothing dropped
        plan.append(None if whole else (forced, cand, *split_budget(max(k, 0), tgvc_tokens)))
    if all(p is None for p in plan):
        return Selection(keep=torch.arange(unit.numel(), device=dev))
    a_all = cls_attn.to(odt).mean(0) if official else cls_attn.float().mean(0)
    groups: dict[tuple[int, int, int], list[int]] = {}
    for u, p in enumerate(plan):
        if p is not None and p[2] + p[3] > 0 and p[1].numel() > p[2] + p[3]:
            groups.setdefault((int(p[1].numel()), min(p[2], p[1].numel()), p[3]), []).append(u)
    out: dict[int, tuple] = {}
    for (n, d, c), units in groups.items():
        cand = torch.stack([plan[u][1] for u in units])  # (B, n) ascending = raster order
        a = a_all[cand]
        r = (received[cand] if received is not None
             else received_from_patches(recv[:, cand], cls_attn[:, cand], n + 1, received_queries))
        dom, tgt, dv, tv = visiontrim_units(
            a, r, vision_features[cand], embeds[cand], text, text_mask, d, c, grid=grid, patch=patch[cand],
            dvts_score=dvts_score,
            alpha=alpha, ltam_window=ltam_window, vtc_times=vtc_times, embed_fn=embed_fn, logit_scale=logit_scale,
            numerics=numerics, official_dtype=odt)
        for i, u in enumerate(units):
            out[u] = (cand[i][dom[i]], cand[i][tgt[i]], dv[i], tv[i])
    vf = vision_features.to(odt).float() if official else vision_features.float()
    keep, kvals, targets, tvals, order_plan = [], [], [], [], []
    for u, p in enumerate(plan):
        if p is None:  # kept whole ([CLS] included)
            keep.append(lay.tokens[u])
            kvals.append(vf[lay.tokens[u]])
            order_plan.append((int(lay.tokens[u].numel()), 0))
            continue
        forced, cand, d, c = p
        if u in out:
            dom_i, tgt_i, dv, tv = out[u]
        else:  # every patch fits in D + C (or the budget holds only the [CLS]): no merge
            dom_i, tgt_i, dv, tv = cand[:max(d + c, 0)], cand[:0], vf[cand[:max(d + c, 0)]], vf[:0]
        keep += [forced, dom_i]
        kvals += [vf[forced], dv]
        targets.append(tgt_i)
        tvals.append(tv)
        order_plan.append((int(forced.numel()) + int(dom_i.numel()), int(tgt_i.numel())))
    keep_t, tgt_t = torch.cat(keep), torch.cat(targets)
    values = torch.cat(kvals + tvals)
    order, ko, to = [], 0, keep_t.numel()
    for nk, nt in order_plan:  # per unit: its kept tokens, then its complement tokens
        order += list(range(ko, ko + nk)) + list(range(to, to + nt))
        ko, to = ko + nk, to + nt
    order_t = None if order == list(range(len(order))) else device_ints(order, dev)  # kernels: capturable
    targets_t = assign = None
    if tgt_t.numel():
        targets_t = tgt_t
        assign = torch.full((unit.numel(),), -1, dtype=torch.long, device=dev)
    return Selection(keep=keep_t, targets=targets_t, assign=assign, values=values, space="vision", order=order_t)


# ------------------------------------------------------------------------------------------- the method


@register
class VisionTrim(Method):
    """VisionTrim: per image / crop / frame, D dominant patches by [CLS] + received attention (DVTS) and C
    complement tokens picked by the question and merged with the remaining patches along the text (TGVC)."""

    name = "visiontrim"
    #: every count is a host int (budget split, planned layout), no device read: the prefill is captured whole
    #: with text="llm"; text="clip" (host text work) and numerics="official" run on the eager engine
    capturable = "full"
    vision_stage = True
    needs_vision_attention = True
    query_aware = True
    #: the official ``attentions[-2]`` (encoder layer 22 of 24 = hidden state -2, LLaVA's select layer)
    vision_layer = -2
    vision_attention_layers: tuple[int, ...] = (-2,)
    families = SUPPORTED_FAMILIES
    unsupported_reason = REFUSAL

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            # C, the complement (TGVC) tokens per unit; None = budget // 4 (64 -> 48 + 16, the official default)
            "tgvc_tokens": None,
            "dvts_score": Option("code", DVTS_SCORES,
                                 doc="code: released code ([CLS] + received attention); global_local: the abstract's "
                                     "global-local view (the code's unused LTAM + variance-adaptive weighting)"),
            # weight of the [CLS] term in the "code" score (official 0.5)
            "alpha": 0.5,
            "received_queries": Option("patches", RECEIVED_QUERIES,
                                       doc="received attention from the patches (official: [CLS] query removed) "
                                           "or from all queries"),
            # LTAM window (global_local only; official 3)
            "ltam_window": 3,
            # TGVC merge rounds (official 3, hard-coded over its vtc_times=1 argument)
            "vtc_times": 3,
            "text": Option("llm", TEXT_MODES,
                           doc="TGVC text: llm (ours: question LLM embeddings vs projected tokens) or clip (official: "
                               "CLIP text tower + visual_projection; needs clip_model and llm_tokenizer)"),
            "clip_model": None,
            "clip_tokenizer": None,
            "llm_tokenizer": None,
            "cls_token": Option("drop", CLS_TOKEN_MODES,
                                doc="Video-LLaVA frame [CLS]: drop (B patches-derived tokens) or keep ([CLS] + B - 1)"),
            # "ours" (fp32, stable ties) or "official" (reference mode: the official fp16 arithmetic, topk)
            "numerics": NUMERICS_OPTION,
        }

    def __init__(self, budget=None, **options):
        if budget is None:
            raise ValueError("visiontrim: a budget B = D + C (tokens per image / crop / frame) is required")
        super().__init__(budget, **options)
        t = self.tgvc_tokens
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= self.budget):
            raise ValueError(f"visiontrim: tgvc_tokens must be an int in 0..budget ({self.budget}), got {t!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ValueError(f"visiontrim: alpha must be in [0, 1], got {self.alpha!r}")
        for k in ("ltam_window", "vtc_times"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if k == "ltam_window" else 0):
                raise ValueError(f"visiontrim: {k} must be an int >= {1 if k == 'ltam_window' else 0}, got {v!r}")
        if self.text == "clip" and (self.clip_model is None or self.llm_tokenizer is None):
            raise ValueError("visiontrim: text='clip' needs clip_model (a CLIP checkpoint with its text tower, e.g. "
                             "openai/clip-vit-large-patch14-336) and llm_tokenizer (to decode the question)")
        self._clip_route = ClipTextRoute("visiontrim", self.clip_model, self.clip_tokenizer, self.llm_tokenizer)
        if self.numerics == "official":  # the official maps: the eager attention of the fp16 tower
            self.vision_attention_logits = "model"
            if self.received_queries == "patches":  # the official received term, diagonal and [CLS] query out
                self.vision_received_patch_layers = (self.vision_layer,)
                self.vision_attention_layers = ()

    def setup(self, *, num_layers, num_vision_layers, family):
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(f"visiontrim: family {family!r} is not supported: {REFUSAL}")
        super().setup(num_layers=num_layers, num_vision_layers=num_vision_layers, family=family)

    def capture_refusal(self):
        if self.text == "clip":
            return ("visiontrim: text='clip' runs on the eager engine: it decodes the question's token ids and runs a "
                    "CLIP text tower on the string (host text work inside the vision stage)")
        return super().capture_refusal()

    # -- clip route ---------------------------------------------------------------------------
    def _load_clip(self, device):
        return self._clip_route.load(device)

    def question_text(self, ids: torch.Tensor) -> str:
        return self._clip_route.question_text(ids)

    def reference_dtype(self, sig) -> torch.dtype:
        """The reference mode's arithmetic: the run's own dtype, the LLM's (``sig.features``): the official builder
        casts the tower, its CLIP model and text tower to fp16, the model's dtype in its eval scripts, and the
        official code computes in fp32 in a model cast to fp32 (``.float()``). fp32 outside the reference mode."""
        return sig.features.dtype if self.numerics == "official" else torch.float32

    def _text_tower(self, clip, dt: torch.dtype):
        """The CLIP text tower in ``dt``: the model's own when its weights are in ``dt``, else a copy cast to
        ``dt`` once (the reference mode: the official builder casts its ``CLIPTextModel`` to fp16)."""
        tower = clip.text_model
        if next(tower.parameters()).dtype == dt:
            return tower
        cache = self.__dict__.setdefault("_text_towers", {})
        key = (id(tower), dt)
        if key not in cache:
            import copy

            cache[key] = copy.deepcopy(tower).to(dt).eval()
        return cache[key]

    def text_length(self) -> int:
        """Where the question's CLIP tokens are cut: the official ``truncation=True`` cuts at the tokenizer's
        ``model_max_length`` (77 for CLIP-L), bounded by the text tower's positions."""
        tok = self._clip_route.tokenizer
        n = self._clip_route.clip.text_model.config.max_position_embeddings
        m = getattr(tok, "model_max_length", None)
        return min(int(m), n) if isinstance(m, int) and 0 < m < 1_000_000 else min(CLIP_TEXT_LEN, n)

    def clip_inputs(self, sig):
        """(embeds (T, 768), text (L, 768), embed_fn, logit scale) of the official route: ``visual_projection`` of
        the select-layer features (no post_layernorm, as the official code) and the CLIP text tower's per-token
        ``last_hidden_state`` of the question (BOS / EOS included, truncated as the official tokenizer call:
        :meth:`text_length`) -> ``text_projection``. ``numerics="official"``: the text tower, the projections'
        weights and inputs and ``logit_scale.exp()`` in the run's dtype (:meth:`reference_dtype`; fp16 under an
        fp16 LLM: the official builder's cast)."""
        dev = sig.vision_features.device
        clip = self._load_clip(dev)
        if sig.question_ids is None:
            raise ValueError("visiontrim: text='clip' needs sig.question_ids")
        dt = self.reference_dtype(sig)
        vp = clip.visual_projection
        if vp.weight.shape[1] != sig.vision_features.shape[-1]:
            raise ValueError(f"visiontrim: the CLIP model's visual_projection takes {vp.weight.shape[1]} features, "
                             f"the tower gives {sig.vision_features.shape[-1]}")
        w = vp.weight.to(dt)

        def embed_fn(v):
            return F.linear(v.to(dt), w)

        enc = self._clip_route.tokenizer(self.question_text(sig.question_ids), truncation=True,
                                         max_length=self.text_length(), return_tensors="pt")
        official = self.numerics == "official"
        with torch.no_grad():
            text_model = self._text_tower(clip, dt) if official else clip.text_model
            h = text_model(input_ids=enc["input_ids"].to(dev)).last_hidden_state[0]
            text = F.linear(h.to(dt), clip.text_projection.weight.to(dt))
            # the official ``logit_scale.exp()`` of the cast model: the parameter in dt, exp there
            scale = float(clip.logit_scale.to(dt).exp() if official else clip.logit_scale.exp())
        return embed_fn(sig.vision_features), text, embed_fn, scale

    # -- stage --------------------------------------------------------------------------------
    def select_vision(self, sig):
        if self.text == "clip":
            embeds, text, embed_fn, scale = self.clip_inputs(sig)
            mask = None
        else:
            embeds, embed_fn, scale = sig.features, None, CLIP_LOGIT_SCALE
            text, mask = sig.text_rows("question")
        v = self.vision_layer
        return visiontrim(sig.cls_attn, sig.received_attn.get(v), sig.vision_features,
                          embeds, text, mask, sig.unit, sig.patch, self.budget, grid=sig.grid,
                          tgvc_tokens=self.tgvc_tokens, dvts_score=self.dvts_score, alpha=self.alpha,
                          received_queries=self.received_queries, ltam_window=self.ltam_window,
                          vtc_times=self.vtc_times, cls_token=self.cls_token, embed_fn=embed_fn, logit_scale=scale,
                          numerics=self.numerics, layout=sig.unit_layout(patch=True),
                          received=sig.received_patches.get(v), official_dtype=self.reference_dtype(sig))
