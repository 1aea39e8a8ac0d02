"""Progress off a terminal (issue 63, friction): a log line at least every 10 s, also while one batch runs for
longer than that; on a terminal the tqdm bar. And scripts/demo.sh says which of its steps it is on."""

import io
import logging
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import eval.progress as progress_mod
from eval.progress import LineProgress, progress

ROOT = Path(__file__).resolve().parents[1]


def lines(caplog, desc):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(desc + ":")]


def test_a_line_every_interval_even_with_nothing_done_and_one_at_the_end(caplog):
    with caplog.at_level(logging.INFO, logger="eval"):
        p = LineProgress(4, "pope rank 0/1", every=0.05)
        time.sleep(0.3)  # a long first batch: nothing done yet, the lines still come
        p.update(1)
        p.close()
        n = len(lines(caplog, "pope rank 0/1"))
        time.sleep(0.2)  # closed: the timer thread is gone
    got = lines(caplog, "pope rank 0/1")
    assert len(got) == n and n >= 3
    assert got[0] == "pope rank 0/1: 0 of 4 answered (0%), 0s elapsed"
    assert re.fullmatch(r"pope rank 0/1: 1 of 4 answered \(25%\), 0s elapsed, [0-9.]+ questions/s, about \d+s left",
                        got[-1]), got[-1]
    assert not p._thread.is_alive()


def test_durations_and_the_default_interval():
    assert progress_mod.EVERY_S == 10.0
    assert [progress_mod._dur(s) for s in (0.4, 59, 65, 3600 + 120)] == ["0s", "59s", "1m 05s", "1h 02m"]


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_the_bar_a_log_the_lines():
    bar = progress(3, "x", stream=_Tty())
    assert type(bar).__name__ == "_Bar"
    bar.close()
    lp = progress(3, "x", stream=io.StringIO())
    assert isinstance(lp, LineProgress) and lp.every == 10.0
    lp.close()


@pytest.mark.usefixtures("run_env")
def test_eval_run_off_a_terminal_says_it_is_alive_during_a_long_batch(data, tmp_path, caplog, monkeypatch):
    """A first batch slower than the interval: a '0 of 6 answered' line comes while it runs (the tqdm bar off a
    terminal printed nothing a log shows until the end)."""
    import eval.hf_backend as hb
    from eval.cli import main

    monkeypatch.setattr(progress_mod, "EVERY_S", 0.05)
    real = hb._answer_batch

    def slow(*a, **k):
        time.sleep(0.4)
        return real(*a, **k)

    monkeypatch.setattr(hb, "_answer_batch", slow)
    with caplog.at_level(logging.INFO, logger="eval"):
        assert main(["run", "pope", "--data-root", str(data), "--out", str(tmp_path), "--no-wandb",
                     "--max-new-tokens", "1", "--limit", "2"]) == 0
    got = lines(caplog, "pope rank 0/1")
    assert got[0].startswith("pope rank 0/1: 0 of 2 answered (0%)")
    assert got[-1].startswith("pope rank 0/1: 2 of 2 answered (100%), ") and "left" not in got[-1]


def test_demo_says_which_step_of_six(tmp_path):
    """scripts/demo.sh with its install, the harness and python stubbed: six numbered steps in order."""
    (tmp_path / "scripts" / "eval").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "demo.sh", tmp_path / "scripts" / "demo.sh")
    (tmp_path / "scripts" / "install.sh").write_text("echo installed\n")
    (tmp_path / "scripts" / "eval" / "shapes.sh").write_text('echo "shapes $*"\n')
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "python").write_text('#!/bin/sh\necho "python $*"\n')
    os.chmod(bin_ / "python", 0o755)
    env = {"PATH": f"{bin_}:{os.environ['PATH']}", "HOME": str(tmp_path)}
    p = subprocess.run(["bash", "scripts/demo.sh"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == [
        "== demo step 1 of 6: install (scripts/install.sh, into the active Python)",
        "== demo step 2 of 6: the unpruned model on the testbed",
        "== demo step 3 of 6: consensusdrop at 16 of 64 visual tokens",
        "== demo step 4 of 6: fastervlm at 16 of 64 visual tokens",
        "== demo step 5 of 6: random at 16 of 64 visual tokens",
        "== demo step 6 of 6: the results table (runs/demo/shapes)"]
    assert p.stdout.splitlines() == ["installed", "shapes none none", "shapes consensusdrop 16", "shapes fastervlm 16",
                                     "shapes random 16", "python -m eval table runs/demo/shapes"]
