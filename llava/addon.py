"""Composition: a method on top of another method's selection (an *add-on*, ``docs/your-method.md``, "An add-on").

One spelling everywhere a method is named: the add-on is the method, its option ``base`` names the method under it
(``rt.prune("restore", 64, base="divprune")``, ``--method restore --opt base=divprune``, ``eval run``, a paper spec's
row options, W&B and table labels: ``restore base=divprune``) and ``base_options`` that method's options. At attach
the base is built from the registry by name (no method imports another) with the add-on's :meth:`Addon.base_budget`,
set up on the same model, and its signal needs become the add-on's (what the tower computes, the question, an LLM
probe); each sample's vision stage asks the base first (:func:`llava.stage_step.ask_vision`, with the base's own
host plans), then the add-on's :meth:`Addon.select_addon` with the base's :class:`~llava.selection.Selection`. A base
must be a pre-LLM method (a vision stage, no llm, in-tower or pre-tower stage).
"""

from __future__ import annotations

from typing import Any, ClassVar

from .method import Method, available_methods, get_method, method_class
from .needs import TOWER_KINDS
from .options import Option, did_you_mean
from .selection import Selection
from .stage_step import ask_vision

#: the base's attributes that say which signals its vision stage reads: the add-on reads them too
SIGNAL_FLAGS = ("needs_vision_attention", "include_cls_candidates", "query_aware")
SIGNAL_LAYERS = tuple(attr for attr, _ in TOWER_KINDS.values())


class Addon(Method):
    """Base class of an add-on: set ``name``, ``base_default`` (the base when ``base`` is not given), optionally
    ``bases`` (the bases it is written for; None: any pre-LLM method) and :meth:`base_budget`, and implement
    :meth:`select_addon`."""

    vision_stage = True
    #: the base method when the option ``base`` is not given
    base_default: ClassVar[str] = "random"
    #: the bases the add-on composes with (None: any registered pre-LLM method)
    bases: ClassVar[tuple[str, ...] | None] = None
    capturable = "full"  # with a base the fast path captures; its own kind and refusal are the base's (below)

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {**super().option_defaults(),
                "base": Option(cls.base_default, cls.bases, types=(str,), doc="the method whose selection this one "
                                                                             "starts from (by its registry name)"),
                "base_options": Option({}, types=(dict,), doc="the base's options")}

    def __init__(self, budget: int | None = None, **options: Any) -> None:
        super().__init__(budget, **options)
        if self.base not in available_methods():
            raise ValueError(f"{self.name}: unknown base {self.base!r}{did_you_mean(self.base, available_methods())}")

    def base_budget(self) -> int | None:
        """The budget the base runs at (default: the add-on's)."""
        return self.budget

    def select_addon(self, sig, base: Selection) -> Selection:  # pragma: no cover - interface
        """The add-on's selection of one sample, from its signals and the base's selection of it."""
        raise TypeError(f"{self.name} declares no select_addon")

    # ---------------------------------------------------------------- what the engine reads
    def setup(self, *, num_layers: int, num_vision_layers: int, family: str) -> None:
        super().setup(num_layers=num_layers, num_vision_layers=num_vision_layers, family=family)
        if issubclass(method_class(self.base), Addon):
            raise ValueError(f"{self.name}: base {self.base!r} is an add-on itself (one level of composition)")
        base = get_method(self.base, self.base_budget(), **dict(self.base_options))
        if not base.runs_on(family):
            raise ValueError(f"{self.name}: its base {base.name} does not support {family} models: "
                             f"{base.unsupported_reason}")
        base.setup(num_layers=num_layers, num_vision_layers=num_vision_layers, family=family)
        needs = base.needs()
        if not needs.vision_stage or needs.llm_layers or needs.tower_stage or needs.pixel_stage:
            raise ValueError(f"{self.name}: its base must be a pre-LLM method (a vision stage only); {base.name} "
                             "has " + ", ".join(w for w, on in (("no vision stage", not needs.vision_stage),
                                                                ("llm stages", bool(needs.llm_layers)),
                                                                ("an in-tower stage", needs.tower_stage),
                                                                ("a pre-tower stage", needs.pixel_stage)) if on))
        self.base_method = base
        for attr in SIGNAL_FLAGS:  # the base's signals are the add-on's too
            setattr(self, attr, bool(getattr(self, attr)) or bool(getattr(base, attr)))
        for attr in SIGNAL_LAYERS:
            setattr(self, attr, tuple(dict.fromkeys((*(getattr(self, attr) or ()), *(getattr(base, attr) or ())))))
        if base.vision_layer is not None:
            self.vision_layer = base.vision_layer
        self.vision_attention_logits = base.vision_attention_logits

    @property
    def probe_layers(self) -> tuple[int, ...]:
        base = getattr(self, "base_method", None)
        return base.probe_layers if base is not None else ()

    def capture_refusal(self) -> str | None:
        base = getattr(self, "base_method", None)
        why = base.capture_refusal() if base is not None else None
        return f"its base {why}" if why else super().capture_refusal()

    def capture_kind(self) -> str | None:
        base = getattr(self, "base_method", None)
        return base.capture_kind() if base is not None else self.capturable

    def plan_vision(self, signals) -> dict:
        return self.base_method.plan_vision(signals)

    def plan_static(self, signals) -> tuple:
        return self.base_method.plan_static(signals)

    def select_vision(self, sig) -> Selection:
        return self.select_addon(sig, ask_vision(self.base_method, sig))
