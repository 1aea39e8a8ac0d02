"""The controls: seeded random selection and 'no visual tokens'."""

import pytest
import torch
from conftest import FAMILIES, make_batch, slice_batch

from baselines.random import random_per_unit


def test_random_per_unit_by_hand():
    unit = torch.tensor([0, 0, 0, 0, -1, 1, 1, 1, -1])
    keep = random_per_unit(unit, 2, torch.Generator().manual_seed(0))
    assert keep.tolist() == sorted(keep.tolist())
    assert int((unit[keep] == 0).sum()) == 2 and int((unit[keep] == 1).sum()) == 2 and int((unit[keep] < 0).sum()) == 0
    # a unit smaller than the budget is kept whole
    assert random_per_unit(unit, 10, torch.Generator().manual_seed(0)).tolist() == [0, 1, 2, 3, 5, 6, 7]
    # the same generator seed gives the same draw
    again = random_per_unit(unit, 2, torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)


@pytest.mark.parametrize("rt", FAMILIES, indirect=True)
def test_random_is_seeded_per_sample_independent_of_batching(rt):
    inputs = make_batch(rt)
    eng = rt.prune("random", 3, seed=7)
    with torch.no_grad():
        rt.model(**inputs)
    batched = [eng.selections[("vision", b)].keep.tolist() for b in range(3)]
    for b in range(3):
        with torch.no_grad():
            rt.model(**slice_batch(inputs, b, rt))
        assert eng.selections[("vision", 0)].keep.tolist() == batched[b]
    eng = rt.prune("random", 3, seed=8)
    with torch.no_grad():
        rt.model(**inputs)
    assert [eng.selections[("vision", b)].keep.tolist() for b in range(3)] != batched


@pytest.mark.parametrize("rt", FAMILIES, indirect=True)
def test_novisual_leaves_only_text(rt):
    inputs = make_batch(rt)
    eng = rt.prune("novisual")
    with torch.no_grad():
        out = rt.model(**inputs, use_cache=True)
        toks = rt.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert all(s.visual_per_layer == [0] * 4 for s in eng.stats.samples)
    text = [int(m.sum()) - s.visual_candidates for m, s in zip(inputs["attention_mask"], eng.stats.samples)]
    assert out.past_key_values.layers[0].keys.shape[-2] == max(text)
    assert toks.shape[0] == 3
