"""The whole pipeline as users run it: ``bash scripts/eval/<bench>.sh <method> <budget> <model>`` ->
torchrun with 2 CPU processes (gloo) -> each rank its contiguous shard -> merge (exactly once,
question order) -> official conversion + score -> results.json -> table. Tiny random models answer
noise, so the checks are on structure and counts, and on the metrics being what the official
scorer computes from the answers actually written."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from eval.benchmarks import get_benchmark
from eval.fixtures import write_fixtures
from eval.io import read_jsonl
from varied_answers import assert_answers_vary, save_varied_llava

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fixtures(tmp_path_factory.mktemp("eval_e2e_data"), ["gqa", "pope", "msvd"])


@pytest.fixture(scope="module")
def varied_model(tmp_path_factory):
    """A tiny LLaVA whose answers differ by question (tests/varied_answers.py): runs compared answer by answer."""
    return save_varied_llava(tmp_path_factory.mktemp("varied") / "gridmodel")


def script(name, args, out, data, nproc=2, check=True):
    env = {**os.environ, "NPROC": str(nproc), "DATA_ROOT": str(data), "OUT": str(out), "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run(["bash", str(REPO / "scripts" / "eval" / f"{name}.sh"), *args], env=env, capture_output=True,
                       text=True, timeout=900)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return p


def run_dir(out, bench):
    (d,) = [p for p in (Path(out) / bench).iterdir() if p.is_dir()]
    return d


def check_run(bench, data, rd, world=2, launcher="torchrun"):
    qs = get_benchmark(bench, data).load()
    shards = sorted((rd / "answers").glob("*_*.jsonl"))
    assert [s.name for s in shards] == [f"{world}_{r}.jsonl" for r in range(world)]
    size = -(-len(qs) // world)  # LLaVA's contiguous chunks of ceil(N / world)
    for r, s in enumerate(shards):
        assert [x["_eval"]["idx"] for x in read_jsonl(s)] == list(range(r * size, min((r + 1) * size, len(qs))))
    merged = read_jsonl(rd / "merge.jsonl")
    key = "id" if bench == "msvd" else "question_id"
    assert [m[key] for m in merged] == [q.qid for q in qs]  # every question once, in question-file order
    res = json.loads((rd / "results.json").read_text())
    assert res["counts"] == {"questions": len(qs), "answered": len(qs)}
    assert res["world_size"] == world and res["launcher"] == launcher
    assert res["metrics"] == get_benchmark(bench, data).finalize(merged, rd / "rescore", "x")["metrics"]
    return res, merged


def test_gqa_script_two_processes_then_table(data, tmp_path):
    out = tmp_path / "runs"
    script("gqa", ["random", "4", "tiny:llava", "--max-new-tokens", "3"], out, data)
    res, _ = check_run("gqa", data, run_dir(out, "gqa"))
    assert set(res["metrics"]) == {"GQA", "GQA-binary", "GQA-open"} and res["tokens"]["tok_in"] == 4.0
    assert res["method"] == {"method": "random", "budget": 4, "position_mode": "keep", "seed": 0, "keep_newlines": True}
    # the unpruned row of the table (one process, in this test process)
    from eval.cli import main

    os.environ.pop("WORLD_SIZE", None)
    assert main(["run", "gqa", "--model", "tiny:llava", "--method", "none", "--budget", "none", "--max-new-tokens", "3",
                 "--data-root", str(data), "--out", str(out), "--no-wandb"]) == 0

    assert main(["table", str(out), "--format", "both", "--out", str(tmp_path / "table")]) == 0
    md = (tmp_path / "table.md").read_text()
    tex = (tmp_path / "table.tex").read_text()
    assert "| Method | Budget | GQA | tok-in | tok-eq | Avg(rel, vanilla=ours) |" in md
    lines = md.splitlines()
    assert lines.index(next(ln for ln in lines if ln.startswith("| Vanilla (unpruned) | – |"))) < \
        lines.index("| **4 tokens** | | | | | |") < lines.index(next(ln for ln in lines if ln.startswith("| Random | 4 |")))
    assert "| Vanilla (unpruned) | – | " in md and "| 16.0 | 16.0 |" in md  # unpruned: all 16 tiny visual tokens
    assert "\\begin{tabular}" in tex and "\\multicolumn" in tex and "Avg(rel, vanilla=ours)" in tex


def test_video_qa_script_two_processes(data, tmp_path):
    out = tmp_path / "runs"
    script("msvd", ["random", "4", "tiny:video-llava", "--max-new-tokens", "3"], out, data)
    res, merged = check_run("msvd", data, run_dir(out, "msvd"))
    # Video-LLaVA: 8 frames x (16 patches + [CLS]) candidates, 4 kept per frame
    assert res["tokens"]["visual_candidates_mean"] == 136.0 and res["tokens"]["tok_in"] == 32.0
    assert res["model"]["family"] == "video_llava" and res["model"]["template"] == "llava_v1"
    assert [m["answer"] for m in merged] == [f"answer {i}" for i in range(5)]  # paired by id across both shards
    assert res["metrics"] == {} and res["pending"][0].startswith("MSVD-QA: judge with")


def _worker_pid(marker: str, local_rank: int):
    """PID of the torchrun worker whose environment holds OUT=marker and LOCAL_RANK=local_rank."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"OUT={marker}".encode() in env and f"LOCAL_RANK={local_rank}".encode() in env:
            return int(d.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through /proc")
def test_pope_script_one_rank_sigkilled_then_resumed_equals_uninterrupted(data, varied_model, tmp_path):
    """kill -9 of one torchrun rank at a random point (after 1-2 of its answers), the same command again:
    nothing lost, nothing twice, the answers written before the kill kept (not asked again), and the answers
    and scores of an uninterrupted run. The model answers each
    question differently (tiny:llava answers "with ..." to nearly all), so the equality compares real answers.
    The uninterrupted run is the same script with NPROC=1 (one process: every question is answered alone, at batch
    1 and one thread, as on a rank; one interpreter where torchrun takes three, CI time)."""
    import random
    import signal
    import time

    args = ["random", "4", str(varied_model), "--max-new-tokens", "8"]  # time to kill rank 1
    ref_out = tmp_path / "ref"
    script("pope", args, ref_out, data, nproc=1)
    ref, ref_merged = check_run("pope", data, run_dir(ref_out, "pope"), world=1, launcher="python")
    assert_answers_vary([r["text"] for r in ref_merged], 4)  # 6 questions, 6 different answers

    out = tmp_path / "killed"
    env = {**os.environ, "NPROC": "2", "DATA_ROOT": str(data), "OUT": str(out), "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.Popen(["bash", str(REPO / "scripts" / "eval" / "pope.sh"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    want = random.Random(7).randint(1, 2)
    deadline, killed = time.time() + 300, False
    while time.time() < deadline and proc.poll() is None and not killed:
        shards = list(out.glob("pope/*/answers/2_1.jsonl"))
        if shards and shards[0].read_bytes().count(b"\n") >= want:
            pid = _worker_pid(str(out), 1)
            if pid:
                os.kill(pid, signal.SIGKILL)  # a real kill -9 of rank 1, wherever it is
                killed = True
        time.sleep(0.005)
    assert killed, "rank 1 finished before it could be killed"
    assert proc.wait(timeout=300) != 0  # torchrun tears the job down
    rd = run_dir(out, "pope")
    assert not (rd / "results.json").exists()
    first = {}
    for s in (rd / "answers").glob("*.jsonl"):
        first.update({r["_eval"]["uid"]: r["answer_id"] for r in read_jsonl(s, strict=False)})
    assert len(first) >= 1  # rank 1's first answers at least (a line cut by the kill is not counted)
    script("pope", args, out, data)  # the same command resumes
    res, merged = check_run("pope", data, rd)
    key = lambda r: (r["question_id"], r["text"])  # noqa: E731
    assert [key(r) for r in merged] == [key(r) for r in ref_merged]
    assert res["metrics"] == ref["metrics"] and {"POPE-F1avg3", "POPE-F1pooled", "POPE-acc"} <= set(res["metrics"])
    # the answers written before the kill are kept, not asked again (their ids survive the resume)
    recs = [r for s in sorted((rd / "answers").glob("*.jsonl")) for r in read_jsonl(s)]
    assert len(recs) == 6 and all(r["answer_id"] == first[r["_eval"]["uid"]] for r in recs if r["_eval"]["uid"] in first)
