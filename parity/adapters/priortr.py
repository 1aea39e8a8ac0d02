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
