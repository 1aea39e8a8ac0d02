"""VisPruner's parity adapter (parity/adapters/vispruner.py) against the official code itself: a clone of
Theia-4869/VisPruner (``bash scripts/official_clones.sh vispruner``) run in ``.venv-official`` beside our
``vispruner`` in its reference mode, on the tiny weights of ``parity.build``. Opt-in: skipped without
``.venv-official`` or the clone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import OFFICIAL_PY, needs_official

from parity import llava15
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

REPO = Path(__file__).resolve().parents[1]
CLONE = REPO / ".official" / "vispruner"
needs_clone = pytest.mark.skipif(not (CLONE / "llava").is_dir(),
                                 reason="no clone: run `bash scripts/official_clones.sh vispruner`")


@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    from parity.build import build

    work = tmp_path_factory.mktemp("parity")
    return work, build(work, str(OFFICIAL_PY), seed=request.param)


def _run(built, clones: Path):
    work, info = built
    return llava15.run(info, str(OFFICIAL_PY), work, dtypes=("fp32",), budgets=(16,), methods=("vispruner",),
                       clones=clones)


@needs_official
@needs_clone
def test_vispruner_agrees_with_the_official_code(built):
    checks = _run(built, CLONE.parent)
    bad = [(c.case, c.detail) for c in checks if not c.ok]
    assert not bad, bad
    pruned = [c for c in checks if c.group == "vispruner"]
    assert len(pruned) == 4  # each image alone (the fork cannot run a batch: the adapter's OFFICIAL)
    assert all([s for s, _ in c.data["official_kept"]] == ["vision"] for c in pruned)
    assert all(len(k) == 16 for c in pruned for k in c.data["official_kept"][0][1])


@needs_official
@needs_clone
def test_a_planted_change_in_the_official_vispruner_makes_parity_fail(built, tmp_path):
    """The clone copied, its duplicate-removal round keeping A's MOST similar tokens (ascending argsort): the kept
    patches differ."""
    clones = tmp_path / "clones"
    shutil.copytree(CLONE / "llava", clones / "vispruner" / "llava")
    arch = clones / "vispruner" / "llava" / "model" / "llava_arch.py"
    text = arch.read_text()
    line = "distinct_indices = scores.argsort(dim=-1, descending=True)[:, r:]"
    assert text.count(line) == 1
    arch.write_text(text.replace(line, "distinct_indices = scores.argsort(dim=-1, descending=False)[:, r:]"))
    checks = _run(built, clones)
    assert all(c.ok for c in checks if c.group != "vispruner")
    assert any("kept indices per stage DIFFER" in c.detail for c in checks if c.group == "vispruner")
