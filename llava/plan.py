"""The plan of a prefill that both executors share (the eager one: :mod:`llava.layout`, :mod:`llava.staged`; the
captured one: :mod:`llava.fast`): host work only, no tensor on a device.

* :class:`RowLayout` (:func:`row_layouts`): one sample's row, its real tokens, visual tokens and ids, as both executors
  plan it from the host copy of the ids; :func:`text_spans` and :func:`sample_key`: where its question lies (by the
  prompt's :class:`PromptSpec`: its separator and role-tag ids), and its stable key;
* :func:`run_spans` and :func:`rebuilt_row`: the one row arithmetic of a selection: where each text token and each
  output of a row go when its placeholder runs are replaced by a selection's outputs (:class:`RowMap`), and
  :func:`regather_plan`, the one gather that lays out a batch's rebuilt rows, and :func:`next_rows`, the rows after a
  stage (their layouts and that gather);
* :class:`PrefillPlan`: what a prefill runs, segment by segment of decoder layers (:class:`Segment`): per sample
  the real rows and visual tokens, and the padded width. The captured executor plans it whole before the device
  runs (every count from dry runs); the eager one extends it after each selection (:meth:`PrefillPlan.advanced`).
  ``engine.stats.plan`` holds the last prefill's, and its per-layer counts are derived from it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from functools import cached_property

import torch


@dataclass(frozen=True)
class RowLayout:
    """Host: one sample's row as it enters a stage. ``real`` (n,) the positions of its real (non-padding) tokens in
    the padded row, ``visual`` (nv,) the indices among them of its visual tokens, ascending, ``ids`` (n,) their token
    ids (-1 for a visual token after a stage). Both executors lay out the rows after a stage from them
    (:func:`next_rows`); the captured one plans its vision stage's rows and its probe from the prompt's."""

    real: torch.Tensor
    visual: torch.Tensor
    ids: torch.Tensor

    @cached_property
    def first(self) -> int:
        """The index among the real tokens of the first visual token (0 when there is none)."""
        return int(self.visual[0]) if self.visual.numel() else 0

    @cached_property
    def tokens(self) -> int:
        """The visual tokens."""
        return int(self.visual.numel())


def row_layouts(ids: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor) -> list[RowLayout]:
    """Each sample's :class:`RowLayout` of a padded batch, from host (B, L) tensors: the token ``ids``, ``valid`` its
    real tokens and ``visual`` its placeholder tokens."""
    out = []
    for b in range(ids.shape[0]):
        real = valid[b].nonzero().flatten()
        out.append(RowLayout(real=real, visual=visual[b, real].nonzero().flatten(), ids=ids[b, real]))
    return out


@dataclass
class PromptSpec:
    """How to find the question among the text tokens after the image (for query-aware signals).

    sep_ids:  token ids that may open the text after the image (the newline separator); stripped.
    tail_ids: the token ids that end the prompt (the role tag, e.g. `` ASSISTANT:``); stripped.
    """

    sep_ids: tuple[int, ...] = ()
    tail_ids: tuple[int, ...] = ()


def without_tokens(valid: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """The rows of a left-padded batch without the tokens ``drop`` (host (B, L) bools, e.g. a pre-tower stage's
    dropped placeholders; ``valid`` the real tokens), left-padded again to the longest row: (B, L') each new column's
    source column, -1 for a pad."""
    keep = valid & ~drop
    width = int(keep.sum(1).max()) if keep.numel() else 0
    src = torch.full((keep.shape[0], width), -1, dtype=torch.long)
    for b in range(keep.shape[0]):
        cols = keep[b].nonzero().flatten()
        src[b, width - cols.numel():] = cols
    return src


def text_spans(ids: torch.Tensor, vis: torch.Tensor, spec: PromptSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Host indices (among the sample's real tokens, ``ids`` their host token ids) of the text after
    the last visual token (``vis``: indices of the visual tokens, ascending), and of the question (the text after,
    less the prompt spec's (:class:`PromptSpec`) leading separators and trailing role tag)."""
    n = int(ids.numel())
    last_vis = int(vis[-1]) if vis.numel() else -1
    after = torch.arange(last_vis + 1, n)
    toks = ids[last_vis + 1:].tolist()
    i = 0
    while i < len(toks) and toks[i] in spec.sep_ids:
        i += 1
    j = len(toks)
    tail = list(spec.tail_ids)
    if tail and toks[-len(tail):] == tail:
        j = len(toks) - len(tail)
    return after, (after[i:j] if j > i else after)


def sample_key(keys: list | None, b: int, ids: torch.Tensor) -> int:
    """Row ``b``'s stable key (``VisionSignals.key``, what seeded methods draw from): the crc32 of the caller's key
    (``keys[b]``, e.g. a question id) where given, else of the row's real token ids ``ids``."""
    if keys is not None:
        return zlib.crc32(str(keys[b]).encode())
    return zlib.crc32(ids.cpu().numpy().astype("int64").tobytes())


@dataclass(frozen=True)
class RowMap:
    """Host: where a sample's real rows go when its placeholder runs are replaced by a selection's outputs
    (:func:`rebuilt_row`). Indices count the sample's real tokens (no padding): ``text_src`` the text tokens of the
    old row, in order, ``text_dst`` their indices in the new row, ``vis_dst`` each output's index in the new row,
    run by run; ``n`` the new row's real tokens."""

    n: int
    text_src: torch.Tensor
    text_dst: torch.Tensor
    vis_dst: torch.Tensor


def _run_starts(visual: torch.Tensor) -> torch.Tensor:
    """(nv,) bool: which visual tokens start a run (``visual``: host indices, ascending; consecutive indices form one
    run)."""
    starts = torch.ones(visual.numel(), dtype=torch.bool)
    starts[1:] = visual[1:] != visual[:-1] + 1
    return starts


def run_ids(visual: torch.Tensor) -> torch.Tensor:
    """Run index (0-based) of each visual token (``visual``: host indices, ascending)."""
    return _run_starts(visual).long().cumsum(0) - 1


def run_spans(visual: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each placeholder run of a row (``visual``: host indices of its visual tokens, ascending)."""
    n = int(visual.numel())
    if not n:
        return []
    first = _run_starts(visual).nonzero().flatten()
    return list(zip(visual[first].tolist(), torch.diff(first, append=torch.tensor([n])).tolist()))


def rebuilt_row(n_real: int, runs: list[tuple[int, int]], counts: list[int]) -> RowMap:
    """The :class:`RowMap` of a row of ``n_real`` real tokens whose placeholder ``runs`` ((start, length), in order)
    are each replaced by ``counts`` outputs: text tokens keep their order, each run's outputs take its place."""
    text_src, text_dst, vis_dst = [], [], []
    old = new = 0  # the next text token's index in the old and in the new row
    for (start, length), c in zip(runs, counts):
        text_src.append(torch.arange(old, start))
        text_dst.append(torch.arange(new, new + start - old))
        new += start - old
        vis_dst.append(torch.arange(new, new + c))
        new += c
        old = start + length
    text_src.append(torch.arange(old, n_real))
    text_dst.append(torch.arange(new, new + n_real - old))
    return RowMap(n=new + n_real - old, text_src=torch.cat(text_src), text_dst=torch.cat(text_dst),
                  vis_dst=torch.cat(vis_dst) if vis_dst else torch.zeros(0, dtype=torch.long))


@dataclass(frozen=True)
class Regather:
    """Host: the one gather that lays out every sample's rows after a stage (:func:`regather_plan`): ``src``
    (B * width,) each new row's source; ``take`` the old rows the source holds, in order (a compact source; None:
    every old row); and, from the rebuilt rows (``maps``) and ``width``, ``pad`` (B,) each sample's pad rows, ``ar``
    (B, width) each real row's index from the sample's first (pads 0), ``first`` (B,) the flat new row of each
    sample's first real row and ``vis_at`` the flat new rows of the outputs, sample by sample in output order
    (computed when read)."""

    src: torch.Tensor
    take: torch.Tensor | None
    maps: tuple
    width: int

    @cached_property
    def pad(self) -> torch.Tensor:
        return torch.tensor([self.width - r.n for r in self.maps], dtype=torch.long)

    @property
    def mask(self) -> torch.Tensor:
        """(B, width) the 2-D mask of the new rows: 1 at each sample's real rows (long)."""
        return (torch.arange(self.width) >= self.pad[:, None]).long()

    @property
    def ar(self) -> torch.Tensor:
        return (torch.arange(self.width) - self.pad[:, None]).clamp(min=0)

    @property
    def first(self) -> torch.Tensor:
        return torch.arange(len(self.maps)) * self.width + self.pad

    @property
    def vis_at(self) -> torch.Tensor:
        at = [b * self.width + self.width - r.n + r.vis_dst for b, r in enumerate(self.maps)]
        return torch.cat(at) if at else torch.zeros(0, dtype=torch.long)


def regather_plan(maps: list[RowMap], old: list[torch.Tensor], base: int, width: int, pad_src: int | None = None,
                  compact: bool = False, slots: list[int] | None = None) -> Regather:
    """The gather of the rows after a stage, each sample's rebuilt row (``maps``: its :class:`RowMap`) left-padded to
    ``width``, from one source: the old rows flattened (``old``: per sample the flat row of each of its real rows,
    in order), then from ``base`` on every sample's outputs, one sample after the other in output order; a pad
    row reads ``pad_src`` (None: the row after the outputs, e.g. a zero row). ``compact``: the source holds only the
    old rows read (``take``, in the order of the new rows), then the outputs, not every old row (the eager executor:
    the dropped rows are never copied). ``slots``: per sample the length of its outputs' slice of the source (None:
    its outputs; the captured executor's piecewise prefill: its padded count, its real outputs first). Both executors
    lay out their rows with it, after the vision stage and each llm stage."""
    take = [o[r.text_src] for r, o in zip(maps, old)]
    n_take = sum(int(t.numel()) for t in take)
    at_take, at = 0, (n_take if compact else base)
    slots = [int(r.vis_dst.numel()) for r in maps] if slots is None else slots
    end = at + sum(slots)
    src = torch.full((len(maps), width), end if pad_src is None else pad_src, dtype=torch.long)
    for b, (r, t, n_slot) in enumerate(zip(maps, take, slots)):
        pad, m, k = width - r.n, int(r.vis_dst.numel()), int(t.numel())
        src[b, pad + r.text_dst] = torch.arange(at_take, at_take + k) if compact else t
        src[b, pad + r.vis_dst] = torch.arange(at, at + m)
        at_take, at = at_take + k, at + n_slot
    return Regather(src.reshape(-1), torch.cat(take) if compact and take else None, tuple(maps), width)


def next_rows(layouts: list[RowLayout], maps: list[RowMap], old_width: int, width: int | None = None,
              pad_src: int | None = None, compact: bool = False,
              slots: list[int] | None = None) -> tuple[list[RowLayout], Regather]:
    """The rows after a stage, for both executors: each sample's row entering it (``layouts``, left-padded to
    ``old_width``) rebuilt by its :class:`RowMap` (``maps``) and left-padded to ``width`` (None: the longest, the
    eager executor; the captured one: its bucket). Returns each sample's new :class:`RowLayout` (text ids carried,
    visual rows -1) and the one gather that lays the rows out (:func:`regather_plan` from the old rows flattened,
    ``pad_src``, ``compact`` and ``slots`` as there)."""
    width = max(r.n for r in maps) if width is None else width
    old = [b * old_width + lay.real for b, lay in enumerate(layouts)]
    return ([rebuilt_layout(lay, r, width) for lay, r in zip(layouts, maps)],
            regather_plan(maps, old, len(maps) * old_width, width, pad_src, compact, slots))


def vision_rows(path: str, n_layers: int, layouts: list[RowLayout], maps: list[RowMap], old_width: int,
                width: int | None = None, pad_src: int | None = None, compact: bool = False,
                slots: list[int] | None = None) -> tuple["PrefillPlan", list[RowLayout], Regather]:
    """The rows after the vision stage, for both executors: :func:`next_rows` (each sample's new :class:`RowLayout`
    and the one gather; ``width``, ``pad_src``, ``compact`` and ``slots`` as there) and the :class:`PrefillPlan` that
    starts on them (``path``: "eager" or "fast"; per sample its stock visual tokens as candidates, one segment over
    the ``n_layers`` decoder layers until an llm stage advances it, :func:`stage_rows`)."""
    new, g = next_rows(layouts, maps, old_width, width, pad_src, compact, slots)
    plan = PrefillPlan.start(path, n_layers, [lay.tokens for lay in layouts], [r.n for r in maps],
                             [int(r.vis_dst.numel()) for r in maps], g.width)
    return plan, new, g


def stage_rows(plan: "PrefillPlan", layer: int, layouts: list[RowLayout], maps: list[RowMap], old_width: int,
               width: int | None = None, pad_src: int | None = None,
               compact: bool = False) -> tuple["PrefillPlan", list[RowLayout], Regather]:
    """The rows after an llm stage before decoder ``layer``, for both executors: :func:`next_rows` (each sample's new
    :class:`RowLayout` and the one gather; ``width``, ``pad_src`` and ``compact`` as there) and ``plan`` advanced by
    them (:meth:`PrefillPlan.advanced`: per sample its real rows and visual tokens, the new width)."""
    new, g = next_rows(layouts, maps, old_width, width, pad_src, compact)
    return plan.advanced(int(layer), [r.n for r in maps], [int(r.vis_dst.numel()) for r in maps], g.width), new, g


def rebuilt_layout(lay: RowLayout, r: RowMap, width: int) -> RowLayout:
    """The :class:`RowLayout` of the row ``lay`` rebuilt by ``r`` and left-padded to ``width`` (text ids carried,
    visual rows -1)."""
    ids = torch.full((r.n,), -1, dtype=lay.ids.dtype)
    ids[r.text_dst] = lay.ids[r.text_src]
    return RowLayout(real=torch.arange(width - r.n, width), visual=r.vis_dst, ids=ids)


@dataclass(frozen=True)
class Segment:
    """Decoder layers ``layers`` run on one layout of the rows: per sample its real ``rows`` and the ``visual``
    tokens among them, left-padded to ``width`` (the eager executor: the longest row, or the caller's padded
    length; the captured one: its length bucket)."""

    layers: range
    rows: tuple[int, ...]
    visual: tuple[int, ...]
    width: int

    def __str__(self) -> str:
        a, z = self.layers.start, self.layers.stop - 1
        span = f"layer {a}" if a == z else f"layers {a}-{z}"
        return f"{span}: rows {self.rows} -> {self.width}, visual {self.visual}"


@dataclass(frozen=True)
class PrefillPlan:
    """What one prefill runs: its ``path`` ("eager" or "fast", the captured executor), per sample the stock visual
    tokens (``candidates``) and the decoder's :class:`Segment` s, one per layout of the rows (an llm stage starts a
    new one). ``str`` prints a line per segment."""

    path: str
    candidates: tuple[int, ...]
    segments: tuple[Segment, ...]

    @classmethod
    def start(cls, path: str, n_layers: int, candidates, rows, visual, width: int) -> "PrefillPlan":
        """The plan of rows entering decoder layer 0 (per sample ``rows`` real, ``visual`` of them visual, padded to
        ``width``), one segment over all ``n_layers`` layers until :meth:`advanced`."""
        seg = Segment(layers=range(0, n_layers), rows=tuple(rows), visual=tuple(visual), width=int(width))
        return cls(path=path, candidates=tuple(candidates), segments=(seg,))

    def advanced(self, layer: int, rows, visual, width: int) -> "PrefillPlan":
        """The plan after an llm stage before decoder ``layer``: the last segment ends there and the stage's rows
        (per sample ``rows`` real, ``visual`` of them visual, padded to ``width``) run the layers after it."""
        last = self.segments[-1]
        if not last.layers.start < layer < last.layers.stop:
            raise ValueError(f"an llm stage before layer {layer} does not split the segment {last}")
        head = replace(last, layers=range(last.layers.start, layer))
        tail = Segment(layers=range(layer, last.layers.stop), rows=tuple(rows), visual=tuple(visual), width=int(width))
        return replace(self, segments=(*self.segments[:-1], head, tail))

    def key(self) -> tuple[Segment, ...]:
        """The segments without their rows (``rows=()``): what is static about the plan, the part of the captured
        functions' key that is the plan (layers, visual tokens, padded widths). The rows depend on the prompt's
        length; the captured executor hands them to its functions as tensors."""
        return tuple(replace(s, rows=()) for s in self.segments)

    def visual_per_layer(self, b: int) -> list[int]:
        """Sample ``b``'s visual tokens entering each decoder layer."""
        return [s.visual[b] for s in self.segments for _ in s.layers]

    def width_per_layer(self) -> list[int]:
        """The padded length each decoder layer runs on (= its KV length)."""
        return [s.width for s in self.segments for _ in s.layers]

    def __str__(self) -> str:
        head = f"PrefillPlan({self.path}, B={len(self.candidates)}): candidates {self.candidates}"
        return "\n".join([head] + [f"  {s}" for s in self.segments])
