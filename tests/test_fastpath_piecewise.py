"""The fast path's piecewise prefill (issue 34): a vision stage whose output count depends on the image
(PruMerge's adaptive IQR count) runs as graph 1 (tower -> signals -> the selection padded to a static size
with its count on the device) -> one host read of the counts -> the host plans the rows -> graph 2 (the
language model in the bucket the counts pick). Tokens, first-step scores and visual token counts equal
the eager engine's on the three LLaVA families; graph 1 does not depend on the counts and graph 2 only on
the bucket; neither reads the device; Selection.count's validity flags."""

import pytest
import torch
from fastpath_util import BACKEND, SINGLES, assert_same_as_eager, counting_fast_path, family_batch, generate, inputs

from baselines.prumerge import prumerge, prumerge_padded
from llava import get_method, load
from llava.ops import unit_layout
from llava.selection import Selection


@pytest.fixture(scope="module")
def rts():
    return {fam: (load(f"tiny:{fam}", seed=1, fast=True, fast_max_new_tokens=16, fast_backend=BACKEND),
                  load(f"tiny:{fam}", seed=1)) for fam in ("llava", "llava_next", "video_llava")}


# ------------------------------------------------------------------ Selection.count


def _flags(sel, n):
    return {k: bool(v) for k, v in sel.flags(n).items()}


def test_count_flags_check_only_the_real_outputs():
    # outputs [keep 2, 0, 3 | target 0]; order (0, 3, 1, 2) -> provenance [2, 0 (the target), 0, 3];
    # count 2 -> the real outputs are [2, 0]: valid, though the padding repeats 0
    sel = Selection(keep=torch.tensor([2, 0, 3]), targets=torch.tensor([0]), assign=torch.full((5,), -1),
                    values=torch.zeros(4, 3), order=torch.tensor([0, 3, 1, 2]), count=torch.tensor(2))
    f = _flags(sel, 5)
    assert not any(f[k] for k in Selection.MALFORMED if k in f)
    sel.count = torch.tensor(3)  # the padding's duplicate 0 becomes real
    assert _flags(sel, 5)["dup"]
    sel.count = torch.tensor(5)  # more than there are outputs
    assert _flags(sel, 5)["count"]
    sel = Selection(keep=torch.tensor([1, 7, 9]), count=torch.tensor(1))  # 7, 9 out of range: padding
    f = _flags(sel, 5)
    assert not f["range"] and not f["dup"]
    sel.count = torch.tensor(2)
    assert _flags(sel, 5)["range"]
    with pytest.raises(ValueError, match="count"):
        Selection(keep=torch.tensor([0, 1]), count=torch.tensor(3)).check(4)
    # the captured prefill asks only for the malformed flags (no identity tests inside the graph)
    ident = Selection(keep=torch.arange(4), order=torch.tensor([1, 0, 2, 3]))
    assert {"not_identity", "order_moves"} <= set(ident.flags(4))
    assert set(ident.flags(4, malformed_only=True)) == {"range", "dup", "order"}


# ------------------------------------------------------------------ prumerge_padded == prumerge


def _outputs(sel):
    """Provenance and values of a selection's outputs, in output order, cut to its count."""
    prov = sel.keep if sel.targets is None else torch.cat([sel.keep, sel.targets])
    vals = sel.values
    if sel.order is not None:
        prov, vals = prov[sel.order], vals[sel.order]
    n = int(sel.count) if sel.count is not None else prov.numel()
    return prov[:n], vals[:n]


def _sample(seed, units=2, rows=4, cols=4, cls=True, newline=False):
    g = torch.Generator().manual_seed(seed)
    unit, patch = [], []
    for u in range(units):
        if cls:
            unit.append(u)
            patch.append(-1)
        for p in torch.randperm(rows * cols, generator=g).tolist():  # patches in a scrambled order
            unit.append(u)
            patch.append(p)
        if newline:
            unit.append(-1)
            patch.append(-1)
    T = len(unit)
    attn = torch.rand(T, generator=g) ** 4  # heavy-tailed: a few IQR outliers
    return (attn, torch.randn(T, 8, generator=g), torch.randn(T, 6, generator=g), torch.tensor(unit),
            torch.tensor(patch), (rows, cols))


@pytest.mark.parametrize("variant", ["plus", "base"])
@pytest.mark.parametrize("cls_token", ["drop", "keep"])
@pytest.mark.parametrize("shape", [dict(), dict(units=3, rows=6, cols=5, newline=True), dict(units=1, cls=False)])
def test_padded_prumerge_gives_the_eager_outputs(variant, cls_token, shape):
    for seed in range(4):
        attn, keys, feats, unit, patch, grid = _sample(seed, **shape)
        kw = dict(variant=variant, k=5, cls_token=cls_token)
        ref = prumerge(attn, keys, feats, unit, patch, grid, **kw)
        got = prumerge_padded(attn, keys, feats, patch, grid, unit_layout(unit, patch), **kw)
        assert got.num_out > int(got.count)  # padded: a static size past the count
        p0, v0 = _outputs(ref)
        p1, v1 = _outputs(got)
        assert torch.equal(p0, p1)
        torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-5)
        assert not any(bool(f) for k, f in got.flags(unit.numel()).items() if k in Selection.MALFORMED)


