"""VisPruner (ICCV 2025, arXiv 2412.01818 v2, "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective
Token Pruning in VLMs"): the authors' LLaVA fork ``Theia-4869/VisPruner`` (every change marked ``[VisPruner]``).

- switch: the eval scripts pass ``--visual_token_num T --important_ratio r`` (``scripts/v1_5/eval/*.sh`` take both
  as arguments; ``llava/eval/model_vqa_loader.py`` defaults 576 / 0.5), which go through
  ``load_pretrained_model(..., visual_token_num=T, important_ratio=r)`` to ``LlavaLlamaForCausalLM.__init__``
  (required positional parameters there) and are stored as ``model.visual_token_num`` / ``model.important_ratio``.
  The worker's builder call passes neither, so ``before_load`` gives ``__init__`` the two as keywords defaulting to
  None, and ``enable`` sets both attributes, as the builder would have. r = 0.5 here (the CLI default) on both
  sides (ours ``important_ratio=0.5``; our default would be 0.75 for T <= 64, the README's examples).
- kept indices: ``llava_arch.py`` ``encode_images`` returns ``(image_features, index_masks)``; ``record`` wraps it
  and records the True entries of ``index_masks`` per image as stage ``"vision"`` (patch indices, ascending).
- budgets: the official duplicate-removal loop indexes A's survivors against
  ``torch.arange(B).unsqueeze(-1).expand(-1, R // 2 - r)``, which raises for some (N, T, r): on the tiny tower's
  64 patches with r = 0.5, T = 8 ends at |R| = 12, r = 8 and ``expand(-1, -2)`` raises (T = 4 too); 12, 16, 20,
  24, 28, 32 run. Run it with ``--budgets 12 16 32`` (our reference mode applies our rule where the official code
  raises: docs/methods/vispruner.md).
- each image alone (``OFFICIAL["alone"]``): on a 4-D image batch the fork returns
  ``image_features[index_masks].unsqueeze(0)`` (``prepare_inputs_labels_for_multimodal``: all images' kept tokens
  in ONE row), so the second sample of a batch indexes ``image_features[1]`` and raises (its eval loader asserts
  batch size 1).
- import: the clone's ``llava/model/__init__.py`` imports ``llava_qwen`` (``Qwen2Config`` / ``Qwen2Model`` /
  ``Qwen2ForCausalLM``) and its tower builder ``siglip_encoder`` (``SiglipVisionModel`` / ``SiglipVisionConfig`` /
  ``SiglipImageProcessor``), names transformers added in 4.37 (the fork pins 4.37.2). ``before_import`` puts
  placeholders of those six names on 4.36.2's ``transformers`` (using one raises); the LLaMA + CLIP path never
  touches them (the worker calls it before ``import llava``).
- ours: the reference mode casts the features to the LLM's dtype (the official ``.to(images.dtype)``), since this
  adapter found it cast to fp16 on the fp32 model too (baselines/vispruner.py, tests/test_reference_vispruner.py).
- glue (``_theia_forks.py``): the fork's ``forward`` cannot take images and its ``generate`` returns
  ``(output_ids, visual_token_num)``, as FasterVLM's.
- ours: ``vispruner`` in its reference mode (``numerics="official"``) with ``important_ratio=0.5``.

LLaVA-NeXT (``NEXT``; ``python -m parity next --method vispruner``): the same switch and recorder on the official
``llava-v1.6-tiny``. The fork's ``prepare_inputs_labels_for_multimodal`` strips ``_unpad`` from the merge type (the
``spatial`` packing: T per crop, the base crop included, the grid crops' kept tokens in row-major order on the full
grid, no unpad, no newline), and its ``llava/mm_utils.py`` ``select_best_resolution`` ignores the pinpoints:
``possible_resolutions = [(672, 672)]`` ("[VisPruner] Fix resolution for LLaVA-NeXT to get 2880 visual tokens"), i.e.
every image on a 2 x 2 grid of CLIP-L/336 crops. ``enable`` maps that literal to the tiny tower: the function is
recompiled from the clone's source with only ``[(672, 672)]`` replaced by ``[(2 x 96, 2 x 96)]`` (refused unless the
literal is found exactly once) and put back in ``llava.mm_utils`` (where ``process_anyres_image`` and
``get_anyres_image_grid_shape`` look it up). Ours: ``llava.load(..., next_geometry="official",
next_layout="spatial")`` (``NEXT_LOAD``) and ``next_runtime``: the model's and the processor's pinpoints set to the one
2 x 2 resolution (192 x 192), as a user reproducing the fork sets the checkpoint's ``image_grid_pinpoints``. Each
image alone, as on LLaVA-1.5 (``OFFICIAL``).
"""

from __future__ import annotations

