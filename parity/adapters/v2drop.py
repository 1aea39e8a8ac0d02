"""V2Drop (CVPR 2026, arXiv 2509.01552): the authors' repository ``xuyang-liu16/V2Drop``, a LLaVA tree at its root
whose LLaVA model's LLaMA is ``V2DropLlamaModel`` (``llava/model/language_model/V2Drop.py``; ``llava_llama.py``
builds the model on it, so loading the checkpoint with the repository's own builder switches it on: no flag).

- the official schedule: no budget exists; stages before layers {3, 17, 22} keep 0.5 / 0.5 / 0 of the current image
  tokens. On the tiny model the stage layers are **{1, 2, 3}** (the official ones of a 32-layer LLaMA mapped onto the
  4-layer one as ``llava.ops.scale_layers`` maps them), with the same keep ratios: 64 -> 32 -> 16 -> 1.
- shims: ``V2DropLlamaModel.forward`` compiled again from the clone's source with its literals replaced, each found
  exactly once: the image's start ``35`` (the vicuna_v1 prompt's) by the placeholder's position in the prompt (three
  places), the image length ``576`` and the test ``seq_len > 576`` by the tiny tower's 64 patches, the stage layers
  ``{3,17,22}`` and the ``current_layer == 3 / 17 / 22`` tests by 1 / 2 / 3. And each LLaMA attention of this
  environment's transformers takes its RoPE table up to the largest position id + 1 instead of its key count (what
  CLSE's vendored transformers changes): the official code keeps the kept tokens' original positions, which stock
  4.36 / 4.37 index beyond a table sliced to the shortened sequence (an index error); the rows are the same table's.
  Nothing else of the official code is changed.
- alone: the official code is batch-1 only (``[0]`` indexing, one fixed range): each image alone on both sides.
- kept indices: per stage, the visual rows entering decoder layer K (a pre-hook reads their ``position_ids``, which
  keep the original positions), as indices into the stage's candidates (the previous stage's kept rows), stages
  ``"llm1"``, ``"llm2"``, ``"llm3"``.
- ours: ``v2drop`` in its reference mode (``numerics="official"``: the difference and its norm in the model's dtype,
  ``torch.topk``) with the LLaVA rule's keep ratios and ``layers`` (1, 2, 3) unscaled; the earlier layers' caches are
  not pruned on either side.
"""

from __future__ import annotations

REPOSITORY = "xuyang-liu16/V2Drop"
COMMIT = "219e03ede8cf6a70d1534903fa238b13dd900bbb"
PACKAGES = ("llava",)
INSTALLED = False
OFFICIAL = {"alone": True}
#: no budget: the official schedule (ours ignores the value; the report labels the run with it)
BUDGETS = (0,)

#: the official stage layers {3, 17, 22} on the 4-layer tiny LLaMA (``llava.ops.scale_layers([3, 17, 22], 4)``)
LAYERS = (1, 2, 3)
OFFICIAL_LAYERS = (3, 17, 22)
#: the tiny tower's patches (the official 576 is CLIP-L/336's)
PATCHES = 64


def edits(patches: int = PATCHES) -> list[tuple[str, str]]:
    """The literal replacements of the official forward (each pattern found exactly once)."""
    start = "self._parity_image_start"
    return [
        ("if current_hidden_states.size(1) > 576:", f"if current_hidden_states.size(1) > {patches}:"),
        ("image_token_amount = 576", f"image_token_amount = {patches}"),
        ("target_layer_indices = {3,17,22}", "target_layer_indices = {" + ",".join(map(str, LAYERS)) + "}"),
        ("candidate_indices = torch.arange(35, self.image_token_amount_after_selection + 35, device=device)",
         f"candidate_indices = torch.arange({start}, self.image_token_amount_after_selection + {start}, "
         "device=device)"),
        ("torch.arange(35, device=device), selected_indices, "
         "torch.arange(self.image_token_amount_after_selection + 35, current_seq_length, device=device)",
         f"torch.arange({start}, device=device), selected_indices, "
         f"torch.arange(self.image_token_amount_after_selection + {start}, current_seq_length, device=device)"),
        *[(f"if current_layer == {o}:", f"if current_layer == {t}:") for o, t in zip(OFFICIAL_LAYERS, LAYERS)],
    ]


# ---- the official side (runs in .venv-official) ----

def before_load(method: dict) -> None:
    from transformers.models.llama import modeling_llama as ml

    from llava.model.language_model.V2Drop import V2DropLlamaModel

    from .clse import recompile_forward  # CLSE's adapter: the same literal shim

    recompile_forward(V2DropLlamaModel, edits())
    # kept tokens keep their original positions: the RoPE table up to the largest position + 1 (same rows)
    for cls in (ml.LlamaAttention, ml.LlamaSdpaAttention):
        recompile_forward(cls, [("seq_len=kv_seq_len)", "seq_len=position_ids.max().item() + 1)")])
    from . import _official

    _official.cpu_cuda_timing(memory=True)  # the official generate() times itself (llava_llama.py 126-140)


def enable(model, method: dict) -> None:
    if int(model.get_vision_tower().num_patches) != PATCHES:
        raise ValueError(f"v2drop: the tiny tower has {model.get_vision_tower().num_patches} patches, not {PATCHES}")
    if len(model.get_model().layers) != 4:
        raise ValueError("v2drop: the stage layers 1 / 2 / 3 are those of the 4-layer tiny LLaMA")


