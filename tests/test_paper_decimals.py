"""A published number keeps the decimals the paper printed (eval/papers/FORMAT.md): a spec's TOML literal (``60.00``,
``1.10``) is kept as text beside the float, and the report prints that text, with ours and the difference at the
same precision; run options, budgets and settings stay plain floats."""

import json

import pytest

from eval.paper_report import report
from eval.papers import _Literal, decimals, load, printed_text

SPEC = """
[paper]
key = "decimals"
title = "Decimals as printed"
arxiv = "0000.00000"
method = "visionzip"

[[tables]]
id = "Table 1"
model = "llava-hf/llava-1.5-7b-hf"
source = "made up for the test"
budget_unit = "% TFLOP"

[[tables.columns]]
key = "gqa"
label = "GQA"
bench = "gqa"
metric = "GQA"

[[tables.columns]]
key = "mme"
label = "MME"
bench = "mme"
metric = "MME-P"

[[tables.columns]]
key = "cider"
label = "CIDEr"
bench = ""
not_run = "not in the harness"

[[tables.rows]]
method = "none"
label = "Vanilla"
published = { gqa = 60.00, mme = 1510.7, cider = 1.10 }
rel_avg = 100.00

[[tables.rows]]
method = "visionzip"
label = "VisionZip"
budget = 64
paper_budget = 11.30
options = { ratio = 0.50 }
published = { gqa = 55.0, mme = 1862, cider = 0.90 }
rel_avg = 93.70
"""


def _result(root, bench, metrics, method, budget, options=None):
    d = root / bench / f"{method}-{budget}"
    d.mkdir(parents=True)
    cfg = {"benchmark": bench, "model": "llava-hf/llava-1.5-7b-hf", "method": method, "budget": budget,
           "options": options or {}, "next_layout": "spatial_unpad", "num_frames": 8}
    (d / "results.json").write_text(json.dumps({
        "schema": "vtprune.eval.results/1", "benchmark": bench, "metrics": metrics, "partial": False,
        "created": "2026-01-01", "model": {"id": cfg["model"]}, "method": {"method": method, "budget": budget},
        "config": cfg, "tokens": {}}))


@pytest.fixture
def paper(tmp_path):
    p = tmp_path / "decimals.toml"
    p.write_text(SPEC)
    return load(str(p), check=False)


def test_literals_kept_beside_the_floats(paper):
    van, vz = paper.tables[0].rows
    assert van.printed == {"gqa": "60.00", "mme": "1510.7", "cider": "1.10"}
    assert vz.printed == {"gqa": "55.0", "mme": "1862", "cider": "0.90"}
    # the numbers themselves are unchanged: plain floats (an integer stays an integer)
    assert van.published == {"gqa": 60.0, "mme": 1510.7, "cider": 1.1}
    assert [type(v) for v in van.published.values()] == [float, float, float] and type(vz.published["mme"]) is int
    assert (van.rel_avg, van.rel_avg_printed, vz.rel_avg_printed) == (100.0, "100.00", "93.70")
    # run options and the budget heading's number reach run configs and keys: plain floats, not the literal type
    assert vz.options == {"ratio": 0.5} and type(vz.options["ratio"]) is float
    assert type(vz.paper_budget) is float and vz.paper_budget_printed == "11.30"
    assert vz.group == "11.30% TFLOP"


def test_printed_text_and_decimals():
    assert [decimals(t) for t in ("60.00", "1862", "1510.7", "0.05")] == [2, 0, 1, 2]
    assert printed_text(1862) == "1862" and printed_text(61.9) == "61.9"  # not from a spec file: its repr
    assert printed_text(_Literal("1_510.70")) == "1510.70" and printed_text(_Literal("+0.50")) == "0.50"
    assert printed_text(_Literal("1.5e-3")) == "0.0015"


def test_report_prints_the_papers_decimals(paper, tmp_path):
    runs = tmp_path / "runs"
    _result(runs, "gqa", {"GQA": 61.234}, "none", None)
    _result(runs, "mme", {"MME-P": 1498.26}, "none", None)
    _result(runs, "gqa", {"GQA": 54.56}, "visionzip", 64, {"ratio": 0.5})
    text, _ = report(paper, [runs])
    # Vanilla: GQA printed 60.00 -> ours 61.23 (2 decimals), 61.234 - 60 = +1.234 -> +1.23, outside 1.0;
    # MME printed 1510.7 -> 1498.3 (1 decimal), 1498.26 - 1510.7 = -12.44 -> -12.4, within 30; CIDEr 1.10 as printed
    assert "| Vanilla | – | 61.23 / 60.00 (+1.23) ✗ | 1498.3 / 1510.7 (-12.4) | n/r / 1.10 | " in text
    # VisionZip: GQA printed 55.0 -> 54.56 - 55.0 = -0.44: 54.6 / 55.0 (-0.4); MME printed 1862 (no decimals);
    # budget 11.30 as printed; the printed relative averages 100.00% / 93.70% keep their zeros
    assert "| VisionZip | 11.30 | 54.6 / 55.0 (-0.4) | – / 1862 | n/r / 0.90 | " in text
    assert "| 100.00% |" in text and "| 93.70% |" in text
    assert "| **11.30% TFLOP** |" in text


def test_divprune_report_keeps_the_trailing_zeros():
    """DivPrune's Table 1 prints every accuracy and CIDEr with two decimals (1.10, 32.60, 60.00): the report prints
    them so, not as a TOML float would (1.1, 32.6, 60.0)."""
    text, _ = report(load("divprune", check=False), [])
    # LLaVA 1.5-7B (MME printed without decimals stays so)
    assert "| Original † | – | – / 1.10 | – / 0.75 | – / 61.96 | – / 64.09 | – / 1506 | – / 36.44 |" in text
    assert ("| VTW † (not run) | 18.46 | n/r / 0.05 | n/r / 0.03 | n/r / 38.94 | n/r / 21.31 | n/r / 681 "
            "| n/r / 32.60 |") in text
    # LLaVA 1.5-13B: Ours* SEEDB 60.00, VTW POPE 0.40; LLaVA 1.6-7B: FastV at the printed 11.30% TFLOP
    assert "| n/r / 79.60 | n/r / 71.34 | n/r / 60.00 |" in text and "| n/r / 0.40 |" in text
    assert "| FastV † (not run) | 11.30 |" in text
