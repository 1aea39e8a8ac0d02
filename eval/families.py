"""What the harness knows of each model family once the model is loaded: which benchmarks and options it
takes, what results.json records of it (what a budget counts, the preprocessing actually applied), and how
its kept visual tokens are drawn over the image (the run's overlays)."""

from __future__ import annotations

from llava.families import registry


def anyres(family: str | None) -> bool:
    """Whether a results.json family lays an image out as LLaVA-NeXT's anyres crops (its ``next_layout`` is a
    choice); False for a family this install does not know."""
    f = registry.find(family) if family else None
    return f is not None and f.layout == "anyres"


def family_check(cfg, rt, questions: list) -> str | None:
    """Options and benchmarks the loaded model's family cannot take (known only once it is loaded: a hub
    id or a local folder names no family), as one error line; None when the run can go."""
    fam = rt.family
    rec = registry.get(fam)
    if any(q.modality == "video" for q in questions) and not rec.video:
        return (f"{cfg.benchmark} asks about videos, which the {fam} processor does not take "
                f"(video QA runs with: {', '.join(f.id for f in registry.families() if f.video)})")
    if (cfg.min_pixels is not None or cfg.max_pixels is not None) and not rec.qwen_grid:
        return (f"--min-pixels / --max-pixels apply to the Qwen-VL grid families only "
                f"({', '.join(f.id for f in registry.families() if f.qwen_grid)}), not to {cfg.model} ({fam})")
    if rec.chatml:
        if not cfg.pad_to_square:
            return f"--no-pad does not apply to {cfg.model} ({fam}: the checkpoint's own image processor, no pad-to-square)"
        if cfg.next_layout != "spatial_unpad":
            return f"--next-layout applies to LLaVA-NeXT only, not to {cfg.model} ({fam})"
    return None


def model_info(cfg, rt, dtype: str) -> dict:
    """What results.json records about the model: id, family (the registry's id), template, the preprocessing actually
    applied and what a budget counts (on a video benchmark the Qwen families, OneVision and InternVL record their frame
    count and video preprocessing too)."""
    from .benchmarks import BENCHMARKS

    video = getattr(BENCHMARKS.get(str(cfg.benchmark).lower().replace("-", "_")), "modality", None) == "video"
    vc = rt.model.config.vision_config
    rec = registry.get(rt.family)
    info = {"id": cfg.model, "name": rt.name, "family": rt.family, "dtype": dtype, "template": rt.template.name,
            "budget_unit": rec.budget_unit}
    if rec.qwen_grid:
        ip = rt.processor.image_processor
        size = getattr(ip, "size", None)
        lo = getattr(size, "shortest_edge", None) or getattr(ip, "min_pixels", None)  # transformers 5 keeps them in size
        hi = getattr(size, "longest_edge", None) or getattr(ip, "max_pixels", None)
        f = vc.patch_size * vc.spatial_merge_size
        info.update(preprocess="qwen smart_resize", min_pixels=None if lo is None else int(lo),
                    max_pixels=None if hi is None else int(hi), patch_size=vc.patch_size,
                    spatial_merge_size=vc.spatial_merge_size,
                    tokens_per_image=f"dynamic: (H/{f})*(W/{f}) after smart resize within [min_pixels, max_pixels]")
        if video:  # the frames the harness sampled (not re-sampled at the checkpoint's fps) and their processing
            info.update(num_frames=rt.processor.num_frames,
                        frame_sampling="harness: num_frames, linspace as Video-LLaVA",
                        video_preprocess=rt.processor.video_settings.as_dict())
        return info
    info.update(next_layout=rt.processor.next_layout, num_frames=rt.processor.num_frames,
                image_size=vc.image_size, patch_size=vc.patch_size)
    if rec.layout == "anyres":
        info["next_geometry"] = rt.info.get("next_geometry", "transformers")
    if rec.layout in ("tiles", "anyres_max"):
        if rec.layout == "tiles":
            ip = rt.processor.image_processor
            info.update(preprocess="dynamic tiling (crop_to_patches, thumbnail)", min_tiles=int(ip.min_patches),
                        max_tiles=int(ip.max_patches), tokens_per_tile=rt.processor.tokens_per_crop)
        else:
            info.update(preprocess=f"anyres ({getattr(rt.model.config, 'vision_aspect_ratio', 'anyres_max_9')})",
                        tokens_per_crop=rt.processor.tokens_per_crop)
        info.pop("next_layout")
        if video:  # each frame resized to the tower's square (not re-sampled at the checkpoint's own rule)
            info.update(frame_sampling="harness: num_frames, linspace as Video-LLaVA",
                        video_preprocess=rt.processor.video_settings.as_dict())
        else:
            info.pop("num_frames")
        return info
    info["preprocess"] = "pad" if rt.processor.pad_to_square else "crop"
    return info


def sample_overlay(rt, inputs, b: int, img, keep: list[int], video: bool, pad_to_square: bool):
    """The kept-token picture of sample ``b``'s unit 0 (the image; NeXT's / OneVision's base crop; a video's
    first frame) in its family's geometry."""
    from .overlay import grid_overlay, kept_overlay, view_mode

    vc = rt.model.config.vision_config
    rec = registry.get(rt.family)
    if rec.qwen_grid:  # merged tokens of the first image (a video's first slice) in raster order
        kind = 2 if video else 1
        thw = inputs["video_grid_thw" if video else "image_grid_thw"]
        first = int((inputs["mm_token_type_ids"][:b] == kind).any(-1).sum()) if b else 0  # earlier samples' inputs
        _, gh, gw = (int(x) for x in thw[first])
        m = vc.spatial_merge_size
        view = img.convert("RGB").resize((gw * vc.patch_size, gh * vc.patch_size), resample=3)
        rows, cols = gh // m, gw // m
        return grid_overlay(view, rows, cols, sorted({i for i in keep if 0 <= i < rows * cols}))
    if rec.layout == "tiles":  # the image's last tile is the whole image (the thumbnail, or the only tile)
        n = rt.processor.tokens_per_crop
        total = int((inputs["input_ids"][b] == rt.model.config.image_token_id).sum())
        first = 0 if video else total - n  # a video's first frame is its first tile
        side = vc.image_size[0]
        grid = int(round(n ** 0.5))
        view = img.convert("RGB").resize((side, side), resample=3)
        return grid_overlay(view, grid, grid, sorted({i - first for i in keep if first <= i < first + n}))
    if rec.layout == "anyres_max" and video:  # the first frame's pooled grid (ceil(g / 2) per side)
        g = -(-(vc.image_size // vc.patch_size) // 2)
        view = img.convert("RGB").resize((vc.image_size, vc.image_size), resample=3)
        return grid_overlay(view, g, g, sorted({i for i in keep if 0 <= i < g * g}))
    if rec.layout == "anyres_max":  # base crop: the whole image resized to the tower's square
        grid = vc.image_size // vc.patch_size
        n = rt.processor.tokens_per_crop
        shift = grid * grid - n  # 'default' drops the first token
        view = img.convert("RGB").resize((vc.image_size, vc.image_size), resample=3)
        return grid_overlay(view, grid, grid, sorted({i + shift for i in keep if 0 <= i < n}))
    grid = vc.image_size // vc.patch_size
    mode = view_mode(rt.family, video, pad_to_square)
    return kept_overlay(img, mode, grid, vc.image_size, keep, cls_first=video)
