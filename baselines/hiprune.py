"""HiPrune (arXiv 2508.00553, "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention
in Vision-Language Models"): per image / crop / frame keep *anchors* (top "global attention" in an
object layer of the vision tower), their *buffers* (4-neighbours on the flat raster index) and
*registers* (top global attention in the deep / select layer among the rest), pre-LLM.

Doc: docs/methods/hiprune.md. Official code: Danielement321/HiPrune,
``LLaVA/llava/model/llava_arch.py`` ``encode_images`` (scores, anchors, buffers, registers, index mask on
the projected features) and ``LLaVA/llava/model/multimodal_encoder/clip_encoder.py`` (the tower runs with
``output_attentions=True`` and returns all layers' attention maps).

Algorithm, per unit u with patch budget T (official code):

* global attention of a layer = mean over heads of the column mean over all query rows ([CLS] included)
  of its softmax, patch columns (the engine gives the per-head column mean as ``sig.received_attn[v]``);
* a = round(T * alpha / 5) (Python ``round``: half to even); anchors = top-a patches by the object
  layer's global attention;
* buffers = anchors +-1 and +-cols on the flat patch index (so index 24k-1 and 24k are neighbours across
  a row break), clamped to [0, P-1] (so an anchor in the top row adds patch 0, one in the bottom row patch
  P-1), U = unique(anchors, buffers);
* registers = top-(T - |U|) patches by the deep layer's global attention after subtracting 1 on U;
* keep = U + registers, ascending. Positions contiguous (pre-LLM).

Layer indices (hidden-state indices v, as ``Method.vision_attention_layers`` takes them). The official
object layer is 1-based l (``HIPRUNE_OBJECT_LAYER`` = 9) read as ``attentions[l - 1]``: encoder layer
l - 1 produces ``hidden_states[l]``, so v = l. The deep layer is ``attentions[mm_vision_select_layer]`` =
``attentions[-2]`` = ``attentions[22]`` of 24, which produces ``hidden_states[23]`` = ``hidden_states[-2]``
(25 entries: embeddings + 24 layers), so v = -2 (a negative index means the same layer in both tuples).
``object_layer`` is stated for a 24-layer tower (CLIP ViT-L/14-336, LanguageBind) and scaled to the
tower's depth n as round(l * n / 24) clipped to 1..n (identity at n = 24; the 3-layer tiny towers use
layer 1); ``object_layer_reference=None`` takes it as is.

Reference mode (option ``numerics="official"``; default ``"ours"``): the official numerics. The global attention
as the official code computes it in the tower's own dtype (``received_global`` with
``vision_attention_logits="model"``: the head mean per entry, then the query mean): fp16 under an fp16 tower, as
lmms-eval loads it for the official GQA / MME / POPE / SQA / VizWiz runs; fp32 with ``vision_dtype="float32"``,
as LLaVA's own scripts (``device_map='auto'``: the tower is not cast) for MMB / TextVQA / VQAv2. Per unit, the
anchors are ``torch.topk`` of the object layer's row (``k`` = a), the buffers ``torch.unique`` of anchors +-1 / +-cols clamped to the grid, and the
registers ``torch.topk`` of the deep row minus the int mask of U (fp32 - int32, as the official in-place
``deep_attention[i] -= mask.int()``) with k = T - |U|: the official tie order of both top-k calls instead
of the lower index. |U| > T (the official code would fail) keeps our fallback.

Our design / options: see ``docs/methods/hiprune.md``.
"""

from __future__ import annotations

import torch

from llava.families import registry
from llava.method import Method, register
from llava.ops import NUMERICS_OPTION
from llava.ops import check_numerics, device_ints, masked_take, unit_layout
from llava.options import Option
from llava.selection import Selection

