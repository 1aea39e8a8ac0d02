"""Two throw-away methods that exercise both engine stages before the real methods exist."""

import torch

from llava.method import Method, register
from llava.selection import Selection


@register
class KeepFirstK(Method):
    """Vision stage: keep the first ``budget`` visual tokens of each sample (prompt order)."""

    name = "test_keep_first_k"
    vision_stage = True

    def select_vision(self, sig):
        return Selection(keep=torch.arange(min(self.budget, sig.num_tokens)))


@register
class KeepFirstKMerged(Method):
    """Vision stage with merging: keep the first ``budget - 1`` tokens, merge all later ones into
    the next token (LLaVA-NeXT newline tokens are dropped, never merged)."""

    name = "test_keep_first_merge_rest"
    vision_stage = True

    @classmethod
    def option_defaults(cls):
        return {**super().option_defaults(), "space": "vision"}

    def select_vision(self, sig):
        n = sig.num_tokens
        k = min(self.budget - 1, n - 1)
        rest = torch.nonzero(~sig.is_newline[k:]).flatten() + k
        assign = torch.full((n,), -1)
        assign[rest[1:]] = 0
        return Selection(keep=torch.arange(k), targets=rest[:1], assign=assign, space=self.space)


@register
class EveryOtherAfter2(Method):
    """LLM stage before decoder layer 2: keep every ``stride``-th visual token (stride 1 = all)."""

    name = "test_every_other_after2"

    @classmethod
    def option_defaults(cls):
        return {**super().option_defaults(), "stride": 2, "layer": 2}

    @property
    def llm_layers(self):
        return (self.layer,)

    def select_llm(self, stage, sig):
        return Selection(keep=torch.arange(0, sig.num_visual, self.stride))


@register
class LastRowTopK(Method):
    """LLM stage using a recomputed attention row: keep the ``budget`` visual tokens the last
    prompt token attends to most in layer K-1 (FastV's rule, to exercise the attention signal)."""

    name = "test_last_row_topk"

    @classmethod
    def option_defaults(cls):
        return {**super().option_defaults(), "layer": 2}

    @property
    def llm_layers(self):
        return (self.layer,)

    def select_llm(self, stage, sig):
        row = sig.attention("last", layer="prev").mean(0)[0, sig.visual]
        k = min(self.budget, sig.num_visual)
        return Selection(keep=torch.topk(row, k).indices.sort().values)
