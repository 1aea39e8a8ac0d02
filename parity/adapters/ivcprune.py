"""IVC-Prune (ICLR 2026, arXiv 2602.03060): the authors' repository ``FireRedTeam/IVC-Prune``, whose method lives in
its fork of transformers 4.51.3 (``transformers/src/transformers``): ``LlavaForConditionalGeneration.forward`` calls
``LlamaForCausalLM.ivcp_forward`` when ``config.ivcp_config`` is set (``models/llava/modeling_llava.py`` 432-444),
which runs ``LlamaModel.IVCP_forward_flashattention`` (``models/llama/modeling_llama.py`` 799-1011).

The official side is **transformers' own Llava classes** (the fork), not the LLaVA repository the other adapters run,
so this adapter has its own worker (``OFFICIAL["worker"] = "hf"``: ``parity/official_worker_hf.py`` in the Qwen
official environment, ``.venv-official-qwen``, with the clone's ``transformers/src`` first on the path) and loads the
``llava-1.5-tiny-hf`` folder both releases read.

- switch: ``model.config.ivcp_config = {"ivcp_k": K, "image_token_start_index": start, "image_token_length": n}``, as
  VLMEvalKit's ``llava_v1.5_7b_IVCP`` passes it to ``from_pretrained`` (``vlmeval/config.py`` 511-519). ``K`` = **2**
  on the 4-layer tiny LLaMA (the official 16 of 32 scaled as ``llava.ops.scale_layers`` maps it). ``start`` and ``n``
  are the config's own knobs, set per prompt from its ids (``inputs``): the shipped config's ``start = 5`` does not
  match the prompt its own wrapper builds (docs/methods/ivcprune.md).
- inputs: both sides get the same ids, mask and pixels (ours: LLaVA-1.5's ``vicuna_v1`` prompt and pad-to-square
  pixels); the official wrapper's own processor (transformers' ``LlavaProcessor``: a centre crop) and its prompt
  string are not compared here, the model and the method are.
- shim: ``attn_implementation="sdpa"`` instead of the wrapper's ``"flash_attention_2"`` (no FlashAttention on a CPU).
  With an all-ones mask transformers hands SDPA no mask at all (``_ignore_causal_mask_sdpa``), the path FA2 takes:
  the official prefill's causal layers after the cut and its decode steps on the shorter caches run as under FA2.
  Nothing of the official code is changed.
- alone: the official code is batch-1 (``[0]`` indexing, one image range).
- kept indices: ``keep_indexs`` (``self.keep_indexs``, set in the prefill) inside the image range, relative to its
  start, stage ``"llm2"``.
- ours: ``ivcprune`` in its reference mode (``numerics="official"``), the LLaVA rule, ``layer=2`` without scaling and
  ``caches="pruned"`` (layers 1..K-1 pruned, layer 0's cache whole, as the official ``prune_past_key_values``). No
  budget: the official fixed fractions of n = 64 (1 seed, 13 foreground, 3 + 3 coordinates).
"""

from __future__ import annotations

REPOSITORY = "FireRedTeam/IVC-Prune"
COMMIT = "03afd9cee41f60bb30b51a4105839f2b5d467814"
ROOT = "transformers/src"
PACKAGES = ("transformers",)
INSTALLED = False
#: each image alone; the official side is transformers' Llava (the fork) in the Qwen official environment
OFFICIAL = {"alone": True, "worker": "hf"}
#: the official method has no budget (fixed fractions): one row per precision
BUDGETS = (None,)
#: the whole official model in the run's dtype (its wrapper loads it with torch_dtype=float16 and .cuda()); transformers'
#: CLIP on SDPA, as the official side runs it
OURS_LOAD = {"fp32": {"vision_attn": "sdpa"}, "fp16": {"vision_dtype": None, "vision_attn": "sdpa"}}

#: the decoder layer IVC-Prune prunes before on the 4-layer tiny LLaMA (the official ivcp_k 16 of 32, scaled)
LAYER = 2
STAGE = f"llm{LAYER}"


# ---- the official side (runs in .venv-official-qwen, the clone's transformers first on the path) ----

def enable(model, method: dict) -> None:
    model.config.ivcp_config = {"ivcp_k": LAYER, "image_token_start_index": 0, "image_token_length": 0}


def disable(model) -> None:
    model.config.ivcp_config = None


def inputs(model, input_ids, image_token_id: int) -> None:
    """The config's image range for this prompt (one sample): where its image tokens are."""
    if input_ids.shape[0] != 1:
        raise ValueError("ivcprune: the official code runs one sample at a time (OFFICIAL['alone'])")
    row = [int(t) for t in input_ids[0]]
    n = row.count(image_token_id)
    start = row.index(image_token_id)
    if row[start:start + n] != [image_token_id] * n:
        raise ValueError("ivcprune: one contiguous image expected")
    model.config.ivcp_config.update(image_token_start_index=start, image_token_length=n)


def record(model, store: list) -> list:
    lm = model.language_model.model  # LlamaModel (4.51: LlavaForConditionalGeneration.language_model is the CausalLM)
    fn = type(lm).IVCP_forward_flashattention
    cfg = model.config.ivcp_config

    def forward(*args, **kwargs):
        out = fn(lm, *args, **kwargs)
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.shape[1] > 1:  # the prefill: the kept rows of the whole prompt
            start, n = cfg["image_token_start_index"], cfg["image_token_length"]
            keep = lm.keep_indexs
            image = keep[(keep >= start) & (keep < start + n)] - start
            store.append((STAGE, image[None].cpu().clone()))
        return out

    lm.IVCP_forward_flashattention = forward
    return [_Restore(lm, "IVCP_forward_flashattention")]


class _Restore:
    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def remove(self):
        self.obj.__dict__.pop(self.name, None)


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    return "ivcprune", {"budget": None, "numerics": "official", "rule": "llava", "layer": LAYER,
                        "scale_layers": False, "caches": "pruned"}


def record_ours(rt, store: list):
    from ._ours import llm_stage_recorder

    return llm_stage_recorder(rt, store)
