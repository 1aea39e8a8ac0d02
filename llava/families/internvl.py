"""InternVL3 / InternVL3.5 (``InternVLForConditionalGeneration``, the ``-hf`` checkpoints): InternViT with a
[CLS] token, the model's ``pixel_shuffle`` (each 2x2 block of patches -> one token of 4 x C channels, so a
448-px tile of 32 x 32 patches gives 16 x 16 = 256 tokens), an MLP projector (LayerNorm, Linear, GELU,
Linear) on the 4 x C rows, a Qwen2 (InternVL3) or Qwen3 (InternVL3.5) language model with 1-D RoPE.

* Units: an image is tiled by the processor (dynamic tiling: up to ``max_patches`` 448-px tiles of the aspect
  ratio closest to the image, plus a thumbnail when there is more than one tile), and the model encodes every
  tile on its own: a unit is a **tile** (kind "crop"), 256 tokens in a 16 x 16 grid, patch = row-major index
  in that grid. The model has one placeholder id for everything (``<IMG_CONTEXT>``): video frames arrive as
  more tiles of ``pixel_values`` (the stock processor writes ``Frame{i}: <img>...</img>`` per frame), so a
  frame is a unit like a tile. The tiling is not an input of the model: ``unit_pos`` is -1 for every unit.
* Signals: ``cls_attn`` is the [CLS] query row of the select layer (the layer that produces
  ``hidden_states[vision_feature_layer]``, -1 = the last), recomputed from that layer's input with its own
  ``layernorm_before`` + q / k projections (and q / k norms where the checkpoint has them, InternViT-6B), fp32,
  **pooled through the model's own ``pixel_shuffle``** exactly as the features are: a token's saliency is the
  sum of the [CLS] attention of the 4 patches whose channels it concatenates; ``keys`` the head-mean keys,
  averaged over the same 4 patches. ``vision_features`` is the projector's input (the pixel-shuffled 4 x C
  row), so vision-space merges average those rows and project them with the stock projector. The [CLS] is not
  an LLM token here (strategy "default") and has no 4 x C form: it is not offered as an extra candidate.
* Positions: 1-D, kept tokens renumbered contiguously (LLaVA's convention), decode as LLaVA.

Known from the field (FasterVLM issue #4 on InternVL2): [CLS]-attention rankings can fall below random after
the pixel shuffle. We compute the pooled signal exactly and report what it measures; we do not tune it.
"""

from __future__ import annotations

import torch

from .base import (FamilyAdapter, TokenTable, VisualLayout, VisualUnits, join_units,
                   uniform_units)


