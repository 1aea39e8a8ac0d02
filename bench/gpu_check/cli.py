"""The GPU check's command line (bench/gpu_check/__init__.py's ``main``): the flags (``build_parser``; ``--help`` shows
them under bench/gpu_check/__init__.py's docstring), the configuration they give (``config_from_args``), the summary
printed at the end and the exit status (0 PASS, 1 FAIL, 3 PARTIAL; 2 bad arguments)."""

from __future__ import annotations

import argparse

import torch

from bench.gpu_check.config import ALIASES, DTYPES, FAMILIES, CheckConfig, _env_float, registered_methods
from bench.gpu_check.report import _overall
from llava.fast.attention import MODES as FAST_ATTENTION
from llava.fast.path import BACKENDS as FAST_BACKENDS


def build_parser(description: str) -> argparse.ArgumentParser:
    """The flags of ``python -m bench.gpu_check`` (``description``: its module docstring, the --help text)."""
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d = CheckConfig()
    ap.add_argument("--device", default=None, help="default: cuda when available, else say so and exit 0; "
                    "'cpu' forces a CPU run")
    ap.add_argument("--dtypes", nargs="+", default=None, help="default: float16 bfloat16 float32 on cuda, float32 on cpu")
    ap.add_argument("--methods", nargs="+", default=None, help="default: every registered method ('none' always runs)")
    ap.add_argument("--families", nargs="+", default=d.families, choices=FAMILIES)
    ap.add_argument("--new-tokens", type=int, default=d.new_tokens)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--max-syncs-per-sample", type=float, default=None,
                    help="fail a method whose pruned prefill syncs more often per sample (default: report only)")
    ap.add_argument("--no-ttft", dest="ttft", action="store_false",
                    help="skip the TTFT tables (the eager engine's and the fast path's timing)")
    ap.add_argument("--ttft-model", default=d.ttft_model)
    ap.add_argument("--ttft-dtype", default=d.ttft_dtype)
    ap.add_argument("--ttft-budget", type=int, default=d.ttft_budget)
    ap.add_argument("--ttft-methods", nargs="+", default=None, help="default: the methods checked above")
    ap.add_argument("--ttft-warmup", type=int, default=d.ttft_warmup)
    ap.add_argument("--ttft-runs", type=int, default=d.ttft_runs)
    ap.add_argument("--ttft-device-warmup", type=float, default=d.ttft_device_warmup, metavar="SECONDS",
                    help="unpruned prefills for this long before the first timed row; the unpruned model is also "
                    "timed again after the last method, and the table reports the drift (default %(default)g)")
    ap.add_argument("--ttft-text-words", type=int, default=d.ttft_text_words)
    f = ap.add_argument_group("fast path (bench/gpu_check/fast.py)")
    f.add_argument("--fast", action=argparse.BooleanOptionalAction, default=d.fast,
                   help="the fast-path section: equality on the tiny LLaVA families and timing (default: on)")
    f.add_argument("--fast-only", action="store_true",
                   help="only the fast-path section (no tiny-model checks, no eager TTFT table)")
    f.add_argument("--fast-backend", default=d.fast_backend,
                   choices=[b for b in FAST_BACKENDS if b != "none"],  # "none" is the comparison's own side
                   help="the fast path's compile backend, compared with the same path uncompiled (default auto: "
                   "Inductor + CUDA graphs on CUDA, dynamo 'eager' on a CPU; cudagraphs: CUDA graphs of the "
                   "uncompiled functions, no code generation)")
    f.add_argument("--fast-attention", default=d.fast_attention, choices=FAST_ATTENTION,
                   help="the prompt's attention over its padded bucket on both fast sides (llava.fast.attention): "
                   "causal checks SDPA's causal kernel on the tiny models, whose buckets are under auto's 1024 rows")
    f.add_argument("--fast-dtypes", nargs="+", default=None, help="default: the --dtypes")
    f.add_argument("--fast-prompts", type=int, default=d.fast_prompts,
                   help=f"batch-1 prompts per family x dtype x method (default {d.fast_prompts})")
    f.add_argument("--fast-tokens", type=int, default=d.fast_tokens,
                   help=f"greedy tokens per prompt, and the TPOT's generated tokens (default {d.fast_tokens})")
    f.add_argument("--fast-ttft", action=argparse.BooleanOptionalAction, default=d.fast_ttft,
                   help="the fast path's timing rows and targets (default: on; --no-ttft also skips them)")
    f.add_argument("--fast-ttft-model", default=d.fast_ttft_model)
    f.add_argument("--fast-ttft-methods", nargs="+", default=None,
                   help="timing rows at --ttft-budget (default: none fastervlm random visionzip divprune "
                   "consensusdrop fastv pdrop)")
    f.add_argument("--fast-next-model", default=d.fast_next_model)
    f.add_argument("--fast-next-tokens", nargs="*", type=int, default=d.fast_next_tokens,
                   help="NeXT timing rows at these total visual tokens (default 320 160; none given: no NeXT rows)")
    f.add_argument("--fast-next-methods", nargs="+", default=None, help="default: as --fast-ttft-methods")
    ap.add_argument("--out", default=d.out, help="folder of the report (default docs/results)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="run the checks in worker processes, so that a device-side assert cannot take the "
                    "later methods down (default: on CUDA)")
    ap.add_argument("--time-limit", type=float, default=_env_float("GPU_CHECK_TIME_LIMIT"), metavar="SECONDS",
                    help="stop starting tasks when the next one would end past this many seconds (less "
                    "--time-reserve) and stop a task still running there; the report lists the rest as "
                    "'not run (time limit)', verdict PARTIAL, exit 3 (default: env GPU_CHECK_TIME_LIMIT, else none)")
    ap.add_argument("--time-reserve", type=float, default=d.time_reserve, metavar="SECONDS",
                    help=f"seconds kept back from --time-limit for writing the report (default {d.time_reserve:g})")
    ap.add_argument("--resume", nargs="?", const=True, default=None, metavar="FILE",
                    help="reuse the finished tasks of a partial run (its <report>.partial.jsonl, default this "
                    "report's) and run only the rest; the configuration must match")
    ap.add_argument("--worker", nargs=2, metavar=("TASKS", "RESULTS"), help=argparse.SUPPRESS)
    return ap


