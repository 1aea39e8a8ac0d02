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


# ---- Qwen2.5-VL (python -m parity qwen --method ivcprune): the fork's own Qwen2.5-VL path ----
#
# ``Qwen2_5_VLForConditionalGeneration.forward`` finds the first image's range in the ids
# (``get_image_token_length_single_pair``) and calls ``Qwen2_5_VLModel.IVCP_forward_flashattention`` when
# ``config.ivcp_config`` is set (``models/qwen2_5_vl/modeling_qwen2_5_vl.py`` 2192, 2266-2282, 1393-1627). The job runs
# in the Qwen official environment with the fork's transformers first on the path (``QWEN_FORK``).
# - switch: ``model.config.ivcp_config = {"ivcp_k": K}``, K = 2 on the 4-layer tiny LLM (the official 16 of
#   Qwen2.5-VL-7B's 28, scaled).
# - shim: the fork reads layer K-1's value states through ``output_value_states=True``, which only its
#   FlashAttention-2 class accepts (lines 837-949; no FA2 on a CPU). Layer K-1's SDPA attention is wrapped to accept it
#   and return what the FA2 class returns beside its output: ``v_proj`` of the layer's normed input, its heads
#   repeated to the query heads (``repeat_kv``), (batch, tokens, heads, head_dim) - computed before the cache update
#   from the same input (in a prefill the cache adds nothing). The FA2 class would cast fp32 values to half (FA2 runs
#   in half only): an fp32 run has no FA2 counterpart, ours keeps them in fp32. With an all-ones mask SDPA gets no mask,
#   the path FA2 takes (the fork hands the unpruned mask on: "TODO None-flash attention", line 1563).
# - shim: the image's range is found by Qwen2.5-VL's <|vision_start|> / <|vision_end|> ids, hard-coded as default
#   arguments (151652 / 151653, line 2108); the tiny vocabulary's ids for the same tokens (its config's
#   ``vision_start_token_id`` / ``vision_end_token_id``) are passed instead.
# - kept indices: the ``cache_position`` layer K receives (the fork gathers ``cache_position[keep_indexs]``, line 1559),
#   inside the image's range, relative to its start.

#
# ---- Qwen2-VL (the same command runs both): the fork's own Qwen2-VL path ----
#
# ``Qwen2VLForConditionalGeneration.forward`` finds the first image's range (``get_image_token_length``, the
# <|vision_start|> / <|vision_end|> ids hard-coded in its body, 2337-2365) and calls
# ``Qwen2VLModel.fastv_forward_flashattention_find_forground_plan_last`` when ``config.fastv_config`` is set
# (``models/qwen2_vl/modeling_qwen2_vl.py`` 2498-2531, 1694-1850): K fixed at 16 (its ``fastv_k`` is read and not
# used), layer 15's values from its own ``compute_attention_weights`` (1161-1230: ``v_proj`` of the normed input,
# repeated to the query heads), the union rule (docs/methods/ivcprune.md, ``rule="qwen2_vl"``). The tiny Qwen2-VL of
# 24 layers runs K = 16 as it is. Same fork, the Qwen official environment (its tokenizers; the Qwen2-VL family's
# own environment pins 0.19, which 4.51.3 refuses).
# - switch: ``model.config.fastv_config = {"fastv_k": 16, "fastv_r": 0.5}`` (both read, neither used).
# - shim: ``get_image_token_length`` with the tiny vocabulary's <|vision_start|> / <|vision_end|> ids (the body's
#   151652 / 151653 are Qwen2-VL's), the same pairing and counting.
# - recorded: the values ``compute_attention_weights`` returns at layer 15, the rotary tables layer 15 receives, the
#   kept indices from the ``cache_position`` layer 16 receives.

QWEN = True
#: the fork's Qwen2.5-VL path and its Qwen2-VL path
QWEN_FAMILIES = ("qwen2.5-vl", "qwen2-vl")
#: the Qwen2-VL rows: the same fork in the Qwen official environment (4.51.3 needs the tokenizers 0.21 line)
QWEN_BY_FAMILY = {"qwen2-vl": {"QWEN_ENV": "qwen"}}
#: K of the fork's Qwen2-VL path (fixed in its model file)
QWEN2_VL_LAYER = 16
#: the clone ships its own transformers (the fork): a job of its own, the fork first on the path
QWEN_FORK = True
#: no budget: the official Qwen rule (seeds, 10 % + 10 % coordinates, filled to half of the image's tokens)
QWEN_BUDGETS = (None,)
#: K on the 4-layer tiny Qwen2.5-VL LLM (the official 16 of 28: round(16 * 4 / 28) = 2)
QWEN_LAYER = 2


def _qwen2_vl_enable(model) -> None:
    import types

    import torch

    model.config.fastv_config = {"fastv_k": QWEN2_VL_LAYER, "fastv_r": 0.5}
    start_id, end_id = model.config.vision_start_token_id, model.config.vision_end_token_id

    def get_image_token_length(self, input_ids):  # the fork's body (2337-2365) with the tiny vocabulary's ids
        lengths, starts = [], []
        for seq in input_ids:
            s = (seq == start_id).nonzero(as_tuple=True)[0]
            e = (seq == end_id).nonzero(as_tuple=True)[0]
            lengths.append(sum((b - a - 1 for a, b in zip(s, e)), torch.tensor(0)))
            starts.append(None if len(s) == 0 else s[0] + 1)
        return lengths, starts

    model.get_image_token_length = types.MethodType(get_image_token_length, model)
    inner = model.model.compute_attention_weights

    def compute_attention_weights(*args, **kwargs):
        out = inner(*args, **kwargs)
        model.model._parity_values = out[3]  # (B, H, S, d), repeated to the query heads: what the selection reads
        return out

    model.model.compute_attention_weights = compute_attention_weights


