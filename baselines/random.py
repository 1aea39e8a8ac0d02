"""Controls: random selection at the same budget, and no visual tokens at all.

Doc: docs/methods/README.md (our design; UniPruneBench, arXiv 2511.02650, reports
random pruning as a strong baseline). Pre-LLM; per unit (image / LLaVA-NeXT crop / video frame)
keep a uniformly random subset of ``budget`` tokens, original order, contiguous positions.
"""

from __future__ import annotations

import torch

from llava.method import Method, register
from llava.ops import UnitLayout, unit_layout
from llava.selection import Selection


def random_per_unit(unit: torch.Tensor, budget: int, generator: torch.Generator,
                    layout: UnitLayout | None = None) -> torch.Tensor:
    """Indices of ``budget`` uniformly drawn tokens of every unit (fewer if a unit is smaller),
    ascending. Tokens with unit -1 (LLaVA-NeXT newlines) are never kept. The draws come from the
    (host) ``generator``, unit by unit; they reach the device in one copy."""
    lay = layout if layout is not None else unit_layout(unit)
    if not lay.num_units:
        return unit.new_zeros(0)
    picks, offset = [], 0
    for idx in lay.tokens:
        picks.append(torch.randperm(idx.numel(), generator=generator)[: min(budget, idx.numel())] + offset)
        offset += idx.numel()
    flat = torch.cat(lay.tokens)
    return flat[torch.cat(picks).to(flat.device, non_blocking=True)].sort().values


@register
class RandomSelection(Method):
    """Keep ``budget`` random visual tokens per image / crop / frame (seeded per sample)."""

    name = "random"
    capturable = "full"
    vision_stage = True

    @classmethod
    def option_defaults(cls):
        # keep_newlines: LLaVA-NeXT 'spatial_unpad' newline tokens are layout, not content; keep them
        # (not counted in the budget). False drops them.
        return {**super().option_defaults(), "seed": 0, "keep_newlines": True}

    def __init__(self, budget=None, **options):
        if budget is None:
            raise ValueError("random: a budget (tokens per image / crop / frame) is required")
        super().__init__(budget, **options)

    def plan_vision(self, sig) -> dict:
        """The draws, on the host (they depend on the seed, the sample key and the layout only):
        what a captured prefill reads as ``sig.plan["keep"]``. ``sig`` here holds host tensors."""
        return {"keep": self._draw(sig, sig.unit_layout())}

    def _draw(self, sig, lay):
        g = torch.Generator().manual_seed(hash((int(self.seed), int(sig.key))) & 0x7FFFFFFFFFFFFFFF)
        return random_per_unit(sig.unit, self.budget, g, layout=lay)

    def select_vision(self, sig):
        lay = sig.unit_layout()  # the one host sync (none when planned)
        keep = sig.plan["keep"] if "keep" in sig.plan else self._draw(sig, lay)
        if self.keep_newlines and lay.newlines.numel():
            keep = torch.cat([keep, lay.newlines]).sort().values
        return Selection(keep=keep)


@register
class NoVisual(Method):
    """The 'no visual tokens' control: every visual token is removed before the LLM."""

    name = "novisual"
    capturable = "full"
    vision_stage = True

    def select_vision(self, sig):
        return Selection(keep=torch.zeros(0, dtype=torch.long, device=sig.unit.device))
