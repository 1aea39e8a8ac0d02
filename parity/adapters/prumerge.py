"""PruMerge+ (ICCV 2025): the authors' repository ``42Shawn/LLaVA-PruMerge``, a copy of LLaVA 1.1.3 (pinned to
transformers 4.31.0) whose ``llava/model/multimodal_encoder/clip_encoder.py`` holds the method.

- switch: none to set. ``CLIPVisionTower.forward`` calls ``token_prune_merge_advanced_plus(images,
  if_adaptive=True, reduction_ratio=1/8)`` (PruMerge+) for every tensor of images; ``reduction_ratio`` is then
  overwritten by the IQR outlier ratio (``outlier_dectection``), so **no budget reaches the official code**: the
  count is adaptive per image (top ``int(N * ratio)`` by [CLS] attention + the grid ``arange(0, P - 1,
  int(int(1 / ratio) / 3))`` not already kept + one global token). The harness's budget T is ignored on both sides:
  ours runs ``prumerge`` with no budget (``budget_mode="adaptive"``, what ``budget=None`` means there), so every T
  repeats the same run; use one (``--budgets 16``).
- kept indices: the official kept list ``idx`` (the top by attention, descending, then the grid points,
  ascending) in **output order**, read where the official code hands it to the module-level ``complement_idx(idx,
  N)`` (a wrapper in the module's globals); stage ``"vision"``. Ours: ``Selection.keep`` of the vision stage (the
  kept patches in output order, [CLS] left out; the global token g is not a patch). The merged values (x' and g)
  are compared through the logits.
- geometry: the function hard-codes CLIP-L/336's shape in two literals: ``encoder.layers[23]`` (the last of 24
  layers, whose q / k are hooked) and ``torch.arange(0, 575, ...)`` (575 = P - 1 for P = 576 patches). The tiny
  tower has 8 layers and 64 patches, so ``enable`` recompiles ``token_prune_merge_advanced_plus`` from the clone's
  own source with ``23`` -> the last layer's index (7; both hooks, k and q) and ``575`` -> P - 1 (63); ours reads
  the last layer (``qk_layer=-1``, the default) and the grid below P - 1 (``baselines/prumerge.py``).
  ``k = int(32)`` neighbours fit (63 candidates) and stay. On 64 patches the grid is dense (stride
  ``int(int(64 / outliers) / 3)``, 1 from 12 outliers on): three of the four images keep 63 patches, one 40; every
  kept patch is still merged with its 32 neighbours and g sums the rest.
- transformers 4.36: LLaVA 1.1.3 registers ``AutoConfig.register("llava", LlavaConfig)``, a name transformers
  4.36 took for llava-hf's config (4.31 had none): ``before_import`` registers it with ``exist_ok=True`` (the tiny
  checkpoint's ``model_type`` is ``llava_llama``; the builder loads ``LlavaLlamaForCausalLM`` directly, so the
  registry entry is never looked up). Its ``forward`` takes no ``image_sizes`` (anyres came in 1.2), which the
  harness passes: ``enable`` drops that argument on the loaded model's ``forward`` / ``generate``. Its ``generate``
  is transformers' own, fed ``input_ids``: the output starts with the prompt, and the fork's eval script keeps
  ``output_ids[:, input_token_len:]`` (``llava/eval/model_vqa_loader.py``), as ``enable``'s wrapper does. It relies
  on 4.31's ``LlamaForCausalLM.prepare_inputs_for_generation`` (the last token alone after the prefill), which
  ``enable`` puts back on the class in the clone's process (4.36 keeps the tokens past the cache length, which
  after LLaVA's expanded prefill is the whole prompt, so every step re-ran the image path and failed). The clone's
  ``clip_encoder.py`` imports ``matplotlib`` (unused), which ``.venv-official`` must hold.
- batches: each image alone (``OFFICIAL["alone"]``): ``outlier_dectection`` pools the quartiles over the batch and
  the grid filter flattens ``idx`` over it, then ``torch.cat((idx, filtered.unsqueeze(0)), dim=1)`` fails for more
  than one image.
- precisions: this fork's builder casts the tower to fp16 **unconditionally** (``llava/model/builder.py``:
  ``vision_tower.to(device=device, dtype=torch.float16)``), so the official fp16 run has an fp16 tower and fp16
  scores and merges; ours loads the same (``OURS_LOAD["fp16"]``: ``vision_dtype=None``, the tower in the LLM's
  fp16) and runs the reference mode (``numerics="official"``); the harness loads our fp16 tower on ``python_sdpa``
  (``parity.llava15.tower_attention``: transformers 4.36's CLIP takes its softmax in fp16, transformers 5's eager
  one in fp32; they part by an fp16 ulp on some images). In the fp32 run the official code computes in fp32
  (the model after ``.float()``): ours then runs ``numerics="ours"`` (fp32; the reference mode would round every
  score and merge to fp16).
- every patch kept: when the top and the grid cover all P patches (stride 1, patch P - 1 among the top), the
  official complement is empty and ``torch.sum`` over it appends an all-zero g, which the LLM receives like any
  other token; ours asks for it in both precisions (``empty_global="zero"``; the reference mode's default).
- harness hooks this adapter uses: ``before_import()`` (the worker calls it before ``import llava``),
  ``ours(budget, dtype)`` returning ``options["budget"] = None``, and ``OURS_LOAD[dtype]``.
"""

