"""The fast path's in-LLM stages (llava.fast.llm, issue 34 item 3): FastV, PyramidDrop, VisionDrop, DART and
DUET-VLM (the text rows after the image as attention queries, padded, read through their mask) captured whole, the decoder run segment by segment inside the one prefill function with each stage's rows
re-laid out by a host-planned gather, and a decode step per segment of layers. Checked against the eager
engine's ``generate()`` (dynamo without code generation on a CPU, as tests/test_fastpath.py)."""

import pytest
import torch
from fastpath_util import (BACKEND, SINGLES, assert_same_as_eager, counting_fast_path, family_batch, generate, inputs,
                           prune_family)

from llava.fast.llm import plan_stages, prompt_mask
from llava.fast.path import FastPath, bucket_for
from llava.models import load
from llava.plan import PrefillPlan, RowLayout


def _stages(needs, rows, lens, counts, buckets, text_buckets=()):
    """plan_stages from the plan of rows ``lens`` entering layer 0 of a 4-layer decoder (the worked examples)."""
    W = bucket_for(max(lens), buckets)
    plan = PrefillPlan.start("fast", 4, [c[0] for c in counts], lens, [c[0] for c in counts], W)
    entering = [RowLayout(real=torch.arange(W - n, W), visual=lay.visual, ids=lay.ids) for lay, n in zip(rows, lens)]
    return plan_stages(needs, rows, entering, plan, counts, buckets, bucket_for, text_buckets)


def _row(n, p0, T):
    """The layout of a prompt of ``n`` tokens whose ``T`` visual tokens start at ``p0``."""
    return RowLayout(real=torch.arange(n), visual=p0 + torch.arange(T), ids=torch.zeros(n, dtype=torch.long))

#: budgets / options that prune at every stage of the tiny 4-layer LLM (16 tokens per image): FastV keeps 5
#: after layer 1 for an equivalent budget of 8 (K=2 scaled to 4 layers: (4 * 8 - 16) / 3 rounded half up);
#: PyramidDrop halves at layers 1 / 2 / 3; VisionDrop 8 per image on average (stage 0 in the tower's output,
#: then 3 llm stages with merging); DART 12 of 16 after layer 1 (4 image pivots + 1 per pivot of the 8, the
#: text pivots from the planned text rows)
#: PriorTR: 5 after layer 1 as FastV (its rows from the null token to the end planned padded, P's mean masked);
#: CLSE (LLaVA-1.5 only): the official 192 -> 16 / 9 / 5 / 1 on the tiny grid, the FFT inside the captured stage
#: V2Drop: the official 16 -> 8 / 4 / 1 from the residual updates (LLMSignals.prev_hidden, padded like hidden)
CASES = [("fastv", 8), ("pdrop", None), ("visiondrop", 8), ("dart", 12), ("duet", 6), ("priortr", 8),
         ("v2drop", None)]
LLAVA_CASES = CASES + [("clse", 192), ("ivcprune", 12)]  # IVC-Prune: 2B - 16 = 8 of 16 kept after layer 2


@pytest.fixture(scope="module")
def rts():
    return {fam: (load(f"tiny:{fam}", seed=1, fast=True, fast_max_new_tokens=16, fast_backend=BACKEND),
                  load(f"tiny:{fam}", seed=1)) for fam in ("llava", "llava_next", "video_llava")}


def test_plan_stages_lays_out_each_segment():
    """Worked example: two samples of 10 and 7 rows with their image (4 / 4 tokens) at 2 / 1, one stage
    keeping 2 / 1 of them. Segment 1 has rows of 8 and 4 (bucket 8 from buckets (4, 8, 16)); its gather
    takes text from the old flattened rows and outputs from after them (B * 16 = 32 on)."""
    rows = [_row(10, 2, 4), _row(7, 1, 4)]

    class M:
        llm_layers = (1,)
        llm_text_rows = False

    plan, tensors, texts = _stages(M, rows, [10, 7], [(4, 2), (4, 1)], (4, 8, 16))
    assert [s.rows for s in plan.segments] == [(10, 7), (8, 4)] and [s.width for s in plan.segments] == [16, 8]
    assert [s.layers for s in plan.segments] == [range(0, 1), range(1, 4)] and texts == ()
    assert [s.visual for s in plan.segments] == [(4, 4), (2, 1)]  # the stage before layer 1 keeps 2 / 1 of 4 / 4
    t = tensors[0]
    # sample 0: pad 6 in segment 0, image at 6 + 2; sample 1: pad 9, image at 9 + 1
    assert t.vis.tolist() == [8, 9, 10, 11, 10, 11, 12, 13]
    src = t.src.view(2, 8)
    # sample 0 (no pad): text 6, 7 | outputs 32, 33 | text 12..15 (its old rows 6 + 6..9)
    assert src[0].tolist() == [6, 7, 32, 33, 12, 13, 14, 15]
    # sample 1 (4 pads): text 16 + 9 | output 34 | text 16 + 14, 16 + 15
    assert src[1, 4:].tolist() == [25, 34, 30, 31]
    assert t.ar[1].tolist() == [0, 0, 0, 0, 0, 1, 2, 3] and t.first.tolist() == [0, 12]
    assert t.pad.tolist() == [0, 4]  # the mask is built from the pads on the device
    m = prompt_mask(t.pad, 8, 24)[1, 0]
    assert m[7, 4:8].all() and not m[7, :4].any() and not m[5, 6:].any() and m[2, 2] and not m[2, :2].any()


