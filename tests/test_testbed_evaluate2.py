"""testbed.evaluate2: paired differences (worked values), the comparisons, and a resumable sweep on a tiny
random-weight v2 checkpoint (the machinery; accuracy needs the trained weights, a GPU run)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import child_env

from testbed import evaluate2 as E2
from testbed import model2

TINY_V = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 1,
          "projection_dim": 32}
TINY_T = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 1,
          "num_key_value_heads": 1}


def row(method, budget, correct, options=None, overall=None):
    c = {str(s): bits for s, bits in correct.items()}
    allbits = "".join(c.values())
    return {"method": method, "budget": budget, "options": options or {}, "correct": c,
            "accuracy": {"overall": overall if overall is not None else 100 * allbits.count("1") / len(allbits)}}


def test_paired_difference_worked_example():
    a = row("x", 64, {1: "1101", 2: "10"})
    b = row("y", 64, {1: "1001", 2: "01"})
    # d = [0, 1, 0, 0, 1, -1]: mean 1/6, sample var = (4 * (1/6)^2 + 2 * (5/6)^2 + (7/6)^2) / 5 = 17/30
    p = E2.paired(a, b)
    assert p["n"] == 6 and p["diff"] == round(100 / 6, 2)
    assert p["se"] == round(100 * math.sqrt(17 / 30 / 6), 2)
    assert E2.paired(a, a) == {"diff": 0.0, "se": 0.0, "n": 6}
    with pytest.raises(ValueError):
        E2.paired(a, row("z", 64, {3: "1"}))


def test_downsample_runs_at_the_reachable_counts_nearest_the_budgets():
    assert E2.overrides([64, 128, 192]) == {"downsample": (64, 144)}
    assert E2.overrides([32]) == {"downsample": (36,)}


def test_comparisons_best_worst_and_references():
    rows = [row("consensusdrop", 64, {1: "1110"}), row("consensusdrop", 64, {1: "1000"}, {"fusion": "cross_only"}),
            row("random", 64, {1: "0000"}), row("fastv", 64, {1: "1111"}), row("random", 128, {1: "1"})]
    c = E2.comparisons(rows, [64, 128, 192])
    assert c[0] == {"budget": 64, "what": "best - worst", "a": "fastv", "b": "random", "diff": 100.0, "se": 0.0, "n": 4}
    refs = {(x["budget"], x["b"]): x["diff"] for x in c if x["what"] == "consensusdrop - reference"}
    assert refs == {(64, "consensusdrop fusion=cross_only"): 50.0, (64, "random"): 75.0}
    assert [x["budget"] for x in c if x["what"] == "best - worst"] == [64, 128]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w2")
    model2.save(model2.build(vision=TINY_V, text=TINY_T), path)
    return path


def test_sweep_writes_rows_and_resumes(tiny_weights, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--weights", str(tiny_weights), "--seeds", "1", "2", "--n-per-seed", "4", "--out", str(out),
            "--budgets", "64", "--only", "none", "random", "downsample"]
    assert E2.main(args) == 0
    res = json.loads((out / "testbed2.json").read_text())
    got = [(r["method"], r["budget"]) for r in res["results"]]
    assert got == [("none", None), ("downsample", 64), ("random", 64)]
    for r in res["results"]:
        assert set(r["per_seed"]) == {"1", "2"}
        assert r["accuracy"]["overall"] == pytest.approx((r["per_seed"]["1"]["overall"] + r["per_seed"]["2"]["overall"]) / 2, abs=0.01)
    rnd = next(r for r in res["results"] if r["method"] == "random")
    assert rnd["tokens"]["visual_entering_llm"] == 64.0
    assert next(r for r in res["results"] if r["method"] == "none")["tokens"]["visual_entering_llm"] == 576.0
    lines = (out / "testbed2.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["kind"] == "header" and all(len(json.loads(x)["correct"]["1"]) == 4 for x in lines[1:])
    assert "| random | 64 |" in (out / "testbed2.md").read_text() and (out / "testbed2.png").stat().st_size > 0
    # a second sweep without --resume is refused; with --resume nothing finished runs again
    with pytest.raises(FileExistsError):
        E2.main([a for a in args if a not in ("--only", "none", "random", "downsample")])
    calls = []
    real = E2.evaluate
    monkeypatch.setattr(E2, "evaluate", lambda rt, m, b, o, batches: calls.append((m, b)) or real(rt, m, b, o, batches))
    capsys.readouterr()
    assert E2.main(args[:-4] + ["--only", "none", "random", "novisual", "--resume"]) == 0
    assert calls == [("novisual", None)]  # none and random were finished
    calls.clear()
    E2.main(args[:-4] + ["--only", "random"])  # --only without --resume: re-measure random, keep the rest
    assert calls == [("random", 64)]
    calls.clear()
    E2.main(args + ["--resume"])  # everything of `args` is there: nothing runs
    assert calls == []
    res = json.loads((out / "testbed2.json").read_text())
    assert [(r["method"], r["budget"]) for r in res["results"]] == [("none", None), ("novisual", None), ("downsample", 64),
                                                                   ("random", 64)]
    # another seed set in the same folder is refused
    with pytest.raises(ValueError, match="measured with"):
        E2.main(["sweep", "--weights", str(tiny_weights), "--seeds", "3", "--n-per-seed", "4", "--out", str(out),
                 "--budgets", "64", "--resume"])


def test_images_rendered_by_workers_equal_the_ones_rendered_here(tiny_weights):
    import torch

    rt = E2.load_runtime(tiny_weights)
    qs = E2.questions(6, 3)
    here, pooled = E2.prompt_batches(rt, qs, 0, batch_size=4), E2.prompt_batches(rt, qs, 2, batch_size=4)
    assert [len(b[0]) for b in here.batches] == [4, 2]
    for (qa, a), (qb, b) in zip(here.batches, pooled.batches):
        assert qa == qb and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_missing_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_testbed2.sh"):
        E2.load_runtime(tmp_path)


def test_shapes2_script_through_the_harness_gives_the_evaluators_answers(tiny_weights, tmp_path):
    """`bash scripts/eval/shapes2.sh consensusdrop 64 <weights>` (runner, scorer, results JSON) answers every
    question as testbed.evaluate2 does on the same questions, and scores them the same way."""
    import subprocess
    import sys
    from pathlib import Path

    from testbed import evaluate as E

    root = Path(__file__).resolve().parent.parent
    env = child_env(OUT=tmp_path / "runs", LAUNCHER="python", PYTHON=sys.executable,
                    EXTRA_ARGS="--no-wandb --batch-size 4 --bench-opt n=5 --bench-opt seeds=1,2")
    subprocess.run(["bash", str(root / "scripts/eval/shapes2.sh"), "consensusdrop", "64", str(tiny_weights)], env=env,
                   check=True, cwd=tmp_path, capture_output=True)
    (results,) = (tmp_path / "runs" / "shapes2").glob("*/results.json")
    res = json.loads(results.read_text())
    answers = {}
    for f in results.parent.glob("answers/*.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            answers[str(r["question_id"])] = r["text"]
    rt = E2.load_runtime(tiny_weights)
    direct = {}
    for seed in (1, 2):
        b = E._Batches(rt, E2.questions(5, seed))
        got, _ = E.predict(rt, b, "consensusdrop", 64)
        direct.update({f"{seed}-{q.index}": a for q, a in zip(b.qs, got)})
    assert answers == direct and len(answers) == 10
    qs = [q for seed in (1, 2) for q in E2.questions(5, seed)]
    summary = E.summarize(qs, [direct[f"{s}-{q.index}"] for s in (1, 2) for q in E2.questions(5, s)])
    assert res["metrics"]["Shapes2"] == summary["accuracy"]["overall"]
    assert res["tokens"]["tok_in"] == 64.0