from __future__ import annotations

REPOSITORY = "42Shawn/LLaVA-PruMerge"
COMMIT = "097c04116a58465e4bcb58cec44a94018a68ff1a"
PACKAGES = ("llava",)
INSTALLED = False
#: PruMerge+ is adaptive (no budget reaches either side): one run
BUDGETS = (64,)
OFFICIAL = {"alone": True}
#: how our side loads per precision, besides the harness's own options: the fork's builder casts the tower to fp16
OURS_LOAD = {"fp16": {"vision_dtype": None}}

#: the literals that encode CLIP-L/336's geometry in token_prune_merge_advanced_plus (the layer twice: the k and q
#: hooks; the grid's end once)
LAYER_LITERAL = r"encoder\.layers\[23\]"
GRID_LITERAL = r"torch\.arange\(0, 575, "


def rewrite(source: str, pattern: str, replacement: str, count: int = 1) -> str:
    """``source`` with the ``count`` matches of ``pattern`` replaced (refused unless it occurs exactly ``count`` times)."""
    from . import _official

    return _official.rewrite(source, pattern, replacement, count)


def recompile(cls, name: str, edits: list[tuple[str, str, int]]):
    """The method ``name`` of ``cls`` compiled again from the clone's source with the ``edits`` (pattern, replacement,
    count) applied (``_official.recompile``); returns the new function."""
    from . import _official

    return _official.recompile(getattr(cls, name), edits)


# ---- the official side (runs in .venv-official) ----

def before_import() -> None:
    """Before the clone's ``llava`` is imported: LLaVA 1.1.3's ``AutoConfig.register("llava", ...)`` clashes with
    transformers 4.36's own ``llava`` (llava-hf); register it with ``exist_ok=True``, as 4.31 (no such name) took
    it."""
    import functools

    from transformers import AutoConfig

    if getattr(AutoConfig.register, "_parity", False):
        return
    inner = AutoConfig.register

    @functools.wraps(inner)
    def register(model_type, config, exist_ok=False):
        return inner(model_type, config, exist_ok=exist_ok or model_type == "llava")

    register._parity = True
    AutoConfig.register = register
    # LLaVA 1.1.3's MPT code (llava/model/language_model/mpt/hf_prefixlm_converter.py, imported by
    # llava/model/__init__.py) imports 4.31's private mask helpers of BLOOM and OPT, gone in 4.36; the LLaMA path
    # never calls them: names that fail if called
    import importlib

    def missing(name):
        def call(*args, **kwargs):
            raise NotImplementedError(f"{name}: a transformers 4.31 helper absent from 4.36 (parity shim)")
        return call

    for mod in ("transformers.models.bloom.modeling_bloom", "transformers.models.opt.modeling_opt"):
        m = importlib.import_module(mod)
        for name in ("_expand_mask", "_make_causal_mask"):
            if not hasattr(m, name):
                setattr(m, name, missing(f"{mod}.{name}"))


def _drop_image_sizes(fn):
    import functools

    @functools.wraps(fn)
    def call(*args, image_sizes=None, **kwargs):  # LLaVA 1.1.3 has no anyres: the argument means nothing there
        return fn(*args, **kwargs)

    return call


