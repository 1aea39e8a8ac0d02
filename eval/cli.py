"""Command line of the evaluation harness: ``python -m eval <command>``.

    python -m eval list
    python -m eval check-data [BENCH ...] --data-root playground/data/eval
    python -m eval run gqa --model llava-hf/llava-1.5-7b-hf --method consensusdrop --budget 64 \\
        --data-root playground/data/eval --out runs              # under torchrun / deepspeed for data parallel
    python -m eval run gqa ... --fast [--fast-backend auto|inductor|eager|aot_eager|none] [--fast-max-new-tokens N]
                                            # the fast path (llava/fast/path.py); results.json "paths" says which ran
    python -m eval merge RUN_DIR            # exactly-once check + merge.jsonl
    python -m eval score RUN_DIR            # merge + official conversion + score + results.json
    python -m eval judge RUN_DIR --base-url URL --model NAME    # MM-Vet / video QA with an LLM judge
    python -m eval record RUN_DIR VQAv2-testdev=78.5 --source "EvalAI test-dev"
    python -m eval table runs/ --format md|latex|both [--out FILE]
    python -m eval compare RUN_A RUN_B ... [--reference RUN] [--control RUN|auto]   # paired tests, groups A / B
    python -m eval log-sweep docs/results      # a testbed sweep (testbed.json + testbed.png) -> one W&B run
    python -m eval paper --list | --check       # the paper specs (eval/papers/*.toml)
    python -m eval paper visiondrop runs/ [--table T] [--format md|latex|both] [--out FILE]
    python -m eval paper-grid visiondrop --dry-run   # the runs behind scripts/papers/<paper>.sh
    python -m eval run-many < CONFIGS       # a grid's `run`s in one process, the model loaded once (LAUNCHER=inprocess)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


from llava.cli import HelpFormatter, budget_without_method, load_error  # noqa: E402
from llava.cli import parse_options as _kv  # noqa: E402  (one key=value parser for both CLIs)


def _budget(s: str):
    """--budget's value: a whole number of visual tokens, or none (no budget). Its errors name the option, never
    this function (argparse would print 'invalid _budget value')."""
    if s is None or str(s).lower() in ("none", "-", "", "null", "full"):
        return None
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a budget is a whole number of visual tokens or 'none', got {s!r}") from None


def _add_run(sub):
    from .run_config import RunConfig

    a = sub.add_parser("run", help="sharded inference + merge + score (one process per GPU under torchrun / deepspeed)")
    a.add_argument("benchmark")
    a.add_argument("--model", default=RunConfig.model, help="hub id, local directory, shape:<name> or tiny:<family>")
    a.add_argument("--revision", default=None, help="the hub id's branch, tag or commit (default: main); every file, "
                   "weights, config, tokenizer and processor, is read at it (both backends)")
    a.add_argument("--method", default="none", help="pruning method (none: the unpruned model; `python -m llava.cli "
                   "methods` lists them)")
    a.add_argument("--budget", type=_budget, default=None, help="visual-token budget (the method's convention, "
                   "docs/methods/README.md); needs --method; 'none' or left out: no budget")
    a.add_argument("--opt", action="append", default=[], help="method option key=value (repeatable)")
    a.add_argument("--bench-opt", action="append", default=[], help="benchmark option key=value (e.g. split=..., all_rounds=true)")
    a.add_argument("--data-root", default="playground/data/eval", help="LLaVA's playground/data/eval folder")
    a.add_argument("--out", default="runs", help="runs are written to OUT/<benchmark>/<run-name>/")
    a.add_argument("--run-name", default=None, help="default: <model>_<method>_b<budget>[_<options>]")
    a.add_argument("--batch-size", type=int, default=1, help="paper runs use 1 (docs/evaluation.md, section 2)")
    a.add_argument("--loader-workers", type=int, default=None, help="processes preparing the next questions' inputs "
                   "(file read, decode, processor, tokens, hashes) while the device answers (LLaVA's loader: 4); "
                   "default: 4 within this process's share of the cores less one; 0: in the answering loop")
    a.add_argument("--max-new-tokens", type=int, default=None, help="default: the benchmark's protocol value (128 / 1024)")
    a.add_argument("--dtype", default=None, choices=[None, "float32", "float16", "bfloat16"],
                   help="default: float16 on a GPU, float32 on the CPU")
    a.add_argument("--device", default=None, help="default: cuda:<local rank> where CUDA is available, else the CPU")
    a.add_argument("--attn-implementation", default="sdpa", help="the LLM's and the vision tower's attention")
    a.add_argument("--next-layout", default="spatial_unpad", choices=["spatial_unpad", "spatial"],
                   help="LLaVA-NeXT: how the crops' tokens are laid out")
    a.add_argument("--next-geometry", default="transformers", choices=["transformers", "official"],
                   help="LLaVA-NeXT anyres geometry: transformers (llava-hf's) or official (LLaVA's code: pinpoints read "
                   "(width, height), the unpadded side truncated; docs/parity.md)")
    a.add_argument("--num-frames", type=int, default=8, help="video benchmarks: frames sampled per video")
    a.add_argument("--no-pad", dest="pad_to_square", action="store_false", help="HF resize+crop instead of pad-to-square")
    a.add_argument("--min-pixels", type=int, default=None, help="Qwen2.5-VL: smallest image area (default: the checkpoint's)")
    a.add_argument("--max-pixels", type=int, default=None, help="Qwen2.5-VL: largest image area (bounds the visual tokens)")
    a.add_argument("--vision-dtype", default=None, help="keep the CLIP tower in this dtype (e.g. float32) under a half-precision "
                   "LLM, as LLaVA's own loader runs it (the official [CLS]-attention numerics)")
    a.add_argument("--fast", action="store_true", help="the fast path (llava.load(fast=True)): prefills planned on the host "
                   "and run as one compiled static-shape function per length bucket (CUDA graphs on a GPU) where the "
                   "method is capturable, else eagerly; results.json 'paths' counts which path each prefill took and why")
    a.add_argument("--fast-backend", default="auto", choices=["auto", "inductor", "cudagraphs", "eager", "aot_eager", "none"],
                   help="with --fast: torch.compile backend (auto: inductor + CUDA graphs on a GPU, dynamo without code "
                   "generation on a CPU; cudagraphs: CUDA graphs of the uncompiled functions, recorded in seconds; "
                   "none: the static-shape functions uncompiled)")
    a.add_argument("--fast-attention", default="auto", choices=["auto", "causal", "masked"],
                   help="with --fast: the prompt's attention over its padded bucket: SDPA's causal kernel (rows rolled "
                   "so the real ones come first) or the 4-D mask; auto: causal on a GPU from 1024 rows")
    a.add_argument("--fast-max-new-tokens", type=int, default=None, help="with --fast: decode slots of the static cache "
                   "(default: --max-new-tokens, i.e. the benchmark's protocol value)")
    a.add_argument("--backend", default="hf", choices=["hf", "vllm"],
                   help="who answers: hf (our engine) or vllm (vLLM + the vtprune plugin; .venv-vllm, scripts/vllm_env.sh)")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size: groups of TP processes share one model, its "
                   "language model sharded by DeepSpeed AutoTP (towers replicated); world = groups x TP (scripts: TP=N)")
    a.add_argument("--template", default=None, help="conversation template override (vicuna_v1, llava_v1, chatml_direct, qwen2_vl, llava_onevision_hf)")
    a.add_argument("--seed", type=int, default=0, help="seeds Python, NumPy and torch, and the weights of tiny: / shape: models")
    a.add_argument("--limit", type=int, default=None, help="first N questions only (smoke run; results marked partial)")
    a.add_argument("--stop-after", type=int, default=None, help="debug: exit abruptly after N batches (resume test)")
    a.add_argument("--overlay-samples", type=int, default=4, help="kept-token overlay images per rank")
    a.add_argument("--table-samples", type=int, default=32, help="rows of the W&B sample table")
    a.add_argument("--no-wandb", dest="wandb", action="store_false", help="do not use Weights & Biases at all")
    a.add_argument("--wandb-project", default=None)
    a.add_argument("--wandb-entity", default=None)
    a.add_argument("--wandb-group", default=None)
    a.add_argument("--wandb-tag", dest="wandb_tags", action="append", default=[])
    a.add_argument("--judge-base-url", default=None, help="OpenAI-compatible endpoint for MM-Vet / video QA")
    a.add_argument("--judge-model", default=None)
    a.add_argument("--judge-api-key-env", default=None, help="name of the env variable holding the key (default OPENAI_API_KEY)")
    a.add_argument("--dist-backend", default=None, choices=[None, "gloo", "nccl"])
    a.add_argument("--dist-timeout-min", type=float, default=720.0, help="how long ranks wait for each other (minutes)")
    a.add_argument("--launcher", default=None, help="recorded in the results (torchrun / deepspeed / python)")
    a.add_argument("--overwrite", action="store_true", help="start the run over: the answers already in the run "
                   "directory move to <run>/superseded/overwritten-<time>/ (said on stderr; nothing is deleted)")


def _pop_local_rank(argv: list[str]) -> tuple[list[str], int | None]:
    """The deepspeed launcher inserts ``--local_rank=N`` right after ``-m eval`` (before the
    subcommand); take it out wherever it is."""
    out, local_rank, skip = [], None, False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith(("--local_rank=", "--local-rank=")):
            local_rank = int(a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            local_rank, skip = int(argv[i + 1]), True
        else:
            out.append(a)
    return out, local_rank


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m eval", description=__doc__, formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the benchmarks and their metrics")
    c = sub.add_parser("check-data", help="check a data folder; says what is missing and where to get it")
    c.add_argument("benchmarks", nargs="*")
    c.add_argument("--data-root", default="playground/data/eval")
    c.add_argument("--shallow", action="store_true", help="only the files, not every image the questions name")
    _add_run(sub)
    m = sub.add_parser("merge", help="merge the shard files of a run (exactly-once check)")
    m.add_argument("run_dir")
    m.add_argument("--data-root", default=None)
    s = sub.add_parser("score", help="merge + official conversion + scoring -> results.json")
    s.add_argument("run_dir")
    s.add_argument("--data-root", default=None)
    s.add_argument("--judge-base-url", default=None)
    s.add_argument("--judge-model", default=None)
    s.add_argument("--judge-api-key-env", default=None)
    s.add_argument("--wandb", action="store_true", help="also log the results to a new W&B run")
    j = sub.add_parser("judge", help="grade MM-Vet / video QA answers with an OpenAI-compatible judge")
    j.add_argument("run_dir")
    j.add_argument("--base-url", default=None, help="default: EVAL_JUDGE_BASE_URL or OPENAI_BASE_URL")
    j.add_argument("--model", default=None, help="default: EVAL_JUDGE_MODEL")
    j.add_argument("--api-key-env", default=None, help="env variable holding the key (default OPENAI_API_KEY)")
    j.add_argument("--workers", type=int, default=4)
    j.add_argument("--data-root", default=None)
    r = sub.add_parser("record", help="add a server-side score to a results file")
    r.add_argument("results")
    r.add_argument("metrics", nargs="+", help="NAME=VALUE")
    r.add_argument("--source", default=None)
    fx = sub.add_parser("fixtures", help="write tiny datasets in every benchmark's real layout (smoke runs)")
    fx.add_argument("dir")
    fx.add_argument("benchmarks", nargs="*")
    t = sub.add_parser("table", help="results JSONs -> paper-layout table (markdown / LaTeX)")
    t.add_argument("paths", nargs="+", help="results.json files or directories searched recursively")
    t.add_argument("--format", default="md", choices=["md", "latex", "both"])
    t.add_argument("--out", default=None, help="write here (both: .md and .tex next to this stem)")
    t.add_argument("--metric", action="append", default=[], help="BENCH=METRIC column override, e.g. mme=MME-P+C")
    t.add_argument("--paper-vanilla", action="append", default=[], help="METRIC=VALUE: relative to the paper's vanilla")
    t.add_argument("--no-relative", dest="relative", action="store_false")
    t.add_argument("--decimals", type=int, default=1)
    t.add_argument("--include-partial", action="store_true", help="include --limit smoke runs")
    t.add_argument("--throughput", action="store_true", help="add the runs' questions/s and host-wait share (their "
                   "answering loops' time, results.json 'throughput')")
    t.add_argument("--control", default=None, help="add each row's score on VTC-Bench's groups A (the questions this "
                   "control run gets wrong) and B (the rest): a run folder, or 'auto' (the downsample run at the row's "
                   "budget among the results)")
    from .compare import add_parser as _compare_parser
    from .lmms_import import add_parser as _lmms_parser
    from .paper_cli import add_parsers as _paper_parsers
    from .run_many import add_parser as _run_many_parser

    _compare_parser(sub)
    _paper_parsers(sub)
    _run_many_parser(sub)
    _lmms_parser(sub)
    ls = sub.add_parser("log-sweep", help="log a testbed sweep (DIR/testbed.json + DIR/testbed.png) to one W&B run; "
                        "never fails (honours WANDB_MODE)")
    ls.add_argument("dir", help="the sweep's folder (python -m testbed.evaluate sweep --out)")
    for p in sub.choices.values():  # every command's --help shows the defaults
        p.formatter_class = HelpFormatter
    return ap


def main(argv=None) -> int:
    argv, local_rank = _pop_local_rank(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    if err := load_error():  # the user's methods (VTPRUNE_METHODS, entry points) load before anything runs
        print(err, file=sys.stderr)
        return 2
    return COMMANDS[args.cmd](args, local_rank)


def _list(args, local_rank) -> int:
    from .benchmarks import BENCHMARKS

    width = max(len(b.title) for b in BENCHMARKS.values())
    print(f"{'benchmark':14} {'title':{width}} {'answer length':14} metrics (* = the primary one)")
    for name, b in BENCHMARKS.items():
        mets = ", ".join(m.name + ("*" if m.primary else "") for m in b.metrics)
        print(f"{name:14} {b.title:{width}} {b.max_new_tokens:<14} {mets}")
    print("* the primary metric: the one a results table prints for the benchmark (the others are in results.json).\n"
          "answer length: max_new_tokens of the official protocol (--max-new-tokens overrides it).\n"
          "data: python -m eval check-data [BENCH ...] --data-root DIR says what is missing and where to get it.")
    return 0


def _check_data(args, local_rank) -> int:
    from .datacheck import check_all

    reports = check_all(args.data_root, args.benchmarks or None, deep=not args.shallow)
    for rep in reports:
        print(rep.text())
    return 0 if all(r.ok_inference for r in reports) else 1


def _run(args, local_rank) -> int:
    from .run_config import RunConfig

    d = vars(args).copy()
    d.pop("cmd")
    d["options"] = _kv(d.pop("opt"))
    d["bench_options"] = _kv(d.pop("bench_opt"), "--bench-opt")
    d["local_rank"] = local_rank  # --local_rank=N from the deepspeed launcher (anywhere on the line)
    bad = budget_without_method(d["method"], d["budget"])
    if bad:  # `--method none --budget 16` would run unpruned in a folder named ..._b16
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
            print(f"error: {bad}", file=sys.stderr)
        return 2
    cfg = RunConfig(**d)
    try:
        from .runner import run

        return run(cfg)
    except KeyboardInterrupt:
        return interrupted(cfg)


#: the exit status of a run stopped by Ctrl-C (128 + SIGINT, as a shell reports it)
INTERRUPTED = 130


def interrupted(cfg) -> int:
    """Ctrl-C during ``eval run``: one line (from the first rank only) with the answers on disk - every answer
    is flushed as its batch ends - and how to go on, instead of a traceback; exit status 130."""
    from .run_config import run_dir_of
    from .shards import answered_uids

    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        run_dir = run_dir_of(cfg)
        try:
            n = len(answered_uids(run_dir))
        except (OSError, ValueError, KeyError):
            n = 0
        again = "the same command without --overwrite" if cfg.overwrite else "the same command"
        print(f"interrupted: {n} answer{'' if n == 1 else 's'} saved in {run_dir}; run {again} to resume",
              file=sys.stderr)
    return INTERRUPTED


def _run_folder(args):
    """(run_dir, run_config.json, its config, the data root) of merge / score / judge, or None (printed)."""
    from .io import read_json

    run_dir = Path(args.run_dir)
    if not (run_dir / "run_config.json").exists():
        print(f"error: {run_dir} is not a run directory (no run_config.json)", file=sys.stderr)
        return None
    run_cfg = read_json(run_dir / "run_config.json")
    cfg = run_cfg["config"]
    return run_dir, run_cfg, cfg, args.data_root or cfg["data_root"]


def _merge(args, local_rank) -> int:
    from .benchmarks import get_benchmark
    from .fingerprint import InputHasher
    from .results import MergeError, merge
    from .resume import HASH_CACHE

    if (folder := _run_folder(args)) is None:
        return 2
    run_dir, _, cfg, data_root = folder
    bench = get_benchmark(cfg["benchmark"], data_root, **cfg.get("bench_options", {}))
    qs = bench.load()
    if cfg.get("limit") is not None:
        qs = qs[: cfg["limit"]]
    try:
        official, _ = merge(run_dir, qs, root=bench.root, hasher=InputHasher(bench.root, run_dir / HASH_CACHE))
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged {len(official)} answers -> {run_dir / 'merge.jsonl'}")
    return 0


def _rescore_logger(run_dir: Path, run_cfg: dict, cfg: dict):
    """`score --wandb`: the same name / group / job type / config as `eval run` gives this run (the model and
    method as the run resolved them: run_config.json), tagged "rescored"; n from the run's results.json."""
    from .io import read_json
    from .wandb_log import WandbLogger, run_config, run_identity

    resolved = run_cfg.get("resolved") or {}
    n = None
    if (run_dir / "results.json").exists():
        try:
            n = (read_json(run_dir / "results.json").get("counts") or {}).get("questions")
        except (OSError, ValueError):
            n = None
    ident = run_identity(cfg["benchmark"], cfg.get("model", ""), cfg.get("method", ""), cfg.get("budget"),
                         run_dir.name, family=(resolved.get("model") or {}).get("family"),
                         options=cfg.get("options"), group=cfg.get("wandb_group"),
                         extra_tags=[*(cfg.get("wandb_tags") or []), "rescored"])
    return WandbLogger(project=cfg.get("wandb_project"), entity=cfg.get("wandb_entity"), **ident,
                       config=run_config(cfg, resolved, cfg["benchmark"], n, run_dir.name, str(run_dir)),
                       dir=str(run_dir))


