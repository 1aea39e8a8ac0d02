"""PriorTR: "Accelerating Multimodal Large Language Models with Prior-Corrected Token Reduction" (ECCV 2026,
arXiv 2606.24156), docs/methods/priortr.md.

Official code: CodeChildCZJ/PriorTR at e442a4c14af1b333067a6b8310c9111cad922033 - the score in
``image/LLaVA/llava/vtr/strategy/priortr.py`` (``compute_scores``), the choice in ``strategy/base.py``
(``select_tokens``), the pruning after layer K-1 in ``model/prunable_llama.py`` (``forward``,
``_compute_and_apply_pruning``).

Algorithm (at the entry of decoder layer K, prefill only; K = 3 by default, so layer K-1 = 2 scores):

1. A = layer K-1's attention probabilities (the official eager attention of that layer), restricted to the
   visual columns;
2. the prior Q = the row of the **null token**, the first token after the image: under the causal mask it
   sees the image but not the instruction; the posterior P = the mean of the rows from the null token to
   the end of the prompt ("question"; the null row and the last token included) or the last row ("last");
   both averaged over heads;
3. P and Q normalised to sum 1 (+1e-10), fp32; S = P * log((P + eps) / (Q + eps)), eps = 1e-10 (the
   V-information of each visual token); NaN -> 0, +-inf -> +-1e6;
4. keep the top-k visual tokens by S, in their original order; layers >= K run on the short sequence,
   kept tokens keep their original RoPE positions.

Budgets: ``keep_tokens`` k is the official count (tokens kept after layer K: the README's "192 / 128 /
64 tok"); a ``budget`` is our equivalent-token convention (the layer average, docs/methods/README.md), turned
into k = (L*B - K*N) / (L - K) as for FastV.

Reference mode (``numerics="official"``): the attention in the model's dtype (the eager layer's fp32 softmax
cast to fp16 / bf16), the means over the question rows and over the heads in that dtype, the score cast back
to it and ``torch.topk`` (official tie order). ``numerics="ours"``: fp32 probabilities and means, the fp32
score, ties to the lower index.
"""

from __future__ import annotations

import logging
import math

import torch

from llava.families import registry
from llava.method import Method, register
from llava.options import Option
from llava.ops import NUMERICS_OPTION
from llava.ops import check_numerics, equivalent_kept_count, scale_layers, topk_desc
from llava.selection import Selection

log = logging.getLogger(__name__)

#: the official epsilon of the normalisation and of the log ratio (priortr.py 84-90)
EPS = 1e-10
#: the official clamp of +-inf scores
INF_CLAMP = 1e6
#: P's rows: the question's rows from the null token to the end of the prompt ("question", the official LLaVA and
#: InternVL code), the same without the last prompt token ("question_excl_last", the official Qwen2-VL / Qwen3-VL
#: code: ``attention[:, :, img_end:-1]``), or the last row ("last")
QUERIES = ("question", "question_excl_last", "last")
#: the families whose official code reads "question_excl_last", keeps at least one token of a keep_ratio and
#: computes the score layer's attention beside the SDPA layer (transformers' eager product ``q k^T * scaling``)
QWEN_RULE_FAMILIES = registry.where(qwen_grid=True)
HEADS = ("mean", "max")


def _heads(x: torch.Tensor, heads: str) -> torch.Tensor:
    return x.mean(dim=0) if heads == "mean" else x.max(dim=0).values


