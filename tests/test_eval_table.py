"""The table command: rows method x budget, columns benchmarks with their metric variant, values
relative to the unpruned row and the papers' Avg (mean of per-benchmark ratios)."""

import json

import pytest

from eval.results import record_metric
from eval.table import make_table


def result(path, bench, primary, metrics, method, budget, created="2026-01-01", tok=(576.0, 576.0), **model):
    path.mkdir(parents=True, exist_ok=True)
    r = {"schema": "vtprune.eval.results/1", "benchmark": bench, "primary_metric": primary, "metrics": metrics,
         "metric_labels": {k: f"{k} label" for k in metrics}, "partial": False, "created": created,
         "model": {"id": "llava-hf/llava-1.5-7b-hf", "family": "llava", "preprocess": "pad", **model},
         "method": {"method": method, "budget": budget, "seed": 0}, "tokens": {"tok_in": tok[0], "tok_eq": tok[1]}}
    (path / "results.json").write_text(json.dumps(r))
    return path / "results.json"


@pytest.fixture
def runs(tmp_path):
    result(tmp_path / "gqa/v", "gqa", "GQA", {"GQA": 62.0}, "none", None)
    result(tmp_path / "mme/v", "mme", "MME-P", {"MME-P": 1500.0, "MME-P+C": 1850.0}, "none", None)
    result(tmp_path / "gqa/a", "gqa", "GQA", {"GQA": 55.8}, "consensusdrop", 64, tok=(64.0, 64.0))
    result(tmp_path / "mme/a", "mme", "MME-P", {"MME-P": 1350.0, "MME-P+C": 1700.0}, "consensusdrop", 64, tok=(64.0, 64.0))
    result(tmp_path / "gqa/b", "gqa", "GQA", {"GQA": 58.9}, "random", 192, tok=(192.0, 192.0))
    # an older run of the same cell is superseded by the newer one
    result(tmp_path / "gqa/b_old", "gqa", "GQA", {"GQA": 1.0}, "random", 192, created="2025-01-01")
    return tmp_path


def test_markdown_relative_and_avg(runs):
    md = make_table([runs])
    lines = md.splitlines()
    assert "| Method | Budget | GQA | MME-P | tok-in | tok-eq | Avg(rel, vanilla=ours) |" in lines
    assert "| Vanilla (unpruned) | – | 62.0 | 1500.0 | 576.0 | 576.0 | 100.0% |" in lines
    # 55.8 / 62 = 90.0 %, 1350 / 1500 = 90.0 % -> Avg 90.0 %
    assert "| ConsensusDrop | 64 | 55.8 (90.0%) | 1350.0 (90.0%) | 64.0 | 64.0 | 90.0% |" in lines  # display names
    # random has no MME run: Avg over GQA only, marked '*'
    assert "| Random | 192 | 58.9 (95.0%) | – | 192.0 | 192.0 | 95.0%* |" in lines
    assert lines.index("| **192 tokens** | | | | | | |") < lines.index("| **64 tokens** | | | | | | |")
    assert "  MME-P: MME-P label" in md  # every column's variant is spelled out


def test_metric_override_paper_vanilla_and_latex(runs):
    md = make_table([runs], metric_override={"mme": "MME-P+C"}, paper_vanilla={"GQA": 62.0, "MME-P+C": 1862.0})
    # relative to the paper's vanilla: 1700 / 1862 = 0.91300, 55.8 / 62 = 0.9 -> Avg (0.9 + 0.91300) / 2 = 90.6 %
    assert "| ConsensusDrop | 64 | 55.8 (90.0%) | 1700.0 (91.3%) | 64.0 | 64.0 | 90.6% |" in md
    assert "Avg(rel, vanilla=paper)" in md
    tex = make_table([runs], fmt="latex")
    assert "\\begin{tabular}{lcccccc}" in tex and "55.8 {\\scriptsize(90.0\\%)}" in tex and "90.0\\%" in tex
    assert "Vanilla (unpruned) & -- & 62.0" in tex and tex.count("\\midrule") == 3


def test_record_server_score(runs, tmp_path):
    p = result(tmp_path / "vqav2/v", "vqav2", "VQAv2-testdev", {}, "none", None)
    r = json.loads(p.read_text())
    r["pending"] = ["VQAv2-testdev: submit ...", "other"]
    p.write_text(json.dumps(r))
    res = record_metric(p.parent, "VQAv2-testdev", 78.5, source="EvalAI test-dev")
    assert res["metrics"]["VQAv2-testdev"] == 78.5 and res["pending"] == ["other"]
    assert res["metric_sources"]["VQAv2-testdev"]["source"] == "EvalAI test-dev"
    assert "VQAv2-testdev" in make_table([p])
