"""Video-LLaVA (``VideoLlavaForConditionalGeneration``): LanguageBind image and video towers (CLIP
layout with [CLS]), 1-D RoPE. Images: one unit each, [CLS] dropped as in LLaVA-1.5. Videos: 8
frames, each a unit of 257 tokens ([CLS] kept: the stock model feeds it), one placeholder run per
video."""

from __future__ import annotations

from .base import FamilyAdapter, VisualBlock, VisualLayout, clip_units
from .clip import flatten_units, run_tower


class VideoLlavaAdapter(FamilyAdapter):
    tower_logits = True  # CLIP: the attention signals in the official arithmetic too

    @property
    def tower(self):
        return self.core.video_tower

    def encode(self, visual, call):
        cfg = self.config
        proj = self.core.multi_modal_projector
        blocks = []
        pixel_values, videos = visual.get("pixel_values"), visual.get("pixel_values_videos")
        if pixel_values is not None:
            drop = cfg.vision_feature_select_strategy == "default"
            hs, ca, ks, rc = run_tower(self.tower_for("pixel_values"), pixel_values, cfg.vision_feature_layer, call,
                                       kind="image", cls_in_llm=not drop)
            flat, sizes = flatten_units(hs, ca, ks, proj, drop_cls=drop, kind="image", received=rc)
            blocks.append(VisualBlock(cfg.image_token_id, flat, sizes))
        if videos is not None:
            b, t = videos.shape[:2]
            hs, ca, ks, rc = run_tower(self.tower_for("pixel_values_videos"), videos.flatten(0, 1),
                                       cfg.vision_feature_layer, call, kind="frame", cls_in_llm=True)
            flat, sizes = flatten_units(hs, ca, ks, proj, drop_cls=False, kind="frame", received=rc)
            sizes = [sum(sizes[i * t:(i + 1) * t]) for i in range(b)]  # one block per video
            blocks.append(VisualBlock(cfg.video_token_id, flat, sizes))
        return blocks

    def visual_layout(self, visual, batch, input_ids=None):
        cfg = self.config
        images, videos = visual.get("pixel_values"), visual.get("pixel_values_videos")
        if images is not None and videos is not None:
            raise ValueError("the fast path takes images or videos in one batch, not both")
        vc = cfg.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        if videos is not None:
            if videos.dim() != 5 or videos.shape[0] != batch:
                raise ValueError("the fast path takes exactly one video per prompt")
            f = videos.shape[1]  # every frame a unit of n + 1 tokens ([CLS] kept, as the stock model)
            return VisualLayout("pixel_values_videos", cfg.video_token_id, "frame", False, None,
                                [clip_units(f, n + 1, False, first=b * f) for b in range(batch)])
        if images is None or images.dim() != 4 or images.shape[0] != batch:
            raise ValueError("the fast path takes exactly one image per prompt")
        drop = cfg.vision_feature_select_strategy == "default"
        return VisualLayout("pixel_values", cfg.image_token_id, "image", drop, None,
                            [clip_units(1, n + (0 if drop else 1), drop, first=b) for b in range(batch)])

    def tower_for(self, key):
        return self.core.video_tower if key == "pixel_values_videos" else self.core.image_tower
