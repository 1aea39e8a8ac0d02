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
def test_mmtok_is_a_qwen_method_row_and_its_specs_run_each_image_alone(tmp_path):
    from parity import adapters

    assert "mmtok" in qwen.qwen_methods()
    assert all(getattr(adapters.get(n), "QWEN", False) for n in qwen.qwen_methods())
    info = {"images": ["a", "b", "c", "d"], "method_images": ["e", "f"]}
    (tmp_path / "mmtok").mkdir()  # a clone's layout (the clone itself is not needed to build the specs)
    specs = qwen.method_specs(["mmtok"], info, official_path=str(tmp_path))
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


def _entry(kept, n=70, text_shift=0.0, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"kept": torch.tensor(kept), "features": torch.randn(n, 8, generator=g),
            "vision": torch.randn(n, 4, generator=g), "text": torch.randn(3, 8, generator=g) + text_shift,
            "target": 7, "dtype": "float32"}


def _run(entry, tokens=((1, 2),), logits=None):
    import torch

    return {"method": {"name": "mmtok", "budget": 0.1}, "batch": [4], "input_ids": torch.tensor([[5, 6]]),
            "kept": [entry], "tokens": [list(t) for t in tokens],
            "logits": torch.zeros(1, 3, 4) if logits is None else logits}


def test_the_method_check_and_the_replay_on_worked_rows():
    """qwen_replay is our reference selection on a recorded entry (whole at <= 64 tokens: the official core's
    count); compare_method passes only when kept indices, text rows, tokens and the replay all agree."""
    import torch

    from baselines.mmtok import mmtok
    from llava.ops import unit_layout
    from parity.adapters.mmtok import qwen_replay

    e = _entry([])
    picks = mmtok(e["features"], e["vision"], e["text"], unit_layout(torch.zeros(70, dtype=torch.long)), 7,
                  tv_temperature=0.01, numerics="official")
    assert torch.equal(qwen_replay(e), picks) and picks.numel() == 7
    small = {k: (v[:60] if k in ("features", "vision") else v) for k, v in e.items()}
    assert torch.equal(qwen_replay(small), torch.arange(60))  # 60 <= 64: kept whole whatever the count
    off = _entry(picks.tolist())
    ok = qwen.compare_method(_run(off), _run(_entry(picks.tolist())), "c", 1e-5, None, "fp32")
    assert ok.ok and "replay on the official rows: identical picks" in ok.detail
    other = sorted(set(range(8)) - {int(picks[0])})[:7]
    bad_kept = qwen.compare_method(_run(off), _run(_entry(other)), "c", 1e-5, None, "fp32")
    assert not bad_kept.ok and "kept indices DIFFER" in bad_kept.detail
    bad_text = qwen.compare_method(_run(off), _run(_entry(picks.tolist(), text_shift=1.0)), "c", 1e-5, None, "fp32")
    assert not bad_text.ok and "text 1.00e+00" in bad_text.detail
    bad_tok = qwen.compare_method(_run(off), _run(_entry(picks.tolist()), tokens=((1, 3),)), "c", 1e-5, None,
                                  "fp32")
    assert not bad_tok.ok and "greedy tokens DIFFER" in bad_tok.detail
    planted = _entry(other)  # the official side's picks are not what our selection makes of its rows
    bad_replay = qwen.compare_method(_run(planted), _run(_entry(other)), "c", 1e-5, None, "fp32")
    assert not bad_replay.ok and "replay differs: ours is wrong" in bad_replay.detail


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
    return [qwen.compare_method(o, m, "planted", 1e-5, info["eos"], "fp32") for o, m in zip(off["runs"], mine)]


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
