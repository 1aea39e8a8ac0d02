"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP ViT-L/14 with [CLS], select layer -2, the
[CLS] dropped from the LLM input (``default`` strategy) and offered to methods as an extra
candidate, MLP projector, 1-D RoPE. One unit per image (576 tokens at 336 px)."""

from __future__ import annotations

from .base import FamilyAdapter, VisualBlock
from .clip import flatten_units, run_tower


class LlavaAdapter(FamilyAdapter):
    family = "llava"
    model_class = "LlavaForConditionalGeneration"

    def encode(self, visual, want_attn, vision_layer, extra_layers=()):
        pixel_values = visual.get("pixel_values")
        if visual.get("pixel_values_videos") is not None:
            raise ValueError(f"{self.family} does not take pixel_values_videos")
        cfg = self.config
        drop = cfg.vision_feature_select_strategy == "default"
        hs, ca, ks, rc = run_tower(self.tower, pixel_values, cfg.vision_feature_layer, want_attn, vision_layer, extra_layers,
                                   stage=getattr(self, "tower_method", None), kind="image", cls_in_llm=not drop)
        flat, sizes = flatten_units(hs, ca, ks, self.core.multi_modal_projector,
                                    drop_cls=drop, kind="image", received=rc)
        return [VisualBlock(cfg.image_token_id, flat, sizes)]
