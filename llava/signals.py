"""Signals handed to methods: plain tensors for one sample, computed by the engine.

Vision-stage signals describe every visual token of a sample as it would enter the LLM (the
"flat" visual block: all images / crops / frames of the sample in prompt order, including
LLaVA-NeXT newline tokens when that layout is used). Per-token provenance (`unit`, `patch`) lets
a method work per image, per crop or per frame without knowing the layout.

LLM-stage signals give the hidden states entering decoder layer K and, on request, attention
rows recomputed from a layer's own norm + q/k projections + RoPE (the LLM itself keeps running on
SDPA / FlashAttention). Nothing is computed unless a method asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from .attention_rows import ATTENTION_LOGITS
from .proxy_grad import proxy_rows


@dataclass
class VisionSignals:
    """One sample's visual tokens before the LLM. ``T`` = visual tokens of the sample.

    features:        (T, D)  projected tokens exactly as the unpruned model feeds them to the LLM.
    vision_features: (T, Dv) vision-tower features of the select layer (before the projector);
                     zero rows for LLaVA-NeXT newline tokens.
    unit:            (T,) index of the image / crop / frame each token comes from (0..U-1), -1 for
                     newline tokens. Units are numbered in the order the sample's tokens first show them
                     (prompt order; NeXT: base crop first); a crop no token shows is none of them.
    patch:           (T,) patch index within its unit's grid (row-major), -1 for [CLS] / newline.
    unit_kind:       "image" (LLaVA-1.5), "crop" (LLaVA-NeXT), or "frame" (Video-LLaVA).
    grid:            (rows, cols) of patches per unit.
    cls_attn:        (H, T) [CLS]->token attention probabilities of the chosen vision layer, per head,
                     computed within each unit's own vision-tower pass (fp32); 0 for newline
                     tokens. None unless the method sets ``needs_vision_attention``.
    keys:            (T, d) head-mean keys (after k_proj) of that layer (fp32), VisionZip's merge
                     metric. None unless requested.
    received_attn:   {v: (H, T)} for each hidden-state index v in the method's
                     ``vision_attention_layers``: per head, the attention each token receives in the
                     layer producing hidden state v (mean over all query rows of that unit, [CLS]
                     included; fp32); 0 for newline tokens. Empty unless requested.
    fullwidth_cls_attn / fullwidth_keys: {v: (T,)} / {v: (T, D)} for each hidden-state index v in
                     ``vision_fullwidth_layers``: that layer's q / k projections taken full width (no
                     head split); the [CLS] query's softmax over the unit's tokens (scale 1/sqrt(D)),
                     and the keys (fp32); 0 for newline tokens. Empty unless requested.
    cls_attn_layers: {v: (H, T)} for each hidden-state index v in ``vision_cls_layers``: the [CLS]
                     query row per head of the layer producing hidden state v (like ``cls_attn``).
    received_patches: {v: (T,)} for each v in ``vision_received_patch_layers``: the attention each token
                     receives from its unit's other patches (head mean per entry, the [CLS] query and its own
                     column left out, / (P - 1): VisionTrim's official term). Empty unless requested.
    received_global: {v: (T,)} for each v in ``vision_global_attention_layers``: the head mean per entry, then
                     the mean over all the unit's queries (HiPrune's official global attention).
                     Every attention signal here is fp32, or in the tower's dtype as the official code
                     computes it when the method sets ``vision_attention_logits="model"``.
    group_mean:      {b: (T, C)} for each Qwen vision block b in ``vision_group_mean_blocks`` (Qwen2.5-VL /
                     Qwen3-VL): block b's output averaged over each merged token's 4 patches, the tower's dtype
                     (b = -1: the merger's input before its norm; MMTok's official vision space). Empty unless
                     requested; the CLIP / other towers refuse it.
    text_embeds:     (Tt, D) raw token embeddings of the prompt text after the visual block.
    question_mask:   (Tt,) True for the question / instruction tokens among them (excludes the
                     separator newline after the image and the trailing role tag).
    text_mask:       (Tt,) bool, the real rows of ``text_embeds`` (None: all). The fast path pads the text
                     block to a fixed length so that one captured graph serves prompts of many lengths;
                     read the text through :meth:`text_rows` (masked ops, no boolean indexing) and it
                     works on both paths.
    question_ids:    (Q,) host LongTensor: the LLM token ids of those question tokens (decode them with
                     the model's tokenizer for a method that needs the question as text, e.g. CDPruner's
                     CLIP text tower).
    """

    features: torch.Tensor
    vision_features: torch.Tensor
    unit: torch.Tensor
    patch: torch.Tensor
    unit_kind: str
    grid: tuple[int, int]
    text_embeds: torch.Tensor
    question_mask: torch.Tensor
    cls_attn: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    received_attn: dict = field(default_factory=dict)
    fullwidth_cls_attn: dict = field(default_factory=dict)
    cls_attn_layers: dict = field(default_factory=dict)
    received_patches: dict = field(default_factory=dict)
    received_global: dict = field(default_factory=dict)
    fullwidth_keys: dict = field(default_factory=dict)
    group_mean: dict = field(default_factory=dict)
    #: a stable per-sample key (question id when the caller sets ``engine.sample_keys``, else a hash
    #: of the sample's prompt token ids) for seeded methods: independent of batching and sharding
    key: int = 0
    #: tokens the unpruned model feeds (T). When the method sets ``include_cls_candidates`` and the
    #: model drops [CLS] from the LLM input (LLaVA-1.5 / NeXT), candidates T..T+U-1 are each unit's
    #: [CLS] token (projected like a patch; ``patch`` -1), so a method may feed it to the LLM.
    num_stock: int = -1
    #: (U, 2) grid position (row, col) of each unit in its image's crop grid (LLaVA-NeXT grid crops);
    #: (-1, -1) for a NeXT base crop, a LLaVA-1.5 image or a video frame.
    unit_pos: torch.Tensor | None = None
    #: per unit (U entries, host ints): (rows, cols) of its patch grid (Qwen2.5-VL: each image's merged
    #: grid; OneVision's pooled frames: their pooled grid; CLIP: the tower's square grid)
    unit_grid: list | None = None
    question_ids: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    _probe_fn: Callable = field(default=None, repr=False)
    #: host copy of ``unit`` (set by the engine) so that unit counts / indices need no device read
    _unit_host: torch.Tensor | None = field(default=None, repr=False)
    #: True inside a captured (CUDA-graph / ``torch.compile(fullgraph=True)``) prefill (``llava.fast.path``):
    #: a method must then read no device value (e.g. run its greedy loop on the device, not the host)
    captured: bool = False
    #: unit layouts planned on the host before the prefill ran, keyed ``(patch, stock, pos)`` as
    #: :meth:`unit_layout` asks for them (the fast path plans them; None: computed on request)
    layouts: dict | None = field(default=None, repr=False)
    #: what the method's :meth:`~llava.method.Method.plan_vision` drew on the host for this sample
    #: (e.g. random's picks), on the signals' device; empty unless the fast path planned it
    plan: dict = field(default_factory=dict, repr=False)
    #: Python values the method's :meth:`~llava.method.Method.plan_static` computed on the host from this
    #: sample's structure (part of the captured graph's key); None unless the fast path planned them
    static: tuple | None = field(default=None, repr=False)
    #: (T, L, D) Qwen3-VL's DeepStack rows of every candidate (carried with the selection by the engine;
    #: not a signal: methods do not read it); None for the other families
    deepstack: torch.Tensor | None = field(default=None, repr=False)
    #: (T,) bool: the candidates that survived the method's in-tower stage (``Method.tower_stage``; an extra [CLS]
    #: candidate: its unit's [CLS]; the others carry zero features); None without an in-tower stage
    in_tower_kept: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.num_stock < 0:
            self.num_stock = self.num_tokens

    def probe_attention(self, layer: int, queries: str = "question") -> torch.Tensor:
        """Query-aware cross-modal attention before pruning (ConsensusDrop's probe): run decoder
        layers 0..layer-1 on the full, unpruned prompt (no KV cache kept), then recompute layer
        ``layer``'s causal softmax rows (fp32) for the chosen text queries ("question",
        "all_post_image" or "last") from its norm + q/k + RoPE at the original positions.
        Returns (H, Q, T_stock): the probabilities on the visual tokens (columns of the full rows,
        so they sum to < 1; renormalise for a visual-only softmax). Cached per layer across
        samples (one batched pass). In a captured prefill (``captured``, :mod:`llava.fast.probe`) the Q rows
        are those of the whole padded text block whatever ``queries`` asks: read the query rows through the
        block's masks (:meth:`text_rows`; "last": its last real row), never by indexing."""
        if self._probe_fn is None:
            raise RuntimeError("probe_attention is only available inside the engine")
        return self._probe_fn(layer, queries)

    def unit_layout(self, patch: bool = False, stock: bool = False, pos: bool = False):
        """:func:`llava.ops.unit_layout` of this sample's tokens: with ``patch`` the [CLS] / patch split,
        with ``stock`` the extra [CLS] candidates after ``num_stock``, with ``pos`` the units' grid
        positions. The planned layout when the engine planned one on the host (no device read), else
        computed (one host read)."""
        if self.layouts is not None and (patch, stock, pos) in self.layouts:
            return self.layouts[(patch, stock, pos)]
        from .ops import unit_layout

        return unit_layout(self.unit, self.patch if patch else None, self.num_stock if stock else None,
                           self.unit_pos if pos else None)

    def text_rows(self, which: str = "all") -> tuple[torch.Tensor, torch.Tensor | None]:
        """The text after the visual block as (embeds (Tt, D), mask (Tt,) bool or None = every row):
        ``which`` "all" (every real row) or "question" (the question / instruction tokens). Use masked
        ops on the rows (e.g. :func:`llava.ops.text_to_image_score` ``mask=``), never ``embeds[mask]``:
        the fast path pads the block (``text_mask``), and a boolean index would sync."""
        if which not in ("all", "question"):
            raise ValueError(f"text rows must be 'all' or 'question', got {which!r}")
        mask = self.text_mask
        if which == "question":
            q = self.question_mask.to(self.text_embeds.device)
            mask = q if mask is None else (mask.to(q.device) & q)
        return self.text_embeds, mask

    @property
    def num_tokens(self) -> int:
        return int(self.unit.numel())

    @property
    def num_units(self) -> int:
        if self.layouts:  # planned on the host (fast path): no device read
            return next(iter(self.layouts.values())).num_units
        u = self._unit_host if self._unit_host is not None else self.unit
        return int(u.max()) + 1 if u.numel() and int(u.max()) >= 0 else 0

    @property
    def is_cls(self) -> torch.Tensor:
        return (self.patch < 0) & (self.unit >= 0)

    @property
    def is_newline(self) -> torch.Tensor:
        return self.unit < 0

    def unit_indices(self, u: int) -> torch.Tensor:
        """Indices (into the flat visual block) of unit ``u``'s tokens, in block order."""
        if self._unit_host is not None:
            idx = torch.nonzero(self._unit_host == u).flatten()
            return idx if self.unit.device.type == "cpu" else idx.to(self.unit.device, non_blocking=True)
        return torch.nonzero(self.unit == u).flatten()


