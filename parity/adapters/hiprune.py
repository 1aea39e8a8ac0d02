"""HiPrune (arXiv 2508.00553): the authors' repository ``Danielement321/HiPrune``, which vendors LLaVA under
``LLaVA/`` (``ROOT``): ``LLaVA/llava/model/llava_arch.py`` ``encode_images`` (global attentions, anchors, buffers,
registers, the boolean index mask applied to the projected features) and
``LLaVA/llava/model/multimodal_encoder/clip_encoder.py`` (the tower runs with ``output_attentions=True``).

- switch: the environment variables its README and ``bench_llava.sh`` set, ``HIPRUNE_RETENTION`` (T),
  ``HIPRUNE_ALPHA`` (0.1), ``HIPRUNE_OBJECT_LAYER``; ``encode_images`` reads them at every call, so ``enable`` /
  ``inputs`` set them. The object layer: the official 9 of CLIP-L's 24 layers, on the tiny 8-layer CLIP **3**
  (``attentions[2]``, the layer that makes ``hidden_states[3]``), as our ``object_layer_reference=24`` scales it
  (round(9 * 8 / 24)); both sides are given 3 explicitly. The deep layer is the official
  ``attentions[mm_vision_select_layer]`` (-2) on both sides.
- ``HIPRUNE_RETENTION`` is divided by the images of one tower call (``int(RETENTION / B)``, ``llava_arch.py:144``;
  the official runs are batch 1): ``inputs`` sets it to T * (images in the batch), so each image keeps T, the
  budget ours gives each image; the batch of four runs (left-padded) on both sides.
- the grid: ``encode_images`` hard-codes CLIP-L/336's 24 x 24 patch grid (buffers ``+-24``, ``clamp(0, 575)``,
  ``llava_arch.py:161-163``). On the harness's default 8 x 8 tower that is another method (neighbours 3 rows away)
  and, once there is an anchor (a = round(T * 0.1 / 5) >= 1: T >= 26), fails: at T = 32 ``scatter_``
  (``llava_arch.py:168``) raises "index 66 is out of bounds for dimension 1 with size 64" (anchor 42 + 24).
  ``GRID`` = 24: compare on the tiny LLaVA-1.5 weights built with a 96 px / patch 4 tower (24 x 24 patches,
  ``parity.build.NEXT_TOWER``'s), which the harness builds for it (``parity.build.build_for``, in ``WORK/grid24``).
- two shims for running off CUDA the official code's own path: (1) ``encode_images`` moves both attention maps with
  ``.cuda()`` (``llava_arch.py:146, 150``); off CUDA ``enable`` makes ``Tensor.cuda`` return the tensor where it is
  (the model is on the CPU), in the worker's process only; (2) the official ``LlavaLlamaForCausalLM.forward``
  unpacks six values from ``prepare_inputs_labels_for_multimodal``, which returns eight with images
  (``llava_llama.py:97-113`` vs ``llava_arch.py:395``), so ``model(..., images=...)`` raises; its ``generate`` (what
  the eval scripts call) unpacks the eight and runs the prefill on ``inputs_embeds``. ``enable`` gives the model
  a forward that does what ``generate`` does (the eight values, the first six to the stock forward); ``generate``
  runs as is; it returns ``(output_ids, v_token_num, cls_attn)``, of which the eval scripts take the ids
  (``output_ids, v_token_num, image_attns = model.generate(...)``, ``LLaVA/llava/eval/model_vqa_loader.py:115``):
  ``enable`` hands the worker the ids the same way.
- kept indices: the ``index_masks`` ``encode_images`` returns (an instance wrapper; the True positions per image,
  ascending, into the 576 patches), stage ``"vision"``.
- ours: ``hiprune`` in its reference mode (``numerics="official"``: the global attention in the tower's own
  arithmetic, the official ``topk`` / ``unique`` calls), ``object_layer=3, object_layer_reference=None``,
  ``alpha=0.1``, T per image; the selection from ``rt.engine.selections[("vision", b)]``.
"""

