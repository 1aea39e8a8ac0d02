"""Control runs and significance marks in a paper's grid and report: a table's ``controls`` (or ``--controls``) add
the random / downsample configs at the budgets of its method rows (once; a budget downsample cannot reach on the
model's patch grid listed as not run), the checker rejects an unknown control, the report puts the control rows
under their budget, each other row's cell is marked ⋆ where it differs from the paper's own method at 5 % on our
runs (McNemar's exact test, or the paired bootstrap interval), with a note and no mark where the per-unit scores
are missing or the question sets differ, and the figure draws ± 1 standard error bars. Every expected number is
worked out by hand in the test's docstring or comment."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from eval import stats as st
from eval.benchmarks import get_benchmark
from eval.cli import main as eval_main
from eval.paper_figure import ERROR_BAR_LABEL
from eval.paper_grid import build_grid, commands, not_runnable
from eval.paper_report import WANDB_COLUMNS, WANDB_PAIRED_COLUMNS, draw, report, wandb_rows
from eval.papers import SpecError, load

MODEL = "llava-hf/llava-1.5-7b-hf"

GRID_SPEC = """[paper]
key = "ctl"
title = "A grid with controls"
arxiv = "0000.00000"
method = "visionzip"

[[tables]]
id = "Table 1"
model = "llava-hf/llava-1.5-7b-hf"
source = "made up for the test"
controls = ["random", "downsample"]

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
key = "mmmu"
label = "MMMU"
bench = ""
not_run = "not in the harness"

[[tables.rows]]
method = "none"
label = "Vanilla"
published = { gqa = 62.0 }

[[tables.rows]]
method = "fastv"
label = "FastV"
budget = 192
published = { gqa = 52.7 }

[[tables.rows]]
method = "visionzip"
label = "VisionZip"
budget = 192
published = { gqa = 59.3 }

[[tables.rows]]
method = "fastv"
label = "FastV"
budget = 64
published = { gqa = 46.1 }

[[tables.rows]]
method = "visionzip"
label = "VisionZip"
budget = 64
published = { gqa = 55.1 }

