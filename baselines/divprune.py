"""DivPrune (CVPR 2025, arXiv 2503.02175): diversity-based visual token pruning, pre-LLM ("layer 0").

Doc: docs/methods/divprune.md. Official code: vbdi/divprune,
``LLaVA/llava/model/llava_arch.py``: ``pairwise_cosine_similarity``, ``DivPrune`` (the greedy
max-min selection) and the ``#divprune`` block at the end of ``prepare_inputs_labels_for_multimodal``
(``LAYER_INDEX=0``, ``SUBSET_RATIO``, default 0.098 per the README), applied to the projected visual
tokens inside ``inputs_embeds``.

Algorithm (the paper's max-min diversity problem, greedy): on the N candidate tokens' LLM-input
embeddings x, d(i, j) = 1 - cos(x_i, x_j);
1. first pick = the token whose nearest-neighbour distance min_{i != j} d(i, j) is largest;
2. next pick = argmax_j min_{s in S} d(j, s) over the tokens not yet picked;
3. stop after k = round(ratio * N) picks (Python ``round``, as ``int(round(...))`` in the official
   code); keep the picks in ascending index order. Positions contiguous (pre-LLM).
Ties (equal scores) go to the lower index (``torch.argmax``, as the official code).

Budget: ``budget`` = tokens entering the LLM **per image (LLaVA-1.5), per crop (LLaVA-NeXT), per frame
(Video-LLaVA)**: k = budget x (units in the selection scope). Alternatively ``ratio`` (official
``SUBSET_RATIO``; 64/128/192 of 576 <-> 0.111/0.222/0.333); with neither, ratio = 0.098 (56 of 576).
A scope with at most k candidates is kept whole (budget >= tokens: no-op).

Scope (option ``scope``): ``"sample"`` = one selection over all visual tokens of the sample (official
for images: LLaVA-NeXT candidates are all image features as laid out by the stock merge, newline tokens
included); ``"unit"`` = one selection per image / crop / frame; ``"auto"`` (default) = per frame for
Video-LLaVA (our design, spec section 9), per sample otherwise.

Newline tokens (option ``newlines``, LLaVA-NeXT 'spatial_unpad'): ``"candidate"`` (official: they
compete like any token, sample scope only), ``"keep"`` (layout, not counted), ``"drop"``; ``"auto"``
(default) = candidate in sample scope, keep in unit scope.

Deviation (guard): picked tokens are excluded from later rounds; the official loop could pick a token
twice when every remaining token duplicates a picked one (all scores 0). Distances are in fp32.

Reference mode (option ``numerics="official"``; default ``"ours"``): the official numerics - the features in
the model's dtype (the official ``pairwise_cosine_similarity`` computes in the dtype of its LLM input embeddings:
fp16 under its builder's fp16 load, fp32 in a model loaded in fp32), ``1 - mm(x/|x|, (x/|x|)^T)`` in that dtype
without the norm clamp, first pick from the second-smallest entry of each distance column (``topk(2,
largest=False)``, diagonal included), every later pick by ``argmax`` over all tokens (no distinct-pick guard; a
token picked twice is kept once: the official code would feed it twice). Option ``reference_dtype``: ``"model"``
(default: the features' own dtype, our LLM's: fp16 in an fp16 run, fp32 in an fp32 run, as DART's and CDPruner's
option) or ``"float16"`` (always fp16, the official eval runs' load whatever ours runs in; the behaviour before
2026-11-26, which parted from the official code in an fp32 run: seed 11, T = 32, docs/parity.md).
"""

from __future__ import annotations

import torch

from llava.method import Method, register
from llava.options import Option
from llava.ops import NUMERICS_OPTION
from llava.ops import (SUBSET_RATIO, MaxMinProblem, check_numerics, greedy_max_min, masked_take, subset_picks,
                       unit_layout)
from llava.selection import Selection

DEFAULT_RATIO = SUBSET_RATIO  # the official SUBSET_RATIO default (0.098)
num_picks = subset_picks  # picks per scope: budget per unit, else round(ratio * n)
SCOPES = ("auto", "sample", "unit")
NEWLINE_MODES = ("auto", "candidate", "keep", "drop")
#: the dtype of the official eval runs' LLM input embeddings (LLaVA loads the model in float16):
#: the reference mode's cast with ``reference_dtype="float16"`` only
OFFICIAL_DTYPE = torch.float16
REFERENCE_DTYPES = ("model", "float16")


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """(N, N) 1 - cosine similarity of the rows of ``x`` (fp32)."""
    x = x.float()
    x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return 1.0 - x @ x.T


