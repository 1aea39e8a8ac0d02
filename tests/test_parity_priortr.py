"""PriorTR against its authors' code (``CodeChildCZJ/PriorTR``'s LLaVA backbone, parity/adapters/priortr.py): the
adapter's helpers everywhere; opt-in, the official code itself beside ours on the tiny weights (skipped without
``.venv-official`` or the clone ``.official/priortr``), and a planted change in a copy of the clone that must make the
kept indices differ."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import OFFICIAL_PY, needs_official

from parity import llava15
from parity.adapters import priortr as adapter
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

CLONE = llava15.CLONES / "priortr"
ROOT = CLONE / adapter.ROOT
needs_clone = pytest.mark.skipif(not (ROOT / "llava" / "vtr").is_dir(),
                                 reason="no clone of CodeChildCZJ/PriorTR: run `bash scripts/official_clones.sh priortr`")


# -- without the official code --------------------------------------------------------------------------------------
def test_the_official_layer_maps_onto_the_tiny_llm_as_our_scale_layers_maps_it():
    from llava.ops import scale_layers

    assert scale_layers([3], 4) == (adapter.LAYER,) and adapter.STAGE == "llm1"
    method, options = adapter.ours(16)
    assert method == "priortr" and options["budget"] is None and options["keep_tokens"] == 16
    assert (options["numerics"], options["queries"], options["caches"]) == ("official", "question", "pruned")
    assert (options["layer"], options["scale_layers"]) == (adapter.LAYER, False)
    assert adapter.OFFICIAL == {"alone": True} and adapter.ROOT == "image/LLaVA"


# -- against the official code (opt-in) -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    from parity.build import build

    work = tmp_path_factory.mktemp("parity-priortr")
    return work, build(work, str(OFFICIAL_PY), seed=request.param)


def _spec(info, budget=16) -> dict:
    return {"name": "priortr", "budget": budget, "batches": [[i] for i in range(len(info["images"]))]}


@pytest.fixture(scope="module")
def our_run(built):
    """Our side once (fp32, T = 16, each image alone)."""
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
def test_priortr_agrees_with_the_official_code(built, our_run):
    """fp32: the kept indices, the logits (1e-5) and the greedy tokens, decode on the pruned caches included."""
    checks = _checks(built, our_run, ROOT)
    assert len(checks) == 4
    assert all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]
    for c in checks:
        ((stage, kept),) = c.data["official_kept"]
        assert stage == "llm1" and len(kept[0]) == 16


@needs_official
@needs_clone
def test_a_planted_change_in_the_official_score_makes_the_kept_indices_differ(built, our_run, tmp_path):
    root = tmp_path / "priortr"
    shutil.copytree(ROOT / "llava", root / "llava")
    path = root / "llava" / "vtr" / "strategy" / "priortr.py"
    line = "S = P * torch.log((P + eps) / (Q + eps))"
    text = path.read_text()
    assert text.count(line) == 1
    path.write_text(text.replace(line, "S = P * torch.log((Q + eps) / (P + eps))"))  # the prior over the task
    checks = _checks(built, our_run, root)
    assert any("kept indices per stage DIFFER" in c.detail for c in checks)
