"""The GPU check (bench.gpu_check, scripts/bench/gpu_check.sh) through its real code path on a CPU:
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

from bench import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def _report(out: Path) -> tuple[dict, str]:
    js = sorted(out.glob("gpu-check-cpu-*.json"))
    md = sorted(out.glob("gpu-check-cpu-*.md"))
    assert len(js) == 1 and len(md) == 1 and js[0].stem == md[0].stem
    return json.loads(js[0].read_text()), md[0].read_text()


def test_cpu_smoke_run_records_every_check(tmp_path, capsys):
    rc = gpu_check.main(["--device", "cpu", "--no-ttft", "--no-fast", "--families", "llava", "llava-next", "--methods",
                         "none", "fastv", "random", "--new-tokens", "4", "--out", str(tmp_path)])
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
                                ttft_warmup=1, ttft_runs=2, ttft_device_warmup=0.2, fast=False, out=str(tmp_path))
    rep = gpu_check.run(cfg, "test", log=lambda s: None, isolate=True)
    assert rep["isolated"]
    none = next(r for r in rep["tiny"] if r["method"] == "none")
    assert none["error"] is None and none["verdicts"]["batch_alone"]["pass"]
    t = rep["ttft"]
    # the unpruned model first (the speed-ups' base), the methods, the unpruned model again last (the drift)
    assert [(r["method"], r.get("again", 0)) for r in t["results"]] == [("none", 0), ("random", 0), ("none", 1)]
    base, last = t["results"][0], t["results"][2]
    assert base["error"] is None and base["ttft"]["n"] == 2 and base["speedup"] == 1.0
    assert {"t_vision", "t_selection", "t_llm"} <= set(base)
    assert t["results"][1]["budget"] == 4
    assert t["drift"] == pytest.approx(last["ttft"]["median"] / base["ttft"]["median"] - 1)
    assert last["speedup"] == pytest.approx(1 / (1 + t["drift"]))
    # the device warm-up ran unpruned prefills for at least its 0.2 s before the first timed row
    assert t["device_warmup"]["prefills"] >= 1 and t["device_warmup"]["seconds"] >= 0.2
    _, md = _report(tmp_path)
    assert "## TTFT: tiny:llava, float32, batch 1" in md
    assert "| none (again, last) |" in md and "Device warmed first with" in md


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
                                families=["llava"], ttft=False, fast=False, out=str(tmp_path))
    recs = gpu_check.run_isolated(gpu_check.make_tasks(cfg, cfg.methods), cfg, log=lambda s: None)
    assert len(calls) == 3
    assert [r["method"] for r in recs] == ["none", "a", "b", "c"]
    assert recs[0]["error"] is None and recs[2]["error"] is None and recs[3]["error"] is None
    assert "the worker process died (exit status 1)" in recs[1]["error"][0]


def test_default_families_are_the_nine_tiny_families_and_every_method_has_a_tiny_budget():
    """The default run covers every tiny family the runtime has, and every registered method has a
    budget that prunes on each (or takes none), in the runtime's family spelling."""
    from llava.families import registry
    from llava.method import method_supports

    assert gpu_check.FAMILIES == ("llava", "llava-next", "video-llava", "qwen2.5-vl", "llava-onevision", "qwen3-vl",
                                  "internvl", "qwen3.5", "qwen2-vl")
    assert gpu_check.FAMILIES == registry.tiny_names()
    assert gpu_check.CheckConfig().families == list(gpu_check.FAMILIES)
    assert gpu_check.parse_args([]).families == list(gpu_check.FAMILIES)
    keys = [gpu_check.family_key(f) for f in gpu_check.FAMILIES]
    assert keys == ["llava", "llava_next", "video_llava", "qwen2_5_vl", "llava_onevision", "qwen3_vl", "internvl",
                    "qwen3_5", "qwen2_vl"]
    # prumerge: adaptive (IQR outliers); v2drop: the official schedule takes no budget (16 -> 8 -> 4 -> 1 here: it prunes);
    # pixelprune: adaptive (the pixels)
    budgetless = gpu_check.NO_BUDGET | {"prumerge", "v2drop", "pixelprune"}
    for m in gpu_check.registered_methods():
        if m in gpu_check.NO_BUDGET:
            continue
        assert m in gpu_check.TINY_BUDGETS, f"{m}: no tiny budget (it would run at the silent fallback)"
        b = gpu_check.TINY_BUDGETS[m]
        # a table: one budget per tiny token geometry (a family record's tiny_geometry)
        assert b is None or isinstance(b, int) or set(b) == set(registry.TINY_GEOMETRIES), m
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
                                new_tokens=2, ttft=False, fast=False, out=str(tmp_path))
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

