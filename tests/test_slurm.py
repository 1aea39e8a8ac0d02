"""The Slurm workflow on a real scheduler (docs/cluster.md): a private slurmctld + two slurmd (emulated nodes) +
munged started by scripts/slurm/local_cluster.sh, no mocks.

- a paper grid (VisionZip Table 1 on POPE fixtures at 64 tokens: 4 configs) on a tiny LLaVA whose 256 visual tokens
  per image really prune, once in one process and once through submit_paper.sh as a 3-task array + the report
  job, one task cancelled mid-run and resubmitted with the printed command (it resumes), another requeued (its
  log keeps the first attempt's lines): every config's metrics and answers and the report (md, tex, figure)
  identical, the report after its tasks;
- multinode.sbatch on 2 nodes: TP = 1 (torchrun, data parallel) and TP = 2 across the nodes (DeepSpeed AutoTP, gloo),
  answers identical to one process, with an ssh / pdsh on PATH that fails the test if anything calls it;
- ``srun -n 2 python -m eval run``: one world of two (before: two worlds of one writing the same answers file).

Needs the Debian packages slurm-wlm and munge, and root (CI installs them: .ci/run); skipped with the reason
otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import child_env

REPO = Path(__file__).resolve().parents[1]
MISSING = [c for c in ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol") if not shutil.which(c)]
pytestmark = [
    pytest.mark.skipif(bool(MISSING), reason=f"Slurm is not installed ({', '.join(MISSING)} missing: "
                       "apt-get install -y slurm-wlm munge)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the local Slurm cluster needs root (slurmd starts the jobs)"),
]
GRID = dict(ONLY="pope", BUDGETS="64", EXTRA_ARGS="--max-new-tokens 4 --no-wandb")
PAPER, TABLE = "visionzip", "Table 1"
N_CONFIGS = 4  # the unpruned row, FastV, SparseVLM and VisionZip at 64


def _free_base(n: int) -> int:
    """A port P with P .. P + n - 1 free on 127.0.0.1 (slurmctld, then one slurmd per node)."""
    for _ in range(200):
        base = 30000 + int.from_bytes(os.urandom(2), "big") % 25000
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def _base_env() -> dict:
    bindir = str(Path(sys.executable).parent)  # the jobs find this environment's python
    return child_env(("MASTER_", "SHARD", "REPORT"), TRANSFORMERS_OFFLINE="1",
                     PATH=f"{bindir}:{os.environ.get('PATH', '')}")


@pytest.fixture(scope="module")
def cluster():
    folder = Path(tempfile.mkdtemp(prefix="vtp-slurm-", dir="/tmp"))  # short: munged's socket path has a limit
    env = dict(_base_env(), SLURM_LOCAL=str(folder), SLURM_LOCAL_PORT=str(_free_base(3)), SLURM_LOCAL_CPUS="2")
    up = subprocess.run(["bash", str(REPO / "scripts/slurm/local_cluster.sh"), "up", "--nodes", "2"], env=env,
                        capture_output=True, text=True, timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    env["SLURM_CONF"] = str(folder / "etc/slurm.conf")
    assert f"export SLURM_CONF={env['SLURM_CONF']}" in up.stdout
    try:
        # a trivial job first: where this machine's Slurm cannot run a job at all (a sandbox without what slurmd
        # needs), skip with the scheduler's own account instead of waiting out every test's bound
        try:
            canary = _sh(["srun", "-N", "1", "-n", "1", "-c", "1", "--immediate=60", "true"], env, timeout=90)
            ok = canary.returncode == 0
        except subprocess.TimeoutExpired:
            canary, ok = None, False
        if not ok:
            pytest.skip("the local Slurm started but cannot run a job here (`srun true` failed):\n"
                        + (canary.stderr[-1000:] if canary is not None else "no answer in 90 s") + "\n" + _diagnose(env))
        yield env
    finally:
        subprocess.run(["bash", str(REPO / "scripts/slurm/local_cluster.sh"), "down", "--purge"], env=env,
                       capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def grid(tmp_path_factory, cluster):
    """Fixture data, the tiny 256-token checkpoint, and the grid run once in one process (the reference)."""
    from eval.fixtures import write_fixtures
    from integrations.vllm.tiny import save_tiny_llava

    root = tmp_path_factory.mktemp("grid")
    data = write_fixtures(root / "data", ["pope"])
    model = save_tiny_llava(root / "gridmodel", size="grid")
    env = dict(cluster, **GRID, MODEL=str(model), DATA_ROOT=str(data))
    single = root / "single"
    # the reference in one process, the model loaded once (LAUNCHER=inprocess: the per-process answers, as
    # tests/test_run_many.py shows), not four
    r = subprocess.run(["bash", str(REPO / f"scripts/papers/{PAPER}.sh"), TABLE],
                       env=dict(env, OUT=str(single), LAUNCHER="inprocess"),
                       capture_output=True, text=True, timeout=900, cwd=str(REPO))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"{PAPER}: {N_CONFIGS} configs to run" in r.stdout
    runs = _runs(single)
    assert len(runs) == N_CONFIGS
    # the budgeted rows prune (256 candidates per image, 64 enter the LLM for VisionZip), and the answers vary:
    # agreeing runs agree on something
    vz = runs["gridmodel_visionzip_b64_numerics=official"]
    assert vz["tokens"] == (256.0, 64.0, 64.0)
    texts = [t for r in runs.values() for t in r["texts"]]
    assert len(set(texts)) > len(texts) // 2, texts
    assert runs["gridmodel_none"]["texts"] != vz["texts"]
    return dict(env=env, root=root, single=single, runs=runs)


def _runs(out: Path) -> dict:
    """Each config under OUT/pope: its metrics, question counts, token counts and answer texts (question order)."""
    got = {}
    for res in sorted((out / "pope").glob("*/results.json")):
        d = json.loads(res.read_text())
        toks = d.get("tokens") or {}
        got[res.parent.name] = {
            "metrics": d["metrics"], "partial": d["partial"], "counts": d.get("counts"),
            "tokens": (toks.get("visual_candidates_mean"), toks.get("tok_in"), toks.get("tok_eq")),
            "texts": [json.loads(line)["text"] for line in (res.parent / "merge.jsonl").read_text().splitlines()],
        }
    return got


def _report(out: Path) -> dict:
    d = out / "papers"
    return {p.name: (p.read_bytes() if p.suffix == ".png" else p.read_text().replace(str(out), "OUT"))
            for p in sorted(d.iterdir())}


def _sh(cmd, env, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def _job(env, job: str) -> dict:
    """``scontrol show job -o`` of a job (an array's tasks: one dict per task, keyed by their ids)."""
    out = _sh(["scontrol", "show", "job", "-o", job], env).stdout
    jobs = {}
    for line in out.splitlines():
        f = dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))
        key = f"{f['ArrayJobId']}_{f['ArrayTaskId']}" if f.get("ArrayTaskId") else f["JobId"]
        jobs[key] = f
    return jobs


