"""Our side's recorders, shared by the adapters: the kept indices of our methods in the layout the official
recorders write, ``(stage, (samples, kept) tensor)``."""

from __future__ import annotations

import torch


def record_tower_cuts(method, store: list) -> None:
    """Wrap the method instance's ``select_tower`` to record, after each CLIP layer that cut, the kept patch indices
    (0-based, ascending, [CLS] left out) per unit: FlowCut's official ``all_keep_indices``."""
    inner = method.select_tower

    def select_tower(layer_idx, sig):
        keep = inner(layer_idx, sig)
        if keep is not None:
            rows = [keep[u] for u in range(len(keep))] if not torch.is_tensor(keep) else list(keep)
            kept = [sig.patch[u][r] for u, r in enumerate(rows)]
            store.append((layer_idx, torch.stack([k[k >= 0] for k in kept]).cpu()))
        return keep

    method.select_tower = select_tower


def selections(rt, stage, n_samples: int, field: str = "keep") -> torch.Tensor | None:
    """The engine's selection of ``stage`` for samples ``0 .. n_samples - 1`` after a prefill, as one
    ``(samples, kept)`` tensor of ``field`` (``keep``: indices into the stage's visual candidates), each row
    ascending; None when the stage selected nothing."""
    rows = [rt.engine.selections.get((stage, b)) for b in range(n_samples)]
    if any(r is None for r in rows):
        return None
    return torch.stack([getattr(r, field).flatten().sort().values.cpu() for r in rows])
