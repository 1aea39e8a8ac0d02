"""Where a result came from: the code version (``git_info``) and the software / hardware (``env_info``) that
ran it. Written into every run's config (eval.runner) and every benchmark report (bench.efficiency,
bench.gpu_check)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def git_info() -> dict:
    """The code version: ``{"commit", "dirty"}`` of this checkout. A copied tree (a remote GPU box, a
    container) may carry a stale ``.git``: ``VTPRUNE_GIT_COMMIT`` then names the commit that runs."""
    if os.environ.get("VTPRUNE_GIT_COMMIT"):
        return {"commit": os.environ["VTPRUNE_GIT_COMMIT"], "dirty": None, "source": "VTPRUNE_GIT_COMMIT"}
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {"commit": None}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                                text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def short_commit() -> str:
    """The code version for a report's heading: ``VTPRUNE_GIT_COMMIT`` as given, else this checkout's commit
    abbreviated (7 hex digits, as ``git rev-parse --short``), else "unknown"."""
    info = git_info()
    commit = info.get("commit")
    if not commit:
        return "unknown"
    return commit if info.get("source") == "VTPRUNE_GIT_COMMIT" else commit[:7]


def env_info(device) -> dict:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "host": platform.node(), "device": str(device)}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpus_visible"] = torch.cuda.device_count()
    return out
