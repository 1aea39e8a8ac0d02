"""The plan both executors share (llava/plan.py): the row arithmetic of a selection (``run_spans``, ``rebuilt_row``)
on worked rows, and the ``PrefillPlan`` record (``engine.stats.plan``) that the per-layer counts of
``engine.stats`` are read from, on the eager engine with an llm stage. The captured executor's plan is compared with
the eager one's for every captured method and family by ``llava.check.fast.assert_same_as_eager``."""

import pytest
import torch

from llava.check.inputs import make_batch
from llava.models import load
from llava.plan import (PrefillPlan, Segment, next_rows, rebuilt_row, regather_plan, row_layouts, run_ids, run_spans,
                        vision_rows)


def test_run_spans_are_the_consecutive_runs():
    assert run_spans(torch.tensor([2, 3, 4, 7, 8, 11])) == [(2, 3), (7, 2), (11, 1)]
    assert run_spans(torch.tensor([5])) == [(5, 1)]
    assert run_spans(torch.zeros(0, dtype=torch.long)) == []


def test_run_ids_number_the_runs():
    assert run_ids(torch.tensor([2, 3, 4, 7, 8, 11])).tolist() == [0, 0, 0, 1, 1, 2]
    assert run_ids(torch.zeros(0, dtype=torch.long)).tolist() == []


def test_row_layouts_and_the_rows_after_a_stage():
    """Two left-padded prompts (pad id 0, placeholder 9): row 0 [5 9 9 6 9 7] holds two runs, row 1 [0 0 5 9 6 7]
    one run after two pads. Their layouts: real positions, visual indices among them, ids. Rebuilt with 1 + 0 and 2
    outputs: row 0 -> [5 v 6 7] (4 rows), row 1 -> [5 v v 6 7] (5 rows), both left-padded to 5 (the longest), laid
    out from the old rows flattened (row 0: 0..5, row 1's real rows: 8..11), then the outputs (12; 13, 14), a pad
    reading the row after them (15)."""
    ids = torch.tensor([[5, 9, 9, 6, 9, 7], [0, 0, 5, 9, 6, 7]])
    lays = row_layouts(ids, ids.ne(0), ids.eq(9))
    assert [lay.real.tolist() for lay in lays] == [[0, 1, 2, 3, 4, 5], [2, 3, 4, 5]]
    assert [lay.visual.tolist() for lay in lays] == [[1, 2, 4], [1]]
    assert lays[1].ids.tolist() == [5, 9, 6, 7]
    assert [(lay.first, lay.tokens) for lay in lays] == [(1, 3), (1, 1)]
    maps = [rebuilt_row(6, run_spans(lays[0].visual), [1, 0]), rebuilt_row(4, run_spans(lays[1].visual), [2])]
    new, g = next_rows(lays, maps, 6)
    assert g.width == 5 and g.mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert g.src.view(2, 5).tolist() == [[15, 0, 12, 3, 5], [8, 13, 14, 10, 11]] and g.take is None
    assert next_rows(lays, maps, 6, width=8)[1].mask[0].tolist() == [0] * 4 + [1] * 4  # a captured bucket
    assert new[0].real.tolist() == [1, 2, 3, 4] and new[0].visual.tolist() == [1]
    assert new[0].ids.tolist() == [5, -1, 6, 7]
    assert new[1].visual.tolist() == [1, 2] and new[1].ids.tolist() == [5, -1, -1, 6, 7]
    assert (new[0].first, new[1].tokens) == (1, 2)


def test_rebuilt_row_puts_each_runs_outputs_in_its_place():
    # t0 t1 V V V t5 t6 V V t9 -> t0 t1 a t5 t6 b c t9 (1 output for the first run, 2 for the second)
    r = rebuilt_row(10, [(2, 3), (7, 2)], [1, 2])
    assert r.n == 8
    assert r.text_src.tolist() == [0, 1, 5, 6, 9]
    assert r.text_dst.tolist() == [0, 1, 3, 4, 7]
    assert r.vis_dst.tolist() == [2, 5, 6]
    # a run the selection emptied leaves only its text: t0 t1 t5 t6 b c t9
    r = rebuilt_row(10, [(2, 3), (7, 2)], [0, 2])
    assert (r.n, r.text_dst.tolist(), r.vis_dst.tolist()) == (7, [0, 1, 2, 3, 6], [4, 5])
    # more outputs than tokens (e.g. [CLS] candidates), and a row without a run
    r = rebuilt_row(5, [(1, 2)], [4])
    assert (r.n, r.text_src.tolist(), r.text_dst.tolist()) == (7, [0, 3, 4], [0, 5, 6])
    assert r.vis_dst.tolist() == [1, 2, 3, 4]
    r = rebuilt_row(4, [], [])
    assert (r.n, r.text_dst.tolist(), r.vis_dst.tolist(), r.vis_dst.dtype) == (4, [0, 1, 2, 3], [], torch.long)


