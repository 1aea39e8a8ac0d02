"""Loading LLaVA-family models on transformers: real checkpoints (hub id or local directory), the
real architectures with random weights from shipped shape configs (no download), and tiny
random-weight models of each family for tests.

    rt = load("llava-hf/llava-1.5-7b-hf", dtype="float16", device="cuda")
    rt = load("shape:llava-1.5-7b", dtype="bfloat16", device="cuda")   # real size, random weights
    rt = load("tiny:llava-next")                                       # seconds, on CPU
    rt = load("Qwen/Qwen2.5-VL-7B-Instruct", max_pixels=1280 * 28 * 28)   # Qwen2.5-VL, LLaVA-OneVision too
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

from .model_source import local_path_error, offline_if_hub_unreachable
from .conversation import Template, get_template
from .dtypes import parse_dtype as _dtype
from .engine import PruningEngine, attach
from .families import registry
from .families.registry import Family
from .fast.precompile import active as fast_precompile_active, requested as fast_precompile_requested
from .fast.precompile import wanted as fast_precompile_wanted
from .plan import PromptSpec
from .preprocess import PROCESSORS, PromptProcessor, llava_tokenize

CONFIG_DIR = Path(__file__).parent / "configs"
SHAPES = {p.stem: p for p in CONFIG_DIR.glob("*.json")}


@dataclass
class Runtime:
    """A loaded model with LLaVA's own processor, template and (optionally) a pruning engine."""

    model: torch.nn.Module
    processor: PromptProcessor
    family: str
    name: str
    engine: PruningEngine | None = None
    info: dict[str, Any] = field(default_factory=dict)
    #: the fast path's options for every ``prune`` (``load(..., fast=True)``): None = eager engine
    fast: dict | None = None
    #: ``engine`` is the unpruned one ``load`` attached (no ``prune`` called since)
    engine_by_load: bool = False
    #: why this model always runs through the engine (``load(fast=True)``: the captured paths;
    #: ``vision_dtype``: the stock forward cannot mix the tower's and the LLM's dtypes); None: the stock
    #: forward runs it when no method is attached
    engine_required: str | None = None

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
        self.engine_by_load = False
        self.engine = attach(self.model, method, budget, next_layout=self.processor.next_layout,
                             prompt_spec=self.prompt_spec(), fast=self.fast, **options)
        ip = getattr(self.processor, "image_processor", None)
        if self.engine.adapter.pixel_norm is not None and getattr(ip, "image_mean", None) is not None:
            # a pre-tower stage's pixels in [0, 1]: undo the normalisation this processor applies
            self.engine.adapter.pixel_norm = (tuple(ip.image_mean), tuple(ip.image_std))
        return self.engine

    def unprune(self, detach: bool = False) -> None:
        """Remove the method: the unpruned model. Where the model needs the engine (``engine_required``) the
        unpruned method ("none") is attached again, unless ``detach`` (the engine off the model altogether:
        ``deepspeed_inference`` re-attaches it to the wrapped module)."""
        if self.engine is not None:
            self.engine.remove()
            self.engine = None
        self.engine_by_load = False
        if self.engine_required and not detach:
            self.prune("none")
            self.engine_by_load = True


def prompt_spec_for(tokenizer, template: Template | str) -> PromptSpec:
    """The separator and role-tag token ids of ``template`` (a name such as 'vicuna_v1' or a
    Template) under ``tokenizer``: what the engine strips to find the question tokens."""
    tmpl = get_template(template) if isinstance(template, str) else template
    if tmpl.style in ("qwen_vl", "onevision_hf", "internvl_hf"):
        # ChatML: Qwen puts <|vision_end|> between the last <|image_pad|> and the question, OneVision a newline;
        # the prompt ends with "<|im_end|>\n<|im_start|>assistant\n" (special tokens split the text, so these
        # pieces tokenise the same alone as inside the prompt)
        def enc(text):
            return tuple(tokenizer(text, add_special_tokens=False).input_ids)
        return PromptSpec(sep_ids=enc(tmpl.sep_text), tail_ids=enc(tmpl.role_tag))
    sep = llava_tokenize(tokenizer, "<image>\n", "<image>", -1, [1])[2:] if tokenizer.bos_token_id is not None else []
    probe = "<image>\nwhat"
    a = llava_tokenize(tokenizer, probe + tmpl.role_tag, "<image>", -1, [1])
    b = llava_tokenize(tokenizer, probe, "<image>", -1, [1])
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return PromptSpec(sep_ids=tuple(t for t in sep if t != -1), tail_ids=tuple(a[k:]))


