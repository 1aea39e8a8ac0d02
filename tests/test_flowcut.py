"""FlowCut and the in-tower stage: the score and the entropy-based prune amount against the official code
transcribed at the official shapes (577 tokens, 16 heads, head dim 64); the official encoder loop transcribed
and run on a deeper random CLIP tower (kept features identical); the manual tower loop with no pruning ==
the stock tower exactly; units with unequal counts (groups) == each unit alone; and on the three tiny CLIP
families: T tokens per unit enter the LLM, options. Cached generation == recompute, batch of 3 == each alone
(with its options), keep-all, the refusal of other families: tests/test_method_guarantees.py."""

import pytest
import torch
import torch.nn as nn
from conftest import FAMILIES, llm_visual_rows, make_batch
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

import baselines.flowcut  # noqa: F401  (registers "flowcut")
from baselines.flowcut import FlowCut, adaptive_prune_count, flowcut_score
from llava.families.clip import run_tower, run_tower_staged
from llava.needs import TowerCall
from llava.method import Method
from llava.selection import Selection
from llava.tower_signals import TowerSignals

GEN = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
ALL = pytest.mark.parametrize("rt", FAMILIES, indirect=True)


# ------------------------------------------------------------------ the official code, transcribed


def official_attention(layer, x):
    """``CLIPAttention_forward`` (official) on layer_norm1(x): attention probabilities (B, H, S, S),
    semantic_attn.mean(1) (B, S) and value_metric.mean(1) (B, S, d)."""
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    bsz, tgt_len, _ = h.shape
    nh, hd = attn.num_heads, attn.head_dim

    def shape(t):
        return t.view(bsz, -1, nh, hd).transpose(1, 2).contiguous()

    query_states = attn.q_proj(h) * attn.scale
    key_states = shape(attn.k_proj(h))
    value_states = shape(attn.v_proj(h))
    value_metric = value_states.clone()
    proj_shape = (bsz * nh, -1, hd)
    query_states = shape(query_states).view(*proj_shape)
    key_states = key_states.view(*proj_shape)
    value_states = value_states.view(*proj_shape)
    attn_weights = torch.bmm(query_states, key_states.transpose(1, 2))
    cls_value = value_states[:, :1]
    semantic_weight = torch.bmm(cls_value, value_states.transpose(1, 2))
    attn_weights = nn.functional.softmax(attn_weights, dim=-1).view(bsz, nh, tgt_len, tgt_len)
    semantic_attn = nn.functional.softmax(semantic_weight, dim=-1).view(bsz, nh, tgt_len)
    return attn_weights, semantic_attn.mean(1), value_metric.mean(1)


def official_compute_score(cls_attn, semantic_attn, value):
    relation_score = cls_attn / cls_attn.sum(dim=-1, keepdim=True)
    semantic_score = semantic_attn / semantic_attn.sum(dim=-1, keepdim=True)
    return (relation_score + semantic_score) * torch.norm(value, p=1, dim=-1)


def official_adaptive_prune_ratio(attn, rpl, target_num):
    N = attn.shape[-1]
    prob = attn / attn.sum(dim=-1, keepdim=True)
    entropy = -torch.sum(prob * torch.log(prob), dim=-1)
    entropy_max = torch.log(torch.tensor(N))
    entropy_ratio = entropy / entropy_max
    r = (N - target_num) / rpl ** 0.5 * (1 - entropy_ratio ** 2)
    if r.shape[0] > 1:
        r = r.max(0).values
    return int(r.round())


