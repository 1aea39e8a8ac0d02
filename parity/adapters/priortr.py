"""PriorTR (ECCV 2026, arXiv 2606.24156): the authors' repository ``CodeChildCZJ/PriorTR``, its LLaVA backbone
``image/LLaVA/`` (a LLaVA tree with the ``llava/vtr/`` package: ``PriorTRLlava`` in ``vtr/model/priortr_llava.py``
on ``VTRLlavaForCausalLM`` / ``PrunableLlamaModel``, the score in ``vtr/strategy/priortr.py``).

- switch: the model class is ``PriorTRLlava`` (the repository's own loader ``load_vtr_model(model_type="priortr")``
  builds it instead of ``LlavaLlamaForCausalLM``; here the official builder's name is pointed at it before the load),
  then ``model.setup_vtr(VTRConfig(enabled=True, strategy="priortr", prune_layer=K, keep_tokens=B))`` as the
  lmms-eval wrapper does (``lmms_eval_model/llava_vtr.py``); ``setup_vtr`` fills ``query_aggregation="question"``
  for LLaVA-1.5. On the tiny model ``K`` = **1** (the official ``prune_layer=3`` of a 32-layer LLaMA mapped onto the
  4-layer one as ``llava.ops.scale_layers`` maps it: round(3 * 4 / 32) clipped to 1; both sides score with layer 0's
  attention and prune before layer 1).
- shim: ``compute_image_token_count`` returns 576 for every LLaVA-1.5 image (CLIP-L/336's patches, hard-coded in
  ``vtr/model/vtr_llava.py``); on the tiny tower (64 patches) it returns the tower's own count. Nothing else of the
  official code is changed.
- a plain forward: the official ``generate`` computes the image's range and injects it into the language model
  (``_register_vtr_state``); a forward call without it prunes nothing. ``inputs`` injects the same range (the
  placeholder's position, + the tower's patches) before the worker's forward, as ``generate`` would.
- alone: the official code is batch-1 only (``image_sizes[0]``, ``[0]`` indexing): each image alone on both sides.
- kept indices: what the strategy's ``select_tokens`` returns (ascending, relative to the image's start), stage
  ``"llm1"``.
- ours: ``priortr`` in its reference mode (``numerics="official"``: the attention in the model's dtype, the means in
  that dtype, ``torch.topk``), ``keep_tokens`` = B, ``queries="question"``, ``layer=1`` without scaling, and
  ``caches="pruned"`` (the official code gathers the caches of the layers before K too).
"""

from __future__ import annotations

REPOSITORY = "CodeChildCZJ/PriorTR"
COMMIT = "e442a4c14af1b333067a6b8310c9111cad922033"
ROOT = "image/LLaVA"
PACKAGES = ("llava",)
INSTALLED = False
OFFICIAL = {"alone": True}

#: the decoder layer PriorTR prunes before on the 4-layer tiny LLaMA (the official prune_layer 3 of 32, scaled as
#: ``llava.ops.scale_layers([3], 4)``)
LAYER = 1
STAGE = f"llm{LAYER}"


# ---- the official side (runs in .venv-official) ----

def before_load(method: dict) -> None:
    import llava.model.builder as builder
    import llava.vtr.model.vtr_llava as vtr_llava
    from llava.vtr.model.priortr_llava import PriorTRLlava

    builder.LlavaLlamaForCausalLM = PriorTRLlava  # what load_vtr_model(model_type="priortr") builds
    count = vtr_llava.compute_image_token_count

    def compute_image_token_count(images, image_sizes, config):
        if images.ndim == 4:  # LLaVA-1.5: the tower's patches (the official 576 is CLIP-L/336's)
            return int(getattr(config, "num_patches_per_side", 24)) ** 2
        return count(images, image_sizes, config)

    vtr_llava.compute_image_token_count = compute_image_token_count


