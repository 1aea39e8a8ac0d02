"""DivPrune against its official repository (vbdi/divprune, LLaVA under ``LLaVA/``): parity/adapters/divprune.py.

Plain tests (everywhere): the adapter's source rewrite and budget arithmetic on worked values. Opt-in
(``.venv-official`` and the clone ``.official/divprune``; the clone's ``clip_encoder.py`` imports matplotlib, which
the official Python must hold): fp32 at T = 16 and 32, every check identical, on the shared builds and seed 11's
(where the fp16 cast of the reference mode parted at T = 32, image 1, before its distances followed the model's
dtype; docs/parity.md); a planted change in a copy of the clone's ``DivPrune`` (the first pick taken from the
diagonal) makes the kept indices differ.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import OFFICIAL_PY, needs_official

from parity import adapters, llava15
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

REPO = Path(__file__).resolve().parents[1]
CLONE = REPO / ".official" / "divprune"
#: the official Python (``VTPRUNE_PARITY_PYTHON`` names another, e.g. one that adds matplotlib)
PY = Path(os.environ.get("VTPRUNE_PARITY_PYTHON", OFFICIAL_PY))
ad = adapters.get("divprune")
#: the shared builds and seed 11's (fp32, T = 32, image 1: official patch 21, ours 5 with the always-fp16 cast)
SEEDS = (*PARITY_SEEDS, 11)
SEED_IDS = (*PARITY_SEED_IDS, "seed11")


def test_rewrite_replaces_the_one_literal_and_refuses_otherwise():
    src = "    x = 1\n    SYS_TOKEN_LEN = 35 \n    SYS_TOKEN_LEN2 = 350\n"
    assert ad.rewrite(src, ad.SYS_TOKEN_LITERAL, ad.SYS_TOKEN_REPLACEMENT) == \
        "    x = 1\n    SYS_TOKEN_LEN = self.config.parity_sys_token_len \n    SYS_TOKEN_LEN2 = 350\n"
    with pytest.raises(RuntimeError, match="found 0"):
        ad.rewrite("SYS_TOKEN_LEN = 36", ad.SYS_TOKEN_LITERAL, "x")
    with pytest.raises(RuntimeError, match="found 2"):
        ad.rewrite("SYS_TOKEN_LEN = 35\nSYS_TOKEN_LEN = 35", ad.SYS_TOKEN_LITERAL, "x")


@pytest.mark.parametrize("budget", [1, 8, 16, 32, 63, 64])
def test_the_budget_as_the_official_ratio_gives_back_the_budget(budget):
    # enable() sets SUBSET_RATIO = repr(T / N); the official DivPrune picks int(round(ratio * N))
    assert int(round(float(repr(budget / 64)) * 64)) == budget
    assert ad.ours(budget) == ("divprune", {"numerics": "official"})


def _usable() -> str | None:
    if not CLONE.is_dir():
        return "no clone: run `bash scripts/official_clones.sh divprune`"
    if not PY.exists():
        return f"no official Python at {PY}"
    ok = subprocess.run([str(PY), "-c", "import matplotlib"], capture_output=True).returncode == 0
    return None if ok else (f"{PY} has no matplotlib (the clone's clip_encoder.py imports it): add it to "
                            "scripts/official_env.sh or set VTPRUNE_PARITY_PYTHON")


@pytest.fixture(scope="module", params=SEEDS, ids=SEED_IDS)
def built(request, tmp_path_factory):
    why = _usable()
    if why:
        pytest.skip(why)
    from parity.build import build

    work = tmp_path_factory.mktemp("parity-divprune")
    return work, build(work, str(PY), seed=request.param)


@needs_official
def test_divprune_agrees_with_the_official_code_fp32(built):
    work, info = built
    checks = llava15.run(info, str(PY), work, dtypes=("fp32",), budgets=(16, 32), methods=("divprune",),
                         official_path=str(CLONE))
    bad = [(c.case, c.detail) for c in checks if not c.ok]
    assert not bad, bad
    cut = [c for c in checks if c.group == "divprune"]
    assert len(cut) == 8  # each image alone (the official block prunes sample 0's span only), two budgets
    assert all([s for s, _ in c.data["official_kept"]] == ["vision"] for c in cut)
    assert sorted(len(c.data["official_kept"][0][1][0]) for c in cut) == [16] * 4 + [32] * 4


@needs_official
def test_a_planted_change_in_the_official_divprune_makes_parity_fail(built, tmp_path):
    work, info = built
    root = tmp_path / "clone"
    shutil.copytree(CLONE / "LLaVA" / "llava", root / "LLaVA" / "llava")
    arch = root / "LLaVA" / "llava" / "model" / "llava_arch.py"
    text = arch.read_text()
    line = "scores = torch.topk(m2, 2,dim=0,largest=False).values[1,:]"
    assert text.count(line) == 1
    arch.write_text(text.replace(line, "scores = torch.topk(m2, 2,dim=0,largest=False).values[0,:]"))
    checks = llava15.run(info, str(PY), work, dtypes=("fp32",), budgets=(16,), methods=("divprune",),
                         official_path=str(root))
    assert all(c.ok for c in checks if c.group != "divprune")
    cut = [c for c in checks if c.group == "divprune"]
    assert any("kept indices per stage DIFFER" in c.detail for c in cut)