def priortr_scores(rows: torch.Tensor, visual: torch.Tensor, queries: str = "question", heads: str = "mean",
                   numerics: str = "ours", row_mask: torch.Tensor | None = None, prior_row: int = 0) -> torch.Tensor:
    """PriorTR's V-information score per visual token.

    ``rows`` (H, T, S): attention probabilities of layer K-1 for the T query rows from the null token (row 0)
    to the last prompt token (row T-1), over the S tokens; ``visual`` (N,): the visual tokens' indices among S.
    ``queries``: "question" (P = mean of the T rows), "question_excl_last" (the mean of rows 0..T-2; the last row
    when T == 1, as the official fallback) or "last" (P = row T-1; with ``row_mask`` the last real row). ``row_mask`` (T,) bool: the real rows of a padded ``rows`` (the fast path); None: all real.
    Returns (N,) fp32 scores (``numerics="official"``: in ``rows``' dtype, as the official code returns them).
    """
    check_numerics("priortr", numerics)
    if queries not in QUERIES:
        raise ValueError(f"priortr: queries must be one of {QUERIES}, got {queries!r}")
    if heads not in HEADS:
        raise ValueError(f"priortr: heads must be one of {HEADS}, got {heads!r}")
    dtype = rows.dtype if numerics == "official" else torch.float32
    a = rows[:, :, visual].to(dtype)  # (H, T, N)
    q = a[:, min(int(prior_row), a.shape[1] - 1)]  # the null token's row: the prior
    t = a.shape[1]
    if row_mask is not None:  # the last real row of a padded block (no host read: one-hot)
        last = (torch.cumsum(row_mask.long(), 0) == row_mask.long().sum()) & row_mask
    else:
        last = torch.arange(t, device=a.device) == t - 1
    if queries == "last" or (queries == "question_excl_last" and row_mask is None and t == 1):
        p = a[:, -1] if row_mask is None else \
            torch.where(last[None, :, None], a, torch.zeros((), dtype=dtype, device=a.device)).sum(1)
    elif row_mask is None:  # the official mean over the rows (in the attention's dtype in reference mode)
        p = a.mean(dim=1) if queries == "question" else a[:, :-1].mean(dim=1)
    else:
        rows_in = row_mask & ~last if queries == "question_excl_last" else row_mask
        # one real row only: the official fallback to the last row (rows_in empty)
        rows_in = torch.where(rows_in.any(), rows_in, last)
        real = torch.where(rows_in[None, :, None], a.float(), torch.zeros((), device=a.device))
        p = (real.sum(1) / rows_in.sum().clamp(min=1).float()).to(dtype)
    p, q = _heads(p, heads).float(), _heads(q, heads).float()
    p = p / (p.sum() + EPS)
    q = q / (q.sum() + EPS)
    s = p * torch.log((p + EPS) / (q + EPS))
    s = torch.nan_to_num(s, nan=0.0, posinf=INF_CLAMP, neginf=-INF_CLAMP)
    return s.to(rows.dtype) if numerics == "official" else s


def priortr_select(scores: torch.Tensor, k: int, numerics: str = "ours") -> torch.Tensor:
    """The ``k`` best visual tokens by score, ascending: ``torch.topk`` on the official scores (reference mode)
    or the fp32 order with ties to the lower index."""
    k = max(0, min(int(k), scores.numel()))
    idx = scores.topk(k).indices if numerics == "official" else topk_desc(scores, k)
    return idx.sort().values


