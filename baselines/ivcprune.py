"""IVC-Prune: "Revealing the Implicit Visual Coordinates in LVLMs for Vision Token Pruning" (ICLR 2026, arXiv
2602.03060), docs/methods/ivcprune.md.

Official code: FireRedTeam/IVC-Prune at 03afd9cee41f60bb30b51a4105839f2b5d467814, a fork of transformers 4.51.3:
LLaVA in ``transformers/src/transformers/models/llama/modeling_llama.py`` (``compute_attention_weights`` 734-797,
``IVCP_forward_flashattention`` 799-1011, ``prune_past_key_values`` 1013-1049), Qwen2.5-VL in
``models/qwen2_5_vl/modeling_qwen2_5_vl.py`` (``prune_past_key_values`` 1317-1353,
``calculate_avg_similarity_for_subset_einsum`` 1355-1391, ``IVCP_forward_flashattention`` 1393-1627).

Algorithm (one stage at the entry of decoder layer K, prefill only; K = 16 of LLaVA-1.5-7B's 32 layers):

1. the values V of layer K-1 (its v projection of its normed input: no RoPE) give a value-similarity
   W = softmax(V V^T / sqrt(d)) per head; the rows are the query rows R (the tokens from the second after the
   image on: the official ``start + n + 2``);
2. seeds: the top max(1, round(0.01 n)) image tokens by the mean over R of the head-mean W;
3. foreground: the image tokens by the mean of W over the anchor rows (the seeds then R);
4. implicit visual coordinates (IVC): the top image tokens by the mean over the head dimension of the rotary
   cos table at their positions, and as many by the sin table (a pure function of the positions: the tokens
   whose RoPE angles make them the LLM's coordinate anchors);
5. keep every non-image token and the union; layers >= K run on the short sequence, positions kept.

The two official rules (``rule``):

- ``"llava"`` (``modeling_llama.py``): W over **all** tokens of the prompt; foreground = the top round(0.2 n) by the
  anchor score; IVC = round(0.05 n) by cos + round(0.05 n) by sin; kept = the union (a data-dependent count,
  at most 31 % of n). The caches of layers 1..K-1 keep only the kept rows; layer 0's keeps the whole prompt.
- ``"qwen2_vl"`` (``models/qwen2_vl/modeling_qwen2_vl.py``, ``calculate_avg_similarity_for_subset`` 1651-1691 and
  ``fastv_forward_flashattention_find_forground_plan_last`` 1694-1850, the function its Qwen2-VL model runs): the
  LLaVA rule's shape on Qwen2-VL - W over **all** tokens (the anchor rows' softmax, then one mean over the heads and
  rows, the value heads repeated to the query heads), round(0.01 n) seeds (none under 50 image tokens), foreground
  the top round(0.4 n), IVC = round(0.1 n) by cos + round(0.1 n) by sin (M-RoPE's three rows averaged), kept = the
  union (at most 61 % of n); K = 16 (fixed in that function: 16 of Qwen2-VL-7B's 28 layers); the caches of layers
  0..K-1 keep only the kept rows.
- ``"qwen"`` (``modeling_qwen2_5_vl.py``): W's softmax over the **image** columns only (rows R and then the seeds);
  IVC = round(0.1 n) by cos + round(0.1 n) by sin (M-RoPE: the tables of the three position rows averaged too);
  priority = IVC + seeds; filled up to round(0.5 n) with the best others by the mean of W over R then the seeds
  (never fewer than the priority). The caches of layers 0..K-1 keep only the kept rows.

Budgets (our design; the official code has no budget): ``keep_tokens`` k (a count after layer K) or a ``budget`` in
equivalent tokens (the layer average, turned into k as FastV's) select exactly k: the rule's priority tokens
(seeds, and IVC sets of round(s k) each, ``s`` the rule's IVC share of its own kept tokens: 0.05 / 0.31 for LLaVA,
0.1 / 0.5 for Qwen) first, then the best others by the rule's score; a priority larger than k keeps its best k.
Without either, the official rule runs with its fixed fractions (a count per sample).

Reference mode (``numerics="official"``): the value logits and the head / row means in the model's dtype (the fp32
softmax cast back), the full S x S similarity for the LLaVA rule, the rotary tables in the model's dtype,
``torch.topk`` (its tie order) and the official head count (Qwen: the value heads repeated to the query heads).
``numerics="ours"``: fp32 logits, softmax, means and tables; only the needed rows; ties to the lower index.
"""

