"""FlowCut on the fast path (llava.fast.path): the in-tower stage captured through the masked tower
(``llava.families.clip.run_tower_masked``: every unit at its full token count, the survivors a device mask, each
layer's attention masked to them, ``FlowCut.select_tower_masked``). The masked tower == the eager gathered
tower (``run_tower_staged``): the same survivors after every layer, the select layer's states allclose on the
kept tokens and zero on the dropped ones; a worked example of the masked prune count; on the three tiny
families with a deepened tower (two adaptive cuts and the final one prune inside the tower): 0 host syncs
inside the captured prefill, greedy tokens == the eager engine's, one graph per bucket; refusals."""

import math

import pytest
import torch
from conftest import rand_image
from device_check import DevicePlacementCheck
from fastpath_util import BACKEND, PROMPTS, assert_same_as_eager, counting_fast_path, family_batch, generate, inputs
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from baselines.flowcut import FlowCut, adaptive_prune_count, adaptive_prune_count_masked
from llava.families.clip import run_tower_masked, run_tower_staged
from llava.models import load
from llava.tower_signals import TowerSignals

FAMILIES = ("llava", "llava_next", "video_llava")
#: patches per unit on the tiny towers (16) - budget 3: the adaptive cuts and the final one all prune
BUDGET = 3
#: layers added to the tiny 3-layer towers: 7 layers, select layer 5 (hidden_states[-2]); rpl = 4 - i, so
#: adaptive cuts after layers 0 and 2 and the final cut after layer 4
EXTRA_LAYERS = 4


def sharpen(tower, factor):
    """Scale every layer's q / k projections: a sharp [CLS] attention, so that the entropy-based cuts prune."""
    with torch.no_grad():
        for layer in tower.encoder.layers:
            for p in (*layer.self_attn.q_proj.parameters(), *layer.self_attn.k_proj.parameters()):
                p.mul_(factor)


def deepen(rt, extra=EXTRA_LAYERS, factor=6.0, seed=7):
    """The runtime's CLIP tower(s) with ``extra`` seeded layers appended and sharpened (the same weights in
    every runtime built with the same seed)."""
    core = rt.model.model
    for attr in ("vision_tower", "image_tower", "video_tower"):
        tower = getattr(core, attr, None)
        if tower is None:
            continue
        torch.manual_seed(seed)
        for _ in range(extra):
            tower.encoder.layers.append(CLIPEncoderLayer(tower.config).eval())
        tower.config.num_hidden_layers = len(tower.encoder.layers)
        sharpen(tower, factor)
    return rt


def deep_tower(layers, image=112, seed=0):
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=layers,
                           image_size=image, patch_size=14)
    tower = CLIPVisionModel(cfg).eval()
    sharpen(tower, 12.0)
    return tower


class Spy(FlowCut):
    """FlowCut recording, after every tower layer, each unit's survivors (original positions) on both towers,
    and the eager tower's token counts per pruning call."""

    name = "flowcut_spy_fast"

    def __init__(self, budget=None, **options):
        super().__init__(budget, **options)
        self.eager, self.masked, self.cuts = {}, {}, []

    def select_tower(self, layer_idx, sig):
        keep = super().select_tower(layer_idx, sig)
        pos = sig.patch + 1  # original positions of the current tokens
        if keep is None:
            after = list(pos)
        else:
            keeps = list(keep) if isinstance(keep, list) else list(keep.unbind(0))
            after = [p[k] for p, k in zip(pos, keeps)]
            self.cuts.append((layer_idx, sig.num_tokens, [int(k.numel()) for k in keeps]))
        self.eager.setdefault(layer_idx, []).extend(tuple(a.tolist()) for a in after)
        return keep

    def select_tower_masked(self, layer_idx, sig):
        new = super().select_tower_masked(layer_idx, sig)
        mask = new if new is not None else (sig.key_mask if sig.key_mask is not None
                                            else torch.ones(sig.num_units, sig.num_tokens, dtype=torch.bool))
        self.masked[layer_idx] = [tuple(torch.nonzero(m).flatten().tolist()) for m in mask]
        return new


# ------------------------------------------------------------------ the masked tower == the gathered tower


