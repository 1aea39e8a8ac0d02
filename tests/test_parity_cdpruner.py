"""CDPruner's parity adapter (parity/adapters/cdpruner.py) against the official code itself: a clone of
Theia-4869/CDPruner (``bash scripts/official_clones.sh cdpruner``) run in ``.venv-official`` beside our ``cdpruner``
in its reference mode with the official CLIP relevance, on the tiny weights of ``parity.build`` (whose ``clip/``
folder is a whole ``CLIPModel`` with a CLIP tokenizer, what the fork's ``load_text_tower`` loads). The parity tests
are opt-in: skipped without ``.venv-official`` or the clone; the adapter's helpers and the CLIP folder are tested
plainly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import OFFICIAL_PY, needs_official

from parity import llava15
from parity.adapters import cdpruner as adapter
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

REPO = Path(__file__).resolve().parents[1]
CLONE = REPO / ".official" / "cdpruner"
needs_clone = pytest.mark.skipif(not (CLONE / "llava").is_dir(),
                                 reason="no clone: run `bash scripts/official_clones.sh cdpruner`")


# ---- plain: the adapter's helpers, the CLIP folder of parity.build ----

def test_the_question_is_what_the_official_loader_passes():
    # llava/eval/model_vqa_loader.py: question.replace("\nAnswer the question using a single word or phrase.", "")
    assert adapter.question_text("How many?\nAnswer the question using a single word or phrase.") == "How many?"
    # the harness's questions hold the sentence after a space: kept, on both sides
    q = "How many squares are there? Answer the question using a single word or phrase."
    assert adapter.question_text(q) == q
    assert adapter.inputs(None, None, [{"question": q}], None, None) == {"texts": q}
    with pytest.raises(ValueError, match="one image at a time"):
        adapter.inputs(None, None, [{"question": q}] * 2, None, None)


def test_ours_needs_the_built_folders():
    assert adapter.ours(16) == ("cdpruner", {"numerics": "official", "relevance": "clip", "reference_dtype": "model"})


def test_the_clip_folder_is_a_clip_model_whose_vision_tensors_a_vision_only_build_draws(tmp_path):
    import transformers as tf
    from safetensors.torch import load_file

    from parity.build import TOWER, Draws, _write_tower, official_shapes, random_state

    _, shapes = official_shapes(TOWER, 400)
    sd = _write_tower(tmp_path, TOWER, shapes, Draws("t", 0), Draws("t", 7))
    alone = random_state(shapes, Draws("t", 0), "tower")
    assert sd.keys() == alone.keys() and all(torch.equal(sd[k], alone[k]) for k in sd)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(saved[k], sd[k]) for k in sd)
    assert {"text_projection.weight", "visual_projection.weight", "logit_scale"} <= saved.keys()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "clip" and cfg["text_config"]["eos_token_id"] == 2  # the argmax-of-ids pooling
    clip = tf.CLIPModel.from_pretrained(tmp_path)
    assert torch.equal(clip.visual_projection.weight, saved["visual_projection.weight"])
    # byte-level ids, worked by hand: w h a t</w>, is</w> (a merge), i n</w>, the</w> (a merge), i m a g e</w>, ?</w>
    tok = tf.AutoTokenizer.from_pretrained(tmp_path)
    assert tok("What is in the image?").input_ids == [520, 86, 71, 64, 339, 517, 72, 333, 514, 72, 76, 64, 70, 324,
                                                      286, 521]


# ---- opt-in: the official code ----

@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    from parity.build import build

    work = tmp_path_factory.mktemp("parity")
    return work, build(work, str(OFFICIAL_PY), seed=request.param)


def _run(built, clones: Path):
    work, info = built
    return llava15.run(info, str(OFFICIAL_PY), work, dtypes=("fp32",), budgets=(16,), methods=("cdpruner",),
                       clones=clones)


@needs_official
@needs_clone
def test_cdpruner_agrees_with_the_official_code(built):
    checks = _run(built, CLONE.parent)
    bad = [(c.case, c.detail) for c in checks if not c.ok]
    assert not bad, bad
    pruned = [c for c in checks if c.group == "cdpruner"]
    assert len(pruned) == 4  # each image alone (the fork cannot run a batch: the adapter's OFFICIAL)
    assert all([s for s, _ in c.data["official_kept"]] == ["vision"] for c in pruned)
    assert all(len(k) == 16 for c in pruned for k in c.data["official_kept"][0][1])


@needs_official
@needs_clone
def test_a_planted_change_in_the_official_relevance_makes_parity_fail(built, tmp_path):
    """The clone copied, its relevance with the sign flipped (``(-relevance).mean`` -> ``relevance.mean``): the
    kept patches differ."""
    clones = tmp_path / "clones"
    shutil.copytree(CLONE / "llava", clones / "cdpruner" / "llava")
    arch = clones / "cdpruner" / "llava" / "model" / "llava_arch.py"
    text = arch.read_text()
    line = "relevance = (-relevance).mean(dim=-1)"
    assert text.count(line) == 1
    arch.write_text(text.replace(line, "relevance = (relevance).mean(dim=-1)"))
    checks = _run(built, clones)
    assert all(c.ok for c in checks if c.group != "cdpruner")
    assert any("kept indices per stage DIFFER" in c.detail for c in checks if c.group == "cdpruner")
