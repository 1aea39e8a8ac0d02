"""DART (EMNLP 2025, arXiv 2502.11494): the authors' LLaVA tree. The original repository, ``ZichenWen1/DART``, is
not mirrored here; this adapter runs its public **fork** ``xqy1111111/DART`` (the same ``llava/`` tree:
``llava/model/language_model/modeling_llama_self.py``, class ``DART`` with ``get_retained_image_token``, the
``DART_K_norm`` path; ``llava_llama.py`` makes it the LLaVA model's LLaMA).

- switch: ``model.config.DART_config = {...}``, exactly the dict ``configure_DART`` in the fork's
  ``llava/eval/model_vqa_loader.py`` builds from the eval scripts' flags (``scripts/v1_5/eval/*.sh``:
  ``--sparse --pruned_layer 2 --image_token_start_index 35 --image_token_length 576 --max_num_trunction B
  --reduction_ratio 0.778 --pivot_image_token 4 --pivot_text_token 4``) on the loaded model.
  On the tiny model: ``K`` = **1** (the scripts' layer 2 of a 32-layer LLaMA mapped onto the 4-layer one as our
  ``llava.ops.scale_layers`` maps it: round(2 * 4 / 32) clipped to 1; both sides prune before decoder layer 1
  with layer 0's keys and output); ``image_token_length`` = the tower's patches (64; the scripts' 576 is
  CLIP-L/336's); ``image_token_start_index`` = where the image really starts in the prompt (the scripts' 35 is that
  position for the vicuna_v1 prompt under LLaMA's tokenizer; the tiny tokenizer puts it elsewhere), set for each
  prompt by ``inputs`` (the official code reads it from the config at every prefill); ``max_num_trunction`` = the
  budget B (the paper's retained tokens; 4 + 8 * floor(B / 8) kept).
- alone: the official forward asserts a batch of one (``assert batch_size == 1``, ``DART.forward``) and the
  selection reads sample ``[0]`` (``get_retained_image_token``), as its eval loader (``batch_size must be 1``):
  each image alone on both sides.
- kept indices: the tensor ``get_retained_image_token`` returns (positions in the sequence; an instance wrapper
  records it, sorted, minus ``image_token_start_index``: indices into the image's tokens), stage ``"llm1"``.
- ours: ``dart`` in its reference mode (``numerics="official"``: key L1 norms and cosine similarities by the
  official calls, ``torch.topk``, the official Python-set pivot order) with ``reference_dtype="model"`` (that
  arithmetic in our LLM's dtype, as the official code computes in its LLM's: fp32 in the fp32 rows, fp16 in the
  official fp16 load; the default ``"float16"`` casts to fp16 always, the official runs' dtype, and then keeps
  another token than the official fp32 run at T = 32, image 0: token 19 for token 0, fp16 rounding), ``layer=1`` with
  ``scale_layers=False`` (the same layer as the official ``K``), the budget as ``max_num_trunction``; the
  selection read from ``rt.engine.selections``.
"""

from __future__ import annotations

REPOSITORY = "xqy1111111/DART"
COMMIT = "d6a5af6f24f9d0c2f3f3a8eb09b8ca7cef58b58a"
PACKAGES = ("llava",)
INSTALLED = False
OFFICIAL = {"alone": True}

#: the decoder layer DART prunes before on the 4-layer tiny LLaMA (the scripts' ``--pruned_layer 2`` of 32, scaled
#: as ``llava.ops.scale_layers([2], 4)``)
LAYER = 1
#: the eval scripts' other flags (scripts/v1_5/eval/*.sh, model_vqa_loader.py defaults)
PIVOT_IMAGE, PIVOT_TEXT, REDUCTION_RATIO, RETAIN_NEXT = 4, 4, 0.778, 320
STAGE = f"llm{LAYER}"


# ---- the official side (runs in .venv-official) ----

def dart_config(budget: int, image_token_length: int, image_token_start_index: int) -> dict:
    """``configure_DART``'s dict (model_vqa_loader.py) for the tiny model."""
    return {"K": LAYER, "image_token_start_index": image_token_start_index, "image_token_length": image_token_length,
            "max_num_trunction": budget, "reduction_ratio": REDUCTION_RATIO,
            "retain_token_num_for_llava_next": RETAIN_NEXT, "pivot_image_token": PIVOT_IMAGE,
            "pivot_text_token": PIVOT_TEXT}


def enable(model, method: dict) -> None:
    n = model.get_vision_tower().num_patches
    # the start is set per prompt (inputs); the LLaVA-1.5 path: no text_length (model_vqa_loader sets it for 1.6 only)
    model.config.DART_config = dart_config(method["budget"], n, 0)
    model.config.text_length = None


def image_start(ids) -> int:
    """The position of the image's first token in the LLM sequence of a one-sample prompt: that of the
    IMAGE_TOKEN_INDEX (-200) placeholder, which ``prepare_inputs_labels_for_multimodal`` replaces by the patches."""
    row = [int(t) for t in ids]
    if row.count(-200) != 1:
        raise ValueError("dart: one image placeholder expected")
    return row.index(-200)


def inputs(model, tokenizer, cases, prompts, input_ids) -> dict:
    if input_ids.shape[0] != 1:
        raise ValueError("dart: the official code runs one sample at a time (OFFICIAL['alone'])")
    model.config.DART_config["image_token_start_index"] = image_start(input_ids[0])
    return {}


class _Restore:
    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def remove(self):
        self.obj.__dict__.pop(self.name, None)


def record(model, store: list) -> list:
    inner = model.get_model()
    fn = type(inner).get_retained_image_token

    def get_retained_image_token(config, last_layer_state, any_states):
        kept = fn(inner, config, last_layer_state, any_states)
        start = config.DART_config["image_token_start_index"]
        store.append((STAGE, (kept.sort().values - start)[None].cpu().clone()))
        return kept

    inner.get_retained_image_token = get_retained_image_token
    return [_Restore(inner, "get_retained_image_token")]


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    return "dart", {"numerics": "official", "reference_dtype": "model", "layer": LAYER, "scale_layers": False,
                    "pivot_image": PIVOT_IMAGE, "pivot_text": PIVOT_TEXT}


def record_ours(rt, store: list):
    from ._ours import selections

    def finish(n_samples: int) -> None:
        kept = selections(rt, 0, n_samples)
        if kept is not None:
            store.append((STAGE, kept))

    return finish