def enable(model, method: dict) -> None:
    from llava.vtr.config import VTRConfig

    model.setup_vtr(VTRConfig(enabled=True, strategy="priortr", prune_layer=LAYER, keep_tokens=int(method["budget"])))


def inputs(model, tokenizer, cases, prompts, input_ids) -> dict:
    if input_ids.shape[0] != 1:
        raise ValueError("priortr: the official code runs one sample at a time (OFFICIAL['alone'])")
    row = [int(t) for t in input_ids[0]]
    if row.count(-200) != 1:
        raise ValueError("priortr: one image placeholder expected")
    start = row.index(-200)
    n = int(model.get_vision_tower().num_patches)
    model._register_vtr_state((start, start + n), {})  # what generate() injects, for the worker's forward
    return {}


class _Restore:
    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def remove(self):
        self.obj.__dict__.pop(self.name, None)


def record(model, store: list) -> list:
    strategy = model.get_model()._vtr_strategy
    fn = type(strategy).select_tokens

    def select_tokens(scores, num_tokens, config):
        kept = fn(strategy, scores, num_tokens, config)
        store.append((STAGE, kept.sort().values[None].cpu().clone()))
        return kept

    strategy.select_tokens = select_tokens
    return [_Restore(strategy, "select_tokens")]


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    return "priortr", {"budget": None, "keep_tokens": int(budget), "numerics": "official", "queries": "question",
                       "layer": LAYER, "scale_layers": False, "caches": "pruned"}


def record_ours(rt, store: list):
    from ._ours import llm_stage_recorder

    return llm_stage_recorder(rt, store)


# ---- Qwen3-VL (``python -m parity qwen --method priortr``, parity/qwen.py): the official Qwen3-VL code ----
#
# ``image/Qwen3-VL/``: the package ``visual_token_pruning`` (``VTRQwen3VLForConditionalGeneration`` on
# ``Qwen3VLForConditionalGeneration``, the language model swapped in place for ``PrunableQwen3VLTextModel``, the score
# in ``strategy/priortr.py``) and the repository's own ``qwen3_vl`` model files (``qwen3/``: transformers 5.1.0's plus
# the vision tower's attention output), which its ``setup.py develop`` symlinks into transformers; the worker
# installs them under that name (``QWEN_VENDORED``) in ``.venv-official-qwen3`` (transformers 5.1.0), with
# ``image/Qwen3-VL`` first on the path (``QWEN_ROOT``).
# - switch: the loaded ``Qwen3VLForConditionalGeneration`` becomes ``VTRQwen3VLForConditionalGeneration`` and gets
#   what ``from_pretrained_vtr`` sets after its load (``vtr_config``, the strategy, ``apply_clse_defaults``, the
#   language model's class), with the ``VTRConfig`` its lmms-eval model builds (``lmms_eval_model/qwen3_vl_vtr.py``:
#   ``keep_ratio`` r, ``prune_layer`` 3, the rest at their defaults: ``query_aggregation="auto"`` -> "question").
#   K = 3 on the 4-layer tiny model too (score layer 2, pruned before layer 3; DeepStack rows at layers 0..2).
# - a plain forward prunes nothing (only ``generate`` adds the range and context to the prefill): ``qwen_inputs``
#   adds what ``generate`` would (``_compute_image_token_range``, ``_prepare_vtr``) to the worker's forward.
# - alone: the official code reads ``positions[0, 1]`` and the first image only: each image alone on both sides.
# - recorded: the kept indices ``select_tokens`` returns and the attention rows ``compute_scores`` reads (rows from
#   ``img_end`` on, every column, in the model's dtype), for the replay.
# - ours: ``priortr`` in its reference mode on Qwen3-VL (``numerics="official"``: ``queries`` and ``min_keep``
#   resolve to the official Qwen rules, the score layer's probabilities as ``q k^T * scaling``), ``keep_ratio`` r,
#   ``layer=3`` without scaling, ``caches="pruned"``.

