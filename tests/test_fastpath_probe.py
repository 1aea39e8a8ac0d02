"""ConsensusDrop's LLM probe (``probe_mode="attn"``, the "probe" preset) on the fast path (llava.fast.probe): decoder
layers 0..K-1 on the unpruned prompt inside the captured prefill, layer K's softmax rows of the padded text block,
the query rows read through the block's masks. The probe rows equal the eager engine's, greedy tokens and first-step
scores equal the eager engine's on LLaVA-1.5 / NeXT / Video-LLaVA / Qwen2.5-VL, 0 host syncs, one prefill graph per
bucket; Qwen3-VL (DeepStack rows in the probe) runs eagerly with the reason."""

import pytest
import torch
from fastpath_util import (SINGLES, assert_one_graph_per_bucket, assert_same_as_eager, counting_fast_path, family_batch,
                           fast_and_eager, generate, inputs)

from consensusdrop.consensusdrop import ConsensusDrop
from llava.fast.probe import plan_probe
from llava.fast.path import FastPath, bucket_for
from llava.models import load
from llava.plan import row_layouts

#: the "probe" preset (layer 2 of the 4-layer tiny LLM, the question rows, rank fusion) and the other query kinds /
#: aggregations (all rows after the image with a max over them and a visual-only softmax; the last row at layer 1)
OPTIONS = [("preset", 6, {"preset": "probe"}),
           ("after-max", 6, {"probe_layer": 1, "probe_mode": "attn", "probe_queries": "all_post_image",
                             "probe_query_agg": "max", "probe_softmax_keys": "visual_only"}),
           ("last", 5, {"probe_layer": 1, "probe_queries": "last"})]


@pytest.fixture(scope="module")
def rts():
    return {fam: fast_and_eager(fam) for fam in ("llava", "llava_next", "video_llava")}


def test_plan_probe_lays_out_the_unpruned_rows():
    """Worked example: two prompts of 7 and 5 tokens, visual runs of 3 at 1 and 2 at 2, text blocks padded to 4,
    bucket 8. Row 0 (1 pad): ids at 1..7, visual rows 2..4 gathered from 16 + 0..2 (after the B * 8 text rows);
    row 1 (3 pads): visual rows 5, 6 from 16 + 3, 4. Text rows: row 0's 3 after the image at 5..7 and a pad
    pointing at its last row 7; row 1's one at 7, pads at 7."""
    ids = torch.tensor([[5, 9, 9, 9, 6, 7, 8], [0, 0, 5, 4, 9, 9, 6]])  # row 1 left-padded by 2 (id 0)
    rows = row_layouts(ids, ids.ne(0), ids.eq(9))
    assert [(r.first, r.tokens) for r in rows] == [(1, 3), (2, 2)] and rows[1].real.tolist() == [2, 3, 4, 5, 6]
    spec, t = plan_probe((2,), rows, [4, 4], bucket_for, (4, 8, 16))
    assert spec.bucket == 8 and spec.layers == (2,)
    assert t.tok.tolist() == [[0, 5, 0, 0, 0, 6, 7, 8], [0, 0, 0, 5, 4, 0, 0, 6]]
    src = t.src.view(2, 8)
    assert src[0].tolist() == [0, 1, 16, 17, 18, 5, 6, 7] and src[1].tolist() == [8, 9, 10, 11, 12, 19, 20, 15]
    assert t.pos.tolist() == [[0, 0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 1, 2, 3, 4]]
    assert t.real.tolist() == [[False] + [True] * 7, [False] * 3 + [True] * 5]
    assert t.vis.tolist() == [2, 3, 4, 5, 6] and t.text.tolist() == [5, 6, 7, 7, 7, 7, 7, 7]
    assert t.pad.tolist() == [1, 3]  # its mask: prompt_mask on the device


@pytest.fixture
def recorded(monkeypatch):
    """Every (probabilities, query-row mask) ConsensusDrop's cross saliency is handed."""
    calls = []
    inner = ConsensusDrop._cross_saliency

    def record(self, p, rows=None):
        calls.append((p.detach().clone(), None if rows is None else rows.detach().clone()))
        return inner(self, p, rows)

    monkeypatch.setattr(ConsensusDrop, "_cross_saliency", record)
    return calls


