"""bench.efficiency survives its time limit: every cell's row appended to cells.jsonl as it ends, a SIGTERM
(``timeout``, a Slurm limit) writes the report from the rows there are, ``--resume`` measures only the cells an
earlier run of the same configuration did not finish, a failing cell is recorded and the run goes on, and the
unpruned row is timed again at the end (``--retime-none``). Tiny LLaVA on the CPU."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.efficiency import main as eff_main

REPO = Path(__file__).resolve().parents[1]
BASE = ["--model", "tiny:llava", "--n", "1", "--warmup", "0", "--batch", "1", "--decode-tokens", "2",
        "--decode-samples", "1", "--image-hw", "56", "56", "--sweep", "8", "16"]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]


def test_resume_measures_only_the_cells_not_done_and_keeps_the_earlier_rows(tmp_path, capsys):
    out = tmp_path / "eff"
    args = BASE + ["--out", str(out), "--fast", "--fast-backend", "cudagraphs", "--budgets", "4"]
    assert eff_main(args + ["--methods", "none", "random"]) == 0
    first = {(r["method"], r["path"]): r for r in _rows(out)}
    assert set(first) == {("none", "eager"), ("none", "fast"), ("random", "eager"), ("random", "fast")}
    assert first[("random", "fast")]["path_taken"] == "fast"  # the capture backend's row took the fast path
    capsys.readouterr()
    assert eff_main(args + ["--methods", "none", "random", "visionzip", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "6 cells" in err and "4 done in an earlier run (--resume)" in err
    assert "[1/6] none: done earlier (--resume)" in err and "[4/6] random budget 4 (fast path): done earlier" in err
    assert "[5/6] visionzip budget 4\n" in err
    rows = _rows(out)
    assert [(r["method"], r["path"]) for r in rows][4:] == [("visionzip", "eager"), ("visionzip", "fast")]
    rep = json.loads((out / "efficiency.json").read_text())
    assert rep["complete"] and [r["method"] for r in rep["results"]] == ["none", "random", "visionzip"]
    assert rep["results"][1]["ttft"]["median"] == first[("random", "eager")]["ttft_median_s"]  # not re-measured
    assert [c["method"] for c in rep["fast"]["comparison"]] == ["none", "random", "visionzip"]
    # another configuration's rows are never reused
    capsys.readouterr()
    assert eff_main([a if a != "2" else "3" for a in args] + ["--methods", "none", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "done earlier" not in err and "6 line(s) of" in err


def test_a_failing_cell_is_recorded_and_the_run_goes_on_and_the_unpruned_row_is_re_timed(tmp_path):
    out = tmp_path / "eff"
    # downsample: budget 6 is not reachable with s x s windows on the tiny 4 x 4 grid: its prefill raises
    assert eff_main(BASE + ["--out", str(out), "--methods", "none", "downsample", "random", "--budgets", "6",
                            "--retime-none"]) == 0
    rep = json.loads((out / "efficiency.json").read_text())
    assert [(r["method"], r.get("closing")) for r in rep["results"]] == [("none", False), ("random", False),
                                                                       ("none", True)]
    ((err),) = rep["errors"]
    assert err["method"] == "downsample" and err["error"].startswith("BudgetError: downsample: budget 6")
    md = (out / "efficiency.md").read_text()
    assert "Cells that failed (the run went on): downsample 6 (eager): BudgetError" in md
    assert "| none (closing re-time) | - |" in md
    a, b = rep["results"][0]["ttft"]["median"], rep["results"][2]["ttft"]["median"]
    assert f"Unpruned TTFT at the start {a * 1e3:.2f} ms, re-timed after the last method {b * 1e3:.2f} ms" in md
    assert {r["method"] for r in _rows(out)} == {"none", "downsample", "random"}  # the failure has its line too


def test_sigterm_writes_the_report_of_the_rows_measured_and_resume_finishes(tmp_path):
    out = tmp_path / "eff"
    args = BASE + ["--out", str(out), "--methods", "none", "random", "fastervlm", "visionzip", "--budgets", "4", "8"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "bench.efficiency", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 900  # a loaded 2-core machine took over 240 s for the first two cells
    while time.time() < deadline and proc.poll() is None:
        if (out / "cells.jsonl").exists() and len((out / "cells.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 124, err
    assert "stopped after" in err and "--resume continues" in err
    done = _rows(out)
    rep = json.loads((out / "efficiency.json").read_text())
    assert not rep["complete"] and rep["cost_model"] is None and rep["bars"] == []
    assert 2 <= len(rep["results"]) == len(done) < 7
    assert [r["ttft"]["median"] for r in rep["results"]] == [r["ttft_median_s"] for r in done]
    assert "**the run stopped before its last cell**" in (out / "efficiency.md").read_text()
    assert eff_main(args + ["--resume"]) == 0
    rep = json.loads((out / "efficiency.json").read_text())
    assert rep["complete"] and len(rep["results"]) == 7 and rep["cost_model"] is not None
    assert [r["ttft"]["median"] for r in rep["results"][:len(done)]] == [r["ttft_median_s"] for r in done]


def test_a_sigterm_whose_exception_is_caught_inside_a_cell_still_stops_the_run(tmp_path, monkeypatch):
    """Inductor wraps an exception raised during its code generation in its own, and dynamo may fall back to the
    eager function: the SIGTERM's exception must not be taken for a failing cell (the run went on past its time
    limit on an H200 until it was killed, and lost its report). Cell 2 is signalled while its 'compile' wraps the
    exception; cell 3 swallows it entirely and returns a row: each run stops there, with the report of the cells
    before (the interrupted cell's row is not kept: --resume measures it again)."""
    import bench.efficiency as eff

    real = eff.measure
    for mode, stop_at in (("wrap", 2), ("swallow", 3)):
        calls = []

        def measure(*a, _mode=mode, _at=stop_at, _calls=calls, **k):
            _calls.append(a[1])
            if len(_calls) == _at:
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(5)  # the handler raises in here
                except BaseException as e:  # noqa: BLE001 - what a compiler's wrapper does
                    if _mode == "wrap":
                        raise RuntimeError("backend compiler failed") from e
                return real(*a, **k)
            return real(*a, **k)

        monkeypatch.setattr(eff, "measure", measure)
        out = tmp_path / mode
        assert eff_main(BASE + ["--out", str(out), "--methods", "none", "random", "fastervlm", "visionzip",
                                "--budgets", "4"]) == 124
        rep = json.loads((out / "efficiency.json").read_text())
        assert not rep["complete"] and rep["errors"] == []
        assert len(calls) == stop_at  # no cell after the signalled one began
        assert [r["method"] for r in rep["results"]] == ["none", "random", "fastervlm"][:stop_at - 1]
        assert len(_rows(out)) == stop_at - 1
