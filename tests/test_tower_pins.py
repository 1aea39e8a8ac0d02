"""Each family's static tower (the captured executor's ``visual_layout`` + ``encode_static`` + ``static_table``) pinned
against its eager tower (``layout`` + ``encode``, the stock feature path the keep-all guarantee rests on), bit for
bit, on a batch of three images (Video-LLaVA: three videos), in fp32 and bf16, with the tower signals the methods read:
the features and every signal in the eager table. Where the two are equal the captured executor's tower is the eager
one's arithmetic; docs/models.md says which families keep two bodies and why."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_FAMILIES

from llava.candidates import gather_tokens
from llava.check.inputs import make_batch
from llava.families import registry
from llava.models import load
from llava.needs import TowerCall

#: the tower calls pinned: the unpruned model's (features only) and one with the attention signals (the [CLS] row
#: and keys of the select layer on CLIP / InternVL, the attention received on the others)
CALLS = {"plain": TowerCall(), "attention": TowerCall(attention=True)}
FAST = [f for f in ALL_FAMILIES if registry.get(f).fast]


def _tables(rt, call):
    batch = make_batch(rt)
    adapter = rt.prune("none", None).adapter
    visual = {k: batch[k] for k in adapter.visual_keys if k in batch}
    ids = batch["input_ids"]
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        layouts = adapter.layout(visual)
        assert len(layouts) == 1, "one placeholder kind per batch here"
        (eager,) = adapter.encode(visual, layouts, call)
        fv = adapter.visual_layout(visual, ids.shape[0], torch.where(valid, ids, -1))
        out = adapter.encode_static(visual[fv.key], fv.tower, fv.tower_tensors or {}, call)
        static = adapter.static_table({k: v for k, v in out.items() if v is not None}, fv.tower)  # with DeepStack
        # each table in the LLM's order (its own rows may be ordered otherwise), newline rows filled
        src_e, src_s = layouts[0].units.src, fv.units.src
        newline = adapter.newline() if bool((src_e < 0).any()) else None
        eager = gather_tokens(eager, src_e.to(eager.features.device), newline)
        static = gather_tokens(static, src_s.to(static.features.device), newline)
    return eager.entries(), static.entries()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("family", FAST)
def test_static_tower_equals_the_eager_tower(family, call, dtype):
    rt = load(f"tiny:{family}", seed=1, dtype=dtype)
    eager, static = _tables(rt, CALLS[call])
    assert "features" in eager and eager["features"].dtype == getattr(torch, dtype) or family == "video_llava"
    for name, want in eager.items():
        assert name in static, (family, name, sorted(static))
        got = static[name]
        assert got.shape == want.shape and got.dtype == want.dtype, (family, name, got.shape, want.shape)
        assert torch.equal(got, want), (family, name, (got.float() - want.float()).abs().max().item())
    if call == "attention":  # a signal was read
        assert set(eager) - {"features", "vision_features"}, (family, sorted(eager))