CLS_TOKEN_MODES = ("drop", "keep")
BUDGET_MODES = ("per_unit", "per_image_total")
#: the CLIP-tower families (a [CLS] token and its attention: llava.families.registry's ``tower``), asked at each use
SUPPORTED_FAMILIES = registry.where(tower="clip")
#: dtype of the official global attention (fp32 tower under device_map='auto', attentions returned uncast)
OFFICIAL_DTYPE = torch.float32


def official_unit_keep(obj: torch.Tensor, deep: torch.Tensor, present: torch.Tensor, a: int, t: int,
                       cols: int) -> torch.Tensor | None:
    """One unit's kept patches (P,) bool with the official calls (reference mode): ``obj`` / ``deep`` (P,)
    global attention in the official dtype (-inf = absent patch), ``a`` anchors, ``t`` patches to keep.
    Anchors = ``torch.topk`` of the (1, P) object row; U = ``torch.unique`` of anchors and their +-1 /
    +-cols neighbours clamped to [0, P-1] (absent patches dropped); registers = ``torch.topk`` of the
    (1, P) deep row minus the int mask of U, k = t - |U|. None when |U| > t (the official topk would get a
    negative k; the caller keeps our fallback)."""
    P = obj.numel()
    anchors = torch.topk(obj[None], k=a, dim=1)[1]
    nb = torch.cat([anchors, anchors - 1, anchors + 1, anchors - cols, anchors + cols], dim=1).clamp(0, P - 1)
    u_idx = torch.unique(nb, sorted=False)
    u_idx = u_idx[present[u_idx]]
    n_reg = t - u_idx.numel()
    if n_reg < 0:
        return None
    mask = torch.zeros(P, dtype=torch.bool, device=obj.device).scatter_(0, u_idx, True)
    regs = torch.topk((deep - mask.int())[None], k=n_reg, dim=1)[1][0]
    keep = mask.clone()
    keep.index_fill_(0, regs, True)  # not keep[regs] = True: a host scalar's copy (no capture)
    return keep & present


def anchor_count(budget: int, alpha: float) -> int:
    """a = round(T * alpha / 5), evaluated as the official code does (Python float, half to even)."""
    return round(budget * float(alpha) / 5)


def unit_budgets(num_units: int, budget: int, mode: str, unit_pos: list | None) -> list[int]:
    """Per-unit budgets T_u. ``per_unit``: T for every unit. ``per_image_total``: the official NeXT split,
    T_u = int(budget / N_img) for each of an image's N_img crops (a base crop, unit_pos (-1, -1), starts a
    new image; its grid crops follow); LLaVA-1.5 images and video frames are each their own image."""
    if mode == "per_unit" or unit_pos is None:
        return [budget] * num_units
    starts = [u for u in range(num_units) if tuple(unit_pos[u]) == (-1, -1) or u == 0]
    out = [0] * num_units
    for i, s in enumerate(starts):
        e = starts[i + 1] if i + 1 < len(starts) else num_units
        for u in range(s, e):
            out[u] = int(budget / (e - s))
    return out


