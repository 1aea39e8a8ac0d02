"""LLaVA-OneVision on the fast path (issue 34): one image (anyres_max_9: the base crop, the grid crops unpadded, a
bilinear shrink past 9 crops' worth, a newline per row) or one video (frames pooled 2x, one newline) per prompt, the
packing planned on the host from ``image_sizes`` (``onevision_vision.plan_images`` / ``plan_videos``) and
run inside the captured prefill (``run_static``). The static encoder == the eager encoder bit for bit; greedy tokens,
first-step scores and visual counts == the eager engine; 0 host syncs; one prefill graph per bucket."""

import pytest
import torch
from conftest import rand_image
from fastpath_util import (MORE_PROMPTS, PROMPTS, assert_one_graph_per_bucket, assert_same_as_eager, counting_fast_path,
                           fast_and_eager, generate, per_prompt, sized_inputs)

from llava.families import onevision_vision as ov
from llava.models import load

#: the tiny model: 56-px crops of 4 x 4 patches, pinpoints up to 224 px; (260, 260) takes 16 grid crops and is
#: shrunk bilinearly to 12 x 12 (ratio 16 / 9 > 1.1), (190, 30) a 4 x 1 grid unpadded, (40, 56) one grid crop
SIZES = [(40, 56), (190, 30), (260, 260)]


@pytest.fixture(scope="module")
def rts():
    return fast_and_eager("llava_onevision")


def images(rt, first=1, sizes=SIZES):
    return sized_inputs(rt, sizes, first)


def videos(rt, first=1, n=2, frames=4):
    return rt.processor([PROMPTS[(first + j) % len(PROMPTS)] for j in range(n)],
                        videos=[[rand_image(8 * j + k) for k in range(frames)] for j in range(n)])


def test_the_plan_of_a_shrunk_image():
    """(260, 260) on the tiny model: 1 base crop + 4 x 4 grid crops; the 16 x 16 grid map is not unpadded (square)
    and shrunk to int(16 / (16 / 12)) = 12 rows of 12 + a newline: 16 + 12 * 13 = 172 tokens."""
    rt = load("tiny:llava_onevision", seed=1)
    plan, t, units = ov.plan_images(rt.model.config, [[260, 260]], 17)
    (s,) = per_prompt(units)
    assert plan == ("images", ((1, 4, 4, (260, 260), (12, 12)),), 4, 4)
    assert torch.equal(t["crops"], torch.arange(17)) and s.src.numel() == 172
    nl = (s.src < 0).nonzero().flatten()
    assert torch.equal(nl, 16 + 12 + 13 * torch.arange(12))  # the last column of every shrunk row
    assert s.unit[:16].tolist() == [0] * 16 and s.grid == ((4, 4),) * 17


@pytest.mark.parametrize("kind", ["images", "videos"])
def test_static_encoder_equals_the_eager_encoder(rts, kind):
    """``run_static`` over the planned crops / frames == ``encode_images`` / ``encode_videos`` (the stock features
    and every signal), bit for bit, newline rows aside (the fast path splices ``image_newline`` there)."""
    _, eager = rts
    core = ov._core(eager.model)
    cfg = core.config
    batch = images(eager) if kind == "images" else videos(eager)
    with torch.no_grad():
        if kind == "images":
            ref = ov.encode_images(eager.model, batch["pixel_values"], batch["image_sizes"], want_attn=True)
            plan, t, units = ov.plan_images(cfg, batch["image_sizes"].tolist(), batch["pixel_values"].shape[1])
            got = ov.run_static(core, batch["pixel_values"], plan, t, True)
        else:
            ref = ov.encode_videos(eager.model, batch["pixel_values_videos"], want_attn=True)
            plan, t, units = ov.plan_videos(cfg, *batch["pixel_values_videos"].shape[:2])
            got = ov.run_static(core, batch["pixel_values_videos"], plan, t, True)
    samples = per_prompt(units)
    src = torch.cat([s.src for s in samples])
    real = src >= 0
    assert torch.equal(real, ref.unit >= 0) and torch.equal(torch.cat([s.patch for s in samples]), ref.patch)
    assert torch.equal(got["features"][src[real]], ref.features[real])
    assert torch.equal(got["vision_features"][src[real]], ref.vision_features[real])
    assert torch.equal(got["cls_attn"][src[real]], ref.saliency.T[real])
    assert torch.equal(got["keys"][src[real]], ref.keys[real])


#: budgets that prune: per crop / per frame (4 pooled tokens per frame on the tiny model)
CASES = [("none", None), ("fastervlm", 6), ("visionzip", 6), ("divprune", 6), ("otprune", 6), ("consensusdrop", 6),
         ("random", 6), ("cdpruner", 6), ("fastv", 40), ("pdrop", None)]


@pytest.mark.parametrize("method,budget", CASES)
def test_tokens_equal_the_eager_engine_without_a_host_sync(rts, method, budget):
    """The captured function run uncompiled (the code the compiled test below proves capturable): a batch of three
    image sizes (one shrunk) and a batch of two 4-frame videos == the eager engine, 0 host syncs."""
    fast, eager = rts
    eng = fast.prune(method, budget)
    eager.prune(method, budget)
    fp, syncs = counting_fast_path(eng)
    eng.fast = fp
    for batch in (images(fast), videos(fast)):
        assert_same_as_eager(fast, eager, eng, batch, tokens=4)
        assert [s.visual_per_layer for s in eng.stats.samples] == [
            s.visual_per_layer for s in eager.engine.stats.samples]
    assert syncs == [0, 0]


def test_video_budgets_prune_per_frame(rts):
    fast, eager = rts
    eng = fast.prune("visionzip", 2)
    eager.prune("visionzip", 2)
    assert_same_as_eager(fast, eager, eng, videos(fast), tokens=4)
    assert [s.visual_entering_llm for s in eng.stats.samples] == [4 * 2 + 1] * 2  # 2 per frame + the newline


@pytest.mark.parametrize("method,budget", [("fastervlm", 8), ("fastv", 40)])
def test_compiled_one_prefill_graph_per_bucket(rts, method, budget):
    """Compiled (dynamo, fullgraph): the same images with prompts of other lengths in the same bucket and 16 decode
    steps compile nothing after the first (recompilation raises); tokens == eager."""
    fast, eager = rts
    torch._dynamo.reset()
    eng = fast.prune(method, budget)
    eager.prune(method, budget)
    candidates = [fast.processor([q], [rand_image(2, *SIZES[2])]) for q in MORE_PROMPTS]
    assert_one_graph_per_bucket(fast, eager, eng, images(fast, first=1, sizes=SIZES[2:]), candidates)


def test_several_images_per_prompt_run_eagerly(rts):
    fast, _ = rts
    eng = fast.prune("fastervlm", 6)
    batch = fast.processor(["what differs?"], [[rand_image(0), rand_image(1)]])
    generate(fast, batch, tokens=2)
    assert eng.stats.path == "eager" and "several images" in eng.stats.path_reason
