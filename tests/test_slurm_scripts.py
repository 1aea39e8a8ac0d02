"""The pieces of the Slurm workflow that need no scheduler (docs/cluster.md): Slurm's rank variables in eval/dist.py,
the launcher's command lines under Slurm (MASTER_PORT, DeepSpeed without ssh), the paper script's report switch
and REPORT_ONLY, the sbatch scripts' refusals and submit_paper.sh's dry run. tests/test_slurm.py runs the whole
workflow on a real slurmctld."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_env

from eval import dist

REPO = Path(__file__).resolve().parents[1]
def _env(**kw) -> dict:
    return child_env(("MASTER_", "SHARD", "REPORT"), PYTHONPATH=REPO, **kw)


def _no_launcher(monkeypatch, *also) -> None:
    """No torchrun / deepspeed rank variables (and ``also``) in this process's environment, and none left behind
    when the test ends, including those the code under test sets (``eval.dist.init`` exports them): setenv first
    records each for monkeypatch's undo, delenv then removes it."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", *also):
        monkeypatch.setenv(k, "unset")
        monkeypatch.delenv(k)


# ---------------------------------------------------------------------------------------------------------------
# eval/dist.py: processes started by srun (item 5 of the issue)
# ---------------------------------------------------------------------------------------------------------------

def test_detect_reads_a_slurm_step(monkeypatch):
    _no_launcher(monkeypatch)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    info = dist.detect()
    assert (info.rank, info.world, info.local_rank, info.source) == (3, 4, 1, "slurm")
    info = dist.detect(tp=2)  # TP groups over the srun world: ranks 2, 3 form group 1
    assert (info.dp, info.dp_rank, info.writes) == (2, 1, False)


def test_detect_batch_script_is_a_world_of_one(monkeypatch):
    """The batch script has SLURM_NTASKS and SLURM_PROCID=0 but is not a step: it must not wait for 3 others."""
    _no_launcher(monkeypatch, "SLURM_STEP_NUM_TASKS")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    info = dist.detect()
    assert (info.rank, info.world, info.source) == (0, 1, "single")


def test_detect_launcher_variables_win_over_slurm(monkeypatch):
    """torchrun / the deepspeed launcher inside an srun task: their RANK / WORLD_SIZE, not the step's."""
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = dist.detect()
    assert (info.rank, info.world, info.local_rank, info.source) == (5, 8, 1, "launcher")


def test_detect_refuses_a_bad_slurm_rank(monkeypatch):
    _no_launcher(monkeypatch)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        dist.detect()


def test_slurm_port_and_single_node_address():
    assert dist.slurm_port(12) == 20012
    assert dist.slurm_port(45017) == 25017  # 20000 + 45017 mod 20000
    assert dist.slurm_master_addr({"SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NODELIST": "gpu07"}) == "127.0.0.1"


def test_init_exports_the_slurm_world_for_deepspeed(monkeypatch):
    """A world that srun started: init sets RANK / WORLD_SIZE / LOCAL_RANK (DeepSpeed's init_distributed reads
    them) and a job-derived MASTER_PORT. A world of 1 never joins a process group, so call the part that sets them."""
    import eval.dist as d

    _no_launcher(monkeypatch, "MASTER_ADDR", "MASTER_PORT")
    monkeypatch.setenv("SLURM_JOB_ID", "20345")
    monkeypatch.setenv("SLURM_STEP_NUM_NODES", "1")
    calls = {}

    class FakeDist:
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init_process_group(**kw):
            calls.update(kw, addr=os.environ["MASTER_ADDR"], port=os.environ["MASTER_PORT"],
                         rank=os.environ["RANK"], world=os.environ["WORLD_SIZE"])

    import torch

    monkeypatch.setattr(torch, "distributed", FakeDist, raising=False)
    monkeypatch.setitem(sys.modules, "torch.distributed", FakeDist)
    info = d.DistInfo(rank=1, world=2, local_rank=1, source="slurm")
    d.init(info, backend="gloo")
    assert (calls["addr"], calls["port"], calls["rank"], calls["world"]) == ("127.0.0.1", "20345", "1", "2")


