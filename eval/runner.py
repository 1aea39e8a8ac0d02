"""``python -m eval run``: sharded, resumable inference for one benchmark, then merge -> official conversion ->
score -> results JSON (rank 0).

Sharding follows LLaVA's scripts: the question list is cut into ``world`` contiguous chunks of
ceil(N / world); rank r answers chunk r and appends its answer records to
``<run>/answers/{world}_{rank}.jsonl``, flushed (and fsynced) after every batch. A restarted run
skips every question already answered in *any* shard file of the run (so it may even restart
with a different number of processes) and cuts a torn last line before appending. After a
barrier, rank 0 merges: every question answered exactly once, records in question-file order.

:func:`run` is a few steps over one :class:`_Run` (the state they resolve, passed from step to step):

1. resolve the run, before anything heavy or written (:func:`_resolve`): benchmark, options and method
   checked, the data checked and the questions read, their hashes and the data fingerprint;
2. the run folder (:func:`_check_folder`): may this configuration resume into it, and which answers stand;
3. the model (:func:`_load_model`), what it resolved to and its fingerprint (:func:`_describe`), checked
   against the folder's answers (:func:`_check_fingerprint`); then the folder is written (:func:`_write_folder`);
4. answer this rank's questions left (:func:`_assign`, :func:`_open_wandb`, :func:`_answer`: the HF engine,
   :mod:`eval.hf_backend`, or vLLM, :mod:`eval.vllm_backend`);
5. merge, score, log (:func:`_score`, rank 0: :mod:`eval.results`, :mod:`eval.wandb_log`, :mod:`eval.summary`).

A step that must end the run raises :class:`_Stop` (a bad input: one ``error:`` line and exit 2; tracebacks
are for bugs). Where the pieces live: the configuration and its checks in :mod:`eval.run_config`, the run
folder in :mod:`eval.run_folder`, shard files in :mod:`eval.shards`, what each model family takes and records
in :mod:`eval.families`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from llava.method import BudgetError

from . import dist as distmod
from .benchmarks import Benchmark, Question, get_benchmark
from .datacheck import check_benchmark
from .dist import DistInfo
from .families import family_check, model_info
from .fingerprint import data_fingerprint, model_fingerprint, question_hash, template_fingerprint
from .hf_backend import infer as hf_infer
from .provenance import env_info, git_info
from .results import score_run
from .resume import ResumePlan
from .run_config import RunConfig, option_error, run_dir_of
from .run_folder import check_config, check_fingerprint, write_run_folder
from .run_lock import LockBusy, RunLock, describe as describe_holder
from .shards import InputError, answered_uids, check_inputs, chunk
from .summary import add_path_summary, print_summary
from .wandb_log import WandbLogger, log_results, run_config, run_identity

log = logging.getLogger("eval")


class _Stop(Exception):
    """A step ends the run with exit ``code``; ``message``, when given, is the one ``error:`` line rank 0
    prints (without one, the step has said why itself)."""

    def __init__(self, message=None, code: int = 2):
        super().__init__(message)
        self.message, self.code = message, code

    def report(self, info: DistInfo) -> int:
        if self.message is not None and info.is_main:
            print(f"error: {self.message}", file=sys.stderr)
        return self.code


@dataclass
class _Run:
    """One ``eval run`` as its steps resolve it (every rank holds one; ``data_fp``, ``prev_meta``, ``plan`` and
    ``wb`` on rank 0 only)."""

    cfg: RunConfig
    info: DistInfo
    t_start: float  # the session's start (results.json's wall time)
    bench: Benchmark
    questions: list[Question]
    run_dir: Path
    qhashes: dict  # question id -> hash of the question as it is now (each answer records it)
    data_fp: dict | None  # the data fingerprint (question file, image / video set)
    prev_meta: dict | None = None  # the folder's run_config.json when this session resumes into it
    plan: ResumePlan | None = None  # which of the folder's answers to keep, recompute, drop (eval/resume.py)
    device: object = None
    dtype: str | None = None
    rt: object = None  # llava.models runtime: model, processor, template, family
    engine: object = None  # the pruning engine with the run's method
    vb: object = None  # eval.vllm_backend.VllmBackend under --backend vllm
    fast_info: dict | None = None
    resolved: dict = field(default_factory=dict)  # what run_config.json / results.json record as resolved
    fingerprint: dict = field(default_factory=dict)  # the run-wide parts answers are resumed under
    todo: list[Question] = field(default_factory=list)  # this rank's questions not answered yet
    n_done: int = 0  # questions answered in the folder before this session
    wb: WandbLogger | None = None
    lock: RunLock | None = None  # rank 0: the run folder's lock, held to the end (eval/run_lock.py)


def run(cfg: RunConfig) -> int:
    """Entry point of ``python -m eval run`` on every rank. Returns the exit code."""
    t_start = time.time()
    try:
        info = distmod.detect(cfg.local_rank, cfg.tp)
    except ValueError as e:  # a world that TP groups cannot divide, a rank outside the world
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format=f"[rank {info.rank}] %(levelname)s %(name)s: %(message)s")
    try:  # everything is validated before anything is written
        r = _resolve(cfg, info, t_start)
    except _Stop as stop:
        return stop.report(info)
    distmod.init(info, cfg.dist_backend, cfg.dist_timeout_min)
    try:
        _lock_folder(r)
        _check_folder(r)
        _load_model(r)
        _describe(r)
        _check_fingerprint(r)
        _write_folder(r)
        _assign(r)
        _open_wandb(r)
        _answer(r)
        return _score(r)
    except _Stop as stop:
        return stop.report(info)
    finally:
        if r.lock is not None:
            r.lock.release()
        distmod.close(info)


# ---------------------------------------------------------------------------------------------
# 1. resolve the run: options, method, data, questions (nothing loaded, nothing written)
# ---------------------------------------------------------------------------------------------


def _resolve(cfg: RunConfig, info: DistInfo, t_start: float) -> _Run:
    bench = _check_options(cfg, info)
    questions = _load_questions(cfg, bench, info)
    return _Run(cfg, info, t_start, bench, questions, run_dir_of(cfg),
                qhashes={q.uid: question_hash(q, bench.root) for q in questions},
                data_fp=data_fingerprint(bench, questions) if info.is_main else None)


def _check_options(cfg: RunConfig, info: DistInfo) -> Benchmark:
    """The benchmark (its protocol's ``max_new_tokens`` where none is given), the options that cannot go
    together, and the method's own checks (unknown method, budget <= 0, unknown option key), before any model
    is loaded."""
    try:
        bench = get_benchmark(cfg.benchmark, cfg.data_root, **cfg.bench_options)
    except (KeyError, TypeError) as e:
        raise _Stop(_reason(e)) from None
    cfg.benchmark = bench.name
    if cfg.max_new_tokens is None:
        cfg.max_new_tokens = bench.max_new_tokens
    bad = option_error(cfg, info.world)
    if bad:
        raise _Stop(bad)
    from llava.method import get_method

    try:
        get_method(cfg.method, cfg.budget, **cfg.options)
    except (KeyError, ValueError, TypeError) as e:
        raise _Stop(_reason(e)) from None
    return bench


def _load_questions(cfg: RunConfig, bench: Benchmark, info: DistInfo) -> list[Question]:
    """The data check (the files each benchmark needs), then the questions (``--limit``: the first N) and
    every input file they name."""
    report = check_benchmark(bench, deep=False)
    if not report.ok_inference:
        if info.is_main:
            print(report.text(), file=sys.stderr)
        raise _Stop()
    try:
        questions = bench.load()
    except (ValueError, FileNotFoundError) as e:  # garbled / truncated question file: names path:line
        raise _Stop(f"cannot read the {bench.name} questions: {e}") from None
    if cfg.limit is not None:
        questions = questions[: cfg.limit]
    missing = check_inputs(bench, questions)
    if missing:
        if info.is_main:
            print(f"error: {len(missing)} input file(s) referenced by the {bench.name} questions are missing or empty under "
                  f"{cfg.data_root}, e.g.:\n  " + "\n  ".join(missing[:10]) +
                  f"\nRun `python -m eval check-data {bench.name} --data-root {cfg.data_root}` for where to get them.",
                  file=sys.stderr)
        raise _Stop()
    return questions


# ---------------------------------------------------------------------------------------------
# 2. the run folder, 3. the model
# ---------------------------------------------------------------------------------------------


def _lock_folder(r: _Run) -> None:
    """Rank 0 holds the run folder's lock from here to the end: a second writer of the same folder (another
    process started on the same configuration) is refused with one line; a lock left by a writer that died is
    taken over, said in one line. Every rank hears the verdict."""
    ok = True
    if r.info.is_main:
        try:
            r.lock = RunLock.acquire(r.run_dir)
        except LockBusy as e:
            print(f"error: {e}", file=sys.stderr)
            ok = False
        else:
            if r.lock.took_over:
                print(f"note: {r.run_dir} was left locked by a run that is no longer running "
                      f"({describe_holder(r.lock.took_over)}): taken over; its answers on disk are resumed",
                      file=sys.stderr)
    if not distmod.broadcast_object(r.info, ok):
        raise _Stop()


def _check_folder(r: _Run) -> None:
    """Rank 0: may this configuration resume into the run folder (and which of its answers stand); every rank
    hears the verdict."""
    ok = None
    if r.info.is_main:
        ok, r.prev_meta, r.plan = check_config(r.cfg, r.run_dir, r.bench, r.questions, r.data_fp)
    if not distmod.broadcast_object(r.info, ok):
        raise _Stop()


def _load_model(r: _Run) -> None:
    """Seeds and device; the model (its language model sharded across the tensor-parallel group under
    ``--tp``), checked against what its family takes; the pruning engine with the run's method (checks that
    need the model, e.g. an LLM layer out of range); vLLM's engine under ``--backend vllm``."""
    import numpy as np
    import torch

    from llava.models import load

    cfg = r.cfg
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    r.device = _device(cfg, r.info)
    _cpu_threads(r.device)
    r.dtype = cfg.dtype or ("float16" if r.device.type == "cuda" else "float32")
    try:  # unknown tiny / shape name, no such hub id or directory, not a LLaVA-family checkpoint
        # tp > 1: loaded on the CPU (a checkpoint's safetensors are memory-mapped: the node's ranks share the page
        # cache), then AutoTP moves this rank's shard and the replicated towers to its GPU
        rt = load(cfg.model, dtype=r.dtype, device=torch.device("cpu") if cfg.tp > 1 else r.device,
                  attn_implementation=cfg.attn_implementation,
                  template=cfg.template, next_layout=cfg.next_layout, num_frames=cfg.num_frames,
                  pad_to_square=cfg.pad_to_square, seed=cfg.seed, min_pixels=cfg.min_pixels,
                  max_pixels=cfg.max_pixels, vision_dtype=cfg.vision_dtype, fast=cfg.fast,
                  fast_backend=cfg.fast_backend, fast_max_new_tokens=cfg.fast_max_new_tokens or 256,
                  fast_attention=cfg.fast_attention, decoder_layers=0 if cfg.backend == "vllm" else None,  # vllm: prompts + checks only
                  revision=cfg.revision, next_geometry=cfg.next_geometry)
    except (ValueError, OSError) as e:
        raise _Stop(f"cannot load model {cfg.model!r}: {_reason(e)}") from None
    bad = family_check(cfg, rt, r.questions)
    if bad:
        raise _Stop(bad)
    r.rt = _deepspeed(cfg, rt, r.dtype, r.device)
    try:
        r.engine = r.rt.prune(cfg.method, cfg.budget, **cfg.options)
    except (KeyError, ValueError, TypeError) as e:
        raise _Stop(_reason(e)) from None
    r.fast_info = _fast_info(cfg, r.engine)
    if r.fast_info and r.fast_info.get("refusal") and r.info.is_main:  # said, never silent: every prefill runs eagerly
        log.warning("--fast: %s runs every prefill on the eager engine: %s", cfg.method, r.fast_info["refusal"])
    if cfg.backend == "vllm":  # vLLM's engine with the plugin: the decoder is vLLM's
        from .vllm_backend import VllmBackend

        try:
            r.vb = VllmBackend(cfg, r.rt, r.dtype)
        except ValueError as e:  # a method or model the plugin cannot run: the reason
            raise _Stop(_reason(e)) from None


