"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): Qwen2.5-VL's adapter plus DeepStack.

* Vision: a ViT with learned (interpolated) position embeddings and 2-D RoPE, every block full attention,
  a 2x2 merger, dynamic resolution, no [CLS]. A visual token is one merged 2x2 patch block; a unit is an
  image (a temporal slice for videos). Signals as Qwen2.5-VL's (:mod:`llava.families.qwen_vision`): the
  attention each merged token receives in a block (default: the last; ``qwen_saliency_layer`` picks
  another), that block's keys, the merger's MLP input as ``vision_features``.
* **DeepStack**: the tower also emits, for every merged token, one row per level of
  ``deepstack_visual_indexes`` (each block's hidden states through its own merger); the text model adds
  level i to the hidden states at the visual positions after decoder layer i. The engine carries these
  rows with the tokens (the table entry ``deepstack``, (T, L, D)): a kept token keeps its rows, a
  merged token gets its rows merged by the selection's own rule (the same weights its features get, in the
  rows' own space: for a vision-space merge this is the linear part of the merge, the rows having no
  pre-merger form here), and the text model receives them at the kept tokens' new positions
  (``visual_pos_masks``). An llm stage before the last DeepStack layer carries them through its selection
  (:mod:`llava.staged`).
* Positions: 3-D M-RoPE from the model's own ``get_rope_index`` on the full prompt (interleaved sections
  in the text model), kept tokens keep theirs, as Qwen2.5-VL.
* Fast path (:mod:`llava.fast.path`): images as Qwen2.5-VL's (the tower without windows, its position table's
  resampling planned on the host), the DeepStack rows carried with the kept tokens and added at their planned
  rows after the first decoder layers; videos run on the eager engine.
* Videos: a prompt puts a timestamp (text) and its own ``<|vision_start|>`` ... ``<|vision_end|>`` run before
  every temporal slice; a unit is a temporal slice, so each run keeps its own outputs. This repository's
  processor does not build video prompts (transformers' video processor needs torchvision): the engine
  prunes video inputs built by any processor.
"""

from __future__ import annotations

from .qwen2_5_vl import Qwen2_5_VLAdapter


class Qwen3VLAdapter(Qwen2_5_VLAdapter):
    visual_keys = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "mm_token_type_ids")
    pixel_norm = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # Qwen3-VL's and Qwen3.5's checkpoints

    def visual_layout(self, visual, batch, input_ids=None):
        """Images as Qwen2.5-VL's (the tower without windows, its DeepStack rows carried with the tokens);
        videos are refused: every temporal slice is its own vision run after its timestamp text."""
        if visual.get("pixel_values_videos") is not None:
            raise ValueError(f"{self.family} videos (a timestamp and its own vision run before every temporal slice) "
                             "run on the eager engine (the fast path plans one vision run per prompt)")
        return super().visual_layout(visual, batch)

    @property
    def deepstack_levels(self) -> int:
        """DeepStack levels: the text model adds level i after decoder layer i."""
        return len(self.core.visual.deepstack_visual_indexes)

