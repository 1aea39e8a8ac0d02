"""SparseVLM (ICML 2025) and SparseVLM+ ("v2.0"), docs/methods/sparsevlm.md.

Official code: Gumpest/SparseVLMs - ``llava/model/language_model/modelling_sparse_llama.py``
(``LlamaModel.forward``: "Select Text Raters", the sparse layers, "Text-Visual Attention Gravity
Correction" and "Text-Visual Priority Heads Selection" under ``USE_VERSION=2_0``),
``llava/model/language_model/score.py`` (``sparse_token_dict`` = the retained-count schedules,
``attn_postprocess_topk``, ``select_attn_head_by_sum``) and ``llava/model/language_model/utils.py``
(``cluster_and_merge``: density-peak kNN clustering, as in TCFormer's ``cluster_dpc_knn``).

Algorithm (prefill only):

1. **Text raters** (once, from the layer-0 inputs): m = softmax_text(V T^T) (visual x text-after,
   raw dot products), averaged over the visual tokens; raters = text tokens whose relevance is
   above the mean relevance (:func:`select_raters`).
2. At each sparse layer l in {2, 6, 15} the layer runs on the current sequence; its attention
   probabilities (mean over heads; v2: after the gravity correction and over the 14 heads with the
   largest text->visual mass), rows = raters, columns = visual tokens, averaged over raters, score
   the visual tokens (:func:`rater_scores`). The layer's **output** keeps the top-n_s visual tokens
   (ascending order). In this engine that is the llm stage before layer l+1 reading
   ``attention(raters, layer="prev")`` = layer l's own attention.
3. **Recycling** (v1): of the pruned tokens take the top int(0.3 * P) + 1 by score, cluster their
   hidden states into int(m / 10) + 1 clusters with density-peak kNN clustering, and append each
   cluster's mean right after the kept visual tokens (:func:`recycle_pruned`,
   :func:`density_peak_clusters`; ``Selection`` targets = cluster centres, rule "mean").
4. Positions: v1 re-indexes (contiguous; decode positions = cache length), v2 keeps the original ids.

Counts: ``sparse_token_dict`` per budget (192 / 128 / 96 / 64), stated for 576 candidates; a sample
with N visual tokens (LLaVA-NeXT: all crops + newline tokens; Video-LLaVA: all frames) gets
floor(N * c / 576) (our design, docs/methods/sparsevlm.md). On a depth other than 32 the stage layers
are mapped with ``llava.ops.scale_layers`` (on the stage indices 3 / 7 / 16 of the engine) and the
retained counts rescaled so that the retained-only layer average matches the 32-layer schedule's
(``llava.ops.fit_stage_counts``); recycled tokens come on top, as in the official code.

Reference mode (option ``numerics="official"``; default ``"ours"``): the official numerics - the official
runs keep the LLM, its input embeddings and its attention in fp16 (``load_pretrained_model``:
``torch_dtype=torch.float16``), so the raters come from the fp16 product / softmax / mean of the fp16
layer-0 inputs; the per-head probabilities are cast to float16 (the official Python "sdpa",
``utils.scaled_dot_product_attention``, takes the softmax of fp16 logits, output fp16), v2 divides them by
the fp16 gravity of rotated all-ones q/k (transformers 4.37.2 RoPE: cos / sin of fp32 angles cast to fp16),
sums each head's mass in fp16 and takes ``torch.topk(14)``, the head and rater means are fp16 reductions,
the kept tokens, the recycled ones and the cluster centres come from ``torch.topk``, and the density-peak
clustering of the recycled tokens runs in fp16 on the fp16 layer output (strict ``>`` density order, no
tie-break). All of it in the run's own dtype: fp16 in a half-precision run, fp32 in an fp32 run (the official
code computes in its hidden states' dtype; an fp16 cast in an fp32 run moved a recycled token to another
cluster, docs/methods/sparsevlm.md). The default keeps fp32 scores / raters, fp64 clustering and ties to the
lower index.
"""

from __future__ import annotations

import math

import torch

from llava.method import BudgetError, Method, register
from llava.ops import NUMERICS_OPTION
from llava.ops import REFERENCE_DEPTH, check_numerics, fit_stage_counts, masked_take, scale_layers, scaled_count, topk_desc
from llava.selection import Selection

#: ``sparse_token_dict`` of score.py: retained visual tokens (of 576) after layers 2 / 6 / 15.
SCHEDULES = {
    "v1": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "v2": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}
