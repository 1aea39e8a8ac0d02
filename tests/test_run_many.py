"""``LAUNCHER=inprocess``: a grid's configs in one ``python -m eval run-many`` process, the model loaded once
(eval/run_many.py, scripts/papers/_paper.sh). Each config gives, answer by answer, what it gives in a process of
its own (the per-process grid, LAUNCHER=python, on the tiny LLaVA and POPE fixtures); a done config is skipped; a
failing config is said and the others run; one process only (NPROC / TP > 1: one error line)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_env

from eval.fixtures import write_fixtures

REPO = Path(__file__).resolve().parents[1]

SPEC = """[paper]
key = "three"
title = "Unpruned, FastV and DivPrune"
method = "divprune"

[[tables]]
id = "Table 1"
model = "tiny:llava"

[[tables.columns]]
key = "pope"
label = "POPE"
bench = "pope"
metric = "POPE-F1avg3"

[[tables.rows]]
method = "none"
label = "Unpruned"

[[tables.rows]]
method = "fastv"
label = "FastV"
budget = 4

[[tables.rows]]
method = "divprune"
label = "DivPrune"
budget = 4
"""

#: a user's method that fails inside the run (a bug: its traceback, exit 1)
BOOM = '''from llava.method import Method, register


@register
class Boom(Method):
    """Fails on every sample."""

    name = "boom_t"
    vision_stage = True

    def select_vision(self, sig):
        raise RuntimeError("boom_t fails here")
'''

RUNS = ("tiny-llava_none", "tiny-llava_fastv_b4", "tiny-llava_divprune_b4")


def _grid(root: Path, launcher: str, out: str, **env) -> subprocess.CompletedProcess:
    env = child_env(("VTPRUNE_", "SHARD", "REPORT", "NPROC", "TP"), PYTHON=sys.executable, LAUNCHER=launcher,
                    DATA_ROOT=root / "data", OUT=root / out, EXTRA_ARGS="--max-new-tokens 4 --no-wandb", **env)
    return subprocess.run(["bash", str(REPO / "scripts/paper.sh"), "./three.toml"], env=env, cwd=root,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    """The three configs run per process (LAUNCHER=python) and in one process (LAUNCHER=inprocess). Only the
    in-process grid's report is read: the per-process grid, the reference of the answers, writes none (REPORT=0:
    one process fewer, CI time)."""
    root = tmp_path_factory.mktemp("grid")
    write_fixtures(root / "data", ["pope"])
    (root / "three.toml").write_text(SPEC)
    per, one = _grid(root, "python", "per", REPORT="0"), _grid(root, "inprocess", "one")
    for r in (per, one):
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root, per, one


def _answers(run: Path) -> list[tuple]:
    """Each sample's answer and its visual-token accounting, in question order."""
    out = []
    for line in (run / "merge.jsonl").read_text().splitlines():
        a = json.loads(line)
        out.append((a["question_id"], a["prompt"], a["text"]))
    shards = [json.loads(x) for f in sorted((run / "answers").glob("*.jsonl")) for x in f.read_text().splitlines()]
    tokens = {s["question_id"]: (s["_eval"]["visual_entering_llm"], s["_eval"]["visual_per_layer"]) for s in shards}
    return [(*a, *tokens[a[0]]) for a in out]


def _same_config(a: Path, b: Path) -> None:
    ca, cb = (json.loads((p / "run_config.json").read_text())["config"] for p in (a, b))
    assert ca.pop("out") != cb.pop("out")
    assert ca == cb and ca["launcher"] == "python"


def test_the_in_process_grid_gives_the_per_process_grid_s_answers(grids):
    root, per, one = grids
    assert "three: 3 configs to run" in per.stdout and "three: 3 configs to run" in one.stdout
    assert "[1/3] pope none none tiny:llava" in one.stdout and "[3/3] pope divprune 4 tiny:llava" in one.stdout
    assert "three: 3 configs in one process, 1 model load" in one.stdout
    for name in RUNS:
        a, b = root / "per/pope" / name, root / "one/pope" / name
        assert _answers(a) == _answers(b), name
        _same_config(a, b)
        ra, rb = (json.loads((p / "results.json").read_text()) for p in (a, b))
        assert ra["metrics"] == rb["metrics"] and ra["tokens"] == rb["tokens"], name
    # the configs differ from each other (a method left on the model would show): 16 visual tokens unpruned;
    # FastV's budget is the average over the 4 decoder layers, (16 + 0 + 0 + 0) / 4 = 4; DivPrune keeps 4 of 16
    none, fastv, divprune = (_answers(root / "one/pope" / n) for n in RUNS)
    assert [x[4] for x in none] == [[16] * 4] * 6 and [x[4] for x in fastv] == [[16, 0, 0, 0]] * 6
    assert [x[4] for x in divprune] == [[4] * 4] * 6
    assert [x[2] for x in none] != [x[2] for x in fastv] != [x[2] for x in divprune]
    assert (root / "one/papers/three.md").is_file() and not (root / "per/papers").exists()


