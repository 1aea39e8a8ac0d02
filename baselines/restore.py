"""RESTORE (ICML 2026, arXiv 2606.01711): an add-on over a pre-LLM pruning method (its ``base``: DivPrune, VisPruner or
HoloV in the official code) that rectifies what pruning distorts in the LLM (docs/methods/restore.md).

Per image (crop, frame) with a budget of ``n`` tokens:

1. the base keeps ``int(n * split)`` tokens (``split`` 0.5);
2. the tokens it drops are merged into ``n - int(n * split)`` anchors (:func:`anchor_clusters`): on their
   post-projector features, density ``rho_i = sum_j cos(x_i, x_j)``, contrast ``delta_i`` = the largest cosine to a
   token of lower density (``contrast="sparser"``, what the official code computes; ``"denser"``: to a denser one, the
   density-peaks rule), score ``rho_i (1 - delta_i)`` (``delta`` 0 where no such token exists), the top scores are the
   anchors, every other dropped token joins its most similar anchor; a cluster is the mean of its members;
3. every token keeps its position in the unpruned prompt (``vision_positions="keep"``), a cluster the lower median of
   its members' positions (``position``), the outputs in position order;
4. the decoder's attention is recalibrated (:meth:`Restore.attention_bias`, ``calibrate``): each key's logit adds
   ``log s_j`` (``s_j`` the tokens it stands for; decoder layer 0: every visual key the image's mean size, N / n) and, at
   the prefill, ``log(2 - mean_k cos((p_i - p_j) theta_k))`` over the decoder's rotary frequencies ``theta_k``.

The engine does the plumbing: the base is built from the registry at ``base_budget()``
(:class:`llava.addon.Addon`), the positions are kept by the vision stage, the bias is added in every attention layer
(:mod:`llava.attention_bias`). ``numerics="official"``: the clustering in the features' dtype and the clusters'
features as the official code sums them (the members' sum in that dtype, then the anchor, then the division)."""

from __future__ import annotations

import torch

from llava.addon import Addon
from llava.attention_bias import AttentionBias
from llava.families import registry
from llava.method import register
from llava.ops import NUMERICS_OPTION, check_numerics
from llava.options import Option
from llava.selection import Selection

#: the bases of the official code, and the options it runs each with (RESTORE's own recipe for the base)
BASES = ("divprune", "vispruner", "holov")
BASE_RECIPE = {"vispruner": {"important_ratio": 0.5, "official_attention": "images"},
               "holov": {"overflow": "redistribute"}}
POSITIONS = ("median", "first", "last")
CONTRASTS = ("sparser", "denser")
PRUNED_ORDERS = ("auto", "index", "attention")
FIRST_LAYER_SIZES = ("uniform", "cluster")