def _score(args, local_rank) -> int:
    """`score` and `judge`: merge + the official conversion + scoring (judge: with the LLM grader)."""
    from .judge import JudgeConfig
    from .results import MergeError, score_run
    from .summary import add_path_summary, print_summary

    if (folder := _run_folder(args)) is None:
        return 2
    run_dir, run_cfg, cfg, data_root = folder
    if args.cmd == "judge":
        jc = JudgeConfig.from_env(args.base_url, args.model, args.api_key_env, workers=args.workers)
        if jc is None:
            print("error: give --base-url and --model (or EVAL_JUDGE_BASE_URL / EVAL_JUDGE_MODEL)", file=sys.stderr)
            return 2
    else:
        jc = JudgeConfig.from_env(args.judge_base_url, args.judge_model, args.judge_api_key_env) \
            if (args.judge_base_url or args.judge_model) else None
    wb = _rescore_logger(run_dir, run_cfg, cfg) if args.cmd == "score" and args.wandb else None
    try:
        res = score_run(run_dir, data_root=data_root, judge_cfg=jc, wandb=wb)
        res = add_path_summary(run_dir, res)  # which path (fast / eager) the prefills took, from the answers
        if wb is not None:  # scores by variant, tokens, TTFT, the answers table (never raises)
            from .wandb_log import log_results

            log_results(wb, res, run_dir, data_root)
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if wb is not None:
            wb.finish()
    print_summary(res)
    return 0


