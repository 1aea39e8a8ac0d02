"""The analytic model of the efficiency benchmark (docs/efficiency.md, "What is measured, and how"): prefill
MACs per decoder layer under the two conventions (A: FastV / DivPrune, B: SparseVLM), grouped-query and
hybrid (Gated DeltaNet) decoders, KV-cache bytes per token, and the roofline ``T(n) = max(T_floor, a + k F(n))``
fitted to the unpruned model's measured LLM prefill times (:func:`fit_roofline`). Pure functions of a model
config and lengths; nothing here runs a model."""

from __future__ import annotations

from dataclasses import dataclass, field


# ------------------------------------------------------------------------------------------------
# analytic formulas (docs/efficiency.md: analytic FLOPs, KV bytes per token)
# ------------------------------------------------------------------------------------------------


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


def cache_bytes(cache) -> tuple[int, list]:
    """Bytes of all key and value tensors of a transformers cache, and each layer's length (None for a hybrid
    model's linear-attention layer: a state, no length)."""
    total, lengths = 0, []
    for layer in cache.layers:
        if not hasattr(layer, "keys"):
            lengths.append(None)
            continue
        total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        lengths.append(int(layer.keys.shape[-2]))
    return total, lengths


# ------------------------------------------------------------------------------------------------
# roofline cost model
# ------------------------------------------------------------------------------------------------


@dataclass
class Roofline:
    """T(n) = max(floor, a + k F(n)) for one full-LLM prefill of length n (seconds)."""

    floor: float
    a: float
    k: float
    d: int
    m: int
    layers: int
    points: list = field(default_factory=list)  # measured (n, seconds)
    d_kv: int | None = None  # grouped-query attention: k/v width (None = d)
    spec: HybridSpec | None = None  # a hybrid decoder's layer kinds

    def macs(self, n: int) -> float:
        return prefill_macs([n] * self.layers, self.d, self.m, "B", self.d_kv, self.spec)

    def full(self, n: int) -> float:
        return max(self.floor, self.a + self.k * self.macs(n))

    def per_layer(self, lengths: list[int]) -> float:
        """Predicted prefill time for per-layer lengths: each layer costs T(n_l) / L."""
        return sum(self.full(n) for n in lengths) / self.layers

    def ridge(self) -> float | None:
        """Sequence length where the FLOPs-bound line crosses the weight-read floor (None if no floor)."""
        if self.floor <= self.a or self.k <= 0:
            return None
        lo, hi = 1, 1 << 20
        while lo < hi:
            mid = (lo + hi) // 2
            if self.a + self.k * self.macs(mid) >= self.floor:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def describe(self) -> str:
        r = self.ridge()
        regime = (f"weight-read-bound below n = {r} tokens, FLOPs-bound above" if r
                  else "FLOPs-bound over the whole measured range")
        return (f"T(n) = max({self.floor * 1e3:.3f} ms, {self.a * 1e3:.3f} ms + {self.k * 1e15:.4f} ms/TMAC x F_B(n)); "
                f"{regime}")


def fit_roofline(points: list[tuple[int, float]], d: int, m: int, layers: int, d_kv: int | None = None,
                 spec: HybridSpec | None = None) -> Roofline:
    """Least-squares fit of T(n) = max(floor, a + k F(n)) over every split of the sorted sweep."""
    pts = sorted(points)
    f = [prefill_macs([n] * layers, d, m, "B", d_kv, spec) for n, _ in pts]
    t = [s for _, s in pts]
    best = None
    for split in range(0, len(pts) - 1):  # points[:split] on the floor, the rest on the line (>= 2 points)
        xs, ys = f[split:], t[split:]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        k = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
        k = max(k, 0.0)
        a = my - k * mx
        floor = sum(t[:split]) / split if split else 0.0
        model = Roofline(floor, a, k, d, m, layers, d_kv=d_kv, spec=spec)
        sse = sum((model.full(n) - s) ** 2 for n, s in pts)
        if best is None or sse < best[0]:
            best = (sse, model)
    model = best[1]
    model.points = [list(p) for p in pts]
    return model
