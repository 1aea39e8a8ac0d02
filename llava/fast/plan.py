"""The fast path's host plan (:class:`HostPlanner`, one per :class:`llava.fast.path.FastPath`): everything about one
prefill that depends on the prompt, decided on the host from the host copy of the ids - first what the tower's run needs
(:meth:`HostPlanner.plan_tower`: the family's visual layout; the fast path starts the tower on the device with
it), then, while the device runs the tower, each row's placeholder run, the unit layouts, the method's host draws,
the selection's output counts (dry runs on ``meta`` tensors), the length bucket, the new rows' gather, positions
and pad rows (the 4-D mask is built from them on the device) - handed to the captured function as one index
buffer plus a few tensors. ``_Spec`` / ``_Sample`` hold what is static (with the plan's segments,
:meth:`llava.plan.PrefillPlan.key`): they are the graph key. See
:mod:`llava.fast.path` for the whole path."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import replace as _replace

import torch

from . import refusals
from .inputs import PrefillInputs
from .llm import count_stages, plan_stages, text_count
from .probe import plan_probe
from .refusals import NotPlanned
from ..candidates import candidate_shapes, vision_signals
from ..families.base import TokenTable, VisualSample, cls_rows, sample_units
from ..ops import UnitLayout, unit_layout
from ..stage_step import ask_vision
from ..prefill import EngineEnv
from ..plan import rebuilt_row, row_layouts, sample_key, text_spans, vision_rows
from ..positions import contiguous, first_positions, prompt_positions, renumbered

#: prefill lengths the captured functions are compiled for (a longer prompt rounds up to 256)
BUCKETS = (32, 64, 96, 128, 192, 256, 384, 512, 640, 768, 1024, 1536, 2048, 3072, 4096)
#: lengths the text after the image is padded to for query-aware methods (``VisionSignals.text_mask``)
TEXT_BUCKETS = (16, 32, 64, 128, 256, 512)
#: decode slots of the static cache are allocated in steps of this many tokens
DECODE_STEP = 64


def bucket_for(n: int, buckets=BUCKETS) -> int:
    """The smallest bucket >= n (beyond the largest, n rounded up to a multiple of 256)."""
    for b in buckets:
        if b >= n:
            return b
    return -(-n // 256) * 256


@dataclass(frozen=True)
class Span:
    """Where one of a sample's tensors lies in the index buffer."""

    offset: int
    length: int

    def of(self, index: torch.Tensor) -> torch.Tensor:
        return index[self.offset:self.offset + self.length]

    def moved(self, delta: int) -> "Span":
        return Span(self.offset + delta, self.length)


@dataclass(frozen=True)
class SampleParts:
    """A sample's tensors in the index buffer, in the buffer's order: ``src`` its candidates' rows in the tower's
    table, ``unit`` / ``patch`` / ``unit_pos`` / ``units`` its units (:class:`llava.families.base.VisualSample`),
    ``plan`` the method's host draws by the method's own names (:meth:`Method.plan_vision`), and for a query-aware
    method its padded text block (``text_rows``: their places in the new rows, ``text_mask``, ``question_mask``)."""

    src: Span
    unit: Span
    patch: Span
    unit_pos: Span
    units: Span
    plan: tuple = ()  # ((name, Span), ...)
    text_rows: Span | None = None
    text_mask: Span | None = None
    question_mask: Span | None = None

    def moved(self, delta: int) -> "SampleParts":
        """Every offset moved by ``delta``."""
        def mv(sp):
            return sp.moved(delta) if sp is not None else None
        return SampleParts(*(mv(getattr(self, f)) for f in ("src", "unit", "patch", "unit_pos", "units")),
                           plan=tuple((n, sp.moved(delta)) for n, sp in self.plan), text_rows=mv(self.text_rows),
                           text_mask=mv(self.text_mask), question_mask=mv(self.question_mask))


