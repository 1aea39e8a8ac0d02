"""The official side's jobs and the one runner every part shares (``python -m parity --jobs N``, ``--fresh``).

A :class:`Job` is one run of an official worker script (``parity/official_worker*.py``, ``official_scorers.py``) by an
official environment's Python, from an empty folder of its own and without ``PYTHONPATH`` (nothing of this repository
importable there): its spec in ``WORK/<name>.job.json``, its output in ``WORK/<name>.official.pt`` (the scorers':
``.json``), written under a ``.partial`` name and renamed when the worker exits 0. Then a stamp,
``WORK/<name>.done.json``, records the job's fingerprint: the spec, the contents of every file and folder the spec
names (the weights, the images, a clone) and of ``Job.inputs`` (the CLIP tower a model's config names), the worker-side
code (``parity/official_*.py``, ``step_logits.py``, ``adapters/``), the interpreter and the environment variables
:data:`ENVIRON`.

:class:`Runner` runs jobs N at a time (threads around the subprocesses; our side keeps running in the calling thread
meanwhile), prints ``[k/M] <job> <seconds> s`` as each finishes (M: the jobs submitted so far), and resumes: a job
whose output and stamp exist with an unchanged fingerprint is not run again (``fresh=True``: every job runs). An
interrupted run leaves every finished job's output and stamp; a failed job leaves neither, raises :class:`JobFailed`
where its result is asked for, and the others run on.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .report import Check

PARITY = Path(__file__).resolve().parent
#: environment variables an official side reads from the caller (SparseVLM's ``USE_VERSION``): part of the
#: fingerprint, so that a job run under another value is not resumed
ENVIRON = ("USE_VERSION",)
#: folders a fingerprint walks past (a clone's history, bytecode)
SKIP = {".git", "__pycache__"}


class JobFailed(RuntimeError):
    """An official worker exited non-zero (or could not start, or ran past its timeout)."""


def official_env() -> dict:
    """The environment of an official worker: ours without ``PYTHONPATH`` / ``PYTHONHOME``, offline, quiet."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    return env


def _hash_path(h, path: Path) -> None:
    """A file's name, size and bytes into ``h``; a folder's files in sorted order (:data:`SKIP` left out)."""
    if path.is_file():
        h.update(f"{path.name}:{path.stat().st_size}:".encode())
        h.update(path.read_bytes())
        return
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not SKIP & set(p.relative_to(path).parts)):
        h.update(f"{f.relative_to(path)}:{f.stat().st_size}:".encode())
        h.update(f.read_bytes())


def named_paths(spec, outputs: tuple[str, ...] = ()) -> set[str]:
    """Every absolute path in ``spec`` (nested dicts and lists) that exists, except under the keys ``outputs``."""
    if isinstance(spec, dict):
        return set().union(*(named_paths(v, outputs) for k, v in spec.items() if k not in outputs))
    if isinstance(spec, list):
        return set().union(*(named_paths(v, outputs) for v in spec))
    return {spec} if isinstance(spec, str) and spec.startswith("/") and os.path.exists(spec) else set()


def worker_code() -> list[Path]:
    """The code the official side runs: the workers, the step-logits recorder, the adapters."""
    return sorted([*PARITY.glob("official_*.py"), PARITY / "step_logits.py", *(PARITY / "adapters").glob("*.py")])


@dataclass
class Job:
    """One official worker run. ``worker``: a script of ``parity/`` (or an absolute path); ``inputs``: files or folders
    the job reads that its spec does not name; ``outputs``: the spec's keys that name what the worker writes (not
    fingerprinted); ``resumable`` False: always run (a job whose product is more than its output file)."""

    name: str
    python: str
    spec: dict | list
    work: Path
    worker: str = "official_worker.py"
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    resumable: bool = True
    timeout: float | None = None
    suffix: str = ".official.pt"

    @property
    def stem(self) -> str:
        """The file name's stem: the name, cut with a hash of it past 120 characters (a file name's limit is 255)."""
        if len(self.name) <= 120:
            return self.name
        return self.name[:100] + "-" + hashlib.sha1(self.name.encode()).hexdigest()[:12]

    @property
    def out(self) -> Path:
        return Path(self.work) / f"{self.stem}{self.suffix}"

    @property
    def stamp(self) -> Path:
        return Path(self.work) / f"{self.stem}.done.json"

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.python, self.worker, self.spec, {k: os.environ.get(k) for k in ENVIRON}],
                            sort_keys=True).encode())
        for p in sorted(named_paths(self.spec, self.outputs) | set(self.inputs)):
            h.update(f"\0{p}\0".encode())
            _hash_path(h, Path(p))
        for f in [PARITY / self.worker, *worker_code()]:
            _hash_path(h, f)
        return h.hexdigest()

    def done(self, fingerprint: str) -> bool:
        """The output exists and the stamp beside it holds ``fingerprint``."""
        if not (self.out.exists() and self.stamp.exists()):
            return False
        try:
            return json.loads(self.stamp.read_text()).get("fingerprint") == fingerprint
        except ValueError:
            return False

    def load(self):
        if self.suffix.endswith(".json"):
            return json.loads(self.out.read_text())
        import torch

        return torch.load(self.out, weights_only=False)


