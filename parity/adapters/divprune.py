"""DivPrune (CVPR 2025): the authors' repository ``vbdi/divprune``, which vendors LLaVA under ``LLaVA/`` (its
``llava/`` tree: ``ROOT``) and lmms-eval at the top level.

- switch: environment variables, as ``run_Divprune.sh`` sets them for ``python -m lmms_eval --model llava``:
  ``BASELINE=OURS`` (read by ``LLaVA/llava/model/multimodal_encoder/clip_encoder.py`` ``forward``: any value but
  ``PRUMERGE`` is the plain tower; unset, it raises ``KeyError``), ``LAYER_INDEX=0`` and ``SUBSET_RATIO`` (the
  fraction of the image's tokens kept). The pruning is the ``#divprune`` block at the end of
  ``LLaVA/llava/model/llava_arch.py`` ``prepare_inputs_labels_for_multimodal``: ``DivPrune(visual_tokens,
  img_feature_len, None, threshold_ratio=SUBSET_RATIO)`` on the projected image rows of ``new_input_embeds[0]``,
  ``int(round(SUBSET_RATIO * img_feature_len))`` picks; the rows kept by ``keep_indexs.sort()``, positions
  contiguous (``position_ids`` is None there). The budget T becomes ``SUBSET_RATIO = T / N`` with N the tower's
  patch count (64 on the tiny weights): ``int(round(T / N * N)) == T``, T tokens per image as our ``budget``.
- kept indices: the picks ``s`` that the model's ``DivPrune`` method returns (a wrapper on the loaded model's
  method), sorted, as indices into the image's N rows (a token picked twice would appear twice: the official code
  feeds it twice); stage ``"vision"``.
- geometry: the block hard-codes ``SYS_TOKEN_LEN = 35``, the number of prompt tokens before the image in
  LLaVA-1.5's ``vicuna_v1`` prompt under LLaMA's tokenizer. The tiny tokenizer puts the image elsewhere, so
  ``enable`` recompiles ``prepare_inputs_labels_for_multimodal`` from the clone's own source with that one literal
  replaced by ``self.config.parity_sys_token_len``, which ``inputs`` sets to the position of the image placeholder
  (``IMAGE_TOKEN_INDEX``) in the prompt's ids: what 35 is on the real model. Nothing else is changed.
- batches: each image alone (``OFFICIAL["alone"]``): the block prunes the span of sample 0 only
  (``new_input_embeds[0]``) and applies that selection to every row; the official runs use ``--batch_size 1``.
- ours: ``divprune`` with ``budget`` T (per image) in its reference mode (``numerics="official"``: distances in
  the model's dtype, the official first pick and loop). The official code computes its distances in the dtype of
  the rows it is handed, fp32 in the fp32 run (the model after ``.float()``); our reference mode does the same
  (``reference_dtype="model"``, its default). It cast the features to fp16 always before 2026-11-26, which parted
  the fp32 run on seed 11's build (T = 32, image 1: official patch 21, ours 5; docs/parity.md). The fp16 run is
  exact by construction (the same fp16 features, the same ops).
"""

from __future__ import annotations

REPOSITORY = "vbdi/divprune"
COMMIT = "799e2d950aa01ba7860907f5a6d86061f885dca6"
PACKAGES = ("llava",)
ROOT = "LLaVA"
INSTALLED = False
OFFICIAL = {"alone": True}

#: the literal that encodes LLaVA-1.5's prompt geometry, and what it becomes on the tiny weights
SYS_TOKEN_LITERAL = r"SYS_TOKEN_LEN = 35\b"
SYS_TOKEN_REPLACEMENT = "SYS_TOKEN_LEN = self.config.parity_sys_token_len"


def rewrite(source: str, pattern: str, replacement: str) -> str:
    """``source`` with the one match of ``pattern`` replaced (refused unless it occurs exactly once)."""
    from . import _official

    return _official.rewrite(source, pattern, replacement)


def recompile(cls, name: str, pattern: str, replacement: str):
    """The method ``name`` of ``cls`` compiled again from the clone's source with one literal replaced
    (``_official.recompile``); returns the new function."""
    from . import _official

    return _official.recompile(getattr(cls, name), [(pattern, replacement)])


# ---- the official side (runs in .venv-official) ----

def before_load(method: dict) -> None:
    import os

    os.environ["BASELINE"] = "OURS"  # run_Divprune.sh; the clone's CLIP forward reads it unconditionally
    os.environ["LAYER_INDEX"] = "0"


def enable(model, method: dict) -> None:
    import os

    from llava.model.llava_arch import LlavaMetaForCausalLM

    n = model.get_vision_tower().num_patches
    os.environ["SUBSET_RATIO"] = repr(method["budget"] / n)
    assert int(round(float(os.environ["SUBSET_RATIO"]) * n)) == method["budget"]
    if not getattr(LlavaMetaForCausalLM, "_parity_rewritten", False):
        LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal = recompile(
            LlavaMetaForCausalLM, "prepare_inputs_labels_for_multimodal", SYS_TOKEN_LITERAL, SYS_TOKEN_REPLACEMENT)
        LlavaMetaForCausalLM._parity_rewritten = True


def inputs(model, tokenizer, cases, prompts, input_ids) -> dict:
    from llava.constants import IMAGE_TOKEN_INDEX

    # each image alone: row 0 is the prompt, unpadded; the tokens before the image (35 on LLaVA-1.5)
    pos = (input_ids[0] == IMAGE_TOKEN_INDEX).nonzero()
    model.config.parity_sys_token_len = int(pos[0, 0])
    return {}


def record(model, store: list) -> list:
    inner = model.DivPrune

    def DivPrune(*args, **kwargs):
        s, cos = inner(*args, **kwargs)
        store.append(("vision", s.detach().cpu().sort().values[None].clone()))
        return s, cos

    model.DivPrune = DivPrune

    class Handle:
        def remove(self):
            del model.DivPrune

    return [Handle()]


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    return "divprune", {"numerics": "official"}


def record_ours(rt, store: list):
    from ._ours import selections

    def finish(n_samples: int) -> None:
        kept = selections(rt, "vision", n_samples)
        if kept is not None:
            store.append(("vision", kept))

    return finish
