"""The GPU check's task machinery (bench/gpu_check/__init__.py runs the tasks with it): results are never lost.

* Worker processes (``run_workers``; ``--isolate``, the default on CUDA): a device-side assert leaves a CUDA
  context unusable, so a worker stops after the task that caused it and a fresh worker takes the rest; a
  worker that dies outright charges the task it was on.
* The time limit (``may_start``: no task starts that would end past it; ``Stopped``) and the signals
  (``_Signals``: SIGTERM / SIGINT, and SIGALRM at the hard limit, stop the run so that the report gets written).
* The ``<report>.partial.jsonl`` of finished records and ``--resume`` (``load_partial``).

bench.deepspeed_check uses the same time limit and signals."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from dataclasses import asdict
from pathlib import Path

from bench.gpu_check.config import CheckConfig, _jsonable_loose, task_key

#: test hook: seconds to sleep at the end of every task (tests/test_gpu_check.py's signal / time-limit tests)
TEST_SLEEP_ENV = "GPU_CHECK_TEST_TASK_SLEEP"
#: the exit status of a worker that stopped before its tasks were done because of the time limit
WORKER_TIME_LIMIT = 4
TIME_LIMIT = "time limit"


class Stopped(BaseException):
    """The run was stopped (the time limit, SIGTERM / SIGINT): the finished tasks are reported, the rest
    listed as not run. A BaseException, so that no ``except Exception`` of a task records it as a crash."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def may_start(now: float, deadline: float | None, margin: float) -> bool:
    """Whether a task may start at ``now`` (time.time()) when the last one must end by ``deadline``:
    ``margin`` is the longest task (wall time with its model load) so far."""
    return deadline is None or now + margin <= deadline


# ------------------------------------------------------------------------------------------------
# isolation: a worker process per CUDA context
# ------------------------------------------------------------------------------------------------


def run_workers(tasks: list[dict], cfg: CheckConfig, command, log, emit=None, deadline: float | None = None,
                margin: float = 0.0) -> list[dict]:
    """Run the tasks in worker processes, each started as ``command(task_file, result_file)`` (an argv list;
    bench.gpu_check's ``worker_command``). A device-side assert leaves a CUDA context unusable for every
    later task of its process: the worker then stops, and a fresh one takes the remaining tasks (a worker
    that dies without a record charges the task it was on, so every restart makes progress).
    Each record is handed to ``emit`` as soon as the worker has written it. Raises Stopped (after
    killing the worker) on the time limit (``deadline``, time.time(); the worker stops starting tasks
    there) or when the worker was killed by SIGTERM / SIGINT; a Stopped raised by a signal handler
    while a worker runs kills the worker too."""
    import tempfile

    done: dict[tuple, dict] = {}
    root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for attempt in range(len(tasks) + 1):
            todo = [t for t in tasks if task_key(t) not in done]
            if not todo:
                break
            tf, rf = Path(tmp) / f"tasks{attempt}.json", Path(tmp) / f"results{attempt}.jsonl"
            tf.write_text(json.dumps({"config": asdict(cfg), "tasks": todo, "deadline": deadline, "margin": margin}))
            rf.write_text("")
            ef = Path(tmp) / f"stderr{attempt}.txt"
            got, pos = 0, 0

            def drain():
                nonlocal got, pos, margin
                with open(rf, "rb") as f:
                    f.seek(pos)
                    data = f.read()
                end = data.rfind(b"\n") + 1  # complete lines only: the worker may be writing one
                pos += end
                for line in data[:end].decode().splitlines():
                    if line.strip():
                        rec = json.loads(line)
                        done[task_key(rec)] = rec
                        margin = max(margin, rec.get("wall_seconds") or 0.0)
                        got += 1
                        if emit is not None:
                            emit(rec)

            with open(ef, "w") as err:
                proc = subprocess.Popen(command(tf, rf), cwd=root, stderr=err)
                try:
                    while proc.poll() is None:
                        drain()
                        time.sleep(0.1)
                finally:
                    if proc.poll() is None:  # stopped (signal / time limit) while the worker runs
                        proc.terminate()
                        try:
                            proc.wait(5)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                            proc.wait()
                    drain()
            left = [t for t in todo if task_key(t) not in done]
            if not left:
                continue
            if proc.returncode in (-signal.SIGTERM, -signal.SIGINT):  # e.g. `timeout` signalled the process group
                raise Stopped(f"interrupted by {signal.Signals(-proc.returncode).name}")
            if proc.returncode == WORKER_TIME_LIMIT:
                raise Stopped(TIME_LIMIT)
            if got == 0 or proc.returncode not in (0, 3):
                t = left[0]  # the task it was on when it died
                tail = ef.read_text(errors="replace").strip().splitlines()[-8:]
                log(f"  the worker exited with status {proc.returncode} during "
                    f"{' '.join(str(x) for x in task_key(t) if x)}")
                rec = {**t, "scenarios": {}, "seconds": None,
                       "error": [f"the worker process died (exit status {proc.returncode}):"] + tail}
                done[task_key(t)] = rec
                if emit is not None:
                    emit(rec)
            else:
                log(f"  device lost: a fresh worker takes the {len(left)} remaining task(s)")
    return [done[task_key(t)] for t in tasks if task_key(t) in done]


