"""HoloV (NeurIPS 2025, arXiv 2510.02912, "Don't Just Chase 'Highlighted Tokens' in MLLMs"): the authors' LLaVA fork
``obananas/HoloV`` (Apache-2.0; its README: "simply replace the corresponding files we provided").

- switch: none; the fork always prunes. ``llava/model/llava_arch.py`` ``prepare_inputs_labels_for_multimodal`` calls
  ``HoloV(image_features, image_attns, num_patches=16, new_image_token_num=64)`` (``llava/model/utils.py``) on the
  projected features and the head-mean [CLS] attention of the select layer (``encode_images``; the fork's
  ``clip_encoder.py`` returns ``attentions[select_layer][:, :, 0, 1:]`` cast to the images' dtype). The budget is
  that literal 64, which the README leaves to the user to edit: ``enable`` recompiles
  ``prepare_inputs_labels_for_multimodal`` from the clone's source with ``new_image_token_num=64`` replaced by
  ``self.config.parity_holov_budget`` (refused unless found exactly once) and sets that field to T. Nothing else is
  changed: ``num_patches=16`` stays (the tiny tower's 64 patches: 16 crops of 4).
- kept indices: ``record`` wraps the module's ``HoloV`` (``llava_arch``'s name for it) and maps each output row back
  to the input row it copies (the official rows are ``patch[top_indices]`` / ``patch`` copies; a zero row is the
  official padding, -1). Two stages per image, each ``(samples, T)``: ``"vision"`` the real kept indices ascending,
  then -1 per zero row; ``"order"`` the rows in the order the LLM gets them (-1: a zero row). Both sides in the same
  layout (ours from the selection: ``keep`` in output order, the zero rows by ``Selection.values``).
- batches: the fork's ``HoloV`` loops over the images of a 4-D batch, each on its own: batches run as they are.
- budgets (``BUDGETS``): 8 / 16 / 32 as the other adapters, and 60 of 64, where crops of 4 tokens overflow (w T >= 4
  for a crop with more than 1/15 of the attention): the official zero rows.
- ours: ``holov`` in its reference mode (``numerics="official"``: the head mean in the model's dtype, the crop scores
  per crop with the features in the model's dtype, ``torch.topk``) with the official defaults (``overflow="pad"``,
  ``order="official"``).
"""

from __future__ import annotations

REPOSITORY = "obananas/HoloV"
COMMIT = "1d2e65e961e698ff0e7d5bb4625489177dd9deba"
PACKAGES = ("llava",)
INSTALLED = False
BUDGETS = (8, 16, 32, 60)

#: the literal that fixes the official budget, and what it becomes here
BUDGET_LITERAL = "new_image_token_num=64"
BUDGET_REPLACEMENT = "new_image_token_num=self.config.parity_holov_budget"


# ---- the official side (runs in .venv-official) ----

def enable(model, method: dict) -> None:
    from llava.model.llava_arch import LlavaMetaForCausalLM

    from . import _official

    model.config.parity_holov_budget = int(method["budget"])
    if not getattr(LlavaMetaForCausalLM, "_parity_holov_budget", False):
        _official.install(LlavaMetaForCausalLM, "prepare_inputs_labels_for_multimodal",
                          [(BUDGET_LITERAL, BUDGET_REPLACEMENT)], literal=True)
        LlavaMetaForCausalLM._parity_holov_budget = True


def rows_to_indices(inputs, outputs):
    """(B, T) the input row each output row copies (-1: an all-zero row, the official padding)."""
    import torch

    out = []
    for x, y in zip(inputs, outputs):
        same = (y[:, None, :] == x[None, :, :]).all(-1)  # (T, N)
        zero = (y == 0).all(-1)
        if bool((same.sum(-1) > 1).any()) or bool((~zero & ~same.any(-1)).any()):
            raise RuntimeError("holov parity: an output row matches no input row, or several")
        out.append(torch.where(zero, torch.full_like(zero, -1, dtype=torch.long), same.float().argmax(-1)))
    return torch.stack(out)


def entries(order):
    """``[("vision", real kept ascending then -1 per pad row), ("order", order)]`` of a (B, T) order (-1: pad)."""
    import torch

    real = torch.where(order < 0, torch.full_like(order, order.shape[1] * 10 ** 6), order).sort(-1).values
    return [("vision", torch.where(real >= order.shape[1] * 10 ** 6, torch.full_like(real, -1), real).cpu()),
            ("order", order.cpu())]


def record(model, store: list) -> list:
    import llava.model.llava_arch as arch

    inner = arch.HoloV

    def HoloV(image_tokens, attention, *args, **kwargs):
        out = inner(image_tokens, attention, *args, **kwargs)
        store.extend(entries(rows_to_indices(image_tokens, out)))
        return out

    arch.HoloV = HoloV

    class Handle:
        def remove(self):
            arch.HoloV = inner

    return [Handle()]


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    return "holov", {"numerics": "official"}


def record_ours(rt, store: list):
    import torch

    def finish(n_samples: int) -> None:
        orders = []
        for b in range(n_samples):
            sel = rt.engine.selections.get(("vision", b))
            if sel is None:
                return
            keep = sel.keep.flatten().cpu()
            if sel.values is not None:  # the zero rows (overflow="pad")
                keep = torch.where((sel.values.cpu() == 0).all(-1), torch.full_like(keep, -1), keep)
            orders.append(keep)
        store.extend(entries(torch.stack(orders)))

    return finish
