"""Efficiency benchmark: TTFT (with its vision / selection / LLM breakdown), decode time per token,
KV-cache bytes, peak memory and analytic prefill FLOPs, for the unpruned model and methods x budgets
in one run (protocol: shared/reference/efficiency.md).

    python -m bench.efficiency --model shape:llava-1.5-7b --dtype float16 --device cuda \
        --methods none consensusdrop visiondrop attnmix fastv --budgets 192 128 64 --n 200 --batch 1 8

Outputs (``--out DIR``): ``efficiency.json`` (every per-sample record, the environment, the cost model
and the bar checks), ``efficiency.md`` (the efficiency.md section 7 table) and ``efficiency.png``
(TTFT and KV vs visual tokens per method).

Launch count (``ops`` / ``extra_ops`` in the JSON, the last two table columns): the aten ops that would
launch a GPU kernel or memcpy (``llava.syncs.OpCounter``: views, allocations and host-side work not
counted) of one batch-1 prefill on the first input, counted once per method x budget outside the timed
runs and split as the engine splits the time (vision / selection / llm, plus ``other`` = LM head and the
greedy pick). ``extra_ops`` = total minus the unpruned model's total on the same input. At batch 1 an
eager 7B prefill on an H100 is launch-bound (docs/results/efficiency-h100.md), so ``extra_ops`` x ~10-15 us
estimates a method's selection overhead there from a CPU run.

``--fast``: every (method, budget, batch) cell also runs with ``load(..., fast=True)`` (llava/fastpath.py),
right after its eager run, and ``efficiency.md`` gets a "Fast path vs eager engine" section with the two
rows side by side and the fast / eager TTFT (and TPOT) ratio (``efficiency.json``: ``fast.results`` and
``fast.comparison``). The fast rows exclude compile / capture: warm-up prefills first, and a timed prefill
that still compiled a graph (``engine.stats.new_graph``) is run again and counted. Each fast row states the
path its prefills actually took (``engine.stats.path``): a method the fast path does not capture runs
eagerly there, and the row says so with the reason. The main table, the bars and the plot are the eager rows.

Cost model for the speed-up bar (stated in every output): the LLM prefill time of the *unpruned* model
is measured on text-only inputs over a sweep of sequence lengths n and fitted with a roofline
``T(n) = max(T_floor, a + k F(n))`` (F = convention-B MACs; the floor is the weight-read-bound regime,
the linear part the FLOPs-bound one). A method's predicted TTFT = its measured vision + selection time
+ sum over layers of T(n_l) / L at its actual per-layer lengths n_l.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# ------------------------------------------------------------------------------------------------
# analytic formulas (efficiency.md sections 4-5)
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


# ------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))
    return xs[i]


def summary(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {}
    return {"median": statistics.median(xs), "p90": _pct(xs, 0.9), "mean": statistics.fmean(xs),
            "std": statistics.pstdev(xs), "n": len(xs)}


# Synthetic image size per family when --image-hw is not given, and what it gives on the real geometry:
#   llava / video_llava: 336x336 -> CLIP-L/336: 24x24 = 576 tokens (Video-LLaVA: 8 frames x 256)
#   llava_next: 672x672 -> 2x2 grid + base crop, 2880 tokens in the spatial layout (the papers' setting)
#   qwen2_5_vl: 672x672 -> smart_resize keeps 672 (a multiple of 28, within min/max_pixels) -> 48x48
#       patches of 14 px -> 2x2 merge -> 24x24 = 576 merged tokens: LLaVA-1.5's count, so budgets
#       192/128/64 keep the same fractions (PyramidDrop's table is stated for 576)
#   llava_onevision: 384x384 -> anyres: best pinpoint 384x384 (1x1 grid): base crop 27x27 = 729 +
#       grid 27x27 = 729 (no unpadding, no anyres_max_9 interpolation: 729 <= 9 x 729) + 27 row newlines
#       = 1485 tokens, OneVision's count for a single 384 px image
#   qwen3_vl: 24 merged tokens a side, whatever the patch size: 768x768 on the real patch 16 (48x48 patches
#       -> 576 merged tokens, each with its DeepStack rows), 672x672 on the tiny model's patch 14
#   qwen3_5: as qwen3_vl (the same tower geometry, no DeepStack): 768x768 -> 576 merged tokens
#   internvl: two tiles a side: 896x896 on the real 448-px tiles -> aspect 1: the 2x2 tile grid (its area
#       802,816 > half of 4 tiles' 401,408; 3x3 would need 903,168) + the thumbnail = 5 tiles x 256 = 1280 tokens
#       (NeXT's base + 4 crops, at InternVL's 256 per tile); 224x224 on the tiny model's 112-px tiles (5 x 16 = 80)
FAMILY_IMAGE_HW = {"llava": (336, 336), "video_llava": (336, 336), "llava_next": (672, 672),
                   "qwen2_5_vl": (672, 672), "llava_onevision": (384, 384)}


def default_image_hw(rt) -> tuple[int, int]:
    if rt.family in ("qwen3_vl", "qwen3_5"):
        vc = rt.model.config.vision_config
        side = 24 * vc.spatial_merge_size * vc.patch_size
        return (side, side)
    if rt.family == "internvl":
        side = 2 * rt.model.config.vision_config.image_size[0]
        return (side, side)
    return FAMILY_IMAGE_HW.get(rt.family, (336, 336))


def describe_inputs(rt, image_hw: tuple[int, int]) -> dict:
    """What one synthetic input is, from the runtime's own processor (the tokens users would feed)."""
    from PIL import Image

    h, w = image_hw
    item = ("what is this?", [Image.new("RGB", (w, h))] * rt.processor.num_frames
            if rt.family == "video_llava" else Image.new("RGB", (w, h)))
    b = build_batch(rt, [item], torch.device("cpu"))
    tok_id = getattr(rt.model.config, "video_token_id" if rt.family == "video_llava" else "image_token_id")
    info = {"family": rt.family, "image_hw": [h, w], "visual_tokens": int((b["input_ids"] == tok_id).sum()),
            "batch_keys": {k: list(v.shape) for k, v in b.items() if isinstance(v, torch.Tensor)}}
    if "image_grid_thw" in b:
        info["image_grid_thw"] = b["image_grid_thw"].tolist()
    return info


