"""TransPrune against its authors' code (``liaolea/TransPrune``, parity/adapters/transprune.py): the adapter's
helpers everywhere (its schedule == our method's on the tiny depth); opt-in, the official code itself beside ours on
the tiny weights (skipped without ``.venv-official`` or the clone ``.official/transprune``), and a planted change in a
copy of the clone (the transition's direction term) that must make the kept indices differ."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import OFFICIAL_PY, needs_official

from baselines.transprune import TransPrune
from parity import llava15
from parity.adapters import transprune as adapter
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

CLONE = llava15.CLONES / "transprune"
needs_clone = pytest.mark.skipif(not (CLONE / "llava" / "model" / "modeling_llama_transprune.py").is_file(),
                                 reason="no clone of liaolea/TransPrune: run `bash scripts/official_clones.sh transprune`")


# -- without the official code --------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", adapter.BUDGETS)
def test_the_official_switches_are_our_schedule_on_the_tiny_llm(budget):
    """The lists the adapter hands the official code (1-based) == our method's stages, accumulating layers and counts
    on the 4-layer LLM's 64 visual tokens (236: the scripts' lists = ours without a budget)."""
    acc, layers, ratios = adapter.official_switches(budget, 4)
    name, opts = adapter.ours(budget)
    m = TransPrune(opts.pop("budget", budget), **opts)
    m.setup(num_layers=4, num_vision_layers=24, family="llava")
    assert name == "transprune" and m.numerics == "official"
    assert tuple(layers) == m.llm_layers == (1, 2, 3)
    assert tuple(i - 1 for i in acc) == m.llm_subblock_layers == (0, 1, 2)
    assert tuple(int(64 * r) for r in ratios) == m.stage_counts(64)
    expected = {200: (13, 9, 1), 220: (18, 12, 2), 236: (56, 40, 8)}[budget]
    assert m.stage_counts(64) == expected
    assert adapter.scale_layers(adapter.SCRIPT_PRUNING, 32) == (7, 9, 12)
    assert adapter.OFFICIAL == {"alone": True, "padding_side": "right"}


# -- against the official code (opt-in) -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    from parity.build import build

    work = tmp_path_factory.mktemp("parity-transprune")
    return work, build(work, str(OFFICIAL_PY), seed=request.param)


def _spec(info, budget=236) -> dict:
    return {"name": "transprune", "budget": budget, "batches": [[i] for i in range(len(info["images"]))],
            "padding_side": "right"}


@pytest.fixture(scope="module")
def our_run(built):
    """Our side once (fp32, the scripts' lists, each image alone)."""
    work, info = built
    return llava15.ours(info, "fp32", [_spec(info)], 8)


def _checks(built, our_run, root: Path, dtype: str = "fp32") -> list:
    work, info = built
    off = llava15.official(info, str(OFFICIAL_PY), dtype, [_spec(info)], 8, work, str(root))
    return llava15.compare(off, our_run, dtype, 1e-5, 2)


@needs_official
@needs_clone
def test_transprune_agrees_with_the_official_code(built, our_run):
    """fp32: the kept indices of the three stages, the logits (1e-5) and the greedy tokens."""
    checks = _checks(built, our_run, CLONE)
    assert len(checks) == 4
    assert all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]
    for c in checks:
        assert [(s, len(k[0])) for s, k in c.data["official_kept"]] == [("llm1", 56), ("llm2", 40), ("llm3", 8)]


@needs_official
@needs_clone
def test_fp16_agrees_bit_for_bit(built):
    work, info = built
    checks = _checks(built, llava15.ours(info, "fp16", [_spec(info)], 8), CLONE, "fp16")
    assert len(checks) == 4 and all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]
    assert all("logits max abs diff 0.00e+00" in c.detail for c in checks), [c.detail for c in checks]


@needs_official
@needs_clone
def test_a_planted_change_in_the_official_transition_makes_the_kept_indices_differ(built, our_run, tmp_path):
    root = tmp_path / "transprune"
    shutil.copytree(CLONE / "llava", root / "llava")
    path = root / "llava" / "model" / "modeling_llama_transprune.py"
    line = "cosine_similarities = 1-F.cosine_similarity(before_hidden_states, after_hidden_states, dim=-1)"
    text = path.read_text()
    assert text.count(line) == 1
    # the direction term reversed (1 + cos: an unchanged direction weighs most)
    path.write_text(text.replace(line, line.replace("1-F.cosine", "1+F.cosine")))
    checks = _checks(built, our_run, root)
    assert any("kept indices per stage DIFFER" in c.detail for c in checks), [c.detail for c in checks]