def build_tiny(family: str, seed: int = 0, dtype=None, attn_implementation: str = "sdpa", min_pixels=None,
               max_pixels=None) -> Runtime:
    """A tiny random-weight model of ``family`` (a family's tiny spelling, :func:`llava.families.registry.tiny_names`:
    'llava', 'llava-next', 'video-llava', 'qwen2.5-vl', 'qwen2-vl', ...) with a word-level tokenizer, built locally
    in well under a second."""
    from .tiny_tokenizer import build_tiny_tokenizer

    fam = registry.find(family)
    if fam is None:
        from .options import did_you_mean

        names = registry.tiny_names()
        raise ValueError(f"unknown tiny family {family!r}{did_you_mean(family, names)}; choose from {', '.join(names)}")
    tok = build_tiny_tokenizer(**dict.fromkeys(fam.tiny_tokenizer, True))
    cfg = fam.tiny_config(tok)
    torch.manual_seed(seed)
    model = fam.model_cls()(cfg)
    model.set_attn_implementation(attn_implementation)
    if fam.chatml:
        model.generation_config.bos_token_id = None
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
    model = model.to(_dtype(dtype) or torch.float32).eval()
    ip = fam.image_processors.build(cfg, True, min_pixels, max_pixels)
    return _runtime(model, tok, ip, fam, f"tiny:{family}")


def _runtime(model, tokenizer, image_processor, family: Family | str, name, template=None,
             next_layout="spatial_unpad", num_frames=8, pad_to_square=True) -> Runtime:
    fam = registry.get(family) if isinstance(family, str) else family
    tmpl = get_template(template or fam.template)
    cls = PROCESSORS[fam.processor] if isinstance(fam.processor, str) else fam.processor
    proc = cls(tokenizer=tokenizer, image_processor=image_processor, family=fam.id, template=tmpl,
               model_config=model.config, next_layout=next_layout, num_frames=num_frames, pad_to_square=pad_to_square)
    return Runtime(model=model, processor=proc, family=fam.id, name=name)


