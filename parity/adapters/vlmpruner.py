"""VLM-Pruner (CVPR 2026, arXiv 2512.02700): the authors' repository ``Casey-bit/VLMPruner``, a LLaVA tree at its root
whose LLaVA model's LLaMA is ``VLMPruner`` (``llava/model/language_model/modeling_llama_self.py``, on that file's own
decoder layers, which also return each layer's q / k / v; ``llava_llama.py`` builds the model on it, so the
repository's own builder switches it on).

- switch: ``model.config.VLMPruner_config`` as the official loader's ``configure_VLMPruner`` builds it
  (``llava/eval/model_vqa_loader.py`` 19-36) with the scripts' ``--pruned_layer 2 --pivot_image_token 4``, threshold
  0.8 and token batch 16, ``image_token_start_index`` = the placeholder's position in the prompt (the official 35 of
  the vicuna_v1 prompt), ``image_token_length`` = the tiny tower's 64 patches, and ``config.text_length = None``
  (the loader sets it for LLaVA-1.6 only). On the tiny model ``K`` = **1** (the official 2 of a 32-layer LLaMA mapped
  onto the 4-layer one as ``llava.ops.scale_layers`` maps it: round(2 * 4 / 32) clipped to 1).
- budgets: the official reduction ratios 0.889 / 0.778 / 0.667 give round(64 * (1 - r)) = 7 / 14 / 21 of the tiny
  tower's 64 tokens: the run's budget is that count, both sides get the ratio.
- shims: ``CLIPVisionTower.__init__`` (``llava/model/multimodal_encoder/clip_encoder.py`` 14) names the authors' own
  local tower folder in place of the checkpoint's ``mm_vision_tower``: compiled again with the stock line (commented
  out just above it) restored. ``get_retained_image_token`` and ``get_spatial_pos`` compiled again from the clone's source with literals
  replaced, each found exactly once: the grid width ``24`` (twice: the norm 1 / (24 sqrt 2) and ``width = 24``) by the
  tiny tower's 8; ``topk(last_channel_var, k=256)`` by ``k=min(256, channels)`` (the tiny LLaMA has 64); the pivots'
  ``torch.cdist`` of the keys by one that computes in fp32 and rounds to the keys' dtype on the CPU (which has no
  half-precision ``cdist``; ours does the same in its reference mode). Nothing else of the official code is changed
  (its attention already takes its RoPE table up to the largest kept position).
- alone: the official code is batch-1 only (an assert): each image alone on both sides.
- kept indices: what ``get_retained_image_token`` returns, minus the image's start, stage ``"llm1"``; the logits
  compare the rewritten kept hidden states (the recovery merge) too.
- ours: ``vlmpruner`` in its reference mode (``numerics="official"``), the same ratio, ``layer=1`` unscaled; the
  earlier layers' caches are not pruned on either side.
"""

from __future__ import annotations

REPOSITORY = "Casey-bit/VLMPruner"
COMMIT = "556a9142c67dfb4c27420e31bb59e2efe502369a"
PACKAGES = ("llava",)
INSTALLED = False
OFFICIAL = {"alone": True}
#: kept counts of the tiny tower's 64 tokens for the official reduction ratios (round(64 * (1 - r)))
RATIOS = {7: 0.889, 14: 0.778, 21: 0.667}
BUDGETS = tuple(RATIOS)
#: the decoder layer VLM-Pruner prunes before on the 4-layer tiny LLaMA (the official 2 of 32, scaled)
LAYER = 1
STAGE = f"llm{LAYER}"
#: the tiny tower's patch grid (the official 24 x 24 is CLIP-L/336's)
SIDE = 8
PATCHES = SIDE * SIDE


def recompile(cls, name: str, edits: list[tuple[str, str]]) -> None:
    """``cls.<name>`` compiled again from the clone's source with each ``(pattern, replacement)`` applied once
    (literal strings), the official function kept aside (``_official.install``)."""
    from . import _official

    _official.install(cls, name, edits, literal=True)


def _parity_cdist(a, b):
    """``torch.cdist`` where the CPU has no half-precision kernel: in fp32, rounded to the inputs' dtype."""
    import torch

    if a.dtype in (torch.float16, torch.bfloat16) and a.device.type == "cpu":
        return torch.cdist(a.float(), b.float()).to(a.dtype)
    return torch.cdist(a, b)


# ---- the official side (runs in .venv-official) ----

