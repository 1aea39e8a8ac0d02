"""CDPruner (NeurIPS 2025, arXiv 2506.10967, "Beyond Attention or Similarity: Maximizing Conditional Diversity for
Token Pruning in MLLMs"): the authors' LLaVA fork ``Theia-4869/CDPruner`` (every change marked ``[CDPruner]``), the
third fork by the author of FasterVLM / VisPruner (shared glue: ``_theia_forks.py``).

- switch: the eval scripts pass ``--visual_token_num T`` (``llava/eval/model_vqa_loader.py``), which goes through
  ``load_pretrained_model(..., visual_token_num=T)`` to ``LlavaLlamaForCausalLM.__init__(config, visual_token_num)``
  (a required positional parameter) and is stored as ``model.visual_token_num``. The worker's builder call passes
  none, so ``before_load`` gives ``__init__`` the parameter as a keyword defaulting to None and ``enable`` sets the
  attribute, as the builder would have. ``builder.py`` always calls ``vision_tower.load_text_tower`` (the CLIP text
  tower, its fast tokenizer and ``visual_projection``, from the ``mm_vision_tower`` folder): the tiny ``clip/``
  folder of ``parity/build.py`` is a whole ``CLIPModel`` checkpoint with a byte-level CLIP tokenizer for this.
- the question: ``model_vqa_loader.py`` passes ``texts=question`` to ``generate``, the question string with
  ``"\\nAnswer the question using a single word or phrase."`` removed (``inputs`` does the same ``replace`` on each
  case's question; the harness's questions hold that sentence after a space, not a newline, so nothing is removed,
  on either side); the fork's ``generate`` hands it to ``prepare_inputs_labels_for_multimodal`` -> ``encode_images``
  -> ``CLIPVisionTower.forward``, which tokenises it (``CLIPTokenizerFast``), zero-pads it to a multiple of the text
  tower's ``max_position_embeddings`` (32 here: the longer questions run as two segments) and averages the
  relevance over the segments.
- kept indices: ``llava_arch.py`` ``encode_images`` returns ``(image_features, index_masks)`` (the greedy DPP's
  picks scattered into a mask); ``record`` wraps it and records the True entries per image as stage ``"vision"``.
- each image alone (``OFFICIAL["alone"]``): on a 4-D image batch the fork returns
  ``image_features[index_masks].unsqueeze(0)`` (all images' kept tokens in ONE row) and normalises the relevance
  with one min / max over the whole batch; its eval loader asserts batch size 1.
- CPU: ``CLIPVisionTower.forward`` runs the image and text towers on two ``torch.cuda.Stream()`` and calls
  ``torch.cuda.synchronize()``; where CUDA is absent ``enable`` gives ``torch.cuda`` stand-ins in the worker process
  (``Stream()`` None, ``stream(s)`` a null context, ``synchronize()`` nothing: the work then runs in program order,
  what the synchronisation ensures on a GPU).
- glue (``_theia_forks.py``): the fork's ``forward`` cannot take images and its ``generate`` returns
  ``(output_ids, visual_token_num)``; the glue's forward passes ``texts`` to ``prepare_inputs_labels_for_multimodal``.
- ours: ``cdpruner`` in its reference mode (``numerics="official"``, ``reference_dtype="model"``: the fork
  normalises its projector output in the model's load dtype, fp32 in the fp32 rows) with the official relevance
  (``relevance="clip"``)
  on the same ``clip/`` folder: ``clip_model`` = that ``CLIPModel`` loaded with eager attention (transformers 4.36's
  CLIP has no other), ``clip_tokenizer`` = the folder, ``llm_tokenizer`` = our checkpoint's tokenizer (the question
  is decoded from the prompt's question span).

LLaVA-NeXT (``NEXT``; ``python -m parity next --method cdpruner``): the same switch, question and recorder on the
official ``llava-v1.6-tiny``, its tower folder ``clip-next/`` a whole ``CLIPModel`` as ``clip/`` is
(``parity.build.build_next``). The fork's ``prepare_inputs_labels_for_multimodal`` runs ``encode_images`` once on all
crops of the image (one min / max of the relevance over them, ``index_masks`` one row per crop, T per crop, the base
crop included), strips ``_unpad`` from the merge type (the ``spatial`` packing: the base crop's kept tokens, then the
grid crops' in row-major order on the full grid, no unpad, no newline), and its ``llava/mm_utils.py``
``select_best_resolution`` ignores the pinpoints: ``possible_resolutions = [(672, 672)]`` ("fix resolution for LLaVA
to get 2880 visual tokens"), every image on a 2 x 2 grid of CLIP-L/336 crops. ``enable`` maps that literal to the tiny
tower as the VisPruner adapter does (the function recompiled from the clone's source with only ``[(672, 672)]``
replaced by ``[(2 x 96, 2 x 96)]``, refused unless found exactly once, put back in ``llava.mm_utils``). Ours:
``llava.load(..., next_geometry="official", next_layout="spatial")`` (``NEXT_LOAD``), ``next_runtime`` (the model's and
the processor's pinpoints the one 2 x 2 resolution) and ``ours_next``: the reference mode with ``relevance="clip"`` on
``clip-next/`` (the default ``minmax_scope="image"``: all crops of the image). Each image alone (``OFFICIAL``).
"""

