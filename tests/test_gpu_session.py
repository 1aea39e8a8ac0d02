"""scripts/bench/gpu_session.sh on a CPU, with stand-ins for python and nvidia-smi: the `recheck` part's two GPU
check commands parse with the real command line and configure what the last GPU session left (the fast path of
PyramidDrop / SparseVLM / PruMerge on tiny LLaVA fp16, then the InternVL and Qwen3.5 tiny checks); when the part
writes into the device tool's OUT more files than the tool brings back (8), or deeper than OUT/a/b/, it packs them
into one OUT/<part>.tgz with nothing lost. `one-call`: its four steps in order, each under its share of LIMIT, on one
compile cache under WORK, the run benchmark skipped with a line where this checkout lacks it, a failed or late step
not stopping the others, the summary page beside the archive, and its DRYRUN's tiny CPU configuration (the real dry
run: docs/efficiency.md)."""

import os
import shlex
import subprocess
import tarfile
from pathlib import Path

import pytest

from bench.gpu_check.cli import build_parser, config_from_args

ROOT = Path(__file__).resolve().parent.parent

FAKE_PYTHON = """#!/usr/bin/env bash
# stand-in for python: record the command, write N files (and one three folders deep) under --out
echo "$*" >> "$FAKE_LOG"
echo "${VTPRUNE_COMPILE_CACHE:-}" >> "$FAKE_LOG.cache"
echo "${VTPRUNE_FAST_PRECOMPILE:-}" >> "$FAKE_LOG.pre"
out=""; prev=""
for a in "$@"; do [[ $prev == --out ]] && out=$a; prev=$a; done
[[ $1 == -c && -n ${FAKE_NO_MODULE:-} ]] && exit 1  # python -c "import <a module this checkout lacks>"
[[ -n $out ]] || exit 0
if [[ $out == *.md ]]; then echo "# $out" > "$out"; exit 0; fi  # a markdown file, not a folder
mkdir -p "$out/deep/er"
for i in $(seq 1 "$FAKE_FILES"); do echo "$i" > "$out/file$i.json"; done
[[ $FAKE_DEEP == 1 ]] && echo deep > "$out/deep/er/x.json"
[[ -n ${FAKE_FAIL_OUT:-} && $out == *"$FAKE_FAIL_OUT" ]] && exit 1
exit 0
"""


