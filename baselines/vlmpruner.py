"""VLM-Pruner: centrifugal token selection with spatial buffering (CVPR 2026, arXiv 2512.02700),
docs/methods/vlmpruner.md.

Official code: Casey-bit/VLMPruner at 556a9142c67dfb4c27420e31bb59e2efe502369a -
``llava/model/language_model/modeling_llama_self.py``: the hook in ``VLMPruner.forward`` (lines 331-362),
``calculate_similarity`` (399-406), ``get_spatial_pos`` (409-413) and ``get_retained_image_token`` (415-521);
Qwen2-VL: ``Qwen2-VL/Qwen2VL_VLMPruner/modeling_qwen2_vl_self.py`` (340-365, 402-530).

Algorithm (one llm stage at the input of decoder layer K = 2, prefill only), over the N visual tokens, from layer
K-1's output hidden states H (``LLMSignals.hidden``) and its post-RoPE keys (``LLMSignals.keys("prev")``, heads
concatenated):

1. pivots (kappa = 4): the token of largest key L1 norm, then farthest-point sampling in key space (Euclidean);
2. similarity: cosine among the visual tokens on the 256 channels of H with the largest variance across them;
   spatial distance D: Euclidean on each token's (column, row) in its image's patch grid, normalised by the grid's
   diagonal (the official 1 / (24 sqrt 2) on LLaVA-1.5's 24 x 24 grid);
3. buffered similarity of a candidate c to the selected set S: sim(c, s) * (1 + 0.5 * min_{s' in S} D(c, s') *
   norm) for every s (a candidate far from everything selected looks more redundant);
4. parallel greedy rounds: threshold 0.8, +0.1 per round; each round orders the candidates by 1 - max buffered
   similarity (most novel first) and walks them in batches of 16, each batch scored against the current S; a batch
   member joins if its max is below the threshold (on overflow the batch's most novel fill up to k); a round whose
   first batch adds nothing ends the selection (the count may then stay below k, as in the official code);
5. recovery: each discarded token goes to its most similar selected token (plain similarity); a selected token
   that absorbed any (positive total similarity) becomes 0.3 * h_s + 0.7 * sum_d w_d h_d, w = the similarities /
   their sum (``Selection.values``: the kept hidden states rewritten);
6. the kept tokens in their original order at their original positions; earlier layers' caches untouched.

Count: ``keep_tokens`` = the official count kept after layer K: round(N * (1 - reduction_ratio)) (LLaVA: 192 / 128
/ 64 of 576 for 0.667 / 0.778 / 0.889; the Qwen2-VL rule truncates); a ``budget`` is our equivalent-token
convention (the layer average) turned into that count as for FastV.

Reference mode (``numerics="official"``): the official arithmetic in the model's dtype (L1 norm, ``cdist``,
``var``, ``cosine_similarity`` over the broadcast pair, the fp32 spatial factor, ``argsort`` / ``topk`` tie
order, the recovery's matmul and mix). Ours: keys, variance, cosine and the recovery in fp32, ties to the lower
index. The greedy walk runs on the host in both (one copy of the N x N similarity per sample): eager engine only.
"""

from __future__ import annotations

import logging
import math

import torch

from llava.families import registry
from llava.method import Method, register
from llava.ops import NUMERICS_OPTION
from llava.ops import equivalent_kept_count, scale_layers, topk_desc
from llava.selection import Selection

log = logging.getLogger(__name__)

#: official constants (modeling_llama_self.py): spatial weight (405), variance channels (444), recovery mix (513-514)
SPATIAL_WEIGHT = 0.5
CHANNELS = 256
OWN, ABSORBED = 0.3, 0.7
#: families whose counts round down (the official Qwen2-VL code): the Qwen-VL models (their record's ``qwen_grid``)
QWEN_FAMILIES = registry.where(qwen_grid=True)


