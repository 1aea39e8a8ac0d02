"""AttnMix = AdaFV / AdaV (arXiv 2501.09532; ACL 2025 Findings "AdaV"): a self-adaptive mix of
visual saliency ([CLS] attention) and text-to-image embedding similarity, before the LLM.

Follows the official code (JiayiV/AdaV, an overlay on FasterVLM; docs/methods/attnmix.md). Algorithm:

    s_j  = max_t softmax_j(100 * cos(E_t, V_j))        E: raw text embeddings after the image,
                                                        V: projected visual tokens
    a_j  = head-mean [CLS]->patch attention of the select layer, within its crop / frame
    k = floor(floor(B/2) / N_img);  V_b = 2 k N_img;  n0 = floor(0.25 V_b);  K = V_b - 2 n0
    L_t = global top-(2k N_img) by s;   L_c = per unit top-2k by a, units concatenated
    keep L_t[:n0] and L_c[:n0]; split K into k1 + k2 maximising (sum top-k1 u) * (sum top-k2 w)
    over the rest (u = s of L_t[n0:], w = a of L_c[n0:] re-sorted); keep their top picks; sort.

Corrected by default (each quirk of the released code is one option away, see docs/methods/attnmix.md):
``crop_offset_bug`` (crop i's [CLS] picks offset by i instead of 576 i) and ``allow_duplicates``
(the same token picked by both lists enters the LLM twice).

Reference mode (option ``numerics="official"``; default ``"ours"``): the official numerics. The released
code computes s from the fp16 LLM inputs (projected tokens and text embeddings of the fp16 LLaVA model):
``F.normalize`` of both, their product, x100, softmax and max all in fp16; a is the fp16 head mean of the
[CLS] attentions the FasterVLM tower returns ``.to(images.dtype)`` (fp16); both lists come from
``torch.topk`` (the global text list over the candidates in the official LLM-input order, which for the
LLaVA-NeXT 'spatial' layout runs over the grid crops row-major on the full grid), and the adaptive split
re-sorts the fp32 copies of the two lists' fp16 values with ``torch.sort`` (official tie order) before
the fp32 prefix-sum product. "fp16" is the official builder's load: the official code computes s and a in its
model's dtype (``.to(images.dtype)``, the LLM inputs), fp32 in an fp32 run, so the reference mode computes them in
the run's own dtype, the LLM's (``sig.features``; as FasterVLM's, whose tower AdaV overlays). The default keeps
fp32 scores and ties to the lower index. Reference mode changes numerics only: combine it with ``crop_offset_bug`` / ``allow_duplicates`` for the released
behaviour.
"""

from __future__ import annotations

import torch

from llava.method import BudgetError, Method, register
from llava.ops import NUMERICS_OPTION
from llava.ops import best_product_split_k1, check_numerics, masked_take, text_to_image_score, topk_desc
from llava.selection import Selection

#: dtype of the official signals under the official builder: the fp16 LLM inputs and the [CLS] attentions cast to
#: the fp16 image dtype; the method passes the run's own, ``sig.features.dtype`` (fp32 in an fp32 run)
OFFICIAL_DTYPE = torch.float16


def official_text_to_image_score(text: torch.Tensor, visual: torch.Tensor, temperature: float = 100.0,
                                  dtype: torch.dtype = OFFICIAL_DTYPE) -> torch.Tensor:
    """:func:`llava.ops.text_to_image_score` with the official numerics (AdaV ``llava_llama.py``
    ``LlavaLlamaForCausalLM.generate``, method "adav"): text (Tt, D) and visual (N, D) cast to ``dtype``
    (the official model's: fp16 under its builder, fp32 in an fp32 run), ``F.normalize`` along D, the batch-1
    product, x ``temperature``, softmax over the visual tokens and max over the text tokens, all in that dtype.
    Returns (N,) in ``dtype``."""
    t = torch.nn.functional.normalize(text.to(dtype)[None], p=2, dim=-1)
    v = torch.nn.functional.normalize(visual.to(dtype)[None], p=2, dim=-1)
    simi = torch.matmul(t, v.permute(0, 2, 1))
    return (simi * temperature).softmax(-1).max(1)[0][0]


