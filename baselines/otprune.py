"""OTPrune (CVPR 2026, arXiv 2602.20205): visual-token selection by the greedy MAP of a DPP whose kernel is the
second moment of the tokens' Gram matrix (the paper's optimal-transport view), pre-LLM ("layer 0").

Doc: docs/methods/otprune.md. Official code: xiwenc1/OTPrune at 3414730f39daa57e0629138d898f98ee682f0b2b,
``LLaVA/llava/model/llava_arch.py``: ``greedy_select`` (133-170), ``OTPrune`` (215-271) and the hook at the end of
``prepare_inputs_labels_for_multimodal`` (455-502), switched on by ``LAYER_INDEX=0`` and ``SUBSET_RATIO`` (DivPrune's
switch), on the projected visual tokens inside ``inputs_embeds``. Query-agnostic.

Algorithm, on the N candidate tokens V (N, D) of a scope:
1. column normalisation: V^ = V / ||V||_col (each channel divided by its norm over the N tokens, not per token);
2. G = V^ V^T (N, N); kernel L = I + gamma (G G^T), gamma = 0.01;
3. fast greedy DPP MAP (Chen et al. 2018, incremental Cholesky): d2 = diag(L); j = argmax d2; then k - 1 times
   e = (L[j] - C[:, j]^T C) / sqrt(d2_j), C += row e, d2 -= e^2, j = argmax d2 (ties: first index);
4. k = round(ratio * N) (Python ``round``) or budget x units; the picks in ascending index order (``order="sorted"``,
   default) or in CPython ``list(set(picks))`` order (``order="official"``: the official code's, see
   :mod:`llava.ops.pyset`). Positions contiguous (pre-LLM).

Budget: ``budget`` = tokens entering the LLM per image (LLaVA-1.5) / per crop (LLaVA-NeXT) / per frame
(Video-LLaVA), k = budget x units of the scope; or ``ratio`` (official ``SUBSET_RATIO``, shipped 0.098 = 56 of 576);
with neither, ratio 0.098. A scope with at most k candidates is kept whole. Scope and LLaVA-NeXT newline tokens as
DivPrune's: one selection over the sample's tokens with the newline rows as candidates (official), per frame for
video.

Numerics. ``"ours"`` (default): fp32 throughout (features cast to fp32, column norms clamped at 1e-12, Cholesky rows
fp32). ``"official"`` (reference mode): the official arithmetic in the features' own dtype (the model's: fp16 in the
official runs): the column norm taken in that dtype and cast to fp32, V / norm in fp32, G and L in fp32 with the
official association ``(gamma G) @ G^T`` (also ours), the Cholesky rows stored in the features' dtype and
contracted there (``c_j^T @ C[:t]``), d2 and e in fp32. Both modes exclude picked tokens from ``argmax`` (a guard:
L >= I, so an unpicked token's d2 >= 1 > a picked one's ~0 and the official loop never re-picks; its duplicate
branch and its 1e-100 stop are unreachable for k <= N).
"""

from __future__ import annotations

import torch

from llava.method import Method, register
from llava.options import Option
from llava.ops import NUMERICS_OPTION
from llava.ops import SUBSET_RATIO, subset_picks, check_numerics, masked_take, set_order, unit_layout
from llava.selection import Selection

GAMMA = 0.01  # official, hard-coded in OTPrune()
DEFAULT_RATIO = SUBSET_RATIO  # the official SUBSET_RATIO default (0.098)
num_picks = subset_picks  # picks per scope: budget per unit, else round(ratio * n)
SCOPES = ("auto", "sample", "unit")
NEWLINE_MODES = ("auto", "candidate", "keep", "drop")
ORDERS = ("sorted", "official")


def otprune_kernel(x: torch.Tensor, gamma: float = GAMMA, numerics: str = "ours") -> torch.Tensor:
    """The DPP kernel L = I + gamma (G G^T), G = V^ V^T, V^ the column-normalised rows of ``x`` (N, D); fp32 (N, N).
    ``numerics="official"``: the column norm in ``x``'s dtype, unclamped (the official line
    ``V / V.norm(dim=-2, keepdim=True).to(torch.float32)``)."""
    check_numerics("otprune", numerics)
    if numerics == "official":
        v = x / x.norm(dim=-2, keepdim=True).to(torch.float32)
    else:
        x = x.float()
        v = x / x.norm(dim=-2, keepdim=True).clamp(min=1e-12)
    g = v @ v.T
    kernel = (gamma * g) @ g.T
    kernel.diagonal().add_(1.0)  # + I: the same sums as eye + product, no (N, N) identity built and added
    return kernel


