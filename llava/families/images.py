"""The image processors of each family (transformers' PIL backends): built from a model's config for the models
built here (``tiny:`` / ``shape:``), or read from a checkpoint. A family's record
(:mod:`llava.families.registry`) names one :class:`ImageProcessors`."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

# Qwen2.5-VL-7B-Instruct's preprocessor_config.json: min_pixels 56*56, max_pixels 14*14*4*16384
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 3136, 12845056
SIGLIP_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # InternVL's preprocessor_config.json
INTERNVL_MAX_TILES = 12  # InternVL3 / 3.5: max_dynamic_patch 12 (+ the thumbnail)
INTERNVL_TINY_TILES = 4  # the tiny InternVL's tile limit (+ the thumbnail)
CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def _clip(config, tiny: bool, min_pixels=None, max_pixels=None):
    size = config.vision_config.image_size
    kw = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    if not tiny:  # the tiny models keep the class defaults (the same CLIP mean / std)
        kw.update(image_mean=CLIP_MEAN_STD[0], image_std=CLIP_MEAN_STD[1])
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    return kw, pinpoints


def clip(config, tiny: bool, min_pixels=None, max_pixels=None):
    """CLIP's square crop (LLaVA-1.5, Video-LLaVA) at the tower's side."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    kw, _ = _clip(config, tiny)
    return CLIPImageProcessorPil(**kw)


def next_anyres(config, tiny: bool, min_pixels=None, max_pixels=None):
    """LLaVA-NeXT's anyres crops over the config's pinpoints."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    kw, pinpoints = _clip(config, tiny)
    return LlavaNextImageProcessorPil(**kw, image_grid_pinpoints=pinpoints)


def qwen(config, tiny: bool, min_pixels=None, max_pixels=None):
    """Qwen-VL's smart resize within [min_pixels, max_pixels] (the checkpoint's defaults when None)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vc = config.vision_config
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels or QWEN_MIN_PIXELS, max_pixels=max_pixels or QWEN_MAX_PIXELS,
                                    patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size,
                                    merge_size=vc.spatial_merge_size)


def onevision(config, tiny: bool, min_pixels=None, max_pixels=None):
    """LLaVA-OneVision's anyres_max_9 crops (SigLIP's mean / std)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    side = config.vision_config.image_size
    return LlavaOnevisionImageProcessorPil(size={"height": side, "width": side},
                                           image_grid_pinpoints=config.image_grid_pinpoints,
                                           image_mean=SIGLIP_MEAN_STD[0], image_std=SIGLIP_MEAN_STD[1])


def internvl(config, tiny: bool, min_pixels=None, max_pixels=None):
    """InternVL's dynamic tiling (crop_to_patches, ImageNet's mean / std)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    side = config.vision_config.image_size[0]
    return GotOcr2ImageProcessorPil(size={"height": side, "width": side}, crop_to_patches=True, min_patches=1,
                                    max_patches=INTERNVL_TINY_TILES if tiny else INTERNVL_MAX_TILES,
                                    image_mean=IMAGENET_MEAN_STD[0], image_std=IMAGENET_MEAN_STD[1])


@dataclass(frozen=True)
class ImageProcessors:
    """How a family's image processor is made: ``build(config, tiny, min_pixels, max_pixels)`` for a model built
    here; ``pretrained``: the transformers class (``"module:Class"``) a checkpoint's ``preprocessor_config.json`` is
    read with; ``pixel_bounds``: it takes ``min_pixels`` / ``max_pixels``."""

    build: Callable
    pretrained: str
    pixel_bounds: bool = False

    def from_pretrained(self, name: str, revision: str | None = None, min_pixels=None, max_pixels=None):
        module, cls = self.pretrained.split(":")
        kw = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
              if v is not None} if self.pixel_bounds else {}
        return getattr(importlib.import_module(module), cls).from_pretrained(name, revision=revision, **kw)


CLIP = ImageProcessors(clip, "transformers.models.clip.image_processing_pil_clip:CLIPImageProcessorPil")
NEXT = ImageProcessors(next_anyres,
                       "transformers.models.llava_next.image_processing_pil_llava_next:LlavaNextImageProcessorPil")
QWEN = ImageProcessors(qwen, "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl:Qwen2VLImageProcessorPil",
                       pixel_bounds=True)
ONEVISION = ImageProcessors(onevision, "transformers.models.llava_onevision.image_processing_pil_llava_onevision:"
                                       "LlavaOnevisionImageProcessorPil")
INTERNVL = ImageProcessors(internvl, "transformers.models.got_ocr2.image_processing_pil_got_ocr2:GotOcr2ImageProcessorPil")
