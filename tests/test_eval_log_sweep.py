"""``python -m eval log-sweep DIR``: a testbed sweep (DIR/testbed.json + DIR/testbed.png) logged as one W&B run by
the harness, never failing; ``python -m testbed.evaluate sweep --wandb`` runs it in a subprocess, so the testbed
imports nothing from eval/ (issue 35: the harness may use the testbed, not the reverse)."""

import ast
import json
import sys
import types
from pathlib import Path

import pytest

from eval.cli import log_sweep, main
from eval.wandb_log import log_sweep_to_wandb, read_offline_run
from test_wandb_runs import _BrokenWandb  # init works, every log raises

ROOT = Path(__file__).resolve().parent.parent

SWEEP = {"meta": {"date": "2026-11-23", "model": "testbed", "n_questions": 12, "seed": 0, "budgets": [4],
                  "command": "python -m testbed.evaluate sweep"},
         "results": [
             {"method": "none", "budget": None, "options": {}, "accuracy": {"overall": 80.0, "counting": 70.0},
              "tokens": {"visual_entering_llm": 64.0, "visual_layer_avg": 64.0, "time_s": 1.5}},
             {"method": "consensusdrop", "budget": 4, "options": {"fusion": "encoder_only"},
              "accuracy": {"overall": 45.0, "counting": 35.0},
              "tokens": {"visual_entering_llm": 4.0, "visual_layer_avg": 4.0, "time_s": 0.5}}],
         "errors": [{"method": "dart", "budget": 4, "options": {}, "error": "ValueError: x"}]}


@pytest.fixture
def sweep_dir(tmp_path):
    from PIL import Image

    d = tmp_path / "sweep"
    d.mkdir()
    (d / "testbed.json").write_text(json.dumps(SWEEP))
    Image.new("RGB", (32, 16), (200, 10, 10)).save(d / "testbed.png")
    return d


def test_disabled_returns_the_disabled_info(sweep_dir, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert log_sweep(sweep_dir) == log_sweep_to_wandb(SWEEP) == {"mode": "disabled"}
    assert main(["log-sweep", str(sweep_dir)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"mode": "disabled"}


def test_a_folder_without_a_sweep_never_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    info = log_sweep(tmp_path / "no-such-sweep")
    assert info["mode"] == "disabled" and "testbed.json" in info["error"]
    assert main(["log-sweep", str(tmp_path / "no-such-sweep")]) == 0
    assert not (tmp_path / "wandb").exists()


def _offline(monkeypatch, d: Path) -> Path:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(d))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return d


def _content(run: dict) -> dict:
    """What a sweep run holds, less what differs between two runs (ids, times, file names)."""
    summary = {k: v for k, v in run["summary"].items() if not k.startswith("_") and not isinstance(v, dict)}
    return {"run": {k: v for k, v in run["run"].items() if k != "id"}, "config": run["config"], "summary": summary,
            "tables": run["tables"], "image": run["summary"]["plot"]["_type"], "finished": run["finished"]}


def test_offline_run_is_the_one_log_sweep_to_wandb_makes(sweep_dir, tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path / "direct")
    direct = log_sweep_to_wandb(SWEEP, png=sweep_dir / "testbed.png")
    _offline(monkeypatch, tmp_path / "command")
    via_command = log_sweep(sweep_dir)
    assert direct["mode"] == via_command["mode"] == "offline" and "error" not in via_command, via_command
    a = read_offline_run(tmp_path / "direct" / "wandb")
    b = read_offline_run(tmp_path / "command" / "wandb")
    assert _content(b) == _content(a)
    assert b["run"]["name"] == "testbed-sweep/2026-11-23" and b["summary"]["n_configs"] == 2


def test_a_broken_wandb_is_the_same_error_as_direct(sweep_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setitem(sys.modules, "wandb", _BrokenWandb("wandb"))
    info = log_sweep(sweep_dir)
    assert info == log_sweep_to_wandb(SWEEP, png=sweep_dir / "testbed.png")
    assert "sweep" in info["error"] and "broken table" in info["error"]
    assert main(["log-sweep", str(sweep_dir)]) == 0


def test_testbed_sweep_runs_the_harness_command(sweep_dir, monkeypatch, capsys):
    """``sweep --wandb``: ``python -m eval log-sweep OUT`` in a subprocess; its failure is said, never raised."""
    import testbed.evaluate as te

    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert te.log_sweep(sweep_dir) is True
    assert '"mode": "disabled"' in capsys.readouterr().out
    monkeypatch.setattr(te.sys, "executable", str(sweep_dir / "no-such-python"))
    assert te.log_sweep(sweep_dir) is False
    assert "W&B sweep logging failed (the sweep is kept)" in capsys.readouterr().err

    calls = []

    def failing(cmd, **kw):
        calls.append(cmd)
        return types.SimpleNamespace(returncode=1, stdout="", stderr="Traceback ...\nRuntimeError: boom\n")

    monkeypatch.setattr(te.subprocess, "run", failing)
    assert te.log_sweep(sweep_dir) is False
    assert calls[0][1:] == ["-m", "eval", "log-sweep", str(sweep_dir.resolve())]
    assert "RuntimeError: boom" in capsys.readouterr().err


def test_the_testbed_imports_nothing_from_eval():
    for f in (ROOT / "testbed").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n == "eval" or n.startswith("eval.") for n in names), (f, names)
