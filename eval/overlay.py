"""Kept-token overlay: the preprocessed image with the patches a vision-stage selection dropped
dimmed, for the first unit (the image; LLaVA-NeXT's base crop; Video-LLaVA's first frame)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from llava.preprocess import CLIP_MEAN, expand2square


def unit0_patches(grid: int, keep: list[int], cls_first: bool = False) -> list[int]:
    """Patch indices (row-major in the unit's grid) of unit 0 that survive, from flat-block indices.

    Flat block layout (llava.engine): images (LLaVA-1.5, Video-LLaVA images) and LLaVA-NeXT (base
    crop first) start with unit 0's grid x grid patch tokens ([CLS] dropped); Video-LLaVA video
    frames keep [CLS] first, so frame 0 is tokens 0..grid^2 with the patches at 1..grid^2."""
    n = grid * grid
    if cls_first:
        return sorted({i - 1 for i in keep if 1 <= i <= n})
    return sorted({i for i in keep if 0 <= i < n})


def view_mode(family: str, video: bool, pad_to_square: bool) -> str:
    """How the processor turned the input into unit 0: 'pad' (pad to square, LLaVA-1.5 / Video-LLaVA
    images), 'crop' (shortest-edge resize + centre crop: video frames, --no-pad), 'squash'
    (LLaVA-NeXT base crop: the whole image resized)."""
    if video:
        return "crop"
    from llava.families import registry

    if registry.get(family).layout == "anyres":
        return "squash"
    return "pad" if pad_to_square else "crop"


def base_view(image: Image.Image, mode: str, size: int) -> Image.Image:
    """The unit-0 view as the vision tower saw it (up to normalisation)."""
    img = image.convert("RGB")
    if mode == "pad":
        img = expand2square(img, tuple(int(x * 255) for x in CLIP_MEAN))
    elif mode == "crop":
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.resize((size, size), Image.BICUBIC)


def grid_overlay(view: Image.Image, rows: int, cols: int, kept: list[int], display: int = 336,
                 dim: float = 0.25) -> Image.Image:
    """``view`` (the unit as the tower saw it) on a ``rows`` x ``cols`` token grid, the longer side ``display``
    px, with the cells not in ``kept`` (row-major cell indices) darkened to ``dim`` (Qwen2.5-VL's
    dynamic grids, OneVision's base crop)."""
    cell = max(display // max(rows, cols), 1)
    view = view.convert("RGB").resize((cols * cell, rows * cell), Image.BICUBIC)
    mask = np.full((rows, cols), dim, dtype=np.float32)
    for p in kept:
        mask[p // cols, p % cols] = 1.0
    mask = np.kron(mask, np.ones((cell, cell), dtype=np.float32))
    out = (np.asarray(view).astype(np.float32) * mask[..., None]).clip(0, 255).astype(np.uint8)
    return Image.fromarray(out)


def kept_overlay(image: Image.Image, mode: str, grid: int, image_size: int, keep: list[int], cls_first: bool = False,
                 display: int = 336, dim: float = 0.25) -> Image.Image:
    """The base view (resized to ``display`` px) with dropped patches darkened to ``dim``."""
    view = base_view(image, mode, image_size)
    side = max(display // grid, 1) * grid
    view = view.resize((side, side), Image.BICUBIC)
    arr = np.asarray(view).astype(np.float32)
    mask = np.full((grid, grid), dim, dtype=np.float32)
    for p in unit0_patches(grid, keep, cls_first):
        mask[p // grid, p % grid] = 1.0
    cell = side // grid
    mask = np.kron(mask, np.ones((cell, cell), dtype=np.float32))
    out = (arr * mask[..., None]).clip(0, 255).astype(np.uint8)
    return Image.fromarray(out)
