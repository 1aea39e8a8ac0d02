"""TRIO (baselines/trio.py): the NMS on hand-worked examples, the schedules and budgets, the engine's proxy-loss
gradient (LLMSignals.grad_saliency) against a by-hand autograd through the stock layer, and the method on tiny
models (counts, batch == alone, cached generation == recompute, refusals); the "w/ VE" option (encoder="vscan":
counts per layer, its vision stage == VScan's stage 1, batch == alone, cache == recompute, host reads, refusal). The
official selection step transcribed: tests/test_reference_trio.py."""

import pytest
import torch
import torch.nn.functional as F
from conftest import check_generate_batch_equals_alone, greedy_no_cache, make_batch, slice_batch
from test_engine import GEN
from test_gpu_ready import SYNC_BOUND, count_syncs, next_batch

import baselines.trio  # noqa: F401  (registers "trio")
import baselines.vscan  # noqa: F401  (registers "vscan": the w/ VE stage-1 comparison)
from baselines.trio import SCHEDULES, TRIO, budget_counts, layer_average, trio_nms
from llava.method import Method, get_method
from llava.proxy_grad import proxy_rows
from llava.selection import Selection

TINY = dict(image_token_list=(12, 8, 4), counts="absolute")  # the tiny 16-token images: counts 7 / 4 / 2


# ------------------------------------------------------------------ the selection step by hand


def test_nms_figure_example():
    """The paper figure's worked example: saliency order 3 1 7 6 8 4 5 2 (tokens 1..8), K = 4; 3 suppresses 1 and
    8, 7 suppresses 5: kept {3, 7, 6, 4}, emitted in original order."""
    order = [3, 1, 7, 6, 8, 4, 5, 2]
    sal = torch.zeros(8)
    for r, t in enumerate(order):
        sal[t - 1] = 8 - r
    feats = torch.eye(8)
    for a, b in ((3, 1), (3, 8), (7, 5)):  # planted duplicates: cosine 1
        feats[b - 1] = feats[a - 1]
    assert (trio_nms(sal, feats, 4) + 1).tolist() == [3, 4, 6, 7]
    assert (trio_nms(sal, feats, 4, numerics="official") + 1).tolist() == [3, 4, 6, 7]


def test_nms_threshold_fill_and_ties():
    sal = torch.tensor([0.1, 0.9, 0.8, 0.7])
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])  # cos(1, 2) = 0.8, cos(2, 3) = 0.6
    assert trio_nms(sal, f, 2).tolist() == [1, 3]  # 2 is suppressed at cos >= 0.8 (inclusive), 3 kept
    assert trio_nms(sal, f, 2, tau=0.81).tolist() == [1, 2]  # below the threshold: plain order
    assert trio_nms(sal, f, 2, tau=None).tolist() == [1, 2]  # no NMS: top-k
    # only 1 and 3 survive suppression (0 ~ 1, 2 ~ 1): the fill round takes the unkept in saliency order (2)
    assert trio_nms(sal, f, 3).tolist() == [1, 2, 3]
    assert trio_nms(sal, f, 4).tolist() == [0, 1, 2, 3] and trio_nms(sal, f, 0).numel() == 0
    # ties go to the lower index
    assert trio_nms(torch.ones(5), torch.eye(5), 2).tolist() == [0, 1]