def qwen_enable(model, processor, method: dict) -> None:
    if method.get("family") == "qwen2-vl":
        return _qwen2_vl_enable(model)
    import types

    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import repeat_kv

    model.config.ivcp_config = {"ivcp_k": QWEN_LAYER}
    # the image's range: the fork looks for Qwen2.5-VL's <|vision_start|> / <|vision_end|> ids as the default
    # arguments 151652 / 151653 (line 2108); the tiny vocabulary's own ids for the same two tokens
    find = type(model).get_image_token_length_single_pair
    model.get_image_token_length_single_pair = types.MethodType(
        lambda self, ids: find(self, ids, start_token=self.config.vision_start_token_id,
                               end_token=self.config.vision_end_token_id), model)
    attn = model.model.layers[QWEN_LAYER - 1].self_attn
    inner = type(attn).forward

    def forward(self, *args, output_value_states: bool = False, **kwargs):
        out = inner(self, *args, **kwargs)
        if not output_value_states:
            return out
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        b, q, _ = h.shape
        v = self.v_proj(h).view(b, q, -1, self.head_dim).transpose(1, 2)
        v = repeat_kv(v, self.num_key_value_groups).transpose(1, 2)
        self._parity_values = v  # for the record (qwen_record): what the fork's selection reads
        return (*out, v)

    attn.forward = types.MethodType(forward, attn)


def qwen_record(model, store: list) -> list:
    import torch

    qwen2_vl = getattr(model.config, "fastv_config", None) is not None
    layer = QWEN2_VL_LAYER if qwen2_vl else QWEN_LAYER
    layers = model.model.layers
    seen: dict = {}
    image_id = model.config.image_token_id

    def top(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1:
            row = ids[0]
            at = torch.nonzero(row == image_id).flatten()
            seen["range"] = (int(at[0]), int(at.numel())) if at.numel() else (0, 0)

    def layer_k1(module, args, kwargs):  # the model-level rotary tables the fork reads (unpruned before layer K)
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if h.shape[1] > 1:
            seen["tables"] = kwargs["position_embeddings"]

    def layer_k(module, args, kwargs):
        cp = kwargs.get("cache_position")
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if cp is not None and "range" in seen and h.shape[1] > 1:
            start, n = seen.pop("range")
            kept = cp[(cp >= start) & (cp < start + n)] - start
            cos, sin = seen.pop("tables")
            if qwen2_vl:  # (B, H, S, d) from compute_attention_weights -> (S, H, d)
                values = model.model._parity_values.transpose(1, 2)
            else:
                values = layers[layer - 1].self_attn._parity_values
            store.append({"kept": kept.sort().values.cpu(), "n": n, "start": start,
                          "values": values[0].float().cpu().clone(), "cos": cos[:, 0].float().cpu().clone(),
                          "sin": sin[:, 0].float().cpu().clone(), "dtype": str(values.dtype).replace("torch.", ""),
                          "rule": "qwen2_vl" if qwen2_vl else "qwen"})

    return [model.register_forward_pre_hook(top, with_kwargs=True),
            layers[layer - 1].register_forward_pre_hook(layer_k1, with_kwargs=True),
            layers[layer].register_forward_pre_hook(layer_k, with_kwargs=True)]


def qwen_replay(entry: dict):
    """Our reference choice (``baselines.ivcprune.ivc_keep``, the Qwen rule, ``numerics="official"``) on the rows the
    fork's selection read (its layer K-1 value states, already repeated to the query heads, and its rotary tables, cast
    back to their dtype: fp16 -> fp32 -> fp16 is exact): separates the method's arithmetic from the two environments'
    hidden states (two torch releases' kernels)."""
    import torch

    from baselines.ivcprune import FILL_RATIO, IVCPrune, ivc_keep, official_round

    dt = getattr(torch, entry["dtype"])
    v = entry["values"].to(dt)
    start, n = int(entry["start"]), int(entry["n"])
    visual, rows = torch.arange(start, start + n), torch.arange(start + n + 2, v.shape[0])
    rule = entry.get("rule", "qwen")
    counts = IVCPrune(rule=rule).counts(n, None)  # the rule's official fractions of n (seeds, foreground, IVC)
    return ivc_keep(v, rows, visual, entry["cos"].to(dt), entry["sin"].to(dt), rule, counts, None,
                    official_round(n * FILL_RATIO), "official")


def ours_qwen(budget, dtype: str, rt) -> tuple[str, None, dict]:
    if getattr(rt, "family", None) == "qwen2_vl":
        return "ivcprune", None, {"numerics": "official", "rule": "qwen2_vl", "layer": QWEN2_VL_LAYER,
                                  "scale_layers": False, "caches": "pruned"}
    return "ivcprune", None, {"numerics": "official", "rule": "qwen", "layer": QWEN_LAYER, "scale_layers": False,
                              "caches": "pruned"}


def record_ours_qwen(rt, store: list):
    """Per sample: the kept indices and the layer K-1 values our selection read (repeated to the query heads, as
    the fork's: their difference to the official rows is reported)."""
    from ._ours import qwen_rows_recorder

    def values(sig):
        v = sig.values(layer="prev")
        return v.repeat_interleave(sig.queries("last", layer="prev").shape[0] // v.shape[1], dim=1)

    return qwen_rows_recorder(rt, store, "values", values)
