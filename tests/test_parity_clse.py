"""CLSE against its authors' code (``zjubinchen/CLSE``'s LLaVA-1.5 tree, parity/adapters/clse.py): the adapter's
helpers everywhere; opt-in, the official code itself beside ours on the tiny weights (skipped without
``.venv-official`` or the clone ``.official/clse``), and a planted change in a copy of the clone that must make the
kept indices differ."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import OFFICIAL_PY, needs_official

from parity import llava15
from parity.adapters import clse as adapter
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

CLONE = llava15.CLONES / "clse"
ROOT = CLONE / adapter.ROOT
needs_clone = pytest.mark.skipif(not (ROOT / "llava" / "model" / "language_model" / "clse_model.py").is_file(),
                                 reason="no clone of zjubinchen/CLSE: run `bash scripts/official_clones.sh clse`")


# -- without the official code --------------------------------------------------------------------------------------
def test_the_official_layers_and_schedules_map_onto_the_tiny_model_as_ours():
    from baselines.clse import SCHEDULE, stage_counts
    from llava.ops import scale_layers

    assert scale_layers([1, 11, 21], 4) == adapter.LAYERS
    for b, lst in adapter.OFFICIAL_LISTS.items():
        assert lst == str(list(SCHEDULE[b]))  # the literals the shim replaces are the official schedules
        assert adapter.TINY_LISTS[b] == stage_counts(b, adapter.PATCHES)  # and become ours on 64 patches
    method, options = adapter.ours(192)
    assert method == "clse" and (options["numerics"], options["caches"]) == ("official", "pruned")
    assert (options["layer_list"], options["scale_layers"]) == (adapter.LAYERS, False)
    assert adapter.rewrite("a = 35\nb = 1", "a = 35", "a = s") == "a = s\nb = 1"
    with pytest.raises(RuntimeError, match="expected one .* found 2"):
        adapter.rewrite("a = 35; a = 35", "a = 35", "x")


# -- against the official code (opt-in) -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    from parity.build import build

    work = tmp_path_factory.mktemp("parity-clse")
    return work, build(work, str(OFFICIAL_PY), seed=request.param)


def _spec(info, budget=192) -> dict:
    return {"name": "clse", "budget": budget, "batches": [[i] for i in range(len(info["images"]))]}


@pytest.fixture(scope="module")
def our_run(built):
    """Our side once (fp32, the official 192 schedule: 36 / 23 / 6 of 64, each image alone)."""
    work, info = built
    return llava15.ours(info, "fp32", [_spec(info)], 8)


def _checks(built, our_run, root: Path, dtype: str = "fp32") -> list:
    work, info = built
    off = llava15.official(info, str(OFFICIAL_PY), dtype, [_spec(info)], 8, work, str(root))
    return llava15.compare(off, our_run, dtype, 1e-5, 2)


@needs_official
@needs_clone
def test_fp16_agrees_bit_for_bit(built):
    """fp16 (the official load's precision): the reference mode's score layers on eager attention, as the official
    code's, so the logits are bit-identical (they were 1e-2 apart on SDPA: docs/parity.md)."""
    work, info = built
    checks = _checks(built, llava15.ours(info, "fp16", [_spec(info)], 8), ROOT, "fp16")
    assert len(checks) == 4 and all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]
    assert all("logits max abs diff 0.00e+00" in c.detail for c in checks), [c.detail for c in checks]


@needs_official
@needs_clone
def test_clse_agrees_with_the_official_code(built, our_run):
    """fp32: the kept indices of the three stages, the logits (1e-5) and the greedy tokens, decode on the pruned
    caches included."""
    checks = _checks(built, our_run, ROOT)
    assert len(checks) == 4
    assert all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]
    for c in checks:
        kept = dict(c.data["official_kept"])
        assert {s: len(k[0]) for s, k in kept.items()} == {"llm1": 36, "llm2": 23, "llm3": 6}


@needs_official
@needs_clone
def test_a_planted_change_in_the_official_score_makes_the_kept_indices_differ(built, our_run, tmp_path):
    root = tmp_path / "clse"
    shutil.copytree(ROOT / "llava", root / "llava")
    path = root / "llava" / "model" / "language_model" / "tools.py"
    line = "return torch.sigmoid(norm_rate / temp)"
    text = path.read_text()
    assert text.count(line) == 1
    path.write_text(text.replace(line, "return torch.sigmoid(-norm_rate / temp)"))  # the tokens that changed least
    checks = _checks(built, our_run, root)
    assert any("kept indices per stage DIFFER" in c.detail for c in checks)
