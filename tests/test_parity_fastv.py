"""FastV's parity adapter (parity/adapters/fastv.py): its pure helpers against ours (no official code needed), and,
opt-in, the official ``src/FastV/lmms-eval/fastv_kvcache.py`` (a clone of pkunlp-icler/FastV, ``.official/fastv``)
on the installed llava-torch beside ours on the tiny weights: every check identical in fp32 at the file's own ratio
(budget 56: 32 of 64 kept after layer 3), and a planted change in a copy of the file makes the kept-indices check
fail."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import OFFICIAL_PY, needs_official

from parity.adapters import fastv as adapter
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

REPO = Path(__file__).resolve().parents[1]
CLONE = REPO / ".official" / "fastv"
FILE = CLONE / adapter.ROOT / adapter.FILE
needs_clone = pytest.mark.skipif(not FILE.is_file(),
                                 reason="no clone of pkunlp-icler/FastV: run `bash scripts/official_clones.sh fastv`")


# -- without the official code ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [8, 40, 52, 56, 60, 64, 100])
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_kept_count_is_our_equivalent_kept_count(budget, layer):
    from llava.ops import equivalent_kept_count

    assert adapter.kept_count(budget, 64, layer, 4) == equivalent_kept_count(budget, 64, layer, 4)
    assert adapter.kept_count(budget, 576, 2, 32) == equivalent_kept_count(budget, 576, 2, 32)


def test_budget_56_is_the_files_own_ratio():
    # fastv_kvcache.py line 120: ratio = 0.5 (kept: topk(int(576 * ratio))), K = 3 (line 119)
    assert adapter.kept_count(56, 64, 3, 4) == 32 == int(64 * 0.5)
    assert adapter.kept_count(52, 64, 3, 4) == 16 and adapter.kept_count(60, 64, 3, 4) == 48


def test_edit_source_sets_each_literal_once():
    text = ("K = 3\nratio = 0.5\nx[35:611]\ns.topk(int(576 * ratio)).indices + 35\n"
            "torch.arange(35,device=device), torch.arange(611,seq_length,device=device)\n")
    out = adapter.edit_source(text, 3, 0.25, 12, 64)
    assert out == ("K = 3\nratio = 0.25\nx[12:76]\ns.topk(int(64 * ratio)).indices + 12\n"
                   "torch.arange(12,device=device), torch.arange(76,seq_length,device=device)\n")
    with pytest.raises(RuntimeError, match="2 copies of '\\[35:611\\]'"):
        adapter.edit_source(text + "y[35:611]\n", 3, 0.5, 12, 64)


@needs_clone
def test_the_clones_file_holds_the_literals_the_adapter_sets():
    out = adapter.edit_source(FILE.read_text(), 3, 0.5, 12, 64)
    assert "[12:76]" in out and "int(64 * ratio)" in out and "576" not in out and "611" not in out


# -- against the official code (opt-in) ------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    from parity.build import build

    work = tmp_path_factory.mktemp("parity-fastv")
    return work, build(work, str(OFFICIAL_PY), seed=request.param)


def _run(built, root: Path, batches):
    import transformers as tf

    from parity import llava15

    work, info = built
    spec = {"name": "fastv", "budget": 56, "batches": batches}
    off = llava15.official(info, str(OFFICIAL_PY), "fp32", [spec], 8, work, str(root))
    mine = llava15.ours(info, "fp32", [spec], 8)
    eos = tf.AutoTokenizer.from_pretrained(info["hf"]).eos_token_id
    return llava15.compare(off, mine, "fp32", 1e-5, eos)


@needs_official
@needs_clone
def test_the_official_fastv_and_ours_agree_in_fp32(built):
    checks = _run(built, CLONE / adapter.ROOT, [[2]])
    assert len(checks) == 1 and all(c.ok for c in checks), [(c.case, c.detail) for c in checks]
    for c in checks:
        assert [(s, len(k[0])) for s, k in c.data["official_kept"]] == [("llm3", 32)]


@needs_official
@needs_clone
def test_a_planted_change_in_the_official_file_makes_parity_fail(built, tmp_path):
    root = tmp_path / "FastV"
    shutil.copytree(FILE.parent, root / "lmms-eval")
    path = root / "lmms-eval" / "fastv_kvcache.py"
    text = path.read_text()
    line = "top_attention_rank_index = image_attention_score.topk("
    assert text.count(line) == 1
    path.write_text(text.replace(line, "top_attention_rank_index = (-image_attention_score).topk("))
    (c,) = _run(built, root, [[0]])
    assert not c.ok and "kept indices per stage DIFFER" in c.detail