def _new_tokens(generate):
    """LLaVA 1.1.3 generates from ``input_ids`` (no ``inputs_embeds`` override, unlike 1.2), so its output starts with
    the prompt; its eval script keeps ``output_ids[:, input_token_len:]`` (``llava/eval/model_vqa_loader.py``), the
    new tokens, which is what the harness compares."""
    import functools

    @functools.wraps(generate)
    def call(input_ids, *args, **kwargs):
        out = generate(input_ids, *args, **kwargs)
        assert (out[:, :input_ids.shape[1]] == input_ids).all()  # as the eval script checks (n_diff_input_output)
        return out[:, input_ids.shape[1]:]

    return call


def prepare_inputs_for_generation_431(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, **kwargs):
    """transformers 4.31's ``LlamaForCausalLM.prepare_inputs_for_generation`` (the fork's pin), which LLaVA 1.1.3's
    own override calls through ``super()``: after the prefill, the last token alone. 4.36's keeps the tokens past
    the cache's length, which after LLaVA's prefill (one ``<image>`` id -> the image's rows) is the whole prompt
    again, so every decode step would re-run the image path."""
    if past_key_values:
        input_ids = input_ids[:, -1:]
    position_ids = kwargs.get("position_ids", None)
    if attention_mask is not None and position_ids is None:
        position_ids = attention_mask.long().cumsum(-1) - 1
        position_ids.masked_fill_(attention_mask == 0, 1)
        if past_key_values:
            position_ids = position_ids[:, -1].unsqueeze(-1)
    if inputs_embeds is not None and past_key_values is None:
        model_inputs = {"inputs_embeds": inputs_embeds}
    else:
        model_inputs = {"input_ids": input_ids}
    model_inputs.update({"position_ids": position_ids, "past_key_values": past_key_values,
                         "use_cache": kwargs.get("use_cache"), "attention_mask": attention_mask})
    return model_inputs


def enable(model, method: dict) -> None:
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower
    from transformers import LlamaForCausalLM

    # this process runs the clone alone (one official process per clone): the 4.31 method on the class
    LlamaForCausalLM.prepare_inputs_for_generation = prepare_inputs_for_generation_431
    if not getattr(model, "_parity_enabled", False):
        model.forward = _drop_image_sizes(model.forward)
        model.generate = _new_tokens(_drop_image_sizes(model.generate))
        model._parity_enabled = True
    tower = model.get_vision_tower()
    last = len(tower.vision_tower.vision_model.encoder.layers) - 1
    patches = tower.num_patches
    if not getattr(CLIPVisionTower, "_parity_rewritten", False):
        CLIPVisionTower.token_prune_merge_advanced_plus = recompile(
            CLIPVisionTower, "token_prune_merge_advanced_plus",
            [(LAYER_LITERAL, f"encoder.layers[{last}]", 2), (GRID_LITERAL, f"torch.arange(0, {patches - 1}, ", 1)])
        CLIPVisionTower._parity_rewritten = True


def record(model, store: list) -> list:
    """The official kept list, output order: ``idx`` as ``token_prune_merge_advanced_plus`` passes it to the
    module-level ``complement_idx`` (a wrapper in the module's globals, removed after the run)."""
    import llava.model.multimodal_encoder.clip_encoder as ce

    inner = ce.complement_idx

    def complement_idx(idx, dim):
        store.append(("vision", idx.detach().cpu().clone()))
        return inner(idx, dim)

    ce.complement_idx = complement_idx

    class Handle:
        def remove(self):
            ce.complement_idx = inner

    return [Handle()]


# ---- our side ----

def ours(budget: int, dtype: str = "fp32") -> tuple[str, dict]:
    """PruMerge+ adaptive (no budget: ``options["budget"] = None`` replaces the harness's T); fp16: the reference
    mode (the fork's fp16 tower and arithmetic), fp32: our fp32 numerics (the official code after ``.float()``);
    both with the official zero global token when every patch is kept (``empty_global="zero"``, the reference
    mode's default)."""
    return "prumerge", {"budget": None, "variant": "plus", "budget_mode": "adaptive",
                        "numerics": "official" if dtype == "fp16" else "ours", "empty_global": "zero"}


def record_ours(rt, store: list):
    """Our vision stage's ``Selection.keep``: the kept patches in output order (top, then grid), g left out."""
    def finish(n_samples: int) -> None:
        rows = [rt.engine.selections.get(("vision", b)) for b in range(n_samples)]
        if all(r is not None for r in rows):
            store.append(("vision", torch_stack([r.keep.flatten().cpu() for r in rows])))

    return finish


def torch_stack(rows):
    import torch

    return torch.stack(rows)