DEFAULT_BUDGET = 192  # RETAIN_TOKN's default
#: dtype of the official LLM signals (embeddings, attention probabilities, hidden states) under the official
#: builder; the reference mode computes in the run's own dtype (fp32 in an fp32 run, as the official code does)
OFFICIAL_DTYPE = torch.float16


# ----------------------------------------------------------------------------------------------
# The algorithm
# ----------------------------------------------------------------------------------------------


def select_raters(visual_embeds: torch.Tensor, text_embeds: torch.Tensor, numerics: str = "ours",
                  dtype: torch.dtype = OFFICIAL_DTYPE) -> torch.Tensor:
    """SparseVLM 3.2: indices (into the text-after tokens, ascending) of the text raters.
    m = softmax over text of V T^T (N x T), mean over the N visual tokens -> relevance (T,);
    raters = relevance > mean(relevance) (fp32). ``numerics="official"``: the embeddings cast to ``dtype``
    (the official run's: fp16 under its builder, fp32 in an fp32 run) and every step in it with the official
    (batch-1) shapes."""
    check_numerics("sparsevlm", numerics)
    if numerics == "official":
        v, t = visual_embeds.to(dtype)[None], text_embeds.to(dtype)[None]
        m = (v @ t.transpose(1, 2)).softmax(2).mean(1)[0]
        return torch.nonzero(m > m.mean()).flatten()
    m = (visual_embeds.float() @ text_embeds.float().T).softmax(dim=1).mean(0)
    return torch.nonzero(m > m.mean()).flatten()


