"""bench.efficiency_official on tiny:llava (CPU, fp32): the files, exact ranking agreement between the
official-style eager computation and ours, positive timings, the environment, the % of TTFT."""

import json
import math

import pytest

from bench.efficiency_official import main, ttft_lookup


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("official")
    eff = out / "efficiency.json"  # an bench.efficiency report of the same model: unpruned TTFT b1 and b2
    eff.write_text(json.dumps({"environment": {"model": "tiny:llava"}, "results": [
        {"method": "fastv", "ttft": {"median": 9.0}},
        {"method": "none", "ttft": {"median": 0.5}, "batched": {"2": {"ttft": {"median": 0.8}}}}]}))
    assert main(["--model", "tiny:llava", "--device", "cpu", "--dtype", "float32", "--batch", "1", "2",
                 "--n", "2", "--warmup", "1", "--threads", "1", "--ttft-json", str(eff), "--out", str(out)]) == 0
    return out, json.loads((out / "official.json").read_text())


def _times(rec):
    return rec["time_s"]


def test_files_and_environment(report):
    out, rep = report
    md = (out / "official.md").read_text()
    assert "FastV" in md and "Vision tower" in md and "| 2 |" in md
    env = rep["environment"]
    for key in ("device", "device_name", "torch", "transformers", "date", "dtype"):
        assert env[key]
    assert env["device"] == "cpu" and env["dtype"] == "torch.float32"


def test_rankings_agree_exactly_in_fp32(report):
    _, rep = report
    (m,) = rep["models"]
    assert [r["batch"] for r in m["fastv"]] == [1, 2] and [r["batch"] for r in m["tower"]] == [1, 2]
    for r in m["fastv"]:
        assert r["measured_layer"] == r["layer_K"] - 1 == 0  # tiny: 4 layers, K = 2 scaled to 1
        assert 0 < r["ranking"]["k"] < r["visual_tokens"] == 16
        assert r["ranking"]["exact"] and r["ranking"]["overlap_min"] == 1.0
    for r in m["tower"]:
        assert r["ranking"]["exact"] and r["ranking"]["cls_attn_max_abs_diff"] < 1e-5
        assert r["units"] == r["batch"]


def test_timings_positive_and_ttft_share(report):
    _, rep = report
    (m,) = rep["models"]
    for r in m["fastv"]:
        for key in ("sdpa_layer", "ours", "official"):
            t = _times(r[key])
            assert t["n"] == 2 and t["median"] > 0 and t["p90"] >= t["median"] > 0
        assert math.isfinite(r["diff_s"])
        assert r["unpruned_ttft_s"] == {1: 0.5, 2: 0.8}[r["batch"]]
        assert r["diff_pct_of_ttft"] == pytest.approx(100 * r["diff_s"] / r["unpruned_ttft_s"])
        assert r["attention_map_bytes"] == r["batch"] * r["heads"] * r["seq_len"] ** 2 * 4
    for r in m["tower"]:
        for key in ("stock_sdpa", "ours", "official"):
            t = _times(r[key])
            assert t["median"] > 0 and r[key]["peak_extra_bytes"] is None  # CPU: no peak memory


def test_ttft_lookup_skips_other_models(tmp_path):
    p = tmp_path / "e.json"
    p.write_text(json.dumps({"environment": {"model": "shape:x"},
                             "results": [{"method": "none", "ttft": {"median": 1}}]}))
    assert ttft_lookup([p], "tiny:llava") == {}
    assert ttft_lookup([p], "shape:x")["1"]["ttft_s"] == 1
