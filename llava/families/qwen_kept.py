"""The Qwen towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) at a pre-tower stage (``docs/architecture.md``, "Pre-tower
stage"): each image's tokens as pixels for the method (:func:`token_pixels`), and the tower's run over the kept tokens'
patches only (:func:`kept_tower_inputs`, handed to :func:`llava.families.qwen_vision.encode`)."""

from __future__ import annotations

import torch
from transformers.vision_utils import get_vision_window_index

from .qwen_vision import _frame_bounds, is_windowed


def token_pixels(pixel_values: torch.Tensor, grid: list, patch: int, temporal: int, merge: int, norm: tuple) -> list:
    """A pre-tower stage's signals (:class:`llava.tower_signals.PixelSignals`), one per image of the (t, h, w) list ``grid``
    (images: t == 1), from the processor's patch rows ``pixel_values`` (sum h*w, 3 * temporal * patch^2; per patch
    (channel, frame, row, col), the 4 patches of a merged token consecutive): per merged token its 4 patches' first
    frame, the per-channel normalisation ``norm`` = (mean, std) undone (fp32, [0, 1]), flattened (4 * 3 * patch^2)."""
    from ..tower_signals import PixelSignals

    dev = pixel_values.device
    mean, std = (torch.tensor(v, dtype=torch.float32, device=dev)[:, None, None] for v in norm)
    x = pixel_values.float().reshape(-1, len(norm[0]), temporal, patch, patch)[:, :, 0] * std + mean
    x = x.reshape(-1, merge * merge * x[0].numel())  # (N / merge^2, P): merged tokens in raster order
    out, start = [], 0
    for i, (t, h, w) in enumerate(grid):
        if t != 1:
            raise ValueError(f"a pre-tower stage reads images (one temporal patch), not t={t}")
        n = h * w // (merge * merge)
        out.append(PixelSignals(x[start:start + n], (h // merge, w // merge), unit=i))
        start += n
    return out


def kept_tower_inputs(visual, grid: list, kept: torch.Tensor, dev) -> tuple[torch.Tensor, dict, list, torch.Tensor]:
    """The tower's run over the merged tokens ``kept`` only (host, ascending over the call's merged tokens) of the
    images / videos of the (t, h, w) list ``grid``: the patch rows to run (device), the precomputed keyword inputs the
    stock tower takes instead of computing them from ``grid_thw`` (transformers' ``vision_utils``: each patch's rotary
    (h, w) and learned-table resampling gathered from the full grid, so a kept patch has exactly its stock position;
    the attention segments recounted over the kept patches; Qwen2.5-VL's windows, defined on the full grid, with only
    their kept tokens, empty ones dropped), the segments' bounds (patch rows) and the tower order -> kept order."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

    merge = int(visual.spatial_merge_size)
    sq = merge * merge
    g = torch.tensor(grid, dtype=torch.long).reshape(-1, 3)
    n_merged = int((g.prod(-1) // sq).sum())
    keep = torch.zeros(n_merged, dtype=torch.bool)
    keep[kept] = True
    rows = (kept[:, None] * sq + torch.arange(sq)).reshape(-1)  # whole merged tokens: their sq patch rows
    kw = {"position_ids": get_vision_position_ids(g, merge)[rows]}
    if getattr(visual, "pos_embed", None) is not None:  # Qwen3-VL / Qwen3.5: the learned table, resampled per grid
        idx, w = get_vision_interpolation_indices_and_weights(
            g, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=merge)
        kw["interp_indices"], kw["interp_weights"] = idx[rows], w[rows]
    before = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(keep.long(), 0)])  # kept tokens before each
    seg = torch.tensor(_frame_bounds(grid)) // sq  # each segment (image / temporal slice) over the merged tokens
    bounds = before[seg] * sq  # ... over the kept patch rows
    kw["cu_seqlens"], kw["max_seqlen"] = bounds.to(torch.int32), int(torch.diff(bounds).max())
    reverse = torch.arange(kept.numel())
    if is_windowed(visual):  # the windows of the full grid, each with its kept tokens (in window order)
        index, cu = get_vision_window_index(g, spatial_merge_size=merge, window_size=visual.window_size,
                                            patch_size=visual.patch_size)
        in_window = keep[index]
        wc = torch.unique_consecutive(torch.cat([torch.zeros(1, dtype=torch.long),
                                                 torch.cumsum(in_window.long(), 0)])[cu.long() // sq] * sq)
        compact = before[index[in_window]]  # each kept token's row among the kept, in window order
        kw["window_index"], kw["cu_window_seqlens"] = compact, wc.to(torch.int32)
        kw["max_window_seqlen"] = int(torch.diff(wc).max())
        reverse = torch.argsort(compact)
    moved = dict(zip(kw, to_device_any(list(kw.values()), dev)))
    return rows, moved, bounds.tolist(), reverse


def to_device_any(values: list, dev) -> list:
    """Tensors moved to ``dev`` (their dtypes kept), Python values as they are."""
    return [v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for v in values]
