"""LLaVA's own prompt building, tokenisation and image preprocessing, producing inputs that the
model's normal ``forward`` / ``generate`` accept (``input_ids``, ``attention_mask``,
``pixel_values``, ``image_sizes``, ``pixel_values_videos``).

* Prompts: LLaVA conversation templates (:mod:`llava.conversation`), tokenised the way LLaVA's
  ``tokenizer_image_token`` does: the prompt is split at each ``<image>``, every chunk is tokenised
  on its own (BOS kept only on the first), and each placeholder becomes the model's image token,
  repeated as many times as the model has visual tokens for that image.
* LLaVA-1.5: ``image_aspect_ratio = pad``: pad to a square with the CLIP mean colour, centred,
  then the CLIP processor (shortest edge resize, centre crop, normalise).
* LLaVA-NeXT: transformers' anyres processor (pinpoint choice, pad, 336 crops, base crop first);
  the token count per image follows the layout: ``spatial_unpad`` (HF / stock LLaVA-NeXT) or
  ``spatial`` (576 per crop, the papers' "2880 tokens").
* Video-LLaVA: ``num_frames`` frames sampled uniformly, each through the image processor; one
  ``<video>`` placeholder expanded to frames x (patches + [CLS]).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import torch
from PIL import Image, UnidentifiedImageError

from .preprocess_ov_internvl_video import InternVLVideoMixin, OnevisionVideoMixin
from .preprocess_qwen_video import Frames, QwenVideoMixin
from .preprocess_video_files import sample_frames

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
MAX_IMAGE_PIXELS = 300_000_000  # larger images are refused with a clear error, not a PIL bomb warning


def load_image(image: "str | os.PathLike | Image.Image") -> Image.Image:
    """Open an image file (or pass a PIL image through) as RGB, with clear errors for bad files.

    RGBA / LA / P / greyscale / CMYK are converted with PIL's ``convert('RGB')`` as LLaVA does
    (alpha is dropped, not composited)."""
    if isinstance(image, Image.Image):
        img = image
    else:
        path = os.fspath(image)
        if not os.path.exists(path):
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            with Image.open(path) as probe:
                w, h = probe.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ValueError(f"image {path} is {w}x{h} pixels, above the {MAX_IMAGE_PIXELS:,} pixel limit")
                probe.verify()
            img = Image.open(path)
            img.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"cannot read image {path}: not a valid or complete image file ({e})") from e
    if img.width < 1 or img.height < 1:
        raise ValueError("empty image (0 pixels)")
    return img.convert("RGB") if img.mode != "RGB" else img


def expand2square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA's pad-to-square: centre the image on a square canvas of the background colour."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def llava_tokenize(tokenizer, prompt: str, placeholder: str, token_id: int, repeats: Sequence[int]) -> list[int]:
    """LLaVA's ``tokenizer_image_token`` rule with each placeholder expanded to ``repeats[i]`` tokens."""
    chunks = prompt.split(placeholder)
    if len(chunks) - 1 != len(repeats):
        raise ValueError(f"prompt has {len(chunks) - 1} {placeholder} placeholder(s) but {len(repeats)} input(s) were given")
    ids: list[int] = []
    bos = tokenizer.bos_token_id
    for i, chunk in enumerate(chunks):
        part = tokenizer(chunk).input_ids
        if i > 0 and part and part[0] == bos:
            part = part[1:]
        elif i == 0 and (not part or part[0] != bos) and bos is not None:
            part = [bos] + part
        ids.extend(part)
        if i < len(repeats):
            ids.extend([token_id] * repeats[i])
    return ids



def _single(x) -> bool:
    """A value that is one entry, not a list of entries: a string, a path, an image, a tensor."""
    return isinstance(x, (str, bytes, os.PathLike, Image.Image, torch.Tensor))


def batch_entries(questions, images=None, videos=None) -> tuple[list, list, list]:
    """The processor's arguments as three lists of equal length: a question given as one string is a batch of
    one, with ``images`` / ``videos`` as that question's own (``("What?", "photo.jpg")``, or a list of its images);
    with a list of questions, ``images`` / ``videos`` hold one entry per question (None for none). A mismatch is
    one error naming only what was passed."""
    if isinstance(questions, str):
        return [questions], [images], [videos]
    if _single(questions):
        raise TypeError(f"questions: a string or a list of strings, got {type(questions).__name__}")
    questions = list(questions)
    n = len(questions)
    out, bad = [], []
    for what, v in (("image", images), ("video", videos)):
        if v is None:
            out.append([None] * n)
            continue
        if _single(v):
            raise ValueError(f"{n} questions but one {what} ({type(v).__name__}): give a list with one {what} entry per "
                             f"question (None for none), or pass one question as a string")
        v = list(v)
        if len(v) != n:
            bad.append(f"{len(v)} {what} entr{'y' if len(v) == 1 else 'ies'}")
        out.append(v)
    if bad:
        raise ValueError(f"{n} question{'' if n == 1 else 's'} but {' and '.join(bad)}: give one entry per question "
                         "(None for none)")
    return questions, out[0], out[1]