def test_regather_plan_lays_out_both_rows_from_one_source():
    """Two rows of an old batch of width 6: sample 0 has 5 real rows (one pad) whose run (2, 2) keeps 1 output,
    sample 1 has 6 whose run (1, 3) keeps 2. Source: the old rows flattened (0..11), then the 3 outputs (12..14),
    then the zero row (15) the pads read."""
    maps = [rebuilt_row(5, [(2, 2)], [1]), rebuilt_row(6, [(1, 3)], [2])]
    assert (maps[0].n, maps[1].n) == (4, 5)
    old = [0 * 6 + torch.arange(1, 6), 1 * 6 + torch.arange(6)]
    g = regather_plan(maps, old, 12, 5, pad_src=15)
    assert torch.equal(regather_plan(maps, old, 12, 5).src, g.src)  # by default the row after the outputs
    # row 0: [pad, text 0, text 1, output 0, text 4]; row 1: [text 0, outputs 1 and 2, text 4, text 5]
    assert g.src.tolist() == [15, 1, 2, 12, 5, 6, 13, 14, 10, 11]
    assert g.pad.tolist() == [1, 0]
    assert g.ar.tolist() == [[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]]
    assert g.first.tolist() == [1, 5]
    assert g.vis_at.tolist() == [3, 6, 7]
    rows = torch.cat([torch.arange(12.0), torch.tensor([100.0, 101.0, 102.0, 0.0])])[g.src].view(2, 5)
    assert rows.tolist() == [[0, 1, 2, 100, 5], [6, 101, 102, 10, 11]]
    # compact: the source holds only the 6 old rows read (then the outputs at 6..8, the zero row at 9)
    c = regather_plan(maps, old, 12, 5, compact=True)  # the pads read the row after the outputs
    assert c.take.tolist() == [1, 2, 5, 6, 10, 11]
    assert c.src.tolist() == [9, 0, 1, 6, 2, 3, 7, 8, 4, 5]
    assert (c.pad.tolist(), c.ar.tolist(), c.first.tolist(), c.vis_at.tolist()) == \
        (g.pad.tolist(), g.ar.tolist(), g.first.tolist(), g.vis_at.tolist())
    source = torch.cat([torch.arange(12.0)[c.take], torch.tensor([100.0, 101.0, 102.0, 0.0])])
    assert torch.equal(source[c.src].view(2, 5), rows)


def test_vision_rows_start_the_plan_and_give_padded_slots_their_place():
    """The rows after the vision stage for both executors, on the two rows of the test above (maps: 1 output for
    row 0's run (2, 2), 2 for row 1's run (1, 3)). The eager executor: the exact width 5, a compact source. The
    captured one: a bucket of 8 and each sample's outputs in a slice of 3 (a piecewise prefill's padded count): the
    compact source is the 6 text rows, then row 0's slice (6..8, its output at 6), row 1's (9..11, its outputs at 9
    and 10), then the pad row (12). Both start the same segment: per sample its stock visual tokens, its rows and
    outputs entering layer 0."""
    ids = torch.tensor([[0, 5, 6, 9, 9, 7], [5, 9, 9, 9, 6, 7]])
    lays = row_layouts(ids, ids.ne(0), ids.eq(9))
    maps = [rebuilt_row(5, run_spans(lays[0].visual), [1]), rebuilt_row(6, run_spans(lays[1].visual), [2])]
    plan, new, g = vision_rows("eager", 4, lays, maps, 6, compact=True)
    assert g.width == 5 and g.src.tolist() == [9, 0, 1, 6, 2, 3, 7, 8, 4, 5] and g.take.tolist() == [1, 2, 5, 6, 10, 11]
    assert plan == PrefillPlan.start("eager", 4, (2, 3), (4, 5), (1, 2), 5)
    assert [lay.ids.tolist() for lay in new] == [[5, 6, -1, 7], [5, -1, -1, 6, 7]]
    fast, new8, b = vision_rows("fast", 4, lays, maps, 6, width=8, compact=True, slots=[3, 3])
    assert b.src.view(2, 8).tolist() == [[12, 12, 12, 12, 0, 1, 6, 2], [12, 12, 12, 3, 9, 10, 4, 5]]
    assert b.vis_at.tolist() == [6, 12, 13] and b.pad.tolist() == [4, 3]
    assert fast.segments == (Segment(range(0, 4), (4, 5), (1, 2), 8),) and fast.candidates == (2, 3)
    assert [lay.real.tolist() for lay in new8] == [[4, 5, 6, 7], [3, 4, 5, 6, 7]]
    # the default slot is the outputs: the same gather as without slots
    assert torch.equal(vision_rows("fast", 4, lays, maps, 6, 8, compact=True, slots=[1, 2])[2].src,
                       vision_rows("fast", 4, lays, maps, 6, 8, compact=True)[2].src)


