"""VisionDrop (AAAI 2026): the authors' repository ``Ruixxxx/VisionDrop``, a copy of LLaVA's tree whose encoder stage
is VisionZip's code (``llava/visionzip/``) and whose LLM stage is a modified PyramidDrop ``LlamaModel``
(``llava/model/modeling_llama_visiondrop.py``, a copy of transformers 4.37's LLaMA with ``visiondrop_forward`` /
``visiondrop_rank_drop``).

- switch, as ``llava/eval_visiondrop/model_vqa_loader.py`` (run by every ``scripts/v1_5/visiondrop_eval/*.sh``)
  does: ``load_pretrained_model(..., visiondrop_infer=True)`` (builds ``LlavaLlamaForCausalLM_VisionDrop``;
  ``before_load`` makes ``visiondrop_infer=True`` the builder's default, since the worker calls the builder itself),
  then ``visionzip(model, dominant=D0, contextual=C0)``, ``model.model.layer_list = [...]``,
  ``model.model.image_token_ratio_list = [[D1, C1], [D2, C2], [D3, C3]]`` with ``[D0 + C0, 0]`` inserted first.
  The scripts' budget-32 setting is ``--dominant 42 --contextual 6 --layer_list [8,16,24]
  --image_token_list [[30,5],[22,4],[16,3]]``.
- mapped onto the tiny model (4 decoder layers, 8 CLIP layers): the LLM stages after decoder layers
  ``[1, 2, 3]`` (8 / 16 / 24 of 32, scaled; ours: the default ``layer_list`` scaled by ``llava.ops.scale_layers``,
  the same 1 / 2 / 3); VisionZip's ``apply_info`` hard-codes CLIP-L's 24 layers (``llava/visionzip/utils.py:192``,
  ``r = [0] * 22 + [1] + [0]``: the key metric of layer 22 = ``layers[-2]``, read as
  ``encoder.layers[-2].metric``), which on 8 layers would never store a metric: ``enable`` sets
  ``r = [0] * 6 + [1] + [0]`` (the same layer, ``layers[-2]``, whose attention and hidden states it reads).
  Budgets 8 / 16 / 32: the official 32 schedule (42+6, 30+5, 22+4, 16+3) scaled by budget / 32 with halves rounded
  up (:func:`schedule`, our ``visiondrop.image_schedule``); 32 is the scripts' own setting.
- each image alone, ``tokenizer_padding_side`` "right" (``OFFICIAL``): ``visiondrop_rank_drop`` raises on "left"
  (``modeling_llama_visiondrop.py:1529``, "Unexpected tokenizer_padding_side"), and a right-padded batch hands it
  the 4-D SDPA mask, on which its ``_prepare_4d_causal_attention_mask`` (line 1365) raises ("too many values to
  unpack"; both measured on the batch of four); the eval loader asserts ``batch_size == 1`` (line 76).
- kept indices, read from the official functions' own locals when they return (a ``sys.setprofile`` hook, nothing
  of the official code changed): ``CLIPVisionTower_VisionZip.forward`` (``all_indices``, ``mask``,
  ``target_indices``, ``similarity``) and ``LlamaModel.visiondrop_rank_drop`` (``topk_indices``, ``mask``,
  ``target_indices``, ``similarity``). Stages: ``vision`` the dominant tokens as CLIP token indices ([CLS] = 0,
  patch j = j + 1; ascending), ``vision_targets`` the contextual targets (CLIP token indices), ``vision_assign``
  the target slot of every merged token (``similarity.argmax``, merged tokens in ascending CLIP order); and for
  each LLM stage after decoder layer L: ``llmL`` the dominant tokens, ``llmL_targets``, ``llmL_assign``, as
  indices into that stage's current visual tokens ([dominant (index order)..., contextual...], both sides).
- ours: ``visiondrop`` in its reference mode (``numerics="official"``), every other option at its default; our
  stages recorded by wrapping the method's ``select_vision`` / ``select_llm`` (the :class:`Selection` each returns).
"""

from __future__ import annotations

import sys

REPOSITORY = "Ruixxxx/VisionDrop"
COMMIT = "f7a944497d581aa79570f8f79e8ca91b5347a52f"
PACKAGES = ("llava",)
INSTALLED = False
#: visiondrop_rank_drop raises on left padding and on a right-padded batch's 4-D mask: each image alone
OFFICIAL = {"alone": True, "padding_side": "right"}

