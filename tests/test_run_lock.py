"""One writer per run folder (eval/run_lock.py): a second ``eval run`` on the same folder is refused with one
``error:`` line and exit 2; a lock left by a writer killed with SIGKILL is taken over, said in one line, and no
answer is lost (item 4 of the Slurm issue: before, two processes on one config both answered into the same
``answers/*.jsonl``)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import child_env

from eval.run_lock import LOCK_FILE, LockBusy, RunLock
from varied_answers import assert_answers_vary, save_varied_llava

REPO = Path(__file__).resolve().parents[1]

HOLD = """
import sys, time
from eval.run_lock import RunLock
lock = RunLock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(float(sys.argv[2]))
if sys.argv[3] == "release":
    lock.release()
"""


def _env():
    return child_env(PYTHONPATH=REPO)


def _holder(folder, seconds=60, end="release"):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(seconds), end], stdout=subprocess.PIPE,
                         text=True, env=_env())
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_holder_is_refused_and_named(tmp_path):
    run = tmp_path / "runs" / "pope" / "x"
    p = _holder(run)
    try:
        holder = json.loads((run / LOCK_FILE).read_text())
        assert holder["pid"] == p.pid and holder["host"] == os.uname().nodename
        with pytest.raises(LockBusy) as e:
            RunLock.acquire(run)
        assert f"pid {p.pid} on host {holder['host']}" in str(e.value)
        assert "two writers would answer the same questions into one folder" in str(e.value)
    finally:
        p.kill()
        p.wait()


def test_clean_release_removes_the_file_and_a_killed_holder_is_taken_over(tmp_path):
    run = tmp_path / "r"
    lock = RunLock.acquire(run)
    assert lock.took_over is None and (run / LOCK_FILE).exists()
    lock.release()
    lock.release()  # idempotent
    assert not (run / LOCK_FILE).exists()
    p = _holder(run, end="keep")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == p.pid  # left behind, naming the dead writer
    lock = RunLock.acquire(run)
    assert lock.took_over["pid"] == p.pid
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_file_only_mode_judges_the_pid(tmp_path, monkeypatch):
    """On a file system without record locks the file decides: a dead pid on this host is stale, a live one (or
    a holder on another host) is refused."""
    import errno

    import eval.run_lock as rl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "no locks")

    monkeypatch.setattr(rl.fcntl, "lockf", no_locks)
    run = tmp_path / "r"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (run / LOCK_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead), "started": 1.0}))
    lock = RunLock.acquire(run)
    assert lock.took_over["pid"] == int(dead) and not lock.record_locks
    lock.release()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": sleeper.pid}))
        with pytest.raises(LockBusy, match=f"pid {sleeper.pid}"):
            RunLock.acquire(run)
        (run / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
        with pytest.raises(LockBusy, match="cannot be checked: if it is dead, delete"):
            RunLock.acquire(run)
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------------------------------------------------------
# the runner: two `eval run` on one folder; kill -9 of the holder, then a rerun
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mme(tmp_path_factory):
    from eval.fixtures import write_fixtures

    return write_fixtures(tmp_path_factory.mktemp("mme"), ["mme"])  # 28 questions


@pytest.fixture(scope="module")
def varied_model(tmp_path_factory):
    """A tiny LLaVA whose answers differ by question (tests/varied_answers.py; tiny:llava answers "with with ...",
    only its length varying, to every MME question): the answers kept across the kill are compared with the merged ones."""
    return save_varied_llava(tmp_path_factory.mktemp("varied") / "gridmodel")


def _run_args(data, out, *extra, model="tiny:llava"):
    return [sys.executable, "-m", "eval", "run", "mme", "--model", str(model), "--method", "random", "--budget",
            "8", "--data-root", str(data), "--out", str(out), "--no-wandb", "--launcher", "python", *extra]


def _answers(run_dir: Path, field: str = "text") -> dict:
    got = {}
    for f in sorted((run_dir / "answers").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                got[rec["_eval"]["idx"]] = rec[field]  # MME asks two questions per image: the index is the key
    return got


def _some_answer(run_dir: Path) -> bool:
    try:
        return run_dir.exists() and any(_answers(run_dir).values())
    except ValueError:  # a line caught half-written while the run goes on: look again
        return False


def test_two_writers_then_kill9_then_resume(mme, varied_model, tmp_path, run_env, capfd, caplog):
    """The first writer is a process of its own (stopped, then killed with SIGKILL); the second writer and the rerun
    are ``eval run`` in this test process (eval.cli.main, what ``python -m eval`` calls: another process than the
    first, whose lock is a record lock per process), two interpreter starts fewer (CI time)."""
    from eval.cli import main

    out = tmp_path / "runs"
    run_dir = out / "mme" / "gridmodel_random_b8"
    args = ("--max-new-tokens", "12")
    # the holder (28 questions, 12 new tokens each) is stopped (SIGSTOP) as soon as its first answer is on disk: a
    # stopped process still holds its lock, and a fast machine cannot finish all 28 while the second one starts
    # (CI's did, when the holder was only expected to be slow)
    first = subprocess.Popen(_run_args(mme, out, *args, model=varied_model), env=_env(), cwd=str(REPO),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not _some_answer(run_dir):
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)
        assert first.poll() is None, "the first run ended before it could be caught mid-run"
        capfd.readouterr()
        assert main(_run_args(mme, out, *args, model=varied_model)[3:]) == 2
        err = capfd.readouterr().err
        errors = [l for l in err.splitlines() if l.startswith("error:")]
        assert len(errors) == 1, err
        assert f"is being written by another run (pid {first.pid} on host" in errors[0]
        assert "Traceback" not in err
        before = _answers(run_dir)
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    kept = _answers(run_dir)
    assert 1 <= len(kept) < 28 and all(kept[q] == t for q, t in before.items())
    kept_ids = _answers(run_dir, "answer_id")
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == first.pid
    with caplog.at_level(logging.INFO, logger="eval"):  # the resume's count: a log line (stderr in a process)
        assert main(_run_args(mme, out, *args, model=varied_model)[3:]) == 0
    err = capfd.readouterr().err
    notes = [l for l in err.splitlines() if "was left locked by a run that is no longer running" in l]
    assert len(notes) == 1 and f"pid {first.pid}" in notes[0], err[-3000:]
    assert f"({len(kept)} already answered, {28 - len(kept)} to go)" in caplog.text
    assert not (run_dir / LOCK_FILE).exists()
    merged = [json.loads(l)["text"] for l in (run_dir / "merge.jsonl").read_text().splitlines()]  # question order
    assert len(merged) == 28
    assert_answers_vary(merged, 20)  # 28 different answers of 28: a kept answer in another question's place shows
    assert all(merged[i] == t for i, t in kept.items())  # no answer lost or rewritten
    # a recomputed answer has the same text (greedy): the records themselves were kept, not written again
    final_ids = _answers(run_dir, "answer_id")
    assert {q: final_ids[q] for q in kept_ids} == kept_ids


def test_folders_made_for_the_lock_go_when_left_empty(tmp_path):
    """A run refused after it took the lock (e.g. a model family that cannot run the benchmark) leaves no empty
    run folder behind; a folder that existed, or that holds answers, stays."""
    run = tmp_path / "out" / "msvd" / "x"
    RunLock.acquire(run).release()
    assert not (tmp_path / "out").exists()
    lock = RunLock.acquire(run)
    (run / "answers").mkdir()
    lock.release()
    assert (run / "answers").is_dir()
    pre = tmp_path / "pre"
    pre.mkdir()
    RunLock.acquire(pre).release()
    assert pre.is_dir()