def dpp_map(kernel: torch.Tensor, k: int, rows_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fast greedy DPP MAP of ``k`` items of the fp32 kernel (N, N); the picks (k,) in pick order, on the kernel's
    device, no host read. The Cholesky rows C (k, N) are held in ``rows_dtype`` (the official code: the features'
    dtype) and ``c_j^T C[:t]`` is contracted in it, as the official ``greedy_select``; d2 and e stay fp32. Picked
    tokens are masked out of ``argmax`` (never active when the kernel is >= I, see the module doc).

    Rows in the kernel's own dtype (the default): :func:`_dpp_map_one_buffer`, eleven launches a pick; rows in
    another dtype (reference mode): :func:`_dpp_map_loop`. Both do the same arithmetic in the same order."""
    n = kernel.shape[0]
    k = max(0, min(int(k), n))
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=kernel.device)
    if kernel.dtype == rows_dtype:
        return _dpp_map_one_buffer(kernel, k)
    return _dpp_map_loop(kernel, k, rows_dtype)


def _dpp_map_loop(kernel: torch.Tensor, k: int, rows_dtype: torch.dtype) -> torch.Tensor:
    """:func:`dpp_map` written plainly: the Cholesky rows, d2 and the kernel apart, three reads a pick."""
    n = kernel.shape[0]
    dev = kernel.device
    C = torch.zeros((k, n), dtype=rows_dtype, device=dev)
    d2 = torch.diagonal(kernel).clone()
    taken = torch.zeros(n, dtype=torch.bool, device=dev)
    j = torch.argmax(d2).reshape(1)  # a 1-element index: stays on the device
    picks = [j]
    for t in range(k - 1):
        taken = taken.index_fill(0, j, True)
        cj = C[:t].index_select(1, j).reshape(1, t)  # (1, t) in rows_dtype
        proj = (cj @ C[:t]).reshape(n)  # (n,) in rows_dtype (zeros at t = 0)
        e = (kernel.index_select(0, j)[0] - proj) / torch.sqrt(d2.index_select(0, j))
        C[t] = e
        d2 = d2 - torch.square(e)
        j = torch.argmax(d2.masked_fill(taken, float("-inf"))).reshape(1)
        picks.append(j)
    return torch.cat(picks)


def _dpp_map_one_buffer(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`dpp_map` with the Cholesky rows in the kernel's dtype: the same values as :func:`_dpp_map_loop`,
    bit for bit, with eleven launches a pick instead of thirteen. d2 and the Cholesky rows share one buffer
    (d2 in row 0, C from row c0), so one column read gives d2_j and C[:, j] together; e is written straight into
    its row of C (no copy), d2 is updated in place, and step 0 skips the empty contraction (the kernel row minus
    0 is the kernel row). The contraction ``c_j^T C[:t]`` reads the same (1, t) and (t, N) row-major operands as
    the plain loop, C's block starting 64-byte aligned as a fresh tensor does: the same matrix product call on
    the same layout."""
    n = kernel.shape[0]
    dev = kernel.device
    c0 = 1
    while (c0 * n * kernel.element_size()) % 64:  # C's block on a 64-byte boundary, as its own allocation
        c0 += 1
    buf = torch.empty((c0 + k, n), dtype=kernel.dtype, device=dev)  # C's rows are written before they are read
    d2 = buf[0]
    d2.copy_(torch.diagonal(kernel))
    taken = torch.zeros(n, dtype=torch.bool, device=dev)
    j = torch.argmax(d2).reshape(1)  # a 1-element index: stays on the device
    picks = [j]
    for t in range(k - 1):
        taken.index_fill_(0, j, True)
        row = kernel.index_select(0, j).reshape(n)
        col = buf.index_select(1, j).reshape(-1)  # d2_j, then C[:, j]
        if t:
            row = row - (col[c0:c0 + t].reshape(1, t) @ buf[c0:c0 + t]).reshape(n)
        e = torch.div(row, torch.sqrt(col[:1]), out=buf[c0 + t])
        d2.sub_(torch.square(e))
        j = torch.argmax(d2.masked_fill(taken, float("-inf"))).reshape(1)
        picks.append(j)
    return torch.cat(picks)


def otprune_select(x: torch.Tensor, k: int, *, gamma: float = GAMMA, numerics: str = "ours") -> torch.Tensor:
    """The ``k`` tokens OTPrune picks among the rows of ``x`` (N, D), in pick order."""
    rows_dtype = x.dtype if numerics == "official" else torch.float32
    return dpp_map(otprune_kernel(x, gamma, numerics), k, rows_dtype)



def otprune(features: torch.Tensor, unit: torch.Tensor, *, budget: int | None = None, ratio: float | None = None,
            per_unit: bool = False, newlines: str = "auto", numerics: str = "ours", order: str = "sorted",
            gamma: float = GAMMA, layout=None) -> torch.Tensor:
    """Indices of the tokens OTPrune keeps for one sample, in output order.

    features: (T, D) the tokens as the LLM would receive them; unit: (T,) unit id (-1 = NeXT newline).
    ``budget`` tokens per unit (k = budget x units of the scope) or ``ratio`` of the scope's candidates;
    ``per_unit``: one selection per unit instead of one over the sample. ``order``: ``"sorted"`` (ascending) or
    ``"official"`` (each scope's picks in CPython set order of their scope-local indices, scopes in unit order)."""
    check_numerics("otprune", numerics)
    if order not in ORDERS:
        raise ValueError(f"otprune: order must be one of {ORDERS}, got {order!r}")
    if newlines not in NEWLINE_MODES:
        raise ValueError(f"otprune: newlines must be one of {NEWLINE_MODES}, got {newlines!r}")
    if newlines == "auto":
        newlines = "keep" if per_unit else "candidate"
    if per_unit and newlines == "candidate":
        raise ValueError("otprune: newline tokens can be candidates only in sample scope")
    is_nl = unit < 0
    lay = layout if layout is not None else unit_layout(unit)  # the one host read (none when planned)
    fixed = lay.newlines if newlines == "keep" else unit.new_zeros(0)
    if order == "official" and fixed.numel():
        raise ValueError("otprune: order='official' has no place for newline tokens kept outside the selection "
                         "(newlines='keep'); use newlines='candidate' (sample scope) or 'drop'")
    if per_unit:
        scopes = [(lay.tokens[u], 1) for u in range(lay.num_units)]
    else:
        every = torch.arange(unit.numel(), device=unit.device)
        cand = every if newlines == "candidate" else masked_take(every, ~is_nl, unit.numel() - lay.newlines.numel())
        scopes = [(cand, lay.num_units)]
    kept = [fixed]
    for idx, units in scopes:
        n = idx.numel()
        k = num_picks(n, budget, units, ratio)
        if k >= n:
            kept.append(idx)
            continue
        picks = otprune_select(features[idx], k, gamma=gamma, numerics=numerics)
        kept.append(idx[set_order(picks, n) if order == "official" else picks.sort().values])
    out = torch.cat(kept)
    return out if order == "official" else out.sort().values


@register
class OTPrune(Method):
    """OTPrune: keep the greedy DPP MAP of the tokens under the kernel I + gamma (V^V^T)^2 (V^ column-normalised
    LLM-input embeddings); ``budget`` per image / crop / frame, or ``ratio``."""

    name = "otprune"
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
            # "ours" (fp32) or "official" (reference mode: norms and Cholesky rows in the features' dtype)
            "numerics": NUMERICS_OPTION,
            "order": Option("sorted", ORDERS,
                            doc="kept tokens' order into the LLM: sorted (ascending) or official (CPython "
                                "list(set()) order)"),
            # the kernel's weight of G G^T (official: 0.01, hard-coded)
            "gamma": GAMMA,
        }

    def __init__(self, budget=None, **options):
        super().__init__(budget, **options)
        if self.budget is not None and self.ratio is not None:
            raise ValueError("otprune: give a budget or a ratio, not both")
        if self.ratio is not None and not (0 < float(self.ratio) <= 1):
            raise ValueError(f"otprune: ratio must be in (0, 1], got {self.ratio!r}")
        if self.scope == "unit" and self.newlines == "candidate":
            raise ValueError("otprune: newline tokens can be candidates only in sample scope")
        if not float(self.gamma) > 0:
            raise ValueError(f"otprune: gamma must be > 0, got {self.gamma!r}")

    def capture_refusal(self):
        if self.order == "official":
            return ("otprune: order='official' copies host-built probe tables (CPython's set probing) to the device "
                    "during the selection; it runs on the eager engine")
        return super().capture_refusal()

    def select_vision(self, sig):
        scope = self.scope if self.scope != "auto" else ("unit" if sig.unit_kind == "frame" else "sample")
        return Selection(keep=otprune(sig.features, sig.unit, budget=self.budget, ratio=self.ratio,
                                      per_unit=scope == "unit", newlines=self.newlines, numerics=self.numerics,
                                      order=self.order, gamma=float(self.gamma), layout=sig.unit_layout()))
