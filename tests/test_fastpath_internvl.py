"""InternVL3 / 3.5 on the fast path (issue 34): one image per prompt, a unit per tile, the tiles' owner read from the
host ids (``pixel_values`` stacks every prompt's tiles and says nothing else); the stock feature path (InternViT,
[CLS] dropped, ``pixel_shuffle``, projector) and the pooled [CLS] signals inside the captured prefill
(``InternVLAdapter.encode_static``), bit-identical to the eager encoder. Greedy tokens, first-step scores and visual
counts == the eager engine; 0 host syncs; one prefill graph per bucket; video frames (a run per frame) eager."""

import pytest
import torch
from conftest import rand_image
from fastpath_util import (MORE_PROMPTS, assert_one_graph_per_bucket, assert_same_as_eager, counting_fast_path,
                           fast_and_eager, generate, per_prompt, sized_inputs)
from llava.needs import TowerCall

#: tiny InternVL: 112-px tiles of 8 x 8 patches, 16 tokens per tile after the 2 x 2 pixel shuffle; (40, 56) takes one
#: tile, the other two sizes 4 tiles + a thumbnail
SIZES = [(40, 56), (190, 30), (260, 260)]


@pytest.fixture(scope="module")
def rts():
    return fast_and_eager("internvl")


def images(rt, first=1, sizes=SIZES):
    return sized_inputs(rt, sizes, first)


def test_the_plan_reads_each_prompts_tiles_from_its_ids(rts):
    fast, _ = rts
    batch = images(fast)
    adapter = fast.engine.adapter if fast.engine is not None else fast.prune("none", None).adapter
    ids = torch.where(batch["attention_mask"].bool(), batch["input_ids"], -1)
    fv = adapter.visual_layout({"pixel_values": batch["pixel_values"]}, 3, ids)
    samples = per_prompt(fv.units)
    tiles = [s.units.tolist() for s in samples]
    assert tiles == [[0], [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]] and batch["pixel_values"].shape[0] == 11
    assert samples[1].src.tolist() == list(range(16, 96)) and samples[1].grid == ((4, 4),) * 5
    with pytest.raises(ValueError, match="tiles in pixel_values"):
        adapter.visual_layout({"pixel_values": batch["pixel_values"][:10]}, 3, ids)


@pytest.mark.parametrize("vision_layer", [None, 2])
def test_static_encoder_equals_the_eager_encoder(rts, vision_layer):
    """``encode_static`` == ``encode`` (the stock features and the pooled signals of the method's vision layer: the
    select layer's input, or the one producing hidden_states[2]), bit for bit."""
    _, eager = rts
    adapter = eager.prune("none", None).adapter
    px = images(eager)["pixel_values"]
    visual = {"pixel_values": px}
    with torch.no_grad():
        (ref,) = adapter.encode(visual, adapter.layout(visual), TowerCall(attention=True, layer=vision_layer))
        got = adapter.encode_static(px, ("internvl", int(px.shape[0])), {}, TowerCall(attention=True, layer=vision_layer))
        (other,) = adapter.encode(visual, adapter.layout(visual),
                                  TowerCall(attention=True, layer=2 if vision_layer is None else None))
    for k in ("features", "vision_features", "cls_attn", "keys"):
        assert torch.equal(got[k], ref.get(k)), k
    assert not torch.equal(got["cls_attn"], other.cls_attn)  # the layer is read


CASES = [("none", None), ("fastervlm", 6), ("visionzip", 6), ("divprune", 6), ("otprune", 6), ("consensusdrop", 6),
         ("random", 6), ("fastv", 8), ("pdrop", None), ("sparsevlm", 192)]


@pytest.mark.parametrize("method,budget", CASES)
def test_tokens_equal_the_eager_engine_without_a_host_sync(rts, method, budget):
    """The captured function run uncompiled (the code the compiled test below proves capturable): a batch of three
    images of 1 / 5 / 5 tiles == the eager engine, visual tokens per layer included, 0 host syncs."""
    fast, eager = rts
    eng = fast.prune(method, budget)
    eager.prune(method, budget)
    fp, syncs = counting_fast_path(eng)
    eng.fast = fp
    assert_same_as_eager(fast, eager, eng, images(fast), tokens=4)
    per_layer = [s.visual_per_layer for s in eng.stats.samples]
    assert per_layer == [s.visual_per_layer for s in eager.engine.stats.samples]
    if method != "none":  # pruned before or inside the LLM
        assert per_layer[1][-1] < eng.stats.samples[1].visual_candidates
    assert syncs == [0]


@pytest.mark.parametrize("method,budget", [("fastervlm", 6), ("fastv", 8)])
def test_compiled_one_prefill_graph_per_bucket(rts, method, budget):
    """Compiled (dynamo, fullgraph): prompts of other lengths in the same bucket and 16 decode steps compile nothing
    after the first (recompilation raises); tokens == eager."""
    fast, eager = rts
    torch._dynamo.reset()
    eng = fast.prune(method, budget)
    eager.prune(method, budget)
    candidates = [fast.processor([q], [rand_image(2, *SIZES[2])]) for q in MORE_PROMPTS]
    assert_one_graph_per_bucket(fast, eager, eng, images(fast, first=1, sizes=SIZES[2:]), candidates)


def test_video_frames_run_eagerly(rts):
    """InternVL's video prompt puts a ``Frame{i}: <img>...</img>`` run before every frame: several runs per prompt."""
    fast, eager = rts
    eng = fast.prune("fastervlm", 6)
    batch = fast.processor(["what happens?"], videos=[[rand_image(k) for k in range(4)]])
    toks, _ = generate(fast, batch, tokens=2)
    assert eng.stats.path == "eager" and "several" in eng.stats.path_reason
    eager.prune("fastervlm", 6)
    assert torch.equal(toks, generate(eager, batch, tokens=2)[0])