def test_padded_prumerge_count_follows_the_official_arithmetic():
    # one unit of 16 patches, attention 1 except three outliers: 3 outliers -> ratio 3/16, top int(16 * 3/16)
    # = 3; PruMerge+ sigma int(int(16 / 3) / 3) = 1: every non-top patch below P - 1 = 15 is a supplement
    a = torch.ones(16)
    a[[2, 9, 11]] = torch.tensor([50.0, 40.0, 60.0])
    unit, patch = torch.zeros(16, dtype=torch.long), torch.arange(16)
    keys, feats = torch.randn(16, 4), torch.randn(16, 3)
    base = prumerge_padded(a, keys, feats, patch, (4, 4), unit_layout(unit, patch), variant="base", k=3)
    prov, _ = _outputs(base)
    assert prov.tolist() == [11, 2, 9, 0]  # top 3 by attention descending, then g (its target: patch 0)
    plus = prumerge_padded(a, keys, feats, patch, (4, 4), unit_layout(unit, patch), variant="plus", k=3)
    prov, _ = _outputs(plus)
    # top 3, then patches 0..14 without the top (12), then g: patch 15 is the only pruned one
    assert prov.tolist() == [11, 2, 9] + [p for p in range(15) if p not in (2, 9, 11)] + [15]


# ------------------------------------------------------------------ the piecewise prefill


def test_declared_kinds_and_refusals():
    assert get_method("prumerge", None).capture_kind() == "piecewise"
    assert get_method("prumerge", None).capture_refusal() is None
    assert get_method("prumerge", 9, budget_mode="fixed").capture_kind() == "full"
    assert "official" in get_method("prumerge", None, numerics="official").capture_refusal()


@pytest.mark.parametrize("opts", [dict()])  # PruMerge (base) and cls_token="keep": on NeXT / Video-LLaVA below
def test_piecewise_tokens_equal_the_eager_engine_on_llava(rts, opts):
    fast, eager = rts["llava"]
    eng = fast.prune("prumerge", None, **opts)
    eager.prune("prumerge", None, **opts)
    assert eng.fast.piecewise and eng.fast.refusal is None
    for i in SINGLES:
        assert_same_as_eager(fast, eager, eng, inputs(fast, i))
        assert eng.stats.graphs == 2
    assert_same_as_eager(fast, eager, eng, inputs(fast, 0, n=3))
    assert eng.stats.graphs == 2
    if not opts:  # PruMerge+: the counts differ within the batch (padded slices of different fill)
        assert len({s.visual_entering_llm for s in eng.stats.samples}) > 1


@pytest.mark.parametrize("family,video", [("llava_next", False), ("video_llava", True)])
def test_piecewise_tokens_equal_the_eager_engine_on_next_and_video_llava(rts, family, video):
    fast, eager = rts[family]
    opts = dict(cls_token="keep") if video else dict(variant="base")
    eng = fast.prune("prumerge", None, **opts)
    eager.prune("prumerge", None, **opts)
    assert_same_as_eager(fast, eager, eng, family_batch(fast, family, video))
    assert eng.stats.graphs == 2


def test_fixed_budget_prumerge_is_captured_whole(rts):
    fast, eager = rts["llava_next"]
    eng = fast.prune("prumerge", 5, budget_mode="fixed")
    eager.prune("prumerge", 5, budget_mode="fixed")
    assert not eng.fast.piecewise
    assert_same_as_eager(fast, eager, eng, family_batch(fast, "llava_next"))
    assert eng.stats.graphs == 2  # the tower, then the rest (no host read between: not piecewise)


def test_other_counts_in_the_same_bucket_compile_nothing(rts):
    """Graph 1 is keyed by the sample structure, graph 2 by the bucket: once both ran, prompts whose counts
    differ (same bucket) and 16 decode steps compile nothing (recompilation raises)."""
    fast, _ = rts["llava"]
    torch._dynamo.reset()
    eng = fast.prune("prumerge", None)
    generate(fast, inputs(fast, 0), tokens=16)
    assert eng.stats.new_graph
    seen = set()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in (1, 2, 3, 4):
            generate(fast, inputs(fast, i), tokens=16)
            assert eng.stats.path == "fast" and not eng.stats.new_graph and eng.stats.bucket == 64
            seen.add(eng.stats.samples[0].visual_entering_llm)
    assert len(seen) > 1, seen  # the counts did differ


def test_no_host_sync_inside_either_graph(rts):
    fast, _ = rts["llava_next"]
    eng = fast.prune("prumerge", None)
    fp, syncs = counting_fast_path(eng, ("_vision", "_llm"))
    batch = family_batch(fast, "llava_next")
    with torch.no_grad():
        _, _, _, info = fp.prefill(batch["input_ids"], batch["attention_mask"],
                                   {k: v for k, v in batch.items() if k in ("pixel_values", "image_sizes")})
    outputs = info.plan.segments[0].visual  # per sample: the visual tokens entering the decoder
    assert syncs == [0, 0] and info.graphs == 2 and len(outputs) == 3
