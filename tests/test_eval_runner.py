"""The runner on fixture data with the tiny models (single process, in this test process unless
noted): answers written, merged exactly once, scored from the written answers; resume after a torn
line and after a real SIGKILL; W&B offline / failing / hanging; the LLM judge against a local fake
OpenAI-compatible server; the deepspeed launcher's --local_rank."""

import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from eval import dist
from eval.benchmarks import get_benchmark
from eval.fixtures import write_fixtures
from eval.io import read_jsonl
from eval.results import MergeError, merge
from eval.runner import RunConfig, answered_uids, chunk, run, run_dir_of
from varied_answers import assert_answers_vary

REPO = Path(__file__).resolve().parents[1]
#: the trained testbed (docs/testbed.md) on its shapes benchmark, for the runs compared answer by answer: its answers
#: differ by question (a colour, a shape, yes / no, a count, left / above ...), where tiny:llava answers "with" to
#: nearly every question, so that two runs agreeing on them proves something
TESTBED = str(REPO / "testbed" / "weights")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fixtures(tmp_path_factory.mktemp("eval_runner_data"))


pytestmark = pytest.mark.usefixtures("run_env")


def cfg(data, out, bench, **kw):
    kw.setdefault("model", "tiny:video-llava" if bench in ("msvd", "msrvtt", "tgif", "activitynet") else "tiny:llava")
    kw.setdefault("method", "random")
    kw.setdefault("budget", 4)
    kw.setdefault("max_new_tokens", 3)
    return RunConfig(benchmark=bench, data_root=str(data), out=str(out), **kw)


def rescore(bench_name, data, run_dir):
    """Metrics recomputed by the benchmark's official scorer from the merged answer file on disk."""
    b = get_benchmark(bench_name, data)
    return b.finalize(read_jsonl(run_dir / "merge.jsonl"), run_dir / "rescore", "x")["metrics"]


