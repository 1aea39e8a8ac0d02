"""What a method asks of the engine, as one typed record the engine reads.

A method declares its needs as class (or, after its options, instance) attributes, the spelling of
:class:`llava.method.Method` (``vision_stage = True``, ``vision_cls_layers = (22,)``, ``llm_reads = ("prev",)``...).
When the engine attaches it, after :meth:`Method.setup`, :meth:`Method.needs` turns them into a :class:`Needs`:
every value checked for its type and its choices once, with the attribute named when one is wrong. The engine, the
fast path and the family adapters then read that record, never the method's attributes.

The tower signals a vision stage reads beyond the features are :class:`TowerRead` values (a kind and a tower
layer), which each family adapter's ``encode`` computes (asked for in one :class:`TowerCall`, fixed at attach) and
the engine hands to the method as :class:`llava.signals.VisionSignals` fields (:func:`tower_fields`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

#: A tower signal's kind -> (the attribute a method declares its layers in, the VisionSignals field(s) it fills)
TOWER_KINDS = {
    "received": ("vision_attention_layers", ("received_attn",)),
    "fullwidth": ("vision_fullwidth_layers", ("fullwidth_cls_attn", "fullwidth_keys")),
    "cls_row": ("vision_cls_layers", ("cls_attn_layers",)),
    "received_patches": ("vision_received_patch_layers", ("received_patches",)),
    "received_global": ("vision_global_attention_layers", ("received_global",)),
    "group_mean": ("vision_group_mean_blocks", ("group_mean",)),
}
# each field's flat name in the engine's per-token tables ("<prefix>:<layer>"), and whether the per-token
# table holds it heads-last (transposed to heads-first for the signals)
_PREFIX = {"received_attn": "recv", "fullwidth_cls_attn": "fwa", "fullwidth_keys": "fwk", "cls_attn_layers": "clsl",
           "received_patches": "rpat", "received_global": "glob", "group_mean": "gmean"}
_FIELD = {p: f for f, p in _PREFIX.items()}
_HEADS = ("received_attn", "cls_attn_layers")
#: the flat-name prefixes of every tower signal (``name.startswith(TOWER_PREFIXES)``)
TOWER_PREFIXES = tuple(f"{p}:" for p in _PREFIX.values())
#: the prefixes of the per-head signals, held heads-last per token (n, H) in the flat tables
HEAD_PREFIXES = tuple(f"{_PREFIX[f]}:" for f in _HEADS)
#: the CLIP [CLS]-query signals (LLaVA-NeXT zeroes them on its newline tokens)
CLS_QUERY_PREFIXES = tuple(f"{_PREFIX[f]}:" for f in ("received_attn", "fullwidth_cls_attn", "fullwidth_keys",
                                                        "cls_attn_layers"))

TowerKind = Literal["received", "fullwidth", "cls_row", "received_patches", "received_global", "group_mean"]
AttentionLogits = Literal["fp32", "model"]
PositionMode = Literal["keep", "reindex"]
LLMRead = Literal["prev", "next"]


@dataclass(frozen=True)
class TowerRead:
    """One tower signal a vision stage reads: its ``kind`` (:data:`TOWER_KINDS`) at tower ``layer`` (a hidden-state
    index; for ``group_mean`` a Qwen vision block, -1 the last)."""

    kind: TowerKind
    layer: int

    def __post_init__(self) -> None:
        if self.kind not in TOWER_KINDS:
            raise ValueError(f"TowerRead: kind must be one of {sorted(TOWER_KINDS)}, got {self.kind!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise TypeError(f"TowerRead: layer must be an int, got {self.layer!r}")

    @property
    def names(self) -> tuple[str, ...]:
        """The flat names its per-token tensors carry in the engine's tables (``recv:<layer>``...)."""
        return tuple(f"{_PREFIX[f]}:{self.layer}" for f in TOWER_KINDS[self.kind][1])


