"""SparseVLM on the fast path (issue 34 item 3): its stage counts are host values (the schedule and the recycled
clusters of the pruned count), only the rater set depends on the data, and the captured stage reads it as a mask
over the padded text rows (``rater_mask``); scores, top k and the density-peak recycling run on the device.
Greedy tokens, first-step scores and visual tokens per layer == the eager engine's on the three LLaVA families
(v1 with recycling; v2 with the RoPE gravity and head selection), 0 host syncs inside the captured prefill, one
prefill graph per bucket."""

import pytest
import torch
from fastpath_util import (SINGLES, assert_one_graph_per_bucket, assert_same_as_eager, counting_fast_path, family_batch,
                           fast_and_eager, inputs, prune_family)

from baselines.sparsevlm import rater_mask, select_raters
from llava.method import get_method
from llava.models import load

#: the tiny LLM has 4 layers (stages before layers 1 / 2 / 3) and 16 tokens per image: an explicit schedule that
#: retains 10 / 9 / 6 of 16 (rescaled to the depth by ``fit_stage_counts``; v1: plus one recycled cluster at each
#: stage), and v2 at 192 (3 / 2 / 1) with two of the four heads and the gravity correction
OPTIONS = [("v1-recycle", {"schedule": (500, 450, 300)}),
           ("v2-heads", {"budget": 192, "version": "v2", "heads": 2})]


def _prune(rt, opts):
    opts = dict(opts)
    return rt.prune("sparsevlm", opts.pop("budget", None), **opts)


@pytest.fixture(scope="module")
def rts():
    return {fam: fast_and_eager(fam) for fam in ("llava", "llava_next", "video_llava")}


def test_rater_mask_is_select_raters_on_a_padded_block():
    """Worked example: 2 visual tokens, 3 text tokens (padded to 5). V T^T = [[2, 0, 0], [4, 0, 0]]: softmax rows
    (.787, .107, .107) and (.965, .018, .018), their mean (.876, .062, .062), above the mean 1/3: the first
    token alone rates."""
    v = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    t = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])
    padded = torch.cat([t, torch.full((2, 2), 1e4)])  # pads that would dominate a softmax over them
    mask = torch.tensor([True, True, True, False, False])
    assert select_raters(v, t).tolist() == [0]
    assert rater_mask(v, padded, mask).tolist() == [True, False, False, False, False]
    uniform = torch.zeros(3, 2)  # every relevance equals the mean: no rater above it -> every real row rates
    assert select_raters(v, uniform).numel() == 0
    assert rater_mask(v, torch.cat([uniform, padded[3:]]), mask).tolist() == [True, True, True, False, False]
    torch.manual_seed(0)
    for _ in range(20):  # random blocks: the mask's rows == select_raters' indices (none: every row)
        n, q = int(torch.randint(1, 6, ())), int(torch.randint(1, 7, ()))
        v, t = torch.randn(n, 8), torch.randn(q, 8)
        pad = torch.randn(3, 8) * 50
        got = rater_mask(v, torch.cat([t, pad]), torch.arange(q + 3) < q)
        want = select_raters(v, t).tolist() or list(range(q))  # one text token: never above its own mean
        assert got.nonzero().flatten().tolist() == want


def test_declared_capturable_and_the_reference_mode_refused():
    m = get_method("sparsevlm", 64)
    assert m.capturable == "full" and m.capture_refusal() is None and m.llm_text_rows
    assert get_method("sparsevlm", 64, version="v2").capture_refusal() is None
    assert "official" in get_method("sparsevlm", 64, numerics="official").capture_refusal()