def rater_mask(visual_embeds: torch.Tensor, text_embeds: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """:func:`select_raters` over a padded text block (the fast path's captured prefill): ``text_embeds``
    (Q, D) with ``text_mask`` (Q,) its real rows. The softmax runs over the real rows only and the mean
    relevance is theirs; returns the raters as a (Q,) bool mask (no host read). A block whose relevance is
    uniform has no rater above the mean: then every real row rates (the eager stage's fallback)."""
    m = (visual_embeds.float() @ text_embeds.float().T).masked_fill(~text_mask, float("-inf")).softmax(dim=1).mean(0)
    mean = m.sum() / text_mask.sum().clamp(min=1)
    raters = (m > mean) & text_mask
    return torch.where(raters.any(), raters, text_mask)


def rope_gravity(pos_q: torch.Tensor, pos_k: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """SparseVLM+ 4.2's RoPE "gravity": the attention logit a constant all-ones query at ``pos_q``
    would give an all-ones key at ``pos_k`` under RoPE, divided by sqrt(d) (official: rotated
    ``new_ones`` q/k, ``matmul / sqrt(head_dim)``). With rotate-half RoPE and frequencies
    w_m = theta^(-2m/d) this is 2 * sum_m cos((i - j) * w_m) / sqrt(d). Returns (Q, K) in fp64."""
    d = int(head_dim)
    w = float(theta) ** (-torch.arange(0, d, 2, dtype=torch.float64, device=pos_q.device) / d)  # (d/2,)
    rel = pos_q.double()[:, None] - pos_k.double()[None, :]  # (Q, K)
    return 2.0 * torch.cos(rel[..., None] * w).sum(-1) / math.sqrt(d)


def official_rope_gravity(pos_q: torch.Tensor, pos_k: torch.Tensor, head_dim: int,
                          theta: float = 10000.0, dtype: torch.dtype = OFFICIAL_DTYPE) -> torch.Tensor:
    """:func:`rope_gravity` with the official fp16 numerics (transformers 4.37.2, pinned by the official
    repository): inv_freq = 1 / theta^(arange(0, d, 2) / d) and the angles t * inv_freq in fp32, their
    cos / sin cast to float16; all-ones q / k rotated in fp16 (``q * cos + rotate_half(q) * sin``); the
    fp16 product of the rotated rows divided by sqrt(d) in fp16. The official code multiplies the full
    (S, S) matrices; every entry depends on its two positions only, so the rows are built for the union of
    the positions and the product taken on those. Returns (Q, K) float16 (``dtype``: the run's, fp32 in an fp32
    run, where 4.37's tables are cast to the fp32 values' dtype and everything after runs in fp32)."""
    d = int(head_dim)
    pos = torch.cat([pos_q.reshape(-1), pos_k.reshape(-1)]).cpu().long()
    uniq, inv = torch.unique(pos, return_inverse=True)
    inv_freq = 1.0 / (float(theta) ** (torch.arange(0, d, 2).float() / d))
    ang = torch.outer(torch.arange(int(uniq.max()) + 1, dtype=inv_freq.dtype), inv_freq)  # the official cache
    emb = torch.cat((ang, ang), dim=-1)
    cos, sin = emb.cos().to(dtype)[uniq], emb.sin().to(dtype)[uniq]
    ones = torch.ones(uniq.numel(), d, dtype=dtype)
    rot = torch.cat((-ones[:, d // 2:], ones[:, :d // 2]), dim=-1)  # rotate_half
    r = (ones * cos + rot * sin)[None, None]  # (1, 1, U, d): identical for every head
    g = (torch.matmul(r, r.transpose(2, 3)) / math.sqrt(d))[0, 0]
    iq, ik = inv[:pos_q.numel()], inv[pos_q.numel():]
    return g[iq][:, ik].to(pos_q.device)


def select_heads(attn_rv: torch.Tensor, num: int, numerics: str = "ours",
                 dtype: torch.dtype = OFFICIAL_DTYPE) -> torch.Tensor:
    """SparseVLM+ 4.3 (``select_attn_head_by_sum``): the ``num`` heads with the largest total
    rater->visual attention. attn_rv (H, R, N). Returns head indices, best first (ties: lower).
    ``numerics="official"``: sums in ``dtype`` (the run's; fp16 under the official builder), ``torch.topk``."""
    check_numerics("sparsevlm", numerics)
    if numerics == "official":
        return attn_rv.to(dtype).sum((1, 2)).topk(max(0, min(int(num), attn_rv.shape[0]))).indices
    return topk_desc(attn_rv.float().sum((1, 2)), num)


def rater_scores(attn_rv: torch.Tensor, numerics: str = "ours", dtype: torch.dtype = OFFICIAL_DTYPE) -> torch.Tensor:
    """``attn_postprocess_topk``'s relation: attn_rv (H, R, N) rater-row attention restricted to
    the visual columns -> mean over heads, then over raters -> (N,). ``numerics="official"``: both means
    in ``dtype`` (the run's; fp16 under the official builder) with the official batch-1 shapes."""
    check_numerics("sparsevlm", numerics)
    if numerics == "official":
        return attn_rv.to(dtype)[None].mean(1).mean(1)[0]
    return attn_rv.float().mean(0).mean(0)


def density_peak_clusters(x: torch.Tensor, num_clusters: int,
                          knn: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak kNN clustering (``cluster_and_merge`` / TCFormer's DPC-kNN) of m points x (m, C).

    dist = ||x_i - x_j|| / sqrt(C); density_i = exp(-mean of the squared distances to its ``knn``
    nearest points, itself included; official knn = num_clusters); delta_i = distance to the nearest
    denser point (the densest point: the largest distance overall); centres = the ``num_clusters``
    points with the largest delta * density; every point joins its nearest centre, centres join
    themselves. Ties (our design, the official code adds 1e-6 uniform noise to the density): equal
    densities rank the lower index as denser; equal scores and equal distances go to the lower
    index / the earlier centre. Returns (centres (c,) best score first, assign (m,) centre slot)."""
    m, C = x.shape
    c = max(1, min(int(num_clusters), m))
    k = max(1, min(int(knn if knn is not None else c), m))
    xf = x.double()
    dist = torch.cdist(xf, xf) / math.sqrt(C)
    near = torch.topk(dist, k, dim=-1, largest=False).values  # self (0) included
    density = torch.exp(-(near ** 2).mean(-1))
    idx = torch.arange(m, device=x.device)
    # denser[i, j]: j is denser than i (equal densities: the lower index counts as denser)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None]))
    delta = torch.where(denser, dist, dist.max()).min(dim=-1).values
    centres = topk_desc(delta * density, c)
    assign = dist[:, centres].argmin(dim=1)  # first minimum = earlier centre
    assign[centres] = torch.arange(c, device=x.device)
    return centres, assign


def official_density_peak_clusters(x: torch.Tensor, num_clusters: int,
                                   dtype: torch.dtype = OFFICIAL_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`density_peak_clusters` with the official numerics (``utils.cluster_and_merge``): x cast to
    ``dtype`` and every step in it (the official code computes in its hidden states' dtype: fp16 under its
    builder, fp32 in an fp32 run; the method passes the run's) - distances ``(x_i - x_j).norm()`` / sqrt(C), density = exp(-mean of the
    ``num_clusters`` smallest squared distances), a point is denser than another only if its density is
    strictly larger (equal densities: neither; the densest points get the largest distance), centres by
    ``torch.topk`` of delta * density (in its order), every point to the first nearest centre, centres to
    themselves. The official code adds ``rand * 1e-6`` to the fp16 densities, which is below half an fp16
    ulp for every density >= 2^-8 (then a no-op); it is not reproduced (random). The distance matrix is
    built in row blocks (same values as the official (m, m, C) difference tensor, less memory).
    Returns (centres (c,) in topk order, assign (m,) centre slot)."""
    xh = x.to(dtype)
    m, C = xh.shape
    c = max(1, min(int(num_clusters), m))
    step = max(1, (1 << 24) // max(1, m * C))
    dist = torch.cat([(xh[i:i + step, None, :] - xh[None, :, :]).norm(dim=-1, p=2) for i in range(0, m, step)])
    dist = dist / (C ** 0.5)
    near = torch.topk(dist, k=c, dim=-1, largest=False).values
    density = (-(near ** 2).mean(dim=-1)).exp()
    mask = (density[None, :] > density[:, None]).to(xh.dtype)  # [i, j]: j strictly denser than i
    delta = (dist * mask + dist.max() * (1 - mask)).min(dim=-1).values
    centres = torch.topk(delta * density, k=c, dim=-1).indices
    assign = dist[centres].argmin(dim=0)  # (c, m) rows of the centres; first minimum
    assign[centres] = torch.arange(c, device=x.device)
    return centres, assign


def recycle_pruned(scores: torch.Tensor, pruned: torch.Tensor, hidden: torch.Tensor, ratio: float = 0.3,
                   divisor: int = 10, numerics: str = "ours", return_order: bool = False,
                   dtype: torch.dtype = OFFICIAL_DTYPE) -> tuple[torch.Tensor, ...]:
    """SparseVLM v1 token recycling. ``scores`` (N,) of all visual tokens, ``pruned`` (P,) indices of
    the pruned ones (ascending), ``hidden`` (N, D) the visual tokens' states (the sparse layer's
    output). Keeps the top int(P * ratio) + 1 pruned tokens by score, clusters them into
    int(m / divisor) + 1 groups (:func:`density_peak_clusters`). Returns merge ``targets`` (cluster
    centres, as indices into the N visual tokens) and ``assign`` (N,): each recycled token's cluster
    slot, -1 for all other tokens - a ``Selection`` with rule "mean" then yields the cluster means.
    ``numerics="official"``: the recycled tokens by ``torch.topk`` of the (fp16) scores, in topk order,
    clustered by :func:`official_density_peak_clusters` in ``dtype``. ``return_order``: also the recycled tokens (m,) in
    the order they are clustered (the official ``cluster_and_merge`` input rows: its ``index_add_`` order)."""
    check_numerics("sparsevlm", numerics)
    n = scores.numel()
    assign = torch.full((n,), -1, dtype=torch.long, device=scores.device)
    if pruned.numel() == 0:
        none = torch.zeros(0, dtype=torch.long, device=scores.device)
        return (none, assign, none) if return_order else (none, assign)
    m = min(int(pruned.numel() * ratio) + 1, pruned.numel())
    num = int(m / divisor) + 1
    if numerics == "official":
        recycled = pruned[scores[pruned].topk(m).indices]
        centres, slots = official_density_peak_clusters(hidden[recycled], num, dtype)
    else:
        recycled = pruned[topk_desc(scores[pruned], m)]
        centres, slots = density_peak_clusters(hidden[recycled], num)
    assign[recycled] = slots
    return (recycled[centres], assign, recycled) if return_order else (recycled[centres], assign)


def recycled_count(n_pruned: int, ratio: float = 0.3, divisor: int = 10) -> int:
    """Clusters appended for ``n_pruned`` pruned tokens: int(m / divisor) + 1, m = int(P * ratio) + 1."""
    if n_pruned <= 0:
        return 0
    m = min(int(n_pruned * ratio) + 1, n_pruned)
    return min(int(m / divisor) + 1, m)


def sparsevlm_layer_counts(n_visual: int, layers: tuple[int, ...], retained: tuple[int, ...], num_layers: int,
                           recycle: bool, ratio: float = 0.3, divisor: int = 10) -> list[int]:
    """Visual tokens in the input of every decoder layer (stages before ``layers``), recycled
    clusters included. A stage whose count is >= the current tokens keeps them all."""
    out, v, bounds = [], int(n_visual), [*layers, num_layers]
    out += [v] * bounds[0]
    for s, n_s in enumerate(retained):
        if n_s < v:
            v = n_s + (recycled_count(v - n_s, ratio, divisor) if recycle else 0)
        out += [v] * (bounds[s + 1] - bounds[s])
    return out


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------


@register
class SparseVLM(Method):
    """SparseVLM: text raters score the visual tokens with the attention of layers 2 / 6 / 15; the
    rest is pruned (v1: partly recycled into cluster means).

    ``budget`` selects the official schedule (192 / 128 / 96 / 64; default 192 = ``RETAIN_TOKN``):
    these are the paper's nominal equivalent tokens; the engine reports the real layer average
    (about 206 for 192 with recycling, docs/methods/sparsevlm.md)."""

    name = "sparsevlm"
    llm_reads = ("prev",)  # the sparse layer's own attention (and keys)
    #: every stage's counts are host values (the schedule, the recycled clusters of the pruned count); only
    #: the rater set is data-dependent, and the captured stage reads it as a mask over the padded text rows
    capturable = "full"
    llm_text_rows = True
    llm_text_cap = 1  # the stage tells "no text after the image" (zero scores) from "some"
    position_mode = "reindex"
    query_aware = True  # text raters from the prompt text after the image

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            # "v1" (SparseVLM, ICML 2025) or "v2" (SparseVLM+: v2 schedule, kept position ids,
            # gravity correction, head selection, no recycling). position_mode None = per version.
            "version": "v1",
            # sparse layers (0-based) whose output is pruned, stated for a 32-layer LLM; the engine
            # stages are these + 1, mapped with llava.ops.scale_layers
            "layers": (2, 6, 15),
            # explicit retained counts (of 576) per sparse layer; None = the official schedule of
            # the budget. Excludes a budget.
            "schedule": None,
            # v1 recycling: None = on for v1, off for v2; fraction of the pruned tokens recycled
            # (int(P * ratio) + 1) and tokens per cluster (int(m / divisor) + 1)
            "recycle": None,
            "recycle_ratio": 0.3,
            "cluster_divisor": 10,
            # SparseVLM+ gravity correction (None = on for v2 only) and RoPE base it assumes
            # (LLaVA-1.5 / NeXT / Video-LLaVA Vicuna: 10000)
            "gravity": None,
            "rope_theta": 10000.0,
            # SparseVLM+ head selection: heads kept (official 14; None = 14 for v2, all heads for
            # v1); clipped to the model's head count
            "heads": None,
            "scale_layers": True,
            # "ours" (fp32 raters / scores, fp64 clustering, ties to the lower index) or "official"
            # (reference mode: fp16 raters, scores, gravity, head sums and clustering, torch.topk)
            "numerics": NUMERICS_OPTION,
        }

    def __init__(self, budget=None, **options):
        version = options.get("version", "v1")
        if version not in SCHEDULES:
            raise ValueError(f"sparsevlm: version must be 'v1' or 'v2', got {version!r}")
        if options.get("position_mode") is None:
            options["position_mode"] = "keep" if version == "v2" else "reindex"
        if budget is not None and options.get("schedule") is not None:
            raise ValueError("sparsevlm: give either a budget or an explicit schedule, not both")
        if budget is None and options.get("schedule") is None:
            budget = DEFAULT_BUDGET
        if budget is not None and budget not in SCHEDULES[version]:
            raise ValueError(f"sparsevlm: no official {version} schedule for budget {budget}; "
                             f"use one of {sorted(SCHEDULES[version])} or an explicit `schedule`")
        super().__init__(budget, **options)
        v2 = self.version == "v2"
        self.recycle = (not v2) if self.recycle is None else bool(self.recycle)
        self.gravity = v2 if self.gravity is None else bool(self.gravity)
        self.heads = (14 if v2 else 0) if self.heads is None else int(self.heads)
        if self.schedule is not None and len(self.schedule) != len(self.layers):
            raise ValueError("sparsevlm: schedule and layers must have the same length")
        self._retained_ref = tuple(int(c) for c in (self.schedule or SCHEDULES[self.version][self.budget]))
        self.setup(num_layers=REFERENCE_DEPTH, num_vision_layers=24, family="llava")

    def setup(self, *, num_layers, num_vision_layers, family):
        super().setup(num_layers=num_layers, num_vision_layers=num_vision_layers, family=family)
        self._stages_ref = tuple(int(l) + 1 for l in self.layers)  # prune the output of layer l
        self._stages = scale_layers(self._stages_ref, num_layers) if self.scale_layers else self._stages_ref
        self._stage_memo: dict = {}  # (N, depth, stages) -> stage_counts, filled on the host (the fast path's dry run)

    @property
    def llm_layers(self):
        return self._stages

    def stage_counts(self, n_visual: int) -> tuple[int, ...]:
        """Retained (not recycled) visual tokens after each sparse layer for N visual tokens. Memoised per
        (N, depth): the fast path's dry run fills it on the host, so a captured stage only looks it up (the
        exact ``Fraction`` arithmetic of ``fit_stage_counts`` is not traceable)."""
        key = (int(n_visual), self.num_layers, self._stages)
        memo = self._stage_memo  # a plain attribute (setup): torch 2.11's dynamo cannot trace __dict__.setdefault
        if key not in memo:
            counts = [scaled_count(n_visual, c) for c in self._retained_ref]
            memo[key] = tuple(fit_stage_counts(n_visual, counts, self._stages_ref, self._stages, self.num_layers))
        return memo[key]

    def layer_counts(self, n_visual: int) -> list[int]:
        """Predicted visual tokens per decoder layer (recycled clusters included)."""
        return sparsevlm_layer_counts(n_visual, self._stages, self.stage_counts(n_visual), self.num_layers,
                                      self.recycle, self.recycle_ratio, self.cluster_divisor)

    @staticmethod
    def _gravity_head_dim(sig) -> int:
        """The head size the RoPE gravity is computed for (the sparse layer's keys); refused on 3-D M-RoPE."""
        if sig.position_ids.dim() != 1:
            raise BudgetError("sparsevlm v2's RoPE-gravity correction is defined for 1-D RoPE positions; this model uses "
                             "3-D M-RoPE (the Qwen-VL families): use version='v1' (or gravity=False)")
        return sig.keys("prev", rope=False).shape[-1]

    def _scores(self, sig, raters: torch.Tensor) -> torch.Tensor:
        rows = sig.text_after[raters]
        # (H, R, N): the sparse layer's own; reference mode: as the fork's Python SDPA computes them (fp16 q k^T,
        # * 1 / sqrt(d), the softmax in the model's dtype), not fp32 rows cast afterwards
        logits = "python_sdpa" if self.numerics == "official" else "fp32"
        attn = sig.attention(rows, layer="prev", logits=logits)[:, :, sig.visual]
        if self.numerics == "official":
            return self._official_scores(sig, rows, attn)
        if self.gravity:
            d = self._gravity_head_dim(sig)
            g = rope_gravity(sig.position_ids[rows].cpu(), sig.position_ids[sig.visual].cpu(), d, self.rope_theta)
            attn = (attn.double() / g.to(attn.device)[None]).float()
        if self.heads and self.heads < attn.shape[0]:
            attn = attn[select_heads(attn, self.heads)]
        return rater_scores(attn)

    def _official_scores(self, sig, rows: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Reference mode, in the run's dtype (fp16 under the official builder; fp32 in an fp32 run, as the
        official code run in fp32): the probabilities; v2: the gravity division and the head sums; the means."""
        dtype = sig.hidden.dtype
        attn = attn.to(dtype)
        if self.gravity:
            d = self._gravity_head_dim(sig)
            g = official_rope_gravity(sig.position_ids[rows], sig.position_ids[sig.visual], d, self.rope_theta,
                                      dtype)
            attn = attn / g.to(attn.device)[None]
        if self.heads and self.heads < attn.shape[0]:
            attn = attn[select_heads(attn, self.heads, "official", dtype)]
        return rater_scores(attn, "official", dtype)

    def _captured_scores(self, sig) -> torch.Tensor:
        """:meth:`_scores` inside a captured prefill: every padded text-after row's attention, the raters
        read through their mask (``torch.where``, the pad rows may hold NaN): the head sums and the rater
        mean over the rater rows only. fp32 (the gravity in fp64 on the device)."""
        raters = sig.state["raters"]
        attn = sig.attention(sig.text_after, layer="prev")[:, :, sig.visual]  # (H, Q, N)
        if self.gravity:
            d = self._gravity_head_dim(sig)
            g = rope_gravity(sig.position_ids[sig.text_after], sig.position_ids[sig.visual], d, self.rope_theta)
            attn = (attn.double() / g[None]).float()
        attn = torch.where(raters[None, :, None], attn.float(), 0.0)
        if self.heads and self.heads < attn.shape[0]:
            attn = attn[select_heads(attn, self.heads)]  # the rater rows' sums (the others hold 0)
        return attn.mean(0).sum(0) / raters.sum().clamp(min=1)

    def select_llm(self, stage, sig):
        if sig.captured:
            return self._select_captured(stage, sig)
        if "raters" not in sig.state:  # fixed once per prefill from all visual tokens' layer-0 inputs
            sig.state["raters"] = select_raters(sig.entry_visual_embeds, sig.text_embeds, self.numerics,
                                                dtype=sig.hidden.dtype)
        raters, n_orig = sig.state["raters"], sig.num_visual_entry
        v = sig.num_visual
        k = self.stage_counts(n_orig)[stage]
        if k >= v:
            # the official topk(min(n_s, v - 1)) would still move the lowest-scored token behind
            # the others (pruned, then recycled as a cluster of one); we keep the stage a no-op
            return Selection(keep=torch.arange(v, device=sig.visual.device))
        if raters.numel() == 0:  # a single (or uniform) text token: every text-after token rates (our design)
            raters = torch.arange(sig.text_after.numel(), device=sig.text_after.device)
        if raters.numel() == 0:  # no text after the image: nothing rates; keep the first k (our design)
            scores = torch.zeros(v, device="cpu")  # selected on the host, as the scores below
        else:
            scores = self._scores(sig, raters).cpu()
        if self.numerics == "official":
            keep = scores.topk(k).indices.sort().values
        else:
            keep = topk_desc(scores, k).sort().values
        if not self.recycle:
            return Selection(keep=keep)
        mask = torch.ones(v, dtype=torch.bool, device=scores.device)
        mask.index_fill_(0, keep, False)  # not mask[keep] = False: a host scalar's copy (no capture)
        pruned = masked_take(torch.arange(v, device=scores.device), mask, v - keep.numel())
        targets, assign, recycled = recycle_pruned(scores, pruned, sig.hidden[sig.visual].cpu(), self.recycle_ratio,
                                                   self.cluster_divisor, self.numerics, return_order=True,
                                                   dtype=sig.hidden.dtype)
        if self.numerics == "official":  # cluster_and_merge's index_add_ of x * (1 / (size + 1e-6)), in topk order
            return Selection(keep=keep, targets=targets, assign=assign, rule="weighted_mean", arithmetic="sequential",
                             merge_order=recycled)
        return Selection(keep=keep, targets=targets, assign=assign, rule="mean")

    def _select_captured(self, stage, sig):
        """:meth:`select_llm` in a captured prefill (fast path, ``numerics="ours"``): the same counts (host
        values), the raters as a mask over the padded text rows (:func:`rater_mask`), the scores, the top k
        and the recycling on the device."""
        v, k = sig.num_visual, self.stage_counts(sig.num_visual_entry)[stage]
        dev = sig.visual.device
        if k >= v:
            return Selection(keep=torch.arange(v, device=dev))
        if sig.num_text_after == 0:  # nothing rates: the first k (the eager stage's zero scores)
            scores = torch.zeros(v, device=dev)
        else:
            if "raters" not in sig.state:
                sig.state["raters"] = rater_mask(sig.entry_visual_embeds, sig.text_embeds, sig.text_mask)
            scores = self._captured_scores(sig)
        keep = topk_desc(scores, k).sort().values
        if not self.recycle:
            return Selection(keep=keep)
        mask = torch.ones(v, dtype=torch.bool, device=dev)
        mask.index_fill_(0, keep, False)  # not mask[keep] = False: a host scalar's copy (no capture)
        pruned = masked_take(torch.arange(v, device=dev), mask, v - k)
        targets, assign = recycle_pruned(scores, pruned, sig.hidden[sig.visual], self.recycle_ratio,
                                         self.cluster_divisor)
        return Selection(keep=keep, targets=targets, assign=assign, rule="mean")
