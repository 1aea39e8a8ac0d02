"""Per-token vision signals for Qwen2.5-VL and Qwen3-VL (transformers 5.23), computed from one stock tower run.

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
    unit:            (T,) CPU long: attention segment of each token = image index for images
                     (t = 1), temporal-slice index numbered over all videos in order for videos.
    patch:           (T,) CPU long: merged-raster index within its unit, ``r * (w/2) + c``.
    grids:           per unit: (rows, cols) of merged tokens = (h/2, w/2).
    sizes:           merged tokens per image / per video (t*h*w/4): the LLM placeholder run lengths.
    """

    features: torch.Tensor
    vision_features: torch.Tensor
    saliency: torch.Tensor | None
    keys: torch.Tensor | None
    unit: torch.Tensor
    patch: torch.Tensor
    grids: list[tuple[int, int]]
    sizes: list[int]
    deepstack: torch.Tensor | None = None


def is_qwen3(visual) -> bool:
    """True for Qwen3-VL's tower (DeepStack mergers, no window attention)."""
    return hasattr(visual, "deepstack_merger_list")


def is_windowed(visual) -> bool:
    """True for Qwen2.5-VL's tower (window attention, tokens permuted by window); Qwen3-VL's and Qwen3.5's
    towers attend fully in every block, in merged raster order."""
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


def _layout(grid: list[list[int]], merge: int):
    """Host-side provenance from the (t, h, w) list: unit, patch, grids, sizes, segment bounds (patches)."""
    units, patches, grids, sizes, bounds = [], [], [], [], [0]
    n_units = 0
    for t, h, w in grid:
        rows, cols = h // merge, w // merge
        n = rows * cols
        units.append(torch.arange(n_units, n_units + t).repeat_interleave(n))
        patches.append(torch.arange(n).repeat(t))
        grids += [(rows, cols)] * t
        sizes.append(t * n)
        for _ in range(t):
            bounds.append(bounds[-1] + h * w)
        n_units += t
    return torch.cat(units), torch.cat(patches), grids, sizes, bounds


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


@torch.no_grad()
def encode(model, pixel_values: torch.Tensor, grid_thw: torch.Tensor, *, want_attn: bool,
           layer: int | None = None, saliency: str = "received", video: bool = False,
           chunk: int = 1024) -> QwenVisual:
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
    """
    if saliency not in SALIENCY_KINDS:
        raise ValueError(f"unknown saliency {saliency!r}; expected one of {SALIENCY_KINDS}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    visual = model.model.visual
    layer = _resolve_layer(visual, layer)
    merge = int(visual.spatial_merge_size)
    unit_sq = merge * merge

    grid = [[int(v) for v in row] for row in grid_thw.tolist()]                # the one host read
    for t, h, w in grid:
        if h % merge or w % merge:
            raise ValueError(f"grid (t={t}, h={h}, w={w}) is not divisible by spatial_merge_size={merge}")
    unit, patch, grids, sizes, bounds = _layout(grid, merge)
    qwen3 = is_qwen3(visual)
    if not is_windowed(visual):  # Qwen3-VL / Qwen3.5: merged raster order throughout
        window_index = torch.arange(int(unit.numel()))
    else:
        window_index, _ = get_vision_window_index(torch.tensor(grid, dtype=torch.long), spatial_merge_size=merge,
                                                  window_size=visual.window_size, patch_size=visual.patch_size)

    captured: dict = {}

    def grab_attn(module, args, kwargs):
        captured["x"] = args[0] if args else kwargs["hidden_states"]
        captured["pos"] = kwargs["position_embeddings"]
        captured["cu"] = kwargs["cu_seqlens"]

    def grab_ln_q(module, args, output):
        captured["ln_q"] = output

    merger_norm = visual.merger.ln_q if hasattr(visual.merger, "ln_q") else visual.merger.norm  # Qwen3-VL / 3.5: norm
    handles = [merger_norm.register_forward_hook(grab_ln_q)]
    if want_attn:
        handles.append(visual.blocks[layer].attn.register_forward_pre_hook(grab_attn, with_kwargs=True))
    try:
        if video:
            out = model.model.get_video_features(pixel_values, grid_thw)
        else:
            out = model.model.get_image_features(pixel_values, grid_thw)
    finally:
        for handle in handles:
            handle.remove()

    features = torch.cat(out.pooler_output)
    device = features.device
    reverse = torch.argsort(window_index).to(device)
    ln_q = captured["ln_q"]
    vision_features = ln_q.reshape(-1, unit_sq * ln_q.shape[-1])[reverse]

    sal = keys = None
    if want_attn:
        x, attn = captured["x"], visual.blocks[layer].attn
        if captured["cu"].shape[0] != len(bounds):
            raise RuntimeError(f"tower used {captured['cu'].shape[0] - 1} attention segments at block {layer}, "
                               f"expected {len(bounds) - 1} from grid_thw")
        n = x.shape[0]
        q, k, _ = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)   # (N, H, d)
        keys = k.float().mean(1).reshape(-1, unit_sq, k.shape[-1]).mean(1)[reverse]
        cos, sin = captured["pos"]
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k = q.float().transpose(0, 1), k.float().transpose(0, 1)                            # (H, N, d)
        if saliency == "received":
            per_patch = _received(q, k, bounds, attn.scaling, chunk)
        else:
            per_patch = _pooled_query(q, k, bounds, attn.scaling)
        sal = per_patch.reshape(per_patch.shape[0], -1, unit_sq).sum(-1)[:, reverse]

    deepstack = None
    if qwen3:  # (T, L, D): every level's rows, images concatenated as the features are
        deepstack = torch.stack([torch.cat(level) for level in out.deepstack_features], dim=1)
    return QwenVisual(features=features, vision_features=vision_features, saliency=sal, keys=keys,
                      unit=unit, patch=patch, grids=grids, sizes=sizes, deepstack=deepstack)
