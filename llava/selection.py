"""What survives one stage of a pruning method, for one sample: a :class:`Selection` (which visual tokens to keep, in
which order, and how the others are merged), the value every method hook answers (:mod:`llava.method`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

MergeRule = Literal["target_plus_mean", "mean", "weighted_mean"]
MergeArithmetic = Literal["fp32", "sequential"]


@dataclass
class Selection:
    """What survives one stage, for one sample, as indices into that stage's visual tokens.

    keep:    (k,) indices of tokens carried over unchanged, in output order.
    targets: (c,) indices of tokens that become *merged* (contextual) tokens, placed after ``keep``.
    assign:  (n,) for every visual token of the stage, the slot in ``targets`` it is merged into,
             or -1. Only tokens that are neither kept nor targets are read (``merge_kept``: kept ones too).
    rule:    ``target_plus_mean``: merged = x[target] + mean(x[assigned]) (VisionZip / VisionDrop);
             ``mean``: merged = mean(x[target] and x[assigned]); ``weighted_mean``: the same mean written as
             sum of x[j] * (1 / (size + 1e-6)) over the target and its assigned tokens (SparseVLM's official
             ``cluster_and_merge``; equal to ``mean`` up to rounding).
    arithmetic: ``fp32`` (default): the engine's merge, sums in fp32, one rounding to the rows' dtype;
             ``sequential`` (reference modes only): the members added one at a time in ``merge_order`` into an
             fp32 accumulator, rounded to the rows' dtype once, the division in that dtype: the official codes'
             CPU ``scatter_add_`` / ``index_add_`` (:func:`llava.ops.merge_tokens_sequential`); one host read.
    merge_order: ``sequential`` only: (L,) token indices in the order they are added (default: ascending index);
             it must hold every merged token once (checked with the same host read).
    space:   vision stage only: merge ``vision`` features (before the projector, then project) or
             ``projected`` features (LLM input space).
    order:   optional permutation of the outputs [keep..., merged...] (e.g. [D, C] per unit, or
             each merged token at its target's place); default: keep, then merged.
    values:  (keep + targets, D_space) the outputs' features computed by the method itself, for merges a
             single-target ``assign`` cannot express. Vision stage: in ``space`` (projected when ``vision``;
             PruMerge's k-NN sums, its global token). llm stage (eager engine only): the hidden states entering
             layer K in the model's dtype (VLM-Pruner's 0.3 own + 0.7 absorbed), DeepStack rows following the
             kept tokens. ``keep`` / ``targets`` then only give each output's provenance (unit, run, position).
    allow_duplicates: see the field.
    merge_kept: ``assign`` is read for the kept tokens too: a kept token with a slot is output unchanged
             *and* averaged into that target (ApET's official basis tokens, which its code merges as well as
             emits); the targets are never read.
    count:   captured (piecewise) selections and pre-tower stages only: a 0-d device count; only the first ``count`` outputs
             (in output order) are the selection, the rest are padding that fixes the shape (never read).
             The fast path reads every count once, after its first graph (:mod:`llava.fast.path`).
    """

    keep: torch.Tensor
    targets: torch.Tensor | None = None
    assign: torch.Tensor | None = None
    rule: MergeRule = "target_plus_mean"
    space: Literal["vision", "projected"] = "vision"
    order: torch.Tensor | None = None
    values: torch.Tensor | None = None
    #: let a token be kept more than once (it then enters the LLM twice); only to reproduce released
    #: code that does so (AttnMix ``allow_duplicates``); otherwise a duplicate is an error
    allow_duplicates: bool = False
    count: torch.Tensor | None = None
    #: kept tokens with an ``assign`` slot join that target too (only to reproduce released code that does so)
    merge_kept: bool = False
    arithmetic: MergeArithmetic = "fp32"
    merge_order: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.keep = torch.as_tensor(self.keep, dtype=torch.long).reshape(-1)
        if (self.targets is None) != (self.assign is None):
            raise ValueError("Selection: give both `targets` and `assign`, or neither")
        if self.targets is not None:
            self.targets = torch.as_tensor(self.targets, dtype=torch.long).reshape(-1)
            self.assign = torch.as_tensor(self.assign, dtype=torch.long).reshape(-1)
        if self.order is not None:
            self.order = torch.as_tensor(self.order, dtype=torch.long).reshape(-1)
        if self.arithmetic not in ("fp32", "sequential"):
            raise ValueError(f"Selection: arithmetic must be 'fp32' or 'sequential', not {self.arithmetic!r}")
        if self.merge_order is not None:
            if self.arithmetic != "sequential":
                raise ValueError("Selection: merge_order is read by arithmetic='sequential' only")
            self.merge_order = torch.as_tensor(self.merge_order, dtype=torch.long).reshape(-1)

    @property
    def num_out(self) -> int:
        return int(self.keep.numel()) + (0 if self.targets is None else int(self.targets.numel()))

    def flags(self, n: int, stock: int | None = None, malformed_only: bool = False) -> dict[str, torch.Tensor]:
        """The validity tests of :meth:`check` as 0-d bool tensors on the selection's device, unread:
        ``range`` / ``dup`` / ``order`` / ``assign`` (malformed) and ``not_identity`` / ``order_moves``.
        Shape errors (which need no device value) raise here. A captured prefill ORs the malformed
        flags into one device flag and reads it once, after the prefill; it asks ``malformed_only`` (the
        identity tests are then not computed: fewer kernels inside the graph). ``count`` (a padded selection)
        is malformed too."""
        stock = n if stock is None else stock
        dev = self.keep.device
        idx = self.keep if self.targets is None else torch.cat([self.keep, self.targets.to(dev)])
        no = torch.zeros((), dtype=torch.bool, device=dev)
        flags = {}
        if self.order is not None and self.order.numel() != self.num_out:
            raise ValueError("Selection.order must be a permutation of the outputs")
        if self.count is not None and idx.numel():  # padded: only the first `count` outputs are checked
            if self.order is not None:
                idx = idx[self.order.to(dev).clamp(0, self.num_out - 1)]
            ar = torch.arange(idx.numel(), device=dev)
            real = ar < self.count.to(dev)
            flags["count"] = (self.count < 0) | (self.count > self.num_out)
            flags["range"] = (real & ((idx < 0) | (idx >= n))).any()
            s = torch.where(real, idx, n + ar).sort().values  # padding: distinct values past the range
            flags["dup"] = (s[1:] == s[:-1]).any() if s.numel() > 1 else no
        elif idx.numel():
            s = idx.sort().values
            flags["range"] = (s[0] < 0) | (s[-1] >= n)
            if not (self.allow_duplicates and self.targets is None):
                flags["dup"] = (s[1:] == s[:-1]).any() if s.numel() > 1 else no
        if self.order is not None:
            ar = torch.arange(self.num_out, device=self.order.device)
            flags["order"] = (self.order.sort().values != ar).any().to(dev)
            if not malformed_only:
                flags["order_moves"] = (self.order != ar).any().to(dev)
        if self.assign is not None:
            if self.assign.numel() != n:
                raise ValueError(f"Selection.assign has {self.assign.numel()} entries for {n} tokens")
            if n:
                a = self.assign
                flags["assign"] = ((a.max() >= self.targets.numel()) | (a.min() < -1)).to(dev)
        if self.values is not None and self.values.shape[0] != self.num_out:
            raise ValueError(f"Selection.values has {self.values.shape[0]} rows for {self.num_out} outputs")
        if not malformed_only and not self._merges() and self.keep.numel() == stock and self.count is None:
            flags["not_identity"] = (self.keep != torch.arange(stock, device=dev)).any() if stock else no
        return flags

    #: the flags of :meth:`flags` that make a selection malformed
    MALFORMED = ("range", "dup", "order", "assign", "count")

    def _merges(self) -> bool:
        return (self.targets is not None and self.targets.numel() > 0) or self.values is not None

    def check(self, n: int, stock: int | None = None) -> bool:
        """Validate the selection for ``n`` candidate tokens (raise if malformed) and return whether it is
        the identity on the first ``stock`` (default ``n``) of them: keeps exactly those, in order, with
        no merging. All tests run on the selection's own device and are read back together: one host
        synchronisation per selection."""
        stock = n if stock is None else stock
        flags = self.flags(n, stock)
        merges = self._merges()
        names = list(flags)
        vals = torch.stack([flags[k] for k in names]).tolist() if names else []
        got = dict(zip(names, vals))
        if got.get("range"):
            raise ValueError(f"Selection indexes outside 0..{n - 1}")
        if got.get("dup"):
            raise ValueError("Selection: a token is kept twice, or a merge target is also kept")
        if got.get("order"):
            raise ValueError("Selection.order must be a permutation of the outputs")
        if got.get("assign"):
            raise ValueError("Selection.assign points outside the merge targets")
        if got.get("count"):
            raise ValueError("Selection.count is outside 0..num_out")
        return (not merges and self.keep.numel() == stock and not got.get("not_identity", True)
                and not got.get("order_moves", False))

    def members(self, n: int, device) -> torch.Tensor:
        """(n,) on ``device``: the slot in ``targets`` each of the ``n`` tokens is merged into, -1 for the tokens that
        merge nowhere: the targets themselves, the kept tokens (unless ``merge_kept``) and the unassigned. The merge
        (:func:`llava.ops.merge_tokens`) and :meth:`sizes` read it. No host read (``index_fill_``, not a boolean
        index)."""
        taken = torch.zeros(n, dtype=torch.bool, device=device)
        if not self.merge_kept:
            taken.index_fill_(0, self.keep.to(device).reshape(-1), True)
        taken.index_fill_(0, self.targets.to(device).reshape(-1), True)
        return self.assign.to(device).masked_fill(taken, -1)  # not assign[taken] = -1: a boolean index syncs

    def sizes(self, n: int) -> torch.Tensor:
        """(num_out,) long: how many of the ``n`` candidate tokens each output stands for, in output order: a kept
        token 1, a merged token its target plus the tokens ``assign`` gives it (``merge_kept``: kept ones too) - what
        a method that biases the attention by token size reads (:class:`llava.attention_bias.PromptKeys`). No host
        read. A selection whose ``values`` come without ``targets`` / ``assign`` counts each output once."""
        dev = self.keep.device
        k = int(self.keep.numel())
        sizes = torch.ones(self.num_out, dtype=torch.long, device=dev)
        if self.targets is not None and self.targets.numel():
            a = self.members(n, dev)
            counts = torch.zeros(self.targets.numel(), dtype=torch.long, device=dev)
            sizes[k:] += counts.index_add_(0, a.clamp(min=0), (a >= 0).long())
        if self.order is not None:
            sizes = sizes[self.order.to(dev)]
        return sizes

    def validate(self, n: int) -> None:
        """Raise if the selection is not well-formed for ``n`` candidate tokens."""
        self.check(n)

    def is_identity(self, n: int) -> bool:
        """True when the selection keeps all ``n`` tokens, in order, with no merging (validates it too)."""
        if (self.targets is not None and self.targets.numel()) or self.keep.numel() != n:
            return False
        ar = torch.arange(n, device=self.keep.device)
        same = (self.keep == ar).all()
        if self.order is not None:
            same = same & (self.order.to(ar.device) == ar).all()
        return bool(same)