def official_cosine_distance(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(N, N) 1 - cosine similarity as the official ``pairwise_cosine_similarity``: rows of ``x`` in
    ``dtype`` (None: ``x``'s own, the model's, as the official code: fp16 under its fp16 load, fp32 in an
    fp32 run; ``OFFICIAL_DTYPE`` for the always-fp16 cast), divided by their norms (no clamp), ``torch.mm``,
    all in that dtype."""
    if dtype is not None:
        x = x.to(dtype)
    xn = x / x.norm(dim=1, keepdim=True)
    return 1.0 - torch.mm(xn, xn.t())


def max_min_diversity_official(x: torch.Tensor, k: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference mode of :func:`max_min_diversity`: the official numerics (distances in ``dtype``, None =
    ``x``'s own as the official code's model dtype; first pick from the second-smallest entry of each column
    with the diagonal included, ``argmax`` over all tokens without excluding the picked ones). Returns the
    picks (k,) in pick order (may repeat)."""
    n = x.shape[0]
    k = max(0, min(int(k), n))
    picks = torch.empty(k, dtype=torch.long, device=x.device)
    if k == 0:
        return picks
    d = official_cosine_distance(x, dtype)
    first = torch.topk(d, 2, dim=0, largest=False).values[1, :] if n > 1 else d[0]
    j = torch.argmax(first).reshape(1)
    picks[0] = j[0]
    min_dist = d[j][0]  # running min over the picked rows = the official min over index_select rows
    for i in range(1, k):
        j = torch.argmax(min_dist).reshape(1)
        picks[i] = j[0]
        min_dist = torch.minimum(min_dist, d[j][0])
    return picks


def max_min_problem(x: torch.Tensor, k: int) -> tuple[torch.Tensor, MaxMinProblem | None]:
    """DivPrune's greedy max-min selection of ``k`` rows of ``x`` (N, D), set up for
    :func:`llava.ops.greedy_max_min`: the first pick (the token farthest from its nearest neighbour,
    on the device) and the problem for the other ``k - 1`` picks (None when none are left)."""
    n = x.shape[0]
    k = max(0, min(int(k), n))
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=x.device), None
    d = cosine_distance(x)
    nearest = d.clone().fill_diagonal_(float("inf")).amin(dim=0)  # nearest-neighbour distance (not to itself)
    # the first pick stays on the device: index with a 1-element tensor (a 0-d index reads the host)
    j = torch.argmax(nearest).reshape(1)
    if k == 1:
        return j, None
    taken = torch.zeros(n, dtype=torch.bool, device=x.device).index_fill(0, j, True)
    return j, MaxMinProblem(dist=d, k=k - 1, min_dist=d.index_select(0, j)[0], taken=taken, num_taken=1)


def max_min_diversity(x: torch.Tensor, k: int, numerics: str = "ours",
                      official_dtype: torch.dtype | None = None) -> torch.Tensor:
    """DivPrune's greedy max-min selection of ``k`` rows of ``x`` (N, D); returns the picks (k,)
    in pick order. The loop runs on the host (:func:`llava.ops.greedy_max_min`: one copy each way,
    the picks bit-identical to the device loop). ``numerics="official"``:
    :func:`max_min_diversity_official` in ``official_dtype`` (None: ``x``'s own; the official loop, on the
    device)."""
    check_numerics("divprune", numerics)
    if numerics == "official":
        return max_min_diversity_official(x, k, official_dtype)
    first, prob = max_min_problem(x, k)
    return first if prob is None else torch.cat([first, greedy_max_min([prob])[0]])



