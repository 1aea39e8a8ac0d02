"""VisPruner (ICCV 2025, arXiv 2412.01818 v2, "Beyond Text-Visual Attention: Exploiting Visual Cues
for Effective Token Pruning in VLMs"): per image / crop / frame, keep a few *important* tokens by
[CLS] attention, then *diverse* tokens from the rest by repeatedly removing near-duplicates; pre-LLM.

Doc: docs/methods/vispruner.md. Official code: Theia-4869/VisPruner at aefa01a,
``llava/model/llava_arch.py`` ``encode_images`` (every change marked ``[VisPruner]``) and
``llava/model/multimodal_encoder/clip_encoder.py`` ``feature_select`` / ``forward`` (select layer -2,
``attentions[-2][:, :, 0, 1:]``; features cast to the model dtype, fp16).

Algorithm, per unit with N candidates, budget T, important ratio rho (official ``encode_images``):

1. T_imp = int(T * rho), T_div = T - T_imp;
2. a = head-mean [CLS] row; order = argsort(a, descending) (ties: lower index);
3. important = order[:T_imp]; residual R = order[T_imp:] (in attention order);
4. F = V / |V| (select-layer features before the projector);
5. while |R| > T_div: r = min(8, |R| - T_div); A = R[0::2], B = R[1::2];
   s_i = max_j <F[A_i], F[B_j]>; drop the r elements of A with the largest s;
   R = [surviving A in descending-s order] ++ B;
6. keep = important + R, ascending (the official boolean index mask).

The sizes of every round depend only on (N, T_imp, T_div) (:func:`removal_schedule`), so the loop
runs a fixed number of rounds with no host read; units with equal sizes are processed as one batch.

Budget: ``budget`` = T = tokens entering the LLM **per image (LLaVA-1.5 / Qwen2.5-VL), per crop
(LLaVA-NeXT / OneVision), per frame (Video-LLaVA)**. A unit with at most T candidates is kept whole
(budget >= tokens: the identity, bit-identical to the stock model).

Options (docs/methods/vispruner.md):

* ``important_ratio`` rho: None (default) = 0.75 if T <= 64 else 0.5 (the README examples: 64 = 48 +
  16, 128 = 64 + 64; the CLI default is 0.5).
* ``reference``: False (default, ours) = features normalised and compared in fp32; an odd |R| (A one
  longer than B) or a round that would drop more than |A| is handled by our rule (all of A's
  survivors are kept; r is capped at |A|). True = the official numerics: features cast to float16,
  normalised and multiplied in float16, and an error where the official gather would fail (odd |R|,
  r > |R| // 2).
* ``numerics``: ``"ours"`` (default) or ``"official"`` (reference mode: the official numerics - [CLS]
  attention head mean in fp32 (the official tower stays fp32 under ``device_map='auto'`` and its attentions
  are not cast), both orderings by the unstable ``argsort(descending=True)`` as the official code, features
  cast to the LLM's dtype (the official ``.to(images.dtype)``: fp16 as its eval scripts run the fp16 model,
  fp32 on an fp32 model) and normalised / multiplied there, and the official round sizes, including the one case
  where the official gather keeps fewer than ours (odd |R| with r = |R| // 2: no A token survives); where
  the official indexing would fail, our rule applies instead of an error).
* ``similarity`` (ours, fp32): ``"rounds"`` (default) = every round's similarities multiplied afresh, A B^T, as the
  official loop does (the same GEMM shapes: the official survivors wherever the device computes a product of
  a shape the same way each time); ``"gram"`` = every round reads them from one Gram matrix of the unit's
  features (:func:`remove_duplicates_gram`: ~4.6x fewer FLOPs at T = 64 and one launch a round fewer). A Gram
  entry is the same dot product as the round's, but a GEMM's summation order may depend on the matrices' shapes
  (and, with MKL on some AVX-512 CPUs, on their alignment): where it does, a near-tie can order differently and
  the survivors can differ from the official loop's. Exact where the products are exact (tested).
* ``cls_token`` (Video-LLaVA frames, whose [CLS] is a visual token; video is not in the official
  repository): ``drop`` (default, as FasterVLM's video branch: T patches per frame) or ``keep`` ([CLS]
  + T - 1 patches).
* ``keep_newlines``: LLaVA-NeXT / OneVision newline tokens kept as layout, not counted (default True);
  False drops them. (The official code forces NeXT's plain 'spatial' merge: no newline tokens.)
"""