class Runner:
    """Runs :class:`Job` s: :meth:`run` in the calling thread, :meth:`submit` on a pool of ``jobs`` threads; a progress
    line per finished job on ``log`` (default stderr). A context manager: on leaving, waits for the submitted jobs;
    on an error, the jobs not started are cancelled and the running ones finish (an interrupt: not waited for)."""

    def __init__(self, jobs: int = 1, fresh: bool = False, log: TextIO | None = None):
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, not {jobs}")
        self.jobs, self.fresh, self.log = jobs, fresh, log
        self.total = self.finished = 0
        self.lock = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, kind, *_) -> None:
        if self.pool is not None:
            interrupted = kind is not None and issubclass(kind, KeyboardInterrupt)
            self.pool.shutdown(wait=not interrupted, cancel_futures=kind is not None)
            self.pool = None

    def submit(self, job: Job) -> Future:
        """Start ``job`` on the pool; the future's result is the worker's output (:meth:`Job.load`)."""
        with self.lock:
            self.total += 1
            if self.pool is None:
                self.pool = ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="parity-job")
        return self.pool.submit(self._run, job)

    def run(self, job: Job):
        """``job`` in the calling thread; its output."""
        with self.lock:
            self.total += 1
        return self._run(job)

    def _progress(self, job: Job, what: str) -> None:
        with self.lock:
            self.finished += 1
            print(f"[{self.finished}/{self.total}] {job.name} {what}", file=self.log or sys.stderr, flush=True)

    def _run(self, job: Job):
        start = time.perf_counter()
        try:
            resumed = self._execute(job)
        except JobFailed as e:
            self._progress(job, f"FAILED after {time.perf_counter() - start:.1f} s: {str(e).strip().splitlines()[-1]}")
            raise
        self._progress(job, "resumed (output and inputs unchanged)" if resumed
                       else f"{time.perf_counter() - start:.1f} s")
        return job.load()

    def _execute(self, job: Job) -> bool:
        """Run the worker unless the job is done (True: resumed)."""
        work = Path(job.work)
        work.mkdir(parents=True, exist_ok=True)
        fingerprint = job.fingerprint()
        if job.resumable and not self.fresh and job.done(fingerprint):
            return True
        job.stamp.unlink(missing_ok=True)
        spec_path = work / f"{job.stem}.job.json"
        spec_path.write_text(json.dumps(job.spec, indent=1))
        partial = job.out.with_name(job.out.name + ".partial")
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="official-cwd-", dir=work) as cwd:  # empty: nothing of ours shadows
            try:
                proc = subprocess.run([job.python, str(PARITY / job.worker), str(spec_path), str(partial)], cwd=cwd,
                                      capture_output=True, text=True, env=official_env(), timeout=job.timeout)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise JobFailed(f"the official worker could not run {job.name}: {e}") from None
        if proc.returncode != 0 or not partial.exists():
            tail = proc.stderr.strip()[-4000:] or proc.stdout.strip()[-4000:]
            raise JobFailed(f"the official worker failed on {job.name} (exit {proc.returncode}):\n{tail}")
        os.replace(partial, job.out)
        job.stamp.write_text(json.dumps({"fingerprint": fingerprint, "seconds": round(time.perf_counter() - start, 2)}))
        return False


def failed_check(case: str, error: JobFailed) -> Check:
    """A failed job as a failing check (group "official-job"): the last line of the worker's error in the detail,
    the whole tail in the data."""
    return Check("official-job", case, False, f"the official worker failed: {str(error).strip().splitlines()[-1]}",
                 {"error": str(error)})


def run_job(job: Job, runner: Runner | None = None):
    """``job``'s output, run by ``runner`` (default: a runner of its own, resuming) in the calling thread."""
    return (runner or Runner()).run(job)
