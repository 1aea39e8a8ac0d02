"""DUET-VLM (CVPR 2026): the authors' repository ``AMD-AGI/DUET-VLM``, a copy of LLaVA's tree (``llava/``, with
PyramidDrop's ``modeling_llama_pdrop.py``) plus its own ``visionzip/`` package (VisionZip with a pool of
``cluster_width x contextual`` leftovers); its LLaVA-1.5 eval script is ``llava/eval/model_vqa_loader.py``.

- switch, as ``model_vqa_loader.py`` does with ``--layer_list``: the builder loads ``LlavaLlamaForCausalLM_PDrop``
  (``load_pretrained_model(..., pdrop_infer=True)``; the worker calls the builder without that argument, so
  ``before_load`` sets the builder's default of ``pdrop_infer`` to True: the same call), then
  ``visionzip(model, dominant=D, contextual=C, cluster_width=4)`` and ``model.model.layer_list``,
  ``model.model.image_token_ratio_list = ratios`` with 1.0 inserted first. ``config.use_salient_tokens`` is absent
  (False, the public checkpoints), so ``pdrop_rank_drop`` ignores the salient words (``idxs = None``: every text
  row after the image is a query), as our ``queries="text_after"``.
- split and layers: our method's (``baselines/duet.py``): (D, C) by ``budget_split`` (mirrored by :func:`split`:
  11+2 / 22+4 / 42+9 per image at T = 8 / 16 / 32 on the default schedule), the official stage layers 16 / 24 of 32
  mapped to this LLM's depth as ``llava.ops.scale_layers`` does (:func:`layers`: 2 / 3 of the tiny 4 layers; the
  official ``layer_list`` semantics, "rank after layer l - 1 with layer l's q / k", are ours), ratios 0.5 / 0.0.
- layer position in the tower: as VisionZip's (``visionzip/utils.py`` ``apply_info``, ``r = [0] * 22 + [1] + [0]``
  for CLIP-L's 24 layers), set to ``layers[-2]`` of the tiny 8-layer tower (parity/adapters/visionzip.py).
- batches: each image alone (``OFFICIAL``): the official stage 2 runs right padding only (``pdrop_rank_drop``
  raises on "left") and then takes every row after the image as a query, pads included (``cur_query_states[:,
  image_index + image_tokens[i]:]``), and its eval script asserts ``batch_size == 1``.
- kept indices: stage 1 read in the official tower forward (``encode_images_visionzip`` calls
  ``get_vision_tower().forward`` directly; ``record`` wraps it and watches the official tensors with a
  ``TorchFunctionMode``): ``"dominant"`` (``all_indices``, tower token indices, [CLS] = 0, sorted), ``"pool"`` (the
  ``preselect_indices`` of the second ``topk``, as token indices, sorted), ``"targets"`` (the anchors
  ``preselect_indices.gather(1, anchor_pos)``, token indices in the official pool-rank order), ``"merge"`` (for each
  pool member that is not an anchor, ascending, the anchor token it joins: the ``argmax`` scattered into
  ``assign_one_hot``); stage 2: ``"llm<l>"``, the ``topk`` of ``pdrop_rank_drop`` at rank layer l (indices into the
  visual tokens entering the stage, ascending; ``record`` wraps ``model.model.pdrop_rank_drop``).
- ours: ``duet`` in its reference mode (``numerics="official"``) with the default options; stage 1 recorded by
  wrapping ``select_vision``, stage 2 from ``rt.engine.selections`` (stage s -> ``"llm<layer>"``).
"""

from __future__ import annotations

REPOSITORY = "AMD-AGI/DUET-VLM"
COMMIT = "cd69e489f39a2a51e3b278a470dc8dc32c00e0fb"
PACKAGES = ("llava", "visionzip")
INSTALLED = False
#: the official stage 2 pads on the right only and its eval script runs batch 1
OFFICIAL = {"alone": True, "padding_side": "right"}

