"""bench.run_throughput (issue 79): a GQA-layout data root of real-size JPEGs, eval run on it with and without loader
workers, the device's pace beside it, one report."""

import json
from pathlib import Path

import pytest

from bench.run_throughput import GQA_TESTDEV, _rate, main, make_data


def test_the_data_root_is_gqa_as_eval_reads_it(tmp_path):
    from PIL import Image

    from eval.benchmarks import get_benchmark
    from eval.datacheck import check_benchmark

    root = make_data(tmp_path, 5, (64, 48), per_image=2)
    bench = get_benchmark("gqa", str(root))
    assert check_benchmark(bench, deep=True).ok_inference
    qs = bench.load()
    assert len(qs) == 5 and [Path(q.image).name for q in qs] == ["r000000.jpg"] * 2 + ["r000001.jpg"] * 2 + ["r000002.jpg"]
    with Image.open(qs[0].image) as im:
        assert im.size == (64, 48) and im.format == "JPEG"
    stamp = (root / "gqa" / "made.json").stat().st_mtime_ns
    make_data(tmp_path, 5, (64, 48), per_image=2)  # the same data: kept
    assert (root / "gqa" / "made.json").stat().st_mtime_ns == stamp


def test_the_rate_the_device_allows():
    # 20 ms to the first token, 5 ms each of the 2 more: 30 ms a question
    assert _rate({"ttft_ms": 20.0, "tpot_ms": 5.0}, 3.0) == pytest.approx(1000 / 30)
    assert _rate({"ttft_ms": 20.0, "tpot_ms": 5.0}, 1.0) == pytest.approx(50.0)
    assert _rate(None, 3.0) is None and _rate({"ttft_ms": 1.0, "tpot_ms": 1.0}, None) is None


def test_a_small_run_reports_both_loader_settings(tmp_path):
    """tiny:llava, 6 questions, in the loop and with 1 worker: both runs answer all, the report has their rows,
    the device's pace and the GQA extrapolation."""
    out = tmp_path / "rt"
    assert main(["--model", "tiny:llava", "--methods", "none", "--questions", "6", "--image-size", "160x120",
                 "--loader-workers", "0,1", "--out", str(out)]) == 0
    rep = json.loads((out / "run_throughput.json").read_text())
    assert [r["loader_workers"] for r in rep["runs"]] == [0, 1]
    for r in rep["runs"]:
        t = r["throughput"]
        assert r["exit"] == 0 and t["questions"] == 6 and t["loader_workers"] == [r["loader_workers"]]
        assert r["new_tokens_mean"] == 3  # tiny:llava never ends an answer: the cap
        assert t["prepare_s_per_question"] > 0
    # in the loop, the device waits for each question's whole preparation
    assert rep["runs"][0]["throughput"]["host_wait_s"] >= rep["runs"][0]["throughput"]["prepare_s"]
    pace = rep["pace"]["none/eager"]
    assert pace["ttft_ms"] > 0 and pace["tpot_ms"] > 0 and rep["host"]["total_ms"] > 0
    md = (out / "run_throughput.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| none | eager |")]
    assert len(rows) == 2 and rows[0].startswith("| none | eager | 0 |") and rows[1].startswith("| none | eager | 1 |")
    t = rep["runs"][1]["throughput"]
    minutes = (GQA_TESTDEV / t["questions_per_s_without_compile"] + t["compile_s"]) / 60
    assert (f"{minutes:.1f} min |" if minutes * 60 >= 60 else f"{minutes * 60:.0f} s |") in rows[1]
