"""Stage schedules and counts of the in-LLM methods: decoder layers scaled to a model's depth, layer-average
(equivalent) budgets, stage counts fitted to a depth, and PyramidDrop's last-row top-k (VScan's LLM stage too).
Part of :mod:`llava.ops`."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import torch

from .select import check_numerics, topk_desc

# ----------------------------------------------------------------------------------------------
# In-LLM schedules: layer-average budgets (FastV, DART, PyramidDrop, SparseVLM) and the last-row
# top-k of PyramidDrop's stage (VScan's too)
# ----------------------------------------------------------------------------------------------

#: in-LLM schedules are stated for LLaVA-1.5-7B: 32 decoder layers ...
REFERENCE_DEPTH = 32
#: ... and 576 visual tokens
REFERENCE_TOKENS = 576

#: The in-LLM drop schedules of our budgets 192 / 128 / 64 (our design, docs/methods/pdrop.md; SparseVLM v1's
#: counts): stages before decoder layers 2 / 6 / 16 of 32, keeping these counts of 576 visual tokens (equivalent
#: tokens 191 / 126.25 / 62.125). PyramidDrop's and TransPrune's budgets map onto it.
IN_LLM_BUDGET_TABLE: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    192: ((2, 6, 16), (300, 200, 110)),
    128: ((2, 6, 16), (303, 110, 36)),
    64: ((2, 6, 16), (66, 30, 17)),
}


def scale_layers(layers: "list[int] | tuple[int, ...]", num_layers: int, reference: int = 32) -> tuple[int, ...]:
    """Map decoder-layer indices stated for a ``reference``-layer LLM (32 for 7B) onto a model with
    ``num_layers`` layers: round(k * num_layers / reference), clipped to 1..num_layers-1 and made
    strictly increasing. Identity when num_layers == reference (e.g. 13B's 40 layers scale 8 -> 10)."""
    out: list[int] = []
    for k in layers:
        v = min(max(1, round(k * num_layers / reference)), num_layers - 1)
        if out and v <= out[-1]:
            v = out[-1] + 1
        if v > num_layers - 1:
            raise ValueError(f"cannot place {len(layers)} stages in a {num_layers}-layer LLM")
        out.append(v)
    return tuple(out)


def round_half_up(x: Fraction | float) -> int:
    """Nearest integer, halves rounded up (Python's round() rounds halves to even)."""
    return math.floor(Fraction(x) + Fraction(1, 2))


def equivalent_kept_count(budget: int, n_visual: int, layer: int, num_layers: int) -> int:
    """FastV's kept count after layer K for an equivalent (layer-average) budget B:
    n_K = (L*B - K*N) / (L - K), rounded half up, clipped to 0..N. Exact rational arithmetic."""
    L, K, N = int(num_layers), int(layer), int(n_visual)
    if not 1 <= K < L:
        raise ValueError(f"FastV layer K={K} must be in 1..{L - 1}")
    num, den = L * int(budget) - K * N, L - K
    n = (2 * num + den) // (2 * den)  # round_half_up(num / den) in integers (traceable: no Fraction)
    return max(0, min(N, n))


def scaled_count(n_visual: int, count_of_576: int) -> int:
    """A count stated for 576 candidates, for a sample with N visual tokens: floor(N * c / 576)."""
    return (int(n_visual) * int(count_of_576)) // REFERENCE_TOKENS


def stage_layer_counts(n_visual: int, layers: Sequence[int], counts: Sequence[int], num_layers: int) -> list[int]:
    """Visual tokens in the input of every decoder layer for a pure drop schedule: N before
    ``layers[0]``, ``counts[s]`` from ``layers[s]`` on (a count never exceeds the previous one)."""
    out, cur, bounds = [], int(n_visual), [*layers, num_layers]
    out += [cur] * bounds[0]
    for s, c in enumerate(counts):
        cur = min(cur, int(c))
        out += [cur] * (bounds[s + 1] - bounds[s])
    return out


def fit_stage_counts(n_visual: int, counts: Sequence[int], layers_ref: Sequence[int], layers: Sequence[int],
                     num_layers: int, reference_depth: int = REFERENCE_DEPTH) -> tuple[int, ...]:
    """Stage counts for ``layers`` on a ``num_layers``-deep LLM with the same layer average as
    ``counts`` after ``layers_ref`` on the ``reference_depth``-layer LLM they were stated for (our
    design). Unchanged on the reference depth; otherwise every count is scaled by one factor
    alpha = (L * E_ref - K_1 * N) / sum_s len_s * c_s (len_s = layers stage s spans on the new
    depth), rounded half up and clipped to 0..N, so the schedule keeps its shape. When even
    alpha = 0 overshoots (K_1 * N / L > E_ref) all counts are 0: the closest reachable average."""
    n = int(n_visual)
    if int(num_layers) == int(reference_depth) and tuple(layers) == tuple(layers_ref):
        return tuple(min(n, int(c)) for c in counts)
    ref_total = sum(stage_layer_counts(n, layers_ref, counts, reference_depth))
    target = Fraction(ref_total * int(num_layers), int(reference_depth))
    bounds = [*layers, num_layers]
    spans = [bounds[s + 1] - bounds[s] for s in range(len(counts))]
    denom = sum(sp * min(n, int(c)) for sp, c in zip(spans, counts))
    if denom == 0:
        return tuple(0 for _ in counts)
    alpha = max(Fraction(0), (target - layers[0] * n) / denom)
    return tuple(max(0, min(n, round_half_up(alpha * min(n, int(c))))) for c in counts)


def last_row_topk(last_row_attn: torch.Tensor, visual: torch.Tensor, k: int, numerics: str = "ours",
                  method: str = "pdrop", dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """PyramidDrop's stage rule (VScan's too): ``last_row_attn`` (H, S) = the last instruction token's attention
    probabilities under the boundary layer's q/k, per head. Returns the indices (into ``visual``)
    of the top-``k`` visual tokens by head-mean attention, ascending (ties: lower index).
    ``numerics="official"``: the rows cast to ``dtype`` (the official ``.to(query_states.dtype)``: fp16 as its
    builder loads the LLM; the methods pass the run's own dtype, so an fp32 run ranks in fp32 as the official code
    run in fp32 does), the official (H, 1, S) mean over heads, the visual columns, the mean over the one query row,
    all in that dtype, then ``torch.topk``."""
    check_numerics(method, numerics)
    if numerics == "official":
        per_head = last_row_attn.to(dtype)[:, None]  # (H, 1, S) as the official attn_weights
        scores = per_head.mean(dim=0)[:, visual].mean(dim=0)  # heads, then the query row(s)
        return scores.topk(max(0, min(int(k), scores.numel()))).indices.sort().values
    scores = last_row_attn.float().mean(0)[visual]
    return topk_desc(scores, k).sort().values