@pytest.mark.parametrize("name,budget,opts", OPTIONS)
def test_probe_rows_equal_the_eager_engine(rts, recorded, name, budget, opts):
    """The captured probe's rows, read through the block's mask, == the eager engine's probe rows (every sample of
    a left-padded batch of three prompts of different lengths), to fp32 rounding."""
    fast, eager = rts["llava"]
    eng = fast.prune("consensusdrop", budget, **opts)
    eng.fast = FastPath(eng.env, backend="none", max_new_tokens=16)  # uncompiled: the same captured code, recorded
    eager.prune("consensusdrop", budget, **opts)
    batch = inputs(fast, 0, n=3)
    generate(fast, batch, tokens=1)
    assert eng.stats.path == "fast", eng.stats.path_reason
    got = [(p, r) for p, r in recorded if p.device.type != "meta"]  # not the plan's dry run
    recorded.clear()
    generate(eager, batch, tokens=1)
    assert len(got) == len(recorded) == 3
    for (p, rows), (ref, none) in zip(got, recorded):
        assert none is None and rows is not None and p.shape[1] >= ref.shape[1] == int(rows.sum())
        torch.testing.assert_close(p[:, rows], ref, atol=1e-6, rtol=1e-5)
    if name == "last":
        assert all(int(r.sum()) == 1 for _, r in got)


@pytest.mark.parametrize("name,budget,opts", OPTIONS)
def test_fast_tokens_equal_the_eager_engine(rts, name, budget, opts):
    fast, eager = rts["llava"]
    eng = fast.prune("consensusdrop", budget, **opts)
    eager.prune("consensusdrop", budget, **opts)
    assert eng.fast.refusal is None
    for i in SINGLES:
        assert_same_as_eager(fast, eager, eng, inputs(fast, i))
    assert_same_as_eager(fast, eager, eng, inputs(fast, 0, n=3))


@pytest.mark.parametrize("family", ["llava_next", "video_llava"])
def test_fast_tokens_equal_the_eager_engine_on_next_and_video_llava(rts, family):
    fast, eager = rts[family]
    name, budget, opts = OPTIONS[0]
    eng = fast.prune("consensusdrop", budget, **opts)
    eager.prune("consensusdrop", budget, **opts)
    assert_same_as_eager(fast, eager, eng, family_batch(fast, family))


def test_no_host_sync_inside_the_captured_prefill(rts):
    fast, _ = rts["llava"]
    eng = fast.prune("consensusdrop", 6, preset="probe")
    fp, calls = counting_fast_path(eng)
    batch = inputs(fast, 1, n=2)
    with torch.no_grad():
        fp.prefill(batch["input_ids"], batch["attention_mask"], {"pixel_values": batch["pixel_values"]})
    assert calls == [0]


def test_one_prefill_graph_per_bucket(rts):
    """Prompts of other lengths (their own question spans, the same buckets) and 16 decode steps compile nothing
    after the first prompt (recompilation raises); tokens == eager."""
    fast, eager = rts["llava"]
    torch._dynamo.reset()
    eng = fast.prune("consensusdrop", 6, preset="probe")
    eager.prune("consensusdrop", 6, preset="probe")
    assert_one_graph_per_bucket(fast, eager, eng, inputs(fast, 0), [inputs(fast, i) for i in (1, 2, 3)])


def test_qwen2_5_vl_probe_and_qwen3_vl_refusal():
    """Qwen2.5-VL: the probe on the prompt's own M-RoPE positions, a batch of three grids == eager (uncompiled, 0
    syncs). Qwen3-VL: a probe would have to add the unpruned prompt's DeepStack rows: eager, with the reason."""
    from test_fastpath_qwen import batch_of

    fast = load("tiny:qwen2.5-vl", seed=1, fast=True, fast_max_new_tokens=16, fast_backend="none")
    eager = load("tiny:qwen2.5-vl", seed=1)
    eng = fast.prune("consensusdrop", 6, preset="probe")
    eager.prune("consensusdrop", 6, preset="probe")
    fp, syncs = counting_fast_path(eng)
    eng.fast = fp
    assert_same_as_eager(fast, eager, eng, batch_of(fast, 3), tokens=4)
    assert syncs == [0]
    q3 = load("tiny:qwen3-vl", seed=1, fast=True, fast_max_new_tokens=16, fast_backend="none")
    eng = q3.prune("consensusdrop", 6, preset="probe")
    generate(q3, batch_of(q3, 1), tokens=2)
    assert eng.stats.path == "eager" and "DeepStack" in eng.stats.path_reason
