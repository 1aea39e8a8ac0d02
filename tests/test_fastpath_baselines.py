"""The fast path (llava.fast.path) for the fixed-count pre-LLM baselines made capturable in issue 34:
downsample (the selection planned on the host: windows depend on the layout only), VisPruner (its rounds'
sizes are host ints) and CDPruner (the question rows of the padded text block, the greedy DPP on the device,
``dpp_greedy_device``), VisionTrim (its DVTS / TGVC counts are host ints; the question rows of the padded
text block) and HiPrune (the received attention of two extra tower layers, recomputed from the
tower's hidden states inside the captured function) and VScan (its two scans' counts planned from the
structure: the unit layout and, for LLaVA-NeXT's cut windows, ``local_counts``; its LLM stage per segment).
Greedy tokens and first-step scores == the eager engine's on LLaVA-1.5, LLaVA-NeXT and Video-LLaVA
videos, 0 host syncs inside the captured function, refused options run eagerly.
(The host-vs-device DPP equivalence is in tests/test_cdpruner.py.)"""

import pytest
import torch
from fastpath_util import (BACKEND, SINGLES, assert_same_as_eager, counting_fast_path, family_batch, generate, inputs,
                           prune_family)

import baselines.cdpruner  # noqa: F401  (registers the three methods)
import baselines.downsample  # noqa: F401
import baselines.hiprune  # noqa: F401
import baselines.visiontrim  # noqa: F401
import baselines.vispruner  # noqa: F401
import baselines.vscan  # noqa: F401
from llava.method import get_method
from llava.models import load

#: budgets that prune the tiny 16-patch units (downsample: a square, 4 = 2 x 2 windows of stride 2)
CASES = [("downsample", 4), ("vispruner", 6), ("cdpruner", 5), ("hiprune", 6), ("vscan", 6), ("visiontrim", 4)]


@pytest.fixture(scope="module")
def rt_fast():
    return load("tiny:llava", seed=1, fast=True, fast_max_new_tokens=16, fast_backend=BACKEND)


@pytest.fixture(scope="module")
def rt_eager():
    return load("tiny:llava", seed=1)


@pytest.fixture(scope="module")
def family_rts():
    return {fam: (load(f"tiny:{fam}", seed=1, fast=True, fast_max_new_tokens=16, fast_backend=BACKEND),
                  load(f"tiny:{fam}", seed=1)) for fam in ("llava_next", "video_llava")}


def _check_equal(fast, eager, batch, eng, tokens=8):
    assert_same_as_eager(fast, eager, eng, batch, tokens)
    assert not all(s.vision_noop for s in eager.engine.stats.samples)  # the budget prunes


def test_declared_capturable_and_refusals_by_option():
    for name, budget in CASES:
        m = get_method(name, budget)
        assert m.capturable == "full" and m.capture_refusal() is None, name
    assert get_method("downsample", None, stride=(1, 2), space="projected", newlines="drop").capture_refusal() is None
    assert get_method("vispruner", 6, cls_token="keep", reference=True).capture_refusal() is None
    assert "official" in get_method("vispruner", 6, numerics="official").capture_refusal()
    assert "official" in get_method("cdpruner", 5, numerics="official").capture_refusal()
    assert "official" in get_method("hiprune", 6, numerics="official").capture_refusal()
    assert "official" in get_method("vscan", 6, numerics="official").capture_refusal()
    assert get_method("cdpruner", 5, theta=0.5, minmax_scope="unit", cls_token="drop").capture_refusal() is None
    why = get_method("cdpruner", 5, relevance="clip", clip_model="x", llm_tokenizer="y").capture_refusal()
    assert "clip" in why and "host" in why


def _uncompiled(eng):
    """The engine's fast path replaced by one running the captured function uncompiled (``backend="none"``:
    the same code with ``sig.captured``, no compile time), its prefill calls' host syncs counted."""
    fp, syncs = counting_fast_path(eng)
    eng.fast = fp
    return syncs


@pytest.mark.parametrize("family", ["llava", "llava_next", "video_llava"])
@pytest.mark.parametrize("method,budget", CASES)
def test_no_host_sync_inside_the_captured_prefill(rt_fast, family_rts, family, method, budget):
    """The captured function (run uncompiled) reads nothing from the device: the plan did it all."""
    fast = rt_fast if family == "llava" else family_rts[family][0]
    eng = fast.prune(method, budget)
    syncs = _uncompiled(eng)
    batch = inputs(fast, 1, n=2) if family == "llava" else family_batch(fast, family)
    generate(fast, batch, tokens=1)
    assert eng.stats.path == "fast", eng.stats.path_reason
    assert syncs == [0]