@dataclass
class PromptProcessor:
    """Turns (question, image | video) pairs into a left-padded batch for a LLaVA-family model."""

    tokenizer: object
    image_processor: object
    family: str
    template: object
    model_config: object
    next_layout: str = "spatial_unpad"
    num_frames: int = 8
    pad_to_square: bool = True  # LLaVA-1.5 'pad'; False = HF's resize + centre crop
    extra: dict = field(default_factory=dict)
    #: pixels rounded to this dtype (None: the processor's fp32). ``load(vision_dtype=...)`` under a half-precision
    #: LLM sets the LLM's dtype: LLaVA's eval scripts hand ``images.to(dtype=torch.float16)`` to the fp32 tower
    #: (docs/parity.md), so the tower's input is the fp16-rounded pixels
    pixel_dtype: torch.dtype | None = None

    @property
    def record(self):
        """The family's record (:mod:`llava.families.registry`)."""
        from .families import registry

        return registry.get(self.family)

    # -- geometry -------------------------------------------------------------------------
    @property
    def tokens_per_crop(self) -> int:
        vc = self.model_config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n if self.model_config.vision_feature_select_strategy == "default" else n + 1

    def image_tokens(self, size_hw: tuple[int, int]) -> int:
        """Visual tokens one image becomes in the LLM input (before pruning)."""
        if self.record.layout != "anyres":
            return self.tokens_per_crop
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        from .families.llava_next import next_token_layout

        c = image_size_to_num_patches(size_hw, self.model_config.image_grid_pinpoints, self.model_config.vision_config.image_size)
        return int(next_token_layout(size_hw, self.model_config, c, self.tokens_per_crop, self.next_layout).numel())

    def video_tokens(self, frames: int) -> int:
        vc = self.model_config.vision_config
        return frames * ((vc.image_size // vc.patch_size) ** 2 + 1)  # [CLS] kept per frame

    # -- pixels ---------------------------------------------------------------------------
    def process_images(self, images: list[Image.Image]) -> dict:
        if self.record.layout == "anyres":
            out = self.image_processor(images=images, return_tensors="pt")
            return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}
        if self.pad_to_square:
            bg = tuple(int(x * 255) for x in getattr(self.image_processor, "image_mean", CLIP_MEAN))
            images = [expand2square(im, bg) for im in images]
        out = self.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"]}

    def process_video(self, frames: list[Image.Image]) -> torch.Tensor:
        if not frames:
            raise ValueError("a video needs at least one frame")
        return self.image_processor(images=frames, return_tensors="pt")["pixel_values"]  # (T, 3, H, W)

    # -- batch ----------------------------------------------------------------------------
    def prompt_text(self, question: str, n_images: int = 1, video: bool = False) -> str:
        ph = "<video>" if video else "<image>" * n_images
        return self.template.prompt(question, ph if (video or n_images) else "")

    def __call__(self, questions: Sequence[str], images: Sequence | None = None, videos: Sequence | None = None,
                 prompts: Sequence[str] | None = None, device: str | torch.device | None = None) -> dict:
        """Build a batch. ``images[i]``: an image / path, a list of them, or None (text-only);
        ``videos[i]``: a list of frames (Video-LLaVA). ``prompts`` overrides the templated
        prompt strings (they must contain the placeholders)."""
        questions, images, videos = batch_entries(questions, images, videos)
        n = len(questions)
        cfg = self.model_config
        rows, all_images, all_videos = [], [], []
        for i, q in enumerate(questions):
            imgs = images[i]
            imgs = [] if imgs is None else (list(imgs) if isinstance(imgs, (list, tuple)) else [imgs])
            imgs = [load_image(x) for x in imgs]
            vid = videos[i]
            if vid is not None and self.record.video != "frames":
                raise ValueError(f"{self.family} does not take videos")
            prompt = prompts[i] if prompts is not None else self.prompt_text(q, len(imgs), vid is not None)
            if imgs:
                reps = [self.image_tokens((im.height, im.width)) for im in imgs]
                ids = llava_tokenize(self.tokenizer, prompt, "<image>", cfg.image_token_id, reps)
            elif "<image>" in prompt:
                raise ValueError(f"prompt {i} has an <image> placeholder but no image was given")
            else:
                ids = None
            if vid is not None:
                frames = sample_frames(vid, self.num_frames)
                frames = [load_image(f) for f in frames]
                text = prompt if ids is None else None
                if text is None:
                    raise ValueError("mixing images and a video in one prompt is not supported by the processor")
                ids = llava_tokenize(self.tokenizer, prompt, "<video>", cfg.video_token_id, [self.video_tokens(len(frames))])
                all_videos.append(self.process_video(frames))
            elif "<video>" in prompt:
                raise ValueError(f"prompt {i} has a <video> placeholder but no video was given")
            if ids is None:
                ids = llava_tokenize(self.tokenizer, prompt, "<image>", cfg.image_token_id, [])
            rows.append(ids)
            all_images.extend(imgs)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask}
        if all_images:
            batch.update(self.process_images(all_images))
        if all_videos:
            if len({v.shape for v in all_videos}) != 1:
                raise ValueError("all videos of a batch need the same number of frames")
            batch["pixel_values_videos"] = torch.stack(all_videos)
        if self.pixel_dtype is not None:
            batch.update({k: batch[k].to(self.pixel_dtype) for k in ("pixel_values", "pixel_values_videos") if k in batch})
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        return batch

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def load_frames(video, num_frames: int) -> list:
    """A video for the Qwen processors as RGB images: frames given are kept as given (a :class:`Frames` keeps its
    timing); a frame folder or a video file gets ``num_frames`` frames (:func:`sample_frames`)."""
    src = sample_frames(video, num_frames) if isinstance(video, (str, os.PathLike)) else video
    if isinstance(src, Image.Image) or not len(src):
        raise ValueError("a video is a list of frames (or a frame folder / video file), with at least one frame")
    frames = [load_image(f) for f in src]
    return Frames(frames, **src.timing()) if isinstance(src, Frames) else frames