SMALL = ["--device", "cpu", "--no-ttft", "--no-fast", "--families", "llava", "--new-tokens", "2"]


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
    p = subprocess.Popen([sys.executable, "-m", "bench.gpu_check", *SMALL, "--out", str(tmp_path), *extra], cwd=ROOT,
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
    assert json.loads(partial.read_text().splitlines()[0])["header"]["tool"] == "bench.gpu_check"
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
                                ttft=False, fast=False, out=str(tmp_path), time_limit=2.0, time_reserve=0.5)
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
                                ttft_warmup=1, ttft_runs=1, ttft_methods=["none", "prumerge"], fast=False,
                                out=str(tmp_path))
    rep = gpu_check.run(cfg, "test", log=lambda s: None, isolate=False)
    row = next(r for r in rep["ttft"]["results"] if r["method"] == "prumerge")
    assert row["error"] is None and row["budget"] is None and row["ttft"]["n"] == 1


def test_reports_name_the_commit_given_for_a_copied_tree(monkeypatch):
    """A GPU box gets a copy of the tree whose .git may be stale: VTPRUNE_GIT_COMMIT names the code."""
    from eval.provenance import git_info

    monkeypatch.setenv("VTPRUNE_GIT_COMMIT", "0123abcd")
    assert git_info() == {"commit": "0123abcd", "dirty": None, "source": "VTPRUNE_GIT_COMMIT"}
    assert gpu_check.environment(torch.device("cpu"))["git_commit"] == "0123abcd"
    monkeypatch.delenv("VTPRUNE_GIT_COMMIT")
    assert gpu_check.environment(torch.device("cpu"))["git_commit"].split("+")[0] == git_info()["commit"][:12]


# ------------------------------------------------------------------------------------------------
# the fast-path section (bench/gpu_check/fast.py)
# ------------------------------------------------------------------------------------------------


