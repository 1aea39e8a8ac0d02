"""MMTok (ICLR 2026, arXiv 2508.18264): the authors' repository ``Ironieser/MMTok``, a package ``mmtok/`` that
injects itself into a loaded LLaVA model (no LLaVA tree of its own: it runs on the installed official llava-torch,
as FlowCut's and VisionZip's packages do).

- switch: ``from mmtok import mmtok; model = mmtok(model, language_tokenizer=<the LLM's fast tokenizer>,
  target_vision_tokens=T)``, as its lmms-eval wrapper does (``example/lmms_eval_llava_mmtok.py`` 150-156: the
  tokenizer reloaded with ``AutoTokenizer.from_pretrained(pretrained, use_fast=True)`` when the builder's is slow,
  which LLaVA's builder's is). ``mmtok()`` (``mmtok/llava/llava_inject.py`` 35-127) replaces the vision tower's
  forward (CLIP layer -2 -> the projector -> the coverage greedy, ``clip_encoder_mmtok.py``), the model's
  ``prepare_inputs_labels_for_multimodal`` and hooks ``conv_templates["vicuna_v1"].copy`` so that the user message
  the prompt is built from reaches the tower: the worker builds every prompt with that template's ``copy()`` /
  ``append_message``, so the question arrives by the official route, nothing injected.
- the base codebase: the official install is LLaVA-VL/LLaVA-NeXT; here the package runs on llava-torch 1.2.2 (the
  LLaVA-1.5 codebase of every other adapter). On LLaVA-1.5 MMTok replaces the two functions that differ between the
  two (the tower's forward and ``prepare_inputs_labels_for_multimodal``) with its own; what remains of the base
  (the LLaMA model of transformers, the CLIP tower's load, the projector, the ``vicuna_v1`` template) is the same
  model code. One visible difference: llava-torch's ``forward`` passes ``image_sizes`` seventh, where MMTok's
  function (LLaVA-VL's signature) has ``modalities``; its LLaVA-1.5 path reads neither.
- one argument set explicitly: ``remove_padding_indices=False``. The official default turns the LLaVA-1.5
  padding exclusion on when the checkpoint path contains ``llava-v1.5`` (``llava_inject.py`` 67-80), which the
  tiny official folder's name does (``llava-v1.5-tiny``) and the ``llava-hf/llava-1.5-*-hf`` checkpoints users run
  do not; our method does not implement it (docs/methods/mmtok.md). The exclusion would be inert here anyway: its
  indices come from ``mmtok``'s patch of ``llava.mm_utils.process_images``, which the worker imported before the
  patch; passing ``False`` makes that explicit instead of accidental.
- the one shim: ``mmtok/core/mmtok_core.py`` 23-28 imports ``AutoModelForImageTextToText`` at module level (used
  only by its Qwen path, absent from the LLaVA codebase's transformers 4.36.2: the official pin is 4.52.4 for
  LLaVA-VL/LLaVA-NeXT); ``before_import`` gives that name a placeholder that refuses to be used. The LLaVA path
  never touches it. And the tokenizer's pad token: ``_encode_text_with_token_pooling`` tokenises with
  ``padding=True``, which refuses a tokenizer without one; LLaVA-1.5's released tokenizer names ``<unk>`` its pad
  token, the tiny one names none, so ``enable`` sets it to ``<unk>`` (one sequence: no padding is added).
- the tower's dtype: MMTok's tower forward casts CLIP's output to the *tower's* dtype before the projector
  (``clip_encoder_mmtok.py`` 73-74), so it needs the tower in the projector's dtype: the LLaVA builder casts the
  tower to fp16 whenever ``device_map`` is not ``'auto'`` (LLaVA-VL/LLaVA-NeXT ``builder.py`` 292-293; lmms-eval
  passes ``cuda:0``), and with an fp32 tower beside an fp16 projector MMTok's forward stops with a dtype error. The
  worker's CPU load leaves the tower in fp32, so in the fp16 run ``enable`` casts it to fp16 as that builder does,
  and ours loads the tower in the LLM's fp16 (``OURS_LOAD["fp16"]``: ``vision_dtype=None``, as PruMerge's and
  VisionTrim's adapters).
- the dead loads: ``mmtok()`` loads ``CLIPVisionModelWithProjection``, ``CLIPTokenizerFast`` and
  ``CLIPTextModelWithProjection`` from the tower's folder and never uses them in the selection; the tiny ``clip/``
  folder holds a CLIP text tower (as for CDPruner), so they load as released. Nothing of the official code is
  changed.
- kept indices: what ``MMTokCore.select_vision_tokens`` returns per image (``mm_coverage_selection``'s picks,
  sorted), stage ``"vision"``. Each image alone (``OFFICIAL["alone"]``): the official code is batch-1 (one question
  per forward, read from the conversation hook).
- ours: ``mmtok`` in its reference mode (``numerics="official"``: rows normalised in their own dtype, each unit's
  greedy alone) with ``text="keywords_retokenized"`` (the question's keyword string re-tokenised word by word with
  the LLM's fast tokenizer and embedded by the LLM's input embedding, the official ``_encode_text_with_token_pooling``),
  the tokenizer and embedding table read from our tiny checkpoint (the same tokenizer and weights as the official
  folder's).
"""

