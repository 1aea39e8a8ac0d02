"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 video inputs without torchvision: what transformers 5.23's
``Qwen2VLVideoProcessor`` / ``Qwen3VLVideoProcessor`` and the ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor``
placeholder expansion produce, rebuilt from numpy and torch (transformers' video processors need torchvision, an
optional extra here). tests/test_qwen_video_processor.py checks it against the real processors' outputs recorded
with torchvision installed (tests/fixtures/qwen_video/).

Per video (a list of RGB frames, all of one size; the frames handed over are the frames the model sees: they
are not re-sampled here):

* **size**: Qwen's smart resize to multiples of ``patch_size * merge_size``. Qwen2-VL / Qwen2.5-VL (``rule="qwen2_vl"``): each
  frame's area within [min_pixels, max_pixels]. Qwen3-VL / Qwen3.5 (``rule="qwen3_vl"``): the clip's area (frames
  rounded to the temporal patch x frame area) within them, frames under one factor scaled up first, and a clip of
  fewer frames than the temporal patch refused (as transformers does). ``cap_pixels_per_frame`` (qwen-vl-utils'
  budget) as transformers applies it.
* **resampling**: bicubic with antialiasing on uint8 frames by ``torch.nn.functional.interpolate`` on the CPU,
  the call torchvision's ``resize`` makes for uint8 bicubic on a CPU (so the bytes are torchvision's; PIL's own
  BICUBIC differs by up to a few levels, and by up to 12 where one side shrinks and the other grows).