def official_encoder(tower, pixels, target_tokens):
    """``CLIPVisionTransformer_forward`` + ``CLIPEncoder_forward`` + ``CLIPEncoderLayer_forward`` (official),
    target = T + 1, select_layer = len(layers) - 2; returns hidden_states[-2] (B, T + 1, D)."""
    hidden_states = tower.pre_layrnorm(tower.embeddings(pixels))
    layers = tower.encoder.layers
    select_layer = len(layers) - 2
    encoder_states = ()
    cumulative_scores = None
    for idx, layer in enumerate(layers):
        rpl = select_layer - idx - 1
        encoder_states += (hidden_states,)
        attn_weights, semantic_attn, v_metric = official_attention(layer, hidden_states)
        hidden_states = layer(hidden_states, None)  # the layer itself (its own attention backend)
        if hidden_states.shape[1] > target_tokens:
            cls_attention = attn_weights[:, :, 0, 1:].mean(dim=1)
            scores = official_compute_score(cls_attention, semantic_attn[:, 1:], v_metric[:, 1:])
            cumulative_scores = scores.clone() if cumulative_scores is None else 0.5 * cumulative_scores + 0.5 * scores
            if not rpl % 2:
                prune_num = (official_adaptive_prune_ratio(cls_attention, rpl, target_tokens - 1) if rpl
                             else hidden_states.shape[1])
                target_num = max(hidden_states.shape[1] - prune_num, target_tokens)
                _, keep_indices = torch.topk(cumulative_scores, target_num - 1, dim=1)
                keep_indices = keep_indices.sort(dim=1).values
                topk_states = torch.gather(hidden_states[:, 1:, :], dim=1,
                                           index=keep_indices.unsqueeze(-1).expand(-1, -1, hidden_states.size(-1)))
                cumulative_scores = torch.gather(cumulative_scores, dim=1, index=keep_indices)
                hidden_states = torch.cat([hidden_states[:, :1, :], topk_states], dim=1)
    encoder_states += (hidden_states,)
    return encoder_states[-2]


def clip_layer(hidden=1024, heads=16, seed=0):
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=hidden, num_attention_heads=heads, intermediate_size=64, num_hidden_layers=1)
    layer = CLIPEncoderLayer(cfg).eval()
    with torch.no_grad():  # sharper [CLS] attention; smaller values (v_CLS . v_CLS must not take all the mass)
        for p in (*layer.self_attn.q_proj.parameters(), *layer.self_attn.k_proj.parameters()):
            p.mul_(4.0)
        layer.self_attn.v_proj.weight.mul_(0.3)
    return layer


def deep_tower(layers=8, image=112, seed=0):
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=layers,
                           image_size=image, patch_size=14)
    tower = CLIPVisionModel(cfg).eval()
    with torch.no_grad():  # sharp [CLS] attention, so that the entropy-based cuts prune something
        for layer in tower.encoder.layers:
            for p in (*layer.self_attn.q_proj.parameters(), *layer.self_attn.k_proj.parameters()):
                p.mul_(12.0)
    return tower


def tower_signals(layer, x, select_layer=22, num_layers=24):
    with torch.no_grad():
        y = layer(x, None)
    return TowerSignals(layer=0, module=layer, hidden_in=x, hidden_out=y,
                        patch=torch.arange(x.shape[1]).expand(x.shape[0], -1) - 1,
                        select_layer=select_layer, num_layers=num_layers)


# ------------------------------------------------------------------ unit tests at the official shapes


