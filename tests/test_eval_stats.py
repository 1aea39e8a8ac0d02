"""How sure is a difference (eval/stats.py, eval/compare.py, ``eval table --control``): standard errors worked out
by hand, McNemar's exact p, a bootstrap that reproduces with its seed and lies within analytic bounds, the units of
MME and MMBench, VTC-Bench's groups on a handmade control, every fixture benchmark's metrics recomputed from its
units, and the refusals (different question sets, a missing control, a server's score)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from eval import stats as st
from eval.benchmarks import BENCHMARKS, get_benchmark
from eval.cli import main as eval_main
from eval.compare import compare
from eval.pairing import CompareError
from eval.io import write_json
from eval.table import make_table, stderr


def units_of(correct, unit="question", **tags):
    rows = [{"id": str(i), "tags": {k: v[i] for k, v in tags.items()}, "v": {"correct": c}} for i, c in enumerate(correct)]
    return st.Units.from_rows(unit, rows)


# -- standard errors -----------------------------------------------------------------------------------------------


def test_standard_error_of_an_accuracy_by_hand():
    """7 of 10 right: p = 0.7, sqrt(0.7 x 0.3 / 9) x 100 = 15.2753; the Shapes benchmark's own Stat gives it, and
    a per-type metric counts only its questions (attribute: 2 of 4 -> sqrt(0.25 / 3) x 100 = 28.8675)."""
    qtype = ["attribute"] * 4 + ["counting"] * 6
    u = units_of([1, 0, 1, 0, 1, 1, 1, 1, 1, 0], qtype=qtype, salience=["small"] * 10)
    shapes = BENCHMARKS["shapes"].stats
    e = st.estimate(u, shapes["Shapes"])
    assert (e.value, e.n, e.method) == (70.0, 10, "binomial")
    assert e.se == pytest.approx(15.275252, abs=1e-6)
    a = st.estimate(u, shapes["Shapes-attribute"])
    assert (a.value, a.n) == (50.0, 4) and a.se == pytest.approx(28.867513, abs=1e-6)
    assert st.binomial_se(100.0, 1) is None  # below n = 2: none


def test_mcnemar_exact_p_by_hand():
    # b = 1, c = 5: n = 6, P(X <= 1) = (1 + 6) / 64, two-sided 14 / 64
    assert st.mcnemar_exact(1, 5) == pytest.approx(14 / 64)
    assert st.mcnemar_exact(5, 1) == pytest.approx(14 / 64)
    assert st.mcnemar_exact(0, 8) == pytest.approx(2 / 256)  # 0.0078125
    assert st.mcnemar_exact(2, 2) == 1.0  # capped at 1
    assert st.mcnemar_exact(0, 0) == 1.0


def test_paired_mcnemar_counts_the_discordant_units():
    a = units_of([1, 1, 0, 0, 1, 0, 1, 1])
    b = units_of([1, 0, 1, 1, 1, 1, 1, 1])
    p = st.paired(a, b, st.Stat(binomial=True), resamples=200)
    assert p.discordant == (1, 3)  # right only in a: unit 1; only in b: units 2, 3, 5
    assert p.p == pytest.approx(2 * (1 + 4) / 16)  # min(1, 2 P(X <= 1), X ~ Bin(4, 1/2)) = 10 / 16
    assert p.diff == pytest.approx(25.0) and p.n == 8


def test_bootstrap_reproduces_with_its_seed_and_lies_within_analytic_bounds():
    """A mean of 400 values, half 1 half 0, scored as a non-binary mean (a bootstrap): its standard error is close
    to the analytic sqrt(p (1 - p) / n) x 100 = 2.5 (within 10 %); the same seed gives the same figure, another
    seed another; a constant metric has a standard error of 0, and a run against itself an interval [0, 0]."""
    rows = [{"id": str(i), "v": {"acc": i % 2}} for i in range(400)]
    u = st.Units.from_rows("question", rows, ("acc", 1.0))
    stat = st.Stat(key="acc")
    e1, e2 = st.estimate(u, stat, 2000, seed=3), st.estimate(u, stat, 2000, seed=3)
    assert e1.method == "bootstrap" and e1.se == e2.se
    assert 2.25 <= e1.se <= 2.75
    assert st.estimate(u, stat, 2000, seed=4).se != e1.se
    const = st.Units.from_rows("question", [{"id": str(i), "v": {"acc": 1}} for i in range(50)], ("acc", 1.0))
    assert st.estimate(const, stat, 200).se == 0.0
    same = st.paired(u, u, stat, 500)
    assert (same.diff, same.low, same.high) == (0.0, 0.0, 0.0)
    # the interval of a difference lies within the metric's range of differences, and holds the point difference
    other = st.Units.from_rows("question", [{"id": str(i), "v": {"acc": int(i % 4 == 0)}} for i in range(400)], ("acc", 1.0))
    d = st.paired(u, other, stat, 1000)
    assert d.diff == pytest.approx(-25.0) and -100 <= d.low <= d.diff <= d.high <= 100


def test_mme_unit_is_an_image_and_the_score_the_sum_of_subtask_means():
    """existence: image 1 both right (acc 2 of 2, acc+ 1), image 2 one right -> acc 75, acc+ 50, subtask 125; the
    units carry 50 x right + 100 x both (200 and 50), mean 125. OCR: one image, none right -> 0. MME-P = 125."""
    from eval.scorers import mme_task_score

    rows = [("1.jpg", "q", "Yes", "Yes"), ("1.jpg", "q", "No", "No"), ("2.jpg", "q", "Yes", "Yes"), ("2.jpg", "q", "No", "Yes")]
    t = mme_task_score(rows)
    assert (t["acc"], t["acc_plus"], t["score"]) == (75.0, 50.0, 125.0)
    assert t["units"] == [{"image": "1.jpg", "right": 2, "both": 1}, {"image": "2.jpg", "right": 1, "both": 0}]
    mme = BENCHMARKS["mme"]
    u = st.Units.from_rows("image", [
        {"id": "existence/1.jpg", "tags": {"task": "existence"}, "v": {"score": 200, "both": 1}},
        {"id": "existence/2.jpg", "tags": {"task": "existence"}, "v": {"score": 50, "both": 0}},
        {"id": "OCR/3.jpg", "tags": {"task": "OCR"}, "v": {"score": 0, "both": 0}}], mme.difficulty)
    assert st.compute(u, mme.stats["MME-P"]) == 125.0
    assert st.compute(u, mme.stats["MME-C"]) != st.compute(u, mme.stats["MME-C"])  # no cognition subtask: NaN
    # the bootstrap keeps each subtask's size (strata): OCR's one image always 0, existence's mean in [50, 200]
    draws = st.compute(u, mme.stats["MME-P"], st.resample(u, "task", 300))
    assert draws.min() >= 50.0 and draws.max() <= 200.0


def test_mmbench_unit_is_a_circular_group():
    """Question 1 and its circular copy 1000001: both right -> the group is right; question 2 alone, wrong. MMB-dev
    = 1 of 2 groups = 50; the single-row rate = 2 of 3 rows; its standard error is the binomial one over the 3 rows
    (sqrt(2/3 x 1/3 / 2) x 100 = 33.33), CircularEval's over the 2 groups (sqrt(0.25 / 1) x 100 = 50)."""
    from eval.scorers import score_mmbench_local

    rows = [{"index": 1, "answer": "A", "choices": {"A": "x", "B": "y"}, "category": "c", "l2-category": "l", "split": "dev"},
            {"index": 1000001, "answer": "B", "choices": {"A": "y", "B": "x"}, "category": "c", "l2-category": "l", "split": "dev"},
            {"index": 2, "answer": "A", "choices": {"A": "x", "B": "y"}, "category": "c", "l2-category": "l", "split": "dev"}]
    recs = [{"question_id": 1, "round_id": 0, "text": "A"}, {"question_id": 1000001, "round_id": 0, "text": "B"},
            {"question_id": 2, "round_id": 0, "text": "B"}]
    res = score_mmbench_local(recs, rows)
    assert res["accuracy"] == 50.0 and res["single_row_accuracy"] == pytest.approx(200 / 3)
    by = {u["id"]: u for u in res["units"]}
    assert by["1"]["v"] == {"circular": 1, "rounds": 1, "right": 2, "rows": 2} and by["2"]["v"]["circular"] == 0
    mmb = BENCHMARKS["mmbench"]
    u = st.Units.from_rows(mmb.unit, res["units"], mmb.difficulty)
    dev, local = st.estimate(u, mmb.stats["MMB-dev"]), st.estimate(u, mmb.stats["MMB-dev-local"])
    assert (dev.value, dev.n, dev.se) == (50.0, 2, pytest.approx(50.0))
    assert (local.value, local.n) == (pytest.approx(200 / 3), 3) and local.se == pytest.approx(100 * math.sqrt(2 / 9 / 2))