from __future__ import annotations

import logging
import math

import torch

from llava.families import registry
from llava.method import Method, register
from llava.options import Option
from llava.ops import NUMERICS_OPTION
from llava.ops import equivalent_kept_count, scale_layers, topk_desc
from llava.selection import Selection

log = logging.getLogger(__name__)

RULES = ("llava", "qwen", "qwen2_vl")
#: the rules whose W is a softmax over every token of the prompt (the others: over the image columns)
ALL_COLUMNS = ("llava", "qwen2_vl")
ROWS = ("official", "question")
#: the official fractions of the image tokens n: seeds, foreground (LLaVA), IVC per table, kept (Qwen's fill target)
SEED_RATIO = 0.01
VALUE_RATIO = {"llava": 0.2, "qwen2_vl": 0.4}
IVC_RATIO = {"llava": 0.05, "qwen": 0.1, "qwen2_vl": 0.1}
FILL_RATIO = 0.5
#: the official ``start + n + 2``: the query rows begin at the second token after the image
ROW_SKIP = 2
#: the official K for a Qwen2.5-VL LLM of this depth (vlmeval/config.py: 7B 16 of 28, 3B 22 of 36)
QWEN_K = {28: 16, 36: 22}
#: the official Qwen2-VL K: fixed at 16 in its model file, written for Qwen2-VL-7B's 28 layers
QWEN2_VL_K, QWEN2_VL_DEPTH = 16, 28


def official_round(x: float) -> int:
    """Python's ``round`` (ties to even), as the official code rounds its fractions of n."""
    return int(round(x))


