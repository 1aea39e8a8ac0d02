"""The trained testbed: the shipped weights, the committed accuracy table, and the harness path
(generator: test_testbed_data.py).

CI re-measures the unpruned model and two methods at a mid budget (16 of 64 tokens) on the full
400-question test set and compares them with the values committed in docs/results/testbed.json (written
by ``python -m testbed.evaluate sweep``). Tolerance: TOL_QUESTIONS answers (1 point) either way, for
BLAS / thread-count differences that flip a near-tie; a regression in the loader, the engine or a method
moves these numbers much further.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from testbed import evaluate as E
from testbed.model import WEIGHTS_DIR

ROOT = Path(__file__).resolve().parent.parent
COMMITTED_JSON = ROOT / "docs" / "results" / "testbed.json"
TOL_QUESTIONS = 4
#: (method, budget) re-measured by CI; the ConsensusDrop default and a text-agnostic baseline
CHECKED = [("none", None), ("consensusdrop", 16), ("fastervlm", 16)]
LEARNED = ("attribute", "existence", "spatial")


def committed(method, budget, options=None):
    rows = json.loads(COMMITTED_JSON.read_text())["results"]
    hits = [r for r in rows if r["method"] == method and r["budget"] == budget and r["options"] == (options or {})]
    assert len(hits) == 1, (method, budget, options)
    return hits[0]


@pytest.fixture(scope="module")
def testbed():
    torch.manual_seed(0)
    rt = E.load_runtime(threads=2)
    return rt, E._Batches(rt, E.questions(E.DEFAULT_N))


def test_shipped_weights_load_through_the_real_loader(testbed):
    rt, _ = testbed
    assert type(rt.model).__name__ == "LlavaForConditionalGeneration" and rt.family == "llava"
    assert rt.processor.tokens_per_crop == 64
    assert sum(f.stat().st_size for f in Path(WEIGHTS_DIR).glob("*.safetensors")) < 8e6
    assert rt.model.config.vision_feature_layer == -2 and rt.model.config.vision_feature_select_strategy == "default"


def test_committed_table_has_every_method_at_four_budgets():
    from llava import available_methods

    res = json.loads(COMMITTED_JSON.read_text())
    assert not res["errors"] and res["meta"]["n_questions"] == E.DEFAULT_N
    budgets: dict[str, set] = {}
    for r in res["results"]:
        budgets.setdefault(E.label(r["method"], r["options"]), set()).add(r["budget"])
    from llava.method import method_supports

    wanted = [m for m in available_methods() if not m.startswith("test_") and m not in ("none", "novisual")
              and method_supports(m, "llava")]  # the testbed's model is LLaVA's architecture
    for m in wanted:
        if m in E.ADAPTIVE:  # once at its own count, and at four budgets in its fixed mode
            assert budgets[m] == {None} and len(budgets[E.label(m, E.ADAPTIVE[m])]) >= 4, (m, budgets)
            continue
        assert len(budgets[m]) >= 4, (m, budgets.get(m))
    assert sum(1 for name in budgets if name.startswith("consensusdrop ")) >= 3  # its variants
    none, novis = committed("none", None), committed("novisual", None)
    # the no-visual-token control is near chance (answer priors: about 30% over the four types), and the
    # unpruned model is good (>= 75%) and far above it on three types; on counting it is weaker (right
    # mostly on counts of 0, docs/testbed.md) but still clearly above the control
    assert novis["accuracy"]["overall"] <= 35.0, novis["accuracy"]
    assert none["accuracy"]["overall"] >= novis["accuracy"]["overall"] + 40, (none["accuracy"], novis["accuracy"])
    for qtype in LEARNED:
        assert none["accuracy"][qtype] >= 75.0, (qtype, none["accuracy"])
        assert none["accuracy"][qtype] >= novis["accuracy"][qtype] + 30, (qtype, none["accuracy"], novis["accuracy"])
    assert none["accuracy"]["counting"] >= novis["accuracy"]["counting"] + 20, (none["accuracy"], novis["accuracy"])


@pytest.mark.parametrize("method,budget", CHECKED, ids=lambda v: str(v))
def test_accuracy_reproduces_committed_value(testbed, method, budget):
    rt, qs = testbed
    res = E.evaluate(rt, method, budget, qs=qs)
    ref = committed(method, budget)
    assert res["tokens"]["visual_entering_llm"] == (64 if budget is None else budget)
    tol = 100.0 * TOL_QUESTIONS / E.DEFAULT_N
    for key in ("overall", "attribute", "existence", "counting", "spatial"):
        n = res["n"][key]
        assert abs(res["accuracy"][key] - ref["accuracy"][key]) <= 100.0 * TOL_QUESTIONS / n + 1e-9, \
            (key, res["accuracy"], ref["accuracy"])
    assert abs(res["accuracy"]["overall"] - ref["accuracy"]["overall"]) <= tol + 1e-9


def test_shapes_script_through_the_harness_matches_the_evaluator(testbed, tmp_path):
    """`bash scripts/eval/shapes.sh consensusdrop 16` (harness: runner, scorer, results JSON) gives the
    evaluator's numbers on the same questions."""
    rt, _ = testbed
    env = {**os.environ, "OUT": str(tmp_path / "runs"), "LAUNCHER": "python", "PYTHON": sys.executable,
           "EXTRA_ARGS": "--no-wandb --batch-size 50 --bench-opt n=100"}
    subprocess.run(["bash", str(ROOT / "scripts/eval/shapes.sh"), "consensusdrop", "16"], env=env, check=True,
                   cwd=tmp_path)
    (results,) = (tmp_path / "runs" / "shapes").glob("*/results.json")
    res = json.loads(results.read_text())
    direct = E.evaluate(rt, "consensusdrop", 16, n=100)
    assert res["metrics"]["Shapes"] == direct["accuracy"]["overall"]
    assert res["metrics"]["Shapes-small"] == direct["accuracy"]["salience:small"]
    assert res["tokens"]["tok_in"] == 16.0