def test_chunks_are_contiguous_like_llava():
    items = list(range(10))
    assert [chunk(items, 3, r) for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert chunk(items[:1], 2, 1) == []


@pytest.mark.parametrize("bench, kw", [("sqa", {}), ("mmbench", {}), ("mme", {"batch_size": 4}), ("vqav2", {})])
def test_run_writes_scores_and_accounts_tokens(data, tmp_path, bench, kw):
    c = cfg(data, tmp_path, bench, **kw)
    assert run(c) == 0
    rd = run_dir_of(c)
    res = json.loads((rd / "results.json").read_text())
    n = len(get_benchmark(bench, data).load())
    merged = read_jsonl(rd / "merge.jsonl")
    assert res["counts"] == {"questions": n, "answered": n} and len(merged) == n
    assert all("_eval" not in r for r in merged) and {"question_id", "prompt", "text", "answer_id", "model_id"} <= set(merged[0])
    assert res["metrics"] == rescore(bench, data, rd)  # the results come from the answers actually written
    t = res["tokens"]
    assert t["tok_in"] == 4.0 and t["tok_eq"] == 4.0 and t["visual_candidates_mean"] == 16.0
    if bench == "sqa":  # two text-only problems: no visual tokens, never routed through the engine
        assert (t["samples"], t["samples_total"]) == (2, 4)
    assert res["method"]["method"] == "random" and res["method"]["budget"] == 4 and "seed" in res["method"]
    assert res["model"]["id"] == "tiny:llava" and res["model"]["preprocess"] == "pad"
    assert res["git"]["commit"] and res["protocol"]["deviations"] == [f"max_new_tokens=3 (protocol: {res['benchmark_config']['max_new_tokens']})"] + (
        ["batch_size=4 (protocol: 1)"] if kw else [])
    assert res["timing"]["generate_s_total"] > 0


def test_batched_run_matches_batch_one(data, tmp_path):
    shapes = dict(model=TESTBED, bench_options={"n": 6})  # prompts of different lengths: the batches are padded
    a, b = cfg(data, tmp_path / "a", "shapes", **shapes), cfg(data, tmp_path / "b", "shapes", batch_size=4, **shapes)
    assert run(a) == 0 and run(b) == 0
    ta = [r["text"] for r in read_jsonl(run_dir_of(a) / "merge.jsonl")]
    tb = [r["text"] for r in read_jsonl(run_dir_of(b) / "merge.jsonl")]
    assert len(ta) == 6
    assert_answers_vary(ta, 4)  # 6 different answers of 6: the equality below compares real answers
    assert ta == tb  # seeded selections keyed by question id, left-padded batches: same answers


def _shard(run_dir):
    files = sorted((run_dir / "answers").glob("*_*.jsonl"))
    assert len(files) == 1
    return files[0]


def test_resume_after_torn_line(data, tmp_path):
    c = cfg(data, tmp_path, "pope")
    assert run(c) == 0
    rd = run_dir_of(c)
    shard = _shard(rd)
    lines = shard.read_text().splitlines(keepends=True)
    kept = [json.loads(x) for x in lines[:2]]
    shard.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # killed in the middle of a write
    (rd / "merge.jsonl").unlink()
    assert answered_uids(rd) == {r["_eval"]["uid"] for r in kept}
    assert run(c) == 0
    recs = read_jsonl(shard)
    assert len(recs) == 6 and len({r["_eval"]["uid"] for r in recs}) == 6  # nothing lost, nothing twice
    assert [r["answer_id"] for r in recs[:2]] == [r["answer_id"] for r in kept]  # the first answers were kept
    assert [r["question_id"] for r in read_jsonl(rd / "merge.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_sigkill_then_resume(data, tmp_path):
    n = 24  # shapes questions on the testbed (one-word answers: more questions than POPE's 6 leave time to kill)
    c = cfg(data, tmp_path, "shapes", model=TESTBED, bench_options={"n": n}, wandb=False)
    cmd = [sys.executable, "-m", "eval", "run", "shapes", "--model", TESTBED, "--method", "random", "--budget", "4",
           "--bench-opt", f"n={n}", "--max-new-tokens", "3", "--data-root", str(data), "--out", str(tmp_path),
           "--no-wandb"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = run_dir_of(c) / "answers" / "1_0.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if shard.exists() and shard.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)  # a real kill -9, at whatever point the run is
    assert proc.wait() == -signal.SIGKILL
    before = {r["_eval"]["uid"]: r["answer_id"] for r in read_jsonl(shard, strict=False)}
    assert 2 <= len(before) < n
    assert run(c) == 0  # the same command again resumes
    recs = read_jsonl(shard)
    uids = [r["_eval"]["uid"] for r in recs]
    assert len(uids) == n and len(set(uids)) == n
    assert all(r["answer_id"] == before[r["_eval"]["uid"]] for r in recs if r["_eval"]["uid"] in before)
    res = json.loads((run_dir_of(c) / "results.json").read_text())
    assert res["counts"]["answered"] == n and {"Shapes", "Shapes-existence", "Shapes-counting"} <= set(res["metrics"])
    # the same answers and scores as an uninterrupted run of the same command
    ref = cfg(data, tmp_path, "shapes", model=TESTBED, bench_options={"n": n}, wandb=False, run_name="uninterrupted")
    assert run(ref) == 0
    ref_res = json.loads((run_dir_of(ref) / "results.json").read_text())
    assert ref_res["metrics"] == res["metrics"] and 0 < ref_res["metrics"]["Shapes"] < 100
    assert_answers_vary([r["text"] for r in read_jsonl(run_dir_of(ref) / "merge.jsonl")], 6)  # real answers compared
    key = lambda r: (r["question_id"], r["text"])  # noqa: E731
    assert [key(r) for r in read_jsonl(run_dir_of(ref) / "merge.jsonl")] == \
        [key(r) for r in read_jsonl(run_dir_of(c) / "merge.jsonl")]


def test_resume_refuses_a_different_config(data, tmp_path, capsys):
    c = cfg(data, tmp_path, "vizwiz", run_name="same")
    assert run(c) == 0
    c2 = cfg(data, tmp_path, "vizwiz", run_name="same", budget=8)
    assert run(c2) == 2
    assert "different configuration" in capsys.readouterr().err


def test_merge_checks_exactly_once_and_order(data, tmp_path):
    b = get_benchmark("pope", data)
    qs = b.load()
    ans = tmp_path / "answers"
    ans.mkdir()

    def write(name, idxs):
        with open(ans / name, "w") as f:
            for i in idxs:
                f.write(json.dumps({**b.record(qs[i], "yes", "m"), "_eval": {"uid": qs[i].uid, "idx": i}}) + "\n")

    write("2_1.jsonl", [3, 4, 5])
    write("2_0.jsonl", [0, 1])
    with pytest.raises(MergeError, match="1 of 6 question"):
        merge(tmp_path, qs)
    write("2_0.jsonl", [0, 1, 2, 2])
    with pytest.raises(MergeError, match="more than once"):
        merge(tmp_path, qs)
    write("2_0.jsonl", [2, 1, 0])  # any order inside the shards
    official, metas = merge(tmp_path, qs)
    assert [r["question_id"] for r in official] == [q.qid for q in qs] and [m["idx"] for m in metas] == list(range(6))
    report = {}  # an answer to a question no longer in the list: left out of the score, with a note
    official, _ = merge(tmp_path, qs[:5], report=report)
    assert len(official) == 5 and report["left_out"]["uids"] == [qs[5].uid]


# ---------------------------------------------------------------- W&B


def test_wandb_offline_run_logs_table_with_overlays(data, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    c = cfg(data, tmp_path, "gqa", overlay_samples=2)
    assert run(c) == 0
    rd = run_dir_of(c)
    res = json.loads((rd / "results.json").read_text())
    assert res["wandb"]["mode"] == "offline" and "error" not in res["wandb"], res["wandb"]
    assert list((rd / "wandb").glob("offline-run-*/run-*.wandb"))
    overlays = sorted((rd / "overlays").glob("*.png"))
    assert len(overlays) == 2
    from PIL import Image

    img = Image.open(overlays[0])
    # 4 of the 4 x 4 patches kept: 12 cells darkened to a quarter brightness
    assert img.size == (336, 336)
    metas = [r["_eval"] for r in read_jsonl(_shard(rd))]
    assert [m.get("overlay") for m in metas[:2]] == [f"overlays/{m['uid']}.png" for m in metas[:2]]


class _FakeWandb(types.ModuleType):
    def __init__(self, mode):
        super().__init__("wandb")
        self.mode = mode

    class Settings:
        def __init__(self, **kw):
            pass

    def init(self, **kw):
        if self.mode == "init-raises":
            raise RuntimeError("no network")
        if self.mode == "init-hangs":
            time.sleep(60)
        run = types.SimpleNamespace(id="x", name="n", project="p", url=None, dir=".", summary={},
                                    config=types.SimpleNamespace(update=lambda *a, **k: None))

        def log(*a, **k):
            raise ConnectionError("upload failed")

        run.log = log
        run.finish = lambda: None
        return run


def test_wandb_failures_never_fail_the_run(data, tmp_path, monkeypatch):
    from eval.wandb_log import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setitem(sys.modules, "wandb", _FakeWandb("init-raises"))
    c = cfg(data, tmp_path, "vizwiz")
    assert run(c) == 0
    res = json.loads((run_dir_of(c) / "results.json").read_text())
    assert "init" in res["wandb"]["error"]
    monkeypatch.setitem(sys.modules, "wandb", _FakeWandb("log-raises"))
    w = WandbLogger(project="p")
    assert w.active
    w.log({"a": 1})  # raises inside: logged, the logger turns itself off
    assert not w.active and "log" in w.error
    w.table("t", ["a"], [[1]])
    assert w.finish()
    monkeypatch.setitem(sys.modules, "wandb", _FakeWandb("init-hangs"))
    t0 = time.time()
    w = WandbLogger(project="p", hard_timeout=0.5)
    assert time.time() - t0 < 5 and not w.active and w.hung and not w.finish()


def test_wandb_modes(monkeypatch, tmp_path):
    from eval.wandb_log import WandbLogger, resolve_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_mode() == "offline"  # no login -> offline
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert resolve_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode() == "disabled"
    monkeypatch.setenv("WANDB_MODE", "online")
    w = WandbLogger(enabled=False)  # --no-wandb wins over WANDB_MODE and never imports wandb
    assert w.mode == "disabled" and w.wandb is None and not w.active
    from eval.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])


# ---------------------------------------------------------------- LLM judge against a local fake server


class _Judge(http.server.BaseHTTPRequestHandler):
    calls: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Judge.calls.append({"auth": self.headers.get("Authorization"), "body": body})
        text = body["messages"][-1]["content"]
        if "Correctness" in text:  # MM-Vet grader; the item is the last table row (ends with an empty cell)
            item = [ln for ln in text.split("\n") if ln.endswith(" | ")][-1]
            if item.startswith("What is x"):
                content = "0.5" if "Predict the correctness" in text else "great"  # first reply unparseable
            else:
                content = "1.0" if item.startswith("What is in the picture") else "0.0"
        else:  # video QA
            if "clip 2" in text and not any("clip 2" in c["body"]["messages"][-1]["content"] for c in _Judge.calls[:-1]):
                content = "sure, it matches"  # not a dict: asked again
            elif "clip 0" in text or "clip 1" in text:
                content = "{'pred': 'yes', 'score': 4}"
            else:
                content = "{'pred': 'no', 'score': 1}"
        out = json.dumps({"model": body["model"] + "-0613", "choices": [{"message": {"role": "assistant", "content": content}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(out.encode())


@pytest.fixture
def judge_server():
    _Judge.calls = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_video_qa_judged_during_the_run(data, tmp_path, judge_server, monkeypatch):
    monkeypatch.setenv("FAKE_JUDGE_KEY", "secret")
    c = cfg(data, tmp_path, "msvd", judge_base_url=judge_server, judge_model="fake-judge", judge_api_key_env="FAKE_JUDGE_KEY")
    assert run(c) == 0
    rd = run_dir_of(c)
    res = json.loads((rd / "results.json").read_text())
    # clips 0, 1 judged yes/4, clips 2-4 no/1: accuracy 2/5, score (4 + 4 + 1 + 1 + 1) / 5
    assert res["metrics"]["MSVD-QA-acc"] == pytest.approx(40.0) and res["metrics"]["MSVD-QA-score"] == pytest.approx(2.2)
    assert res["judge"]["model"] == "fake-judge" and res["judge"]["served_models"] == ["fake-judge-0613"]
    assert res["judge"]["failures"] == 0 and "judge=fake-judge" in res["metric_labels"]["MSVD-QA-acc"]
    assert all(c_["auth"] == "Bearer secret" for c_ in _Judge.calls)
    assert "secret" not in (rd / "results.json").read_text()
    assert len(list((rd / "judge" / "fake-judge").glob("*.json"))) == 5
    assert res["tokens"]["tok_in"] == 32.0 and res["tokens"]["visual_candidates_mean"] == 136.0  # 8 frames x (16 + [CLS])
    recs = read_jsonl(rd / "merge.jsonl")
    assert [r["answer"] for r in recs] == [f"answer {i}" for i in range(5)]  # paired by question id


def test_mmvet_answers_saved_then_judged_with_one_command(data, tmp_path, judge_server, monkeypatch):
    from eval.cli import main

    c = cfg(data, tmp_path, "mmvet")
    assert run(c) == 0  # no judge configured: answers + results file, score pending
    rd = run_dir_of(c)
    res = json.loads((rd / "results.json").read_text())
    assert res["metrics"] == {} and res["pending"] and (rd / "results" / f"{rd.name}.json").exists()
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert main(["judge", str(rd), "--base-url", judge_server, "--model", "fake-grader"]) == 0
    res = json.loads((rd / "results.json").read_text())
    # grades: v1_0 0.5 (after one re-ask), v1_1 1.0, v1_2 0.0 -> total 50; rec = (1.0 + 0.0) / 2
    assert res["metrics"]["MM-Vet"] == pytest.approx(50.0)
    assert res["details"]["judge"]["capabilities"] == {"ocr": 50.0, "math": 50.0, "rec": 50.0, "know": 0.0}
    assert res["pending"] == [] and res["judge"]["date"]
    assert main(["score", str(rd)]) == 0  # re-scoring keeps the judged metric
    assert json.loads((rd / "results.json").read_text())["metrics"]["MM-Vet"] == pytest.approx(50.0)


# ---------------------------------------------------------------- launchers


def test_local_rank_from_the_deepspeed_launcher(data, tmp_path, monkeypatch):
    from eval.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    info = dist.detect(local_rank_arg=1)  # deepspeed: --local_rank=1 (RANK may be absent on old launchers)
    assert (info.rank, info.world, info.local_rank) == (1, 2, 1)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError):
        dist.detect(local_rank_arg=1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("LOCAL_RANK")
    # the launcher puts --local_rank=N right after `-m eval`, before the subcommand
    argv = ["--local_rank=0", "run", "vizwiz", "--model", "tiny:llava", "--method", "random", "--budget", "4",
            "--max-new-tokens", "2", "--data-root", str(data), "--out", str(tmp_path), "--no-wandb"]
    assert main(argv) == 0
    res = json.loads(next(tmp_path.rglob("results.json")).read_text())
    assert res["config"]["local_rank"] == 0 and res["counts"]["answered"] == 3


def test_deepspeed_launch_command(tmp_path):
    fake = tmp_path / "bin" / "deepspeed"
    fake.parent.mkdir()
    fake.write_text("#!/usr/bin/env bash\nprintf '%s\\n' \"$@\" > \"$ARGV_OUT\"\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "ARGV_OUT": str(tmp_path / "argv"),
           "LAUNCHER": "deepspeed", "NPROC": "2", "DATA_ROOT": str(tmp_path), "OUT": str(tmp_path / "runs"),
           "MASTER_PORT": "29611"}
    subprocess.run(["bash", str(REPO / "scripts/eval/gqa.sh"), "consensusdrop", "64", "tiny:llava", "--opt", "k=1"],
                   env=env, check=True)
    argv = (tmp_path / "argv").read_text().split("\n")[:-1]
    assert argv[:5] == ["--num_gpus", "2", "--master_port", "29611", "--module"]
    assert argv[5:8] == ["eval", "run", "gqa"]
    for a, b in [("--model", "tiny:llava"), ("--method", "consensusdrop"), ("--budget", "64"), ("--opt", "k=1"),
                 ("--launcher", "deepspeed"), ("--data-root", str(tmp_path))]:
        assert argv[argv.index(a) + 1] == b


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is an optional extra ([deepspeed])")
def test_real_deepspeed_launcher_two_processes(data, tmp_path):
    env = {**os.environ, "LAUNCHER": "deepspeed", "NPROC": "2", "DATA_ROOT": str(data), "OUT": str(tmp_path),
           "WANDB_MODE": "disabled", "MASTER_PORT": "29613"}
    p = subprocess.run(["bash", str(REPO / "scripts/eval/vizwiz.sh"), "random", "4", "tiny:llava", "--max-new-tokens", "2"],
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(next(tmp_path.rglob("results.json")).read_text())
    assert res["world_size"] == 2 and res["launcher"] == "deepspeed" and res["counts"]["answered"] == 3
    # each rank's model went through deepspeed.init_inference (recorded with the model)
    assert res["model"]["deepspeed"]["tp_size"] == 1 and res["model"]["deepspeed"]["kernel_inject"] is False


def test_vision_dtype_run_keeps_the_tower_in_fp32_and_labels_the_run(data, tmp_path, run_env):
    """--vision-dtype float32 under a bf16 LLM (LLaVA's own loader): the run answers, is labelled, and
    records the tower dtype with the model; a family without a CLIP tower is one clear error."""
    cfg = RunConfig(benchmark="pope", model="tiny:llava", method="fastv", budget=8, data_root=str(data),
                    out=str(tmp_path), wandb=False, max_new_tokens=2, dtype="bfloat16", vision_dtype="float32")
    assert run(cfg) == 0
    rd = run_dir_of(cfg)
    assert rd.name.endswith("visfloat32")
    res = json.loads((rd / "results.json").read_text())
    assert res["model"]["vision_dtype"] == "float32" and res["counts"]["answered"] > 0
    bad = RunConfig(benchmark="pope", model="tiny:qwen2.5-vl", method="fastv", budget=8, data_root=str(data),
                    out=str(tmp_path / "q"), wandb=False, max_new_tokens=2, dtype="bfloat16", vision_dtype="float32")
    assert run(bad) == 2