def value_scores(values: torch.Tensor, rows: torch.Tensor, visual: torch.Tensor, rule: str, numerics: str = "ours",
                 heads: int | None = None, seeds: torch.Tensor | None = None, row_mask: torch.Tensor | None = None,
                 key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean value-similarity of ``rows`` (then ``seeds``, when given) over the visual columns, (N,).

    ``values`` (S, H_kv, d): layer K-1's values of the S tokens; ``rows`` (R,) / ``seeds`` (s,): indices among S;
    ``visual`` (N,): the visual tokens' indices. ``rule="llava"``: each row's softmax over all S tokens, read at the
    visual columns (``"qwen2_vl"`` alike); ``"qwen"``: the softmax over the visual columns only. ``heads``: repeat the value heads to this
    many (the official Qwen code's ``repeat_kv``) before the head mean. Reference numerics: the model's dtype as the
    official code (the LLaVA rule computes the whole S x S map and indexes it); ours: fp32. A captured prefill's padded
    rows (ours only): ``row_mask`` (R,) the real ones among ``rows``, ``key_mask`` (S,) the real tokens (no pad is a
    column of the LLaVA rule's softmax).
    """
    v = values.transpose(0, 1)  # (H_kv, S, d)
    if heads is not None and heads != v.shape[0]:
        v = v.repeat_interleave(heads // v.shape[0], dim=0)
    anchors = rows if seeds is None else torch.cat([seeds, rows]) if rule in ALL_COLUMNS else torch.cat([rows, seeds])
    d = v.shape[-1]
    if numerics == "official":
        if rule == "llava":  # modeling_llama.py 764-765, then 857 / 874: the whole map, its head mean, the rows' mean
            w = torch.softmax(torch.matmul(v, v.transpose(1, 2)) / math.sqrt(d), dim=-1, dtype=torch.float32)
            w = w.to(v.dtype).mean(dim=0)  # (S, S), the model's dtype
            return w[anchors].mean(dim=0)[visual]
        if rule == "qwen2_vl":  # modeling_qwen2_vl.py 1674-1689: the anchor rows against every token, one mean
            w = torch.softmax(torch.matmul(v[:, anchors], v.transpose(1, 2)) / math.sqrt(d), dim=-1,
                              dtype=torch.float32)
            return w.to(v.dtype).mean(dim=(0, 1))[visual]
        # modeling_qwen2_5_vl.py 1381-1389 per row set, then 1497 / 1515-1517: the means over rows
        parts = []
        for r in ([rows] if seeds is None else [rows, seeds]):
            sim = torch.einsum("hqd,hdk->hqk", v[:, r], v[:, visual].transpose(1, 2)) / math.sqrt(d)
            parts.append(torch.softmax(sim, dim=-1, dtype=torch.float32).to(v.dtype).mean(dim=0))
        return torch.cat(parts).mean(dim=0)
    vf = v.float()
    cols = vf if rule in ALL_COLUMNS else vf[:, visual]
    logits = torch.matmul(vf[:, anchors], cols.transpose(1, 2)) / math.sqrt(d)  # (H, A, C)
    if key_mask is not None and rule in ALL_COLUMNS:
        logits = logits.masked_fill(~key_mask[None, None], float("-inf"))
    w = torch.softmax(logits, dim=-1).mean(dim=0)  # (A, C)
    if row_mask is None:
        w = w.mean(dim=0)
    else:  # the real anchor rows' mean (the seeds are real), no host read; in the anchors' order
        real = row_mask
        if seeds is not None:
            ones = torch.ones(seeds.numel(), dtype=torch.bool, device=row_mask.device)
            real = torch.cat([ones, row_mask] if rule in ALL_COLUMNS else [row_mask, ones])
        w = torch.where(real[:, None], w, torch.zeros((), device=w.device)).sum(0) / real.sum().clamp(min=1)
    return w[visual] if rule in ALL_COLUMNS else w


def coordinate_scores(tables: torch.Tensor, visual: torch.Tensor, numerics: str = "ours") -> torch.Tensor:
    """IVC score of each visual token: its rotary table (cos or sin) averaged over the head dimension (and over
    M-RoPE's three position rows), (N,). ``tables`` (S, d) or (3, S, d)."""
    t = tables[..., visual, :]
    if numerics != "official":
        t = t.float()
    return t.mean(dim=(0, 2)) if t.dim() == 3 else t.mean(dim=1)


def _top(scores: torch.Tensor, k: int, numerics: str) -> torch.Tensor:
    k = max(0, min(int(k), scores.numel()))
    return scores.topk(k).indices if numerics == "official" else topk_desc(scores, k)


def _order(scores: torch.Tensor, numerics: str) -> torch.Tensor:
    """Every index, best first (the official ``topk(n)``; ours: stable, ties to the lower index)."""
    return _top(scores, scores.numel(), numerics)


def fill(priority: torch.Tensor, scores: torch.Tensor, k: int, numerics: str = "ours") -> torch.Tensor:
    """The ``k`` tokens kept: the priority ones (a bool mask (N,)) first, best score first, then the others by score
    (``k`` >= the priority count: the official Qwen fill; smaller: the priority's best k). Ascending (k,)."""
    order = _order(scores, numerics)
    first = torch.sort((~priority[order]).to(torch.uint8), stable=True).indices  # priority first, score order kept
    return order[first][:k].sort().values


def ivc_keep(values: torch.Tensor, rows: torch.Tensor, visual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             rule: str, counts: tuple[int, int, int], k: int | None, fill_to: int, numerics: str = "ours",
             heads: int | None = None, row_mask: torch.Tensor | None = None,
             key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """IVC-Prune's choice, ascending indices into ``visual``: ``values`` (S, H_kv, d) layer K-1's values, ``rows`` the
    query rows, ``cos`` / ``sin`` the rotary tables ((S, d), M-RoPE (3, S, d)), ``counts`` = (seeds, foreground, IVC
    per table); ``k``: exactly k (our budgets), None: the official rule (LLaVA: the union; Qwen: filled to
    ``fill_to``, never below the priority; one host read, the count). ``heads``, ``row_mask``, ``key_mask``: as
    :func:`value_scores`."""
    n_seed, n_value, n_ivc = counts
    n = visual.numel()
    base = value_scores(values, rows, visual, rule, numerics, heads, row_mask=row_mask, key_mask=key_mask)
    seeds = _top(base, n_seed, numerics)  # among the visual tokens
    score = value_scores(values, rows, visual, rule, numerics, heads, seeds=visual[seeds], row_mask=row_mask,
                         key_mask=key_mask)
    priority = torch.zeros(n, dtype=torch.bool, device=visual.device)
    priority.index_fill_(0, seeds, True)  # index_fill_, not priority[i] = True: a host scalar's copy (no capture)
    priority.index_fill_(0, _top(coordinate_scores(cos, visual, numerics), n_ivc, numerics), True)
    priority.index_fill_(0, _top(coordinate_scores(sin, visual, numerics), n_ivc, numerics), True)
    if k is not None:
        return fill(priority, score, k, numerics)
    if rule in ALL_COLUMNS:  # the official union: prefix, foreground, seeds, IVC, suffix (sorted, unique)
        priority.index_fill_(0, _top(score, n_value, numerics), True)
        return torch.nonzero(priority).flatten()  # the one host read: the union's size
    count = max(int(fill_to), int(priority.sum()))  # the one host read: the official fill keeps every priority token
    return fill(priority, score, count, numerics)


@register
class IVCPrune(Method):
    """IVC-Prune: before decoder layer K, keep the image tokens that are the LLM's implicit visual coordinates (the
    top by the mean rotary cos / sin at their positions) and the foreground found by value similarity to the
    question (seeds, then anchors); the rest are dropped.

    ``keep_tokens`` / ``budget`` (optional, our design): exactly that many kept after layer K (a budget in equivalent
    tokens, the layer average, as FastV's). Without: the official rule's fixed fractions (a count per sample)."""

    name = "ivcprune"
    position_mode = "keep"
    #: layer K-1's values and rotary tables; the rows after the image (planned on the fast path, their count shown
    #: up to 3: whether any row follows the official skip of 2)
    llm_reads = ("prev",)
    llm_text_rows = True
    llm_text_cap = 3
    families = registry.where(hybrid=False)  # attention in every decoder layer
    unsupported_reason = ("refused on the hybrid Qwen3.5 decoder like the other in-LLM methods: layer K-1 may be a "
                          "Gated DeltaNet layer without values to compare, and its caches cannot be pruned")
    #: captured with a count (keep_tokens or a budget: a fixed output count); the official rule is refused
    capturable = "full"

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            # K (the official ivcp_k; the score layer is K-1). None: 16 of a 32-layer LLM scaled, on Qwen2.5-VL the
            # official value for the LLM's depth (16 of 28, 22 of 36), on Qwen2-VL 16 of 28 (scaled to other depths)
            "layer": None,
            # map `layer` from a 32-layer LLM onto the model's depth (llava.ops.scale_layers)
            "scale_layers": True,
            # "auto" (Qwen2-VL: "qwen2_vl"; the other Qwen families: "qwen"; others: "llava"), or one of the official
            # code's three rules: "llava", "qwen" (Qwen2.5-VL's), "qwen2_vl"
            "rule": "auto",
            # a count kept after layer K (our design, the official code has none); None: from the budget or the rule
            "keep_tokens": None,
            "rows": Option("official", ROWS, doc="the query rows: official (from the second token after the image "
                                                 "to the end) or question (ours)"),
            # the official fractions of the image tokens: seeds, foreground (the union rules; None: the rule's, 0.2
            # for LLaVA, 0.4 for Qwen2-VL), IVC per table (None: the rule's 0.05 / 0.1), the Qwen rule's fill target
            "seed_ratio": SEED_RATIO,
            "value_ratio": None,
            "ivc_ratio": None,
            "fill_ratio": FILL_RATIO,
            # the KV caches of the layers before K: "kept" (ours: each layer's as it saw the prompt) or "pruned" (the
            # official: layers 1..K-1 for the LLaVA rule, 0..K-1 for the Qwen rule hold the kept rows only)
            "caches": "kept",
            # "ours" (fp32 similarity, means and tables, ties to the lower index) or "official" (reference mode)
            "numerics": NUMERICS_OPTION,
        }

    def __init__(self, budget=None, **options):
        if budget is not None and options.get("keep_tokens") is not None:
            raise ValueError("ivcprune: give either a budget (equivalent tokens) or keep_tokens, not both")
        super().__init__(budget, **options)
        if self.rule not in ("auto", *RULES):
            raise ValueError(f"ivcprune: rule must be 'auto', 'llava', 'qwen' or 'qwen2_vl', got {self.rule!r}")
        if self.caches not in ("kept", "pruned"):
            raise ValueError(f"ivcprune: caches must be 'kept' or 'pruned', got {self.caches!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or int(self.layer) < 1):
            raise ValueError(f"ivcprune: layer must be >= 1, got {self.layer!r}")
        if self.keep_tokens is not None and (isinstance(self.keep_tokens, bool) or int(self.keep_tokens) < 0
                                             or self.keep_tokens != int(self.keep_tokens)):
            raise ValueError(f"ivcprune: keep_tokens must be a whole number >= 0, got {self.keep_tokens!r}")
        for k in ("seed_ratio", "value_ratio", "fill_ratio", "ivc_ratio"):
            if getattr(self, k) is not None and not 0.0 <= float(getattr(self, k)) <= 1.0:
                raise ValueError(f"ivcprune: {k} must be in [0, 1], got {getattr(self, k)!r}")

    def capture_refusal(self) -> str | None:
        """A count (``keep_tokens`` or a budget) is a fixed output count: captured whole; the official rule's count
        is data-dependent, and our question rows are not planned on the fast path."""
        if self.keep_tokens is None and self.budget is None:
            return ("ivcprune: the official rule's kept count is data-dependent (the union of its fixed fractions): "
                    "without keep_tokens or a budget the prefill runs on the eager engine")
        if self.rows == "question":
            return "ivcprune: rows='question' reads the question rows, which the fast path does not plan"
        return super().capture_refusal()

    # -- where -------------------------------------------------------------------------------------------------------
    @property
    def rule_run(self) -> str:
        """The rule as run: "auto" resolved on the attached family (Qwen2-VL: "qwen2_vl"; the other Qwen families:
        "qwen")."""
        if self.rule != "auto":
            return self.rule
        family = str(self.family or "")
        return "qwen2_vl" if family == "qwen2_vl" else "qwen" if family.startswith("qwen") else "llava"

    @property
    def k_layer(self) -> int:
        n = self.num_layers
        if self.layer is None and self.family == "qwen2_5_vl" and n in QWEN_K:
            return QWEN_K[n]
        if self.layer is None and self.family == "qwen2_vl":  # 16 of 28 (identity at 28)
            return scale_layers([QWEN2_VL_K], n, reference=QWEN2_VL_DEPTH)[0] if self.scale_layers else QWEN2_VL_K
        k = 16 if self.layer is None else int(self.layer)
        return scale_layers([k], n)[0] if self.scale_layers else k

    @property
    def llm_layers(self):
        return (self.k_layer,)

    @property
    def prune_past_cache(self) -> bool:
        return self.caches == "pruned"

    @property
    def past_cache_from(self) -> int:
        return 1 if self.rule_run == "llava" else 0

    @property
    def value_share(self) -> float:
        """The foreground's fraction of n (the union rules'; 0 for the Qwen2.5-VL rule, which fills instead)."""
        if self.value_ratio is not None:
            return float(self.value_ratio)
        return VALUE_RATIO.get(self.rule_run, 0.0)

    @property
    def ivc_share(self) -> float:
        return IVC_RATIO[self.rule_run] if self.ivc_ratio is None else float(self.ivc_ratio)

    # -- counts ------------------------------------------------------------------------------------------------------
    def kept_count(self, n_visual: int) -> int | None:
        """The exact count kept after layer K (None: the official rule's own, data-dependent)."""
        if self.keep_tokens is not None:
            return min(int(self.keep_tokens), int(n_visual))
        if self.budget is None:
            return None
        k = equivalent_kept_count(self.budget, n_visual, self.k_layer, self.num_layers)
        if k == 0 and n_visual and not getattr(self, "_warned", False):
            self._warned = True
            log.warning("ivcprune: budget %d is below K*N/L for N=%d visual tokens; keeping none after layer %d",
                        self.budget, n_visual, self.k_layer)
        return k

    def counts(self, n: int, k: int | None) -> tuple[int, int, int]:
        """(seeds, foreground, IVC per table) for n image tokens: the official fractions of n, or with a count k
        the IVC sets scaled to k by the rule's IVC share of its own kept tokens (foreground: filled by score)."""
        union = self.rule_run in ALL_COLUMNS
        seeds = official_round(n * float(self.seed_ratio))  # Qwen2-VL's file: topk(round(0.01 n)), none below 50
        seeds = seeds if self.rule_run == "qwen2_vl" else max(1, seeds)
        if k is None:
            value = official_round(n * self.value_share) if union else 0
            return seeds, value, official_round(n * self.ivc_share)
        nominal = (float(self.seed_ratio) + self.value_share + 2 * self.ivc_share if union
                   else float(self.fill_ratio))
        return seeds, 0, official_round(k * self.ivc_share / nominal) if nominal > 0 else 0

    def layer_counts(self, n_visual: int) -> list[int] | None:
        k = self.kept_count(n_visual)
        if k is None:
            return None
        L, K = self.num_layers, self.k_layer
        return [int(n_visual)] * K + [k] * (L - K)

    # -- the stage ---------------------------------------------------------------------------------------------------
    def query_rows(self, sig) -> tuple[torch.Tensor, torch.Tensor | None]:
        """R and its real rows (None: all real): the tokens from the second after the image to the end of the prompt
        (official; a captured prefill's padded text block, ``text_mask``), or our question rows (eager); the last
        token where that leaves none (a prompt that ends at the image: the official mean would be NaN)."""
        if self.rows == "official" and sig.num_text_after > ROW_SKIP:
            mask = None if sig.text_mask is None else sig.text_mask[ROW_SKIP:]
            return sig.text_after[ROW_SKIP:], mask
        if self.rows == "question" and sig.question is not None and sig.question.numel():
            return sig.question, None
        return torch.full((1,), sig.hidden.shape[0] - 1, dtype=torch.long, device=sig.hidden.device), None

    def select_llm(self, stage, sig):
        n = sig.num_visual
        dev = sig.visual.device
        k = self.kept_count(n)
        if n == 0 or (k is not None and k >= n):
            return Selection(keep=torch.arange(n, device=dev))
        if k == 0:
            return Selection(keep=torch.zeros(0, dtype=torch.long, device=dev))
        rule, num = self.rule_run, self.numerics
        official = num == "official"
        rows, row_mask = self.query_rows(sig)
        # the official Qwen value states are repeated to the query heads (their count: one query row's heads)
        heads = sig.queries("last", layer="prev").shape[0] if official and rule != "llava" else None
        cos, sin = sig.rotary(layer="prev", fp32=not official)
        keep = ivc_keep(sig.values(layer="prev"), rows, sig.visual, cos, sin, rule, self.counts(n, k), k,
                        official_round(n * float(self.fill_ratio)), num, heads, row_mask,
                        sig.key_mask if sig.captured else None)
        return Selection(keep=keep)