from __future__ import annotations

import torch

from llava.method import BudgetError, Method, register
from llava.options import Option
from llava.ops import NUMERICS_OPTION
from llava.ops import check_numerics, unit_layout
from llava.selection import Selection

CLS_TOKEN_MODES = ("drop", "keep")
#: ours' duplicate removal: each round's products (the official loop's) or one Gram matrix (fewer FLOPs)
SIMILARITY_MODES = ("rounds", "gram")
MAX_STEP = 8  # official: at most 8 tokens removed per round
#: dtype of the official select-layer features (``.to(images.dtype)``: the eval scripts pass fp16 images, the
#: model's dtype; the method passes the LLM's dtype, ``sig.features.dtype``, which the official images must have
#: for its projector to run) and of its [CLS] attentions (the tower's own dtype: fp32, the tower is not cast under
#: ``device_map='auto'``)
OFFICIAL_FEATURE_DTYPE = torch.float16
OFFICIAL_ATTENTION_DTYPE = torch.float32
#: where the reference mode's [CLS] attentions come from: "tower" (the official fork's: the tower's dtype) or "images"
#: (RESTORE's copy of VisPruner, whose tower returns them cast to the images' dtype: the LLM's, fp16 in an fp16 run)
OFFICIAL_ATTENTIONS = ("tower", "images")


def default_ratio(budget: int) -> float:
    """The README examples: rho = 0.75 for T <= 64 (48 + 16), 0.5 above (64 + 64, 96 + 96)."""
    return 0.75 if budget <= 64 else 0.5


def split_budget(budget: int, ratio: float) -> tuple[int, int]:
    """(T_imp, T_div) = (int(T * rho), T - int(T * rho)), as the official code."""
    t_imp = int(budget * ratio)
    return t_imp, budget - t_imp


