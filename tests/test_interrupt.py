"""Ctrl-C during ``python -m eval run`` (issue 63, item 4): one line saying how many answers are saved where and
how to go on, exit status 130, no traceback; the same command then answers only the rest."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval.shards import EVAL_KEY, shard_files

ROOT = Path(__file__).resolve().parents[1]

#: a real SIGINT to the process as it reads the input of its 3rd question (2 answered and flushed by then)
#: (SIGINT's Python handler installed first: a job started in the background by a non-interactive shell, such as a
#: suite run with `... &`, inherits SIGINT ignored, and the child would finish instead; a terminal's Ctrl-C is this)
DRIVER = """
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
import eval.loader as ld
real, calls = ld.read_input, [0]
def read_input(*a, **k):
    calls[0] += 1
    if calls[0] == 3 and os.environ.get("INTERRUPT_AT_3"):
        os.kill(os.getpid(), signal.SIGINT)
    return real(*a, **k)
ld.read_input = read_input
from eval.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_cli(data, out, *extra):
    """The command in a process of its own, interrupted (SIGINT) as it reads its 3rd question."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), INTERRUPT_AT_3="1")
    cmd = [sys.executable, "-c", DRIVER, *run_cli_args(data, out, *extra)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def run_cli_args(data, out, *extra):
    # the inputs read in the loop (no loader workers): the 3rd read is the 3rd question's, after 2 answers are on disk
    # (Ctrl-C with loader workers: tests/test_loader.py)
    return ["run", "pope", "--model", "tiny:llava", "--max-new-tokens", "2", "--data-root", str(data), "--out",
            str(out), "--no-wandb", "--run-name", "r", "--loader-workers", "0", *extra]


def uids(rd):
    return [json.loads(ln)[EVAL_KEY]["uid"] for p in shard_files(rd) for ln in p.read_text().splitlines()]


@pytest.mark.parametrize("extra, again", [((), "the same command"),
                                          (("--overwrite",), "the same command without --overwrite")])
def test_ctrl_c_prints_one_line_exits_130_and_the_same_command_resumes(data, tmp_path, extra, again, run_env, caplog):
    rd = tmp_path / "runs" / "pope" / "r"
    p = run_cli(data, tmp_path / "runs", *extra)
    assert p.returncode == 130, p.stderr
    assert "Traceback" not in p.stderr and "KeyboardInterrupt" not in p.stderr
    assert p.stderr.splitlines()[-1] == f"interrupted: 2 answers saved in {rd}; run {again} to resume"
    assert [ln for ln in p.stderr.splitlines() if ln.startswith("interrupted")] == [p.stderr.splitlines()[-1]]
    first = uids(rd)
    assert len(first) == 2
    if extra:  # the resume itself is the same as after the plain command's interrupt (CI time)
        return
    # the same command again, in this test process (eval.cli.main, what `python -m eval` calls: one interpreter
    # start fewer, CI time); its count of the answers on disk is a log line (on stderr in a process of its own)
    from eval.cli import main

    n = sum(1 for ln in (data / "pope" / "llava_pope_test.jsonl").read_text().splitlines() if ln.strip())
    with caplog.at_level(logging.INFO, logger="eval"):
        assert main(run_cli_args(data, tmp_path / "runs")) == 0
    assert f"({len(first)} already answered, {n - len(first)} to go)" in caplog.text
    assert uids(rd)[:2] == first and len(set(uids(rd))) == n


def test_ctrl_c_before_any_answer_says_none_are_saved(tmp_path, monkeypatch, capsys):
    """A Ctrl-C while the model loads: nothing on disk yet, the line says 0 (and the rank-0 rule: a rank > 0
    prints nothing, so a torchrun world prints the line once)."""
    import eval.runner
    from eval.cli import main

    def stopped(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval.runner, "run", stopped)
    monkeypatch.delenv("RANK", raising=False)
    assert main(["run", "pope", "--out", str(tmp_path), "--run-name", "x"]) == 130
    assert capsys.readouterr().err == (f"interrupted: 0 answers saved in {tmp_path / 'pope' / 'x'}; "
                                       "run the same command to resume\n")
    monkeypatch.setenv("RANK", "1")
    assert main(["run", "pope", "--out", str(tmp_path), "--run-name", "x"]) == 130
    assert capsys.readouterr().err == ""