@pytest.mark.parametrize("lens, L, C", [([8, 4], 8, 24), ([5, 8, 1], 8, 12), ([1], 4, 4)])
def test_the_prompt_mask_is_built_from_the_pads(lens, L, C):
    """``prompt_mask`` (built on the device inside the captured prefill) against the mask spelt out row by row:
    a real row i of a sample with ``pad`` pad rows sees rows pad..i, a pad row itself only, no row a decode slot."""
    got = prompt_mask(torch.tensor([L - n for n in lens]), L, C)
    want = torch.zeros(len(lens), 1, L, C, dtype=torch.bool)
    for b, n in enumerate(lens):
        pad = L - n
        for i in range(L):
            if i < pad:
                want[b, 0, i, i] = True
            else:
                want[b, 0, i, pad:i + 1] = True
    assert got.dtype == torch.bool and torch.equal(got, want)


def test_plan_stages_pads_the_text_rows_for_methods_that_read_them():
    """``llm_text_rows`` (DART): per stage the rows after the image in the row entering it, padded to a text
    bucket (pads index row 0, masked). Sample 0 above: 10 rows, image 4 at 2 -> 4 text rows at 6 + 6..9;
    sample 1: 7 rows, image at 1 -> 2 text rows at 9 + 5..6; text buckets (4, 8)."""
    rows = [_row(10, 2, 4), _row(7, 1, 4)]

    class M:
        llm_layers = (1,)
        llm_text_rows = True
        llm_text_cap = None

    _, (t,), (text,) = _stages(M, rows, [10, 7], [(4, 2), (4, 1)], (4, 8, 16), (4, 8))
    assert text == ((4, 4), (4, 2))  # per sample the padded rows, then the real ones
    assert t.text.tolist() == [12, 13, 14, 15, 14, 15, 0, 0]
    assert t.text_mask.tolist() == [True] * 4 + [True, True, False, False]

    class Capped(M):  # a method that tells text lengths apart up to 3 (DART: its text pivots)
        llm_text_cap = 3

    _, (t2,), (text,) = _stages(Capped, rows, [10, 7], [(4, 2), (4, 1)], (4, 8, 16), (4, 8))
    assert text == ((4, 4), (3, 2)) and torch.equal(t2.text, t.text)

    class N(M):
        llm_text_rows = False

    _, (t,), texts = _stages(N, rows, [10, 7], [(4, 2), (4, 1)], (4, 8, 16), (4, 8))
    assert texts == () and t.text is None and t.text_mask is None


@pytest.mark.parametrize("method,budget", LLAVA_CASES)
def test_fast_tokens_equal_the_eager_engine(rts, method, budget):
    """LLaVA-1.5: greedy tokens, first-step scores and visual tokens per layer == the eager engine,
    on a left-padded batch of 3 prompts of different lengths (FAST_FULL=1: also each alone)."""
    fast, eager = rts["llava"]
    eng = fast.prune(method, budget)
    eager.prune(method, budget)
    assert eng.fast.refusal is None
    for i in SINGLES:
        assert_same_as_eager(fast, eager, eng, inputs(fast, i))
        assert eng.stats.samples[0].visual_per_layer == eager.engine.stats.samples[0].visual_per_layer
    assert_same_as_eager(fast, eager, eng, inputs(fast, 0, n=3))
    per_layer = [s.visual_per_layer for s in eng.stats.samples]
    assert per_layer == [s.visual_per_layer for s in eager.engine.stats.samples]
    assert per_layer[0][-1] < per_layer[0][0]  # the stages pruned


