"""The GPU check (eval.gpu_check, scripts/bench/gpu_check.sh) through its real code path on a CPU:
fp32, a few methods, two families. Asserts on the unpruned model and on the report's structure, never
on a method's verdict (the engine's batch / decode fixes are not assumed)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from eval import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def _report(out: Path) -> tuple[dict, str]:
    js = sorted(out.glob("gpu-check-cpu-*.json"))
    md = sorted(out.glob("gpu-check-cpu-*.md"))
    assert len(js) == 1 and len(md) == 1 and js[0].stem == md[0].stem
    return json.loads(js[0].read_text()), md[0].read_text()


def test_cpu_smoke_run_records_every_check(tmp_path, capsys):
    rc = gpu_check.main(["--device", "cpu", "--no-ttft", "--families", "llava", "llava-next", "--methods", "none",
                         "fastv", "random", "--new-tokens", "4", "--out", str(tmp_path)])
    rep, md = _report(tmp_path)
    assert rc == (0 if rep["summary"]["pass"] else 1)
    assert rep["environment"]["device"] == "cpu" and rep["environment"]["torch"] == torch.__version__
    assert rep["config"]["dtypes"] == ["float32"] and rep["ttft"] is None
    assert rep["methods"] == ["none", "fastv", "random"]
    recs = {(r["family"], r["method"]): r for r in rep["tiny"]}
    assert set(recs) == {(f, m) for f in ("llava", "llava-next") for m in rep["methods"]}
    for fam in ("llava", "llava-next"):
        none = recs[fam, "none"]
        assert none["error"] is None and none["budget"] is None
        assert set(none["scenarios"]) == {"mixed", "same-question"}
        assert none["scenarios"]["mixed"]["padded"]  # unequal prompts: a left-padded batch
        for sc in none["scenarios"].values():
            for check in ("batch_alone", "cache"):
                samples = sc[check]["samples"]
                assert len(samples) == 3
                for s in samples:  # fp32: batch == alone and cached == recompute, exactly
                    assert s["equal"] and s["verdict"] == "PASS" and len(s["tokens"]) == 4
                    assert s["max_logit_delta"] <= gpu_check.FP32_LOGIT_TOL
            assert [t["visual_entering_llm"] for t in sc["tokens"]] == [t["visual_candidates"] for t in sc["tokens"]]
        assert none["verdicts"]["batch_alone"]["pass"] and none["verdicts"]["cache"]["pass"]
        sy = none["syncs"]
        assert isinstance(sy["total"], int) and sy["batch"] == 3 and sy["per_sample"] == sy["total"] / 3
        assert all(isinstance(v, int) for v in sy["counts"].values())
        assert rep["summary"]["methods"]["none"]["verdict"] == "PASS"
        # every method has a verdict per check, and its record either ran or says why not
        for m in ("fastv", "random"):
            r = recs[fam, m]
            assert set(r["verdicts"]) == {"batch_alone", "cache", "syncs"}
            assert r["error"] is not None or set(r["scenarios"]) == {"mixed", "same-question"}
            assert rep["summary"]["methods"][m]["verdict"] in ("PASS", "FAIL")
    assert recs["llava", "random"]["budget"] == 2 and recs["llava-next", "fastv"]["budget"] == 20
    # the NeXT same-question batch: equally long prompts (equal image token counts, unequal crops)
    lens = recs["llava-next", "none"]["scenarios"]["same-question"]["prompt_lengths"]
    assert len(set(lens)) == 1
    assert set(rep["summary"]["checks"]) == {"batch==alone", "cached==no-cache", "no crash", "host syncs"}
    assert md.startswith("# GPU check: CPU") and f"**Overall: {'PASS' if rep['summary']['pass'] else 'FAIL'}**" in md
    assert "| none | PASS |" in md and "### llava-next, float32" in md
    assert f"gpu_check: {'PASS' if rep['summary']['pass'] else 'FAIL'}" in capsys.readouterr().out


def test_without_cuda_the_default_run_says_so_and_exits_0(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path / "r")]) == 0
    assert "no CUDA device is available" in capsys.readouterr().out
    assert not (tmp_path / "r").exists()
    # the shell wrapper, as a person runs it (CUDA hidden)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run(["bash", str(ROOT / "scripts/bench/gpu_check.sh")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and "no CUDA device is available" in p.stdout


def test_isolated_workers_and_ttft_table(tmp_path):
    """The worker-process path (the default on CUDA) and the TTFT table, on the tiny model."""
    cfg = gpu_check.CheckConfig(device="cpu", dtypes=["float32"], methods=["none", "random"], families=["llava"],
                                new_tokens=2, ttft=True, ttft_model="tiny:llava", ttft_dtype="float32", ttft_budget=4,
                                ttft_warmup=1, ttft_runs=2, out=str(tmp_path))
    rep = gpu_check.run(cfg, "test", log=lambda s: None, isolate=True)
    assert rep["isolated"]
    none = next(r for r in rep["tiny"] if r["method"] == "none")
    assert none["error"] is None and none["verdicts"]["batch_alone"]["pass"]
    t = rep["ttft"]
    assert [r["method"] for r in t["results"]] == ["none", "random"]
    base = t["results"][0]
    assert base["error"] is None and base["ttft"]["n"] == 2 and base["speedup"] == 1.0
    assert {"t_vision", "t_selection", "t_llm"} <= set(base)
    assert t["results"][1]["budget"] == 4
    _, md = _report(tmp_path)
    assert "## TTFT: tiny:llava, float32, batch 1" in md


def test_a_lost_device_restarts_the_worker_and_charges_the_task_it_died_on(tmp_path, monkeypatch):
    """Fake workers: the first loses the device after one task (exit 3), the second dies without a
    record (charged to the task it was on), the third finishes."""
    fake = tmp_path / "fake_worker.py"
    fake.write_text(textwrap.dedent("""
        import json, sys
        tasks, results, attempt = sys.argv[1], sys.argv[2], int(sys.argv[3])
        todo = json.load(open(tasks))["tasks"]
        with open(results, "a") as out:
            for i, t in enumerate(todo):
                if attempt == 1 and i == 0:
                    sys.exit(1)  # died on its first task, without a record
                out.write(json.dumps({**t, "scenarios": {}, "error": None}) + "\\n")
                if attempt == 0:
                    sys.exit(3)  # the device is lost after the first task
    """))
    calls = []

    def command(task_file, result_file):
        calls.append(task_file)
        return [sys.executable, str(fake), str(task_file), str(result_file), str(len(calls) - 1)]

    monkeypatch.setattr(gpu_check, "worker_command", command)
    cfg = gpu_check.CheckConfig(device="cpu", dtypes=["float32"], methods=["none", "a", "b", "c"],
                                families=["llava"], ttft=False, out=str(tmp_path))
    recs = gpu_check.run_isolated(gpu_check.make_tasks(cfg, cfg.methods), cfg, log=lambda s: None)
    assert len(calls) == 3
    assert [r["method"] for r in recs] == ["none", "a", "b", "c"]
    assert recs[0]["error"] is None and recs[2]["error"] is None and recs[3]["error"] is None
    assert "the worker process died (exit status 1)" in recs[1]["error"][0]


def test_default_families_are_the_five_tiny_families_and_every_method_has_a_tiny_budget():
    """The default run covers every tiny family the runtime has, and every registered method has a
    budget that prunes on each (or takes none), in the runtime's family spelling."""
    from llava.method import method_supports
    from llava.models import TINY

    assert gpu_check.FAMILIES == ("llava", "llava-next", "video-llava", "qwen2.5-vl", "llava-onevision")
    assert set(gpu_check.FAMILIES) == set(TINY)
    assert gpu_check.CheckConfig().families == list(gpu_check.FAMILIES)
    assert gpu_check.parse_args([]).families == list(gpu_check.FAMILIES)
    keys = [gpu_check.family_key(f) for f in gpu_check.FAMILIES]
    assert keys == ["llava", "llava_next", "video_llava", "qwen2_5_vl", "llava_onevision"]
    budgetless = gpu_check.NO_BUDGET | {"prumerge"}  # prumerge: adaptive (IQR outliers)
    for m in gpu_check.registered_methods():
        if m in gpu_check.NO_BUDGET:
            continue
        assert m in gpu_check.TINY_BUDGETS, f"{m}: no tiny budget (it would run at the silent fallback)"
        b = gpu_check.TINY_BUDGETS[m]
        assert b is None or isinstance(b, int) or set(b) == set(keys), m
        for f in keys:
            v = gpu_check.tiny_budget(m, f)
            assert (v is None) == (m in budgetless) and (v is None or v > 0), (m, f)
        assert gpu_check.supported(m, "llava") == method_supports(m, "llava")
    new = {m: [gpu_check.tiny_budget(m, f) for f in ("qwen2_5_vl", "llava_onevision")]
           for m in ("consensusdrop", "attnmix", "fastv", "dart", "hiprune", "cdpruner", "sparsevlm", "vscan")}
    assert new == {"consensusdrop": [2, 4], "attnmix": [2, 16], "fastv": [4, 16], "dart": [4, 16],
                   "hiprune": [2, 4], "cdpruner": [2, 4], "sparsevlm": [64, 64], "vscan": [6, 6]}
    assert gpu_check.tiny_budget("prumerge", "qwen2_5_vl") is None and gpu_check.tiny_budget("none", "llava") is None