def test_docs_quote_the_committed_accuracy_of_the_shipped_model():
    """docs/testbed.md's table of the shipped model (unpruned and no-visual rows) states the values of
    the committed sweep JSON, so a retrained model cannot leave the documentation behind."""
    text = (ROOT / "docs" / "testbed.md").read_text()
    section = text[text.index("## Accuracy of the shipped model"):]
    cols = ("overall", "attribute", "existence", "counting", "spatial", "salience:small", "salience:large")
    for label, method in (("unpruned (64 tokens)", "none"), ("no visual tokens", "novisual")):
        line = next(s for s in section.splitlines() if s.startswith(f"| {label} |"))
        quoted = [float(c) for c in line.strip("|").split("|")[1:]]
        acc = committed(method, None)["accuracy"]
        assert quoted == [round(acc[c] + 1e-9, 1) for c in cols], (label, quoted)


def test_sweep_only_remeasures_the_named_methods_and_keeps_the_other_rows(testbed, tmp_path):
    """`python -m testbed.evaluate sweep --only M`: M's configs re-measured, every other row of the previous
    sweep kept as it was; a previous sweep of another test set is refused."""
    rt, _ = testbed
    none = {**E.evaluate(rt, "none", None, n=20), "marker": 1}
    stale = E.evaluate(rt, "random", 4, n=20)
    stale["accuracy"] = {k: -1.0 for k in stale["accuracy"]}
    prev = {"meta": {"date": "2000-01-01", "n_questions": 20, "seed": 0, "budgets": [4], "wall_s": 1.0},
            "results": [none, stale], "errors": [{"method": "random", "budget": 8, "options": {}, "error": "old"}]}
    (tmp_path / "testbed.json").write_text(json.dumps(prev))
    res = E.run_sweep(rt, budgets=(4,), n=20, seed=0, out_dir=tmp_path, verbose=False, only=["random"])
    assert res["results"][0] == prev["results"][0]  # kept verbatim, in the sweep's order
    (row,) = [r for r in res["results"] if r["method"] == "random"]
    assert row["accuracy"] == E.evaluate(rt, "random", 4, n=20)["accuracy"] and row["accuracy"]["overall"] >= 0
    assert res["errors"] == [] and res["meta"]["date"] == "2000-01-01"
    assert res["meta"]["partial"]["methods"] == ["random"]
    assert json.loads((tmp_path / "testbed.json").read_text())["results"] == res["results"]
    with pytest.raises(ValueError, match="n=20"):
        E.run_sweep(rt, budgets=(4,), n=40, seed=0, out_dir=tmp_path, verbose=False, only=["random"])
    with pytest.raises(ValueError, match="not in the sweep"):
        E.run_sweep(rt, budgets=(4,), n=20, seed=0, out_dir=tmp_path, verbose=False, only=["nope"])
