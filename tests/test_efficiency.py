"""Efficiency benchmark: analytic formulas against efficiency.md's worked values, the cost-model
fit on synthetic data, and a smoke run of the whole machinery on a tiny model (no timing asserted)."""

import json
from pathlib import Path

import pytest

from bench.efficiency import BenchConfig, Roofline, fit_roofline, kv_bytes_per_token, prefill_macs, run


@pytest.mark.parametrize("n,d,m,layers,a,b", [
    (651, 4096, 11008, 32, 3.39, 4.33),    # vanilla LLaVA-1.5-7B: 35 + 576 + 40
    (139, 4096, 11008, 32, 0.70, 0.91),    # 64 visual tokens
    (2955, 4096, 11008, 32, 17.16, 21.43),  # vanilla LLaVA-NeXT-7B (2880)
    (651, 5120, 13824, 40, 6.59, 8.43),    # 13B
])
def test_flops_conventions_match_reference_table(n, d, m, layers, a, b):
    assert prefill_macs([n] * layers, d, m, "A") / 1e12 == pytest.approx(a, abs=0.006)
    assert prefill_macs([n] * layers, d, m, "B") / 1e12 == pytest.approx(b, abs=0.006)


def test_kv_bytes_per_token_of_the_real_shapes():
    from llava.models import load

    assert kv_bytes_per_token(load("shape:llava-1.5-7b", device="meta").model.config) * 2 == 512 * 1024
    assert kv_bytes_per_token(load("shape:llava-1.5-13b", device="meta").model.config) * 2 == 800 * 1024


def test_roofline_fit_recovers_a_known_model():
    truth = Roofline(floor=0.005, a=0.001, k=2e-15, d=4096, m=11008, layers=32)
    pts = [(n, truth.full(n)) for n in (16, 32, 64, 128, 256, 512, 768, 1024, 1536)]
    fit = fit_roofline(pts, 4096, 11008, 32)
    for n in (48, 300, 1200):
        assert fit.full(n) == pytest.approx(truth.full(n), rel=1e-6)
    # the ridge: a + k F(n) = floor; F_B(n) ~ 2 * 6.75e9 * n * ... -> solved numerically, checked both sides
    r = fit.ridge()
    assert truth.a + truth.k * prefill_macs([r] * 32, 4096, 11008, "B") >= truth.floor
    assert truth.a + truth.k * prefill_macs([r - 1] * 32, 4096, 11008, "B") < truth.floor
    # per-layer application: a FastV-like schedule (2 layers at 651, 30 at 330) costs the mean of T(n_l)
    lengths = [651] * 2 + [330] * 30
    assert fit.per_layer(lengths) == pytest.approx((2 * truth.full(651) + 30 * truth.full(330)) / 32, rel=1e-6)