# ------------------------------------------------------------------------------------------------
# signals
# ------------------------------------------------------------------------------------------------


class _Signals:
    """While armed: SIGTERM / SIGINT, and SIGALRM at the hard time limit, raise Stopped in the main
    thread (once; later signals are only remembered, so that the report gets written)."""

    def __init__(self, hard_deadline: float | None):
        self.armed, self.reason, self.old = False, None, {}
        self.main = threading.current_thread() is threading.main_thread()
        self.hard_deadline = hard_deadline

    def _handler(self, signum, frame):
        reason = TIME_LIMIT if signum == signal.SIGALRM else f"interrupted by {signal.Signals(signum).name}"
        self.reason = self.reason or reason
        if self.armed:
            self.armed = False
            raise Stopped(reason)

    def __enter__(self):
        if self.main:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
                self.old[sig] = signal.signal(sig, self._handler)
            if self.hard_deadline is not None:
                signal.setitimer(signal.ITIMER_REAL, max(self.hard_deadline - time.time(), 1e-3))
        self.armed = True
        return self

    def disarm(self):
        self.armed = False
        if self.main and self.hard_deadline is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def __exit__(self, *exc):
        self.disarm()
        for sig, h in self.old.items():
            signal.signal(sig, h)
        return False


# ------------------------------------------------------------------------------------------------
# the partial report and --resume
# ------------------------------------------------------------------------------------------------


#: config fields that may differ between a run and the run it resumes
RESUME_FREE = ("out", "threads", "time_limit", "time_reserve")
#: what a partial report written before a config field existed counts as for it
RESUME_DEFAULTS = {"fast_attention": "auto"}


class ResumeError(ValueError):
    """The --resume file is missing or was written for another configuration."""


def _resume_config(cfg: CheckConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE}


def load_partial(path: Path, cfg: CheckConfig, tasks: list[dict]) -> dict[tuple, dict]:
    """The finished records of a ``.partial.jsonl`` (last one per task wins), checked against ``cfg``."""
    if not path.exists():
        raise ResumeError(f"--resume: {path} does not exist")
    header, recs = None, {}
    keys = {task_key(t) for t in tasks}
    for line in path.read_text().splitlines():
        try:
            x = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        if "header" in x:
            header = x["header"]
        elif "kind" in x and not x.get("not_run") and task_key(x) in keys:
            recs[task_key(x)] = x
    want = _jsonable_loose(_resume_config(cfg))
    have = {**RESUME_DEFAULTS, **header["config"]} if header is not None and "config" in header else None
    if have != want:
        have = have or {}
        diff = sorted({k for k in want if have.get(k) != want[k]} | {k for k in have if k not in want})
        raise ResumeError(f"--resume: {path} was written for another configuration (differs in: {', '.join(diff)})")
    return recs
