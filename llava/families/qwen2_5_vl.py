"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``), and Qwen2-VL's layout through the same code.

* Vision: a windowed ViT with a few full-attention blocks, a 2x2 ``PatchMerger``, dynamic resolution
  (every image its own grid), no [CLS]. A visual token is one merged 2x2 patch block; a unit is an
  image (a temporal slice for videos). The tower runs once through the stock ``get_image_features``
  (bit-identical features); signals come from :mod:`llava.families.qwen_vision`.
* Saliency where [CLS]-based methods read ``cls_attn`` (VisionZip, FasterVLM, AttnMix, ConsensusDrop's
  encoder signal, VisionDrop's encoder stage): the attention each merged token **receives** in the
  last full-attention block (mean over the image's queries, summed over its 4 patches, per head),
  as the published Qwen ports of these methods do; option ``qwen_saliency="pooled_query"`` uses a
  pooled query row instead (cheaper, O(S d)); ``qwen_saliency_layer`` picks another full-attention
  block. ``keys``: that block's head-mean keys before RoPE, averaged over the 4 patches;
  ``vision_features``: the merger's MLP input (4 x C), so vision-space merges are projected by the
  merger's MLP. On request (a method's ``vision_group_mean_blocks``) ``group_mean``: a block's output averaged
  over each merged token's 4 patches (the last block's: the merger's input before its norm).
* Positions: 3-D M-RoPE (t, h, w) from the model's own ``get_rope_index``, computed on the full
  prompt before pruning; kept tokens **keep** their original 3-D positions and text keeps its own,
  so generate()'s decode positions need no mapping. A method's ``reindex`` position mode is mapped
  to ``keep`` (there is no contiguous count to renumber: an image spans max(h, w)/2 positions).
* Prompt: ``<|vision_start|>`` + n x ``<|image_pad|>`` + ``<|vision_end|>``; ``mm_token_type_ids``
  (1 = image, 2 = video) is rebuilt from the ids when missing, because without it transformers
  silently falls back to 1-D positions.
* Fast path (:mod:`llava.fast.path`): one image or video per prompt; the tower's segments, windows and
  rotary tables planned from the grids (:func:`qwen_vision.tower_plan`) and run with static shapes inside
  the captured prefill (:func:`qwen_vision.run_static`, bit-identical to the stock tower); the positions of
  the unpruned prompt from ``get_rope_index`` on the host ids (:meth:`rope_positions`, as the eager engine).
"""

from __future__ import annotations

import torch

from . import qwen_kept, qwen_vision
from .base import FamilyAdapter, TokenTable, VisualLayout, packed_units
from .images import CLIP_MEAN_STD

SALIENCY = qwen_vision.SALIENCY_KINDS


class Qwen2_5_VLAdapter(FamilyAdapter):
    visual_keys = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "mm_token_type_ids",
                   "second_per_grid_ts")
    keeps_positions = True
    #: Qwen2-VL's and Qwen2.5-VL's checkpoints normalise with CLIP's mean / std (Qwen3-VL's and Qwen3.5's: 0.5 / 0.5)
    pixel_norm = CLIP_MEAN_STD

    def __init__(self, model, qwen_saliency: str = "received", qwen_saliency_layer: int | None = None, **options):
        super().__init__(model, **options)
        if qwen_saliency not in SALIENCY:
            raise ValueError(f"qwen_saliency must be one of {SALIENCY}, got {qwen_saliency!r}")
        self.saliency = qwen_saliency
        self.saliency_layer = qwen_saliency_layer

    @property
    def tower(self):
        return self.core.visual

    @property
    def num_vision_layers(self) -> int:
        return len(self.core.visual.blocks)

    def layout(self, visual):
        """Per kind present (images, then videos) its merged tokens in the LLM's order, from the grids
        (``image_grid_thw`` / ``video_grid_thw``, read once on the host; :func:`qwen_vision.token_layout`): an
        image's in raster order (one unit), a video's temporal slices one after the other (a unit each)."""
        cfg = self.config
        out = []
        for key, grid_key, token_id in (("pixel_values", "image_grid_thw", cfg.image_token_id),
                                        ("pixel_values_videos", "video_grid_thw", cfg.video_token_id)):
            if visual.get(key) is None:
                continue
            video = key == "pixel_values_videos"
            grid = visual.get(grid_key)
            if grid is None:
                raise ValueError(f"{self.family} needs {grid_key} with its pixels")
            grid_h = (grid.cpu() if torch.is_tensor(grid) else torch.tensor(grid)).long().reshape(-1, 3)
            unit, patch, grids, sizes, _, counts = qwen_vision.token_layout(grid_h.tolist(),
                                                                            int(self.core.visual.spatial_merge_size))
            out.append(VisualLayout(key, token_id, "frame" if video else "image", False,
                                    packed_units(unit, patch, grids, sizes, counts), meta={grid_key: grid_h}))
        return out

    def pixel_units(self, visual, lay):
        """Per image of ``lay`` its merged tokens' pixels (:func:`qwen_vision.token_pixels`); videos: None."""
        if lay.kind != "image":
            return None
        vc = self.config.vision_config
        return qwen_kept.token_pixels(visual[lay.key], lay.meta["image_grid_thw"].tolist(), vc.patch_size,
                                        vc.temporal_patch_size, int(self.core.visual.spatial_merge_size),
                                        self.pixel_norm)

    def encode(self, visual, layouts, call):
        # group_mean at block b: its output averaged over each merged token's 4 patches (the method's
        # ``vision_group_mean_blocks``: MMTok's official vision -> vision space)
        means = {r.layer: r.names[0] for r in call.reads if r.kind == "group_mean"}
        if len(means) != len(call.reads):
            raise ValueError(f"{self.family}: attention of extra vision layers (Method.vision_attention_layers) "
                             "is available for the CLIP towers (LLaVA-1.5, NeXT, Video-LLaVA) only")
        # ``call.layer`` (a CLIP hidden-state index) has no meaning for this tower: the block is
        # ``qwen_saliency_layer`` (default: the last full-attention block)
        tables = []
        for lay in layouts:
            video = lay.kind == "frame"
            grid_key = "video_grid_thw" if video else "image_grid_thw"
            kept = None  # after a pre-tower stage: its kept tokens' patches only
            if lay.kept is not None:
                kept = qwen_kept.kept_tower_inputs(self.core.visual, lay.meta[grid_key].tolist(), lay.kept,
                                                   visual[lay.key].device)
            v = qwen_vision.encode(self.model, visual[lay.key], visual[grid_key], want_attn=call.attention,
                                   layer=self.saliency_layer, saliency=self.saliency, video=video,
                                   group_mean=tuple(means), grid=lay.meta[grid_key].tolist(),  # read by layout
                                   kept=kept)
            table = TokenTable(v.features, v.vision_features, deepstack=v.deepstack)  # DeepStack: Qwen3-VL
            if v.saliency is not None:
                table.cls_attn, table.keys = v.saliency.T, v.keys
            for b, rows in (v.group_mean or {}).items():
                table.tower[means[b]] = rows
            tables.append(table)
        return tables

    def project(self, vision_features):
        return qwen_vision.project(self.model, vision_features)

    def grid(self) -> tuple[int, int]:
        return (0, 0)  # dynamic resolution: every image has its own grid (``patch`` is its merged raster index)

    # ---------------------------------------------------------------- the captured executor's half (llava.fast)
    def visual_layout(self, visual, batch, input_ids=None):
        """One image or one video per prompt (:meth:`layout`). The tower runs inside the captured prefill with every
        segment / window / rotary index planned from the grids (:func:`qwen_vision.tower_plan`); the host plan of the
        positions reads the grids and a video's ``second_per_grid_ts`` (``meta``)."""
        video = visual.get("pixel_values_videos") is not None
        if video and visual.get("pixel_values") is not None:
            raise ValueError("a batch of images and videos runs on the eager engine (the fast path plans one kind)")
        key, grid_key = ("pixel_values_videos", "video_grid_thw") if video else ("pixel_values", "image_grid_thw")
        px = visual.get(key)
        if px is None or visual.get(grid_key) is None:
            raise ValueError(f"{self.family} needs {key} and {grid_key}")
        (lay,) = self.layout(visual)
        rows = lay.meta[grid_key].tolist()
        if len(rows) != batch:
            raise ValueError(f"the fast path takes exactly one {'video' if video else 'image'} per prompt")
        if px.dim() != 2 or px.shape[0] != sum(t * h * w for t, h, w in rows):
            raise ValueError(f"{self.family} {key} do not match {grid_key}")
        plan, tensors = qwen_vision.tower_plan(self.core.visual, rows, self.saliency_layer, self.saliency)
        if not video and any(t != 1 for t, _, _ in rows):
            raise ValueError(f"{self.family}: an image of {next(t for t, _, _ in rows if t != 1)} temporal patches")
        meta = dict(lay.meta)
        if video and visual.get("second_per_grid_ts") is not None:  # the M-RoPE time axis (Qwen2.5-VL)
            ts = visual["second_per_grid_ts"]
            meta["second_per_grid_ts"] = ts.cpu() if torch.is_tensor(ts) else torch.tensor(ts)
        return lay._replace(tower=plan, tower_tensors=tensors, meta=meta)

    def encode_static(self, pixels, tower, tensors, call):
        out = qwen_vision.run_static(self.model, pixels, tower, tensors, call.attention)
        if call.attention:
            out["cls_attn"] = out.pop("saliency").T
        return out

    def signal_widths(self):
        vc = self.config.vision_config
        merge = vc.spatial_merge_size
        return vc.num_heads, vc.hidden_size // vc.num_heads, vc.hidden_size * merge * merge

    # ---------------------------------------------------------------- positions
    def caller_positions(self, position_ids):
        if position_ids.dim() == 3 and position_ids.shape[0] == 4:  # generate(): text row + 3 M-RoPE rows
            return position_ids[1:]
        if position_ids.dim() == 3 and position_ids.shape[0] == 3:
            return position_ids
        raise ValueError(f"{self.family} takes 3-D position ids (3 or 4, batch, length); leave position_ids "
                         "unset to have them computed from the prompt")

    def keep_rope_deltas(self, deltas) -> None:
        self.core.rope_deltas = deltas

    def rope_positions(self, input_ids, attention_mask, visual: dict):
        """The unpruned prompt's M-RoPE positions (3, B, L) and their deltas, by the model's own ``get_rope_index``
        from the ids and the grids in ``visual`` (``mm_token_type_ids`` rebuilt from the ids where it is missing:
        transformers would silently fall back to 1-D positions without it); the eager engine calls it on the
        device tensors, the fast path's host plan on their host copies."""
        types = visual.get("mm_token_type_ids")
        if types is None:
            cfg = self.config
            types = (input_ids == cfg.image_token_id).int() + 2 * (input_ids == cfg.video_token_id).int()
        return self.core.get_rope_index(
            input_ids, types, image_grid_thw=visual.get("image_grid_thw"), video_grid_thw=visual.get("video_grid_thw"),
            second_per_grid_ts=visual.get("second_per_grid_ts"), attention_mask=attention_mask)

    def decode_positions(self, position_ids):
        if position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] == 4:
            return position_ids[1:]
        if position_ids is not None and position_ids.dim() == 2:
            raise ValueError(f"{self.family} decode steps take 3-D position ids (as generate() passes them) or none")
        return position_ids

    @staticmethod
    def mask_positions(pos):
        return None  # as the stock text model with 3 rows: the explicit 2-D mask decides (no packing guess)