def test_groups_a_and_b_on_a_handmade_control():
    """The control gets questions 0, 1, 2 wrong (group A) and 3, 4, 5 right (B); the run gets 0 and 3, 4 right:
    1 of 3 in A (33.33 ± sqrt(1/3 x 2/3 / 2) x 100 = 33.33), 2 of 3 in B."""
    control = units_of([0, 0, 0, 1, 1, 1])
    run = units_of([1, 0, 0, 1, 1, 0])
    a, b = st.difficult_groups(control)
    assert (a, b) == ({"0", "1", "2"}, {"3", "4", "5"})
    g = st.on_groups(run, control, st.Stat(binomial=True))
    assert (g["A"].value, g["A"].n) == (pytest.approx(100 / 3), 3) and g["A"].se == pytest.approx(100 / 3)
    assert (g["B"].value, g["B"].n) == (pytest.approx(200 / 3), 3)
    # soft accuracy: full marks only at 1.0 (0.67 is difficult)
    soft = st.Units.from_rows("question", [{"id": "x", "v": {"acc": 2 / 3}}, {"id": "y", "v": {"acc": 1}}], ("acc", 1.0))
    assert st.difficult_groups(soft) == ({"x"}, {"y"})


def test_every_fixture_benchmark_recomputes_its_metrics_from_its_units(tmp_path):
    """Each locally scored benchmark on its fixture data, with answers drawn at random (30 draws): every metric the
    official scoring gives is the one its Stat computes from the units finalize returns, and every metric has one."""
    from eval.fixtures import write_fixtures

    root = write_fixtures(tmp_path / "data")
    words = ["Yes", "No", "yes", "no", "A", "B", "C", "D", "red", "2", "cat", "Yes, there is.", "No."]
    seen = {}
    for name, cls in BENCHMARKS.items():
        if cls.needs_server or cls.needs_judge or name.startswith("shapes"):
            continue
        b = get_benchmark(name, root)
        qs = b.load()
        for seed in range(30):
            rng = random.Random(seed)
            recs = [b.record(q, rng.choice(words), "m") for q in qs]
            fin = b.finalize(recs, tmp_path / f"{name}-{seed}", "ckpt", strict=True)
            u = st.Units.from_rows(b.unit, fin["units"], b.difficulty)
            for metric, value in fin["metrics"].items():
                assert metric in b.stats, (name, metric)
                assert st.compute(u, b.stats[metric]) == pytest.approx(value, abs=1e-9), (name, metric, seed)
                seen.setdefault((name, metric), set()).add(round(value, 6))
    assert {n for n, _ in seen} >= {"gqa", "pope", "mme", "sqa", "mmbench", "mmbench_cn", "seed", "textvqa", "vqav2_val"}
    # the draws gave varied scores (a test over constant zeros would prove little)
    assert all(len(v) > 1 for (n, m), v in seen.items() if m in ("GQA", "POPE-F1avg3", "MME-P+C", "TextVQA-OCR"))


