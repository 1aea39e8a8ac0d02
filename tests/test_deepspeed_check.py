"""bench.deepspeed_check on CPU (DeepSpeed's CPU accelerator): part A (plain vs DeepSpeed-wrapped tokens)
on one family with a few methods, part B (TTFT plain vs wrapped) on tiny:llava, part C (the real
`deepspeed` launcher through scripts/eval/pope.sh against LAUNCHER=python); the report's structure,
PASS verdicts and the markdown file."""

import json

import pytest

pytest.importorskip("deepspeed")

from bench import deepspeed_check as D  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("dsc")
    args = D.parse_args(["--device", "cpu", "--families", "llava", "--methods", "fastv", "visionzip", "random",
                         "--ttft-model", "tiny:llava", "--ttft-methods", "none", "fastv", "--ttft-budget", "8",
                         "--ttft-runs", "3", "--ttft-warmup", "1", "--launcher-new-tokens", "4", "--out", str(out)])
    cfg = D.config_from_args(args)
    assert cfg.dtypes == ["float32"]
    return D.run(cfg, "test", log=lambda s: None)


def test_report_files_and_summary(report):
    assert report["summary"]["pass"], report["summary"]
    assert report["summary"]["checks"] == {"A equivalence": "PASS", "A counts": "4 PASS, 0 FAIL, 0 n/a",
                                           "B TTFT": "PASS", "C launcher": "PASS"}
    js, md = report["files"]
    assert js.endswith(".json") and "deepspeed-check-cpu-" in js
    data = json.loads(open(js).read())
    assert data["tool"] == "bench.deepspeed_check" and data["deepspeed_version"]
    text = open(md).read()
    assert "# DeepSpeed check: cpu" in text and "**PASS**" in text
    for part in ("## A.", "## B.", "## C."):
        assert part in text


def test_equivalence_tokens_equal(report):
    eq = report["equivalence"]
    assert [r["method"] for r in eq["results"]] == ["none", "fastv", "visionzip", "random"]
    for r in eq["results"]:
        assert r["verdict"] == "PASS" and r["tokens_equal"] and r["family"] == "llava" and r["dtype"] == "float32"
        assert r["first_logit_delta"] == 0.0 and len(r["tokens"]) == 3
    (m,) = eq["models"]
    assert m["weights_equal"] and m["deepspeed"] == {"version": report["deepspeed_version"], "tp_size": 1,
                                                     "kernel_inject": False}


def test_ttft_plain_and_deepspeed(report):
    t = report["ttft"]
    assert [r["method"] for r in t["table"]] == ["none", "fastv"]
    assert len(t["plain"]) == len(t["deepspeed"]) == 2 and t["deepspeed_info"]["tp_size"] == 1
    for r in t["table"]:
        assert r["plain_ms"] > 0 and r["deepspeed_ms"] > 0 and r["ratio"] > 0 and not r["error"]


def test_real_launcher_answers_equal(report):
    la = report["launcher"]
    assert la["verdict"] == "PASS" and la["answers_equal"] and la["n_answers"] > 0
    py, ds = la["runs"]["python"], la["runs"]["deepspeed"]
    assert py["rc"] == ds["rc"] == 0 and py["seconds"] > 0 and ds["seconds"] > 0
    assert ds["deepspeed"]["tp_size"] == 1 and not py["deepspeed"]
    assert ds["resolved_launcher"] == "deepspeed" and py["device"] == ds["device"] == "cpu"
    assert ds["deepspeed_cmd"] and "deepspeed.launcher.launch" in ds["deepspeed_cmd"][0]


def test_n_a_for_an_unsupported_family():
    r = D.equivalence_pair(None, None, "vscan", "qwen2.5-vl", D.DSCheckConfig(device="cpu"), "cpu")
    assert r["verdict"] == "n/a"


def test_without_cuda_it_says_so_and_exits_0(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(D.torch.cuda, "is_available", lambda: False)
    assert D.main(["--out", str(tmp_path)]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_time_limit_reports_every_part_as_not_run(tmp_path, capsys):
    """A limit already spent: nothing starts, the report lists A and B as not run, PARTIAL, exit 3."""
    rc = D.main(["--device", "cpu", "--families", "llava", "--methods", "fastv", "--ttft-model", "tiny:llava",
                 "--ttft-methods", "none", "fastv", "--time-limit", "0.01", "--time-reserve", "0", "--out", str(tmp_path)])
    assert rc == 3 and "deepspeed_check: PARTIAL (stopped: time limit)" in capsys.readouterr().out
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert data["stopped"] == "time limit" and data["summary"]["verdict"] == "PARTIAL" and not data["summary"]["pass"]
    assert [(r["method"], r["verdict"], r["not_run"]) for r in data["equivalence"]["results"]] == \
        [("none", "not run", "time limit"), ("fastv", "not run", "time limit")]
    assert [r["not_run"] for r in data["ttft"]["table"]] == ["time limit"] * 2
    assert data["launcher"]["verdict"] == "not run (time limit)"
    md = next(tmp_path.glob("*.md")).read_text()
    assert "**PARTIAL**" in md and "| fastv | not run (time limit) |" in md


def test_sigterm_writes_the_partial_report(tmp_path):
    """SIGTERM (what `timeout` sends) after two part-A cases: the report holds them, the rest not run."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from bench import gpu_check as G

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, G.TEST_SLEEP_ENV: "0.5", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.Popen([sys.executable, "-m", "bench.deepspeed_check", "--device", "cpu", "--families", "llava",
                          "--methods", "fastv", "visionzip", "random", "--ttft-model", "tiny:llava",
                          "--out", str(tmp_path)], cwd=root, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    lines, t0 = [], time.time()
    while sum(line.startswith("  A llava") for line in lines) < 2:
        line = p.stdout.readline()
        assert line and time.time() - t0 < 120, "".join(lines)
        lines.append(line)
    p.send_signal(signal.SIGTERM)
    out = "".join(lines) + p.communicate(timeout=60)[0]
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert data["stopped"] == "interrupted by SIGTERM", out
    assert p.returncode == (3 if data["summary"]["verdict"] == "PARTIAL" else 1)
    res = data["equivalence"]["results"]
    assert [r["method"] for r in res] == ["none", "fastv", "visionzip", "random"]
    done = [r for r in res if r["verdict"] != "not run"]
    assert len(done) >= 2 and all(r["verdict"] == "PASS" and r["tokens_equal"] for r in done)
    assert all(r["not_run"] == "interrupted by SIGTERM" for r in res[len(done):]) and len(done) < 4
    assert data["ttft"]["not_run"] == "interrupted by SIGTERM" and data["launcher"]["verdict"].startswith("not run")
    assert "not run (interrupted by SIGTERM)" in next(tmp_path.glob("*.md")).read_text()
