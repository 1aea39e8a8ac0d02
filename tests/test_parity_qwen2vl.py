"""``python -m parity qwen --method v2drop vlmpruner``: the official Qwen2-VL code of V2Drop and VLM-Pruner (each
repository's own ``Qwen2VLForConditionalGeneration`` on its own copy of transformers 4.45.0.dev0) beside ours on the
24-layer tiny Qwen2-VL. The registry, the folder's family entry and our options always; opt-in (skipped without
``.venv-official-qwen2vl`` or the clones: ``bash scripts/official_env.sh qwen2vl``, ``bash scripts/official_clones.sh
v2drop vlmpruner``): two builds, fp32 and fp16, and planted changes on either side that must show."""

from __future__ import annotations

from pathlib import Path

import pytest

from parity import qwen
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

ROOT = Path(__file__).resolve().parents[1]
PY = ROOT / ".venv-official-qwen2vl" / "bin" / "python"
PY457 = ROOT / ".venv-official-qwen457" / "bin" / "python"
CLONES = {m: ROOT / ".official" / m for m in ("v2drop", "vlmpruner", "clse")}
ROOTS = {"v2drop": "Qwen2-VL/transformers/src", "vlmpruner": "Qwen2-VL/transformers/src",
         "clse": "Qwen2VL/transformers-4.57.6/src"}
needs_official = pytest.mark.skipif(
    not PY.exists() or not PY457.exists() or not all((CLONES[m] / r).is_dir() for m, r in ROOTS.items()),
    reason="no .venv-official-qwen2vl / -qwen457 (bash scripts/official_env.sh qwen2vl; ... qwen457) or no "
           ".official/v2drop / vlmpruner / clse (bash scripts/official_clones.sh v2drop vlmpruner clse)")
PYTHONS = {"qwen2vl": str(PY), "qwen457": str(PY457)}


# -- without the official environment -------------------------------------------------------------------------------
def test_the_qwen2_vl_rows_run_in_the_repositories_own_transformers(tmp_path):
    info = {"images": ["a", "b", "c", "d"], "method_images": ["e", "f"]}
    (tmp_path / "llava").mkdir()
    (tmp_path / "LLaVA1.5" / "llava").mkdir(parents=True)
    for r in ROOTS.values():
        (tmp_path / r).mkdir(parents=True, exist_ok=True)
    fam = qwen.FAMILIES["qwen2-vl"]
    assert fam["stock"] is False
    from parity import adapters

    # 4.45's M-RoPE positions come from generate() only; CLSE's copy of 4.57.6 computes them in its forward
    assert adapters.get("v2drop").QWEN_POSITIONS_FROM_GENERATE and adapters.get("vlmpruner").QWEN_POSITIONS_FROM_GENERATE
    assert not getattr(adapters.get("clse"), "QWEN_POSITIONS_FROM_GENERATE", False)
    for name, budgets in (("v2drop", [None]), ("vlmpruner", [0.889, 0.778, 0.667]), ("clse", [0.334, 0.223, 0.112])):
        assert name in qwen.qwen_methods() and qwen.family_of(name) == "qwen2-vl"
        specs = qwen.method_specs([name], info, official_path=str(tmp_path))  # CLSE's LLaVA rows: LLaVA1.5/
        assert [s["budget"] for s in specs[1:]] == budgets
        assert all(s["clone"] == str(tmp_path / ROOTS[name]) for s in specs[1:])
        assert [s["name"] for s in qwen.method_specs([name], info, official_path=str(tmp_path),
                                                     family="qwen3-vl")] == ["none"]


def test_a_fork_job_reads_its_familys_own_folder(tmp_path):
    """A QWEN_FORK job on Qwen2-VL reads the Qwen2-VL folder itself (written for 4.45); only IVC-Prune's fork on
    Qwen2.5-VL reads the 4.51 copy. (A Qwen2-VL copy under the Qwen2.5-VL copy's name broke a later IVC-Prune job in
    the same work folder.)"""
    src = tmp_path / "qwen2.5-vl-tiny"
    src.mkdir()
    (src / "config.json").write_text('{"text_config": {}}')
    base = {"images": ["a"], "model": str(src)}
    jobs = [qwen.official_job(dict(base, family="qwen2-vl", model="/x/qwen2-vl-tiny"), "py", "fp32",
                              [{"name": "none"}], 1, tmp_path, fork="/clone/src"),
            qwen.official_job(dict(base, family="qwen2.5-vl"), "py", "fp32", [{"name": "none"}], 1, tmp_path,
                              fork="/clone/src")]
    assert jobs[0].spec["model"] == "/x/qwen2-vl-tiny"
    assert jobs[1].spec["model"] == str(tmp_path / "qwen2.5-vl-tiny-4.51")
    assert [j.worker for j in jobs] == ["official_worker_qwen.py"] * 2


