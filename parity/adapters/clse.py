"""CLSE (ECCV 2026, arXiv 2606.24165): the authors' repository ``zjubinchen/CLSE``, its LLaVA-1.5 tree ``LLaVA1.5/``
(``CLSELlamaModel`` in ``llava/model/language_model/clse_model.py`` is the LLaVA model's LLaMA; the scores in
``tools.py``).

- switch: the environment variables its scripts set, ``PRUNE=True RETAIN_TOKEN=B``, read when the model is built;
  then on the tiny model the instance attributes the class sets in ``__init__``: ``K_list`` = **[1, 2, 3]** (the
  official [1, 11, 21] of a 32-layer LLaMA mapped onto the 4-layer one as ``llava.ops.scale_layers`` maps it; both
  sides score with layers 0 / 1 / 2's attention and prune before layers 1 / 2 / 3) and ``image_grid_thw`` =
  (1, 8, 8) (the tiny tower's grid; the official (1, 24, 24) is CLIP-L/336's).
- shim: ``CLSELlamaModel.forward`` compiled again from the clone's source with three literals replaced, each found
  exactly once: the image's start ``35`` (the vicuna_v1 prompt's under LLaMA's tokenizer) by the placeholder's
  position in each prompt, its end ``611`` (35 + 576) by start + the tower's 64 patches, and the schedules of 576
  (``[330, 210, 62]``, ``[220, 140, 41]``, ``[110, 70, 20]``) by the same counts of the tiny 64 patches,
  floor(64 * c / 576), as ours scales them. Nothing else of the official code is changed.
- alone: the official code is batch-1 only (``[0]`` indexing, one fixed range): each image alone on both sides.
- kept indices: per stage, the visual rows entering decoder layer K (a pre-hook reads their ``position_ids``, which
  keep the original positions), as indices into the stage's candidates (the previous stage's kept rows), stages
  ``"llm1"``, ``"llm2"``, ``"llm3"``.
- ours: ``clse`` in its reference mode (``numerics="official"``) with ``layer_list`` (1, 2, 3) unscaled and
  ``caches="pruned"`` (the official code gathers the caches of every earlier layer at each stage).
"""

from __future__ import annotations

REPOSITORY = "zjubinchen/CLSE"
COMMIT = "cfc9710abe4a1bd5480e521f3acd86ded4855ff3"
ROOT = "LLaVA1.5"
PACKAGES = ("llava",)
INSTALLED = False
OFFICIAL = {"alone": True}
BUDGETS = (192, 128, 64)

#: the official K_list on the 4-layer tiny LLaMA (``llava.ops.scale_layers([1, 11, 21], 4)``)
LAYERS = (1, 2, 3)
#: the tiny tower's patches and grid side
PATCHES, SIDE = 64, 8
#: the official schedules of 576 (clse_model.py 109-111) and the same for the tiny 64 patches, floor(64 * c / 576)
OFFICIAL_LISTS = {192: "[330, 210, 62]", 128: "[220, 140, 41]", 64: "[110, 70, 20]"}
TINY_LISTS = {192: (36, 23, 6), 128: (24, 15, 4), 64: (12, 7, 2)}


def rewrite(src: str, pattern: str, replacement: str) -> str:
    """``src`` with the one occurrence of ``pattern`` (a literal) replaced (refused unless it occurs exactly once)."""
    from . import _official

    return _official.rewrite(src, pattern, replacement, literal=True)


def recompile_forward(cls, edits: list[tuple[str, str]]) -> None:
    """``cls.forward`` compiled again from its own source (the clone's, or this environment's transformers) with each
    ``(pattern, replacement)`` applied once (literal strings), the official forward kept aside (``_official.install``:
    the worker calls ``before_load`` once per method of a job, and every call starts from the official one)."""
    from . import _official

    _official.install(cls, "forward", edits, literal=True)


# ---- the official side (runs in .venv-official) ----

def before_load(method: dict) -> None:
    import os

    from llava.model.language_model.clse_model import CLSELlamaModel
    from transformers.models.llama import modeling_llama as ml

    os.environ["PRUNE"] = "True"  # the scripts' switches, read in CLSELlamaModel.__init__
    os.environ["RETAIN_TOKEN"] = str(int(method["budget"]))
    recompile_forward(CLSELlamaModel, [("image_start = 35", "image_start = self._parity_image_start"),
                                       ("current_image_end = 611", f"current_image_end = image_start + {PATCHES}"),
                                       *[(lst, str(list(TINY_LISTS[b]))) for b, lst in OFFICIAL_LISTS.items()]])
    # the one change of CLSE's vendored transformers-4.37.2 (models/llama/modeling_llama.py 403, 508, 704): each
    # attention takes its RoPE table up to the largest position id + 1 instead of its key count, so that kept tokens
    # at their original positions (beyond the shortened sequence's length) find their rows; the same change here
    for cls in (ml.LlamaAttention, ml.LlamaSdpaAttention):
        recompile_forward(cls, [("seq_len=kv_seq_len)", "seq_len=position_ids.max().item() + 1)")])