def before_load(method: dict) -> None:

    from llava.model.language_model import modeling_llama_self as mls
    from llava.model.multimodal_encoder import clip_encoder

    # the authors' own tower path in place of the checkpoint's (the commented line above it is the stock one)
    recompile(clip_encoder.CLIPVisionTower, "__init__", [
        ("self.vision_tower_name = '/cache/huggingface/clip-vit-large-patch14-336'",
         "self.vision_tower_name = vision_tower"),
        ("super().__init__()", "super(CLIPVisionTower, self).__init__()"),
    ])

    mls._parity_cdist = _parity_cdist
    recompile(mls.VLMPruner, "get_retained_image_token", [
        ("self.norm_factor = 1.0 / (24*math.sqrt(2))", f"self.norm_factor = 1.0 / ({SIDE}*math.sqrt(2))"),
        ("torch.topk(last_channel_var, k=256)", "torch.topk(last_channel_var, k=min(256, last_channel_var.shape[0]))"),
        ("dists = torch.cdist(k_states_image_token, k_states_image_token[pivot_indices[:i]])",
         "dists = _parity_cdist(k_states_image_token, k_states_image_token[pivot_indices[:i]])"),
    ])
    recompile(mls.VLMPruner, "get_spatial_pos", [("width = 24", f"width = {SIDE}")])
    from . import _official

    _official.cpu_cuda_timing()  # a generate() that times itself with CUDA events, as other LLaVA forks


def enable(model, method: dict) -> None:
    if int(model.get_vision_tower().num_patches) != PATCHES:
        raise ValueError(f"vlmpruner: the tiny tower has {model.get_vision_tower().num_patches} patches, not {PATCHES}")
    if len(model.get_model().layers) != 4:
        raise ValueError("vlmpruner: layer 1 is the 4-layer tiny LLaMA's")
    budget = int(method["budget"])
    if budget not in RATIOS:
        raise ValueError(f"vlmpruner: budgets are the kept counts {sorted(RATIOS)} of the official ratios")
    model.config.VLMPruner_config = {  # configure_VLMPruner (model_vqa_loader.py 19-36)
        "K": LAYER, "image_token_start_index": None, "image_token_length": PATCHES,
        "reduction_ratio": RATIOS[budget], "retain_token_num_for_llava_next": None, "pivot_image_token": 4,
        "threshold": 0.8, "token_batch": 16,
    }
    model.config.text_length = None
    model.config.count = 0


def inputs(model, tokenizer, cases, prompts, input_ids) -> dict:
    if input_ids.shape[0] != 1:
        raise ValueError("vlmpruner: the official code runs one sample at a time (OFFICIAL['alone'])")
    row = [int(t) for t in input_ids[0]]
    if row.count(-200) != 1:
        raise ValueError("vlmpruner: one image placeholder expected")
    model.config.VLMPruner_config["image_token_start_index"] = row.index(-200)
    return {}


class _Restore:
    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def remove(self):
        self.obj.__dict__.pop(self.name, None)


def record(model, store: list) -> list:
    inner = model.get_model()
    fn = type(inner).get_retained_image_token
    done = []

    def get_retained_image_token(config, last_layer_state, any_states):
        kept, state = fn(inner, config, last_layer_state, any_states)
        if not done:  # the worker's forward and generate() each run a prefill: the first one is recorded
            done.append(True)
            start = config.VLMPruner_config["image_token_start_index"]
            store.append((STAGE, (kept - start)[None].cpu().clone()))
        return kept, state

    inner.get_retained_image_token = get_retained_image_token
    return [_Restore(inner, "get_retained_image_token")]


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    """The official ratio for one of its kept counts (``BUDGETS``, what the official side runs); another count as
    ``keep_tokens`` (the same rule, a count the official scripts do not pass)."""
    count = ({"reduction_ratio": RATIOS[int(budget)]} if int(budget) in RATIOS
             else {"keep_tokens": int(budget)})
    return "vlmpruner", {"budget": None, **count, "rounding": "round", "numerics": "official", "layer": LAYER,
                         "scale_layers": False}


def record_ours(rt, store: list):
    from ._ours import llm_stage_recorder

    return llm_stage_recorder(rt, store)


# ---- Qwen2-VL (``python -m parity qwen --method vlmpruner``, parity/qwen.py): the official Qwen2-VL code ----
#
# ``Qwen2-VL/``: the repository's own ``Qwen2VLForConditionalGeneration`` (``Qwen2VL_VLMPruner/modeling_qwen2_vl_self.py``:
# its language model is ``VLMPruner``, which prunes before layer K from layer K-1's output and keys, 335-365, the
# choice in ``get_retained_image_token`` 417-530) on its copy of transformers 4.45.0.dev0 (``QWEN_FORK``) in
# ``.venv-official-qwen2vl``.
# - switch: loading that class (``qwen_model_class``) and ``config.VLMPruner_config`` as the official lmms-eval
#   scripts pass it (``eval_scripts/lmms_eval_*.sh``: ``pruned_layer=2``, ``pivot_image_token=4``, the reduction
#   ratio; threshold 0.8 and token batch 16 as the LLaVA scripts), per prompt (``qwen_inputs``) the image's start and
#   length and its merged grid (``height`` / ``width``: ``image_grid_thw`` / 2), which the lmms-eval wrapper the
#   scripts name (not in the repository) sets. K = 2 unscaled (the 24-layer tiny Qwen2-VL).
# - shims: ``get_retained_image_token`` compiled again with ``topk(last_channel_var, k=256)`` -> ``k=min(256,
#   channels)`` (the tiny LLM has 64) and the pivots' ``cdist`` in fp32 rounded to the keys' dtype on the CPU, as the
#   LLaVA rows. Nothing else changed.
# - recorded: what ``get_retained_image_token`` returns, minus the image's start (the worker's forward).
# - ours: ``vlmpruner`` in its reference mode with the same ratio (Qwen: ``int`` rounding), ``layer=2`` unscaled.

