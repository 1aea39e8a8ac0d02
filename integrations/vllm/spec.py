"""What ``hf_overrides={"vtprune": {...}}`` asks of the plugin, checked before a request runs, and the number
of visual tokens each image enters vLLM's decoder with.

vLLM lays out a prompt (placeholder tokens, KV blocks, scheduling) in its front end, before the encoder
runs, so each image's token count after pruning must be known there. :func:`planned_count` finds it by a
dry run of the method's vision stage on random signals of the image's structure (twice, with other values:
a method whose count depends on the values is refused); the worker checks every real selection against it.

Only pre-LLM methods run inside vLLM: a method with llm stages (FastV, PyramidDrop, SparseVLM, DART,
VisionDrop's LLM stages, VScan's LLM stage) prunes inside the decoder, which is vLLM's own, and is refused
with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

KEY = "vtprune"
ALLOWED = ("method", "budget", "options", "template", "revision")
#: the hub's default branch (what a revision of None reads)
DEFAULT_REVISION = "main"


class PluginError(ValueError):
    """A vtprune configuration the plugin cannot run (the message says why)."""


@dataclass(frozen=True)
class PruneSpec:
    method: str
    budget: int | None = None
    options: tuple = ()  # sorted (key, value) pairs: hashable
    template: str | None = None
    #: the checkpoint revision :func:`integrations.vllm.overrides` checked the spec at (None: not given); the
    #: plugin refuses to serve it at another one (vLLM's ``revision``)
    revision: str | None = None

    @classmethod
    def from_dict(cls, raw) -> "PruneSpec":
        if not isinstance(raw, dict):
            raise PluginError(f"hf_overrides[{KEY!r}] must be a dict like {{'method': 'visionzip', 'budget': 64}}, "
                              f"got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(ALLOWED))
        if unknown:
            raise PluginError(f"hf_overrides[{KEY!r}]: unknown key(s) {unknown}; allowed: {', '.join(ALLOWED)}")
        if "method" not in raw:
            raise PluginError(f"hf_overrides[{KEY!r}] needs 'method' (e.g. 'visionzip')")
        opts = raw.get("options") or {}
        if not isinstance(opts, dict):
            raise PluginError(f"hf_overrides[{KEY!r}]['options'] must be a dict, got {type(opts).__name__}")
        budget = raw.get("budget")
        revision = raw.get("revision")
        return cls(method=str(raw["method"]), budget=None if budget is None else int(budget),
                   options=tuple(sorted(opts.items())), template=raw.get("template"),
                   revision=None if revision is None else str(revision))

    @classmethod
    def from_config(cls, hf_config) -> "PruneSpec | None":
        """The spec a vLLM model config carries (``hf_overrides``), or None (stock behaviour)."""
        raw = getattr(hf_config, KEY, None)
        return None if raw is None else cls.from_dict(raw)

    def as_dict(self) -> dict:
        out = {"method": self.method, "budget": self.budget, "options": dict(self.options), "template": self.template}
        if self.revision is not None:
            out["revision"] = self.revision
        return out

    def check_revision(self, served: str | None) -> "PruneSpec":
        """Refuse a spec checked at one checkpoint revision served at another (vLLM's ``revision``: None and
        ``"main"`` are the default branch; a commit is the branch vLLM resolved to it); returns the spec."""
        if self.revision is not None and (self.revision or DEFAULT_REVISION) != (served or DEFAULT_REVISION) \
                and self.revision != getattr(served, "resolved", None):
            raise PluginError(f"hf_overrides[{KEY!r}] was made for revision {self.revision!r} of the checkpoint, but "
                              f"vLLM serves revision {str(served or DEFAULT_REVISION)!r}: pass the same revision to vLLM "
                              f"(LLM(..., revision={self.revision!r}) / vllm serve --revision {self.revision})")
        return self

    def build(self):
        """A fresh method instance (each engine binds its own)."""
        from llava.method import get_method

        try:
            return get_method(self.method, self.budget, **dict(self.options))
        except (KeyError, TypeError, ValueError) as e:
            raise PluginError(str(e.args[0] if e.args else e)) from None


def revision_key(revision) -> tuple:
    """A cache key for a checkpoint revision: its name and, for the revisions vLLM resolves (huggingface_hub's
    ``ResolvedRevision``: a str equal to the name asked for, e.g. "main"), the commit it was resolved to."""
    return (None if revision is None else str(revision), getattr(revision, "resolved", None))


def check_method(method, family: str) -> None:
    """Refuse, with the reason, a method the plugin cannot run on ``family``."""
    if not method.supports(family):
        raise PluginError(f"{method.name} does not support {family} models (it runs on "
                          f"{', '.join(method.families)}): {method.unsupported_reason}")
    layers = tuple(method.llm_layers)
    if layers:
        raise PluginError(
            f"{method.name} prunes inside the LLM (before decoder layer(s) {list(layers)}), and inside vLLM the "
            "decoder is vLLM's own: the plugin runs pre-LLM methods only (the vision stage before the decoder). "
            "Run it with the HF engine (llava.load(...).prune(...), eval run), or pick a pre-LLM method "
            "(consensusdrop, attnmix, visionzip, fastervlm, divprune, cdpruner, vispruner, hiprune, downsample, "
            "random, ...)")
    if getattr(method, "biases_attention", False) or getattr(method, "vision_positions", "renumber") == "keep":
        raise PluginError(
            f"{method.name} keeps the kept tokens' prompt positions or biases the decoder's attention (RESTORE), "
            "and inside vLLM the decoder is vLLM's own: run it with the HF engine (llava.load(...).prune(...), eval "
            "run)")


@dataclass(frozen=True)
class Structure:
    """One image's visual tokens before pruning, as the engine lays them out (CLIP families)."""

    tokens: int  # T: the tokens the unpruned model feeds
    grid: tuple  # (rows, cols) of patches per unit
    units: int = 1
    cls_extra: bool = False  # each unit's [CLS] offered as an extra candidate (the model drops it)
    kind: str = "image"
    unit_grid: tuple = field(default=())


