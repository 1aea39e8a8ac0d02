"""The analytic model of the efficiency benchmark (docs/efficiency.md, "What is measured, and how"): prefill
MACs per decoder layer under the two conventions (A: FastV / DivPrune, B: SparseVLM), grouped-query and
hybrid (Gated DeltaNet) decoders, KV-cache bytes per token, and the roofline ``T(n) = max(T_floor, a + k F(n))``
fitted to the unpruned model's measured LLM prefill times (:func:`fit_roofline`). The formulas are
:mod:`llava.cost`'s (the evaluation records each sample's cost with them), imported here under their old names.
Pure functions of a model config and lengths; nothing here runs a model."""

from __future__ import annotations

from dataclasses import dataclass, field

from llava.cost import (HybridSpec, attention_layers, hybrid_spec, kv_bytes_per_token, layer_macs,  # noqa: F401
                        linear_layer_macs, llm_dims, prefill_macs)


def decode_step_macs(context: list[float], d: int, m: int, d_kv: int | None = None, spec: HybridSpec | None = None,
                     convention: str = "B") -> float:
    """MACs of one decode step (one new token) in the decoder, each layer attending to ``context[l]`` cached tokens
    (the new one included): per layer the projections 2d^2 + 2d d_kv, the attention 2 context d (q k^T and the
    weighted values over the cache), the FFN (2 or 3) d m; a hybrid decoder's linear layers by
    :func:`linear_layer_macs` at n = 1 (a fixed-size state, no context term), its gated attention layers + d^2.
    The LM head is not in it (``vocab x d`` more: :mod:`bench.efficiency.floor` adds it)."""
    ffn = {"A": 2, "B": 3}[convention]
    dkv = d if d_kv is None else d_kv
    total = 0.0
    kinds = spec.kinds if spec is not None else ("full",) * len(context)
    for ctx, kind in zip(context, kinds):
        if kind == "linear":
            total += linear_layer_macs(1, spec, m, convention)
        else:
            total += 2 * d * d + 2 * d * dkv + 2 * ctx * d + ffn * d * m + (spec.hidden * d if spec is not None and
                                                                             spec.q_gate else 0)
    return float(total)


# ------------------------------------------------------------------------------------------------
# a measured cache (the analytic formulas: llava.cost)
# ------------------------------------------------------------------------------------------------


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
