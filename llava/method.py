"""The contract between a pruning method and the engine.

A method is a small object that declares *where* it acts and, at each place, maps the signals the
engine hands it (plain tensors, one sample at a time) to a :class:`Selection`: which visual tokens
to keep, in which order, and how the others are merged. It never touches the model, positions,
masks or the KV cache; :mod:`llava.engine` does all of that.

Stages: the ``vision`` stage after the tower and projector, before decoder layer 0 (:meth:`Method.select_vision`);
``llm`` stages before decoder layer ``K`` (after ``K`` layers ran on the longer sequence) for each ``K`` in
:attr:`Method.llm_layers` (:meth:`Method.select_llm`, from :class:`llava.signals.LLMSignals`). A method with no
stage at all is the unpruned model.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .needs import Needs
from .options import apply as apply_options
from .options import did_you_mean
from .plugins import load_methods, name_taken
from .selection import Selection


class BudgetError(ValueError):
    """A budget or option the method cannot serve on this model or input, found when the method first sees its
    layout (a window count the patch grid cannot give, a position scheme an option is not defined for). Bad input,
    not a bug: ``python -m llava.cli ask`` and ``python -m eval run`` print it as one ``error:`` line and exit 2
    (the harness keeps the answers so far). A method raises it only for such input-dependent refusals; the
    checks it can make in ``__init__`` / ``setup`` raise ``ValueError`` there, before anything runs."""


class Method:
    """Base class. Subclasses set ``name``, the stages they act at (the attributes below, read by the engine as
    :meth:`needs`), and their options (keyword arguments validated in ``__init__``; ``config()`` returns them for
    results files). ``budget``: the method's nominal token budget (its paper's meaning); None: it needs none."""

    name: ClassVar[str] = "none"
    #: True if :meth:`select_vision` is implemented.
    vision_stage: ClassVar[bool] = False
    #: Signals the vision stage needs from the vision tower beyond the features.
    needs_vision_attention: ClassVar[bool] = False
    #: Position convention for llm stages: ``keep`` original RoPE positions or ``reindex``.
    position_mode: str = "keep"
    #: Where the vision stage's outputs sit: ``renumber`` (the family's convention: LLaVA's rows numbered on
    #: contiguously; M-RoPE families keep their positions anyway) or ``keep``: every output keeps the position its
    #: source token has in the unpruned prompt (a kept token its own, a merged token its target's) and the text keeps
    #: its own (RESTORE). Eager engine only.
    vision_positions: str = "renumber"
    #: True if :meth:`attention_bias` is implemented: an additive bias on the decoder's attention logits, built
    #: once per prefill from the rows the decoder runs (``docs/architecture.md`` "Attention bias"). A vision stage
    #: only; eager engine only; the decoder on SDPA or eager attention.
    biases_attention: ClassVar[bool] = False
    #: Reads the question (``question_mask`` / ``text_embeds`` / question rows): the engine then needs
    #: the prompt's separator and role-tag ids (a :class:`llava.plan.PromptSpec`) to find it.
    query_aware: ClassVar[bool] = False
    #: An llm stage reads the text after the image (``LLMSignals.text_after``): on the fast path those rows
    #: are then planned, padded to a text bucket with ``LLMSignals.text_mask`` (DART's text pivots).
    llm_text_rows: ClassVar[bool] = False
    #: With ``llm_text_rows``: the largest count of text rows the stage tells apart (DART: its text pivots).
    #: On the fast path ``LLMSignals.num_text_after`` is clipped to it, so that prompts whose texts differ
    #: in length share one graph per bucket (None: not clipped, a graph per text length).
    llm_text_cap: int | None = None
    #: An llm stage reads ``LLMSignals.vision`` (the tokens' units, patches and grids, through ``origin``) without a
    #: vision stage: the eager engine then builds the vision signals (no tower attention) (VLM-Pruner's patch grid).
    llm_vision_signals: ClassVar[bool] = False
    #: Vision stage: also offer each image's / crop's [CLS] token as a candidate (VisionZip, VisionDrop).
    include_cls_candidates: bool = False
    #: Vision-tower layer (hidden_states index) whose [CLS] attention / keys the signals carry;
    #: None = the model's ``vision_feature_layer``.
    vision_layer: int | None = None
    #: Vision-tower layers (hidden_states indices) whose *received* attention per token (column mean of
    #: the full softmax over all queries, per head) the vision stage reads as ``sig.received_attn[v]``
    #: (HiPrune's "global attention"); CLIP towers only. Computed from pre-hooks (the tower stays on SDPA).
    vision_attention_layers: tuple[int, ...] = ()
    #: Vision-tower layers (hidden_states indices) whose full-width (all heads concatenated, one "head")
    #: q / k the vision stage reads: ``sig.fullwidth_cls_attn[v]`` (T,) = softmax over the unit's tokens of
    #: q_[CLS] . k_j / sqrt(D), and ``sig.fullwidth_keys[v]`` (T, D) (PruMerge's signals); CLIP towers only.
    vision_fullwidth_layers: tuple[int, ...] = ()
    #: Vision-tower layers (hidden_states indices) whose [CLS] query row per head the vision stage reads as
    #: ``sig.cls_attn_layers[v]`` (H, T) (VScan's local / global scans); CLIP towers only.
    vision_cls_layers: tuple[int, ...] = ()
    #: Vision-tower layers (hidden_states indices) whose attention *received from the other patches* (head mean
    #: per entry, the [CLS] query and each patch's own column left out, / (P - 1)) the vision stage reads as
    #: ``sig.received_patches[v]`` (T,) (VisionTrim's official term); CLIP towers only.
    vision_received_patch_layers: tuple[int, ...] = ()
    #: Vision-tower layers whose *global* attention (head mean per entry, then the mean over all queries, [CLS]
    #: included) the vision stage reads as ``sig.received_global[v]`` (T,) (HiPrune's official order of the two
    #: means); CLIP towers only.
    vision_global_attention_layers: tuple[int, ...] = ()
    #: Qwen vision blocks (-1: the last) whose output averaged over each merged token's 4 patches the vision stage
    #: reads as ``sig.group_mean[b]`` (T, C) (MMTok's official vision space); Qwen2.5-VL / Qwen3-VL towers only.
    vision_group_mean_blocks: tuple[int, ...] = ()
    #: The arithmetic of every tower attention signal above: "fp32" (ours) or "model" (as the official code
    #: computes them, in the tower's dtype: :func:`llava.families.clip.clip_probs`; reference modes; CLIP
    #: towers only; eager engine only)
    vision_attention_logits: str = "fp32"
    #: Model families the method supports (None: all); the engine refuses the others at attach with
    #: ``unsupported_reason``.
    families: ClassVar[tuple[str, ...] | None] = None
    unsupported_reason: ClassVar[str] = ""
    #: True if :meth:`select_tower` is implemented: an in-tower stage that drops tokens *between* the
    #: vision encoder's layers (later layers run on fewer tokens; CLIP towers only, see
    #: ``docs/architecture.md`` "In-tower stage"). The vision stage then sees every stock token, the
    #: dropped ones with zero features, and ``sig.in_tower_kept`` (T,) bool flags the survivors.
    tower_stage: ClassVar[bool] = False
    #: True if :meth:`select_pixels` is implemented: a pre-tower stage that keeps some of an image's visual tokens
    #: *before* the vision tower runs, from its pixels (``docs/architecture.md`` "Pre-tower stage"; families whose
    #: record has ``pre_tower``: Qwen). The tower then runs the kept tokens' patches only, and the rest of the
    #: prefill (a vision stage, llm stages) sees those tokens alone, as if the prompt had held no others.
    pixel_stage: ClassVar[bool] = False
    #: The in-tower stage's masked form, ``select_tower_masked(layer_idx, sig) -> (n, S) bool`` (a method of the
    #: subclass; None: none): the fast path runs the tower masked with it (:func:`llava.families.clip.run_tower_masked`).
    select_tower_masked: ClassVar[Any] = None
    #: How the fast path (``llava.load(..., fast=True)``, :mod:`llava.fast.path`) captures this method's prefill:
    #: ``"full"`` (fixed output counts, no device read: one graph per length bucket), ``"piecewise"`` (two graphs,
    #: the vision stage's and the LLM's, with a host read of the selection's counts between them), or None with
    #: ``capture_reason`` (such a prefill runs on the eager engine, and ``engine.stats.path`` says so). Options can
    #: refuse too (:meth:`capture_refusal`) or change the kind (:meth:`capture_kind`).
    capturable: ClassVar[str | None] = None
    capture_reason: ClassVar[str] = ""
    #: Which decoder layers' attention (or keys) an llm stage before layer K reads: "prev" (layer K-1),
    #: "next" (layer K). On a hybrid model (Qwen3.5) a read of a linear-attention layer, which has no attention,
    #: is refused at attach with the reason (``PruningEngine._check_hybrid``).
    llm_reads: ClassVar[tuple[str, ...]] = ()
    #: The llm stages take a gradient inside the prefill (``LLMSignals.grad_saliency``, TRIO): refused at attach on
    #: a tensor-parallel (AutoTP-sharded) model, whose all-reduce linears have no backward.
    llm_grad: ClassVar[bool] = False
    #: An llm stage also removes the dropped rows from the KV caches of the layers that ran before it, from layer
    #: ``past_cache_from`` on (PriorTR, CLSE: 0; IVC-Prune's LLaVA code: 1), so decoding attends to the kept visual
    #: tokens alone there; False: each layer's cache holds the prompt as that layer saw it (FastV, most methods here).
    #: The eager engine's dynamic cache only (the fast path refuses it, as do static caches and linear layers).
    prune_past_cache: bool = False
    past_cache_from: int = 0
    #: Decoder layers whose prefill runs on transformers' eager attention instead of the model's (a reference mode's:
    #: an official code that asks a layer for its attention map, ``output_attentions=True``, runs that layer on the
    #: eager path, and its fp16 hidden states differ from SDPA's). Eager engine only; attention layers only.
    eager_layers: tuple[int, ...] = ()
    #: For ``python -m llava.check`` (docs/check.md): the budget it checks on the tiny models (a value, or a table
    #: {family: budget}; None: the checker's table of built-ins, else no budget), and the (budget, options) with
    #: which this method keeps every visual token (None: the checker's table, else keep-all is n.a.)
    check_budget: ClassVar[int | dict | None] = None
    #: False: the method takes no budget (its count adapts to the input: PixelPrune's tolerance); harnesses that sweep
    #: budgets run it once, without one
    budgeted: ClassVar[bool] = True
    check_keep_all: ClassVar[tuple[int | None, dict] | None] = None
    #: The attached model's decoder and tower layer counts and family, set by :meth:`setup`; before it (a method built
    #: but not attached) the 32 decoder layers of LLaVA-1.5-7B, which the papers state their layer schedules for.
    num_layers: int = 32
    num_vision_layers: int | None = None
    family: str | None = None

    @property
    def llm_subblock_layers(self) -> tuple[int, ...]:
        """Decoder layers whose sub-block states (the attention and feed-forward sub-modules' inputs and outputs,
        :mod:`llava.subblocks`) an llm stage reads through ``LLMSignals.subblocks``: the staged decoder records them
        with forward hooks during the prefill and hands each stage those of the layers that ran since the previous
        stage (a layer after the last stage is refused at attach). Eager engine only."""
        return ()

    @property
    def probe_layers(self) -> tuple[int, ...]:
        """Decoder layers whose attention the vision stage reads through ``sig.probe_attention`` (checked at attach
        like :attr:`llm_reads`: on a hybrid model each must be a full-attention layer)."""
        return ()

    def __init__(self, budget: int | None = None, **options: Any) -> None:
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget != int(budget):
                raise ValueError(f"{self.name}: budget must be a whole number of tokens, got {budget!r}")
            budget = int(budget)
            if budget <= 0:
                raise ValueError(
                    f"{self.name}: budget must be > 0 visual tokens, got {budget}. "
                    "(Use method 'novisual' for the no-visual-tokens control.)"
                )
        self.budget = budget
        apply_options(self, options)  # the declared defaults, the given values, each declared choice checked
        if self.position_mode not in ("keep", "reindex"):
            raise ValueError(f"{self.name}: position_mode must be 'keep' or 'reindex'")

    # -- binding to a model --------------------------------------------------------------------
    @classmethod
    def supports(cls, family: str) -> bool:
        """Whether the method class runs on ``family`` (what the registry answers before any instance exists)."""
        return cls.families is None or family in cls.families

    def runs_on(self, family: str) -> bool:
        """Whether this instance runs on ``family`` (the engine's check at attach): the class's families unless the
        instance's options narrowed them (an instance attribute ``families``, e.g. TRIO's encoder stage)."""
        return self.families is None or family in self.families

    def setup(self, *, num_layers: int, num_vision_layers: int, family: str) -> None:
        """Called by the engine when attached, before :attr:`llm_layers` is read (the model's family id and layer
        counts); methods whose schedules are stated for 32-layer LLMs scale them here."""
        self.num_layers = num_layers
        self.num_vision_layers = num_vision_layers
        self.family = family

    # -- declaration --------------------------------------------------------------------------
    def needs(self) -> Needs:
        """The attributes above as one checked record (:class:`llava.needs.Needs`), what the engine reads once
        attached (after :meth:`setup`); a wrong type or choice raises here, naming the attribute."""
        return Needs.of(self, tower_masked=callable(self.select_tower_masked))

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """Named options: each a default, or a :class:`llava.options.Option` (its default and the values it takes,
        checked once in ``__init__``). Subclasses extend this."""
        return {"position_mode": cls.position_mode}

    @property
    def llm_layers(self) -> tuple[int, ...]:
        """Decoder layers before which an llm stage acts (ascending, each >= 1)."""
        return ()

    def config(self) -> dict[str, Any]:
        return {"method": self.name, "budget": self.budget, **{k: getattr(self, k) for k in self.option_defaults()}}

    # -- stages -------------------------------------------------------------------------------
    def capture_refusal(self) -> str | None:
        """Why the fast path cannot capture this method with its current options (None: it can)."""
        if self.capturable not in ("full", "piecewise"):
            return self.capture_reason or f"{self.name} is not capturable"
        if self.config().get("numerics") == "official":  # a reference mode's option
            return f"{self.name}: the reference mode (numerics='official') runs on the eager engine"
        if self.prune_past_cache:
            return f"{self.name}: pruning the earlier layers' caches runs on the eager engine"
        if self.llm_subblock_layers:
            return f"{self.name}: the decoder layers' sub-block states (llm_subblock_layers) are recorded on the eager engine"
        if self.vision_attention_logits != "fp32" or self.vision_received_patch_layers or \
                self.vision_global_attention_layers:
            return f"{self.name}: the official tower attention arithmetic runs on the eager engine"
        return None

    def capture_kind(self) -> str | None:
        """How the fast path captures this method with its current options: ``"full"``, ``"piecewise"``
        (:attr:`capturable`), or None."""
        return self.capturable

    def plan_vision(self, signals: "Any") -> dict:
        """Host-side draws of the vision stage for one sample (e.g. random's picks), computed by the fast
        path before the device runs, from signals whose ``unit`` / ``patch`` / layouts are host
        tensors (no features). Returns host tensors the captured prefill hands back as ``signals.plan``
        on the device. Default: nothing."""
        return {}

    def plan_static(self, signals: "Any") -> tuple:
        """Python values of the vision stage for one sample that depend only on its structure (host
        ``unit`` / ``patch`` / layouts, as :meth:`plan_vision` gets them), e.g. counts a method would
        otherwise read from the device. The fast path computes them on the host, keys the captured graph by
        them and hands them back as ``signals.static``. Default: nothing."""
        return ()

    def select_vision(self, signals: "Any") -> Selection:  # pragma: no cover - interface
        raise TypeError(f"{self.name} declares no vision stage")

    def select_llm(self, stage: int, signals: "Any") -> Selection:  # pragma: no cover - interface
        raise TypeError(f"{self.name} declares no llm stage")

    def select_pixels(self, sig: "Any") -> Selection:  # pragma: no cover - interface
        """Pre-tower stage, called once per image with :class:`llava.tower_signals.PixelSignals`, before the tower runs.
        Return a :class:`Selection` of ``keep`` only: the image's tokens to run through the tower, ascending (at least
        one). A video's frames are not asked (they run whole)."""
        raise TypeError(f"{self.name} declares no pre-tower stage")

    def attention_bias(self, keys: "Any") -> "Any":  # pragma: no cover - interface
        """Called once per prefill after the vision stage with :class:`llava.attention_bias.PromptKeys` (the rows'
        positions, what each row stands for); return a :class:`llava.attention_bias.AttentionBias`, the logits'
        additive terms the engine adds in every decoder attention layer (``biases_attention``)."""
        raise TypeError(f"{self.name} declares no attention bias")

    def select_tower(self, layer_idx: int, sig: "Any") -> torch.Tensor | None:  # pragma: no cover - interface
        """In-tower stage, called after vision encoder layer ``layer_idx`` (0-based) for one batched call
        of units (images / crops / frames) with :class:`llava.tower_signals.TowerSignals`. Return an
        (n_units, k) LongTensor of the positions among the current tokens to keep (ascending keeps the
        original order; [CLS] at position 0 must be kept), a list of n_units 1-D LongTensors when the
        units keep different counts (the engine then runs them on in groups of equal length), or None
        to keep all."""
        raise TypeError(f"{self.name} declares no tower stage")

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "method")
        return f"{type(self).__name__}({opts})"