def test_nms_equals_naive_greedy_at_official_shapes():
    g = torch.Generator().manual_seed(0)
    for n, k in ((576, 218), (218, 128), (128, 54), (576, 92), (96, 32)):
        base = torch.randn(n // 4, 64, generator=g)
        feats = base[torch.randint(0, n // 4, (n,), generator=g)] + 0.6 * torch.randn(n, 64, generator=g)
        sal = torch.rand(n, generator=g)
        v = F.normalize(feats, dim=-1)
        nb = (v @ v.T) >= 0.8
        order = torch.sort(sal, descending=True, stable=True).indices.tolist()
        kept, sup = [], torch.zeros(n, dtype=torch.bool)
        for i in order:
            if len(kept) == k:
                break
            if not sup[i]:
                kept.append(i)
                sup |= nb[i]
        kept += [i for i in order if i not in kept][: k - len(kept)]
        assert 0 < sup.sum() < n  # the planted clusters do suppress
        assert trio_nms(sal, feats, k).tolist() == sorted(kept)


# ------------------------------------------------------------------ schedules, options


def test_official_schedules_and_budgets():
    assert TRIO().stage_counts(576) == (218, 128, 54) and TRIO().llm_layers == (1, 10, 15)
    assert TRIO(64).stage_counts(576) == (92, 54, 22)
    for b, counts in SCHEDULES.items():
        assert layer_average(576, (1, 10, 15), counts) == b
        assert TRIO(b).layer_counts(576) == [576] + [counts[0]] * 9 + [counts[1]] * 5 + [counts[2]] * 17
    for b in (48, 100, 160, 256):
        assert abs(layer_average(576, (1, 10, 15), budget_counts(b)) - b) < 0.5
    # per 576 candidates (default) vs the official absolute counts (NeXT's whole block)
    assert TRIO(128).stage_counts(2880) == (1090, 640, 270)
    assert TRIO(image_token_list=(436, 255, 173), counts="absolute").stage_counts(2880) == (436, 255, 173)
    assert TRIO(image_token_list=(436, 255, 173), counts="absolute").stage_counts(300) == (300, 255, 173)
    q = TRIO(layer_list=(14,), ratios=(0.333,), scale_layers=False)  # the official Qwen2.5-VL rule
    q.setup(num_layers=28, num_vision_layers=32, family="qwen2_5_vl")
    assert q.llm_layers == (14,) and q.stage_counts(300) == (99,)
    m = TRIO(128)
    m.setup(num_layers=40, num_vision_layers=24, family="llava")  # 13B: layers scaled, average kept
    assert m.llm_layers == (1, 12, 19)
    assert abs(sum(m.layer_counts(576)) / 40 - 128) < 0.5
    assert get_method("trio").capture_refusal().startswith("trio: its llm stages take a gradient")


@pytest.mark.parametrize("bad", [dict(image_token_list=(1, 2)), dict(layer_list=(10, 1, 15)), dict(counts="x"),
                                 dict(proxy_rows="first"), dict(num_proxy_rows=0), dict(probe_layer="both"),
                                 dict(numerics="fp16"), dict(ratios=(0.5,), image_token_list=(1, 1, 1)),
                                 dict(tau="high")])
def test_bad_options(bad):
    with pytest.raises((ValueError, TypeError)):
        TRIO(**bad)
    with pytest.raises(ValueError):
        TRIO(64, image_token_list=(10, 5, 1))
    with pytest.raises(ValueError):
        TRIO(10)  # below the 18 tokens layer 0 alone averages


def test_proxy_rows():
    assert proxy_rows(10).tolist() == [5, 6, 7, 8]  # official: the 4 rows before the last
    assert proxy_rows(10, "last").tolist() == [6, 7, 8, 9]
    assert proxy_rows(3).tolist() == [0, 1] and proxy_rows(1).tolist() == [0]


# ------------------------------------------------------------------ the engine's gradient


class _Spy(Method):
    """Records the LLM signals' saliency / raw gradient at the stage before layer 2; keeps everything."""

    name = "trio_spy"
    position_mode = "reindex"

    def __init__(self, **kw):
        super().__init__()
        self.kw, self.seen = kw, []

    @property
    def llm_layers(self):
        return (2,)

    def select_llm(self, stage, sig):
        g = sig.grad_saliency(reduce=None, **self.kw)
        self.seen.append((sig.hidden.clone(), sig.position_ids.clone(), sig.visual.clone(), g,
                          sig.grad_saliency(**self.kw)))
        return Selection(keep=torch.arange(sig.num_visual))


@pytest.mark.parametrize("rt", ["llava", "qwen2.5-vl"], indirect=True)
@pytest.mark.parametrize("layer", ["next", "prev"])
def test_grad_equals_by_hand_autograd(rt, layer):
    """The engine's gradient = autograd by hand through the stock layer (called directly, causal mask, the
    sample's positions), final norm and lm_head; under inference_mode; no .grad on any weight."""
    spy = _Spy(layer=layer)
    rt.prune(spy)
    inputs = slice_batch(make_batch(rt), 1, rt)
    with torch.inference_mode():
        rt.model(**inputs)
    (x, pos, vis, g, sal), = spy.seen
    lm = rt.model.model.language_model
    layer_mod = lm.layers[2 if layer == "next" else 1]
    h = x.clone().requires_grad_(True)
    S = h.shape[0]
    pe = lm.rotary_emb(h[None], position_ids=pos[..., None, :])
    causal = torch.full((S, S), float("-inf")).triu(1)[None, None]
    y = layer_mod(h[None], attention_mask=causal, position_embeddings=pe)
    y = y[0] if isinstance(y, tuple) else y
    rows = torch.arange(S - 5, S - 1)
    z = rt.model.lm_head(lm.norm(y[0, rows])).float()
    loss = F.cross_entropy(z, z.argmax(-1))
    (ref,) = torch.autograd.grad(loss, h)
    assert torch.allclose(g, ref, atol=1e-6, rtol=1e-4)
    assert torch.allclose(sal, ref[vis].norm(dim=-1), atol=1e-6, rtol=1e-4)
    assert g[S - 1].abs().max() == 0  # causal: the last row feeds no proxy row
    assert (sal > 0).all()
    assert all(p.grad is None for p in rt.model.parameters())


@pytest.mark.parametrize("rt", ["llava"], indirect=True)
def test_grad_finite_difference(rt):
    """<g_i, d> = the loss change for a small step d on one visual row (fp64 copy of the layer)."""
    spy = _Spy()
    rt.prune(spy)
    with torch.no_grad():
        rt.model(**slice_batch(make_batch(rt), 0, rt))
    (x, pos, vis, g, _), = spy.seen
    lm = rt.model.model.language_model
    import copy

    layer, norm, head = (copy.deepcopy(m).double() for m in (lm.layers[2], lm.norm, rt.model.lm_head))
    rot = copy.deepcopy(lm.rotary_emb)
    S = x.shape[0]
    rows = torch.arange(S - 5, S - 1)
    causal = torch.full((S, S), float("-inf"), dtype=torch.float64).triu(1)[None, None]

    def loss(h):
        cos, sin = rot(h[None].float(), position_ids=pos[None])
        y = layer(h[None], attention_mask=causal, position_embeddings=(cos.double(), sin.double()))
        y = y[0] if isinstance(y, tuple) else y
        z = head(norm(y[0, rows]))
        return F.cross_entropy(z, target)

    h0 = x.double()
    with torch.no_grad():
        cos, sin = rot(h0[None].float(), position_ids=pos[None])
        y = layer(h0[None], attention_mask=causal, position_embeddings=(cos.double(), sin.double()))
        y = y[0] if isinstance(y, tuple) else y
        target = head(norm(y[0, rows])).argmax(-1)
        d = torch.zeros_like(h0)
        d[vis[3]] = 1e-4 * torch.randn(h0.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        fd = (loss(h0 + d) - loss(h0 - d)) / 2
    assert torch.allclose(fd, (g.double() * d).sum(), rtol=1e-3, atol=1e-9)


# ------------------------------------------------------------------ the method on tiny models


@pytest.mark.parametrize("rt", ["llava", "qwen2.5-vl"], indirect=True)
def test_tokens_per_stage(rt):
    inputs = make_batch(rt)
    eng = rt.prune("trio", **TINY)
    with torch.inference_mode():
        rt.model(**inputs)
    m = eng.method
    for b, s in enumerate(eng.stats.samples):
        assert s.visual_per_layer == m.layer_counts(s.visual_entering_llm)
        for stage in range(3):
            assert eng.selections[(stage, b)].keep.tolist() == sorted(eng.selections[(stage, b)].keep.tolist())
    if rt.family == "llava":
        assert [s.visual_per_layer for s in eng.stats.samples] == [[16, 7, 4, 2]] * 3


# batch == alone, cached == no-cache recompute (both numerics), keep-all: tests/test_method_guarantees.py


def test_refusals(runtimes):
    with pytest.raises(ValueError, match="DeepStack"):
        runtimes["qwen3-vl"].prune("trio", **TINY)
    from llava.engine import HybridRefusal

    rt = runtimes["qwen3.5"]
    try:
        with pytest.raises(HybridRefusal, match="linear-attention"):
            from llava.engine import attach

            attach(rt.model, get_method("trio", **TINY))
    finally:
        rt.unprune()


def test_tensor_parallel_refused_at_attach(runtimes):
    """On a model whose language model carries an AutoTP shard the engine refuses trio at attach, with the reason,
    before any prefill; a method without a gradient attaches."""
    rt = runtimes["llava"]
    proj = rt.model.model.language_model.layers[2].self_attn.o_proj
    proj.mp_group, proj._partition_sizes = object(), [32, 32]
    try:
        with pytest.raises(ValueError, match=r"trio: .*tensor parallelism .*TP=1"):
            rt.prune("trio", **TINY)
        rt.prune("fastv", 8)
    finally:
        del proj.mp_group, proj._partition_sizes
        rt.unprune()


def test_tensor_parallel_refused():
    """A layer whose linear is an AutoTP shard (it carries ``mp_group`` and its partition sizes) is refused."""
    from llava.proxy_grad import proxy_loss_grad

    layer = torch.nn.Module()
    layer.self_attn = torch.nn.Linear(4, 4)
    layer.self_attn.mp_group, layer.self_attn._partition_sizes = object(), [2, 2]
    with pytest.raises(RuntimeError, match="tensor parallelism"):
        proxy_loss_grad(layer, torch.nn.Identity(), torch.nn.Linear(4, 4), None, torch.zeros(3, 4),
                        torch.arange(3), torch.tensor([0]))


# ------------------------------------------------------------------ "w/ VE": VScan's stage 1, then TRIO's stage


def test_ve_options_and_budgets():
    """The official w/ VE command (README.md:525-544): 96 per image after the encoder, 32 from layer 16; a budget is
    the layer average per unit (64 -> 96 / 32, VScan's split)."""
    m = TRIO(encoder="vscan")
    assert (m.visual_token_num, m.llm_layers, m.stage_counts(96)) == (96, (16,), (32,))
    assert m.layer_counts(96) == [96] * 16 + [32] * 16 and sum(m.layer_counts(96)) / 32 == 64
    assert m.vision_stage and not TRIO().vision_stage and m.vision_cls_layers == (6, 23)  # attentions[5], [-2]
    for b, (t, k) in {64: (96, 32), 128: (192, 64), 192: (288, 96), 6: (9, 3)}.items():
        m = TRIO(b, encoder="vscan")
        assert (m.visual_token_num, m.stage_counts(t)) == (t, (k,)) and sum(m.layer_counts(t)) / 32 == b
    m = TRIO(encoder="vscan", layer_list=(8, 16), image_token_list=(64, 32), visual_token_num=128)
    assert m.stage_counts(3 * 128 + 12, num_units=3) == (192, 96)  # per unit, newlines among the candidates
    assert TRIO(encoder="vscan", counts="absolute").stage_counts(5 * 96, num_units=5) == (32,)  # official min(c, N)
    m = TRIO(6, encoder="vscan")
    m.setup(num_layers=4, num_vision_layers=3, family="llava")  # the tiny models: stage before layer 2
    assert (m.llm_layers, m.vision_cls_layers, m.layer_counts(72, 8)) == ((2,), (1, 2), [72, 72, 24, 24])
    m.setup(num_layers=40, num_vision_layers=24, family="llava")  # 13B: the stage at half depth
    assert m.llm_layers == (20,) and m.layer_counts(9) == [9] * 20 + [3] * 20
    assert m.capture_refusal().startswith("trio: its llm stages take a gradient")
    assert m.runs_on("video_llava") and not m.runs_on("qwen2_5_vl") and TRIO.supports("qwen2_5_vl")
    for bad in (dict(visual_token_num=96), dict(encoder="visionzip"), dict(encoder="vscan", visual_token_num=0),
                dict(budget=64, encoder="vscan", visual_token_num=96), dict(budget=1, encoder="vscan"),
                dict(budget=64, encoder="vscan", layer_list=(8, 16))):
        b = bad.pop("budget", None)
        with pytest.raises(ValueError):
            TRIO(b, **bad)


@pytest.mark.parametrize("rt", ["llava", "llava-next", "video-llava"], indirect=True)
def test_ve_tokens_per_layer(rt):
    """Budget 6 w/ VE on the tiny models (4 layers, 16 patches per image / crop in 2 x 2 windows, 17 tokens per
    frame): 9 per unit after the encoder (1 local pick per window + 5 global), 3 per unit from layer 2.
    LLaVA-1.5: [9, 9, 3, 3]. NeXT (crops of 16 / 16 / 16, 16 / 8 / 8, 16 / 8 / 8 tokens, 4 / 4 / 8 newlines): the
    8-token crops are kept whole, so 27 + 4, 9 + 16 + 4, 9 + 16 + 8 enter the LLM and 3 x 3 remain. Video-LLaVA: 8
    frames of 9 = 72, then 24."""
    inputs = make_batch(rt)
    eng = rt.prune("trio", 6, encoder="vscan")
    with torch.inference_mode():
        rt.model(**inputs)
    expected = {"llava": [[9, 9, 3, 3]] * 3, "llava_next": [[31, 31, 9, 9], [29, 29, 9, 9], [33, 33, 9, 9]],
                "video_llava": [[72, 72, 24, 24]] * 3}[rt.family]
    assert [s.visual_per_layer for s in eng.stats.samples] == expected
    units = {"llava": 1, "llava_next": 3, "video_llava": 8}[rt.family]
    for b, s in enumerate(eng.stats.samples):
        assert s.visual_per_layer == eng.method.layer_counts(s.visual_entering_llm, units)
        keep = eng.selections[(0, b)].keep
        assert keep.numel() == 3 * units and keep.tolist() == sorted(keep.tolist())


@pytest.mark.parametrize("rt,numerics", [("llava", "ours"), ("llava-next", "ours"), ("video-llava", "ours"),
                                          ("llava", "official")], indirect=["rt"])
def test_ve_vision_stage_is_vscans_stage1(rt, numerics):
    """At the same settings (budget 6: 9 per unit) the w/ VE vision stage is VScan's stage 1: the same kept,
    targets, assignment and order per sample, and the same (merged) rows entering the LLM; in both numerics
    (``numerics="official"``: VScan's stage-1 reference mode on both sides)."""
    inputs = make_batch(rt)
    out = {}
    layer0 = rt.model.model.language_model.layers[0]
    for name, opts in (("vscan", {}), ("trio", {"encoder": "vscan"})):
        eng = rt.prune(name, 6, numerics=numerics, **opts)
        rows = []  # the hidden states entering decoder layer 0 (before either llm stage)
        hook = layer0.register_forward_pre_hook(
            lambda m, a, kw: rows.append((a[0] if a else kw["hidden_states"]).clone()), with_kwargs=True)
        try:
            with torch.no_grad():
                rt.model(**inputs)
        finally:
            hook.remove()
        out[name] = ([eng.selections[("vision", b)] for b in range(3)], rows)
        assert [s.visual_entering_llm for s in eng.stats.samples] == \
            [{"llava": 9, "video_llava": 72}.get(rt.family, s.visual_entering_llm) for s in eng.stats.samples]
        rt.unprune()
    for a, b in zip(*(out[n][0] for n in ("vscan", "trio"))):
        for f in ("keep", "targets", "assign", "order"):
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None and y is None) or torch.equal(x, y), f
        assert (a.rule, a.space) == (b.rule, b.space) == ("mean", "projected") and b.targets.numel() > 0
    assert len(out["vscan"][1]) == len(out["trio"][1]) >= 1
    for x, y in zip(out["vscan"][1], out["trio"][1]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("rt", ["llava"], indirect=True)
def test_ve_batch_equals_alone_and_cache_equals_recompute(rt):
    check_generate_batch_equals_alone(rt, "trio", 6, encoder="vscan")
    inputs = make_batch(rt)
    for numerics in ("ours", "official"):
        eng = rt.prune("trio", 6, encoder="vscan", numerics=numerics)
        with torch.no_grad():
            cached = rt.model.generate(**inputs, **GEN)
        assert [s.visual_per_layer for s in eng.stats.samples] == [[9, 9, 3, 3]] * 3
        eng.replay = True  # the llm stage reads the last prompt rows: the recompute replays the prefill's picks
        assert torch.equal(cached, greedy_no_cache(rt.model, inputs, GEN["max_new_tokens"]))


def test_ve_host_reads_bounded_and_flat(runtimes):
    """LLaVA-NeXT small vs large images (test_gpu_ready's sync check, w/ VE): the host reads per sample stay within
    the bound and do not grow with the visual tokens."""
    rt = runtimes["llava-next"]
    small_in, large_in = next_batch(rt, (30, 30)), next_batch(rt, (90, 120))
    try:
        eng = rt.prune("trio", 6, encoder="vscan")
        small = count_syncs(rt, small_in)
        cand_small = sum(s.visual_candidates for s in eng.stats.samples)
        large = count_syncs(rt, large_in)
        cand_large = sum(s.visual_candidates for s in eng.stats.samples)
        assert all(min(s.visual_per_layer) < s.visual_candidates for s in eng.stats.samples)
    finally:
        rt.unprune()
    assert cand_large > 1.5 * cand_small
    assert large.total / 3 <= SYNC_BOUND["trio"], dict(large.counts)
    assert large.total <= small.total + 3, (dict(small.counts), dict(large.counts))


def test_ve_refused_outside_the_clip_towers(runtimes):
    rt = runtimes["qwen2.5-vl"]
    try:
        with pytest.raises(ValueError, match=r"trio does not support qwen2_5_vl .*CLIP towers"):
            rt.prune("trio", 6, encoder="vscan")
        assert rt.engine is None
        rt.prune("trio", **TINY)  # w/o VE runs there
    finally:
        rt.unprune()
