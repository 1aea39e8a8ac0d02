"""FlowCut reference mode (``numerics="official"``) against a transcription of the official selection.

Official source (read, not copied): TungChintao/FlowCut,
  * ``flowcut/modeling_clip_flowcut.py`` ``CLIPAttention_forward``: ``attn_weights`` = softmax of
    ``bmm(q * scale, k^T)``; ``semantic_attn`` = softmax of ``bmm(v[:, :1], v^T)`` per head, averaged over
    heads; ``value_metric`` = the (B, H, S, d) values averaged over heads; all in the tower dtype;
  * ``CLIPEncoderLayer_forward`` (FlowCut block): while the layer output has more than ``target`` = T + 1
    tokens: ``attn_weights[:, :, 0, 1:].mean(dim=1)``, ``compute_score``, cumulative ``0.5 * cum + 0.5 *
    score``; on even ``rpl`` (``select_layer - idx - 1``, select_layer = 22 of 24) prune
    ``adaptive_prune_ratio(cls_attention, rpl, target - 1)`` (all remaining at rpl = 0), keep ``max(S -
    prune, target)``: [CLS] + ``torch.topk(cum, target_num - 1, dim=1)`` sorted, cum gathered;
  * ``flowcut/utils_flowcut.py`` ``compute_score`` ((c / sum c + s / sum s) * ``torch.norm(v, p=1)``) and
    ``adaptive_prune_ratio`` (entropy over ``torch.log(torch.tensor(N))``, max over the batch, ``int(r.round())``);
  * the tower dtype: FlowCut's README loads the model with LLaVA's ``load_pretrained_model`` (default
    ``device_map='auto'``), which leaves the CLIP tower in fp32: every quantity above is fp32.

Compared with ``FlowCut.select_tower`` driven through the 23 layers up to the select layer on random
per-layer signals with the official shapes (577 tokens, 16 heads, head dim 64; each layer's [CLS] row is
the softmax over the tokens still present), fp32 and fp16-valued, with planted duplicate tokens (same [CLS]
logit and same values in every layer and head: exact ties in the cumulative score) and, in half of the
cases, near-uniform [CLS] rows (high entropy: small prune amounts). The transcription's inputs (per layer
the [CLS] probabilities and the value states) are given to both sides.
"""

import functools

import pytest
import torch
from conftest import FAMILIES

from baselines.flowcut import FlowCut, adaptive_prune_count, flowcut_score, flowcut_score_official
from llava.families.clip import _apply_keep
from llava.tower_signals import TowerSignals

LAYERS, SELECT, H, N, HD = 24, 22, 16, 577, 64
P = N - 1


# ------------------------------------------------------------------ the official code, transcribed


def official_score(cls_attn, semantic_attn, value):
    """``compute_score``: cls_attn / semantic_attn (B, n) patch columns, value (B, n, d)."""
    rel = cls_attn / cls_attn.sum(dim=-1, keepdim=True)
    sem = semantic_attn / semantic_attn.sum(dim=-1, keepdim=True)
    return (rel + sem) * torch.norm(value, p=1, dim=-1)


def official_prune_amount(attn, rpl, target_num):
    """``adaptive_prune_ratio``: attn (B, n) head-mean [CLS] attention to the patches."""
    n = attn.shape[-1]
    prob = attn / attn.sum(dim=-1, keepdim=True)
    entropy = -torch.sum(prob * torch.log(prob), dim=-1)
    ratio = entropy / torch.log(torch.tensor(n))
    r = (n - target_num) / rpl ** 0.5 * (1 - ratio ** 2)
    if r.shape[0] > 1:
        r = r.max(0).values
    return int(r.round())


def official_flowcut(layer_signals, target):
    """The encoder loop with the FlowCut block. ``layer_signals(idx, keep)`` -> (attn_probs (B, H, S) the
    [CLS] rows over the current tokens, value_states (B, H, S, d)) for the current tokens ``keep`` (B, S)
    (original indices, [CLS] = 0). Returns the kept original indices (B, target) after the select layer."""
    keep = None
    cum = None
    for idx in range(SELECT + 1):  # layers up to the one producing hidden_states[-2]
        rpl = SELECT - idx - 1
        attn, v = layer_signals(idx, keep)
        B, _, S = attn.shape
        keep = torch.arange(S).expand(B, S) if keep is None else keep
        if S > target:
            cls_attention = attn[:, :, 1:].mean(dim=1)
            flat = v.reshape(B * H, S, HD)
            semantic = torch.bmm(flat[:, :1], flat.transpose(1, 2)).softmax(dim=-1).view(B, H, S).mean(1)
            scores = official_score(cls_attention, semantic[:, 1:], v.mean(1)[:, 1:])
            cum = scores.clone() if cum is None else 0.5 * cum + 0.5 * scores
            if not rpl % 2:
                prune = official_prune_amount(cls_attention, rpl, target - 1) if rpl else S
                target_num = max(S - prune, target)
                top = torch.topk(cum, target_num - 1, dim=1)[1].sort(dim=1).values
                cum = torch.gather(cum, 1, top)
                keep = torch.cat([keep[:, :1], torch.gather(keep[:, 1:], 1, top)], dim=1)
    return keep


