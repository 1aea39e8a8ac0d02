"""DART against its authors' code (the public fork ``xqy1111111/DART`` of ``ZichenWen1/DART``,
parity/adapters/dart.py): the adapter's pure helpers everywhere; opt-in, the official code itself beside ours on the
tiny weights (skipped without ``.venv-official`` or the clone ``.official/dart``), and a planted change in a copy of
the clone that must make the kept indices differ."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import OFFICIAL_PY, needs_official

from parity import llava15
from parity.adapters import dart as adapter
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

CLONE = llava15.CLONES / "dart"
needs_clone = pytest.mark.skipif(not (CLONE / "llava").is_dir(),
                                 reason="no clone of xqy1111111/DART: run `bash scripts/official_clones.sh dart`")


# -- without the official code --------------------------------------------------------------------------------------
def test_the_scripts_layer_maps_onto_the_tiny_llm_as_our_scale_layers_maps_it():
    from llava.ops import scale_layers

    assert scale_layers([2], 4) == (adapter.LAYER,) and adapter.STAGE == "llm1"
    method, options = adapter.ours(16)
    assert method == "dart" and options["numerics"] == "official"
    assert (options["layer"], options["scale_layers"]) == (adapter.LAYER, False)


def test_the_official_config_is_configure_darts_dict():
    cfg = adapter.dart_config(16, 64, 13)
    assert cfg == {"K": 1, "image_token_start_index": 13, "image_token_length": 64, "max_num_trunction": 16,
                   "reduction_ratio": 0.778, "retain_token_num_for_llava_next": 320, "pivot_image_token": 4,
                   "pivot_text_token": 4}


def test_the_image_start_is_the_placeholders_position():
    assert adapter.image_start([1, 7, 9, -200, 5, 6]) == 3
    with pytest.raises(ValueError):
        adapter.image_start([1, -200, 4, -200])


# -- against the official code (opt-in) -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    from parity.build import build

    work = tmp_path_factory.mktemp("parity-dart")
    return work, build(work, str(OFFICIAL_PY), seed=request.param)


@pytest.fixture(scope="module")
def our_run(built):
    """Our side once (fp32, T = 16, each image alone): both tests compare with it."""
    work, info = built
    return llava15.ours(info, "fp32", [_spec(info)], 8)


def _spec(info) -> dict:
    return {"name": "dart", "budget": 16, "batches": [[i] for i in range(len(info["images"]))]}


def _checks(built, our_run, clone: Path) -> list:
    work, info = built
    off = llava15.official(info, str(OFFICIAL_PY), "fp32", [_spec(info)], 8, work, str(clone))
    return llava15.compare(off, our_run, "fp32", 1e-5, 2)


@needs_official
@needs_clone
def test_dart_agrees_with_the_official_code(built, our_run):
    checks = _checks(built, our_run, CLONE)
    assert len(checks) == 4
    assert all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]
    for c in checks:
        ((stage, kept),) = c.data["official_kept"]
        assert stage == "llm1" and len(kept[0]) == 4 + 8 * (16 // 8)  # 4 visual pivots + 8 pivots x 2 picks


@needs_official
@needs_clone
def test_a_planted_change_in_the_official_selection_makes_the_kept_indices_differ(built, our_run, tmp_path):
    clone = tmp_path / "dart"
    shutil.copytree(CLONE / "llava", clone / "llava")
    path = clone / "llava" / "model" / "language_model" / "modeling_llama_self.py"
    line = "cos_sim = -torch.nn.functional.cosine_similarity("
    text = path.read_text()
    assert text.count(line) == 1
    path.write_text(text.replace(line, "cos_sim = torch.nn.functional.cosine_similarity("))  # the most similar
    checks = _checks(built, our_run, clone)
    assert any("kept indices per stage DIFFER" in c.detail for c in checks)
    assert all(dict(c.data["official_kept"])["llm1"] != dict(c.data["our_kept"])["llm1"] for c in checks)