@pytest.mark.parametrize("family", ["llava_next", "video_llava"])
@pytest.mark.parametrize("method,budget", CASES)
def test_fast_tokens_equal_the_eager_engine_on_next_and_video_llava(rts, family, method, budget):
    """LLaVA-NeXT (three crop grids, newline tokens) and Video-LLaVA (three 8-frame videos): one batch of
    three == the eager engine, visual tokens per layer included."""
    fast, eager = rts[family]
    eng = prune_family(fast, method, budget, traced=(method, budget) == CASES[0])
    eager.prune(method, budget)
    assert_same_as_eager(fast, eager, eng, family_batch(fast, family))
    assert [s.visual_per_layer for s in eng.stats.samples] == [
        s.visual_per_layer for s in eager.engine.stats.samples]


@pytest.mark.parametrize("method,budget", LLAVA_CASES)
def test_segments_in_shorter_buckets(rts, method, budget):
    """With fine buckets every stage moves the rows into a shorter bucket: each segment's layers write
    their own length into the static cache and decode against their own mask and positions; tokens still
    equal the eager engine's over 12 generated tokens, one prompt and a padded batch. (Uncompiled: the same
    captured code; compiling its graphs is what the other tests prove.)"""
    fast, eager = rts["llava"]
    eng = fast.prune(method, budget)
    eager.prune(method, budget)
    eng.fast = FastPath(eng.env, backend="none", max_new_tokens=16, buckets=tuple(range(4, 129, 4)))
    for batch in (inputs(fast, 1), inputs(fast, 0, n=3)):
        assert_same_as_eager(fast, eager, eng, batch, tokens=12)
        lens = eng.stats.seq_len_per_layer
        assert lens == sorted(lens, reverse=True) and lens[-1] < lens[0]  # one bucket per segment, shrinking


@pytest.mark.parametrize("method,budget", [CASES[0], CASES[3], CASES[4], CASES[5], CASES[6]])
def test_one_prefill_graph_per_bucket_and_one_decode_graph(rts, method, budget):
    """Prompts of other lengths in the same buckets and 16 decode steps compile nothing after the first
    prompt (recompilation raises). FastV (one stage), DART (its text rows padded: texts of other lengths
    share the graph) and DUET-VLM (the padded text rows as attention queries, read through their mask); the
    other stages change nothing the graph key holds. Batch 1: tokens == eager."""
    fast, eager = rts["llava"]
    torch._dynamo.reset()
    eng = fast.prune(method, budget)
    eager.prune(method, budget)
    first = inputs(fast, 0)
    assert torch.equal(generate(fast, first, tokens=16)[0], generate(eager, first, tokens=16)[0])
    assert eng.stats.new_graph
    lens = eng.stats.seq_len_per_layer
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in (1, 2):
            batch = inputs(fast, i)
            assert batch["input_ids"].shape[1] != first["input_ids"].shape[1]
            toks = generate(fast, batch, tokens=16)[0]
            assert eng.stats.path == "fast" and eng.stats.seq_len_per_layer == lens and not eng.stats.new_graph
            assert torch.equal(toks, generate(eager, batch, tokens=16)[0])


@pytest.mark.parametrize("method,budget", LLAVA_CASES)
def test_no_host_sync_inside_the_captured_prefill(rts, method, budget):
    """The captured function with its llm stages (run uncompiled) reads nothing from the device."""
    fast, _ = rts["llava"]
    eng = fast.prune(method, budget)
    fp, calls = counting_fast_path(eng)
    batch = inputs(fast, 1, n=2)
    with torch.no_grad():
        fp.prefill(batch["input_ids"], batch["attention_mask"], {"pixel_values": batch["pixel_values"]})
    assert calls == [0]


def test_the_reference_mode_and_question_rows_run_eagerly(rts, monkeypatch):
    """FastV's reference numerics run on the eager engine; an llm stage that asks for the question rows
    (not planned on the fast path) is refused at the plan, with the reason, and still answers eagerly."""
    from llava.method import _REGISTRY, Method
    from llava.selection import Selection

    fast, eager = rts["llava"]
    eng = fast.prune("fastv", None, numerics="official")
    generate(fast, inputs(fast, 0), tokens=2)
    assert eng.stats.path == "eager" and "official" in eng.stats.path_reason

    class _QuestionStage(Method):
        name = "_test_question_stage"
        capturable = "full"

        @property
        def llm_layers(self):
            return (2,)

        def select_llm(self, stage, sig):
            row = sig.attention("question", layer="next").mean((0, 1))[sig.visual]
            return Selection(keep=row.topk(4).indices.sort().values)

    monkeypatch.setitem(_REGISTRY, _QuestionStage.name, _QuestionStage)  # registered for this test only
    eng = fast.prune("_test_question_stage", None)
    toks, _ = generate(fast, inputs(fast, 0), tokens=4)
    assert eng.stats.path == "eager" and "question" in eng.stats.path_reason
    eager.prune("_test_question_stage", None)
    assert torch.equal(toks, generate(eager, inputs(fast, 0), tokens=4)[0])
