"""What the engine asks a model family. One subclass per family, one file each; the family's record
(:mod:`llava.families.registry`) names it.

The engine core (``llava/engine.py``) knows no family. Both executors ask the adapter's one visual interface:

* **layout** (host only, from the processor's metadata: pixel shapes, image sizes, grids): per placeholder token id,
  the host layout of its tokens in the LLM input (:class:`VisualLayout`, :class:`VisualUnits`), for every input the
  eager executor takes (several images per prompt, images and videos in one batch);
* **encode** (the eager executor, dynamic shapes): run the vision tower once per layout and return its per-token
  table (the features as the stock model computes them, the signals methods read); the core gathers the table into
  the LLM's order (:func:`llava.candidates.gather_tokens`, newline rows included);
* **visual_layout** (the captured executor): the same layout where it has one image or one video per prompt, with
  the static plan of the tower's run, and **encode_static**, the tower run with the static shapes that plan fixes,
  and its per-token table (``static_table``; ``static_cls`` a unit's [CLS] rows);
  ``tower_for`` / ``newline`` / ``signal_widths`` / ``rope_positions`` serve both;
* **project** vision-space merges (the same projector the stock model uses);
* give the **positions** of the prompt (1-D RoPE ids, or 3 rows of M-RoPE ids) before pruning, say
  whether kept tokens keep them (``keeps_positions``) or are renumbered contiguously (LLaVA's
  pre-LLM convention), and map ``generate``'s decode positions into the LLM's space;
* name the keyword arguments that carry visual inputs (``visual_keys``), which never reach the
  language model;

Splicing, selection, merging, re-padding, the staged decoder, decode masks, stats and timing stay
in the core.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from ..needs import TowerCall


def to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Move host index tensors to ``device`` in one copy (no host synchronisation)."""
    device = torch.device(device)
    if device.type == "cpu" or not tensors:
        return list(tensors)
    flat = torch.cat([t.reshape(-1).long() for t in tensors]).to(device, non_blocking=True)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].view(t.shape).to(t.dtype))
        i += t.numel()
    return out


def param_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of ``module``'s weights (a tower kept in fp32 under a half-precision LLM casts its
    features to the projector's dtype)."""
    return next(module.parameters()).dtype


@dataclass
class TokenTable:
    """A tower's per-token table (:meth:`FamilyAdapter.encode`, :meth:`FamilyAdapter.static_table`), and a sample's
    candidates gathered from it (:func:`llava.candidates.gather_tokens`): rows in the order ``VisualUnits.src``
    indexes. ``features`` (N, D) exactly what the stock model splices; ``vision_features`` (N, Dv), the space
    ``project`` maps to ``features`` (vision-space merges); optionally ``cls_attn`` (N, H) saliency per head (heads
    last) and ``keys`` (N, d); ``in_tower_kept`` (N,) an in-tower stage's survivors; ``deepstack`` (N, L, D) the rows
    the text model adds at the token's position after decoder layers 0..L-1 (Qwen3-VL); ``tower`` the tower signals
    a method declares, by their flat names (:attr:`llava.needs.TowerRead.names`; the per-head ones heads last); and,
    on a tower's table where its layout drops the [CLS] from the LLM input (``VisualLayout.drop_cls``), ``cls``: each
    unit's [CLS] rows as a table of their own, offered as extra candidates (:func:`llava.candidates.with_cls`)."""

    features: torch.Tensor
    vision_features: torch.Tensor
    cls_attn: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    in_tower_kept: torch.Tensor | None = None
    deepstack: torch.Tensor | None = None
    tower: dict = field(default_factory=dict)
    cls: TokenTable | None = None

    #: the per-row tensors besides ``tower`` (``cls`` is a table of other rows)
    ROWS = ("features", "vision_features", "cls_attn", "keys", "in_tower_kept", "deepstack")

    @classmethod
    def of(cls, entries: dict) -> TokenTable:
        """A table from per-row tensors by name (``features``, ``vision_features``, ``cls_attn``, ``keys``,
        ``in_tower_kept``, ``deepstack``; any other name is a tower signal's flat name)."""
        return cls(**{k: v for k, v in entries.items() if k in cls.ROWS},
                   tower={k: v for k, v in entries.items() if k not in cls.ROWS})

    def get(self, name: str) -> torch.Tensor | None:
        """The per-row tensor ``name`` (a field, or a tower signal's flat name), None where absent."""
        return getattr(self, name) if name in self.ROWS else self.tower.get(name)

    def map(self, fn) -> TokenTable:
        """``fn(name, tensor)`` of every per-row tensor present (the tower signals by their flat names); ``cls``
        dropped."""
        return TokenTable(**{k: fn(k, getattr(self, k)) for k in self.ROWS if getattr(self, k) is not None},
                          tower={k: fn(k, v) for k, v in self.tower.items()})

    def rows(self, index: torch.Tensor) -> TokenTable:
        """The rows ``index`` of every per-row tensor (``cls`` dropped)."""
        return self.map(lambda _, v: v[index])

    def without_cls(self) -> TokenTable:
        return replace(self, cls=None)

    @staticmethod
    def cat(tables: list[TokenTable]) -> TokenTable:
        """The rows of ``tables`` one after the other (``cls`` dropped); every table must hold the same entries."""
        first = tables[0]
        keys = [k for k in first.ROWS if getattr(first, k) is not None]
        for t in tables[1:]:
            if [k for k in t.ROWS if getattr(t, k) is not None] != keys or list(t.tower) != list(first.tower):
                raise ValueError("the tower tables of one prefill hold different entries")
        return TokenTable(**{k: torch.cat([getattr(t, k) for t in tables]) for k in keys},
                          tower={k: torch.cat([t.tower[k] for t in tables]) for k in first.tower})

    def entries(self) -> dict:
        """Every per-row tensor present by name, the tower signals by their flat names (a read-only view, e.g. for
        tests and reports)."""
        return {**{k: getattr(self, k) for k in self.ROWS if getattr(self, k) is not None}, **self.tower}