* **normalisation**: float32 ``(v - mean * 255) / (std * 255)`` (rescale fused into normalise, as transformers).
* **temporal patch**: an odd frame count is padded by repeating the last frame; ``video_grid_thw`` = (frames / 2,
  H / patch, W / patch); ``pixel_values_videos`` rows in merge-block order (each 2x2 block's patches consecutive),
  columns (channel, frame of the pair, patch row, patch column): the layout the towers read.
* **placeholder**: Qwen2.5-VL: one ``<|video_pad|>`` run of t*h*w/4 tokens (the template's
  ``<|vision_start|>`` / ``<|vision_end|>`` around it); ``second_per_grid_ts`` = 2 / the sampled frames' rate
  (the M-RoPE time axis); Qwen2-VL: the same run, no ``second_per_grid_ts`` (its M-RoPE time axis counts slices,
  and transformers' ``Qwen2VLProcessor`` does not emit it). Qwen3-VL: per temporal slice ``<{t:.1f} seconds>`` (the mean time of its two frames)
  + ``<|vision_start|>`` + h*w/4 ``<|video_pad|>`` + ``<|vision_end|>``, all inside the template's own
  vision_start / vision_end (as transformers expands it).

Timing comes from :class:`Frames` (a list of frames with the source's fps, frame count and the sampled indices;
``llava.preprocess_video_files.decode_video`` returns one); for bare frames it is transformers' default: indices 0..n-1 at
24 fps.

Settings (:class:`VideoSettings`, ``rt.processor.video_settings``, replaceable): a checkpoint's own video
processor config (``processor_config.json`` -> ``video_preprocessor_config.json`` -> ``preprocessor_config.json``,
transformers' order); a model built here (``tiny:`` / ``shape:``) gets the released checkpoints' values with its
own tower's patch sizes: Qwen2.5-VL 3136..12845056 pixels per frame and CLIP mean / std (the checkpoints have no
video config: transformers reads ``preprocessor_config.json``); Qwen3-VL and Qwen3.5 4096..25165824 pixels per
clip and mean / std 0.5 (Qwen3-VL's ``video_preprocessor_config.json``). ``load(min_pixels=, max_pixels=)``
bound images only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .video_config import checkpoint_video_config

CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
BICUBIC = 3  # PIL.Image.BICUBIC, the video processors' resample
#: transformers' class defaults per rule (Qwen2VLVideoProcessor, Qwen3VLVideoProcessor): a checkpoint's config
#: overrides them key by key
CLASS_DEFAULTS = {
    "qwen2_vl": dict(min_pixels=128 * 28 * 28, max_pixels=28 * 28 * 768, patch_size=14, image_mean=CLIP_MEAN_STD[0],
                     image_std=CLIP_MEAN_STD[1], max_video_tokens=128000),
    "qwen3_vl": dict(min_pixels=128 * 32 * 32, max_pixels=32 * 32 * 768, patch_size=16, image_mean=HALF_MEAN_STD[0],
                     image_std=HALF_MEAN_STD[1], max_video_tokens=768),
}
#: the released checkpoints' video settings, for the models built here: Qwen2.5-VL-*-Instruct's
#: preprocessor_config.json (min / max_pixels, read by the video processor too), Qwen3-VL-*-Instruct's
#: video_preprocessor_config.json (size over the whole clip)
RELEASED = {"qwen2_vl": dict(min_pixels=3136, max_pixels=12845056),
            "qwen3_vl": dict(min_pixels=4096, max_pixels=25165824)}
#: a family record's ``video`` -> its rule (llava.families.registry): Qwen2-VL / Qwen2.5-VL read videos as Qwen2-VL's
#: processor, Qwen3-VL / Qwen3.5 as Qwen3-VL's
VIDEO_RULES = {"qwen2": "qwen2_vl", "qwen3": "qwen3_vl"}
#: a family's M-RoPE time axis reads ``second_per_grid_ts`` where its record says ``video_seconds`` (Qwen2-VL's
#: ``get_rope_index`` has none: its processor does not emit it)


def video_rule(family: str) -> str:
    from .families import registry

    f = registry.find(family)
    if f is None or f.video not in VIDEO_RULES:
        qwen = ", ".join(f.id for f in registry.families() if f.video in VIDEO_RULES)
        raise ValueError(f"{family}: no Qwen video processing (families: {qwen})")
    return VIDEO_RULES[f.video]


class Frames(list):
    """A video as a list of frames (PIL images or image paths) with what is known of its timing: the source's
    ``fps``, its ``total_num_frames`` and the ``frames_indices`` the frames were taken at (transformers'
    ``VideoMetadata``). Qwen3-VL writes each temporal slice's time into the prompt from them; Qwen2.5-VL spaces
    its M-RoPE time axis by them. Unknown fields: transformers' defaults (indices 0..n-1, 24 fps)."""

    def __init__(self, frames=(), fps: float | None = None, total_num_frames: int | None = None,
                 frames_indices=None):
        super().__init__(frames)
        if fps is not None and not fps > 0:
            raise ValueError(f"video fps must be > 0, got {fps}")
        if frames_indices is not None and len(frames_indices) != len(self):
            raise ValueError(f"{len(frames_indices)} frame indices for {len(self)} frames")
        self.fps = None if fps is None else float(fps)
        self.total_num_frames = None if total_num_frames is None else int(total_num_frames)
        self.frames_indices = None if frames_indices is None else [int(i) for i in frames_indices]

    def timing(self) -> dict:
        return {"fps": self.fps, "total_num_frames": self.total_num_frames, "frames_indices": self.frames_indices}


@dataclass(frozen=True)
class VideoSettings:
    """One family's video preprocessing (see the module). ``rule``: "qwen2_vl" (Qwen2.5-VL) or "qwen3_vl"
    (Qwen3-VL, Qwen3.5); ``min_pixels`` / ``max_pixels``: per frame ("qwen2_vl") or per clip ("qwen3_vl")."""

    rule: str
    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple = CLIP_MEAN_STD[0]
    image_std: tuple = CLIP_MEAN_STD[1]
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = BICUBIC
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000
    default_fps: float = 24.0  # transformers' fps when a video's is unknown
    source: str = ""

    def __post_init__(self):
        if self.rule not in CLASS_DEFAULTS:
            raise ValueError(f"video rule must be one of {sorted(CLASS_DEFAULTS)}, got {self.rule!r}")
        if self.resample != BICUBIC:
            raise ValueError(f"video resample {self.resample}: only bicubic (3, the Qwen video processors') is "
                             "implemented without torchvision")
        if not 0 < self.min_pixels <= self.max_pixels or min(self.patch_size, self.temporal_patch_size,
                                                             self.merge_size) < 1:
            raise ValueError(f"bad video settings: min_pixels {self.min_pixels}, max_pixels {self.max_pixels}, "
                             f"patch {self.patch_size} x {self.temporal_patch_size}, merge {self.merge_size}")

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def settings_from_config(rule: str, config: dict, source: str = "") -> VideoSettings:
    """A checkpoint's video processor dict read as transformers' class for ``rule`` reads it (class defaults,
    then ``size`` {shortest_edge, longest_edge}; for Qwen2.5-VL ``min_pixels`` / ``max_pixels`` override it)."""
    kw = dict(CLASS_DEFAULTS[rule])
    size = config.get("size") or {}
    kw["min_pixels"] = size.get("shortest_edge", kw["min_pixels"])
    kw["max_pixels"] = size.get("longest_edge", kw["max_pixels"])
    if rule == "qwen2_vl":
        for key in ("min_pixels", "max_pixels"):
            if config.get(key) is not None:
                kw[key] = config[key]
    for key in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor", "do_resize", "do_rescale",
                "do_normalize", "resample", "cap_pixels_per_frame", "max_video_tokens"):
        if config.get(key) is not None:
            kw[key] = config[key]
    for key in ("image_mean", "image_std"):
        if config.get(key) is not None:
            v = config[key]
            kw[key] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
    kw["min_pixels"], kw["max_pixels"] = int(kw["min_pixels"]), int(kw["max_pixels"])
    return VideoSettings(rule=rule, source=source, **kw)


def resolve_settings(family: str, model_config) -> VideoSettings:
    """The video settings of a loaded model: its checkpoint's video processor config (hub id or local folder, at
    the commit the model was loaded from), or the released checkpoints' values for a model built here."""
    rule = video_rule(family)
    vc = model_config.vision_config
    found = checkpoint_video_config(model_config)
    if found:
        name, config = found
        s = settings_from_config(rule, config, source=f"{name}: the checkpoint's video processor config")
    else:
        s = VideoSettings(rule=rule, **{**CLASS_DEFAULTS[rule], **RELEASED[rule], "patch_size": vc.patch_size,
                                        "temporal_patch_size": vc.temporal_patch_size,
                                        "merge_size": vc.spatial_merge_size},
                          source="built model: the released checkpoints' video settings, the tower's patch sizes")
    tower = (vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size)
    if (s.patch_size, s.temporal_patch_size, s.merge_size) != tower:
        raise ValueError(f"{name or family}: the video processor's patch / temporal patch / merge sizes "
                         f"{(s.patch_size, s.temporal_patch_size, s.merge_size)} differ from the tower's {tower}")
    return s


# -- geometry ------------------------------------------------------------------------------------------------------
def _fit(height: int, width: int, factor: int, lo: int, hi: int, frames: int = 1, frames_rounded: int = 1):
    """Qwen's smart resize: sides that are multiples of ``factor``, the area (x ``frames_rounded`` for a clip)
    within [lo, hi], the aspect ratio kept as closely as the grid allows."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"video frames {height}x{width}: aspect ratio above 200 (Qwen's limit)")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if frames_rounded * h * w > hi:
        shrink = math.sqrt(frames * height * width / hi)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif frames_rounded * h * w < lo:
        grow = math.sqrt(lo / (frames * height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return h, w


def target_size(s: VideoSettings, frames: int, height: int, width: int) -> tuple[int, int]:
    """(H, W) every frame of a ``frames``-frame video of ``height`` x ``width`` is resized to."""
    factor, tp = s.patch_size * s.merge_size, s.temporal_patch_size
    lo, hi = s.min_pixels, s.max_pixels
    if s.rule == "qwen2_vl":
        if s.cap_pixels_per_frame:  # each frame's even share of a whole-video budget, floored
            budget = int(s.max_video_tokens * factor * factor * 0.9)
            hi = max(min(hi, budget * tp // frames), int(lo * 1.05))
        return _fit(height, width, factor, lo, hi)
    if frames < tp:
        raise ValueError(f"a Qwen3-VL video needs at least {tp} frames (its temporal patch), got {frames}")
    if s.cap_pixels_per_frame:  # per frame: at most max_video_tokens patches' worth or an even share, floored
        hi = max(min(s.max_video_tokens * factor * factor, hi // frames), int(lo * 1.05)) * frames
    if height < factor or width < factor:  # too small for one merged patch: scale up first
        up = max(factor / height, factor / width)
        height, width = int(height * up), int(width * up)
    return _fit(height, width, factor, lo, hi, frames=frames, frames_rounded=round(frames / tp) * tp)


# -- pixels --------------------------------------------------------------------------------------------------------
def frames_array(frames) -> np.ndarray:
    """(T, H, W, 3) uint8 of a list of RGB PIL images (or arrays) of one size."""
    arrs = [np.asarray(f) for f in frames]
    if not arrs:
        raise ValueError("empty video (no frames)")
    if any(a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8 for a in arrs):
        raise ValueError("video frames must be RGB images (uint8, 3 channels)")
    if len({a.shape for a in arrs}) != 1:
        raise ValueError(f"all frames of a video must have one size, got {sorted({a.shape[:2] for a in arrs})}")
    return np.stack(arrs)


def frames_to_float(frames: np.ndarray, size: tuple[int, int] | None, s) -> torch.Tensor:
    """(T, H, W, 3) uint8 frames -> (T, 3, h, w) float32 as transformers' video processors make them: resized to
    ``size`` (None: kept) with uint8 bicubic antialiasing (the call torchvision makes on a CPU, so the pixels are
    exact), then rescaled / normalised as the settings ``s`` say (``do_rescale``, ``rescale_factor``,
    ``do_normalize``, ``image_mean``, ``image_std``; rescale folded into the normalisation, as they do)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).contiguous()  # (T, 3, H, W) uint8
    if size is not None and tuple(size) != tuple(x.shape[-2:]):
        x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bicubic", align_corners=False, antialias=True)
    x = x.to(torch.float32)
    if s.do_normalize:
        scale = 1.0 / s.rescale_factor if s.do_rescale else 1.0
        mean = torch.tensor(s.image_mean, dtype=torch.float32, device=x.device) * scale
        std = torch.tensor(s.image_std, dtype=torch.float32, device=x.device) * scale
        x = (x - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    elif s.do_rescale:
        x = x * s.rescale_factor
    return x


def video_pixels(s: VideoSettings, frames: np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One video's ``pixel_values_videos`` rows (t*h*w, 3 * temporal * patch^2) float32 and its (t, h, w) grid."""
    n, height, width, _ = frames.shape
    x = frames_to_float(frames, target_size(s, n, height, width) if s.do_resize else None, s)
    p, tp, m = s.patch_size, s.temporal_patch_size, s.merge_size
    if x.shape[-2] % (p * m) or x.shape[-1] % (p * m):
        raise ValueError(f"video frames {tuple(x.shape[-2:])} are not multiples of patch x merge = {p * m} "
                         "(do_resize=False needs frames of such a size)")
    if n % tp:  # the last frame repeated up to a whole temporal patch
        x = torch.cat([x, x[-1:].expand(tp - n % tp, -1, -1, -1)])
    gt, gh, gw = x.shape[0] // tp, x.shape[-2] // p, x.shape[-1] // p
    x = x.reshape(gt, tp, 3, gh // m, m, p, gw // m, m, p)
    # rows: slice, merge-block row, merge-block column, row and column inside the block; columns: channel,
    # frame of the temporal patch, pixel row, pixel column (the Conv3d's kernel layout)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, 3 * tp * p * p), (gt, gh, gw)


def timing(video, n: int) -> tuple[list[int] | None, float | None, int | None]:
    """(frame indices, fps, source frame count) of a video of ``n`` frames as transformers' ``VideoMetadata``
    holds them: a :class:`Frames`' own (None where unknown), else the defaults for bare frames (0..n-1 of n, fps
    unknown)."""
    if not isinstance(video, Frames):
        return list(range(n)), None, n
    return video.frames_indices, video.fps, video.total_num_frames


def slice_times(s: VideoSettings, indices: list[int], fps: float | None) -> list[float]:
    """Qwen3-VL: each temporal slice's time in seconds, the mean of its first and last frame's (indices padded
    with the last one, as the frames are)."""
    fps = fps or s.default_fps
    tp = s.temporal_patch_size
    idx = list(indices) + [indices[-1]] * (-len(indices) % tp)
    secs = [i / fps for i in idx]
    return [(secs[k] + secs[k + tp - 1]) / 2 for k in range(0, len(secs), tp)]


def seconds_per_slice(s: VideoSettings, indices: list[int] | None, fps: float | None, total: int | None) -> float:
    """Qwen2.5-VL's ``second_per_grid_ts``: temporal patch / the sampled frames' rate (transformers'
    ``VideoMetadata.sampled_fps``: len(indices) / total * fps when all are known, else fps, else 24)."""
    if indices is None or total is None or fps is None:
        rate = fps or s.default_fps
    else:
        rate = len(indices) / total * fps
    return s.temporal_patch_size / rate


# -- prompts -------------------------------------------------------------------------------------------------------
class QwenVideoMixin:
    """Video inputs for the Qwen processors (``llava.preprocess.QwenVLProcessor``): the settings (resolved once,
    replaceable) and, per batch, the pixels and the token run each video's placeholder becomes."""

    video_placeholder = "<|video_pad|>"

    @property
    def video_settings(self) -> VideoSettings:
        s = self.extra.get("video_settings")
        if s is None:
            s = self.extra["video_settings"] = resolve_settings(self.family, self.model_config)
        return s

    @video_settings.setter
    def video_settings(self, s: VideoSettings) -> None:
        if not isinstance(s, VideoSettings):
            raise TypeError(f"video_settings must be a VideoSettings, got {type(s).__name__}")
        self.extra["video_settings"] = s

    def prompt_text(self, question: str, n_images: int = 1, video: bool = False) -> str:
        """The checkpoints' chat template's video item: ``<|vision_start|><|video_pad|><|vision_end|>`` before
        the question (the ``<|video_pad|>`` expanded later)."""
        if not video:
            return super().prompt_text(question, n_images)
        if n_images:
            raise ValueError("mixing images and a video in one prompt is not supported by the processor")
        return self.template.prompt(question, "<|vision_start|>" + self.video_placeholder + "<|vision_end|>")

    def _video_placeholder_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.video_placeholder)

    def _video_inputs(self, videos: list) -> tuple[dict, list]:
        """``videos``: per sample None or a list of RGB frames (a :class:`Frames` for its timing) -> (the batch's
        ``pixel_values_videos`` / ``video_grid_thw`` (+ ``second_per_grid_ts`` for Qwen2.5-VL), per sample the
        ids its video placeholder becomes or None)."""
        if all(v is None for v in videos):
            return {}, [None] * len(videos)
        s = self.video_settings
        cfg = self.model_config
        rows, grids, secs, runs = [], [], [], []
        for v in videos:
            if v is None:
                runs.append(None)
                continue
            px, (gt, gh, gw) = video_pixels(s, frames_array(v))
            rows.append(px)
            grids.append((gt, gh, gw))
            idx, fps, total = timing(v, len(v))
            per_slice = gh * gw // s.merge_size ** 2
            if s.rule == "qwen2_vl":
                secs.append(seconds_per_slice(s, idx, fps, total))
                runs.append([cfg.video_token_id] * (gt * per_slice))
                continue
            run = []
            for t in slice_times(s, idx if idx is not None else list(range(len(v))), fps):
                run += self.tokenizer(f"<{t:.1f} seconds>", add_special_tokens=False).input_ids
                run += [cfg.vision_start_token_id] + [cfg.video_token_id] * per_slice + [cfg.vision_end_token_id]
            runs.append(run)
        out = {"pixel_values_videos": torch.cat(rows), "video_grid_thw": torch.tensor(grids, dtype=torch.long)}
        if s.rule == "qwen2_vl" and self.record.video_seconds:
            out["second_per_grid_ts"] = torch.tensor(secs, dtype=torch.float32)
        return out, runs
