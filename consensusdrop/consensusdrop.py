"""ConsensusDrop (arXiv 2602.00946) - OUR RECONSTRUCTION.

The paper's text beyond its abstract is not available; every rule below is our design, consistent
with the abstract (docs/methods/consensusdrop.md, with the measurements behind
each choice). Label results "ConsensusDrop (our reconstruction)". Per image / crop / frame, budget B:

    s_v = [CLS]->patch attention of the CLIP select layer          (query-agnostic encoder saliency)
    s_x = max over the question's tokens of softmax_j(100 cos(e_q, f_j))    (query-aware, before the LLM:
          the question's input embeddings e_q against the projected visual tokens f_j; no decoder layer)
    rel = (u_v + u_x) / 2, u = 1 - (rank - 1)/(N - 1) within the unit       (Borda consensus of the ranks)
    keep D = B - floor(0.15625 B) tokens by relevance-weighted max-min:
          first argmax rel, then argmax_j rel_j * min_{s kept} (1 - cos(f_j, f_s))
    merge the others into the C = B - D contextual tokens with VisionZip's encoder-guided rule
    (uniform targets, nearest CLIP key, target + mean); prefill the LLM from layer 0 on them.

``fusion = encoder_only`` / ``cross_only`` are the single-signal ablations (same selection and merge).
``preset = "probe"`` is the previous default (a 2-layer LLM probe of the unpruned prompt for s_x,
reciprocal-rank fusion, top-D by rank, C = round(0.15625 B)); ``preset = "cover"`` names the current one.
"""

from __future__ import annotations

from dataclasses import replace as _replace

import torch

from llava.method import BudgetError, Method, register
from llava.options import Option
from llava.ops import (MaxMinProblem, best_product_split, best_product_split_k1, contextual_merge, cosine_matrix,
                       greedy_max_min, masked_take, per_unit_selection, text_to_image_score, unit_layout)
from llava.selection import Selection

FUSIONS = ("rrf", "borda", "product", "max", "adaptive", "encoder_only", "cross_only")
SELECTS = ("rank", "maxmin", "dpp", "nms")
#: named option sets (explicit options override them). "cover": the default since issue 15 (s_x = AdaV's
#: text-image similarity of the question's input embeddings, no decoder layer; Borda consensus relevance;
#: relevance-weighted max-min selection; C = floor(ratio x budget)). "probe": the default before issue 15
#: (s_x from a 2-layer LLM probe of the unpruned prompt, reciprocal-rank fusion, top-D, C = round(ratio x budget)).
PRESETS = {"cover": {"probe_layer": None, "probe_mode": "auto", "fusion": "borda", "select": "maxmin",
                     "contextual_rounding": "floor"},
           "probe": {"probe_layer": 2, "probe_mode": "auto", "fusion": "rrf", "select": "rank",
                     "contextual_rounding": "round"}}
