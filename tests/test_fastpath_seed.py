"""The fast path (llava.fast.path) on the seed methods AttnMix and ConsensusDrop (issue 34, item 3): their
pre-LLM selections captured whole (the padded text block read through masked ops, AttnMix's adaptive split
and ConsensusDrop's greedy max-min loops on the device), checked against the eager engine's ``generate()``
as tests/test_fastpath.py checks the baselines (dynamo without code generation on a CPU)."""

import pytest
import torch
from fastpath_util import BACKEND, SINGLES, assert_same_as_eager, counting_fast_path, family_batch, generate, inputs

from llava.method import get_method
from llava.models import load
#: budgets that prune: AdaV's budget is the sample's total (k = floor(floor(B/2)/N) per unit must be >= 1:
#: up to 5 NeXT crops, 8 Video-LLaVA frames); ConsensusDrop's is per image / crop / frame (16 tokens each)
BUDGETS = {"attnmix": {"llava": 6, "llava_next": 20, "video_llava": 32},
           "consensusdrop": {"llava": 6, "llava_next": 6, "video_llava": 6}}
METHODS = sorted(BUDGETS)


@pytest.fixture(scope="module")
def rts():
    """(fast, eager) runtimes per family; the fast ones compile with dynamo (``FAST_BACKEND`` may ask for
    inductor)."""
    return {fam: (load(f"tiny:{fam}", seed=1, fast=True, fast_max_new_tokens=16, fast_backend=BACKEND),
                  load(f"tiny:{fam}", seed=1)) for fam in ("llava", "llava_next", "video_llava")}


def test_what_the_seed_methods_capture():
    """Defaults (and ConsensusDrop's "cover" and "probe" presets) are captured; the reference mode and the in-LLM
    ablation are refused, with why (the LLM probe: tests/test_fastpath_probe.py)."""
    assert get_method("attnmix", 64).capture_refusal() is None
    assert get_method("attnmix", 64, text_queries="question").capture_refusal() is None
    assert "official" in get_method("attnmix", 64, numerics="official").capture_refusal()
    assert get_method("consensusdrop", 64).capture_refusal() is None
    assert get_method("consensusdrop", 64, preset="cover").capture_refusal() is None
    assert get_method("consensusdrop", 64, preset="probe").capture_refusal() is None
    assert get_method("consensusdrop", 64, probe_layer=2).capture_refusal() is None
    assert get_method("consensusdrop", 64, probe_layer=2, fusion="encoder_only").capture_refusal() is None
    assert "after_probe" in get_method("consensusdrop", 64, prune_point="after_probe").capture_refusal()
    assert get_method("consensusdrop", 64, order="spatial").capture_refusal() is None


@pytest.mark.parametrize("method", METHODS)
def test_fast_tokens_equal_the_eager_engine(rts, method):
    """LLaVA-1.5: greedy tokens and first-step scores of the fast path == the eager engine's,
    on a left-padded batch of 3 prompts of different lengths (FAST_FULL=1: also each alone)."""
    fast, eager = rts["llava"]
    budget = BUDGETS[method]["llava"]
    eng = fast.prune(method, budget)
    eager.prune(method, budget)
    assert eng.fast is not None and eng.fast.refusal is None
    for i in SINGLES:
        assert_same_as_eager(fast, eager, eng, inputs(fast, i))
    assert_same_as_eager(fast, eager, eng, inputs(fast, 0, n=3))


@pytest.mark.parametrize("family", ["llava_next", "video_llava"])
@pytest.mark.parametrize("method", METHODS)
def test_fast_tokens_equal_the_eager_engine_on_next_and_video_llava(rts, family, method):
    """LLaVA-NeXT (images of three sizes: crops, unpadded layouts with newline tokens) and Video-LLaVA
    (three 8-frame videos, a unit per frame with its [CLS]): one batch of three == the eager engine."""
    fast, eager = rts[family]
    budget = BUDGETS[method][family]
    eng = fast.prune(method, budget)
    eager.prune(method, budget)
    assert_same_as_eager(fast, eager, eng, family_batch(fast, family))


@pytest.mark.parametrize("family", ["llava", "llava_next", "video_llava"])
@pytest.mark.parametrize("method,options", [("attnmix", {}), ("attnmix", {"text_queries": "question"}),
                                            ("consensusdrop", {}), ("consensusdrop", {"probe_queries": "last"})])
def test_no_host_sync_inside_the_captured_prefill(rts, family, method, options):
    """The captured function (run uncompiled) reads nothing from the device, on every family."""
    fast, _ = rts[family]
    eng = fast.prune(method, BUDGETS[method][family], **options)
    fp, calls = counting_fast_path(eng)
    batch = inputs(fast, 1, n=2) if family == "llava" else family_batch(fast, family)
    visual = {k: batch[k] for k in ("pixel_values", "pixel_values_videos", "image_sizes") if k in batch}
    with torch.no_grad():
        fp.prefill(batch["input_ids"], batch["attention_mask"], visual)
    assert calls == [0]


@pytest.mark.parametrize("family,options", [("llava", {"order": "spatial"}), ("llava_next", {"order": "spatial"}),
                                            ("llava_next", {"next_order": "grid_raster"})])
def test_output_orders_compared_with_the_identity_eagerly_are_captured(rts, family, options):
    """ConsensusDrop's ``order="spatial"`` and NeXT's ``next_order="grid_raster"``: the eager engine reads
    whether the order is the identity (``ops.block_order``); the captured prefill applies it without that
    read. Uncompiled: 0 host syncs and the eager engine's tokens / scores."""
    fast, eager = rts[family]
    budget = BUDGETS["consensusdrop"][family]
    eng = fast.prune("consensusdrop", budget, **options)
    eager.prune("consensusdrop", budget, **options)
    fp, calls = counting_fast_path(eng)
    eng.fast = fp
    assert_same_as_eager(fast, eager, eng, inputs(fast, 1, n=2) if family == "llava" else family_batch(fast, family),
                         tokens=4)
    assert calls == [0]


def test_refused_options_run_eagerly_and_say_why(rts):
    fast, eager = rts["llava"]
    batch = inputs(fast, 0)
    eng = fast.prune("consensusdrop", 6, prune_point="after_probe")
    toks, _ = generate(fast, batch, tokens=2)
    assert eng.stats.path == "eager" and "after_probe" in eng.stats.path_reason
    eager.prune("consensusdrop", 6, prune_point="after_probe")
    assert torch.equal(toks, generate(eager, batch, tokens=2)[0])
    eng = fast.prune("attnmix", 6, numerics="official")
    generate(fast, batch, tokens=2)
    assert eng.stats.path == "eager" and "official" in eng.stats.path_reason