def _cdist(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    """``torch.cdist`` in the inputs' dtype; where the device has no half-precision kernel (the CPU), in fp32
    rounded to that dtype."""
    if a.dtype in (torch.float16, torch.bfloat16) and a.device.type == "cpu":
        return torch.cdist(a.float(), b.float(), compute_mode=mode).to(a.dtype)
    return torch.cdist(a, b, compute_mode=mode)


def pivot_tokens(keys: torch.Tensor, kappa: int, numerics: str = "ours") -> torch.Tensor:
    """The ``kappa`` pivots (kappa,) among N tokens with keys (N, D): argmax of the L1 norm, then farthest-point
    sampling (each next pivot maximises its Euclidean distance to the nearest pivot so far). "ours": fp32, exact
    distances; "official": ``torch.norm(p=1)`` and ``torch.cdist`` in the keys' dtype. Ties: ``argmax``'s first."""
    k = keys if numerics == "official" else keys.float()
    n = k.shape[0]
    kappa = max(0, min(int(kappa), n))
    piv = torch.zeros(kappa, dtype=torch.long, device=k.device)
    if kappa == 0:
        return piv
    piv[0] = torch.norm(k, p=1, dim=-1).argmax()
    mode = "use_mm_for_euclid_dist_if_necessary" if numerics == "official" else "donot_use_mm_for_euclid_dist"
    for i in range(1, kappa):
        d = _cdist(k, k[piv[:i]], mode)
        piv[i] = d.min(dim=1).values.argmax()
    return piv


def feature_similarity(h: torch.Tensor, channels: int = CHANNELS, numerics: str = "ours") -> torch.Tensor:
    """Cosine similarity (N, N) of N tokens' hidden states h (N, D) on the ``channels`` channels of largest
    (unbiased) variance across them (all channels when D is smaller). "official": in h's dtype with
    ``cosine_similarity`` over the broadcast pairs; "ours": fp32 unit rows and one product."""
    x = h if numerics == "official" else h.float()
    c = min(int(channels), x.shape[1])
    var = x.var(dim=0)
    idx = torch.topk(var, k=c).indices if numerics == "official" else topk_desc(var, c)
    s = x[:, idx]
    if numerics == "official":
        return torch.nn.functional.cosine_similarity(s.unsqueeze(1), s.unsqueeze(0), dim=-1)
    u = torch.nn.functional.normalize(s, dim=-1, eps=1e-8)
    return u @ u.T


def buffered_similarity(sim: torch.Tensor, dist: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """The official ``calculate_similarity``: sim (C, S) of candidates to selected tokens times 1 + 0.5 * (each
    candidate's least spatial distance to the selected, dist (C, S)) * its grid norm (C,); fp32 (as the official
    fp16 similarity times the fp32 spatial factor)."""
    reward = torch.amin(dist, dim=1, keepdim=True) * norm[:, None]
    return sim * (1.0 + SPATIAL_WEIGHT * reward)


def greedy_select(sim: torch.Tensor, dist: torch.Tensor, norm: torch.Tensor, pivots: list[int], k: int,
                  threshold: float = 0.8, batch: int = 16, numerics: str = "ours") -> list[int]:
    """The official parallel greedy rounds (``get_retained_image_token`` 454-495) on host tensors; returns the
    selected tokens in the order they joined (pivots first). sim (N, N), dist (N, N) fp32, norm (N,) fp32."""
    n = sim.shape[0]
    selected = list(pivots)
    tau = threshold - 0.1
    pre = 0
    official = numerics == "official"
    while len(selected) < k:
        if pre == len(selected):
            break
        pre = len(selected)
        tau = tau + 0.1
        mask = torch.ones(n, dtype=torch.bool)
        mask[torch.tensor(selected, dtype=torch.long)] = False
        cand = torch.arange(n)[mask]
        if len(cand) == 0:
            break
        s_idx = torch.tensor(selected, dtype=torch.long)
        nondup = 1.0 - buffered_similarity(sim[cand][:, s_idx], dist[cand][:, s_idx], norm[cand]).max(dim=1).values
        order = (torch.argsort(nondup, descending=True) if official
                 else torch.sort(nondup, descending=True, stable=True).indices)
        ordered = cand[order]
        for i in range(0, len(order), batch):
            if i == batch and pre == len(selected):
                break
            b = ordered[i:i + batch]
            s_idx = torch.tensor(selected, dtype=torch.long)
            mx = buffered_similarity(sim[b][:, s_idx], dist[b][:, s_idx], norm[b]).max(dim=1).values
            valid = b[mx < tau]
            if len(selected) + len(valid) > k:
                need = k - len(selected)
                pick = torch.topk(1.0 - mx, need).indices if official else topk_desc(1.0 - mx, need)
                valid = b[pick]
            if len(valid) > 0:
                selected.extend(valid.tolist())
                if len(selected) >= k:
                    break
    return selected


def recover(h: torch.Tensor, sim: torch.Tensor, selected: torch.Tensor, numerics: str = "ours") -> torch.Tensor:
    """The official recovery (``get_retained_image_token`` 497-509): the selected tokens' rows (S, D) of h (N, D)
    after each discarded token joined its most similar selected one (sim (N, N)) and every selected token with a
    positive total became 0.3 * own + 0.7 * sum_d w_d h_d, w_d = sim / that total (clamp 1e-8). "official": in h's
    dtype; "ours": fp32, one rounding to h's dtype. ``selected`` in the official order of its columns (ties of the
    assignment go to the earlier column)."""
    n = h.shape[0]
    keep = torch.zeros(n, dtype=torch.bool, device=h.device)
    keep[selected] = True
    disc = torch.arange(n, device=h.device)[~keep]
    dt = h.dtype if numerics == "official" else torch.float32
    hs = h[selected].to(dt)
    if disc.numel() == 0:
        return hs.to(h.dtype)
    ds = sim[disc][:, selected].to(dt)  # (Dn, S)
    arg = ds.max(dim=1).indices
    one_hot = torch.zeros_like(ds).scatter_(1, arg[:, None], 1)
    w = ds * one_hot
    w = w / w.sum(dim=0, keepdim=True).clamp(min=1e-8)
    agg = torch.mm(w.T, h[disc].to(dt))
    upd = w.sum(dim=0) > 0
    out = torch.where(upd[:, None], OWN * hs + ABSORBED * agg, hs)
    return out.to(h.dtype)


def grid_coords(vision, origin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each current visual token's (column, row) (N, 2) fp32 in its unit's patch grid and that grid's norm
    1 / sqrt(rows^2 + cols^2) (N,) fp32, from the vision signals' ``patch`` / ``unit`` / grids (the official code's
    i mod 24, i // 24 and 1 / (24 sqrt 2) on LLaVA-1.5). A newline token (patch -1) takes the place right of the
    token before it."""
    dev = origin.device
    patch = vision.patch.to(dev)[origin]
    unit = vision.unit.to(dev)[origin]
    grids = vision.unit_grid
    if not grids:  # one grid for every unit
        grids, unit = [tuple(vision.grid)], torch.zeros_like(unit)
    cols = torch.tensor([int(g[1]) for g in grids], dtype=torch.long, device=dev)
    norms = torch.tensor([1.0 / (int(g[1]) * math.sqrt(2)) if int(g[0]) == int(g[1])
                          else 1.0 / math.sqrt(int(g[0]) ** 2 + int(g[1]) ** 2) for g in grids],
                         dtype=torch.float32, device=dev)
    ar = torch.arange(patch.numel(), device=dev)
    real = patch >= 0
    prev = torch.cummax(torch.where(real, ar, torch.full_like(ar, -1)), 0).values  # the last real token so far
    src = prev.clamp(min=0)
    p, u = patch[src].clamp(min=0), unit[src].clamp(min=0)
    c = cols[u]
    x = (p % c) + (~real).long()
    y = p // c
    return torch.stack([x, y], dim=-1).float(), norms[u]


@register
class VLMPruner(Method):
    """VLM-Pruner: at the input of decoder layer 2, keep pivots of layer 1's keys plus the visual tokens that a
    spatially-buffered greedy walk finds non-redundant, then fold each discarded token's hidden state into its most
    similar kept one (0.3 own + 0.7 weighted mean). Eager engine only (a data-dependent greedy walk).

    ``budget`` (optional): equivalent visual tokens (layer average), turned into the count kept after layer K. Or
    ``keep_tokens`` (that count directly) or ``reduction_ratio`` (the official argument; default 0.889: 64 of
    576)."""

    name = "vlmpruner"
    llm_reads = ("prev",)  # layer K-1's keys
    llm_vision_signals = True  # the tokens' patch grids (LLMSignals.vision)
    capturable = None
    capture_reason = ("vlmpruner: its parallel greedy rounds are a data-dependent walk on the host (one copy of the "
                      "similarity matrix per sample) and its recovery rewrites kept hidden states (Selection.values), "
                      "which a captured llm stage refuses: the prefill runs on the eager engine")
    position_mode = "keep"
    families = registry.where(hybrid=False)  # attention in every decoder layer
    unsupported_reason = ("refused on the hybrid Qwen3.5 decoder like the other in-LLM methods: layer K-1 would be a "
                          "Gated DeltaNet layer without keys; use a pre-LLM method there")

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            # K (official pruned_layer 2: the keys and hidden states of layer K-1 = 1), stated for a 32-layer LLM
            "layer": 2,
            # map `layer` from a 32-layer LLM onto the model's depth (llava.ops.scale_layers)
            "scale_layers": True,
            # the official count after layer K; None: from the budget or reduction_ratio
            "keep_tokens": None,
            # the official reduction_ratio (0.667 / 0.778 / 0.889 -> 192 / 128 / 64 of 576)
            "reduction_ratio": 0.889,
            # count from the ratio: "auto" (Qwen2-VL / Qwen2.5-VL / Qwen3-VL: "floor", the official Qwen2-VL int(); others:
            # "round", the official LLaVA round()), "round" or "floor"
            "rounding": "auto",
            # official pivot_image_token, threshold (+0.1 per round), token_batch
            "pivots": 4,
            "threshold": 0.8,
            "token_batch": 16,
            # the variance channels of the similarity (official 256; all channels when the model has fewer)
            "channels": CHANNELS,
            # "ours" (fp32 keys / similarity / recovery, ties to the lower index) or "official" (reference mode)
            "numerics": NUMERICS_OPTION,
        }

    def __init__(self, budget=None, **options):
        if budget is not None and options.get("keep_tokens") is not None:
            raise ValueError("vlmpruner: give either a budget (equivalent tokens) or keep_tokens, not both")
        super().__init__(budget, **options)
        if int(self.layer) < 1:
            raise ValueError(f"vlmpruner: layer must be >= 1, got {self.layer}")
        if self.keep_tokens is not None and (isinstance(self.keep_tokens, bool) or int(self.keep_tokens) < 0
                                             or self.keep_tokens != int(self.keep_tokens)):
            raise ValueError(f"vlmpruner: keep_tokens must be a whole number >= 0, got {self.keep_tokens!r}")
        if not 0.0 <= float(self.reduction_ratio) <= 1.0:
            raise ValueError(f"vlmpruner: reduction_ratio must be in [0, 1], got {self.reduction_ratio}")
        if self.rounding not in ("auto", "round", "floor"):
            raise ValueError(f"vlmpruner: rounding must be 'auto', 'round' or 'floor', got {self.rounding!r}")
        if int(self.pivots) < 1 or int(self.token_batch) < 1 or int(self.channels) < 1:
            raise ValueError("vlmpruner: pivots, token_batch and channels must be >= 1")

    @property
    def k_layer(self) -> int:
        n = self.num_layers
        return scale_layers([int(self.layer)], n)[0] if self.scale_layers else int(self.layer)

    @property
    def llm_layers(self):
        return (self.k_layer,)

    @property
    def rounding_rule(self) -> str:
        if self.rounding != "auto":
            return self.rounding
        return "floor" if self.family in QWEN_FAMILIES else "round"

    def kept_count(self, n_visual: int) -> int:
        """The most tokens kept after layer K (the greedy walk may stop below it, as the official code)."""
        n = int(n_visual)
        if self.keep_tokens is not None:
            return min(int(self.keep_tokens), n)
        if self.budget is not None:
            k = equivalent_kept_count(self.budget, n, self.k_layer, self.num_layers)
            if k == 0 and n and not getattr(self, "_warned", False):
                self._warned = True
                log.warning("vlmpruner: budget %d is below K*N/L for N=%d visual tokens; keeping none after layer %d",
                            self.budget, n, self.k_layer)
            return k
        x = n * (1 - float(self.reduction_ratio))
        k = max(0, min(n, round(x) if self.rounding_rule == "round" else int(x)))
        if self.numerics == "official":  # the official walk starts from all its pivots, whatever the count
            k = max(k, min(int(self.pivots), n))
        return k

    def layer_counts(self, n_visual: int) -> list[int]:
        """Visual tokens entering every decoder layer (at most: the greedy walk may keep fewer)."""
        L, K = self.num_layers, self.k_layer
        return [int(n_visual)] * K + [self.kept_count(n_visual)] * (L - K)

    def select_llm(self, stage, sig):
        n = sig.num_visual
        k = self.kept_count(n)
        dev = sig.visual.device
        if k >= n:
            return Selection(keep=torch.arange(n, device=dev))
        if k == 0:
            return Selection(keep=torch.zeros(0, dtype=torch.long, device=dev))
        if sig.vision is None:
            raise ValueError("vlmpruner: the engine gave no vision signals (the tokens' patch grid)")
        num = self.numerics
        keys = sig.keys("prev", rope=True)[sig.visual]  # (N, H_kv, d): layer K-1's post-RoPE keys
        keys = keys.reshape(n, -1)
        h = sig.hidden[sig.visual]  # layer K-1's output, the input of layer K
        # the official code always takes its kappa pivots (a count below kappa keeps them all: the reference mode);
        # ours takes at most k, so that a budget's count holds
        piv = pivot_tokens(keys, min(int(self.pivots), n if num == "official" else k), num)
        sim = feature_similarity(h, int(self.channels), num)
        pos, norm = grid_coords(sig.vision, sig.origin)
        mode = "use_mm_for_euclid_dist_if_necessary" if num == "official" else "donot_use_mm_for_euclid_dist"
        dist = torch.cdist(pos, pos, compute_mode=mode)
        # the greedy walk on the host: one copy of the similarity / distances (the official .tolist() per batch)
        host = [t.cpu() for t in (sim, dist, norm, piv)]
        chosen = greedy_select(host[0], host[1], host[2], host[3].tolist(), k, float(self.threshold),
                               int(self.token_batch), num)
        chosen = list(dict.fromkeys(chosen))  # a repeated pivot (keys all alike) once: the engine keeps no token twice
        order = torch.tensor(chosen, dtype=torch.long, device=dev)
        cols = order if num == "official" else order.sort().values
        rows = recover(h, sim, cols, num)  # the kept tokens' rewritten hidden states, in `cols` order
        srt = cols.sort()
        return Selection(keep=srt.values, values=rows[srt.indices])
