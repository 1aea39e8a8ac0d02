"""Video-LLaVA (``VideoLlavaForConditionalGeneration``): LanguageBind image and video towers (CLIP
layout with [CLS]), 1-D RoPE. Images: one unit each, [CLS] dropped as in LLaVA-1.5. Videos: 8
frames, each a unit of 257 tokens ([CLS] kept: the stock model feeds it), one placeholder run per
video."""

from __future__ import annotations

from .clip import ClipAdapter


class VideoLlavaAdapter(ClipAdapter):
    @property
    def tower(self):
        return self.core.video_tower

    def layout(self, visual):
        images, videos = visual.get("pixel_values"), visual.get("pixel_values_videos")
        out = []
        if images is not None:
            drop = self.config.vision_feature_select_strategy == "default"
            out.append(self.clip_layout("pixel_values", "image", images.shape[0], 1, drop))
        if videos is not None:  # every frame a unit ([CLS] kept, as the stock model), one placeholder run per video
            out.append(self.clip_layout("pixel_values_videos", "frame", videos.shape[0], videos.shape[1], False))
        return out

    def visual_layout(self, visual, batch, input_ids=None):
        images, videos = visual.get("pixel_values"), visual.get("pixel_values_videos")
        if images is not None and videos is not None:
            raise ValueError("the fast path takes images or videos in one batch, not both")
        if videos is not None:
            if videos.dim() != 5 or videos.shape[0] != batch:
                raise ValueError("the fast path takes exactly one video per prompt")
        elif images is None or images.dim() != 4 or images.shape[0] != batch:
            raise ValueError("the fast path takes exactly one image per prompt")
        return self.layout(visual)[0]

    def tower_for(self, key):
        return self.core.video_tower if key == "pixel_values_videos" else self.core.image_tower
