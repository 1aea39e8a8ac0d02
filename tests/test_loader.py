"""``eval run --loader-workers N`` (issue 79): the next batches' inputs prepared by forked workers while the model
answers. The answers are the in-loop path's, in order; a bad input, a kill and Ctrl-C behave as in the loop; each
batch's times go into its answers and the loop ledger, and results.json's ``throughput`` adds them up."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eval.benchmarks import get_benchmark
from eval.fixtures import write_fixtures
from eval.hf_backend import _Batches
from eval.loader import BatchInputs, Prefetcher, default_workers
from eval.throughput import TIMING_DIR, ledger_lines, summary
from varied_answers import assert_answers_vary, save_varied_llava

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory):
    """Images (POPE, GQA), inline base64 images (MMBench), text-only and image problems (ScienceQA), videos (MSVD)."""
    return write_fixtures(tmp_path_factory.mktemp("loader_data"), ["pope", "gqa", "mmbench", "sqa", "msvd"])


@pytest.fixture(scope="module")
def varied_model(tmp_path_factory):
    """A tiny LLaVA whose answers differ by question (tests/varied_answers.py)."""
    return save_varied_llava(tmp_path_factory.mktemp("varied") / "gridmodel")


def _prepared(data, bench_name, processor, batch_size, workers):
    bench = get_benchmark(bench_name, str(data))
    batches = _Batches(bench.load(), batch_size).batches
    pf = Prefetcher(BatchInputs(batches, processor, bench.root, Path("unused.jsonl")), workers)
    try:
        return batches, list(pf)
    finally:
        pf.close()


def _mp4_videos(data: Path, dest: Path) -> Path:
    """MSVD's fixture with an H.264 mp4 beside each GIF (found first: eval.benchmarks.videoqa.VIDEO_FORMATS)."""
    import shutil

    av = pytest.importorskip("av")
    import numpy as np

    root = Path(shutil.copytree(data, dest))
    gifs = sorted(root.rglob("*.gif"))
    assert gifs
    for k, gif in enumerate(gifs):
        with av.open(str(gif.with_suffix(".mp4")), mode="w") as out:
            st = out.add_stream("libx264", rate=10)
            st.width, st.height, st.pix_fmt = 64, 48, "yuv420p"
            for i in range(12):
                img = np.full((48, 64, 3), (8 * i + 40 * k) % 256, dtype=np.uint8)
                img[:, : 4 * i] = 255
                for packet in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(packet)
            for packet in st.encode():
                out.mux(packet)
    return root


@pytest.mark.parametrize("bench_name, model", [("gqa", "tiny:llava"), ("mmbench", "tiny:llava"),
                                               ("sqa", "tiny:llava"), ("msvd", "tiny:video-llava"),
                                               ("msvd-mp4", "tiny:video-llava")])
def test_workers_prepare_the_loops_inputs_in_order(fixture_data, tmp_path, bench_name, model):
    """Every batch (images from files, inline images, text-only, videos as GIFs / frame folders / mp4 files decoded
    by PyAV) prepared by 2 forked workers is the in-loop preparation: same order, same input hashes, the same tensors
    bit for bit (the workers fork after the loop's own decoding has used PIL / PyAV in this process)."""
    from llava.models import load

    if bench_name == "msvd-mp4":
        fixture_data, bench_name = _mp4_videos(fixture_data, tmp_path / "mp4"), "msvd"
        qs = get_benchmark("msvd", str(fixture_data)).load()
        assert sum(str(q.video).endswith(".mp4") for q in qs) >= 2
    rt = load(model, dtype="float32", device="cpu")
    batches, alone = _prepared(fixture_data, bench_name, rt.processor, 2, 0)
    _, ahead = _prepared(fixture_data, bench_name, rt.processor, 2, 2)
    assert len(batches) >= 2 and [p.index for p in ahead] == list(range(len(batches)))
    modalities = {q.modality for b in batches for q in b}
    if bench_name == "sqa":
        assert modalities == {"text", "image"}  # the batches keep one modality each
    for a, b in zip(alone, ahead):
        assert a.error is None and b.error is None
        assert a.hashes == b.hashes and len(a.hashes) == len(batches[a.index])
        assert sorted(a.inputs) == sorted(b.inputs)
        for k in a.inputs:
            assert a.inputs[k].dtype == b.inputs[k].dtype and torch.equal(a.inputs[k], b.inputs[k]), k
        assert a.prepare_s > 0 and b.prepare_s > 0
    if bench_name == "msvd":
        assert "pixel_values_videos" in alone[0].inputs