def test_judged_units_reproduce_the_video_qa_aggregation():
    from eval.scorers import score_videoqa

    j = {"a": {"pred": "yes", "score": 4}, "b": {"pred": "no", "score": 1}, "c": {"pred": None, "score": 3},
         "d": {"pred": "yes", "score": "x"}}
    res = score_videoqa(j)
    vq = BENCHMARKS["msvd"]
    u = st.Units.from_rows(vq.unit, res["units"], vq.difficulty)
    assert st.compute(u, vq.stats["MSVD-QA-acc"]) == pytest.approx(res["accuracy"]) == 50.0
    assert st.compute(u, vq.stats["MSVD-QA-score"]) == pytest.approx(res["score"]) == 2.0


# -- runs on disk: results.json, compare, table ------------------------------------------------------------------


def fake_run(folder: Path, method: str, budget, correct, bench="shapes", n_opt=None, sha="q1", server=None):
    """A finished Shapes run folder: results.json and units.jsonl (one question per entry of ``correct``)."""
    folder.mkdir(parents=True, exist_ok=True)
    u = units_of(correct, qtype=["attribute"] * len(correct), salience=["small"] * len(correct))
    st.write_units(folder, u, bench)
    b = get_benchmark(bench, ".")
    metrics = {"Shapes": st.compute(u, b.stats["Shapes"])}
    unc = st.summarize(u, b.stats, metrics)
    res = {"schema": "vtprune.eval.results/1", "benchmark": bench, "primary_metric": "Shapes", "metrics": metrics,
           "metric_labels": {"Shapes": "testbed accuracy"}, **unc, "partial": False,
           "model": {"id": "testbed/weights", "family": "llava"}, "method": {"method": method, "budget": budget},
           "config": {"benchmark": bench, "bench_options": {"n": n_opt or len(correct)}},
           "questions": {"count": len(correct), "sha256": sha}, "units": {"file": st.UNITS_FILE, "count": len(u)},
           "tokens": {"tok_in": float(budget or 64), "tok_eq": float(budget or 64)}, "created": "2026-11-29T10:00:00"}
    if server:
        res["metrics"][server] = 70.0
        res["stderr"][server] = "server"
    write_json(folder / "results.json", res)
    return folder