# ---------------------------------------------------------------------------------------------------------------
# scripts/eval/_launch.sh under Slurm: the command lines (a recording `python` / `deepspeed` in place of the real)
# ---------------------------------------------------------------------------------------------------------------

def _recorder(d: Path, name: str) -> Path:
    p = d / name
    p.write_text("#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done > \"$RECORD\"\n")
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return p


def _launch(tmp_path, **env) -> list[str]:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    py = _recorder(bindir, "python")
    _recorder(bindir, "deepspeed")
    sc = bindir / "scontrol"  # `scontrol show hostnames gpu[1-2]` as Slurm expands it
    sc.write_text("#!/bin/sh\n[ \"$2\" = hostnames ] && [ \"$3\" = \"gpu[1-2]\" ] && printf 'gpu1\\ngpu2\\n'\n")
    sc.chmod(0o755)
    rec = tmp_path / "record.txt"
    e = _env(RECORD=rec, PYTHON=py, OUT=tmp_path / "runs", DATA_ROOT=tmp_path, MODEL="tiny:llava",
             PATH=f"{bindir}:{os.environ['PATH']}", **env)
    r = subprocess.run(["bash", str(REPO / "scripts/eval/pope.sh"), "random", "8"], env=e, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return rec.read_text().splitlines()


def _opt(args, name):
    for a in args:
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    i = args.index(name)
    return args[i + 1]


def test_torchrun_multinode_port_follows_the_slurm_job(tmp_path):
    args = _launch(tmp_path, NPROC=2, NNODES=2, NODE_RANK=1, MASTER_ADDR="10.0.0.7", SLURM_JOB_ID=123456)
    assert args[:2] == ["-m", "torch.distributed.run"]
    assert _opt(args, "--master_port") == str(20000 + 123456 % 20000) == "23456"
    assert (_opt(args, "--node_rank"), _opt(args, "--nnodes"), _opt(args, "--master_addr")) == ("1", "2", "10.0.0.7")
    # outside Slurm the default stays 29500; an explicit MASTER_PORT always wins
    args = _launch(tmp_path, NPROC=2, NNODES=2, NODE_RANK=0, MASTER_ADDR="h")
    assert _opt(args, "--master_port") == "29500"
    args = _launch(tmp_path, NPROC=2, NNODES=2, NODE_RANK=0, MASTER_ADDR="h", SLURM_JOB_ID=7, MASTER_PORT=4242)
    assert _opt(args, "--master_port") == "4242"


def test_deepspeed_multinode_in_slurm_runs_without_ssh(tmp_path):
    """Inside a Slurm job every node runs the launcher (--no_ssh, its --node_rank); the hostfile lists the job's
    nodes with NPROC slots. Before: --hostfile was required and DeepSpeed reached the other nodes by pdsh / ssh."""
    args = _launch(tmp_path, LAUNCHER="deepspeed", NPROC=2, NNODES=2, NODE_RANK=1, MASTER_ADDR="10.0.0.7",
                   SLURM_JOB_ID=99, SLURM_JOB_NODELIST="gpu[1-2]", TP=4)
    ds = args[:args.index("--module")]  # deepspeed's own options (eval run's --launcher deepspeed comes after)
    assert "--no_ssh" in ds and "--launcher" not in ds
    assert (_opt(args, "--node_rank"), _opt(args, "--master_addr"), _opt(args, "--num_nodes")) == ("1", "10.0.0.7", "2")
    assert _opt(args, "--master_port") == "20099"
    hosts = Path(_opt(args, "--hostfile")).read_text().splitlines()
    assert hosts == ["gpu1 slots=2", "gpu2 slots=2"]
    assert args[args.index("--module") + 1:][:2] == ["eval", "run"] and _opt(args, "--tp") == "4"


def test_deepspeed_multinode_outside_slurm_keeps_its_launcher(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("a slots=8\nb slots=8\n")
    args = _launch(tmp_path, LAUNCHER="deepspeed", NPROC=8, NNODES=2, HOSTFILE=hf, DS_LAUNCHER="openmpi")
    ds = args[:args.index("--module")]
    assert "--no_ssh" not in ds
    assert (_opt(ds, "--hostfile"), _opt(ds, "--launcher"), _opt(ds, "--master_port")) == (str(hf), "openmpi", "29500")
    # DS_NO_SSH=0 inside a Slurm job: the ssh launcher as before
    args = _launch(tmp_path, LAUNCHER="deepspeed", NPROC=8, NNODES=2, HOSTFILE=hf, SLURM_JOB_ID=5, DS_NO_SSH=0)
    assert "--no_ssh" not in args and _opt(args, "--hostfile") == str(hf)


# ---------------------------------------------------------------------------------------------------------------
# scripts/papers/_paper.sh: the report from shards (items 1 and 3)
# ---------------------------------------------------------------------------------------------------------------

def _no_grid_python(tmp_path) -> Path:
    """A `python` that answers the grid's `-m eval paper-grid ... --commands` with no configs, as the real one does
    for ONLY=no-such-column, and runs everything else (the report) for real: the script's decision about the
    report without the grid's interpreter start."""
    py = tmp_path / "bin" / "python"
    py.parent.mkdir(exist_ok=True)
    py.write_text("#!/bin/sh\ncase \"$*\" in '-m eval paper-grid '*' --commands') exit 0 ;; esac\n"
                  f"exec {shlex.quote(sys.executable)} \"$@\"\n")
    py.chmod(0o755)
    return py


def _paper(tmp_path, *args, **env):
    """The visionzip script on a grid of no configs (ONLY names no column): what it decides about the report,
    in seconds."""
    e = _env(OUT=tmp_path / "runs", DATA_ROOT=tmp_path, MODEL="tiny:llava", ONLY="no-such-column", **env)
    return subprocess.run(["bash", str(REPO / "scripts/papers/visionzip.sh"), "Table 1", *args], env=e,
                          capture_output=True, text=True, timeout=300)


REPORT_MD = "runs/papers/visionzip-Table-1.md"


def test_array_task_shard0_writes_no_report(tmp_path):
    """Item 1: the task that runs SHARD=0/n of a Slurm array wrote the report while the others still ran."""
    py = _no_grid_python(tmp_path)  # a report these two wrote would be the real one's
    r = _paper(tmp_path, SHARD="0/3", SLURM_ARRAY_TASK_ID=0, SLURM_ARRAY_JOB_ID=17, PYTHON=py)
    assert r.returncode == 0, r.stderr
    assert "visionzip: 0 configs to run (shard 0/3)" in r.stdout
    assert not (tmp_path / REPORT_MD).exists()
    assert "Slurm array task: the report is left to the job that runs when every task is done" in r.stdout
    r = _paper(tmp_path, SHARD="0/3", REPORT="0", PYTHON=py)  # the switch, outside an array too
    assert r.returncode == 0 and not (tmp_path / REPORT_MD).exists()
    r = _paper(tmp_path, SHARD="0/3")  # a manual shard 0 outside an array (the real grid): as documented, it writes it
    assert r.returncode == 0, r.stderr
    assert (tmp_path / REPORT_MD).exists()


def test_report_only_ignores_a_leftover_shard(tmp_path):
    """Item 3: REPORT_ONLY=1 with SHARD=2/3 wrote nothing and exited 0."""
    r = _paper(tmp_path, REPORT_ONLY="1", SHARD="2/3")
    assert r.returncode == 0, r.stderr
    assert "REPORT_ONLY=1: SHARD=2/3 ignored (the report is the whole grid's)" in r.stderr
    assert (tmp_path / REPORT_MD).exists()
    r = _paper(tmp_path, REPORT="maybe")
    assert r.returncode == 2 and "REPORT=maybe: use auto, 1 or 0" in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# scripts/slurm/: refusals and the dry run (items 2 and 6)
# ---------------------------------------------------------------------------------------------------------------

def _sbatch_script(name, **env):
    return subprocess.run(["bash", str(REPO / "scripts/slurm" / name)], env=_env(**env), capture_output=True,
                          text=True, timeout=60, cwd=str(REPO))


def test_paper_sbatch_needs_shards_fixed_at_submission():
    """Item 2: a shard count read from the array (SLURM_ARRAY_TASK_COUNT) is 1 for a task resubmitted alone."""
    r = _sbatch_script("paper.sbatch", PAPER="visionzip", SLURM_ARRAY_TASK_ID=1, SLURM_ARRAY_TASK_COUNT=1)
    assert r.returncode == 2
    assert "the shard count must be fixed at submission" in r.stderr
    r = _sbatch_script("paper.sbatch", PAPER="visionzip", SLURM_ARRAY_TASK_ID=3, SHARDS=3)
    assert r.returncode == 2 and "tasks are 0..2" in r.stderr
    r = _sbatch_script("paper.sbatch", SLURM_ARRAY_TASK_ID=0, SHARDS=3)
    assert r.returncode != 0 and "set PAPER" in r.stderr


def test_submit_dry_run_fixes_shards_and_writes_the_variables(tmp_path):
    """SHARDS = the grid's config count (from the dry run), fixed in a file every task sources; ONLY keeps its
    comma; the log folder exists before sbatch is called (item 6); the report job drops GPU requests."""
    out = tmp_path / "runs"
    e = _env(OUT=out, DATA_ROOT=tmp_path / "data", MODEL="tiny:llava", ONLY="pope,gqa", BUDGETS="64",
             VENV=sys.prefix, EXTRA_ARGS="--max-new-tokens 4 --no-wandb")
    from eval.fixtures import write_fixtures

    write_fixtures(tmp_path / "data", ["pope", "gqa"])  # what `python -m eval fixtures DIR pope gqa` writes
    cmd = ["bash", str(REPO / "scripts/slurm/submit_paper.sh"), "visionzip", "Table 1", "--dry-run", "--",
           "--partition=gpu", "--gres=gpu:2", "--time=1:00:00"]
    r = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    # Table 1 with ONLY=pope,gqa BUDGETS=64: per benchmark the unpruned row and FastV / SparseVLM / VisionZip at 64
    assert "visionzip \"Table 1\": 8 configs, SHARDS=8 (dry run: nothing submitted)" in r.stdout
    logs = out / "slurm-logs"
    assert logs.is_dir()
    lines = r.stdout.splitlines()
    array = shlex.split(lines[1])
    report = shlex.split(lines[2])
    assert "--array=0-7" in array and "--gres=gpu:2" in array and "--partition=gpu" in array
    assert "--requeue" in array and "--open-mode=append" in array
    assert "--gres=gpu:2" not in report and "--partition=gpu" in report and "--kill-on-invalid-dep=yes" in report
    envf = Path(_opt(array, "--export").split("VTPRUNE_ENV=", 1)[1])
    assert envf.parent == logs
    got = subprocess.run(["bash", "-c", f"source {shlex.quote(str(envf))}; echo \"$SHARDS|$ONLY|$TABLE|$EXTRA_ARGS\""],
                         env=_env(), capture_output=True, text=True, check=True).stdout.strip()
    assert got == "8|pope,gqa|Table 1|--max-new-tokens 4 --no-wandb"
    r = subprocess.run(cmd[:4] + ["--shards", "3", "--dry-run"], env=e, capture_output=True, text=True,
                       timeout=300, cwd=str(tmp_path))
    assert "SHARDS=3" in r.stdout and "--array=0-2" in r.stdout
    r = subprocess.run(["bash", str(REPO / "scripts/slurm/submit_paper.sh"), "nosuchpaper"], env=e,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no paper script scripts/papers/nosuchpaper.sh" in r.stderr
    r = subprocess.run(["bash", str(REPO / "scripts/slurm/submit_paper.sh"), "visionzip", "--count", "0"], env=e,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "a positive integer" in r.stderr


def test_local_cluster_refuses_bad_arguments():
    r = subprocess.run(["bash", str(REPO / "scripts/slurm/local_cluster.sh"), "up", "--nodes", "0"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--nodes 0: a positive integer" in r.stderr
    r = subprocess.run(["bash", str(REPO / "scripts/slurm/local_cluster.sh"), "sideways"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and "unknown command sideways" in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# the report job's last line, W&B's one switch, the table's name in submit_paper.sh's output (an outside check)
# ---------------------------------------------------------------------------------------------------------------

GRID4 = dict(MODEL="tiny:llava", ONLY="pope", BUDGETS="64")  # Table 1 on POPE at 64: the unpruned row + 3 methods


def test_report_sbatch_ends_on_the_grid_state(tmp_path):
    """report.sbatch logged the dry run's last line as the grid's state (`... --dry-run | tail -n 1`): for
    VisionZip's Table 1 (and PDrop's grid) that line is a `not run: ...` note, not `done N of M`."""
    e = _env(PAPER="visionzip", TABLE="Table 1", REPO=REPO, VENV=sys.prefix, OUT=tmp_path / "runs",
             DATA_ROOT=tmp_path, **GRID4)
    r = subprocess.run(["bash", str(REPO / "scripts/slurm/report.sbatch")], env=e, capture_output=True, text=True,
                       timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / REPORT_MD).exists()
    assert r.stdout.splitlines()[-1] == "done 0 of 4"


def test_slurm_env_takes_a_venv_or_an_interpreter_prefix(tmp_path):
    """_env.sh sources VENV/bin/activate; an interpreter's prefix without one (pyenv, conda: CI's own Python) goes
    first on PATH instead; a folder with neither is one error line, exit 2."""
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    py = prefix / "bin" / "python"
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    py.chmod(0o755)
    line = 'source scripts/slurm/_env.sh >/dev/null; command -v python; echo "${VIRTUAL_ENV:-none}"'
    r = subprocess.run(["bash", "-c", f"cd {REPO} && {line}"], env=_env(REPO=REPO, VENV=prefix),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == str(py)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text(f'export VIRTUAL_ENV="{venv}"\nexport PATH="{prefix}/bin:$PATH"\n')
    r = subprocess.run(["bash", "-c", f"cd {REPO} && {line}"], env=_env(REPO=REPO, VENV=venv),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [str(py), str(venv)]
    r = subprocess.run(["bash", "-c", f"cd {REPO} && {line}"], env=_env(REPO=REPO, VENV=tmp_path / "empty"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: VENV={tmp_path / 'empty'} has neither bin/activate nor bin/python"


def test_paper_status_is_the_done_line_alone(tmp_path, capsys):
    """`bash scripts/papers/<paper>.sh --status`: one line, `done N of M`, where the dry run ends on `not run:`
    notes; a complete config counts. (The script's --dry-run is `python -m eval paper-grid <paper> --out OUT
    --data-root DATA_ROOT --dry-run`: here in this process; the script's own, the README's runnable block.)"""
    from eval.cli import main
    from eval.paper_grid import build_grid
    from eval.papers import load

    out = tmp_path / "runs"
    e = _env(OUT=out, DATA_ROOT=tmp_path)
    assert main(["paper-grid", "pdrop", "--out", str(out), "--data-root", str(tmp_path), "--dry-run"]) == 0
    dry = capsys.readouterr().out
    n = len(build_grid(load("pdrop")))
    assert dry.splitlines()[-1].startswith("not run: ")  # why tail -n 1 was wrong
    assert f"\ndone 0 of {n}\n" in dry
    r = subprocess.run(["bash", str(REPO / "scripts/papers/pdrop.sh"), "--status"], env=e, capture_output=True,
                       text=True, timeout=300)
    assert (r.returncode, r.stdout) == (0, f"done 0 of {n}\n"), r.stderr
    grid = build_grid(load("visionzip"), "Table 1", ["pope"], [64], "tiny:llava")
    done = grid[1].run_dir(out)
    done.mkdir(parents=True)
    (done / "results.json").write_text('{"partial": false}')
    r = subprocess.run(["bash", str(REPO / "scripts/papers/visionzip.sh"), "Table 1", "--status"],
                       env=_env(OUT=out, DATA_ROOT=tmp_path, **GRID4), capture_output=True, text=True, timeout=300)
    assert (r.returncode, r.stdout) == (0, "done 1 of 4\n"), r.stderr


def _recording_python(tmp_path) -> tuple[Path, Path]:
    """A `python` that records each call (WANDB_MODE|WANDB_DIR|arguments) and runs it, except `eval run`: the
    runs are recorded, not made (what they would log is decided by their arguments and environment); with
    RECORD_REPORT_ONLY=1 the report's call too (a test that reads only its arguments)."""
    rec = tmp_path / "calls.txt"
    rec.write_text("")
    py = tmp_path / "python"
    py.write_text("#!/bin/sh\nprintf '%s|%s|%s\\n' \"${WANDB_MODE-}\" \"${WANDB_DIR-}\" \"$*\" >> \"$RECORD\"\n"
                  "case \"$*\" in '-m eval run '*) exit 0 ;; esac\n"
                  "case \"${RECORD_REPORT_ONLY-}|$*\" in '1|-m eval paper '*) exit 0 ;; esac\n"
                  f"exec {shlex.quote(sys.executable)} \"$@\"\n")
    py.chmod(0o755)
    return py, rec


def _wandb_grid(tmp_path, **env):
    """The visionzip script on 4 configs (recorded, not run; none with REPORT_ONLY=1) and its report, W&B as ``env``
    says (no W&B variable of this process's environment): the calls (runs, report) and the result."""
    py, rec = _recording_python(tmp_path)
    e = child_env(("MASTER_", "SHARD", "REPORT", "WANDB_"), PYTHONPATH=REPO, PYTHON=py, RECORD=rec, NPROC=1,
                  OUT=tmp_path / "runs", DATA_ROOT=tmp_path, WANDB_SILENT="true", **GRID4)
    e.pop("WANDB_MODE")
    e.update({k: str(v) for k, v in env.items()})
    r = subprocess.run(["bash", str(REPO / "scripts/papers/visionzip.sh"), "Table 1"], env=e, capture_output=True,
                       text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    calls = [line.split("|", 2) for line in rec.read_text().splitlines()]
    runs = [c for c in calls if c[2].startswith("-m eval run ")]
    report = [c for c in calls if c[2].startswith("-m eval paper visionzip ")]
    assert len(runs) == (0 if env.get("REPORT_ONLY") else 4) and len(report) == 1, calls
    return runs, report[0], r


def _repo_wandb() -> set:
    return {p.name for p in (REPO / "wandb").glob("*")} if (REPO / "wandb").is_dir() else set()


def test_no_wandb_in_extra_args_turns_off_the_report_too(tmp_path):
    """docs/cluster.md: `--no-wandb` in EXTRA_ARGS turns W&B off; the runs got it, the report still logged a W&B run
    (it only read WANDB_MODE), offline in <repository>/wandb/. Now WANDB_MODE=disabled for all, the flag winning
    over a WANDB_MODE=offline as it does in `eval run`."""
    before = _repo_wandb()
    runs, report, r = _wandb_grid(tmp_path, WANDB_MODE="offline", EXTRA_ARGS="--max-new-tokens 4 --no-wandb")
    assert report[0] == "disabled" and "--wandb" not in report[2].split(), report
    assert all(c[0] == "disabled" and " --no-wandb" in c[2] for c in runs), runs
    assert "W&B" not in r.stderr and not list((tmp_path / "runs").rglob("offline-run-*"))
    assert _repo_wandb() == before
    # WANDB_MODE=disabled alone (any case, as eval.wandb_log reads it): no --wandb either (the report's arguments
    # are the check: its call is recorded, not made; the report without W&B ran above)
    _, report, _ = _wandb_grid(tmp_path, WANDB_MODE="Disabled", REPORT_ONLY=1, RECORD_REPORT_ONLY=1)
    assert "--wandb" not in report[2].split(), report


def test_the_reports_offline_run_is_under_out(tmp_path):
    """The report ran from the repository's folder with no WANDB_DIR: its offline run landed in
    <repository>/wandb/. Now in OUT/papers/wandb/ (each config's is in its run folder: eval run's dir=)."""
    from eval.wandb_offline import find_offline_run, read_offline_run

    before = _repo_wandb()
    out = tmp_path / "runs"
    runs, report, r = _wandb_grid(tmp_path, WANDB_MODE="offline", EXTRA_ARGS="--max-new-tokens 4")
    assert all("--no-wandb" not in c[2] for c in runs)
    assert report[1] == str(out / "papers") and "--wandb" in report[2].split(), report
    run = find_offline_run(out / "papers")
    assert run.parent == out / "papers" / "wandb"
    assert f"W&B: offline run saved in {run}" in r.stderr
    assert read_offline_run(run)["config"].get("paper") == "visionzip"
    assert _repo_wandb() == before
    # WANDB_DIR chosen by the user (relative: to the folder the script was called from) moves it
    _, report, _ = _wandb_grid(tmp_path, WANDB_MODE="offline", WANDB_DIR="wb", REPORT_ONLY=1)
    assert report[1] == str(tmp_path / "wb")
    assert find_offline_run(tmp_path / "wb").parent == tmp_path / "wb" / "wandb"


def test_submit_names_the_table_as_the_doc_does(tmp_path):
    """submit_paper.sh printed `visionzip Table 1: 4 configs ...` (a heredoc drops the quotes of ${TABLE:+ "..."})
    where docs/cluster.md shows `visionzip "Table 1": ...`. A recording sbatch hands out job ids 812, 813."""
    import re

    bindir = tmp_path / "bin"
    bindir.mkdir()
    sb = bindir / "sbatch"
    sb.write_text("#!/bin/sh\nn=$(cat \"$COUNTER\" 2>/dev/null || echo 811); n=$((n + 1)); echo $n > \"$COUNTER\"\n"
                  "echo \"$n\"\n")
    sb.chmod(0o755)
    e = _env(OUT=tmp_path / "runs", DATA_ROOT=tmp_path, VENV=sys.prefix, COUNTER=tmp_path / "n",
             PATH=f"{bindir}:{os.environ['PATH']}", **GRID4)
    r = subprocess.run(["bash", str(REPO / "scripts/slurm/submit_paper.sh"), "visionzip", "Table 1", "--", "-c", "1"],
                       env=e, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == 'visionzip "Table 1": 4 configs in 4 array tasks (SHARDS=4)'
    assert lines[1].startswith("  array job  812   logs ") and lines[2].startswith("  report job 813   ")
    doc = (REPO / "docs/cluster.md").read_text().split("```text\n", 1)[1].splitlines()
    shape = re.sub(r"\d+", r"\\d+", re.escape(doc[0]))
    assert re.fullmatch(shape, doc[0]) and re.fullmatch(shape, lines[0]), (doc[0], lines[0])
    r = subprocess.run(["bash", str(REPO / "scripts/slurm/submit_paper.sh"), "visionzip", "Table 1", "--dry-run"],
                       env=e, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert r.stdout.splitlines()[0] == 'visionzip "Table 1": 4 configs, SHARDS=4 (dry run: nothing submitted)'
