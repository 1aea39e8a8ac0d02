"""OTPrune (CVPR 2026, arXiv 2602.20205): the authors' repository ``xiwenc1/OTPrune``, a DivPrune-derived tree that
vendors LLaVA under ``LLaVA/`` (its ``llava/`` tree: ``ROOT``) and lmms-eval at the top level.

- switch: environment variables, as ``run_OTPrune.sh`` sets them for ``python -m lmms_eval --model llava``:
  ``BASELINE=OURS`` (read unconditionally by ``LLaVA/llava/model/multimodal_encoder/clip_encoder.py`` ``forward``;
  any value but ``PRUMERGE`` is the plain tower), ``LAYER_INDEX=0`` and ``SUBSET_RATIO`` (the fraction of the image's
  tokens kept). The pruning is the block at the end of ``LLaVA/llava/model/llava_arch.py``
  ``prepare_inputs_labels_for_multimodal``: ``self.OTPrune(visual_tokens, img_feature_len, text_tokens, None,
  threshold_ratio=SUBSET_RATIO)`` on the projected image rows of ``new_input_embeds[0]`` (the column-normalised
  kernel, ``greedy_select``'s DPP MAP, ``list(set(...))``), ``int(round(SUBSET_RATIO * img_feature_len))`` picks,
  the rows kept in the order ``OTPrune`` returns them (**not sorted**), positions contiguous. The budget T becomes
  ``SUBSET_RATIO = T / N`` with N the tower's patch count (64 on the tiny weights): ``int(round(T / N * N)) == T``.
- kept indices: what the model's ``OTPrune`` method returns (a wrapper on the loaded model's method), **in its
  order** (CPython's set order), as indices into the image's N rows; stage ``"vision"``. Ours are recorded in output
  order too, so the comparison checks the order, and the logits check it again (the LLM sees the rows in that order).
- geometry (the one shim): the block hard-codes ``SYS_TOKEN_LEN = 35``, the number of prompt tokens before the image
  in LLaVA-1.5's ``vicuna_v1`` prompt under LLaMA's tokenizer. The tiny tokenizer puts the image elsewhere, so
  ``enable`` recompiles ``prepare_inputs_labels_for_multimodal`` from the clone's own source with that one literal
  replaced by ``self.config.parity_sys_token_len``, which ``inputs`` sets to the position of the image placeholder
  in the prompt's ids: what 35 is on the real model. The other hard-coded count of the tree, 576 in the CLIP
  encoder, sits in the ``BASELINE == 'PRUMERGE'`` branch only and is not on this path: no shim.
- batches: each image alone (``OFFICIAL["alone"]``): the block prunes the span of sample 0 only and applies that
  selection to every row; the official runs use ``--batch_size 1``.
- ours: ``otprune`` with ``budget`` T (per image) in its reference mode (``numerics="official"``: the column norm
  and the Cholesky rows in the model's dtype) and ``order="official"`` (the set order, computed with tensor ops).
"""

from __future__ import annotations

REPOSITORY = "xiwenc1/OTPrune"
COMMIT = "3414730f39daa57e0629138d898f98ee682f0b2b"
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

    os.environ["BASELINE"] = "OURS"  # run_OTPrune.sh; the clone's CLIP forward reads it unconditionally
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
    inner = model.OTPrune

    def OTPrune(*args, **kwargs):
        s, rest = inner(*args, **kwargs)
        store.append(("vision", s.detach().cpu()[None].clone()))  # the official order: not sorted
        return s, rest

    model.OTPrune = OTPrune

    class Handle:
        def remove(self):
            del model.OTPrune

    return [Handle()]


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    return "otprune", {"numerics": "official", "order": "official"}


def record_ours(rt, store: list):
    import torch

    def finish(n_samples: int) -> None:
        rows = [rt.engine.selections.get(("vision", b)) for b in range(n_samples)]
        if all(r is not None for r in rows):  # the keep indices in output order (the official order is compared)
            store.append(("vision", torch.stack([r.keep.flatten().cpu() for r in rows])))

    return finish