def enable(model, method: dict) -> None:
    inner = model.get_model()
    if int(model.get_vision_tower().num_patches) != PATCHES:
        raise ValueError(f"clse: the tiny tower has {model.get_vision_tower().num_patches} patches, not {PATCHES}")
    inner.K_list = list(LAYERS)
    inner.image_grid_thw = (1, SIDE, SIDE)
    inner.retain_token = int(method["budget"])


def inputs(model, tokenizer, cases, prompts, input_ids) -> dict:
    if input_ids.shape[0] != 1:
        raise ValueError("clse: the official code runs one sample at a time (OFFICIAL['alone'])")
    row = [int(t) for t in input_ids[0]]
    if row.count(-200) != 1:
        raise ValueError("clse: one image placeholder expected")
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
    return "clse", {"numerics": "official", "layer_list": LAYERS, "scale_layers": False, "caches": "pruned"}


def record_ours(rt, store: list):
    from ._ours import llm_stage_recorder

    return llm_stage_recorder(rt, store)


# ---- Qwen2-VL (``python -m parity qwen --method clse``, parity/qwen.py): the official Qwen2-VL code ----
#
# ``Qwen2VL/``: the repository's copy of transformers 4.57.6 whose ``Qwen2VLTextModel`` is replaced by CLSE's
# (``Qwen2VL/transformers-4.57.6/src``, as its README's steps 1-3 make it; the model file's pruning 1034-1100, the
# last row's attention 1103-1107, 1137-1180), first on the path (``QWEN_FORK``) in ``.venv-official-qwen457``
# (``QWEN_ENV``: transformers 4.57.6's dependencies).
# - switch: the copy reads ``PRUNE`` and ``RETAIN_RATIO`` from the environment when the text model is built; the
#   adapter sets the same two attributes on the loaded model (``qwen_enable``). Stages ``K_list`` [1, 10, 19],
#   ``L_list`` [0] as shipped: unscaled on the 24-layer tiny Qwen2-VL.
# - shim: ``Qwen2VLForConditionalGeneration.forward`` marks the image's positions with Qwen2-VL's image token id
#   151655 (hard-coded); a pre-hook on the text model sets the mark from the tiny vocabulary's image id after that
#   line, on every call (a decode step's one token marks nothing, as there). Nothing else changed.
# - recorded: per stage, the image rows entering decoder layer K (the copy gathers ``cache_position`` with them).
# - ours: ``clse`` in its reference mode with the Qwen2-VL rule, ``layer_list`` (1, 10, 19) unscaled, the same
#   RETAIN_RATIO, the earlier layers' caches kept (the copy's gathering is commented out).

QWEN = True
QWEN_FAMILY = "qwen2-vl"
QWEN_FORK = True
QWEN_ENV = "qwen457"
QWEN_ROOT = "Qwen2VL/transformers-4.57.6/src"
#: the official RETAIN_RATIO presets (192 / 128 / 64 of 576)
QWEN_BUDGETS = (0.334, 0.223, 0.112)
QWEN_LAYERS = (1, 10, 19)


def qwen_enable(model, processor, method: dict) -> None:
    lm = model.model.language_model
    lm.prune, lm.retain_ratio = True, float(method["budget"])
    if tuple(lm.K_list) != QWEN_LAYERS or list(lm.L_list) != [0]:
        raise ValueError(f"clse: the copy's K_list {lm.K_list} / L_list {lm.L_list} are not the shipped ones")
    ids: dict = {}
    image_id = model.config.image_token_id

    def top(module, args, kwargs):
        ids["input_ids"] = kwargs.get("input_ids", args[0] if args else None)

    def text(module, args, kwargs):  # after the top forward's hard-coded mark: the tiny vocabulary's image id
        module.visual_pos_masks = ids["input_ids"] == image_id

    model._parity_hooks = [model.register_forward_pre_hook(top, with_kwargs=True),
                           lm.register_forward_pre_hook(text, with_kwargs=True)]


def qwen_inputs(model, inputs) -> dict:
    ids = inputs["input_ids"]
    if ids.shape[0] != 1:
        raise ValueError("clse: the official Qwen2-VL code reads the first sample's image only")
    pads = (ids[0] == model.config.image_token_id).nonzero().flatten()
    model._parity_image = (int(pads[0]), int(pads.numel()))
    return {}


def qwen_record(model, store: list) -> list:
    from ._official import stage_hooks

    handles, seen = stage_hooks(model.model.language_model.layers, QWEN_LAYERS, lambda: model._parity_image,
                                lambda kw: kw["cache_position"], lambda layer, kept, n: {"kept": kept, "n": n}, store)
    return handles + [model.register_forward_pre_hook(lambda *a: seen.clear())] + list(model._parity_hooks)


def ours_qwen(budget, dtype: str, rt) -> tuple[str, None, dict]:
    return "clse", None, {"retain_ratio": float(budget), "numerics": "official", "rule": "qwen2_vl",
                          "layer_list": QWEN_LAYERS, "scale_layers": False}


def record_ours_qwen(rt, store: list):
    from ._ours import qwen_stage_recorder

    return qwen_stage_recorder(rt, store, "clse")