from __future__ import annotations

REPOSITORY = "Ironieser/MMTok"
COMMIT = "d1522cda0ac4470589446b5f220534d892db4c62"
PACKAGES = ("mmtok",)
INSTALLED = False
OFFICIAL = {"alone": True}
OURS_LOAD = {"fp16": {"vision_dtype": None}}


# ---- the official side (runs in .venv-official) ----

def before_import() -> None:
    import transformers

    if not hasattr(transformers, "AutoModelForImageTextToText"):  # 4.36.2: imported, unused by the LLaVA path
        class AutoModelForImageTextToText:
            def __init__(self, *args, **kwargs):
                raise RuntimeError("parity shim: AutoModelForImageTextToText is not in transformers 4.36.2")

            from_pretrained = classmethod(__init__)

        transformers.AutoModelForImageTextToText = AutoModelForImageTextToText


def enable(model, method: dict) -> None:
    from transformers import AutoTokenizer

    import torch

    from mmtok import mmtok

    if model.dtype == torch.float16:  # the builder's cast of the tower under lmms-eval's device_map (module doc)
        model.get_vision_tower().to(dtype=torch.float16)
    # the lmms-eval wrapper's fast tokenizer, from the checkpoint the model was loaded from
    tok = AutoTokenizer.from_pretrained(model.config._name_or_path, use_fast=True)
    if tok.pad_token is None:  # LLaVA-1.5's released tokenizer names <unk> its pad token; the tiny one names none
        tok.pad_token = tok.unk_token
    mmtok(model, language_tokenizer=tok, target_vision_tokens=int(method["budget"]), remove_padding_indices=False)


class _Restore:
    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def remove(self):
        self.obj.__dict__.pop(self.name, None)


def record(model, store: list) -> list:
    import torch

    core = model.get_vision_tower()._mmtok_core
    fn = type(core).select_vision_tokens

    def select_vision_tokens(*args, **kwargs):
        tokens, indices = fn(core, *args, **kwargs)
        store.append(("vision", torch.as_tensor(indices, dtype=torch.long).reshape(len(indices), -1).sort(-1)
                      .values.cpu().clone()))
        return tokens, indices

    core.select_vision_tokens = select_vision_tokens
    return [_Restore(core, "select_vision_tokens")]


# ---- our side ----

def ours(budget: int, dtype: str | None = None, info: dict | None = None) -> tuple[str, dict]:
    options = {"numerics": "official", "text": "keywords_retokenized"}
    if info is not None:  # the tokenizer and the input embedding of our tiny checkpoint (the official folder's)
        options.update(llm_tokenizer=info["hf"], embed_tokens=info["hf"])
    return "mmtok", options


def record_ours(rt, store: list):
    from ._ours import selections

    def finish(n_samples: int) -> None:
        kept = selections(rt, "vision", n_samples)
        if kept is not None:
            store.append(("vision", kept))

    return finish


# ---- Qwen2.5-VL (``python -m parity qwen --method mmtok``, parity/qwen.py) ----
#
# The official side runs in ``.venv-official-qwen`` (transformers 4.52.4, MMTok's pin) by
# parity/official_worker_qwen.py: ``mmtok_qwen2_5_vl(model, language_tokenizer=processor.tokenizer,
# processor=processor, retain_ratio=r)`` as its lmms-eval wrapper calls it (``example/lmms_eval_qwen_mmtok.py``), which
# replaces ``Qwen2_5_VLModel.forward`` / ``get_image_features`` and the tower's forward with its own and patches the
# processor's ``apply_chat_template`` so that the user's text reaches the selection (the worker builds every prompt
# through it: the question arrives by the official route). Each image alone: the official forward is batch-1 (it
# reads ``input_ids[0]``). One shim (``qwen_before_import``).

QWEN = True
#: the retain ratios compared (the official default 0.2; 0.5): T = int(r * the prompt's image tokens)
QWEN_BUDGETS = (0.2, 0.5)