from __future__ import annotations

import os

REPOSITORY = "Danielement321/HiPrune"
COMMIT = "6e83a1240874e99a25df34f54221a29bb24b7bc2"
PACKAGES = ("llava",)
ROOT = "LLaVA"
INSTALLED = False

#: the official object layer (1-based, of CLIP-L's 24) and its place on the tiny 8-layer tower
OBJECT_LAYER_OFFICIAL, OBJECT_LAYER = 9, 3
ALPHA = 0.1
#: the patch grid the official encode_images hard-codes (24 x 24: buffers +-24, clamp to 575)
GRID = 24
STAGE = "vision"


# ---- the official side (runs in .venv-official) ----

def environment(budget: int, n_images: int = 1) -> dict:
    """The official switches for ``n_images`` images of one tower call, each keeping ``budget``."""
    return {"HIPRUNE_RETENTION": str(budget * n_images), "HIPRUNE_ALPHA": str(ALPHA),
            "HIPRUNE_OBJECT_LAYER": str(OBJECT_LAYER)}


def before_load(method: dict) -> None:
    os.environ.update(environment(method["budget"]))


def _forward_as_generate(model):
    """The official forward with images, as the official ``generate`` runs its prefill: all eight values of
    ``prepare_inputs_labels_for_multimodal``, the first six to the stock LLaMA forward (``inputs_embeds``)."""
    cls_forward = type(model).forward

    def forward(input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, images=None, image_sizes=None, **kw):
        if inputs_embeds is None and images is not None:
            (input_ids, position_ids, attention_mask, past_key_values, inputs_embeds,
             labels) = model.prepare_inputs_labels_for_multimodal(
                input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes)[:6]
        return cls_forward(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, **kw)

    return forward


def enable(model, method: dict) -> None:
    import torch

    if not torch.cuda.is_available() and not getattr(torch.Tensor.cuda, "_parity_cpu", False):
        def cuda(self, *args, **kwargs):  # the model is on the CPU: .cuda() leaves the tensor where it is
            return self
        cuda._parity_cpu = True
        torch.Tensor.cuda = cuda
    os.environ.update(environment(method["budget"]))
    model._parity_hiprune_budget = method["budget"]
    model.forward = _forward_as_generate(model)
    # the official generate returns (output_ids, v_token_num, cls_attn) (llava_llama.py:177-181); its eval scripts
    # take [0] (LLaVA/llava/eval/model_vqa_loader.py:115, lmms-eval's llava.py: cont[0])
    cls_generate = type(model).generate
    model.generate = lambda *args, **kwargs: cls_generate(model, *args, **kwargs)[0]


def inputs(model, tokenizer, cases, prompts, input_ids) -> dict:
    os.environ.update(environment(model._parity_hiprune_budget, len(cases)))
    return {}


class _Restore:
    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def remove(self):
        self.obj.__dict__.pop(self.name, None)


def record(model, store: list) -> list:
    fn = type(model).encode_images

    def encode_images(images):
        features, masks = fn(model, images)
        store.append((STAGE, masks_to_indices(masks)))
        return features, masks

    model.encode_images = encode_images
    return [_Restore(model, "encode_images")]


def masks_to_indices(masks):
    """(images, patches) bool -> (images, kept) the True positions, ascending (every row keeps as many)."""
    import torch

    return torch.stack([m.nonzero().flatten() for m in masks.cpu()])


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    return "hiprune", {"numerics": "official", "alpha": ALPHA, "object_layer": OBJECT_LAYER,
                       "object_layer_reference": None, "deep_layer": -2}


def record_ours(rt, store: list):
    from ._ours import selections

    def finish(n_samples: int) -> None:
        kept = selections(rt, STAGE, n_samples)
        if kept is not None:
            store.append((STAGE, kept))

    return finish
