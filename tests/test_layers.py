"""The one loop over decoder layers (llava/layers.py), which both executors' prefills, decode steps and LLM probes
run: each check against the stock decoder layers called one by one on the tiny LLaVA's language model."""

import pytest
import torch

from llava.layers import add_deepstack, entering, run_layers
from llava.models import load
from llava.selection_rows import DeepStack


@pytest.fixture(scope="module")
def lm():
    return load("tiny:llava", seed=1).model.model.language_model


def _inputs(lm, B=2, L=7):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, L, lm.config.hidden_size, generator=g)
    pos = torch.arange(L)[None].expand(B, L)
    mask = torch.ones(L, L, dtype=torch.bool).tril()[None, None].expand(B, 1, L, L)
    return h, mask, lm.rotary_emb(h, position_ids=pos)


def _by_hand(lm, h, mask, pe, layers):
    for i in layers:
        h = lm.layers[i](h, attention_mask=mask, position_embeddings=pe)
    return h


@torch.no_grad()
def test_run_layers_is_the_layers_one_by_one_and_returns_the_last_input(lm):
    h, mask, pe = _inputs(lm)
    out, prev = run_layers(lm, h, mask, pe, range(1, 4))
    assert torch.equal(prev, _by_hand(lm, h, mask, pe, [1, 2]))
    assert torch.equal(out, _by_hand(lm, h, mask, pe, [1, 2, 3]))
    # a list of masks is read from the range's first layer: the wrong mask for layer 2 changes only what follows it
    none = torch.zeros_like(mask)
    none[..., 0] = True  # every row sees only the first row
    out2, _ = run_layers(lm, h, [mask, none, mask], pe, range(1, 4))
    assert torch.equal(out2, _by_hand(lm, _by_hand(lm, _by_hand(lm, h, mask, pe, [1]), none, pe, [2]), mask, pe, [3]))
    assert not torch.equal(out2, out)


@torch.no_grad()
def test_swapped_layers_and_deepstack_rows(lm):
    h, mask, pe = _inputs(lm)
    B, L, D = h.shape
    at = torch.tensor([2, 3, L + 4])  # sample 0 rows 2 and 3, sample 1 row 4 (flattened, row-major)
    rows = torch.randn(3, 2, D, generator=torch.Generator().manual_seed(1))  # two levels
    ds = DeepStack(rows, at)
    out, prev = run_layers(lm, h, mask, pe, range(0, 3), ds, swap={1: lambda x: 2 * x})
    # layer 0, its level's rows added at the three positions; layer 1 swapped; its level's rows; layer 2 (no level 2)
    x = _by_hand(lm, h, mask, pe, [0]).reshape(B * L, D).clone()
    x[at] += rows[:, 0]
    x = 2 * x
    x[at] += rows[:, 1]
    x = x.view(B, L, D)
    assert torch.equal(prev, x)
    assert torch.equal(out, _by_hand(lm, x, mask, pe, [2]))
    assert torch.equal(add_deepstack(h, ds, 0).reshape(B * L, D)[at], h.reshape(B * L, D)[at] + rows[:, 0])
    assert torch.equal(add_deepstack(h, ds, 0).reshape(B * L, D)[:2], h.reshape(B * L, D)[:2])  # other rows as they were


@torch.no_grad()
def test_entering_runs_the_layers_once_up_to_the_last_asked(lm):
    h, mask, pe = _inputs(lm)
    calls = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, layer in enumerate(lm.layers)]
    try:
        got = entering(lm, h, mask, pe, (3, 0, 1))
    finally:
        for k in hooks:
            k.remove()
    assert calls == [0, 1, 2]  # each layer once, none after the last asked
    assert sorted(got) == [0, 1, 3]
    assert torch.equal(got[0], h)
    assert torch.equal(got[1], _by_hand(lm, h, mask, pe, [0]))
    assert torch.equal(got[3], _by_hand(lm, h, mask, pe, [0, 1, 2]))
    # per-layer masks from layer 0: the same states
    again = entering(lm, h, [mask] * 3, pe, (1, 3))
    assert torch.equal(again[1], got[1]) and torch.equal(again[3], got[3])