@dataclass
class LLMSignals:
    """One sample's state entering decoder layer ``layer`` (after ``layer`` layers ran).

    hidden:       (S, D) hidden states of the sample's S real (non-padding) tokens.
    position_ids: (S,) their RoPE positions.
    visual:       (Nv,) indices into those S tokens of the current visual tokens, ascending.
    origin:       (Nv,) each current visual token's index in the sample's original flat visual
                  block (merged tokens carry their target's origin).
    text_after:   indices of the tokens after the last visual token.
    question:     indices of the question / instruction tokens (a subset of text_after).
    visual_embeds: (Nv, D) each current visual token's input to decoder layer 0 (merged tokens:
                  their target's), e.g. SparseVLM's rater selection.
    text_embeds:  (len(text_after), D) the text-after tokens' inputs to decoder layer 0.
    subblocks:    the sub-block states of the layers the method records (``Method.llm_subblock_layers``) that ran
                  since the previous stage, by layer (TransPrune's token transitions).
    num_visual_entry: visual tokens of the sample entering decoder layer 0 (before any llm stage).
    entry_visual_embeds: (num_visual_entry, D) all of them, as they entered layer 0.
    state:        a per-sample dict that lives for one prefill, shared by the method's stages
                  (e.g. SparseVLM's raters fixed at the first stage).
    prev_hidden:  (S, D) the same rows' input to decoder layer ``layer`` - 1 (the last layer that ran before the
                  stage, on these very rows): ``hidden - prev_hidden`` is that layer's residual update (V2Drop),
                  DeepStack's row included where Qwen3-VL adds one after that layer. Padded like ``hidden`` in a
                  captured prefill.

    In a captured prefill (``captured``, :mod:`llava.fast.llm`) the S rows are the sample's whole padded
    row of its length bucket (left padding first, the last prompt token last) and ``key_mask`` (S,) says
    which are real: ``attention`` never lets a row attend to a pad, so its probabilities are those of the
    real rows; ``visual`` indexes that row. For a method with ``llm_text_rows`` the text after the image
    is planned too: ``text_after`` padded to a text bucket, ``text_mask`` its real rows (the pads index
    row 0), ``num_text_after`` their count; otherwise it is None. Such a method may ask for
    ``attention("text_after")``: the pads' rows are row 0's (NaN where row 0 is a pad), so it reads them
    through ``text_mask`` (``torch.where``, never a product). The question rows as attention queries are not
    planned: asking for them raises, and the prefill runs on the eager engine.
    """

    layer: int
    hidden: torch.Tensor
    position_ids: torch.Tensor
    visual: torch.Tensor
    origin: torch.Tensor
    text_after: torch.Tensor
    question: torch.Tensor
    visual_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    num_visual_entry: int = 0
    entry_visual_embeds: torch.Tensor | None = None
    state: dict = field(default_factory=dict)
    prev_hidden: torch.Tensor | None = None
    #: the sample's vision-stage signals (with cls_attn / keys when the method sets
    #: ``needs_vision_attention``); ``origin`` indexes into them
    vision: "VisionSignals | None" = None
    #: True inside a captured prefill (:mod:`llava.fast.llm`): padded rows, ``key_mask``, no host read
    captured: bool = False
    #: (S,) bool, the real rows among the S (captured prefill); None: all S rows are real
    key_mask: torch.Tensor | None = None
    #: (len(text_after),) bool, the real rows of a padded ``text_after`` (captured prefill); None: all real
    text_mask: torch.Tensor | None = None
    #: ``Method.llm_subblock_layers``: {decoder layer: :class:`llava.subblocks.SubBlockStates`} of the layers that
    #: ran since the previous stage (their attention / feed-forward sub-modules' inputs and outputs, (S, D) each,
    #: the same S rows as ``hidden``, the model's dtype); {} when the method names none
    subblocks: dict = field(default_factory=dict)
    _num_text: int | None = field(repr=False, default=None)
    _attn_fn: Callable[..., torch.Tensor] = field(repr=False, default=None)
    _keys_fn: Callable[..., torch.Tensor] = field(repr=False, default=None)
    _qv_fn: Callable[..., torch.Tensor] = field(repr=False, default=None)
    _norm: Callable[..., torch.Tensor] = field(repr=False, default=None)
    _grad_fn: Callable[..., torch.Tensor] = field(repr=False, default=None)
    _cache: dict = field(repr=False, default_factory=dict)

    @property
    def num_visual(self) -> int:
        return int(self.visual.numel())

    @property
    def num_text_after(self) -> int:
        """Tokens after the image (a host int on both paths; ``text_after`` may be padded)."""
        return self._num_text if self._num_text is not None else int(self.text_after.numel())

    def attention(self, queries: torch.Tensor | str, layer: Literal["next", "prev"] = "next",
                  logits: Literal["fp32", "model", "model_scaling", "python_sdpa"] = "fp32",
                  causal: bool = True) -> torch.Tensor:
        """Causal attention probabilities (H, Q, S) of the given query rows.

        ``queries``: indices into the S tokens, or "last" (last prompt token), "question",
        "text_after", "visual". ``layer``: "next" uses decoder layer ``layer``'s norm + q/k on the
        current hidden states (PyramidDrop / VisionDrop); "prev" is layer ``layer``-1's own
        attention (FastV): the queries projected from its input, the keys it wrote into its KV cache (recomputed
        where there is no usable cache, :func:`llava.attention_rows.cached_kv`). ``logits`` (:func:`llava.attention_rows.causal_attention_rows`): "fp32" (ours: q k^T in
        fp32, fp32 probabilities) or "model" (the eager attention of LLaVA's LlamaAttention, which the official
        code of the in-LLM methods reads: q k^T and / sqrt(d) in the model's dtype, the softmax in fp32 cast back
        to that dtype; reference modes), "model_scaling" (the same with ``q k^T * scaling``, transformers' later eager
        product: PriorTR's official Qwen code) or "python_sdpa" (PyTorch's Python reference SDPA, the softmax in the model's
        dtype: SparseVLM's fork). ``causal=False``: every row over all the tokens (a reference mode's reproduction of
        an official look-ahead that adds no mask; :func:`llava.attention_rows.causal_attention_rows`). Cached per (queries, layer, logits,
        causal).
        """
        q = self._resolve(queries)
        if logits not in ATTENTION_LOGITS:
            raise ValueError(f"attention logits must be one of {ATTENTION_LOGITS}, got {logits!r}")
        kw = {} if logits == "fp32" else {"logits": logits}
        if not causal:
            kw["causal"] = False
        if self.captured and not isinstance(queries, str):  # keyed by value would read the device
            return self._attn_fn(q, layer, **kw)
        key = (queries if isinstance(queries, str) else tuple(q.tolist()), layer, logits, causal)
        if key not in self._cache:
            self._cache[key] = self._attn_fn(q, layer, **kw)
        return self._cache[key]

    def keys(self, layer: Literal["next", "prev"] = "next", rope: bool = True) -> torch.Tensor:
        """Keys (S, H_kv, d) of the given layer for all tokens (RoPE-rotated unless rope=False)."""
        key = ("keys", layer, rope)
        if key not in self._cache:
            self._cache[key] = self._keys_fn(layer, rope)
        return self._cache[key]

    def queries(self, queries: torch.Tensor | str, layer: Literal["next", "prev"] = "next",
                rope: bool = True) -> torch.Tensor:
        """Queries (H, Q, d) of the given rows (as :meth:`attention` resolves them) in the given layer, in the
        model dtype (RoPE-rotated unless rope=False): FlowCut's LLaVA-NeXT stage scores the visual keys / values
        against the last prompt token's own (softmax over the visual columns only, not a causal row)."""
        if self._qv_fn is None:
            raise RuntimeError("LLMSignals.queries is only available inside the engine")
        q = self._resolve(queries)
        if self.captured and not isinstance(queries, str):  # keyed by value would read the device
            return self._qv_fn("queries", layer, q, rope)
        key = ("queries", queries if isinstance(queries, str) else tuple(q.tolist()), layer, rope)
        if key not in self._cache:
            self._cache[key] = self._qv_fn("queries", layer, q, rope)
        return self._cache[key]

    def values(self, layer: Literal["next", "prev"] = "next") -> torch.Tensor:
        """Values (S, H_kv, d) of the given layer for all tokens (its v projection of its normed input), in the
        model dtype."""
        if self._qv_fn is None:
            raise RuntimeError("LLMSignals.values is only available inside the engine")
        key = ("values", layer)
        if key not in self._cache:
            self._cache[key] = self._qv_fn("values", layer)
        return self._cache[key]

    def rotary(self, layer: Literal["next", "prev"] = "next", fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of these tokens' RoPE positions as the model's rotary embedding gives them to that layer: (S, d),
        or (3, S, d) for M-RoPE before the sections are merged (IVC-Prune's implicit visual coordinates); in the
        model's dtype, or fp32."""
        if self._qv_fn is None:
            raise RuntimeError("LLMSignals.rotary is only available inside the engine")
        key = ("rotary", layer, fp32)
        if key not in self._cache:
            self._cache[key] = self._qv_fn("rotary", layer, None, fp32)
        return self._cache[key]

    def final_norm(self) -> torch.Tensor:
        """``hidden`` passed through the LLM's final norm (S, D) (DART's similarity space)."""
        if "final_norm" not in self._cache:
            self._cache["final_norm"] = self._norm(self.hidden)
        return self._cache["final_norm"]

    def grad_saliency(self, rows: str = "shifted", num_rows: int = 4, layer: Literal["next", "prev"] = "next",
                      reduce: str | None = "l2", dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Gradient saliency of the current tokens for a layer-local proxy loss (TRIO / PIO-FVLM,
        :func:`llava.proxy_grad.proxy_loss_grad`): decoder layer ``layer`` ("next": layer K, whose input these hidden states are;
        "prev": layer K-1 re-run on them, the official Qwen2.5-VL quirk), the final norm and ``lm_head`` on the
        proxy rows, cross-entropy against each row's own argmax, differentiated w.r.t. the hidden states only.

        ``rows``: "shifted" (official: the ``num_rows`` rows before the last prompt row, as the official
        ``logits[:, :-1]`` shift leaves them) or "last" (the last ``num_rows`` prompt rows). ``reduce``: "l2"
        (official ``grad.norm(p=2, dim=-1)``) -> (Nv,) for the visual tokens, or None -> the raw gradient
        (S, D) in the model dtype. ``dtype``: the dtype the norm is taken in (fp32 ours; the model dtype is the
        official ``grad.to(features.dtype).norm()``). Eager engine only (``captured`` raises). Cached per call."""
        if self.captured:
            raise NotImplementedError("LLMSignals.grad_saliency: a backward pass inside a captured prefill is not "
                                      "supported (the method runs on the eager engine)")
        if self._grad_fn is None:
            raise RuntimeError("grad_saliency is only available inside the engine")
        key = ("grad", rows, int(num_rows), layer)
        if key not in self._cache:
            pr = proxy_rows(self.hidden.shape[0], rows, num_rows, self.hidden.device)
            self._cache[key] = self._grad_fn(pr, layer)
        g = self._cache[key]
        if reduce is None:
            return g
        if reduce != "l2":
            raise ValueError(f"grad_saliency: reduce must be 'l2' or None, got {reduce!r}")
        g = g[self.visual]
        return g.to(dtype if dtype is not None else g.dtype).norm(p=2, dim=-1)

    def _resolve(self, queries: torch.Tensor | str) -> torch.Tensor:
        if isinstance(queries, str):
            if queries == "last":
                return torch.full((1,), self.hidden.shape[0] - 1, dtype=torch.long, device=self.hidden.device)
            if self.captured and (queries == "question" or (queries == "text_after" and self.text_after is None)):
                raise NotImplementedError(f"LLMSignals: the {queries!r} rows of an in-LLM stage are not planned on "
                                          "the fast path (the prefill runs on the eager engine)")
            if queries in ("question", "text_after", "visual"):
                return getattr(self, queries)
            raise ValueError(f"unknown query set {queries!r}")
        return torch.as_tensor(queries, dtype=torch.long, device=self.hidden.device)
