"""FasterVLM's parity adapter (parity/adapters/fastervlm.py) against the official code itself: a clone of
Theia-4869/FasterVLM (``bash scripts/official_clones.sh fastervlm``) run in ``.venv-official`` beside our
``fastervlm`` in its reference mode, on the tiny weights of ``parity.build``. Opt-in: skipped without
``.venv-official`` or the clone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import OFFICIAL_PY, needs_official

from parity import llava15
from parity.adapters import _theia_forks
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

REPO = Path(__file__).resolve().parents[1]
CLONE = REPO / ".official" / "fastervlm"
needs_clone = pytest.mark.skipif(not (CLONE / "llava").is_dir(),
                                 reason="no clone: run `bash scripts/official_clones.sh fastervlm`")


def test_mask_indices_pads_a_short_row():
    masks = torch.tensor([[True, False, True, True], [False, True, False, False]])
    assert _theia_forks.mask_indices(masks).tolist() == [[0, 2, 3], [1, -1, -1]]


@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    from parity.build import build

    work = tmp_path_factory.mktemp("parity")
    return work, build(work, str(OFFICIAL_PY), seed=request.param)


def _run(built, clones: Path):
    work, info = built
    return llava15.run(info, str(OFFICIAL_PY), work, dtypes=("fp32",), budgets=(16,), methods=("fastervlm",),
                       clones=clones)


@needs_official
@needs_clone
def test_fastervlm_agrees_with_the_official_code(built):
    checks = _run(built, CLONE.parent)
    bad = [(c.case, c.detail) for c in checks if not c.ok]
    assert not bad, bad
    pruned = [c for c in checks if c.group == "fastervlm"]
    assert len(pruned) == 5  # each image alone and the batch of four
    assert all([s for s, _ in c.data["official_kept"]] == ["vision"] for c in pruned)
    assert all(len(k) == 16 for c in pruned for k in c.data["official_kept"][0][1])


@needs_official
@needs_clone
def test_a_planted_change_in_the_official_fastervlm_makes_parity_fail(built, tmp_path):
    """The clone copied, its head mean of the [CLS] attention replaced by the max over heads: the kept patches
    differ."""
    clones = tmp_path / "clones"
    shutil.copytree(CLONE / "llava", clones / "fastervlm" / "llava")
    arch = clones / "fastervlm" / "llava" / "model" / "llava_arch.py"
    text = arch.read_text()
    line = "image_attentions = image_attentions.mean(dim=1) # (B, N)"
    assert text.count(line) == 1
    arch.write_text(text.replace(line, "image_attentions = image_attentions.amax(dim=1) # (B, N)"))
    checks = _run(built, clones)
    assert all(c.ok for c in checks if c.group != "fastervlm")
    assert any("kept indices per stage DIFFER" in c.detail for c in checks if c.group == "fastervlm")