from __future__ import annotations

REPOSITORY = "Theia-4869/CDPruner"
COMMIT = "9541616c40fcd5625de1cdb8ea6c33c129eb7864"
PACKAGES = ("llava",)
INSTALLED = False
OFFICIAL = {"alone": True}

#: what ``llava/eval/model_vqa_loader.py`` removes from the question before it becomes ``texts``
ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."

#: LLaVA-NeXT (``python -m parity next --method cdpruner``; module doc): the fork's ``spatial`` packing (T per crop, no
#: unpad, no newline) on its fixed 2 x 2 grid
NEXT = True
#: tokens per crop of 576
NEXT_BUDGETS = (128, 64, 32)
NEXT_LOAD = {"next_layout": "spatial"}
#: the fork's fixed NeXT resolution (``llava/mm_utils.py`` ``select_best_resolution``, marked ``# CDPruner # fix
#: resolution for LLaVA to get 2880 visual tokens``): CLIP-L/336's 2 x 2 crops, mapped to 2 x 2 tiny crops


# ---- the official side (runs in .venv-official) ----

def _forks():
    """The shared glue (``_theia_forks.py`` beside this file)."""
    from . import _theia_forks

    return _theia_forks


def before_load(method: dict) -> None:
    """``LlavaLlamaForCausalLM.__init__(config, visual_token_num)`` with the budget as a keyword (None: ``enable``
    sets it), since the worker's builder call passes none."""
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    init = LlavaLlamaForCausalLM.__init__
    if getattr(init, "parity_keywords", False):
        return

    def __init__(self, config, visual_token_num=None):
        init(self, config, visual_token_num)

    __init__.parity_keywords = True
    LlavaLlamaForCausalLM.__init__ = __init__


def cpu_streams() -> None:
    """Stand-ins for ``torch.cuda.Stream`` / ``torch.cuda.stream`` / ``torch.cuda.synchronize`` where CUDA is absent
    (this worker process only): ``CLIPVisionTower.forward`` calls them unconditionally."""
    import contextlib

    import torch

    if torch.cuda.is_available():
        return
    torch.cuda.Stream = lambda *args, **kwargs: None
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None


def enable(model, method: dict) -> None:
    model.visual_token_num = method["budget"]  # what load_pretrained_model(..., visual_token_num=T) stores
    cpu_streams()
    forks = _forks()
    forks.glue(model, prepare_keywords=("texts",))
    if getattr(model.config, "image_aspect_ratio", None) == "anyres":
        forks.fixed_resolution(2 * model.get_vision_tower().config.image_size)


def question_text(question: str) -> str:
    """The ``texts`` of ``model_vqa_loader.py``: the question with :data:`ANSWER_SUFFIX` removed."""
    return question.replace(ANSWER_SUFFIX, "")


def inputs(model, tokenizer, cases, prompts, input_ids) -> dict:
    """``texts=question`` as ``model_vqa_loader.py`` passes it to ``generate`` (one string: batch size 1)."""
    if len(cases) != 1:
        raise ValueError("cdpruner: the official code runs one image at a time (OFFICIAL['alone'])")
    return {"texts": question_text(cases[0]["question"])}


def record(model, store: list) -> list:
    return _forks().record_masks(model, store)


# ---- our side ----

_CLIP: dict = {}


def clip_model(folder: str):
    """The ``CLIPModel`` of the tiny ``clip/`` folder with eager attention (4.36's CLIP arithmetic), loaded once."""
    if folder not in _CLIP:
        from transformers import CLIPModel

        _CLIP[folder] = CLIPModel.from_pretrained(folder, attn_implementation="eager").eval()
    return _CLIP[folder]


def ours(budget: int, info: dict | None = None) -> tuple[str, dict]:
    """The reference mode with the official relevance on the built folders ``info`` (``parity.build.build``'s:
    ``clip`` the CLIP folder, ``hf`` our checkpoint); without them the folder options are left out (the method then
    refuses ``relevance="clip"`` at construction: it needs a CLIP model and the LLM tokenizer). ``reference_dtype=
    "model"``: the projected tokens normalised in our LLM's dtype, as the fork normalises its projector output in the
    dtype the worker loads it in (fp32 in the fp32 rows; fp16 in the fp16 rows, the default's cast)."""
    options = {"numerics": "official", "relevance": "clip", "reference_dtype": "model"}
    if info is not None:
        options.update(clip_model=clip_model(info["clip"]), clip_tokenizer=info["clip"], llm_tokenizer=info["hf"])
    return "cdpruner", options


def ours_next(budget: int, dtype: str | None = None, info: dict | None = None) -> tuple[str, dict]:
    """NeXT: :func:`ours` on the NeXT build's folders (``info["clip"]`` = ``clip-next/``, ``info["hf"]`` = our NeXT
    checkpoint); the default ``minmax_scope="image"`` is the fork's one min / max over all crops of the image."""
    return ours(budget, info)


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
