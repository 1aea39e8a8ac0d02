"""HiPrune against its authors' code (``Danielement321/HiPrune``, LLaVA vendored under ``LLaVA/``,
parity/adapters/hiprune.py): the adapter's pure helpers everywhere; opt-in, the official code itself beside ours
(skipped without ``.venv-official`` or the clone ``.official/hiprune``) on the tiny LLaVA-1.5 weights built with a
24 x 24 patch tower (the official ``encode_images`` hard-codes CLIP-L/336's grid: buffers +-24, clamp to 575), and a
planted change in a copy of the clone that must make the kept indices differ."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import OFFICIAL_PY, needs_official

from parity import llava15
from parity.adapters import hiprune as adapter
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

CLONE = llava15.CLONES / "hiprune"
needs_clone = pytest.mark.skipif(
    not (CLONE / adapter.ROOT / "llava").is_dir(),
    reason="no clone of Danielement321/HiPrune: run `bash scripts/official_clones.sh hiprune`")


def test_the_harness_builds_the_grid_the_official_code_hard_codes():
    from parity import build as b

    assert adapter.GRID == b.NEXT_TOWER["image_size"] // b.NEXT_TOWER["patch_size"] == 24
    assert b.TOWER["image_size"] // b.TOWER["patch_size"] == 8  # the default weights: HiPrune's buffers overflow


# -- without the official code --------------------------------------------------------------------------------------
def test_the_object_layer_maps_onto_the_tiny_tower_as_our_reference_scaling_does():
    from baselines.hiprune import HiPrune

    assert HiPrune(16).object_layer_for(8) == adapter.OBJECT_LAYER == round(adapter.OBJECT_LAYER_OFFICIAL * 8 / 24)
    method, options = adapter.ours(16)
    assert method == "hiprune" and options["numerics"] == "official"
    assert HiPrune(16, **{k: v for k, v in options.items() if k != "numerics"}).object_layer_for(8) == 3


def test_the_official_switches_give_each_image_of_a_tower_call_the_budget():
    assert adapter.environment(16) == {"HIPRUNE_RETENTION": "16", "HIPRUNE_ALPHA": "0.1", "HIPRUNE_OBJECT_LAYER": "3"}
    # encode_images: visual_token_num = int(int(RETENTION) / B)
    env = adapter.environment(16, 4)
    assert int(int(env["HIPRUNE_RETENTION"]) / 4) == 16


def test_masks_to_indices():
    masks = torch.tensor([[True, False, True, False], [False, True, True, False]])
    assert adapter.masks_to_indices(masks).tolist() == [[0, 2], [1, 2]]


# -- against the official code (opt-in) -----------------------------------------------------------------------------
BUDGET = 32  # a = round(32 * 0.1 / 5) = 1 anchor (T = 8 / 16: none), so the anchor and its buffers are compared


@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    work = tmp_path_factory.mktemp("parity-hiprune")
    from parity.build import build_for

    return work, build_for(adapter.GRID, work, str(OFFICIAL_PY), seed=request.param)


def _spec(info) -> dict:
    n = len(info["images"])
    return {"name": "hiprune", "budget": BUDGET, "batches": [[i] for i in range(n)] + [list(range(n))]}


@pytest.fixture(scope="module")
def our_run(built):
    """Our side once (fp32, T = 32, each image alone and the four in one batch): both tests compare with it."""
    work, info = built
    return llava15.ours(info, "fp32", [_spec(info)], 8)


def _checks(built, our_run, clone: Path) -> list:
    work, info = built
    off = llava15.official(info, str(OFFICIAL_PY), "fp32", [_spec(info)], 8, work, str(clone))
    return llava15.compare(off, our_run, "fp32", 1e-5, 2)


@needs_official
@needs_clone
def test_hiprune_agrees_with_the_official_code(built, our_run):
    checks = _checks(built, our_run, CLONE / adapter.ROOT)
    assert len(checks) == 5
    assert all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]
    for c in checks:
        ((stage, kept),) = c.data["official_kept"]
        assert stage == "vision" and all(len(row) == BUDGET for row in kept)


@needs_official
@needs_clone
def test_a_planted_change_in_the_official_registers_makes_the_kept_indices_differ(built, our_run, tmp_path):
    clone = tmp_path / "hiprune"
    shutil.copytree(CLONE / adapter.ROOT / "llava", clone / "llava")
    path = clone / "llava" / "model" / "llava_arch.py"
    line = "deep_attention[i] -= available_index_mask.int().squeeze()"
    text = path.read_text()
    assert text.count(line) == 1
    # registers by the lowest deep global attention instead of the highest (U still excluded)
    path.write_text(text.replace(line, "deep_attention[i] = -deep_attention[i] - available_index_mask.int().squeeze()"))
    checks = _checks(built, our_run, clone)
    assert all("kept indices per stage DIFFER" in c.detail for c in checks)
