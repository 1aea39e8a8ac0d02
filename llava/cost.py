"""The analytic cost of a prefill: decoder MACs per layer under the two conventions the papers use (A: FastV /
DivPrune, B: SparseVLM), grouped-query and hybrid (Gated DeltaNet) decoders, and KV-cache elements per token. Pure
functions of a model config and lengths; nothing here runs a model. The evaluation records each sample's cost with
them (``prefill_tflops``, ``kv_mb``: :func:`sample_cost`), the efficiency benchmark (``bench.efficiency``, which adds
its roofline) checks them against measured caches; docs/efficiency.md says what is counted."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["layer_macs", "HybridSpec", "hybrid_spec", "linear_layer_macs", "prefill_macs", "llm_dims",
           "kv_bytes_per_token", "attention_layers", "sample_cost", "prompt_kv_bytes"]


def layer_macs(n: int, d: int, m: int, convention: str, d_kv: int | None = None) -> float:
    """Multiply-accumulates of one decoder layer at sequence length n. A (FastV / DivPrune):
    4nd^2 + 2n^2d + 2ndm; B (SparseVLM, exact for LLaMA's 3-matrix SwiGLU): 4nd^2 + 2n^2d + 3ndm.

    ``d_kv`` (= num_key_value_heads x head_dim) < d for grouped-query attention (Qwen2: 4 KV heads of
    28): the k and v projections cost n d d_kv each, so 4nd^2 becomes 2nd^2 + 2nd d_kv; the attention
    products stay 2n^2d (every query head attends; d = num_heads x head_dim). None = d (LLaMA MHA).
    Bias additions (Qwen2's q/k/v biases) are not MACs and are not counted."""
    ffn = {"A": 2, "B": 3}[convention]
    dkv = d if d_kv is None else d_kv
    return 2 * n * d * d + 2 * n * d * dkv + 2 * n * n * d + ffn * n * d * m


@dataclass(frozen=True)
class HybridSpec:
    """A hybrid decoder (Qwen3.5): each layer's kind, the gated full-attention query (q_proj also emits a per-head
    output gate: n d d_attn more MACs) and the Gated DeltaNet layers' widths."""

    kinds: tuple  # per layer: "full" or "linear"
    hidden: int
    q_gate: bool
    key_dim: int  # linear_num_key_heads x linear_key_head_dim
    value_dim: int  # linear_num_value_heads x linear_value_head_dim
    v_heads: int
    head_k: int
    head_v: int
    kernel: int


def hybrid_spec(cfg) -> HybridSpec | None:
    """The :class:`HybridSpec` of a model config whose decoder has linear-attention layers; None otherwise."""
    tc = cfg.text_config
    types = list(getattr(tc, "layer_types", None) or [])
    if "linear_attention" not in types:
        return None
    return HybridSpec(kinds=tuple("linear" if t == "linear_attention" else "full" for t in types), hidden=tc.hidden_size,
                      q_gate=True, key_dim=tc.linear_num_key_heads * tc.linear_key_head_dim,
                      value_dim=tc.linear_num_value_heads * tc.linear_value_head_dim, v_heads=tc.linear_num_value_heads,
                      head_k=tc.linear_key_head_dim, head_v=tc.linear_value_head_dim, kernel=tc.linear_conv_kernel_dim)


def linear_layer_macs(n: int, spec: HybridSpec, m: int, convention: str) -> float:
    """MACs of one Gated DeltaNet layer at length n, in its recurrent form: the projections (qkv d(2K + V), z d V,
    the a / b gates 2 d H_v, out V d), the depthwise causal conv (2K + V) x kernel, per value head and token the
    delta rule's state read, update and output 3 d_k d_v, and the FFN (as in :func:`layer_macs`). Linear in n:
    no n^2 term (the chunked kernel reorders the same products)."""
    ffn = {"A": 2, "B": 3}[convention]
    d, k, v = spec.hidden, spec.key_dim, spec.value_dim
    proj = d * (2 * k + v) + d * v + 2 * d * spec.v_heads + v * d
    return n * (proj + (2 * k + v) * spec.kernel + 3 * spec.v_heads * spec.head_k * spec.head_v + ffn * d * m)


def prefill_macs(lengths: list[int], d: int, m: int, convention: str, d_kv: int | None = None,
                 spec: HybridSpec | None = None) -> float:
    """LLM prefill MACs for the per-layer sequence lengths (vision tower, projector, LM head excluded); ``spec``:
    a hybrid decoder's layer kinds (Gated DeltaNet layers by :func:`linear_layer_macs`, gated attention layers by
    :func:`layer_macs` plus the gate's n d^2)."""
    if spec is None:
        return float(sum(layer_macs(n, d, m, convention, d_kv) for n in lengths))
    total = 0
    for n, kind in zip(lengths, spec.kinds):
        if kind == "linear":
            total += linear_layer_macs(n, spec, m, convention)
        else:
            total += layer_macs(n, d, m, convention, d_kv) + (n * spec.hidden * d if spec.q_gate else 0)
    return float(total)


def llm_dims(cfg) -> tuple[int, int, int, int]:
    """(d, m, L, d_kv) of the LLM of a model config (any family: text_config holds the decoder)."""
    tc = cfg.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    d = tc.num_attention_heads * head_dim
    kv = getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    return d, tc.intermediate_size, tc.num_hidden_layers, kv * head_dim


def kv_bytes_per_token(cfg) -> int:
    """Key + value elements per prompt token over all layers with a KV cache (a hybrid model's linear-attention
    layers keep a fixed-size state instead)."""
    tc = cfg.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return 2 * len(attention_layers(cfg)) * tc.num_key_value_heads * head_dim


def attention_layers(cfg) -> list[int]:
    """The decoder layers with attention and a KV cache (all but a hybrid model's linear-attention layers)."""
    tc = cfg.text_config
    types = list(getattr(tc, "layer_types", None) or [])
    return [i for i in range(tc.num_hidden_layers) if not types or types[i] != "linear_attention"]


def sample_cost(cfg, text_tokens: int, visual_per_layer: list[int], dtype_bytes: int) -> dict:
    """One sample's prefill cost from its token counts: each decoder layer runs on the text tokens and that layer's
    visual tokens. ``prefill_tflops``: 2 x the convention-A MACs (vision tower, projector and LM head excluded),
    in 10^12; ``kv_mb``: the key and value bytes its prompt leaves in the cache (the attention layers), in MiB."""
    d, m, _, d_kv = llm_dims(cfg)
    lengths = [text_tokens + v for v in visual_per_layer]
    macs = prefill_macs(lengths, d, m, "A", d_kv, hybrid_spec(cfg))
    return {"prefill_tflops": 2 * macs / 1e12, "kv_mb": prompt_kv_bytes(cfg, lengths, dtype_bytes) / 2 ** 20}


def prompt_kv_bytes(cfg, lengths: list[int], dtype_bytes: int) -> int:
    """The key and value bytes a prompt leaves in the cache: each attention layer's k + v for the ``lengths[i]``
    tokens that layer ran on (a linear-attention layer keeps a fixed-size state instead)."""
    attn = attention_layers(cfg)
    per_token_layer = kv_bytes_per_token(cfg) // len(attn) * dtype_bytes  # one layer's k + v of one token, in bytes
    return per_token_layer * sum(lengths[i] for i in attn if i < len(lengths))