def _deepspeed(cfg: RunConfig, rt, dtype: str, device):
    """``deepspeed.init_inference`` on every rank under ``--tp`` > 1 or the deepspeed launcher: the language
    model sharded across this rank's group (AutoTP), the towers replicated."""
    if not (cfg.tp > 1 or (cfg.launcher or _guess_launcher()) == "deepspeed"):
        return rt
    from llava.tp import TPGroups, deepspeed_inference

    try:
        rt = deepspeed_inference(rt, tp_size=cfg.tp, dtype=dtype, groups=TPGroups(cfg.tp) if cfg.tp > 1 else None)
    except (RuntimeError, ValueError) as e:  # no deepspeed; a model the LM-only policy cannot shard
        raise _Stop(str(e)) from None
    if next(rt.model.parameters()).device != device:  # DeepSpeed's current device is not the run's (--device)
        rt.model.to(device)
    return rt


def _describe(r: _Run) -> None:
    """What the run resolved to (run_config.json's and results.json's ``resolved``) and its fingerprint: the
    run-wide parts its answers are resumed under (data, template, weights, method, dtype, code; the fast path's
    compiler and the vLLM version where they answer)."""
    cfg, engine, vb = r.cfg, r.engine, r.vb
    r.resolved = {
        "method_config": engine.method.config(),
        "llm_layers": list(engine.llm_layers),
        "vision_stage": bool(engine.method.vision_stage),
        "model": {**model_info(cfg, r.rt, r.dtype), "decoder_layers": len(engine.lm.layers), **r.rt.info},
        "generation": {"do_sample": False, "num_beams": 1, "use_cache": True, "max_new_tokens": cfg.max_new_tokens,
                       "batch_size": cfg.batch_size},
        "fast": r.fast_info,
        "backend": vb.info if vb is not None else {"name": "hf"},
        "benchmark": r.bench.config(),
        "world_size": r.info.world,
        "tensor_parallel": {"tp": r.info.tp, "groups": r.info.dp},
        "launcher": cfg.launcher or _guess_launcher(),
        "git": git_info(),
        "env": env_info(r.device),
    }
    r.fingerprint = {"data": r.data_fp, "template": template_fingerprint(r.rt.template),
                     "model": model_fingerprint(cfg.model, cfg.seed, r.rt.model.config, cfg.revision),
                     "method": {"method": cfg.method, "budget": cfg.budget, "options": cfg.options,
                                "config": r.resolved["method_config"]},
                     "dtype": r.dtype, "code": r.resolved["git"]}
    if r.fast_info:  # the fast path changes the logits in the last bits (padded GEMM shapes, the compiler)
        r.fingerprint["fast"] = {k: r.fast_info[k] for k in ("backend", "cuda_graphs", "max_new_tokens")}
    if vb is not None:  # another engine's decoder (and its version)
        r.fingerprint["backend"] = {k: vb.info[k] for k in ("name", "version")}
    # as run_config.json stores it (a method config's tuple is a list there): a resume compares like with like
    r.fingerprint = json.loads(json.dumps(r.fingerprint))


