"""The tensor-parallel memory plan (docs/evaluation.md section 3, `python -m bench.tp_check --memory`): what each
rank holds under llava.tp (the language model's linears and lm_head split, the rest whole), worked out by hand
for LLaVA-1.5-7B; the large shape configs the plan covers build their published parameter counts. (That a TP
run holds exactly rank_params' count is checked on the tiny families in tests/test_tensor_parallel.py.)"""

import pytest

from bench.tp_check import memory_plan
from llava.models import load
from llava.tp import rank_params


def test_rank_params_of_llava_1_5_7b_by_hand():
    model = load("shape:llava-1.5-7b", device="meta").model
    d, f, layers, vocab = 4096, 11008, 32, 32064
    sharded = layers * (4 * d * d + 3 * d * f) + vocab * d  # q k v o, gate up down (no biases); lm_head
    total = sum(p.numel() for p in model.parameters())
    assert sharded == 6_607_339_520
    for tp in (1, 2, 4):
        assert rank_params(model, tp) == {"total": total, "sharded": sharded, "replicated": total - sharded,
                                          "per_rank": total - sharded + sharded // tp}


def test_memory_plan_rows():
    rows = {r["model"]: r for r in memory_plan(names=("llava-1.5-7b", "llava-onevision-72b"))}
    r = rows["llava-1.5-7b"]
    assert r["gb"][1] == round(7_063_427_072 * 2 / 1e9, 1) == 14.1 and r["min_tp"] == 1
    assert r["kv_mb_per_1k"][1] == round(2 * 32 * 32 * 128 * 2 * 1000 / 1e6, 1)  # K and V, 32 layers x 32 heads x 128
    assert r["kv_mb_per_1k"][4] == pytest.approx(r["kv_mb_per_1k"][1] / 4, abs=0.05)
    big = rows["llava-onevision-72b"]
    assert big["gb"][2] + 12 > 80 and big["gb"][4] + 12 <= 80 and big["min_tp"] == 4
    assert big["kv_mb_per_1k"][8] == round(2 * 80 * 1 * 128 * 2 * 1000 / 1e6, 1)  # 8 KV heads: one per rank at TP=8


# published totals: llava-v1.6-34b 34.8B (model card), Qwen2.5-VL-72B-Instruct 73.4B, llava-onevision-qwen2-72b 73.2B
@pytest.mark.parametrize("name,params,family", [("llava-next-34b", 34.8e9, "llava_next"),
                                                ("qwen2.5-vl-72b", 73.4e9, "qwen2_5_vl"),
                                                ("llava-onevision-72b", 73.2e9, "llava_onevision")])
def test_the_large_shape_configs_build_their_published_sizes(name, params, family):
    rt = load(f"shape:{name}", device="meta")
    assert rt.family == family
    assert sum(p.numel() for p in rt.model.parameters()) == pytest.approx(params, rel=2e-3)


def test_the_documented_plan_is_the_computed_one():
    """docs/evaluation.md's table quotes memory_plan (a changed config or rule cannot leave the docs behind)."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "evaluation.md").read_text()
    for r in memory_plan(names=("llava-1.5-13b", "qwen2.5-vl-72b")):
        cells = f"| {r['params_b']:.2f}B | " + " | ".join(f"{r['gb'][t]:.1f} GB" for t in (1, 2, 4, 8))
        assert cells + f" | {r['kv_mb_per_1k'][1]:.0f} MB |" in doc, cells
