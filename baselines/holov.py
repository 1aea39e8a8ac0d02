"""HoloV (NeurIPS 2025, arXiv 2510.02912, "Don't Just Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual Holistic
Context Retention"): spread the budget over contiguous crops of the image's tokens in proportion to a crop score, then
keep each crop's tokens with the largest [CLS] attention; pre-LLM.

Doc: docs/methods/holov.md. Official code: obananas/HoloV at 1d2e65e (Apache-2.0), ``llava/model/utils.py``
``HoloV`` (lines 22-151), called from ``llava/model/llava_arch.py`` ``prepare_inputs_labels_for_multimodal``
(``HoloV(image_features, image_attns, num_patches=16, new_image_token_num=64)``) on the projected features and the
head-mean [CLS] attention of the select layer (``encode_images``; ``clip_encoder.py`` ``feature_select``:
``attentions[-2][:, :, 0, 1:]``, cast to the images' dtype, head mean, ``.float()``).

Algorithm, per image / crop / frame of n candidate tokens, T = ``budget`` (the official ``new_image_token_num``):

1. C = min(chunks, n) contiguous crops of the flat token list: q = n // C tokens each, the first n % C one more;
2. crop score P_c (crop of m >= 2 tokens): F = x / (|x| + eps) (projected features), S = F F^T with its diagonal
   zeroed, mu_i = sum_j S_ij / (m - 1), v_i = sum_j (S_ij - mu_i)^2 / (m - 1) (the zeroed diagonal included),
   a_i = scale * attn_i, v'_i = v_i * mean|a| / (mean|v| + eps), t_i = a_i + alpha * v'_i, P_c = mean_i t_i;
   a crop of one token: P_c = its attention, unscaled (the official special case);
3. w = P / (sum P + eps); alloc = floor(w T); the T - sum(alloc) left go one each to the crops of largest w;
4. a crop with alloc >= its size keeps all its tokens (in index order), else its alloc tokens of largest attention
   (attention-descending); a crop with alloc 0 keeps none;
5. output: the crops in order, each as in 4. The official code then pads the image's rows with zero rows up to T
   (the tokens an overflowing crop could not give) - ``overflow="pad"``, the default: zero rows in the LLM input,
   T rows per unit. ``overflow="redistribute"``: RESTORE's copy (cvlab-yonsei/RESTORE ``HoloV_with_Indices``)
   instead clamps every crop to its size and hands the deficit, one token per round, to the crops with room by
   descending w (computed here in closed form: every full round, then the partial one), T real tokens.

Since v' is rescaled to the attention's mean, P_c = mean(a) * (1 + alpha * mean(v) / (mean(v) + eps)): the crop
scores are the crops' attention means up to eps (docs/methods/holov.md). The order of the outputs (``order``):
``"official"`` (default: as the official code feeds them, crop by crop, attention-descending inside a partly kept
crop; the LLaVA engine renumbers the positions in output order, as the official one) or ``"ascending"``.

Budget: ``budget`` = T tokens entering the LLM **per image (LLaVA-1.5), per crop (LLaVA-NeXT), per frame
(Video-LLaVA)** (``overflow="pad"``: zero rows included); a unit with at most T candidates is kept whole (the
identity). ``scope="sample"``: one selection over the sample's candidates, T x units (the official NeXT call: every
crop of the image, no newline). CLIP towers only (their [CLS] attention).

No host read in the default mode: every count is a host int (the layout, T, the crop sizes), the allocation and the
selection are sorts and gathers, so the prefill is capturable. ``numerics="official"`` (reference mode, eager
engine): the attention's head mean in the model's dtype, the crop scores per crop in the official op order with the
features in the model's dtype, ``torch.topk`` for the remainder and in each crop, the allocations read on the host once
per sample (the official loop's counts).
"""

from __future__ import annotations

import torch

from llava.families import registry
from llava.method import Method, register
from llava.ops import NUMERICS_OPTION, check_numerics, unit_layout
from llava.options import Option
from llava.selection import Selection