# ----------------------------------------------------------------------------------------------------------
# Qwen2.5-VL and LLaVA-OneVision: the checkpoints' ChatML chat templates and transformers' PIL image processors
# (no torchvision needed). The prompt is tokenised with one placeholder token per image, then each placeholder
# is expanded to the image's visual-token count, as transformers' processors do.


class ChatMLProcessor(PromptProcessor):
    """Shared batch building for the ChatML families; subclasses give placeholders, counts and pixels."""

    placeholder = "<image>"  # the text of one image placeholder token

    def image_placeholder(self) -> str:
        return self.placeholder

    def prompt_text(self, question: str, n_images: int = 1, video: bool = False) -> str:
        if video:
            raise ValueError(f"{self.family}: videos are not supported by this processor yet")
        return self.template.prompt(question, self.image_placeholder() * n_images)

    def _placeholder_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.placeholder)

    def _pixels(self, per_sample: list[list[Image.Image]]) -> tuple[dict, list[list[int]]]:
        raise NotImplementedError

    def _video_placeholder_id(self) -> int | None:
        return None

    def _takes_videos(self) -> bool:
        return self._video_placeholder_id() is not None

    def _video_inputs(self, videos: list) -> tuple[dict, list]:
        """The batch's video pixels and per sample the ids its video placeholder becomes (None: no video)."""
        if any(v is not None for v in videos):
            raise ValueError(f"{self.family}: videos are not supported by this processor yet")
        return {}, [None] * len(videos)

    def __call__(self, questions: Sequence[str], images: Sequence | None = None, videos: Sequence | None = None,
                 prompts: Sequence[str] | None = None, device: str | torch.device | None = None) -> dict:
        questions, images, videos = batch_entries(questions, images, videos)
        n = len(questions)
        per_sample = []
        for x in images:
            x = [] if x is None else (list(x) if isinstance(x, (list, tuple)) else [x])
            per_sample.append([load_image(im) for im in x])
        pixels, counts = self._pixels(per_sample)
        ph_id, img_id, vph_id = self._placeholder_id(), self.model_config.image_token_id, self._video_placeholder_id()
        vpixels, vruns = self._video_inputs(videos if not self._takes_videos() else  # no video support: refused unread
                                            [None if v is None else load_frames(v, self.num_frames) for v in videos])
        rows = []
        for i, q in enumerate(questions):
            prompt = (prompts[i] if prompts is not None
                      else self.prompt_text(q, len(per_sample[i]), videos[i] is not None))
            if isinstance(vruns[i], str):  # a video's text put into the prompt, then tokenised (InternVL's processor)
                rows.append(self._video_text_ids(prompt, vruns[i], len(per_sample[i])))
                continue
            ids = self.tokenizer(prompt).input_ids
            n_ph, n_vph = sum(t == ph_id for t in ids), sum(t == vph_id for t in ids) if vph_id is not None else 0
            if n_ph != len(per_sample[i]) or n_vph != (vruns[i] is not None):
                raise ValueError(f"prompt {i} has {n_ph} {self.placeholder} and {n_vph} video placeholder(s) but "
                                 f"{len(per_sample[i])} image(s) and {int(vruns[i] is not None)} video(s) were given")
            out, k = [], 0
            for t in ids:
                if t == ph_id:
                    out.extend(self._expand(img_id, counts[i][k]))
                    k += 1
                else:
                    out.extend(vruns[i] if t == vph_id else [t])
            rows.append(out)
        if set(pixels) & set(vpixels):
            raise ValueError(f"{self.family}: image and video samples in one batch are not supported (both give "
                             f"{', '.join(sorted(set(pixels) & set(vpixels)))}): batch them apart")
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask, **self._extra_ids(input_ids, mask), **pixels,
                 **vpixels}
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        return batch

    def _extra_ids(self, input_ids: torch.Tensor, mask: torch.Tensor) -> dict:
        return {}

    def _expand(self, img_id: int, count: int) -> list[int]:
        """The ids one image placeholder becomes: ``count`` image tokens."""
        return [img_id] * count