def make_inputs(rt, n: int, text_words: int, seed: int, image_hw: tuple[int, int]):
    """A fixed list of (question, image or video frames): seeded random pictures and questions of
    ``text_words`` words (the same list for every method and budget). The pictures are PIL images fed
    through ``rt.processor`` as users do (Qwen2.5-VL: patch rows (t*h*w, 3*2*14*14) + image_grid_thw +
    mm_token_type_ids; OneVision: anyres crops + image_sizes + batch_num_images)."""
    import numpy as np
    from PIL import Image

    from llava.tiny_tokenizer import BASE_WORDS

    rng = np.random.RandomState(seed)
    words = [w for w in BASE_WORDS if w.isalpha()]
    items = []
    for i in range(n):
        q = " ".join(rng.choice(words, size=text_words)) + "?"
        h, w = image_hw
        img = Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8"))
        if rt.family == "video_llava":
            items.append((q, [img] * rt.processor.num_frames))
        else:
            items.append((q, img))
    return items


def build_batch(rt, items, device):
    qs = [q for q, _ in items]
    if rt.family == "video_llava":
        return rt.processor(qs, videos=[v for _, v in items], device=device)
    return rt.processor(qs, [im for _, im in items], device=device)


def prefill_once(rt, batch, device):
    """One TTFT measurement: prefill keeping the last-position logits, greedy pick on the host."""
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = rt.model(**batch, use_cache=True, logits_to_keep=1)
        out.logits[:, -1].argmax(-1).cpu()
    _sync(device)
    return time.perf_counter() - t0, out


def prefill_ops(rt, batch) -> dict:
    """Launching aten ops (``llava.syncs.OpCounter``) of one :func:`prefill_once`, split as the engine
    splits its time: while counting, the engine's phase clock (``PruningEngine.clock``) reads the op count
    instead of the time, so ``PrefillStats.timings`` holds op counts per phase. ``total`` also covers what
    runs after the engine (LM head, greedy pick: ``other``); ``syncs`` = host syncs in the same pass. The
    split is left out (total only) when no engine is attached."""
    from llava.syncs import OpCounter

    counter = OpCounter(syncs=True)
    eng = getattr(rt, "engine", None)
    if eng is not None:
        eng.stats = None
        eng.clock = lambda: float(counter.op_total)  # the engine's phase clock reads the op count
    try:
        with torch.inference_mode(), counter:
            out = rt.model(**batch, use_cache=True, logits_to_keep=1)
            out.logits[:, -1].argmax(-1).cpu()
    finally:
        if eng is not None:
            eng.clock = None
    del out
    res = {"total": counter.op_total}
    timings = getattr(getattr(eng, "stats", None), "timings", None) or {}
    if {"vision", "selection", "llm", "prefill_total"} <= set(timings):
        res.update({k: int(round(timings[k])) for k in ("vision", "selection", "llm", "prefill_total")})
        res["other"] = res["total"] - res["prefill_total"]
    res["syncs"] = counter.sync_total
    res["by_op"] = dict(sorted(counter.ops.items(), key=lambda kv: (-kv[1], kv[0])))
    return res


def generate_time(rt, batch, device, new_tokens: int) -> float:
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        rt.model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    _sync(device)
    return time.perf_counter() - t0


class _StepClock:
    """A logits processor that reads the clock (after a device sync) each time ``generate`` has a token's
    logits: right after the prefill, then after every decode step."""

    def __init__(self, device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        _sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def decode_step_time(rt, batch, device, new_tokens: int) -> float:
    """Time per decode step inside ONE ``generate`` call of ``new_tokens`` forced tokens: from the first token's
    logits (the prefill's end) to the last one's, over ``new_tokens - 1`` steps. The prefill is not in it (the older
    difference of two ``generate`` timings carried the prefill's noise, which exceeds the decode time on a CPU)."""
    from transformers import LogitsProcessorList

    if new_tokens < 2:
        raise ValueError("decode_step_time needs at least 2 new tokens")
    clock = _StepClock(device)
    with torch.inference_mode():
        rt.model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          logits_processor=LogitsProcessorList([clock]))
    if len(clock.times) != new_tokens:
        raise RuntimeError(f"generate produced {len(clock.times)} tokens' logits, expected {new_tokens}")
    return (clock.times[-1] - clock.times[0]) / (new_tokens - 1)