def test_default_workers_is_llavas_four_within_this_process_share_of_the_cores(monkeypatch):
    for k in ("LOCAL_SIZE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_NODEID"):
        monkeypatch.delenv(k, raising=False)
    cases = [(16, None, 4), (16, "8", 1), (16, "16", 0), (3, None, 2), (2, None, 1), (1, None, 0), (64, "4", 4)]
    for cores, local, want in cases:
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)), raising=False)
        if local is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        assert default_workers() == want, (cores, local)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(12)), raising=False)
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "4(x2)")  # srun: 4 tasks on each of 2 nodes
    assert default_workers() == 2  # 12 cores / 4 tasks - 1
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "6(x2),2")  # 6, 6 and 2 tasks on the step's 3 nodes
    assert default_workers() == 1  # node 0: 12 / 6 - 1
    monkeypatch.setenv("SLURM_NODEID", "2")
    assert default_workers() == 4  # node 2: 12 / 2 - 1 = 5, at most LLaVA's 4


def _answers(run_dir):
    """The run's answer records as compared: everything but the random answer id and the times."""
    out = []
    for p in sorted((run_dir / "answers").glob("*.jsonl")):
        for ln in p.read_text().splitlines():
            r = json.loads(ln)
            r.pop("answer_id")
            r["_eval"].pop("time")
            out.append(r)
    return out


def _run(data, out, model, *extra, name="r"):
    from eval.cli import main

    return main(["run", "pope", "--model", str(model), "--data-root", str(data), "--out", str(out), "--no-wandb",
                 "--run-name", name, "--max-new-tokens", "4", *extra])


@pytest.mark.usefixtures("run_env")
def test_answers_with_workers_equal_the_in_loop_answers_and_the_times_add_up(fixture_data, varied_model, tmp_path):
    """POPE on a model whose answers vary: 3 workers and the in-loop path give the same records in the same order
    (batch 1 and batch 2); each record's times and the loop ledger; results.json's throughput adds the ledger up;
    ``eval table --throughput`` shows it."""
    for bs in ("1", "2"):
        assert _run(fixture_data, tmp_path / "loop", varied_model, "--loader-workers", "0", "--batch-size", bs,
                    name=f"b{bs}") == 0
        assert _run(fixture_data, tmp_path / "ahead", varied_model, "--loader-workers", "3", "--batch-size", bs,
                    name=f"b{bs}") == 0
        loop, ahead = _answers(tmp_path / "loop" / "pope" / f"b{bs}"), _answers(tmp_path / "ahead" / "pope" / f"b{bs}")
        assert_answers_vary([r["text"] for r in loop], 4)
        assert ahead == loop
        assert [r["_eval"]["idx"] for r in ahead] == list(range(len(ahead)))
    rd = tmp_path / "ahead" / "pope" / "b2"
    recs = [json.loads(ln) for ln in (rd / "answers" / "1_0.jsonl").read_text().splitlines()]
    assert {"host_wait", "prepare", "generate", "post"} <= set(recs[0]["_eval"]["time"])
    lines = ledger_lines(rd)
    assert [ln["n"] for ln in lines] == [2, 2, 2] and [ln["first"] for ln in lines] == [r["_eval"]["uid"] for r in recs[::2]]
    assert {ln["loader_workers"] for ln in lines} == {3}
    for ln, r in zip(lines, recs[::2]):  # a record's times are its batch's over the batch's size
        for k in ("host_wait", "prepare", "generate", "post"):
            assert r["_eval"]["time"][k] == pytest.approx(ln[k] / 2, abs=1e-6)
    res = json.loads((rd / "results.json").read_text())
    t = res["throughput"]
    loop_s = sum(ln[k] for ln in lines for k in ("host_wait", "generate", "post", "write"))
    assert t["questions"] == 6 and t["batches"] == 3 and t["loader_workers"] == [3] and t["processes"] == 1
    assert t["loop_s"] == pytest.approx(loop_s, abs=2e-3)
    assert t["questions_per_s"] == pytest.approx(6 / loop_s, rel=1e-2)
    assert t["host_wait_fraction"] == pytest.approx(sum(ln["host_wait"] for ln in lines) / loop_s, abs=1e-3)
    assert 0 < t["device_busy_fraction"] < 1 and len(t["sessions"]) == 1
    from eval.cli import main

    out = tmp_path / "table.md"
    assert main(["table", str(rd), "--throughput", "--out", str(out)]) == 0
    row = [ln for ln in out.read_text().splitlines() if ln.startswith("| Vanilla")][0]
    assert f"| {t['questions_per_s']:.2f} | {100 * t['host_wait_fraction']:.1f}% |" in row