def hiprune(g_obj: torch.Tensor, g_deep: torch.Tensor, unit: torch.Tensor, patch: torch.Tensor,
            budget: int, grid: tuple[int, int], *, alpha: float = 0.1, cls_token: str = "drop",
            keep_newlines: bool = True, budget_mode: str = "per_unit",
            unit_pos: torch.Tensor | None = None, numerics: str = "ours", layout=None) -> torch.Tensor:
    """Indices (ascending) of the tokens HiPrune keeps.

    g_obj, g_deep: (T,) global attention of the object / deep layer per token (head mean of the column
    mean; only patch tokens are read); unit: (T,) unit id (-1 = NeXT newline); patch: (T,) patch index in
    the unit's ``grid`` = (rows, cols) (-1 = [CLS] / newline). A unit with at most T_u tokens is kept
    whole. Vectorised over units: one host read (``unit_layout``), no per-token synchronisation.
    ``numerics="official"``: per pruned unit the official ``torch.topk`` / ``torch.unique`` calls
    (:func:`official_unit_keep`, one host read per unit for |U|), scores in fp32. ``layout``: the
    :func:`llava.ops.unit_layout` of (unit, patch, unit_pos) when the caller has it (planned on the host
    by the fast path: then no host read at all).
    """
    check_numerics("hiprune", numerics)
    if cls_token not in CLS_TOKEN_MODES:
        raise ValueError(f"hiprune: cls_token must be one of {CLS_TOKEN_MODES}, got {cls_token!r}")
    if budget_mode not in BUDGET_MODES:
        raise ValueError(f"hiprune: budget_mode must be one of {BUDGET_MODES}, got {budget_mode!r}")
    dev = unit.device
    n = unit.numel()
    lay = layout if layout is not None else unit_layout(unit, patch, unit_pos=unit_pos)  # the one host sync
    nu = lay.num_units
    rows, cols = int(grid[0]), int(grid[1])
    P = rows * cols
    if lay.grid * lay.grid > P:
        raise ValueError(f"hiprune: patch indices reach {lay.grid ** 2 - 1} but the grid is {rows}x{cols}")
    budgets = unit_budgets(nu, budget, budget_mode, lay.unit_pos)

    # per unit, on the host: patch budget k_u, anchors a_u, whether [CLS] stays
    k, a, keep_cls, count = [], [], [], 0
    for u in range(nu):
        t, n_cls, n_pat = budgets[u], len(lay.cls[u]), len(lay.patches[u])
        if t >= n_cls + n_pat:  # the unit fits: kept whole ([CLS] too)
            k_u, c_u = n_pat, True
        elif cls_token == "keep" and n_cls:
            k_u, c_u = max(t - n_cls, 0), True
        else:
            k_u, c_u = t, False
        k.append(k_u)
        a.append(anchor_count(k_u, alpha) if k_u < n_pat else 0)
        keep_cls.append(c_u)
        count += k_u + (n_cls if c_u else 0)
    if keep_newlines:
        count += lay.num_newline_stock
    if nu == 0:
        return lay.newlines if keep_newlines else unit.new_zeros(0)

    # (U, P) tables of the unit's patches; non-patch tokens go to a dump slot U*P
    is_patch = (unit >= 0) & (patch >= 0)
    slot = torch.where(is_patch, unit.clamp(min=0) * P + patch.clamp(min=0), nu * P)
    ninf = torch.full((nu * P + 1,), float("-inf"), dtype=torch.float32, device=dev)
    obj = ninf.clone().scatter_(0, slot, g_obj.float())[:-1].view(nu, P)
    deep = ninf.clone().scatter_(0, slot, g_deep.float())[:-1].view(nu, P)
    present = torch.zeros(nu * P + 1, dtype=torch.bool, device=dev).scatter_(
        0, slot, torch.ones(n, dtype=torch.bool, device=dev))[:-1].view(nu, P)
    ar = torch.arange(P, device=dev)

    def ranks(score: torch.Tensor) -> torch.Tensor:  # 0-based rank per row, descending, ties to lower index
        order = torch.sort(score, dim=1, descending=True, stable=True).indices
        return torch.empty_like(order).scatter_(1, order, ar.expand_as(order))

    a_t = device_ints(a, dev)[:, None]  # kernels, not uploads (the fast path captures this)
    k_t = device_ints(k, dev)[:, None]
    anchor = (ranks(obj) < a_t) & present
    # buffers: every anchor marks p-1, p+1, p-cols, p+cols, clamped to the grid (official quirks)
    nb = torch.stack([ar - 1, ar + 1, ar - cols, ar + cols]).clamp(0, P - 1).reshape(-1)  # (4P,)
    hits = torch.zeros(nu, P, dtype=torch.int32, device=dev).scatter_add_(
        1, nb.expand(nu, -1), anchor.int().repeat(1, 4))
    in_u = (anchor | (hits > 0)) & present
    # registers: official top-(T - |U|) of g_deep - 1[U]; g_deep is a mean of probabilities (0..1), so
    # the subtraction ranks every U patch below every other patch: rank U first, then the rest by g_deep.
    # Priority levels: anchors 3, buffers 2, other patches 1, absent 0; within U by the object score
    # (only decides when |U| > T_u), elsewhere by the deep score (registers).
    level = present.long() + in_u.long() + anchor.long()
    second = torch.where(in_u, obj, deep)
    order = torch.sort(second, dim=1, descending=True, stable=True).indices
    lev = level.gather(1, order)
    order = order.gather(1, torch.sort(lev, dim=1, descending=True, stable=True).indices)
    rank = torch.empty_like(order).scatter_(1, order, ar.expand_as(order))
    kept_tab = (rank < k_t) & present
    if numerics == "official":  # the official top-k calls per pruned unit (|U| > T: our fallback row)
        odt = g_obj.dtype if g_obj.is_floating_point() else OFFICIAL_DTYPE  # the scores' own dtype (exact back)
        obj_o, deep_o = obj.to(odt), deep.to(odt)
        for u in range(nu):
            if k[u] < len(lay.patches[u]):
                row = official_unit_keep(obj_o[u], deep_o[u], present[u], a[u], k[u], cols)
                if row is not None:
                    kept_tab[u] = row

    # back to the flat tokens
    kept_flat = torch.cat([kept_tab.reshape(-1), kept_tab.new_zeros(1)])
    keep_tok = kept_flat[slot]
    cls_tok = (unit >= 0) & (patch < 0)
    if any(keep_cls):
        keep_cls_t = device_ints(keep_cls, dev).bool()  # kernels, not an upload
        keep_tok = keep_tok | (cls_tok & keep_cls_t[unit.clamp(min=0)])
    if keep_newlines:
        keep_tok = keep_tok | (unit < 0)
    if numerics == "official":  # a register that is a U patch (official g_deep = 1 vs 0) keeps fewer
        count = int(keep_tok.sum())
    return masked_take(torch.arange(n, device=dev), keep_tok, count)