def test_a_plan_splits_its_last_segment_at_each_stage():
    plan = PrefillPlan.start("fast", 6, (16, 20), (30, 40), (16, 20), 64)
    plan = plan.advanced(2, (20, 26), (6, 6), 32).advanced(4, (16, 22), (2, 2), 32)
    assert [s.layers for s in plan.segments] == [range(0, 2), range(2, 4), range(4, 6)]
    assert plan.visual_per_layer(1) == [20, 20, 6, 6, 2, 2]
    assert plan.width_per_layer() == [64, 64, 32, 32, 32, 32]
    assert str(plan).splitlines() == ["PrefillPlan(fast, B=2): candidates (16, 20)",
                                      "  layers 0-1: rows (30, 40) -> 64, visual (16, 20)",
                                      "  layers 2-3: rows (20, 26) -> 32, visual (6, 6)",
                                      "  layers 4-5: rows (16, 22) -> 32, visual (2, 2)"]
    assert str(Segment(range(3, 4), (5,), (1,), 8)) == "layer 3: rows (5,) -> 8, visual (1,)"
    for layer in (0, 4, 6):  # a stage must fall strictly inside the last segment
        with pytest.raises(ValueError, match="does not split"):
            plan.advanced(layer, (1, 1), (0, 0), 1)


@pytest.fixture(scope="module")
def llava():
    return load("tiny:llava", seed=1)


def test_the_eager_engine_reports_the_plan_it_ran(llava):
    """FastV dropping half the visual tokens before its layer: the rows after the stage are the prompt's real rows
    less the dropped tokens, padded to the longest; the stats' per-layer counts are the plan's."""
    eng = llava.prune("fastv", None, ratio=0.5)
    batch = make_batch(llava)
    with torch.no_grad():
        llava.model.generate(**batch, max_new_tokens=2, do_sample=False)
    (k,), n_layers = eng.needs.llm_layers, len(llava.model.model.language_model.layers)
    rows = batch["attention_mask"].sum(1).tolist()
    visual = (batch["input_ids"] == llava.model.config.image_token_id).sum(1).tolist()
    kept = [v // 2 for v in visual]
    after = [r - v + m for r, v, m in zip(rows, visual, kept)]
    plan = eng.stats.plan
    assert plan.path == "eager" and plan.candidates == tuple(visual)
    assert [(s.layers, s.rows, s.visual, s.width) for s in plan.segments] == [
        (range(0, k), tuple(rows), tuple(visual), batch["input_ids"].shape[1]),
        (range(k, n_layers), tuple(after), tuple(kept), max(after))]
    assert [s.visual_per_layer for s in eng.stats.samples] == [[v] * k + [m] * (n_layers - k)
                                                                for v, m in zip(visual, kept)]
    assert eng.stats.seq_len_per_layer == [batch["input_ids"].shape[1]] * k + [max(after)] * (n_layers - k)


def test_without_llm_stages_the_plan_is_one_segment(llava):
    eng = llava.prune("random", 4)
    batch = make_batch(llava)
    with torch.no_grad():
        llava.model.generate(**batch, max_new_tokens=2, do_sample=False)
    rows = batch["attention_mask"].sum(1).tolist()
    visual = (batch["input_ids"] == llava.model.config.image_token_id).sum(1).tolist()
    after = [r - v + 4 for r, v in zip(rows, visual)]
    (seg,) = eng.stats.plan.segments
    assert (seg.layers, seg.rows, seg.visual, seg.width) == (
        range(0, len(llava.model.model.language_model.layers)), tuple(after), (4, 4, 4), max(after))


def test_the_captured_executor_plans_the_eager_rows_in_buckets():
    """The fast path's plan, made on the host before the device runs: the eager engine's layers, rows and visual
    tokens per segment, each segment padded to its length bucket (the static cache's decode masks are read from it)."""
    from llava.fast.plan import BUCKETS, bucket_for

    fast = load("tiny:llava", seed=1, fast=True, fast_max_new_tokens=4, fast_backend="none")
    eager = load("tiny:llava", seed=1)
    batch = make_batch(fast)
    plans = []
    for rt in (fast, eager):
        eng = rt.prune("fastv", None, ratio=0.5)
        with torch.no_grad():
            rt.model.generate(**batch, max_new_tokens=2, do_sample=False)
        plans.append(eng.stats.plan)
    got, want = plans
    assert (got.path, want.path) == ("fast", "eager") and got.candidates == want.candidates
    assert [(s.layers, s.rows, s.visual) for s in got.segments] == [(s.layers, s.rows, s.visual) for s in want.segments]
    assert [s.width for s in got.segments] == [bucket_for(max(s.rows), BUCKETS) for s in want.segments]