def test_fast_section_on_cpu_equality_an_eager_method_and_timing(tmp_path, monkeypatch):
    """The fast-path section through its real code path on a CPU (fp32, the device backend = dynamo
    'eager'): none and FasterVLM captured, every prompt on the fast path with the tokens of the same path
    uncompiled and of the eager engine; a method the fast path refuses (DART, refused here whatever its
    capture status is today) listed as eager with its reason, not a failure; the timing rows on tiny:llava
    (targets stated for the 7B shapes only). (Every tiny family is planned today: the OneVision / InternVL / Qwen3.5
    fast tasks were run by hand on this CPU, PASS.)"""
    from bench.gpu_check import fast
    from llava.method import _REGISTRY, available_methods

    available_methods()  # registers the methods
    monkeypatch.setattr(_REGISTRY["dart"], "capture_refusal", lambda self: "dart: not captured in this test")

    cfg = gpu_check.CheckConfig(device="cpu", dtypes=["float32"], methods=["none", "fastervlm", "dart"],
                                families=["llava"], tiny=False, ttft=False, fast_prompts=2,
                                fast_tokens=4, fast_ttft_model="tiny:llava", ttft_dtype="float32", ttft_budget=4,
                                ttft_warmup=1, ttft_runs=1, fast_ttft_methods=["fastervlm"], fast_next_tokens=[],
                                out=str(tmp_path))
    rep = gpu_check.run(cfg, "test", log=lambda s: None, isolate=False)
    f = rep["fast"]
    eq = {r["method"]: r for r in f["equality"]}
    assert [(r["family"], r["dtype"]) for r in f["equality"]] == [("llava", "float32")] * 3 and rep["tiny"] == []
    for m, kept in (("none", 16), ("fastervlm", 2)):
        r = eq[m]
        assert r["error"] is None and r["captured"] and r["refusal"] is None and r["backend"] == "eager"
        assert len(r["prompts"]) == 2 and len({p["prompt_length"] for p in r["prompts"]}) == 2  # unequal prompts
        for p in r["prompts"]:
            assert (p["path"], p["uncompiled_path"], p["eager_path"]) == ("fast", "fast", "eager")
            assert p["visual"][:2] == p["eager_visual"][:2] == [16, kept]
            for check in ("uncompiled", "eager"):
                s = p[check]
                assert s["equal"] and s["verdict"] == "PASS" and len(s["tokens"]) == 4
                assert s["tokens"] == s["ref_tokens"] and s["max_logit_delta"] <= gpu_check.FP32_LOGIT_TOL
        for check in ("uncompiled", "eager"):
            a = fast.agreement(r, check)
            assert (a["prompts"], a["prompts_equal"], a["tokens"], a["tokens_equal"]) == (2, 2, 8, 8)
        assert all(v["pass"] for v in r["verdicts"].values())
    dart = eq["dart"]
    assert not dart["captured"] and dart["error"] is None and dart["refusal"] == "dart: not captured in this test"
    assert dart["eager_check"] == {"path": "eager", "path_reason": dart["refusal"]}
    assert dart["verdicts"]["path"] == {"pass": True, "why": f"eager: {dart['refusal']}", "failed": [], "notes": []}
    s = rep["summary"]
    assert s["pass"] and s["verdict"] == "PASS" and s["methods"]["dart"]["verdict"] == "PASS"
    assert {k: s["checks"][k] for k in ("fast path taken", "fast == uncompiled", "fast == eager engine",
                                         "fast TTFT runs")} == dict.fromkeys(("fast path taken", "fast == uncompiled",
                                                                            "fast == eager engine", "fast TTFT runs"),
                                                                           "PASS")
    assert f["coverage"]["by_dtype"] == {"float32": {"prompts": 4, "prompts_equal": 4, "tokens": 16, "tokens_equal": 16}}
    assert f["coverage"]["prompts_at_32_tokens"] == 0 and f["coverage"]["verdict"] == "missed"  # 4 tokens, not 32
    t = f["timing"]
    assert [(r["model"], r["method"], r["tokens"], r["budget"]) for r in t["results"]] == [
        ("tiny:llava", "none", None, None), ("tiny:llava", "fastervlm", 4, 4)]
    for r in t["results"]:
        assert r["error"] is None and r["path_taken"] == "fast" and r["ttft"]["n"] == 1 and r["tpot"]["n"] == 1
        assert r["compiled_in_timed"] == 0 and r["backend"] == "eager"
    assert t["results"][0]["speedup"] == 1.0 and t["targets"] is None and "shape:llava-1.5-7b" in t["targets_note"]
    _, md = _report(tmp_path)
    assert "## Fast path (`load(..., fast=True)`)" in md and "Fast-path section only" in md
    assert "| llava | float32 | fastervlm | 2 | fast (" in md and "| 2/2 (8/8 tok), " in md
    assert f"| llava | float32 | dart | 8 | eager: {dart['refusal']} | - | - | eager (not captured) |" in md
    assert "### Fast-path timing: batch 1, float32" in md and "| tiny:llava | fastervlm | 4 (4) | fast |" in md
    assert "qwen" not in md.split("## Fast path")[1]


def _synthetic(method, dtype, diffs, T=32):
    """A judged-to-be fast-path record whose prompts differ from the eager engine where ``diffs`` says:
    per prompt None (equal) or (step, max |delta logit|)."""
    prompts = []
    for d in diffs:
        ref = torch.zeros(T, dtype=torch.long)
        ref_logits = torch.zeros(T, 8)
        ref_logits[:, 0] = 1.0
        toks, logits = ref.clone(), ref_logits.clone()
        if d is not None:
            step, delta = d
            toks[step:] = 1
            logits[step, 1] += delta
        same = gpu_check.compare(ref, ref_logits, ref, ref_logits)
        prompts.append({"path": "fast", "uncompiled_path": "fast", "visual": [16, 2, 2.0], "eager_visual": [16, 2, 2.0],
                        "new_graph": False, "uncompiled": same,
                        "eager": gpu_check.compare(toks, logits, ref, ref_logits)})
    return {"kind": "fast", "family": "llava", "dtype": dtype, "method": method, "captured": True, "error": None,
            "tokens": T, "prompts": prompts}


