"""A resume compares the fingerprint as run_config.json stores it. SparseVLM's config holds its layers as a tuple,
which the file stores as a list: before, every SparseVLM run was refused on resume ("holds answers of a different
configuration ... method {config: [same, same]}"): found by a requeued Slurm task (tests/test_slurm.py)."""

from __future__ import annotations


def test_sparsevlm_run_resumes(fixture_data, tmp_path, capsys, caplog, run_env):
    import logging

    from integrations.vllm.tiny import save_tiny_llava

    import llava
    from eval.cli import main

    model = save_tiny_llava(tmp_path / "gridmodel", size="grid")  # 16 LLM layers: SparseVLM's 2 / 6 / 15 exist
    rt = llava.load(str(model))
    assert isinstance(rt.prune("sparsevlm", 64).method.config()["layers"], tuple)  # what made the two differ
    # in this process (the resume reads the first run's run_config.json from disk either way; CI time)
    argv = ["run", "pope", "--model", str(model), "--method", "sparsevlm", "--budget", "64", "--data-root",
            str(fixture_data), "--out", str(tmp_path / "runs"), "--max-new-tokens", "2", "--no-wandb",
            "--launcher", "python"]
    assert main(argv + ["--limit", "2"]) == 0, capsys.readouterr().err[-2000:]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="eval"):
        assert main(argv + ["--limit", "3"]) == 0, capsys.readouterr().err[-2000:]
    said = [r.getMessage() for r in caplog.records]
    assert not any("different configuration" in m for m in said)
    assert any("pope: 3 questions, this rank 3 (2 already answered, 1 to go)" in m for m in said), said