#: the official constants (``llava/model/utils.py`` ``HoloV``: ``alpha = 0.09``, ``patch_attn * 1e3``, ``esp=1e-6``;
#: ``llava_arch.py``: ``num_patches=16``)
CHUNKS = 16
ALPHA = 0.09
ATTN_SCALE = 1000.0
EPS = 1e-6
OVERFLOW_MODES = ("pad", "redistribute")
ORDERS = ("official", "ascending")
SCOPES = ("unit", "sample")
CLS_TOKEN_MODES = ("drop", "keep")
#: the CLIP-tower families (a [CLS] token and its attention), asked at each use
SUPPORTED_FAMILIES = registry.where(tower="clip")


# --------------------------------------------------------------------------------------------------- crops
def chunk_sizes(n: int, chunks: int = CHUNKS) -> list[int]:
    """Sizes of the official crops of ``n`` tokens: min(chunks, n) crops of n // C tokens, the first n % C one more
    (the official loop skips the empty crops of n < chunks, which is the same)."""
    if n <= 0:
        return []
    c = min(int(chunks), n)
    q, r = divmod(n, c)
    return [q + 1] * r + [q] * (c - r)


def _chunk_index(n: int, sizes: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) the crop of each token and (C,) each crop's first token, by kernels only (no upload)."""
    c = len(sizes)
    q, r = n // c, n % c
    ar = torch.arange(n, device=device)
    big = r * (q + 1)
    of = torch.where(ar < big, ar // (q + 1), r + (ar - big).clamp(min=0) // q)
    cs = torch.arange(c, device=device)
    return of, cs * q + cs.clamp(max=r)


def _rank_desc(x: torch.Tensor) -> torch.Tensor:
    """0-based rank of every entry of the last dim by descending value, ties to the lower index."""
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices
    ar = torch.arange(x.shape[-1], device=x.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ar)


def chunk_scores(attn: torch.Tensor, feats: torch.Tensor, sizes: list[int], *, alpha: float = ALPHA,
                 scale: float = ATTN_SCALE, eps: float = EPS) -> torch.Tensor:
    """(B, C) crop scores P (fp32) of B units of n tokens: ``attn`` (B, n) head-mean [CLS] attention, ``feats``
    (B, n, D) projected features (normalised in fp32), ``sizes`` the crops (:func:`chunk_sizes`). Crops of equal
    size are computed together (the two sizes of the official split)."""
    B = attn.shape[0]
    attn = attn.float()
    out, start = [], 0
    for size in dict.fromkeys(sizes):  # q + 1 then q, in crop order
        count = sizes.count(size)
        end = start + size * count
        a = attn[:, start:end].reshape(B, count, size)
        if size == 1:  # the official special case: the crop's attention, unscaled
            out.append(a.mean(-1))
        else:
            x = feats[:, start:end].float().reshape(B, count, size, -1)
            f = x / (x.norm(dim=-1, keepdim=True) + eps)
            s = (f @ f.transpose(-1, -2)) * (1 - torch.eye(size, device=f.device))
            mu = s.sum(-1) / (size - 1)
            v = ((s - mu[..., None]) ** 2).sum(-1) / (size - 1)
            a = a * scale
            v = v * (a.abs().mean(-1, keepdim=True) / (v.abs().mean(-1, keepdim=True) + eps))
            out.append((a + alpha * v).mean(-1))
        start = end
    return torch.cat(out, dim=-1)


def chunk_scores_official(attn: torch.Tensor, feats: torch.Tensor, sizes: list[int], *, alpha: float = ALPHA,
                          scale: float = ATTN_SCALE, eps: float = EPS) -> torch.Tensor:
    """Reference mode of :func:`chunk_scores` for one unit: ``attn`` (n,) fp32, ``feats`` (n, D) in the model's dtype
    (the official projected features); each crop on its own, in the official op order: the normalisation and the
    similarity product in the features' dtype, then fp32 (the official mask is an fp32 ``1 - eye``). Returns (C,)."""
    out, start = [], 0
    for size in sizes:
        a, x = attn[start:start + size], feats[start:start + size]
        start += size
        if size <= 1:
            out.append(a.mean())
            continue
        f = x / (x.norm(dim=1, keepdim=True) + eps)
        s = torch.mm(f, f.transpose(0, 1)) * (1 - torch.eye(size, device=f.device))
        mu = s.sum(dim=1) / (size - 1)
        v = ((s - mu.unsqueeze(1)) ** 2).sum(dim=1) / (size - 1)
        a = a * scale
        v = v * (torch.mean(torch.abs(a)) / (torch.mean(torch.abs(v)) + eps))
        out.append((a + alpha * v).mean())
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------- allocation
def allocate(scores: torch.Tensor, sizes: list[int], k: int, *, overflow: str = "pad", eps: float = EPS,
             numerics: str = "ours") -> torch.Tensor:
    """(B, C) tokens each crop keeps, from the (B, C) crop scores, for ``k`` tokens per unit.

    w = P / (sum P + eps); floor(w k) each, the rest one each to the crops of largest w (ours: ties to the lower
    crop; ``numerics="official"``: ``torch.topk`` order). ``overflow="pad"``: each crop clamped to its size (the
    official: an overflowing crop keeps all it has, the unit then has fewer than k real tokens);
    ``"redistribute"``: RESTORE's deficit loop in closed form - t full rounds give +1 to every crop with room left
    (t the most rounds whose tokens fit the deficit), then the crops still with room, by descending w, get the last
    tokens; k in all (n > k)."""
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"holov: overflow must be one of {OVERFLOW_MODES}, got {overflow!r}")
    dev = scores.device
    size = _sizes_on(sizes, dev)
    w = scores / (scores.sum(-1, keepdim=True) + eps)
    alloc = torch.floor(w * k).long()
    rem = k - alloc.sum(-1, keepdim=True)
    c = w.shape[-1]
    if numerics == "official":  # torch.topk(weights, k=min(remaining, C)): the first `remaining` of its order
        order = torch.topk(w, c, dim=-1).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(c, device=dev).expand_as(order))
    else:
        rank = _rank_desc(w)
    alloc = alloc + (rank < rem).long()
    alloc = torch.minimum(alloc, size)
    if overflow == "pad":
        return alloc
    deficit = k - alloc.sum(-1, keepdim=True)  # (B, 1) >= 0
    room = size - alloc
    t = torch.arange(max(sizes) + 1, device=dev)
    given = torch.minimum(room[..., None], t).sum(-2)  # (B, max + 1): tokens the first t full rounds give
    full = (given <= deficit).sum(-1, keepdim=True) - 1  # the most full rounds that fit
    alloc = alloc + torch.minimum(room, full)
    left = deficit - given.gather(-1, full)
    open_ = room > full
    last = _rank_desc(torch.where(open_, w, torch.full_like(w, float("-inf"))))
    return alloc + (open_ & (last < left)).long()


