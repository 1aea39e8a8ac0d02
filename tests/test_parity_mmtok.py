"""MMTok against its authors' code (``Ironieser/MMTok``'s ``mmtok`` package injected into the official LLaVA,
parity/adapters/mmtok.py): the adapter's helpers everywhere; opt-in, the official code itself beside ours on the tiny
weights (skipped without ``.venv-official`` or the clone ``.official/mmtok``), a planted change in a copy of the
clone that must make the kept indices differ, and our side without the official text route, which must differ too
(the keyword string re-tokenised is what makes the two agree, not a coincidence of the greedy)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import OFFICIAL_PY, needs_official

from parity import llava15
from parity.adapters import mmtok as adapter
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

CLONE = llava15.CLONES / "mmtok"
needs_clone = pytest.mark.skipif(not (CLONE / "mmtok" / "core").is_dir(),
                                 reason="no clone of Ironieser/MMTok: run `bash scripts/official_clones.sh mmtok`")


# -- without the official code --------------------------------------------------------------------------------------
def test_our_side_is_the_reference_mode_with_the_official_text_route():
    method, options = adapter.ours(16)
    assert method == "mmtok" and "budget" not in options  # T per image, the harness's budget
    assert (options["numerics"], options["text"]) == ("official", "keywords_retokenized")
    _, with_info = adapter.ours(16, "fp16", {"hf": "/built/llava-1.5-tiny-hf"})
    assert with_info["llm_tokenizer"] == with_info["embed_tokens"] == "/built/llava-1.5-tiny-hf"
    assert adapter.OFFICIAL == {"alone": True} and adapter.OURS_LOAD == {"fp16": {"vision_dtype": None}}
    assert adapter.PACKAGES == ("mmtok",) and not adapter.INSTALLED and not hasattr(adapter, "ROOT")


# -- against the official code (opt-in) -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    from parity.build import build

    work = tmp_path_factory.mktemp("parity-mmtok")
    return work, build(work, str(OFFICIAL_PY), seed=request.param)


def _spec(info, budget=16) -> dict:
    return {"name": "mmtok", "budget": budget, "batches": [[i] for i in range(len(info["images"]))]}


@pytest.fixture(scope="module")
def our_run(built):
    """Our side once (fp32, T = 16, each image alone)."""
    work, info = built
    return llava15.ours(info, "fp32", [_spec(info)], 8)


def _checks(built, our_run, root: Path, dtype: str = "fp32", budget: int = 16) -> list:
    work, info = built
    off = llava15.official(info, str(OFFICIAL_PY), dtype, [_spec(info, budget)], 8, work, str(root))
    return llava15.compare(off, our_run, dtype, 1e-5, 2)


@needs_official
@needs_clone
def test_mmtok_agrees_with_the_official_code(built, our_run):
    """fp32, T = 16 (the official Python loop): the kept indices, the logits (1e-5) and the greedy tokens."""
    checks = _checks(built, our_run, CLONE)
    assert len(checks) == 4
    assert all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]
    for c in checks:
        ((stage, kept),) = c.data["official_kept"]
        assert stage == "vision" and len(kept[0]) == 16


@needs_official
@needs_clone
def test_fp16_and_the_jit_kernel_agree_bit_for_bit(built):
    """fp16 with T = 32 (>= 20: the official TorchScript kernel): kept indices and logits bit-identical."""
    work, info = built
    checks = _checks(built, llava15.ours(info, "fp16", [_spec(info, 32)], 8), CLONE, "fp16", 32)
    assert len(checks) == 4 and all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]
    assert all("logits max abs diff 0.00e+00" in c.detail for c in checks), [c.detail for c in checks]


@needs_official
@needs_clone
def test_a_planted_change_in_the_official_coverage_makes_the_kept_indices_differ(built, our_run, tmp_path):
    root = tmp_path / "mmtok"
    shutil.copytree(CLONE / "mmtok", root / "mmtok")
    path = root / "mmtok" / "core" / "semantic_selector.py"
    line = "Q_weighted = Q * alpha"
    text = path.read_text()
    assert text.count(line) == 1
    path.write_text(text.replace(line, "Q_weighted = Q * (4 * alpha)"))  # vision coverage over-weighted
    checks = _checks(built, our_run, root)
    assert any("kept indices per stage DIFFER" in c.detail for c in checks)


@needs_official
@needs_clone
def test_our_question_rows_instead_of_the_keyword_route_differ(built, monkeypatch):
    """Ours with ``text="question"`` (every question token of the prompt) against the official keyword route."""
    work, info = built
    real = adapter.ours
    monkeypatch.setattr(adapter, "ours", lambda budget, dtype=None, info=None: (
        real(budget, dtype, info)[0], {**real(budget, dtype, info)[1], "text": "question"}))
    mine = llava15.ours(info, "fp32", [_spec(info)], 8)
    checks = _checks(built, mine, CLONE)
    assert any("kept indices per stage DIFFER" in c.detail for c in checks)
