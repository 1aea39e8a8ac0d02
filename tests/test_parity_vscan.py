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
    # the 8 x 8 map in the top-left corner: window (i, j) of 4 x 4 patches = the official 4 x 4 window (i, j)
    assert [adapter.embed_index(p) for p in (0, 1, 3, 4, 8, 27, 36, 63)] == \
        [0, 1, 3, 4, 24, 3 * 24 + 3, 4 * 24 + 4, 7 * 24 + 7]
    cells = [adapter.embed_index(p) for p in range(64)]
    assert len(set(cells)) == 64
    # the row-major order inside each window is kept (the official topk sees the window's patches in our order)
    for i in range(2):
        for j in range(2):
            mine = [(4 * i + dy) * 8 + 4 * j + dx for dy in range(4) for dx in range(4)]
            assert [cells[p] for p in mine] == sorted(cells[p] for p in mine)


def test_the_official_window_call_ranks_our_16_patch_windows():
    # seed 3, fp16, B = 16, the third image: one tiny window's layer-5 fp16 head means, patches 22 and 23 tied for
    # its third pick (k = 3). CPU torch.topk breaks the tie by the vector's length: the 16 patches alone (ours) keep
    # 23; the same window in the corner of a 12 x 12 official window of -inf (the adapter until 2026-11-26) kept 22.
    # The adapter now calls the official function with 4 x 4 windows: the official loop (transcribed below) ranks
    # the same 16 entries, and keeps 23 as ours.
    import torch

    row = torch.tensor([0.012908935546875, 0.0023288726806640625, 0.059051513671875, 0.0007166862487792969,
                        0.00392913818359375, 0.0014247894287109375, 0.00827789306640625, 0.00020074844360351562,
                        0.00243377685546875, 0.027587890625, 0.017669677734375, 0.017669677734375,
                        0.002101898193359375, 0.01076507568359375, 0.0012044906616210938, 0.0020542144775390625],
                       dtype=torch.float16)  # window (0, 1): patches 4-7, 12-15, 20-23, 28-31
    patches = [y * 8 + x for y in range(4) for x in range(4, 8)]
    assert row[10] == row[11] and (patches[10], patches[11]) == (22, 23)
    ours = [patches[i] for i in torch.topk(row[None], 3, dim=1)[1][0].tolist()]  # llava/ops/vscan.py's row call
    assert ours == [6, 21, 23]
    tiny = torch.full((8, 8), float("-inf"), dtype=torch.float16)
    tiny.view(-1)[patches] = row
    big = torch.full((24 * 24,), float("-inf"), dtype=torch.float16)
    big[[adapter.embed_index(p) for p in range(64)]] = tiny.view(-1)
    amap, w = big.view(24, 24), adapter.WINDOW
    # window_cls_selection's loop on window (0, 1) of side 4: window.reshape(-1), torch.topk(window_flat, k)
    flat = amap[0:w, w:2 * w].reshape(-1)
    picked = [(dy * 8) + w + dx for dy, dx in (divmod(i, w) for i in torch.topk(flat, 3)[1].tolist())]
    assert picked == ours
    # the old embedding: the window in the corner of a 12 x 12 one, 128 entries -inf
    old = torch.full((12, 12), float("-inf"), dtype=torch.float16)
    old[:4, :4] = row.view(4, 4)
    assert [patches[(i // 12) * 4 + i % 12] for i in torch.topk(old.reshape(-1), 3)[1].tolist()] == [6, 21, 22]


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