def _run(tmp_path, files: int, deep: bool, fail_out: str = "", expect: int = 0, part: str = "recheck", **env_more):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'stand-in GPU'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    out = tmp_path / "OUT"
    out.mkdir()
    log = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(out), "FAKE_LOG": str(log),
           "FAKE_FILES": str(files), "FAKE_DEEP": "1" if deep else "0", "LIMIT": "500",
           "FAKE_FAIL_OUT": fail_out, **env_more}
    r = subprocess.run(["bash", "scripts/bench/gpu_session.sh", part], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == expect, r.stderr
    return out, [shlex.split(line) for line in log.read_text().splitlines()], r.stdout


def test_recheck_runs_the_checks_the_last_session_left_and_packs_the_files(tmp_path):
    out, calls, stdout = _run(tmp_path, files=4, deep=False)
    assert [c[:2] for c in calls] == [["-m", "bench.gpu_check"]] * 2
    parser = build_parser("")
    fast = config_from_args(parser.parse_args(calls[0][2:]), "cuda")
    tiny = config_from_args(parser.parse_args(calls[1][2:]), "cuda")
    assert fast.families == ["llava"] and fast.methods == ["pdrop", "sparsevlm", "prumerge"]
    assert not fast.tiny and fast.fast and not fast.fast_ttft and fast.fast_dtypes == ["float16"]
    assert fast.time_limit == 200 and tiny.time_limit == 280  # 2/5 and 3/5 of LIMIT, 20 s kept back
    assert tiny.families == ["internvl", "qwen3.5"] and tiny.tiny and not tiny.fast and not tiny.ttft
    # 4 + 4 files and two logs: more than the 8 the device tool returns -> one archive (8 would stay)
    assert sorted(p.name for p in out.iterdir()) == ["recheck.tgz"] and "packed 10 files" in stdout
    with tarfile.open(out / "recheck.tgz") as tar:
        names = sorted(n.lstrip("./") for n in tar.getnames() if tar.getmember(n).isfile())
    assert names == sorted([f"recheck-{p}/file{i}.json" for p in ("fast", "tiny") for i in (1, 2, 3, 4)]
                           + ["recheck_fast.log", "recheck_tiny.log"])


def test_few_shallow_files_stay_as_they_are_and_a_deep_one_is_packed(tmp_path):
    (tmp_path / "a").mkdir()
    out, _, stdout = _run(tmp_path / "a", files=1, deep=False)
    assert sorted(p.name for p in out.iterdir()) == ["recheck-fast", "recheck-tiny", "recheck_fast.log",
                                                     "recheck_tiny.log"] and "packed" not in stdout
    (tmp_path / "b").mkdir()
    out, _, stdout = _run(tmp_path / "b", files=1, deep=True)
    assert sorted(p.name for p in out.iterdir()) == ["recheck.tgz"]  # OUT/recheck-fast/deep/er/x.json: too deep


def test_a_failed_check_fails_the_part_after_packing(tmp_path):
    """gpu_check's FAIL (1) in the first of recheck's two runs is the part's status, although the second passed
    and the packing ran after both (a device call must not read a failed check as a success)."""
    out, calls, stdout = _run(tmp_path, files=4, deep=False, fail_out="recheck-fast", expect=1)
    assert len(calls) == 2 and sorted(p.name for p in out.iterdir()) == ["recheck.tgz"]


def test_the_fast_part_runs_its_three_benchmarks_and_reports_the_first_failure(tmp_path):
    out, calls, _ = _run(tmp_path, files=1, deep=False, fail_out="fast-7b", expect=1, part="fast")
    outs = [c[c.index("--out") + 1] for c in calls]
    assert [Path(o).name for o in outs] == ["fast-7b", "fast-next-crop", "fast-next-sample"]
    assert all(c[:2] == ["-m", "bench.efficiency"] and "--fast" in c for c in calls)


def test_fast_7b_is_one_run_of_the_issue_s_methods_on_the_capture_backend_with_warm_up_and_closing_re_time(tmp_path):
    out, calls, _ = _run(tmp_path, files=1, deep=False, part="fast-7b")
    ((call),) = calls
    args = dict(zip(call[2:], call[3:]))  # each option with the word after it
    assert call[call.index("--model") + 1] == "shape:llava-1.5-7b" and args["--dtype"] == "float16"
    methods = call[call.index("--methods") + 1:call.index("--budgets")]
    assert methods == ["none", "random", "fastv", "visionzip", "pdrop", "sparsevlm", "dart", "cdpruner",
                       "consensusdrop", "visiondrop", "attnmix"]
    assert call[call.index("--budgets") + 1] == "64" and args["--batch"] == "1" and args["--decode-tokens"] == "32"
    assert args["--fast-backend"] == "cudagraphs" and args["--device-warmup"] == "3"
    assert {"--fast", "--retime-none", "--resume"} <= set(call)
    assert sorted(p.name for p in out.iterdir()) == ["fast-7b", "fast-7b.log"]


def test_fast_attn_times_the_masked_and_the_causal_prompt_attention_on_both_shapes(tmp_path):
    out, calls, _ = _run(tmp_path, files=1, deep=False, part="fast-attn")
    tiny, calls = calls[0], calls[1:]
    cfg = config_from_args(build_parser("").parse_args(tiny[2:]), "cuda")  # the causal kernel's tokens first
    assert tiny[:2] == ["-m", "bench.gpu_check"] and cfg.fast_attention == "causal" and not cfg.tiny and cfg.fast
    assert cfg.families == ["llava", "llava-next", "video-llava"] and cfg.fast_dtypes == ["float16"]
    runs = [(c[c.index("--model") + 1], c[c.index("--fast-attention") + 1], Path(c[c.index("--out") + 1]).name)
            for c in calls]
    assert runs == [("shape:llava-next-7b", "masked", "fast-attn-next-masked"),
                    ("shape:llava-1.5-7b", "masked", "fast-attn-7b-masked"),
                    ("shape:llava-next-7b", "causal", "fast-attn-next-causal"),
                    ("shape:llava-1.5-7b", "causal", "fast-attn-7b-causal")]
    assert all(c[:2] == ["-m", "bench.efficiency"] and "--fast" in c and "--resume" in c for c in calls)
    # the bench's own command line takes each call (parsed by its main, the run itself replaced)
    for c, cfg in zip(calls, _efficiency_configs(calls)):
        assert cfg.fast and cfg.fast_attention == c[c.index("--fast-attention") + 1] and cfg.device == "cuda"


def _efficiency_configs(calls) -> list:
    """Each recorded ``python -m bench.efficiency ...`` call's configuration, as bench.efficiency's own main parses
    its command line (the run itself replaced: nothing is measured)."""
    import bench.efficiency as be

    class Parsed(Exception):
        pass

    def stop(cfg):
        raise Parsed(cfg)

    cfgs, saved, be.run = [], be.run, stop
    try:
        for c in calls:
            with pytest.raises(Parsed) as got:
                be.main(c[2:])
            cfgs.append(got.value.args[0])
    finally:
        be.run = saved
    return cfgs


def test_fast_attn_reports_a_failed_run(tmp_path):
    _run(tmp_path, files=1, deep=False, fail_out="fast-attn-7b-causal", expect=1, part="fast-attn")


def test_fast_inductor_compiles_then_times_a_second_process_on_the_same_cache(tmp_path):
    out, calls, _ = _run(tmp_path, files=1, deep=False, part="fast-inductor")
    first, second = calls
    assert [Path(c[c.index("--out") + 1]).name for c in calls] == ["fast-7b-inductor", "fast-7b-inductor-warm"]
    assert all(c[c.index("--fast-backend") + 1] == "inductor" for c in calls)
    assert first[first.index("--methods") + 1:first.index("--budgets")] == ["none", "random", "fastv", "consensusdrop", "attnmix"]
    assert second[second.index("--methods") + 1:second.index("--budgets")] == ["none", "consensusdrop"]
    assert "--retime-none" in first and "--retime-none" not in second


def test_fast_inductor2_times_the_other_methods_on_inductor(tmp_path):
    out, calls, _ = _run(tmp_path, files=1, deep=False, part="fast-inductor2")
    # Inductor's cache is not under OUT (the folder that comes back, packed): TMPDIR when WORK is OUT
    (cache,) = (tmp_path / "calls.log.cache").read_text().split()
    assert cache.endswith("vtprune-compile-cache") and not Path(cache).resolve().is_relative_to(out.resolve())
    (c,) = calls
    assert Path(c[c.index("--out") + 1]).name == "fast-7b-inductor2" and c[c.index("--fast-backend") + 1] == "inductor"
    assert c[c.index("--methods") + 1:c.index("--budgets")] == ["none", "visionzip", "pdrop", "sparsevlm", "dart",
                                                                "cdpruner", "visiondrop"]
    assert "--retime-none" in c and "--resume" in c


def test_fast_plan_checks_the_tower_function_s_tokens_then_times_both_shapes(tmp_path):
    out, calls, _ = _run(tmp_path, files=1, deep=False, part="fast-plan")
    tiny, calls = calls[0], calls[1:]
    cfg = config_from_args(build_parser("").parse_args(tiny[2:]), "cuda")
    assert tiny[:2] == ["-m", "bench.gpu_check"] and cfg.fast and not cfg.tiny and cfg.fast_backend == "cudagraphs"
    assert cfg.families == ["llava", "llava-next", "video-llava", "qwen2.5-vl"] and cfg.fast_dtypes == ["float16"]
    assert "prumerge" in cfg.methods  # a piecewise prefill: its tower stays in graph 1
    runs = [(c[c.index("--model") + 1], c[c.index("--methods") + 1:c.index("--budgets")],
             Path(c[c.index("--out") + 1]).name) for c in calls]
    assert runs == [("shape:llava-1.5-7b", ["none", "consensusdrop", "attnmix", "fastv"], "fast-plan-7b"),
                    ("shape:llava-next-7b", ["none", "consensusdrop", "divprune"], "fast-plan-next")]
    assert all({"--fast", "--retime-none", "--resume"} <= set(c) for c in calls)


def test_fast_plan_reports_a_failed_run(tmp_path):
    _run(tmp_path, files=1, deep=False, fail_out="fast-plan-next", expect=1, part="fast-plan")


def test_fast_precompile_checks_tokens_twice_on_one_folder_then_times_a_second_process(tmp_path):
    out, calls, _ = _run(tmp_path, files=1, deep=False, part="fast-precompile")
    tiny, runs = calls[:2], calls[2:]
    for c, run in zip(tiny, ("save", "load")):
        cfg = config_from_args(build_parser("").parse_args(c[2:]), "cuda")
        assert c[:2] == ["-m", "bench.gpu_check"] and cfg.fast and not cfg.tiny and cfg.fast_backend == "inductor"
        assert cfg.families == ["llava", "llava-next"] and cfg.methods == ["none", "consensusdrop"]
        assert cfg.fast_dtypes == ["float16"] and Path(cfg.out).name == f"fast-precompile-tiny-{run}"
    assert [(c[:2], c[c.index("--model") + 1], c[c.index("--methods") + 1:c.index("--budgets")],
             c[c.index("--fast-backend") + 1], Path(c[c.index("--out") + 1]).name) for c in runs] == [
        (["-m", "bench.efficiency"], "shape:llava-1.5-7b", ["none", "consensusdrop"], "inductor", name)
        for name in ("fast-precompile-7b", "fast-precompile-7b-load")]
    caches = (tmp_path / "calls.log.cache").read_text().split()
    assert len(caches) == 4 and len(set(caches)) == 1  # one compile cache folder: the later runs load from it
    assert (tmp_path / "calls.log.pre").read_text().split() == ["1"] * 4


def test_fast_precompile_reports_a_failed_run(tmp_path):
    _run(tmp_path, files=1, deep=False, fail_out="fast-precompile-tiny-load", expect=1, part="fast-precompile")


def test_fast_profile_profiles_the_capture_backend_then_inductor(tmp_path):
    out, calls, _ = _run(tmp_path, files=1, deep=False, part="fast-profile")
    assert [c[:2] for c in calls] == [["-m", "bench.fast_profile"]] * 2
    assert [c[c.index("--fast-backend") + 1] for c in calls] == ["cudagraphs", "inductor"]
    assert [c[c.index("--methods") + 1:c.index("--fast-backend")] for c in calls] == [
        ["none", "consensusdrop", "attnmix", "fastv"], ["none", "consensusdrop"]]
    assert [Path(c[c.index("--out") + 1]).name for c in calls] == ["fast-profile-cudagraphs.md",
                                                                 "fast-profile-inductor.md"]
    import bench.fast_profile as fp  # its own parser takes both command lines (the run needs CUDA: it says so)
    for c in calls:
        assert fp.main(c[2:]) == 2


def _opts(call, flag, until=None):
    i = call.index(flag) + 1
    return call[i:call.index(until)] if until else call[i]


def test_one_call_runs_the_four_steps_in_order_on_one_compile_cache_and_leaves_its_summary_beside_the_archive(tmp_path):
    work = tmp_path / "work"
    out, calls, stdout = _run(tmp_path, files=3, deep=False, part="one-call", WORK=str(work))
    assert [c[:3 if c[0] == "-c" else 2] for c in calls] == [["-m", "bench.fast_profile"], ["-m", "bench.efficiency"],
                                      ["-m", "bench.efficiency"], ["-c", "import", "bench.run_throughput"],
                                      ["-m", "bench.run_throughput"], ["-m", "bench.efficiency.one_call"]]
    prof, table, load, _, thr, summary = calls
    assert _opts(prof, "--model") == "shape:llava-1.5-7b" and _opts(prof, "--dtype") == "float16"
    assert _opts(prof, "--methods", "--budget") == ["none", "consensusdrop"] and _opts(prof, "--budget") == "64"
    assert _opts(prof, "--fast-backend") == "inductor" and _opts(prof, "--decode-steps") == "8"
    assert _opts(prof, "--fast-max-new-tokens") == "32"  # = the table's decode tokens: one static cache, one compile
    import bench.fast_profile as fp  # its own parser takes the command line (the run needs CUDA: it says so)
    assert fp.main(prof[2:]) == 2
    assert _opts(table, "--methods", "--out") == ["none", "random", "fastv", "consensusdrop", "attnmix"]
    assert _opts(load, "--methods", "--fast-first") == ["none", "consensusdrop"]
    cfgs = _efficiency_configs([table, load])
    for cfg in cfgs:
        assert cfg.model == "shape:llava-1.5-7b" and cfg.dtype == "float16" and cfg.device == "cuda"
        assert cfg.fast and cfg.fast_backend == "inductor" and cfg.budgets == [64] and cfg.batch_sizes == [1]
        assert cfg.decode_tokens == 32 and cfg.resume and Path(cfg.out).parent == work
    assert [c.fast_first for c in cfgs] == [False, True]
    assert thr[2:thr.index("--time-limit")] == [
        "--model", "shape:llava-1.5-7b", "--dtype", "float16", "--device", "cuda", "--methods", "consensusdrop,none",
        "--budget", "64", "--fast", "on,off", "--loader-workers", "4", "--questions", "200"]
    assert Path(_opts(thr, "--out")) == work / "one-call-throughput"
    # one compile cache under WORK for every step, the precompiled functions requested (Inductor)
    caches = (tmp_path / "calls.log.cache").read_text().split()
    assert len(caches) == 6 and set(caches) == {str(work / "compile-cache")}
    # requested for the steps that compile on Inductor; not for the run benchmark (its default backend has none)
    assert (tmp_path / "calls.log.pre").read_text().splitlines() == ["1", "1", "1", "1", "", "1"]
    # each step under its cumulative share of LIMIT (500 s: 25 / 72 / 86 / 100 %), the run benchmark's own limit inside
    assert sorted(p.name for p in out.iterdir()) == ["one-call.md", "one-call.tgz"] and "packed" in stdout
    with tarfile.open(out / "one-call.tgz") as tar:
        names = {n.lstrip("./") for n in tar.getnames() if tar.getmember(n).isfile()}
        steps = [line.split("\t") for line in tar.extractfile("./one-call-steps.tsv").read().decode().splitlines()]
    assert {"one-call.md", "one-call-profile.md", "one-call-profile.log", "one-call-table.log", "one-call-load.log",
            "one-call-throughput.log", "one-call-table/file1.json", "one-call-load/file1.json"} <= names
    assert [(s[0], s[1]) for s in steps] == [("profile", "0"), ("table", "0"), ("load", "0"), ("throughput", "0")]
    assert [int(s[3]) for s in steps] == pytest.approx([125, 360, 430, 500], abs=3)
    assert int(_opts(thr, "--time-limit")) == pytest.approx(470, abs=3)
    assert _opts(summary, "--dest") == str(out) and "--dry" not in summary


def test_one_call_skips_the_run_benchmark_where_the_checkout_lacks_it_and_goes_on_after_a_failed_step(tmp_path):
    out, calls, stdout = _run(tmp_path, files=1, deep=False, part="one-call", WORK=str(tmp_path / "work"),
                              FAKE_NO_MODULE="1", FAKE_FAIL_OUT="one-call-table", expect=1)
    assert [c[:3 if c[0] == "-c" else 2] for c in calls] == [["-m", "bench.fast_profile"], ["-m", "bench.efficiency"],
                                      ["-m", "bench.efficiency"], ["-c", "import", "bench.run_throughput"],
                                      ["-m", "bench.efficiency.one_call"]]
    assert "throughput skipped (bench.run_throughput is not in this checkout)" in stdout
    steps = [line.split("\t") for line in (out / "one-call-steps.tsv").read_text().splitlines()]
    assert [(s[0], s[1]) for s in steps] == [("profile", "0"), ("table", "1"), ("load", "0"), ("throughput", "skipped")]
    assert steps[3][4] == "bench.run_throughput is not in this checkout"


def test_one_call_skips_a_step_whose_share_has_run_out(tmp_path):
    """LIMIT 60: the profile's share (15 s) is under the 20 s a step needs: skipped, its time left to the table."""
    out, calls, _ = _run(tmp_path, files=1, deep=False, part="one-call", WORK=str(tmp_path / "work"), LIMIT="60")
    assert calls[0][:2] == ["-m", "bench.efficiency"]
    steps = [line.split("\t") for line in (out / "one-call-steps.tsv").read_text().splitlines()]
    assert steps[0][:2] == ["profile", "skipped"] and steps[0][4] == "no time left" and steps[1][:2] == ["table", "0"]
    (tmp_path / "b").mkdir()  # SHARES moves the steps' ends: the profile to 40 % of 500 s
    out, calls, _ = _run(tmp_path / "b", files=0, deep=False, part="one-call", WORK=str(tmp_path / "work2"),
                         SHARES="40 75 90")
    steps = [line.split("\t") for line in (out / "one-call-steps.tsv").read_text().splitlines()]
    assert [int(s[3]) for s in steps] == pytest.approx([200, 375, 450, 500], abs=3)


def test_one_call_dry_run_is_the_same_steps_on_tiny_llava_on_the_cpu(tmp_path):
    out, calls, _ = _run(tmp_path, files=1, deep=False, part="one-call", WORK=str(tmp_path / "work"), DRYRUN="1")
    prof, table, load, _, thr, summary = calls
    for c in (prof, table, load, thr):
        assert _opts(c, "--model") == "tiny:llava" and _opts(c, "--device") == "cpu" and _opts(c, "--dtype") == "float32"
    assert _opts(prof, "--fast-backend") == _opts(table, "--fast-backend") == "eager"
    assert (tmp_path / "calls.log.pre").read_text().splitlines() == ["0", "0", "0", "0", "", "0"]  # eager: none
    assert "--dry" in summary and _opts(thr, "--questions") == "4"
