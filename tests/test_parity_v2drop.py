"""V2Drop against its authors' code (``xuyang-liu16/V2Drop``, parity/adapters/v2drop.py): the adapter's helpers
everywhere; opt-in, the official code itself beside ours on the tiny weights (skipped without ``.venv-official`` or
the clone ``.official/v2drop``), and a planted change in a copy of the clone that must make the kept indices differ."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import OFFICIAL_PY, needs_official

from parity import llava15
from parity.adapters import v2drop as adapter
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

CLONE = llava15.CLONES / "v2drop"
SOURCE = Path("llava") / "model" / "language_model" / "V2Drop.py"
needs_clone = pytest.mark.skipif(not (CLONE / SOURCE).is_file(),
                                 reason="no clone of xuyang-liu16/V2Drop: run `bash scripts/official_clones.sh v2drop`")


# -- without the official code --------------------------------------------------------------------------------------
def test_the_official_layers_map_onto_the_tiny_llm_as_our_scale_layers_maps_them():
    from baselines.v2drop import RULES
    from llava.ops import scale_layers

    layers, ratios, depth = RULES["llava"]
    assert layers == adapter.OFFICIAL_LAYERS and depth == 32 and ratios == (0.5, 0.5, 0.0)
    assert scale_layers(list(layers), 4) == adapter.LAYERS
    method, options = adapter.ours(0)
    assert method == "v2drop" and options["budget"] is None
    assert (options["numerics"], options["rule"], options["layers"], options["scale_layers"]) == (
        "official", "llava", adapter.LAYERS, False)
    assert adapter.OFFICIAL == {"alone": True}
    # every edit replaces one literal of the official forward by the tiny geometry or the prompt's start
    pairs = dict(adapter.edits())
    assert pairs["target_layer_indices = {3,17,22}"] == "target_layer_indices = {1,2,3}"
    assert pairs["image_token_amount = 576"] == "image_token_amount = 64"
    assert all("35" not in new and "576" not in new for new in pairs.values())


@needs_clone
def test_every_edit_matches_the_clone_exactly_once():
    src = (CLONE / SOURCE).read_text()
    for old, _ in adapter.edits():
        assert src.count(old) == 1, old


# -- against the official code (opt-in) -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    from parity.build import build

    work = tmp_path_factory.mktemp("parity-v2drop")
    return work, build(work, str(OFFICIAL_PY), seed=request.param)


def _spec(info) -> dict:
    return {"name": "v2drop", "budget": 0, "batches": [[i] for i in range(len(info["images"]))]}


def _checks(built, ours, root: Path, dtype: str = "fp32") -> list:
    work, info = built
    off = llava15.official(info, str(OFFICIAL_PY), dtype, [_spec(info)], 8, work, str(root))
    return llava15.compare(off, ours, dtype, 1e-5, 2)


@pytest.fixture(scope="module")
def our_run(built):
    """Our side once (fp32, the official schedule, each image alone)."""
    work, info = built
    return llava15.ours(info, "fp32", [_spec(info)], 8)


@needs_official
@needs_clone
def test_v2drop_agrees_with_the_official_code(built, our_run):
    """fp32: the three stages' kept indices (32 / 16 / 1 of 64), the logits (1e-5) and the greedy tokens."""
    checks = _checks(built, our_run, CLONE)
    assert len(checks) == 4
    assert all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]
    for c in checks:
        kept = dict(c.data["official_kept"])
        assert [len(kept[f"llm{k}"][0]) for k in adapter.LAYERS] == [32, 16, 1]


@needs_official
@needs_clone
def test_fp16_agrees_bit_for_bit(built):
    """fp16 (the official load's precision): the score in fp16 on both sides, the logits bit-identical."""
    work, info = built
    checks = _checks(built, llava15.ours(info, "fp16", [_spec(info)], 8), CLONE, "fp16")
    assert len(checks) == 4 and all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]
    assert all("logits max abs diff 0.00e+00" in c.detail for c in checks), [c.detail for c in checks]


@needs_official
@needs_clone
def test_a_planted_change_in_the_official_score_makes_the_kept_indices_differ(built, our_run, tmp_path):
    root = tmp_path / "v2drop"
    shutil.copytree(CLONE / "llava", root / "llava")
    path = root / SOURCE
    line = "torch.topk(l2_diff_candidate, k=k, largest=True)"
    text = path.read_text()
    assert text.count(line) == 1
    path.write_text(text.replace(line, "torch.topk(l2_diff_candidate, k=k, largest=False)"))  # the laziest tokens
    checks = _checks(built, our_run, root)
    assert any("kept indices per stage DIFFER" in c.detail for c in checks)
