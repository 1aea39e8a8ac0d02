"""Tiny random-weight checkpoints vLLM can load, for the plugin's tests: a local folder in the hub's layout
(``config.json``, ``model.safetensors``, tokenizer, processor).

Differences from ``llava.models.build_tiny`` (the engine's tiny models), each forced by vLLM:
- the LLM's head size is 32 (hidden 128, 4 heads): vLLM's CPU attention takes 32, 64, 80, ... only;
- the CLIP tower's weights are stored under ``vision_tower.vision_model.`` (real llava-hf checkpoints' keys,
  which vLLM's LLaVA loader expects), whatever the installed transformers writes;
- the tower sees 112 px images (8 x 8 = 64 patches), so that budgets of 8-32 prune.
"""

from __future__ import annotations

from pathlib import Path

import torch


def llava_config(vocab_size: int, image_token_id: int, pad_token_id: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                              image_size=112, patch_size=14, projection_dim=64)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       pad_token_id=pad_token_id, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", tie_word_embeddings=False)


def _hub_keys(path: Path) -> None:
    """Rewrite the saved tower keys to ``vision_tower.vision_model.*`` where transformers wrote them flat."""
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    sd = load_file(str(f))
    out = {}
    for k, v in sd.items():
        for pre in ("model.vision_tower.", "vision_tower."):
            if k.startswith(pre) and not k.startswith(pre + "vision_model."):
                k = pre + "vision_model." + k[len(pre):]
                break
        out[k] = v
    if out.keys() != sd.keys():
        save_file(out, str(f), metadata={"format": "pt"})


def save_tiny_llava(path: str | Path, seed: int = 0) -> Path:
    """A tiny LLaVA-1.5 checkpoint at ``path`` (random weights from ``seed``) that vLLM and
    ``llava.load(path)`` both load; returns the path."""
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    from llava.tiny_tokenizer import build_tiny_tokenizer

    path = Path(path)
    tok = build_tiny_tokenizer()
    cfg = llava_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    _hub_keys(path)
    ip = CLIPImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>")
    proc.save_pretrained(path)
    return path