[[tables.rows]]
method = "random"
label = "Random"
budget = 64
published = { gqa = 50.0 }
"""


def _spec(tmp_path: Path, text: str, key: str = "ctl") -> Path:
    p = tmp_path / f"{key}.toml"
    p.write_text(text.replace('key = "ctl"', f'key = "{key}"'))
    return p


def _runs(configs) -> set[tuple]:
    return {(c.bench, c.method, c.budget) for c in configs}


# ----------------------------------------------------------------------------------------------- the grid
def test_grid_adds_each_control_at_each_budget_once(tmp_path):
    """Two runnable columns (GQA, MME; MMMU not run) x the six rows' five runs: 12 configs. The controls at the
    budgets of the method rows, 192 and 64: random at 192 (new, 2 configs), random at 64 (the Random row's run
    already: not again), downsample at 64 (s = 3 on LLaVA-1.5's 24 x 24 grid: 2 configs), downsample at 192 (no
    stride reaches 192 on 24 x 24: not run, with why): 12 + 4 = 16."""
    paper = load(str(_spec(tmp_path, GRID_SPEC)))
    assert paper.tables[0].controls == ("random", "downsample")
    assert paper.tables[0].method_budgets == (192, 64)
    grid = build_grid(paper)
    assert len(grid) == 16
    runs = [(c.bench, c.method, c.budget) for c in grid]
    assert len(runs) == len(set(runs))  # each once
    added = _runs(grid) - _runs(build_grid(load(str(_spec(tmp_path, GRID_SPEC.replace(
        'controls = ["random", "downsample"]\n', ""), key="plain")))))
    assert added == {("gqa", "random", 192), ("mme", "random", 192), ("gqa", "downsample", 64),
                     ("mme", "downsample", 64)}
    assert all(c.tables == ("Table 1",) and c.options == () and c.model == MODEL for c in grid if c.method in
               ("random", "downsample"))
    assert "gqa random 192 llava-hf/llava-1.5-7b-hf" in commands(grid, tmp_path / "runs")
    why = [ln for ln in not_runnable(paper) if "control" in ln]
    assert why == ["Table 1 control downsample at budget 192: on llava-hf/llava-1.5-7b-hf: budget 192 is not "
                   "reachable with non-overlapping s x s windows on a 24x24 patch grid; reachable budgets: 576 (s=1), "
                   "144 (s=2), 64 (s=3), 36 (s=4), 25 (s=5), 16 (s=6), 9 (s=8), 4 (s=12), 1 (s=24) (or set `stride`)"]
    # BUDGETS=64: the controls at 64 only (random's is the Random row's run): downsample's 2 configs
    only64 = build_grid(paper, budgets=[64])
    assert {r for r in _runs(only64) if r[1] in ("random", "downsample")} == {
        ("gqa", "random", 64), ("mme", "random", 64), ("gqa", "downsample", 64), ("mme", "downsample", 64)}
    assert not [ln for ln in not_runnable(paper, budgets=[64]) if "control" in ln]
    # the tiny model's 4 x 4 grid keeps every unit whole at 64 and 192 (budget >= 16 patches): both run there
    tiny = build_grid(paper, model="tiny:llava")
    assert ("gqa", "downsample", 192) in _runs(tiny) and len(tiny) == 18
    assert not [ln for ln in not_runnable(paper, model="tiny:llava") if "control" in ln]


def test_controls_flag_adds_random_and_downsample_to_a_spec_without(tmp_path, capsys):
    """``--controls`` on a table whose spec names none: the same 16 configs as the spec's ``controls``; without
    the flag, the spec's 12."""
    path = _spec(tmp_path, GRID_SPEC.replace('controls = ["random", "downsample"]\n', ""))
    paper = load(str(path))
    assert paper.tables[0].controls == () and len(build_grid(paper)) == 12
    assert len(build_grid(paper, controls=True)) == 16
    assert eval_main(["paper-grid", str(path), "--controls", "--dry-run", "--out", str(tmp_path / "runs"),
                      "--data-root", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("ctl: 16 configs")
    assert "gqa random b192" in out and "mme downsample b64" in out
    assert "not run: Table 1 control downsample at budget 192: on llava-hf/llava-1.5-7b-hf: budget 192 is not " \
           "reachable" in out
    assert eval_main(["paper-grid", str(path), "--commands", "--out", str(tmp_path / "runs")]) == 0
    lines = capsys.readouterr().out.splitlines()  # no flag: the Random row's runs (64), no control
    assert len(lines) == 12 and not any(" downsample " in ln or " random 192 " in ln for ln in lines)


@pytest.mark.parametrize("controls,needle", [
    ('["randomm"]', "table 'Table 1' controls: unknown method 'randomm'"),
    ('"random"', "`controls` must be a list of method names"),
    ('["random", "random"]', "`controls` names a method twice"),
])
def test_checker_rejects_a_bad_control(tmp_path, capsys, controls, needle):
    path = _spec(tmp_path, GRID_SPEC.replace('controls = ["random", "downsample"]', f"controls = {controls}"))
    with pytest.raises(SpecError) as e:
        load(str(path))
    assert str(path) in str(e.value) and needle in str(e.value)
    assert eval_main(["paper", "--check", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error {path}") and needle in err


def test_checker_rejects_controls_without_a_budget_and_one_that_does_not_build(tmp_path):
    """A table whose only method row has no budget gives the controls nowhere to run; PruMerge's official
    (adaptive) mode takes no budget, so it does not build at the table's first budget, 192."""
    no_budget = GRID_SPEC.split("[[tables.rows]]\nmethod = \"fastv\"")[0]
    with pytest.raises(SpecError, match="controls: the table has no runnable method row with a `budget`"):
        load(str(_spec(tmp_path, no_budget)))
    path = _spec(tmp_path, GRID_SPEC.replace('controls = ["random", "downsample"]', 'controls = ["prumerge"]'))
    with pytest.raises(SpecError) as e:
        load(str(path))
    assert str(e.value).startswith(f"{path} table 'Table 1' controls: prumerge(budget=192) does not build: prumerge: "
                                   "the adaptive mode")


# ----------------------------------------------------------------------------------------------- the report
REPORT_SPEC = """[paper]
key = "marks"
title = "Controls and marks"
arxiv = "0000.00000"
method = "visionzip"

[[tables]]
id = "Table 1"
model = "llava-hf/llava-1.5-7b-hf"
source = "made up for the test"
controls = ["random", "downsample"]

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

[[tables.rows]]
method = "none"
label = "Vanilla"
published = { gqa = 62.0 }

[[tables.rows]]
method = "fastv"
label = "FastV"
budget = 64
published = { gqa = 46.0 }

[[tables.rows]]
method = "visionzip"
label = "VisionZip"
budget = 64
published = { gqa = 55.0 }
"""

QUESTIONS = {"count": 20, "sha256": "ab" * 32}
BOTH = set(range(10, 20))  # the ten GQA questions every run gets right


def _gqa_units(right: set[int], n: int = 20) -> st.Units:
    return st.Units.from_rows("question", [{"id": f"q{i}", "tags": {"type": "open"},
                                            "v": {"correct": int(i in right)}} for i in range(n)])


def _pope_units(yes: bool) -> st.Units:
    """Six POPE questions of the random split, each labelled yes: answered yes (a true positive) or no (a false
    negative)."""
    v = {"tp": 1, "fp": 0, "fn": 0, "correct": 1} if yes else {"tp": 0, "fp": 0, "fn": 1, "correct": 0}
    return st.Units.from_rows("question", [{"id": f"p{i}", "tags": {"split": "random"}, "v": v} for i in range(6)])


def _run(root: Path, bench: str, method: str, budget, units: st.Units, metric: str, keep_units: bool = True,
         questions: dict | None = None) -> Path:
    """A run folder as `eval run` writes it: results.json (metrics, stderr, units, questions) and units.jsonl."""
    d = root / bench / f"{method}-{budget}"
    d.mkdir(parents=True)
    b = get_benchmark(bench, ".")
    value = st.compute(units, b.stats[metric])
    st.write_units(d, units, bench)
    res = {"schema": "vtprune.eval.results/1", "benchmark": bench, "metrics": {metric: value}, "partial": False,
           "created": "2026-01-01", "model": {"id": MODEL}, "method": {"method": method, "budget": budget},
           "config": {"benchmark": bench, "model": MODEL, "method": method, "budget": budget, "options": {}},
           "tokens": {}, **st.summarize(units, b.stats, {metric: value}),
           "units": {"file": st.UNITS_FILE, "unit": units.unit, "count": len(units),
                     "fingerprint": units.fingerprint()},
           "questions": questions or {**QUESTIONS, "count": len(units)}}
    (d / "results.json").write_text(json.dumps(res))
    if not keep_units:
        (d / st.UNITS_FILE).unlink()
    return d


def _worked(tmp_path: Path, fastv_gqa: dict | None = None, keep_vz: bool = True) -> Path:
    """GQA over 20 questions: the unpruned run right on q0-q8 and q10-q19 (19: 95.0), VisionZip (the paper's
    method) on q0-q7 and q10-q19 (18: 90.0), FastV on q10-q19 (10: 50.0), Random on q1-q9 and q10-q19 (19: 95.0),
    Downsample on q2-q19 (18: 90.0; its units.jsonl missing). POPE (F1 over six yes-labelled questions): every run
    answers yes (F1 100), FastV answers no (F1 0), Downsample's units.jsonl missing."""
    runs = tmp_path / "runs"
    gqa = {"none": (None, set(range(9)) | BOTH), "visionzip": (64, set(range(8)) | BOTH), "fastv": (64, BOTH),
           "random": (64, set(range(1, 10)) | BOTH), "downsample": (64, set(range(2, 20)))}
    for method, (budget, right) in gqa.items():
        kw = (fastv_gqa or {}) if method == "fastv" else {}
        units = kw.pop("units", None) or _gqa_units(right)
        _run(runs, "gqa", method, budget, units, "GQA", keep_units=method != "downsample"
             and (keep_vz or method != "visionzip"), **kw)
        _run(runs, "pope", method, budget, _pope_units(method != "fastv"), "POPE-F1avg3",
             keep_units=method != "downsample")
    return runs


def test_report_shows_control_rows_and_marks_significant_differences(tmp_path):
    """Under 64 tokens, after FastV and VisionZip: Random (control) and Downsample (control), ours ± se, nothing
    published. GQA's se = 100 sqrt(p (1 - p) / 19): FastV 50.0 -> 11.47, VisionZip / Downsample 90.0 -> 6.88,
    Random 95.0 -> 5.00; POPE's F1: every resample of six identical units gives the same F1, se 0.

    Marks against VisionZip (the paper's method). GQA, McNemar: FastV is right on none of q0-q7, which VisionZip
    gets right, and on nothing VisionZip misses: discordant 8 / 0, p = 2 (1/2)^8 = 0.0078125 < 0.05: ⋆. Random
    misses q0 (VisionZip right) and gets q8, q9 (VisionZip wrong): 1 / 2, p = min(1, 2 P(X <= 1), X ~ Bin(3, 1/2))
    = 2 x 4/8 = 1.0: no mark. POPE, paired bootstrap: FastV's F1 is 0 and VisionZip's 100 on every resample (all
    units alike): the interval is [-100, -100], which excludes 0: ⋆; Random's equals VisionZip's: [0, 0]: no mark.
    Downsample has no units.jsonl: no mark, and a note naming both of its cells. 2 of 4 tested cells marked.

    Avg (van.=ours): FastV (50/95 + 0/100) / 2 = 26.3 %; Random (95/95 + 100/100) / 2 = 100.0 %; VisionZip and
    Downsample (90/95 + 100/100) / 2 = 97.4 %. Avg (van.=paper): GQA alone (the only published column: *): FastV
    50/62 = 80.6 %, Random 95/62 = 153.2 %, VisionZip and Downsample 90/62 = 145.2 %; the paper's recomputed:
    FastV 46/62 = 74.2 %, VisionZip 55/62 = 88.7 %. POPE's 100 prints without decimals (an integer from 100 on)."""
    paper = load(str(_spec(tmp_path, REPORT_SPEC, key="marks")))
    runs = _worked(tmp_path)
    text, info = report(paper, [runs], fmt="both")
    md = info["texts"]["md"].splitlines()
    rows = [ln for ln in md if ln.startswith("| ")]
    assert rows[1:] == [
        "| Vanilla | – | 95.0 ± 5.0 / 62.0 (+33.0) ✗ | 100 ± 0.0 / n/p | 100.0% | 153.2%* | – | 100.0%* |",
        "| **64 tokens** | | | | | | | |",
        "| FastV | 64 | 50.0 ± 11.5 ⋆ / 46.0 (+4.0) ✗ | 0.00 ± 0.00 ⋆ / n/p | 26.3% | 80.6%* | – | 74.2%* |",
        "| VisionZip | 64 | 90.0 ± 6.9 / 55.0 (+35.0) ✗ | 100 ± 0.0 / n/p | 97.4% | 145.2%* | – | 88.7%* |",
        "| Random (control) | 64 | 95.0 ± 5.0 / n/p | 100 ± 0.0 / n/p | 100.0% | 153.2%* | – | – |",
        "| Downsample (control) | 64 | 90.0 ± 6.9 / n/p | 100 ± 0.0 / n/p | 97.4% | 145.2%* | – | – |",
    ]
    rep = info["tables"]["Table 1"]
    idx = {r.label: i for i, r in enumerate(rep.table.rows)}
    fastv, rnd = rep.cells[(idx["FastV"], "gqa")].paired, rep.cells[(idx["Random (control)"], "gqa")].paired
    assert fastv.discordant == (8, 0) and fastv.p == 2 * 0.5 ** 8 == 0.0078125
    assert rnd.discordant == (1, 2) and rnd.p == 1.0
    fastv_pope = rep.cells[(idx["FastV"], "pope")].paired
    rnd_pope = rep.cells[(idx["Random (control)"], "pope")].paired
    assert fastv_pope.p is None and (fastv_pope.low, fastv_pope.high) == (-100.0, -100.0)
    assert (rnd_pope.low, rnd_pope.high) == (0.0, 0.0) and rep.cells[(idx["Random (control)"], "pope")].significant \
        is False
    assert rep.cells[(idx["Downsample (control)"], "gqa")].paired is None
    assert rep.cells[(idx["VisionZip"], "gqa")].paired is None  # the paper's method: never against itself
    assert ("- Controls, not rows of the spec: Random (control), Downsample (control): our runs of random, "
            "downsample (default options) at the budget their group's rows run at, in the control's own convention "
            "(visual tokens per image / crop / frame); nothing published.") in md
    assert ("- ⋆ = on our runs, VisionZip and this row differ significantly at 5 %: a paired test over the same "
            "questions (McNemar's exact test, p < 0.05, where the metric is one 0/1 score per unit; the 95 % paired "
            "bootstrap interval of the difference excludes 0 (1000 resamples, seed 0) for the other metrics); 2 of 4 "
            "tested cells marked. No ⋆: no significant difference, or not tested (below).") in md
    assert ("- No ⋆ test for Downsample (control) (64 tokens) GQA, Downsample (control) (64 tokens) POPE: no "
            "per-unit scores in this row's run (units.jsonl; `python -m eval score RUN` writes them from the "
            "answers).") in md
    assert rep.summary_line() == ("0 of 3 published cells reproduced within tolerance, 0 not run (0 cannot be run "
                                  "here)")  # the controls publish nothing: not counted
    tex = info["texts"]["latex"]
    assert "FastV & 64 & 50.0 $\\pm$ 11.5 $^{\\star}$ / 46.0 (+4.0) $^{\\times}$ &" in tex
    assert "Random (control) & 64 & 95.0 $\\pm$ 5.0 / n/p &" in tex
    cols, data = wandb_rows(rep)
    assert cols == WANDB_COLUMNS + WANDB_PAIRED_COLUMNS
    got = {(r[0], r[3]): dict(zip(cols, r)) for r in data}
    assert got[("FastV", "GQA")]["vs_method_p"] == 0.0078125 and got[("FastV", "GQA")]["vs_method_significant"]
    assert got[("FastV", "GQA")]["vs_method_diff"] == -40.0  # 50.0 - 90.0: this row minus the paper's method
    assert got[("Random (control)", "GQA")]["control"] is True and got[("Random (control)", "GQA")][
        "vs_method_significant"] is False
    assert (got[("FastV", "POPE")]["vs_method_low"], got[("FastV", "POPE")]["vs_method_high"]) == (-100.0, -100.0)
    assert got[("Downsample (control)", "GQA")]["vs_method_p"] is None


def test_no_control_rows_without_controls_and_with_the_flag(tmp_path, capsys):
    """The same runs, a spec without ``controls``: no control row (the report as before); ``--controls`` (report's
    ``controls=True``) adds them."""
    path = _spec(tmp_path, REPORT_SPEC.replace('controls = ["random", "downsample"]\n', ""), key="marks")
    paper = load(str(path))
    runs = _worked(tmp_path)
    text, _ = report(paper, [runs])
    assert "(control)" not in text and "Controls, not rows" not in text
    assert "| FastV | 64 | 50.0 ± 11.5 ⋆ / 46.0 (+4.0) ✗ |" in text  # the marks need no control
    assert eval_main(["paper", str(path), str(runs), "--controls"]) == 0
    out = capsys.readouterr().out
    assert "| Random (control) | 64 | 95.0 ± 5.0 / n/p |" in out and "| Downsample (control) | 64 |" in out


def test_no_mark_where_the_question_sets_differ_or_overlap_in_part(tmp_path):
    """FastV's GQA run on another question list (its fingerprint differs): no ⋆ and a note; on the same list but
    19 of the 20 scored units (q19 missing): a partial overlap, no ⋆ and a note; never a comparison of the rest."""
    paper = load(str(_spec(tmp_path, REPORT_SPEC, key="marks")))
    other = {"count": 20, "sha256": "cd" * 32}
    text, info = report(paper, [_worked(tmp_path / "a", {"questions": other})])
    assert "| FastV | 64 | 50.0 ± 11.5 / 46.0 (+4.0) ✗ | 0.00 ± 0.00 ⋆ / n/p |" in text
    assert ("- No ⋆ test for FastV (64 tokens) GQA: different question sets: the paper's method's run has 20 "
            "questions (sha256 abababababab), this row's run has 20 (sha256 cdcdcdcdcdcd).") in text
    text, info = report(paper, [_worked(tmp_path / "b", {"units": _gqa_units(BOTH, n=19),
                                                        "questions": QUESTIONS})])
    assert "| FastV | 64 | 47.4 ± 11.8 / 46.0 (+1.4) ✗ |" in text  # 9 of 19; sqrt(p (1 - p) / 18)
    assert ("- No ⋆ test for FastV (64 tokens) GQA: different scored units: the paper's method's run and this "
            "row's run share 19 questions; 1 only in the first, 0 only in the second.") in text
    assert info["tables"]["Table 1"].significance.marked == 1  # FastV's POPE only


def test_no_mark_and_a_note_when_the_paper_method_s_units_are_missing(tmp_path):
    """VisionZip's GQA units.jsonl gone: no GQA cell can be tested (FastV, Random and Downsample each named);
    POPE as before."""
    paper = load(str(_spec(tmp_path, REPORT_SPEC, key="marks")))
    text, info = report(paper, [_worked(tmp_path, keep_vz=False)])
    assert "| FastV | 64 | 50.0 ± 11.5 / 46.0 (+4.0) ✗ | 0.00 ± 0.00 ⋆ / n/p |" in text
    assert ("- No ⋆ test for FastV (64 tokens) GQA, Random (control) (64 tokens) GQA: no per-unit scores in the "
            "paper's method's run (units.jsonl; `python -m eval score RUN` writes them from the answers).") in text
    assert ("- No ⋆ test for Downsample (control) (64 tokens) GQA: no per-unit scores in the paper's method's run "
            "and this row's run (units.jsonl; `python -m eval score RUN` writes them from the answers).") in text
    assert "1 of 2 tested cells marked" in text


def test_runs_without_units_print_no_mark_and_no_note(tmp_path):
    """Runs written before per-unit scores (no units.jsonl anywhere): the report says nothing of marks."""
    paper = load(str(_spec(tmp_path, REPORT_SPEC, key="marks")))
    runs = _worked(tmp_path)
    for f in runs.rglob(st.UNITS_FILE):
        f.unlink()
    text, info = report(paper, [runs])
    assert "⋆" not in text and "No ⋆" not in text
    assert info["tables"]["Table 1"].significance.tested == 0
    cols, _ = wandb_rows(info["tables"]["Table 1"])
    assert cols == WANDB_COLUMNS + WANDB_PAIRED_COLUMNS  # control rows: the extra columns say which they are


# ----------------------------------------------------------------------------------------------- the figure
def test_figure_draws_one_standard_error_bars(tmp_path):
    """The GQA panel: an error bar of ± 1 se at each of ours with one (FastV 50.0 ± 11.4708 at x = 64:
    sqrt(0.25 / 19) = 0.114708), the unpruned row's band 95.0 ± 5.0 (sqrt(0.95 x 0.05 / 19) = 0.05: 90 to 100),
    and the legend says what the bars span."""
    paper = load(str(_spec(tmp_path, REPORT_SPEC, key="marks")))
    _, info = report(paper, [_worked(tmp_path)], figures_dir=tmp_path / "figs")
    assert Path(info["figures"]["Table 1"]).is_file()
    fig = draw(paper, info["tables"]["Table 1"])
    ax = next(a for a in fig.axes if a.get_title() == "GQA")
    bars = {c.get_label(): c.lines[2][0].get_segments() for c in ax.containers}
    se = 100 * math.sqrt(0.25 / 19)
    (seg,) = bars["_FastV ± 1 standard error"]
    assert seg[0][0] == seg[1][0] == 64 and seg[0][1] == pytest.approx(50 - se) and seg[1][1] == pytest.approx(50 + se)
    assert set(bars) == {"_FastV ± 1 standard error", "_VisionZip ± 1 standard error",
                         "_Random (control) ± 1 standard error", "_Downsample (control) ± 1 standard error"}
    (band,) = ax.patches
    assert band.get_y() == pytest.approx(90.0) and band.get_height() == pytest.approx(10.0)
    labels = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert labels[-1] == ERROR_BAR_LABEL == "ours ± 1 standard error"
    assert "Random (control)" in labels


def test_a_table_of_one_s_own_gets_control_rows_and_marks_too(tmp_path):
    """The same runs against a table of one's own (nothing published): the control rows show ours and the
    difference to the unpruned row (Random 95.0 - 95.0 = +0.0), the marks as before, and the summary counts the
    table's own cells only (3 rows x 2 columns: 6 of 6), not the controls'."""
    own = REPORT_SPEC.replace('source = "made up for the test"\n', "")
    for pub in ("{ gqa = 62.0 }", "{ gqa = 46.0 }", "{ gqa = 55.0 }"):
        own = own.replace(f"published = {pub}\n", "")
    paper = load(str(_spec(tmp_path, own, key="marks")))
    assert paper.tables[0].own
    text, _ = report(paper, [_worked(tmp_path)])
    assert "| FastV | 64 | 50.0 ± 11.5 ⋆ (-45.0) | 0.00 ± 0.00 ⋆ (-100.00) | 26.3% |" in text
    assert "| Random (control) | 64 | 95.0 ± 5.0 (+0.0) | 100 ± 0.0 (+0.0) | 100.0% |" in text
    assert "- 6 of 6 cells run." in text.splitlines()