#: non-default options the fast path captures too (checked uncompiled: the captured code, no compile time)
OPTION_CASES = [
    ("llava_next", "downsample", None, {"stride": (1, 2), "space": "projected", "newlines": "drop"}),
    ("video_llava", "vispruner", 5, {"cls_token": "keep", "important_ratio": 0.5}),
    ("llava_next", "vispruner", 6, {"keep_newlines": False, "important_ratio": 0.25}),
    ("video_llava", "cdpruner", 5, {"cls_token": "keep", "theta": 0.5}),
    ("llava_next", "cdpruner", 4, {"minmax_scope": "unit", "relevance_sign": "pos", "keep_newlines": False,
                                   "reference": True}),
    ("llava_next", "hiprune", 5, {"cls_token": "keep", "keep_newlines": False, "object_layer": 2,
                                  "object_layer_reference": None}),
    ("video_llava", "hiprune", 4, {"cls_token": "keep", "alpha": 0.3}),
    ("llava_next", "vscan", 6, {"remainder": "global", "local_ratio": 0.75}),
]


@pytest.mark.parametrize("family,method,budget,options", OPTION_CASES)
def test_captured_options_equal_the_eager_engine(family_rts, family, method, budget, options):
    fast, eager = family_rts[family]
    eng = fast.prune(method, budget, **options)
    eager.prune(method, budget, **options)
    syncs = _uncompiled(eng)
    _check_equal(fast, eager, family_batch(fast, family), eng, tokens=4)
    assert syncs == [0]


def test_refused_options_run_eagerly_and_say_why(rt_fast, rt_eager):
    eng = rt_fast.prune("cdpruner", 5, relevance="clip", clip_model="unused", llm_tokenizer="unused")
    assert "clip" in eng.fast.refusal
    eng = rt_fast.prune("vispruner", 6, numerics="official")
    batch = inputs(rt_fast, 0)
    toks, _ = generate(rt_fast, batch, tokens=4)
    assert eng.stats.path == "eager" and "official" in eng.stats.path_reason
    rt_eager.prune("vispruner", 6, numerics="official")
    assert torch.equal(toks, generate(rt_eager, batch, tokens=4)[0])


# ------------------------------------------------------------------ compiled (torch.compile(fullgraph=True))
# last in the file: the uncompiled checks above run before the compiled graphs accumulate


@pytest.mark.parametrize("method,budget", CASES)
def test_fast_tokens_equal_the_eager_engine(rt_fast, rt_eager, method, budget):
    """LLaVA-1.5: greedy tokens and first-step scores == the eager engine,
    on a left-padded batch of 3 prompts of different lengths (FAST_FULL=1: also each alone)."""
    eng = rt_fast.prune(method, budget)
    rt_eager.prune(method, budget)
    assert eng.fast is not None and eng.fast.refusal is None
    for i in SINGLES:
        _check_equal(rt_fast, rt_eager, inputs(rt_fast, i), eng)
    _check_equal(rt_fast, rt_eager, inputs(rt_fast, 0, n=3), eng)


@pytest.mark.parametrize("family", ["llava_next", "video_llava"])
@pytest.mark.parametrize("method,budget", CASES)
def test_fast_tokens_equal_the_eager_engine_on_next_and_video_llava(family_rts, family, method, budget):
    """LLaVA-NeXT (anyres crops, unpadded grids with newline tokens) and Video-LLaVA videos (8 frames, each a
    unit with its [CLS]): one batch of three prompts, tokens and first-step scores == the eager engine."""
    fast, eager = family_rts[family]
    # dynamo traces VisPruner's tower signals on Video-LLaVA's frames and VScan's windows on NeXT's crops (the other
    # family of each runs the same fast path uncompiled: CI time)
    eng = prune_family(fast, method, budget, traced=(method, family) in (("vispruner", "video_llava"),
                                                                         ("vscan", "llava_next")))
    eager.prune(method, budget)
    _check_equal(fast, eager, family_batch(fast, family), eng)
