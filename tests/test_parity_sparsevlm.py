"""SparseVLM's parity adapter (parity/adapters/sparsevlm.py) against the official repository ``Gumpest/SparseVLMs``.

Without the official code: the tiny model's schedule the adapter hands the official side is our own mapping, the
records' layout. Opt-in (``.venv-official`` and ``.official/sparsevlm``): the official code and ours on the tiny
weights, one budget, the official fp16 load, each image alone: every check identical; a planted change in ours
(the rater set taken from the text's first token only) makes the kept indices differ.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import OFFICIAL_PY, needs_official

from parity import adapters, llava15
from parity.adapters import sparsevlm as adapter
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

REPO = Path(__file__).resolve().parents[1]
CLONE = REPO / ".official" / "sparsevlm"


# -- without the official code ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("budget", [192, 128, 96, 64])
def test_tiny_counts_are_our_mapping_of_the_official_schedule(version, budget):
    from baselines.sparsevlm import SCHEDULES, SparseVLM

    assert set(adapter.TINY_COUNTS[version]) == set(SCHEDULES[version])
    m = SparseVLM(budget, version=version)
    m.setup(num_layers=4, num_vision_layers=8, family="llava")
    # the official pruning_loc on 4 layers: the output of layer l pruned = our stage before layer l + 1
    assert tuple(l + 1 for l in adapter.TINY_LAYERS) == tuple(m.llm_layers) == (1, 2, 3)
    assert adapter.TINY_COUNTS[version][budget] == m.stage_counts(adapter.TINY_VISUAL)


def test_the_version_follows_the_official_switch(monkeypatch):
    monkeypatch.delenv("USE_VERSION", raising=False)
    assert adapter.version() == "v1" and adapter.ours(192) == ("sparsevlm", {"version": "v1", "numerics": "official"})
    monkeypatch.setenv("USE_VERSION", "2_0")
    assert adapter.version() == "v2" and adapter.ours(64)[1]["version"] == "v2"
    monkeypatch.setenv("USE_VERSION", "1_0")
    assert adapter.version() == "v1"


def test_recycling_record_sorts_the_recycled_tokens_and_keeps_their_clusters():
    rec = adapter.recycling_record(2, torch.tensor([9, 3, 7, 4]), torch.tensor([7, 3]), torch.tensor([0, 1, 0, 1]))
    assert [(k, v.tolist()) for k, v in rec] == [("llm2 recycled", [[3, 4, 7, 9]]), ("llm2 centres", [[7, 3]]),
                                                 ("llm2 clusters", [[1, 1, 0, 0]])]
    assert adapter.recycling_record(1, torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0)) == []


def test_the_adapter_needs_a_clone_with_its_llava_tree(tmp_path):
    with pytest.raises(ValueError, match=r"sparsevlm needs a clone of Gumpest/SparseVLMs"):
        llava15.clone_for("sparsevlm", None, clones=tmp_path)
    with pytest.raises(ValueError, match=r"has no llava/ folder \(Gumpest/SparseVLMs does\)"):
        llava15.clone_for("sparsevlm", str(tmp_path), clones=tmp_path)


# -- against the official code (opt-in) ------------------------------------------------------------------------------
needs_clone = pytest.mark.skipif(not (CLONE / "llava").is_dir(),
                                 reason="run `bash scripts/official_clones.sh sparsevlm`")


@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def runs(request, tmp_path_factory):
    """The official run (fp16 load, budget 192, each image alone) and the tiny weights, once for the module."""
    from parity.build import build

    work = tmp_path_factory.mktemp("parity-sparsevlm")
    info = build(work, str(OFFICIAL_PY), seed=request.param)
    spec = {"name": "sparsevlm", "budget": 192, "batches": [[i] for i in range(len(info["images"]))]}
    root = llava15.clone_for("sparsevlm", None)
    off = llava15.official(info, str(OFFICIAL_PY), "fp16", [spec], 8, work, root)
    return info, spec, off


def _checks(runs):
    import transformers as tf

    info, spec, off = runs
    mine = llava15.ours(info, "fp16", [spec], 8)
    eos = tf.AutoTokenizer.from_pretrained(info["hf"]).eos_token_id
    return llava15.compare(off, mine, "fp16", None, eos)


@needs_official
@needs_clone
def test_sparsevlm_v1_agrees_with_the_official_code_in_the_official_fp16_load(runs, monkeypatch):
    monkeypatch.delenv("USE_VERSION", raising=False)
    checks = _checks(runs)
    assert len(checks) == 4 and all(c.group == "sparsevlm" for c in checks)
    bad = [(c.case, c.detail) for c in checks if not c.ok]
    assert not bad, bad
    for c in checks:  # every stage compared, with v1's recycling
        stages = [s for s, _ in c.data["official_kept"]]
        assert [s for s in stages if " " not in s] == ["llm1", "llm2", "llm3"]
        assert "llm1 clusters" in stages


@needs_official
@needs_clone
def test_a_planted_change_in_our_raters_makes_the_kept_indices_differ(runs, monkeypatch):
    import baselines.sparsevlm as sv

    monkeypatch.delenv("USE_VERSION", raising=False)
    monkeypatch.setattr(sv, "select_raters", lambda v, t, numerics="ours", **kw: torch.zeros(1, dtype=torch.long))
    checks = _checks(runs)
    assert any("kept indices per stage DIFFER" in c.detail for c in checks)


def test_the_adapter_is_registered():
    assert "sparsevlm" in adapters.names()
    assert adapters.get("sparsevlm").OFFICIAL == {"alone": True}
