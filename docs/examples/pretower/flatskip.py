"""FlatSkip: run the vision tower only on the visual tokens whose pixels are not one flat colour (docs/your-method.md,
"A pre-tower stage")."""

import torch

from llava.families import registry
from llava.method import Method, register
from llava.selection import Selection


@register
class FlatSkip(Method):
    """Keep an image's tokens whose pixels vary (and its first token); the tower never sees the flat ones."""

    name = "flatskip"
    pixel_stage = True  # a selection before the vision tower, from the pixels
    families = registry.where(pre_tower=True)  # the families whose tower runs a subset of patches (Qwen)

    def select_pixels(self, sig):
        """``sig.pixels``: (T, P) each token's pixels in [0, 1]; ``sig.grid``: (rows, cols) of tokens."""
        busy = sig.pixels.std(dim=-1) > 1e-3
        busy[0] = True  # at least one token per image
        first = torch.sort((~busy).to(torch.uint8), stable=True).indices  # the busy tokens first, in order
        return Selection(keep=first, count=busy.sum())  # the first `count`: no host read in the method