def test_smoke_run_writes_table_json_plot_and_checks_bars(tmp_path):
    cfg = BenchConfig(model="tiny:llava", methods=["none", "consensusdrop", "visiondrop:merge=false"],
                      budgets=[64, 4], n=2, warmup=1, batch_sizes=[1, 2], decode_tokens=3, decode_samples=1,
                      image_hw=(56, 56), out=str(tmp_path), sweep=[8, 16, 32, 48, 64])
    report = run(cfg)
    data = json.loads((tmp_path / "efficiency.json").read_text())
    assert (tmp_path / "efficiency.png").stat().st_size > 1000
    md = (tmp_path / "efficiency.md").read_text()
    assert "| consensusdrop | 4 | 4 / 4.0 |" in md and "Cost model:" in md
    # a method's options name its rows (two variants of one method stay apart in the table and the bars)
    assert "| visiondrop merge=False | 4 |" in md and "| visiondrop merge=False | 4 | selection overhead" in md
    assert [(r["method"], r["budget"]) for r in data["results"]] == [
        ("none", None), ("consensusdrop", 64), ("consensusdrop", 4), ("visiondrop", 64), ("visiondrop", 4)]
    # cells.jsonl: each cell's headline numbers as it ended, equal to the final report's
    cells = [json.loads(line) for line in (tmp_path / "cells.jsonl").read_text().splitlines()]
    assert [(c["method"], c["budget"], c["path"]) for c in cells] == [
        (r["method"], r["budget"], "eager") for r in data["results"]]
    for c, r in zip(cells, data["results"]):
        assert c["ttft_median_s"] == r["ttft"]["median"] and c["tpot_median_s"] == r["tpot"]["median"]
        assert c["batched_ttft_median_s"] == {"2": r["batched"]["2"]["ttft"]["median"]} and c["warmup_s"] > 0
    for r in report["results"]:
        assert r["kv_match"], r["method"]
        assert len(r["records"]) == 2 and r["batched"]["2"]["n_batches"] == 1
        assert set(r["records"][0]) >= {"ttft", "t_vision", "t_selection", "t_llm", "layer_lengths", "macs_B"}
    kinds = {b["bar"] for b in report["bars"]}
    assert kinds == {"selection overhead <= 3% of unpruned TTFT", "measured KV bytes == analytic",
                     "TTFT speed-up within 10% of the cost model"}
    # budget 64 >= the tiny model's 16 tokens: nothing pruned, the layer lengths equal the unpruned ones
    none, cd64 = data["results"][0], data["results"][1]
    assert cd64["records"][0]["layer_lengths"] == none["records"][0]["layer_lengths"]
    # launch count (llava.syncs.OpCounter) of one prefill, split as the time; extra = over the unpruned one
    assert none["extra_ops"] == 0 and "| ops vision / select / LLM | ops over unpruned |" in md
    table = md[md.index("| Method | Budget | tok-in"):].split("\n\n")[0].splitlines()
    assert len({line.count("|") for line in table}) == 1, table  # header, separator and rows: one cell count
    for r in data["results"]:
        ops = r["ops"]
        assert ops["vision"] + ops["selection"] + ops["llm"] == ops["prefill_total"] <= ops["total"]
        assert r["extra_ops"] == ops["total"] - none["ops"]["total"]
        if r["method"] != "none":
            assert r["extra_ops"] > 0 and ops["selection"] > none["ops"]["selection"], (r["method"], r["budget"])
    cd4 = data["results"][2]
    assert f"| {cd4['ops']['vision']} / {cd4['ops']['selection']} / {cd4['ops']['llm']} | {cd4['extra_ops']:+d} |" in md


def test_main_says_progress_and_where_it_wrote_under_runs(tmp_path, monkeypatch, capsys):
    """python -m bench.efficiency writes under runs/efficiency by default (it wrote into docs/results/, the
    committed reports), prints [i/N] before each cell and one 'wrote' line naming every file (issue 63)."""
    from bench.efficiency import main

    monkeypatch.chdir(tmp_path)
    assert main(["--model", "tiny:llava", "--methods", "none", "random", "--budgets", "4", "--n", "1",
                 "--warmup", "0", "--batch", "1", "--decode-tokens", "1", "--decode-samples", "1",
                 "--image-hw", "56", "56", "--sweep", "8", "16"]) == 0
    err = capsys.readouterr().err
    out = Path("runs/efficiency")
    assert f"bench.efficiency: 2 cells (2 method x budget, 1 samples each) on tiny:llava; writing to {out}" in err
    assert err.index("[1/2] none") < err.index("[2/2] random budget 4") < err.index("[2/2] cells done")
    wrote = [line for line in err.splitlines() if line.startswith("wrote ")]
    assert wrote == [f"wrote {out / 'efficiency.json'}, {out / 'efficiency.md'}, {out / 'efficiency.png'}, "
                     f"{out / 'cells.jsonl'}"]
    assert all((tmp_path / p).is_file() for p in wrote[0][len("wrote "):].split(", "))
    assert not (tmp_path / "docs").exists()