@dataclass(frozen=True)
class TowerCall:
    """What one run of the vision tower computes for the attached method, fixed at attach
    (:meth:`TowerCall.of`) and handed to the family adapter's ``encode`` / ``encode_static``: the [CLS] attention
    and keys (``attention``) at tower ``layer`` (a hidden-state index; None: the model's select layer), the further
    signals ``reads`` (:class:`TowerRead`), the arithmetic of the attention signals (``logits``: "fp32", or "model",
    the official code's, for the CLIP towers) and the method itself when it has an in-tower stage (``stage``, which
    the CLIP towers run layer by layer; None: none)."""

    attention: bool = False
    layer: int | None = None
    reads: tuple[TowerRead, ...] = ()
    logits: AttentionLogits = "fp32"
    stage: object = None

    @classmethod
    def of(cls, needs: "Needs", method) -> "TowerCall":
        """The tower call of ``method``, whose :class:`Needs` is ``needs``."""
        return cls(attention=needs.tower_attention, layer=needs.vision_layer, reads=needs.tower_reads,
                   logits=needs.attention_logits, stage=method if needs.tower_stage else None)


def tower_fields(extra: dict[str, torch.Tensor]) -> dict[str, dict[int, torch.Tensor]]:
    """The :class:`llava.signals.VisionSignals` fields of a sample's tower signals, from their per-token tensors
    by flat name (:attr:`TowerRead.names`; other entries of ``extra`` are not tower signals and are left out):
    every field present (empty when not asked), keyed by layer, the per-head ones transposed to (H, T)."""
    out: dict[str, dict[int, torch.Tensor]] = {f: {} for f in _PREFIX}
    for name, r in extra.items():
        prefix, _, layer = name.partition(":")
        if prefix in _FIELD and layer:
            field = _FIELD[prefix]
            out[field][int(layer)] = r.T.contiguous() if field in _HEADS else r
    return out


def _layers(owner: str, attr: str, value) -> tuple[int, ...]:
    value = () if value is None else value
    if isinstance(value, int) and not isinstance(value, bool):
        raise TypeError(f"{owner}: {attr} must be a tuple of layer indices, got the int {value!r} (write ({value},))")
    try:
        out = tuple(value)
    except TypeError:
        raise TypeError(f"{owner}: {attr} must be a tuple of layer indices, got {value!r}") from None
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{owner}: {attr} must hold ints (layer indices), got {v!r} in {value!r}")
    return out


def _flag(owner: str, attr: str, value) -> bool:
    if value not in (True, False):  # bool, or 0 / 1
        raise TypeError(f"{owner}: {attr} must be True or False, got {value!r}")
    return bool(value)


def _choice(owner: str, attr: str, value, choices: tuple):
    if value not in choices:
        raise ValueError(f"{owner}: {attr} must be one of {choices}, got {value!r}")
    return value


def _opt_int(owner: str, attr: str, value) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{owner}: {attr} must be an int or None, got {value!r}")
    return value


