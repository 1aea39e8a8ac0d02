"""OTPrune against its authors' code (``xiwenc1/OTPrune``'s vendored LLaVA, parity/adapters/otprune.py): the adapter's
helpers everywhere; opt-in, the official code itself beside ours on the tiny weights (skipped without
``.venv-official`` or the clone ``.official/otprune``), and planted changes in a copy of the clone (row instead of
column normalisation; the kept tokens sorted instead of in set order) that must make the kept indices differ."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import OFFICIAL_PY, needs_official

from parity import llava15
from parity.adapters import otprune as adapter
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

CLONE = llava15.CLONES / "otprune"
ROOT = CLONE / adapter.ROOT
ARCH = Path("llava") / "model" / "llava_arch.py"
needs_clone = pytest.mark.skipif(not (ROOT / ARCH).is_file(),
                                 reason="no clone of xiwenc1/OTPrune: run `bash scripts/official_clones.sh otprune`")


# -- without the official code --------------------------------------------------------------------------------------
def test_the_adapter_runs_our_reference_mode_in_the_official_order():
    assert adapter.ours(16) == ("otprune", {"numerics": "official", "order": "official"})
    assert adapter.OFFICIAL == {"alone": True} and adapter.ROOT == "LLaVA"
    src = "x = 1\n            SYS_TOKEN_LEN = 35 \n            y = SYS_TOKEN_LEN\n"
    out = adapter.rewrite(src, adapter.SYS_TOKEN_LITERAL, adapter.SYS_TOKEN_REPLACEMENT)
    assert "SYS_TOKEN_LEN = self.config.parity_sys_token_len \n" in out and "35" not in out
    with pytest.raises(RuntimeError, match="expected one"):
        adapter.rewrite(src + src, adapter.SYS_TOKEN_LITERAL, adapter.SYS_TOKEN_REPLACEMENT)


def test_recompile_keeps_column_zero_comments_inside_the_method(tmp_path, monkeypatch):
    """The official method holds commented-out lines at column 0 (textwrap.dedent would find no margin); the
    recompiled method still compiles and runs with the literal replaced."""
    import importlib

    (tmp_path / "otprune_probe_mod.py").write_text(
        "class C:\n    def f(self):\n        a = 35\n#        a = 0\n        return a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("otprune_probe_mod")
    assert mod.C().f() == 35
    assert adapter.recompile(mod.C, "f", r"a = 35\b", "a = 7")(None) == 7


# -- against the official code (opt-in) -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    from parity.build import build

    work = tmp_path_factory.mktemp("parity-otprune")
    return work, build(work, str(OFFICIAL_PY), seed=request.param)


def _spec(info, budget=16) -> dict:
    return {"name": "otprune", "budget": budget, "batches": [[i] for i in range(len(info["images"]))]}


@pytest.fixture(scope="module")
def our_run(built):
    """Our side once (fp32, T = 16, each image alone)."""
    work, info = built
    return llava15.ours(info, "fp32", [_spec(info)], 8)


def _checks(built, our_run, root: Path, dtype: str = "fp32") -> list:
    work, info = built
    off = llava15.official(info, str(OFFICIAL_PY), dtype, [_spec(info)], 8, work, str(root))
    return llava15.compare(off, our_run, dtype, 1e-5, 2)


def _planted(tmp_path, line: str, new: str) -> Path:
    root = tmp_path / "otprune"
    shutil.copytree(ROOT / "llava", root / "llava")
    path = root / ARCH
    text = path.read_text()
    assert text.count(line) == 1
    path.write_text(text.replace(line, new))
    return root


@needs_official
@needs_clone
def test_otprune_agrees_with_the_official_code(built, our_run):
    """fp32: the kept indices in the official (set) order, the logits (1e-5) and the greedy tokens."""
    checks = _checks(built, our_run, ROOT)
    assert len(checks) == 4
    assert all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]
    for c in checks:
        ((stage, kept),) = c.data["official_kept"]
        assert stage == "vision" and len(kept[0]) == 16
    assert any(kept[0] != sorted(kept[0]) for c in checks for _, kept in c.data["official_kept"])  # not ascending


@needs_official
@needs_clone
def test_fp16_agrees(built):
    work, info = built
    checks = _checks(built, llava15.ours(info, "fp16", [_spec(info)], 8), ROOT, "fp16")
    assert len(checks) == 4 and all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]


@needs_official
@needs_clone
def test_a_planted_row_normalisation_makes_the_kept_indices_differ(built, our_run, tmp_path):
    line = "visual_feature_vectors = visual_feature_vectors / visual_feature_vectors.norm(dim=-2, keepdim=True)"
    root = _planted(tmp_path, line, line.replace("dim=-2", "dim=-1"))  # per token, not per channel
    checks = _checks(built, our_run, root)
    assert any("kept indices per stage DIFFER" in c.detail for c in checks)


@needs_official
@needs_clone
def test_a_planted_sort_of_the_kept_tokens_makes_them_differ(built, our_run, tmp_path):
    line = "selected_items = torch.tensor(list(set(selected_items))"
    root = _planted(tmp_path, line, "selected_items = torch.tensor(sorted(set(selected_items))")
    checks = _checks(built, our_run, root)
    assert any("kept indices per stage DIFFER" in c.detail for c in checks)
