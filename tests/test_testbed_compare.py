"""The testbed comparison (testbed/compare.py; its results page under docs/results/) runs as documented,
on fewer questions: every registered method, the unpruned model, ConsensusDrop's two ablations and both controls
answer the same questions through `eval run-many`, and the report compares each with ConsensusDrop (paired
interval, McNemar, groups A / B of the downsample control at that budget)."""

import json
import subprocess
import sys
from pathlib import Path

from testbed import compare as tc

ROOT = Path(__file__).resolve().parent.parent


def test_the_grid_holds_every_method_once_per_budget_with_its_setting():
    cfgs = tc.configs((16, 8))
    assert cfgs[0] == ("none", None, {})
    names = {m for m, _, _ in cfgs}
    assert names == set(tc.methods()) | {"none", "consensusdrop"}
    assert ("downsample", None, {"stride": [2, 4]}) in cfgs and ("downsample", 16, {}) in cfgs
    assert ("clse", 144, {}) in cfgs and ("clse", 72, {}) in cfgs  # a 576-scale budget: x 9
    lines = tc.lines("out", 20, (16, 8))
    # one run folder per (budget, config): PyramidDrop's 192 runs under both budgets' folders
    assert sum("at16/pdrop_b192" in ln for ln in lines) == 1 and sum("at8/pdrop_b192" in ln for ln in lines) == 1
    assert len(lines) == len({ln.split()[0] for ln in lines}) == 1 + 2 * (len(tc.methods()) + 2)


def test_the_grid_and_its_report_run(tmp_path):
    out = tmp_path / "compare"
    r = subprocess.run([sys.executable, "-m", "testbed.compare", "run", "--n", "12", "--budgets", "8", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = sorted((out / "shapes" / "at8").iterdir())
    assert len(runs) == len(tc.methods()) + 2 and all((d / "units.jsonl").exists() for d in runs)
    r = subprocess.run([sys.executable, "-m", "testbed.compare", "report", "--out", str(out), "--budgets", "8",
                        "--format", "json"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.split("\n", 2)[2])  # after the "## 8 of 64 visual tokens" heading
    assert res["reference"] == "ConsensusDrop (fusion=borda) @8" and res["units"] == 12
    assert len(res["runs"]) == len(runs) + 1 and len(res["pairs"]) == len(runs)
    assert res["control"]["path"].endswith("downsample_bnone_stride-2x4")
    for p in res["pairs"]:
        m = p["metrics"]["Shapes"]
        assert m["n"] == 12 and m["mcnemar"]["a_only"] + m["mcnemar"]["b_only"] <= 12
        assert m["ci95"][0] <= m["diff"] <= m["ci95"][1]
