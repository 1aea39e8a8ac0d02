"""Loading LLaVA-family models on transformers: real checkpoints (hub id or local directory), the
real architectures with random weights from shipped shape configs (no download), and tiny
random-weight models of each family for tests.

    rt = load("llava-hf/llava-1.5-7b-hf", dtype="float16", device="cuda")
    rt = load("shape:llava-1.5-7b", dtype="bfloat16", device="cuda")   # real size, random weights
    rt = load("tiny:llava-next")                                       # seconds, on CPU
    inputs = rt.processor(["What is this?"], [image])
    rt.prune("consensusdrop", 64)   # = attach(rt.model, "consensusdrop", 64, prompt_spec=rt.prompt_spec(), ...)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .conversation import Template, get_template
from .engine import PromptSpec, PruningEngine, attach
from .preprocess import PromptProcessor, llava_tokenize

CONFIG_DIR = Path(__file__).parent / "configs"
SHAPES = {p.stem: p for p in CONFIG_DIR.glob("*.json")}
TINY = ("llava", "llava-next", "video-llava")
DEFAULT_TEMPLATE = {"llava": "vicuna_v1", "llava_next": "vicuna_v1", "video_llava": "llava_v1"}
MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "video_llava": "VideoLlavaForConditionalGeneration",
}


@dataclass
class Runtime:
    """A loaded model with LLaVA's own processor, template and (optionally) a pruning engine."""

    model: torch.nn.Module
    processor: PromptProcessor
    family: str
    name: str
    engine: PruningEngine | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def template(self) -> Template:
        return self.processor.template

    def prompt_spec(self) -> PromptSpec:
        """Separator and role-tag token ids, so the engine can find the question tokens."""
        return prompt_spec_for(self.tokenizer, self.template)

    def prune(self, method="none", budget: int | None = None, **options) -> PruningEngine:
        """Attach a method (replacing any previous one); ``model.generate`` then prunes."""
        self.engine = attach(self.model, method, budget, next_layout=self.processor.next_layout,
                             prompt_spec=self.prompt_spec(), **options)
        return self.engine

    def unprune(self) -> None:
        if self.engine is not None:
            self.engine.remove()
            self.engine = None


def prompt_spec_for(tokenizer, template: Template | str) -> PromptSpec:
    """The separator and role-tag token ids of ``template`` (a name such as 'vicuna_v1' or a
    Template) under ``tokenizer``: what the engine strips to find the question tokens."""
    tmpl = get_template(template) if isinstance(template, str) else template
    sep = llava_tokenize(tokenizer, "<image>\n", "<image>", -1, [1])[2:] if tokenizer.bos_token_id is not None else []
    probe = "<image>\nwhat"
    a = llava_tokenize(tokenizer, probe + tmpl.role_tag, "<image>", -1, [1])
    b = llava_tokenize(tokenizer, probe, "<image>", -1, [1])
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return PromptSpec(sep_ids=tuple(t for t in sep if t != -1), tail_ids=tuple(a[k:]))


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
            "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}[str(dtype)]


def tiny_config(family: str, vocab_size: int, image_token_id: int, video_token_id: int | None = None):
    """A tiny random-weight config of each architecture: CLIP 56 px / patch 14 (16 patches + [CLS]),
    3 vision layers (select layer -2 = layer 1), Llama width 64, 4 layers, 4 heads, 2 KV heads."""
    import transformers as tf

    vc = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                             image_size=56, patch_size=14, projection_dim=32)
    tc = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=1024,
                        tie_word_embeddings=False)
    common = dict(vision_config=vc, text_config=tc, image_token_id=image_token_id,
                  vision_feature_layer=-2, vision_feature_select_strategy="default")
    if family == "llava":
        return tf.LlavaConfig(**common)
    if family == "llava_next":
        return tf.LlavaNextConfig(**common, image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]])
    if family == "video_llava":
        return tf.VideoLlavaConfig(**common, video_token_id=video_token_id)
    raise ValueError(family)


def _image_processor(family: str, size: int, mean=None, std=None, pinpoints=None):
    kw = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    if mean is not None:
        kw.update(image_mean=mean, image_std=std)
    if family == "llava_next":
        kw["image_grid_pinpoints"] = pinpoints
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        return LlavaNextImageProcessorPil(**kw)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**kw)