def _record(args, local_rank) -> int:
    from .results import record_metric

    for kv in args.metrics:
        name, _, val = kv.partition("=")
        res = record_metric(args.results, name, float(val), args.source)
    print(json.dumps(res["metrics"], indent=1))
    return 0


def _fixtures(args, local_rank) -> int:
    from .fixtures import write_fixtures

    print(f"wrote fixtures to {write_fixtures(args.dir, args.benchmarks or None)}")
    return 0


def _table(args, local_rank) -> int:
    from .pairing import CompareError
    from .table import make_table

    override = {k.lower(): v for k, v in _kv(args.metric, "--metric").items()}
    paper = {k: float(v) for k, v in _kv(args.paper_vanilla, "--paper-vanilla").items()}
    fmts = ["md", "latex"] if args.format == "both" else [args.format]
    for f in fmts:
        try:
            text = make_table(args.paths, fmt=f, metric_override=override, paper_vanilla=paper or None,
                              relative=args.relative, decimals=args.decimals, include_partial=args.include_partial,
                              throughput=args.throughput, control=args.control)
        except CompareError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.out:
            out = Path(args.out)
            if args.format == "both":
                out = out.with_suffix(".md" if f == "md" else ".tex")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n", encoding="utf-8")
            print(f"wrote {out}")
        else:
            print(text)
    return 0