#
# ---- Qwen2-VL (``python -m parity qwen --method priortr`` runs both): the official Qwen2-VL code ----
#
# ``image/Qwen2-VL/``: the same package layout on the **stock** transformers 4.57.6 (its ``environment.yml``), no
# vendored model files: ``VTRQwen2VLForConditionalGeneration`` (``model/vtr_qwen2_vl.py``) swaps the language model
# for ``PrunableQwen2VLTextModel`` (``model/prunable_qwen2_vl.py``: the attention of layer K-1 computed in full,
# ``q k^T * scaling`` plus the mask it is handed, softmax in fp32 cast back) and scores with a ``strategy/priortr.py``
# identical to the Qwen3-VL one (diffed at e442a4c). Its lmms-eval model's defaults are the Qwen3-VL ones
# (``lmms_eval_model/qwen2_vl_vtr.py``: ``keep_ratio`` 0.1111, ``prune_layer`` 3, ``query_aggregation="auto"``).
# - switch: the loaded ``Qwen2VLForConditionalGeneration`` becomes ``VTRQwen2VLForConditionalGeneration`` with what
#   ``from_pretrained_vtr`` sets after its load; its ``forward`` hands the language model the image positions and
#   grid itself, so a plain forward prunes (no ``qwen_inputs``).
# - environment: ``.venv-official-qwen457`` (transformers 4.57.6), ``image/Qwen2-VL`` first on the path; the tiny
#   Qwen2-VL folder of 24 layers (``QWEN2VL_LAYERS``), K = 3.

QWEN = True
QWEN_FAMILY = "qwen3-vl"
#: both folders of the repository: its Qwen3-VL code and its Qwen2-VL code
QWEN_FAMILIES = ("qwen3-vl", "qwen2-vl")
#: the folder of the repository the Qwen3-VL side runs from (first on the path: ``visual_token_pruning``)
QWEN_ROOT = "image/Qwen3-VL"
#: (the module the official ``setup.py`` replaces, the folder of ``QWEN_ROOT`` that replaces it)
QWEN_VENDORED = ("transformers.models.qwen3_vl", "qwen3")
#: the Qwen2-VL side: its folder, nothing vendored, the stock 4.57.6 environment
QWEN_BY_FAMILY = {"qwen2-vl": {"QWEN_ROOT": "image/Qwen2-VL", "QWEN_VENDORED": None, "QWEN_ENV": "qwen457"}}
#: the official Qwen3-VL keep ratios (64 / 128 / 192 of 576 as shares: the README's and the lmms-eval model's)
QWEN_BUDGETS = (0.1111, 0.2222, 0.3333)
QWEN_LAYER = 3


def qwen_enable(model, processor, method: dict) -> None:
    if method.get("family") == "qwen2-vl":
        return _qwen2_vl_enable(model, method)
    from visual_token_pruning.config import VTRConfig
    from visual_token_pruning.model.vtr_qwen3_vl import VTRQwen3VLForConditionalGeneration
    from visual_token_pruning.strategy.clse import apply_clse_defaults

    model.__class__ = VTRQwen3VLForConditionalGeneration  # what from_pretrained_vtr's cls.from_pretrained builds
    model._rope_position_offset = 0
    model.vtr_config = VTRConfig(enabled=True, strategy="priortr", keep_ratio=float(method["budget"]),
                                 prune_layer=QWEN_LAYER, **method.get("official_kwargs", {}))  # planted changes
    model.vtr_strategy = model._create_strategy(model.vtr_config.strategy)
    apply_clse_defaults(model.vtr_config, model.config)
    model._replace_text_model()


