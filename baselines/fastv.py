"""FastV: "An Image is Worth 1/2 Tokens After Layer 2" (ECCV 2024), docs/methods/fastv.md.

Official code: pkunlp-icler/FastV - the in-place version ``LlamaModel.forward`` ("FastV Token Rerank")
in ``src/transformers/src/transformers/models/llama/modeling_llama.py`` and the KV-cache version
``FastVLlamaModel.forward`` in ``src/FastV/lmms-eval/fastv_kvcache.py``.

Algorithm (at the entry of decoder layer K, prefill only):

1. take layer K-1's attention probabilities (the last layer that ran on the full sequence), the row
   of the **last prompt token**, averaged over heads, restricted to the visual columns;
2. keep the top-k visual tokens (k = int(N * (1 - R)), or from an equivalent-token budget, below),
   all text tokens, sorted in their original order;
3. layers >= K run on the shortened sequence; kept tokens **keep their original RoPE positions**.

Equivalent-token budget (docs/methods/README.md, budget conventions; docs/methods/fastv.md): for a layer average of B visual tokens on an
L-layer LLM whose first K layers see all N visual tokens, the count kept after layer K is

    n_K = (L * B - K * N) / (L - K)        (192/128/64 -> 166/98/30 at K=2, N=576, L=32)

rounded half up and clipped to 0..N.

Reference mode (option ``numerics="official"``; default ``"ours"``): the official numerics - layer K-1's
row as the official eager attention computes it (``q k^T / sqrt(d)`` in the model's dtype, the softmax in fp32
cast ``.to(query_states.dtype)``), the mean over heads in that dtype, and ``torch.topk`` (official tie order)
instead of the fp32 mean with ties to the lower index. The dtype is the run's: fp16 under the official builder,
fp32 in an fp32 run (the official code run in fp32 ranks in fp32).
"""

from __future__ import annotations

import logging
import math

import torch

from llava.method import Method, register
from llava.ops import NUMERICS_OPTION
from llava.ops import check_numerics, equivalent_kept_count, round_half_up, scale_layers, topk_desc  # noqa: F401
from llava.selection import Selection

log = logging.getLogger(__name__)

#: dtype of the official attention probabilities (softmax in fp32, cast to the fp16 query dtype)
OFFICIAL_DTYPE = torch.float16


def ratio_kept_count(n_visual: int, ratio: float) -> int:
    """Visual tokens kept for a drop ratio R: int(N * (1 - R)) as the official ``topk(int(576 * ratio))``
    (a tiny epsilon absorbs binary-fraction error, e.g. 576 * (1 - 0.9) = 57.6 -> 57)."""
    return max(0, min(int(n_visual), math.floor(n_visual * (1.0 - float(ratio)) + 1e-9)))


def fastv_select(last_row_attn: torch.Tensor, visual: torch.Tensor, k: int, numerics: str = "ours",
                 dtype: torch.dtype = OFFICIAL_DTYPE) -> torch.Tensor:
    """FastV's choice: ``last_row_attn`` (H, S) = attention probabilities of the last prompt token in
    layer K-1 per head; ``visual`` (N,) = the visual tokens' indices among the S tokens. Returns the
    indices (into ``visual``) of the ``k`` visual tokens with the highest head-mean attention, in
    ascending (original) order; ties go to the lower index. ``numerics="official"``: the rows cast to
    ``dtype``, head mean in that dtype (as the official ``.to(query_states.dtype)`` and
    ``torch.mean(attn, dim=1)``), ``torch.topk``. ``dtype``: the official code's is its LLM's, fp16 under its
    builder, fp32 when it runs in fp32; the method passes the run's own (an fp16 cast in an fp32 run made ties
    the official fp32 ranking does not have: docs/methods/fastv.md)."""
    check_numerics("fastv", numerics)
    if numerics == "official":
        scores = last_row_attn.to(dtype)[None].mean(dim=1)[0][visual]
        return scores.topk(max(0, min(int(k), scores.numel()))).indices.sort().values
    scores = last_row_attn.float().mean(0)[visual]
    return topk_desc(scores, k).sort().values


