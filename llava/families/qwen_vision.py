"""Per-token vision signals for Qwen2-VL, Qwen2.5-VL and Qwen3-VL (transformers 5.23), computed from one stock tower
run.

The tower (``model.model.visual``) is run once through the stock ``get_image_features`` /
``get_video_features``, so ``features`` is exactly what the unpruned model splices into the LLM.
Forward hooks read what the tower computes anyway:

* a forward pre-hook (``with_kwargs=True``) on ``blocks[layer].attn``: that block's attention input
  (``norm1`` of the block input), ``position_embeddings`` (cos, sin; window-permuted) and
  ``cu_seqlens`` (one segment per image / temporal slice of a video);
* a forward hook on ``merger.ln_q``: the normalised patch states the PatchMerger concatenates
  4 by 4 (its MLP input, ``vision_features``).

The attention implementation of the tower is never switched (SDPA / FlashAttention keep running)
and no attention weights are requested: q / k are recomputed from the captured attention input with
the block's own fused ``qkv`` projection and transformers' ``apply_rotary_pos_emb_vision``.

Qwen3-VL's tower (``Qwen3VLVisionModel``) has the same blocks (fused ``qkv``, the same vision RoPE), every
block full attention and no window permutation (the order is the merged raster order throughout); its
merger normalises before the 4-patch concat (``merger.norm``, hooked instead of ``ln_q``), and it returns
DeepStack features: one merged row per token from each of ``deepstack_visual_indexes`` blocks through its
own merger, which the text model adds to the hidden states at the visual positions after its first decoder
layers (``QwenVisual.deepstack``).

Qwen2-VL's tower (``Qwen2VisionTransformerPretrainedModel``) has the same attention (fused ``qkv``, the same vision
RoPE and ``scaling``) with LayerNorm and a GELU MLP around it, every block full attention and no window permutation
(as Qwen3-VL's), and Qwen2.5-VL's ``PatchMerger`` (``ln_q`` + ``mlp``): the code paths here need no branch of its own
(``is_windowed`` False, ``is_qwen3`` False, no position table).

The fast path (:mod:`llava.fast.path`) cannot run the stock tower (its SDPA path reads ``cu_seqlens`` back to the
host to split the segments): :func:`tower_plan` plans every grid-dependent index on the host and :func:`run_static`
runs the same modules' arithmetic with static shapes (bit-identical outputs and signals).

Order (Qwen2.5-VL). Inside the tower every per-patch quantity is in *window order*
(``get_vision_window_index``): merged token ``window_index[i]`` (merged raster index over all
images) occupies rows ``4i .. 4i+3``. The tower un-permutes only ``pooler_output`` with
``argsort(window_index)``; ``last_hidden_state`` stays in window order. Every signal here is pooled
4 rows -> 1 merged token and then reordered with the same ``argsort(window_index)``, so row ``j`` of
every tensor in :class:`QwenVisual` is row ``j`` of ``features``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index

SALIENCY_KINDS = ("received", "pooled_query")


@dataclass
class QwenVisual:
    """Visual tokens of all images (or all videos) of one call, in prompt order. ``T`` = merged tokens.

    features:        (T, D) merged visual tokens, bit-identical to
                     ``torch.cat(model.model.get_image_features(pixel_values, grid_thw).pooler_output)``
                     (``get_video_features`` for videos), same dtype.
    vision_features: (T, 4*C) the PatchMerger's MLP input for each merged token: ``merger.ln_q`` of
                     its 4 patches, concatenated in the tower's order; ``project(model,
                     vision_features)`` reproduces ``features``.
    saliency:        (H, T) fp32 or None. "received": per head, the attention each merged token
                     receives in the chosen full-attention block, i.e. the sum over its 4 patches of
                     the mean over all query patches of the same segment of
                     ``softmax(q k^T * scale)`` (q, k after RoPE, as the block computes them).
                     "pooled_query": per head ``softmax(mean_q(q) k^T * scale)`` per segment, summed
                     over the 4 patches. Either way each segment (image / temporal slice) sums to 1
                     per head. None unless ``want_attn``.
    keys:            (T, d) fp32 or None: keys of that block after the ``qkv`` projection and
                     *before* RoPE (a content-only similarity, like CLIP keys for VisionZip), mean
                     over heads, then mean over the 4 patches. None unless ``want_attn``.
    deepstack:       (T, L, D) or None: Qwen3-VL's DeepStack rows of every token, one per level (the
                     ``deepstack_features`` of the stock tower, same dtype); None for Qwen2.5-VL.
    group_mean:      {b: (T, C)} for each block index b asked for (``group_mean``): block b's output
                     averaged over the 4 patches of each merged token (the last block's: the merger's input
                     before its norm; MMTok's official vision -> vision space), the tower's dtype.

    The tokens' host layout (unit, patch, grids, sizes): :func:`token_layout`.
    """

    features: torch.Tensor
    vision_features: torch.Tensor
    saliency: torch.Tensor | None
    keys: torch.Tensor | None
    deepstack: torch.Tensor | None = None
    group_mean: dict | None = None


def is_qwen3(visual) -> bool:
    """True for Qwen3-VL's tower (DeepStack mergers, no window attention)."""
    return hasattr(visual, "deepstack_merger_list")


def is_windowed(visual) -> bool:
    """True for Qwen2.5-VL's tower (window attention, tokens permuted by window); Qwen2-VL's, Qwen3-VL's and
    Qwen3.5's towers attend fully in every block, in merged raster order."""
    return hasattr(visual, "window_size")


def project(model, vision_features: torch.Tensor) -> torch.Tensor:
    """The PatchMerger's MLP (4C -> 4C -> D) applied to rows of ``vision_features`` -> (n, D)."""
    merger = model.model.visual.merger
    if hasattr(merger, "mlp"):
        return merger.mlp(vision_features)
    return merger.linear_fc2(merger.act_fn(merger.linear_fc1(vision_features)))  # Qwen3-VL


def _resolve_layer(visual, layer: int | None) -> int:
    depth = len(visual.blocks)
    full = [int(i) for i in getattr(visual, "fullatt_block_indexes", range(depth))]  # Qwen3-VL: every block
    if layer is None:
        if not full:
            raise ValueError("the vision tower has no full-attention block (fullatt_block_indexes is empty)")
        return full[-1]
    if not -depth <= layer < depth:
        raise ValueError(f"layer {layer} is outside the vision tower's {depth} blocks")
    layer = layer % depth
    if layer not in full:
        raise ValueError(
            f"vision block {layer} uses window attention (each patch sees only its window); saliency needs a "
            f"full-attention block, one of fullatt_block_indexes={full}")
    return layer


def _frame_bounds(grid: list[list[int]]) -> list[int]:
    """Each temporal slice's first patch in the tower's input, then the patch count, from the (t, h, w) list."""
    bounds = [0]
    for t, h, w in grid:
        bounds += [bounds[-1] + (i + 1) * h * w for i in range(t)]
    return bounds


def token_layout(grid: list[list[int]], merge: int):
    """The host layout of the merged tokens of the images / videos of the (t, h, w) list, in :func:`encode`'s order:
    ``unit`` (T,) each token's attention segment (an image, or a video's temporal slice, numbered over the call),
    ``patch`` (T,) its merged-raster index in its unit (``r * (w/2) + c``), ``grids`` per unit (rows, cols) of merged
    tokens, ``sizes`` per image / video its tokens (t*h*w/4: its placeholder run), the segments' bounds (patches) and
    ``counts`` per image / video its units (its t)."""
    units, patches, grids, sizes = [], [], [], []
    n_units = 0
    for t, h, w in grid:
        rows, cols = h // merge, w // merge
        n = rows * cols
        units.append(torch.arange(n_units, n_units + t).repeat_interleave(n))
        patches.append(torch.arange(n).repeat(t))
        grids += [(rows, cols)] * t
        sizes.append(t * n)
        n_units += t
    return torch.cat(units), torch.cat(patches), grids, sizes, _frame_bounds(grid), [t for t, _, _ in grid]


def _received(q: torch.Tensor, k: torch.Tensor, bounds: list[int], scale: float, chunk: int) -> torch.Tensor:
    """(H, N) attention received per patch: per segment, mean over queries of softmax(q k^T * scale)."""
    heads, n, _ = q.shape
    out = torch.zeros(heads, n, dtype=torch.float32, device=q.device)
    for a, b in zip(bounds[:-1], bounds[1:]):
        ks = k[:, a:b]
        acc = out[:, a:b]
        for c in range(a, b, chunk):
            logits = torch.matmul(q[:, c:min(c + chunk, b)], ks.transpose(1, 2)) * scale
            acc += logits.softmax(-1).sum(1)
        acc /= b - a
    return out


def _pooled_query(q: torch.Tensor, k: torch.Tensor, bounds: list[int], scale: float) -> torch.Tensor:
    """(H, N) per segment softmax(mean over the segment's queries of q, k^T * scale)."""
    heads, n, _ = q.shape
    out = torch.zeros(heads, n, dtype=torch.float32, device=q.device)
    for a, b in zip(bounds[:-1], bounds[1:]):
        qm = q[:, a:b].mean(1, keepdim=True)                                   # (H, 1, d)
        out[:, a:b] = (torch.matmul(qm, k[:, a:b].transpose(1, 2)) * scale).softmax(-1)[:, 0]
    return out


def attention_signals(attn, x: torch.Tensor, pos: tuple, bounds, reverse: torch.Tensor, saliency: str, chunk: int,
                      unit_sq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``saliency`` (H, T) and ``keys`` (T, d) of :class:`QwenVisual` from one block's attention input ``x``
    (N, C) and its rotary tables ``pos`` (cos, sin), both in the tower's order; ``bounds`` the attention
    segments (patch rows, Python ints), ``reverse`` the tower order -> merged raster order of the merged
    tokens. No host read: the eager :func:`encode` and the fast path's :func:`run_static` share it."""
    n = x.shape[0]
    q, k, _ = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)   # (N, H, d)
    keys = k.float().mean(1).reshape(-1, unit_sq, k.shape[-1]).mean(1)[reverse]
    cos, sin = pos
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k = q.float().transpose(0, 1), k.float().transpose(0, 1)                            # (H, N, d)
    if saliency == "received":
        per_patch = _received(q, k, bounds, attn.scaling, chunk)
    else:
        per_patch = _pooled_query(q, k, bounds, attn.scaling)
    return per_patch.reshape(per_patch.shape[0], -1, unit_sq).sum(-1)[:, reverse], keys


@torch.no_grad()
def encode(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor, *, want_attn: bool,
           layer: int | None = None, saliency: str = "received", video: bool = False,
           chunk: int = 1024, group_mean: tuple[int, ...] = (), grid: list | None = None,
           kept: tuple | None = None) -> QwenVisual:
    """Run the Qwen2.5-VL / Qwen3-VL vision tower once and return its merged tokens with per-token signals.

    model:        a ``Qwen2_5_VLForConditionalGeneration`` or ``Qwen3VLForConditionalGeneration``.
    pixel_values: patchified pixels (sum t*h*w, 3*temporal_patch*patch^2) as the processor emits them
                  (``pixel_values_videos`` when ``video``).
    grid_thw:     (n, 3) image_grid_thw (or video_grid_thw when ``video``); read once on the host.
    want_attn:    compute ``saliency`` and ``keys`` (from one extra q/k projection of one block).
    layer:        vision block whose attention defines them; default the last of
                  ``fullatt_block_indexes``. A window-attention block raises ValueError.
    saliency:     "received" (exact, per segment in query chunks of ``chunk`` rows, memory
                  O(H * chunk * S)) or "pooled_query" (O(H * S) proxy). Anything else: ValueError.
    video:        use ``get_video_features``; units are then temporal slices, ``sizes`` per video.
    group_mean:   block indices b (negative from the end) whose output, averaged over each merged token's 4
                  patches, :class:`QwenVisual` returns as ``group_mean[b]`` (a forward hook on the block).
    grid:         ``grid_thw`` as a host list of (t, h, w) where the caller read it already (the adapter's
                  layout); None: read here.
    kept:         after a pre-tower stage, the run over its kept tokens only
                  (:func:`llava.families.qwen_kept.kept_tower_inputs`): every row returned is a kept token's, in order.
                  None: every token.
    """
    if saliency not in SALIENCY_KINDS:
        raise ValueError(f"unknown saliency {saliency!r}; expected one of {SALIENCY_KINDS}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    visual = model.model.visual
    layer = _resolve_layer(visual, layer)
    merge = int(visual.spatial_merge_size)
    unit_sq = merge * merge

    if grid is None:
        grid = grid_thw.tolist()  # the one host read
    grid = [[int(v) for v in row] for row in grid]
    for t, h, w in grid:
        if h % merge or w % merge:
            raise ValueError(f"grid (t={t}, h={h}, w={w}) is not divisible by spatial_merge_size={merge}")
    bounds = _frame_bounds(grid)
    qwen3 = is_qwen3(visual)
    kwargs = None
    if kept is not None:  # the kept tokens' patches, each with its stock position
        rows, kwargs, bounds, reverse = kept
        pixel_values = pixel_values[rows.to(pixel_values.device)]
    elif not is_windowed(visual):  # Qwen3-VL / Qwen3.5: merged raster order throughout
        reverse = torch.arange(sum(t * h * w for t, h, w in grid) // unit_sq)
    else:
        window_index, _ = get_vision_window_index(torch.tensor(grid, dtype=torch.long), spatial_merge_size=merge,
                                                  window_size=visual.window_size, patch_size=visual.patch_size)
        reverse = torch.argsort(window_index)

    captured: dict = {}

    def grab_attn(module, args, kwargs):
        captured["x"] = args[0] if args else kwargs["hidden_states"]
        captured["pos"] = kwargs["position_embeddings"]
        captured["cu"] = kwargs["cu_seqlens"]

    def grab_ln_q(module, args, output):
        captured["ln_q"] = output

    def grab_block(b):
        def hook(module, args, output):
            captured[("block", b)] = output[0] if isinstance(output, tuple) else output
        return hook

    depth = len(visual.blocks)
    for b in group_mean:
        if not -depth <= int(b) < depth:
            raise ValueError(f"group_mean: block {b} is outside the vision tower's {depth} blocks")
    merger_norm = visual.merger.ln_q if hasattr(visual.merger, "ln_q") else visual.merger.norm  # Qwen3-VL / 3.5: norm
    handles = [merger_norm.register_forward_hook(grab_ln_q)]
    handles += [visual.blocks[int(b)].register_forward_hook(grab_block(int(b))) for b in group_mean]
    if want_attn:
        handles.append(visual.blocks[layer].attn.register_forward_pre_hook(grab_attn, with_kwargs=True))
    try:
        if kwargs is not None:  # the stock tower, its grid-derived inputs given (its outputs: the kept tokens')
            out = visual(pixel_values.type(visual.dtype), grid_thw=grid_thw, **kwargs)
        elif video:
            out = model.model.get_video_features(pixel_values, grid_thw)
        else:
            out = model.model.get_image_features(pixel_values, grid_thw)
    finally:
        for handle in handles:
            handle.remove()

    pooled = out.pooler_output
    features = pooled if torch.is_tensor(pooled) else torch.cat(pooled)
    device = features.device
    reverse = reverse.to(device)
    ln_q = captured["ln_q"]
    vision_features = ln_q.reshape(-1, unit_sq * ln_q.shape[-1])[reverse]

    sal = keys = None
    if want_attn:
        if captured["cu"].shape[0] != len(bounds):
            raise RuntimeError(f"tower used {captured['cu'].shape[0] - 1} attention segments at block {layer}, "
                               f"expected {len(bounds) - 1} from grid_thw")
        sal, keys = attention_signals(visual.blocks[layer].attn, captured["x"], captured["pos"], bounds, reverse,
                                      saliency, chunk, unit_sq)

    deepstack = None
    if qwen3:  # (T, L, D): every level's rows, images concatenated as the features are
        deepstack = torch.stack([level if torch.is_tensor(level) else torch.cat(level)
                                 for level in out.deepstack_features], dim=1)
    # the 4 rows of a merged token are adjacent in the tower's order: mean over them, then merged raster order
    means = {int(b): (h := captured[("block", int(b))]).reshape(-1, unit_sq, h.shape[-1]).mean(1)[reverse]
             for b in group_mean}
    return QwenVisual(features=features, vision_features=vision_features, saliency=sal, keys=keys,
                      deepstack=deepstack, group_mean=means)


# ------------------------------------------------------------------------------------------------
# The fast path (llava.fast.path): the tower with static shapes, planned on the host from the grids
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TowerPlan:
    """What is static about one tower run of the fast path (Python values: part of the graph key). Every
    attention segment is known on the host from the grids, so the blocks attend segment by segment with
    Python slice bounds (the stock SDPA path reads ``cu_seqlens`` back to the host to split, which a captured
    function cannot)."""

    grids: tuple  # per image / video (t, h, w) in patches
    merge: int  # spatial_merge_size
    full: tuple  # full-attention segments: runs ((start, length, count), ...) of `count` equal consecutive ones
    window: tuple | None  # window-attention segments likewise (Qwen2.5-VL); None: every block attends fully
    full_blocks: tuple  # the blocks that attend fully (the others attend within windows)
    bounds: tuple  # the full-attention segment bounds (patch rows): the saliency's segments
    layer: int  # the block whose attention defines saliency / keys
    saliency: str
    pos_embed: bool = False  # learned position table resampled to each grid (Qwen3-VL / Qwen3.5)
    deepstack: tuple = ()  # the blocks whose output each DeepStack merger reads, by level (Qwen3-VL)


def _runs_of(bounds: list[int]) -> tuple:
    """Segment bounds -> runs ((start, length, count), ...) of consecutive segments of one length."""
    runs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b == a:
            continue
        if runs and runs[-1][1] == b - a:
            runs[-1][2] += 1
        else:
            runs.append([a, b - a, 1])
    return tuple(tuple(r) for r in runs)


def tower_plan(visual, grid: list, layer: int | None, saliency: str) -> tuple[TowerPlan, dict]:
    """The host plan of one fast-path tower run over the images ``grid`` ((t, h, w) per image, host ints):
    the static :class:`TowerPlan` and its host index tensors ``pos`` (N, 2) (each patch's rotary (h, w),
    in the tower's order), ``window`` (N/4,) (merged token of each tower slot, window order; Qwen2.5-VL),
    ``reverse`` (N/4,) (tower order -> merged raster order) and ``interp`` (N, taps) long / ``interp_w``
    (N, taps) float (the learned position table's resampling; Qwen3-VL / Qwen3.5). Pure functions of the
    grid (transformers' ``vision_utils``, the tower's own), computed on host tensors."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

    merge = int(visual.spatial_merge_size)
    for t, h, w in grid:
        if h % merge or w % merge:
            raise ValueError(f"grid (t={t}, h={h}, w={w}) is not divisible by spatial_merge_size={merge}")
    g = torch.tensor(grid, dtype=torch.long).reshape(-1, 3)
    bounds = _frame_bounds(grid)
    pos = get_vision_position_ids(g, merge)  # (N, 2) in merge-block order
    n_merged = pos.shape[0] // (merge * merge)
    window = None
    tensors = {}
    if is_windowed(visual):
        index, cu = get_vision_window_index(g, spatial_merge_size=merge, window_size=visual.window_size,
                                            patch_size=visual.patch_size)
        pos = pos.view(n_merged, merge * merge, 2)[index].reshape(-1, 2)
        window = _runs_of([int(v) for v in cu.tolist()])
        tensors["window"] = index
        tensors["reverse"] = torch.argsort(index)
        full_blocks = tuple(int(i) for i in visual.fullatt_block_indexes)
    else:
        full_blocks = tuple(range(len(visual.blocks)))
    pos_embed = getattr(visual, "pos_embed", None) is not None
    if pos_embed:  # as the stock forward resamples it (its own mode and corner alignment)
        tensors["interp"], tensors["interp_w"] = get_vision_interpolation_indices_and_weights(
            g, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=merge)
    tensors["pos"] = pos
    plan = TowerPlan(grids=tuple(tuple(int(v) for v in r) for r in grid), merge=merge, full=_runs_of(bounds),
                     window=window, full_blocks=full_blocks, bounds=tuple(bounds),
                     layer=_resolve_layer(visual, layer), saliency=saliency, pos_embed=pos_embed,
                     deepstack=tuple(int(i) for i in getattr(visual, "deepstack_visual_indexes", ()) or ()))
    return plan, tensors


def _segment_attention(attn, x: torch.Tensor, pos: tuple, runs: tuple) -> torch.Tensor:
    """The vision attention module's output over ``x`` (N, C), each segment attending within itself
    (``runs`` from :func:`_runs_of`: equal consecutive segments batched into one call of the model's
    attention function, as many as the stock module's per-segment calls otherwise); no host read."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward

    n = x.shape[0]
    heads = attn.num_heads
    q, k, v = attn.qkv(x).reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)  # (N, H, d)
    cos, sin = pos
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    fn = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    outs = []
    for start, length, count in runs:
        def seg(t):  # (count, H, length, d)
            return t[start:start + length * count].reshape(count, length, heads, -1).transpose(1, 2)

        o, _ = fn(attn, seg(q), seg(k), seg(v), attention_mask=None, scaling=attn.scaling, dropout=0.0,
                  is_causal=False)  # (count, length, H, d)
        outs.append(o.reshape(length * count, -1))
    return attn.proj(torch.cat(outs) if len(outs) > 1 else outs[0])


def run_static(model, pixel_values: torch.Tensor, plan: TowerPlan, tensors: dict, want_attn: bool,
               chunk: int = 1024) -> dict:
    """The tower over all images of a fast-path prefill with static shapes and no host read: the stock
    tower's arithmetic (patch embedding, the window permutation, the 2-D rotary tables, the blocks, the
    merger, the un-permutation) with every grid-dependent index from :func:`tower_plan` (``tensors`` on the
    device). Returns, per merged token in merged raster order (images in order), what :func:`encode` gives:
    ``features`` (T, D), ``vision_features`` (T, 4C), with ``want_attn`` ``saliency`` (H, T), ``keys``
    (T, d), and for Qwen3-VL ``deepstack`` (T, L, D)."""
    visual = model.model.visual
    unit_sq = plan.merge * plan.merge
    x = visual.patch_embed(pixel_values.type(visual.dtype))
    if plan.pos_embed:
        table = visual.pos_embed(tensors["interp"]) * tensors["interp_w"][:, :, None]
        x = x + table.sum(1).to(x.dtype)
    n = x.shape[0]
    reverse = tensors.get("reverse")
    deep = []
    if plan.window is not None:  # window order, 4 patches of a merged token adjacent (the stock permutation)
        x = x.reshape(n // unit_sq, unit_sq, -1)[tensors["window"]].reshape(n, -1)
    pos = visual.rotary_pos_emb(x, tensors["pos"])
    captured = None
    for i, blk in enumerate(visual.blocks):
        xn = blk.norm1(x)
        if want_attn and i == plan.layer:
            captured = xn
        x = x + _segment_attention(blk.attn, xn, pos, plan.full if i in plan.full_blocks else plan.window)
        x = x + blk.mlp(blk.norm2(x))
        if i in plan.deepstack:  # Qwen3-VL: no window permutation, rows already in merged raster order
            deep.append(visual.deepstack_merger_list[plan.deepstack.index(i)](x))
    merger = visual.merger
    ln = merger.ln_q(x) if hasattr(merger, "ln_q") else merger.norm(x)
    vf = ln.reshape(-1, unit_sq * ln.shape[-1])
    feats = project(model, vf)
    if reverse is not None:
        vf, feats = vf[reverse], feats[reverse]
    out = {"features": feats, "vision_features": vf}
    if deep:
        out["deepstack"] = torch.stack(deep, dim=1)
    if want_attn:
        rev = reverse if reverse is not None else torch.arange(vf.shape[0], device=vf.device)
        out["saliency"], out["keys"] = attention_signals(visual.blocks[plan.layer].attn, captured, pos, plan.bounds,
                                                         rev, plan.saliency, chunk, unit_sq)
    return out