def _log_sweep(args, local_rank) -> int:
    print(json.dumps(log_sweep(args.dir), default=str))
    return 0


#: subcommand -> its function (args, local_rank) -> exit status
COMMANDS = {"list": _list, "check-data": _check_data, "run": _run, "merge": _merge, "score": _score, "judge": _score,
            "record": _record, "fixtures": _fixtures, "table": _table, "log-sweep": _log_sweep,
            "paper": lambda a, r: _paper_cmd("paper", a), "paper-grid": lambda a, r: _paper_cmd("paper_grid", a),
            "lmms-import": lambda a, r: _lmms_import(a), "run-many": lambda a, r: _run_many(a),
            "compare": lambda a, r: _compare(a)}


def _compare(args) -> int:
    from .compare import main

    return main(args)


def _run_many(args) -> int:
    from .run_many import run_many

    return run_many(args, main, INTERRUPTED)


def _lmms_import(args) -> int:
    from .lmms_import import main

    return main(args)


def _paper_cmd(name: str, args) -> int:
    from . import paper_cli

    return getattr(paper_cli, name)(args)


def log_sweep(sweep_dir) -> dict:
    """``python -m eval log-sweep DIR``: the testbed sweep in ``DIR/testbed.json`` (and its figure
    ``DIR/testbed.png``) logged as one W&B run by :func:`eval.wandb_log.log_sweep_to_wandb`. Returns the
    logger's info; never raises (a sweep that cannot be read is a warning and ``{"mode": "disabled", "error"}``).
    ``python -m testbed.evaluate sweep --wandb`` runs this command: the testbed imports nothing from eval/."""
    import logging

    from .io import read_json
    from .wandb_log import log_sweep_to_wandb

    d = Path(sweep_dir)
    try:
        res = read_json(d / "testbed.json")
    except (OSError, ValueError) as e:
        logging.getLogger("eval").warning("W&B sweep logging skipped: %s", e)
        return {"mode": "disabled", "error": f"cannot read {d / 'testbed.json'}: {e}"}
    return log_sweep_to_wandb(res, png=d / "testbed.png")


if __name__ == "__main__":
    sys.exit(main())
