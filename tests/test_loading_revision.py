"""llava.load(hub_id, revision=...) reads every file (config, weights, tokenizer, image processor) at that revision:
a hub cache built here in the hub's own layout (refs/main -> commit A, a second snapshot B with other weights
and a 2-layer tower), read offline in a fresh process; tiny: / shape: names refuse a revision."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from integrations.vllm.tiny import save_tiny_llava
from llava.models import load

ROOT = Path(__file__).resolve().parent.parent
A, B = "a" * 40, "b" * 40


def test_a_hub_revision_is_read_at_that_commit(tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny-llava"
    save_tiny_llava(repo / "snapshots" / A, seed=1)
    save_tiny_llava(repo / "snapshots" / B, seed=2)
    cfg = repo / "snapshots" / B / "config.json"
    c = json.loads(cfg.read_text())
    c["vision_config"]["num_hidden_layers"] = 2  # B's tower is shallower: its config must be B's too
    cfg.write_text(json.dumps(c))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(A)
    code = (
        "import json, torch; from llava.models import load\n"
        "out = {}\n"
        "for rev in (None, 'main', '" + B + "'):\n"
        "    rt = load('org/tiny-llava', revision=rev)\n"
        "    w = rt.model.model.language_model.layers[0].self_attn.q_proj.weight\n"
        "    out[str(rev)] = [float(w.sum()), rt.model.config.vision_config.num_hidden_layers, rt.info.get('revision')]\n"
        "print(json.dumps(out))\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["None"][:2] == out["main"][:2] and out["None"][1] == 3  # the default is refs/main = A (a 3-layer tower)
    assert out[B][1] == 2 and out[B][0] != out["main"][0] and out[B][2] == B  # B's config and B's weights


@pytest.mark.parametrize("name", ["tiny:llava", "shape:llava-1.5-7b"])
def test_built_models_refuse_a_revision(name):
    with pytest.raises(ValueError, match="revisions apply to hub ids"):
        load(name, revision="main", device="meta")


def test_eval_run_reads_the_revision_and_keeps_it_apart(tmp_path):
    """`eval run --revision` (REVISION= in scripts/eval): the model is read at that commit (the fingerprint records
    it), the run has its own folder, and a resume into a folder of another revision is refused."""
    from eval.fixtures import write_fixtures

    repo = tmp_path / "hub" / "models--org--tiny-llava"
    for rev, seed in ((A, 1), (B, 2)):
        save_tiny_llava(repo / "snapshots" / rev, seed=seed)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(A)
    data = write_fixtures(tmp_path / "data", ["pope"])
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}

    def run(*extra):
        cmd = [sys.executable, "-m", "eval", "run", "pope", "--model", "org/tiny-llava", "--max-new-tokens", "2",
               "--limit", "4", "--data-root", str(data), "--out", str(tmp_path / "runs"), "--no-wandb", *extra]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)

    assert run().returncode == 0 and run("--revision", B).returncode == 0
    folders = sorted(p.name for p in (tmp_path / "runs" / "pope").iterdir())
    assert folders == ["tiny-llava_none", f"tiny-llava_rev-{B[:12]}_none"], folders  # --limit: not in the name
    meta = {f: json.loads((tmp_path / "runs" / "pope" / f / "run_config.json").read_text()) for f in folders}
    main_meta, b_meta = meta[folders[0]], meta[folders[1]]
    assert main_meta["config"]["revision"] is None and b_meta["config"]["revision"] == B
    assert main_meta["fingerprint"]["model"]["revision"] == A and b_meta["fingerprint"]["model"]["revision"] == B
    p = run("--revision", B, "--run-name", folders[0])  # B's weights into main's answers: refused, nothing written
    assert p.returncode == 2 and "revision" in p.stderr, p.stderr[-1500:]


def test_a_run_without_a_recorded_commit_resumes_with_a_warning_another_commit_is_refused():
    from eval.fingerprint import compare

    old = {"model": {"id": "org/m", "revision": None}}
    assert compare(old, {"model": {"id": "org/m", "revision": A}}) == ([], [f"model commit not recorded in the existing "
                                                                          f"run; now {A}"])
    changes, _ = compare({"model": {"id": "org/m", "revision": A}}, {"model": {"id": "org/m", "revision": B}})
    assert changes and A in changes[0] and B in changes[0]
    changes, _ = compare(old, {"model": {"id": "org/other", "revision": A}})  # another id: refused
    assert changes