def removal_schedule(num_residual: int, t_div: int, reference: bool = False) -> list[int]:
    """Tokens removed per round of the duplicate-removal loop for |R| = ``num_residual`` (host ints).

    Official: r = min(8, |R| - T_div) while positive. Ours: also r <= |A| = ceil(|R| / 2). With
    ``reference`` an odd |R| or r > |R| // 2 raises :class:`BudgetError` (the budget decides |R|), as the official
    gather would fail."""
    out, n = [], num_residual
    while t_div > 0:
        r = min(MAX_STEP, n - t_div)
        if r <= 0:
            break
        if reference and (n % 2 or r > n // 2):
            raise BudgetError(
                f"vispruner(reference=True): |R| = {n} with r = {r} to remove; the official gather needs |R| "
                f"even and r <= |R| // 2 (it would fail here). Use reference=False for our rule.")
        r = min(r, (n + 1) // 2)
        out.append(r)
        n -= r
    return out


def official_schedule(num_residual: int, t_div: int) -> list[tuple[int, int]]:
    """Rounds of the official loop for |R| = ``num_residual``: (r, survivors of A) per round (host ints).

    The official round gathers A's survivors with ``argsort(s)[:, r:]`` (|A| - r of them, at least 0)
    indexed against ``arange(B)[:, None].expand(-1, |R| // 2 - r)``; the two broadcast. That equals our
    rule (|A| - r, r capped at |A|) except for odd |R| with r = |R| // 2, where the expand is empty and no A
    token survives. Where the official indexing fails (an expand size below -1, or odd |R| with
    |R| // 2 - r >= 2) our rule applies."""
    out, n = [], num_residual
    while t_div > 0:
        r = min(MAX_STEP, n - t_div)
        if r <= 0:
            break
        size_a = (n + 1) // 2
        m = n // 2 - r
        if n % 2 and m == 0:
            keep_a = 0  # the official (B, 0) index broadcast against (B, 1)
        else:
            keep_a = size_a - min(r, size_a)
        out.append((r, keep_a))
        n = keep_a + n // 2
    return out


def remove_duplicates(residual: torch.Tensor, normed: torch.Tensor, t_div: int, reference: bool = False,
                      numerics: str = "ours") -> torch.Tensor:
    """The official duplicate-removal loop on a batch of units.

    residual: (B, R) token indices into ``normed`` rows, in attention order; normed: (B, N, C)
    L2-normalised features. Returns (B, t_div) surviving indices (or all R if R <= t_div).
    ``numerics="official"``: :func:`official_schedule` and the unstable ``argsort`` (official)."""
    if numerics == "official":
        for r, keep_a in official_schedule(residual.shape[1], t_div):
            tok = torch.gather(normed, 1, residual[..., None].expand(-1, -1, normed.shape[-1]))
            s = (tok[:, 0::2] @ tok[:, 1::2].transpose(-1, -2)).max(dim=-1).values
            distinct = s.argsort(dim=-1, descending=True)[:, r:r + keep_a]
            residual = torch.cat([torch.gather(residual[:, 0::2], 1, distinct), residual[:, 1::2]], dim=1)
        return residual
    for r in removal_schedule(residual.shape[1], t_div, reference):
        tok = torch.gather(normed, 1, residual[..., None].expand(-1, -1, normed.shape[-1]))  # (B, R, C)
        a, b = tok[:, 0::2], tok[:, 1::2]
        s = (a @ b.transpose(-1, -2)).max(dim=-1).values  # (B, |A|) most similar partner in B
        distinct = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, r:]
        residual = torch.cat([torch.gather(residual[:, 0::2], 1, distinct), residual[:, 1::2]], dim=1)
    return residual


def remove_duplicates_gram(residual: torch.Tensor, normed: torch.Tensor, t_div: int) -> torch.Tensor:
    """:func:`remove_duplicates` (ours, fp32) with every round's similarities read from one Gram matrix and
    five launches a round instead of six (``similarity="gram"``).

    The loop above multiplies A and B afresh each round (64 rounds at T = 64 on 576 tokens: the same pairs
    again and again, ~4.6x the FLOPs of one Gram matrix, and a gather of the features per round). Here
    S = normed normed^T is computed once per batch of units and a round reads S's rows of A (a contiguous row
    copy) and, among them, the columns of B: each entry the dot product of the same two vectors over the same C
    terms, summed in the order the GEMM picks for S's shape (the same values as the per-round products where the
    GEMM sums them alike; exactly where the products are exact, tests/test_vispruner.py).
    The round's s goes to the even positions of a buffer over the whole list whose odd positions hold -inf
    (written once: a later round writes even positions only), so one stable descending sort of the list gives
    [A by descending s, ties to the lower position] ++ [B in list order] and dropping its first r entries is the
    round's new list: the same survivors in the same order, without compacting A's survivors and
    concatenating B. Same arguments and result as :func:`remove_duplicates`."""
    B, N, _ = normed.shape
    S = normed @ normed.transpose(-1, -2)  # (B, N, N)
    flat = S.reshape(B * N, N)
    off = None if B == 1 else (torch.arange(B, device=residual.device) * N)[:, None]
    scores = S.new_full(residual.shape, float("-inf"))  # even positions: this round's s; odd: -inf for good
    for r in removal_schedule(residual.shape[1], t_div):
        ia, ib = residual[:, 0::2], residual[:, 1::2]
        rows = flat.index_select(0, (ia if off is None else ia + off).reshape(-1)).view(B, -1, N)  # S's rows of A
        s = scores[:, :residual.shape[1]]
        sim = rows.gather(2, ib[:, None, :].expand(-1, rows.shape[1], -1))  # (B, |A|, |B|)
        if torch.compiler.is_compiling():  # dynamo takes no strided out=; the compiled graph fuses the copy
            s[:, 0::2] = sim.amax(-1)
        else:
            torch.amax(sim, -1, out=s[:, 0::2])  # most similar partner in B, straight into the list's A positions
        residual = residual.gather(1, torch.sort(s, dim=-1, descending=True, stable=True).indices[:, r:])
    return residual


def vispruner_units(scores: torch.Tensor, feats: torch.Tensor, t_imp: int, t_div: int,
                    reference: bool = False, numerics: str = "ours",
                    feature_dtype: torch.dtype | None = None, similarity: str = "rounds") -> torch.Tensor:
    """VisPruner on a batch of units: scores (B, N) head-mean [CLS] attention, feats (B, N, C)
    pre-projector features. Returns (B, min(N, T)) local indices, ascending. ``similarity``: ours' similarities
    per round (``"rounds"``) or from one Gram matrix (``"gram"``; module docstring).
    ``numerics="official"``: scores as given (the official dtype), unstable ``argsort``, features cast to
    ``feature_dtype`` (the official ``.to(images.dtype)``; None: :data:`OFFICIAL_FEATURE_DTYPE`, fp16)."""
    check_numerics("vispruner", numerics)
    if numerics == "official":
        order = scores.argsort(dim=-1, descending=True)
        important, residual = order[:, :t_imp], order[:, t_imp:]
        if t_div > 0:
            f = feats.to(OFFICIAL_FEATURE_DTYPE if feature_dtype is None else feature_dtype)
            residual = remove_duplicates(residual, f / f.norm(dim=-1, keepdim=True), t_div, numerics=numerics)
            important = torch.cat([important, residual], dim=1)
        return important.sort(dim=-1).values
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    important, residual = order[:, :t_imp], order[:, t_imp:]
    if t_div > 0:
        f = feats.half() if reference else feats.float()
        normed = f / f.norm(dim=-1, keepdim=True) if reference else f / f.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        residual = (remove_duplicates_gram(residual, normed, t_div) if similarity == "gram" and not reference
                    else remove_duplicates(residual, normed, t_div, reference))
        selected = torch.cat([important, residual], dim=1)
    else:
        selected = important
    return selected.sort(dim=-1).values


def vispruner(cls_attn: torch.Tensor, vision_features: torch.Tensor, unit: torch.Tensor, patch: torch.Tensor,
              budget: int, *, important_ratio: float | None = None, reference: bool = False,
              cls_token: str = "drop", keep_newlines: bool = True, numerics: str = "ours",
              layout=None, feature_dtype: torch.dtype | None = None, similarity: str = "rounds",
              official_attention: str = "tower") -> torch.Tensor:
    """Indices (ascending) of the tokens VisPruner keeps for one sample: per unit T = ``budget``.
    ``numerics="official"``: the official numerics (module docstring); ``reference`` is then ignored;
    ``feature_dtype``: the dtype the official code casts the features to, its images' dtype = the LLM's
    (None: fp16, the fp16 model its eval scripts run); ``official_attention`` (:data:`OFFICIAL_ATTENTIONS`): the
    reference mode's attention dtype, the tower's or (RESTORE's copy) ``feature_dtype``.
    ``layout``: the :func:`unit_layout` of (unit, patch) when the caller has it (a planned one: no host
    read at all; every size below is then a host int, so the whole selection is capturable).

    cls_attn: (H, T) [CLS]->token attention per head; vision_features: (T, Dv); unit: (T,) unit id
    (-1 = newline); patch: (T,) patch index (-1 = [CLS] visual token, Video-LLaVA)."""
    if cls_token not in CLS_TOKEN_MODES:
        raise ValueError(f"vispruner: cls_token must be one of {CLS_TOKEN_MODES}, got {cls_token!r}")
    check_numerics("vispruner", numerics)
    if similarity not in SIMILARITY_MODES:
        raise ValueError(f"vispruner: similarity must be one of {SIMILARITY_MODES}, got {similarity!r}")
    ratio = default_ratio(budget) if important_ratio is None else float(important_ratio)
    if official_attention not in OFFICIAL_ATTENTIONS:
        raise ValueError(f"vispruner: official_attention must be one of {OFFICIAL_ATTENTIONS}, got "
                         f"{official_attention!r}")
    if numerics == "official":  # the official fp32 tower attentions (RESTORE's: the images'), head mean there
        dt = OFFICIAL_ATTENTION_DTYPE if official_attention == "tower" else (feature_dtype or OFFICIAL_FEATURE_DTYPE)
        scores = cls_attn.to(dt).mean(0)
    else:
        scores = cls_attn.float().mean(0)  # (T,) head mean (official)
    lay = layout if layout is not None else unit_layout(unit, patch)  # the one host sync (none when planned)
    kept = [lay.newlines] if keep_newlines else []
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}  # (candidates, k) -> candidate index rows
    for u in range(lay.num_units):
        idx = lay.tokens[u]
        if budget >= idx.numel():
            kept.append(idx)
            continue
        if cls_token == "keep" and lay.cls[u].numel():
            kept.append(lay.cls[u])
            k = budget - lay.cls[u].numel()
        else:
            k = budget
        cand = lay.patches[u]
        if k >= cand.numel():
            kept.append(cand)
        elif k > 0:
            groups.setdefault((cand.numel(), k), []).append(cand)
    for (n, k), rows in groups.items():
        cand = torch.stack(rows)  # (B, n) units of equal size, one batch
        t_imp, t_div = split_budget(k, ratio)
        local = vispruner_units(scores[cand], vision_features[cand], t_imp, t_div, reference, numerics,
                                feature_dtype, similarity)
        kept.append(torch.gather(cand, 1, local).reshape(-1))
    return torch.cat(kept).sort().values if kept else unit.new_zeros(0)