@register
class PriorTR(Method):
    """PriorTR: after decoder layer K-1, keep the visual tokens with the highest V-information
    S = P log(P / Q), Q the null token's attention (the instruction-agnostic prior), P the question's.

    ``budget`` (optional): equivalent visual tokens per sample (layer average), turned into the count kept after
    layer K with the sample's own visual count. Or ``keep_tokens`` (the official count after layer K) or
    ``keep_ratio`` (its share of the sample's visual tokens; default 1/3 = the official LLaVA-1.5 192 of 576)."""

    name = "priortr"
    #: the rows from the null token to the end of the prompt, planned padded on the fast path; their count never
    #: changes the stage's count (0: one graph per bucket whatever the question's length)
    llm_text_rows = True
    llm_text_cap = 0
    llm_reads = ("prev",)  # layer K-1's own attention
    capturable = "full"
    position_mode = "keep"

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            # K (official prune_layer 3: the score layer is K-1 = 2), stated for a 32-layer LLM
            "layer": 3,
            # the official count kept after layer K (README's 192 / 128 / 64); None: from the budget or keep_ratio
            "keep_tokens": None,
            # without a budget or keep_tokens: the kept share (1/3: the official LLaVA-1.5 default 192 of 576)
            "keep_ratio": 1 / 3,
            # P's rows: "auto" (the official rule of the family: "last" on LLaVA-NeXT (setup_vtr),
            # "question_excl_last" on the Qwen families (the Qwen2-VL / Qwen3-VL code), "question" elsewhere),
            # "question", "question_excl_last", "last"
            "queries": "auto",
            # the score layer's rows: "auto" ("none" in the reference mode on the Qwen families, else "causal"),
            # "causal" (the paper's prior: the null token sees the image, not the instruction; the official LLaVA
            # code's eager rows) or "none" (the official Qwen code: its look-ahead adds transformers' mask, which
            # SDPA / FlashAttention leave out at batch 1, so every row reads the whole prompt)
            "score_mask": "auto",
            # Q's row: "auto" (the official rule of the family: the first token after the image, 0; on InternVL the
            # newline after </img>, 1) or the row's offset from the first token after the image
            "prior_row": "auto",
            # the fewest tokens a keep_ratio keeps: "auto" (the official rule: 1 on the Qwen families,
            # ``max(1, int(n * r))``; 0 elsewhere, ``max(0, int(n * r))``), or a whole number
            "min_keep": "auto",
            "heads": Option("mean", HEADS, doc="the reduction over heads (official head_aggregation)"),
            # map `layer` from a 32-layer LLM onto the model's depth (llava.ops.scale_layers)
            "scale_layers": True,
            # the KV caches of the layers before a stage: "kept" (ours: each layer's as it saw the prompt) or
            # "pruned" (official: the dropped rows removed too, so decoding sees the kept tokens alone; eager only)
            "caches": "kept",
            # "ours" (fp32 attention and score, ties to the lower index) or "official" (reference mode)
            "numerics": NUMERICS_OPTION,
        }

    def __init__(self, budget=None, **options):
        if budget is not None and options.get("keep_tokens") is not None:
            raise ValueError("priortr: give either a budget (equivalent tokens) or keep_tokens, not both")
        super().__init__(budget, **options)
        if self.caches not in ("kept", "pruned"):
            raise ValueError(f"priortr: caches must be 'kept' or 'pruned', got {self.caches!r}")
        if int(self.layer) < 1:
            raise ValueError(f"priortr: layer must be >= 1, got {self.layer}")
        if self.keep_tokens is not None and (isinstance(self.keep_tokens, bool) or int(self.keep_tokens) < 0
                                             or self.keep_tokens != int(self.keep_tokens)):
            raise ValueError(f"priortr: keep_tokens must be a whole number >= 0, got {self.keep_tokens!r}")
        if not 0.0 <= float(self.keep_ratio) <= 1.0:
            raise ValueError(f"priortr: keep_ratio must be in [0, 1], got {self.keep_ratio}")
        if self.queries not in ("auto", *QUERIES):
            raise ValueError(f"priortr: queries must be 'auto' or one of {QUERIES}, got {self.queries!r}")
        if self.prior_row != "auto" and (isinstance(self.prior_row, bool) or not isinstance(self.prior_row, int)
                                         or self.prior_row < 0):
            raise ValueError(f"priortr: prior_row must be 'auto' or a whole number >= 0, got {self.prior_row!r}")
        if self.score_mask not in ("auto", "causal", "none"):
            raise ValueError(f"priortr: score_mask must be 'auto', 'causal' or 'none', got {self.score_mask!r}")
        if self.min_keep != "auto" and (isinstance(self.min_keep, bool) or not isinstance(self.min_keep, int)
                                        or self.min_keep < 0):
            raise ValueError(f"priortr: min_keep must be 'auto' or a whole number >= 0, got {self.min_keep!r}")

    @property
    def k_layer(self) -> int:
        n = self.num_layers
        return scale_layers([int(self.layer)], n)[0] if self.scale_layers else int(self.layer)

    @property
    def qwen_rule(self) -> bool:
        """The attached family's official code is the Qwen2-VL / Qwen3-VL one (:data:`QWEN_RULE_FAMILIES`)."""
        return self.family in QWEN_RULE_FAMILIES

    @property
    def eager_layers(self) -> tuple[int, ...]:
        """The reference mode runs each score layer K-1 on eager attention, as the official LLaVA code (its
        ``output_attentions=True`` there takes the eager path): its fp16 hidden states are the eager ones. The
        official Qwen code runs that layer on the model's own attention (SDPA) and computes the probabilities
        beside it: no eager layer there."""
        return (self.k_layer - 1,) if self.numerics == "official" and not self.qwen_rule else ()

    @property
    def prune_past_cache(self) -> bool:
        return self.caches == "pruned"

    @property
    def llm_layers(self):
        return (self.k_layer,)

    @property
    def query_rows(self) -> str:
        """P's rows as run: the official auto rule resolved on the attached family."""
        if self.queries != "auto":
            return self.queries
        if self.qwen_rule:
            return "question_excl_last"
        return "last" if self.family == "llava_next" else "question"

    @property
    def prior_offset(self) -> int:
        """Q's row after the image, as run (``prior_row`` resolved on the attached family)."""
        if self.prior_row != "auto":
            return int(self.prior_row)
        return 1 if self.family == "internvl" else 0

    @property
    def causal_scores(self) -> bool:
        """The score layer's rows are causal (``score_mask`` resolved: see ``option_defaults``)."""
        if self.score_mask != "auto":
            return self.score_mask == "causal"
        return not (self.numerics == "official" and self.qwen_rule)

    @property
    def keep_floor(self) -> int:
        """The fewest tokens a keep_ratio keeps, as run (``min_keep`` resolved on the attached family)."""
        return (1 if self.qwen_rule else 0) if self.min_keep == "auto" else int(self.min_keep)

    def kept_count(self, n_visual: int) -> int:
        if self.keep_tokens is not None:
            return min(int(self.keep_tokens), int(n_visual))
        if self.budget is None:
            k = max(self.keep_floor, math.floor(int(n_visual) * float(self.keep_ratio) + 1e-9))
            return max(0, min(int(n_visual), k))
        n = equivalent_kept_count(self.budget, n_visual, self.k_layer, self.num_layers)
        if n == 0 and n_visual and not getattr(self, "_warned", False):
            self._warned = True
            log.warning("priortr: budget %d is below K*N/L for N=%d visual tokens; keeping none after layer %d",
                        self.budget, n_visual, self.k_layer)
        return n

    def layer_counts(self, n_visual: int) -> list[int]:
        """Visual tokens entering every decoder layer: N before layer K, k from K on."""
        L, K = self.num_layers, self.k_layer
        return [int(n_visual)] * K + [self.kept_count(n_visual)] * (L - K)

    def select_llm(self, stage, sig):
        k = self.kept_count(sig.num_visual)
        dev = sig.visual.device
        if k >= sig.num_visual:
            return Selection(keep=torch.arange(sig.num_visual, device=dev))
        if k == 0:  # the official topk(0) is an empty tensor: nothing kept, no signal needed
            return Selection(keep=torch.zeros(0, dtype=torch.long, device=dev))
        # (H, T, S): layer K-1's attention of the rows from the null token to the last prompt token
        logits = "fp32" if self.numerics != "official" else "model_scaling" if self.qwen_rule else "model"
        rows = sig.attention("text_after", layer="prev", logits=logits, causal=self.causal_scores)
        scores = priortr_scores(rows, sig.visual, self.query_rows, self.heads, self.numerics, row_mask=sig.text_mask,
                                prior_row=self.prior_offset)
        return Selection(keep=priortr_select(scores, k, self.numerics))
