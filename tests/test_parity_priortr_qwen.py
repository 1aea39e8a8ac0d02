"""``python -m parity qwen --method priortr``: PriorTR's official Qwen3-VL code (``VTRQwen3VLForConditionalGeneration``
and the repository's own ``qwen3_vl`` model files, transformers 5.1.0) beside ours in its Qwen reference mode. The
registry, the specs, the replay and the check always; opt-in (skipped without ``.venv-official-qwen3`` or the clone
``.official/priortr``: ``bash scripts/official_env.sh qwen3``, ``bash scripts/official_clones.sh priortr``): two
builds, fp32 and fp16, and planted changes on either side that must show."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from parity import qwen
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

ROOT = Path(__file__).resolve().parents[1]
QWEN3_PY = ROOT / ".venv-official-qwen3" / "bin" / "python"
CLONE = ROOT / ".official" / "priortr"
needs_official = pytest.mark.skipif(
    not QWEN3_PY.exists() or not (CLONE / "image" / "Qwen3-VL" / "qwen3").is_dir(),
    reason="no .venv-official-qwen3 (bash scripts/official_env.sh qwen3) or no .official/priortr "
           "(bash scripts/official_clones.sh priortr)")


def _layout(tmp_path: Path) -> Path:
    """A clone's layout: the LLaVA tree the llava15 rows read and the Qwen3-VL and Qwen2-VL folders the qwen rows read."""
    (tmp_path / "image" / "LLaVA" / "llava").mkdir(parents=True)
    (tmp_path / "image" / "Qwen3-VL" / "qwen3").mkdir(parents=True)
    (tmp_path / "image" / "Qwen2-VL" / "visual_token_pruning").mkdir(parents=True)
    return tmp_path


# -- without the official environment -------------------------------------------------------------------------------
def test_priortr_is_a_qwen3_vl_row_with_the_repository_model_files(tmp_path):
    info = {"images": ["a", "b", "c", "d"], "method_images": ["e", "f"]}
    clone = _layout(tmp_path)
    assert "priortr" in qwen.qwen_methods() and qwen.family_of("priortr") == "qwen3-vl"
    assert qwen.family_of("mmtok") == "qwen2.5-vl"
    specs = qwen.method_specs(["priortr"], info, official_path=str(clone))
    assert [s["name"] for s in specs] == ["none"] + ["priortr"] * 3
    assert [s["budget"] for s in specs[1:]] == [0.1111, 0.2222, 0.3333]  # the official Qwen3-VL keep ratios
    assert all(s["clone"] == str(clone / "image" / "Qwen3-VL") for s in specs[1:])  # its QWEN_ROOT, not image/LLaVA
    assert all(s["batches"] == [[i] for i in range(6)] for s in specs[1:])
    # a family's job holds its own methods only
    assert [s["name"] for s in qwen.method_specs(["priortr"], info, official_path=str(clone),
                                                 family="qwen2.5-vl")] == ["none"]
    assert qwen.vendored("priortr", specs[1]["clone"]) == {
        "module": "transformers.models.qwen3_vl", "path": str(clone / "image" / "Qwen3-VL" / "qwen3")}
    assert qwen.vendored("mmtok", "x") is None