def config_from_args(a, device: str) -> CheckConfig:
    """The run's configuration from the parsed flags on ``device``; ValueError names an unknown dtype or method."""
    is_cpu = torch.device(device).type == "cpu"
    dtypes = a.dtypes or (["float32"] if is_cpu else ["float16", "bfloat16", "float32"])
    dtypes = [ALIASES.get(x, x) for x in dtypes]
    fast_dtypes = [ALIASES.get(x, x) for x in a.fast_dtypes or []]
    bad = [x for x in dtypes + fast_dtypes if x not in DTYPES]
    if bad:
        raise ValueError(f"unknown dtype(s) {bad}; choose from {sorted(DTYPES)} or {sorted(ALIASES)}")
    known = registered_methods()
    methods = a.methods or known
    unknown = [m for m in methods + (a.fast_ttft_methods or []) + (a.fast_next_methods or [])
               if m not in known and m != "none"]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; registered: {', '.join(known)}")
    cfg = CheckConfig(device=device, dtypes=dtypes, methods=list(methods), families=list(dict.fromkeys(a.families)),
                      new_tokens=a.new_tokens, seed=a.seed, max_syncs_per_sample=a.max_syncs_per_sample, ttft=a.ttft,
                      ttft_model=a.ttft_model, ttft_dtype=ALIASES.get(a.ttft_dtype, a.ttft_dtype),
                      ttft_budget=a.ttft_budget, ttft_methods=a.ttft_methods or [], ttft_warmup=a.ttft_warmup,
                      ttft_runs=a.ttft_runs, ttft_device_warmup=a.ttft_device_warmup,
                      ttft_text_words=a.ttft_text_words, out=a.out, threads=a.threads,
                      time_limit=a.time_limit or None, time_reserve=a.time_reserve, tiny=not a.fast_only,
                      fast=a.fast or a.fast_only, fast_backend=a.fast_backend, fast_dtypes=fast_dtypes,
                      fast_attention=a.fast_attention,
                      fast_prompts=a.fast_prompts, fast_tokens=a.fast_tokens, fast_ttft=a.fast_ttft and a.ttft,
                      fast_ttft_model=a.fast_ttft_model, fast_ttft_methods=a.fast_ttft_methods or [],
                      fast_next_model=a.fast_next_model, fast_next_tokens=list(a.fast_next_tokens),
                      fast_next_methods=a.fast_next_methods or [])
    if a.fast_only:
        cfg.ttft = False
    return cfg


def print_summary(report: dict) -> None:
    """The verdicts printed at the end of a run, and where the report is."""
    summ = report["summary"]
    print()
    print(f"gpu_check: {_overall(summ)}")
    for k, v in summ["checks"].items():
        print(f"  {k:18s} {v}")
    for m, v in summ["methods"].items():
        print(f"  {m:18s} {v['verdict']}" + (f"  ({'; '.join(v['failed'])})" if v["failed"] else "")
              + (f"  (n/a: {'; '.join(v['n/a'])})" if v.get("n/a") else "")
              + (f"  (not run: {'; '.join(v['not run'])})" if v.get("not run") else ""))
    print("report: " + ", ".join(report["files"]) + (f" (finished records: {report['partial_file']})"
                                                      if report.get("partial_file") else ""))


def exit_status(summ: dict) -> int:
    """0 PASS (complete), 1 a failed check (complete or partial), 3 PARTIAL with no failure."""
    if summ.get("verdict") == "FAIL" or (not summ["pass"] and not summ.get("partial")):
        return 1
    return 3 if summ.get("partial") else 0