RELEVANCES = ("rank_mean", "score_mean", "calibrated", "calibrated_encoder", "calibrated_both")
CROSS_SCORES = ("softmax", "prominence", "weighted")


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` (M, D) in fp32 divided by their norm clamped at 1e-12: the operands
    :func:`llava.ops.cosine_matrix` normalises, computed once (one fp32 copy) so that several similarities of the
    same tokens share them; row by row the same values as there."""
    xf = x.float()
    return xf / xf.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def cross_modal_score(text: torch.Tensor, visual: torch.Tensor, how: str = "softmax",
                      temperature: float = 100.0, mask: torch.Tensor | None = None,
                      visual_rows: torch.Tensor | None = None) -> torch.Tensor:
    """s_x before the LLM: the question's input embeddings ``text`` (Q, D) against the projected visual
    tokens ``visual`` (N, D) -> (N,), fp32. With c = cos(e_q, f_j):

    softmax:    max_q softmax_j(temperature c)  (AdaV's s_j; every question token, function words and the
                answer-format instruction included, gets a peak of its own)
    prominence: max_q (c_qj - mean_j' c_qj')  (each token's similarity above its own image average: a
                token counts by how far it stands out, so the words aligned with visual content decide)
    weighted:   max_q w_q softmax_j(temperature c), w_q = max_j c_qj - mean_j c_qj (AdaV's peaks,
                each token's scaled by its prominence)

    ``mask`` (Q,) bool: only these rows of ``text`` count (the fast path's padded text block, or the question
    among the text), with no boolean indexing (no host sync). Every quantity above is per text row until
    the max over rows, so a masked row is dropped right before it: probabilities (softmax) set to 0, which
    never win (every real row's are >= 0); prominence / weighted set to -inf. The masked rows change nothing,
    and the values are those of ``text[mask]`` without a mask (up to the last bits of the cosine product,
    whose rounding may depend on its row count); a mask with no row gives zeros (as
    :func:`llava.ops.text_to_image_score`).

    ``visual_rows``: :func:`unit_rows` of ``visual`` when the caller has them (shared with the max-min cover's
    similarities): the same cosines as normalising ``visual`` here."""
    if how not in CROSS_SCORES:
        raise ValueError(f"cross_score must be one of {CROSS_SCORES}, got {how!r}")
    if visual_rows is None:
        if how == "softmax":
            return text_to_image_score(text, visual, temperature, mask=mask)
        cos = cosine_matrix(text, visual)
    else:  # text_to_image_score's and cosine_matrix's arithmetic on the given rows
        cos = unit_rows(text) @ visual_rows.T
        if how == "softmax":
            p = torch.softmax(temperature * cos, dim=1)
            if mask is not None:
                p = p.masked_fill(~mask.to(p.device)[:, None], 0.0)
            return p.max(dim=0).values if p.shape[0] else p.new_zeros(p.shape[1])
    above = cos - cos.mean(dim=1, keepdim=True)
    per_row = above if how == "prominence" else above.amax(dim=1, keepdim=True) * torch.softmax(temperature * cos, dim=1)
    if mask is None:
        return per_row.amax(dim=0)
    m = mask.to(per_row.device)
    if not per_row.shape[0]:
        return per_row.new_zeros(per_row.shape[1])
    best = per_row.masked_fill(~m[:, None], float("-inf")).amax(dim=0)
    return torch.where(m.any(), best, torch.zeros_like(best))


def order_desc(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Indices sorted by ``primary`` descending, ties by ``secondary`` descending, then lower index."""
    o = torch.sort(secondary.float(), descending=True, stable=True).indices
    return o[torch.sort(primary.float()[o], descending=True, stable=True).indices]


def ranks_from_order(order: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(order)
    r[order] = torch.arange(1, order.numel() + 1, device=order.device)
    return r


def consensus_scores(s_v: torch.Tensor, s_x: torch.Tensor, fusion: str = "rrf", rrf_k: float = 60.0,
                     w_v: float = 1.0, w_x: float = 1.0) -> torch.Tensor:
    """Consensus score c(j) of each token from its two ranks (1-based, within the unit).

    r_v: by s_v descending (ties: lower index); r_x: by s_x descending (ties: higher s_v, then lower
    index). rrf: w_v/(k + r_v) + w_x/(k + r_x); borda: w_v (N - r_v) + w_x (N - r_x);
    encoder_only / cross_only: the negated single rank."""
    n = s_v.numel()
    r_v = ranks_from_order(order_desc(s_v, torch.zeros_like(s_v))).double()
    r_x = ranks_from_order(order_desc(s_x, s_v)).double()
    if fusion == "rrf":
        return w_v / (rrf_k + r_v) + w_x / (rrf_k + r_x)
    if fusion == "borda":
        return w_v * (n - r_v) + w_x * (n - r_x)
    if fusion == "encoder_only":
        return -r_v
    if fusion == "cross_only":
        return -r_x
    raise ValueError(f"fusion must be one of {FUSIONS}")


def adaptive_dominant(s_v: torch.Tensor, s_x: torch.Tensor, d: int, min_frac: float = 0.25) -> torch.Tensor:
    """AdaV's adaptive split applied to the two saliency lists, de-duplicated: n0 = floor(a D) top
    picks from each list, the other D - 2 n0 split by maximising the product of captured masses;
    a pick already taken is replaced by the next best of the list that produced it. Computed on the
    device as masks over the tokens (no host sync)."""
    n = s_v.numel()
    d = min(d, n)
    l_v = order_desc(s_v, torch.zeros_like(s_v))
    l_x = order_desc(s_x, s_v)
    n0 = min(int(min_frac * d), d // 2)
    k_x = best_product_split_k1(s_x[l_x[n0:]].float(), s_v[l_v[n0:]].float(), d - 2 * n0)
    if k_x is None:  # no feasible split (cannot happen for d <= n): take everything, as the list rule
        k_x, k_v = best_product_split(s_x[l_x[n0:]].float(), s_v[l_v[n0:]].float(), d - 2 * n0)
        return _adaptive_lists(s_v, s_x, l_x, l_v, d, n0 + k_x, n0 + k_v)
    # the cross list's first n0 + k_x, then the encoder list's first n0 + k_v not yet taken: d in all
    # (both lists order all n tokens and d <= n, so the rrf back-fill is never needed)
    rank = torch.arange(n, device=s_v.device)
    picked = torch.zeros(n, dtype=torch.bool, device=s_v.device).scatter(0, l_x, rank < n0 + k_x)
    free = ~picked[l_v]
    take_v = free & (free.cumsum(0) <= n0 + (d - 2 * n0 - k_x))
    picked = picked.scatter(0, l_v, picked[l_v] | take_v)
    return masked_take(rank, picked, d)


def _adaptive_lists(s_v, s_x, l_x, l_v, d, want_x, want_v) -> torch.Tensor:
    """The list-walking form of :func:`adaptive_dominant` (host loop; used only when no split is
    feasible)."""
    picked: list[int] = []
    seen: set[int] = set()

    def take(lst: torch.Tensor, count: int) -> None:
        got = 0
        for t in lst.tolist():
            if got == count:
                return
            if t not in seen:
                seen.add(t)
                picked.append(t)
                got += 1

    take(l_x, want_x)
    take(l_v, want_v)
    take(order_desc(consensus_scores(s_v, s_x, "rrf"), s_v), d - len(picked))  # if lists ran short
    return torch.tensor(sorted(picked), dtype=torch.long, device=s_v.device)


def select_dominant(s_v: torch.Tensor, s_x: torch.Tensor, d: int, fusion: str = "rrf", rrf_k: float = 60.0,
                    w_v: float = 1.0, w_x: float = 1.0, min_frac: float = 0.25) -> torch.Tensor:
    """The ``d`` dominant tokens of one unit (local indices, ascending). Ties in c: higher s_v, then
    lower index."""
    if fusion == "adaptive":
        return adaptive_dominant(s_v, s_x, d, min_frac)
    c = consensus_scores(s_v, s_x, fusion, rrf_k, w_v, w_x)
    return order_desc(c, s_v)[:d].sort().values


def unit_relevance(s: torch.Tensor, ties: torch.Tensor | None = None, how: str = "rank_mean") -> torch.Tensor:
    """One signal as a relevance in [0, 1]: ``rank_mean`` (1 - (r - 1) / (n - 1), r the 1-based rank;
    scale-free, so a peaky signal and a flat one weigh alike) or ``score_mean`` (s / max s)."""
    n = s.numel()
    if how == "score_mean":
        s = s.float()
        return s / s.max().clamp(min=1e-30)
    r = ranks_from_order(order_desc(s, torch.zeros_like(s) if ties is None else ties)).float()
    return 1.0 - (r - 1.0) / max(n - 1, 1)


def _above_median(s: torch.Tensor) -> torch.Tensor:
    """(s - median) / (max - median), clipped at 0: a peaky signal's peaks, its noise floor at 0."""
    x = s.float()
    med = x.median()
    return ((x - med) / (x.max() - med).clamp(min=1e-30)).clamp(min=0)


def fused_relevance(s_v: torch.Tensor, s_x: torch.Tensor, fusion: str = "borda", w_v: float = 1.0, w_x: float = 1.0,
                    how: str = "rank_mean", rrf_k: float = 60.0) -> torch.Tensor:
    """rel(j) in [0, 1], the consensus relevance the diverse selections weigh by. ``borda``:
    (w_v u_v + w_x u_x) / (w_v + w_x), u the per-signal relevance of :func:`unit_relevance` (with
    ``rank_mean`` the normalised Borda count); ``rrf``: the RRF score of :func:`consensus_scores`
    min-max normalised; ``encoder_only`` / ``cross_only``: that signal's u alone."""
    if fusion == "rrf":
        c = consensus_scores(s_v, s_x, "rrf", rrf_k, w_v, w_x).float()
        return (c - c.min()) / (c.max() - c.min()).clamp(min=1e-30)
    if how.startswith("calibrated"):  # a sparse signal counts by its height above its own median, the other by rank
        if fusion == "encoder_only":
            return unit_relevance(s_v, None, "rank_mean")
        if fusion == "cross_only":
            return unit_relevance(s_x, s_v, "rank_mean")
        calibrate_v = how in ("calibrated_encoder", "calibrated_both")
        u_v = _above_median(s_v) if calibrate_v else unit_relevance(s_v, None, "rank_mean")
        u_x = unit_relevance(s_x, s_v, "rank_mean") if how == "calibrated_encoder" else _above_median(s_x)
    else:
        u_v = unit_relevance(s_v, None, how)
        if fusion == "encoder_only":
            return u_v
        u_x = unit_relevance(s_x, s_v, how)
        if fusion == "cross_only":
            return u_x
    if fusion == "product":  # both must agree: a geometric mean of the two relevances
        return (u_v.clamp(min=0) ** w_v * u_x.clamp(min=0) ** w_x) ** (1.0 / (w_v + w_x))
    if fusion == "max":  # either signal's peak suffices
        return torch.maximum(w_v * u_v, w_x * u_x) / max(w_v, w_x)
    if fusion != "borda":
        raise ValueError(f"fused_relevance: fusion must be borda / product / max / rrf / encoder_only / cross_only, "
                         f"got {fusion!r}")
    return (w_v * u_v + w_x * u_x) / (w_v + w_x)


def _cover_setup(x: torch.Tensor, seed: torch.Tensor | None, d: int, rows: torch.Tensor | None = None):
    """What every diverse pick starts from: the fp32 cosine similarities of the rows of ``x`` (n, D), an
    empty picked mask, the number of forced picks and ``d`` clipped to n. ``rows``: :func:`unit_rows` of ``x``
    when the caller has them (the same similarities)."""
    n = x.shape[0]
    d = min(d, n)
    picked = torch.zeros(n, dtype=torch.bool, device=x.device)
    sim = cosine_matrix(x) if rows is None else rows @ rows.T
    return sim, picked, 0 if seed is None else min(int(seed.numel()), d), d


def maxmin_problem(x: torch.Tensor, rel: torch.Tensor, d: int, seed: torch.Tensor | None = None,
                   alpha: float = 1.0, radius: float = 0.0,
                   rows: torch.Tensor | None = None) -> tuple[MaxMinProblem | None, torch.Tensor, int]:
    """The relevance-weighted max-min pick of :func:`diverse_pick` set up for
    :func:`llava.ops.greedy_max_min` (which runs the sequential loop on the host, one copy each way for
    all the problems of a sample): (the problem or None, the picked mask so far, d). ``radius`` > 0
    (option ``cover_radius``) clips the distances at it, ``min(1, dist / radius)``: a token farther than
    the radius from every pick counts as uncovered, and among those only the relevance decides. ``rows``:
    :func:`unit_rows` of ``x`` when the caller has them."""
    sim, picked, n_seed, d = _cover_setup(x, seed, d, rows)
    w = rel.float().clamp(min=0) ** alpha
    mind = torch.ones(x.shape[0], device=x.device)
    if n_seed:
        picked.index_fill_(0, seed[:n_seed], True)  # not picked[i] = True: a host scalar's copy (no capture)
        mind = (1.0 - sim[:, seed[:n_seed]]).amin(1).clamp(min=0)
    if d - n_seed <= 0:
        return None, picked, d
    dist = (1.0 - sim).clamp(min=0)
    if radius:  # a token farther than the radius from every pick is "new": only its relevance counts
        dist = (dist / radius).clamp(max=1.0)
        mind = (mind / radius).clamp(max=1.0)
    return MaxMinProblem(dist=dist, k=d - n_seed, min_dist=mind, taken=picked, weight=w, fill=-1.0), picked, d


def finish_maxmin(prob: MaxMinProblem | None, picked: torch.Tensor, d: int,
                  picks: torch.Tensor | None = None) -> torch.Tensor:
    """The ``d`` picked local indices, ascending, from :func:`maxmin_problem`'s mask and the solved picks
    (solved here when not given)."""
    if prob is not None:
        if picks is None:
            picks = greedy_max_min([prob])[0]
        picked = picked.index_fill(0, picks, True)
    return masked_take(torch.arange(picked.numel(), device=picked.device), picked, d)


def diverse_pick(x: torch.Tensor, rel: torch.Tensor, d: int, seed: torch.Tensor | None = None, how: str = "maxmin",
                 alpha: float = 1.0, theta: float = 0.5) -> torch.Tensor:
    """``d`` tokens (local indices, ascending) covering the features ``x`` (n, D) weighted by the
    relevance ``rel`` (n,), after the forced picks ``seed`` (local indices; counted in ``d``).

    maxmin: greedy argmax_j rel_j^alpha * min_{s picked} (1 - cos(x_j, x_s)) (DivPrune's max-min
            rule, relevance-weighted; before any pick the distance term is 1, so the first pick is
            the most relevant token).
    dpp:    greedy MAP of the conditional DPP L = diag(q) S diag(q), S = cos(x, x), q = exp(theta rel)
            (CDPruner's kernel with our fused relevance), the seeds forced first.
    nms:    one pass, no loop (each token penalised by its nearest more relevant token).
    fp32. maxmin's sequential loop runs on the host (:func:`llava.ops.greedy_max_min`, picks
    bit-identical to the device loop; the engine's path batches every unit of a sample into one
    round trip); dpp's loop runs on the device, one argmax per pick, no host sync."""
    if how == "maxmin":
        return finish_maxmin(*maxmin_problem(x, rel, d, seed, alpha))
    n, dev = x.shape[0], x.device
    sim, picked, n_seed, d = _cover_setup(x, seed, d)
    if how == "nms":  # one pass, no loop: penalise each token by its nearest more-relevant token
        o = order_desc(rel, torch.zeros_like(rel))
        so = sim[o][:, o].masked_fill(~torch.ones(n, n, dtype=torch.bool, device=dev).triu(1), -1.0)
        pen = torch.empty(n, device=dev)
        pen[o] = so.amax(0).clamp(min=0)
        adj = rel.float().clamp(min=0) ** alpha * (1.0 - pen)
        if n_seed:
            adj.index_fill_(0, seed[:n_seed], float("inf"))
        return order_desc(adj, rel)[:d].sort().values
    if how != "dpp":
        raise ValueError(f"select must be one of {SELECTS}")
    q = torch.exp(theta * rel.float())
    L = q[:, None] * sim * q[None, :]
    fi = torch.finfo(torch.float32)
    C = torch.zeros(max(d, 1), n, device=dev)
    d2 = torch.diagonal(L).clone()
    for t in range(d):
        if t < n_seed:
            j = seed[t:t + 1]
        else:
            j = torch.nan_to_num(d2, nan=fi.min, neginf=fi.min).masked_fill(picked, float("-inf")).argmax().view(1)
        row = L.index_select(0, j)[0]
        if t:
            row = row - C[:t].index_select(1, j)[:, 0] @ C[:t]
        e = row / torch.sqrt(d2.index_select(0, j).clamp(min=fi.tiny))
        C[t] = e
        d2 = d2 - e * e
        picked = picked.index_fill(0, j, True)
    return masked_take(torch.arange(n, device=dev), picked, d)


def split_budget(budget: int, contextual_ratio: float, merge: bool, dominant: int | None = None,
                 contextual: int | None = None, rounding: str = "round") -> tuple[int, int]:
    """(D, C) for one unit: C = round(ratio x budget) (10/64 gives 54+10, 108+20, 162+30, 27+5, 14+3)."""
    if dominant is not None or contextual is not None:
        d = dominant if dominant is not None else budget - contextual
        c = contextual if contextual is not None else budget - dominant
        if d < 0 or c < 0 or (merge and d + c != budget) or (not merge and c):
            raise BudgetError(f"consensusdrop: dominant {d} + contextual {c} must equal the budget {budget}"
                             + ("" if merge else " with merge='none' (contextual 0)"))
        return d, c
    if not merge:
        return budget, 0
    c = int(round(contextual_ratio * budget)) if rounding == "round" else int(contextual_ratio * budget + 1e-9)
    return budget - c, c


def unit_budgets(budget: int, n_units: int, mode: str) -> list[int]:
    """Per-unit budgets: ``per_unit`` (budget each) or ``total`` (split evenly, remainder first)."""
    if mode in ("per_crop", "per_frame", "per_unit"):
        return [budget] * n_units
    if mode == "total":
        return [budget // n_units + (1 if u < budget % n_units else 0) for u in range(n_units)]
    raise ValueError(f"budget mode must be per_crop / per_frame / total, got {mode!r}")


@register
class ConsensusDrop(Method):
    """ConsensusDrop (our reconstruction). ``budget`` = visual tokens entering the LLM per image
    (LLaVA-1.5: 64/128/192), per crop (LLaVA-NeXT: 128/64/32 -> 640/320/160 at 5 crops) or per
    frame (Video-LLaVA: 17/32/64, the frame [CLS] taking one dominant slot)."""

    name = "consensusdrop"
    llm_reads = ("next",)  # prune_point="after_probe": the probe layer's attention
    #: the fast path captures the pre-LLM selection (both presets: the greedy max-min loops on the device, the LLM
    #: probe inside the captured prefill); the in-LLM ablation is refused by :meth:`capture_refusal`
    capturable = "full"
    needs_vision_attention = True
    query_aware = True  # the probe reads the question rows

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            "preset": None,  # None (the defaults below = "cover") | "cover" | "probe" (the pre-issue-15 default)
            "contextual_ratio": 0.15625,
            "dominant": None,
            "contextual": None,
            "vision_layer": None,  # hidden-states index of the CLIP layer for s_v and keys (None: the model's, -2)
            "encoder_head_agg": Option("mean", ("mean", "sum"), doc="the [CLS] row over heads (same ranking)"),
            # None: no decoder layer (probe_mode auto -> embed_cos); 0: layer-0 q/k; K: run layers 0..K-1
            "probe_layer": None,
            "probe_queries": Option("question", ("question", "all_post_image", "last")),
            "probe_head_agg": Option("mean", ("mean", "max")),
            "probe_query_agg": Option("mean", ("mean", "max")),
            "probe_softmax_keys": Option("all", ("all", "visual_only"),
                                         doc="visual_only: renormalised over the visual columns"),
            "probe_mode": Option("auto", ("auto", "attn", "embed_cos"),
                                 doc="auto: embed_cos without a probe_layer, else attn; embed_cos: AdaV's s_j"),
            "cross_score": Option("softmax", CROSS_SCORES, doc="embed_cos's score (cross_modal_score)"),
            "fusion": Option("borda", FUSIONS),
            "rrf_k": 60.0,
            "w_v": 1.0,
            "w_x": 1.0,
            "adaptive_min_frac": 0.25,
            "select": Option("maxmin", SELECTS, doc="maxmin: relevance-weighted max-min; rank: top-D by consensus"),
            "relevance": Option("rank_mean", RELEVANCES, doc="what maxmin weighs by (calibrated: peaks above the "
                                                             "median)"),
            "fill": Option("fused", ("fused", "encoder", "coverage"),
                           doc="maxmin / dpp relevance after the peaks: encoder = s_v only, coverage = none"),
            "peaks_source": Option("cross", ("cross", "fused"),
                                   doc="the forced peaks: the top of s_x, or of the consensus"),
            "contextual_rounding": Option("floor", ("round", "floor"),
                                          doc="C = floor | round (ratio x budget); floor: no merged token below 7"),
            "peaks": 0.0,  # maxmin / dpp: fraction of D forced first from the cross signal's top (asymmetry)
            "alpha": 1.0,  # maxmin: relevance exponent
            "cover_radius": 0.0,  # maxmin: cosine distance beyond which a token counts as uncovered (0: plain max-min)
            "dpp_theta": 0.5,  # dpp: q = exp(theta * rel)
            "div_space": Option("features", ("features", "vision_features", "keys"),
                                doc="maxmin / dpp distances: features = projected"),
            "merge": Option("visionzip", ("visionzip", "none")),
            "merge_metric": Option("clip_keys", ("clip_keys", "clip_features")),
            "merge_rule": Option("target_plus_mean", ("target_plus_mean", "mean")),
            "merge_space": Option("clip", ("clip", "projected"), doc="clip: before the projector"),
            "include_cls": None,  # None: auto (video frames: True; images: False)
            "order": Option("dominant_then_contextual", ("dominant_then_contextual", "spatial"),
                            doc="per unit, or spatial: each merged token at its target's place"),
            "next_order": Option("crop_major", ("crop_major", "grid_raster"),
                                 doc="grid_raster: LLaVA-NeXT's grid crops re-assembled"),
            "prune_point": Option("pre_llm", ("pre_llm", "after_probe"),
                                  doc="after_probe: the ablation that continues from layer K, FastV-like"),
            "next_budget_mode": "per_crop",  # per_crop | total
            "video_budget_mode": "per_frame",  # per_frame | total
            "keep_newlines": True,  # LLaVA-NeXT 'spatial_unpad' newline tokens: kept, outside the budget
        }

    def __init__(self, budget=None, **options):
        if budget is None:
            raise ValueError("consensusdrop: a budget is required")
        if options.get("preset") is not None:
            if options["preset"] not in PRESETS:
                raise ValueError(f"consensusdrop: preset must be None or one of {tuple(PRESETS)}, got {options['preset']!r}")
            options = {**PRESETS[options["preset"]], **options}
        super().__init__(budget, **options)
        if self.prune_point == "after_probe" and self.probe_layer is None:
            self.probe_layer = 2  # the LLM-stage ablation needs a layer: the previous default's
        if self.probe_mode == "auto":
            self.probe_mode = "embed_cos" if self.probe_layer is None else "attn"
        if self.probe_mode == "attn" and self.probe_layer is None:
            raise ValueError("consensusdrop: probe_mode='attn' needs a probe_layer (e.g. 2)")
        if self.prune_point == "after_probe" and (self.probe_mode != "attn" or self.probe_layer < 1):
            raise ValueError("consensusdrop: prune_point='after_probe' needs probe_layer >= 1 and probe_mode='attn'")
        self.vision_stage = self.prune_point == "pre_llm"
        if "position_mode" not in options:
            self.position_mode = "keep"  # after_probe only: FastV-like

    def setup(self, *, num_layers, num_vision_layers, family):
        super().setup(num_layers=num_layers, num_vision_layers=num_vision_layers, family=family)
        if self.probe_layer is not None and self.probe_layer >= num_layers:
            raise ValueError(f"consensusdrop: probe_layer {self.probe_layer} >= the LLM's {num_layers} layers")
        self.cls_slot = self.include_cls if self.include_cls is not None else family == "video_llava"
        # on images the [CLS] is not an LLM token: offer it as an extra candidate when it takes a slot
        self.include_cls_candidates = bool(self.cls_slot) and family != "video_llava"

    @property
    def llm_layers(self):
        return (self.probe_layer,) if self.prune_point == "after_probe" else ()

    @property
    def probe_layers(self):
        return (self.probe_layer,) if self.probe_mode == "attn" else ()

    # -- signals -> the two saliencies ------------------------------------------------------------
    def _encoder_saliency(self, cls_attn: torch.Tensor) -> torch.Tensor:
        return cls_attn.float().sum(0) if self.encoder_head_agg == "sum" else cls_attn.float().mean(0)

    def _cross_saliency(self, p: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """p: (H, Q, T) probabilities on the visual columns -> (T,). ``rows`` (Q,) bool: the query rows among
        the Q (the fast path's padded text block); None: every row is one."""
        p = p.float()
        if rows is not None:  # the other rows of the block are read through the mask only
            p = torch.where(rows[None, :, None], p, 0.0)
        if self.probe_softmax_keys == "visual_only":
            p = p / p.sum(-1, keepdim=True).clamp(min=1e-30)
        p = p.amax(0) if self.probe_head_agg == "max" else p.mean(0)
        if rows is None:
            return p.amax(0) if self.probe_query_agg == "max" else p.mean(0)
        if self.probe_query_agg == "max":
            return p.masked_fill(~rows[:, None], float("-inf")).amax(0)
        return p.sum(0) / rows.sum().clamp(min=1)

    def _needs_probe(self) -> bool:
        return self.fusion != "encoder_only"

    # -- the per-sample algorithm ---------------------------------------------------------------
    def _dominant(self, s_v, s_x, x, d, defer: bool = False, rows=None):
        """The ``d`` dominant tokens of one unit (local indices, ascending); with ``defer``, a max-min
        pick comes back unsolved (:func:`maxmin_problem`'s tuple) for :func:`greedy_max_min`. ``rows``:
        :func:`unit_rows` of ``x`` when the caller has them."""
        if self.select == "rank" or self.fusion == "adaptive":  # adaptive: AdaV's list split is its own rule
            return select_dominant(s_v, s_x, d, self.fusion, self.rrf_k, self.w_v, self.w_x, self.adaptive_min_frac)
        fusion = self.fusion
        g = min(d, int(self.peaks * d)) if fusion in ("borda", "rrf", "product", "max") else 0
        rel = fused_relevance(s_v, s_x, fusion, self.w_v, self.w_x, self.relevance, self.rrf_k)
        seed = None
        if g:
            seed = order_desc(s_x, s_v)[:g] if self.peaks_source == "cross" else order_desc(rel, s_v)[:g]
            if self.fill == "encoder":
                rel = fused_relevance(s_v, s_x, "encoder_only", self.w_v, self.w_x, self.relevance, self.rrf_k)
            elif self.fill == "coverage":
                rel = torch.ones_like(rel)
        if self.select == "maxmin" and defer:  # solved with the sample's other units (one host round trip)
            return maxmin_problem(x, rel, d, seed, self.alpha, self.cover_radius, rows)
        return diverse_pick(x, rel, d, seed, self.select, self.alpha, self.dpp_theta)

    def _select(self, s_v, s_x, metric, unit, patch, unit_pos, is_newline, n_stock, budget_mode, space,
                div_x=None, layout=None, device_loop: bool = False, div_rows=None):
        """Shared by both prune points. All tensors over the sample's candidates (n,). One host sync
        (the unit layout; none when ``layout``, ``unit_layout(unit, patch, n_stock, unit_pos)`` planned on
        the host, is given); ``is_newline`` is ``unit < 0``. ``device_loop``: the greedy max-min loops run
        on the device (a captured prefill: no host read at all; the same picks, bit for bit). ``div_rows``:
        :func:`unit_rows` of ``div_x`` when the caller has them (the max-min similarities read its rows)."""
        n = s_v.numel()
        dev = s_v.device
        lay = layout if layout is not None else unit_layout(unit, patch, n_stock, unit_pos)
        budgets = unit_budgets(self.budget, lay.num_units, budget_mode)
        if all(b >= lay.num_stock[u] for u, b in enumerate(budgets)):
            return Selection(keep=torch.arange(n_stock, device=dev))  # every unit fits: the unpruned layout
        assign, n_tgt = torch.full((n,), -1, dtype=torch.long, device=dev), 0
        per_unit = []  # (dominant, targets) per unit, for ordering
        plans = []  # per unit: (idx, cls_idx, cand, c, dominant picks or a deferred max-min problem) or None
        for u in range(lay.num_units):
            idx = lay.tokens[u]
            cls_idx = lay.cls[u] if self.cls_slot else idx[:0]
            cand = lay.patches[u] if self.cls_slot else idx  # the unit's tokens other than cls_idx
            b = budgets[u]
            if b >= lay.num_stock[u]:
                plans.append(None)  # the unit fits: keep its tokens as they are
                continue
            d, c = split_budget(b, self.contextual_ratio, self.merge == "visionzip", self.dominant, self.contextual,
                                self.contextual_rounding)
            d_free = max(0, d - cls_idx.numel())
            rows = div_rows[cand] if div_rows is not None else None
            plans.append((idx, cls_idx, cand, c, self._dominant(s_v[cand], s_x[cand], div_x[cand], d_free, defer=True,
                                                                rows=rows)))
        # every unit's greedy max-min loop in one host round trip (not one per unit, nor a kernel per pick);
        # captured: on the device, each problem's seed count (d - k, a host int) given as num_taken
        deferred = [p[4] for p in plans if p is not None and isinstance(p[4], tuple)]
        problems = [_replace(q[0], num_taken=q[2] - q[0].k) if device_loop else q[0]
                    for q in deferred if q[0] is not None]
        solved = iter(greedy_max_min(problems, device_loop=device_loop))
        for u, plan in enumerate(plans):
            if plan is None:
                idx = lay.tokens[u]
                d_u, t_u = idx[: lay.num_stock[u]], idx[:0]
            else:
                idx, cls_idx, cand, c, local = plan
                if isinstance(local, tuple):
                    prob, picked, d_free = local
                    local = finish_maxmin(prob, picked, d_free, next(solved) if prob is not None else None)
                d_u = torch.cat([cls_idx, cand[local]])  # [CLS] first, then ascending
                left = torch.ones(cand.numel(), dtype=torch.bool, device=dev)
                left.index_fill_(0, local.reshape(-1), False)  # cand minus d_u (cls_idx is never among cand)
                cand_stock = lay.num_patch_stock[u] if self.cls_slot else lay.num_stock[u]
                if cand_stock == cand.numel():  # all stock (the engine offers only [CLS] extras)
                    rest = masked_take(cand, left, cand.numel() - local.numel())
                else:
                    rest = cand[left & (cand < n_stock)]
                t_u, a_u = contextual_merge(metric, rest, c, n)
                assign = torch.where(a_u >= 0, a_u + n_tgt, assign)
            n_tgt += t_u.numel()
            per_unit.append((u, d_u, t_u))
        newlines = lay.newlines if self.keep_newlines else torch.zeros(0, dtype=torch.long, device=dev)
        mode = "spatial" if self.order == "spatial" else ("grid_raster" if self.next_order == "grid_raster" else "unit")
        return per_unit_selection(per_unit, newlines, assign, lay.unit_pos, patch, mode, grid=lay.grid,
                                  rule=self.merge_rule, space=space, captured=device_loop)

    def _budget_mode(self):
        return self.video_budget_mode if self.family == "video_llava" else (
            self.next_budget_mode if self.family == "llava_next" else "per_unit")

    def select_vision(self, sig):
        n = sig.num_tokens
        s_v = self._encoder_saliency(sig.cls_attn)
        s_x = torch.zeros(n, device=s_v.device)
        # the projected tokens normalised once when both the cross score and the max-min cover read them
        cover = self.div_space == "features" and self.select == "maxmin" and self.fusion != "adaptive"
        cross = self._needs_probe() and self.probe_mode != "attn"
        rows = unit_rows(sig.features) if cover and cross else None
        if self._needs_probe():
            if self.probe_mode == "attn":  # captured: the rows of the whole padded text block, read by its masks
                query_mask = self._query_rows(sig)[1] if sig.captured else None
                s_x[: sig.num_stock] = self._cross_saliency(sig.probe_attention(self.probe_layer, self.probe_queries),
                                                            query_mask)
            else:
                text, mask = self._query_rows(sig)
                s_x[: sig.num_stock] = cross_modal_score(text, sig.features[: sig.num_stock], self.cross_score,
                                                         mask=mask,
                                                         visual_rows=None if rows is None else rows[: sig.num_stock])
        metric = sig.keys if self.merge_metric == "clip_keys" else sig.vision_features
        space = "vision" if self.merge_space == "clip" else "projected"
        div_x = {"features": sig.features, "vision_features": sig.vision_features, "keys": sig.keys}[self.div_space]
        return self._select(s_v, s_x, metric, sig.unit, sig.patch, sig.unit_pos, sig.is_newline, sig.num_stock,
                            self._budget_mode(), space, div_x,
                            layout=sig.unit_layout(patch=True, stock=True, pos=True), device_loop=sig.captured,
                            div_rows=rows)

    def _query_rows(self, sig):
        """The text rows s_x reads (``probe_queries``) as (embeds, mask or None). Eager: the rows themselves
        (a boolean index, the same matrices as ever); captured: the fast path's padded text block with a
        mask (its real rows, the question among them, or the last real row), read by masked ops only."""
        which = "question" if self.probe_queries == "question" else "all"
        text, mask = sig.text_rows(which)
        if self.probe_queries == "last":  # the last real row of the text after the image
            if mask is None:
                mask = torch.arange(text.shape[0], device=text.device) == text.shape[0] - 1
            else:
                m = mask.to(text.device).long()
                mask = mask.to(text.device) & (m.cumsum(0) == m.sum())
        if mask is not None and not sig.captured:
            text, mask = text[mask.to(text.device)], None
        return text, mask

    def capture_refusal(self):
        """The fast path captures the pre-LLM selection with s_x from the input embeddings (``probe_mode``
        embed_cos, the default / "cover" preset), from the LLM probe (``probe_mode="attn"``, the "probe" preset:
        layers 0..K-1 on the unpruned prompt inside the captured prefill, :mod:`llava.fast.probe`) or without s_x
        (``fusion="encoder_only"``). Refused: ``prune_point="after_probe"`` (an in-LLM stage). ``order="spatial"`` and NeXT's
        ``next_order="grid_raster"`` are captured (:func:`llava.ops.block_order` skips its identity read)."""
        why = super().capture_refusal()
        if why:
            return why
        if self.prune_point == "after_probe":
            return ("consensusdrop: prune_point='after_probe' prunes inside the LLM, after its probe layers "
                    "(an in-LLM stage): runs on the eager engine")
        return None

    def select_llm(self, stage, sig):
        """prune_point='after_probe' (ablation): the same selection at layer K from the LLM's own
        hidden states; merged in the LLM's hidden space."""
        v = sig.vision
        o = sig.origin
        s_v = self._encoder_saliency(v.cls_attn[:, o])
        rows = {"question": "question", "all_post_image": "text_after", "last": "last"}[self.probe_queries]
        p = sig.attention(rows, layer="next")[:, :, sig.visual]
        s_x = self._cross_saliency(p)
        metric = (v.keys if self.merge_metric == "clip_keys" else v.vision_features)[o]
        div_x = {"features": v.features, "vision_features": v.vision_features, "keys": v.keys}[self.div_space][o]
        return self._select(s_v, s_x, metric, v.unit[o], v.patch[o], v.unit_pos, v.is_newline[o], o.numel(),
                            self._budget_mode(), "projected", div_x)
