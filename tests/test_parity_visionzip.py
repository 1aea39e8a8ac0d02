"""VisionZip against its official repository (dvlab-research/VisionZip, package ``visionzip/`` on the installed
llava-torch): parity/adapters/visionzip.py.

Plain tests (everywhere): the adapter's split is our method's, our options. Opt-in (``.venv-official`` and the clone
``.official/visionzip``): fp32 at T = 16, the wide image alone and the four in one left-padded batch (``python -m
parity`` runs them all), every check identical (dominant set, contextual targets, the merge assignment, logits,
tokens); a planted change in a copy of the clone's ``clip_encoder.py`` (the contextual targets' stride shortened by
one) makes the kept indices differ on the targets while the dominant set still agrees.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import OFFICIAL_PY, needs_official

from parity import adapters, llava15
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

REPO = Path(__file__).resolve().parents[1]
CLONE = REPO / ".official" / "visionzip"
ad = adapters.get("visionzip")


def test_the_official_split_is_our_methods_split():
    from baselines.visionzip import VisionZip, default_split

    for t in range(1, 400):
        assert ad.split(t) == default_split(t), t
    assert [ad.split(t) for t in (8, 16, 32, 64)] == [(7, 1), (13, 3), (27, 5), (54, 10)]
    method, options = ad.ours(16)
    m = VisionZip(16, **options)
    assert (method, options) == ("visionzip", {"numerics": "official"})
    assert (m.dominant, m.contextual) == ad.split(16)


@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    if not CLONE.is_dir():
        pytest.skip("no clone: run `bash scripts/official_clones.sh visionzip`")
    from parity.build import build

    work = tmp_path_factory.mktemp("parity-visionzip")
    return work, build(work, str(OFFICIAL_PY), seed=request.param)


def _run(info, work, clone, batches):
    import transformers as tf

    eos = tf.AutoTokenizer.from_pretrained(info["hf"]).eos_token_id
    specs = [{"name": "visionzip", "budget": 16, "batches": batches}]
    off = llava15.official(info, str(OFFICIAL_PY), "fp32", specs, 8, work, str(clone))
    mine = llava15.ours(info, "fp32", specs, 8)
    return llava15.compare(off, mine, "fp32", 1e-5, eos)


@needs_official
def test_visionzip_agrees_with_the_official_code_fp32(built):
    work, info = built
    checks = _run(info, work, CLONE, [[1], [0, 1, 2, 3]])
    bad = [(c.case, c.detail) for c in checks if not c.ok]
    assert not bad, bad
    assert len(checks) == 2
    for c in checks:
        assert [s for s, _ in c.data["official_kept"]] == ["dominant", "targets", "merge"]
        dom, tg, merge = (k for _, k in c.data["official_kept"])
        # 13 + 3 at T = 16: [CLS] (token 0) + 12 patches, 3 targets, every other of the 64 - 12 patches merged
        assert all(len(r) == 13 and r[0] == 0 for r in dom)
        assert all(len(r) == 3 for r in tg) and all(len(r) == 49 for r in merge)


@needs_official
def test_a_planted_change_in_the_official_visionzip_makes_parity_fail(built, tmp_path):
    work, info = built
    root = tmp_path / "clone"
    shutil.copytree(CLONE / "visionzip", root / "visionzip")
    enc = root / "visionzip" / "clip_encoder.py"
    text = enc.read_text()
    line = "step = max(1, metric_normalized.shape[1] // contextual_num)"
    assert text.count(line) == 1
    enc.write_text(text.replace(line, "step = max(1, metric_normalized.shape[1] // contextual_num - 1)"))
    (c,) = _run(info, work, root, [[0]])
    assert not c.ok and "kept indices per stage DIFFER" in c.detail
    off, ours = dict(c.data["official_kept"]), dict(c.data["our_kept"])
    assert off["dominant"] == ours["dominant"] and off["targets"] != ours["targets"]