def _sizes_on(sizes: list[int], device) -> torch.Tensor:
    """The crop sizes [q + 1] * r + [q] * (C - r) on ``device`` by kernels (a captured prefill uploads nothing)."""
    c, n = len(sizes), sum(sizes)
    r = n % c
    return (torch.arange(c, device=device) < r).long() + n // c


# ------------------------------------------------------------------------------------------------ selection
def select(attn: torch.Tensor, alloc: torch.Tensor, sizes: list[int], k: int,
           order: str = "official") -> tuple[torch.Tensor, torch.Tensor]:
    """The k outputs of B units of n tokens: (B, k) token indices in output order and (B, k) bool, True for a pad row
    (the official zero rows: a unit whose crops hold fewer than k kept tokens; its rows' source tokens are the first
    dropped ones, never read). Each crop keeps its ``alloc`` tokens of largest ``attn`` (ties to the lower index;
    a crop kept whole in index order, as the official ``patch``). ``order="official"``: crop by crop, each in that
    order; ``"ascending"``: by index; the pad rows last either way."""
    if order not in ORDERS:
        raise ValueError(f"holov: order must be one of {ORDERS}, got {order!r}")
    n = attn.shape[1]
    dev = attn.device
    of, starts = _chunk_index(n, sizes, dev)
    size = _sizes_on(sizes, dev)
    # every token's rank in its crop by descending attention: sort by attention, then (stably) by crop
    by_attn = torch.sort(attn.float(), dim=-1, descending=True, stable=True).indices
    grouped = by_attn.gather(-1, torch.sort(of[by_attn], dim=-1, stable=True).indices)
    ar = torch.arange(n, device=dev)
    rank = torch.empty_like(grouped).scatter_(-1, grouped, (ar - starts[of[grouped]]).expand_as(grouped))
    whole = (alloc >= size)[:, of]  # (B, n): the token's crop is kept whole, in index order
    rank = torch.where(whole, (ar - starts[of]).expand_as(rank), rank)
    kept = rank < alloc[:, of]
    key = starts[of] + rank if order == "official" else ar.expand_as(rank)  # a permutation of 0..n-1
    # the kept tokens by key, then the dropped ones by index (the pad rows' sources)
    out = torch.sort(torch.where(kept, key, ar + n), dim=-1).indices[:, :k]
    return out, ~kept.gather(-1, out)