def test_ours_qwen_is_the_reference_mode_of_the_official_qwen2_vl_rules():
    from parity.adapters import clse, v2drop, vlmpruner

    # the environment per adapter: the 4.45 copies' and CLSE's 4.57.6 copy's
    assert (qwen.env_of("v2drop", "qwen2-vl"), qwen.env_of("clse", "qwen2-vl"), qwen.env_of("mmtok", "qwen2.5-vl")) == (
        "qwen2vl", "qwen457", "qwen")
    assert clse.ours_qwen(0.223, "fp32", None) == (
        "clse", None, {"retain_ratio": 0.223, "numerics": "official", "rule": "qwen2_vl", "layer_list": (1, 10, 19),
                       "scale_layers": False})
    assert v2drop.ours_qwen(None, "fp32", None) == (
        "v2drop", None, {"numerics": "official", "rule": "qwen2vl", "scale_layers": False})
    assert vlmpruner.ours_qwen(0.778, "fp16", None) == (
        "vlmpruner", None, {"reduction_ratio": 0.778, "numerics": "official", "layer": 2, "scale_layers": False})
    assert qwen.QWEN2VL_LAYERS >= max(v2drop.QWEN_LAYERS) + 1  # every official stage at its own layer


# -- against the official code (opt-in) -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    work = tmp_path_factory.mktemp("parity-qwen2vl")
    return work, qwen.build(work, seed=request.param, family="qwen2-vl")


@needs_official
@pytest.mark.parametrize("method,rows", [("v2drop", 6), ("vlmpruner", 18), ("clse", 18)])
def test_the_official_qwen2_vl_code_agrees(built, method, rows):
    """fp32 and fp16, six images each alone (15 to 143 merged tokens): the official model's own unpruned rows, the
    kept indices of every stage, the logits (bit-identical for V2Drop and VLM-Pruner, within 1e-5 for CLSE, whose
    copy is another release) and the greedy tokens."""
    work, info = built
    checks = qwen.run(info, PYTHONS, work, methods=(method,), official_path=str(CLONES[method]))
    mine = [c for c in checks if c.group == f"qwen-{method}"]
    assert len(mine) == 2 * rows and len(checks) == 20 + 2 * rows
    assert all(c.case.startswith("qwen2-vl fork ") for c in checks)
    assert all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]
    if method != "clse":
        assert all("logits max abs diff 0.00e+00" in c.detail for c in mine if " fp32 " in c.case)


@needs_official
def test_planted_changes_show(built, tmp_path, monkeypatch):
    """The official VLM-Pruner at threshold 0.5 (ours keeps 0.8) picks other tokens in some image; ours with V2Drop's
    LLaVA keep ratios (0.5 / 0.5 / 0 where the Qwen code keeps 0.25 / 0.05 / 0) keeps other counts."""
    work, info = built
    spec = dict(qwen.method_specs(["vlmpruner"], info, [0.778], str(CLONES["vlmpruner"]), family="qwen2-vl")[1])
    off = qwen.official(info, str(PY), "fp32", [{"name": "none"}, dict(spec, official_kwargs={"threshold": 0.5})], 4,
                        tmp_path / "thr", fork=spec["clone"])
    mine = qwen.ours(info, "fp32", [{"name": "none"}, spec], 4)
    runs = [(o, m) for o, m in zip(off["runs"], mine) if m["method"]["name"] == "vlmpruner"]
    for o, m in runs:
        o["method"] = m["method"]
    assert any(not qwen.compare_method(o, m, "planted", 1e-5, info["eos"], "fp32").ok for o, m in runs)
    from parity.adapters import v2drop

    monkeypatch.setattr(v2drop, "ours_qwen", lambda *a: ("v2drop", None, {"numerics": "official", "rule": "llava",
                                                                         "layers": (3, 16, 22), "scale_layers": False}))
    checks = qwen.run(info, PYTHONS, tmp_path / "v2", dtypes=("fp32",), methods=("v2drop",),
                      official_path=str(CLONES["v2drop"]))
    assert any(not c.ok and "kept indices DIFFER" in c.detail for c in checks if c.group == "qwen-v2drop")
