"""V2Drop: variation-aware vision token dropping (CVPR 2026, arXiv 2509.01552), docs/methods/v2drop.md.

Official code: xuyang-liu16/V2Drop at 219e03ede8cf6a70d1534903fa238b13dd900bbb - ``V2DropLlamaModel.forward`` in
``llava/model/language_model/V2Drop.py`` (LLaVA-1.5; the selection is lines 121-174) and ``DART.forward`` in
``Qwen2-VL/Qwen2VL_V2Drop/modeling_qwen2_vl_self.py`` (Qwen2-VL; lines 336-384).

Algorithm (prefill only; stages before decoder layers K = 3, 17, 22 of a 32-layer LLaMA):

1. the variation of each current visual token is the L2 norm of the residual update of layer K-1:
   v_i = ||h_K[i] - h_{K-1}[i]||, h_K the input of layer K, h_{K-1} the input of layer K-1 on the same rows
   (``LLMSignals.hidden`` / ``LLMSignals.prev_hidden``);
2. keep the k = max(1, int(n * r_s)) tokens of largest variation, n the visual tokens entering the stage and r_s
   the stage's keep ratio (official 0.5 / 0.5 / 0 of the *current* count: 576 -> 288 -> 144 -> 1), in their
   original order; positions kept, no merging, earlier layers' caches untouched (as the official code).

Schedules (option ``schedule``):

* "official": the official code's keep ratios for the family (``rule``): LLaVA (0.5, 0.5, 0) at 3 / 17 / 22 of 32
  layers; Qwen2-VL (0.25, 0.05, 0) at 3 / 16 / 22 of 28 layers (Qwen2-VL-7B's depth); the default without a budget;
* "fit" (default with a budget; our design): the rule's keep ratios times one factor a (each clipped to 1), a the
  largest whose layer average (equivalent tokens) for the sample's N visual tokens on the model's depth is at most
  the budget;
* "reported": the per-budget prune ratios an official-repository issue quotes from the paper (budgets 192 / 128 /
  64; not readable in the paper's stored text), read as fractions of the remaining tokens.

Stage layers are stated for the rule's depth and mapped onto the model's with ``llava.ops.scale_layers``.

Reference mode (``numerics="official"``): the difference and its norm in the model's dtype (``torch.norm(cur -
prev, p=2, dim=-1)``) and ``torch.topk``. Ours: the difference and the norm in fp32, ties to the lower index.
"""

from __future__ import annotations

import functools
import logging

import torch

from llava.families import registry
from llava.method import Method, register
from llava.options import Option
from llava.ops import NUMERICS_OPTION
from llava.ops import check_numerics, scale_layers, stage_layer_counts, topk_desc
from llava.selection import Selection

log = logging.getLogger(__name__)

#: the official rules: (stage layers, keep ratios of the current count, the depth the layers are stated for)
RULES = {
    "llava": ((3, 17, 22), (0.5, 0.5, 0.0), 32),  # V2Drop.py 129, 139-144 (LLaVA-1.5-7B: 32 layers)
    "qwen2vl": ((3, 16, 22), (0.25, 0.05, 0.0), 28),  # modeling_qwen2_vl_self.py 345, 357-362 (Qwen2-VL-7B: 28)
}
#: families whose default rule is the official Qwen2-VL one: the Qwen-VL models (their record's ``qwen_grid``)
QWEN_FAMILIES = registry.where(qwen_grid=True)
#: keep ratios (1 - the prune ratios 50/70/100 %, 72/75/100 %, 95/95/100 %) per budget, as an official-repository
#: issue quotes the paper; read as fractions of the remaining tokens (the reading whose averages match the budgets)
REPORTED = {192: (0.5, 0.3, 0.0), 128: (0.28, 0.25, 0.0), 64: (0.05, 0.05, 0.0)}
SCHEDULES = ("auto", "official", "fit", "reported")


def v2drop_scores(hidden: torch.Tensor, prev_hidden: torch.Tensor, numerics: str = "ours") -> torch.Tensor:
    """The variation (N,) of N tokens: the L2 norm of ``hidden - prev_hidden`` (N, D), the update the layer between
    the two made. "official": in the rows' dtype (the official ``torch.norm(cur - prev, p=2, dim=-1)``); "ours":
    the difference and the norm in fp32."""
    check_numerics("v2drop", numerics)
    if numerics == "official":
        return torch.norm(hidden - prev_hidden, p=2, dim=-1)
    return torch.linalg.vector_norm(hidden.float() - prev_hidden.float(), ord=2, dim=-1)


