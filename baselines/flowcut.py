"""FlowCut (arXiv 2505.19536, NeurIPS 2025; official code TungChintao/FlowCut, ``flowcut/modeling_clip_flowcut.py``
and ``utils_flowcut.py``): visual tokens are dropped *between* the CLIP encoder's layers, progressively,
with a multi-criteria score accumulated across layers and an entropy-based amount per pruning layer.

Runs as an in-tower stage (``Method.tower_stage`` / ``select_tower``, ``llava.families.clip.run_tower_staged``);
its vision stage then keeps exactly the tokens that survived the tower (``sig.in_tower_kept``).

Per unit (image / crop / frame), after encoder layer i, while the unit has more than tau = T + 1 tokens
([CLS] included; T = the patch target):

    c_j   = head-mean softmax(q_CLS k^T * scale)[j]           (softmax over all current tokens; patch columns)
    s_j   = head-mean softmax(v_CLS . v^T)[j]                 (values of the layer, no scale)
    m_j   = || mean_h v_{h,j} ||_1
    score = (c / sum c + s / sum s) * m
    cum   = score at the first scored layer, else ema * cum + (1 - ema) * score
    rpl   = (select_layer - 1) - i                           (official: 21 - i on CLIP-L, select_layer 22)
    rpl > 0 even: prune round((n - T) / sqrt(rpl) * (1 - (H(c / sum c) / ln n)^2)) patches (n = current
                  patches), keeping at least tau tokens
    rpl <= 0:     prune to tau (the final cut; official at rpl = 0)
    keep = [CLS] + the top patches by cum, in original order; cum is gathered with them.

Deviations / options (``docs/methods/flowcut.md``): the official code takes the prune amount's max over the
batch (``batch_max=True`` reproduces it over the units of one tower call; default per unit, so that a
batch equals each sample alone); LLaVA-NeXT keeps T per crop by default, the official recipe is
``next_half=True`` (int(T/2) per crop) + ``next_llm_stage=True`` (after decoder layer 1 the image is cut to T by
the last prompt token's score, :func:`flowcut_llm_select`, positions renumbered); Video-LLaVA
frames (no video path in the official code) keep T tokens with their [CLS] counted (``frame_cls="count"``)
or T patches plus the [CLS] (``"extra"``).

Fast path (``capturable = "full"``; ``docs/methods/flowcut.md`` "Fast path"): inside the captured prefill the
tower runs masked (``llava.families.clip.run_tower_masked``): every unit keeps its S tokens, a keep mask (n, S)
on the device replaces the gather (each layer's attention masks the dropped keys to -inf), and
:meth:`FlowCut.select_tower_masked` computes the same quantities over the present tokens only, the prune count on
the device; the final cut leaves tau tokens per unit (a host count), so the vision stage is a static-size
selection (``masked_take``). Same kept tokens as the eager (gathered) tower on the tested inputs, not bit-identical
states (summation order).

Reference mode (option ``numerics="official"``; default ``"ours"``): the official numerics. FlowCut's README
loads the model with LLaVA's ``load_pretrained_model`` (default ``device_map='auto'``: the CLIP tower is not
cast and runs in fp32), and every FlowCut quantity is computed inside the tower, so all of it stays fp32
(our signals' dtype; fp16 signals are cast up). Reference mode evaluates the official expressions on the
same signals: the [CLS] row sliced to the patches before the head mean, the values in the official
contiguous (n, H, S, d) layout, the semantic row by ``torch.bmm`` of the [CLS] value with all values, the
magnitude by ``torch.norm(p=1)``, ``entropy / torch.log(torch.tensor(N))`` (an fp32 logarithm) instead of a
double ``math.log``; the top-k is ``torch.topk`` in both modes. The batch max of the prune amount stays the
``batch_max`` option (official: the max over the crops of one tower call).
"""

from __future__ import annotations

import math

import torch

from llava.families import registry
from llava.method import Method, register
from llava.ops import NUMERICS_OPTION
from llava.ops import check_numerics, masked_take, topk_desc
from llava.selection import Selection

#: the anyres families (LLaVA-NeXT: FlowCut's NeXT code), by the registry's layout
ANYRES = registry.where(layout="anyres")

#: dtype of the official FlowCut quantities (computed inside the fp32 tower, device_map='auto')
OFFICIAL_DTYPE = torch.float32


