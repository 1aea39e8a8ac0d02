"""NormPrune: keep the visual tokens with the largest feature norm (docs/your-method.md, the worked example)."""

import torch

from llava.method import Method, register
from llava.selection import Selection


@register
class NormPrune(Method):
    """Keep the ``budget`` visual tokens whose projected features have the largest L2 norm, in their order."""

    name = "normprune"
    vision_stage = True  # a selection before the LLM, from the vision signals

    def select_vision(self, sig):
        """``sig.features``: one row per candidate visual token (docs/architecture.md, "Signals")."""
        k = min(self.budget, sig.features.shape[0])
        norms = sig.features.float().norm(dim=-1)
        keep = torch.topk(norms, k).indices
        return Selection(keep=keep.sort().values)
