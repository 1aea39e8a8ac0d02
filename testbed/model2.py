"""The testbed v2 model: transformers' LLaVA architecture at LLaVA-1.5's token geometry, small widths.

* vision tower: CLIP ViT, 336 px, patch 14 -> 24 x 24 = 576 patches + [CLS]; 6 layers, width 128,
  4 heads (head size 32); ``vision_feature_layer = -2`` and select strategy ``default`` (576 visual
  tokens per image, the [CLS] dropped), as LLaVA-1.5 uses CLIP-L/336;
* projector: LLaVA's 2-layer GELU MLP (128 -> 192 -> 192);
* language model: Llama, width 192, 8 layers, 6 heads (head size 32) / 2 KV heads, MLP 512, RoPE;
* tokenizer: the repository's word-level tokenizer with v2's question, answer and caption words
  (:data:`testbed.data2.MODEL_WORDS`); image processor: CLIP's (336 px, CLIP mean / std).

About 4.6 M parameters. Head size 32 keeps the model servable by vLLM's CPU attention (which rejects 16).
The trained checkpoint lives in ``testbed/weights2`` (written by ``testbed.train2``) and is loaded with
``llava.models.load`` like any real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from . import model as M
from .data2 import IMAGE_SIZE, MODEL_WORDS, PATCH

WEIGHTS2_DIR = Path(__file__).parent / "weights2"
NAME = "testbed:shapes2"

VISION2 = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
               image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=128)
TEXT2 = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=8, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False, rope_theta=10000.0)


def build(seed: int = 0, vision: dict | None = None, text: dict | None = None, attn_implementation: str = "sdpa"):
    """A random-weight v2 model as a :class:`llava.models.Runtime` (fp32, CPU); ``vision`` / ``text``
    override entries of :data:`VISION2` / :data:`TEXT2` (the tests use narrower ones)."""
    return M.build(seed, vision, text, attn_implementation, words=MODEL_WORDS, base_vision=VISION2, base_text=TEXT2,
                   name=NAME)


save = M.save


def load(path: str | Path | None = None, **kw):
    """The v2 checkpoint (``testbed/weights2`` by default) through the loader of real checkpoints."""
    return M.load(path or WEIGHTS2_DIR, **kw)