def anchor_clusters(x: torch.Tensor, k: int, contrast: str = "sparser") -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak anchors among the rows of ``x`` (N, C), in ``x``'s dtype: ``(anchors, slot)``, the ``k`` anchors'
    row indices ascending and (N,) each row's anchor slot (an anchor its own). Cosine similarities ``S``; density
    ``rho = S.sum(-1)`` (the self term included); ``delta_i`` the largest ``S_ij`` over the ``j`` of lower density
    (``contrast="sparser"``) or higher (``"denser"``), 0 where there is none; anchors: the top ``k`` of ``rho (1 -
    delta)`` (``torch.topk``); each other row to the anchor of largest similarity (the first on ties)."""
    xn = (x / x.norm(dim=-1, keepdim=True))[None]  # batched, as the official code multiplies (one bmm)
    s = (xn @ xn.transpose(-1, -2))[0]
    rho = s.sum(-1)
    other = rho[None, :] < rho[:, None] if contrast == "sparser" else rho[None, :] > rho[:, None]  # [i, j]
    best = s.masked_fill(~other, -1.0).amax(-1)
    delta = torch.where(best == -1.0, torch.zeros_like(best), best)
    anchors = (rho * (1.0 - delta)).topk(k).indices.sort().values
    slot = s[:, anchors].argmax(-1)
    slot = slot.index_put((anchors,), torch.arange(k, device=x.device))
    return anchors, slot


def lower_medians(members: torch.Tensor, slot: torch.Tensor, k: int, position: str = "median",
                  big: int | None = None) -> torch.Tensor:
    """(k,) per cluster the member whose index is the lower median (``position``: or the first / last) of its
    members' indices; ``members`` (N,) the rows' indices below ``big`` (default: N), ``slot`` (N,) their clusters
    (each non-empty)."""
    big = members.numel() if big is None else big
    order = torch.sort(slot * big + members).indices  # by cluster, then index
    counts = torch.bincount(slot, minlength=k)
    start = torch.cumsum(counts, 0) - counts
    at = {"median": start + (counts - 1) // 2, "first": start, "last": start + counts - 1}[position]
    return members[order[at]]


def cluster_values(x: torch.Tensor, anchors: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """The official code's cluster features, in ``x``'s dtype: the non-anchor rows summed per anchor by one batched
    product with their one-hot assignment, the anchor added, divided by the cluster's size."""
    k = anchors.numel()
    is_anchor = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device).index_fill_(0, anchors, True)
    src = torch.argsort(is_anchor.int(), stable=True)[: x.shape[0] - k]  # the non-anchors, ascending
    onehot = torch.nn.functional.one_hot(slot[src], k).to(x.dtype)
    summed = torch.bmm(onehot.transpose(0, 1)[None], x[src][None])[0]
    size = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
    sizes = size[anchors] + torch.bmm(onehot.transpose(0, 1)[None], size[src][None])[0]
    return (x[anchors] + summed) / sizes