def flowcut_score(cls_attn: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cls_attn (n, H, S) per-head [CLS]-row probabilities, values (n, S, H, d) per-head values (token 0 =
    [CLS]). Returns (c, score), both (n, S - 1) over the patch tokens: c the head-mean [CLS] attention,
    score = (c / sum c + s / sum s) * ||mean_h v||_1 with s the head-mean softmax(v_CLS . v)."""
    c = cls_attn.mean(1)[:, 1:]
    sem = torch.einsum("nhd,nshd->nhs", values[:, 0], values).softmax(-1).mean(1)[:, 1:]
    mag = values.mean(2)[:, 1:].abs().sum(-1)
    return c, (c / c.sum(-1, keepdim=True) + sem / sem.sum(-1, keepdim=True)) * mag


def flowcut_score_official(cls_attn: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`flowcut_score` with the official expressions (reference mode), in the official dtype: the
    [CLS] row's patch columns averaged over heads (``attn[:, :, 0, 1:].mean(dim=1)``), the values as the
    official contiguous (n, H, S, d) ``value_states``, the semantic row ``softmax(bmm(v_cls, v^T))``
    averaged over heads, the magnitude ``torch.norm(mean_h v, p=1)``, and ``compute_score``."""
    n, s, h, d = values.shape
    c = cls_attn.to(OFFICIAL_DTYPE)[:, :, 1:].mean(dim=1)
    v = values.to(OFFICIAL_DTYPE).transpose(1, 2).contiguous()  # (n, H, S, d)
    flat = v.view(n * h, s, d)
    sem = torch.bmm(flat[:, :1], flat.transpose(1, 2)).softmax(dim=-1).view(n, h, s).mean(1)[:, 1:]
    mag = torch.norm(v.mean(1)[:, 1:], p=1, dim=-1)
    relation = c / c.sum(dim=-1, keepdim=True)
    semantic = sem / sem.sum(dim=-1, keepdim=True)
    return c, (relation + semantic) * mag


def adaptive_prune_count(c: torch.Tensor, rpl: int, target: int, numerics: str = "ours") -> torch.Tensor:
    """(n,) long: round((n_p - target) / sqrt(rpl) * (1 - (H / ln n_p)^2)) per unit, H the entropy of c / sum c
    over its n_p patches (official ``adaptive_prune_ratio`` without the batch max; half-to-even rounding).
    ``numerics="official"``: ln n_p as the official ``torch.log(torch.tensor(n_p))`` (fp32)."""
    n_p = c.shape[-1]
    prob = c / c.sum(-1, keepdim=True)
    if numerics == "official":
        entropy = -torch.sum(prob * torch.log(prob), dim=-1)
        ratio = entropy / torch.log(torch.tensor(n_p)).to(c.device)
        return ((n_p - target) / rpl ** 0.5 * (1 - ratio ** 2)).round().long()
    entropy = -(prob * prob.log()).sum(-1)
    ratio = entropy / math.log(n_p)
    return ((n_p - target) / rpl ** 0.5 * (1 - ratio ** 2)).round().long()


def flowcut_score_masked(cls_attn: torch.Tensor, values: torch.Tensor,
                         key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`flowcut_score` over each unit's present tokens only (the masked tower): ``cls_attn`` (n, H, S) the
    [CLS] row already softmaxed over the present tokens (0 at the others, ``TowerSignals.cls_attention``),
    ``values`` (n, S, H, d), ``key_mask`` (n, S) bool. The semantic softmax runs over the present tokens, the sums
    over the present patches (the absent ones hold 0). Returns (c, score), (n, S - 1); the absent patches' scores
    are finite and never read (the caller masks them)."""
    c = cls_attn.mean(1)[:, 1:]
    logits = torch.einsum("nhd,nshd->nhs", values[:, 0], values)
    sem = logits.masked_fill(~key_mask[:, None, :], float("-inf")).softmax(-1).mean(1)[:, 1:]
    mag = values.mean(2)[:, 1:].abs().sum(-1)
    return c, (c / c.sum(-1, keepdim=True) + sem / sem.sum(-1, keepdim=True)) * mag


def adaptive_prune_count_masked(c: torch.Tensor, present: torch.Tensor, rpl: int, target: int) -> torch.Tensor:
    """(n,) long on the device: :func:`adaptive_prune_count` (``numerics="ours"``) per unit over its n_p present
    patches (``present`` (n, P) bool, ``c`` 0 at the others): the entropy of c / sum c over the present ones
    (``0 log 0`` left out), and ln n_p and (n_p - target) / sqrt(rpl) computed from the device count in float64,
    then rounded to fp32: the values the eager path divides / multiplies by (``math.log(n_p)`` and a Python float,
    which torch rounds to fp32; a float64 log is within a few ulps of ``math.log``, and fp32(ln k) sits thousands of
    float64 ulps from an fp32 rounding boundary for every k <= 20000, so the rounding agrees), so the count equals
    the eager one on the same c. No host read, no host-built tensor (CUDA-graph safe)."""
    n_p = present.sum(-1)
    prob = c / c.sum(-1, keepdim=True)
    entropy = -torch.where(present, prob * prob.log(), torch.zeros((), dtype=prob.dtype, device=prob.device)).sum(-1)
    ratio = entropy / n_p.double().log().to(c.dtype)
    scale = ((n_p - target).double() / rpl ** 0.5).to(c.dtype)
    return (scale * (1 - ratio ** 2)).round().long()


def flowcut_llm_select(q_last: torch.Tensor, k_vis: torch.Tensor, v_last: torch.Tensor, v_vis: torch.Tensor,
                       target: int, numerics: str = "ours") -> torch.Tensor:
    """FlowCut's LLaVA-NeXT LLM stage (official ``LlamaSdpaAttention_forward``'s prune branch in decoder layer 1):
    ``q_last`` (H, d) the last prompt token's RoPE'd query, ``k_vis`` (H, N, d) the visual tokens' RoPE'd keys,
    ``v_last`` (H, d) / ``v_vis`` (H, N, d) the values (key / value heads already repeated to H), all of that layer.

        relation = mean_h softmax_N(q_last . k_vis / sqrt(d))      (over the visual columns only)
        semantic = mean_h softmax_N(v_last . v_vis / sqrt(d))
        score    = (relation / sum relation + semantic / sum semantic) * || mean_h v_vis ||_1

    Returns the indices (into the N visual tokens) of the top ``target`` by score, ascending. ``numerics="ours"``:
    fp32 throughout, ties to the lower index; ``"official"``: the inputs' dtype (the fp16 model's) for the products,
    the softmax in fp32 cast back, the head means and the score in that dtype, ``torch.topk``."""
    check_numerics("flowcut", numerics)
    n = k_vis.shape[1]
    target = max(0, min(int(target), n))
    if numerics == "official":
        dt = q_last.dtype
        scale = math.sqrt(q_last.shape[-1])
        rel_w = torch.bmm(q_last[:, None], k_vis.transpose(1, 2)) / scale  # (H, 1, N)
        rel = torch.softmax(rel_w, dim=-1, dtype=torch.float32).to(dt).mean(0)  # (1, N)
        sem_w = torch.bmm(v_last[:, None], v_vis.transpose(1, 2)) / scale
        sem = torch.softmax(sem_w, dim=-1, dtype=torch.float32).to(dt).mean(0)
        score = (rel / rel.sum(dim=-1, keepdim=True) + sem / sem.sum(dim=-1, keepdim=True)) * \
            torch.norm(v_vis.mean(0), p=1, dim=-1)
        return torch.topk(score, target, dim=1).indices[0].sort().values
    q, k, vl, vv = (t.float() for t in (q_last, k_vis, v_last, v_vis))
    scale = 1.0 / math.sqrt(q.shape[-1])
    rel = (torch.einsum("hd,hnd->hn", q, k) * scale).softmax(-1).mean(0)
    sem = (torch.einsum("hd,hnd->hn", vl, vv) * scale).softmax(-1).mean(0)
    score = (rel / rel.sum() + sem / sem.sum()) * vv.mean(0).abs().sum(-1)
    return topk_desc(score, target).sort().values


def _repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(S, H_kv, d) -> (H, S, d), each key / value head repeated for its query group (``repeat_kv``)."""
    return x.transpose(0, 1).repeat_interleave(heads // x.shape[1], dim=0)


@register
class FlowCut(Method):
    name = "flowcut"
    #: the fast path runs the tower masked (select_tower_masked); the reference mode stays eager
    capturable = "full"
    vision_stage = True
    tower_stage = True
    families = registry.where(tower="clip")
    llm_reads = ("prev",)  # the LLaVA-NeXT stage (next_llm_stage): decoder layer 1's q / k / v
    unsupported_reason = ("FlowCut drops tokens between the layers of a CLIP tower with a [CLS] token; the "
                          "in-tower stage exists for the CLIP families only")

    @classmethod
    def option_defaults(cls):
        # numerics: "ours" or "official" (reference mode: the official expressions, fp32 as the official
        # fp32 tower; see the module doc)
        # next_llm_stage: LLaVA-NeXT only, the official stage after decoder layer 1 (the image cut to T by the
        # last prompt token's score; positions renumbered). The official NeXT recipe = next_half + next_llm_stage.
        return {**super().option_defaults(), "ema": 0.5, "batch_max": False, "next_half": False,
                "next_llm_stage": False, "frame_cls": "count", "numerics": NUMERICS_OPTION}

    def __init__(self, budget: int | None = None, **options):
        super().__init__(128 if budget is None else budget, **options)  # official API default: 128
        if self.frame_cls not in ("count", "extra"):
            raise ValueError(f"flowcut: frame_cls must be 'count' or 'extra', got {self.frame_cls!r}")
        if not 0.0 <= float(self.ema) <= 1.0:
            raise ValueError(f"flowcut: ema must be in [0, 1], got {self.ema!r}")
        if self.next_llm_stage and "position_mode" not in options:
            self.position_mode = "reindex"  # official: position_ids = arange over the shortened row

    #: the decoder layer before which the NeXT stage cuts (official ``prune_layer = 1``: after layer 1, on any
    #: depth; not scaled)
    NEXT_LLM_LAYER = 2

    @property
    def llm_layers(self):
        if self.next_llm_stage and self.family in ANYRES:
            return (self.NEXT_LLM_LAYER,)
        return ()

    def capture_refusal(self):
        if self.next_llm_stage:
            return ("flowcut: the LLaVA-NeXT LLM stage (next_llm_stage=True) runs on the eager engine (its query row "
                    "softmax over the visual keys is not planned on the fast path)")
        return super().capture_refusal()

    def select_llm(self, stage, sig):
        """The NeXT stage (:func:`flowcut_llm_select`): the sample's visual tokens cut to T (the budget) by decoder
        layer 1's last-prompt-token score, when it holds more than T (official: ``visual_token_num > target_num``)."""
        n, target = sig.num_visual, int(self.budget)
        if n <= target:
            return Selection(keep=torch.arange(n, device=sig.visual.device))
        q = sig.queries("last", layer="prev")[:, 0]  # (H, d)
        heads = q.shape[0]
        k = _repeat_heads(sig.keys("prev"), heads)  # (H, S, d)
        v = _repeat_heads(sig.values("prev"), heads)
        return Selection(keep=flowcut_llm_select(q, k[:, sig.visual], v[:, -1], v[:, sig.visual], target,
                                                 self.numerics))

    def patch_target(self, sig) -> int:
        """T: the patches a unit keeps ([CLS] not counted)."""
        return self._target(sig.cls_in_llm)

    def _target(self, cls_in_llm: bool) -> int:
        t = self.budget
        if self.next_half and self.family in ANYRES:
            t = max(1, int(t / 2))
        if cls_in_llm and self.frame_cls == "count":
            t -= 1  # the unit's [CLS] enters the LLM too: T tokens in all
        return max(t, 0)

    def _cumulate(self, sig, score: torch.Tensor) -> torch.Tensor:
        """The cumulative score (n, S - 1) after this layer: the score at the first scored layer, else the EMA of
        the kept tokens' previous cumulative score and this one; kept in ``sig.state`` with a [CLS] column (unused),
        so that the engine gathers it with the survivors."""
        cum = sig.state.get("flowcut_cum")
        cum = score if cum is None else self.ema * cum[:, 1:] + (1 - self.ema) * score
        sig.state["flowcut_cum"] = torch.cat([cum.new_zeros(cum.shape[0], 1), cum], 1)
        return cum

    def select_tower(self, layer_idx, sig):
        target = self.patch_target(sig)
        tau = target + 1
        s = sig.num_tokens
        if s <= tau:  # official: `if hidden_states.shape[1] > target`
            return None
        official = self.numerics == "official"
        c, score = (flowcut_score_official if official else flowcut_score)(sig.cls_attention(), sig.values())
        cum = self._cumulate(sig, score)
        rpl = sig.select_layer - 1 - layer_idx
        if rpl > 0 and rpl % 2:
            return None
        n = sig.num_units
        if rpl > 0:
            prune = adaptive_prune_count(c, rpl, target, self.numerics)
            if self.batch_max:
                prune = prune.max().expand(n)
            counts = (s - prune).clamp(min=tau).tolist()  # one host read per pruning layer
        else:
            counts = [tau] * n
        if all(k == s for k in counts):
            return None
        if official and len(set(counts)) == 1:  # one batched call, as the official (B, N) topk
            top = torch.topk(cum, counts[0] - 1, dim=1).indices.sort(dim=1).values + 1
            return torch.cat([top.new_zeros(n, 1), top], 1)
        keeps = []
        for u, k in enumerate(counts):
            top = torch.topk(cum[u], k - 1).indices.sort().values + 1
            keeps.append(torch.cat([top.new_zeros(1), top]))
        if len(set(counts)) == 1:
            return torch.stack(keeps)
        return keeps

    def select_tower_masked(self, layer_idx, sig):
        """:meth:`select_tower` on the masked tower (``llava.families.clip.run_tower_masked``; ``sig.key_mask``
        (n, S) the present tokens, None = all): the new (n, S) keep mask, or None when no unit can change
        here (host: an odd rpl, or S <= tau). The same quantities over the present tokens only
        (:func:`flowcut_score_masked`, :func:`adaptive_prune_count_masked`), the cumulative score per token, the
        count per unit on the device, ``(s - prune).clamp(min=tau)`` (tau at the final cut), no change for a unit
        with s <= tau, and the kept patches = the top (count - 1) present ones by the cumulative score (a stable
        descending sort, the absent ones at -inf). No host read."""
        if self.numerics == "official":  # refused by capture_refusal: the reference mode runs eagerly
            raise NotImplementedError("flowcut: the reference mode (numerics='official') has no masked tower")
        target = self._target(sig.cls_in_llm)
        tau = target + 1
        S = sig.num_tokens
        if S <= tau:  # no unit holds more than tau tokens (the eager `s <= tau` for every unit)
            return None
        dev = sig.hidden_in.device
        key = (sig.key_mask if sig.key_mask is not None
               else torch.ones(sig.num_units, S, dtype=torch.bool, device=dev))
        present = key[:, 1:]
        s = sig.num_kept()
        c, score = flowcut_score_masked(sig.cls_attention(), sig.values(), key)
        cum = self._cumulate(sig, score)
        rpl = sig.select_layer - 1 - layer_idx
        if rpl > 0 and rpl % 2:
            return None
        if rpl > 0:
            prune = adaptive_prune_count_masked(c, present, rpl, target)
            if self.batch_max:  # the max over the units of this tower call (all hold the same count: as eagerly)
                prune = prune.max().expand_as(prune)
            counts = torch.minimum((s - prune).clamp(min=tau), s)
        else:
            counts = torch.full_like(s, tau)
        ranked = torch.sort(cum.masked_fill(~present, float("-inf")), dim=1, descending=True, stable=True).indices
        rank = torch.zeros_like(ranked).scatter(1, ranked, torch.arange(S - 1, device=dev).expand_as(ranked))
        new = torch.cat([key[:, :1], present & (rank < (counts - 1)[:, None])], 1)
        return torch.where((s > tau)[:, None], new, key)  # s <= tau: unchanged (eager: no cut)

    def captured_count(self, sig) -> int:
        """The vision stage's output count of a captured prefill, from the sample's planned layout (host): per
        unit its stock tokens when its tower holds <= tau tokens, else its [CLS] if the LLM takes it + tau - 1
        patches. Raises NotImplementedError (the prefill then runs eagerly, with the reason) when a unit's stock
        tokens leave out some of its tower patches (LLaVA-NeXT ``spatial_unpad`` crops cut by the unpadding): how
        many survivors fall inside depends on the image."""
        lay = sig.unit_layout(patch=True)
        total = 0
        for u in range(lay.num_units):
            rows, cols = sig.unit_grid[u] if sig.unit_grid else sig.grid
            P, ncls, npatch = rows * cols, lay.num_cls_stock[u], lay.num_patch_stock[u]
            tau = self._target(ncls > 0) + 1
            if P + 1 <= tau:
                total += ncls + npatch
            elif npatch == P:
                total += ncls + tau - 1
            else:
                raise NotImplementedError(
                    f"flowcut: unit {u} feeds {npatch} of its {P} tower patches (LLaVA-NeXT spatial_unpad), so "
                    "the survivors entering the LLM depend on the image (next_layout='spatial' is captured)")
        return total

    def select_vision(self, sig):
        kept = sig.in_tower_kept
        if sig.captured:  # the fast path: a static count (planned), the survivors taken without a host read
            count = self.captured_count(sig)
            if kept is None and sig.unit.device.type == "meta":  # the plan's dry run (shapes only)
                return Selection(keep=torch.empty(count, dtype=torch.long, device=sig.unit.device))
        if kept is None:
            raise RuntimeError("flowcut: no in-tower survivors in the vision signals (is the engine's in-tower "
                               "stage available for this family?)")
        if sig.captured:
            return Selection(keep=masked_take(torch.arange(sig.num_tokens, device=kept.device), kept, count))
        return Selection(keep=torch.nonzero(kept).flatten())