def test_compare_pairs_each_run_with_the_reference(tmp_path):
    ref = fake_run(tmp_path / "cd", "consensusdrop", 16, [1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
    rnd = fake_run(tmp_path / "rnd", "random", 16, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    ds = fake_run(tmp_path / "ds", "downsample", 16, [1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    res = compare([ref, rnd, ds], reference=str(ref), control="auto", resamples=300)
    pair = {p["b"]: p["metrics"]["Shapes"] for p in res["pairs"]}
    assert pair["Random @16"]["diff"] == pytest.approx(-80.0)
    assert pair["Random @16"]["mcnemar"] == {"a_only": 8, "b_only": 0, "p": pytest.approx(2 / 256)}
    assert res["control"]["group_a"] == 8 and res["control"]["group_b"] == 2
    by = {r["label"]: r for r in res["runs"]}
    assert by["ConsensusDrop @16"]["groups"]["Shapes"]["A"]["value"] == pytest.approx(75.0)  # 6 of the 8 difficult
    assert by["ConsensusDrop @16"]["groups"]["Shapes"]["B"]["value"] == 100.0


def test_compare_refuses_different_questions_a_missing_control_and_a_server_score(tmp_path, capsys):
    a = fake_run(tmp_path / "a", "consensusdrop", 16, [1, 0, 1, 0])
    b = fake_run(tmp_path / "b", "random", 16, [1, 1, 0, 0], sha="other")
    assert eval_main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: different question sets")
    c = fake_run(tmp_path / "c", "random", 16, [1, 1, 0])  # another count of questions: another option n
    with pytest.raises(CompareError, match="different benchmark options"):
        compare([a, c])
    d = fake_run(tmp_path / "d", "random", 16, [1, 1, 0, 0])
    with pytest.raises(CompareError, match="no downsample run"):
        compare([a, d], control="auto")
    s = fake_run(tmp_path / "s", "consensusdrop", 16, [1, 0, 1, 0], server="VQAv2-testdev")
    s2 = fake_run(tmp_path / "s2", "random", 16, [1, 1, 1, 0], server="VQAv2-testdev")
    with pytest.raises(CompareError, match="scored by the benchmark's server"):
        compare([s, s2], metrics=["VQAv2-testdev"])
    (tmp_path / "d" / st.UNITS_FILE).unlink()
    with pytest.raises(CompareError, match="no per-unit scores"):
        compare([a, d])


def test_eval_table_prints_bootstrap_and_server_and_groups(tmp_path):
    """The recorded stderr is what the table prints (here the binomial 25.0 of 2 of 4); a server's number says so;
    --control auto adds groups A / B at the row's budget."""
    runs = tmp_path / "runs"
    fake_run(runs / "cd", "consensusdrop", 16, [1, 1, 0, 0])
    fake_run(runs / "ds", "downsample", 16, [1, 0, 0, 0])
    t = make_table([runs])
    assert "| ConsensusDrop | 16 | 50.0 ± 28.9 |" in t
    assert stderr({"metrics": {"MME-P": 1500.0}, "stderr": {"MME-P": 12.5}}, "MME-P") == 12.5
    assert stderr({"metrics": {"VizWiz": 50.0}, "stderr": {"VizWiz": "server"}}, "VizWiz") is None
    g = make_table([runs], control="auto")
    assert "| Method | Budget | Shapes | Shapes A | Shapes B |" in g
    # A = the 3 questions downsample missed (consensusdrop right on 1 of them), B = the one it got
    assert "| ConsensusDrop | 16 | 50.0 ± 28.9 | 33.3 ± 33.3 (n=3) | 100.0 (n=1) |" in g


def test_results_json_of_a_scored_run_holds_the_units_and_stderr(tmp_path):
    """A real harness run on the testbed (40 questions): units.jsonl beside results.json, one unit per question,
    and results.json's stderr equals the binomial figure of its accuracy; `eval score` rewrites the same."""
    out = tmp_path / "runs"
    rc = eval_main(["run", "shapes", "--model", "testbed/weights", "--method", "random", "--budget", "8",
                    "--bench-opt", "n=40", "--out", str(out), "--no-wandb", "--batch-size", "40", "--launcher", "python"])
    assert rc == 0
    rd = next((out / "shapes").iterdir())
    res = json.loads((rd / "results.json").read_text())
    u = st.read_units(rd)
    assert len(u) == 40 and res["units"]["count"] == 40 and res["units"]["fingerprint"] == u.fingerprint()
    p = res["metrics"]["Shapes"] / 100
    assert res["stderr"]["Shapes"] == pytest.approx(100 * math.sqrt(p * (1 - p) / 39))
    assert res["stderr_method"]["Shapes"].startswith("binomial")
    assert np.isclose(st.compute(u, BENCHMARKS["shapes"].stats["Shapes"]), res["metrics"]["Shapes"])
    assert eval_main(["score", str(rd)]) == 0
    assert json.loads((rd / "results.json").read_text())["stderr"] == res["stderr"]


def test_a_recorded_server_score_says_server_in_the_table(tmp_path):
    """`eval record` marks the number as the server's: the table prints '(server)' and a note instead of a ±."""
    from eval.results import record_metric

    rd = fake_run(tmp_path / "runs" / "vq", "none", None, [1, 0])
    res = record_metric(rd, "VQAv2-testdev", 78.5, source="EvalAI test-dev")
    assert res["stderr"]["VQAv2-testdev"] == "server"
    t = make_table([tmp_path / "runs"], metric_override={"shapes": "VQAv2-testdev"})
    assert "| Vanilla (unpruned) | – | 78.5 (server) |" in t
    assert "(server) = scored by the benchmark's evaluation server" in t


def test_the_wandb_summary_carries_the_standard_errors():
    from eval.wandb_log import results_summary

    s = results_summary({"metrics": {"MME-P": 1500.0, "VizWiz": 50.0}, "primary_metric": "MME-P",
                         "stderr": {"MME-P": 21.5, "VizWiz": "server"}})
    assert s["stderr/MME-P"] == 21.5 and s["score_stderr"] == 21.5 and "stderr/VizWiz" not in s
