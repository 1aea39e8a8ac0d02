"""Video-LLaVA (``VideoLlavaForConditionalGeneration``): LanguageBind image and video towers (CLIP
layout with [CLS]), 1-D RoPE. Images: one unit each, [CLS] dropped as in LLaVA-1.5. Videos: 8
frames, each a unit of 257 tokens ([CLS] kept: the stock model feeds it), one placeholder run per
video."""

from __future__ import annotations

from .base import VisualBlock, VisualLayout
from .clip import ClipAdapter, ClipRun, clip_table, clip_units, run_tower


class VideoLlavaAdapter(ClipAdapter):
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
            blocks.append(VisualBlock(cfg.image_token_id, "image", clip_table(hs, ca, ks, proj, drop, rc),
                                      clip_units(cfg.vision_config, hs.shape[0], 1, drop)))
        if videos is not None:  # every frame a unit ([CLS] kept, as the stock model), one placeholder run per video
            b, t = videos.shape[:2]
            hs, ca, ks, rc = run_tower(self.tower_for("pixel_values_videos"), videos.flatten(0, 1),
                                       cfg.vision_feature_layer, call, kind="frame", cls_in_llm=True)
            blocks.append(VisualBlock(cfg.video_token_id, "frame", clip_table(hs, ca, ks, proj, False, rc),
                                      clip_units(cfg.vision_config, b, t, False)))
        return blocks

    def visual_layout(self, visual, batch, input_ids=None):
        cfg = self.config
        images, videos = visual.get("pixel_values"), visual.get("pixel_values_videos")
        if images is not None and videos is not None:
            raise ValueError("the fast path takes images or videos in one batch, not both")
        if videos is not None:
            if videos.dim() != 5 or videos.shape[0] != batch:
                raise ValueError("the fast path takes exactly one video per prompt")
            return VisualLayout("pixel_values_videos", cfg.video_token_id, "frame", False,
                                clip_units(cfg.vision_config, batch, videos.shape[1], False),
                                tower=ClipRun("pixel_values_videos", "frame", False))
        if images is None or images.dim() != 4 or images.shape[0] != batch:
            raise ValueError("the fast path takes exactly one image per prompt")
        drop = cfg.vision_feature_select_strategy == "default"
        return VisualLayout("pixel_values", cfg.image_token_id, "image", drop,
                            clip_units(cfg.vision_config, batch, 1, drop), tower=ClipRun("pixel_values", "image", drop))

    def tower_for(self, key):
        return self.core.video_tower if key == "pixel_values_videos" else self.core.image_tower