#: the eval scripts' setting (README: "an average token retention of 32 tokens"): (dominant, contextual) entering
#: the LLM (``--dominant 42 --contextual 6``), then after each LLM stage (``--image_token_list``)
SCRIPTS_32 = ((42, 6), (30, 5), (22, 4), (16, 3))
#: ``--layer_list [8,16,24]``, for the 32 decoder layers of LLaVA-1.5-7B
SCRIPTS_LAYERS = (8, 16, 24)


def schedule(budget: int) -> tuple[tuple[int, int], ...]:
    """The scripts' 32 schedule scaled by ``budget / 32``, halves rounded up (exact at 32: the scripts' own)."""
    return tuple((int(d * budget / 32 + 0.5), int(c * budget / 32 + 0.5)) for d, c in SCRIPTS_32)


def layers(num_layers: int, reference: int = 32) -> list[int]:
    """``--layer_list`` for a ``num_layers``-deep LLM: 8 / 16 / 24 scaled (4 layers: 1 / 2 / 3)."""
    out = [round(k * num_layers / reference) for k in SCRIPTS_LAYERS]
    if out != sorted(set(out)) or out[0] < 1 or out[-1] > num_layers - 1:
        raise ValueError(f"visiondrop: cannot place the stages {SCRIPTS_LAYERS} in a {num_layers}-layer LLM")
    return out


def tower_r(num_layers: int) -> list[int]:
    """VisionZip's ``r`` list (which CLIP layer stores its key metric): ``[0] * 22 + [1] + [0]`` on CLIP-L's 24
    layers = ``layers[-2]``; the same layer for ``num_layers``."""
    return [0] * (num_layers - 2) + [1] + [0]


# ---- the official side (runs in .venv-official) ----

def before_load(method: dict) -> None:
    """``load_pretrained_model(..., visiondrop_infer=True)``, as the eval loader calls it: the worker calls the
    builder with its own arguments, so the flag becomes the builder's default. An unpruned run in the same process
    (``--official-path``) then runs the VisionDrop model with no stage (``layer_list`` empty until ``enable``)."""
    import inspect

    from llava.model import builder
    from llava.model.modeling_llama_visiondrop import LlamaModel

    fn = builder.load_pretrained_model
    params = [p for p in inspect.signature(fn).parameters.values() if p.default is not inspect.Parameter.empty]
    fn.__defaults__ = tuple(True if p.name == "visiondrop_infer" else p.default for p in params)
    if not hasattr(LlamaModel, "layer_list"):
        LlamaModel.layer_list = []


def enable(model, method: dict) -> None:
    from llava.visionzip import visionzip

    if type(model).__name__ != "LlavaLlamaForCausalLM_VisionDrop":
        raise RuntimeError(f"visiondrop: the builder loaded {type(model).__name__}, not "
                           "LlavaLlamaForCausalLM_VisionDrop (visiondrop_infer=True)")
    (d0, c0), *llm = schedule(method["budget"])
    # model_vqa_loader.py: visionzip(model, dominant=args.dominant, contextual=args.contextual)
    visionzip(model, dominant=d0, contextual=c0)
    tower = model.model.vision_tower.vision_tower
    tower.r = tower_r(len(tower.vision_model.encoder.layers))  # apply_info's 24-layer list, mapped
    # model_vqa_loader.py: layer_list, image_token_ratio_list with [num_LLM, 0] inserted first
    model.model.layer_list = layers(len(model.model.layers))
    model.model.image_token_ratio_list = [list(x) for x in llm]
    model.model.image_token_ratio_list.insert(0, [d0 + c0, 0])


class _Profile:
    """A ``sys.setprofile`` hook that hands the locals of the given code objects to ``fn`` when they return;
    ``remove()`` restores the previous hook (the worker calls it after the run)."""

    def __init__(self, fns: dict):
        self.fns = fns
        self.prev = sys.getprofile()
        sys.setprofile(self)

    def __call__(self, frame, event, arg):
        if event == "return" and frame.f_code in self.fns:
            self.fns[frame.f_code](dict(frame.f_locals))

    def remove(self) -> None:
        sys.setprofile(self.prev)


