"""The paper report and ``eval table`` say what each cell of ours ran (issue 63): the model and its revision, the
questions answered of the benchmark's full count, the protocol deviations; a cell from another model than the
spec's (§) or from a partial question set (¶) is marked in the table, carries no ✗ and is not counted, and the W&B
cells table carries the same marks. Also: the standard error where a metric has one, display names, no absolute
path in a heading, one "unverified" line per reason, the figure's series (a colour and a marker each, one legend
entry each, a title that says what ran), the "wrote" line naming every file, ``--list``'s aligned columns and whole
titles, and no citation of notes outside the repository in the specs or the generated text."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval.paper_cli import list_text
from eval.paper_report import draw, report, series, wandb_rows
from eval.papers import list_papers, load, load_all
from eval.table import DISPLAY, FULL_QUESTIONS, make_table, stderr

REPO = Path(__file__).resolve().parents[1]

SPEC = """
[paper]
key = "truth"
title = "Truth: a worked example"
arxiv = "0000.00001"
method = "visionzip"

[[tables]]
id = "Table 1"
model = "llava-hf/llava-1.5-7b-hf"
source = "made up for the test"

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
published = { gqa = 62.0, pope = 85.9 }
unverified = "read from a transcription"

[[tables.rows]]
method = "fastv"
label = "FastV"
budget = 64
options = { numerics = "official" }
published = { gqa = 46.0, pope = 48.0 }
unverified = "read from a transcription"

[[tables.rows]]
method = "visionzip"
label = "VisionZip"
budget = 64
published = { gqa = 55.0, pope = 77.0 }
unverified = "read from a transcription"

