"""A resume compares the fingerprint as run_config.json stores it. SparseVLM's config holds its layers as a tuple,
which the file stores as a list: before, every SparseVLM run was refused on resume ("holds answers of a different
configuration ... method {config: [same, same]}"): found by a requeued Slurm task (tests/test_slurm.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import child_env

REPO = Path(__file__).resolve().parents[1]


def test_sparsevlm_run_resumes(fixture_data, tmp_path):
    from integrations.vllm.tiny import save_tiny_llava

    import llava

    model = save_tiny_llava(tmp_path / "gridmodel", size="grid")  # 16 LLM layers: SparseVLM's 2 / 6 / 15 exist
    rt = llava.load(str(model))
    assert isinstance(rt.prune("sparsevlm", 64).method.config()["layers"], tuple)  # what made the two differ
    env = child_env()
    cmd = [sys.executable, "-m", "eval", "run", "pope", "--model", str(model), "--method", "sparsevlm", "--budget",
           "64", "--data-root", str(fixture_data), "--out", str(tmp_path / "runs"), "--max-new-tokens", "2",
           "--no-wandb", "--launcher", "python"]
    first = subprocess.run(cmd + ["--limit", "2"], env=env, cwd=str(REPO), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    again = subprocess.run(cmd + ["--limit", "3"], env=env, cwd=str(REPO), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "different configuration" not in again.stderr
    assert "pope: 3 questions, this rank 3 (2 already answered, 1 to go)" in again.stderr