def cls_signals(layer: torch.nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The [CLS] query row per head (n, H, S) and the head-mean keys (n, S, d) of an InternViT ``layer``,
    fp32, from its input ``h`` (n, S, C) with its own ``layernorm_before``, q / k projections and q / k norms
    (``Identity`` unless the checkpoint uses qk-norm), as the layer computes its attention."""
    attn = layer.attention
    xn = layer.layernorm_before(h)
    n, s, _ = xn.shape
    heads, d = attn.num_heads, attn.head_dim
    k = attn.k_norm(attn.k_proj(xn)).view(n, s, heads, d).float()
    q = attn.q_norm(attn.q_proj(xn[:, :1])).view(n, 1, heads, d).float()
    scores = torch.einsum("nqhd,nshd->nhqs", q, k) * attn.scale
    return scores.softmax(-1)[:, :, 0], k.mean(2)


class InternVLAdapter(FamilyAdapter):
    visual_keys = ("pixel_values", "pixel_values_videos", "image_sizes")
    pixel_keys = ("pixel_values",)

    @property
    def num_vision_layers(self) -> int:
        return len(self.tower.encoder.layer)

    @property
    def patch_grid(self) -> int:
        """Patches per side of one tile (32 at 448 px / patch 14)."""
        vc = self.config.vision_config
        return vc.image_size[0] // vc.patch_size[0]

    @property
    def shuffle(self) -> int:
        """Patches per side of one LLM token (2 for ``downsample_ratio`` 0.5)."""
        return int(round(1 / self.config.downsample_ratio))

    def grid(self) -> tuple[int, int]:
        g = self.patch_grid // self.shuffle
        return (g, g)

    def attention_layer(self, vision_layer: int | None) -> int:
        """The encoder layer whose attention defines the signals: the one producing ``hidden_states[v]``
        (hidden_states[0] is the embedding output; v = the method's ``vision_layer`` or the select layer)."""
        v = self.config.vision_feature_layer if vision_layer is None else vision_layer
        if not isinstance(v, int):
            raise ValueError("InternVL vision signals need a single vision_feature_layer")
        n = self.num_vision_layers
        idx = (v % (n + 1)) - 1
        if idx < 0:
            raise ValueError(f"vision layer {v} is the embedding output: it has no attention")
        return idx

    def pool(self, per_patch: torch.Tensor, how: str) -> torch.Tensor:
        """(n, P, c) per-patch rows of n tiles (P = patch_grid^2, [CLS] removed) -> (n * m, c) per LLM token,
        pushed through the model's own ``pixel_shuffle`` (the features' path) and then summed (``how="sum"``)
        or averaged over the shuffle^2 patches each token concatenates."""
        n, p, c = per_patch.shape
        g = self.patch_grid
        if p != g * g:
            raise ValueError(f"InternVL: {p} patches per tile, expected {g}x{g}")
        x = per_patch.reshape(n, g, g, c).contiguous()
        x = self.core.pixel_shuffle(x, scale_factor=self.config.downsample_ratio)  # (n, g/s, g/s, s*s*c)
        x = x.reshape(-1, self.shuffle ** 2, c)
        return x.sum(1) if how == "sum" else x.mean(1)

    def pooled_signals(self, layer: torch.nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer``'s [CLS] attention (n * m, H) and head-mean keys (n * m, d) per LLM token, from its input ``h``
        (n, 1 + P, C): :func:`cls_signals` without the [CLS] column, through the pixel shuffle (summed / averaged)."""
        ca, ks = cls_signals(layer, h)  # (n, H, 1 + P), (n, 1 + P, d)
        return self.pool(ca[:, :, 1:].transpose(1, 2), "sum"), self.pool(ks[:, 1:], "mean")

    def layout(self, visual):
        if visual.get("pixel_values_videos") is not None:
            raise ValueError("InternVL takes video frames as pixel_values (its processor merges them with the "
                             "images), not pixel_values_videos")
        px = visual.get("pixel_values")
        # a unit per tile; pixel_values does not say which tiles are whose: each tile is a run of its own
        return [] if px is None else [VisualLayout("pixel_values", self.config.image_token_id, "crop", False,
                                                   self._units([1] * px.shape[0]))]

    def encode(self, visual, layouts, call):
        if call.reads:
            raise ValueError(f"{self.family}: attention of extra vision layers (Method.vision_attention_layers) "
                             "is available for the CLIP towers (LLaVA-1.5, NeXT, Video-LLaVA) only")
        cfg = self.config
        if cfg.vision_feature_select_strategy != "default":
            raise ValueError(f"InternVL: vision_feature_select_strategy {cfg.vision_feature_select_strategy!r} "
                             "is not supported (the pixel shuffle needs the [CLS] removed: 'default')")
        if not layouts:
            return []
        px = visual["pixel_values"]
        captured, handles = {}, []

        def grab(key):
            def pre_hook(module, args, kwargs):
                captured[key] = args[0] if args else next(iter(kwargs.values()))
            return pre_hook

        layer = None
        try:
            if call.attention:
                layer = self.tower.encoder.layer[self.attention_layer(call.layer)]
                handles.append(layer.register_forward_pre_hook(grab("h"), with_kwargs=True))
            handles.append(self.core.multi_modal_projector.register_forward_pre_hook(grab("proj"), with_kwargs=True))
            # the stock feature path, so the features are bit-identical to what the stock forward splices
            feats = self.core.get_image_features(pixel_values=px, vision_feature_layer=cfg.vision_feature_layer,
                                                 vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                                 return_dict=True).pooler_output
        finally:
            for handle in handles:
                handle.remove()
        n, m, _ = feats.shape
        table = TokenTable(feats.reshape(n * m, -1), captured["proj"].reshape(n * m, -1))
        if call.attention:
            table.cls_attn, table.keys = self.pooled_signals(layer, captured["h"])
        return [table]

    def _units(self, tiles: list[int]) -> VisualUnits:
        """The host layout of images of ``tiles`` tiles each: a unit per tile, its tokens in the pixel shuffle's
        raster order."""
        g = self.grid()
        return join_units([uniform_units(1, n, g[0] * g[1], torch.arange(g[0] * g[1]), g) for n in tiles])

    # ---------------------------------------------------------------- the captured executor's half (llava.fast)
    def visual_layout(self, visual, batch, input_ids=None):
        """One image per prompt: its tiles are one run of ``<IMG_CONTEXT>`` tokens (m per tile), so a prompt's
        tile count is its placeholder count / m, read from the host ids (``pixel_values`` holds every prompt's
        tiles in order and nothing says which are whose). A unit per tile. Video frames (a ``Frame{i}: <img>``
        run each) are several runs per prompt: the plan refuses them."""
        cfg = self.config
        if visual.get("pixel_values_videos") is not None:
            raise ValueError("InternVL takes video frames as pixel_values, not pixel_values_videos")
        if cfg.vision_feature_select_strategy != "default" or not isinstance(cfg.vision_feature_layer, int):
            raise ValueError("the fast path plans InternVL with strategy 'default' and one vision_feature_layer")
        px = visual.get("pixel_values")
        if px is None or input_ids is None:
            raise ValueError("InternVL's fast plan needs pixel_values and the prompt's ids")
        g = self.grid()
        m = g[0] * g[1]
        counts = (input_ids == cfg.image_token_id).sum(1).tolist()  # host ids: no device read
        if any(c % m or not c for c in counts):
            raise ValueError(f"InternVL: every prompt needs one image (a multiple of {m} placeholders per prompt)")
        tiles = [c // m for c in counts]
        if sum(tiles) != px.shape[0]:
            raise ValueError(f"InternVL: {px.shape[0]} tiles in pixel_values, the prompts hold {sum(tiles)}")
        return VisualLayout("pixel_values", cfg.image_token_id, "crop", False, self._units(tiles),
                            tower=("internvl", int(px.shape[0])), tower_tensors={})

    def encode_static(self, pixels, tower, tensors, call):
        """The stock ``get_image_features`` (tower, select layer, [CLS] dropped, ``pixel_shuffle``, projector) with
        the select layer's input read from ``hidden_states`` (what the eager pre-hook captures) for the signals."""
        cfg, core = self.config, self.core
        v = cfg.vision_feature_layer
        out = self.tower(pixel_values=pixels.to(dtype=core.dtype), return_dict=True,
                         output_hidden_states=call.attention or v != -1)
        states = (out.last_hidden_state if v == -1 else out.hidden_states[v])[:, 1:, :]
        n, p, c = states.shape
        side = int(p ** 0.5)
        shuffled = core.pixel_shuffle(states.reshape(n, side, side, c), scale_factor=cfg.downsample_ratio)
        rows = shuffled.reshape(n, -1, shuffled.shape[-1])
        res = {"features": core.multi_modal_projector(rows).reshape(-1, cfg.text_config.hidden_size),
               "vision_features": rows.reshape(-1, rows.shape[-1])}
        if call.attention:
            idx = self.attention_layer(call.layer)  # the method's layer, as encode reads it
            res["cls_attn"], res["keys"] = self.pooled_signals(self.tower.encoder.layer[idx], out.hidden_states[idx])
        return res

    def signal_widths(self):
        vc = self.config.vision_config
        return vc.num_attention_heads, vc.hidden_size // vc.num_attention_heads, vc.hidden_size * self.shuffle ** 2