def test_summary_adds_sessions_and_processes_up(tmp_path):
    """Two sessions' ledgers, worked out by hand: the second ran 2 processes, one batch compiled a graph."""
    d = tmp_path / TIMING_DIR
    d.mkdir()
    a = {"session": "20261127-100000-1", "rank": 0, "processes": 1, "loader_workers": 4}
    b = {"session": "20261127-110000-2", "processes": 2, "loader_workers": 2}
    (d / "1_0.jsonl").write_text("\n".join(json.dumps(x) for x in [
        {**a, "n": 2, "first": "q0", "host_wait": 0.5, "prepare": 0.4, "generate": 3.0, "post": 0.25, "write": 0.25,
         "new_graph": True},
        {**a, "n": 2, "first": "q2", "host_wait": 0.0, "prepare": 0.4, "generate": 1.0, "post": 0.5, "write": 0.5}]) + "\n")
    (d / "2_0.jsonl").write_text(json.dumps({**b, "rank": 0, "n": 1, "first": "q4", "host_wait": 0.5, "prepare": 0.2,
                                             "generate": 1.0, "post": 0.25, "write": 0.25}) + "\n")
    (d / "2_1.jsonl").write_text(json.dumps({**b, "rank": 1, "n": 3, "first": "q5", "host_wait": 1.0, "prepare": 0.6,
                                             "generate": 2.5, "post": 0.25, "write": 0.25}) + "\n{\"torn")
    s = summary(tmp_path)
    # loop: 4.0 + 2.0 + 2.0 + 4.0 = 12 s for 8 questions; the last session's 2 processes side by side
    assert s["loop_s"] == 12.0 and s["questions"] == 8 and s["processes"] == 2
    assert s["questions_per_s"] == pytest.approx(8 / 12 * 2, abs=1e-3)
    assert s["host_wait_fraction"] == pytest.approx(2.0 / 12, abs=1e-4)
    assert s["device_busy_fraction"] == pytest.approx(7.5 / 12, abs=1e-4)
    assert s["compile_s"] == 3.0 and s["compile_batches"] == 1
    assert s["questions_per_s_without_compile"] == pytest.approx(6 / 9 * 2, abs=1e-3)
    first, second = s["sessions"]
    assert first["questions"] == 4 and first["loop_s"] == 6.0 and first["questions_per_s"] == pytest.approx(4 / 6, abs=1e-3)
    assert second["questions"] == 4 and second["loop_s"] == 6.0 and second["questions_per_s"] == pytest.approx(4 / 6 * 2, abs=1e-3)
    assert s["loader_workers"] == [2, 4] and summary(tmp_path / "none") is None


def _corrupt(data, k):
    """POPE's question ``k`` reads a file that is not an image any more (its own copy: questions share images)."""
    qf = data / "pope" / "llava_pope_test.jsonl"
    qs = [json.loads(ln) for ln in qf.read_text().splitlines() if ln.strip()]
    bench = get_benchmark("pope", str(data))
    src = Path(bench.load()[k].image)
    bad = src.with_name("broken_" + src.name)
    bad.write_bytes(b"not an image at all")
    qs[k]["image"] = bad.name
    qf.write_text("".join(json.dumps(q) + "\n" for q in qs))