def _tower_stage(store: list, loc: dict) -> None:
    """``CLIPVisionTower_VisionZip.forward``'s batched branch: ``all_indices`` ([CLS] + the top-(D0 - 1) patches,
    CLIP token indices), ``mask`` (True: the remaining tokens), ``target_indices`` (into the remaining list),
    ``similarity`` (merged tokens x targets)."""
    import torch

    if "all_indices" not in loc or "similarity" not in loc:
        return
    mask, tgt = loc["mask"], loc["target_indices"]
    rest = torch.stack([m.nonzero().flatten() for m in mask])  # (B, R) CLIP token indices, ascending
    store.append(("vision", loc["all_indices"].sort(dim=1).values.cpu()))
    store.append(("vision_targets", rest[:, tgt].cpu()))
    store.append(("vision_assign", loc["similarity"].argmax(dim=2).cpu()))


def _llm_stage(store: list, loc: dict) -> None:
    """``visiondrop_rank_drop`` (one sample: its loop's locals are the last sample's): ``topk_indices`` (into the
    stage's visual tokens), ``mask`` (True: the remaining ones), ``target_indices``, ``similarity``."""
    if "topk_indices" not in loc:  # no image in the sample
        return
    if loc["batch_size"] != 1:
        raise RuntimeError("visiondrop recorder: visiondrop_rank_drop's locals hold the last sample only; "
                           "run each image alone")
    layer = loc["rank_layer"]
    rest = loc["mask"].nonzero().flatten()
    store.append((f"llm{layer}", loc["topk_indices"].sort().values[None].cpu()))
    store.append((f"llm{layer}_targets", rest[loc["target_indices"]][None].cpu()))
    store.append((f"llm{layer}_assign", loc["similarity"].argmax(dim=1)[None].cpu()))


def record(model, store: list) -> list:
    from llava.model.modeling_llama_visiondrop import LlamaModel
    from llava.visionzip.clip_encoder import CLIPVisionTower_VisionZip

    tower_fwd = CLIPVisionTower_VisionZip.forward
    tower_fwd = getattr(tower_fwd, "__wrapped__", tower_fwd)  # under @torch.no_grad()
    return [_Profile({tower_fwd.__code__: lambda loc: _tower_stage(store, loc),
                      LlamaModel.visiondrop_rank_drop.__code__: lambda loc: _llm_stage(store, loc)})]


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    return "visiondrop", {"numerics": "official"}


def _rows(sel, token) -> tuple:
    """(dominant, targets, slots of the merged tokens) of one :class:`Selection`, each mapped by ``token`` (the
    stage's candidates -> the recorded index) and ascending / in slot order as the official code holds them."""
    keep = token[sel.keep.cpu()].sort().values
    if sel.targets is None:
        return keep, None, None
    assign = sel.assign.cpu()
    merged = (assign >= 0).nonzero().flatten()
    return keep, token[sel.targets.cpu()], assign[merged][token[merged].argsort()]


def record_ours(rt, store: list):
    import torch

    method = rt.engine.method
    # wrap once per method instance (the harness calls this per batch): the wrappers write to ``rows``
    if not hasattr(method, "_parity_rows"):
        inner_vision, inner_llm = method.select_vision, method.select_llm

        def select_vision(sig):
            sel = inner_vision(sig)
            # candidate -> CLIP token index: patch j -> j + 1, the [CLS] candidate (patch -1) -> 0
            method._parity_rows.setdefault("vision", []).append(_rows(sel, sig.patch.cpu() + 1))
            return sel

        def select_llm(stage, sig):
            sel = inner_llm(stage, sig)
            n = int(sig.visual.numel())
            method._parity_rows.setdefault(f"llm{method.llm_layers[stage]}", []).append(
                _rows(sel, torch.arange(n)))
            return sel

        method.select_vision, method.select_llm = select_vision, select_llm
    method._parity_rows = rows = {}

    def finish(n_samples: int) -> None:
        def key(stage):
            return (0, 0) if stage == "vision" else (1, int(stage[3:]))

        for stage in sorted(rows, key=key):
            got = rows[stage][:n_samples]
            for i, suffix in enumerate(("", "_targets", "_assign")):
                if got[0][i] is not None:
                    store.append((stage + suffix, torch.stack([g[i].cpu() for g in got])))

    return finish
