"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP ViT-L/14 with [CLS], select layer -2, the
[CLS] dropped from the LLM input (``default`` strategy) and offered to methods as an extra
candidate, MLP projector, 1-D RoPE. One unit per image (576 tokens at 336 px)."""

from __future__ import annotations

from .base import VisualBlock, VisualLayout
from .clip import ClipAdapter, ClipRun, clip_table, clip_units, run_tower


class LlavaAdapter(ClipAdapter):
    def encode(self, visual, call):
        pixel_values = visual.get("pixel_values")
        if visual.get("pixel_values_videos") is not None:
            raise ValueError(f"{self.family} does not take pixel_values_videos")
        cfg = self.config
        drop = cfg.vision_feature_select_strategy == "default"
        hs, ca, ks, rc = run_tower(self.tower, pixel_values, cfg.vision_feature_layer, call, kind="image",
                                   cls_in_llm=not drop)
        return [VisualBlock(cfg.image_token_id, "image", clip_table(hs, ca, ks, self.core.multi_modal_projector, drop, rc),
                            clip_units(cfg.vision_config, hs.shape[0], 1, drop))]

    def visual_layout(self, visual, batch, input_ids=None):
        px = visual.get("pixel_values")
        if visual.get("pixel_values_videos") is not None:
            raise ValueError(f"{self.family} does not take pixel_values_videos")
        if px is None or px.dim() != 4 or px.shape[0] != batch:
            raise ValueError("the fast path takes exactly one image per prompt")
        drop = self.config.vision_feature_select_strategy == "default"
        return VisualLayout("pixel_values", self.config.image_token_id, "image", drop,
                            clip_units(self.config.vision_config, batch, 1, drop),
                            tower=ClipRun("pixel_values", "image", drop))
