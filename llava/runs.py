"""The placeholder runs of a pruned prompt: which kept visual rows each run of the unpruned prompt holds (for a host
that lays the pruned prompt out itself, e.g. the vLLM plugin's Qwen3-VL videos: one run per temporal slice)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .prefill import VisionOut


def visual_runs(cfg, input_ids: torch.Tensor, info: VisionOut,
                attention_mask: torch.Tensor | None = None) -> list[tuple[torch.Tensor, list[int]]]:
    """Per sample of a :meth:`llava.engine.PruningEngine.vision_inputs` call on ``input_ids`` (``info``: its fourth
    result; ``cfg``: the model config, its image / video token ids): (the indices in the pruned row (``embeds[b]``)
    of its visual rows, the kept / merged tokens, ascending (host), and how many of them each placeholder run of
    ``input_ids`` holds, in prompt order: 0 for a run the method emptied).

    A run is the engine's: consecutive placeholder tokens (image or video), so runs are separated by text
    (e.g. Qwen3-VL's timestamp and ``<|vision_end|>`` / ``<|vision_start|>`` between a video's temporal slices).
    Text tokens are never dropped, so a run is identified in the pruned row by the number of text tokens before
    it. For a host that lays the pruned prompt out itself (the vLLM plugin: one placeholder run per slice)."""
    marks = [int(t) for t in (getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None))
             if t is not None]
    ids_h = input_ids.cpu()
    B, L = ids_h.shape
    valid = attention_mask.cpu().bool() if attention_mask is not None else torch.ones(B, L, dtype=torch.bool)
    out = []
    for b, lay in enumerate(info.layouts):
        ids = ids_h[b][valid[b]]
        vis = torch.isin(ids, torch.tensor(marks, dtype=ids.dtype)).nonzero().flatten()
        text_before = vis - torch.arange(vis.numel())  # constant within a run, distinct across runs
        starts = torch.ones(vis.numel(), dtype=torch.bool)
        starts[1:] = vis[1:] != vis[:-1] + 1
        run_text = text_before[starts]  # text tokens before each run, ascending
        new = lay.visual.cpu()
        new_text = new - torch.arange(new.numel())  # the same count for each output in the pruned row
        which = torch.searchsorted(run_text, new_text)
        if new.numel() and (int(which.max()) >= run_text.numel() or
                            not torch.equal(run_text[which.clamp(max=run_text.numel() - 1)], new_text)):
            raise ValueError("the pruned row's visual tokens do not fall in the prompt's placeholder runs "
                             "(input_ids / attention_mask are not the ones vision_inputs was given?)")
        counts = torch.bincount(which, minlength=run_text.numel()).tolist()
        out.append((lay.real.cpu()[new], counts))
    return out
