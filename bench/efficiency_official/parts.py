"""What bench.efficiency_official measures, built once per model: the vision tower, the decoder layers up to
FastV's K and the rotary embedding (:class:`Parts`), either alone with random weights from a shipped ``shape:``
config or taken from a whole loaded model; and FastV's K for that depth."""

from __future__ import annotations

import copy
import json
import types
from dataclasses import dataclass

import torch


@dataclass
class Parts:
    name: str
    family: str
    config: object  # the full LLaVA config (vision_feature_layer, vision_config, text_config)
    rt: object  # a llava.models.Runtime whose processor gives the prompt layout
    tower: torch.nn.Module  # CLIPVisionModel
    layers: torch.nn.ModuleList  # decoder layers 0..K-1 at least
    rotary: torch.nn.Module
    num_layers: int  # decoder layers of the real LLM
    built: str  # what was instantiated


def _dtype(s):
    from llava.dtypes import parse_dtype as conv

    return conv(s)


def measured(family: str) -> bool:
    """The families measured here: the CLIP-tower image models, LLaVA-1.5 and LLaVA-NeXT (the official code's own
    models), whose tower and decoder layers are built apart."""
    from llava.families import registry

    f = registry.get(family)
    return f.tower == "clip" and not f.video_model


def build_parts(name: str, dtype, device, next_layout: str, fastv_layer: int) -> Parts:
    """``shape:<cfg>``: vision tower + decoder layers 0..K-1 only (random weights, the shipped
    config). Anything else (``tiny:<family>``, a checkpoint): the whole model via llava.models.load."""
    import transformers as tf

    from llava import models as M
    from llava.families import registry

    if name.startswith("shape:"):
        key = name.split(":", 1)[1]
        if key not in M.SHAPES:
            raise ValueError(f"unknown shape config {key!r}; shipped: {', '.join(sorted(M.SHAPES))}")
        raw = json.loads(M.SHAPES[key].read_text())
        cfg = tf.AutoConfig.for_model(**{k: v for k, v in raw.items() if not k.startswith("_") and k != "hub_id"})
        fam = M.family_of(cfg)
        if not measured(fam):
            raise ValueError(f"{name}: only LLaVA-1.5 / LLaVA-NeXT shapes are measured here, not {fam}")
        from llava.tiny_tokenizer import build_tiny_tokenizer

        tok = build_tiny_tokenizer()
        cfg.image_token_id = tok.convert_tokens_to_ids("<image>")
        ip = registry.get(fam).image_processors.build(cfg, False)
        rt = M._runtime(types.SimpleNamespace(config=cfg), tok, ip, fam, name, None, next_layout)
        n_layers = cfg.text_config.num_hidden_layers
        k = _fastv_k(fastv_layer, n_layers, cfg.vision_config.num_hidden_layers, fam)
        tc = copy.deepcopy(cfg.text_config)
        tc.num_hidden_layers = k  # layers 0..K-1; K-1 is the one measured
        tc.vocab_size, tc.pad_token_id = 8, None  # the embedding table is never used
        dt = _dtype(dtype) or torch.float32
        torch.manual_seed(0)
        with torch.device(device or "cpu"):
            tower = tf.CLIPVisionModel._from_config(copy.deepcopy(cfg.vision_config), dtype=dt,
                                                    attn_implementation="sdpa")
            lm = tf.LlamaModel._from_config(tc, dtype=dt, attn_implementation="sdpa")
        tower.eval()
        lm.eval()
        return Parts(name, fam, cfg, rt, tower, lm.layers, lm.rotary_emb, n_layers,
                     f"vision tower + decoder layers 0..{k - 1} of llava/configs/{key}.json (random weights, "
                     "the rest of the model not built)")
    rt = M.load(name, dtype=dtype, device=device, next_layout=next_layout)
    if not measured(rt.family):
        raise ValueError(f"{name}: only LLaVA-1.5 / LLaVA-NeXT models are measured here, not {rt.family}")
    core = rt.model.model
    lm = core.language_model
    return Parts(name, rt.family, rt.model.config, rt, core.vision_tower, lm.layers, lm.rotary_emb,
                 len(lm.layers), "the whole model (llava.models.load)")


def _fastv_method(fastv_layer: int, n_layers: int, n_vision: int, family: str, budget=None):
    from baselines.fastv import FastV

    m = FastV(budget, layer=fastv_layer)
    m.setup(num_layers=n_layers, num_vision_layers=n_vision, family=family)
    return m


def _fastv_k(fastv_layer, n_layers, n_vision, family) -> int:
    return _fastv_method(fastv_layer, n_layers, n_vision, family).k_layer


def units_per_image(parts: Parts) -> int:
    from llava.families import registry

    return 5 if registry.get(parts.family).layout == "anyres" else 1
