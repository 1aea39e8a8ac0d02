"""The fast path through the harness (issue 34, item 1): ``eval run --fast`` (same answers as the eager
engine, every answer and results.json saying which path its prefill took and why), the options' checks
and resume keys, ``FAST=1`` in scripts/eval/_launch.sh and scripts/bench/efficiency.sh, and
``bench.efficiency --fast`` (fast and eager rows side by side, the path each row actually took). Tiny
models on CPU with the compile backend "eager" (dynamo without code generation: seconds per graph)."""

import json
import logging
import os
import subprocess
from pathlib import Path

import pytest

from eval.cli import main
from eval.fingerprint import compare
from eval.io import complete_jsonl_records, read_jsonl
from eval.hf_backend import TEXT_ONLY_REASON
from eval.run_config import RunConfig, resume_mismatch
from eval.runner import run
from eval.shards import shard_files
from eval.summary import path_summary
from varied_answers import assert_answers_vary

REPO = Path(__file__).resolve().parents[1]
N_POPE = 6  # questions of the POPE fixture (eval.fixtures)
#: the trained testbed's shapes questions (as many as POPE's): answers that differ by question, where tiny:llava with
#: FasterVLM answers "with" to all six POPE questions, so that fast == eager compares real answers
SHAPES = ("shapes", "--model", str(REPO / "testbed" / "weights"), "--bench-opt", f"n={N_POPE}")

pytestmark = pytest.mark.usefixtures("run_env")


def _run(data, out, method, budget, *extra, bench=("pope", "--model", "tiny:llava")) -> Path:
    argv = ["run", *bench, "--method", method, "--budget", str(budget), "--max-new-tokens",
            "3", "--data-root", str(data), "--out", str(out), "--no-wandb", "--overlay-samples", "1", *extra]
    assert main(argv) == 0
    (res,) = Path(out).rglob("results.json")
    return res.parent


def _metas(run_dir: Path) -> list[dict]:
    return [r["_eval"] for p in shard_files(run_dir) for r in complete_jsonl_records(p)]