class VisualUnits(NamedTuple):
    """The host layout of one placeholder kind's visual tokens, as the LLM input lays them out (every image / video
    of the call, in prompt order), for both executors: each prompt's part read by
    :func:`sample_units`.

    src (T,): each token's row in the tower's per-token table (-1: a newline token, :func:`llava.candidates.gather_tokens`); unit
    (T,): its unit over the call (-1: newline); patch (T,): its index in its unit's patch grid (-1: [CLS] /
    newline); unit_pos (U, 2): each unit's place in its image's crop grid ((-1, -1): none); grid: per unit the
    (rows, cols) of its patch grid; sizes: tokens per image / video (one placeholder run each); counts: units per
    image / video; rows: the table rows the call's tower gives."""

    src: torch.Tensor
    unit: torch.Tensor
    patch: torch.Tensor
    unit_pos: torch.Tensor
    grid: tuple
    sizes: tuple
    counts: tuple
    rows: int


def join_units(items: list[VisualUnits]) -> VisualUnits:
    """One :class:`VisualUnits` of several, in order: each one's table rows and units after the ones before."""
    src, unit, r0, u0 = [], [], 0, 0
    for it in items:
        src.append(torch.where(it.src >= 0, it.src + r0, -1))
        unit.append(torch.where(it.unit >= 0, it.unit + u0, -1))
        r0 += it.rows
        u0 += len(it.grid)
    return VisualUnits(torch.cat(src), torch.cat(unit), torch.cat([it.patch for it in items]),
                       torch.cat([it.unit_pos for it in items]), sum((it.grid for it in items), ()),
                       sum((it.sizes for it in items), ()), sum((it.counts for it in items), ()), r0)


def uniform_units(items: int, per_item: int, tokens: int, patch: torch.Tensor, grid: tuple) -> VisualUnits:
    """``items`` images / videos of ``per_item`` units each, every unit ``tokens`` table rows in order (its
    ``patch`` indices, its ``grid``), no newline: LLaVA-1.5's images, Video-LLaVA's images and videos, InternVL's
    tiles."""
    n = items * per_item
    return VisualUnits(torch.arange(n * tokens), torch.arange(n).repeat_interleave(tokens), patch.repeat(n),
                       torch.full((n, 2), -1, dtype=torch.long), (tuple(grid),) * n, (per_item * tokens,) * items,
                       (per_item,) * items, n * tokens)


