"""One writer per run folder: ``<run>/.lock``, held by rank 0 of an ``eval run`` from before it reads the folder to
its end (a folder it had to create is removed again when the run ends leaving it empty, e.g. refused by a
check after the lock was taken).

Two runs of the same configuration write the same ``answers/*.jsonl`` (two ``srun`` tasks that each believe they
are alone, two paper grids that share a config, a job resubmitted while the first still runs): the second one is
refused with one ``error:`` line (exit 2), naming the host and pid that hold the folder.

The lock is a POSIX record lock (``fcntl.lockf``) on the lock file, which names its holder (host, pid, start time,
command). The kernel (or the NFS server) drops the lock when the holder dies, however it dies (``kill -9``,
``scancel``, a node lost): the next run takes the folder over and says so in one line; its answers were flushed
batch by batch, so none is lost. A clean end removes the file. Where the file system refuses record locks, the
file alone decides: a holder on this host whose pid is gone (or is another process now) is stale and taken over; a
holder on another host is refused with the command that frees it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = ".lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class LockBusy(Exception):
    """The run folder is held by another live writer (the message says which and what to do)."""


def _proc_start(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - no psutil, no such process, no permission
        return None


def _alive(holder: dict) -> bool:
    """Whether the holder named in a lock file still runs (on this host only: elsewhere it cannot be told)."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start, recorded = _proc_start(pid), holder.get("pid_start")
    return not (start is not None and recorded is not None and abs(start - recorded) > 1.0)  # a reused pid


def describe(holder: dict) -> str:
    when = holder.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(when, (int, float)) else "?"
    job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{job}, since {since}"


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        holder = json.loads(raw.decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"pid": "?", "host": "?"} if raw else {}
    return holder if isinstance(holder, dict) else {}


def _me() -> dict:
    slurm = os.environ.get("SLURM_JOB_ID")
    if slurm and os.environ.get("SLURM_ARRAY_JOB_ID"):
        slurm = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '?')}"
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _proc_start(os.getpid()),
            "started": time.time(), "slurm_job": slurm, "command": " ".join(sys.argv)[:500]}


class RunLock:
    """The held lock of one run folder. ``took_over``: what the lock file named when it was taken over from a
    writer that had died without releasing it (else None)."""

    def __init__(self, path: Path, fd: int, took_over: dict | None, record_locks: bool):
        self.path, self.fd, self.took_over, self.record_locks = path, fd, took_over, record_locks
        self.created: list[Path] = []

    @classmethod
    def acquire(cls, run_dir) -> RunLock:
        """Hold ``run_dir``'s lock (the folder is created) or raise :class:`LockBusy`."""
        run_dir = Path(run_dir)
        created = []  # the folders made here (deepest first): removed again if the run ends leaving them empty
        d = run_dir
        while not d.exists() and d != d.parent:
            created.append(d)
            d = d.parent
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_FILE
        for _ in range(50):  # another writer may remove or replace the file between our open and our lock
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                lock = cls._take(path, fd)
            except BaseException:
                os.close(fd)
                _remove_empty(created)
                raise
            if lock is not None:
                lock.created = created
                return lock
            os.close(fd)
        raise LockBusy(f"{run_dir}: its lock file {path} keeps changing under this run; is another run starting "
                       f"and stopping there?")

    @classmethod
    def _take(cls, path: Path, fd: int) -> RunLock | None:
        record_locks = True
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise LockBusy(cls._busy(path, _read(fd))) from None
            if e.errno not in _NO_LOCKS:
                raise
            record_locks = False  # this file system keeps no record locks: the file alone decides
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder released (and removed) the file after our open: open the new one
            return None
        prev = _read(fd)
        if prev and not record_locks:
            if prev.get("host") != socket.gethostname():
                raise LockBusy(cls._busy(path, prev) + f" (this file system keeps no locks, so a holder on another "
                               f"host cannot be checked: if it is dead, delete {path})")
            if _alive(prev) and prev.get("pid") != os.getpid():
                raise LockBusy(cls._busy(path, prev))
        took_over = prev if prev and prev.get("pid") != os.getpid() else None
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(_me(), indent=1) + "\n").encode())
        os.fsync(fd)
        return cls(path, fd, took_over, record_locks)

    @staticmethod
    def _busy(path: Path, holder: dict) -> str:
        return (f"{path.parent} is being written by another run ({describe(holder)}): two writers would answer the "
                f"same questions into one folder. Wait for it to end or stop it (a writer that dies frees the folder); "
                f"the lock file is {path}")

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self.fd is None:
            return
        try:
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        try:
            os.close(self.fd)  # closing drops the record lock
        finally:
            self.fd = None
        _remove_empty(self.created)  # a run refused before it wrote anything leaves no folder behind


def _remove_empty(folders: list[Path]) -> None:
    for d in folders:  # deepest first; stops at the first one that holds something
        try:
            d.rmdir()
        except OSError:
            return