def llm_sweep(rt, lengths: list[int], device, repeats: int = 3) -> list[tuple[int, float]]:
    """Unpruned LLM prefill time (decoder + norm + last-position head) on text-only inputs of length n."""
    lm, head = rt.model.model.language_model, rt.model.lm_head
    emb = lm.embed_tokens.weight
    pts = []
    for n in lengths:
        x = emb[torch.randint(0, emb.shape[0], (1, n), generator=torch.Generator().manual_seed(n)).to(emb.device)]
        times = []
        for _ in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                h = lm(inputs_embeds=x, use_cache=False).last_hidden_state
                head(h[:, -1:]).argmax(-1).cpu()
            _sync(device)
            times.append(time.perf_counter() - t0)
        pts.append((n, statistics.median(times[1:])))  # first run = warm-up for the shape
    return pts


def parse_method(spec: str) -> tuple[str, dict]:
    """'name' or 'name:key=value,key=value' (values parsed as JSON when possible)."""
    if ":" not in spec:
        return spec, {}
    name, rest = spec.split(":", 1)
    opts = {}
    for kv in rest.split(","):
        k, v = kv.split("=", 1)
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    return name, opts


def cpu_model() -> str:
    """The CPU's model name (lscpu's 'Model name', from /proc/cpuinfo), or the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(rt, device, dtype) -> dict:
    env = {"date": time.strftime("%Y-%m-%d"), "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "python": platform.python_version(), "torch": torch.__version__,
           "platform": platform.platform(), "dtype": str(dtype), "device": str(device),
           "llm_attention": rt.model.config.text_config._attn_implementation,
           "vision_attention": rt.model.config.vision_config._attn_implementation, "model": rt.name}
    import transformers

    env["transformers"] = transformers.__version__
    from eval.provenance import git_info

    env["git"] = git_info()  # the code that was timed (VTPRUNE_GIT_COMMIT on a copied tree)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        env.update(cpu=f"{cpu_model()}, {os.cpu_count()} cores ({platform.machine()})", threads=torch.get_num_threads())
        if hasattr(os, "getloadavg"):  # other processes on a shared CPU inflate and scatter the timings
            env["loadavg_1_5_15min_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return env


def attach(rt, method: str, budget, opts: dict, path: str = "eager"):
    """``rt.prune`` on the requested path: "eager" = the eager engine (also on a runtime loaded with
    ``fast=True``), "fast" = with the runtime's fast path (``load(..., fast=True)``)."""
    if path == "fast":
        if rt.fast is None:
            raise ValueError("the fast path needs a runtime loaded with fast=True")
        return rt.prune(method, budget, **opts)
    saved, rt.fast = rt.fast, None
    try:
        return rt.prune(method, budget, **opts)
    finally:
        rt.fast = saved


def timed_prefill(rt, batch, device, eng) -> tuple[float, object, int]:
    """:func:`prefill_once` with compile / capture warm-up excluded: a prefill that compiled or captured a
    new fast-path graph (``engine.stats.new_graph``) is run again and the second (warm) run is timed.
    Returns (seconds, output, prefills that compiled here)."""
    ttft, out = prefill_once(rt, batch, device)
    compiled = 0
    while eng.stats is not None and eng.stats.new_graph and compiled < 2:
        compiled += 1
        del out
        ttft, out = prefill_once(rt, batch, device)
    if eng.stats is not None and eng.stats.new_graph:
        raise RuntimeError("a fast-path prefill compiled a new graph on every run of the same input")
    return ttft, out, compiled


def _path_of(recs: list[dict]) -> tuple[str, dict]:
    """("fast" | "eager" | "mixed", {eager reason: count}) of timed prefills."""
    paths = {r["path"] for r in recs}
    reasons: dict = {}
    for r in recs:
        if r["path"] == "eager" and r.get("path_reason"):
            reasons[r["path_reason"]] = reasons.get(r["path_reason"], 0) + 1
    return (paths.pop() if len(paths) == 1 else "mixed"), reasons