@pytest.mark.usefixtures("run_env")
def test_a_bad_input_stops_with_workers_as_in_the_loop(data, capsys):
    """The 4th question's image is broken: with 2 workers (which read it early) the run still answers the 3
    questions before it, writes them, and stops with the in-loop path's own error line and exit status."""
    _corrupt(data, 3)
    got = {}
    for w in ("0", "2"):
        out = data.parent / f"runs{w}"
        code = _run(data, out, "tiny:llava", "--loader-workers", w)
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert code == 2 and len(errors) == 1, err
        rd = out / "pope" / "r"
        got[w] = (errors[0].replace(str(out), "OUT"), [r["_eval"]["uid"] for r in _answers(rd)])
    assert got["2"] == got["0"]
    assert len(got["0"][1]) == 3 and "cannot read the image of question" in got["0"][0]
    assert "3 answers of this session are saved in OUT" in got["0"][0]


def _processes_with(marker: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="looks for the workers in /proc")
@pytest.mark.usefixtures("run_env")
def test_a_kill_mid_run_with_workers_loses_only_the_batch_in_flight_and_resumes(fixture_data, varied_model, tmp_path):
    """--stop-after 2 (an abrupt exit, as a kill) with 2 workers busy ahead: the 2 answered batches are on disk, no
    worker outlives the run, and the same command with workers finishes with the uninterrupted run's answers."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "eval", "run", "pope", "--model", str(varied_model), "--data-root",
           str(fixture_data), "--out", str(out), "--no-wandb", "--run-name", "r", "--max-new-tokens", "4",
           "--loader-workers", "2", "--stop-after", "2"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 3, p.stderr[-3000:]
    rd = out / "pope" / "r"
    assert [r["_eval"]["idx"] for r in _answers(rd)] == [0, 1]
    for _ in range(100):  # the workers die with their parent (at once on Linux; give a loaded machine 10 s)
        if not _processes_with(str(out)):
            break
        time.sleep(0.1)
    assert _processes_with(str(out)) == []
    assert _run(fixture_data, out, varied_model, "--loader-workers", "2") == 0
    assert _run(fixture_data, tmp_path / "ref", varied_model, "--loader-workers", "0") == 0
    ref = _answers(tmp_path / "ref" / "pope" / "r")
    assert_answers_vary([r["text"] for r in ref], 4)
    assert _answers(rd) == ref
    assert len({ln["session"] for ln in ledger_lines(rd)}) == 2  # the killed session's batches and the resumed one's


#: Ctrl-C as a terminal sends it: SIGINT to the whole process group (the run and its loader workers), here as the
#: loop starts its 3rd batch (2 answered and on disk)
CTRL_C = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
import eval.hf_backend as hb
real, calls = hb._answer_batch, [0]
def answer(*a, **k):
    calls[0] += 1
    if calls[0] == 3:
        os.killpg(os.getpgid(0), signal.SIGINT)
    return real(*a, **k)
hb._answer_batch = answer
from eval.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.usefixtures("run_env")
def test_ctrl_c_with_workers_says_one_line_and_the_same_command_resumes(fixture_data, tmp_path):
    out = tmp_path / "runs"
    args = ["run", "pope", "--model", "tiny:llava", "--max-new-tokens", "2", "--data-root", str(fixture_data),
            "--out", str(out), "--no-wandb", "--run-name", "r", "--loader-workers", "2"]
    p = subprocess.run([sys.executable, "-c", CTRL_C, *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300, start_new_session=True)  # its own process group: the SIGINT stays in it
    assert p.returncode == 130, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "KeyboardInterrupt" not in p.stderr, p.stderr[-3000:]
    rd = out / "pope" / "r"
    assert p.stderr.splitlines()[-1] == f"interrupted: 2 answers saved in {rd}; run the same command to resume"
    from eval.cli import main

    assert main(args) == 0
    assert [r["_eval"]["idx"] for r in _answers(rd)] == list(range(6))


@pytest.mark.usefixtures("run_env")
def test_overwrite_moves_the_ledgers_with_the_answers(fixture_data, tmp_path):
    assert _run(fixture_data, tmp_path, "tiny:llava", "--limit", "2", "--loader-workers", "1") == 0
    rd = tmp_path / "pope" / "r"
    assert len(ledger_lines(rd)) == 2
    assert _run(fixture_data, tmp_path, "tiny:llava", "--limit", "2", "--loader-workers", "1", "--overwrite") == 0
    assert len(ledger_lines(rd)) == 2  # this session's only
    (old,) = (rd / "superseded").iterdir()
    assert len(ledger_lines(old)) == 2


def test_loader_workers_must_not_be_negative(tmp_path, capsys, run_env):
    from eval.cli import main

    assert main(["run", "pope", "--data-root", str(tmp_path), "--loader-workers", "-1", "--no-wandb"]) == 2
    assert "--loader-workers must be >= 0" in capsys.readouterr().err


def test_the_scripts_pass_loader_workers_and_share_one_compile_cache_under_fast(tmp_path):
    """scripts/eval/<bench>.sh: LOADER_WORKERS becomes --loader-workers; FAST=1 points every config's compile cache at
    OUT/.compile-cache unless VTPRUNE_COMPILE_CACHE is set (a stub python records its arguments and that variable)."""
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text("#!/usr/bin/env bash\nprintf '%s\\n' \"${VTPRUNE_COMPILE_CACHE:-unset}\" \"$@\" > \"$ARGV_OUT\"\n")
    fake.chmod(0o755)
    base = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "ARGV_OUT": str(tmp_path / "argv"),
            "LAUNCHER": "python", "DATA_ROOT": str(tmp_path), "OUT": str(tmp_path / "runs")}
    base.pop("VTPRUNE_COMPILE_CACHE", None)

    def argv(**env):
        subprocess.run(["bash", str(ROOT / "scripts/eval/gqa.sh"), "consensusdrop", "64", "tiny:llava"],
                       env={**base, **env}, check=True)
        return (tmp_path / "argv").read_text().split("\n")[:-1]

    a = argv(LOADER_WORKERS="3")
    assert a[0] == "unset" and a[a.index("--loader-workers") + 1] == "3" and "--fast" not in a
    a = argv(FAST="1")
    assert a[0] == str(tmp_path / "runs" / ".compile-cache") and "--fast" in a and "--loader-workers" not in a
    assert argv(FAST="1", VTPRUNE_COMPILE_CACHE="/elsewhere")[0] == "/elsewhere"


def test_torchrun_ranks_with_workers_answer_as_one_process_in_the_loop(fixture_data, varied_model, tmp_path):
    """scripts/eval/pope.sh under torchrun, 2 ranks with a loader worker each (LOADER_WORKERS=1): each rank's shard
    and the merged answers are one process's answers made in the loop (NPROC=1, LOADER_WORKERS=0)."""
    def script(nproc, workers, out):
        env = {**_env(), "NPROC": str(nproc), "LOADER_WORKERS": str(workers), "DATA_ROOT": str(fixture_data),
               "OUT": str(out)}
        env.pop("PYTHONPATH")
        for k in ("MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        p = subprocess.run(["bash", str(ROOT / "scripts" / "eval" / "pope.sh"), "random", "4", str(varied_model),
                            "--max-new-tokens", "4"], env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-4000:]
        (rd,) = (out / "pope").iterdir()
        return rd

    ranks = script(2, 1, tmp_path / "ranks")
    alone = script(1, 0, tmp_path / "alone")
    assert sorted(p.name for p in (ranks / "answers").iterdir()) == ["2_0.jsonl", "2_1.jsonl"]
    assert {ln["loader_workers"] for ln in ledger_lines(ranks)} == {1}
    assert {(ln["rank"], ln["processes"]) for ln in ledger_lines(ranks)} == {(0, 2), (1, 2)}
    a, b = _answers(ranks), _answers(alone)
    for r in a + b:  # the rank that answered, and its overlay pictures (the first --overlay-samples of each rank)
        r["_eval"].pop("rank")
        r["_eval"].pop("overlay", None)
    assert_answers_vary([r["text"] for r in b], 4)
    assert a == b
    res = json.loads((ranks / "results.json").read_text())
    assert res["throughput"]["processes"] == 2 and res["throughput"]["questions"] == 6


