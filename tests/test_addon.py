"""Composition (llava/addon.py): an add-on over a shipped method, docs/your-method.md's MergeRest loaded from its file
as a user's method. Its outputs are the base's kept tokens in raster order and the mean of the tokens the base dropped,
checked against the base attached alone and the stock projector's features; the base's signal needs become the
add-on's; one spelling (the option ``base``) in the API, labels and llava.cli; the fast path runs it as its base;
refusals (a base with llm stages, an unknown base, an add-on as base)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_batch

from llava import load
from llava.method import method_label

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs/examples/addon/mergerest.py"


def _register():
    spec = importlib.util.spec_from_file_location("mergerest_doc", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)  # registers "mergerest"
    except ValueError as e:  # registered by an earlier test of this process
        assert "mergerest" in str(e)


@pytest.fixture(scope="module", autouse=True)
def _example_registered():
    """The example is registered for this file's tests only: the family-wide tests of the same process enumerate
    every registered method."""
    from llava import method

    _register()
    yield
    method._REGISTRY.pop("mergerest", None)


@pytest.fixture(scope="module")
def rt():
    return load("tiny:llava", seed=1)


def test_the_example_is_printed_whole():
    page = (REPO / "docs/your-method.md").read_text()
    assert EXAMPLE.read_text() in page


@pytest.mark.parametrize("base,opts", [("divprune", {}), ("random", {"seed": 3})])  # candidates = the 16 patches
def test_outputs_are_the_base_kept_tokens_then_the_mean_of_the_rest(rt, base, opts):
    inputs = make_batch(rt)
    eng = rt.prune(base, 4, **opts)  # the base alone at the add-on's base budget (5 - 1)
    with torch.no_grad():
        rt.model(**inputs)
    alone = [eng.selections[("vision", b)].keep.sort().values for b in range(3)]
    eng = rt.prune("mergerest", 5, base=base, base_options=opts)
    assert eng.method.base_method.budget == 4 and eng.method.base_method.name == base
    embeds, mask, _, info = eng.vision_inputs(inputs["input_ids"], {"pixel_values": inputs["pixel_values"]},
                                              inputs["attention_mask"])
    with torch.no_grad():
        feats = rt.model.model.get_image_features(inputs["pixel_values"]).pooler_output  # (3, 16, D) projected
    feats = torch.stack(list(feats)).reshape(3, 16, -1)
    for b in range(3):
        sel = eng.selections[("vision", b)]
        assert torch.equal(sel.keep, alone[b])  # the base's own choice, in raster order
        dropped = torch.ones(16, dtype=torch.bool)
        dropped[alone[b]] = False
        expect = torch.cat([feats[b, alone[b]], feats[b, dropped].float().mean(0, keepdim=True).to(feats.dtype)])
        rows = embeds[b][mask[b].bool()]
        ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        first = int((ids == rt.model.config.image_token_id).nonzero()[0])
        vis = rows[first:first + 5]
        torch.testing.assert_close(vis, expect, rtol=1e-5, atol=1e-5)


def test_needs_labels_and_the_command_line(rt, tmp_path):
    eng = rt.prune("mergerest", 5, base="visionzip")
    assert eng.needs.tower_attention and eng.needs.include_cls_candidates  # VisionZip's signals, read for it
    assert not rt.prune("mergerest", 5).needs.tower_attention  # DivPrune reads none
    assert method_label("mergerest", {"base": "visionzip"}) == "mergerest base=visionzip"
    env = dict(os.environ, VTPRUNE_METHODS=str(EXAMPLE), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "llava.cli", "ask", "--model", "tiny:llava", "--question",
                          "what is this?", "--method", "mergerest", "--budget", "5", "--opt", "base=random"],
                         check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "-> 5 entering the LLM" in out.stdout


def test_fast_path_runs_it_as_its_base():
    fast = load("tiny:llava", seed=1, fast=True, fast_max_new_tokens=4, fast_backend="none")
    inputs = make_batch(fast)
    eng = fast.prune("mergerest", 5, base="divprune")
    with torch.no_grad():
        got = fast.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert eng.stats.path == "fast", eng.stats.path_reason
    eager = load("tiny:llava", seed=1)
    eager.prune("mergerest", 5, base="divprune")
    with torch.no_grad():
        ref = eager.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, ref)


def test_refusals(rt):
    with pytest.raises(ValueError, match="must be a pre-LLM method .* llm stages"):
        rt.prune("mergerest", 5, base="fastv")
    with pytest.raises(ValueError, match="unknown base 'divprun'.*divprune"):
        rt.prune("mergerest", 5, base="divprun")
    with pytest.raises(ValueError, match="an add-on itself"):
        rt.prune("mergerest", 5, base="mergerest")
