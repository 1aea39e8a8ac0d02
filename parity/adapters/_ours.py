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


def seen_vision_selections(method) -> tuple[list, "callable"]:
    """Wrap the method instance's ``select_vision`` to collect ``(signals, selection)`` per sample, in call order.
    Returns the list it fills and ``restore()``, which puts the method's own ``select_vision`` back."""
    inner = method.select_vision
    seen: list = []

    def select_vision(sig):
        sel = inner(sig)
        seen.append((sig, sel))
        return sel

    method.select_vision = select_vision

    def restore() -> None:
        method.select_vision = inner

    return seen, restore


def selections(rt, stage, n_samples: int, field: str = "keep") -> torch.Tensor | None:
    """The engine's selection of ``stage`` for samples ``0 .. n_samples - 1`` after a prefill, as one
    ``(samples, kept)`` tensor of ``field`` (``keep``: indices into the stage's visual candidates), each row
    ascending; None when the stage selected nothing."""
    rows = [rt.engine.selections.get((stage, b)) for b in range(n_samples)]
    if any(r is None for r in rows):
        return None
    return torch.stack([getattr(r, field).flatten().sort().values.cpu() for r in rows])


def llm_stage_recorder(rt, store: list):
    """``record_ours`` of an in-LLM method: after the prefill, each llm stage's selection as ``("llm<K>", (samples,
    kept))``, K the decoder layer the stage prunes before (the attached method's ``llm_layers``)."""
    layers = rt.engine.method.llm_layers

    def finish(n_samples: int) -> None:
        for stage, layer in enumerate(layers):
            kept = selections(rt, stage, n_samples)
            if kept is not None:
                store.append((f"llm{layer}", kept))

    return finish


def fixed_grid(rt) -> None:
    """VisPruner's and CDPruner's forks fix every LLaVA-NeXT image's grid at 2 x 2 crops: our model's and processor's
    pinpoints set to that one resolution of this tower (no pair to reverse)."""
    side = 2 * rt.model.config.vision_config.image_size
    rt.model.config.image_grid_pinpoints = [[side, side]]
    rt.processor.image_processor.image_grid_pinpoints = [[side, side]]


def qwen_stage_recorder(rt, store: list, name: str):
    """``record_ours_qwen`` of an in-LLM method with several stages, one image at a time: per stage the engine's kept
    indices into the stage's candidates (ascending) and their count, as ``{"kept", "n"}`` entries."""
    def finish(n_samples: int) -> None:
        if n_samples != 1:
            raise ValueError(f"{name}: the Qwen rows run one image at a time")
        n = int(rt.engine.stats.samples[0].visual_candidates)
        for s in range(len(rt.engine.method.llm_layers)):
            sel = rt.engine.selections.get((s, 0))
            if sel is None:
                continue
            store.append({"kept": sel.keep.flatten().sort().values.cpu(), "n": n})
            n = int(sel.keep.numel())

    return finish



def qwen_rows_recorder(rt, store: list, field: str, read):
    """``record_ours_qwen`` of a one-stage in-LLM method: per sample of the prefill, the kept indices (every token
    where the stage selected nothing), the visual count and ``field``: what ``read(sig)`` returns from the stage's
    signals (the rows the selection read, compared with the official side's), recorded as the stage runs."""
    method = rt.engine.method
    inner = method.select_llm
    rows: list = []

    def select_llm(stage, sig):
        rows.append(read(sig).float().cpu().clone())
        return inner(stage, sig)

    method.select_llm = select_llm

    def finish(n_samples: int) -> None:
        method.select_llm = inner
        for b in range(n_samples):
            sel = rt.engine.selections.get((0, b))
            n = int(rt.engine.stats.samples[b].visual_candidates)
            kept = sel.keep.flatten().sort().values.cpu() if sel is not None else torch.arange(n)
            store.append({"kept": kept, "n": n, field: rows[b] if b < len(rows) else None})

    return finish