def test_packed_tensors_come_back_bit_for_bit_and_large_ones_stay_tensors(monkeypatch):
    """A worker's tensors travel as bytes (dtype and shape beside), bfloat16 and fp16 included; a tensor above
    BY_VALUE_BYTES stays a tensor (shared memory); unpacking twice changes nothing."""
    import eval.loader as ld
    from eval.loader import Prepared

    g = torch.Generator().manual_seed(0)
    inputs = {"ids": torch.randint(0, 32000, (2, 7), generator=g), "mask": torch.ones(2, 7, dtype=torch.long),
              "px": torch.randn(1, 3, 5, 4, generator=g).to(torch.bfloat16),
              "half": torch.randn(3, 2, generator=g).half()[:, :1],  # not contiguous
              "big": torch.randn(64, 64, generator=g)}
    monkeypatch.setattr(ld, "BY_VALUE_BYTES", 64 * 64 * 4 - 1)
    p = Prepared(0, inputs=dict(inputs)).pack()
    assert isinstance(p.inputs["big"], torch.Tensor) and isinstance(p.inputs["px"], tuple)
    p.unpack().unpack()
    for k, v in inputs.items():
        assert p.inputs[k].dtype == v.dtype and p.inputs[k].shape == v.shape
        assert torch.equal(p.inputs[k].view(-1).view(torch.uint8) if v.dtype == torch.bfloat16 else p.inputs[k],
                           v.contiguous().view(-1).view(torch.uint8) if v.dtype == torch.bfloat16 else v), k