@register
class VisPruner(Method):
    """VisPruner: per image / crop / frame, T_imp tokens by head-mean [CLS] attention plus T_div
    diverse tokens left by the official duplicate-removal loop; ascending order."""

    name = "vispruner"
    #: the layout is planned on the host and every round's size is a host int (removal_schedule): no device
    #: read; numerics="official" is refused by Method.capture_refusal (reference mode runs eagerly)
    capturable = "full"
    vision_stage = True
    needs_vision_attention = True

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            # rho; None = 0.75 if budget <= 64 else 0.5 (README examples)
            "important_ratio": None,
            # True: official numerics (fp16 similarity) and errors where the official code fails
            "reference": False,
            # "ours" or "official" (reference mode: the official dtypes, unstable argsort, official round sizes)
            "numerics": NUMERICS_OPTION,
            "similarity": Option("rounds", SIMILARITY_MODES,
                                 doc="ours' duplicate removal: each round's products (official) or one Gram matrix"),
            "cls_token": Option("drop", CLS_TOKEN_MODES,
                                doc="Video-LLaVA frame [CLS]: drop (T patches) or keep ([CLS] + T-1 patches)"),
            # LLaVA-NeXT / OneVision newline tokens: kept as layout (True) or dropped
            "keep_newlines": True,
            "official_attention": Option("tower", OFFICIAL_ATTENTIONS,
                                         doc="numerics='official' only: the [CLS] attentions in the tower's dtype (the "
                                             "official fork) or the images' (RESTORE's copy)"),
        }

    def __init__(self, budget=None, **options):
        if budget is None:
            raise ValueError("vispruner: a budget T (tokens per image / crop / frame) is required")
        super().__init__(budget, **options)
        if self.important_ratio is not None and not (0.0 <= float(self.important_ratio) <= 1.0):
            raise ValueError(f"vispruner: important_ratio must be in [0, 1], got {self.important_ratio!r}")
        if self.numerics == "official":  # the [CLS] rows as the official eager tower computes them, in its dtype
            self.vision_attention_logits = "model"

    def select_vision(self, sig):
        return Selection(keep=vispruner(sig.cls_attn, sig.vision_features, sig.unit, sig.patch, self.budget,
                                        important_ratio=self.important_ratio, reference=self.reference,
                                        cls_token=self.cls_token, keep_newlines=self.keep_newlines,
                                        numerics=self.numerics, layout=sig.unit_layout(patch=True),
                                        similarity=self.similarity,
                                        # the official .to(images.dtype): its images are in the model's dtype
                                        feature_dtype=sig.features.dtype, official_attention=self.official_attention))
