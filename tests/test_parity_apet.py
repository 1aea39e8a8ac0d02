"""ApET against its authors' code (``MaQianKun0/ApET``, parity/adapters/apet.py): the adapter's pure helpers
everywhere; opt-in, the official code itself beside ours on the tiny weights in the official fp16 load (its
``encode_images`` hard-casts to fp16, so an fp32 model cannot run it; skipped without ``.venv-official`` or the clone
``.official/apet``), and a planted change in a copy of the clone that must make the kept indices differ.

The official ``llava/model/llava_arch.py`` imports ``matplotlib`` (unused); where ``.venv-official`` has no
matplotlib, the official runs here go through a copy of the clone's ``llava/`` beside empty ``matplotlib`` modules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import OFFICIAL_PY, needs_official

from parity import llava15
from parity.adapters import apet as adapter
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

CLONE = llava15.CLONES / "apet"
needs_clone = pytest.mark.skipif(not (CLONE / "llava").is_dir(),
                                 reason="no clone of MaQianKun0/ApET: run `bash scripts/official_clones.sh apet`")


# -- without the official code --------------------------------------------------------------------------------------
def test_the_budget_split_and_options_are_our_methods():
    from baselines.apet import ApET, basis_count, split_budget

    for b in (8, 16, 32, 64):
        assert adapter.split(b) == split_budget(b)
        # the official stage 2 needs k < K1 (errors_indices[:-k] not empty); ours would cap k there
        assert basis_count(adapter.BASIS, adapter.split(b)[1]) == adapter.BASIS < adapter.split(b)[1]
    method, options = adapter.ours(16)
    m = ApET(16, **options)
    m.setup(num_layers=4, num_vision_layers=8, family="llava")
    assert method == "apet" and options["numerics"] == "official" and m.llm_layers == (adapter.LAYER,)
    assert m._merge_seeds and m._slots == "replace" and m._space == "vision"  # the official image code


def test_the_recorded_entries_of_one_stage():
    # 8 tokens, E = [5, 1, 6, 2] in error order, k = 2: targets [5, 1], tail {2, 6}; outside E: 0, 3, 4, 7
    e = torch.tensor([[5, 1, 6, 2]])
    near = torch.tensor([[1, 0, 0, 1]])
    got = dict(adapter._entries("1", torch.tensor([[3, 0]]), e, near, 8, 2))
    assert got["basis1"].tolist() == [[3, 0]] and got["targets1"].tolist() == [[5, 1]]
    assert got["tail1"].tolist() == [[2, 6]] and got["vision"].tolist() == [[1, 2, 5, 6]]
    assert got["merge1"].tolist() == [[1, 5, 5, 1]]
    assert [s for s, _ in adapter._entries("2", torch.tensor([[3, 0]]), e, near, 8, 2)] == \
        ["basis2", "targets2", "tail2", "llm2", "merge2"]


# -- against the official code (opt-in) -----------------------------------------------------------------------------
def _official_root(tmp: Path, plant: str | None = None) -> Path:
    """The clone, or (no matplotlib in .venv-official, or a planted change) a copy of its llava/ beside empty
    matplotlib modules (the official llava_arch.py imports matplotlib.pyplot / .colors and never uses them)."""
    has_mpl = subprocess.run([str(OFFICIAL_PY), "-c", "import matplotlib"], capture_output=True).returncode == 0
    if has_mpl and plant is None:
        return CLONE
    root = tmp / "apet"
    shutil.copytree(CLONE / "llava", root / "llava")
    if not has_mpl:
        (root / "matplotlib").mkdir()
        for name in ("__init__.py", "pyplot.py", "colors.py"):
            (root / "matplotlib" / name).write_text("")
    if plant is not None:
        old, new = plant
        path = root / "llava" / "model" / "llava_arch.py"
        text = path.read_text()
        assert text.count(old) == 1
        path.write_text(text.replace(old, new))
    return root


@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    from parity.build import build

    work = tmp_path_factory.mktemp("parity-apet")
    return work, build(work, str(OFFICIAL_PY), seed=request.param)


def _spec() -> dict:
    return {"name": "apet", "budget": 16, "batches": [[0], [1]], "padding_side": "right"}


@pytest.fixture(scope="module")
def our_run(built):
    """Our side once (the official fp16 load, B = 16, the square and the wide image alone)."""
    work, info = built
    return llava15.ours(info, "fp16", [_spec()], 8)


def _checks(built, our_run, root: Path) -> list:
    work, info = built
    off = llava15.official(info, str(OFFICIAL_PY), "fp16", [_spec()], 8, work, str(root))
    return llava15.compare(off, our_run, "fp16", None, 2)


@needs_official
@needs_clone
def test_apet_agrees_with_the_official_code(built, our_run, tmp_path):
    checks = _checks(built, our_run, _official_root(tmp_path))
    assert len(checks) == 2
    assert all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]
    t1, k1 = adapter.split(16)
    for c in checks:
        kept = dict(c.data["official_kept"])
        assert [s for s, _ in c.data["official_kept"]] == ["basis1", "targets1", "tail1", "vision", "merge1",
                                                            "basis2", "targets2", "tail2", "llm2", "merge2"]
        assert len(kept["vision"][0]) == t1 and len(kept["llm2"][0]) == k1
        assert kept["basis1"][0][0] == adapter.DRAWS[0] % 64 and kept["basis2"][0][0] == adapter.DRAWS[1] % t1


@needs_official
@needs_clone
def test_a_planted_change_in_the_official_ranking_makes_the_kept_indices_differ(built, our_run, tmp_path):
    # the tokens the basis reconstructs best instead of worst
    root = _official_root(tmp_path, ("errors_indices = torch.topk(errors, k=visual_token_num, dim=1)[1]",
                                     "errors_indices = torch.topk(-errors, k=visual_token_num, dim=1)[1]"))
    checks = _checks(built, our_run, root)
    assert all("kept indices per stage DIFFER" in c.detail for c in checks)
    assert all(dict(c.data["official_kept"])["vision"] != dict(c.data["our_kept"])["vision"] for c in checks)
