"""VisionTrim (ICLR 2026, arXiv 2601.22674, "VisionTrim: Unified Vision Token Compression for Training-Free MLLM
Acceleration"): the authors' LLaVA fork ``hanxunyu/VisionTrim`` at 22b686d (its HEAD ships no model code: commit
5e299c0 deleted ``llava/``), whose ``llava/model/multimodal_encoder/clip_encoder.py``
``CLIPVisionTower.token_prune_visiontrim`` holds the method (DVTS, then TGVC with the CLIP text tower).

- switch, as ``llava/eval/model_vqa_loader.py`` (run by ``scripts/v1_5/eval/*.sh $token_num $token_complement``)
  does: ``model.post_config(args)`` with ``args.method = "VisionTrim"``, ``args.DVTS_token_num = D``,
  ``args.TGVC_token_num = C`` (``args.dataset_name = "none"``: the scripts' names only select print-outs). The
  scripts take D and C as their two arguments and publish no split; for a budget T (= D + C tokens entering the
  LLM) both sides use our rule C = T // 4, D = T - C (:func:`split`; the loader's defaults 48 + 16 at T = 64),
  ours given it explicitly (``tgvc_tokens = C``): 6 + 2 / 12 + 4 / 24 + 8 at T = 8 / 16 / 32 (64 patches here).
- the question: the loader passes ``original_qs`` (its collate's tuple of the questions' ``line["text"]``, one per
  batch: batch size 1) to ``generate``, which hands it to ``prepare_inputs_labels_for_multimodal`` ->
  ``encode_images(images, original_qs)`` -> the tower; :func:`inputs` passes the case's question the same way (a
  one-string tuple; ``line["text"]`` is the question as the prompt holds it, nothing removed). The tower tokenises
  it with the slow ``CLIPTokenizer`` of the tower folder (``padding=True, truncation=True``: at the tokenizer's
  ``model_max_length``, 77 for CLIP-L, 32 for the tiny ``clip/`` folder of ``parity.build``, whose text tower has
  32 positions) and runs the ``CLIPTextModel`` of that folder (per-token ``last_hidden_state``), then the
  ``CLIPModel``'s ``text_projection``; the tiny ``clip/`` folder is a whole ``CLIPModel`` with a byte-level CLIP
  tokenizer (``parity.build``), what ``load_model`` loads (``CLIPVisionModel``, ``CLIPModel``, ``CLIPTokenizer``,
  ``CLIPTextModel``, all from the folder).
- kept indices, read where the official code holds them (nothing of it changed): a ``sys.setprofile`` hook hands
  ``token_prune_visiontrim``'s own locals to the recorder when it returns: ``"vision"`` the dominant patches
  (``select_idx``, ascending patch indices 0..63), ``"vision_targets"`` the TGVC targets (``other_idx`` into the
  remaining patches, mapped by ``inverse_mask`` to patch indices, ascending); and a ``TorchFunctionMode`` around the
  call keeps the index of each merge round's ``assign_one_hot.scatter_(2, argmax, 1)``: ``"vision_assign1"`` ..
  ``"vision_assign3"``, the target slot of every merged patch (remaining patches without the targets, ascending),
  round by round (``vtc_times = 3``). Ours: the same from our vision stage (its ``Selection``: ``keep`` the
  dominant patches, ``targets`` the complement ones; the rounds' assignment from the same ``scatter_`` along dim 2
  in ``baselines/visiontrim.py`` ``_tgvc_official``, watched by the same kind of mode).
- geometry: ``token_prune_visiontrim`` hard-codes none (the patch count is the features', LTAM's grid side
  ``int(sqrt(N))``: 8 here); the select layer is ``attentions[-2]`` / ``hidden_states[-2]`` on both sides.
- CPU: ``build_token_affinity`` (LTAM; its result is computed and then overwritten, but it runs) builds its grid
  coordinates and output with ``.cuda()`` (three calls); where CUDA is absent ``enable`` recompiles it from the
  clone's own source with ``.cuda()`` -> ``.to(tokens.device)`` (refused unless exactly three are found), into the
  module's globals. On a GPU the clone's function runs as it is.
- transformers 4.36: ``llava_llama.py`` imports ``GenerateBeamDecoderOnlyOutput`` /
  ``GenerateBeamEncoderDecoderOutput`` from ``transformers.generation.utils`` (names of 4.37, the fork pins 4.37.2;
  4.36.2 has them as ``BeamSearchDecoderOnlyOutput`` / ``BeamSearchEncoderDecoderOutput``): ``before_import``
  gives 4.36 those names (only a type alias uses them).
- glue (``_theia_forks.py``'s, not the method): the fork's ``prepare_inputs_labels_for_multimodal`` returns 8 values
  on the image path while its ``forward`` unpacks 7 (its eval scripts only call ``generate``), so a forward with
  images raises; ``enable`` gives the loaded model an instance ``forward`` that runs the fork's
  ``prepare_inputs_labels_for_multimodal`` with ``original_qs`` (its first six outputs) and then LLaMA's forward on
  the embeddings (what the fork's ``generate`` feeds its first step); ``generate`` is the fork's own.
- each image alone (``OFFICIAL["alone"]``): the loader asserts batch size 1; a batch's questions would be padded
  to the longest by the tokenizer and the pad rows enter the text mean.
- precisions: the fork's builder casts the tower, its ``CLIPModel`` and ``CLIPTextModel`` to fp16 unconditionally
  (``builder.py``: ``vision_tower.to(device=device, dtype=torch.float16)``), so the official fp16 run computes
  DVTS, TGVC and the text tower in fp16; ours loads the tower in the LLM's fp16 (``OURS_LOAD["fp16"]``:
  ``vision_dtype=None``). In the fp32 run everything is fp32 (the model after ``.float()``), and the reference mode
  computes in the run's dtype (``baselines/visiontrim.py``, the LLM's: fp16 under an fp16 LLM as before).
- ours: ``visiontrim`` in its reference mode (``numerics="official"``) with the official text route
  (``text="clip"``) on the same ``clip/`` folder: ``clip_model`` = that ``CLIPModel`` loaded with eager attention
  (transformers 4.36's CLIP has no other), ``clip_tokenizer`` = the folder, ``llm_tokenizer`` = our checkpoint's
  tokenizer (the question is decoded from the prompt's question span), ``tgvc_tokens = C``.
"""

