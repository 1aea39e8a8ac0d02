"""lmms-eval end to end (issue 17): ``python -m lmms_eval --model vtprune`` on a local task, for every
registered method, at batch size 2, in the separate environment that ``scripts/lmms_eval_env.sh`` builds
(lmms-eval's current release + this package; docs/evaluation.md section 8).

For each method, on the same questions (the first ``LIMIT`` of the local task / benchmark), the same
prompt and the same greedy decoding, it checks that

* lmms-eval exits 0 and its results JSON holds the task's metric, equal to our harness's score;
* the answers equal those of our own harness (``python -m eval run`` at the same batch size, in the same
  environment), question by question, and so do the prompts;
* the visual-token log (``VTPRUNE_TOKEN_LOG``) is written with one row per question whose counts equal
  the ones our harness records for that question (candidates, tokens entering the LLM, layer average).

Skipped unless the lmms-eval environment exists: ``$VTPRUNE_LMMS_PYTHON`` (its python) or
``.venv-lmms/bin/python`` in the repository. Takes about 3-5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llava.method import available_methods, method_supports

REPO = Path(__file__).resolve().parent.parent
LMMS_PY = Path(os.environ.get("VTPRUNE_LMMS_PYTHON") or REPO / ".venv-lmms" / "bin" / "python")
pytestmark = pytest.mark.skipif(
    not LMMS_PY.exists(),
    reason=f"lmms-eval environment not installed ({LMMS_PY} missing): run `bash scripts/lmms_eval_env.sh` "
           "or point VTPRUNE_LMMS_PYTHON at the python of an environment with lmms-eval and this package",
)

TESTBED = REPO / "testbed" / "weights"
N, LIMIT, BATCH = 8, 6, 2  # 8 questions written, the first 6 asked (--limit), in 3 batches of 2
MAX_NEW_TOKENS = 3  # the vtprune_shapes task's generation_kwargs (= the harness's shapes protocol)
#: budgets in each method's convention on the testbed (64 visual tokens per image; testbed.evaluate)
BUDGETS = {"none": None, "novisual": None, "prumerge": None, "pdrop": 128, "sparsevlm": 128, "downsample": 4}
DEFAULT_BUDGET = 8
TIMEOUT = 600


def methods():
    return [m for m in available_methods() if not m.startswith("test_")]


def _env(tmp: Path, token_log: Path | None = None, **extra) -> dict:
    # no rendezvous variables: an in-process deepspeed_inference of an earlier test (test_deepspeed_*) sets
    # MASTER_PORT and keeps that port bound, and lmms-eval's accelerator would try to listen on it
    drop = ("VTPRUNE_TOKEN_LOG", "PYTHONPATH", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp / "hf_datasets"), WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if token_log is not None:
        env["VTPRUNE_TOKEN_LOG"] = str(token_log)
    env.update(extra)
    return env


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"


def lmms_eval_cmd(pretrained, method, budget, include_path, task, out, limit=LIMIT) -> list[str]:
    args = f"pretrained={pretrained},method={method}" + (f",budget={budget}" if budget is not None else "")
    return [str(LMMS_PY), "-m", "lmms_eval", "--model", "vtprune", "--model_args", args,
            "--include_path", str(include_path), "--tasks", task, "--limit", str(limit),
            "--batch_size", str(BATCH), "--log_samples", "--output_path", str(out)]


def run_lmms(tmp: Path, pretrained, method, budget, task, limit=LIMIT, **env) -> dict:
    out = tmp / "lmms" / method
    tok = tmp / "lmms" / f"{method}.tokens.json"
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(lmms_eval_cmd(pretrained, method, budget, tmp / "tasks", task, out, limit), cwd=REPO, check=False,
                          env=_env(tmp, tok, **env), capture_output=True, text=True, timeout=TIMEOUT)
    res = {"proc": proc, "results": None, "samples": None, "tokens": None}
    if proc.returncode == 0:
        rj = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
        sj = glob.glob(str(out / "**" / f"*_samples_{task}.jsonl"), recursive=True)
        res["results"] = json.loads(Path(rj[0]).read_text()) if len(rj) == 1 else rj
        res["samples"] = [json.loads(x) for x in Path(sj[0]).read_text().splitlines()] if len(sj) == 1 else sj
        res["tokens"] = json.loads(tok.read_text()) if tok.exists() else None
    return res


HARNESS = """
import json, sys
from eval.cli import main
for argv in json.loads(sys.argv[1]):
    rc = main(argv)
    if rc:
        sys.exit(f"python -m eval {' '.join(argv)}: exit {rc}")