@register
class HiPrune(Method):
    """HiPrune: per image / crop / frame keep anchors (object layer), their 4-neighbour buffers and
    registers (deep layer) by the vision tower's global (received) attention, in original order."""

    name = "hiprune"
    capturable = "full"  # its two received-attention layers come from the tower's hidden states (fastpath)
    vision_stage = True
    #: (object layer, deep layer) as hidden-state indices; set from the options (and the tower's depth
    #: at ``setup``)
    vision_attention_layers: tuple[int, ...] = (9, -2)
    families = SUPPORTED_FAMILIES
    unsupported_reason = ("HiPrune reads the global (received) attention of two CLIP tower layers, which the "
                          "engine computes for CLIP towers only (Qwen2.5-VL's windowed ViT and OneVision's SigLIP "
                          "tower do not provide it)")

    @classmethod
    def option_defaults(cls):
        return {
            **super().option_defaults(),
            # alpha: a = round(T * alpha / 5) anchors (official HIPRUNE_ALPHA)
            "alpha": 0.1,
            # object layer, 1-based = hidden-state index (official HIPRUNE_OBJECT_LAYER, CLIP)
            "object_layer": 9,
            # tower depth object_layer is stated for (scaled to the real depth); None: absolute
            "object_layer_reference": 24,
            # deep layer (hidden-state index): the select layer -2 (official attentions[-2])
            "deep_layer": -2,
            "budget_mode": Option("per_unit", BUDGET_MODES,
                                  doc="per_unit: T per image / crop / frame; per_image_total: official NeXT "
                                      "int(T / crops)"),
            "cls_token": Option("drop", CLS_TOKEN_MODES,
                                doc="Video-LLaVA frame [CLS]: drop (T patches) or keep ([CLS] + T-1 patches)"),
            # LLaVA-NeXT 'spatial_unpad' newline tokens: keep as layout (not counted) or drop
            "keep_newlines": True,
            # "ours" (fp32, ties to the lower index) or "official" (reference mode: the official torch.topk /
            # torch.unique calls per unit, fp32 as the official fp32 tower)
            "numerics": NUMERICS_OPTION,
        }

    def __init__(self, budget=None, **options):
        if budget is None:
            raise ValueError("hiprune: a budget T (tokens per image / crop / frame) is required")
        super().__init__(budget, **options)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha >= 0:
            raise ValueError(f"hiprune: alpha must be a number >= 0, got {self.alpha!r}")
        for name in ("object_layer", "deep_layer"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"hiprune: {name} must be an int (hidden-state index), got {v!r}")
        if self.object_layer < 1:
            raise ValueError(f"hiprune: object_layer is 1-based (>= 1), got {self.object_layer}")
        ref = self.object_layer_reference
        if ref is not None and (isinstance(ref, bool) or not isinstance(ref, int) or ref < 1):
            raise ValueError(f"hiprune: object_layer_reference must be a positive int or None, got {ref!r}")
        self._use_layers(self.object_layer, self.deep_layer)

    def _use_layers(self, obj: int, deep: int) -> None:
        """The two tower layers' global attention, as the signals the mode reads: ours, each head's column mean
        (``received_attn``, head mean taken here, fp32); the reference mode, the official order of the two means in
        the tower's own arithmetic (``received_global`` with ``vision_attention_logits="model"``: fp16 maps under
        an fp16 tower, as lmms-eval runs the official code; fp32 under ``vision_dtype="float32"``, as LLaVA's
        own scripts)."""
        self._layers = (obj, deep)
        if self.numerics == "official":
            self.vision_attention_logits = "model"
            self.vision_global_attention_layers, self.vision_attention_layers = self._layers, ()
        else:
            self.vision_attention_layers = self._layers

    def object_layer_for(self, depth: int) -> int:
        """The object layer (hidden-state index) on a tower of ``depth`` layers."""
        ref = self.object_layer_reference
        if ref is None:
            if self.object_layer > depth:
                raise ValueError(f"hiprune: object_layer {self.object_layer} > the tower's {depth} layers")
            return self.object_layer
        return min(max(1, round(self.object_layer * depth / ref)), depth)

    def setup(self, *, num_layers, num_vision_layers, family):
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(
                f"hiprune: family {family!r} is not supported: HiPrune reads the global (received) attention of "
                f"two CLIP tower layers (Method.vision_attention_layers), which the engine computes for the CLIP "
                f"towers of {', '.join(SUPPORTED_FAMILIES)} only (Qwen2.5-VL's windowed ViT and OneVision's "
                f"SigLIP tower do not provide it)")
        super().setup(num_layers=num_layers, num_vision_layers=num_vision_layers, family=family)
        self._use_layers(self.object_layer_for(num_vision_layers), self.deep_layer)

    def select_vision(self, sig):
        v_obj, v_deep = self._layers
        if self.numerics == "official":  # heads first, then the queries, in the tower's dtype (official)
            g_obj, g_deep = sig.received_global[v_obj], sig.received_global[v_deep]
        else:
            g_obj = sig.received_attn[v_obj].float().mean(0)  # head mean of the column mean
            g_deep = sig.received_attn[v_deep].float().mean(0)
        return Selection(keep=hiprune(g_obj, g_deep, sig.unit, sig.patch, self.budget, sig.grid,
                                      alpha=self.alpha, cls_token=self.cls_token,
                                      keep_newlines=self.keep_newlines, budget_mode=self.budget_mode,
                                      unit_pos=sig.unit_pos, numerics=self.numerics,
                                      layout=sig.unit_layout(patch=True, pos=True)))