@pytest.mark.parametrize("seed", [0, 1])
def test_score_equals_official_at_official_shapes(seed):
    layer = clip_layer(seed=seed)
    x = torch.randn(2, 577, 1024, generator=torch.Generator().manual_seed(seed))
    sig = tower_signals(layer, x)
    assert sig.cls_attention().shape == (2, 16, 577) and sig.values().shape == (2, 577, 16, 64)
    with torch.no_grad():
        c, score = flowcut_score(sig.cls_attention(), sig.values())
        attn, sem, vm = official_attention(layer, x)
    c_off = attn[:, :, 0, 1:].mean(1)
    torch.testing.assert_close(c, c_off, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(score, official_compute_score(c_off, sem[:, 1:], vm[:, 1:]), rtol=1e-4, atol=1e-7)
    assert c.std() > 1e-4  # not a uniform attention
    for rpl in (20, 8, 2):
        for t in (64, 128, 192):
            mine = adaptive_prune_count(c_off, rpl, t)
            assert [int(v) for v in mine] == [official_adaptive_prune_ratio(c_off[b:b + 1], rpl, t) for b in range(2)]
            assert int(mine.max()) == official_adaptive_prune_ratio(c_off, rpl, t)  # the official batch max


def test_adaptive_count_by_hand():
    # uniform attention over n patches: entropy = ln n -> nothing pruned; one-hot-like: (n - T) / sqrt(rpl)
    assert adaptive_prune_count(torch.full((1, 576), 1 / 576), 4, 64).tolist() == [0]
    c = torch.full((1, 576), 1e-12)
    c[0, 3] = 1.0
    assert adaptive_prune_count(c, 4, 64).tolist() == [256]  # (576 - 64) / 2 * (1 - ~0)
    assert adaptive_prune_count(c, 16, 64).tolist() == [128]


@pytest.mark.parametrize("batch_max", [True, False])
def test_flowcut_tower_step_equals_official_layer(batch_max):
    """One pruning step at the official shapes: rpl = 20 (layer 1 of 24) after a first scored layer 0."""
    layer0, layer1 = clip_layer(seed=3), clip_layer(seed=4)
    x = torch.randn(2, 577, 1024, generator=torch.Generator().manual_seed(5))
    m = FlowCut(64, batch_max=batch_max)
    m.setup(num_layers=32, num_vision_layers=24, family="llava")
    with torch.no_grad():
        y0 = layer0(x, None)
        sig0 = TowerSignals(0, layer0, x, y0, torch.arange(577).expand(2, -1) - 1, 22, 24)
        assert m.select_tower(0, sig0) is None  # rpl = 21: scored, not pruned
        y1 = layer1(y0, None)
        sig1 = TowerSignals(1, layer1, y0, y1, torch.arange(577).expand(2, -1) - 1, 22, 24, state=sig0.state)
        keep = m.select_tower(1, sig1)
        # official
        a0, s0, v0 = official_attention(layer0, x)
        cum = official_compute_score(a0[:, :, 0, 1:].mean(1), s0[:, 1:], v0[:, 1:])
        a1, s1, v1 = official_attention(layer1, y0)
        c1 = a1[:, :, 0, 1:].mean(1)
        cum = 0.5 * cum + 0.5 * official_compute_score(c1, s1[:, 1:], v1[:, 1:])
    if batch_max:
        n_keep = [max(577 - official_adaptive_prune_ratio(c1, 20, 64), 65)] * 2
    else:
        n_keep = [max(577 - official_adaptive_prune_ratio(c1[b:b + 1], 20, 64), 65) for b in range(2)]
    assert n_keep[0] < 577
    keeps = list(keep) if isinstance(keep, list) else list(keep.unbind(0))
    for b in range(2):
        exp = torch.topk(cum[b], n_keep[b] - 1).indices.sort().values + 1
        assert keeps[b].tolist() == [0] + exp.tolist()
    assert isinstance(keep, torch.Tensor) == (n_keep[0] == n_keep[1])


# ------------------------------------------------------------------ the tower loop


class KeepAllTower(Method):
    name = "tower_keep_all"
    vision_stage = True
    tower_stage = True

    def __init__(self, explicit=False):
        super().__init__()
        self.explicit = explicit
        self.calls = []

    def select_tower(self, layer_idx, sig):
        self.calls.append((layer_idx, sig.num_units, sig.num_tokens))
        if self.explicit:
            return torch.arange(sig.num_tokens).expand(sig.num_units, -1)
        return None

    def select_vision(self, sig):
        assert torch.equal(sig.in_tower_kept, ~sig.is_newline)  # NeXT newlines are no tower tokens
        return Selection(keep=torch.arange(sig.num_tokens))


@pytest.mark.parametrize("explicit", [False, True])
@ALL
def test_manual_loop_without_pruning_equals_stock_tower(rt, explicit):
    tower = rt.model.model.video_tower if rt.family == "video_llava" else rt.model.model.vision_tower
    inputs = make_batch(rt)
    px = inputs["pixel_values_videos"].flatten(0, 1) if rt.family == "video_llava" else inputs["pixel_values"]
    px = px.flatten(0, 1) if px.dim() == 5 else px
    fl = rt.model.config.vision_feature_layer
    with torch.no_grad():
        stock = tower(px, output_hidden_states=True, return_dict=True).hidden_states
        m = KeepAllTower(explicit)
        hs, kept = run_tower_staged(tower, px, fl, m)
        hs2, _, _, rc = run_tower(tower, px, fl, TowerCall(stage=m))
    assert torch.equal(hs, stock[fl]) and torch.equal(hs2, stock[fl]) and bool(kept.all())
    assert torch.equal(rc["in_tower_kept"], kept)
    n_layers = len(tower.encoder.layers)
    assert [c[0] for c in m.calls[:n_layers - 1]] == list(range(n_layers - 1))  # layers 0 .. select layer
    for v in range(n_layers + 1):  # every hidden state index, incl. the embeddings
        with torch.no_grad():
            assert torch.equal(run_tower_staged(tower, px, v, KeepAllTower())[0], stock[v])


@ALL
def test_keep_all_tower_stage_equals_stock_generation(rt):
    inputs = make_batch(rt)
    with torch.no_grad():
        ref_logits = rt.model(**inputs).logits
        ref = rt.model.generate(**inputs, **GEN)
    eng = rt.prune(KeepAllTower(explicit=True))
    with torch.no_grad():
        logits = rt.model(**inputs).logits
        out = rt.model.generate(**inputs, **GEN)
    assert torch.equal(logits, ref_logits) and torch.equal(out, ref)
    assert all(s.vision_noop for s in eng.stats.samples)


class UnequalTower(Method):
    """Unit u keeps [CLS] + its first (u % 3) + 2 patches after layer 0 (unequal counts -> groups), then
    the first two of those after layer 1."""

    name = "tower_unequal"
    vision_stage = True
    tower_stage = True

    def select_tower(self, layer_idx, sig):
        sig.state.setdefault("u", sig.patch.new_zeros(sig.patch.shape) + torch.arange(sig.num_units)[:, None])
        if layer_idx == 0:
            return [torch.arange(int(u) % 3 + 3) for u in sig.state["u"][:, 0]]
        assert bool((sig.state["u"] == sig.state["u"][:, :1]).all())  # the state followed its units
        return torch.arange(3).expand(sig.num_units, -1)

    def select_vision(self, sig):
        return Selection(keep=torch.nonzero(sig.in_tower_kept).flatten())


def test_unequal_counts_run_in_groups():
    tower = deep_tower(layers=4, image=56)
    px = torch.randn(5, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hs, kept = run_tower_staged(tower, px, -2, UnequalTower())
        for u in range(5):  # each unit alone through the same layers
            h = tower.pre_layrnorm(tower.embeddings(px[u:u + 1]))
            k = u % 3 + 3
            h = tower.encoder.layers[0](h, None)[:, :k]
            h = tower.encoder.layers[1](h, None)[:, :3]
            h = tower.encoder.layers[2](h, None)[:, :3]
            assert kept[u].nonzero().flatten().tolist() == [0, 1, 2]
            # a group of 2 units against 1 unit alone: different GEMM shapes, so the CPU's BLAS may pick
            # another kernel (seen: 2.6e-6 absolute on a 2-core machine); the grouping itself is exact
            torch.testing.assert_close(hs[u, :3], h[0], rtol=1e-5, atol=1e-5)
            assert bool((hs[u, 3:] == 0).all())


@pytest.mark.parametrize("target", [4, 10, 20])
@pytest.mark.parametrize("layers", [8, 9])
def test_tower_equals_official_encoder_on_a_deeper_tower(target, layers):
    """The full schedule (scored every layer, adaptive cuts at even rpl, final cut at rpl = 0) on a random
    8/9-layer tower with 64 patches: identical kept features to the official loop (batch max = official)."""
    tower = deep_tower(layers=layers)
    px = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(target))
    m = FlowCut(target, batch_max=True)
    m.setup(num_layers=4, num_vision_layers=layers, family="llava")
    counts = []
    orig = m.select_tower

    def spy(i, sig):
        counts.append((i, sig.num_tokens))
        return orig(i, sig)

    m.select_tower = spy
    with torch.no_grad():
        hs, kept = run_tower_staged(tower, px, -2, m)
        ref = official_encoder(tower, px, target + 1)
    assert kept.sum(1).tolist() == [target + 1] * 3 and bool(kept[:, 0].all())
    ours = hs[kept].view(3, target + 1, -1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert len({n for _, n in counts}) > 2  # an adaptive cut happened before the final one


@pytest.mark.parametrize("layers", [8, 9])
def test_tower_batch_equals_each_unit_alone(layers):
    tower = deep_tower(layers=layers, seed=1)
    px = torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(7))
    m = FlowCut(12)
    m.setup(num_layers=4, num_vision_layers=layers, family="llava")
    with torch.no_grad():
        hs, kept = run_tower_staged(tower, px, -2, m)
        for u in range(4):
            h1, k1 = run_tower_staged(tower, px[u:u + 1], -2, m)
            assert torch.equal(k1[0], kept[u])
            torch.testing.assert_close(h1[0], hs[u], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the engine on the tiny families


def per_unit_counts(spy_sigs):
    return [[int(((s.unit == u) & s.in_tower_kept).sum()) for u in range(s.num_units)] for s in spy_sigs]


class Spy(FlowCut):
    name = "flowcut_spy"

    def __init__(self, budget=None, **options):
        super().__init__(budget, **options)
        self.seen = []

    def select_vision(self, sig):
        sel = super().select_vision(sig)
        self.seen.append((sig, sel))
        return sel


@ALL
@pytest.mark.parametrize("budget", [1, 3, 8, 15])
def test_tokens_entering_llm(rt, budget):
    if rt.family == "llava_next":
        rt.processor.next_layout = "spatial"  # T per crop exactly (no unpad, no newlines)
    try:
        inputs = make_batch(rt)
        spy = Spy(budget)
        eng = rt.prune(spy)
        with torch.no_grad():
            rt.model(**inputs)
        rows = llm_visual_rows(rt, inputs)
    finally:
        rt.processor.next_layout = "spatial_unpad"
    for (sig, sel), s, row in zip(spy.seen, eng.stats.samples, rows):
        assert s.visual_entering_llm == budget * sig.num_units == sel.num_out == row.shape[0]
        assert per_unit_counts([sig])[0] == [budget] * sig.num_units
        kept = sig.in_tower_kept
        assert bool((sig.features[~kept] == 0).all()) and bool((sig.vision_features[~kept] == 0).all())
        torch.testing.assert_close(row, sig.features[sel.keep].to(row.dtype))
        if rt.family == "video_llava":  # each frame's [CLS] enters the LLM and counts
            assert int((sig.patch[sel.keep] == -1).sum()) == sig.num_units


@ALL
def test_survivors_equal_the_tower_run_alone(rt):
    """The LLM's visual rows are projector(the surviving select-layer states of a separate staged run)."""
    inputs = make_batch(rt, n=1)
    eng = rt.prune("flowcut", 5)
    with torch.no_grad():
        row = llm_visual_rows(rt, inputs)[0]
    tower = rt.model.model.video_tower if rt.family == "video_llava" else rt.model.model.vision_tower
    px = inputs["pixel_values_videos"].flatten(0, 1) if rt.family == "video_llava" else inputs["pixel_values"]
    px = px.flatten(0, 1) if px.dim() == 5 else px
    m = FlowCut(5)
    m.setup(num_layers=1, num_vision_layers=3, family=rt.family)
    with torch.no_grad():
        hs, kept = run_tower_staged(tower, px, -2, m, cls_in_llm=rt.family == "video_llava")
    if rt.family != "video_llava":
        kept[:, 0] = False  # [CLS] dropped from the LLM input
    sel = hs[kept]
    if rt.family == "llava_next":  # spatial_unpad: base crop in order first (the grid crops interleave)
        sel = hs[0][kept[0]]
        row = row[:sel.shape[0]]
    with torch.no_grad():
        exp = rt.model.model.multi_modal_projector(sel[None])[0]
    torch.testing.assert_close(row, exp.to(row.dtype))
    assert eng.stats.samples[0].visual_entering_llm > 0


def test_options(runtimes):
    rt = runtimes["video-llava"]
    inputs = make_batch(rt, n=1)
    try:
        eng = rt.prune("flowcut", 4, frame_cls="extra")
        with torch.no_grad():
            rt.model(**inputs)
        assert eng.stats.samples[0].visual_entering_llm == 8 * 5  # 4 patches + [CLS] per frame
    finally:
        rt.unprune()
    rt = runtimes["llava-next"]
    rt.processor.next_layout = "spatial"
    try:
        inputs = make_batch(rt, n=1)
        eng = rt.prune("flowcut", 6, next_half=True)
        with torch.no_grad():
            rt.model(**inputs)
        assert eng.stats.samples[0].visual_entering_llm == 3 * 3  # int(6 / 2) per crop
    finally:
        rt.unprune()
        rt.processor.next_layout = "spatial_unpad"
    with pytest.raises(ValueError, match="frame_cls"):
        FlowCut(4, frame_cls="x")
    with pytest.raises(TypeError):
        FlowCut(4, nope=1)
    assert FlowCut().budget == 128


def test_budget_at_or_above_the_grid_is_the_stock_model(runtimes):
    rt = runtimes["llava"]
    inputs = make_batch(rt)
    with torch.no_grad():
        ref = rt.model(**inputs).logits
    try:
        eng = rt.prune("flowcut", 16)  # 16 patches per image on the tiny tower
        with torch.no_grad():
            out = rt.model(**inputs).logits
    finally:
        rt.unprune()
    assert torch.equal(out, ref) and all(s.vision_noop for s in eng.stats.samples)


# ------------------------------------------------------------------ the LLaVA-NeXT LLM stage (next_llm_stage)


def official_next_llm_branch(q, k, v, last, start, n, target):
    """The prune branch of the official ``LlamaSdpaAttention_forward`` (``flowcut/modeling_llama_flowcut.py``) for
    one sample, transcribed: q / k / v (H, S, d) of decoder layer 1 (RoPE'd q / k, heads repeated), ``last`` =
    ``last_instruct_pos``, the image at [start, start + n)."""
    import math
    vis_k, vis_v = k[:, start:start + n], v[:, start:start + n]
    text_q, text_v = q[:, last - 1:last], v[:, last - 1:last]
    rw = torch.bmm(text_q, vis_k.transpose(1, 2)) / math.sqrt(q.shape[-1])
    relation = torch.softmax(rw, dim=-1, dtype=torch.float32).to(q.dtype).mean(0)
    sw = torch.bmm(text_v, vis_v.transpose(1, 2)) / math.sqrt(q.shape[-1])
    semantic = torch.softmax(sw, dim=-1, dtype=torch.float32).to(q.dtype).mean(0)
    value = vis_v.mean(0)  # compute_score (flowcut/utils_flowcut.py)
    score = (relation / relation.sum(dim=-1, keepdim=True) + semantic / semantic.sum(dim=-1, keepdim=True)) * \
        torch.norm(value, p=1, dim=-1)
    return torch.topk(score, target, dim=1).indices.sort().values[0]


def test_next_llm_score_worked_example():
    """H = 1, d = 4: q . k / 2 = (0, ln 2, 2 ln 2) -> relation (1, 2, 4) / 7; v_last = 0 -> semantic 1/3 each;
    ||v||_1 = (3, 1, 2): scores 10/7, 13/21, 38/21 -> top-1 {2}, top-2 {0, 2}, in both modes."""
    import math
    from baselines.flowcut import flowcut_llm_select
    q = torch.tensor([[2 * math.log(2), 0.0, 0.0, 0.0]])
    k = torch.tensor([[[0.0, 0, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0]]])
    vv = torch.tensor([[[0.0, 3, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0]]])
    vl = torch.zeros(1, 4)
    for numerics in ("ours", "official"):
        assert flowcut_llm_select(q, k, vl, vv, 1, numerics).tolist() == [2]
        assert flowcut_llm_select(q, k, vl, vv, 2, numerics).tolist() == [0, 2]
        assert flowcut_llm_select(q, k, vl, vv, 3, numerics).tolist() == [0, 1, 2]
        assert flowcut_llm_select(q, k, vl, vv, 9, numerics).tolist() == [0, 1, 2]


@pytest.mark.parametrize("seed", range(4))
def test_next_llm_select_equals_the_official_branch(seed):
    """32 heads, head dim 128, a 35-token prefix, 320 visual tokens (a 5-crop NeXT image at T = 128: 64 per crop)
    and 40 text tokens, target 128: the reference mode on fp16 tensors keeps the official set exactly; the default
    mode (fp32) on the same tensors differs at most in tokens tied with the cut in fp16."""
    from baselines.flowcut import flowcut_llm_select
    g = torch.Generator().manual_seed(seed)
    H, d, start, n, nt, target = 32, 128, 35, 320, 40, 128
    S = start + n + nt
    q, k, v = (torch.randn(H, S, d, generator=g).half() for _ in range(3))
    want = official_next_llm_branch(q, k, v, S, start, n, target)
    vis = slice(start, start + n)
    got = flowcut_llm_select(q[:, -1], k[:, vis], v[:, -1], v[:, vis], target, "official")
    assert torch.equal(got, want) and got.numel() == target
    ours = flowcut_llm_select(q[:, -1], k[:, vis], v[:, -1], v[:, vis], target, "ours")
    assert len(set(ours.tolist()) ^ set(want.tolist())) <= 4


def _layer1_qkv(rt, inputs):
    """Decoder layer 1's q / k / v (H, S, d; RoPE'd q / k, heads repeated) of a one-sample prefill, recomputed from
    the input the layer received (a forward pre-hook) with the layer's own modules."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    lm = rt.model.model.language_model
    seen = {}

    def grab(mod, args, kwargs):
        if "x" not in seen:
            seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach()
            seen["pe"] = kwargs["position_embeddings"]

    h = lm.layers[1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            rt.model(**inputs)
    finally:
        h.remove()
    attn = lm.layers[1].self_attn
    x = lm.layers[1].input_layernorm(seen["x"])
    d = attn.head_dim
    shape = lambda t: t.view(1, x.shape[1], -1, d).transpose(1, 2)  # noqa: E731
    q, k, v = shape(attn.q_proj(x)), shape(attn.k_proj(x)), shape(attn.v_proj(x))
    cos, sin = seen["pe"]
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    rep = q.shape[1] // k.shape[1]
    return q[0], k[0].repeat_interleave(rep, 0), v[0].repeat_interleave(rep, 0)


@pytest.mark.parametrize("layout", ["spatial", "spatial_unpad"])
def test_next_llm_stage_on_the_tiny_model(runtimes, layout):
    """Tiny LLaVA-NeXT (3 crops, 4 decoder layers), each of the three test images alone at T = 2 and 4 (T per crop
    in the tower) and T = 6 with the official recipe (next_half: 3 per crop): layers 0-1 see the tower's survivors,
    layers 2-3 the T the stage keeps; those are the official branch's choice on layer 1's own q / k / v (reference
    mode, and the default mode on this fp32 model); positions are renumbered (reindex)."""
    from conftest import slice_batch
    rt = runtimes["llava-next"]
    rt.processor.next_layout = layout
    try:
        full = make_batch(rt)
        for i in range(3):
            inputs = slice_batch(full, i, rt)
            ids = inputs["input_ids"][0]
            start = int((ids == rt.model.config.image_token_id).nonzero()[0])
            for budget, half in ((2, False), (4, False), (6, True)):
                for numerics in ("ours", "official"):
                    eng = rt.prune("flowcut", budget, next_half=half, next_llm_stage=True, numerics=numerics)
                    assert eng.method.position_mode == "reindex" and eng.method.llm_layers == (2,)
                    q, k, v = _layer1_qkv(rt, inputs)
                    s = eng.stats.samples[0]
                    n = s.visual_per_layer[0]
                    per_crop = budget // 2 if half else budget
                    assert s.visual_per_layer[1] == n and s.visual_per_layer[2:] == [budget, budget]
                    assert n == 3 * per_crop if layout == "spatial" else budget < n <= 3 * per_crop
                    want = official_next_llm_branch(q, k, v, q.shape[1], start, n, budget)  # last: the row's length
                    assert eng.selections[(0, 0)].keep.tolist() == want.tolist(), (i, budget, numerics)
    finally:
        rt.unprune()
        rt.processor.next_layout = "spatial_unpad"


def test_next_llm_stage_generation(runtimes):
    """Cached generation of a left-padded batch of 3 equals the no-cache recompute (decode positions shifted by
    the stage's drop after layer 1), and each sample generated alone gives the same tokens."""
    from conftest import check_generate_batch_equals_alone, greedy_no_cache
    rt = runtimes["llava-next"]
    try:
        inputs = make_batch(rt)
        eng = rt.prune("flowcut", 4, next_half=True, next_llm_stage=True)
        with torch.no_grad():
            cached = rt.model.generate(**inputs, **GEN)
        assert all(s.visual_per_layer[2:] == [4, 4] for s in eng.stats.samples)
        eng.replay = True
        assert torch.equal(cached, greedy_no_cache(rt.model, inputs, GEN["max_new_tokens"]))
        check_generate_batch_equals_alone(rt, "flowcut", 4, next_half=True, next_llm_stage=True)
    finally:
        rt.unprune()


def test_next_llm_stage_options(runtimes):
    m = FlowCut(8, next_llm_stage=True)
    assert m.position_mode == "reindex" and "next_llm_stage" in m.capture_refusal()
    assert FlowCut(8, next_llm_stage=True, position_mode="keep").position_mode == "keep"
    assert FlowCut(8).position_mode == "keep" and FlowCut(8).llm_layers == ()
    rt = runtimes["llava"]  # LLaVA-1.5: no LLM stage (the official one is NeXT's only)
    try:
        inputs = make_batch(rt, n=1)
        eng = rt.prune("flowcut", 4, next_llm_stage=True)
        assert eng.method.llm_layers == ()
        with torch.no_grad():
            rt.model(**inputs)
        assert len(set(eng.stats.samples[0].visual_per_layer)) == 1
    finally:
        rt.unprune()
