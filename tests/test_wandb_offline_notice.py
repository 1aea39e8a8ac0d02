"""A W&B run in offline mode says once where it was saved and the command that uploads it (issue 63, friction):
wandb itself is silenced (settings silent=True), so the folder was never named."""

import pytest

from eval.wandb_log import WandbLogger


def test_an_offline_run_names_its_folder_and_the_sync_command_once(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    w = WandbLogger(project="t", name="n", dir=str(tmp_path))
    assert w.active and w.mode == "offline"
    w.log({"x": 1})
    capsys.readouterr()
    assert w.finish()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("W&B:")]
    (sync_dir,) = list((tmp_path / "wandb").glob("offline-run-*"))
    assert lines == [f"W&B: offline run saved in {sync_dir}; upload it with: wandb sync {sync_dir}"]
    assert list(sync_dir.glob("*.wandb"))  # the folder wandb sync reads: it holds the run's log
    assert w.finish() and "W&B:" not in capsys.readouterr().err  # finished once, said once


def test_online_and_disabled_runs_say_nothing(monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    w = WandbLogger(project="t")
    assert not w.active and w.finish()
    assert "W&B:" not in capsys.readouterr().err
