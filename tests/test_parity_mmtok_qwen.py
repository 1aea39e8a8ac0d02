"""``python -m parity qwen --method mmtok``: MMTok's official Qwen2.5-VL code (``mmtok_qwen2_5_vl`` from the clone,
transformers 4.52.4) beside ours in its Qwen reference mode. The registry and the specs always; opt-in (skipped
without ``.venv-official-qwen`` or the clone ``.official/mmtok``: ``bash scripts/official_env.sh qwen``,
``bash scripts/official_clones.sh mmtok``): two builds, fp32 and fp16, and planted changes on the official side
that must show."""

from __future__ import annotations

from pathlib import Path

import pytest

from parity import qwen
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

ROOT = Path(__file__).resolve().parents[1]
QWEN_PY = ROOT / ".venv-official-qwen" / "bin" / "python"
CLONE = ROOT / ".official" / "mmtok"
needs_official = pytest.mark.skipif(not QWEN_PY.exists() or not (CLONE / "mmtok" / "qwen").is_dir(),
                                    reason="no .venv-official-qwen (bash scripts/official_env.sh qwen) or no "
                                           ".official/mmtok (bash scripts/official_clones.sh mmtok)")


# -- without the official environment -------------------------------------------------------------------------------
def test_mmtok_is_a_qwen_method_row_and_its_specs_run_each_image_alone():
    from parity import adapters

    assert "mmtok" in qwen.qwen_methods()
    assert all(getattr(adapters.get(n), "QWEN", False) for n in qwen.qwen_methods())
    info = {"images": ["a", "b", "c", "d"], "method_images": ["e", "f"]}
    specs = qwen.method_specs(["mmtok"], info, official_path=str(CLONE))
    assert [s["name"] for s in specs] == ["none", "mmtok", "mmtok"]
    assert [s["budget"] for s in specs[1:]] == [0.2, 0.5]  # QWEN_BUDGETS: the official default 0.2, and 0.5
    for s in specs[1:]:
        assert s["batches"] == [[i] for i in range(6)] and [c["image"] for c in s["cases"]] == list("abcdef")
    with pytest.raises(ValueError, match="no Qwen2.5-VL parity adapter"):
        qwen.method_specs(["visionzip"], info)


def test_ours_qwen_is_the_reference_mode():
    from parity.adapters import mmtok as adapter

    class _Rt:  # what ours_qwen reads
        class processor:
            tokenizer = "tok"

        class model:
            @staticmethod
            def get_input_embeddings():
                return "emb"

    name, budget, opts = adapter.ours_qwen(0.2, "fp16", _Rt)
    assert (name, budget) == ("mmtok", None)
    assert opts == {"numerics": "official", "vv_space": "merge_mean", "scope": "sample", "whole_at_most": 64,
                    "retain_ratio": 0.2, "text": "question_retokenized", "llm_tokenizer": "tok", "embed_tokens": "emb"}


# -- against the official code (opt-in) -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    work = tmp_path_factory.mktemp("parity-mmtok-qwen")
    return work, qwen.build(work, seed=request.param)


@needs_official
def test_mmtok_on_qwen_agrees_with_the_official_code(built):
    """fp32 and fp16, the official retain ratios 0.2 and 0.5, six images each alone (four kept whole: at most 64
    tokens; two pruned: 90 and 143 tokens): kept indices and greedy tokens identical, fp32 logits within 1e-5."""
    work, info = built
    checks = qwen.run(info, str(QWEN_PY), work, methods=("mmtok",), official_path=str(CLONE))
    rows = [c for c in checks if c.group == "qwen-mmtok"]
    assert len(checks) == 44 and len(rows) == 24
    assert all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]
    pruned = [c for c in rows if "of 90 kept" in c.detail or "of 143 kept" in c.detail]
    assert len(pruned) == 8 and all("18 of 90" in c.detail or "45 of 90" in c.detail or "28 of 143" in c.detail
                                    or "71 of 143" in c.detail for c in pruned)


def _planted(info, work, kwargs, images):
    spec = dict(qwen.method_specs(["mmtok"], info, [0.2], str(CLONE))[1], official_kwargs=kwargs)
    spec["batches"] = [[i] for i in images]
    mine_spec = {k: v for k, v in spec.items()}
    off = qwen.official(info, str(QWEN_PY), "fp32", [spec], 4, work)
    mine = qwen.ours(info, "fp32", [mine_spec], 4)
    for o in off["runs"]:  # the official side's spec carries the planted kwargs; ours does not read them
        o["method"] = mine_spec
    return [qwen.compare_method(o, m, "planted", 1e-5, info["eos"]) for o, m in zip(off["runs"], mine)]


@needs_official
def test_planted_changes_on_the_official_side_show(built, tmp_path):
    """The comparison reads what the official code selects: its tau_v at 0.1 (ours keeps the official 0.2) changes
    the picks of the two pruned images; its core's count 0 instead of the default 64 (what keeps a small image
    whole) makes it prune the four small images that ours keeps whole."""
    work, info = built
    tau = _planted(info, tmp_path / "tau", {"softmax_vv_temperature": 0.1}, [4, 5])
    assert all(not c.ok and "kept indices DIFFER" in c.detail for c in tau)
    whole = _planted(info, tmp_path / "whole", {"target_vision_tokens": 0}, [0, 1, 2, 3])
    assert all(not c.ok and "kept indices DIFFER" in c.detail for c in whole)
