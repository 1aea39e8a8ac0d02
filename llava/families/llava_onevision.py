"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP tower (no [CLS]), 729 tokens per
384-px crop, anyres_max_9 (base crop, then the crop grid re-assembled, unpadded, bilinearly shrunk
when it exceeds 9 crops' worth, one ``image_newline`` per row), several images in a sample get their
base crop only; videos: frames pooled 2x bilinearly (196 each) and one newline at the end. Qwen2
language model with 1-D RoPE: positions, padding and decode work as for LLaVA.

The stock ``get_image_features`` / ``get_video_features`` give the features (bit-identical splice);
the per-token signals are pushed through the same packing (:mod:`llava.families.onevision_vision`):
``cls_attn`` is the attention each patch **receives** in the select layer within its crop (mean
over the crop's queries, per head; there is no [CLS]), interpolated / pooled like the features;
tokens made by interpolation get the unit / patch of their nearest source patch. Newline tokens have
unit -1 (as in LLaVA-NeXT). A unit is a crop (images) or a frame (videos).
"""

from __future__ import annotations

import torch

from . import onevision_vision as ov
from .base import FamilyAdapter, VisualBlock, VisualLayout, packed_units


class LlavaOnevisionAdapter(FamilyAdapter):
    visual_keys = ("pixel_values", "pixel_values_videos", "image_sizes", "image_sizes_videos", "batch_num_images")

    def encode(self, visual, call):
        if call.reads:
            raise ValueError(f"{self.family}: attention of extra vision layers (Method.vision_attention_layers) "
                             "is available for the CLIP towers (LLaVA-1.5, NeXT, Video-LLaVA) only")
        # the saliency layer is the model's select layer (``call.layer`` is a CLIP option)
        cfg = self.config
        blocks = []
        if visual.get("pixel_values") is not None:
            if visual.get("image_sizes") is None:
                raise ValueError("LLaVA-OneVision needs image_sizes with pixel_values")
            v = ov.encode_images(self.model, visual["pixel_values"], visual["image_sizes"],
                                 batch_num_images=visual.get("batch_num_images"), want_attn=call.attention)
            blocks.append(VisualBlock(cfg.image_token_id, "crop", *self._table(v)))
        if visual.get("pixel_values_videos") is not None:
            v = ov.encode_videos(self.model, visual["pixel_values_videos"], want_attn=call.attention)
            blocks.append(VisualBlock(cfg.video_token_id, "frame", *self._table(v)))
        return blocks

    @staticmethod
    def _table(v: "ov.OneVisionVisual") -> tuple:
        """The table and host layout of one encode call (packed: row i is token i, newlines' rows replaced by
        ``image_newline``)."""
        table = {"features": v.features, "vision_features": v.vision_features}
        if v.saliency is not None:
            table["cls_attn"] = v.saliency.T
            table["keys"] = v.keys
        return table, packed_units(v.unit, v.patch, v.unit_grid, v.sizes, v.counts, v.unit_pos)

    def project(self, vision_features):
        return ov.project(self.model, vision_features)

    # ---------------------------------------------------------------- the captured executor's half (llava.fast)
    def visual_layout(self, visual, batch, input_ids=None):
        """One image (anyres_max_9: base crop, grid crops unpadded, bilinearly shrunk past 9 crops' worth, a newline
        per row) or one video (frames pooled 2x, one newline at the end) per prompt, laid out on the host from
        ``image_sizes`` / the frame count (:func:`onevision_vision.plan_images` / ``plan_videos``); the tower, the
        projector and the packing run inside the captured prefill (:meth:`encode_static`). A unit is a crop / a
        frame."""
        cfg = self.config
        video = visual.get("pixel_values_videos") is not None
        if video and visual.get("pixel_values") is not None:
            raise ValueError("a batch of images and videos runs on the eager engine (the fast path plans one kind)")
        if video:
            px = visual["pixel_values_videos"]
            if px.dim() != 5 or px.shape[0] != batch:
                raise ValueError("the fast path takes exactly one video per prompt")
            plan, tensors, units = ov.plan_videos(cfg, px.shape[0], px.shape[1])
            return VisualLayout("pixel_values_videos", cfg.video_token_id, "frame", False, units, tower=plan,
                                tower_tensors=tensors)
        px, sizes = visual.get("pixel_values"), visual.get("image_sizes")
        if px is None or sizes is None:
            raise ValueError("LLaVA-OneVision needs pixel_values and image_sizes")
        bni = visual.get("batch_num_images")
        if bni is not None and any(int(n) != 1 for n in (bni.tolist() if torch.is_tensor(bni) else bni)):
            raise ValueError("several images per prompt run on the eager engine (the fast path plans one image)")
        sizes_h = sizes.tolist() if torch.is_tensor(sizes) else [list(x) for x in sizes]
        if len(sizes_h) != batch:
            raise ValueError("the fast path takes exactly one image per prompt")
        plan, tensors, units = ov.plan_images(cfg, sizes_h, px.shape[1] if px.dim() == 5 else None)
        return VisualLayout("pixel_values", cfg.image_token_id, "crop", False, units, tower=plan,
                            tower_tensors=tensors)

    def newline(self):
        return self.core.image_newline

    def encode_static(self, pixels, tower, tensors, call):
        return ov.run_static(self.core, pixels, tower, tensors, call.attention)
