"""VisionZip (CVPR 2025): the authors' repository ``dvlab-research/VisionZip`` (now ``JIA-Lab-research/VisionZip``),
which ships the package ``visionzip/`` and no ``llava/`` tree: it patches the installed LLaVA (llava-torch).

- switch: ``visionzip.visionzip(model, dominant=D, contextual=C)`` (its README), which hands ``D - 1`` patches to the
  tower (``visionzip/main.py``: the [CLS] fills the first dominant slot) and patches transformers' ``CLIPAttention`` /
  ``CLIPEncoderLayer``, LLaVA's ``CLIPVisionTower.forward`` and ``prepare_inputs_labels_for_multimodal``. The split
  for a budget T is our method's (``baselines/visionzip.py`` ``default_split``, mirrored here by :func:`split`,
  stdlib only: the official split where one exists, else C = round(T * 10 / 64), D = T - C): 7+1 / 13+3 / 27+5 at
  T = 8 / 16 / 32.
- layer position: ``visionzip/utils.py`` ``apply_info`` sets the tower's ToMe-style schedule
  ``r = [0] * 22 + [1] + [0]``, so that CLIP-L/336's encoder layer 22 of 24 (= ``layers[-2]``, the layer producing
  ``hidden_states[-2]``, LLaVA's select layer) keeps its key metric, which ``CLIPVisionTower_VisionZip.forward``
  reads as ``encoder.layers[-2].metric``. On the tiny 8-layer tower that list leaves every layer at 0 and no layer
  keeps a metric (AttributeError), so ``enable`` sets the same switch to ``[0] * 6 + [1] + [0]``: the same position,
  ``layers[-2]``, of this tower (the attentions and hidden states are read at ``[-2]`` by the official code itself).
- kept indices (read where the official code holds them: ``record`` wraps the tower's ``forward``, which
  ``encode_images_visionzip`` calls directly, and watches the official tensors with a ``TorchFunctionMode``):
  ``"dominant"``: ``all_indices`` the tower returns ([CLS] = 0 and the top-(D-1) patches + 1, i.e. tower token
  indices), sorted; ``"targets"``: the ``target_indices`` the official code hands to ``torch.isin``, mapped from
  positions in the remaining (non-dominant) patches to token indices; ``"merge"``: for every remaining token that is
  not a target (ascending), the token index of the target it joins (the ``argmax`` the official code scatters into
  ``assign_one_hot``).
- ours: ``visionzip`` in its reference mode (``numerics="official"``), the default split for T; recorded by wrapping
  the method's ``select_vision`` (its ``Selection``: ``keep``, ``targets``, ``assign``, mapped to token indices by
  the signals' ``patch``: [CLS] = 0, patch p = p + 1).

LLaVA-NeXT (``NEXT``; ``python -m parity next --method visionzip``): the same switch and recorder on the official
``llava-v1.6-tiny`` (24 x 24 patches per crop, so ``restore_image_features_sorted``'s hard-coded 24 and 576 hold: nothing
to map). ``prepare_inputs_labels_for_multimodal_visionzip`` runs every crop of the batch through the patched tower in
one call (one ``record`` row per crop: dominant, targets, merge), D + C per crop, and re-assembles the grid crops'
dominant tokens in row-major order on the full grid, then their [CLS] tokens, then their contextual tokens, after the
base crop's D + C (no unpad, no newline; the grid from llava-torch's ``get_anyres_image_grid_shape``). Ours:
``llava.load(..., next_geometry="official", next_layout="spatial")`` (``NEXT_LOAD``), ``visionzip`` in its reference
mode with the default ``next_order="grid_raster"``; ``record_ours_next`` writes :func:`record_ours`'s entries per crop.
"""

from __future__ import annotations

REPOSITORY = "dvlab-research/VisionZip"
COMMIT = "3151f6df4fca36a4cd1c985e5956e725b1f9ad02"
PACKAGES = ("visionzip",)
INSTALLED = False

#: LLaVA-NeXT (``python -m parity next --method visionzip``): ``prepare_inputs_labels_for_multimodal_visionzip`` on
#: the installed llava-torch's anyres path: D + C per crop, the grid crops re-assembled by
#: ``restore_image_features_sorted`` (no unpad, no newline); ours with ``next_layout="spatial"`` and the default
#: ``next_order="grid_raster"``
NEXT = True
#: tokens per crop (the official NeXT splits 27+5 / 54+10 / 108+20)
NEXT_BUDGETS = (32, 64, 128)
NEXT_LOAD = {"next_layout": "spatial"}

#: baselines/visionzip.py OFFICIAL_SPLITS (tests/test_parity_visionzip.py checks :func:`split` against ours)
_SPLITS = {32: (27, 5), 64: (54, 10), 128: (108, 20), 192: (162, 30), 17: (14, 3)}