def select_official(attn: torch.Tensor, alloc: list[int], sizes: list[int], k: int,
                    order: str = "official") -> tuple[torch.Tensor, torch.Tensor]:
    """Reference mode of :func:`select` for one unit (``attn`` (n,), ``alloc`` host ints): the official loop,
    ``torch.topk`` in each partly kept crop. Returns (k,) indices and (k,) pad flags."""
    dev = attn.device
    kept, start = [], 0
    for size, a in zip(sizes, alloc):
        if a >= size:
            kept.append(torch.arange(start, start + size, device=dev))
        elif a > 0:
            kept.append(start + torch.topk(attn[start:start + size], k=a).indices)
        start += size
    got = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long, device=dev)
    if order == "ascending":
        got = got.sort().values
    taken = torch.zeros(sum(sizes), dtype=torch.bool, device=dev).index_fill(0, got, True)
    fill = torch.sort(taken.to(torch.uint8), stable=True).indices[:k - got.numel()]  # the first dropped tokens
    pad = torch.zeros(k, dtype=torch.bool, device=dev)
    pad[got.numel():] = True
    return torch.cat([got, fill]), pad


def official_allocations(attn: torch.Tensor, feats: torch.Tensor, k: int, *, chunks: int = CHUNKS,
                         alpha: float = ALPHA, scale: float = ATTN_SCALE, eps: float = EPS,
                         overflow: str = "pad") -> torch.Tensor:
    """Reference mode: the (B, C) allocations of B units, each unit's crop scores on their own
    (:func:`chunk_scores_official`), on the device (the caller reads them once)."""
    sizes = chunk_sizes(attn.shape[1], chunks)
    scores = torch.stack([chunk_scores_official(attn[b], feats[b], sizes, alpha=alpha, scale=scale, eps=eps)
                          for b in range(attn.shape[0])])
    return allocate(scores, sizes, k, overflow=overflow, eps=eps, numerics="official")