def test_eval_run_fast_gives_the_eager_answers_and_counts_the_paths(fixture_data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VTPRUNE_FAST_PRECOMPILE", raising=False)
    eager = _run(fixture_data, tmp_path / "eager", "fastervlm", 4, bench=SHAPES)
    fast = _run(fixture_data, tmp_path / "fast", "fastervlm", 4, "--fast", "--fast-backend", "eager", bench=SHAPES)
    out = capsys.readouterr().out
    assert (eager.name, fast.name) == ("weights_fastervlm_b4", "weights_fastervlm_b4_fast-eager")  # 2 folders
    pe, pf = read_jsonl(eager / "merge.jsonl"), read_jsonl(fast / "merge.jsonl")
    assert_answers_vary([r["text"] for r in pe], 4)  # 5 different answers of 6 (tiny:llava: 1)
    assert len(pf) == N_POPE and [r["text"] for r in pf] == [r["text"] for r in pe]
    re_, rf = (json.loads((d / "results.json").read_text()) for d in (eager, fast))
    assert rf["metrics"] == re_["metrics"] and rf["tokens"]["tok_in"] == re_["tokens"]["tok_in"] == 4.0
    # every prefill took the fast path; the first of its bucket compiled (counted, never hidden)
    paths = rf["paths"]
    assert paths["requested"] == "fast" and paths["fast"] == N_POPE and "eager" not in paths
    assert 1 <= paths["new_graphs"] <= 2
    assert re_["paths"] == {"requested": "eager", "unit": "samples", "eager": N_POPE}
    metas = _metas(fast)
    assert all(m["path"] == "fast" and isinstance(m["bucket"], int) and "path_reason" not in m for m in metas)
    assert "overlay" not in metas[0] and "overlay" in _metas(eager)[0]  # the fast path records no selections
    assert f"prefill paths (samples): fast {N_POPE}" in out
    # the configuration and the fingerprint record it (the logits differ in the last bits, as under another dtype)
    meta = json.loads((fast / "run_config.json").read_text())
    assert meta["config"]["fast"] and meta["config"]["fast_backend"] == "eager"
    assert meta["config"]["fast_max_new_tokens"] == 3  # follows --max-new-tokens
    assert meta["fingerprint"]["fast"] == {"backend": "eager", "cuda_graphs": False, "max_new_tokens": 3}
    # precompiled functions on by default (VTPRUNE_FAST_PRECOMPILE unset); the eager backend has none, so none active
    assert (meta["resolved"]["fast"]["precompile"], meta["resolved"]["fast"]["precompile_active"]) == (True, False)
    assert meta["resolved"]["fast"]["refusal"] is None and "fast" not in json.loads(
        (eager / "run_config.json").read_text())["fingerprint"]
    # `eval score` rewrites results.json with the paths again
    assert main(["score", str(fast)]) == 0
    assert json.loads((fast / "results.json").read_text())["paths"] == paths


def test_eval_run_fast_with_an_uncapturable_method_says_eager_and_why(fixture_data, tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="eval"):
        d = _run(fixture_data, tmp_path, "fastervlm", 4, "--opt", "numerics=official", "--fast", "--fast-backend",
                 "eager")  # the reference mode runs on the eager engine
    paths = json.loads((d / "results.json").read_text())["paths"]
    assert paths["eager"] == N_POPE and "fast" not in paths
    ((reason, n),) = paths["eager_reasons"].items()
    assert n == N_POPE and reason.startswith("fastervlm:") and "official" in reason
    assert all(m["path"] == "eager" and m["path_reason"] == reason for m in _metas(d))
    assert any("runs every prefill on the eager engine" in r.getMessage() for r in caplog.records)
    assert f"eager x{N_POPE}: fastervlm:" in capsys.readouterr().out


def test_fast_options_are_checked_before_anything_loads(fixture_data, tmp_path, capsys):
    base = dict(benchmark="pope", data_root=str(fixture_data), out=str(tmp_path), method="fastervlm", budget=4,
                wandb=False, max_new_tokens=8)
    assert run(RunConfig(**base, fast=True, fast_max_new_tokens=4)) == 2
    assert "static cache would run out" in capsys.readouterr().err
    assert run(RunConfig(**base, fast_backend="eager")) == 2
    assert "with --fast only" in capsys.readouterr().err
    assert run(RunConfig(**base, fast=True, fast_backend="tensorrt")) == 2  # not a backend of ours
    assert run(RunConfig(**base, fast_attention="causal")) == 2
    assert "--fast-attention apply with --fast only" in capsys.readouterr().err
    assert run(RunConfig(**base, fast=True, fast_attention="flash")) == 2
    assert "--fast-attention must be one of auto, causal, masked, got 'flash'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_prompt_attention_names_its_run_folder_and_is_a_resume_key():
    from eval.run_config import default_run_name

    names = [default_run_name(RunConfig(benchmark="pope", method="fastv", budget=64, fast=True, fast_attention=a))
             for a in ("auto", "causal", "masked")]
    assert names == ["tiny-llava_fastv_b64_fast", "tiny-llava_fastv_b64_fast_attn-causal",
                     "tiny-llava_fastv_b64_fast_attn-masked"]
    old = {k: v for k, v in RunConfig(benchmark="pope", fast=True).resume_view().items() if k != "fast_attention"}
    assert resume_mismatch(old, RunConfig(benchmark="pope", fast=True)) == {}  # a folder from before the option
    assert set(resume_mismatch(old, RunConfig(benchmark="pope", fast=True, fast_attention="masked"))) == {
        "fast_attention"}


def test_fast_is_a_resume_key_and_part_of_the_fingerprint():
    old = {k: v for k, v in RunConfig(benchmark="pope").resume_view().items()
           if not k.startswith("fast")}  # a run folder written before --fast existed
    assert resume_mismatch(old, RunConfig(benchmark="pope")) == {}
    fast = RunConfig(benchmark="pope", fast=True, fast_max_new_tokens=128)
    assert set(resume_mismatch(old, fast)) == {"fast", "fast_max_new_tokens"}
    fp = {"backend": "inductor", "cuda_graphs": True, "max_new_tokens": 128}
    changes, _ = compare({}, {"fast": fp})
    assert changes == [f"fast path (off -> {json.dumps(fp, sort_keys=True)})"]
    assert compare({"fast": fp}, {"fast": fp}) == ([], [])


def test_path_summary_counts_every_answer():
    metas = [{"path": "fast", "new_graph": True}, {"path": "fast"}, {"path": "eager", "path_reason": "video input"},
             {"path": "eager", "path_reason": TEXT_ONLY_REASON}, {"path": "eager", "path_reason": "video input"}, {}]
    assert path_summary(metas, fast=True) == {
        "requested": "fast", "unit": "samples", "fast": 2, "eager": 3, "unrecorded": 1, "new_graphs": 1,
        "eager_reasons": {"video input": 2, TEXT_ONLY_REASON: 1}}


def _fake(tmp_path, name="python") -> dict:
    fake = tmp_path / "bin" / name
    fake.parent.mkdir(exist_ok=True)
    fake.write_text("#!/usr/bin/env bash\nprintf '%s\\n' \"$@\" > \"$ARGV_OUT\"\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("FAST", "FAST_BACKEND", "FAST_ATTENTION")}
    return {**env, "PATH": f"{fake.parent}:{os.environ['PATH']}", "ARGV_OUT": str(tmp_path / "argv")}


def _argv(tmp_path) -> list[str]:
    return (tmp_path / "argv").read_text().split("\n")[:-1]


def test_launch_script_fast_variables(tmp_path):
    env = {**_fake(tmp_path), "PYTHON": str(tmp_path / "bin" / "python"), "LAUNCHER": "python", "NPROC": "1",
           "DATA_ROOT": str(tmp_path), "OUT": str(tmp_path / "runs")}
    script = [str(REPO / "scripts/eval/pope.sh"), "fastervlm", "64", "tiny:llava", "--max-new-tokens", "2"]
    subprocess.run(["bash", *script], env={**env, "FAST": "1", "FAST_BACKEND": "eager"}, check=True)
    argv = _argv(tmp_path)
    assert argv[:3] == ["-m", "eval", "run"] and "--fast" in argv
    assert argv[argv.index("--fast-backend") + 1] == "eager" and argv[argv.index("--max-new-tokens") + 1] == "2"
    subprocess.run(["bash", *script], env={**env, "FAST": "1"}, check=True)
    assert "--fast" in _argv(tmp_path) and "--fast-backend" not in _argv(tmp_path)
    assert "--fast-attention" not in _argv(tmp_path)
    subprocess.run(["bash", *script], env={**env, "FAST": "1", "FAST_ATTENTION": "causal"}, check=True)
    argv = _argv(tmp_path)
    assert argv[argv.index("--fast-attention") + 1] == "causal"
    subprocess.run(["bash", *script], env=env, check=True)
    assert "--fast" not in _argv(tmp_path)
    # a backend or an attention without FAST=1, a FAST that is not 0 / 1
    for bad in ({"FAST_BACKEND": "eager"}, {"FAST_ATTENTION": "causal"}, {"FAST": "yes"}):
        p = subprocess.run(["bash", *script], env={**env, **bad}, capture_output=True, text=True)
        assert p.returncode == 2 and "FAST" in p.stderr


def test_efficiency_script_fast_variables(tmp_path):
    env = {**_fake(tmp_path), "N": "2"}
    cmd = ["bash", str(REPO / "scripts/bench/efficiency.sh"), "tiny:llava", str(tmp_path / "out")]
    subprocess.run(cmd, env={**env, "FAST": "1", "FAST_BACKEND": "inductor"}, check=True)
    argv = _argv(tmp_path)
    assert argv[:2] == ["-m", "bench.efficiency"] and "--fast" in argv
    assert argv[argv.index("--fast-backend") + 1] == "inductor"
    subprocess.run(cmd, env=env, check=True)
    assert "--fast" not in _argv(tmp_path) and "--fast-backend" not in _argv(tmp_path)


def test_efficiency_fast_rows_side_by_side(tmp_path):
    from bench.efficiency import main as eff_main

    assert eff_main(["--model", "tiny:llava", "--methods", "none", "trio", "--budgets", "64", "--n", "2",
                     "--warmup", "1", "--batch", "1", "--decode-tokens", "2", "--decode-samples", "1",
                     "--image-hw", "56", "56", "--sweep", "8", "16", "32", "--out", str(tmp_path), "--fast",
                     "--fast-backend", "eager"]) == 0
    rep = json.loads((tmp_path / "efficiency.json").read_text())
    # the main table / bars / plot: the eager rows, as without --fast
    assert [(r["method"], r["path"], r["path_taken"]) for r in rep["results"]] == [
        ("none", "eager", "eager"), ("trio", "eager", "eager")]
    fast = rep["fast"]
    assert fast["backend"] == "eager" and fast["cuda_graphs"] is False and fast["max_new_tokens"] == 2
    none_f, trio_f = fast["results"]
    # the unpruned model is captured; warm-up compiled it, so no timed prefill did
    assert none_f["path"] == none_f["path_taken"] == "fast" and none_f["compiled_in_timed"] == 0
    assert all(r["path"] == "fast" and r["compiled_before_timing"] == 0 for r in none_f["records"])
    assert none_f["kv_match"] is None and none_f["ops"] is None  # a static cache; one graph
    # the host plan, and the part of it before the device had work (the tower runs while the host plans the rest)
    assert 0 < none_f["t_plan_exposed"]["median"] < none_f["t_plan"]["median"]
    assert none_f["fast"]["cudagraph_skips"] == []  # no CUDA graphs on a CPU: nothing declined
    # TRIO is not captured (a backward pass in its stages): its "fast" row ran eagerly and says so, with the reason
    assert trio_f["path"] == "fast" and trio_f["path_taken"] == "eager"
    ((reason, n),) = trio_f["path_reasons"].items()
    assert reason.startswith("trio:") and n == 2
    rows = {(c["method"], c["batch"]): c for c in fast["comparison"]}
    assert set(rows) == {("none", 1), ("trio", 1)}
    for c in rows.values():
        assert c["ttft_ratio"] == pytest.approx(c["fast_ttft_median"] / c["eager_ttft_median"])
    assert rows[("none", 1)]["fast_path_taken"] == "fast" and rows[("trio", 1)]["fast_path_taken"] == "eager"
    md = (tmp_path / "efficiency.md").read_text()
    assert "## Fast path vs eager engine (`--fast`)" in md
    assert "| none | - | 1 | eager | eager |" in md and "| none | - | 1 | fast | fast |" in md
    assert f"| trio | 64 | 1 | fast | **eager**: {reason} |" in md


def test_the_fast_table_gives_each_method_s_ttft_over_random_s_at_the_same_budget():
    """The selection inside a captured prefill is not timed apart: the fast table gives a method's fast TTFT over
    random's (same budget and batch); not for random itself, the unpruned row, or a budget random did not run."""
    from bench.efficiency.report import fast_comparison, fast_markdown

    def rows(method, budget, eager_ms, fast_ms):
        t = lambda ms: {"median": ms / 1e3, "p90": ms / 1e3}  # noqa: E731
        e = {"method": method, "budget": budget, "options": {}, "ttft": t(eager_ms), "batched": {},
             "t_selection": t(1.0), "tpot": t(20.0)}
        f = {"method": method, "budget": budget, "options": {}, "ttft": t(fast_ms), "path_taken": "fast",
             "path_reasons": {}, "compiled_in_timed": 0, "batched": {}, "warmup_s": 1.0, "tpot": t(7.0)}
        return e, f

    cells = [rows("none", None, 30, 20), rows("random", 64, 25, 10.5), rows("consensusdrop", 64, 36, 11.75),
             rows("fastv", 64, 40, 15.0), rows("visionzip", 128, 30, 13.0)]
    cells[2][1].update(t_plan={"median": 1.5e-3}, t_plan_exposed={"median": 0.25e-3})  # the host plan's columns
    cells[3][1]["fast"] = {"cudagraph_skips": [{"function": "prefill_fn", "reason": "skipping cudagraphs due to X"}]}
    comp = fast_comparison([e for e, _ in cells], [f for _, f in cells])
    over = {c["method"]: c.get("fast_over_random") for c in comp}
    assert over["consensusdrop"] == pytest.approx(1.25e-3) and over["fastv"] == pytest.approx(4.5e-3)
    assert over["none"] is None and over["random"] is None and over["visionzip"] is None  # no random at 128
    md = "\n".join(fast_markdown({"backend": "cudagraphs", "comparison": comp}))
    assert ("| consensusdrop | 64 | 1 | fast | fast | 11.75 / 11.75 | 0.33x | 7.00 | 0.35x | +1.25 over random | "
            "1.50 / 0.25 | 1.0 |") in md
    assert "| visionzip | 128 | 1 | fast | fast | 13.00 / 13.00 | 0.43x | 7.00 | 0.35x | - | - | 1.0 |" in md
    # a function Inductor compiled without a CUDA graph is named under the table, with its reason
    assert "**Inductor did not capture these functions as CUDA graphs**" in md
    assert "- fastv at 64: `prefill_fn`: skipping cudagraphs due to X" in md