@pytest.mark.parametrize("name,opts", OPTIONS)
def test_fast_tokens_equal_the_eager_engine(rts, name, opts):
    """LLaVA-1.5, a left-padded batch of 3 prompts of different lengths (FAST_FULL=1: also each alone)."""
    fast, eager = rts["llava"]
    eng = _prune(fast, opts)
    _prune(eager, opts)
    assert eng.fast.refusal is None
    for i in SINGLES:
        assert_same_as_eager(fast, eager, eng, inputs(fast, i))
    assert_same_as_eager(fast, eager, eng, inputs(fast, 0, n=3))
    per_layer = [s.visual_per_layer for s in eng.stats.samples]
    assert per_layer == [s.visual_per_layer for s in eager.engine.stats.samples]
    assert per_layer[0] == ([16, 11, 10, 7] if name == "v1-recycle" else [16, 3, 2, 1])  # recycled clusters: +1


@pytest.mark.parametrize("family", ["llava_next", "video_llava"])
@pytest.mark.parametrize("name,opts", OPTIONS)
def test_fast_tokens_equal_the_eager_engine_on_next_and_video_llava(rts, family, name, opts):
    """Dynamo traces v1 on LLaVA-NeXT and v2 on Video-LLaVA (each version's capture is also its LLaVA-1.5 test);
    the other two cases run the same fast path uncompiled (tests/fastpath_util.py: ``prune_family``; CI time)."""
    fast, eager = rts[family]
    traced = (name, family) in (("v1-recycle", "llava_next"), ("v2-heads", "video_llava"))
    eng = prune_family(fast, "sparsevlm", opts.get("budget"), traced,
                       **{k: v for k, v in opts.items() if k != "budget"})
    _prune(eager, opts)
    assert_same_as_eager(fast, eager, eng, family_batch(fast, family))
    per_layer = [s.visual_per_layer for s in eng.stats.samples]
    assert per_layer == [s.visual_per_layer for s in eager.engine.stats.samples]
    assert all(p[-1] < p[0] for p in per_layer)


@pytest.mark.parametrize("name,opts", OPTIONS)
def test_no_host_sync_inside_the_captured_prefill(rts, name, opts):
    fast, _ = rts["llava"]
    eng = _prune(fast, opts)
    fp, calls = counting_fast_path(eng)
    batch = inputs(fast, 1, n=2)
    with torch.no_grad():
        fp.prefill(batch["input_ids"], batch["attention_mask"], {"pixel_values": batch["pixel_values"]})
    assert calls == [0]


def test_one_prefill_graph_per_bucket(rts):
    """Prompts of other lengths (other rater sets, other text lengths in the same text bucket) and 16 decode
    steps compile nothing after the first prompt (recompilation raises); tokens == eager."""
    fast, eager = rts["llava"]
    torch._dynamo.reset()
    eng = _prune(fast, OPTIONS[0][1])
    _prune(eager, OPTIONS[0][1])
    assert_one_graph_per_bucket(fast, eager, eng, inputs(fast, 0), [inputs(fast, i) for i in (1, 2, 3)])


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_qwen_families_equal_the_eager_engine_without_a_host_sync(family):
    """On 3-D M-RoPE positions (v1 re-indexes nothing there: kept tokens keep theirs) and Qwen3-VL's DeepStack
    rows: a batch of three grids == the eager engine, visual tokens per layer included, 0 host syncs inside the
    captured prefill (run uncompiled: the code the LLaVA tests compile)."""
    from test_fastpath_qwen import batch_of

    fast = load(f"tiny:{family}", seed=1, fast=True, fast_max_new_tokens=16, fast_backend="none")
    eager = load(f"tiny:{family}", seed=1)
    eng = _prune(fast, OPTIONS[0][1])
    _prune(eager, OPTIONS[0][1])
    fp, syncs = counting_fast_path(eng)
    eng.fast = fp
    assert_same_as_eager(fast, eager, eng, batch_of(fast, 3), tokens=4)
    per_layer = [s.visual_per_layer for s in eng.stats.samples]
    assert per_layer == [s.visual_per_layer for s in eager.engine.stats.samples] and per_layer[0][-1] < per_layer[0][0]
    assert syncs == [0]