# ------------------------------------------------------------------ random per-layer signals


@functools.cache
def layer_tensors(seed, B, dups=48, flat=False):
    """Per layer: [CLS] logits (B, H, N) and values (B, N, H, d) of all original tokens; ``dups`` planted
    duplicate patches per unit (same logits and values in every layer); ``flat``: near-uniform rows."""
    g = torch.Generator().manual_seed(seed)
    scale = 0.3 if flat else 2.0
    logits = torch.randn(SELECT + 1, B, H, N, generator=g) * scale
    logits[..., 1 + torch.randperm(P, generator=g)[:40]] += 2 * scale
    values = torch.randn(SELECT + 1, B, N, H, HD, generator=g) * 0.5
    for b in range(B):
        src, dst = 1 + torch.randint(0, P, (dups,), generator=g), 1 + torch.randperm(P, generator=g)[:dups]
        logits[:, b, :, dst] = logits[:, b, :, src]
        values[:, b, dst] = values[:, b, src]
    return logits, values


def signals_fn(seed, B, dtype, flat):
    """(idx, keep) -> the official inputs of layer idx for the current tokens (fp32 tower; fp16: the values
    an fp16 run would hold, seen in fp32)."""
    logits, values = layer_tensors(seed, B, flat=flat)

    def fn(idx, keep, units=None):
        units = list(range(B)) if units is None else units
        keep = torch.arange(N).expand(len(units), N) if keep is None else keep
        lg = torch.stack([logits[idx, b][:, keep[j]] for j, b in enumerate(units)])
        vs = torch.stack([values[idx, b][keep[j]] for j, b in enumerate(units)])  # (B, S, H, d)
        attn = lg.softmax(-1).to(dtype).float()
        vs = vs.to(dtype).float()
        return attn, vs.transpose(1, 2).contiguous()  # value_states (B, H, S, d)

    return fn


def ours_flowcut(fn, budget, B, numerics, **opts):
    """``FlowCut.select_tower`` through the layers as ``run_tower_staged`` calls it, on the same inputs."""
    m = FlowCut(budget, numerics=numerics, **opts)
    m.setup(num_layers=32, num_vision_layers=LAYERS, family="llava_next" if B > 1 else "llava")
    groups = [(torch.arange(B), torch.zeros(B, N, 1), torch.arange(N).expand(B, N), {})]
    for i in range(SELECT + 1):
        nxt = []
        for units, x, pos, state in groups:
            attn, v = fn(i, pos, units.tolist())
            # our signal layout: values (n, S, H, d) as the v_proj output view
            cache = {"cls_attn": attn, "values": v.transpose(1, 2)}
            sig = TowerSignals(layer=i, module=None, hidden_in=x, hidden_out=x, patch=pos - 1, select_layer=SELECT,
                               num_layers=LAYERS, state=state, _cache=cache)
            nxt.extend(_apply_keep(units, x, pos, sig.state, m.select_tower(i, sig)))
        groups = nxt
    out = torch.zeros(B, 0, dtype=torch.long)
    rows = {}
    for units, _, pos, _ in groups:
        for j, u in enumerate(units.tolist()):
            rows[u] = pos[j]
    return torch.stack([rows[u] for u in range(B)]) if rows else out


BUDGETS = (64, 128, 192)
CASES = [(seed, dtype, t, flat) for seed in range(2) for dtype in (torch.float32, torch.float16)
         for t in BUDGETS for flat in (False, True)]


@functools.cache
def official_case(seed, dtype, t, flat, B=1):
    return official_flowcut(signals_fn(seed, B, dtype, flat), t + 1)


@pytest.mark.parametrize("seed,dtype,t,flat", CASES)
def test_reference_mode_equals_the_official_selection(seed, dtype, t, flat):
    expected = official_case(seed, dtype, t, flat)
    got = ours_flowcut(signals_fn(seed, 1, dtype, flat), t, 1, "official")
    assert got.shape == (1, t + 1) and torch.equal(got, expected)


def test_reference_mode_next_batch_max():
    # LLaVA-NeXT crops: the official code runs the 5 crops of an image as one batch and takes the max
    # prune amount over them (``batch_max=True``); T per crop as given (the official NeXT int(T / 2) is
    # ``next_half``, the official LLM stage is not implemented)
    fn = signals_fn(7, 5, torch.float16, False)
    expected = official_flowcut(fn, 65)
    assert torch.equal(ours_flowcut(fn, 64, 5, "official", batch_max=True), expected)