def _signals(method, s: Structure, dims: dict, seed: int):
    """Random signals of structure ``s`` for a dry run: every per-candidate tensor the method's vision stage is
    handed (:func:`llava.candidates.candidate_shapes`, the captured prefill's dry run), attention rows normalised
    over the candidates."""
    from llava.candidates import candidate_shapes, vision_signals
    from llava.families.base import TokenTable

    g = torch.Generator().manual_seed(seed)
    per = s.tokens // s.units
    unit = torch.arange(s.units).repeat_interleave(per)
    patch = torch.arange(per).repeat(s.units)
    if s.cls_extra and method.include_cls_candidates:  # as the engine: only for a method that asks
        unit = torch.cat([unit, torch.arange(s.units)])
        patch = torch.cat([patch, torch.full((s.units,), -1, dtype=torch.long)])
    n = int(unit.numel())
    D, Dv, H = dims["hidden"], dims["vision_hidden"], dims["vision_heads"]
    shapes = candidate_shapes(method.needs(), n, D, (H, Dv // H, Dv), (H, Dv))
    tt = 8
    c = {"features": torch.randn(n, D, generator=g), "vision_features": torch.randn(n, Dv, generator=g)}
    text = torch.randn(tt, D, generator=g)
    for prefix in ("cls_attn", "keys", "recv:", "fwa:", "fwk:", "clsl:"):  # the draws' order
        for name in [k for k in shapes if k.startswith(prefix)]:
            if prefix in ("keys", "fwk:"):
                c[name] = torch.randn(*shapes[name], generator=g)
            else:  # attention rows over the candidates: (H, n) drawn, held heads-last as the tables hold them
                t = torch.randn(*reversed(shapes[name]), generator=g).softmax(-1)
                c[name] = t.T if t.dim() == 2 else t
    return vision_signals(
        TokenTable.of(c), unit=unit, patch=patch, unit_kind=s.kind, grid=tuple(s.grid), text_embeds=text,
        question_mask=torch.ones(tt, dtype=torch.bool), question_ids=torch.arange(tt), key=seed, num_stock=s.tokens,
        unit_pos=torch.full((s.units, 2), -1, dtype=torch.long),
        unit_grid=list(s.unit_grid or [tuple(s.grid)] * s.units),
        _probe_fn=lambda layer, queries="question": torch.randn(dims.get("heads", 4), tt, s.tokens,
                                                                generator=g).softmax(-1),
        _unit_host=unit)


def planned_count(method, s: Structure, dims: dict) -> int:
    """Visual tokens the image enters the decoder with after ``method``'s vision stage (T when it has none).
    Raises :class:`PluginError` when the dry run fails or the count depends on the values."""
    if not method.vision_stage:
        return s.tokens
    if method.tower_stage:
        raise PluginError(f"{method.name} prunes inside the vision tower, where the count it keeps is decided layer by "
                          "layer; the plugin does not plan in-tower stages yet (run it with the HF engine)")
    counts = []
    for seed in (0, 1):
        sig = _signals(method, s, dims, seed)
        try:
            counts.append(int(method.select_vision(sig).num_out))
        except Exception as e:  # noqa: BLE001 - any failure of a dry run is the method's refusal here
            raise PluginError(f"{method.name}: vLLM must know each image's token count before the encoder runs, and "
                              f"a dry run of its vision stage failed ({type(e).__name__}: {e})") from None
    if counts[0] == 0:
        raise PluginError(f"{method.name} keeps no visual token, and vLLM needs at least one placeholder per image: for "
                          "the no-image control, send the prompt without its image")
    if counts[0] != counts[1]:
        raise PluginError(f"{method.name} keeps a number of tokens that depends on the image ({counts[0]} vs "
                          f"{counts[1]} on two dry runs), and vLLM must know it before the encoder runs: use a "
                          "fixed-budget variant (e.g. prumerge budget_mode='fixed')")
    return counts[0]


def ready_method(spec: PruneSpec, family: str, num_layers: int, num_vision_layers: int):
    """The spec's method, set up for a model of ``family`` with these layer counts and checked."""
    method = spec.build()
    if not method.supports(family):
        check_method(method, family)
    method.setup(num_layers=num_layers, num_vision_layers=num_vision_layers, family=family)
    check_method(method, family)
    return method


def llava_structure(hf_config) -> Structure:
    """LLaVA-1.5: one unit of (image_size / patch)^2 patches (+ [CLS] under the 'full' strategy)."""
    vc = hf_config.vision_config
    side = vc.image_size // vc.patch_size
    full = hf_config.vision_feature_select_strategy == "full"
    return Structure(tokens=side * side + (1 if full else 0), grid=(side, side), cls_extra=not full)


#: per family: the structure of one image (the families the plugin serves)
STRUCTURES = {"llava": llava_structure}


def dims(hf_config) -> dict:
    """The sizes a dry run needs, from the checkpoint's config."""
    tc, vc = hf_config.text_config, hf_config.vision_config
    return {"hidden": tc.hidden_size, "heads": tc.num_attention_heads, "num_layers": tc.num_hidden_layers,
            "vision_hidden": vc.hidden_size, "vision_heads": vc.num_attention_heads,
            "num_vision_layers": vc.num_hidden_layers}


def planned_for_config(spec: PruneSpec, family: str, hf_config) -> tuple[Structure, int]:
    """(the image's structure, its token count after the vision stage) for a checkpoint's config."""
    if family not in STRUCTURES:
        raise PluginError(f"the vtprune vLLM plugin does not serve {family} models yet (served: {', '.join(STRUCTURES)})")
    s = STRUCTURES[family](hf_config)
    return s, count_for(spec, family, s, dims(hf_config))


@lru_cache(maxsize=64)
def _cached_count(spec: PruneSpec, family: str, s: Structure, dims: tuple) -> int:
    d = dict(dims)
    method = ready_method(spec, family, d["num_layers"], d["num_vision_layers"])
    return planned_count(method, s, d)


def count_for(spec: PruneSpec, family: str, s: Structure, dims: dict) -> int:
    """:func:`planned_count` for a spec, checked and cached per (spec, family, structure). ``dims``: hidden,
    vision_hidden, vision_heads, heads (the LLM's), num_layers, num_vision_layers."""
    return _cached_count(spec, family, s, tuple(sorted(dims.items())))
