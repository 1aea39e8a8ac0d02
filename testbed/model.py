"""The testbed model: transformers' LLaVA architecture (``LlavaForConditionalGeneration``) at toy size.

* vision tower: CLIP ViT, 112 px, patch 14 -> 8 x 8 = 64 patches + [CLS]; 4 layers, width 96,
  4 heads; ``vision_feature_layer = -2`` (the output of layer 3 of 4) and select strategy
  ``default`` (the [CLS] is dropped: 64 visual tokens per image), exactly as LLaVA-1.5 uses CLIP;
* projector: LLaVA's 2-layer GELU MLP (96 -> 128 -> 128);
* language model: Llama, width 128, 6 layers, 4 heads (2 KV heads), MLP 256, RoPE;
* tokenizer: the repository's word-level tokenizer (:func:`llava.tiny_tokenizer.build_tiny_tokenizer`)
  with the testbed's words added; image processor: CLIP's (112 px, CLIP mean / std).

:func:`build` returns a :class:`llava.models.Runtime` with random weights (for training);
the trained model is saved with ``save_pretrained`` and loaded with ``llava.models.load(dir)``
like any real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data import EXTRA_WORDS, IMAGE_SIZE, PATCH

WEIGHTS_DIR = Path(__file__).parent / "weights"

VISION = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=96)
TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, rope_theta=10000.0)


def build_tokenizer(words=None):
    from llava.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(extra_words=EXTRA_WORDS if words is None else words)


def testbed_config(tokenizer, vision: dict | None = None, text: dict | None = None, base_vision: dict = VISION,
                   base_text: dict = TEXT):
    import transformers as tf

    vc = tf.CLIPVisionConfig(**{**base_vision, **(vision or {})})
    tc = tf.LlamaConfig(**{**base_text, **(text or {})}, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tf.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          projector_hidden_act="gelu")


def build(seed: int = 0, vision: dict | None = None, text: dict | None = None, attn_implementation: str = "sdpa",
          *, words=None, base_vision: dict = VISION, base_text: dict = TEXT, name: str = "testbed:shapes"):
    """A random-weight testbed model as a :class:`llava.models.Runtime` (fp32, CPU). ``vision`` / ``text``
    override entries of ``base_vision`` / ``base_text`` (v1's by default; testbed.model2 passes v2's)."""
    import transformers as tf

    from llava.families import images
    from llava.models import _runtime

    tok = build_tokenizer(words)
    cfg = testbed_config(tok, vision, text, base_vision, base_text)
    torch.manual_seed(seed)
    model = tf.LlavaForConditionalGeneration(cfg)
    model.set_attn_implementation(attn_implementation)
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model = model.float()
    ip = images.clip(cfg, tiny=False)  # CLIP's square crop at the tower's side, CLIP's mean / std
    return _runtime(model, tok, ip, "llava", name)


def save(rt, out: str | Path) -> None:
    """``save_pretrained`` of model (safetensors), tokenizer and image processor into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rt.model.save_pretrained(out)
    rt.tokenizer.save_pretrained(out)
    rt.processor.image_processor.save_pretrained(out)


def load(path: str | Path | None = None, **kw):
    """The shipped (or a given) testbed checkpoint through the same loader as real checkpoints."""
    from llava.models import load as llava_load

    return llava_load(str(path or WEIGHTS_DIR), dtype=kw.pop("dtype", "float32"), **kw)