class QwenVLProcessor(QwenVideoMixin, ChatMLProcessor):
    """Qwen2.5-VL / Qwen3-VL / Qwen3.5: ``Qwen2VLImageProcessorPil`` (smart resize to multiples of patch x merge within
    [min_pixels, max_pixels], patchified pixels (sum t*h*w, 3*2*14*14) and ``image_grid_thw``); each image
    becomes ``<|vision_start|>`` + grid.prod() / merge^2 ``<|image_pad|>`` + ``<|vision_end|>``; adds
    ``mm_token_type_ids`` (1 at image tokens, 2 at video tokens, 0 elsewhere and at padding) without which the
    model silently falls back to 1-D positions. Videos (one per prompt, ``videos[i]``: its frames, a
    :class:`Frames` with their timing, a frame folder or a video file, ``num_frames`` sampled from the last two):
    :mod:`llava.preprocess_qwen_video`, transformers' video processors rebuilt without torchvision."""

    placeholder = "<|image_pad|>"

    def image_placeholder(self) -> str:
        return "<|vision_start|><|image_pad|><|vision_end|>"

    @property
    def merge(self) -> int:
        return self.model_config.vision_config.spatial_merge_size

    def image_tokens(self, size_hw: tuple[int, int]) -> int:
        return self.image_processor.get_number_of_image_patches(int(size_hw[0]), int(size_hw[1]), {}) // self.merge ** 2

    def process_images(self, images: list[Image.Image]) -> dict:
        out = self.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def _pixels(self, per_sample):
        flat = [im for s in per_sample for im in s]
        if not flat:
            return {}, [[] for _ in per_sample]
        px = self.process_images(flat)
        per_image = (px["image_grid_thw"].prod(-1) // self.merge ** 2).tolist()
        counts, k = [], 0
        for s in per_sample:
            counts.append(per_image[k:k + len(s)])
            k += len(s)
        return px, counts

    def _extra_ids(self, input_ids, mask):
        cfg = self.model_config
        types = (input_ids == cfg.image_token_id).long() + 2 * (input_ids == cfg.video_token_id).long()
        return {"mm_token_type_ids": types * mask}


class OnevisionProcessor(OnevisionVideoMixin, ChatMLProcessor):
    """LLaVA-OneVision (llava-hf): ``LlavaOnevisionImageProcessorPil`` (anyres: base crop + best-pinpoint
    crops, padded to the batch's largest crop count: ``pixel_values`` (n_images, max_crops, 3, H, W),
    ``image_sizes`` (n, 2) as (H, W), ``batch_num_images`` per sample holding images); ``<image>`` expands to
    the packed count (base + unpadded grid, anyres_max_9 interpolated, + one newline per row); several images
    in one sample get only the base crop: tokens per crop + 1 each. Videos (one per prompt, the videos of a batch of
    one frame count): :mod:`llava.preprocess_ov_internvl_video`, transformers' video processor rebuilt without
    torchvision (``pixel_values_videos``; ``<video>`` becomes frames x pooled tokens + 1 newline)."""

    placeholder = "<image>"

    @property
    def tokens_per_crop(self) -> int:
        vc = self.model_config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n if self.model_config.vision_feature_select_strategy == "full" else n - 1

    def image_tokens(self, size_hw: tuple[int, int], multi_image: bool = False) -> int:
        """Tokens of one image (LlavaOnevisionProcessor's own count, used without constructing that
        processor, which needs torchvision for its video processor)."""
        cfg = self.model_config
        n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
        if multi_image:
            count = n + 1
        else:
            from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

            counter = object.__new__(LlavaOnevisionProcessor)
            counter.__dict__.update(image_processor=self.image_processor, num_image_tokens=n,
                                    vision_aspect_ratio=getattr(cfg, "vision_aspect_ratio", "anyres_max_9"))
            side = cfg.vision_config.image_size
            count = counter._get_number_of_features(int(size_hw[0]), int(size_hw[1]), side, side)
        return count - 1 if cfg.vision_feature_select_strategy == "default" else count

    def process_images(self, images) -> dict:
        """``images``: a list of images (one per sample) or a list of per-sample lists."""
        out = self.image_processor(images=images, return_tensors="pt")
        return {k: out[k] for k in ("pixel_values", "image_sizes", "batch_num_images") if k in out}

    def _pixels(self, per_sample):
        groups = [s for s in per_sample if s]
        if not groups:
            return {}, [[] for _ in per_sample]
        px = self.process_images(groups)
        if not torch.is_tensor(px.get("batch_num_images")):
            px["batch_num_images"] = torch.tensor([len(s) for s in groups], dtype=torch.long)
        counts = [[self.image_tokens((im.height, im.width), multi_image=len(s) > 1) for im in s] for s in per_sample]
        return px, counts


class InternVLProcessor(InternVLVideoMixin, ChatMLProcessor):
    """InternVL3 / 3.5 (-hf checkpoints): ``GotOcr2ImageProcessorPil`` with ``crop_to_patches`` (dynamic tiling:
    the aspect ratio among 1..``max_patches`` tiles closest to the image's, tiles row-major, then a thumbnail when
    there is more than one tile; ``pixel_values`` (tiles, 3, S, S) of all images in prompt order), as
    ``InternVLProcessor`` calls it; each ``<IMG_CONTEXT>`` becomes ``<img>`` + tiles x (S / patch * ratio)^2
    ``<IMG_CONTEXT>`` + ``</img>``. Videos (one per prompt): :mod:`llava.preprocess_ov_internvl_video` (each frame one
    tile of ``pixel_values``, one ``Frame{i}: <img>...</img>`` line per frame, as transformers' processor)."""

    placeholder = "<IMG_CONTEXT>"

    @property
    def tokens_per_crop(self) -> int:
        cfg = self.model_config
        vc = cfg.vision_config
        side = vc.image_size[0] // vc.patch_size[0]
        return int(round(side * cfg.downsample_ratio)) ** 2

    def image_tokens(self, size_hw: tuple[int, int]) -> int:
        tiles = self.image_processor.get_number_of_image_patches(int(size_hw[0]), int(size_hw[1]),
                                                                 {"crop_to_patches": True})
        return self.tokens_per_crop * tiles

    def process_images(self, images: list[Image.Image]) -> dict:
        out = self.image_processor(images=images, crop_to_patches=True, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "num_patches": out["num_patches"]}

    def _pixels(self, per_sample):
        flat = [im for s in per_sample for im in s]
        if not flat:
            return {}, [[] for _ in per_sample]
        px = self.process_images(flat)
        tiles = px.pop("num_patches")
        tiles = tiles.tolist() if torch.is_tensor(tiles) else list(tiles)
        counts, k = [], 0
        for s in per_sample:
            counts.append([self.tokens_per_crop * int(t) for t in tiles[k:k + len(s)]])
            k += len(s)
        return px, counts

    def _expand(self, img_id: int, count: int) -> list[int]:
        start, end = (self.tokenizer.convert_tokens_to_ids(t) for t in ("<img>", "</img>"))
        return [start] + [img_id] * count + [end]


#: the prompt processors by name (a family record's ``processor``)
PROCESSORS = {c.__name__: c for c in (PromptProcessor, QwenVLProcessor, OnevisionProcessor, InternVLProcessor)}
