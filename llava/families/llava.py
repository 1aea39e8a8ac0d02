"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP ViT-L/14 with [CLS], select layer -2, the
[CLS] dropped from the LLM input (``default`` strategy) and offered to methods as an extra
candidate, MLP projector, 1-D RoPE. One unit per image (576 tokens at 336 px)."""

from __future__ import annotations

from .clip import ClipAdapter


class LlavaAdapter(ClipAdapter):
    def layout(self, visual):
        if visual.get("pixel_values_videos") is not None:
            raise ValueError(f"{self.family} does not take pixel_values_videos")
        px = visual.get("pixel_values")
        drop = self.config.vision_feature_select_strategy == "default"
        return [] if px is None else [self.clip_layout("pixel_values", "image", px.shape[0], 1, drop)]

    def visual_layout(self, visual, batch, input_ids=None):
        px = visual.get("pixel_values")
        if visual.get("pixel_values_videos") is None and (px is None or px.dim() != 4 or px.shape[0] != batch):
            raise ValueError("the fast path takes exactly one image per prompt")
        return self.layout(visual)[0]
