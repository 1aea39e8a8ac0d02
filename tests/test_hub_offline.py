"""No network and no HF_HUB_OFFLINE (issue 63, friction): a model in the hub cache loads after one warning line,
instead of the hub client's five retries per file, two lines each. The hub is a closed local port here, so the
test is the same with or without a network."""

import os
import subprocess
import sys
from pathlib import Path

from integrations.vllm.tiny import save_tiny_llava

ROOT = Path(__file__).resolve().parent.parent
A = "a" * 40


def test_an_unreachable_hub_gives_one_warning_and_the_cached_model(tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny-llava"
    save_tiny_llava(repo / "snapshots" / A, seed=1)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(A)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RANK")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT="http://127.0.0.1:9", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "llava.cli", "ask", "--model", "org/tiny-llava", "--question", "q",
                        "--max-new-tokens", "1"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Retrying" not in p.stderr
    warnings = [ln for ln in p.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1, p.stderr
    assert warnings[0].startswith("warning: the Hugging Face hub (http://127.0.0.1:9) cannot be reached (")
    assert warnings[0].endswith("): reading org/tiny-llava from the local cache only (offline mode); set "
                                "HF_HUB_OFFLINE=1 to skip this check")
    assert p.stdout.startswith("answer:")


def test_offline_mode_set_means_no_check(monkeypatch):
    import llava.model_source as m
    from huggingface_hub import constants

    monkeypatch.setattr(m, "_HUB_CHECKED", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def boom(*a, **k):
        raise AssertionError("the hub was asked although offline mode is set")

    monkeypatch.setattr("huggingface_hub.utils.get_session", boom)
    assert m.offline_if_hub_unreachable("org/x") is False
