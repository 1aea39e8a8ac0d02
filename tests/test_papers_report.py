"""The paper report's issue-56 behaviour, on small constructed specs and results: the cells a paper printed nothing
for, one line per column and reason; a table whose published numbers are reference only (no pass/fail marks,
not counted); a budget in another unit than tokens (DivPrune's TFLOP ratio) and a row's own group heading; the
"retains" claim (a method keeps at least X % of the unpruned model); the figure's panels (a column with no number
is not drawn, our line is drawn at a single budget)."""

import subprocess
import sys
from pathlib import Path

import pytest
from test_papers import SPEC, result, write_spec

from eval.paper_report import draw, not_printed_lines, panels, report
from eval.papers import SpecError, load

REPO = Path(__file__).resolve().parents[1]

MISSING = """
[[tables.rows]]
method = "fastv"
label = "FastV"
budget = 32
options = {{ numerics = "official" }}
published = {{ gqa = 40.0 }}
missing = {{ mme = "printed as '-'", mmmu = "printed as '-'" }}

[[tables.rows]]
method = "visionzip"
label = "VisionZip"
budget = 32
published = {{ gqa = 50.0 }}
missing = {{ mme = "printed as '-'", mmmu = "not in the transcription" }}
"""


def test_not_printed_lines_group_rows_per_column_and_reason(tmp_path):
    """The worked example's VisionZip @ 64 misses MME ("printed as '-'"); two rows at 32 add MME (same reason) and
    MMMU (two reasons): one line per (column, reason), columns in the table's order, rows in the table's order."""
    paper = load(str(write_spec(tmp_path, text=SPEC + MISSING)))
    lines = not_printed_lines(paper.tables[0])
    assert lines == [
        "Not printed: MME (3 rows: VisionZip (64 tokens), FastV (32 tokens), VisionZip (32 tokens)): printed as '-'",
        "Not printed: MMMU (1 row: FastV (32 tokens)): printed as '-'",
        "Not printed: MMMU (1 row: VisionZip (32 tokens)): not in the transcription",
    ]
    text, _ = report(paper, [])
    assert [ln[2:] for ln in text.splitlines() if ln.startswith("- Not printed:")] == lines


REFERENCE_ONLY = 'source = "made up for the test"\nreference_only = "machine-written summary (issue 56)."'