QWEN = True
QWEN_FAMILY = "qwen2-vl"
QWEN_FORK = True
#: its copy of transformers 4.45.0.dev0 computes the M-RoPE positions in prepare_inputs_for_generation only: the
#: worker hands its forward the positions generate() computes
QWEN_POSITIONS_FROM_GENERATE = True
#: its copy's Qwen2-VL tower attends every image of a batch in one SDPA call over all their patches with a
#: block-diagonal mask (transformers 4.57 and 5 attend one image at a time): the worker runs each unpruned batch
#: a second time with that call split by image, and the row reports it (docs/parity.md, Qwen2-VL)
QWEN_BATCHED_TOWER = True
QWEN_ROOT = "Qwen2-VL/transformers/src"
#: the official reduction ratios (64 / 128 / 192 of 576)
QWEN_BUDGETS = (0.889, 0.778, 0.667)
QWEN_LAYER = 2


def qwen_before_import(clone: str) -> None:
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(clone))))  # Qwen2-VL/: Qwen2VL_VLMPruner
    from Qwen2VL_VLMPruner import modeling_qwen2_vl_self as mq

    mq._parity_cdist = _parity_cdist
    recompile(mq.VLMPruner, "get_retained_image_token", [
        ("topk_indices = torch.topk(last_channel_var, k=256).indices",
         "topk_indices = torch.topk(last_channel_var, k=min(256, last_channel_var.shape[0])).indices"),
        ("dists = torch.cdist(k_states_image_token, k_states_image_token[pivot_indices[:i]])",
         "dists = _parity_cdist(k_states_image_token, k_states_image_token[pivot_indices[:i]])"),
    ])


def qwen_model_class(tf):
    from Qwen2VL_VLMPruner.modeling_qwen2_vl_self import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration


def qwen_enable(model, processor, method: dict) -> None:
    model.config.VLMPruner_config = {"K": QWEN_LAYER, "image_token_start_index": None, "image_token_length": None,
                                     "reduction_ratio": float(method["budget"]), "pivot_image_token": 4,
                                     "threshold": 0.8, "token_batch": 16, "height": None, "width": None,
                                     **method.get("official_kwargs", {})}  # planted changes (tests)


def qwen_inputs(model, inputs) -> dict:
    ids = inputs["input_ids"]
    if ids.shape[0] != 1:
        raise ValueError("vlmpruner: the official Qwen2-VL code asserts batch 1")
    pads = (ids[0] == model.config.image_token_id).nonzero().flatten()
    start, n = int(pads[0]), int(pads.numel())
    _, h, w = (int(v) for v in inputs["image_grid_thw"][0])
    merge = model.config.vision_config.spatial_merge_size
    model.config.VLMPruner_config.update(image_token_start_index=start, image_token_length=n, height=h // merge,
                                         width=w // merge)
    return {}


def qwen_record(model, store: list) -> list:
    """Every call (the worker snapshots the store after its forward, before generate() runs its own prefill)."""
    inner = model.model
    fn = type(inner).get_retained_image_token

    def get_retained_image_token(config, last_layer_state, any_states):
        kept, state = fn(inner, config, last_layer_state, any_states)
        cfg = config.VLMPruner_config
        store.append({"kept": (kept - cfg["image_token_start_index"]).cpu().clone(),
                      "n": int(cfg["image_token_length"])})
        return kept, state

    inner.get_retained_image_token = get_retained_image_token
    return [_Restore(inner, "get_retained_image_token")]


def ours_qwen(budget, dtype: str, rt) -> tuple[str, None, dict]:
    return "vlmpruner", None, {"reduction_ratio": float(budget), "numerics": "official", "layer": QWEN_LAYER,
                               "scale_layers": False}


def record_ours_qwen(rt, store: list):
    def finish(n_samples: int) -> None:
        if n_samples != 1:
            raise ValueError("vlmpruner: the Qwen rows run one image at a time")
        sel = rt.engine.selections.get((0, 0))
        n = int(rt.engine.stats.samples[0].visual_candidates)
        if sel is not None:
            store.append({"kept": sel.keep.flatten().sort().values.cpu(), "n": n})

    return finish