def test_a_done_grid_is_skipped_in_process(grids):
    root, _, _ = grids
    before = {p: p.stat().st_mtime_ns for p in (root / "one/pope").glob("*/results.json")}
    r = _grid(root, "inprocess", "one", REPORT="0")  # no report (the first test reads the fixture grid's)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "three: 0 configs to run" in r.stdout and "run-many" not in r.stdout and "[1/" not in r.stdout
    assert {p: p.stat().st_mtime_ns for p in (root / "one/pope").glob("*/results.json")} == before


def _line(label: str, root: Path, out: Path, *run: str) -> str:
    argv = ["run", "pope", *run, "--data-root", str(root / "data"), "--out", str(out), "--max-new-tokens", "4",
            "--no-wandb", "--launcher", "python"]
    return shlex.join([label, *argv])


def test_a_failing_config_is_said_and_the_others_run_as_alone(grids, tmp_path):
    """A half-done run (FastV on the first 2 questions: --limit 2), pruned, a bug, then unpruned and the half-done
    run again (resumed per question) in one process: the bug's config fails with its traceback, the model is loaded
    afresh after it, and the others answer as in their own process. (The half-done run is the grid's first config,
    not a process of its own before it: one interpreter and model load fewer, CI time.)"""
    root, _, _ = grids
    (tmp_path / "boom.py").write_text(BOOM)
    out = tmp_path / "runs"
    half = ["--model", "tiny:llava", "--method", "fastv", "--budget", "4"]
    env = child_env(("VTPRUNE_",), VTPRUNE_METHODS=tmp_path / "boom.py")
    lines = [_line("fastv, first 2", root, out, *half) + " --limit 2",
             _line("divprune", root, out, "--model", "tiny:llava", "--method", "divprune", "--budget", "4"),
             _line("boom", root, out, "--model", "tiny:llava", "--method", "boom_t", "--budget", "4"),
             _line("none", root, out, "--model", "tiny:llava"),
             _line("fastv, resumed", root, out, *half)]
    rec = tmp_path / "record"
    r = subprocess.run([sys.executable, "-m", "eval", "run-many", "--name", "t", "--record", str(rec)],
                       input="\n".join(lines) + "\n", cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "RuntimeError: boom_t fails here" in r.stderr
    assert "t: failed: boom (the grid goes on; rerun the script to resume it)" in r.stderr
    assert [ln.split(" ", 1) for ln in rec.read_text().splitlines()] == [
        ["0", "fastv, first 2"], ["0", "divprune"], ["1", "boom"], ["0", "none"], ["0", "fastv, resumed"]]
    # one load for the first three configs (the same arguments), one after the failure for the last two
    assert "[3/5] boom" in r.stdout and "t: 5 configs in one process, 2 model loads" in r.stdout
    assert "(2 already answered, 4 to go)" in r.stderr  # the resume took the first 2 answers as they were
    for name in RUNS:
        assert _answers(out / "pope" / name) == _answers(root / "per/pope" / name), name
    res = json.loads((out / "pope/tiny-llava_fastv_b4/results.json").read_text())
    assert res["counts"]["questions"] == 6 and len(res["resumes"]) == 1


@pytest.mark.parametrize("var", ["NPROC=2", "TP=2", "NNODES=2", "BACKEND=vllm"])
def test_in_process_is_one_process_of_our_engine(tmp_path, var):
    k, v = var.split("=")
    env = child_env(("NPROC", "TP", "NNODES", "BACKEND"), LAUNCHER="inprocess", OUT=tmp_path / "runs",
                    DATA_ROOT=tmp_path, PYTHON=sys.executable, **{k: v})
    r = subprocess.run(["bash", str(REPO / "scripts/eval/pope.sh"), "fastv", "4", "tiny:llava"], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    (err,) = r.stderr.strip().splitlines()
    assert err.startswith("error: LAUNCHER=inprocess is one process of our engine") and var in err, err