def build_tiny(family: str, seed: int = 0, dtype=None, attn_implementation: str = "sdpa") -> Runtime:
    """A tiny random-weight model of ``family`` ('llava', 'llava-next', 'video-llava') with a
    word-level tokenizer, built locally in well under a second."""
    import transformers as tf

    from .tiny_tokenizer import build_tiny_tokenizer

    fam = family.replace("-", "_")
    if fam not in MODEL_CLASSES:
        raise ValueError(f"unknown tiny family {family!r}; choose from {TINY}")
    tok = build_tiny_tokenizer()
    cfg = tiny_config(fam, len(tok), tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("<video>"))
    cfg.text_config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = getattr(tf, MODEL_CLASSES[fam])(cfg)
    model.set_attn_implementation(attn_implementation)
    model = model.to(_dtype(dtype) or torch.float32).eval()
    return _runtime(model, tok, _image_processor(fam, 56, pinpoints=getattr(cfg, "image_grid_pinpoints", None)),
                    fam, f"tiny:{family}")


def _runtime(model, tokenizer, image_processor, family, name, template=None, next_layout="spatial_unpad",
             num_frames=8, pad_to_square=True) -> Runtime:
    tmpl = get_template(template or DEFAULT_TEMPLATE[family])
    proc = PromptProcessor(tokenizer=tokenizer, image_processor=image_processor, family=family, template=tmpl,
                           model_config=model.config, next_layout=next_layout, num_frames=num_frames,
                           pad_to_square=pad_to_square)
    return Runtime(model=model, processor=proc, family=family, name=name)


def load(name: str, dtype=None, device: str | torch.device | None = None, attn_implementation: str = "sdpa",
         template: str | None = None, next_layout: str = "spatial_unpad", num_frames: int = 8,
         pad_to_square: bool = True, seed: int = 0) -> Runtime:
    """Load a model by hub id, local directory, ``shape:<name>`` (real architecture, random
    weights; names: the JSON files in llava/configs) or ``tiny:<family>``.

    ``attn_implementation`` applies to the LLM and the vision tower alike (sdpa by default,
    flash_attention_2 where installed); pruning never switches it.
    """
    if name.startswith("tiny:"):
        rt = build_tiny(name.split(":", 1)[1], seed=seed, dtype=dtype, attn_implementation=attn_implementation)
        rt.processor.next_layout = next_layout
        rt.processor.num_frames = num_frames
        if template:
            rt.processor.template = get_template(template)
        if device is not None:
            rt.model.to(device)
        return rt
    import transformers as tf

    if name.startswith("shape:"):
        key = name.split(":", 1)[1]
        if key not in SHAPES:
            raise ValueError(f"unknown shape config {key!r}; shipped: {', '.join(sorted(SHAPES))}")
        raw = json.loads(SHAPES[key].read_text())
        fam = raw["model_type"]
        cfg = tf.AutoConfig.for_model(**{k: v for k, v in raw.items() if not k.startswith("_") and k != "hub_id"})
        torch.manual_seed(seed)
        with torch.device(device or "cpu"):
            model = getattr(tf, MODEL_CLASSES[fam])._from_config(cfg, dtype=_dtype(dtype) or torch.float32,
                                                                  attn_implementation=attn_implementation)
        model.eval()
        # a Llama-like tokenizer is not shipped: a word-level one stands in (ids only matter for shapes)
        from .tiny_tokenizer import build_tiny_tokenizer

        tok = build_tiny_tokenizer()
        cfg.image_token_id = tok.convert_tokens_to_ids("<image>")
        if fam == "video_llava":
            cfg.video_token_id = tok.convert_tokens_to_ids("<video>")
        ip = _image_processor(fam, cfg.vision_config.image_size, CLIP_MEAN_STD[0], CLIP_MEAN_STD[1],
                              pinpoints=getattr(cfg, "image_grid_pinpoints", None))
        rt = _runtime(model, tok, ip, fam, name, template, next_layout, num_frames, pad_to_square)
        rt.info["random_weights"] = True
        return rt
    local = os.path.isdir(name)
    config = tf.AutoConfig.from_pretrained(name)
    arch = (config.architectures or [""])[0]
    fam = {v: k for k, v in MODEL_CLASSES.items()}.get(arch) or config.model_type
    if fam not in MODEL_CLASSES:
        raise ValueError(f"{name}: model type {config.model_type!r} is not a LLaVA family model ({', '.join(MODEL_CLASSES)})")
    model = getattr(tf, MODEL_CLASSES[fam]).from_pretrained(name, dtype=_dtype(dtype) or "auto",
                                                            attn_implementation=attn_implementation)
    if device is not None:
        model.to(device)
    model.eval()
    tok = tf.AutoTokenizer.from_pretrained(name)
    tok.padding_side = "left"
    if fam == "llava_next":
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil as IP
    else:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as IP
    ip = IP.from_pretrained(name)
    rt = _runtime(model, tok, ip, fam, name, template, next_layout, num_frames, pad_to_square)
    rt.info["local"] = local
    return rt


CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