def test_fast_half_precision_mismatches_are_judged_against_the_unpruned_model_and_counted():
    """fp16: a method fails only where it differs from the eager engine and the unpruned model does not,
    beyond 4x the larger of the unpruned model's own delta and its batch noise (tiny check); every mismatch
    is counted. fp32: any difference fails."""
    from bench.gpu_check import fast

    none = _synthetic("none", "float16", [(2, 0.01), None])  # the reference: its own flip at step 2
    fastervlm = _synthetic("fastervlm", "float16", [(5, 0.3), (7, 0.02)])  # unpruned differs too; a near tie
    fastv = _synthetic("fastv", "float16", [None, (3, 0.5)])  # far beyond the band: a real difference
    exact = _synthetic("none", "float32", [None, (1, 1e-4)])
    tiny = [{"kind": "tiny", "family": "llava", "dtype": "float16", "method": "none", "error": None,
             "scenarios": {"mixed": {"batch_alone": {"samples": [{"max_logit_delta": 0.004}]}}}}]
    eq = [none, fastervlm, fastv, exact]
    fast.judge(eq, tiny)
    v = none["verdicts"]["eager"]
    assert v["pass"] and v["batch_noise"] == 0.004 and v["noise_tolerance"] == pytest.approx(0.016)
    assert none["prompts"][0]["eager"]["verdict"].startswith("PASS (unpruned model: half-precision reference")
    assert "within 0.01 <= 0.016" in none["prompts"][0]["eager"]["verdict"]
    v = fastervlm["verdicts"]["eager"]
    assert v["pass"] and v["noise_tolerance"] == pytest.approx(0.04)  # 4 x max(0.01, 0.004)
    assert fastervlm["prompts"][0]["eager"]["verdict"] == "PASS (unpruned model also differs)"
    assert fastervlm["prompts"][1]["eager"]["verdict"].startswith("PASS (near tie at step 7")
    assert not fastv["verdicts"]["eager"]["pass"] and fastv["verdicts"]["eager"]["failed"] == ["prompt 1"]
    assert not exact["verdicts"]["eager"]["pass"] and exact["verdicts"]["uncompiled"]["pass"]
    # exact counts: prompts with every token equal, tokens equal up to the first difference
    assert fast.agreement(fastv, "eager") == {"prompts": 2, "prompts_equal": 1, "tokens": 64,
                                              "tokens_equal": 35, "first_logit_delta": 0.0,
                                              "max_logit_delta": 0.5}
    assert fast.agreement(fastervlm, "eager")["tokens_equal"] == 12
    cov = fast.coverage(eq)
    assert cov["prompts_at_32_tokens"] == 8 and cov["prompts_equal_at_32_tokens"] == 3 and cov["failed_cases"] == 2
    assert cov["by_dtype"]["float16"] == {"prompts": 6, "prompts_equal": 2, "tokens": 192, "tokens_equal": 81}
    checks, methods = {}, {}
    fast.summarize({"equality": eq, "timing": None}, checks, methods)
    assert checks == {"fast path taken": True, "fast == uncompiled": True, "fast == eager engine": False}
    assert methods["fastv"]["failed"] == ["fast == eager engine (llava, float16)"] and methods["fastervlm"]["pass"]