def test_reference_only_table_has_no_pass_fail(tmp_path):
    """The worked example's results against a reference-only table: FastV's GQA 48.0 / 46.0 (+2.0) is outside the
    1-point tolerance but carries no mark; no published cell counts (0 of 0), the 7 published cells are counted
    as reference only; the vanilla row is not turned into a setup check; the title, the notes and the CLI's
    summary line say so."""
    paper = load(str(write_spec(tmp_path, **{'source = "made up for the test"': REFERENCE_ONLY})))
    assert paper.tables[0].reference_only == "machine-written summary (issue 56)."
    runs = tmp_path / "runs"
    result(runs, "gqa", {"GQA": 58.0}, "none", None)  # -4.0 against the published 62.0: no setup alarm
    result(runs, "gqa", {"GQA": 48.0}, "fastv", 64, {"numerics": "official"})
    text, info = report(paper, [runs], fmt="both")
    rep = info["tables"]["Table 1"]
    assert "| FastV | 64 | 48.0 / 46.0 (+2.0) | – / 1200 | n/r / n/p |" in text  # no ✗
    rows = [ln for ln in info["texts"]["md"].splitlines() if ln.startswith("| ")]
    assert len(rows) == 7 and not any("✗" in ln for ln in rows)  # header, 2 group headings, 4 rows
    assert not any("\\times" in ln for ln in info["texts"]["latex"].splitlines() if " & " in ln)
    assert "Cells: ours / paper's (ours - paper); no tolerance marks (reference only); n/r" in text
    assert rep.summary == {"published": 0, "within": 0, "not_run": 0, "cannot_run": 0, "reference_only": 7,
                           "outside": 0, "not_comparable": 0}
    summary = ("0 of 0 published cells reproduced within tolerance, 0 not run (0 cannot be run here); 7 published "
               "cells shown for reference only, not pass/fail targets")
    assert rep.summary_line() == summary
    lines = info["texts"]["md"].splitlines()
    assert "### A worked example - Table 1: worked example [reference only, not pass/fail targets]" in lines
    assert ("- Reference only, not pass/fail targets: machine-written summary (issue 56). The published numbers are "
            "shown beside ours without ✗ marks and are not counted in the summary.") in lines
    assert "- Vanilla first: not checked against the published row (reference only, below)." in lines
    out = tmp_path / "rep.md"
    r = subprocess.run([sys.executable, "-m", "eval", "paper", paper.path, str(runs), "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "WANDB_MODE": "disabled",
                                                            "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert f"worked Table 1: {summary}" in r.stderr
    assert "[reference only, not pass/fail targets]" in out.read_text()


TFLOP = """
[paper]
key = "tflop"
title = "A TFLOP-ratio table"
arxiv = "0000.00000"
method = "divprune"

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
key = "pope"
label = "POPE"
bench = "pope"
metric = "POPE-F1avg3"

[[tables.columns]]
key = "mme"
label = "MME"
bench = "mme"
metric = "MME-P"

[[tables.rows]]
method = "none"
label = "Original"
paper_budget = 100.0
published = { gqa = 62.0, pope = 86.0 }

[[tables.rows]]
method = "divprune"
label = "DivPrune"
paper_budget = 15.63
options = { ratio = 0.098 }
published = { gqa = 57.0 }
group = "plug-and-play, TFLOP ratio about 15%"

[[tables.rows]]
method = "prumerge"
label = "PruMerge"
paper_budget = "Variable"
options = { variant = "base" }
published = { gqa = 51.3 }
"""

CLAIM = """
[[claims]]
id = "retains"
text = "DivPrune keeps 90% at 56 of 576 tokens"
kind = "retains"
method = "divprune"
budget = 56
at_least = 90.0
"""


def test_budget_unit_group_heading_and_figure_panels(tmp_path):
    """A budget in the paper's TFLOP ratio: the row's group heading is its own `group` where set, else the printed
    budget in the table's unit; the figure's x axis says the unit. Panels: GQA (published at 15.63 and ours at
    the single budget: drawn, our line one point with a marker), POPE (only the unpruned row's number: drawn, a
    horizontal line), MME (runnable, but no number anywhere: not drawn)."""
    paper = load(str(_write(tmp_path, TFLOP)))
    t = paper.tables[0]
    assert [r.group for r in t.rows] == ["", "plug-and-play, TFLOP ratio about 15%", "Variable"]
    assert t.rows[1].name == "DivPrune (plug-and-play, TFLOP ratio about 15%)"
    runs = tmp_path / "runs"
    result(runs, "gqa", {"GQA": 56.2}, "divprune", None, {"ratio": 0.098})
    text, info = report(paper, [runs])
    assert "| **plug-and-play, TFLOP ratio about 15%** |" in text and "| **Variable** |" in text
    assert "| DivPrune | 15.63 | 56.2 / 57.0 (-0.8) |" in text
    assert "budgets in the paper's convention (as printed; unit: % TFLOP)" in text
    rep = info["tables"]["Table 1"]
    assert [c.label for c in panels(rep)] == ["GQA", "POPE"]
    fig = draw(paper, rep)
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["GQA", "POPE"]
    assert axes[0].get_xlabel() == "% TFLOP (paper's convention)"
    ours = [ln for ln in axes[0].get_lines() if ln.get_label() == "DivPrune"]  # the series: the row's label
    assert len(ours) == 1 and list(ours[0].get_xdata()) == [15.63] and list(ours[0].get_ydata()) == [56.2]
    assert ours[0].get_marker() not in (None, "None", "", " ")  # one budget is a visible point
    assert [ln.get_ydata()[0] for ln in axes[1].get_lines()] == [86.0]  # the published vanilla, a line
    # with no number at all the figure still writes, saying so
    empty = report(paper, [], figures_dir=tmp_path / "figs")[1]
    assert Path(empty["figures"]["Table 1"]).exists()


def test_retains_claim(tmp_path):
    """DivPrune at 56 kept tokens (ratio 0.098: budget None in the row, so the claim names the row by budget):
    ours vs vanilla = ours over the table's three runnable columns."""
    text = TFLOP.replace('options = { ratio = 0.098 }', 'budget = 56') + CLAIM
    paper = load(str(_write(tmp_path, text)))
    runs = tmp_path / "runs"
    result(runs, "gqa", {"GQA": 60.0}, "none", None)
    result(runs, "pope", {"POPE-F1avg3": 80.0}, "none", None)
    result(runs, "mme", {"MME-P": 1500.0}, "none", None)
    result(runs, "gqa", {"GQA": 54.0}, "divprune", 56)
    result(runs, "pope", {"POPE-F1avg3": 76.0}, "divprune", 56)
    _, info = report(paper, [runs])
    (claim,) = info["claims"]
    assert claim["missing"] == ["Table 1 DivPrune (plug-and-play, TFLOP ratio about 15%) (2 of 3 columns run)"]
    assert claim["line"].startswith("retains: not checked yet")
    # all three: (54/60 + 76/80 + 1380/1500) / 3 = (0.9 + 0.95 + 0.92) / 3 = 92.33 % >= 90
    result(runs, "mme", {"MME-P": 1380.0}, "divprune", 56)
    (claim,) = report(paper, [runs])[1]["claims"]
    assert claim["held"] == ["Table 1 DivPrune (plug-and-play, TFLOP ratio about 15%): 92.3%"]
    assert claim["line"] == ("retains: held (at least 90% of the unpruned model, relative average with vanilla = "
                             "ours); Table 1 DivPrune (plug-and-play, TFLOP ratio about 15%): 92.3%.")
    # 95 % claimed: not held
    (claim,) = report(load(str(_write(tmp_path, text.replace("at_least = 90.0", "at_least = 95.0"), "t2"))),
                      [runs])[1]["claims"]
    assert claim["failed"] == ["Table 1 DivPrune (plug-and-play, TFLOP ratio about 15%): 92.3% < 95%"]
    assert claim["line"].startswith("retains: not held")


@pytest.mark.parametrize("old,new,needle", [
    ("budget = 56\nat_least", "budget = 64\nat_least", "no row of divprune at budget 64"),
    ("at_least = 90.0\n", "", "missing `at_least`"),
    ('kind = "retains"', 'kind = "keeps"', "kind must be one of ('beats', 'pareto', 'retains')"),
])
def test_retains_claim_is_checked(tmp_path, old, new, needle):
    text = TFLOP.replace('options = { ratio = 0.098 }', 'budget = 56') + CLAIM
    assert old in text
    with pytest.raises(SpecError, match=__import__("re").escape(needle)):
        load(str(_write(tmp_path, text.replace(old, new))))


def _write(tmp_path, text, key="tflop"):
    p = tmp_path / f"{key}.toml"
    p.write_text(text.replace('key = "tflop"', f'key = "{key}"'))
    return p


def test_visiondrop_table_1_is_reference_only():
    """Issue 56 item 2: VisionDrop's Table 1 (35 numbers, 7 rows x 5 columns, from a machine-written note) is never a
    pass/fail target: every row unverified, the table reference only, and the report says so."""
    t = load("visiondrop").table("Table 1")
    assert "machine-written" in t.reference_only and "issue 56" in t.reference_only
    assert all(r.unverified for r in t.rows) and sum(len(r.published) for r in t.rows) == 35
    text, info = report(load("visiondrop"), [], table="Table 1")
    assert info["tables"]["Table 1"].summary_line() == (
        "0 of 0 published cells reproduced within tolerance, 0 not run (0 cannot be run here); 35 published cells "
        "shown for reference only, not pass/fail targets")
    assert "[reference only, not pass/fail targets]" in text and "✗ =" not in text
    # the four columns the note lacks: one line each, naming the 7 rows
    miss = [ln for ln in text.splitlines() if ln.startswith("- Not printed:")]
    assert [ln.split(" (")[0] for ln in miss] == ["- Not printed: MMB-CN", "- Not printed: MME",
                                                  "- Not printed: TextVQA", "- Not printed: VizWiz"]
    assert all("(7 rows: Full (upper bound), FastV (192 tokens), PyramidDrop (192 tokens)" in ln for ln in miss)