REPOSITORY = "Theia-4869/VisPruner"
COMMIT = "aefa01adc7c7ce6334e880c88225e90cede760d1"
PACKAGES = ("llava",)
INSTALLED = False
#: the budgets compared by default: at T = 8 on 64 patches the official loop calls expand(-1, -2) and raises
BUDGETS = (12, 16, 32)
OFFICIAL = {"alone": True}

#: r, on both sides (the official CLI default)
IMPORTANT_RATIO = 0.5

#: LLaVA-NeXT (``python -m parity next --method vispruner``; module doc): the fork's ``prepare_inputs_labels_for_
#: multimodal`` strips ``_unpad`` from ``mm_patch_merge_type`` (the ``spatial`` packing: T per crop, no unpad, no
#: newline) and its ``select_best_resolution`` always picks a 2 x 2 grid; ``encode_images`` prunes every crop of the
#: batch in one call, its ``index_masks`` one row per crop
NEXT = True
#: tokens per crop of 576
NEXT_BUDGETS = (128, 64, 32)
NEXT_LOAD = {"next_layout": "spatial"}
#: the fork's fixed NeXT resolution (``llava/mm_utils.py`` ``select_best_resolution``, marked ``[VisPruner] Fix
#: resolution for LLaVA-NeXT to get 2880 visual tokens``): CLIP-L/336's 2 x 2 crops, mapped to 2 x 2 tiny crops


# ---- the official side (runs in .venv-official) ----

def _forks():
    """The shared glue (``_theia_forks.py`` beside this file)."""
    from . import _theia_forks

    return _theia_forks


#: names the clone imports at module level that transformers 4.36.2 lacks (added in 4.37: Qwen2 for
#: ``llava_qwen.py``, SigLIP for ``siglip_encoder.py``), with their kind
MISSING_IN_436 = {"Qwen2Config": "config", "Qwen2Model": "model", "Qwen2ForCausalLM": "model",
                  "SiglipVisionConfig": "config", "SiglipVisionModel": "model", "SiglipImageProcessor": "other"}


def before_import() -> None:
    """Placeholders for the names of :data:`MISSING_IN_436` on ``transformers`` (only where absent): subclasses that
    let the clone's modules define their classes (``class LlavaQwenConfig(Qwen2Config)``, ``AutoConfig.register``)
    and raise when instantiated or loaded. The LLaVA-1.5 LLaMA + CLIP path never uses them."""
    import transformers
    from transformers import PretrainedConfig, PreTrainedModel

    def refuse(name):
        def fail(*args, **kwargs):
            raise NotImplementedError(f"{name} needs transformers >= 4.37 (a placeholder of the VisPruner parity "
                                      "adapter: the official worker runs 4.36.2)")
        return fail

    for name, kind in MISSING_IN_436.items():
        if hasattr(transformers, name):
            continue
        base = {"config": PretrainedConfig, "model": PreTrainedModel, "other": object}[kind]
        body = {"__init__": refuse(name), "from_pretrained": classmethod(refuse(name))}
        if kind == "config":
            body = {"model_type": name.lower().replace("config", ""), "from_pretrained": classmethod(refuse(name))}
        setattr(transformers, name, type(name, (base,), body))


def before_load(method: dict) -> None:
    """``LlavaLlamaForCausalLM.__init__(config, visual_token_num, important_ratio)`` with the two as keywords (None:
    ``enable`` sets them), since the worker's builder call passes neither."""
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    init = LlavaLlamaForCausalLM.__init__
    if getattr(init, "parity_keywords", False):
        return

    def __init__(self, config, visual_token_num=None, important_ratio=None):
        init(self, config, visual_token_num, important_ratio)

    __init__.parity_keywords = True
    LlavaLlamaForCausalLM.__init__ = __init__


def enable(model, method: dict) -> None:
    # what load_pretrained_model(..., visual_token_num=T, important_ratio=r) stores
    model.visual_token_num = method["budget"]
    model.important_ratio = IMPORTANT_RATIO
    forks = _forks()
    forks.glue(model)
    if getattr(model.config, "image_aspect_ratio", None) == "anyres":
        forks.fixed_resolution(2 * model.get_vision_tower().config.image_size)


def record(model, store: list) -> list:
    return _forks().record_masks(model, store)


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    return "vispruner", {"numerics": "official", "important_ratio": IMPORTANT_RATIO}


def next_runtime(rt) -> None:
    """NeXT: the fork's fixed 2 x 2 grid on our side (``parity.adapters._ours.fixed_grid``)."""
    from ._ours import fixed_grid

    fixed_grid(rt)


def record_ours(rt, store: list):
    from ._ours import selections

    def finish(n_samples: int) -> None:
        kept = selections(rt, "vision", n_samples)
        if kept is not None:
            store.append(("vision", kept))

    return finish