@pytest.mark.parametrize("layers,target,batch_max", [(8, 3, False), (9, 10, False), (9, 3, True), (8, 30, False)])
def test_masked_tower_equals_the_staged_tower(layers, target, batch_max):
    """Per layer the same survivors (as a multiset of per-unit sets: the eager tower regroups units by count),
    the same final survivors per unit, the select layer's states allclose on the kept tokens (fp32) and zero on
    the dropped ones; adaptive cuts with unequal counts per unit happen."""
    tower = deep_tower(layers)
    px = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(layers + target))
    m = Spy(target, batch_max=batch_max)
    m.setup(num_layers=4, num_vision_layers=layers, family="llava")
    with torch.no_grad():
        hs, kept = run_tower_staged(tower, px, -2, m)
        with DevicePlacementCheck():  # no host-born tensor mixed into the device work (CUDA-safe)
            hm, km = run_tower_masked(tower, px, -2, m)
    assert torch.equal(kept, km)
    assert kept.sum(1).tolist() == [target + 1] * 3
    select = layers - 2
    assert sorted(m.masked) == list(range(select + 1))
    for i in range(select + 1):
        assert sorted(m.eager[i]) == sorted(m.masked[i]), i
    adaptive = [c for c in m.cuts if c[0] < select - 1]
    assert adaptive and any(min(c[2]) < c[1] for c in adaptive)  # an adaptive cut pruned
    if not batch_max:
        assert any(len(set(c[2])) > 1 for c in m.cuts)  # unequal counts per unit (the eager tower's groups)
    torch.testing.assert_close(hm[km], hs[kept], atol=1e-5, rtol=1e-5)
    assert bool((hm[~km] == 0).all()) and bool((hs[~kept] == 0).all())


def test_masked_tower_without_pruning_is_the_stock_tower():
    """Budget >= the grid: the hook never changes the mask, every layer runs the stock call (no mask): the
    select layer's states are the stock ``hidden_states[-2]`` bit for bit."""
    tower = deep_tower(4, image=56)
    px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    m = FlowCut(16)
    m.setup(num_layers=4, num_vision_layers=4, family="llava")
    with torch.no_grad():
        hm, km = run_tower_masked(tower, px, -2, m)
        ref = tower(px, output_hidden_states=True).hidden_states[-2]
    assert bool(km.all()) and torch.equal(hm, ref)


def test_masked_prune_count_by_hand():
    """c over 5 patch columns, patch 2 absent (0): n_p = 4, prob = (0.85, 0.05, -, 0.05, 0.05),
    H = -(0.85 ln 0.85 + 3 * 0.05 ln 0.05) = 0.58750, H / ln 4 = 0.42379, (4 - 1) / sqrt(2) * (1 - 0.42379^2)
    = 1.7403 -> 2; a uniform unit prunes 0. Equal to the eager count on the gathered columns."""
    c = torch.tensor([[0.765, 0.045, 0.0, 0.045, 0.045], [0.2, 0.2, 0.2, 0.2, 0.2]])
    present = torch.tensor([[True, True, False, True, True], [True] * 5])
    h = -(0.85 * math.log(0.85) + 3 * 0.05 * math.log(0.05))
    assert abs(h - 0.58750) < 1e-5
    assert abs(3 / math.sqrt(2) * (1 - (h / math.log(4)) ** 2) - 1.7403) < 1e-4
    assert adaptive_prune_count_masked(c, present, rpl=2, target=1).tolist() == [2, 0]
    assert adaptive_prune_count(c[:1, present[0]], 2, 1).tolist() == [2]
    assert adaptive_prune_count(c[1:], 2, 1).tolist() == [0]


