"""What the harness knows of each model family once the model is loaded: which benchmarks and options it
takes, what results.json records of it (what a budget counts, the preprocessing actually applied), and how
its kept visual tokens are drawn over the image (the run's overlays)."""

from __future__ import annotations

#: families whose processor reads videos (Video-LLaVA; the Qwen-VL families: llava/preprocess_qwen_video.py;
#: OneVision and InternVL: llava/preprocess_ov_internvl_video.py); the others answer image / text benchmarks only
VIDEO_FAMILIES = ("video_llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "llava_onevision", "internvl")
#: the ChatML families (Qwen2.5-VL, LLaVA-OneVision): their own preprocessing, no pad-to-square / NeXT layout options
CHATML_FAMILIES = ("qwen2_5_vl", "llava_onevision", "qwen3_vl", "internvl", "qwen3_5", "qwen2_vl")
#: the Qwen-VL families (smart resize within [min_pixels, max_pixels], merged 2x2 tokens over a dynamic grid)
QWEN_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen2_vl")
#: what a visual-token budget counts, per family (per-unit methods; docs/methods/README.md's table for each method's convention)
BUDGET_UNITS = {
    "llava": "visual tokens per image (576 for LLaVA-1.5 at 336 px)",
    "llava_next": "visual tokens per crop (anyres: base crop + grid crops, per-unit methods)",
    "video_llava": "visual tokens per image / video frame",
    "qwen2_5_vl": "merged visual tokens per image after the PatchMerger (dynamic grid: (H/28)*(W/28) after "
                  "smart resize within [min_pixels, max_pixels]; a video: per temporal slice of 2 frames)",
    "qwen2_vl": "merged visual tokens per image after the PatchMerger (dynamic grid: (H/28)*(W/28) after smart "
                "resize within [min_pixels, max_pixels]; a video: per temporal slice of 2 frames)",
    "llava_onevision": "visual tokens per crop (anyres_max_9: base crop + grid crops, per-unit methods; a video: per "
                       "frame, 196 pooled tokens each at 384 px, + one newline per video)",
    "qwen3_vl": "merged visual tokens per image after the merger (dynamic grid: (H/(2p))*(W/(2p)) after smart "
                "resize, p the patch size; each token's DeepStack rows follow it; a video: per temporal slice of 2 "
                "frames)",
    "qwen3_5": "merged visual tokens per image after the merger (dynamic grid as Qwen3-VL; a video: per temporal "
               "slice of 2 frames; hybrid LLM: in-LLM stages only where they read a full-attention layer)",
    "internvl": "visual tokens per tile (dynamic tiling: up to 12 tiles of 448 px + a thumbnail, 256 tokens each "
                "after the 2x2 pixel shuffle; per-unit methods; a video: per frame, one tile each)",
}


def family_check(cfg, rt, questions: list) -> str | None:
    """Options and benchmarks the loaded model's family cannot take (known only once it is loaded: a hub
    id or a local folder names no family), as one error line; None when the run can go."""
    fam = rt.family
    if any(q.modality == "video" for q in questions) and fam not in VIDEO_FAMILIES:
        return (f"{cfg.benchmark} asks about videos, which the {fam} processor does not take "
                f"(video QA runs with: {', '.join(VIDEO_FAMILIES)})")
    if (cfg.min_pixels is not None or cfg.max_pixels is not None) and fam not in QWEN_FAMILIES:
        return f"--min-pixels / --max-pixels apply to Qwen2.5-VL / Qwen3-VL only, not to {cfg.model} ({fam})"
    if fam in CHATML_FAMILIES:
        if not cfg.pad_to_square:
            return f"--no-pad does not apply to {cfg.model} ({fam}: the checkpoint's own image processor, no pad-to-square)"
        if cfg.next_layout != "spatial_unpad":
            return f"--next-layout applies to LLaVA-NeXT only, not to {cfg.model} ({fam})"
    return None


def model_info(cfg, rt, dtype: str) -> dict:
    """What results.json records about the model: id, family (``llava`` / ``llava_next`` / ``video_llava`` /
    ``qwen2_5_vl`` / ``llava_onevision``), template, the preprocessing actually applied and what a budget counts
    (on a video benchmark the Qwen families, OneVision and InternVL record their frame count and video preprocessing
    too)."""
    from .benchmarks import BENCHMARKS

    video = getattr(BENCHMARKS.get(str(cfg.benchmark).lower().replace("-", "_")), "modality", None) == "video"
    vc = rt.model.config.vision_config
    info = {"id": cfg.model, "name": rt.name, "family": rt.family, "dtype": dtype, "template": rt.template.name,
            "budget_unit": BUDGET_UNITS.get(rt.family, "visual tokens (method convention)")}
    if rt.family in QWEN_FAMILIES:
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
    if rt.family == "llava_next":
        info["next_geometry"] = rt.info.get("next_geometry", "transformers")
    if rt.family in ("internvl", "llava_onevision"):
        if rt.family == "internvl":
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
    if rt.family in QWEN_FAMILIES:  # merged tokens of the first image (a video's first slice) in raster order
        kind = 2 if video else 1
        thw = inputs["video_grid_thw" if video else "image_grid_thw"]
        first = int((inputs["mm_token_type_ids"][:b] == kind).any(-1).sum()) if b else 0  # earlier samples' inputs
        _, gh, gw = (int(x) for x in thw[first])
        m = vc.spatial_merge_size
        view = img.convert("RGB").resize((gw * vc.patch_size, gh * vc.patch_size), resample=3)
        rows, cols = gh // m, gw // m
        return grid_overlay(view, rows, cols, sorted({i for i in keep if 0 <= i < rows * cols}))
    if rt.family == "internvl":  # the image's last tile is the whole image (the thumbnail, or the only tile)
        n = rt.processor.tokens_per_crop
        total = int((inputs["input_ids"][b] == rt.model.config.image_token_id).sum())
        first = 0 if video else total - n  # a video's first frame is its first tile
        side = vc.image_size[0]
        grid = int(round(n ** 0.5))
        view = img.convert("RGB").resize((side, side), resample=3)
        return grid_overlay(view, grid, grid, sorted({i - first for i in keep if first <= i < first + n}))
    if rt.family == "llava_onevision" and video:  # the first frame's pooled grid (ceil(g / 2) per side)
        g = -(-(vc.image_size // vc.patch_size) // 2)
        view = img.convert("RGB").resize((vc.image_size, vc.image_size), resample=3)
        return grid_overlay(view, g, g, sorted({i for i in keep if 0 <= i < g * g}))
    if rt.family == "llava_onevision":  # base crop: the whole image resized to the tower's square
        grid = vc.image_size // vc.patch_size
        n = rt.processor.tokens_per_crop
        shift = grid * grid - n  # 'default' drops the first token
        view = img.convert("RGB").resize((vc.image_size, vc.image_size), resample=3)
        return grid_overlay(view, grid, grid, sorted({i + shift for i in keep if 0 <= i < n}))
    grid = vc.image_size // vc.patch_size
    mode = view_mode(rt.family, video, pad_to_square)
    return kept_overlay(img, mode, grid, vc.image_size, keep, cls_first=video)
