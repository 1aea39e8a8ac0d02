"""Attention rows recomputed from a decoder layer's own norm + q / k projections + RoPE (:class:`LayerQK`), as the
layer computes them, and their causal softmax (:func:`causal_attention_rows`, fp32 or the official eager arithmetic):
what the LLM signals, the vision stage's probe and the fast path read. Apart from :mod:`llava.signals` so that
the signals' dataclasses stay one file; import them from either.

A stage that reads the layer that has just run ("prev") takes that layer's keys and values from its KV cache
(:func:`cached_kv`), where the layer wrote exactly what a recompute would give, and recomputes only the queries of
the rows it asks for: a whole-sequence k (and v) projection less per stage and sample. A layer that has not run on
those rows ("next"), a missing or unusual cache and tensor parallelism recompute."""

from __future__ import annotations

import math
import sys
from typing import Callable

import torch

from transformers.cache_utils import (DynamicLayer, DynamicSlidingWindowLayer, StaticLayer,
                                     StaticSlidingWindowLayer)

from .tp_shards import full_width, sharded_module


def rope_fn_for(attn_module: torch.nn.Module) -> Callable:
    """The model family's own ``apply_rotary_pos_emb`` (Llama, Mistral, Qwen2 ... define one)."""
    mod = sys.modules[type(attn_module).__module__]
    fn = getattr(mod, "apply_rotary_pos_emb", None)
    if fn is None:
        raise TypeError(f"{type(attn_module).__name__}: no apply_rotary_pos_emb in {mod.__name__}")
    return fn