def test_masked_select_tower_by_hand():
    """One masked pruning call on hand-made signals: S = 6 (CLS + 5 patches), token 3 already dropped.
    v_CLS = 0, so the semantic softmax is uniform over the 5 present tokens (0.25 per present patch after the
    normalisation), v_j = m_j (one head, width 1): score_j = (prob_j + 0.25) * m_j = 1.1, 1.2, -, 0.6, 0.9 for
    tokens 1, 2, 4, 5; the prune count 2 (above) leaves 3 tokens = [CLS] + tokens 2 and 1; the dropped token 3
    (m = 9) is never picked back. The second unit (uniform [CLS] row, nothing dropped) prunes 0 patches. At the
    final cut (rpl 0) tau = 2 tokens: [CLS] + the best by the EMA of the two scores."""
    m = FlowCut(1)  # T = 1, tau = 2
    m.setup(num_layers=4, num_vision_layers=5, family="llava")
    key = torch.tensor([[True, True, True, False, True, True], [True] * 6])
    cls_attn = torch.tensor([[0.1, 0.765, 0.045, 0.0, 0.045, 0.045], [1 / 6] * 6])[:, None]  # (n, H = 1, S)
    mags = torch.tensor([[0.0, 1.0, 4.0, 9.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    values = mags[:, :, None, None]  # (n, S, H = 1, d = 1)
    x = torch.zeros(2, 6, 1)

    def sig(layer, state, mask):
        return TowerSignals(layer=layer, module=None, hidden_in=x, hidden_out=x, patch=torch.arange(6).expand(2, 6) - 1,
                            select_layer=3, num_layers=5, state=state, key_mask=mask, captured=True,
                            _cache={"cls_attn": cls_attn, "values": values})

    s0 = sig(0, {}, key)  # rpl = 3 - 1 - 0 = 2: an adaptive cut
    new = m.select_tower_masked(0, s0)
    assert new.tolist() == [[True, True, True, False, False, False], [True] * 6]
    torch.testing.assert_close(s0.state["flowcut_cum"][0, [1, 2, 4, 5]], torch.tensor([1.1, 1.2, 0.6, 0.9]))
    s1 = sig(1, s0.state, new)  # rpl 1: scored (EMA), no cut
    assert m.select_tower_masked(1, s1) is None
    s2 = sig(2, s1.state, new)  # rpl 0: the final cut to tau = 2
    final = m.select_tower_masked(2, s2)
    assert final.sum(1).tolist() == [2, 2] and final[:, 0].all()
    cum = s2.state["flowcut_cum"][:, 1:].masked_fill(~new[:, 1:], float("-inf"))
    assert final[:, 1:].float().argmax(1).tolist() == cum.argmax(1).tolist()


# ------------------------------------------------------------------ refusals


def test_declared_capturable_and_refusals_by_option():
    m = FlowCut(4)
    assert m.capturable == "full" and m.capture_kind() == "full" and m.capture_refusal() is None
    assert not FlowCut.capture_reason
    for opts in ({"batch_max": True}, {"next_half": True}, {"frame_cls": "extra"}, {"ema": 0.3}):
        assert FlowCut(4, **opts).capture_refusal() is None, opts
    assert "official" in FlowCut(4, numerics="official").capture_refusal()


@pytest.fixture(scope="module")
def rts():
    """Per family (fast, eager) tiny runtimes with the deepened tower; LLaVA-NeXT in the ``spatial`` layout
    (every crop feeds all its patches: a static count; ``spatial_unpad`` crops cut by the unpadding run eagerly)."""
    out = {}
    for fam in FAMILIES:
        kw = {"next_layout": "spatial"} if fam == "llava_next" else {}
        out[fam] = (deepen(load(f"tiny:{fam}", seed=1, fast=True, fast_max_new_tokens=16, fast_backend=BACKEND, **kw)),
                    deepen(load(f"tiny:{fam}", seed=1, **kw)))
    return out


def batch_for(rt, family):
    return inputs(rt, 0, n=3) if family == "llava" else family_batch(rt, family)


def test_refused_prefills_run_eagerly_and_say_why(rts):
    fast, eager = rts["llava"]

    class NoMask(FlowCut):  # an in-tower stage with no masked variant
        name = "flowcut_nomask"
        select_tower_masked = None

    eng = fast.prune(NoMask(BUDGET))
    assert "select_tower_masked" in eng.fast.refusal
    eng = fast.prune("flowcut", BUDGET, numerics="official")
    assert "official" in eng.fast.refusal
    batch = inputs(fast, 0)
    toks, _ = generate(fast, batch, tokens=2)
    assert eng.stats.path == "eager" and "official" in eng.stats.path_reason


def test_next_spatial_unpad(rts):
    """LLaVA-NeXT ``spatial_unpad``: a grid crop cut by the unpadding feeds only some of its patches, so the
    survivors entering the LLM depend on the image: the plan says so and the prefill runs eagerly. Square
    images (no crop cut; newline tokens) are captured: tokens == eager."""
    fast, eager = rts["llava_next"]
    for rt in (fast, eager):
        rt.processor.next_layout = "spatial_unpad"
    try:
        eng = fast.prune("flowcut", BUDGET)
        eager.prune("flowcut", BUDGET)
        assert eng.fast.refusal is None
        generate(fast, family_batch(fast, "llava_next"), tokens=1)
        assert eng.stats.path == "eager" and "spatial_unpad" in eng.stats.path_reason
        batch = fast.processor(PROMPTS[1:3], [rand_image(0, 60, 60), rand_image(1, 90, 90)])
        assert_same_as_eager(fast, eager, eng, batch, tokens=2)
        assert [s.visual_entering_llm for s in eng.stats.samples] == [5 * BUDGET] * 2  # 5 crops, no newline
        assert all(s.visual_candidates > 5 * 16 for s in eng.stats.samples)  # the newline tokens were candidates
    finally:
        for rt in (fast, eager):
            rt.processor.next_layout = "spatial"


# ------------------------------------------------------------------ the captured prefill


@pytest.mark.parametrize("family", FAMILIES)
def test_no_host_sync_inside_the_captured_prefill(rts, family):
    """The captured function (run uncompiled: the same code, ``sig.captured``) reads nothing from the device."""
    fast, _ = rts[family]
    eng = fast.prune("flowcut", BUDGET)
    fp, syncs = counting_fast_path(eng)
    eng.fast = fp
    generate(fast, batch_for(fast, family), tokens=1)
    assert eng.stats.path == "fast", eng.stats.path_reason
    assert syncs == [0]


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_tokens_equal_the_eager_engine(rts, family):
    """A batch of three prompts of different lengths (NeXT: three crop grids; Video-LLaVA: 8-frame videos):
    greedy tokens, first-step scores and counts == the eager engine; the eager tower pruned at both adaptive
    cuts (unequal counts per unit) and at the final one."""
    fast, eager = rts[family]
    eng = fast.prune("flowcut", BUDGET)
    spy = Spy(BUDGET)
    eager.prune(spy)
    assert_same_as_eager(fast, eager, eng, batch_for(fast, family), tokens=4)
    layers = {c[0] for c in spy.cuts}
    assert {0, 2, 4} <= layers, spy.cuts  # two adaptive cuts (rpl 4, 2) and the final one (rpl 0)
    assert any(min(c[2]) < c[1] for c in spy.cuts if c[0] < 4)
    per_unit = BUDGET  # tokens per unit entering the LLM ([CLS] counted on Video-LLaVA frames)
    units = {"llava": [1, 1, 1], "video_llava": [8, 8, 8]}.get(family)
    got = [s.visual_entering_llm for s in eng.stats.samples]
    if units:
        assert got == [per_unit * u for u in units]
    assert not any(s.vision_noop for s in eager.engine.stats.samples)


def test_batch_max_is_captured(rts):
    """``batch_max=True`` (the official max of the prune amount over the units of one tower call): the max is
    taken on the device over the units of the captured tower call, the eager engine's units (one call per batch):
    tokens == eager, no host sync (uncompiled)."""
    fast, eager = rts["llava"]
    eng = fast.prune("flowcut", BUDGET, batch_max=True)
    eager.prune("flowcut", BUDGET, batch_max=True)
    fp, syncs = counting_fast_path(eng)
    eng.fast = fp
    assert_same_as_eager(fast, eager, eng, inputs(fast, 0, n=3), tokens=4)
    assert syncs == [0]


def test_one_prefill_graph_per_bucket(rts):
    """Compiled (dynamo, fullgraph=True): after the first prompt, a prompt of another length in the same bucket
    compiles nothing (recompilation raises); tokens == eager."""
    fast, eager = rts["llava"]
    torch._dynamo.reset()
    eng = fast.prune("flowcut", BUDGET)
    eager.prune("flowcut", BUDGET)
    first = inputs(fast, 0)
    assert torch.equal(generate(fast, first, tokens=4)[0], generate(eager, first, tokens=4)[0])
    assert eng.stats.path == "fast" and eng.stats.new_graph
    bucket = eng.stats.bucket
    with torch._dynamo.config.patch(error_on_recompile=True):
        batch = inputs(fast, 1)
        assert batch["input_ids"].shape[1] != first["input_ids"].shape[1]
        toks = generate(fast, batch, tokens=4)[0]
        assert eng.stats.path == "fast" and eng.stats.bucket == bucket and not eng.stats.new_graph
    assert torch.equal(toks, generate(eager, batch, tokens=4)[0])