def test_a_method_that_does_not_support_a_family_is_n_a(tmp_path, monkeypatch):
    """A method whose ``families`` exclude a family is not run there and reported 'n/a' (a pass)."""
    monkeypatch.setattr(gpu_check, "supported", lambda m, f: m == "none" or f != "llava")
    cfg = gpu_check.CheckConfig(device="cpu", dtypes=["float32"], methods=["none", "random"], families=["llava"],
                                new_tokens=2, ttft=False, out=str(tmp_path))
    rep = gpu_check.run(cfg, "test", log=lambda s: None, isolate=False)
    r = next(r for r in rep["tiny"] if r["method"] == "random")
    assert r["skipped"].startswith("n/a") and r["scenarios"] == {} and r["error"] is None
    assert rep["budgets"]["random"] == {"llava": "n/a"}
    assert rep["summary"]["pass"] and rep["summary"]["methods"]["random"] == {"verdict": "n/a", "failed": [],
                                                                              "n/a": ["llava, float32"]}
    _, md = _report(tmp_path)
    assert "| random | n/a | n/a |" in md and "| random | n/a | n/a: random does not support llava |" in md


# ------------------------------------------------------------------------------------------------
# results are never lost: SIGTERM / SIGINT, --time-limit, <report>.partial.jsonl, --resume
# ------------------------------------------------------------------------------------------------