class NoPruning(Method):
    """The unpruned model (still routed through the engine, e.g. for the NeXT 'spatial' layout)."""

    name = "none"
    capturable = "full"


# -- the registry ------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Method]] = {"none": NoPruning}
#: Modules whose import registers more methods; imported lazily on first lookup.
_PLUGIN_MODULES: list[str] = ["consensusdrop", "visiondrop", "attnmix", "baselines"]


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    name = cls.name.lower()
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(name_taken(name, _REGISTRY[name], _PLUGIN_MODULES + ["llava"]))
    _REGISTRY[name] = cls
    return cls


def _load_plugins() -> None:
    load_methods(_PLUGIN_MODULES)  # once; then a user module that failed raises again (llava/plugins.py)


def available_methods() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The registered method class ``name`` (its class attributes: families, llm_grad, capturable, ...)."""
    _load_plugins()
    return _REGISTRY[name.lower()]


def method_supports(name: str, family: str) -> bool:
    """Whether the registered method ``name`` runs on models of ``family`` (its ``families``)."""
    _load_plugins()
    return _REGISTRY[name.lower()].supports(family)


def method_label(name: str, options: dict | None = None) -> str:
    """A method variant's display name in result tables and plots: the name and its options in the
    order given (``consensusdrop preset=probe``)."""
    return name + "".join(f" {k}={v}" for k, v in (options or {}).items())


def get_method(name: str | Method, budget: int | None = None, **options: Any) -> Method:
    """Build a method by registry name (case-insensitive) or pass an instance through."""
    if isinstance(name, Method):
        if budget is not None or options:
            raise TypeError("pass budget/options to the method's constructor, not with an instance")
        return name
    _load_plugins()
    key = str(name).lower()
    if key not in _REGISTRY:
        raise KeyError(f"unknown pruning method {name!r}{did_you_mean(key, available_methods())}; known methods: "
                       f"{', '.join(available_methods())}")
    return _REGISTRY[key](budget=budget, **options)