def packed_units(unit: torch.Tensor, patch: torch.Tensor, grid, sizes, counts,
                 unit_pos: torch.Tensor | None = None) -> VisualUnits:
    """The layout of a call whose tower gives its table in the LLM's order already (row i: token i; a newline's row
    is replaced by the family's newline embedding): Qwen's merged tokens, OneVision's packed images and videos.
    ``unit_pos``: None for units outside any crop grid."""
    if unit_pos is None:
        unit_pos = torch.full((len(grid), 2), -1, dtype=torch.long)
    return VisualUnits(torch.where(unit >= 0, torch.arange(unit.numel()), -1), unit, patch, unit_pos,
                       tuple(tuple(int(v) for v in g) for g in grid), tuple(int(n) for n in sizes),
                       tuple(int(k) for k in counts), int(unit.numel()))


def renumber_units(gunit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global unit ids (host, -1 = newline) -> per-sample ids 0..U-1 in order of first appearance, and
    the global id of each local unit."""
    ok = gunit >= 0
    present = gunit[ok]
    if not present.numel():
        return torch.full_like(gunit, -1), present
    if bool((present[1:] >= present[:-1]).all()):  # ascending (most layouts): first appearance is sorted order
        uniq, inv = torch.unique_consecutive(present, return_inverse=True)
        local = torch.full_like(gunit, -1)
        local[ok] = inv
        return local, uniq
    uniq, inv = torch.unique(present, return_inverse=True)
    first = torch.full((uniq.numel(),), present.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inv, torch.arange(present.numel()), "amin")
    order = first.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    local = torch.full_like(gunit, -1)
    local[ok] = rank[inv]
    return local, uniq[order]


class VisualSample(NamedTuple):
    """One prompt's visual candidates on the host (:func:`sample_units`), for both executors: each visual token's
    ``src`` (its row in the tower's table, -1 a newline); per candidate (the tokens, then each extra [CLS] candidate)
    its ``unit`` (numbered 0..U-1 within the prompt in order of first appearance, -1 newline) and ``patch`` (-1 a
    [CLS] / newline); per unit its row among the call's units (``units``), ``unit_pos`` and ``grid``; ``cls`` (E,)
    the [CLS] table rows of the extra candidates."""

    src: torch.Tensor
    unit: torch.Tensor
    patch: torch.Tensor
    units: torch.Tensor
    unit_pos: torch.Tensor
    grid: tuple
    cls: torch.Tensor


def sample_units(u: VisualUnits, at: torch.Tensor, cls_rows: torch.Tensor | None = None) -> VisualSample:
    """The layout of one prompt's visual tokens, ``at`` (host) their indices in ``u``'s token order
    (:func:`visual_ids`), for both executors. ``cls_rows``: per unit of ``u`` its [CLS] row (-1: none,
    :func:`cls_rows`) when each unit's [CLS] is an extra candidate: the prompt's units that have one, in order."""
    unit, units = renumber_units(u.unit[at])
    patch, cls = u.patch[at], torch.zeros(0, dtype=torch.long)
    if cls_rows is not None:  # each unit's [CLS] as candidate T + i (unit i, patch -1)
        rows = cls_rows[units]
        has = rows >= 0
        cls, extra = rows[has], torch.arange(units.numel())[has]
        unit, patch = torch.cat([unit, extra]), torch.cat([patch, torch.full((extra.numel(),), -1, dtype=torch.long)])
    return VisualSample(u.src[at], unit, patch, units, u.unit_pos[units], tuple(u.grid[g] for g in units.tolist()),
                        cls)


class VisualLayout(NamedTuple):
    """The host layout of the visual tokens of one placeholder kind (image or video token id) for the whole batch
    (:meth:`FamilyAdapter.layout`), for both executors: laid out as the stock model splices them, every image / video
    of the call in prompt order.

    key: the visual keyword the tower reads (``pixel_values`` / ``pixel_values_videos``); token_id: its
    placeholder id; kind: the unit kind ("image" / "crop" / "frame"); drop_cls: the tower's [CLS] row is
    not fed to the LLM (offered as an extra candidate); units: the tokens' host layout (:class:`VisualUnits`). The
    captured executor's layout (:meth:`FamilyAdapter.visual_layout`) has one image / video per prompt. Each
    prompt's tokens: :func:`visual_ids`, :func:`sample_units`. ``tower`` / ``tower_tensors`` / ``meta``: see the
    fields."""

    key: str
    token_id: int
    kind: str
    drop_cls: bool
    units: VisualUnits
    #: the static plan of the tower's run in the captured prefill (:meth:`FamilyAdapter.encode_static`; hashable: part
    #: of the graph key) and its host tensors (name -> tensor: indices, weights, the crops the tower runs)
    tower: object = None
    tower_tensors: dict | None = None
    #: host metadata the family's positions are planned from (:meth:`FamilyAdapter.rope_positions`)
    meta: dict | None = None
    #: after a pre-tower stage (:func:`kept_layout`): the kept tokens among the stock layout's (host, ascending), whose
    #: patches alone the tower runs; ``units`` then lays out these tokens only. None: every token
    kept: torch.Tensor | None = None


def kept_layout(lay: VisualLayout, kept: torch.Tensor) -> VisualLayout:
    """The layout of the tokens ``kept`` (host, ascending indices among ``lay``'s tokens) of a packed layout (the
    tower's table in the LLM's order: Qwen's), after a pre-tower stage: their table rows renumbered 0..K-1 (the tower
    gives those rows only), each keeping its unit, patch and grid; per image its kept count."""
    u = lay.units
    if not torch.equal(u.src, torch.arange(u.src.numel())):
        raise ValueError(f"a pre-tower stage needs a packed layout (the tower's rows in the LLM's order), not {lay.kind}")
    image = torch.repeat_interleave(torch.arange(len(u.sizes)), torch.tensor(u.sizes, dtype=torch.long))
    sizes = torch.bincount(image[kept], minlength=len(u.sizes))
    if lay.kept is not None:
        raise ValueError("this layout was pruned before its tower ran already")
    units = VisualUnits(torch.arange(kept.numel()), u.unit[kept], u.patch[kept], u.unit_pos, u.grid,
                        tuple(int(v) for v in sizes), u.counts, int(kept.numel()))
    return lay._replace(units=units, kept=kept)


def visual_ids(ids: torch.Tensor, kinds: list[VisualLayout], name) -> torch.Tensor:
    """(B, L) host: per position of the host ids ``ids`` the call-wide index of the visual token there (-1 elsewhere):
    the tokens of each of ``kinds`` in turn (:meth:`FamilyAdapter.layout`), each kind's in the order of its
    placeholders in the rows. Raises ValueError where a kind's placeholders are not its tokens (``name``: the
    placeholder's name per token id) or an image / video's tokens fall in several rows."""
    out = torch.full(ids.shape, -1, dtype=torch.long)
    offset = 0
    for k in kinds:
        where = ids == k.token_id
        n_slots, n_feat = int(where.sum()), int(k.units.src.numel())
        if n_slots != n_feat:
            kname = name(k.token_id)
            raise ValueError(
                f"the prompt has {n_slots} {kname} placeholder tokens but the {len(k.units.sizes)} {kname}(s) give "
                f"{n_feat} visual tokens: each {kname} needs exactly one <{kname}> in the prompt, expanded "
                f"by the processor for this model (use llava.preprocess / the model's processor)")
        rows = where.nonzero()[:, 0]
        start = 0
        for i, size in enumerate(k.units.sizes):  # every image / video must land inside one sample
            r = rows[start:start + size]
            start += size
            if r.numel() and r.min() != r.max():
                raise ValueError(f"{k.kind} {i} is split across batch rows: placeholder counts per prompt do not "
                                 "match the images")
        out[where] = torch.arange(n_feat) + offset
        offset += n_feat
    return out


def cls_rows(kinds: list[VisualLayout]) -> torch.Tensor:
    """Per unit of ``kinds`` (in order) its row among the [CLS] rows :meth:`FamilyAdapter.encode` gives (``cls``: the
    units of the kinds whose [CLS] is not fed to the LLM, ``drop_cls``), -1 for a unit without."""
    rows, n = [], 0
    for k in kinds:
        u = len(k.units.grid)
        rows.append(torch.arange(n, n + u) if k.drop_cls else torch.full((u,), -1, dtype=torch.long))
        n += u if k.drop_cls else 0
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)


class FamilyAdapter:
    #: the family key methods see in ``Method.setup(family=...)``: the registry record's id, set by
    #: :func:`llava.families.adapter_for` (one adapter class may serve several records)
    family: str = ""
    #: keyword arguments of the model's forward that carry visual inputs (popped before the LLM)
    visual_keys: tuple[str, ...] = ("pixel_values", "pixel_values_videos", "image_sizes")
    #: the keys among them whose presence makes a call a visual prefill
    pixel_keys: tuple[str, ...] = ("pixel_values", "pixel_values_videos")
    #: True: kept tokens keep their original positions at the vision stage (M-RoPE); False: the
    #: rebuilt rows are renumbered contiguously (LLaVA's pre-LLM convention)
    keeps_positions: bool = False
    #: DeepStack levels (Qwen3-VL): per visual token, rows added after decoder layers 0..levels-1; 0: none
    deepstack_levels: int = 0
    #: decoder layers with no attention to read (hybrid models: Qwen3.5's Gated DeltaNet layers); empty: none
    linear_layers: frozenset = frozenset()
    #: the per-channel (mean, std) the processor normalised the pixels with, undone for a pre-tower stage's
    #: :class:`llava.tower_signals.PixelSignals` (in [0, 1]); None: the family takes no pre-tower stage
    pixel_norm: tuple | None = None
    #: the tower's attention signals can be computed in the official code's arithmetic
    #: (``Method.vision_attention_logits="model"``: the CLIP towers, :func:`llava.families.clip.clip_probs`)
    tower_logits: bool = False

    def __init__(self, model: torch.nn.Module, next_layout: str | None = None, **options):
        # next_layout is LLaVA-NeXT's packing option; other families have one packing and ignore it
        if options:
            raise TypeError(f"{type(self).__name__}: unknown options {sorted(options)}")
        self.model = model
        self.config = model.config
        self.core = model.model
        self.lm = self.core.language_model

    # ---------------------------------------------------------------- vision side
    @property
    def tower(self) -> torch.nn.Module:
        return self.core.vision_tower

    @property
    def num_vision_layers(self) -> int:
        return len(self.tower.encoder.layers)

    def layout(self, visual: dict) -> list[VisualLayout]:
        """The host layout of a prefill's visual inputs, one :class:`VisualLayout` per placeholder kind present (in
        the order :meth:`encode` runs them), from host metadata only (pixel shapes, image sizes, grids): every input
        the eager executor takes. Raises ValueError for inputs the family does not take."""
        raise NotImplementedError

    def encode(self, visual: dict, layouts: list[VisualLayout], call: TowerCall) -> list[TokenTable]:
        """The eager executor's tower runs over the visual inputs of a prefill laid out by :meth:`layout`, computing
        what the method asks (``call``, :class:`llava.needs.TowerCall`; its ``reads`` as tower signals under their
        :attr:`~llava.needs.TowerRead.names`). Per layout its :class:`TokenTable`, per tower token in the order
        ``units.src`` indexes (:func:`llava.candidates.gather_tokens`), with ``cls`` (each unit's [CLS] rows offered
        as extra candidates, :func:`llava.families.clip.clip_cls`, :func:`cls_rows`) exactly where the layout's
        ``drop_cls``."""
        raise NotImplementedError

    def pixel_units(self, visual: dict, lay: VisualLayout) -> list | None:
        """A pre-tower stage's view of the layout ``lay``'s inputs (families whose record has ``pre_tower``): per image
        its :class:`llava.tower_signals.PixelSignals` (its tokens' pixels in [0, 1], the grid), in the order of ``lay``'s
        units; None for a kind the stage does not prune (videos). :meth:`encode` then takes the layout of the kept
        tokens (:func:`kept_layout`) and runs their patches only."""
        raise NotImplementedError(f"{self.family} takes no pre-tower stage")

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        """(n, Dv) vision-space rows -> (n, D) LLM inputs, with the stock projector."""
        proj = self.core.multi_modal_projector
        return proj(vision_features.to(param_dtype(proj))[None])[0]

    def grid(self) -> tuple[int, int]:
        vc = self.config.vision_config
        g = vc.image_size // vc.patch_size
        return (g, g)

    def tower_for(self, key: str) -> torch.nn.Module:
        """The tower that encodes the inputs of the visual keyword ``key`` (``pixel_values`` /
        ``pixel_values_videos``)."""
        return self.tower

    def newline(self) -> torch.Tensor | None:
        """The embedding fed for a newline token (LLaVA-NeXT's unpadded rows, OneVision's), None where the family's
        layout has none."""
        return None

    def placeholder_name(self, token_id: int) -> str:
        return "video" if token_id == getattr(self.config, "video_token_id", None) else "image"

    # ---------------------------------------------------------------- the captured executor's half (llava.fast)
    def visual_layout(self, visual: dict, batch: int, input_ids: torch.Tensor | None = None) -> VisualLayout:
        """The captured executor's host plan of this prefill's visual inputs (no device work; reads only host
        metadata such as image sizes): :meth:`layout` where it is one image or one video per prompt, with the static
        plan of the tower's run (``tower``, ``tower_tensors``). ``input_ids``: the host ids (B, L) of the prompt,
        padding -1, for a family whose visual metadata does not say which inputs belong to which prompt (InternVL's
        tiles). Raises ValueError with the reason when the fast path cannot take them."""
        raise ValueError(f"the fast path plans no {self.family} inputs")

    def encode_static(self, pixels: torch.Tensor, tower, tensors: dict, call: TowerCall) -> dict:
        """Inside the captured prefill (the tower's function of its own), for a :class:`VisualLayout`'s ``tower``
        plan: run the tower with static shapes (no host read; ``tensors`` = its ``tower_tensors`` on the device) and
        return its outputs by name, tensors only (:meth:`static_table` lays them out per token). The default
        layout: per visual token, in the order ``src`` indexes, ``features`` (N, D) as the stock model splices them,
        ``vision_features`` (N, Dv), with ``call.attention`` ``cls_attn`` (N, H) / ``keys`` (N, d) (the signals
        :meth:`encode` gives for the same ``call.layer``), and ``deepstack`` where the family has DeepStack rows."""
        raise NotImplementedError(f"the fast path encodes no {self.family} tower")

    def static_table(self, out: dict, tower) -> TokenTable:
        """The per-token table (:meth:`encode`'s, without ``cls``) of :meth:`encode_static`'s outputs ``out`` (the
        tower function's outputs by name, read by this adapter only), inside the prefill's function: by default the
        entries it gave per token."""
        return TokenTable.of({k: out[k] for k in ("features", "vision_features", "cls_attn", "keys", "deepstack")
                              if k in out})

    def static_cls(self, out: dict, tower, units: torch.Tensor) -> TokenTable:
        """The [CLS] rows of the units ``units`` (device index) as extra candidates, one entry per
        :meth:`static_table` entry, where the plan drops the [CLS] from the LLM input (``VisualLayout.drop_cls``)."""
        raise NotImplementedError(f"{self.family} offers no [CLS] candidates")

    def signal_widths(self) -> tuple[int, int, int]:
        """The tower signals' widths, for dry runs of a selection on ``meta`` tensors (the fast path's counts):
        (heads of ``cls_attn``, width of ``keys``, width of ``vision_features``)."""
        vc = self.config.vision_config
        return vc.num_attention_heads, vc.hidden_size // vc.num_attention_heads, vc.hidden_size

    # ---------------------------------------------------------------- positions
    def rope_positions(self, input_ids, attention_mask, visual: dict):
        """For a family whose kept tokens keep their positions (``keeps_positions``: M-RoPE), the unpruned prompt's
        positions (rows, B, L) and the model's position deltas, from the ids, the 2-D mask and the visual inputs'
        metadata (grids); both executors ask it. None for the others: they renumber contiguously (1-D ids)."""
        return None

    def keep_rope_deltas(self, deltas) -> None:
        """Where the eager executor computed the prompt's M-RoPE positions itself (the caller gave none): hand their
        deltas to the model, as its own forward would (transformers reads them at later calls). Nothing elsewhere."""

    def caller_positions(self, position_ids):
        """A caller's position ids of the unpruned prompt in the language model's format (raises on a format the
        family does not take); :func:`llava.positions.prompt_positions` asks it for both executors."""
        return position_ids

    def decode_positions(self, position_ids):
        """generate()'s position ids of a decode step, in the language model's format."""
        return position_ids

    @staticmethod
    def mask_positions(pos):
        """The 1-D ids ``create_causal_mask`` sees (the text row of M-RoPE ids)."""
        return pos
