"""DART: duplication-aware reduction of tokens (arXiv 2502.11494), docs/methods/dart.md.

Official code: ZichenWen1/DART, read from its public fork xqy1111111/DART -
``llava/model/language_model/modeling_llama_self.py`` (``get_retained_image_token`` and the
``DART_K_norm`` model's forward); the same function is in llmc's ``token_reduction/dart.py``, whose
``get_any_states_hook`` takes the keys from layer K-1's KV cache (post-RoPE).

Algorithm (before decoder layer K = 2, prefill only):

1. pivots: the top-4 visual tokens and the top-4 text tokens after the image by the L1 norm of their
   layer K-1 keys (heads concatenated, RoPE applied as in the KV cache);
2. per-pivot budget t = floor(B / 8) (B = ``max_num_trunction``; the sample's budget);
3. candidates = visual tokens that are not pivots; for each pivot in turn add the t candidates
   **least** cosine-similar to it (hidden states output by layer K-1 passed through the LLM's final
   RMSNorm) and remove them from the candidates;
4. retained = visual pivots + all picks (text pivots are text: they stay anyway), sorted; the
   sequence keeps its original position ids (``keep``).

Actual count = 4 + 8 * floor(B / 8) (132 for B = 128), slightly above the nominal budget, as in the
official code.

Reference mode (option ``numerics="official"``; default ``"ours"``): the official numerics and order -
keys and final-normed hidden states cast to float16 (the official LLM runs in fp16), key L1 norms by
``torch.norm(p=1)`` in fp16, pivots and picks by ``torch.topk`` (tie order unspecified, as official),
cosine similarity by ``F.cosine_similarity`` in fp16, and the pivots processed in the iteration order
of a Python ``set`` of their sequence positions (image pivots then text pivots inserted in ``topk``
order), exactly as the official loop ``for item in list(indices_set)``. ``pivot_order`` is ignored
there. Default: fp32, ties to the lower index, pivots by position. Option ``reference_dtype``: "model" (default: the
dtype our LLM runs in, as the official code computes in its own LLM's dtype: fp16 under its builder, fp32 in an fp32
run; ``python -m parity`` compares both) or "float16" (the official eval runs' arithmetic whatever ours runs in).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llava.method import Method, register
from llava.ops import NUMERICS_OPTION
from llava.ops import check_numerics, equivalent_kept_count, masked_take, scale_layers, topk_desc
from llava.selection import Selection

#: the dtype of the official runs' LLM (keys, hidden states): LLaVA loads the LLM in float16
OFFICIAL_DTYPE = torch.float16


def dart_key_l1(keys: torch.Tensor, numerics: str = "ours", dtype: torch.dtype = OFFICIAL_DTYPE) -> torch.Tensor:
    """(S,) L1 norm of each token's keys ``keys`` (S, H, d), heads concatenated: fp32 ("ours") or, as
    the official ``torch.norm(k, p=1, dim=-1)``, in ``dtype`` (``"official"``: the official LLM's dtype, fp16 in
    the official runs)."""
    check_numerics("dart", numerics)
    if numerics == "official":
        return torch.norm(keys.to(dtype).flatten(1).contiguous(), p=1, dim=-1)
    return keys.float().flatten(1).abs().sum(-1)


def dart_pivots(key_l1_visual: torch.Tensor, key_l1_text: torch.Tensor, num_image: int = 4,
                num_text: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Pivot indices (into the visual / text tokens), best first: the ``num_image`` visual and
    ``num_text`` text tokens with the largest key L1 norms (ties: lower index; clipped to what exists)."""
    return topk_desc(key_l1_visual, num_image), topk_desc(key_l1_text, num_text)