"""


def run_harness(tmp: Path, runs: list[tuple[str, list[str]]], limit=LIMIT, **env) -> dict:
    """Our harness (``python -m eval run ...``) for each (name, argv) in one process of the lmms-eval
    environment; {name: {"answers": merge.jsonl rows, "records": shard rows, "results": results.json}}."""
    argvs = [["run", *argv, "--out", str(tmp / "harness"), "--run-name", name, "--batch-size", str(BATCH),
              "--limit", str(limit), "--no-wandb", "--overlay-samples", "0", "--overwrite"] for name, argv in runs]
    proc = subprocess.run([str(LMMS_PY), "-c", HARNESS, json.dumps(argvs)], cwd=REPO, check=False, env=_env(tmp, **env),
                          capture_output=True, text=True, timeout=TIMEOUT)
    _check(proc, "python -m eval run")
    out = {}
    for name, argv in runs:
        d = tmp / "harness" / argv[0] / name
        records = [json.loads(x) for f in sorted((d / "answers").glob("*.jsonl")) for x in f.read_text().splitlines()]
        out[name] = {"answers": [json.loads(x) for x in (d / "merge.jsonl").read_text().splitlines()],
                     "records": records, "results": json.loads((d / "results.json").read_text())}
    return out


@pytest.fixture(scope="module")
def shapes_runs(tmp_path_factory):
    """Every method through lmms-eval (two processes at a time) and through our harness, on the testbed."""
    from integrations.lmms_eval.tasks import write_task

    tmp = tmp_path_factory.mktemp("lmms")
    write_task(tmp / "tasks", "vtprune_shapes", n=N)
    ms = [m for m in methods() if method_supports(m, "llava")]
    budgets = {m: BUDGETS.get(m, DEFAULT_BUDGET) for m in ms}
    with ThreadPoolExecutor(2) as pool:
        futs = {m: pool.submit(run_lmms, tmp, TESTBED, m, budgets[m], "vtprune_shapes") for m in ms}
        harness = run_harness(tmp, [(m, ["shapes", "--model", str(TESTBED), "--method", m, "--budget", str(budgets[m]),
                                         "--bench-opt", f"n={N}", "--max-new-tokens", str(MAX_NEW_TOKENS)])
                                    for m in ms])
        lmms = {m: f.result() for m, f in futs.items()}
    return {"lmms": lmms, "harness": harness, "budgets": budgets}


def _compare(lm: dict, h: dict, metric: str, harness_metric: str, what: str, limit=LIMIT) -> None:
    _check(lm["proc"], f"lmms-eval ({what})")
    # the metric is in the results JSON, and equals our harness's score on the same answers
    assert isinstance(lm["results"], dict), f"expected one results JSON, found {lm['results']}"
    res = lm["results"]["results"]
    task = next(iter(res))
    assert f"{metric},none" in res[task], res[task]
    # (results.json rounds to 2 decimals)
    assert round(res[task][f"{metric},none"], 2) == pytest.approx(h["results"]["metrics"][harness_metric]), what
    assert lm["results"]["config"]["batch_size"] in (BATCH, str(BATCH))
    # the same questions, the same prompts, the same answers, in the same order
    samples = sorted(lm["samples"], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(limit))
    answers = h["answers"]
    assert len(answers) == limit
    assert [s["input"] for s in samples] == [a["prompt"] for a in answers], what
    got = [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"] for s in samples]
    assert got == [a["text"] for a in answers], f"{what}: lmms-eval answers differ from our harness's"
    # the visual-token log: one row per question, the counts our harness records for it
    tok = lm["tokens"]
    assert tok is not None, f"{what}: VTPRUNE_TOKEN_LOG was not written"
    assert tok["samples"] == limit and tok["batch_size"] == BATCH
    by_idx = sorted((r["_eval"] for r in h["records"]), key=lambda m: m["idx"])
    assert [m["idx"] for m in by_idx] == list(range(limit))
    assert [row["key"].rsplit("/", 1)[1] for row in tok["per_sample"]] == [str(i) for i in range(limit)]
    assert [row["question_id"] for row in tok["per_sample"]] == [str(a["question_id"]) for a in answers]
    for row, m in zip(tok["per_sample"], by_idx):
        assert row["visual_candidates"] == m["visual_candidates"], (what, row, m)
        assert row["visual_entering_llm"] == m["visual_entering_llm"], (what, row, m)
        assert row["visual_layer_avg"] == pytest.approx(m["visual_layer_avg"]), (what, row, m)
    t = h["results"]["tokens"]
    assert tok["tok_in"] == pytest.approx(t["tok_in"]) and tok["tok_eq"] == pytest.approx(t["tok_eq"]), (what, tok, t)


@pytest.mark.parametrize("method", methods())
def test_lmms_eval_every_method_matches_our_harness(shapes_runs, method):
    if not method_supports(method, "llava"):
        pytest.skip(f"{method} does not support the llava family (the testbed)")
    lm, h = shapes_runs["lmms"][method], shapes_runs["harness"][method]
    _compare(lm, h, "accuracy", "Shapes", f"{method} budget={shapes_runs['budgets'][method]}")
    tok = lm["tokens"]
    assert tok["method"]["method"] == method
    if method == "none":  # unpruned: every visual token enters every layer
        assert tok["tok_in"] == tok["tok_eq"] == 64
    if method in ("consensusdrop", "visionzip"):  # vision-stage methods at budget 8: 8 tokens enter the LLM
        assert tok["tok_in"] == DEFAULT_BUDGET


def test_lmms_eval_tiny_model_gqa_layout_task(tmp_path):
    """``pretrained=tiny:llava`` on the GQA-layout fixture task; our harness reads the same files as its
    ``--data-root`` (the ``gqa`` benchmark, LLaVA's question file)."""
    from integrations.lmms_eval.tasks import write_task

    task_dir = write_task(tmp_path / "tasks", "vtprune_gqa_fixture")
    lm = run_lmms(tmp_path, "tiny:llava", "consensusdrop", DEFAULT_BUDGET, "vtprune_gqa_fixture", limit=4)
    h = run_harness(tmp_path, [("cd", ["gqa", "--model", "tiny:llava", "--method", "consensusdrop", "--budget",
                                       str(DEFAULT_BUDGET), "--data-root", str(task_dir / "data"),
                                       "--max-new-tokens", "16"])], limit=4)["cd"]
    _compare(lm, h, "gqa_accuracy", "GQA", "tiny:llava consensusdrop on the GQA fixture", limit=4)


def test_lmms_eval_runs_a_users_method_named_by_the_variable(tmp_path):
    """A method from a file outside the repository's packages (docs/your-method.md's NormPrune), named by
    ``VTPRUNE_METHODS``: lmms-eval's vtprune model finds it, and answers as our harness does with it."""
    from integrations.lmms_eval.tasks import write_task

    user = {"VTPRUNE_METHODS": str(REPO / "docs" / "examples" / "normprune" / "my_method.py")}
    task_dir = write_task(tmp_path / "tasks", "vtprune_gqa_fixture")
    lm = run_lmms(tmp_path, "tiny:llava", "normprune", 4, "vtprune_gqa_fixture", limit=4, **user)
    h = run_harness(tmp_path, [("np", ["gqa", "--model", "tiny:llava", "--method", "normprune", "--budget", "4",
                                       "--data-root", str(task_dir / "data"), "--max-new-tokens", "16"])],
                    limit=4, **user)["np"]
    _compare(lm, h, "gqa_accuracy", "GQA", "tiny:llava normprune (a user's method) on the GQA fixture", limit=4)
    assert lm["tokens"]["method"]["method"] == "normprune" and lm["tokens"]["tok_in"] == 4
    # without the variable the name is unknown to lmms-eval's model too: refused (lmms-eval logs the model's error and
    # still exits 0), no results written, never a silently unpruned run
    write_task(tmp_path / "bare" / "tasks", "vtprune_gqa_fixture")
    bare = run_lmms(tmp_path / "bare", "tiny:llava", "normprune", 4, "vtprune_gqa_fixture", limit=1)
    said = bare["proc"].stderr + bare["proc"].stdout
    assert not bare["results"] and "normprune" in said and "Error during evaluation" in said, said[-2000:]


if __name__ == "__main__":  # the exact lmms-eval command line the test runs, for one method
    print(" ".join(lmms_eval_cmd(TESTBED, sys.argv[1] if len(sys.argv) > 1 else "consensusdrop", DEFAULT_BUDGET,
                                 "TASKS_DIR", "vtprune_shapes", "OUT_DIR")))
