"""MergeRest: keep what another method keeps and merge everything it drops into one extra token (docs/your-method.md,
"An add-on")."""

import torch

from llava.addon import Addon
from llava.method import register
from llava.selection import Selection


@register
class MergeRest(Addon):
    """The base's kept tokens in raster order, then the mean of all the tokens it drops (budget: the base's + 1)."""

    name = "mergerest"
    base_default = "divprune"  # --opt base=... picks another

    def base_budget(self):
        return self.budget - 1  # one token left for the merged rest

    def select_addon(self, sig, base):
        """``base``: the base method's Selection of this sample; ``sig``: the same signals it read."""
        n = sig.features.shape[0]
        keep = base.keep.sort().values
        if keep.numel() >= n:  # the base dropped nothing
            return Selection(keep=keep)
        dropped = torch.ones(n, dtype=torch.bool, device=keep.device)
        dropped[keep] = False
        target = dropped.int().argmax()[None]  # the first dropped token carries the merge
        assign = torch.where(dropped, 0, -1)
        return Selection(keep=keep, targets=target, assign=assign, rule="mean", space="projected")