def _head_norm(attn: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The layer's own per-head norm of its queries / keys (``q_norm`` / ``k_norm``: Qwen3 and Qwen3-VL text
    models, InternVL3.5's Qwen3, RMSNorm over head_dim after the projection, before RoPE); x (1, S, H, d).
    Identity where the layer has none (Llama, Qwen2)."""
    norm = getattr(attn, name, None)
    return x if norm is None else norm(x)


class LayerQK:
    """Queries and keys of one decoder ``layer`` over one sequence x (S, D), computed as the layer does
    (input_layernorm, q / k projection, the per-head q / k norm where the layer has one, RoPE at ``pos``),
    each piece once: the normed input, the keys
    (with and without RoPE) and the rotary tables are kept, so the several signals of one llm stage
    (attention rows for two row sets, the keys a merge compares) share one k projection. ``cached``: the layer's
    own keys (after RoPE) and values of x, read from its KV cache after it ran on x (:class:`CachedRows`): then
    ``keys()`` and ``values()`` are those and only the queries are projected."""

    def __init__(self, layer: torch.nn.Module, x: torch.Tensor, rotary: torch.nn.Module, pos: torch.Tensor,
                 cached: "CachedRows | None" = None):
        self.layer, self.x, self.rotary, self.pos = layer, x, rotary, pos
        if not hasattr(layer, "self_attn"):
            raise ValueError(f"decoder layer {getattr(layer, 'layer_idx', '?')} ({type(layer).__name__}, "
                             f"{getattr(layer, 'block_type', 'no attention')}) has no attention to read: a hybrid "
                             "model's linear-attention layer; read a full-attention layer")
        self.attn = layer.self_attn
        self._xn = self._k = self._k_rope = self._cs = self._v = None
        self.cached = cached

    def _normed(self) -> torch.Tensor:
        if self._xn is None:
            self._xn = self.layer.input_layernorm(self.x)[None]  # (1, S, D)
        return self._xn

    def _project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """The layer's q / k projection of x with all heads: under tensor parallelism the ranks' column
        shards are gathered (:func:`llava.tp_shards.full_width`); a width other than the config's heads is refused
        (a signal is never read from one rank's heads)."""
        y = full_width(getattr(self.attn, name), x)
        cfg = getattr(self.attn, "config", None)
        heads = getattr(cfg, "num_attention_heads" if name == "q_proj" else "num_key_value_heads", None)
        widths = (1, 2) if name == "q_proj" else (1,)  # Qwen3.5's q_proj: per head the query and its gate
        if heads is not None and y.shape[-1] not in [w * heads * self.attn.head_dim for w in widths]:
            raise RuntimeError(f"decoder layer {getattr(self.attn, 'layer_idx', '?')}: {name} gives {y.shape[-1]} "
                               f"features, not the {heads} heads x {self.attn.head_dim} of the config (a sharded "
                               "projection that was not gathered?)")
        return y

    def _cos_sin(self):
        if self._cs is None:  # (S,) -> (1, S); M-RoPE (3, S) -> (3, 1, S)
            self._cs = self.rotary(self.x[None], self.pos.unsqueeze(-2))
        return self._cs

    def rotary_tables(self, fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) at ``pos`` as the model's rotary embedding gives them to this layer: (S, d); for M-RoPE (3, S, d),
        one table per position row before the sections are merged (transformers 4's Qwen2.5-VL rotary returns these;
        5's merges them inside: here each row's table is ``cat(f, f)`` of its angles, f = pos * inv_freq in fp32, times
        the attention scaling, as 4's computes it); in the model's dtype, or fp32."""
        dtype = torch.float32 if fp32 else self.x.dtype
        if self.pos.dim() == 2:  # M-RoPE: (3, S) position rows
            inv = self.rotary.inv_freq.to(device=self.x.device, dtype=torch.float32)
            f = self.pos.float()[..., None] * inv  # (3, S, d / 2)
            emb = torch.cat((f, f), dim=-1)
            scale = getattr(self.rotary, "attention_scaling", 1.0)
            return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
        cos, sin = self._cos_sin() if not fp32 else self.rotary(self.x[None].float(), self.pos.unsqueeze(-2))
        return cos.squeeze(-3), sin.squeeze(-3)

    def keys(self, rope: bool = True) -> torch.Tensor:
        """(H_kv, S, d)."""
        if rope and self._k_rope is None and self.cached is not None:
            self._k_rope = self.cached.read("keys")[None]
        if rope and self._k_rope is not None:
            return self._k_rope[0]
        if self._k is None:
            k = self._project("k_proj", self._normed()).view(1, self.x.shape[0], -1, self.attn.head_dim)
            self._k = _head_norm(self.attn, "k_norm", k).transpose(1, 2)
        if not rope:
            return self._k[0]
        cos, sin = self._cos_sin()
        _, self._k_rope = rope_fn_for(self.attn)(self._k, self._k, cos, sin)
        return self._k_rope[0]

    def values(self) -> torch.Tensor:
        """(H_kv, S, d): the layer's value projection of its normed input (no RoPE, no norm), as the layer's
        attention computes its values."""
        if self._v is None and self.cached is not None:
            self._v = self.cached.read("values")[None]
        if self._v is None:
            v = self._project("v_proj", self._normed())
            self._v = v.view(1, self.x.shape[0], -1, self.attn.head_dim).transpose(1, 2)
        return self._v[0]

    def queries(self, rows: torch.Tensor, rope: bool = True) -> torch.Tensor:
        """(H, Q, d) for the sequence positions ``rows``."""
        d = self.attn.head_dim
        q = self._project("q_proj", self._normed()[:, rows])
        heads = getattr(getattr(self.attn, "config", None), "num_attention_heads", None)
        if heads is not None and q.shape[-1] == 2 * heads * d:  # Qwen3.5: per head, the query then its output gate
            q = q.view(1, rows.numel(), heads, 2 * d)[..., :d]
        else:
            q = q.view(1, rows.numel(), -1, d)
        q = _head_norm(self.attn, "q_norm", q).transpose(1, 2)  # (1, H, Q, d)
        if rope:
            cos, sin = self._cos_sin()
            _, q = rope_fn_for(self.attn)(q, q, cos[:, rows], sin[:, rows])
        return q[0]


def _whole(layer) -> bool:
    """Whether a cache layer's ``keys`` / ``values`` hold every row its attention ran on, as it computed them: a
    dynamic or static layer (a hybrid model's full-attention layer too); not a sliding window (it drops rows) nor a
    quantized layer (other numbers)."""
    kind = type(layer)
    if isinstance(layer, (DynamicSlidingWindowLayer, StaticSlidingWindowLayer)):
        return False
    return kind in (DynamicLayer, StaticLayer) or (isinstance(layer, (DynamicLayer, StaticLayer))
                                                   and "FullAttention" in kind.__name__)


class CachedRows:
    """One sample's rows of a decoder layer's KV cache (:func:`cached_kv`), read when first asked: ``read("keys")``
    (after RoPE) or ``read("values")``, (H_kv, S, d) each, a contiguous copy. ``rows``: the sample's rows among the
    layer's slots (an index tensor, or a slice of a padded bucket)."""

    def __init__(self, layer, b: int, rows):
        self.layer, self.b, self.rows = layer, b, rows

    def read(self, which: str) -> torch.Tensor:
        return getattr(self.layer, which)[self.b, :, self.rows].contiguous()


def cached_kv(cache, lm: torch.nn.Module, layer: int, width: int):
    """The KV-cache layer of decoder ``layer`` of ``lm`` when its first ``width`` slots hold the keys (after RoPE)
    and values of the ``width`` rows the layer has just run on, usable in place of a recompute (:class:`LayerQK`'s
    ``cached``); else None: no cache, an offloaded cache, a layer without attention (a hybrid model's linear
    layer), a sliding-window or quantized layer, a dynamic layer longer than this prefill's rows (a cache that held
    tokens before the prompt), or a tensor-parallel attention (each rank's cache holds its own heads)."""
    if cache is None or getattr(cache, "offloading", False) or not 0 <= layer < len(getattr(cache, "layers", ())):
        return None
    attn = getattr(lm.layers[layer], "self_attn", None)
    c = cache.layers[layer]
    if attn is None or not _whole(c):
        return None
    k = getattr(c, "keys", None)
    if not isinstance(k, torch.Tensor) or k.dim() != 4 or k.shape[2] < width or \
            (not isinstance(c, StaticLayer) and k.shape[2] != width):
        return None
    # tensor parallelism (DeepSpeed AutoTP) needs the process group: without one, no attention is sharded
    if torch.distributed.is_available() and torch.distributed.is_initialized() and sharded_module([attn]) is not None:
        return None
    return c


def llm_attention_fns(lm: torch.nn.Module, layer: int, x: torch.Tensor, x_prev: torch.Tensor | None,
                      pos: torch.Tensor, key_mask: torch.Tensor | None = None,
                      prev_kv: CachedRows | None = None) -> tuple[Callable, Callable, Callable]:
    """The ``_attn_fn`` / ``_keys_fn`` / ``_qv_fn`` of :class:`LLMSignals` for one sample entering decoder ``layer`` of
    the language model ``lm``: x (S, D) its hidden states ("next": this layer's q / k), ``x_prev`` its input
    to layer - 1 ("prev"), ``pos`` their positions; each layer's q / k pieces computed once
    (:class:`LayerQK`). ``key_mask`` (S,): the real rows of a padded row (the fast path), never attended.
    ``prev_kv``: layer - 1's cache rows of these S rows (:class:`CachedRows`): the "prev" reads take its keys and
    values from there and project only their queries."""
    qks: dict[str, LayerQK] = {}

    def pick(which) -> LayerQK:
        if which not in ("next", "prev"):
            raise ValueError(f"layer must be 'next' or 'prev', got {which!r}")
        if which not in qks:
            qks[which] = LayerQK(lm.layers[layer] if which == "next" else lm.layers[layer - 1],
                                 x if which == "next" else x_prev, lm.rotary_emb, pos,
                                 cached=prev_kv if which == "prev" else None)
        return qks[which]

    def attn_fn(rows, which, logits="fp32", causal=True):
        qk = pick(which)
        return causal_attention_rows(qk.queries(rows), qk.keys(), rows, qk.attn.scaling, key_mask, logits=logits,
                                     causal=causal)

    def keys_fn(which, rope):
        return pick(which).keys(rope).transpose(0, 1)

    def qv_fn(kind, which, rows=None, rope=True):  # queries (H, Q, d) of ``rows`` / values (S, H_kv, d) / rotary
        qk = pick(which)
        if kind == "rotary":  # the rotary tables at the rows' positions, the model's dtype or fp32 (``rope``)
            return qk.rotary_tables(fp32=rope)
        return qk.queries(rows, rope) if kind == "queries" else qk.values().transpose(0, 1)

    return attn_fn, keys_fn, qv_fn


def llm_qk(layer: torch.nn.Module, x: torch.Tensor, rotary: torch.nn.Module, pos: torch.Tensor,
           rows: torch.Tensor | None, rope: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Queries for ``rows`` and keys for all tokens of one sequence, as decoder ``layer`` computes
    them (input_layernorm, q/k projection, RoPE at ``pos``). x: (S, D). Returns q (H, Q, d) or
    None, k (H_kv, S, d). (:class:`LayerQK` keeps the pieces for several calls.)"""
    qk = LayerQK(layer, x, rotary, pos)
    k = qk.keys(rope)
    return (None if rows is None else qk.queries(rows, rope)), k


def probe_rows(layer: torch.nn.Module, x: torch.Tensor, rotary: torch.nn.Module, pos: torch.Tensor, rows: torch.Tensor,
               vis: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(H, Q, T) fp32: decoder ``layer``'s causal softmax rows of the queries ``rows`` of one sequence x (S, D) at
    ``pos``, on its visual rows ``vis``: a vision stage's ``probe_attention``, in both executors. ``key_mask`` (S,):
    the real rows of a padded row, never attended."""
    qk = LayerQK(layer, x, rotary, pos)
    return causal_attention_rows(qk.queries(rows), qk.keys(), rows, qk.attn.scaling, key_mask)[:, :, vis]


def sample_probe(lm, rows_at, query_rows, vis: torch.Tensor, key_mask: torch.Tensor | None = None):
    """One sample's ``VisionSignals.probe_attention`` in both executors: ``probe(layer, queries)`` -> :func:`probe_rows`
    of decoder ``layer`` of ``lm`` over the sample's rows entering it and their positions (``rows_at(layer)``, which
    raises for a layer it cannot give), the query rows ``query_rows(queries)``, on its visual rows ``vis``;
    ``key_mask``: a padded row's real rows."""
    def probe(layer: int, queries: str = "question") -> torch.Tensor:
        x, pos = rows_at(layer)
        return probe_rows(lm.layers[layer], x, lm.rotary_emb, pos, query_rows(queries), vis, key_mask)
    return probe


#: the arithmetic of :func:`causal_attention_rows`: "fp32" (ours), "model" (the official eager attention of
#: transformers 4.31-4.37), "model_scaling" (transformers' later eager product, ``q k^T * scaling``) or
#: "python_sdpa" (PyTorch's Python reference of SDPA, in the model's dtype: :mod:`llava.python_sdpa`)
ATTENTION_LOGITS = ("fp32", "model", "model_scaling", "python_sdpa")


def causal_attention_rows(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float,
                          key_mask: torch.Tensor | None = None, logits: str = "fp32", causal: bool = True) -> torch.Tensor:
    """softmax(q k^T * scale) over keys 0..row (causal). q (H, Q, d), k (H_kv, S, d) -> (H, Q, S).
    ``key_mask`` (S,) bool: only those keys are attended to (a padded row's real tokens). ``causal=False``: over every
    key (``key_mask`` still applies): the rows an official look-ahead computes when transformers hands it no mask
    (SDPA / FlashAttention at batch 1 skip the causal mask and use ``is_causal``: PriorTR's Qwen code adds the mask
    only when there is one).

    ``logits="fp32"`` (ours): q and k cast to fp32, fp32 probabilities. ``"model"``: as LLaVA's eager
    ``LlamaAttention`` (transformers 4.31-4.37, the code PyramidDrop, VScan and DUET-VLM modify and read their rows
    from): ``torch.matmul(q, k^T)`` in q's dtype (fp16 in a half-precision run), ``/ math.sqrt(d)`` in that dtype
    (where ``scale`` is d^-1/2, else ``* scale``), the masked keys at -inf (the official additive mask's finfo.min
    gives the same zeros), ``softmax(dim=-1, dtype=torch.float32).to(q.dtype)``: probabilities in the model's
    dtype. ``"model_scaling"``: the same in the model's dtype with the product ``* scale`` whatever ``scale`` is, as
    transformers >= 4.48's ``eager_attention_forward`` and the code that copies it (PriorTR's Qwen3-VL score layer:
    ``torch.matmul(q, k^T) * scaling``, fp32 softmax cast back). ``"python_sdpa"``: as :func:`llava.python_sdpa.python_sdpa_attention` (SparseVLM's fork in every
    layer): ``q @ k^T`` in q's dtype, ``* (1 / math.sqrt(d))``, the masked keys at -inf, ``torch.softmax`` in that
    dtype. What is left is the GEMM's summation order, which is the device's (CUDA's is not a CPU's)."""
    h, hkv = q.shape[0], k.shape[0]
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=0)
    if logits == "model":
        d = q.shape[-1]
        scores = torch.matmul(q, k.to(q.dtype).transpose(-1, -2))
        scores = scores / math.sqrt(d) if abs(scale - d ** -0.5) < 1e-12 else scores * scale
    elif logits == "model_scaling":
        scores = torch.matmul(q, k.to(q.dtype).transpose(-1, -2)) * scale
    elif logits == "python_sdpa":
        scores = torch.matmul(q, k.to(q.dtype).transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]))
    elif logits == "fp32":
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    else:
        raise ValueError(f"attention logits must be one of {ATTENTION_LOGITS}, got {logits!r}")
    s = k.shape[1]
    future = torch.arange(s, device=q.device)[None, :] > rows.to(q.device)[:, None]  # (Q, S)
    if not causal:
        future = torch.zeros_like(future)
    if key_mask is not None:
        future = future | ~key_mask.to(q.device)[None, :]
    scores = scores.masked_fill(future[None], float("-inf"))
    if logits in ("model", "model_scaling"):
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.softmax(scores, dim=-1)  # fp32, or python_sdpa's in q's dtype