def qwen_before_import(clone: str) -> None:
    """The one shim: ``mmtok/__init__.py`` imports the package's LLaVA path at import (``from .llava import ...``,
    LLaVA-VL's ``llava``, absent beside 4.52.4, and never used by the Qwen path). The package ``mmtok`` is registered
    with the clone's folder as its path and without running that file, so ``mmtok.qwen`` and ``mmtok.core`` import
    from the clone as they are."""
    import importlib.machinery
    import os
    import sys
    import types

    folder = os.path.join(clone, "mmtok")
    pkg = types.ModuleType("mmtok")
    pkg.__path__ = [folder]
    pkg.__spec__ = importlib.machinery.ModuleSpec("mmtok", None, is_package=True)
    pkg.__spec__.submodule_search_locations = [folder]
    sys.modules["mmtok"] = pkg


def qwen_enable(model, processor, method: dict) -> None:
    from mmtok.qwen import mmtok_qwen2_5_vl

    # ``official_kwargs``: the official function's own keyword arguments, for planted changes only (the tests)
    mmtok_qwen2_5_vl(model, language_tokenizer=processor.tokenizer, processor=processor,
                     retain_ratio=float(method["budget"]), **method.get("official_kwargs", {}))


def qwen_record(model, store: list) -> list:
    """Per selection (one per prefill): the picks ``apply_selection_preprocess_qwen`` returns (sorted), and what it
    selected from: the projected tokens, the vision -> vision rows and the text rows ``_encode_text_with_token_pooling``
    gave (fp32 copies, for the report)."""
    import torch

    core = model.model._mmtok_core
    select, encode = type(core).apply_selection_preprocess_qwen, type(core)._encode_text_with_token_pooling
    seen: dict = {}

    def encode_text(text):
        rows = encode(core, text)
        seen["text"] = rows.float().cpu().clone()
        return rows

    def apply_selection_preprocess_qwen(image_embeds, image_features, question_text, target_vision_tokens=None):
        idx, feats = select(core, image_embeds, image_features, question_text, target_vision_tokens=target_vision_tokens)
        store.append({"kept": torch.as_tensor(idx, dtype=torch.long).sort().values.cpu(),
                      "features": image_embeds.float().cpu().clone(), "vision": image_features.float().cpu().clone(),
                      "text": seen.pop("text", None), "target": int(target_vision_tokens),
                      "dtype": str(image_embeds.dtype).replace("torch.", "")})
        return idx, feats

    core._encode_text_with_token_pooling = encode_text
    core.apply_selection_preprocess_qwen = apply_selection_preprocess_qwen
    return [_Restore(core, "_encode_text_with_token_pooling"), _Restore(core, "apply_selection_preprocess_qwen")]


def ours_qwen(budget: float, dtype: str, rt) -> tuple[str, None, dict]:
    """Our reference mode of the official Qwen route: (method, budget, options)."""
    return "mmtok", None, {"numerics": "official", "vv_space": "merge_mean", "scope": "sample", "whole_at_most": 64,
                           "retain_ratio": float(budget), "text": "question_retokenized",
                           "llm_tokenizer": rt.processor.tokenizer, "embed_tokens": rt.model.get_input_embeddings()}


def qwen_replay(entry: dict):
    """Our reference arithmetic on the rows the official selection read (one ``qwen_record`` entry, cast back to its
    dtype: fp16 -> fp32 -> fp16 is exact): the picks our ``mmtok`` makes from the official side's own inputs, which
    separates the method's arithmetic from the tower's and the projector's (two torch releases' kernels)."""
    import torch

    from baselines.mmtok import mmtok
    from llava.ops import unit_layout

    dt = getattr(torch, entry.get("dtype", "float32"))
    n = int(entry["features"].shape[0])
    text = entry["text"].to(dt) if entry["text"] is not None else entry["features"][:0].to(dt)
    return mmtok(entry["features"].to(dt), entry["vision"].to(dt), text, unit_layout(torch.zeros(n, dtype=torch.long)),
                 entry["target"], tv_temperature=0.01, numerics="official", whole_at_most=64)


def record_ours_qwen(rt, store: list):
    """Per sample of the prefill, the same fields from our signals and selection: the kept indices (into the sample's
    visual tokens), ``features``, the ``merge_mean`` rows and the text rows the method used."""
    from ._ours import seen_vision_selections

    method = rt.engine.method
    seen, restore = seen_vision_selections(method)
    inner = method.text_of
    texts: list = []

    def text_of(sig):
        rows, mask = inner(sig)
        texts.append((sig, rows.float().cpu().clone()))
        return rows, mask

    method.text_of = text_of

    def finish(n_samples: int) -> None:
        restore()
        method.text_of = inner
        for sig, sel in seen[:n_samples]:
            text = next((rows for s, rows in texts if s is sig), None)  # None: nothing pruned, no text read
            store.append({"kept": sel.keep.flatten().sort().values.cpu(), "features": sig.features.float().cpu(),
                          "vision": sig.group_mean[-1].float().cpu(), "text": text,
                          "target": int(float(method.retain_ratio) * sig.num_tokens)})

    return finish