def divprune(features: torch.Tensor, unit: torch.Tensor, *, budget: int | None = None,
             ratio: float | None = None, per_unit: bool = False, newlines: str = "auto",
             numerics: str = "ours", official_dtype: torch.dtype | None = None, layout=None,
             device_loop: bool = False) -> torch.Tensor:
    """Indices (ascending) of the tokens DivPrune keeps for one sample.

    features: (T, D) the tokens as the LLM would receive them; unit: (T,) unit id (-1 = NeXT newline).
    ``budget`` tokens per unit (k = budget x units of the scope) or ``ratio`` of the scope's
    candidates; ``per_unit`` selects within each unit instead of over the whole sample.
    ``numerics``: "ours" (fp32, distinct picks) or "official" (reference mode, its distances in
    ``official_dtype``: None = the features' own dtype, the model's, as the official code; repeated picks
    are kept once, so a scope may keep fewer than k tokens).
    """
    check_numerics("divprune", numerics)
    if newlines not in NEWLINE_MODES:
        raise ValueError(f"divprune: newlines must be one of {NEWLINE_MODES}, got {newlines!r}")
    if newlines == "auto":
        newlines = "keep" if per_unit else "candidate"
    if per_unit and newlines == "candidate":
        raise ValueError("divprune: newline tokens can be candidates only in sample scope")
    is_nl = unit < 0
    lay = layout if layout is not None else unit_layout(unit)  # the one host sync (none when planned)
    fixed = lay.newlines if newlines == "keep" else unit.new_zeros(0)
    num_units = lay.num_units
    if per_unit:
        scopes = [(lay.tokens[u], 1) for u in range(num_units)]
    else:
        every = torch.arange(unit.numel(), device=unit.device)
        cand = every if newlines == "candidate" else masked_take(every, ~is_nl, unit.numel() - lay.newlines.numel())
        scopes = [(cand, num_units)]
    kept = [fixed]
    pending = []  # (scope indices, first pick, problem): every scope's greedy loop in one host round trip
    for idx, units in scopes:
        k = num_picks(idx.numel(), budget, units, ratio)
        if k >= idx.numel():
            kept.append(idx)
        elif numerics == "official":
            kept.append(idx[max_min_diversity_official(features[idx], k, official_dtype)])
        else:
            first, prob = max_min_problem(features[idx], k)
            if prob is None:
                kept.append(idx[first])
            else:
                pending.append((idx, first, prob))
    # host loop (eager), or on the device inside a captured prefill (``device_loop``): same picks
    solved = greedy_max_min([p for _, _, p in pending], device_loop=device_loop)
    kept += [idx[torch.cat([first, picks])] for (idx, first, _), picks in zip(pending, solved)]
    if numerics == "official":  # a re-picked token (the official code feeds it twice) is kept once
        return torch.unique(torch.cat(kept))  # sorted; one size read for the sample
    return torch.cat(kept).sort().values


@register
class DivPrune(Method):
    """DivPrune: keep the most diverse visual tokens (greedy max-min cosine distance of the
    LLM-input embeddings); ``budget`` per image / crop / frame, or ``ratio``."""

    name = "divprune"
    capturable = "full"
    vision_stage = True

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            # fraction of the candidates kept (official SUBSET_RATIO); None = budget, or 0.098
            "ratio": None,
            "scope": Option("auto", SCOPES, doc="auto: per frame for video, per sample otherwise"),
            "newlines": Option("auto", NEWLINE_MODES, doc="LLaVA-NeXT newline tokens"),
            # "ours" (fp32 distances, distinct picks) or "official" (reference mode: distances in the
            # model's dtype, the official first pick, no distinct-pick guard)
            "numerics": NUMERICS_OPTION,
            "reference_dtype": Option("model", REFERENCE_DTYPES,
                                      doc="reference mode's distance dtype: model (the features' own, our LLM's: the "
                                          "official code computes in its model's dtype, fp16 under its builder, fp32 "
                                          "in an fp32 run) or float16 (always fp16, the official eval runs' load "
                                          "whatever ours runs in)"),
        }

    def __init__(self, budget=None, **options):
        super().__init__(budget, **options)
        if self.budget is not None and self.ratio is not None:
            raise ValueError("divprune: give a budget or a ratio, not both")
        if self.ratio is not None and not (0 < float(self.ratio) <= 1):
            raise ValueError(f"divprune: ratio must be in (0, 1], got {self.ratio!r}")
        if self.scope == "unit" and self.newlines == "candidate":
            raise ValueError("divprune: newline tokens can be candidates only in sample scope")

    def select_vision(self, sig):
        scope = self.scope if self.scope != "auto" else ("unit" if sig.unit_kind == "frame" else "sample")
        return Selection(keep=divprune(sig.features, sig.unit, budget=self.budget, ratio=self.ratio,
                                       per_unit=scope == "unit", newlines=self.newlines,
                                       numerics=self.numerics,
                                       official_dtype=OFFICIAL_DTYPE if self.reference_dtype == "float16" else None,
                                       layout=sig.unit_layout(),
                                       device_loop=sig.captured))