def test_priortr_is_a_qwen2_vl_row_too_on_its_qwen2_vl_folder(tmp_path):
    """The repository's Qwen2-VL code: its own folder first on the path, nothing vendored, the stock transformers
    4.57.6 environment; the spec says which folder the official side switches on."""
    info = {"images": ["a", "b", "c", "d"], "method_images": ["e", "f"]}
    clone = _layout(tmp_path)
    assert qwen.families_of("priortr") == ("qwen3-vl", "qwen2-vl") and qwen.families_of("mmtok") == ("qwen2.5-vl",)
    specs = qwen.method_specs(["priortr"], info, official_path=str(clone), family="qwen2-vl")
    assert [s["name"] for s in specs] == ["none"] + ["priortr"] * 3
    assert all(s["clone"] == str(clone / "image" / "Qwen2-VL") and s["family"] == "qwen2-vl" for s in specs[1:])
    assert qwen.vendored("priortr", specs[1]["clone"], "qwen2-vl") is None
    assert qwen.env_of("priortr", "qwen2-vl") == "qwen457" and qwen.env_of("priortr", "qwen3-vl") == "qwen3"
    assert qwen.env_of("v2drop", "qwen2-vl") == "qwen2vl"  # the others' settings unchanged
    assert qwen.method_specs(["priortr"], info, official_path=str(clone), family="qwen3-vl")[1]["family"] == "qwen3-vl"


def test_ours_qwen_is_the_reference_mode():
    from parity.adapters import priortr as adapter

    assert adapter.ours_qwen(0.2222, "fp16", None) == (
        "priortr", None, {"keep_ratio": 0.2222, "numerics": "official", "caches": "pruned", "layer": 3,
                          "scale_layers": False})


def _rows():
    """Official rows (H=1, T=3, S=6) from img_end on: columns 1..4 the image; the null row, a question row, the last
    row. Worked as in tests/test_priortr.py: without the last row S ranks the image 0, 1, 2, 3; with it 0, 1, 3, 2."""
    r = torch.zeros(1, 3, 6)
    r[0, :, 1:5] = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.2, 0.6]])
    return r


def _entry(kept, rows=None):
    rows = _rows() if rows is None else rows
    return {"kept": torch.tensor(kept), "n": 4, "rows": rows, "visual": torch.arange(1, 5), "dtype": "float32",
            "attention": rows[:, :, 1:5]}


def _run(entry, tokens=((1, 2),)):
    return {"method": {"name": "priortr", "budget": 0.5}, "batch": [4], "input_ids": torch.tensor([[5, 6]]),
            "kept": [entry], "tokens": [list(t) for t in tokens], "logits": torch.zeros(1, 3, 4)}


def test_the_replay_is_the_official_qwen_rule_on_the_recorded_rows():
    """S (without the last row) = [.25 ln 2.5, .25 ln 1.25, .25 ln(5/6), .25 ln .625]: keeping 3 -> [0, 1, 2]; the
    LLaVA rule (the last row in) would keep [0, 1, 3]. compare_method passes when the kept indices, tokens and the
    replay agree, and names each that does not."""
    from parity.adapters.priortr import qwen_replay

    assert math.log(2.5) > math.log(1.25) > 0 > math.log(5 / 6) > math.log(0.625)
    assert qwen_replay(_entry([0, 1, 2])).tolist() == [0, 1, 2]
    def check(official, ours, tokens=((1, 2),)):
        return qwen.compare_method(_run(official), _run(ours, tokens), "c", 1e-5, None, "fp32")

    ok = check(_entry([0, 1, 2]), _entry([0, 1, 2]))
    assert ok.ok and ok.detail.endswith("; replay on the official rows: identical picks")
    assert "layer K-1 attention 0.00e+00" in ok.detail
    llava_rule = check(_entry([0, 1, 3]), _entry([0, 1, 3]))
    assert not llava_rule.ok and llava_rule.detail.endswith("; replay differs: ours is wrong")
    # issue 71's PriorTR row: ours keeps another token, our selection on the official rows gives the official picks
    bad_kept = check(_entry([0, 1, 2]), _entry([0, 1, 3]))
    assert not bad_kept.ok and "kept indices DIFFER" in bad_kept.detail
    assert bad_kept.detail.endswith("; replay on the official rows: identical picks (the environments' kernels differ)")
    bad_tok = check(_entry([0, 1, 2]), _entry([0, 1, 2]), tokens=((1, 3),))
    assert not bad_tok.ok and "greedy tokens DIFFER (image 4 step 1: top logits not recorded)" in bad_tok.detail