def load(name: str, dtype=None, device: str | torch.device | None = None, attn_implementation: str = "sdpa",
         template: str | None = None, next_layout: str = "spatial_unpad", num_frames: int = 8,
         pad_to_square: bool = True, seed: int = 0, min_pixels: int | None = None,
         max_pixels: int | None = None, vision_dtype=None, fast: bool = False, fast_backend: str = "auto",
         fast_max_new_tokens: int = 256, decoder_layers: int | None = None, revision: str | None = None,
         next_geometry: str = "transformers", fast_regional: bool = True, fast_cache: str | None = None,
         fast_precompile: bool | None = None,
         fast_attention: str = "auto") -> Runtime:
    """See :func:`_load`. ``vision_dtype`` (e.g. "float32"): keep the vision tower(s) in that dtype under
    a half-precision LLM, as LLaVA's own loader does with its default ``device_map='auto'`` (the official
    [CLS]-attention scores then come from an fp32 tower); the tower's features are cast to the projector's
    dtype before it; the pixels are rounded to the LLM's dtype first (``rt.processor.pixel_dtype``), as LLaVA's eval
    scripts' ``images.to(dtype=torch.float16)`` hands them to the fp32 tower (set it to None for fp32 pixels). The tower keeps the checkpoint's weights (llava-hf stores them in fp16; the official
    code loads CLIP from its own fp32 checkpoint), computed in ``vision_dtype``. LLaVA-1.5 / NeXT / Video-LLaVA; the stock
    transformers forward cannot mix the two dtypes, so ``load`` attaches the unpruned method ("none") itself
    (``rt.engine_by_load``; ``rt.unprune()`` attaches it again).

    ``next_geometry`` (LLaVA-NeXT): "transformers" (default: llava-hf's processor and model) or "official" (LLaVA's
    own code, which the papers' NeXT numbers come from; docs/parity.md): the pinpoints read as (width, height) - each
    ``image_grid_pinpoints`` pair is reversed in the model's config and the image processor, so a pinpoint tie (every
    image of at most 336 px a side on LLaVA-1.6's list) picks the official grid - and the unpadded side truncated
    (``config.next_unpad = "official"``, :func:`llava.families.llava_next.unpad_official`). The stock forward packs
    with transformers' rounding, so the unpruned model runs through the engine (as with ``vision_dtype``).

    ``fast=True``: every ``rt.prune`` attaches the engine with its fast path (:mod:`llava.fast.path`): the
    same calls and greedy tokens, the prefill planned on the host and captured per length bucket
    (``fast_backend`` "auto": CUDA graphs through Inductor on a GPU, dynamo without code generation on a
    CPU; "cudagraphs" = CUDA graphs of the uncompiled functions, recorded in seconds without code generation
    (:mod:`llava.fast.graphs`); "inductor", "eager", "aot_eager", or "none" = the static-shape functions run
    uncompiled), decode
    with one graph into a static cache of ``fast_max_new_tokens`` generated tokens. The compiling backends trace
    each repeated layer class once (``fast_regional``, :mod:`llava.fast.compile`): cold compile time nearly flat
    in the model's depth. ``fast_cache`` (or the variable ``VTPRUNE_COMPILE_CACHE``): the folder of Inductor's compile
    cache that later processes reuse; neither given, ``~/.cache/vtprune/compile`` (``$XDG_CACHE_HOME/vtprune/compile``
    where that variable is set; :func:`llava.fast.compile.use_cache_dir`); ``fast_precompile`` (default: on
    wherever it can be, i.e. "inductor", or "aot_eager" with ``fast_regional=False``, on a torch
    that has the ahead-of-time capture; ``False`` or the variable ``VTPRUNE_FAST_PRECOMPILE=0`` turn it off, ``True``
    or ``=1`` make a backend or folder that cannot hold it an error): each function saved in the folder ahead of time
    and loaded by later processes without tracing, a saved function that no longer matches compiled afresh
    (:mod:`llava.fast.precompile`; where it does not apply, the regular compile: ``rt.info["fast"]["precompile_active"]``
    False).
    ``fast_attention``: the prompt's attention over its padded bucket, "causal" (SDPA's causal kernel, the rows rolled so the real ones come first:
    :mod:`llava.fast.attention`), "masked" (the 4-D mask) or "auto" (causal on a GPU from 1024 rows). Prefills the fast path
    does not plan (see the module) run on the eager engine; ``engine.stats.path`` says which ran. The model a
    user never prunes takes the fast path too: ``load`` attaches the unpruned method ("none") with it, so the
    baseline a speed-up is timed against is captured like the pruned runs (``rt.engine.stats.path``).

    ``decoder_layers=N`` (a hub id or local folder): load only the first N decoder layers (the rest hold their
    place and refuse to run, :class:`AbsentDecoderLayer`): a model for the vision stage alone
    (``engine.vision_inputs``), N = the layers a method's probe runs (0 for most). The vLLM plugin runs it
    beside vLLM's own decoder.

    ``attn_implementation`` takes transformers' names and ``"python_sdpa"`` (:mod:`llava.python_sdpa`: the Python
    reference of SDPA in the model's dtype, which SparseVLM's released code runs in every layer; reference runs)."""
    if "python_sdpa" in ((attn_implementation,) if isinstance(attn_implementation, str)
                         else tuple((attn_implementation or {}).values())):
        from .python_sdpa import register
        register()
    rt = _load(name, dtype=dtype, device=device, attn_implementation=attn_implementation, template=template,
               next_layout=next_layout, num_frames=num_frames, pad_to_square=pad_to_square, seed=seed,
               min_pixels=min_pixels, max_pixels=max_pixels, decoder_layers=decoder_layers, revision=revision)
    if vision_dtype is not None:
        vd = _dtype(vision_dtype)
        if registry.get(rt.family).tower != "clip":
            clip = ", ".join(f.name for f in registry.families() if f.tower == "clip")
            raise ValueError(f"vision_dtype is supported for the CLIP-tower families ({clip}), not {rt.family}")
        core = rt.model.model
        for attr in ("vision_tower", "image_tower", "video_tower"):
            if getattr(core, attr, None) is not None:
                getattr(core, attr).to(vd)
        rt.info["vision_dtype"] = str(vd).replace("torch.", "")
        llm_dt = rt.model.get_input_embeddings().weight.dtype
        if llm_dt in (torch.float16, torch.bfloat16) and llm_dt != vd:  # LLaVA's eval scripts: images.to(float16)
            rt.processor.pixel_dtype = llm_dt
            rt.info["pixel_dtype"] = str(llm_dt).replace("torch.", "")
        rt.engine_required = "vision_dtype: the stock forward cannot mix the tower's and the LLM's dtypes"
    if next_geometry != "transformers":
        from .families.llava_next import NEXT_GEOMETRIES
        if next_geometry not in NEXT_GEOMETRIES:
            raise ValueError(f"next_geometry must be one of {NEXT_GEOMETRIES}, got {next_geometry!r}")
        if registry.get(rt.family).layout != "anyres":
            raise ValueError(f"next_geometry applies to LLaVA-NeXT only, not to {rt.family}")
        pins = [list(p)[::-1] for p in rt.model.config.image_grid_pinpoints]
        rt.model.config.image_grid_pinpoints = pins
        rt.processor.image_processor.image_grid_pinpoints = [list(p) for p in pins]
        rt.model.config.next_unpad = "official"
        rt.info["next_geometry"] = next_geometry
        rt.engine_required = "next_geometry='official': the stock forward packs NeXT with transformers' unpad rounding"
    if fast:
        rt.fast = {"backend": fast_backend, "max_new_tokens": int(fast_max_new_tokens),
                   "regional": bool(fast_regional), "cache": fast_cache, "attention": fast_attention,
                   # the request as load saw it (argument, else the variable): True, False or None (the default)
                   "precompile": fast_precompile_requested(fast_precompile)}
        # wanted (on unless turned off) vs resolved: where it cannot apply, the regular compile
        rt.info["fast"] = {**rt.fast, "precompile": fast_precompile_wanted(fast_precompile),
                           "precompile_active": fast_precompile_active(fast_precompile)}
        rt.engine_required = "fast=True: the captured prefill and decode"
    if rt.engine_required and decoder_layers is None:  # a vision-stage-only model (vLLM's plugin) runs no prefill
        rt.prune("none")  # the unpruned model runs through the engine too (the baseline of every speed-up)
        rt.engine_by_load = True
        if fast:  # resolved by the fast path: its backend and cache folder decide whether the default applies
            rt.info["fast"]["precompile_active"] = rt.engine.fast.precompile is not None
    return rt