#: baselines/duet.py SPLITS, OFFICIAL_LAYERS, OFFICIAL_RATIOS, OFFICIAL_CLUSTER_WIDTH (checked against ours by
#: tests/test_parity_duet.py)
_SPLITS = {192: (300, 7), 128: (170, 35), 64: (85, 17)}
_LAYERS = (16, 24)
_RATIOS = (0.5, 0.0)
_CLUSTER_WIDTH = 4


def split(budget: int) -> tuple[int, int]:
    """(dominant incl. [CLS], contextual) per image for ``budget`` on the default schedule: our ``budget_split``."""
    import math

    if budget in _SPLITS:
        return _SPLITS[budget]
    bounds = [*_LAYERS, 32]
    f = (bounds[0] + sum((bounds[s + 1] - bounds[s]) * r for s, r in enumerate(_RATIOS))) / 32
    n1 = max(1, math.floor(budget / f + 0.5))
    c = math.floor(n1 / 6 + 0.5)
    return n1 - c, c


def layers(num_layers: int) -> list[int]:
    """The stage layers 16 / 24 of 32 on a ``num_layers``-layer LLM, as ``llava.ops.scale_layers``."""
    out: list[int] = []
    for k in _LAYERS:
        v = min(max(1, round(k * num_layers / 32)), num_layers - 1)
        if out and v <= out[-1]:
            v = out[-1] + 1
        out.append(v)
    return out


# ---- the official side (runs in .venv-official) ----

def before_load(method: dict) -> None:
    """``model_vqa_loader.py``: ``load_pretrained_model(model_path, model_base, model_name, pdrop_infer)`` with
    ``pdrop_infer = True`` when ``--layer_list`` is given; the worker's call names no ``pdrop_infer``, so its default
    becomes True (the builder then loads ``LlavaLlamaForCausalLM_PDrop``)."""
    import inspect

    from llava.model import builder

    fn = builder.load_pretrained_model
    params = [p for p in inspect.signature(fn).parameters.values() if p.default is not inspect.Parameter.empty]
    names = [p.name for p in params]
    defaults = list(fn.__defaults__)
    defaults[names.index("pdrop_infer")] = True
    fn.__defaults__ = tuple(defaults)


def enable(model, method: dict) -> None:
    from visionzip import visionzip

    if type(model).__name__ != "LlavaLlamaForCausalLM_PDrop":
        raise RuntimeError(f"duet: the builder loaded {type(model).__name__}, not LlavaLlamaForCausalLM_PDrop")
    dominant, contextual = split(method["budget"])
    visionzip(model, dominant=dominant, contextual=contextual, cluster_width=_CLUSTER_WIDTH)
    tower = model.get_model().get_vision_tower().vision_tower
    n = len(tower.vision_model.encoder.layers)
    tower.r = [0] * (n - 2) + [1] + [0]  # apply_info's layers[-2] of CLIP-L, the same layer of this tower
    # model_vqa_loader.py: layer_list / image_token_ratio_list, 1.0 inserted first
    model.model.layer_list = layers(len(model.model.layers))
    model.model.image_token_ratio_list = [1.0, *_RATIOS]