def _check_fingerprint(r: _Run) -> None:
    """Rank 0: the parts that need the model (template, weights, resolved method, dtype) against the folder's
    answers; every rank hears the verdict."""
    ok = check_fingerprint(r.run_dir, r.prev_meta, r.fingerprint) if r.info.is_main else None
    if not distmod.broadcast_object(r.info, ok):
        raise _Stop()


def _write_folder(r: _Run) -> None:
    """Rank 0 writes the run folder (method, options, budget, data and model are good); the others wait: under
    ``--overwrite`` the old answers are gone before any rank looks for them."""
    if r.info.is_main:
        write_run_folder(r.cfg, r.run_dir, r.prev_meta, r.resolved, r.fingerprint, r.plan)
    distmod.barrier(r.info)


# ---------------------------------------------------------------------------------------------
# 4. answer this rank's questions
# ---------------------------------------------------------------------------------------------


def _assign(r: _Run) -> None:
    """This rank's chunk of the questions (one per tensor-parallel group), less those answered in any shard file."""
    info = r.info
    mine = chunk(r.questions, info.dp, info.dp_rank)
    done = answered_uids(r.run_dir)
    r.n_done = len(done)
    r.todo = [q for q in mine if q.uid not in done]
    if info.tp > 1:  # a group's ranks run the same batches: all read what is answered before its writer appends
        distmod.barrier(info)
    log.info("%s: %d questions, this rank %d (%d already answered, %d to go), world %d%s",
             r.bench.name, len(r.questions), len(mine), len(mine) - len(r.todo), len(r.todo), info.world,
             f" (tensor-parallel group {info.dp_rank} of {info.dp}, {'writer' if info.writes else 'not writing'})"
             if info.tp > 1 else "")