@register
class Restore(Addon):
    """RESTORE over ``base``: the base keeps ``int(n * split)`` tokens, the rest merge into density-peak anchors, the
    kept tokens keep their prompt positions and the decoder's attention is recalibrated by size and distance."""

    name = "restore"
    base_default = "holov"
    bases = BASES
    families = registry.where(tower="clip")
    unsupported_reason = ("RESTORE's bases rank by a CLIP [CLS] attention or run on its features, and its distance "
                          "term is defined on 1-D rotary positions; the other families have M-RoPE or no such tower")
    vision_positions = "keep"
    capturable = None
    capture_reason = ("RESTORE keeps the prompt positions and adds an attention bias in every decoder layer: the "
                      "eager engine runs it")

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            "split": Option(0.5, types=(float,), doc="the base's share of the budget (official 0.5)"),
            "position": Option("median", POSITIONS, doc="a cluster's position: its members' lower median (official), "
                                                        "first or last"),
            "contrast": Option("sparser", CONTRASTS,
                               doc="an anchor's contrast: largest cosine to a less dense token (the official code) or "
                                   "to a denser one (density peaks)"),
            "pruned_order": Option("auto", PRUNED_ORDERS,
                                   doc="the dropped tokens' order the clustering sees: auto (the official code's: "
                                       "HoloV's by [CLS] attention, descending; else by index)"),
            "calibrate": Option(True, types=(bool,), doc="the attention recalibration (False: positions and merging "
                                                         "only)"),
            "first_layer_sizes": Option("uniform", FIRST_LAYER_SIZES,
                                        doc="decoder layer 0's visual key sizes: uniform N / n (official) or the "
                                            "clusters'"),
            "numerics": NUMERICS_OPTION,
        }

    def __init__(self, budget=None, **options):
        if budget is None:
            raise ValueError("restore: a budget n (tokens per image / crop / frame) is required")
        super().__init__(budget, **options)
        check_numerics("restore", self.numerics)
        if not 0.0 < float(self.split) < 1.0:
            raise ValueError(f"restore: split must be in (0, 1), got {self.split!r}")
        if self.base_budget() < 1 or self.budget - self.base_budget() < 1:
            raise ValueError(f"restore: budget {self.budget} leaves the base or the anchors no token (split "
                             f"{self.split})")
        self.base_options = {**BASE_RECIPE.get(self.base, {}), **dict(self.base_options)}
        self.biases_attention = bool(self.calibrate)
        self.needs_vision_attention = self._order() == "attention"

    def base_budget(self) -> int:
        return int(self.budget * float(self.split))

    def _order(self) -> str:
        if self.pruned_order != "auto":
            return self.pruned_order
        return "attention" if self.base == "holov" else "index"

    # ------------------------------------------------------------------ the vision stage
    def select_addon(self, sig, base: Selection) -> Selection:
        x = sig.features
        dev = x.device
        n = x.shape[0]
        keep = base.keep.to(dev)
        kept = torch.zeros(n, dtype=torch.bool, device=dev).index_fill_(0, keep, True)
        lay = sig.unit_layout()
        units = [t for t in lay.tokens if t.numel()]
        dropped = [t[torch.argsort(kept[t].int(), stable=True)] for t in units]  # each unit's dropped tokens first
        counts = torch.stack([(~kept[t]).sum() for t in units]).tolist() if units else []  # the one host read
        k_anchor = self.budget - self.base_budget()
        score = None
        if self._order() == "attention":
            a = sig.cls_attn
            score = (a.to(x.dtype) if self.numerics == "official" else a.float()).mean(0)
        targets, assign, values = [], torch.full((n,), -1, dtype=torch.long, device=dev), []
        for t, c in zip(dropped, counts):
            pruned = t[:c]  # ascending
            k = min(k_anchor, c)
            if k == 0:
                continue
            if score is not None:  # HoloV's dropped tokens ranked by [CLS] attention, descending
                pruned = pruned[torch.sort(score[pruned], descending=True, stable=True).indices]
            feats = x[pruned] if self.numerics == "official" else x[pruned].float()
            anchors, slot = anchor_clusters(feats, k, self.contrast)
            assign[pruned] = slot + sum(int(tg.numel()) for tg in targets)
            targets.append(lower_medians(pruned, slot, k, self.position, big=n))
            if self.numerics == "official":
                values.append(cluster_values(x[pruned], anchors, slot))
        if not targets:
            return Selection(keep=keep.sort().values)
        tg = torch.cat(targets)
        src = torch.cat([keep, tg])
        order = torch.argsort(src)  # the outputs in prompt order
        if self.numerics == "official":
            rows = torch.cat([x[keep], torch.cat(values).to(x.dtype)])
            return Selection(keep=keep, targets=tg, assign=assign, rule="mean", space="projected", order=order,
                             values=rows)
        return Selection(keep=keep, targets=tg, assign=assign, rule="mean", space="projected", order=order)

    # ------------------------------------------------------------------ the decoder
    def attention_bias(self, keys) -> AttentionBias:
        """``log s_j`` on every key (layer 0: the visual keys' mean size, ``first_layer_sizes="uniform"``) and, at the
        prefill, ``log(2 - m(p_i - p_j))``: ``m(d)`` the mean over the rotary frequencies of ``cos(d theta_k)``, from a
        table over the decoder's positions in fp32, rounded to the model's dtype before ``2 -`` as the official code."""
        size, vis = keys.sizes, keys.visual
        log_size = torch.log(size)
        layer_keys = {}
        if self.first_layer_sizes == "uniform":
            n_vis = vis.sum(1, keepdim=True).clamp(min=1)
            uniform = (size * vis).sum(1, keepdim=True) / n_vis
            layer_keys[0] = torch.log(torch.where(vis, uniform, size))
        pos = keys.positions
        span = keys.max_positions
        t = torch.arange(span, device=pos.device).float()
        table = torch.cos(torch.outer(t, keys.inv_freq.to(pos.device))).mean(-1)
        d = (pos[:, :, None] - pos[:, None, :]).clamp(0, span - 1)  # [query, key]; j > i is masked anyway
        pair = torch.log(2.0 - table[d].to(keys.dtype))
        pair = torch.where(keys.pruned[:, None, None], pair, torch.zeros_like(pair))  # an unpruned sample: the stock's
        return AttentionBias(keys=log_size, pair=pair, layer_keys=layer_keys)