def _qwen2_vl_enable(model, method: dict) -> None:
    from visual_token_pruning.config import VTRConfig
    from visual_token_pruning.model.vtr_qwen2_vl import VTRQwen2VLForConditionalGeneration

    model.__class__ = VTRQwen2VLForConditionalGeneration  # what from_pretrained_vtr's cls.from_pretrained builds
    model.vtr_config = VTRConfig(enabled=True, strategy="priortr", keep_ratio=float(method["budget"]),
                                 prune_layer=QWEN_LAYER, **method.get("official_kwargs", {}))  # planted changes
    model.vtr_strategy = model._create_strategy(model.vtr_config.strategy)
    model._replace_text_model()  # setup_vtr: apply_clse_defaults, the strategy on the language model


def qwen_inputs(model, inputs) -> dict:
    if not hasattr(model, "_compute_image_token_range"):  # the Qwen2-VL code: its forward hands the range itself
        if inputs["input_ids"].shape[0] != 1:
            raise ValueError("priortr: the official Qwen2-VL code runs one sample at a time")
        return {}
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError("priortr: the official Qwen3-VL code runs one sample at a time")
    model._rope_position_offset = 0
    rng = model._compute_image_token_range(inputs["input_ids"], inputs["image_grid_thw"])
    ctx = model._prepare_vtr(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                             image_grid_thw=inputs["image_grid_thw"], image_token_range=rng)
    return {"vtr_config": model.vtr_config, "vtr_strategy": model.vtr_strategy, "vtr_context": ctx,
            "image_token_range": rng}


def qwen_record(model, store: list) -> list:
    """Per prefill: the kept indices (ascending, into the image's tokens), the image's token count, the attention
    rows from ``img_end`` on (H, T, S) as the score read them, and their dtype."""
    import torch

    strategy = model.vtr_strategy
    score, select = type(strategy).compute_scores, type(strategy).select_tokens
    seen: dict = {}

    def compute_scores(attention, image_token_range, config, layer_idx=0, **context):
        s, e = image_token_range
        seen["rows"] = attention[0, :, e:].float().cpu().clone()
        seen["attention"] = seen["rows"][:, :, s:e]  # the image's columns, as ours records them
        seen["visual"], seen["dtype"] = torch.arange(s, e), str(attention.dtype).replace("torch.", "")
        return score(strategy, attention, image_token_range, config, layer_idx=layer_idx, **context)

    def select_tokens(scores, num_tokens, config, layer_idx=0):
        kept = select(strategy, scores, num_tokens, config, layer_idx=layer_idx)
        store.append({"kept": kept.sort().values.cpu().clone(), "n": int(num_tokens), **seen})
        return kept

    strategy.compute_scores, strategy.select_tokens = compute_scores, select_tokens
    return [_Restore(strategy, "compute_scores"), _Restore(strategy, "select_tokens")]


def qwen_replay(entry: dict):
    """Our reference arithmetic (Qwen rows: the null row to the next-to-last) on the official side's own attention
    rows, with the official count: the method's arithmetic apart from the two environments' kernels."""
    import torch

    from baselines.priortr import priortr_scores, priortr_select

    rows = entry["rows"].to(getattr(torch, entry["dtype"]))
    scores = priortr_scores(rows, entry["visual"], "question_excl_last", "mean", "official")
    return priortr_select(scores, len(entry["kept"]), "official")


def ours_qwen(budget: float, dtype: str, rt) -> tuple[str, None, dict]:
    return "priortr", None, {"keep_ratio": float(budget), "numerics": "official", "caches": "pruned",
                             "layer": QWEN_LAYER, "scale_layers": False}


def record_ours_qwen(rt, store: list):
    """Per sample: the kept indices, the visual count and the attention rows our selection read (the null token to
    the end of the prompt; their difference to the official rows over the image's columns is reported)."""
    from ._ours import qwen_rows_recorder

    method = rt.engine.method
    return qwen_rows_recorder(rt, store, "attention", lambda sig: sig.attention(
        "text_after", layer="prev", logits="model_scaling", causal=method.causal_scores)[:, :, sig.visual])