from __future__ import annotations

import sys

REPOSITORY = "hanxunyu/VisionTrim"
COMMIT = "22b686d6aebaa70393c579f0fa2de8b325f79901"
PACKAGES = ("llava",)
INSTALLED = False
#: the loader asserts batch size 1, and a batch's questions are padded into one text mean
OFFICIAL = {"alone": True}
#: the fork's builder casts the tower (and its CLIP text side) to fp16: ours loads its tower in the LLM's dtype
OURS_LOAD = {"fp16": {"vision_dtype": None}}

#: the CUDA-only calls of ``build_token_affinity`` (its grid coordinates twice and its output)
CUDA_LITERAL = r"\.cuda\(\)"
CUDA_COUNT = 3


def split(budget: int) -> tuple[int, int]:
    """(DVTS_token_num D, TGVC_token_num C) for ``budget`` tokens per image: our rule C = T // 4, D = T - C
    (``baselines/visiontrim.py`` ``split_budget``; tests/test_parity_visiontrim.py checks the two agree)."""
    c = budget // 4
    return budget - c, c


def rewrite(source: str, pattern: str, replacement: str, count: int = 1) -> str:
    """``source`` with the ``count`` matches of ``pattern`` replaced (refused unless it occurs exactly ``count`` times)."""
    from . import _official

    return _official.rewrite(source, pattern, replacement, count)


def recompile(fn, edits: list[tuple[str, str, int]]):
    """The module-level function ``fn`` compiled again from the clone's source with the ``edits`` applied
    (``_official.recompile``); returns the new function."""
    from . import _official

    return _official.recompile(fn, edits)


def _forks():
    """The shared glue (``_theia_forks.py`` beside this file)."""
    from . import _theia_forks

    return _theia_forks


def before_import() -> None:
    """Before the clone's ``llava`` is imported: 4.37's names of the beam-search output classes, which
    ``llava_llama.py`` imports, given to transformers 4.36.2 (its ``BeamSearch*Output``; 4.37 renamed them and kept
    the old names as aliases)."""
    import transformers.generation.utils as gu

    for new, old in (("GenerateBeamDecoderOnlyOutput", "BeamSearchDecoderOnlyOutput"),
                     ("GenerateBeamEncoderDecoderOutput", "BeamSearchEncoderDecoderOutput")):
        if not hasattr(gu, new):
            setattr(gu, new, getattr(gu, old))


def cpu_affinity() -> None:
    """Where CUDA is absent: ``build_token_affinity`` recompiled from the clone's source with its three ``.cuda()``
    calls -> ``.to(tokens.device)``, put in its module's globals (``token_prune_visiontrim`` looks it up there)."""
    import torch
    import llava.model.multimodal_encoder.clip_encoder as ce

    if torch.cuda.is_available() or getattr(ce.build_token_affinity, "_parity_cpu", False):
        return
    fn = recompile(ce.build_token_affinity, [(CUDA_LITERAL, ".to(tokens.device)", CUDA_COUNT)])
    fn._parity_cpu = True
    ce.build_token_affinity = fn


def enable(model, method: dict) -> None:
    import argparse

    d, c = split(method["budget"])
    # model_vqa_loader.py: model.post_config(args), the scripts' --method / --DVTS_token_num / --TGVC_token_num
    model.post_config(argparse.Namespace(method="VisionTrim", DVTS_token_num=d, TGVC_token_num=c,
                                         dataset_name="none"))
    cpu_affinity()
    _forks().glue(model, prepare_keywords=("original_qs",))


def inputs(model, tokenizer, cases, prompts, input_ids) -> dict:
    """``original_qs`` as ``model_vqa_loader.py`` passes it to ``generate``: its collate's tuple of the batch's
    ``line["text"]`` (one: batch size 1)."""
    if len(cases) != 1:
        raise ValueError("visiontrim: the official code runs one image at a time (OFFICIAL['alone'])")
    return {"original_qs": (cases[0]["question"],)}