@dataclass(frozen=True)
class LayoutParts:
    """One of a sample's host :class:`llava.ops.UnitLayout` s in the index buffer: its ``key`` ((patch, stock, pos),
    as :meth:`llava.signals.VisionSignals.layout` asks for it), where each of its index tensors lies (``newlines``,
    then per unit its ``tokens``, ``cls`` and ``patches``, in the buffer's order) and its ``static`` fields (the
    per-unit counts, ``unit_pos``, ``grid``)."""

    key: tuple
    newlines: Span
    tokens: tuple
    cls: tuple
    patches: tuple
    static: tuple

    @classmethod
    def put(cls, key: tuple, lay: UnitLayout, put) -> "LayoutParts":
        """``lay``'s parts, each index tensor handed to ``put`` (which appends it to the buffer and returns its
        :class:`Span`) in the buffer's order."""
        newlines = put(lay.newlines)
        per = [(put(lay.tokens[u]), put(lay.cls[u]), put(lay.patches[u])) for u in range(lay.num_units)]
        static = (tuple(lay.num_stock), tuple(lay.num_cls_stock), tuple(lay.num_patch_stock), lay.num_newline_stock,
                  tuple(map(tuple, lay.unit_pos)) if lay.unit_pos is not None else None, lay.grid)
        return cls(key, newlines, *(tuple(p[i] for p in per) for i in range(3)), static)

    def of(self, index: torch.Tensor) -> UnitLayout:
        """The layout with its index tensors read from ``index``."""
        num_stock, num_cls, num_patch, num_nl, unit_pos, grid = self.static
        return UnitLayout(tokens=[sp.of(index) for sp in self.tokens], cls=[sp.of(index) for sp in self.cls],
                          patches=[sp.of(index) for sp in self.patches], newlines=self.newlines.of(index),
                          num_stock=list(num_stock), num_cls_stock=list(num_cls), num_patch_stock=list(num_patch),
                          num_newline_stock=num_nl, unit_pos=list(unit_pos) if unit_pos is not None else None,
                          grid=grid)

    def moved(self, delta: int) -> "LayoutParts":
        return LayoutParts(self.key, self.newlines.moved(delta), *(tuple(sp.moved(delta) for sp in sps)
                                                                   for sps in (self.tokens, self.cls, self.patches)),
                           self.static)

    @property
    def end(self) -> int:
        """The offset after its last tensor."""
        last = self.patches[-1] if self.patches else self.newlines
        return last.offset + last.length


@dataclass(frozen=True)
class _Sample:
    """Everything static about one sample of a captured prefill."""

    tokens: int  # stock visual tokens (T)
    units: int  # units (U)
    extra: int  # extra [CLS] candidates (0 or U)
    outputs: int  # selection outputs (m)
    grid: tuple  # per unit (rows, cols)
    text: int  # rows of the padded text block (query-aware methods; 0: none)
    layouts: tuple  # LayoutParts per layout key
    parts: SampleParts  # where the sample's other tensors lie in the index buffer
    static: tuple = ()  # the method's plan_static values (Python, hashable)


@dataclass(frozen=True)
class _Spec:
    """Everything static about one captured prefill (Python values: its graph key)."""

    batch: int
    key: str  # the visual input the tower reads
    kind: str  # unit kind
    newlines: bool  # some token is a newline (LLaVA-NeXT spatial_unpad)
    samples: tuple  # _Sample per prompt
    bucket: int
    cache_len: int
    index_len: int
    segments: tuple = ()  # the PrefillPlan's segments without their rows (PrefillPlan.key): layers, visual, bucket
    texts: tuple = ()  # per llm stage: the text-after block it reads (llava.fast.llm.plan_stages; llm_text_rows)
    tower: object = None  # the family's static plan of the tower's run (VisualLayout.tower)
    mrope: int = 0  # rows of the positions when kept tokens keep theirs (M-RoPE: 3); 0: contiguous 1-D
    deepstack: int = 0  # DeepStack levels (Qwen3-VL): rows added at the visual rows after decoder layers 0..n-1
    probe: object = None  # llava.fast.probe.ProbeSpec: the vision stage reads the LLM's attention (unpruned prompt)


def _shift(s: _Sample, delta: int) -> _Sample:
    """``s`` with its index-buffer offsets moved by ``delta`` (a sample's slice on its own)."""
    return _replace(s, parts=s.parts.moved(delta), layouts=tuple(lp.moved(delta) for lp in s.layouts))