@dataclass(frozen=True)
class Needs:
    """What a method (with its options, after :meth:`Method.setup`) asks of the engine. Built by
    :meth:`Method.needs` from the method's attributes, whose docs in :class:`llava.method.Method` say what each
    means; the engine keeps it as ``engine.needs``."""

    method: str
    # -- stages
    #: a pre-tower stage (``Method.select_pixels``): the tower runs the kept tokens' patches only
    pixel_stage: bool = False
    vision_stage: bool = False
    tower_stage: bool = False
    #: the tower stage also has a masked form the fast path captures (``select_tower_masked``)
    tower_masked: bool = False
    llm_layers: tuple[int, ...] = ()
    # -- the tower's signals (vision stage)
    tower_attention: bool = False  # Method.needs_vision_attention: [CLS] attention and keys at vision_layer
    vision_layer: int | None = None
    tower_reads: tuple[TowerRead, ...] = ()
    attention_logits: AttentionLogits = "fp32"
    include_cls_candidates: bool = False
    query_aware: bool = False
    probe_layers: tuple[int, ...] = ()
    # -- the decoder (llm stages)
    llm_reads: tuple[LLMRead, ...] = ()
    llm_grad: bool = False
    llm_text_rows: bool = False
    llm_text_cap: int | None = None
    llm_vision_signals: bool = False
    llm_subblock_layers: tuple[int, ...] = ()
    position_mode: PositionMode = "keep"
    #: the vision stage's outputs keep their source tokens' positions (``Method.vision_positions``)
    vision_positions: Literal["renumber", "keep"] = "renumber"
    #: an additive bias on the decoder's attention logits (``Method.attention_bias``, :mod:`llava.attention_bias`)
    attention_bias: bool = False
    prune_past_cache: bool = False
    past_cache_from: int = 0
    eager_layers: tuple[int, ...] = ()
    # -- the captured prefill (llava.fast.refusals)
    #: why the method, with its options, runs on the eager engine only (``Method.capture_refusal``); None: captured
    capture: str | None = None
    #: ``Method.capture_kind``: "full", "piecewise" (a data-dependent count: two graphs) or None
    capture_kind: str | None = None

    @property
    def vision_signals(self) -> bool:
        """Whether the engine builds per-sample vision signals (a vision stage, the tower's attention, or an llm
        stage that reads the tokens' units)."""
        return self.vision_stage or self.tower_attention or self.llm_vision_signals

    @classmethod
    def of(cls, method, tower_masked: bool = False) -> "Needs":
        """The record of ``method``'s attributes (an instance, after its setup), each checked once. ``tower_masked``:
        the method overrides ``select_tower_masked``."""
        m, name = method, method.name
        reads = tuple(TowerRead(kind, v) for kind, (attr, _) in TOWER_KINDS.items()  # each kind's declared layers
                      for v in _layers(name, attr, getattr(m, attr)))
        return cls(
            method=name,
            pixel_stage=_flag(name, "pixel_stage", m.pixel_stage),
            vision_stage=_flag(name, "vision_stage", m.vision_stage),
            tower_stage=_flag(name, "tower_stage", m.tower_stage),
            tower_masked=tower_masked,
            llm_layers=_layers(name, "llm_layers", m.llm_layers),
            tower_attention=_flag(name, "needs_vision_attention", m.needs_vision_attention),
            vision_layer=_opt_int(name, "vision_layer", m.vision_layer),
            tower_reads=reads,
            attention_logits=_choice(name, "vision_attention_logits", m.vision_attention_logits, ("fp32", "model")),
            include_cls_candidates=_flag(name, "include_cls_candidates", m.include_cls_candidates),
            query_aware=_flag(name, "query_aware", m.query_aware),
            probe_layers=_layers(name, "probe_layers", m.probe_layers),
            llm_reads=tuple(_choice(name, "llm_reads", r, ("prev", "next")) for r in m.llm_reads),
            llm_grad=_flag(name, "llm_grad", m.llm_grad),
            llm_text_rows=_flag(name, "llm_text_rows", m.llm_text_rows),
            llm_text_cap=_opt_int(name, "llm_text_cap", m.llm_text_cap),
            llm_vision_signals=_flag(name, "llm_vision_signals", m.llm_vision_signals),
            llm_subblock_layers=_layers(name, "llm_subblock_layers", m.llm_subblock_layers),
            position_mode=_choice(name, "position_mode", m.position_mode, ("keep", "reindex")),
            vision_positions=_choice(name, "vision_positions", m.vision_positions, ("renumber", "keep")),
            attention_bias=_flag(name, "biases_attention", m.biases_attention),
            prune_past_cache=_flag(name, "prune_past_cache", m.prune_past_cache),
            past_cache_from=_opt_int(name, "past_cache_from", m.past_cache_from) or 0,
            eager_layers=_layers(name, "eager_layers", m.eager_layers),
            capture=m.capture_refusal(),
            capture_kind=_choice(name, "capture_kind()", m.capture_kind(), ("full", "piecewise", None)),
        )