def test_fast_target_verdicts_worked_values():
    from bench.gpu_check.fast import target_verdicts

    out = target_verdicts({"none": 17.0, "fastervlm": 7.5, "random": 9.0, "divprune": 9.4, "consensusdrop": 8.2},
                          tpot_ms=6.5, next_ms={"none": 110.0, ("fastervlm", 320): 30.0, ("fastervlm", 160): 25.0,
                                                ("fastv", 640): 20.0})
    v = {x["target"]: (x["verdict"], x["value"]) for x in out}
    assert v["unpruned TTFT <= 18 ms"] == ("met", 17.0)
    assert v["fastervlm at 64 TTFT <= 8 ms"] == ("met", 7.5)
    assert v["fastervlm at 64 >= 2x faster than the unpruned fast path"][0] == "met"
    assert v["fastervlm at 64 >= 2x faster than the unpruned fast path"][1] == pytest.approx(2.2667, abs=1e-4)
    assert v["random at 64 TTFT <= 8 ms"][0] == "missed"
    assert v["random at 64 >= 2x faster than the unpruned fast path"][0] == "missed"  # 1.89x
    assert v["divprune at 64 TTFT <= 9 ms"] == ("missed", 9.4)
    assert v["consensusdrop at 64 TTFT <= 9 ms"] == ("met", 8.2)
    assert v["visionzip at 64 TTFT <= 8 ms"] == ("not measured", None)
    assert v["TPOT <= 7 ms (unpruned)"] == ("met", 6.5)
    assert v["NeXT-7B fastervlm at 320 tokens >= 4x faster than unpruned"][0] == "missed"  # 3.67x
    assert v["NeXT-7B fastervlm at 160 tokens >= 4x faster than unpruned"][0] == "met"  # 4.4x
    assert not any("fastv at 640" in k for k in v)  # outside 160-320
    assert target_verdicts({})[0] == {"target": "unpruned TTFT <= 18 ms", "value": None, "shown": "- ms",
                                      "verdict": "not measured"}
    # the timing table of a default run: speed-ups over each model's unpruned fast path; a row whose prefills
    # ran eagerly counts for no target
    from bench.gpu_check.fast import timing_table

    def row(model, method, ms, tokens=64, path="fast"):
        return {"kind": "fast_ttft", "model": model, "method": method, "tokens": None if method == "none" else tokens,
                "ttft": {"median": ms / 1e3, "p90": ms / 1e3}, "tpot": {"median": 0.0065} if method == "none" else None,
                "path_taken": path, "path_reasons": {}}

    seven, nxt = "shape:llava-1.5-7b", "shape:llava-next-7b"
    recs = [row(seven, "none", 17.0), row(seven, "fastervlm", 7.5), row(seven, "divprune", 9.4),
            row(seven, "random", 5.0, path="eager"), row(nxt, "none", 110.0), row(nxt, "visionzip", 25.0, 160)]
    t = timing_table(recs, gpu_check.CheckConfig())
    assert recs[1]["speedup"] == pytest.approx(17 / 7.5) and recs[5]["speedup"] == pytest.approx(4.4)
    v = {x["target"]: x["verdict"] for x in t["targets"]}
    assert (v["unpruned TTFT <= 18 ms"], v["fastervlm at 64 TTFT <= 8 ms"], v["divprune at 64 TTFT <= 9 ms"]) == (
        "met", "met", "missed")
    assert v["random at 64 TTFT <= 8 ms"] == "not measured" and v["TPOT <= 7 ms (unpruned)"] == "met"
    assert v["NeXT-7B visionzip at 160 tokens >= 4x faster than unpruned"] == "met"


def test_fast_flags_and_tasks(monkeypatch, tmp_path):
    """The CLI's fast-path flags and the tasks they make: on by default (equality in the check's dtypes on
    the fast families), --no-ttft skips the timing, --fast-only skips the tiny checks and the eager TTFT,
    --no-fast skips the section; NeXT rows at total visual tokens in each method's budget convention."""
    seen = []

    def fake_run(cfg, command, isolate=None, resume=None):
        seen.append(cfg)
        return {"summary": {"pass": True, "partial": False, "verdict": "PASS", "checks": {}, "methods": {}}, "files": []}

    monkeypatch.setattr(gpu_check, "run", fake_run)
    base = ["--device", "cpu", "--methods", "none", "fastervlm", "fastv", "--out", str(tmp_path)]
    assert gpu_check.main([*base, "--no-ttft", "--families", "llava", "qwen2.5-vl"]) == 0
    cfg = seen[-1]
    assert cfg.fast and cfg.tiny and not cfg.fast_ttft and cfg.fast_backend == "auto"
    tasks = gpu_check.make_tasks(cfg, cfg.methods)
    fast = [t for t in tasks if t["kind"] != "tiny"]
    assert fast == [{"kind": "fast", "family": f, "dtype": "float32", "method": m}
                    for f in ("llava", "qwen2.5-vl") for m in ("none", "fastervlm", "fastv")]
    assert gpu_check.main([*base, "--fast-only", "--fast-dtypes", "fp16", "--fast-prompts", "3", "--fast-tokens", "8",
                           "--fast-ttft-methods", "fastervlm", "fastv", "pdrop"]) == 0
    cfg = seen[-1]
    assert (cfg.tiny, cfg.ttft, cfg.fast, cfg.fast_ttft) == (False, False, True, True)
    assert (cfg.fast_dtypes, cfg.fast_prompts, cfg.fast_tokens) == (["float16"], 3, 8)
    tasks = gpu_check.make_tasks(cfg, cfg.methods)
    assert {t["kind"] for t in tasks} == {"fast", "fast_ttft"}
    assert len({gpu_check.task_key(t) for t in tasks}) == len(tasks)
    assert {(t["family"], t["dtype"]) for t in tasks if t["kind"] == "fast"} == {
        (f, "float16") for f in gpu_check.FAMILIES}  # every tiny family is planned by the fast path today
    timing = [(t["model"], t["method"], t["tokens"]) for t in tasks if t["kind"] == "fast_ttft"]
    assert timing[:4] == [("shape:llava-1.5-7b", m, n) for m, n in (("none", None), ("fastervlm", 64), ("fastv", 64),
                                                                   ("pdrop", 64))]
    assert timing[4] == ("shape:llava-next-7b", "none", None) and len(timing) == 4 + 1 + 2 * 3
    from bench.gpu_check.fast import next_budget

    assert [next_budget(m, 320) for m in ("fastervlm", "fastv", "pdrop", "none")] == [64, 320, 64, None]
    assert gpu_check.main([*base, "--no-fast"]) == 0 and not seen[-1].fast
    assert not [t for t in gpu_check.make_tasks(seen[-1], seen[-1].methods) if t["kind"].startswith("fast")]
    assert gpu_check.main([*base, "--fast-dtypes", "fp8"]) == 2