def v2drop_select(scores: torch.Tensor, k: int, numerics: str = "ours") -> torch.Tensor:
    """The ``k`` tokens of largest variation, ascending (the official ``topk`` then ``sort``); ours breaks ties by
    the lower index, the reference mode keeps ``torch.topk``'s order."""
    idx = scores.topk(k, largest=True).indices if numerics == "official" else topk_desc(scores, k)
    return idx.sort().values


def stage_counts(n_visual: int, ratios) -> tuple[int, ...]:
    """Visual tokens after each stage for N entering the LLM: the official k = max(1, int(n * r)) of the current
    count n at every stage (a sample without visual tokens keeps none: the official code skips it)."""
    out, cur = [], int(n_visual)
    for r in ratios:
        cur = max(1, int(cur * float(r))) if cur > 0 else 0
        out.append(cur)
    return tuple(out)


def equivalent_tokens(n_visual: int, layers, counts, num_layers: int) -> float:
    """The layer average of the visual tokens entering every decoder layer (our budget convention)."""
    return sum(stage_layer_counts(n_visual, layers, counts, num_layers)) / num_layers


@functools.lru_cache(maxsize=4096)
def fit_ratios(budget: int, n_visual: int, layers: tuple, ratios: tuple, num_layers: int) -> tuple[float, ...]:
    """The keep ratios ``ratios`` scaled by one factor a (each clipped to 1), a the largest (to 1e-9 of the
    factor's range, bisection) whose equivalent tokens for ``n_visual`` are at most ``budget`` (our design: the
    official schedule's shape, fitted to a budget). A budget below the schedule's least average (every stage
    keeps 1) gives a = 0; one above its largest (every ratio 1 except the zeros) gives the clipped maximum."""
    top = 1.0 / min(r for r in ratios if r > 0) if any(r > 0 for r in ratios) else 1.0

    def scaled(a):
        return tuple(min(1.0, r * a) for r in ratios)

    def avg(a):
        return equivalent_tokens(n_visual, layers, stage_counts(n_visual, scaled(a)), num_layers)

    if avg(top) <= budget:
        return scaled(top)
    lo, hi = 0.0, top
    if avg(lo) > budget:
        return scaled(0.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        if avg(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return scaled(lo)


@register
class V2Drop(Method):
    """V2Drop: before decoder layers 3 / 17 / 22, drop the visual tokens whose hidden states the previous layer
    changed least (L2 norm of its residual update); no attention needed (any attention kernel).

    ``budget`` (optional): equivalent visual tokens per sample (the layer average), reached by the official
    schedule's shape with a fitted factor (``schedule="fit"``); without one the official code's schedule of the
    family. ``keep_ratios``: an explicit schedule (fractions of the current count per stage)."""

    name = "v2drop"
    llm_reads = ()  # hidden states only: LLMSignals.hidden and .prev_hidden
    capturable = "full"
    position_mode = "keep"
    families = registry.where(hybrid=False)  # attention in every decoder layer
    unsupported_reason = ("refused on the hybrid Qwen3.5 decoder like the other in-LLM methods: its stage layers "
                          "would fall among Gated DeltaNet layers and no official rule exists for it; use a pre-LLM "
                          "method there")

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            "schedule": Option("auto", SCHEDULES, doc="auto: official without a budget, fit with one; reported: "
                                                      "budgets 192 / 128 / 64 (the prune ratios quoted from the paper "
                                                      "in an official-repository issue, second-hand)"),
            # the official rule: "auto" (Qwen2-VL / Qwen2.5-VL / Qwen3-VL: "qwen2vl", every other family: "llava"),
            # "llava" (3 / 17 / 22 of 32 layers, keep 0.5 / 0.5 / 0) or "qwen2vl" (3 / 16 / 22 of 28, 0.25 / 0.05 / 0)
            "rule": "auto",
            # explicit stage layers (stated for the rule's depth) and keep ratios; None: the rule's
            "layers": None,
            "keep_ratios": None,
            # map the stage layers from the rule's depth onto the model's (llava.ops.scale_layers)
            "scale_layers": True,
            # "ours" (fp32 difference and norm, ties to the lower index) or "official" (reference mode)
            "numerics": NUMERICS_OPTION,
        }

    def __init__(self, budget=None, **options):
        super().__init__(budget, **options)
        if self.rule not in ("auto", *RULES):
            raise ValueError(f"v2drop: rule must be 'auto' or one of {tuple(RULES)}, got {self.rule!r}")
        if self.keep_ratios is not None:
            if self.budget is not None:
                raise ValueError("v2drop: give either a budget (equivalent tokens) or keep_ratios, not both")
            self.keep_ratios = tuple(float(r) for r in self.keep_ratios)
            if not self.keep_ratios or any(not 0.0 <= r <= 1.0 for r in self.keep_ratios):
                raise ValueError(f"v2drop: keep_ratios must be fractions in [0, 1], got {self.keep_ratios}")
        if self.layers is not None:
            self.layers = tuple(int(k) for k in self.layers)
            if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 1:
                raise ValueError(f"v2drop: layers must be increasing layers >= 1, got {self.layers}")
        if self.schedule == "official" and self.budget is not None:
            raise ValueError("v2drop: schedule='official' is the official code's fixed schedule; it takes no budget")
        if self.schedule == "fit" and self.budget is None:
            raise ValueError("v2drop: schedule='fit' needs a budget (equivalent tokens)")
        if self.schedule == "reported":
            if self.budget not in REPORTED:
                raise ValueError(f"v2drop: schedule='reported' has the budgets {sorted(REPORTED)}, got {self.budget}")
            if self.keep_ratios is not None:
                raise ValueError("v2drop: schedule='reported' sets the keep ratios; do not give keep_ratios")
        n_layers = len(self.layers if self.layers is not None else RULES["llava"][0])
        if self.keep_ratios is not None and len(self.keep_ratios) != n_layers:
            raise ValueError(f"v2drop: {len(self.keep_ratios)} keep_ratios for {n_layers} stage layers")

    # -- the schedule -------------------------------------------------------------------------
    @property
    def rule_name(self) -> str:
        if self.rule != "auto":
            return self.rule
        return "qwen2vl" if self.family in QWEN_FAMILIES else "llava"

    @property
    def schedule_name(self) -> str:
        if self.schedule != "auto":
            return self.schedule
        return "official" if self.budget is None else "fit"

    def _rule(self) -> tuple[tuple[int, ...], tuple[float, ...], int]:
        """(stage layers as stated, base keep ratios, the depth they are stated for)."""
        layers, ratios, depth = RULES["llava" if self.schedule_name == "reported" else self.rule_name]
        if self.schedule_name == "reported":
            ratios = REPORTED[self.budget]
        if self.layers is not None:
            layers = self.layers
        if self.keep_ratios is not None:
            ratios = self.keep_ratios
        if len(ratios) != len(layers):
            raise ValueError(f"v2drop: {len(ratios)} keep ratios for the {len(layers)} stage layers {layers}")
        return layers, ratios, depth

    @property
    def llm_layers(self):
        layers, _, depth = self._rule()
        n = (self.num_layers if self.family is not None else depth)
        return scale_layers(list(layers), n, reference=depth) if self.scale_layers else layers

    def ratios(self, n_visual: int) -> tuple[float, ...]:
        """The keep ratios (of the current count) each stage applies for a sample with ``n_visual`` tokens."""
        _, ratios, depth = self._rule()
        if self.schedule_name != "fit":
            return tuple(ratios)
        L = (self.num_layers if self.family is not None else depth)
        return fit_ratios(int(self.budget), int(n_visual), tuple(self.llm_layers), tuple(ratios), L)

    def stage_counts(self, n_visual: int) -> tuple[int, ...]:
        counts = stage_counts(n_visual, self.ratios(n_visual))
        if self.budget is not None and self.schedule_name == "fit" and n_visual and not getattr(self, "_warned", 0):
            L = (self.num_layers if self.family is not None else self._rule()[2])
            if equivalent_tokens(n_visual, self.llm_layers, counts, L) > self.budget:
                self._warned = True
                log.warning("v2drop: budget %d is below the least average of the schedule for N=%d visual tokens "
                            "(every stage keeping 1); keeping 1 from layer %d", self.budget, n_visual,
                            self.llm_layers[0])
        return counts

    def layer_counts(self, n_visual: int) -> list[int]:
        """Visual tokens entering every decoder layer."""
        L = (self.num_layers if self.family is not None else self._rule()[2])
        return stage_layer_counts(n_visual, self.llm_layers, self.stage_counts(n_visual), L)

    def select_llm(self, stage, sig):
        k = self.stage_counts(sig.num_visual_entry)[stage]
        dev = sig.visual.device
        if k >= sig.num_visual:
            return Selection(keep=torch.arange(sig.num_visual, device=dev))
        if sig.prev_hidden is None:
            raise ValueError("v2drop: the engine gave no prev_hidden (the input of decoder layer K-1)")
        scores = v2drop_scores(sig.hidden[sig.visual], sig.prev_hidden[sig.visual], self.numerics)
        return Selection(keep=v2drop_select(scores, k, self.numerics))
