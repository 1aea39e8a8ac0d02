"""DUET-VLM against its official repository (AMD-AGI/DUET-VLM: its ``llava/`` tree with PyramidDrop's LLaMA and its
``visionzip/`` package): parity/adapters/duet.py.

Plain tests (everywhere): the adapter's split and stage layers are our method's, our options. Opt-in
(``.venv-official`` and the clone ``.official/duet``): fp32 at T = 16, two images alone (the official stage 2 cannot
run a left-padded batch; ``python -m parity`` runs all four), every check identical (stage 1: dominant set, pool,
anchors, merge assignment; stage 2: the kept sets at decoder layers 2 and 3; logits; tokens); a planted change in a
copy of the clone's ``modeling_llama_pdrop.py`` (stage 2 scores by the max over the query rows instead of the mean)
makes the stage-2 kept set differ while stage 1 still agrees.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import OFFICIAL_PY, needs_official

from parity import adapters, llava15
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

REPO = Path(__file__).resolve().parents[1]
CLONE = REPO / ".official" / "duet"
ad = adapters.get("duet")


def test_the_official_settings_are_our_methods():
    import baselines.duet as duet
    from llava.ops import scale_layers

    for t in range(1, 400):
        assert ad.split(t) == duet.budget_split(t), t
    assert [ad.split(t) for t in (8, 16, 32, 64, 128, 192)] == [(11, 2), (22, 4), (42, 9), (85, 17), (170, 35),
                                                                 (300, 7)]
    for depth in (4, 24, 28, 32, 40, 80):
        assert tuple(ad.layers(depth)) == scale_layers(duet.OFFICIAL_LAYERS, depth), depth
    assert (ad._LAYERS, ad._RATIOS, ad._CLUSTER_WIDTH) == \
        (duet.OFFICIAL_LAYERS, duet.OFFICIAL_RATIOS, duet.OFFICIAL_CLUSTER_WIDTH)
    assert ad.ours(16) == ("duet", {"numerics": "official"})
    m = duet.DUET(16, **ad.ours(16)[1])
    m.setup(num_layers=4, num_vision_layers=8, family="llava")
    assert (m.dominant, m.contextual, m.cluster_width, m.llm_layers) == (22, 4, 4, (2, 3))
    assert ad.OFFICIAL == {"alone": True, "padding_side": "right"}


@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    if not CLONE.is_dir():
        pytest.skip("no clone: run `bash scripts/official_clones.sh duet`")
    from parity.build import build

    work = tmp_path_factory.mktemp("parity-duet")
    return work, build(work, str(OFFICIAL_PY), seed=request.param)


def _run(info, work, clone, batches):
    import transformers as tf

    eos = tf.AutoTokenizer.from_pretrained(info["hf"]).eos_token_id
    specs = [{"name": "duet", "budget": 16, "batches": batches, **ad.OFFICIAL}]
    specs[0].pop("alone")
    off = llava15.official(info, str(OFFICIAL_PY), "fp32", specs, 8, work, str(clone))
    mine = llava15.ours(info, "fp32", specs, 8)
    return llava15.compare(off, mine, "fp32", 1e-5, eos)


STAGES = ["dominant", "pool", "targets", "merge", "llm2", "llm3"]


@needs_official
def test_duet_agrees_with_the_official_code_fp32(built):
    work, info = built
    checks = _run(info, work, CLONE, [[0], [1]])
    bad = [(c.case, c.detail) for c in checks if not c.ok]
    assert not bad, bad
    assert len(checks) == 2
    for c in checks:
        kept = dict(c.data["official_kept"])
        assert list(kept) == STAGES
        # 22 + 4 at T = 16: [CLS] + 21 patches; a pool of 16 (4 anchors, 12 merged); 26 -> 13 -> 0 in the LLM
        assert [len(kept[s][0]) for s in STAGES] == [22, 16, 4, 12, 13, 0]
        assert kept["dominant"][0][0] == 0


@needs_official
def test_a_planted_change_in_the_official_stage_two_makes_parity_fail(built, tmp_path):
    work, info = built
    root = tmp_path / "clone"
    for pkg in ad.PACKAGES:
        shutil.copytree(CLONE / pkg, root / pkg)
    f = root / "llava" / "model" / "modeling_llama_pdrop.py"
    text = f.read_text()
    line = "attention_avg_text = torch.mean(attention_avg_head, dim=0) # (576)"
    assert text.count(line) == 1
    f.write_text(text.replace(line, "attention_avg_text = torch.amax(attention_avg_head, dim=0)"))
    (c,) = _run(info, work, root, [[0]])
    assert not c.ok and "kept indices per stage DIFFER" in c.detail
    off, ours = dict(c.data["official_kept"]), dict(c.data["our_kept"])
    assert all(off[s] == ours[s] for s in STAGES[:4]) and off["llm2"] != ours["llm2"]