def test_fast_tasks_stopped_by_the_time_limit_are_listed_not_run(tmp_path, monkeypatch):
    """The fast tasks go through the same time limit as the others: tasks of 2 s under a 3.5 s limit, the
    first runs, the rest are `not run (time limit)` in the fast table and the summary (PARTIAL)."""
    import time

    from bench.gpu_check import fast

    def task(ctx, t, cfg):
        time.sleep(2.0)
        return {**t, "budget": None, "tokens": cfg.fast_tokens, "prompts": [], "error": None, "captured": True}

    monkeypatch.setattr(fast, "load_equality", lambda family, dtype, cfg: {})
    monkeypatch.setattr(fast, "equality_task", task)
    cfg = gpu_check.CheckConfig(device="cpu", dtypes=["float32"], methods=["none", "fastv", "visionzip"],
                                families=["llava"], tiny=False, ttft=False, fast_ttft=False, out=str(tmp_path),
                                time_limit=3.5, time_reserve=0.0)
    rep = gpu_check.run(cfg, "test", log=lambda s: None, isolate=False)
    eq = rep["fast"]["equality"]
    assert [r.get("not_run") for r in eq] == [None, "time limit", "time limit"]
    assert rep["summary"]["verdict"] == "PARTIAL" and rep["summary"]["tasks"]["not run"] == 2
    assert rep["summary"]["methods"]["fastv"]["not run"] == ["fast llava, float32"]
    _, md = _report(tmp_path)
    assert "| llava | float32 | fastv | - | not run (time limit) | | | not run |" in md


def test_a_partial_report_from_before_a_config_field_resumes_and_an_unknown_field_is_named(tmp_path):
    """A .partial.jsonl written before ``fast_attention`` existed counts as its default ("auto"); a field the
    running code does not know is named in the refusal (not an empty "differs in")."""
    import dataclasses

    from bench.gpu_check.config import CheckConfig, _jsonable_loose
    from bench.gpu_check.worker import ResumeError, _resume_config, load_partial

    cfg = CheckConfig(device="cpu")
    task = {"kind": "tiny", "family": "llava", "dtype": "float32", "method": "none"}
    old = {k: v for k, v in _jsonable_loose(_resume_config(cfg)).items() if k != "fast_attention"}
    path = tmp_path / "r.partial.jsonl"
    path.write_text(json.dumps({"header": {"config": old}}) + "\n" + json.dumps({**task, "verdict": "PASS"}) + "\n")
    assert list(load_partial(path, cfg, [task]).values())[0]["verdict"] == "PASS"
    with pytest.raises(ResumeError, match=r"differs in: fast_attention\)"):
        load_partial(path, dataclasses.replace(cfg, fast_attention="causal"), [task])
    path.write_text(json.dumps({"header": {"config": {**old, "from_the_future": 1}}}) + "\n")
    with pytest.raises(ResumeError, match=r"differs in: from_the_future\)"):
        load_partial(path, cfg, [task])
