"""A sample's candidates at the vision stage, assembled the same way by both executors (the eager
:class:`llava.layout.VisionStage` and the captured :class:`llava.fast.vision.CapturedVision`): the rows of a tower's
per-token table in the LLM's order (:func:`gather_tokens`, a family's newline rows filled), each unit's [CLS] as an
extra candidate (:func:`with_cls`; their units: :func:`llava.families.base.sample_units`), and the sample's
:class:`~llava.signals.VisionSignals` from them (:func:`vision_signals`)."""

from __future__ import annotations

import torch

from .families.base import TokenTable
from .needs import CLS_QUERY_PREFIXES, tower_fields
from .signals import VisionSignals


def gather_tokens(tokens: TokenTable, src: torch.Tensor, newline: torch.Tensor | None = None) -> TokenTable:
    """Rows ``src`` (device; -1: a newline token) of a tower's per-token table (:class:`TokenTable`) in the order the
    LLM input lays them out: both executors' one gather. With the family's ``newline`` embedding, a newline row is
    what the stock model feeds there: ``features`` the embedding (in the features' dtype), ``in_tower_kept`` False
    (no tower token), zero ``vision_features``, [CLS] attention, keys and [CLS]-query tower signals
    (:data:`llava.needs.CLS_QUERY_PREFIXES`); any other entry keeps the row it was gathered from."""
    out = tokens.rows(src.clamp(min=0))
    if newline is None:
        return out
    nl = src < 0

    def fill(k, v):
        at = nl.view(-1, *(1,) * (v.dim() - 1))
        if k == "features":
            return torch.where(at, newline.to(v.dtype), v)
        if k in ("vision_features", "cls_attn", "keys", "in_tower_kept") or k.startswith(CLS_QUERY_PREFIXES):
            return v.masked_fill(at, 0)
        return v

    return out.map(fill)


def with_cls(candidates: TokenTable, cls: TokenTable) -> TokenTable:
    """A sample's candidates (T rows) followed by its units' [CLS] rows (``cls``, U rows, each unit's [CLS] as
    candidate T + u; :func:`llava.families.clip.clip_cls`) for every entry both hold; the others as they are."""
    return candidates.map(lambda k, v: torch.cat([v, cls.get(k)]) if cls.get(k) is not None else v)


def vision_signals(candidates: TokenTable, **fields) -> VisionSignals:
    """A sample's signals from its candidates (:class:`TokenTable`: ``cls_attn`` (T, H) heads last, transposed here;
    the tower signals by flat name, :func:`llava.needs.tower_fields`); ``fields``: every other field."""
    c = candidates
    ca = c.cls_attn
    return VisionSignals(features=c.features, vision_features=c.vision_features,
                         cls_attn=ca.T.contiguous() if ca is not None else None, keys=c.keys,
                         in_tower_kept=c.in_tower_kept, deepstack=c.deepstack, **tower_fields(c.tower), **fields)


def candidate_shapes(needs, n: int, hidden: int, widths: tuple, tower: tuple) -> dict:
    """Each per-candidate tensor a vision stage of ``needs`` (:class:`llava.needs.Needs`) is handed, by name, for
    ``n`` candidates: its shape, for a dry run of the selection before the device runs (the captured prefill's
    ``meta`` tensors, the vLLM plugin's random values). The tower signals the captured prefill computes by flat name
    (``recv`` / ``clsl`` (n, heads), ``fwa`` (n,), ``fwk`` (n, width); ``tower``: the vision tower's (heads,
    width)), ``features`` (n, ``hidden``), ``vision_features`` and, when the method reads them, the [CLS] attention
    ``cls_attn`` and ``keys`` (``widths``: :meth:`llava.families.base.FamilyAdapter.signal_widths`)."""
    heads, kd, vd = widths
    per = {"recv": (tower[0],), "clsl": (tower[0],), "fwa": (), "fwk": (tower[1],)}
    out = {name: (n, *per[name.split(":")[0]]) for r in needs.tower_reads for name in r.names
           if name.split(":")[0] in per}
    out.update(features=(n, hidden), vision_features=(n, vd))
    if needs.tower_attention:
        out.update(cls_attn=(n, heads), keys=(n, kd))
    return out
