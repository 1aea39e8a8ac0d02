"""VisionTrim's parity adapter (parity/adapters/visiontrim.py) against the official code itself: a clone of
hanxunyu/VisionTrim at 22b686d (``bash scripts/official_clones.sh visiontrim``; its HEAD ships no model code) run in
``.venv-official`` beside our ``visiontrim`` in its reference mode with the official CLIP text route, on the tiny
weights of ``parity.build`` (whose ``clip/`` folder is a whole ``CLIPModel`` with a CLIP tokenizer, what the fork's
``load_model`` loads). The parity tests are opt-in: skipped without ``.venv-official`` or the clone; the adapter's
helpers are tested plainly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import OFFICIAL_PY, needs_official

from parity import llava15
from parity.adapters import visiontrim as adapter
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

REPO = Path(__file__).resolve().parents[1]
CLONE = REPO / ".official" / "visiontrim"
needs_clone = pytest.mark.skipif(not (CLONE / "llava").is_dir(),
                                 reason="no clone: run `bash scripts/official_clones.sh visiontrim`")
STAGES = ["vision", "vision_targets", "vision_assign1", "vision_assign2", "vision_assign3"]


# ---- plain: the adapter's helpers ----

@pytest.mark.parametrize("budget", [4, 8, 16, 17, 32, 64, 128, 192])
def test_the_split_is_ours(budget):
    from baselines.visiontrim import split_budget

    assert adapter.split(budget) == split_budget(budget)
    assert adapter.split(64) == (48, 16)  # the official loader's defaults


def test_ours_gives_the_split_and_needs_the_built_folders():
    assert adapter.ours(16) == ("visiontrim", {"numerics": "official", "text": "clip", "tgvc_tokens": 4})


def test_the_question_is_what_the_official_loader_passes():
    # llava/eval/model_vqa_loader.py: original_qs = line["text"], collated into a tuple (batch size 1)
    q = "How many squares are there? Answer the question using a single word or phrase."
    assert adapter.inputs(None, None, [{"question": q}], None, None) == {"original_qs": (q,)}
    with pytest.raises(ValueError, match="one image at a time"):
        adapter.inputs(None, None, [{"question": q}] * 2, None, None)


def test_the_cpu_bridge_refuses_an_unexpected_source():
    src = "def f(tokens):\n    a = x.cuda()\n    b = y.cuda()\n    return z.cuda()\n"
    assert adapter.rewrite(src, adapter.CUDA_LITERAL, ".to(tokens.device)", 3).count(".to(tokens.device)") == 3
    with pytest.raises(RuntimeError, match=r"expected 3 .* found 2"):
        adapter.rewrite(src.replace("z.cuda()", "z"), adapter.CUDA_LITERAL, ".to(tokens.device)", 3)


def test_the_assignment_capture_keeps_the_merge_rounds_only():
    with adapter.assign_capture() as cap:
        torch.zeros(2, 5).scatter_(1, torch.zeros(2, 1, dtype=torch.long), 1)  # a 2-D scatter: not a round
        torch.zeros(4, dtype=torch.bool).scatter_(0, torch.tensor([1]), True)
        torch.zeros(1, 3, 2).scatter_(2, torch.tensor([[[1], [0], [1]]]), 1)  # a round: slots 1, 0, 1
    assert [r.tolist() for r in cap.rounds] == [[[1, 0, 1]]]


# ---- opt-in: the official code ----

@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    from parity.build import build

    work = tmp_path_factory.mktemp("parity")
    return work, build(work, str(OFFICIAL_PY), seed=request.param)


def _run(built, clones: Path, dtypes=("fp32",)):
    work, info = built
    return llava15.run(info, str(OFFICIAL_PY), work, dtypes=dtypes, budgets=(16,), methods=("visiontrim",),
                       clones=clones)


@needs_official
@needs_clone
def test_visiontrim_agrees_with_the_official_code(built):
    checks = _run(built, CLONE.parent, dtypes=("fp32", "fp16"))
    bad = [(c.case, c.detail) for c in checks if not c.ok]
    assert not bad, bad
    pruned = [c for c in checks if c.group == "visiontrim"]
    assert len(pruned) == 8  # each image alone (the loader's batch size 1: the adapter's OFFICIAL), two precisions
    assert all([s for s, _ in c.data["official_kept"]] == STAGES for c in pruned)
    d, t = adapter.split(16)
    for c in pruned:
        kept = dict(c.data["official_kept"])
        assert len(kept["vision"][0]) == d and len(kept["vision_targets"][0]) == t
        assert all(len(kept[s][0]) == 64 - d - t for s in STAGES[2:])
        assert not set(kept["vision"][0]) & set(kept["vision_targets"][0])
    assert all(c.data["logits_max_abs_diff"] == [0.0] for c in pruned if c.case.startswith("fp32"))


@needs_official
@needs_clone
def test_a_planted_change_in_the_official_score_makes_parity_fail(built, tmp_path):
    """The clone copied, its DVTS score with the received term's sign flipped: the kept patches differ."""
    clones = tmp_path / "clones"
    shutil.copytree(CLONE / "llava", clones / "visiontrim" / "llava")
    enc = clones / "visiontrim" / "llava" / "model" / "multimodal_encoder" / "clip_encoder.py"
    text = enc.read_text()
    line = "metric = alpha * cls_attn_norm + (1 - alpha) * avg_received_attn_norm"
    assert text.count(line) == 1
    enc.write_text(text.replace(line, "metric = alpha * cls_attn_norm - (1 - alpha) * avg_received_attn_norm"))
    checks = _run(built, clones)
    assert all(c.ok for c in checks if c.group != "visiontrim")
    assert any("kept indices per stage DIFFER" in c.detail for c in checks if c.group == "visiontrim")
