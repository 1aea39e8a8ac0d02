"""Part C of bench.deepspeed_check: ``scripts/eval/pope.sh`` on the POPE fixture with ``LAUNCHER=python`` and
with the real ``deepspeed`` launcher; the merged answers must be equal and the DeepSpeed run recorded."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import gpu_check as G
from bench.deepspeed_check.config import DIST_VARS, ROOT, DSCheckConfig


# ------------------------------------------------------------------------------------------------
# C. the real launcher
# ------------------------------------------------------------------------------------------------


def find_deepspeed_exe() -> tuple[str | None, str | None]:
    """(the ``deepspeed`` executable, a directory to prepend to PATH or None). Next to the package when
    pip installed it with --target (<site>/bin/deepspeed) or in the interpreter's bin directory."""
    exe = shutil.which("deepspeed")
    if exe:
        return exe, None
    cands = [Path(sys.executable).parent]
    try:
        import deepspeed

        site = Path(deepspeed.__file__).resolve().parent.parent
        cands = [site / "bin", site.parent / "bin", site.parent.parent / "bin", site.parent.parent.parent / "bin"] + cands
    except ImportError:
        pass
    for d in cands:
        if (d / "deepspeed").is_file() and os.access(d / "deepspeed", os.X_OK):
            return str(d / "deepspeed"), str(d)
    return None, None


def _clean_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(WANDB_MODE="disabled", **extra)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_run(launcher: str, data: Path, out: Path, cfg: DSCheckConfig, path_dir: str | None) -> dict:
    cmd = ["bash", "scripts/eval/pope.sh", "fastv", "8"]
    extra = {"MODEL": cfg.launcher_model, "DATA_ROOT": str(data), "OUT": str(out), "NPROC": "1", "LAUNCHER": launcher,
             "EXTRA_ARGS": f"--no-wandb --max-new-tokens {cfg.launcher_new_tokens}"}
    env = _clean_env(extra)
    if launcher == "deepspeed":
        env["MASTER_PORT"] = str(_free_port())
        if path_dir:
            env["PATH"] = path_dir + os.pathsep + env.get("PATH", "")
            site = None
            try:
                import deepspeed

                site = str(Path(deepspeed.__file__).resolve().parent.parent)
            except ImportError:
                pass
            if site:  # a --target install: the launcher's children must import deepspeed too
                env["PYTHONPATH"] = site + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    rec = {"launcher": launcher, "command": " ".join(f"{k}={v!r}" if " " in v else f"{k}={v}"
                                                     for k, v in extra.items() if k != "OUT") + " " + " ".join(cmd)}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=cfg.launcher_timeout)
    except subprocess.TimeoutExpired:
        return {**rec, "rc": None, "seconds": round(time.perf_counter() - t0, 2),
                "error": [f"timed out after {cfg.launcher_timeout} s"]}
    rec.update(rc=p.returncode, seconds=round(time.perf_counter() - t0, 2))
    text = (p.stdout or "") + "\n" + (p.stderr or "")
    if launcher == "deepspeed":
        rec["deepspeed_cmd"] = [m.group(1).strip() for m in re.finditer(r"cmd = (.*)", text)][:1]
        rec["spawned"] = [m.group(1).strip() for m in re.finditer(r"spawned with command: (.*)", text)][:2]
    if p.returncode != 0:
        rec["error"] = [f"exit status {p.returncode}"] + text.strip().splitlines()[-15:]
        return rec
    runs = sorted(out.glob("pope/*/merge.jsonl"))
    if not runs:
        rec["error"] = ["no merge.jsonl under " + str(out)] + text.strip().splitlines()[-10:]
        return rec
    rd = runs[0].parent
    rec["run_dir"] = str(rd)
    rec["answers"] = {str(r["question_id"]): r["text"] for r in
                      (json.loads(x) for x in runs[0].read_text().splitlines() if x.strip())}
    try:
        rc = json.loads((rd / "run_config.json").read_text())["resolved"]
        rec.update(device=(rc.get("env") or {}).get("device"), resolved_launcher=rc.get("launcher"),
                   world_size=rc.get("world_size"), deepspeed=(rc.get("model") or {}).get("deepspeed"),
                   dtype=(rc.get("model") or {}).get("dtype"))
    except Exception as e:  # noqa: BLE001
        rec["run_config_error"] = G._tail(e, 2)
    return rec


def part_launcher(cfg: DSCheckConfig, log=print) -> dict:
    from eval.fixtures import write_fixtures

    device = torch.device(cfg.device)
    res = {"model": cfg.launcher_model, "method": "fastv", "budget": 8, "max_new_tokens": cfg.launcher_new_tokens,
           "runs": {}}
    exe, path_dir = find_deepspeed_exe()
    res["deepspeed_exe"] = exe
    with tempfile.TemporaryDirectory(prefix="ds_launcher_") as tmp:
        tmp = Path(tmp)
        data = write_fixtures(tmp / "data", ["pope"])
        for launcher in ("python", "deepspeed"):
            if launcher == "deepspeed" and exe is None:
                res["runs"][launcher] = {"launcher": launcher, "error": [
                    "the `deepspeed` executable was not found on PATH nor next to the deepspeed package "
                    "(install it: pip install -e '.[deepspeed]')"]}
                continue
            r = launcher_run(launcher, data, tmp / f"out_{launcher}", cfg, path_dir)
            res["runs"][launcher] = r
            log(f"  C LAUNCHER={launcher:9s} rc {r.get('rc')} {r.get('seconds')} s, "
                f"{len(r.get('answers') or {})} answers on {r.get('device')}" + ("  FAIL" if r.get("error") else ""))
    py, ds = res["runs"].get("python", {}), res["runs"].get("deepspeed", {})
    reasons = [f"LAUNCHER={k}: {v['error'][0]}" for k, v in res["runs"].items() if v.get("error")]
    if not reasons:
        if not py.get("answers"):
            reasons.append("no answers")
        elif py["answers"] != ds.get("answers"):
            diff = [q for q in py["answers"] if py["answers"][q] != ds["answers"].get(q)]
            reasons.append(f"answers differ on {len(diff)} of {len(py['answers'])} questions (e.g. {diff[:3]})")
        if not ds.get("deepspeed"):
            reasons.append("the deepspeed run's run_config.json records no deepspeed wrapping")
        if device.type == "cuda":
            for k, v in res["runs"].items():
                if not str(v.get("device", "")).startswith("cuda"):
                    reasons.append(f"LAUNCHER={k} ran on {v.get('device')}, not on the GPU")
    res["answers_equal"] = bool(py.get("answers")) and py.get("answers") == ds.get("answers")
    res["n_answers"] = len(py.get("answers") or {})
    res["verdict"] = "FAIL" if reasons else "PASS"
    res["reasons"] = reasons
    return res
