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
from .base import FamilyAdapter, TokenTable, VisualLayout


class LlavaOnevisionAdapter(FamilyAdapter):
    visual_keys = ("pixel_values", "pixel_values_videos", "image_sizes", "image_sizes_videos", "batch_num_images")

    def layout(self, visual):
        """Images (anyres_max_9: base crop, grid crops unpadded, bilinearly shrunk past 9 crops' worth, a newline per
        row; an image in a prompt of several: its base crop) and videos (frames pooled 2x, one newline at the end),
        laid out on the host from ``image_sizes`` / the frame count (:func:`onevision_vision.plan_images` /
        ``plan_videos``), with the plan of the tower's packing. A unit is a crop / a frame."""
        cfg = self.config
        out = []
        px = visual.get("pixel_values")
        if px is not None:
            sizes = visual.get("image_sizes")
            if sizes is None:
                raise ValueError("LLaVA-OneVision needs image_sizes with pixel_values")
            sizes_h = sizes.tolist() if torch.is_tensor(sizes) else [list(x) for x in sizes]
            plan, tensors, units = ov.plan_images(cfg, sizes_h, px.shape[1] if px.dim() == 5 else None,
                                                  visual.get("batch_num_images"))
            out.append(VisualLayout("pixel_values", cfg.image_token_id, "crop", False, units, tower=plan,
                                    tower_tensors=tensors))
        px = visual.get("pixel_values_videos")
        if px is not None:
            plan, tensors, units = ov.plan_videos(cfg, px.shape[0], px.shape[1])
            out.append(VisualLayout("pixel_values_videos", cfg.video_token_id, "frame", False, units, tower=plan,
                                    tower_tensors=tensors))
        return out

    def encode(self, visual, layouts, call):
        if call.reads:
            raise ValueError(f"{self.family}: attention of extra vision layers (Method.vision_attention_layers) "
                             "is available for the CLIP towers (LLaVA-1.5, NeXT, Video-LLaVA) only")
        # the saliency layer is the model's select layer (``call.layer`` is a CLIP option)
        tables = []
        for lay in layouts:
            plan = (lay.tower, lay.tower_tensors, lay.units)
            if lay.kind == "crop":
                v = ov.encode_images(self.model, visual["pixel_values"], visual["image_sizes"],
                                     batch_num_images=visual.get("batch_num_images"), want_attn=call.attention,
                                     plan=plan)
            else:
                v = ov.encode_videos(self.model, visual["pixel_values_videos"], want_attn=call.attention, plan=plan)
            table = TokenTable(v.features, v.vision_features)
            if v.saliency is not None:
                table.cls_attn, table.keys = v.saliency.T, v.keys
            tables.append(table)
        return tables

    def project(self, vision_features):
        return ov.project(self.model, vision_features)

    # ---------------------------------------------------------------- the captured executor's half (llava.fast)
    def visual_layout(self, visual, batch, input_ids=None):
        """One image or one video per prompt (:meth:`layout`); the tower, the projector and the packing run inside
        the captured prefill (:meth:`encode_static`)."""
        video = visual.get("pixel_values_videos") is not None
        if video and visual.get("pixel_values") is not None:
            raise ValueError("a batch of images and videos runs on the eager engine (the fast path plans one kind)")
        if video:
            px = visual["pixel_values_videos"]
            if px.dim() != 5 or px.shape[0] != batch:
                raise ValueError("the fast path takes exactly one video per prompt")
            return self.layout(visual)[0]
        px, sizes = visual.get("pixel_values"), visual.get("image_sizes")
        if px is None or sizes is None:
            raise ValueError("LLaVA-OneVision needs pixel_values and image_sizes")
        bni = visual.get("batch_num_images")
        if bni is not None and any(int(n) != 1 for n in (bni.tolist() if torch.is_tensor(bni) else bni)):
            raise ValueError("several images per prompt run on the eager engine (the fast path plans one image)")
        if len(sizes) != batch:
            raise ValueError("the fast path takes exactly one image per prompt")
        # one image per prompt: every image patched, as without batch_num_images (read once, above)
        return self.layout({k: v for k, v in visual.items() if k != "batch_num_images"})[0]

    def newline(self):
        return self.core.image_newline

    def encode_static(self, pixels, tower, tensors, call):
        return ov.run_static(self.core, pixels, tower, tensors, call.attention)