@dataclass(frozen=True)
class _TowerSpec:
    """Everything static about the tower's run of one prefill (the tower function's graph key; the fields
    :class:`_Spec` has of the same names)."""

    key: str
    tower: object = None


@dataclass
class _TowerPlan:
    """What the tower's run needs, planned first (:meth:`HostPlanner.plan_tower`): the host ids and mask,
    the family's visual layout and the tower function's key."""

    ids: torch.Tensor  # (B, L) host ids
    valid: torch.Tensor  # (B, L) host bool: real rows
    fv: object  # llava.families.base.VisualLayout
    spec: _TowerSpec
    position_ids: torch.Tensor | None = None  # host copy of the caller's position ids (None: not given)
    stock_default: bool = False  # the caller gave none and the stock default (an arange over the padded row) is theirs
    sample_keys: list | None = None  # per row the caller's key of its sample (engine.sample_keys), None: a hash


@dataclass
class _VisualPlan:
    """The first half of a host plan (:meth:`HostPlanner.plan_visual`)."""

    spec: _Spec  # bucket 0: the vision graph's key
    rows: list  # per sample its llava.plan.RowLayout (one contiguous visual run)
    index: torch.Tensor  # the index buffer (text rows filled in by plan_rows)
    dry: list  # per sample: the dry run's outputs of the vision stage, then of each llm stage
    positions: list | None = None  # per row (rows, n) host positions of its real tokens, unpruned (M-RoPE)
    first: torch.Tensor | None = None  # (B,) 1-D families: each row's first position (the caller's; else 0)
    width: int = 0  # the prompt's padded length (the rows' old width)