class AbsentDecoderLayer(torch.nn.Module):
    """A decoder layer a partial load left out (``load(..., decoder_layers=N)``): it holds the place, so that
    the layer count methods resolve their layers against is the checkpoint's, and refuses to run."""

    def __init__(self, index: int, loaded: int):
        super().__init__()
        self.index, self.loaded = index, loaded

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"decoder layer {self.index} was not loaded (decoder_layers={self.loaded}): this model "
                           "runs the vision stage only (e.g. inside vLLM, whose own decoder runs the LLM)")


def truncate_decoder(config, n: int) -> tuple:
    """Set ``config``'s text model to its first ``n`` decoder layers; returns what :func:`restore_decoder` needs."""
    tc = config.text_config
    total = tc.num_hidden_layers
    types = getattr(tc, "layer_types", None)
    types = list(types) if types is not None else None
    if not 0 <= n <= total:
        raise ValueError(f"decoder_layers must be in 0..{total}, got {n}")
    tc.num_hidden_layers = n
    if types is not None:
        tc.layer_types = types[:n]
    return total, types


def restore_decoder(model, n: int, total: int, types) -> None:
    """The checkpoint's layer count again on a model built with :func:`truncate_decoder`'s config: the missing
    layers hold their places as :class:`AbsentDecoderLayer` (they refuse to run)."""
    tc = model.config.text_config
    layers = model.model.language_model.layers
    for i in range(n, total):
        layers.append(AbsentDecoderLayer(i, n))
    tc.num_hidden_layers = total
    if types is not None:
        tc.layer_types = types