def _open_wandb(r: _Run) -> None:
    """Rank 0's W&B run: name <bench>/<run-name>; group <bench>/<model> (every method and budget); job_type =
    the budget. It never fails or hangs the run (eval/wandb_log.py)."""
    if not r.info.is_main:
        return
    cfg = r.cfg
    ident = run_identity(r.bench.name, cfg.model, cfg.method, cfg.budget, r.run_dir.name, family=r.rt.family,
                         options=cfg.options, group=cfg.wandb_group, extra_tags=cfg.wandb_tags)
    r.wb = WandbLogger(enabled=cfg.wandb, project=cfg.wandb_project, entity=cfg.wandb_entity, **ident,
                       config=run_config(dataclasses.asdict(cfg), r.resolved, r.bench.name, len(r.questions),
                                         r.run_dir.name, str(r.run_dir)),
                       dir=str(r.run_dir))


def _answer(r: _Run) -> None:
    """This rank's questions left, answered by vLLM or our engine; then the barrier before the merge. An input
    that cannot be read, or a budget the method cannot serve on it (:class:`llava.method.BudgetError`), ends the
    run with one line (the answers so far are on disk)."""
    cfg, info = r.cfg, r.info
    try:
        if r.vb is not None:
            from .vllm_backend import infer as vllm_infer

            vllm_infer(cfg, r.bench, r.vb, r.todo, r.run_dir, info, r.qhashes)
        else:
            hf_infer(cfg, r.bench, r.rt, r.engine, r.todo, r.run_dir, info, r.device, r.wb, n_total=len(r.questions),
                     n_done=r.n_done, qhashes=r.qhashes)
    except (InputError, BudgetError) as e:  # this rank's input; a budget the method cannot serve on it
        if info.writes:  # a tensor-parallel group's ranks read the same input: its writer says it
            print(f"error: {e}", file=sys.stderr)
        if info.world > 1:  # the other ranks wait at a barrier: exit, the launcher stops them
            _exit_now(2)
        if r.wb is not None:
            r.wb.finish()
        raise _Stop() from None
    distmod.barrier(info)