class HostPlanner:
    """The host plan of a captured prefill (:class:`llava.fast.path.FastPath` keeps one): what it reads of the
    attached engine (``env``, :class:`llava.prefill.EngineEnv`: the method, its needs and the adapter), the length
    ``buckets``, the generated tokens the cache holds (``max_new_tokens``), whether the
    vision stage is ``piecewise``; it keeps the dry runs' counts per sample structure and the host unit layouts."""

    def __init__(self, env: EngineEnv, buckets: tuple, max_new_tokens: int, piecewise: bool):
        self.env = env
        self.buckets = tuple(buckets)
        self.max_new_tokens = int(max_new_tokens)
        self.piecewise = piecewise
        self._counts: dict = {}  # unit signature -> outputs per sample (meta dry run)
        self._layouts: dict = {}  # sample structure -> its host unit layouts

    def _sample_signals(self, s: _Sample, index, candidates: TokenTable, kind: str, text=None, probe=None):
        """A sample's VisionSignals over its ``candidates`` (:class:`llava.families.base.TokenTable`,
        :func:`llava.candidates.vision_signals`), its planned tensors read from ``index``; ``text`` (Q, D) the padded
        text block (query-aware methods), its masks from ``index``; ``probe`` its ``probe_attention``
        (:func:`llava.fast.probe.run_probe`: the rows of the padded text block)."""
        parts = s.parts
        layouts = {lp.key: lp.of(index) for lp in s.layouts}
        plan = {name: sp.of(index) for name, sp in parts.plan}
        unit = parts.unit.of(index)
        if s.text:
            text_mask, question_mask = parts.text_mask.of(index).bool(), parts.question_mask.of(index).bool()
        else:
            text, text_mask, question_mask = candidates.features[:0], None, unit[:0].bool()
        return vision_signals(
            candidates, unit=unit, patch=parts.patch.of(index), unit_kind=kind, grid=self.env.adapter.grid(),
            text_embeds=text, question_mask=question_mask, text_mask=text_mask, key=0, num_stock=s.tokens,
            unit_pos=parts.unit_pos.of(index).view(s.units, 2), unit_grid=list(s.grid), captured=True, layouts=layouts,
            plan=plan, static=s.static, _probe_fn=probe)

    def _dry_run(self, s: _Sample, index_h: torch.Tensor, kind: str, n_text: int = 0) -> tuple:
        """Outputs of the method's vision stage, then of each llm stage, for one sample, from a run on
        ``meta`` tensors (shapes only: a method that reads a device value fails here, and the prefill runs
        eagerly)."""
        m = self.env.method
        if not self.env.needs.vision_stage:
            return (s.tokens, *count_stages(self.env, None, s.tokens, s.tokens + 64, n_text,
                                            bucket_for(n_text, TEXT_BUCKETS)))
        cfg = self.env.model.config
        D = cfg.text_config.hidden_size
        vc = cfg.vision_config
        meta = torch.device("meta")
        shapes = candidate_shapes(self.env.needs, s.tokens + s.extra, D, self.env.adapter.signal_widths(),
                                  (vc.num_attention_heads, vc.hidden_size))
        c = TokenTable.of({name: torch.empty(shape, device=meta) for name, shape in shapes.items()})
        H = self.env.lm.config.num_attention_heads
        sig = self._sample_signals(s, index_h.to(meta), c, kind, torch.empty(s.text, D, device=meta),
                                   lambda layer, queries="question": torch.empty(H, s.text, s.tokens, device=meta))
        m0 = ask_vision(m, sig).num_out
        return (m0, *count_stages(self.env, sig, m0, m0 + 64, n_text, bucket_for(n_text, TEXT_BUCKETS)))

    def _host_signals(self, unit, patch, unit_pos, grid, layouts, key, T, kind):
        from ..signals import VisionSignals

        return VisionSignals(features=torch.zeros(0), vision_features=torch.zeros(0), unit=unit, patch=patch,
                             unit_kind=kind, grid=self.env.adapter.grid(), text_embeds=torch.zeros(0),
                             question_mask=torch.zeros(0, dtype=torch.bool), key=key, num_stock=T,
                             unit_pos=unit_pos, unit_grid=list(grid), layouts=layouts, _unit_host=unit)

    def _plan_sample(self, su: VisualSample, key: int, kind: str, offset: int, text=None):
        """One sample's static structure (without outputs) and its index-buffer tensors (host), from its visual
        candidates ``su``. ``text``: (text mask, question mask) of the padded text block, or None."""
        T, U, E = int(su.src.numel()), int(su.units.numel()), int(su.cls.numel())
        unit, patch, pos = su.unit, su.patch, su.unit_pos
        structure = (T, E > 0, unit.numpy().tobytes(), patch.numpy().tobytes(), pos.numpy().tobytes())
        lays = self._layouts.get(structure)
        if lays is None:  # the 8 (patch, stock, pos) layouts of a structure, built once (host work per prefill)
            lays = {(p, st, q): unit_layout(unit, patch if p else None, T if st else None, pos if q else None)
                    for p in (False, True) for st in (False, True) for q in (False, True)}
            if len(self._layouts) >= 256:
                self._layouts.clear()
            self._layouts[structure] = lays
        host = self._host_signals(unit, patch, pos, su.grid, lays, key, T, kind)
        plan = {k: v.long().reshape(-1) for k, v in self.env.method.plan_vision(host).items()}
        static = tuple(self.env.method.plan_static(host))
        chunks, at = [], offset

        def put(t: torch.Tensor) -> Span:  # the next tensor of the buffer
            nonlocal at
            chunks.append(t.long())
            at += t.numel()
            return Span(at - int(t.numel()), int(t.numel()))

        fixed = [put(t) for t in (su.src, unit, patch, pos.reshape(-1), su.units)]
        drawn = tuple((k, put(v)) for k, v in plan.items())
        texts = {}
        if text is not None:  # the text rows' places in the new rows are filled in once the rows are laid out
            texts = dict(text_rows=put(torch.zeros(text[0].numel(), dtype=torch.long)), text_mask=put(text[0]),
                         question_mask=put(text[1]))
        parts = SampleParts(*fixed, plan=drawn, **texts)
        lay_parts = tuple(LayoutParts.put(k, lay, put) for k, lay in lays.items())
        s = _Sample(tokens=T, units=U, extra=E, outputs=-1, grid=tuple(su.grid),
                    text=int(text[0].numel()) if text is not None else 0, layouts=lay_parts, parts=parts,
                    static=static)
        return s, chunks

    def plan(self, input_ids, attention_mask, visual: dict, position_ids=None, stock_default: bool = False,
             sample_keys: list | None = None):
        """The host plan of one prefill: (spec, host tensors, the :class:`llava.plan.PrefillPlan`, first decode
        positions); ``position_ids``, ``stock_default`` and ``sample_keys`` as for :meth:`plan_tower`.
        Raises :class:`NotPlanned` when the prompt does not fit the fast path."""
        return self.plan_rows(self.plan_visual(input_ids, attention_mask, visual,
                                               self.plan_tower(input_ids, attention_mask, visual, position_ids,
                                                               stock_default, sample_keys)))

    def plan_tower(self, input_ids, attention_mask, visual: dict, position_ids=None,
                   stock_default: bool = False, sample_keys: list | None = None) -> _TowerPlan:
        """The part of the plan the tower's run needs: the one device read (the ids, mask and the caller's
        ``position_ids`` where given, before any device work of this prefill) and the family's visual layout
        (:meth:`FamilyAdapter.visual_layout`). The fast path starts the tower with it and plans the rest while the
        device runs the tower. Without ``position_ids`` each row is numbered from 0 over its real tokens (generate()'s
        numbering), unless ``stock_default``: the caller gave none, so a 1-D family's stock default (an arange over
        the padded row) is theirs, which a padded batch's bucket would change (refused). ``sample_keys``: per row the
        caller's key of its sample (what seeded methods draw from; None: a hash of the row)."""
        B, L = input_ids.shape
        if input_ids.device.type == "cpu":
            ids_h, mask_h, pos_h = input_ids, attention_mask, position_ids
        else:  # one copy to the host
            parts = [input_ids] + [t for t in (attention_mask, position_ids) if t is not None]
            flat = torch.cat([t.reshape(-1).long() for t in parts]).cpu()
            got = iter(flat.split([t.numel() for t in parts]))
            ids_h = next(got).view(input_ids.shape)
            mask_h = next(got).view(attention_mask.shape) if attention_mask is not None else None
            pos_h = next(got).view(position_ids.shape) if position_ids is not None else None
        valid_h = mask_h.bool() if mask_h is not None else torch.ones(B, L, dtype=torch.bool)
        try:
            fv = self.env.adapter.visual_layout(visual, B, torch.where(valid_h, ids_h, -1))
        except ValueError as exc:
            raise NotPlanned(str(exc)) from None
        return _TowerPlan(ids_h, valid_h, fv, _TowerSpec(key=fv.key, tower=fv.tower), pos_h, stock_default,
                          sample_keys)

    def plan_visual(self, input_ids, attention_mask, visual: dict, tp: _TowerPlan | None = None) -> "_VisualPlan":
        """The first half of :meth:`plan`: every row's visual run, the samples' structure and index
        buffer, their outputs from the dry run (a piecewise method's: the padded size) and the spec of the
        vision graph (``bucket`` 0: a piecewise prefill's first graph does not depend on the counts).
        ``tp``: :meth:`plan_tower`'s plan when it was made already."""
        e = self.env
        tp = tp or self.plan_tower(input_ids, attention_mask, visual)
        ids_h, valid_h, fv = tp.ids, tp.valid, tp.fv
        B = ids_h.shape[0]
        extras = bool(fv.drop_cls and e.needs.include_cls_candidates)
        others = [t for t in (e.model.config.image_token_id, getattr(e.model.config, "video_token_id", None))
                  if t is not None and t != fv.token_id]
        samples, chunks, at = [], [], 0
        rows = row_layouts(ids_h, valid_h, ids_h == fv.token_id)
        crows, t0 = cls_rows([fv]) if extras else None, 0
        for b, lay in enumerate(rows):
            ids, vis = lay.ids, lay.visual
            T = fv.units.sizes[b]
            if vis.numel() != T or (T and int(vis[-1] - vis[0]) != T - 1) or any((ids == o).any() for o in others):
                raise refusals.several_runs(b, fv.kind, T)
            # row b holds image / video b, so its tokens are the layout's next T (llava.families.base.visual_ids)
            su = sample_units(fv.units, torch.arange(t0, t0 + T), crows)  # host work while the device runs the tower
            t0 += T
            p0 = lay.first
            text = None
            if e.needs.query_aware:  # the text after the visual run, padded: (real rows, question rows)
                after, question = text_spans(ids, vis, e.prompt_spec)
                Q = bucket_for(int(after.numel()), TEXT_BUCKETS)
                text = (torch.arange(Q) < after.numel(), torch.isin(torch.arange(Q) + p0 + T, question))
            smp, ch = self._plan_sample(su, sample_key(tp.sample_keys, b, ids), fv.kind, at, text)
            at += sum(int(c.numel()) for c in ch)
            samples.append(smp)
            chunks += ch
        index = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)
        try:  # the unpruned prompt's positions as the eager engine finds them (the caller's, or the family's rule)
            positions, _ = prompt_positions(e.adapter, ids_h, valid_h.long(), tp.position_ids, fv.meta)
        except Exception as exc:  # a prompt the family's rule does not take: the eager engine says why
            raise refusals.positions(exc) from None
        first = torch.zeros(B, dtype=torch.long)
        if not e.adapter.keeps_positions:  # 1-D: contiguous from each row's first position
            if positions is not None:
                if not contiguous(positions, valid_h):
                    raise refusals.gapped_positions()
                first = first_positions(positions, valid_h)
                positions = None
            elif tp.stock_default and not bool(valid_h.all()):
                raise refusals.stock_positions()
        if positions is not None:
            positions = [positions[:, b, valid_h[b]] for b in range(B)]
            if extras or self.piecewise:
                raise refusals.kept_positions(e.method.name)
        done, keys = [], []
        for b, smp in enumerate(samples):  # the selection's output count: a dry run per sample structure
            sig_key = (smp.tokens, smp.units, smp.extra, smp.grid, smp.text, fv.kind, smp.static,
                       tuple((lp.key, lp.static) for lp in smp.layouts),
                       tuple(sp.length for _, sp in smp.parts.plan))
            lay = rows[b]
            n_text = int(lay.ids.numel()) - lay.first - lay.tokens  # the text after the image (llm stages' text rows)
            if e.needs.llm_text_rows:  # its counts may depend on it, up to the method's cap
                n_text = text_count(e.needs, n_text)
                sig_key += (n_text,)
            keys.append(sig_key)
            if sig_key not in self._counts:
                base = smp.parts.src.offset
                end = max(lp.end for lp in smp.layouts)
                local = _shift(smp, -base)
                try:
                    self._counts[sig_key] = self._dry_run(local, index[base:end], fv.kind, n_text)
                except Exception as exc:  # a method that reads a device value, or an op meta tensors lack
                    self._counts[sig_key] = refusals.selection(e.method.name, exc)
            if isinstance(self._counts[sig_key], NotPlanned):
                raise self._counts[sig_key]
            done.append(_replace(smp, outputs=self._counts[sig_key][0]))
        newlines = bool((fv.units.src < 0).any())
        spec = _Spec(batch=B, key=fv.key, kind=fv.kind, newlines=newlines, samples=tuple(done), bucket=0, cache_len=0,
                     index_len=int(index.numel()), tower=fv.tower,
                     mrope=int(positions[0].shape[0]) if positions is not None else 0,
                     deepstack=int(e.adapter.deepstack_levels))
        return _VisualPlan(spec, rows, index, [self._counts[k] for k in keys], positions, first, int(ids_h.shape[1]))

    def plan_rows(self, vp: "_VisualPlan", counts: list[int] | None = None):
        """The second half of :meth:`plan`: the length bucket, the new rows' gather, positions and pads (and
        the llm segments). ``counts``: a piecewise prefill's real outputs per sample (read after its first
        graph); each sample's outputs then sit at the start of its padded slice of the buffer.

        Positions: contiguous from 0 per row (1-D families), or, for a family whose kept tokens keep their
        positions (``vp.positions``, M-RoPE), every text row's own position and, in ``vpos`` (rows, sum T),
        each sample's visual tokens' positions in candidate order: the captured prefill gathers an output's
        from its source candidate (a merged token takes its target's), as the eager engine does. Returns the
        spec, the host tensors, the :class:`llava.plan.PrefillPlan` (each segment's rows per sample and bucket) and
        the first generated token's position per row ((rows, B); 1-D: the row's length)."""
        e = self.env
        rows, index, samples = vp.rows, vp.index, vp.spec.samples
        B = len(rows)
        real = counts if counts is not None else [s.outputs for s in samples]
        maps = [rebuilt_row(int(lay.ids.numel()), [(lay.first, lay.tokens)], [m]) for lay, m in zip(rows, real)]
        lens = [r.n for r in maps]
        Lb = bucket_for(max(lens), self.buckets)
        C = Lb + -(-self.max_new_tokens // DECODE_STEP) * DECODE_STEP
        # the new rows, [pad, text before, m outputs, text after] left-padded to the bucket, as the eager executor lays
        # out its own (at its exact width): one gather from [the text rows kept, every sample's slice of outputs, a pad]
        slots = [s.outputs for s in samples]  # a padded sample's slice of the outputs is longer
        plan, new, g = vision_rows("fast", len(e.lm.layers), rows, maps, vp.width, Lb, compact=True, slots=slots)
        stage_host, texts = [], ()
        if e.needs.llm_layers:  # the llm segments (llava.fast.llm): later buckets are never longer
            if counts is not None:
                raise refusals.piecewise_stages(e.method.name)
            plan, stage_host, texts = plan_stages(e.needs, rows, new, plan, vp.dry, self.buckets, bucket_for,
                                                  TEXT_BUCKETS, deepstack=vp.spec.deepstack)
        n_text, n_out = int(g.take.numel()), sum(slots)
        outputs = (g.src >= n_text) & (g.src < n_text + n_out)
        # the captured function embeds the new rows' ids (outputs and pads: token 0), then gathers: a text or pad row
        # reads its own embedding, an output its row of [embedded ids, outputs]
        tok = torch.cat([torch.cat([lay.ids[r.text_src] for lay, r in zip(rows, maps)]),
                         torch.zeros(n_out + 1, dtype=torch.long)])[g.src].view(B, Lb)
        src = torch.where(outputs, B * Lb + g.src - n_text, torch.arange(B * Lb))
        full = vp.positions
        if full is None:  # contiguous from the row's first position
            pos = renumbered(g.mask, vp.first)
            nxt, vpos = torch.tensor(lens) + vp.first, None
        else:  # the text rows' own positions (outputs and pads: 0; the captured function gathers the outputs')
            R = vp.spec.mrope
            pos = torch.cat([own[:, r.text_src] for own, r in zip(full, maps)] + [torch.zeros(R, n_out + 1,
                                                                                              dtype=torch.long)], 1)
            pos = pos[:, g.src].view(R, B, Lb)
            nxt = torch.stack([own[:, -1] + 1 for own in full], 1)
            vpos = torch.cat([own[:, lay.first:lay.first + lay.tokens] for own, lay in zip(full, rows)], 1)
        for b, (lay, r, smp) in enumerate(zip(rows, maps, samples)):
            if smp.text:  # where the text block's rows sit in the flattened new rows (pads: row 0, masked)
                o, p0 = smp.parts.text_rows.offset, lay.first
                index[o:o + int(lay.ids.numel()) - p0 - lay.tokens] = b * Lb + Lb - r.n + r.text_dst[p0:]
        probe = probe_host = None
        if e.needs.vision_stage and e.needs.probe_layers:  # the LLM probe on the unpruned prompt (llava.fast.probe)
            if vp.spec.deepstack:
                raise refusals.probe_deepstack(e.method.name)
            probe, probe_host = plan_probe(e.needs.probe_layers, rows, [s.text for s in samples], bucket_for,
                                           self.buckets, full, vp.first)
        spec = _replace(vp.spec, bucket=Lb, cache_len=C, segments=plan.key(), texts=texts, probe=probe)
        # the 4-D mask is built on the device from the pads (llava.fast.llm.prompt_mask); with DeepStack, the visual
        # rows entering layer 0, flattened: where its rows go
        host = PrefillInputs(tok=tok, src=src, pos=pos, pad=g.pad, index=index, vpos=vpos,
                             ds_at=g.vis_at if vp.spec.deepstack else None, stages=tuple(stage_host), probe=probe_host)
        return spec, host, plan, nxt