def test_default_mode_agreement():
    # the default mode evaluates the same formulas in another order (einsum, abs().sum(), math.log) and
    # already uses torch.topk: it parts from the official selection only where an ulp decides
    agree = sum(torch.equal(ours_flowcut(signals_fn(s, 1, d, f), t, 1, "ours"), official_case(s, d, t, f))
                for s, d, t, f in CASES)
    assert agree == DEFAULT_AGREE


DEFAULT_AGREE = 24


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_score_and_prune_amount_match_the_official_expressions(dtype):
    # one layer at the official shapes: the reference-mode score is bit-identical to compute_score on
    # the official inputs; the prune amount equals adaptive_prune_ratio's for every rpl
    attn, v = signals_fn(3, 2, dtype, False)(0, None)
    c, score = flowcut_score_official(attn, v.transpose(1, 2))
    flat = v.reshape(2 * H, N, HD)
    semantic = torch.bmm(flat[:, :1], flat.transpose(1, 2)).softmax(dim=-1).view(2, H, N).mean(1)
    ref = official_score(attn[:, :, 1:].mean(dim=1), semantic[:, 1:], v.mean(1)[:, 1:])
    assert torch.equal(c, attn[:, :, 1:].mean(dim=1)) and torch.equal(score, ref)
    # the default formulas (einsum, mean then slice, abs().sum()) give the same values up to fp32 rounding on
    # any CPU (whether they also give other bits is the diagnostic below)
    _, score0 = flowcut_score(attn, v.transpose(1, 2))
    assert score0.dtype == score.dtype == torch.float32 and score0.shape == score.shape == (2, P)
    torch.testing.assert_close(score0, score, rtol=1e-5, atol=0)
    for rpl in (20, 10, 4, 2):
        for b in range(2):
            off = official_prune_amount(c[b:b + 1], rpl, 64)
            assert int(adaptive_prune_count(c[b:b + 1], rpl, 64, "official")) == off
        assert int(adaptive_prune_count(c, rpl, 64, "official").max()) == official_prune_amount(c, rpl, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_where_the_cpu_parts_them_the_default_score_is_not_the_official_bits(dtype):
    # a diagnostic of why the reference mode exists: the default formulas sum in another order than
    # compute_score, and whether that gives other fp32 bits on this input depends on the CPU's reduction kernels
    # (it does on this project's CPUs: AMD Zen, an Intel AVX-512 Xeon); where they agree there is nothing to show
    attn, v = signals_fn(3, 2, dtype, False)(0, None)
    _, score = flowcut_score_official(attn, v.transpose(1, 2))
    _, score0 = flowcut_score(attn, v.transpose(1, 2))
    if torch.equal(score0, score):
        pytest.skip("this CPU's reduction kernels give the default and the official score the same bits here")


def test_worked_example_prune_amount():
    # uniform attention over n = 100 patches: entropy = ln 100, ratio = 1 -> prune 0; one-hot-ish
    # attention: ratio ~ 0 -> prune (n - T) / sqrt(rpl) = (100 - 10) / 3 = 30
    uni = torch.full((1, 100), 0.01)
    assert int(adaptive_prune_count(uni, 9, 10, "official")) == official_prune_amount(uni, 9, 10) == 0
    peak = torch.full((1, 100), 1e-30)
    peak[0, 7] = 1.0
    assert int(adaptive_prune_count(peak, 9, 10, "official")) == official_prune_amount(peak, 9, 10) == 30
    # half-to-even: (100 - 10) / 4 * (1 - 0) = 22.5 -> 22 in both modes and the official code
    assert int(adaptive_prune_count(peak, 16, 10, "official")) == 22 == int(adaptive_prune_count(peak, 16, 10))


def test_method_option():
    assert FlowCut(64).numerics == "ours" and FlowCut(64, numerics="official").numerics == "official"
    with pytest.raises(ValueError):
        FlowCut(64, numerics="fp16")


# ------------------------------------------------------------------------------ tiny models, engine

ENGINE_ARGS = {"llava": (5,), "llava_next": (4,), "video_llava": (4,)}


@pytest.mark.parametrize("rt", FAMILIES, indirect=True)
def test_reference_mode_runs_in_the_engine(rt):
    """Reference mode on the tiny models: batch 3 selections equal each sample alone, and cached
    generation equals recompute."""
    from conftest import check_reference_mode_in_engine

    check_reference_mode_in_engine(rt, "flowcut", *ENGINE_ARGS[rt.family], stage="vision")