class _Profile:
    """A ``sys.setprofile`` hook that hands the locals of the given code object to ``fn`` when it returns;
    ``remove()`` restores the previous hook (the worker calls it after the run)."""

    def __init__(self, code, fn):
        self.code, self.fn = code, fn
        self.prev = sys.getprofile()
        sys.setprofile(self)

    def __call__(self, frame, event, arg):
        if event == "return" and frame.f_code is self.code:
            self.fn(dict(frame.f_locals))

    def remove(self) -> None:
        sys.setprofile(self.prev)


def assign_capture():
    """A ``TorchFunctionMode`` that keeps, in ``rounds``, the index of every ``Tensor.scatter_`` along dim 2 of a
    3-D tensor (each TGVC round's ``assign_one_hot.scatter_(2, argmax.unsqueeze(-1), 1)``): (B, merged)."""
    import torch
    from torch.overrides import TorchFunctionMode

    class Capture(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.rounds = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.scatter_ and args[0].dim() == 3 and args[1] == 2:
                self.rounds.append(args[2].detach().clone()[..., 0].cpu())
            return func(*args, **kwargs)

    return Capture()


class _Restore:
    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def remove(self) -> None:
        self.obj.__dict__.pop(self.name, None)


def record(model, store: list) -> list:
    """``token_prune_visiontrim``'s dominant set and targets (its locals when it returns) and each merge round's
    assignment (a mode around the call); stages ``vision``, ``vision_targets``, ``vision_assign1..3``."""
    import torch
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    tower = model.get_vision_tower()
    inner = CLIPVisionTower.token_prune_visiontrim
    found: dict = {}

    def token_prune_visiontrim(*args, **kwargs):
        cap = assign_capture()
        found.clear()
        with cap:
            out = inner(tower, *args, **kwargs)
        loc = found.pop("locals")
        store.append(("vision", loc["select_idx"].detach().cpu().clone()))
        if "other_idx" in loc:
            others = [m.nonzero().flatten().cpu() for m in loc["inverse_mask"]]
            store.append(("vision_targets", torch.stack([o[t.cpu()] for o, t in zip(others, loc["other_idx"])])))
            for r, idx in enumerate(cap.rounds, 1):
                store.append((f"vision_assign{r}", idx))
        return out

    tower.token_prune_visiontrim = token_prune_visiontrim  # forward calls self.token_prune_visiontrim(...)
    prof = _Profile(inner.__code__, lambda loc: found.__setitem__("locals", loc))
    return [_Restore(tower, "token_prune_visiontrim"), prof]


# ---- our side ----

_CLIP: dict = {}


def clip_model(folder: str):
    """The ``CLIPModel`` of the tiny ``clip/`` folder with eager attention (4.36's CLIP arithmetic), loaded once."""
    if folder not in _CLIP:
        from transformers import CLIPModel

        _CLIP[folder] = CLIPModel.from_pretrained(folder, attn_implementation="eager").eval()
    return _CLIP[folder]


def ours(budget: int, info: dict | None = None) -> tuple[str, dict]:
    """The reference mode with the official CLIP text route on the built folders ``info`` (``parity.build.build``'s:
    ``clip`` the CLIP folder, ``hf`` our checkpoint) and the adapter's split; without them the folder options are
    left out (the method then refuses ``text="clip"`` at construction: it needs a CLIP model and the LLM
    tokenizer)."""
    options = {"numerics": "official", "text": "clip", "tgvc_tokens": split(budget)[1]}
    if info is not None:
        options.update(clip_model=clip_model(info["clip"]), clip_tokenizer=info["clip"], llm_tokenizer=info["hf"])
    return "visiontrim", options


def record_ours(rt, store: list):
    """Our vision stage: ``Selection.keep`` (dominant) and ``targets`` mapped to patch indices by the signals'
    ``patch``, ascending; each merge round's assignment from the same ``scatter_`` along dim 2 (:func:`assign_capture`
    around the method's ``select_vision``)."""
    import torch

    method = rt.engine.method
    if not hasattr(method, "_parity_rows"):  # wrap once per method instance (the harness calls this per batch)
        inner = method.select_vision

        def select_vision(sig):
            cap = assign_capture()
            with cap:
                sel = inner(sig)
            patch = sig.patch.cpu()
            row = {"vision": patch[sel.keep.cpu()].sort().values}
            if sel.targets is not None:
                row["vision_targets"] = patch[sel.targets.cpu()].sort().values
                for r, idx in enumerate(cap.rounds, 1):
                    row[f"vision_assign{r}"] = idx[0]
            method._parity_rows.append(row)
            return sel

        method.select_vision = select_vision
    method._parity_rows = rows = []

    def finish(n_samples: int) -> None:
        got = rows[:n_samples]
        if not got:
            return
        for stage in got[0]:
            store.append((stage, torch.stack([g[stage] for g in got])))

    return finish