def test_the_worker_installs_a_model_folder_under_transformers_name(tmp_path):
    """official_worker_qwen's ``_install_vendored``: a folder with relative imports into transformers imported as a
    transformers model package (what PriorTR's ``setup.py develop`` does with a symlink)."""
    import importlib.util
    import sys

    pkg = tmp_path / "fake_vendored"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from ...utils import logging as _logging\nORIGIN = 'vendored'\n")
    (pkg / "inner.py").write_text("from . import ORIGIN\nVALUE = ORIGIN + '-inner'\n")
    spec = importlib.util.spec_from_file_location("_worker_qwen", ROOT / "parity" / "official_worker_qwen.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    import transformers  # noqa: F401

    name = "transformers.models.fake_vendored"
    try:
        worker._install_vendored(name, str(pkg))
        from transformers.models.fake_vendored import inner

        assert inner.VALUE == "vendored-inner" and Path(inner.__file__).parent == pkg
    finally:
        for k in [k for k in sys.modules if k.startswith(name)]:
            del sys.modules[k]


# -- against the official code (opt-in) -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    work = tmp_path_factory.mktemp("parity-priortr-qwen")
    return work, qwen.build(work, seed=request.param, family="qwen3-vl")


@needs_official
def test_priortr_on_qwen3_vl_agrees_with_the_official_code(built):
    """fp32 and fp16, the official keep ratios 0.1111 / 0.2222 / 0.3333, six images each alone (90 to 143 merged
    tokens): every method row's kept indices, greedy tokens and replay identical, fp32 logits within 1e-5; every
    fp32 prep / unpruned row identical. The fp16 unpruned rows: prep identical, logits within 1e-3 (two torch and
    transformers releases' fp16 kernels; their greedy tokens may part at a one-ulp tie, docs/parity.md)."""
    work, info = built
    checks = qwen.run(info, str(QWEN3_PY), work, methods=("priortr",), official_path=str(CLONE))
    rows = [c for c in checks if c.group == "qwen-priortr"]
    assert len(checks) == 56 and len(rows) == 36
    assert all(c.case.startswith("qwen3-vl ") for c in checks)
    must = [c for c in checks if c.group != "unpruned" or " fp32 " in c.case]
    assert all(c.ok for c in must), [(c.case, c.detail) for c in must if not c.ok]
    for c in checks:
        if c.group == "unpruned" and " fp16 " in c.case:
            assert float(c.detail.split("logits max abs diff ")[1].split()[0].rstrip(",")) < 1e-3, c.detail


def _planted(info, work, monkeypatch=None, official_kwargs=None, images=(0, 1, 2, 3, 4, 5), family="qwen3-vl",
             python=None):
    spec = dict(qwen.method_specs(["priortr"], info, [0.2222], str(CLONE), family=family)[1])
    spec["batches"] = [[i] for i in images]
    off_spec = dict(spec, official_kwargs=official_kwargs or {})
    off = qwen.official(info, str(python or QWEN3_PY), "fp32", [off_spec], 4, work)
    mine = qwen.ours(info, "fp32", [spec], 4)
    for o in off["runs"]:  # the official side's spec carries the planted kwargs; ours does not read them
        o["method"] = spec
    return [qwen.compare_method(o, m, "planted", 1e-5, info["eos"], "fp32") for o, m in zip(off["runs"], mine)]


@needs_official
def test_planted_changes_show(built, tmp_path, monkeypatch):
    """The comparison reads what each side selects: the official side on its last-row rule (``query_aggregation=
    "last"``) parts from ours in some image; ours with the paper's causal rows (``score_mask="causal"``, where the
    official look-ahead reads unmasked rows under SDPA) parts from the official picks in some image."""
    work, info = built
    last = _planted(info, tmp_path / "last", official_kwargs={"query_aggregation": "last"})
    assert any(not c.ok and "kept indices DIFFER" in c.detail for c in last)
    from parity.adapters import priortr as adapter

    inner = adapter.ours_qwen
    monkeypatch.setattr(adapter, "ours_qwen", lambda *a: (lambda n, b, o: (n, b, {**o, "score_mask": "causal"}))(
        *inner(*a)))
    causal = _planted(info, tmp_path / "causal")
    assert any(not c.ok and "kept indices DIFFER" in c.detail for c in causal)


@needs_official
def test_seed_11_names_its_tie_and_its_kernel_difference(tmp_path):
    """A build no results file uses (seed 11) shows the two differences the official code's numerics decide, and the
    report says which each is by itself: the unpruned fp16 image 3 (alone and in the batch of four) parts at step 0,
    official 98 and ours 101, both sides' top two logits 0.329834 / 0.329590, one fp16 step apart: "tie within one
    ulp"; PriorTR at r = 0.2222 on image 1 (fp16) keeps another token, the environments' layer-2 attention rows
    ~2e-4 apart, and our selection on the official side's own rows gives its picks: the replay says so. Every other
    check, fp32 all of them, is identical."""
    info = qwen.build(tmp_path, seed=11, family="qwen3-vl")
    checks = qwen.run(info, str(QWEN3_PY), tmp_path, methods=("priortr",), official_path=str(CLONE))
    differ = {c.case: c.detail for c in checks if not c.ok}
    assert sorted(differ) == ["qwen3-vl fp16 none batch [0, 1, 2, 3]", "qwen3-vl fp16 none batch [3]",
                              "qwen3-vl fp16 priortr r=0.2222 batch [1]"], differ
    for case in ("qwen3-vl fp16 none batch [3]", "qwen3-vl fp16 none batch [0, 1, 2, 3]"):
        assert ("image 3 step 0: official 98 (0.329834), 101 (0.32959); ours 101 (0.329834), 98 (0.32959): "
                "tie within one ulp") in differ[case], differ[case]
    prior = differ["qwen3-vl fp16 priortr r=0.2222 batch [1]"]
    assert "kept indices DIFFER" in prior
    assert "replay on the official rows: identical picks (the environments' kernels differ)" in prior
    assert 1e-4 < float(prior.split("layer K-1 attention ")[1].split(";")[0]) < 1e-3


QWEN457_PY = ROOT / ".venv-official-qwen457" / "bin" / "python"
needs_qwen2vl = pytest.mark.skipif(
    not QWEN457_PY.exists() or not (CLONE / "image" / "Qwen2-VL" / "visual_token_pruning").is_dir(),
    reason="no .venv-official-qwen457 (bash scripts/official_env.sh qwen457) or no .official/priortr "
           "(bash scripts/official_clones.sh priortr)")


@needs_qwen2vl
def test_priortr_on_qwen2_vl_agrees_with_the_official_code(tmp_path):
    """PriorTR's Qwen2-VL code on the stock transformers 4.57.6 beside ours, one build (the tiny Qwen2-VL of 24
    layers, K = 3): the unpruned rows and every method row identical in fp32 and fp16 (kept indices, logits, tokens,
    the replay); with the official side told to score on the last row only (``query_aggregation="last"``), the kept
    indices part in some image: the comparison reads what the official code selects."""
    info = qwen.build(tmp_path, seed=0, family="qwen2-vl")
    pythons = {"qwen457": str(QWEN457_PY)}
    checks = qwen.run(info, pythons, tmp_path, methods=("priortr",), official_path=str(CLONE))
    assert len(checks) == 56 and len([c for c in checks if c.group == "qwen-priortr"]) == 36
    assert all(c.case.startswith("qwen2-vl ") for c in checks)
    assert all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]
    rows = _planted(info, tmp_path / "last", official_kwargs={"query_aggregation": "last"}, family="qwen2-vl",
                    python=QWEN457_PY)
    assert any(not c.ok and "kept indices DIFFER" in c.detail for c in rows)