def holov_units(attn: torch.Tensor, feats: torch.Tensor, k: int, *, chunks: int = CHUNKS, alpha: float = ALPHA,
                scale: float = ATTN_SCALE, eps: float = EPS, overflow: str = "pad", order: str = "official",
                numerics: str = "ours", alloc_host: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """HoloV on B units of n > k candidates: ``attn`` (B, n) head-mean [CLS] attention (fp32), ``feats`` (B, n, D)
    projected features. Returns (B, k) local indices in output order and (B, k) pad flags (:func:`select`).
    ``numerics="official"``: the allocations read on the host (``alloc_host``: the caller's one read, per unit a list
    of ints; None: read here, once), each unit's crops by ``torch.topk`` (:func:`select_official`)."""
    check_numerics("holov", numerics)
    sizes = chunk_sizes(attn.shape[1], chunks)
    if numerics == "official":
        if alloc_host is None:
            alloc_host = official_allocations(attn, feats, k, chunks=chunks, alpha=alpha, scale=scale, eps=eps,
                                              overflow=overflow).tolist()  # the official counts: one host read
        got = [select_official(attn[b], alloc_host[b], sizes, k, order) for b in range(attn.shape[0])]
        return torch.stack([o for o, _ in got]), torch.stack([p for _, p in got])
    scores = chunk_scores(attn, feats, sizes, alpha=alpha, scale=scale, eps=eps)
    return select(attn, allocate(scores, sizes, k, overflow=overflow, eps=eps), sizes, k, order)


def holov(cls_attn: torch.Tensor, features: torch.Tensor, unit: torch.Tensor, patch: torch.Tensor, budget: int, *,
          chunks: int = CHUNKS, alpha: float = ALPHA, scale: float = ATTN_SCALE, eps: float = EPS,
          overflow: str = "pad", order: str = "official", scope: str = "unit", cls_token: str = "drop",
          keep_newlines: bool = True, numerics: str = "ours", layout=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tokens HoloV keeps for one sample, in output order, and their pad flags (None: no unit pruned, no pad).

    cls_attn: (H, T) [CLS]->token attention per head; features: (T, D) the LLM-input rows; unit: (T,) (-1 = NeXT
    newline); patch: (T,) (-1 = a Video-LLaVA frame's [CLS] token). Per unit (``scope="unit"``) T = ``budget``
    outputs of its patches (``cls_token="keep"``: its [CLS] + T - 1), or one selection over every unit's patches with
    ``budget`` x units (``"sample"``); a scope with at most that many candidates is kept whole. The outputs of a
    scope take the places of its kept tokens in index order (``order="official"``: in the official order among
    them), so the units and the newline tokens (``keep_newlines``: layout, not counted) stay where they are."""
    check_numerics("holov", numerics)
    for name, value, choices in (("overflow", overflow, OVERFLOW_MODES), ("order", order, ORDERS),
                                 ("scope", scope, SCOPES), ("cls_token", cls_token, CLS_TOKEN_MODES)):
        if value not in choices:
            raise ValueError(f"holov: {name} must be one of {choices}, got {value!r}")
    if numerics == "official":  # the official attentions: cast to the images' (the model's) dtype, head mean there
        scores = cls_attn.to(features.dtype).mean(0).float()
    else:
        scores = cls_attn.float().mean(0)
    lay = layout if layout is not None else unit_layout(unit, patch)  # one host read (none when planned)
    dev = unit.device
    fixed = [lay.newlines] if keep_newlines else []  # tokens kept as they are
    scopes = []  # (candidates, k)
    if scope == "sample" and budget * lay.num_units >= sum(t.numel() for t in lay.tokens):
        fixed += list(lay.tokens)  # at most T x units candidates: the sample kept whole (the identity)
    elif scope == "sample":
        cands = [lay.patches[u] for u in range(lay.num_units)]
        if cls_token == "keep":
            fixed += [lay.cls[u] for u in range(lay.num_units)]
        cand = torch.cat(cands) if cands else unit.new_zeros(0)
        k = budget * lay.num_units - (sum(lay.cls[u].numel() for u in range(lay.num_units)) if cls_token == "keep"
                                      else 0)
        scopes.append((cand, k))
    else:
        for u in range(lay.num_units):
            if budget >= lay.tokens[u].numel():
                fixed.append(lay.tokens[u])
                continue
            k = budget
            if cls_token == "keep" and lay.cls[u].numel():
                fixed.append(lay.cls[u])
                k -= lay.cls[u].numel()
            scopes.append((lay.patches[u], k))
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for cand, k in scopes:
        if k >= cand.numel():
            fixed.append(cand)
        elif k > 0:
            groups.setdefault((cand.numel(), k), []).append(cand)
    slots, tokens, pads = [], [], []
    for f in fixed:
        slots.append(f)
        tokens.append(f)
    stacked = {key: torch.stack(rows) for key, rows in groups.items()}  # (B, n) scopes of equal size, one batch
    host: dict = {}
    if numerics == "official" and stacked:  # every scope's official counts in one host read
        allocs = {key: official_allocations(scores[c], features[c], key[1], chunks=chunks, alpha=alpha, scale=scale,
                                            eps=eps, overflow=overflow) for key, c in stacked.items()}
        flat = torch.cat([a.reshape(-1) for a in allocs.values()]).tolist()
        for key, a in allocs.items():
            host[key] = [flat[i * a.shape[1]:(i + 1) * a.shape[1]] for i in range(a.shape[0])]
            flat = flat[a.numel():]
    for (n, k), cand in stacked.items():
        local, pad = holov_units(scores[cand], features[cand], k, chunks=chunks, alpha=alpha, scale=scale, eps=eps,
                                 overflow=overflow, order=order, numerics=numerics, alloc_host=host.get((n, k)))
        picked = cand.gather(1, local)
        slots.append(picked.sort(dim=-1).values.reshape(-1))  # the places the scope's outputs take
        tokens.append(picked.reshape(-1))
        pads.append(pad.reshape(-1))
    if not tokens:
        return unit.new_zeros(0), None
    slot = torch.cat(slots)
    place = torch.sort(slot).indices  # slots are distinct token indices
    keep = torch.cat(tokens)[place]
    if not groups or overflow != "pad":
        return keep, None
    flag = torch.cat([torch.zeros(sum(f.numel() for f in fixed), dtype=torch.bool, device=dev)] + pads)
    return keep, flag[place]


@register
class HoloV(Method):
    """HoloV: the budget spread over 16 contiguous crops of each image / crop / frame by their (attention-dominated)
    holistic score, each crop's tokens of largest [CLS] attention kept; the official zero rows where a crop overflows
    (``overflow="pad"``) or RESTORE's redistribution."""

    name = "holov"
    #: every count is a host int (the planned layout, the budget, the crop sizes) and the rest sorts and gathers: no
    #: device read; numerics="official" is refused by Method.capture_refusal (the reference mode runs eagerly)
    capturable = "full"
    vision_stage = True
    needs_vision_attention = True
    families = SUPPORTED_FAMILIES
    unsupported_reason = ("HoloV ranks tokens by the [CLS] attention of a CLIP tower's select layer (the official "
                          "code's signal), which the families without a CLIP [CLS] token do not have")

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            "chunks": Option(CHUNKS, types=(int,), at_least=1, doc="contiguous crops per unit (official num_patches)"),
            "alpha": Option(ALPHA, types=(float,), doc="weight of the rescaled similarity variance (official alpha)"),
            "attn_scale": Option(ATTN_SCALE, types=(float,),
                                 doc="the attention's scale in a crop's score (official 1e3)"),
            "eps": Option(EPS, types=(float,), doc="the official esp: norms, variance rescale, crop weights"),
            "overflow": Option("pad", OVERFLOW_MODES,
                               doc="pad: official zero rows for what a full crop cannot give; redistribute: RESTORE's "
                                   "deficit loop (T real tokens)"),
            "order": Option("official", ORDERS,
                            doc="official: crop by crop, attention-descending in a partly kept crop; ascending: by "
                                "index"),
            "scope": Option("unit", SCOPES, doc="unit: T per image / crop / frame; sample: T x units over the sample"),
            "cls_token": Option("drop", CLS_TOKEN_MODES,
                                doc="Video-LLaVA frame [CLS]: drop (T patches) or keep ([CLS] + T-1 patches)"),
            # LLaVA-NeXT newline tokens: kept as layout (True) or dropped
            "keep_newlines": True,
            "numerics": NUMERICS_OPTION,
        }

    def __init__(self, budget=None, **options):
        if budget is None:
            raise ValueError("holov: a budget T (tokens per image / crop / frame) is required")
        super().__init__(budget, **options)
        if self.numerics == "official":  # the [CLS] rows as the official eager tower computes them, in its dtype
            self.vision_attention_logits = "model"

    def select_vision(self, sig):
        keep, pad = holov(sig.cls_attn, sig.features, sig.unit, sig.patch, self.budget, chunks=self.chunks,
                          alpha=float(self.alpha), scale=float(self.attn_scale), eps=float(self.eps),
                          overflow=self.overflow, order=self.order, scope=self.scope, cls_token=self.cls_token,
                          keep_newlines=self.keep_newlines, numerics=self.numerics,
                          layout=sig.unit_layout(patch=True))
        if pad is None:
            return Selection(keep=keep)
        rows = sig.features[keep]  # the official zero rows where a crop overflowed, the kept rows as they are
        return Selection(keep=keep, values=torch.where(pad[:, None], torch.zeros_like(rows), rows), space="projected")
