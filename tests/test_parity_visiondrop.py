"""VisionDrop against its authors' code (``Ruixxxx/VisionDrop``, parity/adapters/visiondrop.py): the adapter's pure
helpers on worked values everywhere; opt-in, the official code itself beside ours on the tiny weights (skipped
without ``.venv-official`` or the clone ``.official/visiondrop``), and a planted change in a copy of the clone that
must make the kept indices differ."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import OFFICIAL_PY, needs_official

from llava.selection import Selection
from parity import llava15
from parity.adapters import visiondrop as adapter
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

CLONE = llava15.CLONES / "visiondrop"
needs_clone = pytest.mark.skipif(
    not (CLONE / "llava").is_dir(),
    reason="no clone of Ruixxxx/VisionDrop: run `bash scripts/official_clones.sh visiondrop`")


# -- without the official code --------------------------------------------------------------------------------------
def test_the_scripts_schedule_and_its_scaling_are_ours():
    from llava.ops import scale_layers
    from visiondrop.visiondrop import LAYERS_32, OFFICIAL_32, image_schedule

    assert adapter.schedule(32) == adapter.SCRIPTS_32 == OFFICIAL_32  # the eval scripts' 42+6, 30+5, 22+4, 16+3
    assert adapter.schedule(16) == ((21, 3), (15, 3), (11, 2), (8, 2))  # 2.5 and 1.5 round up
    assert adapter.schedule(8) == ((11, 2), (8, 1), (6, 1), (4, 1))
    for b in (8, 16, 32, 64, 128, 192):
        assert adapter.schedule(b) == image_schedule(b)
    assert adapter.layers(32) == [8, 16, 24] and adapter.layers(4) == [1, 2, 3]
    assert tuple(adapter.layers(4)) == scale_layers(LAYERS_32, 4) and tuple(adapter.layers(40)) == (10, 20, 30)
    with pytest.raises(ValueError):
        adapter.layers(2)
    # apply_info's hard-coded CLIP-L list marks layers[-2]; mapped to the same layer of a shorter tower
    assert adapter.tower_r(24) == [0] * 22 + [1] + [0] and adapter.tower_r(8) == [0, 0, 0, 0, 0, 0, 1, 0]


def test_our_recorded_rows_follow_the_official_layout():
    # candidates: patches 0..5, then the [CLS] candidate (patch -1); token index = patch + 1
    token = torch.tensor([0, 1, 2, 3, 4, 5, -1]) + 1
    sel = Selection(keep=torch.tensor([6, 1, 4]), targets=torch.tensor([0, 3]),
                    assign=torch.tensor([-1, -1, 1, -1, -1, 0, -1]))
    keep, targets, slots = adapter._rows(sel, token)
    assert keep.tolist() == [0, 2, 5] and targets.tolist() == [1, 4] and slots.tolist() == [1, 0]
    keep, targets, slots = adapter._rows(Selection(keep=torch.tensor([2, 0])), torch.arange(3))
    assert keep.tolist() == [0, 2] and targets is None and slots is None


# -- against the official code (opt-in) -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    from parity.build import build

    work = tmp_path_factory.mktemp("parity-visiondrop")
    return work, build(work, str(OFFICIAL_PY), seed=request.param)


def _run(info, work, clone: Path, budget: int, batches) -> list:
    spec = {"name": "visiondrop", "budget": budget, "batches": batches, **adapter.OFFICIAL}
    off = llava15.official(info, str(OFFICIAL_PY), "fp32", [spec], 8, work, str(clone))
    return llava15.compare(off, llava15.ours(info, "fp32", [spec], 8), "fp32", 1e-5, 2)


STAGES = [s + x for s in ("vision", "llm1", "llm2", "llm3") for x in ("", "_targets", "_assign")]


@needs_official
@needs_clone
def test_visiondrop_agrees_with_the_official_code_at_every_stage(built):
    work, info = built
    checks = _run(info, work, CLONE, 16, [[i] for i in range(len(info["images"]))])
    assert len(checks) == len(info["images"])
    assert all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]
    for c in checks:
        assert [s for s, _ in c.data["official_kept"]] == STAGES
        counts = {s: len(k[0]) for s, k in c.data["official_kept"]}
        assert [counts[s] for s in ("vision", "vision_targets", "llm1", "llm2", "llm3")] == [21, 3, 15, 11, 8]


@needs_official
@needs_clone
def test_a_planted_change_in_the_official_llm_stage_makes_the_kept_indices_differ(built, tmp_path):
    work, info = built
    clone = tmp_path / "visiondrop"
    shutil.copytree(CLONE / "llava", clone / "llava")
    path = clone / "llava" / "model" / "modeling_llama_visiondrop.py"
    line = "topk_indices = attention_avg_image.topk(dominant_num[i]).indices"
    text = path.read_text()
    assert text.count(line) == 1
    path.write_text(text.replace(line, "topk_indices = (-attention_avg_image).topk(dominant_num[i]).indices"))
    (check,) = _run(info, work, clone, 16, [[0]])
    assert not check.ok and "kept indices per stage DIFFER" in check.detail
    off, ours = dict(check.data["official_kept"]), dict(check.data["our_kept"])
    assert all(off[s] == ours[s] for s in ("vision", "vision_targets", "vision_assign"))  # the tower is untouched
    assert off["llm1"] != ours["llm1"]
