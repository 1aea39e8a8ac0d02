"""FasterVLM (arXiv 2412.01818 v1, "[CLS] Attention is All You Need for Training-Free Visual Token Pruning"):
the authors' LLaVA fork ``Theia-4869/FasterVLM`` (branch ``main``; every change marked ``[FasterVLM]``).

- switch: the eval scripts pass ``--visual_token_num T`` (``llava/eval/model_vqa_loader.py``), which goes through
  ``load_pretrained_model(..., visual_token_num=T)`` to ``LlavaLlamaForCausalLM.__init__`` and is stored as
  ``model.visual_token_num`` (read by ``get_visual_token_num()``); ``enable`` sets that attribute on the loaded
  model. There is no other switch: the fork's CLIP tower always returns the select layer's [CLS] row
  (``clip_encoder.py`` ``feature_select``: ``attentions[-2][:, :, 0, 1:]``) and ``encode_images`` always prunes.
- kept indices: ``llava_arch.py`` ``encode_images`` returns ``(image_features, index_masks, image_attentions)``
  (``index_masks`` from ``torch.topk(image_attentions.mean(dim=1), k=T)``); ``record`` wraps the model's
  ``encode_images`` and records the True entries of ``index_masks`` per image as stage ``"vision"`` (patch indices
  0..63, ascending; the prefill's call: ``generate`` calls it again);
- glue (``_theia_forks.py``, not the method): the fork's ``forward`` cannot take images (its
  ``prepare_inputs_labels_for_multimodal`` returns 8 values there, ``forward`` unpacks 6: its eval scripts only call
  ``generate``) and its ``generate`` returns ``(output_ids, v_token_num, cls_attn)``; ``enable`` gives the loaded
  model an instance ``forward`` that does what the fork's ``generate`` does for its prefill and an instance
  ``generate`` that returns the fork's ``output_ids``;
- import: the clone's ``llava/`` has no ``__init__.py`` (a namespace package, as the fork's scripts import it from
  the repository's root), so Python's import takes the installed llava-torch (a regular package, later on the path)
  and the worker refuses to run. ``before_import`` (called after the worker puts the clone first on the path, before
  ``import llava``) makes ``llava`` the clone's namespace package (``__path__`` = the clone's ``llava/``), its
  ``__file__`` set to ``llava/__init__.py`` there (a file that does not exist: only the worker's check reads it);
- ours: ``fastervlm`` in its reference mode (``numerics="official"``).

LLaVA-NeXT (``NEXT``; ``python -m parity next --method fastervlm``): the same switch and recorder on the official
``llava-v1.6-tiny`` (anyres, 24 x 24 patches per crop as CLIP-L/336: nothing hard-coded to map). The fork's
``prepare_inputs_labels_for_multimodal`` forces ``mm_patch_merge_type = 'spatial'``: ``encode_images`` runs all crops
of the batch in one call, ``topk(T)`` per crop (the base crop too), and the packing keeps each crop's masked tokens,
the base crop first, then the grid crops' in row-major order on the full grid, no unpad, no newline; ``record``
stores the ``index_masks`` of every crop, ``("vision", (crops, T))``. Ours: ``llava.load(...,
next_geometry="official", next_layout="spatial")`` (``NEXT_LOAD``), ``fastervlm`` in its reference mode, the kept
patches per crop read from the vision selection by ``parity.next.record_vision_per_crop``. Budgets per crop
(``NEXT_BUDGETS``). The fork's anyres preprocessing is its own: its ``llava/mm_utils.py`` ``select_best_resolution``
picks the pinpoint with the highest fill ratio (``scaled_w * scaled_h / (w * h)``, upscaling allowed), LLaVA's
(llava-torch 1.2.2.post1, our ``next_geometry="official"``) the highest effective resolution, then the least waste;
where they part the crops differ (the 96 x 96 and 176 x 99 images of the tiny build) and those rows are reported,
not matched (``tests/test_parity_next_adapters.py`` shows every row identical with LLaVA's function in a copy of the
clone).
"""

from __future__ import annotations

REPOSITORY = "Theia-4869/FasterVLM"
COMMIT = "f5d5f12037e105a51865ecb4b28a73cd86eb4921"
PACKAGES = ("llava",)
INSTALLED = False

#: LLaVA-NeXT (``python -m parity next --method fastervlm``): the fork's NeXT path, ``prepare_inputs_labels_for_
#: multimodal`` with ``mm_patch_merge_type`` forced to ``'spatial'`` (T per crop, base crop first, the grid crops'
#: kept tokens in row-major order on the full grid, no unpad, no newline); ours with that packing
NEXT = True
#: tokens per crop of 576 (the paper's NeXT rows 2160 / 1440 / 720 / 290 / 145 over 5 crops = 432 / 288 / 144 /
#: 58 / 29 per crop: 50 / 75 / 90 % reduction here)
NEXT_BUDGETS = (288, 144, 58)
NEXT_LOAD = {"next_layout": "spatial"}


# ---- the official side (runs in .venv-official) ----

def _forks():
    """The shared glue (``_theia_forks.py`` beside this file), loaded by its path."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.realpath(__file__)), "_theia_forks.py")
    spec = importlib.util.spec_from_file_location("parity_adapter__theia_forks", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def before_import() -> None:
    """``llava`` = the namespace package of the first path entry whose ``llava/`` has no ``__init__.py`` (the clone,
    which the worker put first), as ``import llava`` gives it from the repository's root (module docstring)."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    if "llava" in sys.modules:
        return
    for entry in sys.path:
        folder = os.path.join(entry or ".", "llava")
        if os.path.isdir(folder):
            if os.path.isfile(os.path.join(folder, "__init__.py")):
                return  # a regular package first on the path: the import finds it anyway
            spec = importlib.machinery.ModuleSpec("llava", None, is_package=True)
            spec.submodule_search_locations = [os.path.realpath(folder)]
            mod = importlib.util.module_from_spec(spec)
            mod.__file__ = os.path.join(os.path.realpath(folder), "__init__.py")  # read by the worker's check only
            sys.modules["llava"] = mod
            return


def enable(model, method: dict) -> None:
    model.visual_token_num = method["budget"]  # what load_pretrained_model(..., visual_token_num=T) stores
    _forks().glue(model)


def record(model, store: list) -> list:
    return _forks().record_masks(model, store)


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    return "fastervlm", {"numerics": "official"}


def record_ours(rt, store: list):
    from ._ours import selections

    def finish(n_samples: int) -> None:
        kept = selections(rt, "vision", n_samples)
        if kept is not None:
            store.append(("vision", kept))

    return finish