def _capture():
    """A TorchFunctionMode that keeps the official tensors of one tower forward (DUET's
    ``CLIPVisionTower_VisionZip.forward``) or one ``pdrop_rank_drop``: every ``topk`` result, the anchors
    (``gather`` on the pool), the one-hot assignment's index (``scatter_`` along dim 2 of a 3-D tensor)."""
    import torch
    from torch.overrides import TorchFunctionMode

    class Capture(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.topk = []  # the indices of every topk, in call order
            self.anchors = None
            self.assign = None

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.Tensor.topk:
                self.topk.append(out.indices)  # the very tensor the official code goes on with
            elif func is torch.Tensor.gather and self.anchors is None and len(self.topk) == 2 \
                    and args[0] is self.topk[1]:
                self.anchors = out.detach().clone()  # preselect_indices.gather(1, anchor_pos)
            elif func is torch.Tensor.scatter_ and args[0].dim() == 3 and args[1] == 2:
                self.assign = args[2].detach().clone()[..., 0]  # assign_one_hot.scatter_(2, argmax, 1)
            return out

    return Capture()


class _Unwrap:
    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def remove(self):
        self.obj.__dict__.pop(self.name, None)


def _tower_recorder(model, store: list) -> list:
    import torch

    tower = model.get_model().get_vision_tower()
    inner = type(tower).forward  # DUET's CLIPVisionTower_VisionZip.forward, patched in by visionzip()
    n_tokens = tower.vision_tower.vision_model.embeddings.num_positions  # patches + [CLS]

    def forward(images):
        cap = _capture()
        with cap:
            out = inner(tower, images)
        dom = out[1].detach().cpu().sort(dim=1).values
        pool_pos = cap.topk[1].cpu()  # positions among the non-dominant patches, best first
        rows = {"pool": [], "targets": [], "merge": []}
        for b in range(dom.shape[0]):
            taken = set(dom[b].tolist())
            rest = torch.tensor([t for t in range(n_tokens) if t not in taken])  # official filtered order
            anchors = rest[cap.anchors[b].cpu()]
            members = rest[pool_pos[b]]
            others = members[~torch.isin(members, anchors)]  # merge_indices, pool-rank order
            joined = anchors[cap.assign[b].cpu()] if cap.assign is not None else others[:0]
            order = others.argsort()
            rows["pool"].append(members.sort().values)
            rows["targets"].append(anchors)
            rows["merge"].append(joined[order])
        store.append(("dominant", dom))
        for k in ("pool", "targets", "merge"):
            store.append((k, torch.stack(rows[k])))
        return out

    tower.forward = forward
    return [_Unwrap(tower, "forward")]


def _llm_recorder(model, store: list) -> list:
    lm = model.model
    inner = type(lm).pdrop_rank_drop

    def pdrop_rank_drop(cur_num, rank_layer, features, position_ids, idxs, attention_mask, labels):
        cap = _capture()
        with cap:
            out = inner(lm, cur_num, rank_layer, features, position_ids, idxs, attention_mask, labels)
        import torch

        # one topk per sample (attention_avg_text.topk(keep_length[i])), batch 1 here
        store.append((f"llm{rank_layer}", torch.stack([t.cpu().sort().values for t in cap.topk])))
        return out

    lm.pdrop_rank_drop = pdrop_rank_drop
    return [_Unwrap(lm, "pdrop_rank_drop")]


def record(model, store: list) -> list:
    return _tower_recorder(model, store) + _llm_recorder(model, store)


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    return "duet", {"numerics": "official"}


def record_ours(rt, store: list):
    import torch

    from ._ours import seen_vision_selections, selections

    seen, restore = seen_vision_selections(rt.engine.method)

    def finish(n_samples: int) -> None:
        restore()
        rows = {"dominant": [], "pool": [], "targets": [], "merge": []}
        for sig, sel in seen[:n_samples]:
            tok = (sig.patch + 1).cpu()  # tower token index of each candidate ([CLS]: patch -1 -> 0)
            rows["dominant"].append(tok[sel.keep.cpu()].sort().values)
            targets = tok[sel.targets.cpu()]
            a = sel.assign.cpu()
            merged = torch.nonzero(a >= 0).flatten()
            merged = merged[tok[merged].argsort()]
            rows["targets"].append(targets)
            rows["pool"].append(torch.cat([targets, tok[merged]]).sort().values)
            rows["merge"].append(targets[a[merged]])
        for k in ("dominant", "pool", "targets", "merge"):
            store.append((k, torch.stack(rows[k])))
        for s, layer in enumerate(rt.engine.method.llm_layers):
            kept = selections(rt, s, n_samples)
            if kept is not None:
                store.append((f"llm{layer}", kept))

    return finish
