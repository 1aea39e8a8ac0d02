"""Qwen2-VL (``Qwen2VLForConditionalGeneration``, transformers 5.23): Qwen2.5-VL's adapter on Qwen2-VL's tower.

What is shared with Qwen2.5-VL (:mod:`llava.families.qwen2_5_vl`): the language model (a Qwen2 decoder with 3-D
M-RoPE, sections not interleaved), the prompt (ChatML with the default system turn,
``<|vision_start|><|image_pad|><|vision_end|>``, template ``qwen2_vl``), the image processor
(``Qwen2VLImageProcessor``: patch 14, merge 2, temporal patch 2, CLIP mean / std), the positions (the model's own
``get_rope_index``, kept tokens keep theirs) and the visual token (a 2x2-merged patch block; a unit is an image, a
temporal slice for videos).

What differs is the vision tower (``Qwen2VisionTransformerPretrainedModel``): every block attends fully within its
image (no window attention, no window permutation, no ``fullatt_block_indexes``: merged raster order throughout, as
Qwen3-VL's tower), LayerNorm instead of RMSNorm, an MLP of ``fc1`` / ``fc2`` (QuickGELU by default), and a ``PatchMerger`` (``ln_q`` +
``mlp``) as Qwen2.5-VL's. Its config names the tower's width ``embed_dim`` (``vision_config.hidden_size`` is the
merger's output width, the LLM's). The signals are :mod:`llava.families.qwen_vision`'s, unchanged: the blocks have
the same fused ``qkv``, vision RoPE and ``scaling``; the attention a merged token receives in a block (default: the
last, every block being full attention; ``qwen_saliency_layer`` picks another), that block's keys, and
``merger.ln_q`` of the 4 patches as ``vision_features`` (the merger's MLP input). ``get_rope_index`` takes no
``second_per_grid_ts``: a video's time axis counts temporal slices (the processor does not emit it for this family).

Fast path (:mod:`llava.fast.path`): images and videos as Qwen2.5-VL's (:func:`qwen_vision.tower_plan` /
:func:`qwen_vision.run_static` without windows, one segment per image / temporal slice), one vision run per prompt.
"""

from __future__ import annotations

from .qwen2_5_vl import Qwen2_5_VLAdapter


class Qwen2VLAdapter(Qwen2_5_VLAdapter):
    # ``second_per_grid_ts`` stays a visual key: a processor built for Qwen2.5-VL may hand it over; never the LLM's
    visual_keys = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "mm_token_type_ids",
                   "second_per_grid_ts")

    def signal_widths(self):
        """(heads, head width, merger input width) of the tower: Qwen2-VL's tower width is ``embed_dim``."""
        vc = self.config.vision_config
        merge = vc.spatial_merge_size
        return vc.num_heads, vc.embed_dim // vc.num_heads, vc.embed_dim * merge * merge
