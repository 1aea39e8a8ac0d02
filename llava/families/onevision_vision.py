"""Per-token vision signals for LLaVA-OneVision (transformers 5.23), one row per token the LLM sees.

The stock model turns images into LLM tokens in four steps (``LlavaOnevisionModel.get_image_features``
and ``pack_image_features``): the SigLIP tower runs once over every crop of every image (no [CLS];
``h x w`` = 27x27 = 729 patches per 384-px crop), the select-layer states go through the projector,
and each image is packed:

- several crops: the base crop (``h*w`` tokens, no newline), then the grid crops assembled into one
  ``(rows*h, cols*w)`` map, ``unpad_image`` (letterbox removal from ``image_sizes``), and, when
  ``ratio = sqrt(H*W / (9*h*h)) > 1.1`` ("anyres_max_9"), a **bilinear** ``F.interpolate`` down to
  ``(int(H // ratio), int(W // ratio))``; then one newline token after every row;
- one crop (every image of a multi-image sample, ``batch_num_images[b] > 1``): ``h*w`` + 1 newline.

Videos (``get_video_features``): every frame through the tower, projector, a 2x **bilinear** pool of
the ``h x w`` map to ``ceil(h/2) x ceil(w/2)`` (``apply_pooling``), frames concatenated, one newline
at the end of each video.

``features`` here is always the stock function's own output (bit-identical to what the stock forward
splices). Every other signal is a per-patch map of the same tower pass pushed through the same packing
operations: an integer index map (built by applying transformers' ``unpad_image`` to a grid of source
indices) where the packing only moves tokens, and the very same ``F.interpolate`` call (size, mode)
where it mixes them. Bilinear interpolation does not commute with the projector (an MLP with GELU), so
``project(vision_features)`` equals ``features`` only for tokens that are not interpolated / pooled.

Provenance of a mixed token (anyres_max_9 interpolation): ``unit`` / ``patch`` name the source patch
NEAREST to the token's sampling position. That position is obtained by interpolating a map of source
(row, col) coordinates with the same ``F.interpolate`` call (so border clamping is the library's) and
rounding each coordinate to the nearest integer (ties, up to 1e-6, toward the larger index: the
kernel's float error would otherwise split exact ties like 13.5 differently in different rows). For pooled video
tokens ``unit`` is the frame (exact: pooling never mixes frames) and ``patch`` the pooled-grid index.

Saliency: there is no [CLS] token, so a patch's saliency is the attention it RECEIVES, per head, at
the layer that produces the select-layer states, averaged over all queries of its own crop (each
crop's row sums to 1 per head before packing). Choice of layer: ``hidden_states[v]`` is the output of
encoder layer ``v - 1`` (``hidden_states[0]`` = embeddings), so for ``vision_feature_layer = v`` with
``n`` layers the attention comes from layer ``idx = (v % (n + 1)) - 1`` (the last layer for v = -1).
Its input is captured by a forward pre-hook and q / k are recomputed in fp32 from that layer's own
``layer_norm1`` + ``q_proj`` / ``k_proj`` and ``self_attn.scale``; the tower itself keeps its
attention implementation (SDPA / FlashAttention). For a list of feature layers the last one is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from .base import packed_units

#: rounding slack for the interpolated coordinates: the CPU bilinear kernel returns an exact tie
#: (13.5) as 13.4999999999999982 in some rows, so ties are resolved upward up to this tolerance
_TIE_EPS = 1e-6

#: elements of one fp32 attention block (crops x heads x queries x keys) computed at a time
_ATTN_CHUNK_ELEMS = 1 << 26


@dataclass
class OneVisionVisual:
    """Visual tokens of one ``encode_images`` / ``encode_videos`` call, in the stock splice order.
    ``T`` = tokens (all images / videos of the call), ``U`` = units (crops / frames of the call).

    features:        (T, D) ``torch.cat`` of the stock packed features (images), or the stock video
                     features flattened over videos (each video ends with its one newline);
                     bit-identical to what the stock forward splices, same dtype.
    vision_features: (T, Dv) select-layer tower states through the same packing (index map /
                     the same bilinear interpolation / the same video pooling); zero rows for newlines.
    saliency:        (H, T) fp32 attention received per patch within its crop (mean over the crop's
                     queries) at the layer producing the select-layer states, packed the same way;
                     0 for newlines. None unless ``want_attn``.
    keys:            (T, d) fp32 head-mean keys (after k_proj) of that layer, packed the same way;
                     0 for newlines. None unless ``want_attn``.
    unit:            (T,) long, CPU: unit id over the whole call (per image: base crop first, then
                     grid crops row-major; per video: its frames), -1 for newlines. Interpolated
                     tokens: the unit of the nearest source position (see the module docstring).
    patch:           (T,) long, CPU: patch index in its unit's grid (row-major; pooled-grid index
                     for video frames), -1 for newlines.
    unit_pos:        (U, 2) long, CPU: (row, col) of each grid crop in its image's crop grid;
                     (-1, -1) for base crops, single-crop images and video frames.
    unit_grid:       per unit, (rows, cols) of its patch grid (27x27 real crops, 14x14 pooled frames).
    sizes:           tokens per image (or per video) = its placeholder run length in the prompt.
    counts:          units per image (its crops) or per video (its frames).
    """

    features: torch.Tensor
    vision_features: torch.Tensor
    saliency: torch.Tensor | None
    keys: torch.Tensor | None
    unit: torch.Tensor
    patch: torch.Tensor
    unit_pos: torch.Tensor
    unit_grid: list[tuple[int, int]]
    sizes: list[int]
    counts: list[int]


def _core(model) -> torch.nn.Module:
    """The ``LlavaOnevisionModel`` of a ``...ForConditionalGeneration`` (or the model itself)."""
    return model if hasattr(model, "vision_tower") else model.model


def project(model, vision_features: torch.Tensor) -> torch.Tensor:
    """The stock ``multi_modal_projector`` applied to (n, Dv) tower rows -> (n, D)."""
    return _core(model).multi_modal_projector(vision_features)


# ---------------------------------------------------------------------------------------------
# Attention at the select layer


def attention_layer_index(vision_feature_layer: int | list[int], num_layers: int) -> int:
    """Encoder layer whose output is ``hidden_states[vision_feature_layer]`` (last entry of a list)."""
    v = vision_feature_layer[-1] if isinstance(vision_feature_layer, (list, tuple)) else vision_feature_layer
    idx = (v % (num_layers + 1)) - 1
    if idx < 0:
        raise ValueError(f"vision_feature_layer {v} selects the embeddings: no attention layer produces them")
    return idx


def _received_attention_and_keys(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From a layer's input x (N, P, Dv): attention received per key, mean over queries, per crop
    (N, Hh, P) fp32 (each (n, h) row sums to 1), and head-mean keys (N, P, d) fp32."""
    ln, attn = layer.layer_norm1, layer.self_attn
    y = F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)
    n, p, _ = y.shape
    heads = attn.num_heads
    q = F.linear(y, attn.q_proj.weight.float(), attn.q_proj.bias.float()).view(n, p, heads, -1).transpose(1, 2)
    k = F.linear(y, attn.k_proj.weight.float(), attn.k_proj.bias.float()).view(n, p, heads, -1).transpose(1, 2)
    received = torch.zeros(n, heads, p, dtype=torch.float32, device=x.device)
    crops_per_chunk = max(1, _ATTN_CHUNK_ELEMS // (heads * p * p))
    for c0 in range(0, n, crops_per_chunk):
        qc, kc = q[c0:c0 + crops_per_chunk], k[c0:c0 + crops_per_chunk]
        queries_per_chunk = max(1, _ATTN_CHUNK_ELEMS // (qc.shape[0] * heads * p))
        for q0 in range(0, p, queries_per_chunk):
            probs = torch.softmax(qc[:, :, q0:q0 + queries_per_chunk] @ kc.transpose(-1, -2) * attn.scale, dim=-1)
            received[c0:c0 + crops_per_chunk] += probs.sum(dim=2)
    return received / p, k.mean(dim=1)


class _LayerInput:
    """Forward pre-hook keeping the hidden states entering one encoder layer."""

    def __init__(self, layer: torch.nn.Module):
        self.value: torch.Tensor | None = None
        self.handle = layer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if self.value is not None:
            raise RuntimeError("the vision tower ran more than once in one encode call")
        self.value = (args[0] if args else kwargs["hidden_states"]).detach()


def _run(core, want_attn: bool, stock_call):
    """Run ``stock_call(v, strategy)`` (one tower pass) and collect the per-crop signals:
    (stock output, states (N, P, Dv), received (N, Hh, P) | None, keys (N, P, d) | None)."""
    cfg = core.config
    v, strategy = cfg.vision_feature_layer, cfg.vision_feature_select_strategy
    layers = core.vision_tower.encoder.layers
    layer = layers[attention_layer_index(v, len(layers))] if want_attn else None
    capture = _LayerInput(layer) if want_attn else None
    try:
        with torch.no_grad():
            out = stock_call(v, strategy)
            signals = _received_attention_and_keys(layer, capture.value) if want_attn else None
    finally:
        if capture is not None:
            capture.handle.remove()
    return (out, *_select(out.hidden_states, v, strategy, signals))


def _select(hidden_states, v, strategy: str, signals: tuple | None):
    """The select layer's states (N, P, Dv) from the tower's ``hidden_states`` (a list of layers: concatenated) and
    the attention signals (received, keys) or None, with the first token dropped for strategy "default" (the stock
    model drops [CLS] for CLIP towers). Returns (states, received | None, keys | None)."""
    states = hidden_states[v] if isinstance(v, int) else torch.cat([hidden_states[i] for i in v], dim=-1)
    received, keys = signals if signals is not None else (None, None)
    if strategy == "default":
        states = states[:, 1:]
        if signals is not None:
            received, keys = received[:, :, 1:], keys[:, 1:]
    return states, received, keys


# ---------------------------------------------------------------------------------------------
# Images


@dataclass
class _Interp:
    """One image packed through the anyres_max_9 interpolation."""
    first_crop: int             # first grid crop (its base crop is first_crop - 1)
    rows: int                   # crop grid
    cols: int
    image_size: list[int]       # (H, W) as given to unpad_image
    out_size: list[int]         # the F.interpolate size the stock packing uses


def _grid_map(per_crop: torch.Tensor, first: int, rows: int, cols: int, h: int, w: int) -> torch.Tensor:
    """(N, P, C) per-crop rows -> (C, rows*h, cols*w) map of one image's grid crops (row-major)."""
    c = per_crop.shape[-1]
    g = per_crop[first:first + rows * cols].reshape(rows, cols, h, w, c)
    return g.permute(4, 0, 2, 1, 3).reshape(c, rows * h, cols * w)


def _image_plan(cfg, image_sizes: list[list[int]], num_crops: list[int]):
    """Host-side layout of the packed tokens. Returns (index, interps, unit, patch, unit_pos,
    unit_grid, sizes); ``index`` addresses the table [crop rows (N*P) | interpolated rows of each
    ``interps`` image in order | one zero row] that ``_pack_images`` gathers from."""
    h = w = cfg.vision_config.image_size // cfg.vision_config.patch_size
    p = h * w
    max_crops = int((getattr(cfg, "vision_aspect_ratio", None) or "anyres_max_9").strip("anyres_max_"))
    n_crops = sum(num_crops)
    index, unit, patch, sizes, interps = [], [], [], [], []
    unit_pos = torch.full((n_crops, 2), -1, dtype=torch.long)
    patch_ids = torch.arange(p)
    newline = torch.full((1,), -1, dtype=torch.long)
    n_interp_rows, crop0 = 0, 0
    for size, k in zip(image_sizes, num_crops):
        # base crop (or the only crop)
        parts_idx = [crop0 * p + patch_ids]
        parts_unit = [torch.full((p,), crop0, dtype=torch.long)]
        parts_patch = [patch_ids]
        if k == 1:
            parts_idx.append(newline)
            parts_unit.append(newline)
            parts_patch.append(newline)
        else:
            rows, cols = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            first = crop0 + 1
            crop_ids = torch.arange(rows * cols)
            unit_pos[first:first + rows * cols] = torch.stack([crop_ids // cols, crop_ids % cols], dim=1)
            src = torch.arange(first * p, (first + rows * cols) * p).view(rows * cols, p, 1)
            src = unpad_image(_grid_map(src, 0, rows, cols, h, w), size)[0]  # (H, W) source rows
            height, width = src.shape
            ratio = math.sqrt(height * width / (max_crops * h**2))
            if ratio > 1.1:
                out_size = [int(height // ratio), int(width // ratio)]
                interps.append(_Interp(first, rows, cols, size, out_size))
                coords = torch.stack(torch.meshgrid(torch.arange(height, dtype=torch.float64),
                                                    torch.arange(width, dtype=torch.float64), indexing="ij"))
                mixed = F.interpolate(coords[None], out_size, mode="bilinear")[0]
                near = torch.floor(mixed + (0.5 + _TIE_EPS)).long()
                near_src = src[near[0], near[1]]  # (h', w') source row of the nearest position
                base = n_crops * p + n_interp_rows
                n_interp_rows += out_size[0] * out_size[1]
                grid_idx = torch.arange(base, base + out_size[0] * out_size[1]).view(out_size)
                src_for_layout = near_src
            else:
                grid_idx = src
                src_for_layout = src
            nl_col = torch.full((grid_idx.shape[0], 1), -1, dtype=torch.long)
            parts_idx.append(torch.cat([grid_idx, nl_col], dim=1).flatten())
            lay = torch.cat([src_for_layout, nl_col], dim=1).flatten()
            parts_unit.append(torch.where(lay >= 0, lay // p, -1))
            parts_patch.append(torch.where(lay >= 0, lay % p, -1))
        index.append(torch.cat(parts_idx))
        unit.append(torch.cat(parts_unit))
        patch.append(torch.cat(parts_patch))
        sizes.append(index[-1].numel())
        crop0 += k
    index = torch.cat(index)
    index = torch.where(index >= 0, index, n_crops * p + n_interp_rows)  # newline -> the zero row
    return index, interps, torch.cat(unit), torch.cat(patch), unit_pos, [(h, w)] * n_crops, sizes


def _pack_images(per_crop: torch.Tensor, index: torch.Tensor, interps: list[_Interp], h: int, w: int) -> torch.Tensor:
    """(N, P, C) per-crop signal -> (T, C) packed like the stock image features (zeros at newlines).
    ``index`` is on the signal's device."""
    c = per_crop.shape[-1]
    table = [per_crop.reshape(-1, c)]
    for it in interps:
        unpadded = unpad_image(_grid_map(per_crop, it.first_crop, it.rows, it.cols, h, w), it.image_size)
        mixed = F.interpolate(unpadded[None], it.out_size, mode="bilinear")[0]  # same call as the stock packing
        table.append(mixed.flatten(1, 2).transpose(0, 1))
    table.append(per_crop.new_zeros(1, c))
    return torch.cat(table).index_select(0, index)


def encode_images(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor, *,
                  batch_num_images: torch.Tensor | list[int] | None = None, want_attn: bool,
                  plan: tuple | None = None) -> OneVisionVisual:
    """Images of one call (``pixel_values`` (n, max_crops, 3, S, S) or stacked crops, ``image_sizes``
    (n, 2) as (H, W), ``batch_num_images`` as given to the stock forward) -> ``OneVisionVisual``.
    One tower pass over all crops (the stock ``get_image_features``); signals from that pass, packed as
    :func:`plan_images` lays them out (``plan``: its result when the caller made it already)."""
    core = _core(model)
    cfg = core.config
    if plan is None:
        sizes_host = image_sizes.tolist() if torch.is_tensor(image_sizes) else [list(s) for s in image_sizes]
        plan = plan_images(cfg, sizes_host, None, batch_num_images)
    out, states, received, keys = _run(core, want_attn, lambda v, s: core.get_image_features(
        pixel_values, image_sizes, vision_feature_layer=v, vision_feature_select_strategy=s,
        batch_num_images=batch_num_images, return_dict=True))
    tower, tensors, units = plan
    pack = _packer(tower, {"index": tensors["index"].to(states.device)})
    return _visual(torch.cat(out.pooler_output, dim=0), pack, states, received, keys, units)


def _visual(features, pack, states, received, keys, units) -> OneVisionVisual:
    """The :class:`OneVisionVisual` of one tower pass: the stock ``features``, the per-crop / per-frame signals packed
    by ``pack`` (:func:`_packer`; ``received`` / ``keys`` None without attention) and the host ``units``
    (:func:`llava.families.base.packed_units`)."""
    return OneVisionVisual(
        features=features,
        vision_features=pack(states),
        saliency=pack(received.transpose(1, 2)).transpose(0, 1).contiguous() if received is not None else None,
        keys=pack(keys) if keys is not None else None,
        unit=units.unit, patch=units.patch, unit_pos=units.unit_pos, unit_grid=list(units.grid),
        sizes=list(units.sizes), counts=list(units.counts))


# ---------------------------------------------------------------------------------------------
# Videos


def _pool_frames(per_frame: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(BF, P, C) -> (BF, P', C): the stock ``apply_pooling`` (2x bilinear) on any per-patch signal."""
    bf, _, c = per_frame.shape
    maps = per_frame.reshape(bf, h, w, c).permute(0, 3, 1, 2)
    pooled = F.interpolate(maps, size=[math.ceil(h / 2), math.ceil(w / 2)], mode="bilinear")
    return pooled.permute(0, 2, 3, 1).reshape(bf, -1, c)


def encode_videos(model, pixel_values_videos: torch.Tensor, *, want_attn: bool,
                  plan: tuple | None = None) -> OneVisionVisual:
    """Videos of one call (``pixel_values_videos`` (B, F, 3, S, S)) -> ``OneVisionVisual``: per video
    F * ceil(h/2) * ceil(w/2) pooled tokens then one newline. One tower pass over all frames (the
    stock ``get_video_features``); signals from that pass, pooled and packed as :func:`plan_videos` lays them out
    (``plan``: its result when the caller made it already)."""
    core = _core(model)
    if plan is None:
        plan = plan_videos(core.config, *pixel_values_videos.shape[:2])
    out, states, received, keys = _run(core, want_attn, lambda v, s: core.get_video_features(
        pixel_values_videos, vision_feature_layer=v, vision_feature_select_strategy=s, return_dict=True))
    tower, tensors, units = plan
    pack = _packer(tower, {"index": tensors["index"].to(states.device)})
    return _visual(out.pooler_output.flatten(0, 1), pack, states, received, keys, units)


# ---------------------------------------------------------------------------------------------
# The fast path (llava.fast.path): the same packing with every size planned on the host


def plan_images(cfg, image_sizes: list, max_crops: int | None, batch_num_images=None):
    """The host plan of images of ``image_sizes`` (H, W) each (``max_crops``: the padded crop count of
    ``pixel_values`` (n, max_crops, 3, S, S), None for stacked crops; ``batch_num_images`` as given to the stock
    forward: an image in a prompt of several gets its base crop only). Returns (the static tower plan: hashable,
    part of the graph key; its host tensors: ``crops`` the real crops' rows of the flattened input, ``index`` the
    packing gather of :func:`_pack_images`; the units of :class:`llava.families.base.VisualLayout`)."""
    if batch_num_images is None:
        patched = [True] * len(image_sizes)
    else:
        counts = batch_num_images.tolist() if torch.is_tensor(batch_num_images) else list(batch_num_images)
        patched = [n == 1 for n in counts for _ in range(n)]
    num_crops = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) if p else 1
                 for s, p in zip(image_sizes, patched)]
    index, interps, unit, patch, unit_pos, unit_grid, sizes = _image_plan(cfg, image_sizes, num_crops)
    step = max_crops if max_crops is not None else 0
    rows, at = [], 0
    for i, k in enumerate(num_crops):
        rows.append(torch.arange(k) + (i * step if max_crops is not None else at))
        at += k
    h, w = unit_grid[0]
    plan = ("images", tuple((it.first_crop, it.rows, it.cols, tuple(it.image_size), tuple(it.out_size))
                            for it in interps), h, w)
    return plan, {"crops": torch.cat(rows), "index": index}, packed_units(unit, patch, unit_grid, sizes, num_crops,
                                                                           unit_pos)


def _interps(plan: tuple) -> list[_Interp]:
    """The images a plan interpolates (:func:`plan_images`' plan), as :func:`_pack_images` takes them."""
    return [_Interp(a, r, c, list(size), list(o)) for a, r, c, size, o in plan]


def plan_videos(cfg, n_videos: int, n_frames: int):
    """The host plan of ``n_videos`` videos of ``n_frames`` frames, for both executors: per video its pooled frames'
    rows, then one newline (src -1); a unit per frame (its patches in the pooled frame grid)."""
    h = w = cfg.vision_config.image_size // cfg.vision_config.patch_size
    ph, pw = math.ceil(h / 2), math.ceil(w / 2)
    pp = ph * pw
    frame = torch.arange(n_frames).repeat_interleave(pp)
    unit = torch.cat([torch.cat([frame + v * n_frames, torch.full((1,), -1)]) for v in range(n_videos)])
    patch = torch.cat([torch.cat([torch.arange(pp).repeat(n_frames), torch.full((1,), -1)])] * n_videos)
    units = packed_units(unit, patch, [(ph, pw)] * (n_videos * n_frames), [n_frames * pp + 1] * n_videos,
                         [n_frames] * n_videos)
    index = torch.cat([torch.cat([torch.arange(n_frames * pp) + v * n_frames * pp,
                                  torch.full((1,), n_videos * n_frames * pp)]) for v in range(n_videos)])
    return ("videos", (), h, w), {"index": index}, units


def _packer(plan: tuple, tensors: dict):
    """The packing of a tower run's per-crop / per-frame rows (N, P, C) into the LLM's tokens (T, C) (zero rows at
    newlines), as the stock model packs its features: images by :func:`_pack_images`, videos pooled
    (:func:`_pool_frames`); ``plan`` / ``tensors`` from :func:`plan_images` / :func:`plan_videos` (``index`` on the
    rows' device). Both executors pack with it."""
    kind, interps, h, w = plan
    index = tensors["index"]
    if kind == "images":
        its = _interps(interps)
        return lambda per_crop: _pack_images(per_crop, index, its, h, w)

    def pack(per_frame):
        pooled = _pool_frames(per_frame, h, w)
        return torch.cat([pooled.reshape(-1, pooled.shape[-1]), pooled.new_zeros(1, pooled.shape[-1])]).index_select(
            0, index)
    return pack


def run_static(core, pixels: torch.Tensor, plan: tuple, tensors: dict, want_attn: bool) -> dict:
    """Inside the captured prefill: the tower over the planned crops / frames, the select layer, the projector and
    the stock packing (:func:`_pack_images` / :func:`_pool_frames`) with every size from ``plan``, no host read.
    Returns per packed token (newlines: zero rows, which the fast path replaces by ``image_newline``):
    ``features`` as the stock model splices them, ``vision_features``, with ``want_attn`` ``cls_attn`` (T, H) (the
    attention each patch receives, as :func:`encode_images`) and ``keys``."""
    cfg = core.config
    x = pixels.flatten(0, pixels.dim() - 4)
    if plan[0] == "images":
        x = x[tensors["crops"]]
    tower = core.vision_tower
    out = tower(x.to(tower.dtype), output_hidden_states=True, return_dict=True)
    v = cfg.vision_feature_layer
    signals = None
    if want_attn:  # the select layer's input is hidden_states[idx] (what the eager pre-hook captures)
        idx = attention_layer_index(v, len(tower.encoder.layers))
        signals = _received_attention_and_keys(tower.encoder.layers[idx], out.hidden_states[idx])
    states, received, keys = _select(out.hidden_states, v, cfg.vision_feature_select_strategy, signals)
    proj = core.multi_modal_projector(states)
    pack = _packer(plan, tensors)
    res = {"features": pack(proj), "vision_features": pack(states)}
    if want_attn:
        res["cls_attn"] = pack(received.transpose(1, 2))
        res["keys"] = pack(keys)
    return res