def measure(rt, method: str, budget, opts: dict, items, cfg, device, path: str = "eager") -> dict:
    """All measurements for one method x budget, on the eager engine (``path="eager"``) or with the
    runtime's fast path (``"fast"``: ``engine.stats.path`` of every timed prefill is recorded; a method the
    fast path does not capture runs eagerly there, and the row says so)."""
    eng = attach(rt, method, budget, opts, path)
    fast = path == "fast"
    d, m, L, d_kv = llm_dims(rt.model.config)
    spec = hybrid_spec(rt.model.config)
    attn = attention_layers(rt.model.config)
    per_layer_tok = kv_bytes_per_token(rt.model.config) * torch.finfo(rt.model.dtype).bits // 8 // len(attn)
    batch1 = [build_batch(rt, [it], device) for it in items]
    for b in batch1[: cfg.warmup]:  # warm-up on representative inputs (shapes of the first samples)
        prefill_once(rt, b, device)
    # launch count, once, outside the timed runs (eager engine only: a captured prefill is one graph)
    ops = None if fast else prefill_ops(rt, batch1[0])
    rec = []
    for b in batch1:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ttft, out, compiled = timed_prefill(rt, b, device, eng)
        st = eng.stats
        s = st.samples[0]
        if st.path == "fast":  # a static cache of bucket + decode slots, allocated whole; the LLM ran on the bucket
            kv, _ = cache_bytes(out.past_key_values)
            lens = list(st.seq_len_per_layer)
        else:  # a hybrid model's linear layers keep no length: the length they ran on, from the engine's stats
            kv, lens = cache_bytes(out.past_key_values)
            lens = [n if n is not None else st.seq_len_per_layer[i] for i, n in enumerate(lens)]
        text_tokens = int(b["attention_mask"].sum()) - s.visual_candidates
        analytic_lens = [text_tokens + v for v in s.visual_per_layer]
        rec.append({
            "ttft": ttft, **{f"t_{k}": v for k, v in st.timings.items()},
            "path": st.path, "path_reason": st.path_reason, "bucket": st.bucket, "compiled_before_timing": compiled,
            "visual_candidates": s.visual_candidates, "visual_entering_llm": s.visual_entering_llm,
            "visual_layer_avg": s.visual_layer_avg, "layer_lengths": lens,
            "kv_bytes": kv, "kv_bytes_analytic": per_layer_tok * sum(analytic_lens[i] for i in attn),
            "macs_A": prefill_macs(lens, d, m, "A", d_kv, spec), "macs_B": prefill_macs(lens, d, m, "B", d_kv, spec),
            "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        })
        del out
    res = {"method": method, "budget": budget, "options": opts, "config": eng.method.config(), "records": rec,
           "ops": ops, "path": path}
    res["path_taken"], res["path_reasons"] = _path_of(rec)
    res["compiled_in_timed"] = sum(r["compiled_before_timing"] for r in rec)
    if fast and eng.fast is not None:
        res["fast"] = {"backend": eng.fast.backend, "cuda_graphs": bool(eng.fast.cuda_graphs),
                       "max_new_tokens": eng.fast.max_new_tokens, "refusal": eng.fast.refusal or None,
                       "buckets": sorted({r["bucket"] for r in rec if r["bucket"] is not None})}
    for key in ("ttft", "t_vision", "t_selection", "t_llm", "t_plan", "t_prefill_total"):
        res[key] = summary([r.get(key) for r in rec])
    for key in ("visual_entering_llm", "visual_layer_avg", "kv_bytes", "kv_bytes_analytic", "macs_A", "macs_B"):
        res[key] = statistics.fmean(r[key] for r in rec)
    # a fast prefill's static cache holds bucket + decode slots: no per-token KV accounting to compare
    res["kv_match"] = (all(r["kv_bytes"] == r["kv_bytes_analytic"] for r in rec)
                       if res["path_taken"] == "eager" else None)
    res["peak_bytes"] = max((r["peak_bytes"] or 0) for r in rec) or None
    # decode time per output token, forced length: the steps after the prefill, inside one generate call
    dec = []
    if fast and cfg.decode_samples and cfg.decode_tokens > 1 and batch1:  # compile the decode graph first
        generate_time(rt, batch1[0], device, cfg.decode_tokens)
    for b in batch1[: cfg.decode_samples]:
        if cfg.decode_tokens > 1:
            dec.append(decode_step_time(rt, b, device, cfg.decode_tokens))
    res["tpot"] = summary(dec)
    # batch B
    res["batched"] = {}
    for bs in cfg.batch_sizes:
        if bs == 1:
            continue
        groups = [items[i:i + bs] for i in range(0, len(items) - bs + 1, bs)] or [items[:bs]]
        bb = [build_batch(rt, g, device) for g in groups]
        prefill_once(rt, bb[0], device)
        times, brec = [], []
        for b in bb:
            t, out, compiled = timed_prefill(rt, b, device, eng)
            del out
            times.append(t)
            brec.append({"path": eng.stats.path, "path_reason": eng.stats.path_reason, "compiled": compiled})
        med = statistics.median(times)
        taken, reasons = _path_of(brec)
        res["batched"][str(bs)] = {"ttft": summary(times), "samples_per_s": bs / med, "n_batches": len(bb),
                                   "path_taken": taken, "path_reasons": reasons,
                                   "compiled_in_timed": sum(r["compiled"] for r in brec)}
    rt.unprune()
    if fast and hasattr(torch, "_dynamo"):  # this engine's graphs (and CUDA-graph pools) are not reused
        torch._dynamo.reset()
    return res


def fast_comparison(eager: list[dict], fast: list[dict]) -> list[dict]:
    """One row per (method, budget, batch) cell: the eager and the fast row's TTFT medians, their ratio
    (fast / eager, < 1 = the fast path is faster), the TPOT ratio at batch 1, and the path the fast row's
    timed prefills actually took (with the reasons when eager)."""
    rows = []
    for e, f in zip(eager, fast):
        assert (e["method"], e["budget"], e["options"]) == (f["method"], f["budget"], f["options"])
        cells = [("1", e["ttft"], f["ttft"], f["path_taken"], f["path_reasons"], f["compiled_in_timed"])]
        cells += [(bs, e["batched"][bs]["ttft"], fb["ttft"], fb["path_taken"], fb["path_reasons"], fb["compiled_in_timed"])
                  for bs, fb in f["batched"].items() if bs in e["batched"]]
        for bs, te, tf, taken, reasons, compiled in cells:
            row = {"method": e["method"], "options": e["options"], "label": label(e), "budget": e["budget"],
                   "batch": int(bs), "eager_ttft_median": te["median"], "fast_ttft_median": tf["median"],
                   "eager_ttft_p90": te["p90"], "fast_ttft_p90": tf["p90"],
                   "ttft_ratio": tf["median"] / te["median"], "fast_path_taken": taken, "fast_path_reasons": reasons,
                   "fast_compiled_in_timed": compiled}
            if bs == "1":
                row["eager_tpot_median"] = (e["tpot"] or {}).get("median")
                row["fast_tpot_median"] = (f["tpot"] or {}).get("median")
                if row["eager_tpot_median"] and row["fast_tpot_median"]:
                    row["tpot_ratio"] = row["fast_tpot_median"] / row["eager_tpot_median"]
            rows.append(row)
    return rows


def label(r: dict) -> str:
    """A result row's name: the method and its options (``consensusdrop preset=probe``), so that two
    variants of one method stay apart in the tables, the bar checks and the plot."""
    from llava.method import method_label

    return method_label(r["method"], r.get("options"))


def check_bars(results: list[dict], model: Roofline, overhead_limit=0.03, speedup_tol=0.10, speedup_budget=64) -> list[dict]:
    """The issue's performance bars: selection overhead <= 3% of the unpruned TTFT; TTFT speed-up at
    the 64-token budget within 10% of the cost model's prediction; measured KV bytes == analytic."""
    base = next(r for r in results if r["method"] == "none")
    t_base = base["ttft"]["median"]
    bars = []
    for r in results:
        if r["method"] == "none":
            continue
        tag = {"method": r["method"], "label": label(r), "budget": r["budget"]}
        sel = r["t_selection"]["median"]
        bars.append({**tag, "bar": "selection overhead <= 3% of unpruned TTFT", "value": sel / t_base,
                     "limit": overhead_limit, "pass": sel / t_base <= overhead_limit})
        bars.append({**tag, "bar": "measured KV bytes == analytic", "value": r["kv_bytes"],
                     "limit": r["kv_bytes_analytic"], "pass": r["kv_match"]})
        if r["budget"] == speedup_budget:
            pred = statistics.fmean(
                rec["t_vision"] + rec["t_selection"] + model.per_layer(rec["layer_lengths"]) for rec in r["records"])
            measured = t_base / r["ttft"]["median"]
            predicted = t_base / pred
            bars.append({**tag, "bar": "TTFT speed-up within 10% of the cost model", "value": measured,
                         "limit": predicted, "pass": abs(measured / predicted - 1) <= speedup_tol,
                         "note": f"measured {measured:.2f}x vs predicted {predicted:.2f}x"})
    return bars


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------


def _flops_line(report: dict) -> str:
    fm = report.get("flops_model") or {}
    hy = fm.get("hybrid")
    if hy:
        n_lin = hy["layers"].count("linear")
        return (f"hybrid decoder (d = {fm['d']}, d_kv = {fm['d_kv']}, m = {fm['m']}; {fm['layers'] - n_lin} gated "
                f"full-attention layers: A = 3nd^2+2nd*d_kv+2n^2d+2ndm, B = the same with 3ndm (the q_proj also makes "
                f"the output gate); {n_lin} Gated DeltaNet layers, recurrent form, linear in n: "
                f"n(d(2K+V)+dV+2dH_v+Vd+(2K+V)k+3H_v d_k d_v) + the FFN, K = {hy['K']}, V = {hy['V']}, "
                f"H_v = {hy['H_v']}, d_k = {hy['d_k']}, d_v = {hy['d_v']}, k = {hy['kernel']}). KV bytes: the "
                "full-attention layers only (a DeltaNet layer keeps a fixed-size state).")
    if fm and fm["d_kv"] != fm["d"]:
        return (f"grouped-query attention (d = {fm['d']}, d_kv = {fm['d_kv']}, m = {fm['m']}, L = {fm['layers']}): "
                "A = 2nd^2+2nd*d_kv+2n^2d+2ndm, B = 2nd^2+2nd*d_kv+2n^2d+3ndm.")
    return "A = 4nd^2+2n^2d+2ndm, B = 4nd^2+2n^2d+3ndm."


def _inputs_lines(report: dict) -> list[str]:
    inp = report.get("inputs")
    if not inp:
        return []
    h, w = inp["image_hw"]
    grid = f", image_grid_thw {inp['image_grid_thw']}" if "image_grid_thw" in inp else ""
    shapes = ", ".join(f"{k} {tuple(v)}" for k, v in inp["batch_keys"].items())
    return [f"Input: one {h}x{w} synthetic image per prompt through the runtime's processor ({inp['family']}): "
            f"{inp['visual_tokens']} visual tokens{grid}; batch tensors {shapes}.", ""]


def _ops_split(r: dict) -> str:
    ops = r.get("ops") or {}
    if "selection" not in ops:
        return f"{ops['total']} (total)" if "total" in ops else "-"
    return f"{ops['vision']} / {ops['selection']} / {ops['llm']}"


def _ops_over(r: dict) -> str:
    return f"{r['extra_ops']:+d}" if r.get("extra_ops") is not None else "-"


def markdown(report: dict) -> str:
    env, rows, model = report["environment"], report["results"], report["cost_model"]
    base = next(r for r in rows if r["method"] == "none")
    t_base = base["ttft"]["median"]
    bs = [k for k in base["batched"]]
    out = [f"# Efficiency: {env['model']}", "",
           f"Device: {env.get('gpu') or env.get('cpu')} ({env['device']}); dtype {env['dtype']}; LLM attention "
           f"{env['llm_attention']}, vision tower {env['vision_attention']}; torch {env['torch']}, transformers "
           f"{env['transformers']}; {env['date']}. N = {report['config']['n']} inputs (seeded random images, "
           f"{report['config']['text_words']}-word questions), warm-up {report['config']['warmup']}, "
           f"TPOT: the decode steps of one generate call of {report['config']['decode_tokens']} forced tokens "
           "(prefill excluded). FLOPs in T MAC (x2 for FLOPs), LLM "
           "prefill only (vision tower, projector and LM head not counted), at the measured per-layer lengths; "
           + _flops_line(report), "",
           *_inputs_lines(report),
           f"Cost model: {model['description']}", "",
           "Ops: aten ops of one batch-1 prefill of the first input that would launch a GPU kernel or memcpy "
           "(llava.syncs.OpCounter; views, allocations and host-side work not counted), split vision / selection / "
           "LLM as the time; over unpruned = total (incl. LM head) minus the unpruned row's total. At batch 1 a "
           "GPU prefill is launch-bound: each op costs about 10-15 us on an H100.", "",
           "| Method | Budget | tok-in / tok-eq | TTFT b1 median / p90 (ms) | vision / select / LLM (ms) |"
           + "".join(f" TTFT b{b} (ms), samples/s |" for b in bs)  # one cell per batch size (none: no cell)
           + " TPOT (ms) | KV (MiB) | Peak (GiB) | FLOPs A / B (T MAC) | Speed-up b1 | ops vision / select / LLM "
           "| ops over unpruned |",
           "|---|---|---|---|---|" + "---|" * len(bs) + "---|---|---|---|---|---|---|"]
    for r in rows:
        ms = lambda s: f"{s['median'] * 1e3:.1f}" if s else "-"  # noqa: E731
        bcols = [f"{r['batched'][b]['ttft']['median'] * 1e3:.1f}, {r['batched'][b]['samples_per_s']:.1f}"
                 if b in r["batched"] else "-" for b in bs]
        peak = f"{r['peak_bytes'] / 2**30:.2f}" if r.get("peak_bytes") else "-"
        out.append(
            f"| {label(r)} | {r['budget'] if r['budget'] is not None else '-'} | "
            f"{r['visual_entering_llm']:.0f} / {r['visual_layer_avg']:.1f} | {ms(r['ttft'])} / "
            f"{r['ttft']['p90'] * 1e3:.1f} | {ms(r['t_vision'])} / {ms(r['t_selection'])} / {ms(r['t_llm'])} |"
            + "".join(f" {c} |" for c in bcols)
            + f" {ms(r['tpot'])} | {r['kv_bytes'] / 2**20:.2f} | {peak} | {r['macs_A'] / 1e12:.3g} / "
            f"{r['macs_B'] / 1e12:.3g} | {t_base / r['ttft']['median']:.2f}x | {_ops_split(r)} | "
            f"{_ops_over(r)} |")
    out += ["", "## Bars", "", "| Method | Budget | Bar | Value | Limit | Pass |", "|---|---|---|---|---|---|"]
    for b in report["bars"]:
        v = b["value"]
        fmt = (lambda x: f"{x:.3f}") if isinstance(v, float) else str
        out.append(f"| {b.get('label', b['method'])} | {b['budget']} | {b['bar']} | {fmt(v)} | {fmt(b['limit'])} | "
                   f"{'yes' if b['pass'] else '**no**'} |")
    if report.get("fast"):
        out += ["", *fast_markdown(report["fast"])]
    return "\n".join(out) + "\n"


def _taken(path: str, reasons: dict, requested: str) -> str:
    """The path a row's timed prefills took, in words (a fast row that ran eagerly says so, with why)."""
    if path == "eager" and requested == "fast":
        return "**eager**: " + "; ".join(reasons) if reasons else "**eager**"
    if path == "mixed":
        return "**mixed** (eager: " + "; ".join(f"{r} x{c}" for r, c in reasons.items()) + ")"
    return path


def fast_markdown(fast: dict) -> list[str]:
    """The fast-vs-eager section: per (method, budget, batch) an eager row and a fast row side by side, the
    fast row with the path its timed prefills actually took and the fast / eager TTFT (and TPOT) ratio."""
    out = ["## Fast path vs eager engine (`--fast`)", "",
           f"Every cell ran twice in this run, back to back: on the eager engine and with `load(fast=True)` (backend "
           f"{fast.get('backend')}{', CUDA graphs' if fast.get('cuda_graphs') else ''}; static cache of "
           f"{fast.get('max_new_tokens')} decode slots). Fast rows: warm-up prefills compile / capture first; a timed "
           "prefill that still compiled a graph (`engine.stats.new_graph`) is timed again and counted under 'graphs "
           "compiled in timed runs'. 'Path taken' is `engine.stats.path` of the timed prefills: a method the fast path "
           "does not capture runs eagerly on the fast row, which then says so (its ratio compares eager with eager). "
           "Ratio = fast / eager median (< 1: the fast path is faster). The table, bars and plot above are the eager "
           "rows.", "",
           "| Method | Budget | Batch | Path | Path taken | TTFT median / p90 (ms) | fast / eager TTFT | TPOT (ms) "
           "| fast / eager TPOT | graphs compiled in timed runs |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    ms = lambda x: f"{x * 1e3:.2f}" if x is not None else "-"  # noqa: E731
    for c in fast["comparison"]:
        head = f"| {c['label']} | {c['budget'] if c['budget'] is not None else '-'} | {c['batch']} |"
        b1 = c["batch"] == 1
        out.append(f"{head} eager | eager | {ms(c['eager_ttft_median'])} / {ms(c['eager_ttft_p90'])} | - | "
                   f"{ms(c.get('eager_tpot_median')) if b1 else '-'} | - | - |")
        taken = _taken(c["fast_path_taken"], c["fast_path_reasons"], "fast")
        tpot_ratio = f"{c['tpot_ratio']:.2f}x" if c.get("tpot_ratio") else "-"
        out.append(f"{head} fast | {taken} | {ms(c['fast_ttft_median'])} / {ms(c['fast_ttft_p90'])} | "
                   f"{c['ttft_ratio']:.2f}x | {ms(c.get('fast_tpot_median')) if b1 else '-'} | "
                   f"{tpot_ratio if b1 else '-'} | {c['fast_compiled_in_timed']} |")
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    by = {}
    for r in report["results"]:
        by.setdefault(label(r), []).append(r)
    colors, markers = plt.get_cmap("tab20").colors, "os^vD<>ph*"  # 13+ methods: no colour repeats
    for i, (name, rs) in enumerate(by.items()):
        rs = sorted(rs, key=lambda r: r["visual_layer_avg"])
        x = [r["visual_layer_avg"] for r in rs]
        style = dict(color=colors[(2 * i) % 20 + (2 * i) // 20], marker=markers[i % len(markers)], label=name)
        ax[0].plot(x, [r["ttft"]["median"] * 1e3 for r in rs], "-", **style)
        ax[1].plot(x, [r["kv_bytes"] / 2**20 for r in rs], "-", **style)
    ax[0].set(xlabel="visual tokens (layer average)", ylabel="TTFT median, batch 1 (ms)")
    ax[1].set(xlabel="visual tokens (layer average)", ylabel="KV cache (MiB)")
    ax[0].legend(fontsize=7)
    fig.suptitle(f"{report['environment']['model']} on {report['environment'].get('gpu') or 'CPU'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_wandb(report: dict, enabled: bool) -> None:
    """Best effort: never fails the run."""
    if not enabled or os.environ.get("WANDB_MODE") == "disabled":
        return
    try:
        import wandb

        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "vtprune-efficiency"), config=report["config"],
                         job_type="efficiency", settings=wandb.Settings(init_timeout=30))
        table = wandb.Table(columns=["method", "budget", "tok_in", "tok_eq", "ttft_ms", "kv_mib", "macs_B"])
        for r in report["results"]:
            table.add_data(label(r), r["budget"], r["visual_entering_llm"], r["visual_layer_avg"],
                           r["ttft"]["median"] * 1e3, r["kv_bytes"] / 2**20, r["macs_B"])
        run.log({"efficiency": table})
        if report.get("fast"):
            ft = wandb.Table(columns=["method", "budget", "batch", "fast_path_taken", "eager_ttft_ms", "fast_ttft_ms",
                                      "ttft_ratio"])
            for c in report["fast"]["comparison"]:
                ft.add_data(c["label"], c["budget"], c["batch"], c["fast_path_taken"], c["eager_ttft_median"] * 1e3,
                            c["fast_ttft_median"] * 1e3, c["ttft_ratio"])
            run.log({"fast_vs_eager": ft})
        run.finish()
    except Exception as e:  # noqa: BLE001 - logging must never fail the benchmark
        print(f"[wandb] skipped: {e}", file=sys.stderr)


@dataclass
class BenchConfig:
    model: str = "tiny:llava"
    dtype: str | None = None
    device: str | None = None
    methods: list = field(default_factory=lambda: ["none"])
    budgets: list = field(default_factory=lambda: [192, 128, 64])
    n: int = 20
    warmup: int = 3
    batch_sizes: list = field(default_factory=lambda: [1])
    decode_tokens: int = 16
    decode_samples: int = 3
    text_words: int = 12
    image_hw: tuple | None = None  # None: the family's default (FAMILY_IMAGE_HW)
    next_layout: str = "spatial"
    sweep: list = field(default_factory=list)  # sequence lengths for the cost model; default from inputs
    seed: int = 0
    out: str = "docs/results/efficiency"
    wandb: bool = False
    threads: int | None = None
    fast: bool = False  # also run every cell with load(fast=True): fast and eager rows side by side
    fast_backend: str = "auto"
    fast_max_new_tokens: int | None = None  # static-cache decode slots; None: decode_tokens


def run(cfg: BenchConfig) -> dict:
    from llava.models import load

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    fast_slots = None
    if cfg.fast:
        fast_slots = cfg.fast_max_new_tokens or max(cfg.decode_tokens, 1)
        if fast_slots < cfg.decode_tokens:
            raise ValueError(f"--fast-max-new-tokens {fast_slots} < --decode-tokens {cfg.decode_tokens}: the fast "
                             "path's static cache would run out")
    rt = load(cfg.model, dtype=cfg.dtype, device=cfg.device, next_layout=cfg.next_layout, fast=cfg.fast,
              fast_backend=cfg.fast_backend, fast_max_new_tokens=fast_slots or 256)
    device = next(rt.model.parameters()).device
    image_hw = tuple(cfg.image_hw) if cfg.image_hw else default_image_hw(rt)
    inputs = describe_inputs(rt, image_hw)
    items = make_inputs(rt, cfg.n, cfg.text_words, cfg.seed, image_hw)
    cells = [("none", None, {})]
    for spec in cfg.methods:
        name, opts = parse_method(spec)
        if name == "none":
            continue
        cells += [(name, b, opts) for b in cfg.budgets]
    results, fast_results = [], []
    for name, b, opts in cells:  # with --fast: each cell on both paths, back to back
        results.append(measure(rt, name, b, opts, items, cfg, device))
        if cfg.fast:
            fast_results.append(measure(rt, name, b, opts, items, cfg, device, path="fast"))
    for r in results:  # launches a method adds over the unpruned model on the same input
        r["extra_ops"] = r["ops"]["total"] - results[0]["ops"]["total"]
    full = int(results[0]["records"][0]["layer_lengths"][0])
    d, m, L, d_kv = llm_dims(rt.model.config)
    lengths = cfg.sweep or sorted({max(8, int(full * f)) for f in (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0)})
    spec = hybrid_spec(rt.model.config)
    model = fit_roofline(llm_sweep(rt, lengths, device), d, m, L, d_kv, spec)
    report = {"config": {**asdict(cfg), "image_hw": list(image_hw)}, "environment": environment(rt, device, rt.model.dtype),
              "inputs": inputs,
              "flops_model": {"scope": "LLM decoder prefill only, at the measured per-layer lengths; the vision tower "
                                       "(CLIP / SigLIP / Qwen2.5-VL's windowed ViT), projector / merger and LM head are "
                                       "not counted", "d": d, "m": m, "layers": L, "d_kv": d_kv,
                              "A": "2nd^2 + 2nd*d_kv + 2n^2d + 2ndm per layer",
                              "B": "2nd^2 + 2nd*d_kv + 2n^2d + 3ndm per layer",
                              **({"hybrid": {"layers": list(spec.kinds), "full": "the formula above + nd^2 (the q_proj's "
                                             "output gate)", "linear": "n (d(2K+V) + dV + 2dH_v + Vd + (2K+V)k + "
                                             "3 H_v d_k d_v + 2 or 3 dm) (Gated DeltaNet, recurrent form)",
                                             "K": spec.key_dim, "V": spec.value_dim, "H_v": spec.v_heads,
                                             "d_k": spec.head_k, "d_v": spec.head_v, "kernel": spec.kernel}}
                                 if spec is not None else {})},
              "cost_model": {"description": model.describe(), "floor_s": model.floor, "a_s": model.a,
                             "k_s_per_mac": model.k, "ridge_tokens": model.ridge(), "sweep": model.points,
                             "rule": "predicted TTFT = measured vision + selection + sum_l T(n_l)/L"},
              "results": results}
    if cfg.fast:
        f0 = next((r["fast"] for r in fast_results if r.get("fast")), {})
        report["fast"] = {"backend": f0.get("backend"), "requested_backend": cfg.fast_backend,
                          "cuda_graphs": f0.get("cuda_graphs"), "max_new_tokens": fast_slots,
                          "note": "each cell ran on the eager engine and with load(fast=True) in this run; fast rows: "
                                  "warm-up prefills first, a timed prefill that still compiled a graph is timed again "
                                  "(compiled_in_timed); path_taken = engine.stats.path of the timed prefills",
                          "results": fast_results, "comparison": fast_comparison(results, fast_results)}
    report["bars"] = check_bars(results, model)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "efficiency.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "efficiency.md").write_text(markdown(report))
    try:
        plot(report, out / "efficiency.png")
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    log_wandb(report, cfg.wandb)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.efficiency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d = BenchConfig()
    ap.add_argument("--model", default=d.model)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--methods", nargs="+", default=d.methods, help="names, or name:key=value,... for options")
    ap.add_argument("--budgets", nargs="+", type=int, default=d.budgets)
    ap.add_argument("--n", type=int, default=d.n)
    ap.add_argument("--warmup", type=int, default=d.warmup)
    ap.add_argument("--batch", nargs="+", type=int, default=d.batch_sizes, dest="batch_sizes")
    ap.add_argument("--decode-tokens", type=int, default=d.decode_tokens)
    ap.add_argument("--decode-samples", type=int, default=d.decode_samples)
    ap.add_argument("--text-words", type=int, default=d.text_words)
    ap.add_argument("--image-hw", nargs=2, type=int, default=None,
                    help="synthetic image height width (default per family: " + ", ".join(
                        f"{k} {h}x{w}" for k, (h, w) in FAMILY_IMAGE_HW.items()) + ")")
    ap.add_argument("--next-layout", default=d.next_layout, choices=["spatial", "spatial_unpad"])
    ap.add_argument("--sweep", nargs="*", type=int, default=[])
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--out", default=d.out)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--wandb", action="store_true", help="log to W&B (honours WANDB_MODE)")
    ap.add_argument("--fast", action="store_true", help="also run every (method, budget, batch) cell with "
                    "load(fast=True) and put fast and eager rows side by side with their TTFT ratio")
    ap.add_argument("--fast-backend", default=d.fast_backend, choices=["auto", "inductor", "eager", "aot_eager", "none"],
                    help="with --fast: torch.compile backend (auto: inductor + CUDA graphs on a GPU)")
    ap.add_argument("--fast-max-new-tokens", type=int, default=None,
                    help="with --fast: decode slots of the static cache (default: --decode-tokens)")
    a = ap.parse_args(argv)
    cfg = BenchConfig(**{k: v for k, v in vars(a).items()})
    report = run(cfg)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
