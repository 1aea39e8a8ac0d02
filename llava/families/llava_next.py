"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres crops (base crop first) through the
CLIP tower, packed either as transformers does (``spatial_unpad``: the crop grid re-assembled,
unpadded, one ``image_newline`` per row) or as LLaVA's ``spatial`` (576 per crop, no newlines: the
papers' "2880 tokens"). Units are crops; newline tokens have unit -1. 1-D RoPE."""

from __future__ import annotations

import torch

from .base import VisualLayout, VisualUnits, join_units
from .clip import ClipAdapter, ClipRun, clip_units

NEXT_LAYOUTS = ("spatial_unpad", "spatial")


def next_token_layout(image_size, config, num_crops: int, tokens_per_crop: int, layout: str) -> torch.Tensor:
    """For one LLaVA-NeXT image: the source of each LLM-input token as an index into the image's
    crop-major token list (crop * tokens_per_crop + patch), or -1 for an ``image_newline`` token.

    ``spatial`` (LLaVA's ``mm_patch_merge_type = spatial``): the base crop, then the grid crops'
    tokens in row-major order over the full (rows x side) x (cols x side) patch grid; exactly
    crops * tokens_per_crop tokens, no newlines.
    ``spatial_unpad``: transformers' packing (base crop, then the grid re-assembled, unpadded,
    with one newline per row) - computed with transformers' own unpad function on index maps; with
    ``config.next_unpad == "official"`` (``load(next_geometry="official")``) the unpadded side is truncated as
    LLaVA's ``unpad_image`` does (``int(side * scale)``, :func:`unpad_official`), not rounded.
    """
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    if getattr(config, "next_unpad", "transformers") == "official":
        unpad_image = unpad_official  # noqa: F811

    side = int(round(tokens_per_crop ** 0.5))
    if side * side != tokens_per_crop:
        raise ValueError("LLaVA-NeXT layouts need a square patch grid per crop")
    base = torch.arange(tokens_per_crop)
    if num_crops == 1:
        return base if layout == "spatial" else torch.cat([base, torch.tensor([-1])])
    gh, gw = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, config.vision_config.image_size)
    if layout == "spatial":  # (gh, gw, side, side) -> (gh, side, gw, side): full-grid raster
        grid = torch.arange(tokens_per_crop, num_crops * tokens_per_crop).view(gh, gw, side, side)
        return torch.cat([base, grid.permute(0, 2, 1, 3).flatten()])
    grid = torch.arange(tokens_per_crop, num_crops * tokens_per_crop, dtype=torch.float64)
    grid = grid.view(gh, gw, side, side, 1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # (1, gh*side, gw*side)
    grid = unpad_image(grid, image_size)
    grid = torch.cat([grid, torch.full((1, grid.shape[1], 1), -1.0, dtype=grid.dtype)], dim=-1)
    return torch.cat([base, grid.flatten(1, 2).transpose(0, 1).flatten().long()])


#: ``load(next_geometry=...)``: "transformers" (llava-hf's processor and model: pinpoints read (height, width), the
#: unpadded side rounded) or "official" (LLaVA's code: pinpoints read (width, height), the side truncated)
NEXT_GEOMETRIES = ("transformers", "official")


def unpad_official(tensor: torch.Tensor, original_size) -> torch.Tensor:
    """LLaVA's ``unpad_image`` (``llava/model/llava_arch.py``) on a (C, H, W) map: ``original_size`` (height, width)
    as transformers passes it; the kept side is ``int(side * scale)`` (truncated; transformers rounds to 7 places
    first: 99 * 48 / 176 = 26.999999999999996 gives 26 here, 27 there), the padding ``(H - kept) // 2`` cut from both
    ends (26 -> 11 per end, 26 rows kept of 48; 27 -> 10, 28 rows)."""
    orig_h, orig_w = int(original_size[0]), int(original_size[1])
    cur_h, cur_w = tensor.shape[1:]
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(orig_h * (cur_w / orig_w))
        pad = (cur_h - new_h) // 2
        return tensor[:, pad:cur_h - pad, :]
    new_w = int(orig_w * (cur_h / orig_h))
    pad = (cur_w - new_w) // 2
    return tensor[:, :, pad:cur_w - pad]


class LlavaNextAdapter(ClipAdapter):
    def __init__(self, model, next_layout: str = "spatial_unpad", **options):
        super().__init__(model, **options)
        if next_layout not in NEXT_LAYOUTS:
            raise ValueError(f"next_layout must be one of {NEXT_LAYOUTS}, got {next_layout!r}")
        self.next_layout = next_layout

    def _units(self, sizes) -> VisualUnits:
        """The host layout of images of ``sizes`` (H, W) each, for both executors: the base crop then the grid crops
        packed by :func:`next_token_layout` (each token's row among the crop-major tower tokens, -1 for a newline),
        the grid crops' positions in their crop grid ((-1, -1) for the base crop)."""
        from transformers.models.llava_next.modeling_llava_next import (get_anyres_image_grid_shape,
                                                                         image_size_to_num_patches)

        cfg = self.config
        vc = cfg.vision_config
        drop = cfg.vision_feature_select_strategy == "default"
        items = []
        for size in sizes:
            size = tuple(int(v) for v in size)
            c = image_size_to_num_patches(image_size=size, grid_pinpoints=cfg.image_grid_pinpoints,
                                          patch_size=vc.image_size)
            pos = [[-1, -1]]
            if c > 1:
                gh, gw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, vc.image_size)
                pos += [[i // gw, i % gw] for i in range(c - 1)]
            crops = clip_units(vc, 1, c, drop)  # the crop-major tower tokens, crop by crop
            idx = next_token_layout(size, cfg, c, crops.sizes[0] // c, self.next_layout)
            at, ok = idx.clamp(min=0), idx >= 0
            items.append(VisualUnits(idx, torch.where(ok, crops.unit[at], -1), torch.where(ok, crops.patch[at], -1),
                                     torch.tensor(pos, dtype=torch.long), crops.grid, (int(idx.numel()),), (c,),
                                     crops.rows))
        return join_units(items)

    def layout(self, visual):
        if visual.get("pixel_values_videos") is not None:
            raise ValueError(f"{self.family} does not take pixel_values_videos")
        px, sizes = visual.get("pixel_values"), visual.get("image_sizes")
        if px is None:
            return []
        if sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes")
        units = self._units(sizes.tolist() if torch.is_tensor(sizes) else sizes)  # host metadata (the processor's)
        crops = px.dim() == 5  # (B, crops, 3, H, W): each image's real crops are its first ones
        rows = torch.cat([b * px.shape[1] + torch.arange(c) for b, c in enumerate(units.counts)]) if crops else None
        drop = self.config.vision_feature_select_strategy == "default"
        return [VisualLayout("pixel_values", self.config.image_token_id, "crop", drop, units,
                             tower=ClipRun("pixel_values", "crop", drop, crops=crops),
                             tower_tensors={"crops": rows} if crops else None)]

    def visual_layout(self, visual, batch, input_ids=None):
        px, sizes = visual.get("pixel_values"), visual.get("image_sizes")
        if visual.get("pixel_values_videos") is None and (px is None or sizes is None or len(sizes) != batch
                                                          or px.dim() != 5 or px.shape[0] != batch):
            raise ValueError("the fast path takes exactly one image per prompt (pixel_values (B, crops, 3, H, W) "
                             "and image_sizes)")
        return self.layout(visual)[0]

    def newline(self):
        return self.core.image_newline  # fed where the layout has a newline token (spatial_unpad's rows)