def inputs(model, tokenizer, cases, prompts, input_ids) -> dict:
    if input_ids.shape[0] != 1:
        raise ValueError("v2drop: the official code runs one sample at a time (OFFICIAL['alone'])")
    row = [int(t) for t in input_ids[0]]
    if row.count(-200) != 1:
        raise ValueError("v2drop: one image placeholder expected")
    model.get_model()._parity_image_start = row.index(-200)
    return {}


def record(model, store: list) -> list:
    """Pre-hooks on decoder layers K: in the prefill their ``position_ids`` hold the kept rows' original positions
    (the worker's forward and generate() each run a prefill: the first one is recorded)."""
    from ._official import stage_hooks

    inner = model.get_model()
    handles, _ = stage_hooks(inner.layers, LAYERS, lambda: (inner._parity_image_start, PATCHES),
                             lambda kw: kw["position_ids"][0], lambda layer, kept, n: (f"llm{layer}", kept[None]),
                             store)
    return handles


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    return "v2drop", {"budget": None, "numerics": "official", "rule": "llava", "layers": LAYERS,
                      "scale_layers": False}


def record_ours(rt, store: list):
    from ._ours import llm_stage_recorder

    return llm_stage_recorder(rt, store)


# ---- Qwen2-VL (``python -m parity qwen --method v2drop``, parity/qwen.py): the official Qwen2-VL code ----
#
# ``Qwen2-VL/``: the repository's own ``Qwen2VLForConditionalGeneration`` (``Qwen2VL_V2Drop/modeling_qwen2_vl_self.py``:
# its language model is ``DART``, whose forward drops the tokens, 336-384) on its copy of transformers 4.45.0.dev0
# (``Qwen2-VL/transformers/src``, first on the path: ``QWEN_FORK``) in ``.venv-official-qwen2vl``.
# - switch: loading that class (``qwen_model_class``); the schedule is hard-coded: stages before layers 3, 16, 22
#   keep max(1, int(n * r)) of the current image tokens, r = 0.25 / 0.05 / 0. The tiny Qwen2-VL of this part has 24
#   decoder layers, so every official stage runs at its own layer (no scaling on either side).
# - the image's place: ``config.DART_config`` (``image_token_start_index``, ``image_token_length``), which the
#   lmms-eval wrapper the official script names (not in the repository) sets per prompt: ``qwen_inputs`` sets it
#   from the prompt's image pads before each prefill.
# - alone: the official code asserts batch 1.
# - recorded: per stage, the original sequence positions of the rows entering decoder layer K (its ``cache_position``,
#   which the official code gathers with the kept rows), as indices into the stage's candidates.
# - ours: ``v2drop`` in its reference mode on Qwen2-VL (``rule="qwen2vl"``: 3 / 16 / 22, 0.25 / 0.05 / 0 of the
#   current count), unscaled; the earlier layers' caches are not pruned on either side.

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
#: the repository's copy of transformers (the fork first on the path); its Qwen2-VL package two folders up
QWEN_ROOT = "Qwen2-VL/transformers/src"
#: no budget: the official schedule (one row per image)
QWEN_BUDGETS = (None,)
QWEN_LAYERS = (3, 16, 22)


def qwen_before_import(clone: str) -> None:
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(clone))))  # Qwen2-VL/: Qwen2VL_V2Drop


def qwen_model_class(tf):
    from Qwen2VL_V2Drop.modeling_qwen2_vl_self import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration


def qwen_enable(model, processor, method: dict) -> None:
    model.config.DART_config = None  # set per prompt (qwen_inputs)


def qwen_inputs(model, inputs) -> dict:
    ids = inputs["input_ids"]
    if ids.shape[0] != 1:
        raise ValueError("v2drop: the official Qwen2-VL code asserts batch 1")
    pads = (ids[0] == model.config.image_token_id).nonzero().flatten()
    start, n = int(pads[0]), int(pads.numel())
    if int(pads[-1]) != start + n - 1:
        raise ValueError("v2drop: the official Qwen2-VL code reads one contiguous image")
    model.config.DART_config = {"image_token_start_index": start, "image_token_length": n}
    model._parity_image = (start, n)
    return {}


def qwen_record(model, store: list) -> list:
    """Pre-hooks on decoder layers K: the prefill's ``cache_position`` holds the kept rows' original positions."""
    from ._official import stage_hooks

    handles, seen = stage_hooks(model.model.layers, QWEN_LAYERS, lambda: model._parity_image,
                                lambda kw: kw["cache_position"], lambda layer, kept, n: {"kept": kept, "n": n}, store)
    # one record per forward (the worker snapshots the store after its forward, before generate())
    return handles + [model.register_forward_pre_hook(lambda *a: seen.clear())]


def ours_qwen(budget, dtype: str, rt) -> tuple[str, None, dict]:
    return "v2drop", None, {"numerics": "official", "rule": "qwen2vl", "scale_layers": False}


def record_ours_qwen(rt, store: list):
    from ._ours import qwen_stage_recorder

    return qwen_stage_recorder(rt, store, "v2drop")