SMALL = ["--device", "cpu", "--no-ttft", "--families", "llava", "--new-tokens", "2"]


def _records(partial: Path) -> list[dict]:
    if not partial.exists():
        return []
    out = []
    for line in partial.read_text().splitlines():
        try:
            x = json.loads(line)
        except ValueError:
            continue
        if "kind" in x:
            out.append(x)
    return out


def _terminate_after(tmp_path, extra, n_done=2, group=False, sleep="0.5"):
    """Run gpu_check in a subprocess (each task slowed by ``sleep`` s), send SIGTERM once ``n_done``
    tasks are in the .partial.jsonl (to the process group, as `timeout` does, when ``group``)."""
    import signal
    import time

    env = {**os.environ, gpu_check.TEST_SLEEP_ENV: sleep, "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.Popen([sys.executable, "-m", "eval.gpu_check", *SMALL, "--out", str(tmp_path), *extra], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=group)
    t0 = time.time()
    while len(_records(next(iter(tmp_path.glob("*.partial.jsonl")), tmp_path / "none"))) < n_done:
        assert p.poll() is None and time.time() - t0 < 120, p.communicate()[0]
        time.sleep(0.05)
    if group:
        os.killpg(p.pid, signal.SIGTERM)
    else:
        p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    return p.returncode, out


@pytest.mark.parametrize("isolate", ["--no-isolate", "--isolate"])
def test_sigterm_writes_the_partial_report(tmp_path, isolate):
    methods = ["none", "fastv", "visionzip", "random"]
    rc, out = _terminate_after(tmp_path, [isolate, "--methods", *methods], group=isolate == "--isolate")
    rep, md = _report(tmp_path)
    s = rep["summary"]
    assert s["partial"] and s["verdict"] in ("PARTIAL", "FAIL") and not s["pass"], out
    assert rc == (3 if s["verdict"] == "PARTIAL" else 1), out
    assert rep["stopped"] == "interrupted by SIGTERM" and rep["isolated"] == (isolate == "--isolate")
    recs = rep["tiny"]
    assert [r["method"] for r in recs] == methods
    ran = [r for r in recs if not r.get("not_run")]
    assert len(ran) >= 2 and [r["method"] for r in ran] == methods[:len(ran)] and len(ran) < len(methods)
    for r in ran:  # the finished tasks are judged
        assert r["error"] is None and set(r["scenarios"]) == {"mixed", "same-question"}
        assert set(r["verdicts"]) == {"batch_alone", "cache", "syncs"}
        assert "why" not in r["verdicts"]["batch_alone"]
    assert s["methods"]["none"]["verdict"] == "PASS"
    for r in recs[len(ran):]:
        assert r["not_run"] == "interrupted by SIGTERM" and r["scenarios"] == {}
        assert s["methods"][r["method"]]["verdict"] == "not run"
    assert s["tasks"] == {"total": 4, "run": len(ran), "not run": 4 - len(ran), "not run reason": ["interrupted by SIGTERM"]}
    assert "PARTIAL" in md.split("\n")[2] and "**Partial report**" in md
    assert "not run (interrupted by SIGTERM)" in md and f"| {methods[-1]} | not run |" in md
    # the finished records stay in <report>.partial.jsonl (header first)
    partial = Path(rep["partial_file"])
    assert partial.name == Path(rep["files"][0]).stem + ".partial.jsonl"
    assert json.loads(partial.read_text().splitlines()[0])["header"]["tool"] == "eval.gpu_check"
    assert [r["method"] for r in _records(partial)] == [r["method"] for r in ran]
    if isolate == "--no-isolate":
        # --resume: the finished tasks are reused, the rest run; the complete report drops the .partial.jsonl
        rc2 = gpu_check.main([*SMALL, "--no-isolate", "--methods", *methods, "--out", str(tmp_path), "--resume"])
        rep2, md2 = _report(tmp_path)
        assert not rep2["summary"]["partial"] and rep2["stopped"] is None and "not run (interrupted" not in md2
        assert rc2 == (0 if rep2["summary"]["pass"] else 1)
        assert [bool(r.get("resumed")) for r in rep2["tiny"]] == [True] * len(ran) + [False] * (4 - len(ran))
        assert rep2["tiny"][0]["verdicts"]["batch_alone"]["pass"] and not partial.exists()
        # a resume file of another configuration is refused (exit 2)
        partial.write_text(json.dumps({"header": {"config": {"new_tokens": 99}}}) + "\n")
        assert gpu_check.main([*SMALL, "--no-isolate", "--methods", "none", "--out", str(tmp_path), "--resume"]) == 2


def _slow_tasks(monkeypatch, seconds: float):
    """Tasks that only sleep (no model), so that the time-limit tests do not depend on the load time."""
    import time

    def task(ctx, family, dtype, method, cfg):
        time.sleep(seconds)
        return {"kind": "tiny", "family": family, "dtype": dtype, "method": method, "budget": None,
                "scenarios": {}, "error": None}

    monkeypatch.setattr(gpu_check, "_load_tiny", lambda family, dtype, cfg: {})
    monkeypatch.setattr(gpu_check, "tiny_task", task)


def test_time_limit_stops_starting_tasks_and_reports_partial(tmp_path, monkeypatch, capsys):
    """Tasks of 2 s, a 3.5 s limit: the first ends at about 2 s, a second would end past the limit
    (elapsed + the longest task so far), so it is not started; the report says PARTIAL, exit 3."""
    _slow_tasks(monkeypatch, 2.0)
    monkeypatch.setenv("GPU_CHECK_TIME_LIMIT", "3.5")
    rc = gpu_check.main([*SMALL, "--no-isolate", "--methods", "none", "fastv", "visionzip", "--time-reserve", "0",
                         "--out", str(tmp_path)])
    rep, md = _report(tmp_path)
    assert rep["config"]["time_limit"] == 3.5 and rep["stopped"] == "time limit"
    assert [r.get("not_run") for r in rep["tiny"]] == [None, "time limit", "time limit"]
    assert rep["tiny"][0]["verdicts"]["batch_alone"]["pass"] and rep["tiny"][0]["wall_seconds"] >= 2
    assert rep["summary"]["verdict"] == "PARTIAL" and rc == 3
    assert rep["summary"]["methods"]["fastv"] == {"verdict": "not run", "failed": [], "n/a": [],
                                                  "not run": ["llava, float32"]}
    assert "**Overall: PARTIAL: 1 of 3 tasks run, 2 not run (time limit)**" in md and "not run (time limit)" in md
    assert "gpu_check: PARTIAL" in capsys.readouterr().out
    assert len(_records(Path(rep["partial_file"]))) == 1


def test_time_limit_stops_a_task_still_running_at_the_limit(tmp_path, monkeypatch):
    """In-process a SIGALRM at the limit (less the reserve) stops the task running then: not run."""
    _slow_tasks(monkeypatch, 30.0)
    cfg = gpu_check.CheckConfig(device="cpu", dtypes=["float32"], methods=["none", "fastv"], families=["llava"],
                                ttft=False, out=str(tmp_path), time_limit=2.0, time_reserve=0.5)
    rep = gpu_check.run(cfg, "test", log=lambda s: None, isolate=False)
    assert rep["seconds"] < 10 and rep["stopped"] == "time limit"
    assert [r.get("not_run") for r in rep["tiny"]] == ["time limit", "time limit"]
    assert rep["summary"]["verdict"] == "PARTIAL" and gpu_check.exit_status(rep["summary"]) == 3


def test_time_limit_exit_status_and_helpers():
    assert gpu_check.may_start(10.0, None, 99.0) and gpu_check.may_start(10.0, 15.0, 5.0)
    assert not gpu_check.may_start(10.0, 15.0, 5.1)
    assert gpu_check.exit_status({"pass": True, "partial": False, "verdict": "PASS"}) == 0
    assert gpu_check.exit_status({"pass": False, "partial": False, "verdict": "FAIL"}) == 1
    assert gpu_check.exit_status({"pass": False, "partial": True, "verdict": "FAIL"}) == 1
    assert gpu_check.exit_status({"pass": False, "partial": True, "verdict": "PARTIAL"}) == 3
    assert gpu_check.parse_args(["--time-limit", "160"]).time_limit == 160.0


def test_ttft_times_an_adaptive_method_without_a_budget(tmp_path):
    """PruMerge chooses its count per image (TINY_BUDGETS None): the TTFT row asks it for no budget
    (asking for --ttft-budget made it refuse, a FAIL on the first H100 run of the five-family check)."""
    cfg = gpu_check.CheckConfig(device="cpu", dtypes=["float32"], methods=["none", "prumerge"], families=["llava"],
                                new_tokens=2, ttft=True, ttft_model="tiny:llava", ttft_dtype="float32", ttft_budget=4,
                                ttft_warmup=1, ttft_runs=1, ttft_methods=["none", "prumerge"], out=str(tmp_path))
    rep = gpu_check.run(cfg, "test", log=lambda s: None, isolate=False)
    row = next(r for r in rep["ttft"]["results"] if r["method"] == "prumerge")
    assert row["error"] is None and row["budget"] is None and row["ttft"]["n"] == 1


def test_reports_name_the_commit_given_for_a_copied_tree(monkeypatch):
    """A GPU box gets a copy of the tree whose .git may be stale: VTPRUNE_GIT_COMMIT names the code."""
    from eval.runner import git_info

    monkeypatch.setenv("VTPRUNE_GIT_COMMIT", "0123abcd")
    assert git_info() == {"commit": "0123abcd", "dirty": None, "source": "VTPRUNE_GIT_COMMIT"}
    assert gpu_check.environment(torch.device("cpu"))["git_commit"] == "0123abcd"
    monkeypatch.delenv("VTPRUNE_GIT_COMMIT")
    assert gpu_check.environment(torch.device("cpu"))["git_commit"].split("+")[0] == git_info()["commit"][:12]