def split(budget: int) -> tuple[int, int]:
    """(dominant, contextual) for ``budget`` tokens per image: our method's default split."""
    if budget in _SPLITS:
        return _SPLITS[budget]
    c = int(budget * 10 / 64 + 0.5)
    return budget - c, c


# ---- the official side (runs in .venv-official) ----

def enable(model, method: dict) -> None:
    from visionzip import visionzip

    dominant, contextual = split(method["budget"])
    visionzip(model, dominant=dominant, contextual=contextual)
    tower = model.get_model().get_vision_tower().vision_tower
    n = len(tower.vision_model.encoder.layers)
    # apply_info's schedule names CLIP-L's layers[-2] (22 of 24); the same layer of this tower (module doc)
    tower.r = [0] * (n - 2) + [1] + [0]


def _capture():
    """A TorchFunctionMode that keeps the official tensors VisionZip's tower forward hands to ``torch.isin`` (the
    target positions, second argument) and to ``Tensor.scatter_`` on the 3-D one-hot (the argmax assignment)."""
    import torch
    from torch.overrides import TorchFunctionMode

    class Capture(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.targets = None
            self.assign = None

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.isin and self.targets is None:
                self.targets = args[1].detach().clone()
            if func is torch.Tensor.scatter_ and args[0].dim() == 3 and args[1] == 2:
                self.assign = args[2].detach().clone()[..., 0]
            return func(*args, **kwargs)

    return Capture()


class _Unwrap:
    def __init__(self, tower):
        self.tower = tower

    def remove(self):
        self.tower.__dict__.pop("forward", None)


def record(model, store: list) -> list:
    import torch

    tower = model.get_model().get_vision_tower()
    inner = type(tower).forward  # the official CLIPVisionTower_VisionZip.forward, patched in by visionzip()

    def forward(images):
        cap = _capture()
        with cap:
            out = inner(tower, images)
        _, all_indices = out
        all_indices = all_indices.detach().cpu()
        n_tokens = tower.vision_tower.vision_model.embeddings.num_positions  # patches + [CLS]
        dom = all_indices.sort(dim=1).values
        store.append(("dominant", dom.clone()))
        rows_t, rows_m = [], []
        for b in range(dom.shape[0]):
            rest = torch.tensor([t for t in range(n_tokens) if t not in set(dom[b].tolist())])
            tpos = cap.targets.cpu()
            rows_t.append(rest[tpos])
            others = rest[~torch.isin(torch.arange(rest.numel()), tpos)]
            rows_m.append(rest[tpos][cap.assign[b].cpu()] if others.numel() else others)
        store.append(("targets", torch.stack(rows_t)))
        store.append(("merge", torch.stack(rows_m)))
        return out

    tower.forward = forward  # encode_images_visionzip calls get_vision_tower().forward(images) directly
    return [_Unwrap(tower)]


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    return "visionzip", {"numerics": "official"}


def record_ours(rt, store: list):
    import torch

    from ._ours import seen_vision_selections

    seen, restore = seen_vision_selections(rt.engine.method)

    def finish(n_samples: int) -> None:
        restore()
        rows_d, rows_t, rows_m = [], [], []
        for sig, sel in seen[:n_samples]:
            tok = (sig.patch + 1).cpu()  # tower token index of each candidate ([CLS]: patch -1 -> 0)
            rows_d.append(tok[sel.keep.cpu()].sort().values)
            targets = tok[sel.targets.cpu()]
            rows_t.append(targets)
            a = sel.assign.cpu()
            merged = torch.nonzero(a >= 0).flatten()
            merged = merged[tok[merged].argsort()]
            rows_m.append(targets[a[merged]])
        store.append(("dominant", torch.stack(rows_d)))
        store.append(("targets", torch.stack(rows_t)))
        store.append(("merge", torch.stack(rows_m)))

    return finish


def record_ours_next(rt, store: list):
    """NeXT: the entries of :func:`record_ours` per crop (the official tower forward runs the crops as its batch, one
    row each), the crops of the batch's images in order."""
    import torch

    from ._ours import seen_vision_selections

    seen, restore = seen_vision_selections(rt.engine.method)

    def finish(n_samples: int) -> None:
        restore()
        rows_d, rows_t, rows_m = [], [], []
        for sig, sel in seen[:n_samples]:
            tok = (sig.patch + 1).cpu()
            unit = sig.unit.cpu()
            keep, tgt, a = sel.keep.flatten().cpu(), sel.targets.cpu(), sel.assign.cpu()
            for u in range(int(unit.max()) + 1):
                rows_d.append(tok[keep[unit[keep] == u]].sort().values)
                rows_t.append(tok[tgt[unit[tgt] == u]])
                merged = torch.nonzero((a >= 0) & (unit == u)).flatten()
                merged = merged[tok[merged].argsort()]
                rows_m.append(tok[tgt[a[merged]]])
        store.append(("dominant", torch.stack(rows_d)))
        store.append(("targets", torch.stack(rows_t)))
        store.append(("merge", torch.stack(rows_m)))

    return finish