[[tables.rows]]
method = "visionzip"
label = "VisionZip"
budget = 192
published = { gqa = 59.3, pope = 85.3 }
unverified = "read from a transcription"
"""


def spec(tmp_path, text=SPEC):
    p = tmp_path / "truth.toml"
    p.write_text(text)
    return load(str(p))


def run(root, bench, metrics, method, budget, *, model="llava-hf/llava-1.5-7b-hf", options=None, answered=None,
        questions=None, deviations=(), limit=None, details=None, fingerprint=None, revision=None, name=None):
    """A run folder as the harness writes it: results.json (counts, protocol, details) and run_config.json (the
    model's fingerprint)."""
    d = root / bench / (name or f"{method}-{budget}")
    d.mkdir(parents=True)
    cfg = {"benchmark": bench, "model": model, "revision": revision, "method": method, "budget": budget,
           "options": options or {}, "next_layout": "spatial_unpad", "num_frames": 8, "limit": limit}
    r = {"schema": "vtprune.eval.results/1", "benchmark": bench, "metrics": metrics, "partial": limit is not None,
         "primary_metric": next(iter(metrics)), "created": "2026-01-01", "model": {"id": model},
         "method": {"method": method, "budget": budget, **(options or {})}, "config": cfg, "tokens": {},
         "protocol": {"follows_protocol": not deviations, "deviations": list(deviations)},
         "details": {"finalize": details or {}}}
    if answered is not None:
        r["counts"] = {"questions": questions if questions is not None else answered, "answered": answered}
    (d / "results.json").write_text(json.dumps(r))
    if fingerprint is not None:
        (d / "run_config.json").write_text(json.dumps({"fingerprint": {"model": fingerprint}}))
    return d


# ----------------------------------------------------------------------------------------------- defect 1
def test_tiny_model_on_fixture_data_is_named_counted_and_marked(tmp_path):
    """The issue's case: ``MODEL=tiny:llava`` on fixture data (6 POPE questions). Each cell of ours says tiny:llava
    and 6 of POPE's 8,910 questions; it is marked § ¶ (no ✗ although 66.7 is 19.2 below 85.9), not counted in the
    summary, not used as the vanilla setup check; the deviation (max_new_tokens) is named; LaTeX the same; the W&B
    cells carry the marks, the model and the counts."""
    paper = spec(tmp_path)
    runs = tmp_path / "runs"
    fp = {"id": "tiny:llava", "seed": 0}
    dev = ["max_new_tokens=4 (protocol: 128)"]
    run(runs, "pope", {"POPE-F1avg3": 66.66666666666666}, "none", None, model="tiny:llava", answered=6,
        deviations=dev, fingerprint=fp)
    run(runs, "pope", {"POPE-F1avg3": 66.66666666666666}, "visionzip", 64, model="tiny:llava", answered=6,
        deviations=dev, fingerprint=fp)
    text, info = report(paper, [runs], fmt="both", model="tiny:llava")
    md, tex = info["texts"]["md"], info["texts"]["latex"]
    lines = md.splitlines()
    assert "| Vanilla † | – | – / 62.0 | 66.7 §¶ / 85.9 (-19.2) |" in md  # marked, no ✗
    assert "| VisionZip † | 64 | – / 55.0 | 66.7 §¶ / 77.0 (-10.3) |" in md
    assert not any("✗" in ln for ln in lines if ln.startswith("| "))
    assert "- Model (the spec's) llava-hf/llava-1.5-7b-hf; budgets in the paper's convention (as printed)." in lines
    assert "- Ran: tiny:llava (random weights, seed 0) §: 2 cells." in lines
    assert "- Questions answered per cell (of the benchmark's full count): POPE 6 of 8,910 ¶ (2 cells)." in lines
    assert "- Protocol deviations: max_new_tokens=4 (protocol: 128) (2 cells)." in lines
    assert any(ln.startswith("- § = ran on another model than the spec's; ¶ = answered fewer questions")
               for ln in lines)
    rep = info["tables"]["Table 1"]
    # published 8 cells, none comparable: 0 within, 6 not run, 2 marked
    assert rep.summary_line() == ("0 of 8 published cells reproduced within tolerance, 6 not run (0 cannot be run "
                                  "here); 2 ran on another model or a partial question set (§ / ¶), not counted")
    assert rep.summary["outside"] == 0
    assert rep.vanilla_line == ("Vanilla first: not compared (our unpruned cells ran on another model or a partial "
                                "question set: § / ¶).")
    assert "66.7 $\\S$$\\P$ / 85.9 (-19.2) &" in tex and "% Ran: tiny:llava (random weights, seed 0)" in tex
    assert "\\times" not in "".join(ln for ln in tex.splitlines() if " & " in ln)
    cols, rows = wandb_rows(rep)
    got = {(r[1], r[2], r[3]): dict(zip(cols, r)) for r in rows}
    c = got[("visionzip", 64, "POPE")]
    assert (c["ours"], c["paper"], c["within_tolerance"], c["marks"], c["model"], c["revision"], c["answered"],
            c["full_count"], c["deviations"]) == (pytest.approx(66.6667, abs=1e-4), 77.0, None, "§¶", "tiny:llava",
                                                  "random weights, seed 0", 6, 8910, "max_new_tokens=4 (protocol: 128)")
    assert got[("visionzip", 64, "GQA")]["marks"] == ""  # not run: nothing to mark


def test_spec_model_on_the_full_set_is_unmarked_and_counted(tmp_path):
    """The spec's model (its hub revision from the fingerprint) on all 8,910 POPE questions: no mark, the ✗ verdict
    and the count as before; a local folder of the same name is the same model, shown by its folder name only."""
    paper = spec(tmp_path)
    runs = tmp_path / "runs"
    run(runs, "pope", {"POPE-F1avg3": 85.5}, "none", None, answered=8910,
        fingerprint={"id": "llava-hf/llava-1.5-7b-hf", "revision": "a272c74b2481d8aff3aa6fc2c4bf891fe57334fb"})
    run(runs, "pope", {"POPE-F1avg3": 75.0}, "visionzip", 64, answered=8910, name="local",
        model="/ckpt/models/llava-1.5-7b-hf", fingerprint={"id": "/ckpt/models/llava-1.5-7b-hf",
                                                          "config_sha256": "0123456789abcdef0123"})
    text, info = report(paper, [runs])
    assert "| Vanilla † | – | – / 62.0 | 85.5 / 85.9 (-0.4) |" in text
    text2, info2 = report(paper, [runs], model="/ckpt/models/llava-1.5-7b-hf")
    assert "| VisionZip † | 64 | – / 55.0 | 75.0 / 77.0 (-2.0) ✗ |" in text2  # -2.0 > 1: a verdict, unmarked
    assert "- Ran: llava-hf/llava-1.5-7b-hf (revision a272c74b2481): 1 cell." in text
    assert ("- Ran: llava-1.5-7b-hf (local folder, config.json sha256 0123456789ab): 1 cell." in text2
            and "/ckpt" not in text2)
    assert "POPE 8,910 of 8,910 (1 cell)" in text and "¶" not in text and "§" not in text
    assert info["tables"]["Table 1"].summary_line() == ("1 of 8 published cells reproduced within tolerance, 7 not "
                                                        "run (0 cannot be run here)")


def test_limit_run_and_unlisted_benchmark_counts(tmp_path):
    """A ``--limit 10`` run is partial (¶, the limit named) even on the spec's model; a benchmark without a recorded
    full count says how many the data held."""
    paper = spec(tmp_path)
    runs = tmp_path / "runs"
    run(runs, "gqa", {"GQA": 60.0}, "none", None, answered=10, questions=10, limit=10,
        deviations=["limit=10 (partial run)"])
    text, info = report(paper, [runs], include_partial=True)
    assert "| Vanilla † | – | 60.0 ¶ / 62.0 (-2.0) |" in text
    assert "GQA 10 of 12,578 ¶ (1 cell)" in text and "Protocol deviations: limit=10 (partial run) (1 cell)." in text
    from eval.paper_report import run_facts

    facts = run_facts({"benchmark": "shapes", "counts": {"questions": 400, "answered": 400}}, "tiny:llava")
    assert facts["full"] is None and facts["partial"] is False and facts["answered"] == 400


# ----------------------------------------------------------------------------------------------- standard error
def test_standard_error_of_a_mean_of_0_1_scores(tmp_path):
    """sqrt(p (1 - p) / (n - 1)) x 100, lmms-eval's stderr of a mean: GQA 50.0 over 6 questions -> sqrt(0.25 / 5)
    = 0.22361 -> 22.36; SQA-IMG 75.0 over its 4 image questions -> sqrt(0.1875 / 3) = 25.0; POPE's F1 has none; in
    the paper report and in ``eval table``."""
    g = {"benchmark": "gqa", "metrics": {"GQA": 50.0}, "details": {"finalize": {"samples": 6}}}
    assert stderr(g, "GQA") == pytest.approx(100 * math.sqrt(0.25 / 5))
    s = {"metrics": {"SQA-IMG": 75.0, "SQA-all": 50.0}, "details": {"finalize": {"total": 9, "img_total": 4}}}
    assert stderr(s, "SQA-IMG") == pytest.approx(25.0)
    assert stderr(s, "SQA-all") == pytest.approx(100 * math.sqrt(0.25 / 8))
    pope = {"details": {"finalize": {"pooled": {"n": 6}}}}
    assert stderr({**pope, "metrics": {"POPE-F1avg3": 66.7}}, "POPE-F1avg3") is None
    assert stderr({**pope, "metrics": {"POPE-acc-pooled": 50.0}}, "POPE-acc-pooled") == pytest.approx(22.36068, abs=1e-5)
    assert stderr({"metrics": {"GQA": 50.0}, "details": {"finalize": {"samples": 1}}}, "GQA") is None  # n < 2
    paper = spec(tmp_path)
    runs = tmp_path / "runs"
    run(runs, "gqa", {"GQA": 50.0}, "none", None, details={"samples": 6})
    text, _ = report(paper, [runs])
    assert "| Vanilla † | – | 50.0 ± 22.4 / 62.0 (-12.0) ✗ |" in text
    assert "± = standard error of ours" in text
    table = make_table([runs])
    assert "| Vanilla (unpruned) | – | 50.0 ± 22.4 | – | – | 100.0% |" in table
    assert "± = standard error of a mean of per-question 0/1 scores" in table


# ----------------------------------------------------------------------------------------------- friction
def test_display_names_and_no_absolute_path_in_eval_table(tmp_path):
    runs = tmp_path / "runs"
    run(runs, "gqa", {"GQA": 50.0}, "consensusdrop", 64, model="/abs/models/llava-1.5-7b-hf")
    md = make_table([runs])
    assert md.splitlines()[0] == "### llava-1.5-7b-hf" and "/abs/" not in md
    assert "| ConsensusDrop | 64 | 50.0 |" in md and "consensusdrop" not in md
    from llava.method import available_methods

    # every method has its printed name (methods other tests register are named test_*)
    assert {m for m in available_methods() if not m.startswith("test_")} <= set(DISPLAY)


def test_unverified_note_once_per_reason(tmp_path):
    """Four rows (three labels) share one reason: one line, each label once (was one line per row)."""
    text, _ = report(spec(tmp_path), [])
    lines = [ln for ln in text.splitlines() if "†" in ln and ln.startswith("- ")]
    assert lines == ["- † Unverified, every row: read from a transcription."]
    two = SPEC.replace('budget = 192\npublished = { gqa = 59.3, pope = 85.3 }\nunverified = "read from a transcription"',
                       'budget = 192\npublished = { gqa = 59.3, pope = 85.3 }\nunverified = "another reason"')
    text, _ = report(spec(tmp_path, two), [])
    lines = [ln for ln in text.splitlines() if "†" in ln and ln.startswith("- ")]
    assert lines == ["- † Unverified (read from a transcription): Vanilla, FastV, VisionZip.",
                     "- † Unverified (another reason): VisionZip."]


def test_figure_series_legend_and_title(tmp_path):
    """One series per row label, each its own colour and marker (the paper's method purple); the legend names each
    series once plus the four style keys; the title says what ran when it is not the spec's model."""
    paper = spec(tmp_path, SPEC + '\n[[tables.rows]]\nmethod = "consensusdrop"\nlabel = "ConsensusDrop"\nbudget = 64\n'
                                  'published = { gqa = 50.0 }\n')
    t = paper.tables[0]
    ser = series(paper, t)
    assert [s["label"] for s in ser] == ["FastV", "VisionZip", "ConsensusDrop"]
    assert len({s["colour"] for s in ser}) == 3 and len({s["marker"] for s in ser}) == 3
    assert ser[1]["colour"] == "tab:purple" and ser[2]["colour"] == "tab:red"
    runs = tmp_path / "runs"
    run(runs, "gqa", {"GQA": 40.0}, "fastv", 64, model="tiny:llava", options={"numerics": "official"}, answered=6)
    text, info = report(paper, [runs], model="tiny:llava")
    fig = draw(paper, info["tables"]["Table 1"])
    labels = [x.get_text() for lg in fig.legends for x in lg.get_texts()]
    assert labels == ["FastV", "VisionZip", "ConsensusDrop", "ours", "paper's", "unpruned, ours", "unpruned, paper's"]
    title = fig._suptitle.get_text()
    assert title.startswith("Truth, Table 1: ours (filled markers, lines) vs the paper's numbers (open markers)")
    assert "ours ran on tiny:llava, not the spec's llava-hf/llava-1.5-7b-hf" in title
    assert "1 of 1 cells of ours answered only part of the questions" in title


def test_wrote_line_names_every_file(tmp_path):
    paper = spec(tmp_path)
    out = tmp_path / "rep" / "truth"
    out.parent.mkdir()
    (tmp_path / "none").mkdir()  # no results yet: the report and the figure are still written
    r = subprocess.run([sys.executable, "-m", "eval", "paper", paper.path, str(tmp_path / "none"), "--format", "both",
                        "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "WANDB_MODE": "disabled"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote {out}.md, {out}.tex and {out.parent / 'truth-table-1.png'}"
    assert (out.parent / "truth-table-1.png").exists()


def test_list_columns_aligned_and_titles_whole():
    papers = load_all()
    text = list_text(papers)
    lines = text.splitlines()
    heads = [ln for ln in lines if not ln.startswith(" ")]
    assert len(heads) == len(papers)
    for p in papers:  # every title whole, never cut mid-word
        assert any(ln.endswith(p.title) for ln in heads), p.key
    # the arXiv column starts at one offset on every paper line; the model and the counts on every table line
    assert len({ln.index(" arXiv ") for ln in heads}) == 1
    tables = [ln for ln in lines if ln.startswith("    ") and " columns x " in ln]
    assert len({ln.index(t.model) for ln, t in zip(tables, [t for p in papers for t in p.tables])}) == 1
    assert len({ln.index(" columns x ") for ln in tables}) == 1


def test_no_citation_of_notes_outside_the_repository():
    """The specs and every generated report cite only sources a reader can reach, never this workplace's own
    notes folder."""
    for f in sorted((REPO / "eval" / "papers").glob("*")):
        if f.is_file():
            body = f.read_text()
            assert "shared/" not in body and "paper-tables.md" not in body, f.name
    for k in list_papers():
        text, _ = report(load(k), [], fmt="both")
        assert "shared/" not in text and "paper-tables" not in text, k


def test_full_counts_are_the_llava_question_files():
    """The counts the partial-set mark is judged against (LLaVA-1.5's eval.zip question files), and docs/papers.md
    states the same ones."""
    assert FULL_QUESTIONS == {"gqa": 12578, "mme": 2374, "pope": 8910, "sqa": 4241, "textvqa": 5000,
                              "textvqa_noocr": 5000, "vqav2": 107394, "vqav2_val": 214354, "vizwiz": 8000,
                              "mmvet": 218, "mmbench": 4377}
    doc = " ".join((REPO / "docs" / "papers.md").read_text().split())
    named = {"gqa": "GQA", "mme": "MME", "pope": "POPE", "sqa": "ScienceQA", "textvqa": "TextVQA",
             "vqav2": "VQAv2 test-dev", "vizwiz": "VizWiz", "mmvet": "MM-Vet", "mmbench": "MMBench dev"}
    for key, name in named.items():
        assert f"{name} {FULL_QUESTIONS[key]:,}" in doc, name


LMMS_SPEC = SPEC.replace('''[[tables.columns]]
key = "pope"''', '''[[tables.columns]]
key = "mmmu"
label = "MMMU"
lmms_task = "mmmu_val"
lmms_metric = "mmmu_acc"

[[tables.columns]]
key = "pope"''').replace("published = { gqa = 62.0, pope = 85.9 }", "published = { gqa = 62.0, mmmu = 36.3, pope = 85.9 }")


def lmms_run(root, value, stderr_value, effective, original=900):
    """An lmms-eval column's lmms_results.json (as eval lmms-import writes it) and lmms-eval's own results file."""
    d = root / "lmms" / "mmmu_val" / f"none-{effective}"
    d.mkdir(parents=True)
    src = d / "lmms" / "20261124_results.json"
    src.parent.mkdir()
    src.write_text(json.dumps({"results": {"mmmu_val": {"mmmu_acc,none": value, "mmmu_acc_stderr,none": stderr_value}},
                               "n-samples": {"mmmu_val": {"original": original, "effective": effective}}}))
    (d / "lmms_results.json").write_text(json.dumps({
        "schema": "vtprune.eval.lmms/1", "benchmark": "lmms:mmmu_val", "created": f"2026-01-0{1 + effective % 7}",
        "config": {"benchmark": "lmms:mmmu_val", "model": "llava-hf/llava-1.5-7b-hf", "method": "none",
                   "budget": None, "options": {}},
        "model": {"id": "llava-hf/llava-1.5-7b-hf"}, "method": {"method": "none", "budget": None},
        "metrics": {"mmmu_acc": value},
        "lmms": {"results_file": str(src), "n_samples": {"original": original, "effective": effective}}}))


def test_lmms_column_stderr_and_counts(tmp_path):
    """A column run through lmms-eval: its own stderr scaled as the value (0.016 x 100 = 1.6), its n-samples as the
    counts (900 of 900: unmarked; 100 of 900 from a --limit: ¶, not counted)."""
    paper = spec(tmp_path, LMMS_SPEC)
    runs = tmp_path / "runs"
    lmms_run(runs, 0.359, 0.016, 900)
    text, info = report(paper, [runs])
    assert "| Vanilla † | – | – / 62.0 | 35.9 ± 1.6 / 36.3 (-0.4) | – / 85.9 |" in text
    assert "MMMU 900 of 900 (1 cell)" in text
    other = tmp_path / "other"
    lmms_run(other, 0.40, "N/A", 100)  # lmms-eval printed N/A: no ±
    text, info = report(paper, [other])
    assert "| Vanilla † | – | – / 62.0 | 40.0 ¶ / 36.3 (+3.7) | – / 85.9 |" in text
    assert "MMMU 100 of 900 ¶ (1 cell)" in text