def dart_select(feats: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, key_l1: torch.Tensor,
                per_pivot: int, num_image: int = 4, num_text: int = 4, pivot_order: str = "index",
                numerics: str = "ours", text_mask: torch.Tensor | None = None,
                official_dtype: torch.dtype = OFFICIAL_DTYPE) -> torch.Tensor:
    """DART's retained visual tokens, as ascending indices into ``visual``.

    feats (S, D): final-normed hidden states after layer K-1; visual (N,) / text (T,): token indices
    among the S tokens (text = the tokens after the image); key_l1 (S,): L1 norm of each token's
    layer K-1 keys; per_pivot: t, candidates each pivot adds.

    ``pivot_order`` - the order in which pivots pick (the official code iterates a Python ``set``,
    an order that follows no score): "index" = ascending token position (visual pivots first,
    as the image precedes the text), "score" = visual pivots by key norm, then text pivots.

    ``text_mask``: the real rows of a padded ``text`` (the fast path's captured prefill); ``num_text`` must
    then not exceed their count. No host read: the pivots' rows stay on the device (sorted there for
    "index"), and every pivot's candidate count is a host int.

    ``numerics="official"``: :func:`dart_select_official` in ``official_dtype`` (``pivot_order`` is then not
    used)."""
    check_numerics("dart", numerics)
    if numerics == "official":
        return dart_select_official(feats, visual, text, key_l1, per_pivot, num_image, num_text, official_dtype)
    if pivot_order not in ("index", "score"):
        raise ValueError(f"dart: pivot_order must be 'index' or 'score', got {pivot_order!r}")
    text_l1 = key_l1[text]
    if text_mask is not None:  # padded text rows never become pivots
        text_l1 = text_l1.float().masked_fill(~text_mask, float("-inf"))
    img_p, txt_p = dart_pivots(key_l1[visual], text_l1, num_image, num_text)
    ni = img_p.numel()
    rows = torch.cat([visual[img_p], text[txt_p]])  # pivot rows: visual (by key norm), then text
    if pivot_order == "index":  # ascending token position (rows are distinct)
        rows = rows.sort().values
    f = feats.float()
    f = f / f.norm(dim=-1, keepdim=True).clamp(min=1e-8)  # cosine similarity (torch's eps: 1e-8)
    n = visual.numel()
    # seven launches a pivot: the visual rows gathered once (a pivot gathers its candidates' rows from them: the same
    # fresh (|cand|, D) matrix as gathering them from f), the pivots' rows once (each 64-byte aligned, as its own
    # gather would be), and the candidates kept as a uint8 "taken" mask whose stable sort lists them in ascending
    # order (masked_take's sort, without its mask inversion and its gather from an arange)
    fv = f[visual]
    d = f.shape[1]
    if d % 16:  # a pivot's row must start 64-byte aligned (the matrix-vector product's vector): padded rows
        fp = f.new_zeros(rows.numel(), d + 16 - d % 16)
        fp[:, :d] = f[rows]
    else:
        fp = f[rows]
    taken = torch.zeros(n, dtype=torch.uint8, device=visual.device)
    taken.index_fill_(0, img_p.reshape(-1), 1)  # not taken[img_p] = 1: a host scalar's copy (no capture)
    n_cand = n - ni
    picked = [img_p]
    for j in range(rows.numel()):
        if n_cand == 0 or per_pivot <= 0:
            break
        idx = torch.sort(taken, stable=True).indices[:n_cand]  # the candidates, ascending
        sim = fv[idx] @ fp[j, :d]  # (|cand|,)
        take = idx[topk_desc(-sim, per_pivot)]  # least similar first, ties: lower index
        taken.index_fill_(0, take, 1)  # not taken[take] = 1: a host scalar's copy (no capture)
        n_cand -= take.numel()
        picked.append(take)
    return torch.cat(picked).sort().values


def dart_select_official(feats: torch.Tensor, visual: torch.Tensor, text: torch.Tensor, key_l1: torch.Tensor,
                         per_pivot: int, num_image: int = 4, num_text: int = 4,
                         dtype: torch.dtype = OFFICIAL_DTYPE) -> torch.Tensor:
    """DART's retained visual tokens with the official numerics and order (reference mode); same
    arguments and result as :func:`dart_select`.

    As the official ``get_retained_image_token``: pivots = ``topk`` of the key norms (as given, e.g.
    fp16 from :func:`dart_key_l1`); the pivots' sequence positions (image pivots, then text pivots, in
    ``topk`` order) go into a Python ``set`` whose iteration order (CPython: by the ints' hash slots,
    deterministic) is the order in which they pick; each pick is ``topk`` of the negative
    ``F.cosine_similarity`` of the features cast to ``dtype`` (the official LLM's: float16) over the
    candidates in ascending position order (the official ``list(valid_indices)``: a set of ints smaller than
    its table iterates in ascending order). Counts are clipped to what exists (official ``topk`` would raise)."""
    ni, nt = min(int(num_image), visual.numel()), min(int(num_text), text.numel())
    img_p = key_l1[visual].topk(ni).indices
    txt_p = key_l1[text].topk(nt).indices
    order = list(set(torch.cat([visual[img_p], text[txt_p]]).tolist()))  # the one host sync: 8 ints
    f = feats.to(dtype)
    n = visual.numel()
    every = torch.arange(n, device=visual.device)
    cand = torch.ones(n, dtype=torch.bool, device=visual.device)
    cand.index_fill_(0, img_p.reshape(-1), False)  # not cand[img_p] = False: a host scalar's copy (no capture)
    n_cand = n - ni
    picked = [img_p]
    for row in order:
        if n_cand == 0 or per_pivot <= 0:
            break
        idx = masked_take(every, cand, n_cand)
        neg = -F.cosine_similarity(f[row], f[visual[idx]], dim=-1)
        take = idx[neg.topk(min(int(per_pivot), n_cand)).indices]
        cand.index_fill_(0, take, False)  # not cand[take] = False: a host scalar's copy (no capture)
        n_cand -= take.numel()
        picked.append(take)
    return torch.cat(picked).sort().values


