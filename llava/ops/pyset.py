"""The iteration order of CPython's ``list(set(xs))`` for distinct small non-negative ints, as tensor ops (OTPrune's
official code emits its kept tokens in that order). Part of :mod:`llava.ops`.

For such ints the order is a pure function of the insertion sequence: ``hash(i) == i``; a set starts with a table of
8 slots; an insert probes slot ``i & mask``, then (when the run fits below ``mask``) the next 9 slots linearly, then
jumps ``slot = (5 * slot + 1 + perturb) & mask`` with ``perturb = hash >> 5`` shifted again at every jump, and takes
the first empty slot; once ``5 * fill >= 3 * mask`` the table grows to the smallest power of two above ``4 * used``
and the entries are re-inserted in their old slot order; iteration walks the slots in order. (CPython
``Objects/setobject.c``: ``set_add_entry``, ``set_insert_clean``, ``set_table_resize``; unchanged in 3.7-3.13; checked
against the interpreter in tests/test_otprune.py.) Sets of ints below the table size come out ascending; larger
ones collide (``i`` and ``i + size``) and come out in the probing order.

:func:`set_order` replays the inserts on the device: one gather of the table along the item's probe sequence and one
``argmax`` per insert (and per re-insert at the 3-4 resizes), no host read. The probe sequences are host constants
(:func:`probe_table`, cached per candidate count and table size), copied to the device once per call.
"""

from __future__ import annotations

from functools import lru_cache

import torch

MINSIZE = 8  # PySet_MINSIZE
LINEAR_PROBES = 9
PERTURB_SHIFT = 5


def probe_sequence(h: int, mask: int):
    """The slots CPython's set probes for hash ``h`` in a table of ``mask + 1`` slots, in order (endless)."""
    i, perturb = h & mask, h
    while True:
        if i + LINEAR_PROBES <= mask:
            yield from range(i, i + LINEAR_PROBES + 1)
        else:
            yield i
        perturb >>= PERTURB_SHIFT
        i = (i * 5 + 1 + perturb) & mask


def grown_size(used: int) -> int:
    """The table size after a resize with ``used`` entries (``set_table_resize(so, used * 4)``, used <= 50000)."""
    size = MINSIZE
    while size <= used * 4:
        size <<= 1
    return size


def must_grow(used: int, size: int) -> bool:
    """Whether the insert that made ``used`` entries (no dummies: fill == used) triggers a resize."""
    return used * 5 >= (size - 1) * 3


def reference_set_order(xs) -> list:
    """``list(set(xs))`` of non-negative ints (< 2**61) replayed in pure Python (the model :func:`set_order`
    follows; duplicates allowed)."""
    table: list = [None] * MINSIZE

    def insert(tab, h) -> bool:
        for s in probe_sequence(h, len(tab) - 1):
            if tab[s] is None:
                tab[s] = h
                return True
            if tab[s] == h:
                return False
        raise AssertionError("unreachable")

    used = 0
    for h in xs:
        if insert(table, int(h)):
            used += 1
            if must_grow(used, len(table)):
                old, table = table, [None] * grown_size(used)
                for x in old:
                    if x is not None:
                        insert(table, x)
    return [x for x in table if x is not None]


@lru_cache(maxsize=32)
def probe_table(n: int, size: int, depth: int) -> torch.Tensor:
    """(n, depth) int64 host tensor: row h = the first ``depth`` distinct slots of hash h's probe sequence in a table
    of ``size`` slots. An insert into a table holding fewer than ``depth`` entries finds its empty slot among them
    (a slot probed again is still occupied: nothing is ever removed)."""
    depth = min(depth, size)
    rows = []
    for h in range(n):
        seen: dict = {}
        for s in probe_sequence(h, size - 1):
            if s not in seen:
                seen[s] = None
                if len(seen) == depth:
                    break
        rows.append(list(seen))
    return torch.tensor(rows, dtype=torch.long).reshape(n, depth)


def _schedule(k: int) -> list[tuple[int, int, int]]:
    """Per table size used while inserting ``k`` distinct items: (size, first insert, inserts) and the entries
    re-inserted into it are the ``first insert`` items before it."""
    phases, size, start = [], MINSIZE, 0
    for used in range(1, k + 1):
        if must_grow(used, size):
            phases.append((size, start, used - start))
            size, start = grown_size(used), used
    phases.append((size, start, k - start))
    return phases


def set_order(items: torch.Tensor, n: int) -> torch.Tensor:
    """``items`` (k,) or (B, k): distinct ints in [0, n) per row, in insertion order; returns each row reordered as
    CPython's ``list(set(row.tolist()))`` would, computed on the items' device with no host read (static shapes:
    the table sizes depend on ``k`` only)."""
    squeeze = items.dim() == 1
    x = items[None] if squeeze else items
    B, k = x.shape
    dev = x.device
    if k == 0:
        return items
    table = None
    for size, start, count in _schedule(k):
        # the deepest an insert into this table probes: its entries before the last insert (+ the empty slot)
        probes = probe_table(n, size, start + count).to(dev)
        if table is None:
            new = torch.full((B, size), -1, dtype=torch.long, device=dev)
        else:  # re-insert the old table's entries in their slot order (set_table_resize -> set_insert_clean)
            slots = torch.arange(table.shape[1], device=dev)
            key = torch.where(table >= 0, slots, table.shape[1])
            old = table.gather(1, key.sort(dim=1).indices[:, :start])  # (B, start) in old slot order
            new = torch.full((B, size), -1, dtype=torch.long, device=dev)
            for j in range(start):
                new = _insert(new, probes, old[:, j])
        for t in range(start, start + count):
            new = _insert(new, probes, x[:, t])
        table = new
    order = table.gather(1, torch.where(table >= 0, torch.arange(table.shape[1], device=dev), table.shape[1])
                         .sort(dim=1).indices[:, :k])
    return order[0] if squeeze else order


def _insert(table: torch.Tensor, probes: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``table`` (B, size) with ``h`` (B,) written into its first empty slot along ``probes[h]``."""
    seq = probes.index_select(0, h)  # (B, depth)
    free = table.gather(1, seq) < 0
    first = free.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first empty slot probed
    return table.scatter(1, seq.gather(1, first), h[:, None])