def official_cls_score(cls_attn: torch.Tensor, dtype: torch.dtype = OFFICIAL_DTYPE) -> torch.Tensor:
    """a with the official numerics: the per-head [CLS] rows cast to ``dtype``, their mean over heads in
    it (FasterVLM's ``image_attentions.to(images.dtype)`` then ``mean(dim=1)``; ``images.dtype`` is the
    model's: fp16 under its builder, fp32 in an fp32 run). (H, T) -> (T,) in ``dtype``."""
    return cls_attn.to(dtype).mean(0)


def official_text_order(units: list[torch.Tensor], unit_pos: torch.Tensor | None, patch: torch.Tensor,
                        grid: tuple[int, int]) -> torch.Tensor | None:
    """The candidates in the official LLM-input order, over which the released code runs its global
    text top-k: units in prompt order, except that the grid crops following a LLaVA-NeXT base crop are
    laid out row-major on the full grid (the official 'spatial' merge). None when that is simply the
    units one after the other (LLaVA-1.5, Video-LLaVA, no grid crop)."""
    if unit_pos is None or not bool((unit_pos[:, 0] >= 0).any()):
        return None
    gh, gw = int(grid[0]), int(grid[1])
    posl = unit_pos.tolist()
    out, i, n = [], 0, len(units)
    while i < n:
        if posl[i][0] >= 0:  # grid crops without a base crop before them (not produced by the engine)
            j = i
        else:
            out.append(units[i])
            j = i + 1
        k = j
        while k < n and posl[k][0] >= 0:
            k += 1
        if k > j:
            ncols = max(posl[u][1] for u in range(j, k)) + 1
            keys, toks = [], []
            for u in range(j, k):
                r, c = posl[u]
                p = patch[units[u]]
                keys.append((r * gh + torch.div(p, gw, rounding_mode="floor")) * (ncols * gw) + c * gw + p % gw)
                toks.append(units[u])
            keys, toks = torch.cat(keys), torch.cat(toks)
            out.append(toks[torch.argsort(keys, stable=True)])
        i = max(k, i + 1)
    return torch.cat(out)