@register
class DART(Method):
    """DART: keep 4 visual pivots plus, for each of 8 pivots (4 visual, 4 text), the floor(B/8)
    visual tokens least similar to it.

    ``budget`` = B, DART's ``max_num_trunction``: visual tokens retained after layer K per sample
    (the paper's "retain 192/128/64 tokens"; LLaVA-NeXT: the sample's ``retain_token_num_for_llava_next``;
    Video-LLaVA: all frames together). Without a budget, B = N * (1 - reduction_ratio).
    ``budget_mode="equivalent"`` (our design) reads B as a layer-average budget and keeps FastV's
    n_K = (L*B - K*N) / (L - K) instead, so DART can be compared at equal E."""

    name = "dart"
    llm_reads = ("prev",)  # layer K-1's keys
    capturable = "full"  # its stage is captured per segment; the text pivots from planned text rows
    llm_text_rows = True

    @property
    def llm_text_cap(self) -> int:
        """DART tells text lengths apart only up to its text pivots (min(pivot_text, n_text))."""
        return int(self.pivot_text)
    position_mode = "keep"

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            # K: prune before decoder layer K with layer K-1's keys / outputs (32-layer statement)
            "layer": 2,
            "pivot_image": 4,
            "pivot_text": 4,
            # used when no budget is given: B = N * (1 - reduction_ratio) (README example 0.778)
            "reduction_ratio": 0.778,
            # "kept": budget = max_num_trunction (paper); "equivalent": budget = layer average
            "budget_mode": "kept",
            # "index" (ascending position) or "score"; the official order is a Python set's
            "pivot_order": "index",
            "scale_layers": True,
            # "ours" (fp32, ties to the lower index, pivot_order) or "official" (reference mode:
            # fp16 signals, torch.topk, the official set-iteration pivot order)
            "numerics": NUMERICS_OPTION,
            # reference mode's arithmetic dtype: "float16" (the official runs' fp16 LLM) or "model" (the dtype our
            # LLM runs in: the official code computes in its LLM's dtype, so an official fp32 run computes in fp32)
            "reference_dtype": "model",
        }

    def __init__(self, budget=None, **options):
        super().__init__(budget, **options)
        if self.budget_mode not in ("kept", "equivalent"):
            raise ValueError(f"dart: budget_mode must be 'kept' or 'equivalent', got {self.budget_mode!r}")
        if self.pivot_order not in ("index", "score"):
            raise ValueError(f"dart: pivot_order must be 'index' or 'score', got {self.pivot_order!r}")
        if self.reference_dtype not in ("float16", "model"):
            raise ValueError(f"dart: reference_dtype must be 'float16' or 'model', got {self.reference_dtype!r}")
        if int(self.pivot_image) < 0 or int(self.pivot_text) < 0 or int(self.pivot_image) + int(self.pivot_text) == 0:
            raise ValueError("dart: need at least one pivot")
        if not 0.0 <= float(self.reduction_ratio) <= 1.0:
            raise ValueError("dart: reduction_ratio must be in [0, 1]")

    @property
    def k_layer(self) -> int:
        n = self.num_layers
        return scale_layers([int(self.layer)], n)[0] if self.scale_layers else int(self.layer)

    @property
    def llm_layers(self):
        return (self.k_layer,)

    def max_num_trunction(self, n_visual: int) -> float:
        """B for a sample with ``n_visual`` visual tokens."""
        if self.budget is None:
            return n_visual * (1.0 - float(self.reduction_ratio))
        if self.budget_mode == "equivalent":
            return equivalent_kept_count(self.budget, n_visual, self.k_layer, self.num_layers)
        return self.budget

    def per_pivot(self, n_visual: int) -> int:
        """t = floor(B / (pivot_image + pivot_text))."""
        return int(self.max_num_trunction(n_visual) // (int(self.pivot_image) + int(self.pivot_text)))

    def kept_count(self, n_visual: int, n_text: int) -> int:
        """Retained visual tokens: image pivots + every pivot's picks, capped by N."""
        n_img = min(int(self.pivot_image), n_visual)
        n_piv = n_img + min(int(self.pivot_text), n_text)
        return min(n_visual, n_img + n_piv * self.per_pivot(n_visual))

    def layer_counts(self, n_visual: int, n_text: int) -> list[int]:
        """Predicted visual tokens per decoder layer (n_text = tokens after the image)."""
        L, K = self.num_layers, self.k_layer
        return [n_visual] * K + [self.kept_count(n_visual, n_text)] * (L - K)

    def select_llm(self, stage, sig):
        n = sig.num_visual
        t = self.per_pivot(n)
        n_text = sig.num_text_after
        if self.kept_count(n, n_text) >= n:
            return Selection(keep=torch.arange(n, device=sig.visual.device))
        keys = sig.keys("prev", rope=True)  # (S, Hkv, d): layer K-1's cached keys
        dtype = OFFICIAL_DTYPE if self.reference_dtype == "float16" else sig.hidden.dtype
        key_l1 = dart_key_l1(keys, self.numerics, dtype)
        keep = dart_select(sig.final_norm(), sig.visual, sig.text_after, key_l1, t,
                           int(self.pivot_image), min(int(self.pivot_text), n_text), self.pivot_order, self.numerics,
                           text_mask=sig.text_mask, official_dtype=dtype)
        return Selection(keep=keep)