def _diagnose(env) -> str:
    """What the scheduler says: the nodes, the queue and the last lines of the daemons' logs (a failure's message)."""
    parts = []
    for cmd in (["sinfo", "-N", "-o", "%N %T %E"], ["squeue", "-o", "%i %T %r %M"]):
        try:
            r = _sh(cmd, env, timeout=20)
            parts.append(f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}")
        except subprocess.TimeoutExpired:
            parts.append(f"$ {' '.join(cmd)}: no answer in 20 s")
    for f in sorted(Path(env.get("SLURM_LOCAL", "/nonexistent")).glob("log/*.log")):
        parts.append(f"--- {f.name} (last lines)\n" + "\n".join(f.read_text(errors="replace").splitlines()[-8:]))
    return "\n".join(parts)


#: pending reasons no wait clears: a job held by one of them fails the test at once, with the scheduler's account
STUCK = ("ReqNodeNotAvail", "NodeDown", "PartitionDown", "PartitionNodeLimit", "PartitionConfig", "BadConstraints",
         "DependencyNeverSatisfied", "launch_failed_requeued_held", "JobHeldAdmin")


def _wait(env, ids, timeout=600):
    """Until none of the jobs is pending or running (bounded); returns their final records. A job the scheduler
    cannot start (a node down or drained, a reason in STUCK) fails at once with the scheduler's account."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        q = _sh(["squeue", "-h", "-o", "%i %T %r", "-j", ",".join(ids)], env)
        if q.returncode == 0 and not q.stdout.strip():
            break
        nodes = _sh(["sinfo", "-h", "-N", "-o", "%T"], env).stdout.split()
        bad = [n for n in nodes if n.rstrip("*~#!%$@^-").lower() in ("down", "drained", "draining", "fail", "failing")]
        if bad or any(r in q.stdout for r in STUCK):
            pytest.fail(f"jobs {ids} cannot run (nodes {nodes}):\n{q.stdout}\n{_diagnose(env)}")
        time.sleep(0.2)  # squeue and sinfo answer in milliseconds: a second's poll kept each wait ~0.5 s longer
    else:
        pytest.fail(f"jobs {ids} still queued after {timeout} s: {q.stdout}\n{_diagnose(env)}")
    return {k: v for j in ids for k, v in _job(env, j).items()}


VENV = Path(sys.prefix) if (Path(sys.prefix) / "bin" / "activate").exists() else None


def _submit(env, out, *extra) -> tuple[str, str, str]:
    """submit_paper.sh from a shell whose PATH does not lead to this environment's python (when the tests run in a
    virtual environment): the jobs must activate VENV themselves."""
    env = dict(env, OUT=str(out))
    if VENV is not None:
        env["PATH"] = ":".join(p for p in env["PATH"].split(":") if Path(p) != VENV / "bin")
        env["VENV"] = str(VENV)
        env.pop("VIRTUAL_ENV", None)
    r = _sh(["bash", str(REPO / "scripts/slurm/submit_paper.sh"), PAPER, TABLE, *extra, "--", "-c", "1"],
            env, timeout=300, cwd=str(out.parent))
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"array job\s+(\d+).*\n\s+report job\s+(\d+)", r.stdout)
    assert m, r.stdout
    return m.group(1), m.group(2), r.stdout


def _later(a: str, b: str) -> bool:
    return time.strptime(a, "%Y-%m-%dT%H:%M:%S") >= time.strptime(b, "%Y-%m-%dT%H:%M:%S")


def test_array_cancel_requeue_resubmit_and_report_equal_one_process(grid):
    """The grid as a 3-task array + its report job, one task cancelled mid-run and resubmitted with the printed
    command, another requeued: every config's answers and metrics and the report equal the one-process run's.
    (One test, not two: a plain array run beside it cost CI a minute; task 0 is the plain task here.)"""
    env, out = grid["env"], grid["root"] / "cancel"
    out.mkdir()
    array, report, text = _submit(env, out, "--shards", "3")
    assert f'{PAPER} "{TABLE}": {N_CONFIGS} configs in 3 array tasks (SHARDS=3)' in text
    # task 1 runs FastV alone (every 3rd config from the 2nd): cancel it once it has answered, before it is done
    fastv = out / "pope" / "gridmodel_fastv_b64_numerics=official" / "answers"
    deadline = time.time() + 600
    n = 0
    while time.time() < deadline:
        n = sum(1 for f in fastv.glob("*.jsonl") for line in f.read_text().splitlines() if line.endswith("}"))
        if n:
            break
        time.sleep(0.05)
    assert _sh(["scancel", f"{array}_1"], env).returncode == 0
    assert 1 <= n < 6, f"task 1 had {n} answers of 6 when it was cancelled: not mid-run"
    # task 2 (SparseVLM): requeued; Slurm holds a requeued job ~2 minutes (BeginTime), released at once here
    assert _sh(["scontrol", "requeue", f"{array}_2"], env).returncode == 0
    for _ in range(300):  # once it is back in the queue (the requeue takes a moment), release it (30 s at most)
        if _job(env, f"{array}_2")[f"{array}_2"].get("Reason") == "BeginTime":
            assert _sh(["scontrol", "update", f"JobId={array}_2", "StartTime=now"], env).returncode == 0
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"task 2 never went back to the queue after the requeue: {_job(env, f'{array}_2')}")
    jobs = _wait(env, [array, report])
    assert sorted(k for k in jobs if k.startswith(f"{array}_")) == [f"{array}_{i}" for i in range(3)]
    assert jobs[f"{array}_0"]["JobState"] == "COMPLETED"
    t0 = (out / "slurm-logs" / f"vtprune-{PAPER}-{array}_0.out").read_text()
    assert "shard 0/3" in t0 and "wrote" not in t0  # shard 0 ran its configs and left the report to the report job
    # the environment the jobs activate (scripts/slurm/_env.sh): the one active at submission, else the checkout's .venv
    fallback = REPO / ".venv" if (REPO / ".venv" / "bin" / "python").exists() else None
    active = VENV if VENV is not None else fallback
    python = f"{active}/bin/python" if active is not None else str(Path(sys.executable).parent / "python")
    assert f"attempt 1 python {python} OMP_NUM_THREADS=1 ===" in t0  # activated, threads = the task's -c
    assert jobs[f"{array}_1"]["JobState"] == "CANCELLED"
    assert jobs[report]["JobState"] == "CANCELLED"  # --kill-on-invalid-dep: not left pending forever
    assert jobs[f"{array}_2"]["JobState"] == "COMPLETED" and jobs[f"{array}_2"]["Restarts"] == "1"
    log2 = (out / "slurm-logs" / f"vtprune-{PAPER}-{array}_2.out").read_text()
    assert "attempt 1 " in log2 and "attempt 2 " in log2  # the requeue appended to the first attempt's log
    assert log2.index("attempt 1 ") < log2.index("attempt 2 ")
    kept = sum(1 for f in fastv.glob("*.jsonl") for line in f.read_text().splitlines() if line.endswith("}"))
    assert 1 <= kept < 6
    # resubmit task 1 and the report with the commands submit_paper.sh printed
    lines = text.splitlines()
    resub = next(l for l in lines if l.strip().startswith("J=$(")).strip()
    rep = lines[lines.index(next(l for l in lines if l.strip().startswith("J=$("))) + 1].strip()
    script = f"set -e\n{resub.replace('--array=I', '--array=1')}\necho \"$J\"\n{rep}\n"
    r = _sh(["bash", "-c", script], env, cwd=str(out.parent))
    assert r.returncode == 0, r.stdout + r.stderr
    new_task, new_report = r.stdout.split()[:2]
    jobs = _wait(env, [new_task, new_report])
    assert jobs[f"{new_task}_1"]["JobState"] == "COMPLETED" and jobs[new_report]["JobState"] == "COMPLETED"
    log1 = (out / "slurm-logs" / f"vtprune-{PAPER}-{new_task}_1.out").read_text()
    assert "shard 1/3" in log1  # SHARDS fixed at submission: not 1/1
    assert f"({kept} already answered, {6 - kept} to go)" in log1
    assert "was left locked by a run that is no longer running" in log1  # the cancelled writer's lock
    assert _later(jobs[new_report]["StartTime"], jobs[f"{new_task}_1"]["EndTime"])  # the report after its task
    rlog = (out / "slurm-logs" / f"vtprune-{PAPER}-report-{new_report}.out").read_text()
    assert "wrote " in rlog
    assert rlog.splitlines()[-1] == f"done {N_CONFIGS} of {N_CONFIGS}"  # the grid's state, not a `not run:` note
    assert _runs(out) == grid["runs"]
    assert _report(out) == _report(grid["single"])


@pytest.mark.parametrize("launcher,tp", [("torchrun", 1), ("deepspeed", 2)])
def test_multinode_equals_one_process(grid, tmp_path, launcher, tp):
    if launcher == "deepspeed":
        pytest.importorskip("deepspeed")
    trap = tmp_path / "bin"
    trap.mkdir()
    for name in ("ssh", "pdsh"):  # a launcher that reached for ssh would leave a trace and fail
        (trap / name).write_text(f"#!/bin/sh\necho \"$0 $*\" >> {tmp_path}/ssh-calls\nexit 255\n")
        (trap / name).chmod(0o755)
    out = tmp_path / "runs"
    env = dict(grid["env"], OUT=str(out), NPROC="1", LAUNCHER=launcher, TP=str(tp), REPO=str(REPO),
               PATH=f"{trap}:{grid['env']['PATH']}")
    log = tmp_path / "job.out"
    # not `sbatch --wait`: it polls the job after 2, 8 and 32 s, so a 12 s job returned after 42 s
    r = _sh(["sbatch", "--parsable", "-N", "2", "-c", "1", "-o", str(log),
             str(REPO / "scripts/slurm/multinode.sbatch"), "pope", "visionzip", "64", grid["env"]["MODEL"],
             "--opt", "numerics=official"], env, timeout=120, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    state = _wait(env, [job])[job]
    text = log.read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", (state, text[-4000:])
    assert "on 2 nodes (node[1-2]), master 127.0.0.1:" in text
    assert "world 2" in text and not (tmp_path / "ssh-calls").exists()
    name = "gridmodel_visionzip_b64_numerics=official" + ("_tp2" if tp == 2 else "")
    got = _runs(out)[name]
    ref = grid["runs"]["gridmodel_visionzip_b64_numerics=official"]
    assert got["texts"] == ref["texts"] and got["metrics"] == ref["metrics"]
    res = json.loads((out / "pope" / name / "results.json").read_text())
    assert res["world_size"] == 2


def test_srun_tasks_form_one_world(grid, tmp_path):
    """Item 4: `srun -n2 python -m eval run` started two independent world-1 'rank 0' processes on one folder."""
    out = tmp_path / "runs"
    r = _sh(["srun", "-N", "1", "-n", "2", "-c", "1", sys.executable, "-m", "eval", "run", "pope", "--model",
             grid["env"]["MODEL"], "--method", "visionzip", "--budget", "64", "--opt", "numerics=official",
             "--data-root", grid["env"]["DATA_ROOT"], "--out", str(out), "--max-new-tokens", "4", "--no-wandb"],
            grid["env"], timeout=600, cwd=str(REPO))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "this rank 3 (0 already answered, 3 to go), world 2" in r.stderr
    run = out / "pope" / "gridmodel_visionzip_b64_numerics=official"
    assert sorted(p.name for p in (run / "answers").glob("*.jsonl")) == ["2_0.jsonl", "2_1.jsonl"]
    assert _runs(out)[run.name]["texts"] == grid["runs"][run.name]["texts"]
    assert json.loads((run / "results.json").read_text())["launcher"] == "srun"