def _load(name: str, dtype=None, device: str | torch.device | None = None, attn_implementation: str = "sdpa",
          template: str | None = None, next_layout: str = "spatial_unpad", num_frames: int = 8,
          pad_to_square: bool = True, seed: int = 0, min_pixels: int | None = None,
          max_pixels: int | None = None, decoder_layers: int | None = None, revision: str | None = None) -> Runtime:
    """Load a model by hub id, local directory, ``shape:<name>`` (real architecture, random
    weights; names: the JSON files in llava/configs) or ``tiny:<family>``. ``revision``: a hub id's branch,
    tag or commit (config, weights, tokenizer and image processor all from it); refused for the built models.

    ``attn_implementation`` applies to the LLM and the vision tower alike (sdpa by default,
    flash_attention_2 where installed); pruning never switches it.

    ``min_pixels`` / ``max_pixels`` (Qwen2.5-VL only) bound the resized image area and so the number of
    visual tokens (area / 28^2); by default the checkpoint's values (3136 .. 12845056).
    """
    if revision is not None and name.startswith(("tiny:", "shape:")):
        raise ValueError(f"revision={revision!r}: {name} is built here, not read from the hub (revisions apply to hub ids)")
    if name.startswith("tiny:"):
        rt = build_tiny(name.split(":", 1)[1], seed=seed, dtype=dtype, attn_implementation=attn_implementation,
                        min_pixels=min_pixels, max_pixels=max_pixels)
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
            from .options import did_you_mean

            raise ValueError(f"unknown shape config {key!r}{did_you_mean(key, sorted(SHAPES))}; shipped: "
                             f"{', '.join(sorted(SHAPES))}")
        raw = json.loads(SHAPES[key].read_text())
        cfg = tf.AutoConfig.for_model(**{k: v for k, v in raw.items() if not k.startswith("_") and k != "hub_id"})
        fam = registry.get(family_of(cfg))
        torch.manual_seed(seed)
        with torch.device(device or "cpu"):
            model = fam.model_cls()._from_config(cfg, dtype=_dtype(dtype) or torch.float32,
                                                 attn_implementation=attn_implementation)
        model.eval()
        # a Llama-like tokenizer is not shipped: a word-level one stands in (ids only matter for shapes); its ids stand
        # in for the checkpoint's placeholder tokens
        from .tiny_tokenizer import build_tiny_tokenizer

        tok = build_tiny_tokenizer(**dict.fromkeys(fam.tiny_tokenizer, True))
        for attr, t in fam.token_ids:
            setattr(model.config, attr, tok.convert_tokens_to_ids(t))
        ip = fam.image_processors.build(model.config, False, min_pixels, max_pixels)
        rt = _runtime(model, tok, ip, fam, name, template, next_layout, num_frames, pad_to_square)
        rt.info["random_weights"] = True
        return rt
    if name.startswith("~"):
        name = os.path.expanduser(name)
    bad = local_path_error(name)
    if bad:
        raise FileNotFoundError(bad)
    local = os.path.isdir(name)
    if not local:
        offline_if_hub_unreachable(name)
    config = tf.AutoConfig.from_pretrained(name, revision=revision)
    try:
        fam = registry.get(family_of(config))
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    kw = {}
    if decoder_layers is not None:  # the vision stage's model only: the first N decoder layers (a probe's)
        kept = truncate_decoder(config, decoder_layers)
        kw["config"] = config
    model = fam.model_cls().from_pretrained(name, dtype=_dtype(dtype) or "auto", revision=revision,
                                                            attn_implementation=attn_implementation, **kw)
    if decoder_layers is not None:
        restore_decoder(model, decoder_layers, *kept)
    if device is not None:
        model.to(device)
    model.eval()
    tok, ip = checkpoint_processors(name, fam.id, min_pixels, max_pixels, revision=revision)
    rt = _runtime(model, tok, ip, fam, name, template, next_layout, num_frames, pad_to_square)
    rt.info["local"] = local
    if revision is not None:
        rt.info["revision"] = revision
    return rt


def family_of(config) -> str:
    """The family id of a checkpoint's config (by its ``architectures[0]``, else its ``model_type``); ValueError for
    other models."""
    arch = (getattr(config, "architectures", None) or [""])[0]
    fam = registry.by_model_class(arch) or registry.find(config.model_type)
    if fam is None:
        raise ValueError(f"model type {config.model_type!r} is not a LLaVA family model "
                         f"({', '.join(registry.ids())})")
    return fam.id


def checkpoint_processors(name: str, fam: str, min_pixels: int | None = None, max_pixels: int | None = None,
                          revision: str | None = None):
    """(tokenizer (left padding), image processor (transformers' PIL backend)) of a hub id / local folder (at
    ``revision``) of family ``fam``."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(name, revision=revision)
    tok.padding_side = "left"
    ip = registry.get(fam).image_processors.from_pretrained(name, revision, min_pixels, max_pixels)
    return tok, ip
