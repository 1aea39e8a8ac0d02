"""The positions of a prefill (llava.positions): one function for both executors, and the captured prefill honouring a
caller's position ids (a shifted numbering, gaps and the stock default without any)."""

import pytest
import torch
from fastpath_util import inputs

from llava.fast.refusals import NotPlanned
from llava.models import load
from llava.positions import contiguous, first_positions, prompt_positions, renumbered


def test_renumbered_and_first_positions_worked_values():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    got = renumbered(mask, torch.tensor([0, 7, 3]))
    assert got.tolist() == [[0, 0, 0, 1, 2], [7, 8, 9, 10, 11], [0, 0, 0, 0, 3]]
    valid = mask.bool()
    assert first_positions(got, valid).tolist() == [0, 7, 3]
    assert contiguous(got, valid)
    gapped = got.clone()
    gapped[1, 3] = 20  # a gap in row 1
    assert not contiguous(gapped, valid)
    # generate()'s numbering (cumsum - 1, pads 0) starts every row at 0
    gen = (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)
    assert first_positions(gen, valid).tolist() == [0, 0, 0]


@pytest.fixture(scope="module")
def tiny():
    return load("tiny:llava", seed=1, fast=True, fast_max_new_tokens=16, fast_backend="none"), load("tiny:llava", seed=1)


def _generate_positions(mask):
    return (mask.long().cumsum(1) - 1).masked_fill(mask == 0, 0)


@pytest.mark.parametrize("method,budget", [("divprune", 4), ("fastv", 6)])
def test_captured_plan_numbers_rows_from_the_callers_first_position(tiny, method, budget):
    """A caller's positions shifted by a per-row offset: the captured plan's rows and the first decode position are
    numbered on from it (worked out here from the plan's own row lengths), and the prefill matches the eager engine
    handed the same positions (which numbers its rebuilt rows the same way)."""
    rt, eager = tiny
    eng = rt.prune(method, budget)
    eager.prune(method, budget)
    batch = inputs(rt, 0, n=3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    shift = torch.tensor([5, 0, 11])
    pos = _generate_positions(mask) + shift[:, None] * mask
    visual = {"pixel_values": batch["pixel_values"]}
    spec, host, plan, nxt = eng.fast.planner.plan(ids, mask, visual, pos)
    Lb, rows = spec.bucket, plan.segments[0].rows
    want = torch.zeros(3, Lb, dtype=torch.long)
    for b, n in enumerate(rows):
        want[b, Lb - n:] = shift[b] + torch.arange(n)
    assert torch.equal(host.pos, want)
    assert nxt.tolist() == [n + int(s) for n, s in zip(rows, shift)]
    real = torch.zeros(3, Lb, dtype=torch.long)
    for b, n in enumerate(rows):
        real[b, Lb - n:] = 1
    base = eng.fast.planner.plan(ids, mask, visual, _generate_positions(mask))  # generate()'s: every row from 0
    assert torch.equal(base[1].pos, want - shift[:, None] * real)
    assert torch.equal(eng.fast.planner.plan(ids, mask, visual)[1].pos, base[1].pos)  # none: the same
    with torch.no_grad():
        got = rt.model(**batch, position_ids=pos)
        assert eng.stats.path == "fast", eng.stats.path_reason
        ref = eager.model(**batch, position_ids=pos)
    torch.testing.assert_close(got.logits[:, -1], ref.logits[:, -1], rtol=1e-5, atol=1e-5)
    st = eng._state.fast
    # the first generated token's position per segment: after each segment's rows, from the row's first position
    seg_rows = torch.tensor([seg.rows for seg in plan.segments])
    if eng.env.reindex:
        assert st.next_pos[..., 0].tolist() == (seg_rows + shift).tolist()
    else:
        assert st.next_pos[..., 0].tolist() == [[n + int(s) for n, s in zip(rows, shift)]] * len(plan.segments)


def test_gapped_positions_and_the_stock_default_run_eagerly(tiny):
    rt, _ = tiny
    eng = rt.prune("divprune", 4)
    batch = inputs(rt, 0, n=3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    visual = {"pixel_values": batch["pixel_values"]}
    gapped = _generate_positions(mask)
    gapped[:, -1] += 3  # the last token three further on
    with pytest.raises(NotPlanned, match="one after another"):
        eng.fast.planner.plan(ids, mask, visual, gapped)
    with torch.no_grad():
        rt.model(**batch, position_ids=gapped)
        assert eng.stats.path == "eager" and "one after another" in eng.stats.path_reason
        rt.model(**batch)  # no positions on a left-padded batch: the stock default counts the pads
        assert eng.stats.path == "eager" and "stock default" in eng.stats.path_reason
        one = inputs(rt, 1)  # one prompt: no pads, the stock default is each row from 0
        rt.model(**one)
        assert eng.stats.path == "fast", eng.stats.path_reason


def test_mrope_callers_positions_are_the_familys_rule():
    """Qwen2.5-VL: generate()'s four rows of positions (text + M-RoPE) and none at all plan the same positions (the
    family's rule both times; the caller's are taken where given), and a 2-D array is refused with the eager
    engine's message."""
    from test_fastpath_qwen import _visual, batch_of

    rt = load("tiny:qwen2_5_vl", seed=1, fast=True, fast_max_new_tokens=16, fast_backend="none")
    eng = rt.prune("divprune", 4)
    batch = batch_of(rt, 3)
    ids, mask, visual = batch["input_ids"], batch["attention_mask"], _visual(batch)
    full, deltas = prompt_positions(eng.adapter, ids, mask, None, visual)
    assert full.shape[0] == 3 and deltas is not None
    given = torch.cat([_generate_positions(mask)[None], full])  # generate(): the text row, then the M-RoPE rows
    a = eng.fast.planner.plan(ids, mask, visual)
    b = eng.fast.planner.plan(ids, mask, visual, given)
    assert torch.equal(a[1].pos, b[1].pos) and torch.equal(a[3], b[3])
    shifted = given.clone()
    shifted[1:] += 2
    c = eng.fast.planner.plan(ids, mask, visual, shifted)  # the caller's, two further on: taken as given
    assert torch.equal(c[1].vpos, a[1].vpos + 2) and torch.equal(c[3], a[3] + 2)
    with pytest.raises(NotPlanned, match="3-D position ids"):
        eng.fast.planner.plan(ids, mask, visual, _generate_positions(mask))