def layer_schedule(n_visual: int, layer: int, kept: int, num_layers: int) -> list[int]:
    """Visual tokens in the input of every decoder layer: N for layers < K, n_K from K on."""
    return [int(n_visual)] * layer + [min(int(kept), int(n_visual))] * (num_layers - layer)


@register
class FastV(Method):
    """FastV: after decoder layer K-1, keep the visual tokens the last prompt token attends to most.

    ``budget`` (optional): equivalent visual tokens per sample (the layer average, docs/methods/README.md, budget conventions),
    turned into n_K with the formula above using the sample's own visual count N (LLaVA-NeXT: all
    crops and newline tokens of the sample; Video-LLaVA: all frames). Without a budget, ``ratio`` R
    is the fraction of visual tokens dropped (official default 0.5)."""

    name = "fastv"
    llm_reads = ("prev",)  # layer K-1's attention row of the last prompt token
    capturable = "full"  # its stage is captured per segment (llava.fast.llm)
    position_mode = "keep"

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            # K: prune before decoder layer K using layer K-1's attention (paper: K=2; the README's
            # lmms-eval recipe uses K=3). Stated for a 32-layer LLM, see scale_layers.
            "layer": 2,
            # R: fraction of visual tokens dropped when no budget is given (paper title setting 50%).
            "ratio": 0.5,
            # map `layer` from a 32-layer LLM onto the model's depth with llava.ops.scale_layers
            # (identity on 32 layers, 2 -> 1 on the 4-layer tiny LLM); False = use it verbatim.
            "scale_layers": True,
            # "ours" (fp32 head mean, ties to the lower index) or "official" (reference mode: fp16
            # probabilities and head mean, torch.topk)
            "numerics": NUMERICS_OPTION,
        }

    def __init__(self, budget=None, **options):
        if budget is not None and "ratio" in options:
            raise ValueError("fastv: give either a budget (equivalent tokens) or a drop ratio, not both")
        super().__init__(budget, **options)
        if not 0.0 <= float(self.ratio) <= 1.0:
            raise ValueError(f"fastv: ratio must be in [0, 1], got {self.ratio}")
        if int(self.layer) < 1:
            raise ValueError(f"fastv: layer must be >= 1, got {self.layer}")

    @property
    def k_layer(self) -> int:
        """K on the attached model (after scaling)."""
        n = self.num_layers
        return scale_layers([int(self.layer)], n)[0] if self.scale_layers else int(self.layer)

    @property
    def llm_layers(self):
        return (self.k_layer,)

    def kept_count(self, n_visual: int) -> int:
        if self.budget is None:
            return ratio_kept_count(n_visual, self.ratio)
        n = equivalent_kept_count(self.budget, n_visual, self.k_layer, self.num_layers)
        if n == 0 and n_visual and not getattr(self, "_warned", False):
            self._warned = True
            log.warning("fastv: budget %d is below K*N/L for N=%d visual tokens; keeping none after layer %d",
                        self.budget, n_visual, self.k_layer)
        return n

    def layer_counts(self, n_visual: int) -> list[int]:
        """Predicted visual tokens per decoder layer for a sample with ``n_visual`` visual tokens."""
        return layer_schedule(n_visual, self.k_layer, self.kept_count(n_visual), self.num_layers)

    def select_llm(self, stage, sig):
        k = self.kept_count(sig.num_visual)
        if k >= sig.num_visual:
            return Selection(keep=torch.arange(sig.num_visual, device=sig.visual.device))
        # (H, S): layer K-1, last prompt token; reference mode: the official eager attention's logits and
        # probabilities in the run's dtype (fp16 under the official builder, fp32 in an fp32 run)
        official = self.numerics == "official"
        row = sig.attention("last", layer="prev", logits="model" if official else "fp32")[:, 0]
        return Selection(keep=fastv_select(row, sig.visual, k, self.numerics, dtype=sig.hidden.dtype))
