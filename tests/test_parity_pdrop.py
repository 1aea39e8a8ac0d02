"""PyramidDrop's parity adapter (parity/adapters/pdrop.py): its pure helpers against ours (no official code needed),
and, opt-in, the official repository's code (a clone of Cooperx521/PyramidDrop, ``.official/pdrop``) beside ours on
the tiny weights: every check identical in fp32 for the eval scripts' schedule (budget 270: lam = 0.5), and a planted
change in a copy of the clone's ``pdrop_rank_drop`` makes the kept-indices check fail."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import OFFICIAL_PY, needs_official

from parity.adapters import pdrop as adapter
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

REPO = Path(__file__).resolve().parents[1]
CLONE = REPO / ".official" / "pdrop"
needs_clone = pytest.mark.skipif(
    not (CLONE / "llava").is_dir(),
    reason="no clone of Cooperx521/PyramidDrop: run `bash scripts/official_clones.sh pdrop`")


# -- without the official code ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [4, 32, 40])
def test_the_adapters_layers_are_our_scale_layers(depth):
    from llava.ops import scale_layers

    assert adapter.scale_layers(adapter.SCRIPT_LAYERS, depth) == scale_layers(adapter.SCRIPT_LAYERS, depth)
    assert adapter.scale_layers(adapter.SCRIPT_LAYERS, 4) == (1, 2, 3)


@pytest.mark.parametrize("budget", [150, 216, 270, 324, 500])
def test_the_official_ratios_keep_our_counts(budget):
    from baselines.pdrop import PyramidDrop, solve_lambda

    layers, ratios = adapter.official_switches(budget, 4)
    assert adapter.solve_lambda(layers, 4, budget / 576) == solve_lambda(layers, 4, budget / 576)
    ours = PyramidDrop(budget)
    ours.setup(num_layers=4, num_vision_layers=8, family="llava")
    assert tuple(layers) == ours.llm_layers
    for n in (64, 576, 100):
        assert [int(n * r) for r in ratios] == list(ours.stage_counts(n))  # the official int(N_orig * ratio)


def test_budget_270_is_the_eval_scripts_schedule():
    # scripts/v1_5/pdrop_eval/*.sh: --layer_list '[8,16,24]' --image_token_ratio_list "[0.5,0.25,0.125]"
    assert adapter.official_switches(270, 32) == ([8, 16, 24], [0.5, 0.25, 0.125])
    assert adapter.official_switches(270, 4) == ([1, 2, 3], [0.5, 0.25, 0.125])
    # the raw bisection is one ulp under 0.5: int(64 * lam) would keep 31 (the reason for the decimals)
    lam = adapter.solve_lambda((1, 2, 3), 4, 270 / 576)
    assert lam < 0.5 and int(64 * lam) == 31
    with pytest.raises(ValueError, match="unreachable"):
        adapter.official_switches(128, 4)


# -- against the official code (opt-in) ------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    from parity.build import build

    work = tmp_path_factory.mktemp("parity-pdrop")
    return work, build(work, str(OFFICIAL_PY), seed=request.param)


def _run(built, clone: Path, batches):
    from parity import llava15

    work, info = built
    spec = {"name": "pdrop", "budget": 270, "batches": batches, **adapter.OFFICIAL}
    off = llava15.official(info, str(OFFICIAL_PY), "fp32", [spec], 8, work, str(clone))
    mine = llava15.ours(info, "fp32", [spec], 8)
    import transformers as tf

    eos = tf.AutoTokenizer.from_pretrained(info["hf"]).eos_token_id
    return llava15.compare(off, mine, "fp32", 1e-5, eos)


@needs_official
@needs_clone
def test_the_official_pdrop_and_ours_agree_in_fp32(built):
    checks = _run(built, CLONE, [[3]])
    assert len(checks) == 1 and all(c.ok for c in checks), [(c.case, c.detail) for c in checks]
    for c in checks:
        assert [s for s, _ in c.data["official_kept"]] == ["llm1", "llm2", "llm3"]
        assert [len(k[0]) for _, k in c.data["official_kept"]] == [32, 16, 8]
        assert max(c.data["logits_max_abs_diff"]) <= 1e-5


@needs_official
@needs_clone
def test_a_planted_change_in_the_official_rank_drop_makes_parity_fail(built, tmp_path):
    clone = tmp_path / "pdrop"
    shutil.copytree(CLONE / "llava", clone / "llava")
    path = clone / "llava" / "model" / "modeling_llama_pdrop.py"
    text = path.read_text()
    line = "top_rank_index = attention_avg_text.topk(keep_length[i]).indices"
    assert text.count(line) == 1
    path.write_text(text.replace(line, "top_rank_index = (-attention_avg_text).topk(keep_length[i]).indices"))
    (c,) = _run(built, clone, [[0]])
    assert not c.ok and "kept indices per stage DIFFER" in c.detail