def adav_budget(budget: int, n_units: int, min_frac: float = 0.25) -> dict[str, int]:
    """AdaV's budget arithmetic (official code): k per unit per list, the actual kept count V_b,
    the guaranteed picks n0 per list and the adaptive remainder K."""
    k = (budget // 2) // n_units
    vb = 2 * k * n_units
    n0 = int(min_frac * vb)
    return {"k": k, "kept": vb, "n0": n0, "adaptive": vb - 2 * n0}


def adav_select(s: torch.Tensor, a: torch.Tensor, units: list[torch.Tensor], budget: int, min_frac: float = 0.25,
                crop_offset_bug: bool = False, allow_duplicates: bool = False, variant: str = "adav",
                numerics: str = "ours", text_order: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (ascending; duplicates only if ``allow_duplicates``) of the visual tokens AdaV keeps.

    s, a: (N,) text-to-image and [CLS] scores of all N candidate tokens; ``units``: per image / crop /
    frame, the indices of its candidates in that unit's patch order (needed for the crop-offset quirk).
    ``numerics="official"`` (reference mode): s and a are used as given (the official fp16 scores come from
    :func:`official_text_to_image_score` / :func:`official_cls_score`), both lists by ``torch.topk`` (the
    text list over ``text_order``, default the units one after the other), and the adaptive split re-sorts
    fp32 copies of the two lists' remaining values with ``torch.sort`` as the official
    ``max_sqrt_sum_with_indices``. Default: ties to the lower index everywhere.
    """
    check_numerics("attnmix", numerics)
    official = numerics == "official"
    n_units = len(units)
    b = adav_budget(budget, n_units, min_frac)
    k, n0, K = b["k"], b["n0"], b["adaptive"]
    cand = torch.cat(units)

    def top_fn(x, kk):
        return x.topk(max(0, min(int(kk), x.numel()))).indices if official else topk_desc(x, kk)

    # L_t: global text list (indices into s), best first
    order_t = cand if text_order is None or not official else text_order
    l_t = order_t[top_fn(s[order_t], 2 * k * n_units)]
    # L_c: per unit top-2k by a, concatenated; with the quirk, unit i's picks land at (patch position + i)
    l_c, l_c_val = [], []
    for i, idx in enumerate(units):
        top = top_fn(a[idx], 2 * k)
        l_c_val.append(a[idx][top])
        if crop_offset_bug:  # crop-major index (local + i) instead of (local + i * unit size)
            g = top + i
            size = units[0].numel()
            if not g.numel():
                top = g
            elif all(x.numel() == size for x in units):  # the 'spatial' layout: on the device
                top = torch.stack(units)[torch.div(g, size, rounding_mode="floor"), g % size]
            else:
                top = torch.stack([units[int(x) // size][int(x) % size] for x in g])
            l_c.append(top)
        else:
            l_c.append(idx[top])
    l_c = torch.cat(l_c) if l_c else cand.new_zeros(0)
    l_c_val = torch.cat(l_c_val) if l_c_val else a.new_zeros(0)
    if variant == "t2i":
        return l_t.sort().values
    if variant == "cls":
        return l_c.sort().values
    if variant != "adav":
        raise ValueError(f"variant must be adav / t2i / cls, got {variant!r}")
    if official:  # max_sqrt_sum_with_indices: fp32 copies of both remainders, torch.sort (its tie order)
        rest_t = l_t[n0:][torch.sort(s[l_t[n0:]].float(), descending=True).indices]
        order = torch.sort(l_c_val[n0:].float(), descending=True).indices
    else:
        rest_t = l_t[n0:]
        order = torch.sort(l_c_val[n0:].float(), descending=True, stable=True).indices
    rest_c = l_c[n0:][order]
    # the text picks are the first n0 + k1 of list_t, the [CLS] picks the first n0 + k2 of list_c: the
    # split k1 stays on the device (no host read, a fixed output count V_b), the picks found with masks
    list_t = torch.cat([l_t[:n0], rest_t])
    list_c = torch.cat([l_c[:n0], rest_c])
    k1 = best_product_split_k1(s[rest_t], l_c_val[n0:][order], K)
    if k1 is None:  # no feasible split: take all of both (shapes only, a host decision)
        k1 = torch.full((), rest_t.numel(), dtype=torch.long, device=cand.device)  # a kernel, not an upload
        K = int(rest_t.numel()) + int(rest_c.numel())
    want_t, want_c = n0 + k1, n0 + (K - k1)  # 0-d device tensors
    pos_t = torch.arange(list_t.numel(), device=cand.device)
    if allow_duplicates:
        # the sorted multiset of both pick lists: the dropped entries become a sentinel past every index
        pos_c = torch.arange(list_c.numel(), device=cand.device)
        both = torch.cat([torch.where(pos_t < want_t, list_t, a.numel()),
                          torch.where(pos_c < want_c, list_c, a.numel())])
        total = min(2 * n0 + K, int(both.numel()))
        return both.sort().values[:total]
    # corrected: the [CLS] list skips tokens already picked and back-fills with its next best
    # (its own list first, then every other candidate by a): the first ``want_c`` entries of that list
    # that are neither text picks nor repeats, found with masks on the device
    text_mask = torch.zeros(a.numel(), dtype=torch.bool, device=cand.device).scatter(0, list_t, pos_t < want_t)
    backfill = cand[torch.sort(a[cand].float(), descending=True, stable=True).indices]
    seq = torch.cat([list_c, backfill])
    at = torch.arange(seq.numel(), device=seq.device)
    first = torch.full((a.numel(),), seq.numel(), dtype=torch.long, device=seq.device).scatter_reduce(
        0, seq, at, reduce="amin")[seq] == at  # the first occurrence of each token in the list
    ok = first & ~text_mask[seq]
    take = ok & (ok.cumsum(0) <= want_c)
    # every candidate is in the list once at least (back-fill) and the text picks are distinct candidates,
    # so text and [CLS] picks together are min(n0 + k1 + n0 + k2, candidates) distinct tokens: a count
    # known on the host; ascending as a sort of their indices would give them
    took = torch.zeros(a.numel(), dtype=torch.long, device=seq.device).scatter_add(0, seq, take.long())
    picked = text_mask | (took > 0)  # (scatter_add: a token listed twice is taken at most once, by ``first``)
    total = min(2 * n0 + K, int(cand.numel()))
    return masked_take(torch.arange(a.numel(), device=cand.device), picked, total)


@register
class AttnMix(Method):
    """AdaV (AdaFV) pre-LLM selection. ``budget`` = B, AdaV's ``overall_tokens``: the total visual
    tokens of the sample entering the LLM (64/128/192 for LLaVA-1.5; 720/288/144 for 5-crop
    LLaVA-NeXT; e.g. 136/256 over 8 Video-LLaVA frames). Actually kept: V_b = 2 k N_img <= B."""

    name = "attnmix"
    #: the fast path captures the default numerics on every option (the text block padded, masked rows;
    #: the adaptive split on the device); the reference mode runs eagerly (Method.capture_refusal)
    capturable = "full"
    vision_stage = True
    needs_vision_attention = True
    query_aware = True  # text-to-image similarity of the prompt text after the image

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            "variant": "adav",  # adav | t2i (text-image similarity only) | cls ([CLS] only, the released 'mix')
            "temperature": 100.0,  # softmax temperature on cosine similarity (1 / 0.01)
            "min_frac": 0.25,  # budget_thres: guaranteed share of each list
            "text_queries": "all",  # all post-image tokens (official) | question (our option)
            "crop_offset_bug": False,  # reproduce the released [CLS]-branch offset (i instead of 576 i)
            "allow_duplicates": False,  # reproduce the released duplicate picks
            "keep_newlines": True,  # LLaVA-NeXT 'spatial_unpad' newline tokens: keep as layout
            # "ours" (fp32 scores, ties to the lower index) or "official" (reference mode: the scores in the
            # run's dtype as the released code in its model's, fp16 under its builder; torch.topk / torch.sort)
            "numerics": NUMERICS_OPTION,
        }

    def __init__(self, budget=None, **options):
        if budget is None:
            raise ValueError("attnmix: a budget (AdaV overall_tokens) is required")
        super().__init__(budget, **options)
        if self.text_queries not in ("all", "question"):
            raise ValueError("attnmix: text_queries must be 'all' or 'question'")

    def select_vision(self, sig):
        # each unit's tokens in its own patch order (the NeXT 'spatial' layout interleaves grid crops)
        lay = sig.unit_layout(patch=True)  # the one host sync for the layout (none when the engine planned it)
        units = [idx[torch.argsort(sig.patch[idx], stable=True)] for idx in lay.tokens]
        n_cand = sum(int(u.numel()) for u in units)
        if self.budget >= n_cand:
            keep = torch.arange(sig.num_tokens, device=sig.unit.device)
            return Selection(keep=keep)
        if self.crop_offset_bug and lay.newlines.numel():
            raise BudgetError("attnmix: crop_offset_bug reproduces the released code, which runs the 'spatial' "
                             "LLaVA-NeXT layout only (load with next_layout='spatial')")
        if adav_budget(self.budget, len(units), self.min_frac)["k"] == 0:
            raise BudgetError(f"attnmix: budget {self.budget} over {len(units)} {sig.unit_kind}s keeps nothing "
                             f"(AdaV keeps 2*floor(floor(B/2)/N) per unit); use a budget >= {2 * len(units)}")
        text, mask = sig.text_rows(self.text_queries)
        if mask is not None and not sig.captured:  # eager: the rows themselves (the same GEMM shapes as ever)
            text, mask = text[mask.to(text.device)], None
        if self.numerics == "official":  # eager only (capture_refusal)
            dt = sig.features.dtype  # the run's, the LLM's: the official model's dtype (images.dtype, its embeddings)
            s = official_text_to_image_score(text, sig.features, self.temperature, dt)
            a = official_cls_score(sig.cls_attn, dt)
            order = official_text_order(units, sig.unit_pos, sig.patch, sig.grid)
        else:  # captured: the padded text block, its pad (and non-question) rows masked out
            s = text_to_image_score(text, sig.features, self.temperature, mask=mask)
            a = sig.cls_attn.float().mean(0)
            order = None
        keep = adav_select(s, a, units, self.budget, self.min_frac, self.crop_offset_bug,
                           self.allow_duplicates, self.variant, self.numerics, order)
        if self.keep_newlines and lay.newlines.numel():
            keep = torch.cat([keep, lay.newlines]).sort().values
        return Selection(keep=keep, allow_duplicates=bool(self.allow_duplicates))
