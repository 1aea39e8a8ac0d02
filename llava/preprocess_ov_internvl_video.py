"""LLaVA-OneVision and InternVL3 / 3.5 video inputs without torchvision: what transformers 5.23's
``LlavaOnevisionVideoProcessor`` / ``InternVLVideoProcessor`` and the ``LlavaOnevisionProcessor`` /
``InternVLProcessor`` video paths produce, rebuilt from numpy and torch (transformers' video processors need
torchvision, an optional extra here). tests/test_ov_internvl_video_processor.py checks it against the real
processors' outputs recorded with torchvision installed (tests/fixtures/ov_internvl_video/).

Both families see a video as its frames, each resized to the tower's square (OneVision 384 px, InternVL 448 px; the
frames handed over are the frames the model sees: they are not re-sampled here, so InternVL's own middle-of-segment
sampling, ``initial_shift``, does not apply):

* **resampling**: every frame to the settings' height x width (the aspect ratio is not kept, as transformers' ``size``
  {height, width}), bicubic with antialiasing on uint8 frames by ``torch.nn.functional.interpolate`` on the CPU, the
  call torchvision's ``resize`` makes for uint8 bicubic on a CPU (so the bytes are torchvision's); frames already of
  that size are not resampled.
* **normalisation**: float32 ``(v - mean * 255) / (std * 255)`` (rescale fused into normalise, as transformers).
* **OneVision**: ``pixel_values_videos`` (videos, frames, 3, S, S) (a batch's videos must have one frame count: the
  model stacks them, and transformers' processor refuses unequal counts too); the ``<video>`` placeholder becomes
  frames x ceil(g / 2)^2 + 1 ``<video>`` tokens, g = S / patch: the model pools each frame's g x g features 2x
  bilinearly (``apply_pooling``) and appends one ``image_newline`` after the whole video.
* **InternVL**: the frames are rows of ``pixel_values`` (one 448-px tile per frame, no tiling, no thumbnail), videos
  one after another in prompt order; the ``<video>`` placeholder's text becomes, per frame, ``Frame{i}: <img>`` +
  tokens-per-tile ``<IMG_CONTEXT>`` + ``</img>``, the frames joined by newlines, put into the prompt text before it
  is tokenised (as transformers' processor does, so no tokenizer needs ``<video>`` as a token). A batch may mix
  frame counts here (the model takes tiles of any count; transformers' processor refuses that batch: it stacks the
  videos).

Settings (:class:`FrameVideoSettings`, ``rt.processor.video_settings``, replaceable): a checkpoint's own video
processor config (``processor_config.json`` -> ``video_preprocessor_config.json`` -> ``preprocessor_config.json``,
transformers' order) over transformers' class defaults (384 x 384, CLIP mean / std, bicubic); a model built here
(``tiny:`` / ``shape:``) gets its tower's square and its image processor's mean / std (OneVision: SigLIP's 0.5,
InternVL: ImageNet's, the checkpoints' image values; their video configs could not be read here). The size must be
the tower's square (each frame is one crop / tile), else refused.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .preprocess_qwen_video import BICUBIC, CLIP_MEAN_STD, frames_array, frames_to_float
from .video_config import checkpoint_video_config


def _per_frame(family: str) -> bool:
    """Whether ``family``'s processor reads a video frame by frame (its record's ``video`` is "per_frame")."""
    from .families import registry

    f = registry.find(family)
    return f is not None and f.video == "per_frame"


def _per_frame_families() -> str:
    from .families import registry

    return ", ".join(f.id for f in registry.families() if f.video == "per_frame")


#: transformers' class defaults (LlavaOnevisionVideoProcessor and InternVLVideoProcessor agree): a checkpoint's
#: config overrides them key by key
CLASS_DEFAULTS = dict(height=384, width=384, image_mean=CLIP_MEAN_STD[0], image_std=CLIP_MEAN_STD[1])


@dataclass(frozen=True)
class FrameVideoSettings:
    """One family's per-frame video preprocessing (see the module): every frame resized to ``height`` x ``width``
    (the tower's square), rescaled and normalised."""

    family: str
    height: int
    width: int
    image_mean: tuple = CLIP_MEAN_STD[0]
    image_std: tuple = CLIP_MEAN_STD[1]
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = BICUBIC
    source: str = ""

    def __post_init__(self):
        if not _per_frame(self.family):
            raise ValueError(f"per-frame video settings are for {_per_frame_families()}, not {self.family!r}")
        if self.resample != BICUBIC:
            raise ValueError(f"video resample {self.resample}: only bicubic (3, the OneVision / InternVL video "
                             "processors') is implemented without torchvision")
        if min(self.height, self.width) < 1:
            raise ValueError(f"bad video frame size {self.height}x{self.width}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or not all(self.image_std):
            raise ValueError(f"video mean / std need 3 values each, std non-zero: {self.image_mean}, {self.image_std}")

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def settings_from_config(family: str, config: dict, source: str = "") -> FrameVideoSettings:
    """A checkpoint's video processor dict read as transformers' class reads it: class defaults, then its keys.
    Only a fixed ``size`` {height, width} and no centre crop are implemented (the released configs' form)."""
    kw = dict(CLASS_DEFAULTS)
    size = config.get("size") or {}
    if size:
        if not (size.get("height") and size.get("width")):
            raise ValueError(f"{source or family}: video size {size}: only a fixed {{height, width}} is implemented "
                             "without torchvision")
        kw["height"], kw["width"] = int(size["height"]), int(size["width"])
    if config.get("do_center_crop"):
        raise ValueError(f"{source or family}: a video centre crop (do_center_crop) is not implemented without "
                         "torchvision")
    for key in ("rescale_factor", "do_resize", "do_rescale", "do_normalize", "resample"):
        if config.get(key) is not None:
            kw[key] = config[key]
    for key in ("image_mean", "image_std"):
        if config.get(key) is not None:
            v = config[key]
            kw[key] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
    return FrameVideoSettings(family=family, source=source, **kw)


def tower_square(family: str, model_config) -> tuple[int, int]:
    """(height, width) of one crop / tile of the model's tower: every video frame becomes one."""
    side = model_config.vision_config.image_size
    return (int(side[0]), int(side[1])) if isinstance(side, (list, tuple)) else (int(side), int(side))


def resolve_settings(family: str, model_config, image_processor=None) -> FrameVideoSettings:
    """The video settings of a loaded model: its checkpoint's video processor config (hub id or local folder, at
    the commit the model was loaded from), or, for a model built here, the tower's square and the image processor's
    mean / std."""
    if not _per_frame(family):
        raise ValueError(f"{family}: no per-frame video processing (families: {_per_frame_families()})")
    square = tower_square(family, model_config)
    found = checkpoint_video_config(model_config)
    if found:
        name, config = found
        s = settings_from_config(family, config, source=f"{name}: the checkpoint's video processor config")
    else:
        mean = tuple(float(x) for x in getattr(image_processor, "image_mean", None) or CLIP_MEAN_STD[0])
        std = tuple(float(x) for x in getattr(image_processor, "image_std", None) or CLIP_MEAN_STD[1])
        s = FrameVideoSettings(family=family, height=square[0], width=square[1], image_mean=mean, image_std=std,
                               source="built model: the tower's square, the image processor's mean / std")
    if (s.height, s.width) != square:
        raise ValueError(f"{name or family}: the video processor resizes frames to {s.height}x{s.width}, not the "
                         f"tower's {square[0]}x{square[1]} (each frame is one crop / tile of the tower)")
    return s


def frame_pixels(s: FrameVideoSettings, frames: np.ndarray) -> torch.Tensor:
    """One video's frames (T, H, W, 3) uint8 -> (T, 3, height, width) float32, as transformers' video processor."""
    size = (s.height, s.width)
    x = frames_to_float(frames, size if s.do_resize else None, s)
    if tuple(x.shape[-2:]) != size:
        raise ValueError(f"video frames {tuple(x.shape[-2:])} are not the tower's {size} (do_resize=False needs "
                         "frames of that size)")
    return x


def onevision_video_tokens(model_config, frames: int) -> int:
    """Tokens one OneVision video of ``frames`` frames becomes: per frame the g x g patch grid pooled 2x bilinearly
    to ceil(g / 2)^2, then one newline after the whole video."""
    vc = model_config.vision_config
    g = vc.image_size // vc.patch_size
    return frames * math.ceil(g / 2) ** 2 + 1


def internvl_video_text(frames: int, tokens_per_frame: int) -> str:
    """The text InternVL's ``<video>`` placeholder becomes: per frame ``Frame{i}: <img>`` + its context tokens +
    ``</img>``, frames joined by newlines."""
    tile = "<img>" + "<IMG_CONTEXT>" * tokens_per_frame + "</img>"
    return "\n".join(f"Frame{i + 1}: {tile}" for i in range(frames))


# -- prompts -------------------------------------------------------------------------------------------------------
class FrameVideoMixin:
    """Video inputs for the OneVision / InternVL processors (``llava.preprocess``): the settings (resolved once,
    replaceable) and each video's frames through :func:`frame_pixels`."""

    video_placeholder = "<video>"

    @property
    def video_settings(self) -> FrameVideoSettings:
        s = self.extra.get("video_settings")
        if s is None:
            s = self.extra["video_settings"] = resolve_settings(self.family, self.model_config, self.image_processor)
        return s

    @video_settings.setter
    def video_settings(self, s: FrameVideoSettings) -> None:
        if not isinstance(s, FrameVideoSettings):
            raise TypeError(f"video_settings must be a FrameVideoSettings, got {type(s).__name__}")
        square = tower_square(self.family, self.model_config)
        if (s.family, s.height, s.width) != (self.family, *square):
            raise ValueError(f"video settings for {s.family} at {s.height}x{s.width}: this model is {self.family} "
                             f"with {square[0]}x{square[1]} crops")
        self.extra["video_settings"] = s

    def _video_prompt_placeholder(self) -> str:
        return self.video_placeholder

    def prompt_text(self, question: str, n_images: int = 1, video: bool = False) -> str:
        """The checkpoint's chat template's video item before the question (the placeholder expanded later)."""
        if not video:
            return super().prompt_text(question, n_images)
        if n_images:
            raise ValueError("mixing images and a video in one prompt is not supported by the processor")
        return self.template.prompt(question, self._video_prompt_placeholder())

    def _video_placeholder_id(self) -> int | None:
        """The ``<video>`` token's id where the tokenizer has one (a prompt without a video must then not hold it;
        OneVision expands it, as the llava-hf tokenizers have it); None where it has none."""
        tok = self.tokenizer
        i = tok.convert_tokens_to_ids(self.video_placeholder)
        return None if i is None or i == tok.unk_token_id else i

    def _takes_videos(self) -> bool:
        return True

    def _frames(self, videos: list) -> list:
        s = self.video_settings
        return [None if v is None else frame_pixels(s, frames_array(v)) for v in videos]


class OnevisionVideoMixin(FrameVideoMixin):
    """LLaVA-OneVision (llava-hf): the chat template's ``<video>\\n`` before the question; ``<video>`` expands to the
    pooled count; ``pixel_values_videos`` (videos, frames, 3, S, S)."""

    def _video_inputs(self, videos: list) -> tuple[dict, list]:
        """``videos``: per sample None or a list of RGB frames -> (``pixel_values_videos``, per sample the ids its
        ``<video>`` becomes or None)."""
        if all(v is None for v in videos):
            return {}, [None] * len(videos)
        if self._video_placeholder_id() is None:
            raise ValueError(f"{self.family}: the tokenizer has no {self.video_placeholder} token for a video")
        px = self._frames(videos)
        got = [p for p in px if p is not None]
        counts = sorted({p.shape[0] for p in got})
        if len(counts) > 1:
            raise ValueError(f"{self.family}: the videos of a batch need one frame count (the model stacks them as "
                             f"(videos, frames, 3, H, W)), got {counts}: batch them apart")
        vid = self.model_config.video_token_id
        runs = [None if p is None else [vid] * onevision_video_tokens(self.model_config, p.shape[0]) for p in px]
        return {"pixel_values_videos": torch.stack(got)}, runs


class InternVLVideoMixin(FrameVideoMixin):
    """InternVL3 / 3.5 (-hf): the chat template's ``<video>\\n`` before the question; the placeholder's text becomes
    one ``Frame{i}: <img>...</img>`` line per frame before tokenising; the frames are rows of ``pixel_values``."""

    def _video_prompt_placeholder(self) -> str:
        # the -hf chat template writes "<video>\n" for a video item (transformers' conversion script); other templates
        # put their own newline after the placeholders
        return self.video_placeholder + ("\n" if self.template.style == "internvl_hf" else "")

    def _video_inputs(self, videos: list) -> tuple[dict, list]:
        """``videos``: per sample None or a list of RGB frames -> (``pixel_values``: every video's frames in sample
        order, per sample the text its ``<video>`` becomes or None)."""
        if all(v is None for v in videos):
            return {}, [None] * len(videos)
        px = self._frames(videos)
        got = [p for p in px if p is not None]
        runs = [None if p is None else internvl_video_text(p.shape[0], self.tokens_per_crop) for p in px]
        return {"pixel_values": torch.cat(got)}, runs

    def _video_text_ids(self, prompt: str, text: str, n_images: int) -> list[int]:
        """A video prompt's ids: its ``<video>`` replaced by the frames' text, then tokenised (transformers' order)."""
        if n_images:
            raise ValueError("mixing images and a video in one prompt is not supported by the processor")
        k = prompt.count(self.video_placeholder)
        if k != 1:
            raise ValueError(f"a video prompt needs one {self.video_placeholder} placeholder, this one has {k}")
        for t in (self.placeholder, "<img>", "</img>"):
            if t in prompt:
                raise ValueError(f"a video prompt must not hold {t} (the video's own tokens are written here)")
        return self.tokenizer(prompt.replace(self.video_placeholder, text)).input_ids