def test_a_table_row_over_several_runs_adds_their_loops_up():
    """``eval table --throughput``: a row's runs (one per benchmark) give questions over their loops' seconds (each
    over its processes side by side) and the host wait over all their loop time; a row without ledgers gives none."""
    from eval.table import Row, _throughput

    row = Row("none", None, {}, cells={
        "gqa": {"throughput": {"questions": 100, "loop_s": 10.0, "processes": 1, "host_wait_s": 1.0,
                               "questions_per_s": 10.0, "host_wait_fraction": 0.1}},
        "pope": {"throughput": {"questions": 300, "loop_s": 40.0, "processes": 2, "host_wait_s": 4.0,
                                "questions_per_s": 15.0, "host_wait_fraction": 0.1}},
        "mme": {"throughput": None}})
    qps, wait = _throughput(row)
    assert qps == pytest.approx(400 / (10 + 20)) and wait == pytest.approx(5 / 50)
    assert _throughput(Row("none", None, {}, cells={"mme": {}})) == (None, None)


def test_a_daemonic_process_prepares_in_the_loop(fixture_data, caplog):
    """A run inside a daemonic process (a multiprocessing.Pool's worker) cannot start workers: the inputs are prepared
    in the loop, said once, and they are the same."""
    import multiprocessing
    import logging

    from llava.models import load

    rt = load("tiny:llava", dtype="float32", device="cpu")
    bench = get_benchmark("pope", str(fixture_data))
    batches = _Batches(bench.load(), 2).batches
    me = multiprocessing.current_process()
    was = me.daemon
    me._config["daemon"] = True
    try:
        with caplog.at_level(logging.WARNING, logger="eval"):
            pf = Prefetcher(BatchInputs(batches, rt.processor, bench.root, Path("unused.jsonl")), 2)
        got = list(pf)
    finally:
        me._config["daemon"] = was
    assert pf.workers == 0 and [p.index for p in got] == list(range(len(batches)))
    assert any("a daemonic process cannot start workers" in r.getMessage() for r in caplog.records)


@pytest.mark.usefixtures("run_env")
def test_the_fast_path_with_workers_answers_as_in_the_loop(fixture_data, varied_model, tmp_path):
    """--fast (the planned, static-shape prefill; backend eager here) takes the workers' inputs as the loop's:
    the same answers, every prefill on the fast path."""
    for w in ("0", "2"):
        assert _run(fixture_data, tmp_path / f"w{w}", varied_model, "--method", "random", "--budget", "4", "--fast",
                    "--fast-backend", "eager", "--loader-workers", w) == 0
    a, b = (_answers(tmp_path / f"w{w}" / "pope" / "r") for w in ("0", "2"))
    assert_answers_vary([r["text"] for r in a], 4)
    assert a == b and {r["_eval"]["path"] for r in b} == {"fast"}