# ---------------------------------------------------------------------------------------------
# 5. merge, score, log (rank 0)
# ---------------------------------------------------------------------------------------------


def _score(r: _Run) -> int:
    """Rank 0: merge -> official conversion -> score -> results.json, logged to W&B and printed. A failure here
    leaves the answers on disk (exit 1, ``eval score RUN_DIR`` goes on); a stuck W&B upload cannot hold the run."""
    if not r.info.is_main:
        return 0
    cfg, run_dir, wb = r.cfg, r.run_dir, r.wb
    code = 0
    try:
        results = score_run(run_dir, data_root=cfg.data_root, wall_s=time.time() - r.t_start, wandb=wb,
                            judge_cfg=_judge_cfg(cfg))
        if wb is not None:  # scores by variant, tokens, TTFT, the answers table (never raises)
            log_results(wb, results, run_dir, cfg.data_root)
        results = add_path_summary(run_dir, results)
        print_summary(results)
    except Exception as e:  # noqa: BLE001 - answers are safe on disk; report and fail
        log.exception("merge / scoring failed: %s", e)
        print(f"error: merge / scoring failed: {e}\nAnswers are kept in {run_dir}/answers; fix the cause and run "
              f"`python -m eval score {run_dir}`.", file=sys.stderr)
        code = 1
    if wb is not None:
        wb.finish()
        if wb.hung:  # a stuck W&B upload must not hold the run
            distmod.close(r.info)
            _exit_now(code)
    return code


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _reason(e: BaseException):
    """An exception's message as the user's error line (its first argument; a KeyError's without quotes)."""
    return e.args[0] if e.args else e


def _exit_now(code: int) -> None:
    """Leave at once (no barrier, no atexit hook: nothing left to wait for can hold the process)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _device(cfg: RunConfig, info: DistInfo):
    import torch

    if cfg.device:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def _cpu_threads(device) -> None:
    """On a CPU with several processes on this node and no OMP_NUM_THREADS: each process takes its share of
    the cores (torchrun sets 1 itself; the deepspeed launcher does not, and ranks that each start one thread
    per core run tensor-parallel collectives about 50x slower)."""
    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    if device.type == "cpu" and local > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def _fast_info(cfg: RunConfig, engine) -> dict | None:
    """What run_config.json / results.json record of the fast path (None without --fast): the backend as
    resolved on this device, CUDA graphs or not, the static cache's decode slots, and the method's refusal
    (every prefill then runs eagerly)."""
    fp = getattr(engine, "fast", None)
    if not cfg.fast or fp is None:
        return None
    return {"requested_backend": cfg.fast_backend, "backend": fp.backend, "cuda_graphs": bool(fp.cuda_graphs),
            "max_new_tokens": fp.max_new_tokens, "refusal": fp.refusal or None, "regional": fp.regional,
            "compile_cache": fp.cache_dir, "attention": fp.attention,
            # precompiled functions asked for (VTPRUNE_FAST_PRECOMPILE / load) and whether this torch gives them (a
            # torch without the ahead-of-time capture compiles the regular way: llava.fast.precompile)
            "precompile": bool(getattr(fp, "precompile_requested", False)),
            "precompile_active": getattr(fp, "precompile", None) is not None}


def _judge_cfg(cfg: RunConfig):
    from .judge import JudgeConfig

    return JudgeConfig.from_env(cfg.judge_base_url, cfg.judge_model, cfg.judge_api_key_env)


def _guess_launcher() -> str:
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    if any(a.startswith("--local_rank") for a in sys.argv):
        return "deepspeed"
    if distmod.slurm_step() is not None and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return "srun"
    return "python" if int(os.environ.get("WORLD_SIZE", "1")) == 1 else "unknown"
