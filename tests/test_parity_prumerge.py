"""PruMerge+ against its official repository (42Shawn/LLaVA-PruMerge, LLaVA 1.1.3): parity/adapters/prumerge.py.

Plain tests (everywhere): the adapter's source rewrite of the two CLIP-L/336 literals, our options per precision.
Opt-in (``.venv-official`` with matplotlib, which the clone's ``clip_encoder.py`` imports, and the clone
``.official/prumerge``; the worker runs the adapter's ``before_import`` before ``import llava``, for LLaVA 1.1.3's
``AutoConfig.register("llava", ...)``): fp32, every check identical; a planted change in a copy of the clone's
``token_prune_merge_advanced_plus`` (the grid's stride doubled) makes the kept indices differ. Our side runs
``options["budget"]`` (None: PruMerge's count is adaptive, ``rt.prune`` refuses a budget) instead of the harness's T.
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
CLONE = REPO / ".official" / "prumerge"
PY = Path(os.environ.get("VTPRUNE_PARITY_PYTHON", OFFICIAL_PY))
ad = adapters.get("prumerge")


def test_rewrite_replaces_the_two_geometry_literals_once_each():
    src = ("h = self.vision_tower.vision_model.encoder.layers[23].self_attn.k_proj.register_forward_hook(hook_k)\n"
           "h = self.vision_tower.vision_model.encoder.layers[23].self_attn.q_proj.register_forward_hook(hook_q)\n"
           "seq = torch.arange(0, 575, int(step_length/3)).to(device=self.device)\n"
           "other = torch.arange(int(step_length/2), 575, int(step_length))\n")
    out = ad.rewrite(ad.rewrite(src, ad.LAYER_LITERAL, "encoder.layers[7]", 2), ad.GRID_LITERAL, "torch.arange(0, 63, ")
    assert out.count("encoder.layers[7].self_attn") == 2 and "torch.arange(0, 63, int(step_length/3))" in out
    assert "torch.arange(int(step_length/2), 575, int(step_length))" in out  # the training branch is left alone
    with pytest.raises(RuntimeError, match="found 4"):
        ad.rewrite(src + src, ad.LAYER_LITERAL, "x", 2)
    with pytest.raises(RuntimeError, match="found 2"):
        ad.rewrite(src + src, ad.GRID_LITERAL, "x")


def test_our_options_per_precision():
    # adaptive: no budget on our side; fp16 = the fork's fp16 tower and arithmetic (reference mode)
    assert ad.ours(16, "fp16") == ("prumerge", {"budget": None, "variant": "plus", "budget_mode": "adaptive",
                                                "numerics": "official", "empty_global": "zero"})
    assert ad.ours(16)[1]["numerics"] == "ours"
    assert ad.ours(16)[1]["empty_global"] == "zero"  # the official zero g when every patch is kept, fp32 too
    assert ad.OURS_LOAD == {"fp16": {"vision_dtype": None}}


def _usable() -> str | None:
    if not CLONE.is_dir():
        return "no clone: run `bash scripts/official_clones.sh prumerge`"
    if not PY.exists():
        return f"no official Python at {PY}"
    load = ("import importlib.util as u, sys; s = u.spec_from_file_location('a', sys.argv[1]); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); m.before_import(); ")
    code = f"import sys; sys.path.insert(0, {str(CLONE)!r}); import llava"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    path = str(adapters.path("prumerge"))
    proc = subprocess.run([str(PY), "-c", load + code, path], capture_output=True, text=True, env=env, cwd="/")
    if proc.returncode:
        return (f"{PY} cannot import the clone's llava after the adapter's before_import (the clone's "
                f"clip_encoder.py imports matplotlib): {proc.stderr.strip().splitlines()[-1]}")
    return None


@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    why = _usable()
    if why:
        pytest.skip(why)
    from parity.build import build

    work = tmp_path_factory.mktemp("parity-prumerge")
    return work, build(work, str(PY), seed=request.param)


def _run(info, work, clone):
    return llava15.run(info, str(PY), work, dtypes=("fp32",), budgets=(16,), methods=("prumerge",),
                       official_path=str(clone))


@needs_official
def test_prumerge_agrees_with_the_official_code_fp32(built):
    work, info = built
    checks = _run(info, work, CLONE)
    bad = [(c.case, c.detail) for c in checks if not c.ok]
    assert not bad, bad
    cut = [c for c in checks if c.group == "prumerge"]
    assert len(cut) == 4  # each image alone (the official grid filter cannot batch)
    assert all([s for s, _ in c.data["official_kept"]] == ["vision"] for c in cut)


@needs_official
def test_a_planted_change_in_the_official_prumerge_makes_parity_fail(built, tmp_path):
    work, info = built
    root = tmp_path / "clone"
    shutil.copytree(CLONE / "llava", root / "llava")
    enc = root / "llava" / "model" / "multimodal_encoder" / "clip_encoder.py"
    text = enc.read_text()
    line = "arithmetic_sequence = torch.arange(0, 575, int(step_length/3))"
    assert text.count(line) == 1
    enc.write_text(text.replace(line, "arithmetic_sequence = torch.arange(0, 575, 2 * int(step_length/3))"))
    checks = _run(info, work, root)
    assert all(c.ok for c in checks if c.group != "prumerge")
    cut = [c for c in checks if c.group == "prumerge"]
    assert any("kept indices per stage DIFFER" in c.detail for c in cut)
