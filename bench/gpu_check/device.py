"""The GPU check's device guards (bench/gpu_check/__init__.py): a task's exception is recorded with the last lines
of its traceback and the run goes on, unless it took the CUDA context down (``DeviceLost``: nothing more can run in
this process); every task ends with a synchronize, so an asynchronous CUDA error is charged to its own task.
And the environment a report records (device, driver, versions, commit)."""

from __future__ import annotations

import contextlib
import platform
import re
import shutil
import subprocess
import time
import traceback

import torch


# ------------------------------------------------------------------------------------------------
# device guards
# ------------------------------------------------------------------------------------------------


def _tail(exc: BaseException, n: int = 8) -> list[str]:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).strip().splitlines()[-n:]


class DeviceLost(RuntimeError):
    """The CUDA context is unusable (a device-side assert): this process cannot run anything more."""


def device_alive(device) -> bool:
    device = torch.device(device)
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return torch.ones(2, device=device).sum().item() == 2.0
    except Exception:  # noqa: BLE001
        return False


def _finish(device) -> None:
    """Make asynchronous CUDA errors surface in the task that caused them."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _guard(device, rec_or_dict, exc) -> None:
    """Record ``exc``; re-raise as DeviceLost when it took the device down with it."""
    rec_or_dict["error"] = _tail(exc)
    if not device_alive(device):
        raise DeviceLost("; ".join(_tail(exc, 2))) from exc


@contextlib.contextmanager
def _recorded(device, rec: dict):
    """One step of a task: asynchronous CUDA errors surface at its end; an exception is recorded in
    ``rec["error"]`` and the run goes on, unless it took the device down (then DeviceLost)."""
    try:
        yield
        _finish(device)
    except DeviceLost:
        raise
    except Exception as e:  # noqa: BLE001 - recorded, the other steps go on
        _guard(device, rec, e)


@contextlib.contextmanager
def _recorded_with_cause(device, rec: dict):
    """:func:`_recorded` (the error's traceback tail in ``rec["error"]``, DeviceLost re-raised), and the
    exception's own first line in ``rec["exception"]`` (a dynamo error's tail is only its advice): the fast-path
    section's tasks (bench/gpu_check/fast.py)."""
    with _recorded(device, rec):
        try:
            yield
        except Exception as e:
            msg = str(e).strip().splitlines()
            rec["exception"] = f"{type(e).__name__}: {msg[0] if msg else ''}"
            raise


def _unprune(rt) -> None:
    try:
        rt.unprune()
    except Exception:  # noqa: BLE001 - best effort after a failed task
        pass


def _precision(device) -> None:
    if torch.device(device).type == "cuda":  # fp32 is the exact reference: no TF32 (half runs unaffected)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


# ------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    import transformers

    env = {"date": time.strftime("%Y-%m-%d"), "time": time.strftime("%H:%M:%S %Z"), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "platform": platform.platform(),
           "device": str(device)}
    from eval.provenance import git_info

    git = git_info()  # VTPRUNE_GIT_COMMIT overrides a copied tree's stale .git
    if git.get("commit"):
        env["git_commit"] = git["commit"][:12] + ("+dirty" if git.get("dirty") else "")
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   driver=(_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or "").split("\n")[0] or None,
                   tf32_in_fp32_runs=False)
        env["device_name"] = env["gpu"]
    else:
        env.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
        env["device_name"] = "cpu"
    return env


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"
