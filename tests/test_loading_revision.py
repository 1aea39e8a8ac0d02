"""llava.load(hub_id, revision=...) reads every file (config, weights, tokenizer, image processor) at that revision:
a hub cache built here in the hub's own layout (refs/main -> commit A, a second snapshot B with other weights
and a 2-layer tower), read offline in a fresh process (one for the loads and the `eval run` commands); tiny: /
shape: names refuse a revision."""

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


#: the child process: the model read at three revisions, then the `eval run` command lines given (eval.cli.main, what
#: `python -m eval` calls), each one's stderr after a marker line; the loads and the exit codes as JSON, last
CHILD = """
import json, sys
from llava.models import load
from eval.cli import main

B, runs = sys.argv[1], json.loads(sys.argv[2])
out = {"loads": {}, "codes": []}
for rev in (None, "main", B):
    rt = load("org/tiny-llava", revision=rev)
    w = rt.model.model.language_model.layers[0].self_attn.q_proj.weight
    out["loads"][str(rev)] = [float(w.sum()), rt.model.config.vision_config.num_hidden_layers, rt.info.get("revision")]
for i, argv in enumerate(runs):
    print(f"=== run {i}", file=sys.stderr, flush=True)
    out["codes"].append(main(argv))
sys.stderr.flush()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub cache built in the hub's own layout (refs/main -> commit A, a second snapshot B with other weights and a
    2-layer tower), POPE fixtures, and one fresh process reading it offline (HF_HUB_CACHE set before anything reads
    it): the model loaded at three revisions, then the three `eval run` of
    test_eval_run_reads_the_revision_and_keeps_it_apart. One interpreter start for both tests, not four (CI time)."""
    from eval.fixtures import write_fixtures

    tmp_path = tmp_path_factory.mktemp("revision")
    repo = tmp_path / "hub" / "models--org--tiny-llava"
    save_tiny_llava(repo / "snapshots" / A, seed=1)
    save_tiny_llava(repo / "snapshots" / B, seed=2)
    cfg = repo / "snapshots" / B / "config.json"
    c = json.loads(cfg.read_text())
    c["vision_config"]["num_hidden_layers"] = 2  # B's tower is shallower: its config must be B's too
    cfg.write_text(json.dumps(c))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(A)
    data = write_fixtures(tmp_path / "data", ["pope"])
    runs = tmp_path / "runs"
    base = ["run", "pope", "--model", "org/tiny-llava", "--max-new-tokens", "2", "--limit", "4", "--data-root",
            str(data), "--out", str(runs), "--no-wandb"]
    # main's, B's, then B's weights into main's answers (the folder the first run names: checked below)
    argvs = [base, base + ["--revision", B], base + ["--revision", B, "--run-name", "tiny-llava_none"]]
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-c", CHILD, B, json.dumps(argvs)], env=env, capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    stderr = p.stderr.split("=== run ")[1:]
    assert [e.split("\n", 1)[0] for e in stderr] == ["0", "1", "2"]
    return dict(loads=out["loads"], codes=out["codes"], stderr=[e.split("\n", 1)[1] for e in stderr], runs=runs)


def test_a_hub_revision_is_read_at_that_commit(hub):
    out = hub["loads"]
    assert out["None"][:2] == out["main"][:2] and out["None"][1] == 3  # the default is refs/main = A (a 3-layer tower)
    assert out[B][1] == 2 and out[B][0] != out["main"][0] and out[B][2] == B  # B's config and B's weights


@pytest.mark.parametrize("name", ["tiny:llava", "shape:llava-1.5-7b"])
def test_built_models_refuse_a_revision(name):
    with pytest.raises(ValueError, match="revisions apply to hub ids"):
        load(name, revision="main", device="meta")


def test_eval_run_reads_the_revision_and_keeps_it_apart(hub):
    """`eval run --revision` (REVISION= in scripts/eval): the model is read at that commit (the fingerprint records
    it), the run has its own folder, and a resume into a folder of another revision is refused."""
    runs, codes, stderr = hub["runs"], hub["codes"], hub["stderr"]
    assert codes[:2] == [0, 0], stderr[:2]
    folders = sorted(p.name for p in (runs / "pope").iterdir())
    assert folders == ["tiny-llava_none", f"tiny-llava_rev-{B[:12]}_none"], folders  # --limit: not in the name
    meta = {f: json.loads((runs / "pope" / f / "run_config.json").read_text()) for f in folders}
    main_meta, b_meta = meta[folders[0]], meta[folders[1]]
    assert main_meta["config"]["revision"] is None and b_meta["config"]["revision"] == B
    assert main_meta["fingerprint"]["model"]["revision"] == A and b_meta["fingerprint"]["model"]["revision"] == B
    # the third run: B's weights into main's answers (--run-name of main's folder): refused, nothing written
    assert codes[2] == 2 and "revision" in stderr[2], stderr[2][-1500:]


def test_a_run_without_a_recorded_commit_resumes_with_a_warning_another_commit_is_refused():
    from eval.fingerprint import compare

    old = {"model": {"id": "org/m", "revision": None}}
    assert compare(old, {"model": {"id": "org/m", "revision": A}}) == ([], [f"model commit not recorded in the existing "
                                                                          f"run; now {A}"])
    changes, _ = compare({"model": {"id": "org/m", "revision": A}}, {"model": {"id": "org/m", "revision": B}})
    assert changes and A in changes[0] and B in changes[0]
    changes, _ = compare(old, {"model": {"id": "org/other", "revision": A}})  # another id: refused
    assert changes
