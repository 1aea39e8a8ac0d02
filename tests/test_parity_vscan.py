"""VScan against its authors' code (``Tencent/SelfEvolvingAgent``, folder ``VScan/``, parity/adapters/vscan.py): the
adapter's pure helpers everywhere; opt-in, the official code itself beside ours on the tiny weights (skipped without
``.venv-official`` or the clone ``.official/vscan``), and a planted change in a copy of the clone that must make the
kept indices differ."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import OFFICIAL_PY, needs_official

from parity import llava15
from parity.adapters import vscan as adapter
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

CLONE = llava15.CLONES / "vscan" / adapter.ROOT
needs_clone = pytest.mark.skipif(not (CLONE / "llava").is_dir(),
                                 reason="no clone of Tencent/SelfEvolvingAgent: run "
                                        "`bash scripts/official_clones.sh vscan`")


# -- without the official code --------------------------------------------------------------------------------------
def test_the_budget_split_and_options_are_our_methods():
    from baselines.vscan import VScan, split_budget

    for b in (8, 16, 32, 64):
        assert adapter.split(b) == split_budget(b)
    assert adapter.split(64) == (96, 32)  # the README's visual_token_num 96, image_token_list [32]
    method, options = adapter.ours(16)
    m = VScan(16, **options)
    m.setup(num_layers=4, num_vision_layers=8, family="llava")
    assert method == "vscan" and options["numerics"] == "official"
    assert m.llm_layers == (adapter.LAYER,) and m.vision_cls_layers == (adapter.LOCAL_LAYER + 1, 8 - 2 + 1)


def test_the_tiny_grid_is_laid_into_the_official_24_x_24_map():
    # window (i, j) of 4 x 4 patches -> the top-left corner of the official 12 x 12 window (i, j)
    assert [adapter.embed_index(p) for p in (0, 1, 3, 4, 8, 27, 36, 63)] == \
        [0, 1, 3, 12, 24, 3 * 24 + 3, 12 * 24 + 12, 15 * 24 + 15]
    cells = [adapter.embed_index(p) for p in range(64)]
    assert len(set(cells)) == 64
    # the row-major order inside each window is kept (the official topk sees the window's patches in our order)
    for i in range(2):
        for j in range(2):
            mine = [(4 * i + dy) * 8 + 4 * j + dx for dy in range(4) for dx in range(4)]
            assert [cells[p] for p in mine] == sorted(cells[p] for p in mine)


def test_the_local_quota_per_window_is_at_least_one_at_every_budget():
    # the official local scan fails with no pick per window (module doc): 2 x 2 windows here
    windows = (adapter.GRID // adapter.WINDOW) ** 2
    assert [int(adapter.split(b)[0] * 0.5) // windows for b in (8, 16, 32)] == [1, 3, 6]


# -- against the official code (opt-in) -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    from parity.build import build

    work = tmp_path_factory.mktemp("parity-vscan")
    return work, build(work, str(OFFICIAL_PY), seed=request.param)


def _spec() -> dict:
    return {"name": "vscan", "budget": 16, "batches": [[0], [1]], "padding_side": "right"}


@pytest.fixture(scope="module")
def our_run(built):
    """Our side once (fp32, B = 16, the square and the wide image alone): both tests compare with it."""
    work, info = built
    return llava15.ours(info, "fp32", [_spec()], 8)


def _checks(built, our_run, root: Path) -> list:
    work, info = built
    off = llava15.official(info, str(OFFICIAL_PY), "fp32", [_spec()], 8, work, str(root))
    return llava15.compare(off, our_run, "fp32", 1e-5, 2)


@needs_official
@needs_clone
def test_vscan_agrees_with_the_official_code(built, our_run):
    checks = _checks(built, our_run, CLONE)
    assert len(checks) == 2
    assert all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]
    t1, k1 = adapter.split(16)
    for c in checks:
        kept = dict(c.data["official_kept"])
        assert [s for s, _ in c.data["official_kept"]] == ["vision", "merge", "llm2"]
        assert len(kept["vision"][0]) <= t1 and len(kept["merge"][0]) == 64 - len(kept["vision"][0])
        assert len(kept["llm2"][0]) == k1


@needs_official
@needs_clone
def test_a_planted_change_in_the_official_global_scan_makes_the_kept_indices_differ(built, our_run, tmp_path):
    root = tmp_path / "vscan" / adapter.ROOT
    shutil.copytree(CLONE / "llava", root / "llava")
    path = root / "llava" / "model" / "llava_arch.py"
    line = "global_indices = torch.topk(image_attentions_deep, k="
    text = path.read_text()
    assert text.count(line) == 1
    path.write_text(text.replace(line, "global_indices = torch.topk(-image_attentions_deep, k="))  # the lowest
    checks = _checks(built, our_run, root)
    assert all("kept indices per stage DIFFER" in c.detail for c in checks)
    assert all(dict(c.data["official_kept"])["vision"] != dict(c.data["our_kept"])["vision"] for c in checks)
