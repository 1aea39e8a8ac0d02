"""Sharded, resumable inference for one benchmark, then merge -> official conversion -> score ->
results JSON (rank 0).

Sharding follows LLaVA's scripts: the question list is cut into ``world`` contiguous chunks of
ceil(N / world); rank r answers chunk r and appends its answer records to
``<run>/answers/{world}_{rank}.jsonl``, flushed (and fsynced) after every batch. A restarted run
skips every question already answered in *any* shard file of the run (so it may even restart
with a different number of processes) and cuts a torn last line before appending. After a
barrier, rank 0 merges: every question answered exactly once, records in question-file order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import dist as distmod
from .benchmarks import Benchmark, Question, get_benchmark
from .fingerprint import InputHasher, compare as fp_compare, data_fingerprint, model_fingerprint, question_hash, \
    template_fingerprint
from .io import JsonlAppender, NullAppender, complete_jsonl_records, read_json, write_json
from .provenance import env_info, git_info
from .resume import HASH_CACHE, plan_resume, set_aside

log = logging.getLogger("eval")

EVAL_KEY = "_eval"  # per-record bookkeeping in shard files (stripped from merge.jsonl)
SHARD_RE = re.compile(r"^(\d+)_(\d+)\.jsonl$")
#: config fields that must match to resume into an existing run directory
RESUME_KEYS = ("benchmark", "bench_options", "model", "method", "budget", "options", "max_new_tokens", "batch_size",
               "dtype", "next_layout", "num_frames", "pad_to_square", "seed", "limit", "template", "attn_implementation",
               "min_pixels", "max_pixels", "vision_dtype", "fast", "fast_backend", "fast_max_new_tokens", "backend", "tp")
#: what a resumed run's config.json lacks (written before the key existed) counts as this value
RESUME_DEFAULTS = {"fast": False, "fast_backend": "auto", "backend": "hf", "tp": 1}
#: who answers: our HF engine, or vLLM with the vtprune plugin (eval/vllm_backend.py)
BACKENDS = ("hf", "vllm")
#: the eager reason recorded for a prompt without an image / video (the stock forward: nothing to prune)
TEXT_ONLY_REASON = "text-only prompt (the stock model's forward: nothing to prune)"
#: families whose processor reads videos (Video-LLaVA); the others answer image / text benchmarks only
VIDEO_FAMILIES = ("video_llava",)
#: the ChatML families (Qwen2.5-VL, LLaVA-OneVision): their own preprocessing, no pad-to-square / NeXT layout options
CHATML_FAMILIES = ("qwen2_5_vl", "llava_onevision", "qwen3_vl", "internvl", "qwen3_5")
#: the Qwen-VL families (smart resize within [min_pixels, max_pixels], merged 2x2 tokens over a dynamic grid)
QWEN_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_5")
#: what a visual-token budget counts, per family (per-unit methods; README's Methods table for each method's convention)
BUDGET_UNITS = {
    "llava": "visual tokens per image (576 for LLaVA-1.5 at 336 px)",
    "llava_next": "visual tokens per crop (anyres: base crop + grid crops, per-unit methods)",
    "video_llava": "visual tokens per image / video frame",
    "qwen2_5_vl": "merged visual tokens per image after the PatchMerger (dynamic grid: (H/28)*(W/28) after "
                  "smart resize within [min_pixels, max_pixels])",
    "llava_onevision": "visual tokens per crop (anyres_max_9: base crop + grid crops, per-unit methods)",
    "qwen3_vl": "merged visual tokens per image after the merger (dynamic grid: (H/(2p))*(W/(2p)) after smart "
                "resize, p the patch size; each token's DeepStack rows follow it)",
    "qwen3_5": "merged visual tokens per image after the merger (dynamic grid as Qwen3-VL; hybrid LLM: in-LLM "
               "stages only where they read a full-attention layer)",
    "internvl": "visual tokens per tile (dynamic tiling: up to 12 tiles of 448 px + a thumbnail, 256 tokens each "
                "after the 2x2 pixel shuffle; per-unit methods)",
}


@dataclass
class RunConfig:
    benchmark: str
    model: str = "tiny:llava"
    method: str = "none"
    budget: int | None = None
    options: dict = field(default_factory=dict)
    bench_options: dict = field(default_factory=dict)
    data_root: str = "playground/data/eval"
    out: str = "runs"
    run_name: str | None = None
    batch_size: int = 1
    max_new_tokens: int | None = None  # None: the benchmark's protocol value
    dtype: str | None = None  # None: float16 on GPU, float32 on CPU
    device: str | None = None  # None: cuda:<local_rank> if available, else cpu
    attn_implementation: str = "sdpa"
    next_layout: str = "spatial_unpad"
    num_frames: int = 8
    pad_to_square: bool = True
    template: str | None = None
    min_pixels: int | None = None  # Qwen2.5-VL only: image area bounds (None: the checkpoint's values)
    vision_dtype: str | None = None  # CLIP families: the tower's dtype under a half-precision LLM (LLaVA's loader: fp32)
    max_pixels: int | None = None
    fast: bool = False  # llava.load(fast=True): planned + captured prefills where the method allows (llava/fastpath.py)
    fast_backend: str = "auto"  # torch.compile backend of the fast path (auto: inductor + CUDA graphs on a GPU)
    fast_max_new_tokens: int | None = None  # static-cache decode slots; None: the run's max_new_tokens
    backend: str = "hf"  # hf (our engine's generate) | vllm (vLLM + the vtprune plugin: eval/vllm_backend.py)
    tp: int = 1  # tensor-parallel size: groups of tp ranks share one model sharded by DeepSpeed AutoTP (llava/tp.py)
    seed: int = 0
    limit: int | None = None  # first N questions only (smoke runs; results marked partial)
    stop_after: int | None = None  # debug: exit abruptly (os._exit) after N batches of this process
    overlay_samples: int = 4
    table_samples: int = 32
    wandb: bool = True
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_group: str | None = None
    wandb_tags: list = field(default_factory=list)
    judge_base_url: str | None = None
    judge_model: str | None = None
    judge_api_key_env: str | None = None
    dist_backend: str | None = None
    dist_timeout_min: float = 720.0
    local_rank: int | None = None
    launcher: str | None = None
    overwrite: bool = False

    def resume_view(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: d[k] for k in RESUME_KEYS}


def _resume_mismatch(prev: dict, cfg: RunConfig) -> dict:
    """{key: (recorded, now)} of the resume keys that differ (a key the recorded config lacks counts as
    its default: run folders written before the key existed resume)."""
    return {k: (prev.get(k, RESUME_DEFAULTS.get(k)), v) for k, v in cfg.resume_view().items()
            if prev.get(k, RESUME_DEFAULTS.get(k)) != v}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def default_run_name(cfg: RunConfig) -> str:
    model = cfg.model.rstrip("/").split("/")[-1].replace(":", "-")
    parts = [model, cfg.method]
    if cfg.budget is not None:
        parts.append(f"b{cfg.budget}")
    if cfg.options:
        parts.append("-".join(f"{k}={v}" for k, v in sorted(cfg.options.items())))
    if cfg.next_layout != "spatial_unpad":
        parts.append(cfg.next_layout)
    if not cfg.pad_to_square:
        parts.append("crop")
    if cfg.min_pixels is not None:
        parts.append(f"minpx{cfg.min_pixels}")
    if cfg.max_pixels is not None:
        parts.append(f"maxpx{cfg.max_pixels}")
    if cfg.vision_dtype is not None:
        parts.append(f"vis{cfg.vision_dtype}")
    if cfg.fast:  # another numerics (last bits of the logits): never the eager run's folder
        parts.append("fast" if cfg.fast_backend == "auto" else f"fast-{cfg.fast_backend}")
    if cfg.backend != "hf":  # another engine's decoder: its own folder
        parts.append(cfg.backend)
    if cfg.tp > 1:  # sharded matmuls: the logits' last bits differ from one process's
        parts.append(f"tp{cfg.tp}")
    if cfg.limit is not None:
        parts.append(f"limit{cfg.limit}")
    name = "_".join(str(p) for p in parts)
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", name)[:150]


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.out) / cfg.benchmark / (cfg.run_name or default_run_name(cfg))


def chunk(items: list, world: int, rank: int) -> list:
    """LLaVA's split_list / get_chunk: contiguous chunks of ceil(N / world)."""
    if not items:
        return []
    size = math.ceil(len(items) / world)
    return items[rank * size:(rank + 1) * size]


def shard_files(run_dir: Path) -> list[Path]:
    d = run_dir / "answers"
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if SHARD_RE.match(p.name)),
                  key=lambda p: tuple(int(x) for x in SHARD_RE.match(p.name).groups()))


def answered_uids(run_dir: Path) -> set[str]:
    out = set()
    for p in shard_files(run_dir):
        for r in complete_jsonl_records(p):
            out.add(r[EVAL_KEY]["uid"])
    return out


def _short(v, n: int = 80) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


def _refuse(run_dir: Path, changes: list[str]) -> None:
    print(f"error: {run_dir} holds answers of a different configuration, changed since they were written: "
          f"{'; '.join(changes)}; use another --run-name / --out, or --overwrite to start over", file=sys.stderr)


class InputError(ValueError):
    """A question's image / video cannot be read (corrupt, truncated, unreadable): the run stops with one line
    naming the file and the question; the answers so far are on disk and the same command goes on."""


def read_input(q, fn, what: str, answered: int, shard: Path):
    """``fn()`` (question ``q``'s image or video loaded), or :class:`InputError` saying which file of which
    question, how many answers of this session are saved in ``shard``, and how to go on."""
    try:
        return fn()
    except (ValueError, OSError, RuntimeError) as e:
        n = f"{answered} answers of this session are saved in {shard}; " if answered else ""
        raise InputError(f"cannot read the {what} of question {q.uid}: {e}. {n}fix or restore the file and run the "
                         "same command again: it answers the questions left") from e


def check_inputs(bench: Benchmark, questions: list[Question]) -> list[str]:
    """Missing input files of the questions (images / videos), each once however many questions read it."""
    if hasattr(bench, "missing_inputs"):
        missing = [f"video {v}" for v in bench.missing_inputs(questions)]
    else:
        missing = [q.image for q in questions if isinstance(q.image, str) and not os.path.exists(q.image)]
    return list(dict.fromkeys(missing))


# ---------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------


class _Batches:
    """Consecutive questions grouped into batches of one modality (text-only ScienceQA problems
    never share a batch with image ones)."""

    def __init__(self, questions: list[Question], size: int):
        self.batches: list[list[Question]] = []
        cur: list[Question] = []
        for q in questions:
            if cur and (len(cur) >= size or cur[0].modality != q.modality):
                self.batches.append(cur)
                cur = []
            cur.append(q)
        if cur:
            self.batches.append(cur)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _sync(device):
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def run(cfg: RunConfig) -> int:
    """Entry point of ``python -m eval run`` on every rank. Returns the exit code."""
    import numpy as np
    import torch

    t_start = time.time()
    try:
        info = distmod.detect(cfg.local_rank, cfg.tp)
    except ValueError as e:  # a world that TP groups cannot divide, a rank outside the world
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format=f"[rank {info.rank}] %(levelname)s %(name)s: %(message)s")

    def user_error(msg) -> int:  # a bad input: one line, exit 2 (tracebacks are for bugs)
        if info.is_main:
            print(f"error: {msg}", file=sys.stderr)
        return 2

    # everything is validated before anything is written (issue 16, item 4)
    try:
        bench = get_benchmark(cfg.benchmark, cfg.data_root, **cfg.bench_options)
    except (KeyError, TypeError) as e:
        return user_error(e.args[0] if e.args else e)
    cfg.benchmark = bench.name
    if cfg.max_new_tokens is None:
        cfg.max_new_tokens = bench.max_new_tokens
    if cfg.batch_size < 1:
        return user_error(f"--batch-size must be >= 1, got {cfg.batch_size}")
    bad = _fast_check(cfg)
    if not bad and cfg.backend not in BACKENDS:
        bad = f"--backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}"
    if not bad and cfg.tp > 1:
        bad = _tp_check(cfg)
    if not bad and cfg.backend == "vllm":
        from .vllm_backend import check as vllm_check

        bad = vllm_check(cfg, info.world)
    if bad:
        return user_error(bad)
    from llava.method import get_method

    try:  # unknown method, budget <= 0, unknown option key: the method's own checks, before any model is loaded
        get_method(cfg.method, cfg.budget, **cfg.options)
    except (KeyError, ValueError, TypeError) as e:
        return user_error(e.args[0] if e.args else e)

    # data check before anything heavy
    from .datacheck import check_benchmark

    report = check_benchmark(bench, deep=False)
    if not report.ok_inference:
        if info.is_main:
            print(report.text(), file=sys.stderr)
        return 2
    try:
        questions = bench.load()
    except (ValueError, FileNotFoundError) as e:  # garbled / truncated question file: names path:line
        return user_error(f"cannot read the {bench.name} questions: {e}")
    if cfg.limit is not None:
        questions = questions[: cfg.limit]
    missing = check_inputs(bench, questions)
    if missing:
        if info.is_main:
            print(f"error: {len(missing)} input file(s) referenced by the {bench.name} questions are missing or empty under "
                  f"{cfg.data_root}, e.g.:\n  " + "\n  ".join(missing[:10]) +
                  f"\nRun `python -m eval check-data {bench.name} --data-root {cfg.data_root}` for where to get them.",
                  file=sys.stderr)
        return 2

    run_dir = run_dir_of(cfg)
    cfg_path = run_dir / "run_config.json"
    qhashes = {q.uid: question_hash(q, bench.root) for q in questions}
    data_fp = data_fingerprint(bench, questions) if info.is_main else None
    distmod.init(info, cfg.dist_backend, cfg.dist_timeout_min)
    try:
        prev_meta = None
        plan = None  # rank 0, resuming a folder with answers: which to keep, recompute, drop (eval/resume.py)
        if info.is_main:
            cfg_ok = True
            if cfg_path.exists() and not cfg.overwrite:
                prev_meta = read_json(cfg_path)
                prev = prev_meta.get("config", {})
                mismatch = _resume_mismatch(prev, cfg)
                has_answers = bool(answered_uids(run_dir))
                changes = [f"{k} ({_short(a)} -> {_short(b)})" for k, (a, b) in mismatch.items()]
                if has_answers and not changes:  # each answer against its question and inputs as they are now
                    plan = plan_resume(run_dir, shard_files(run_dir), questions, bench.root,
                                       InputHasher(bench.root, run_dir / HASH_CACHE), prev_meta.get("fingerprint"),
                                       data_fp)
                    if prev_meta.get("fingerprint") is None:
                        log.warning("%s has no fingerprint (written before they were recorded): its answers are checked "
                                    "against their question text; the fingerprint is recorded from now on", run_dir)
                if changes and has_answers:
                    _refuse(run_dir, changes)
                    cfg_ok = False
                elif changes:  # a folder with no answers never blocks a new configuration
                    log.info("%s holds no answers: its run_config.json is replaced by the new configuration", run_dir)
                    prev_meta = None
        else:
            cfg_ok = None
        cfg_ok = distmod.broadcast_object(info, cfg_ok)
        if not cfg_ok:
            return 2

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        if cfg.device:
            device = torch.device(cfg.device)
        elif torch.cuda.is_available():
            device = torch.device("cuda", info.local_rank % max(torch.cuda.device_count(), 1))
        else:
            device = torch.device("cpu")
        _cpu_threads(device)
        dtype = cfg.dtype or ("float16" if device.type == "cuda" else "float32")

        from llava.models import load

        try:  # unknown tiny / shape name, no such hub id or directory, not a LLaVA-family checkpoint
            # tp > 1: loaded on the CPU (a checkpoint's safetensors are memory-mapped: the node's ranks share the page
            # cache), then AutoTP moves this rank's shard and the replicated towers to its GPU
            rt = load(cfg.model, dtype=dtype, device=torch.device("cpu") if cfg.tp > 1 else device,
                      attn_implementation=cfg.attn_implementation,
                      template=cfg.template, next_layout=cfg.next_layout, num_frames=cfg.num_frames,
                      pad_to_square=cfg.pad_to_square, seed=cfg.seed, min_pixels=cfg.min_pixels,
                      max_pixels=cfg.max_pixels, vision_dtype=cfg.vision_dtype, fast=cfg.fast,
                      fast_backend=cfg.fast_backend, fast_max_new_tokens=cfg.fast_max_new_tokens or 256,
                      decoder_layers=0 if cfg.backend == "vllm" else None)  # vllm: prompts + checks only
        except (ValueError, OSError) as e:
            return user_error(f"cannot load model {cfg.model!r}: {e.args[0] if e.args else e}")
        bad = _family_check(cfg, rt, questions)
        if bad:
            return user_error(bad)
        if cfg.tp > 1 or (cfg.launcher or _guess_launcher()) == "deepspeed":  # deepspeed.init_inference on every rank
            from llava.tp import TPGroups, deepspeed_inference

            try:  # tp > 1: the language model sharded across this rank's group (AutoTP), the towers replicated
                rt = deepspeed_inference(rt, tp_size=cfg.tp, dtype=dtype, groups=TPGroups(cfg.tp) if cfg.tp > 1 else None)
            except (RuntimeError, ValueError) as e:  # no deepspeed; a model the LM-only policy cannot shard
                return user_error(str(e))
            if next(rt.model.parameters()).device != device:  # DeepSpeed's current device is not the run's (--device)
                rt.model.to(device)
        try:  # checks that need the model (e.g. an LLM layer out of range)
            engine = rt.prune(cfg.method, cfg.budget, **cfg.options)
        except (KeyError, ValueError, TypeError) as e:
            return user_error(e.args[0] if e.args else e)
        fast_info = _fast_info(cfg, engine)
        if fast_info and fast_info.get("refusal") and info.is_main:  # said, never silent: every prefill runs eagerly
            log.warning("--fast: %s runs every prefill on the eager engine: %s", cfg.method, fast_info["refusal"])
        vb = None
        if cfg.backend == "vllm":  # vLLM's engine with the plugin: the decoder is vLLM's
            from .vllm_backend import VllmBackend

            try:
                vb = VllmBackend(cfg, rt, dtype)
            except ValueError as e:  # a method or model the plugin cannot run: the reason
                return user_error(e.args[0] if e.args else e)
        resolved = {
            "method_config": engine.method.config(),
            "llm_layers": list(engine.llm_layers),
            "vision_stage": bool(engine.method.vision_stage),
            "model": {**model_info(cfg, rt, dtype), "decoder_layers": len(engine.lm.layers), **rt.info},
            "generation": {"do_sample": False, "num_beams": 1, "use_cache": True, "max_new_tokens": cfg.max_new_tokens,
                           "batch_size": cfg.batch_size},
            "fast": fast_info,
            "backend": vb.info if vb is not None else {"name": "hf"},
            "benchmark": bench.config(),
            "world_size": info.world,
            "tensor_parallel": {"tp": info.tp, "groups": info.dp},
            "launcher": cfg.launcher or _guess_launcher(),
            "git": git_info(),
            "env": env_info(device),
        }
        fingerprint = {"data": data_fp, "template": template_fingerprint(rt.template),
                       "model": model_fingerprint(cfg.model, cfg.seed, rt.model.config),
                       "method": {"method": cfg.method, "budget": cfg.budget, "options": cfg.options,
                                  "config": resolved["method_config"]},
                       "dtype": dtype, "code": resolved["git"]}
        if fast_info:  # the fast path changes the logits in the last bits (padded GEMM shapes, the compiler)
            fingerprint["fast"] = {k: fast_info[k] for k in ("backend", "cuda_graphs", "max_new_tokens")}
        if vb is not None:  # another engine's decoder (and its version)
            fingerprint["backend"] = {k: vb.info[k] for k in ("name", "version")}
        if info.is_main:  # the parts that need the model: template, weights, resolved method, dtype
            cfg_ok = True
            if prev_meta is not None and "fingerprint" in prev_meta and answered_uids(run_dir):
                changes, warnings = fp_compare(prev_meta["fingerprint"], fingerprint)  # run-wide parts only
                for w in warnings:
                    log.warning("%s: resuming answers written under another %s (kept: only the code changed; "
                                "run_config.json lists every code version under 'code_versions')", run_dir, w)
                if changes:
                    _refuse(run_dir, changes)
                    cfg_ok = False
        else:
            cfg_ok = None
        if not distmod.broadcast_object(info, cfg_ok):
            return 2
        if info.is_main:  # method, options, budget, data and model are good: now the run folder is written
            if cfg.overwrite and run_dir.exists():
                for p in shard_files(run_dir) + [run_dir / "merge.jsonl", run_dir / "results.json", cfg_path]:
                    if p.exists():
                        p.unlink()
            run_dir.mkdir(parents=True, exist_ok=True)
            meta = {"config": dataclasses.asdict(cfg), "created": (prev_meta or {}).get("created") or _now()}
            meta["resolved"] = resolved
            meta["fingerprint"] = fingerprint
            versions = []  # every code version that wrote answers into this folder
            for v in (list((prev_meta or {}).get("code_versions") or []) +
                      [((prev_meta or {}).get("fingerprint") or {}).get("code"), fingerprint["code"]]):
                if v and v not in versions:
                    versions.append(v)
            meta["code_versions"] = versions
            meta["resumes"] = list((prev_meta or {}).get("resumes") or [])
            if plan is not None:  # stale answers aside before any rank looks for what is answered
                aside = set_aside(run_dir, plan)
                for note in plan.data_notes:
                    log.info("%s: since the last session: %s", run_dir, note)
                log.info("%s: %s%s", run_dir, plan.summary(),
                         f" (the old answers recomputed are kept in {aside.relative_to(run_dir)})" if aside else "")
                meta["resumes"].append({"at": _now(), **plan.as_dict(),
                                        "superseded": str(aside.relative_to(run_dir)) if aside else None})
            write_json(cfg_path, meta)
        distmod.barrier(info)  # --overwrite: the old answers are gone before any rank looks for them
        mine = chunk(questions, info.dp, info.dp_rank)  # one shard per tensor-parallel group (a rank when tp = 1)
        done = answered_uids(run_dir)
        todo = [q for q in mine if q.uid not in done]
        if info.tp > 1:  # a group's ranks run the same batches: all read what is answered before its writer appends
            distmod.barrier(info)
        log.info("%s: %d questions, this rank %d (%d already answered, %d to go), world %d%s",
                 bench.name, len(questions), len(mine), len(mine) - len(todo), len(todo), info.world,
                 f" (tensor-parallel group {info.dp_rank} of {info.dp}, {'writer' if info.writes else 'not writing'})"
                 if info.tp > 1 else "")

        wb = None
        if info.is_main:
            from .wandb_log import WandbLogger, run_config, run_identity

            # name <bench>/<run-name>; group <bench>/<model> (every method and budget); job_type = the budget
            ident = run_identity(bench.name, cfg.model, cfg.method, cfg.budget, run_dir.name, family=rt.family,
                                 options=cfg.options, group=cfg.wandb_group, extra_tags=cfg.wandb_tags)
            wb = WandbLogger(enabled=cfg.wandb, project=cfg.wandb_project, entity=cfg.wandb_entity, **ident,
                             config=run_config(dataclasses.asdict(cfg), resolved, bench.name, len(questions),
                                               run_dir.name, str(run_dir)),
                             dir=str(run_dir))

        try:
            if vb is not None:
                from .vllm_backend import infer as vllm_infer

                vllm_infer(cfg, bench, vb, todo, run_dir, info, qhashes)
            else:
                _infer(cfg, bench, rt, engine, todo, run_dir, info, device, wb, n_total=len(questions),
                       n_done=len(done), qhashes=qhashes)
        except InputError as e:  # this rank's input: one line from it (the answers so far are on disk)
            if info.writes:  # a tensor-parallel group's ranks read the same input: its writer says it
                print(f"error: {e}", file=sys.stderr)
            if info.world > 1:  # the other ranks wait at a barrier: exit, the launcher stops them
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
            if wb is not None:
                wb.finish()
            return 2
        distmod.barrier(info)
        code = 0
        if info.is_main:
            from .results import score_run

            try:
                results = score_run(run_dir, data_root=cfg.data_root, wall_s=time.time() - t_start, wandb=wb,
                                    judge_cfg=_judge_cfg(cfg))
                if wb is not None:  # scores by variant, tokens, TTFT, the answers table (never raises)
                    from .wandb_log import log_results

                    log_results(wb, results, run_dir, cfg.data_root)
                results = add_path_summary(run_dir, results)
                _print_summary(results)
            except Exception as e:  # noqa: BLE001 - answers are safe on disk; report and fail
                log.exception("merge / scoring failed: %s", e)
                print(f"error: merge / scoring failed: {e}\nAnswers are kept in {run_dir}/answers; fix the cause and run "
                      f"`python -m eval score {run_dir}`.", file=sys.stderr)
                code = 1
            if wb is not None:
                wb.finish()
                if wb.hung:  # a stuck W&B upload must not hold the run
                    distmod.close(info)
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
        return code
    finally:
        distmod.close(info)


def _fast_info(cfg: RunConfig, engine) -> dict | None:
    """What run_config.json / results.json record of the fast path (None without --fast): the backend as
    resolved on this device, CUDA graphs or not, the static cache's decode slots, and the method's refusal
    (every prefill then runs eagerly)."""
    fp = getattr(engine, "fast", None)
    if not cfg.fast or fp is None:
        return None
    return {"requested_backend": cfg.fast_backend, "backend": fp.backend, "cuda_graphs": bool(fp.cuda_graphs),
            "max_new_tokens": fp.max_new_tokens, "refusal": fp.refusal or None}


def _tp_check(cfg: RunConfig) -> str | None:
    """Tensor parallelism (``--tp`` > 1): one error line for what it cannot run with, or None."""
    if cfg.backend != "hf":
        return (f"--tp {cfg.tp} shards our engine's model with DeepSpeed AutoTP; --backend {cfg.backend} has its own "
                "tensor parallelism (vLLM: tensor_parallel_size), run it with --tp 1")
    if cfg.fast:
        return (f"--tp {cfg.tp} runs the eager engine: the fast path's captured prefills do not capture AutoTP's "
                "all-reduces; drop --fast")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return f"--tp {cfg.tp} needs DeepSpeed: pip install -e '.[deepspeed]' (scripts/install.sh builds it)"
    return None


def _cpu_threads(device) -> None:
    """On a CPU with several processes on this node and no OMP_NUM_THREADS: each process takes its share of
    the cores (torchrun sets 1 itself; the deepspeed launcher does not, and ranks that each start one thread
    per core run tensor-parallel collectives about 50x slower)."""
    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    if device.type == "cpu" and local > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def _fast_check(cfg: RunConfig) -> str | None:
    """The fast-path options (after ``max_new_tokens`` is resolved): one error line, or None. Resolves
    ``fast_max_new_tokens`` to the run's ``max_new_tokens`` when not given."""
    from llava.fastpath import BACKENDS

    if not cfg.fast:
        if cfg.fast_backend != "auto" or cfg.fast_max_new_tokens is not None:
            return "--fast-backend / --fast-max-new-tokens apply with --fast only"
        return None
    if cfg.fast_backend not in BACKENDS:
        return f"--fast-backend must be one of {', '.join(BACKENDS)}, got {cfg.fast_backend!r}"
    if cfg.fast_max_new_tokens is None:
        cfg.fast_max_new_tokens = cfg.max_new_tokens
    if cfg.fast_max_new_tokens < cfg.max_new_tokens:
        return (f"--fast-max-new-tokens {cfg.fast_max_new_tokens} < --max-new-tokens {cfg.max_new_tokens}: the fast "
                "path's static cache would run out mid-answer (leave it out: it follows --max-new-tokens)")
    return None


def path_summary(metas: list[dict], fast: bool) -> dict:
    """Which path the prefills of a run's answers took, per sample (a batch's prefill counts for each of its
    samples): ``{"requested": "fast" | "eager", "fast": n, "eager": n, "eager_reasons": {reason: n},
    "new_graphs": n}`` (``new_graphs``: fast prefills that compiled / captured a graph, their time included;
    ``unrecorded``: answers written before paths were recorded)."""
    out: dict = {"requested": "fast" if fast else "eager", "unit": "samples"}
    reasons: dict = {}
    for m in metas:
        p = m.get("path", "unrecorded")
        out[p] = out.get(p, 0) + 1
        if p == "eager" and fast:
            r = m.get("path_reason") or "not recorded"
            reasons[r] = reasons.get(r, 0) + 1
        if m.get("new_graph"):
            out["new_graphs"] = out.get("new_graphs", 0) + 1
    if reasons:
        out["eager_reasons"] = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    return out


def add_path_summary(run_dir: Path, results: dict) -> dict:
    """Add ``paths`` (:func:`path_summary` of every answer of the run) to ``results`` and its results.json."""
    cfg = results.get("config") or {}
    uids, metas = set(), []
    for p in shard_files(Path(run_dir)):
        for r in complete_jsonl_records(p):
            m = r[EVAL_KEY]
            if m["uid"] not in uids:  # the merge checked that every question is answered exactly once
                uids.add(m["uid"])
                metas.append(m)
    results["paths"] = path_summary(metas, bool(cfg.get("fast")))
    files = results.get("files") or {}
    write_json(Path(files.get("results") or Path(run_dir) / "results.json"), results)
    return results


def _family_check(cfg: RunConfig, rt, questions: list[Question]) -> str | None:
    """Options and benchmarks the loaded model's family cannot take (known only once it is loaded: a hub
    id or a local folder names no family), as one error line; None when the run can go."""
    fam = rt.family
    if any(q.modality == "video" for q in questions) and fam not in VIDEO_FAMILIES:
        return (f"{cfg.benchmark} asks about videos, which the {fam} processor does not take "
                f"(video QA runs with Video-LLaVA: {', '.join(VIDEO_FAMILIES)})")
    if (cfg.min_pixels is not None or cfg.max_pixels is not None) and fam not in QWEN_FAMILIES:
        return f"--min-pixels / --max-pixels apply to Qwen2.5-VL / Qwen3-VL only, not to {cfg.model} ({fam})"
    if fam in CHATML_FAMILIES:
        if not cfg.pad_to_square:
            return f"--no-pad does not apply to {cfg.model} ({fam}: the checkpoint's own image processor, no pad-to-square)"
        if cfg.next_layout != "spatial_unpad":
            return f"--next-layout applies to LLaVA-NeXT only, not to {cfg.model} ({fam})"
    return None


def model_info(cfg: RunConfig, rt, dtype: str) -> dict:
    """What results.json records about the model: id, family (``llava`` / ``llava_next`` / ``video_llava`` /
    ``qwen2_5_vl`` / ``llava_onevision``), template, the preprocessing actually applied and what a budget counts."""
    vc = rt.model.config.vision_config
    info = {"id": cfg.model, "name": rt.name, "family": rt.family, "dtype": dtype, "template": rt.template.name,
            "budget_unit": BUDGET_UNITS.get(rt.family, "visual tokens (method convention)")}
    if rt.family in QWEN_FAMILIES:
        ip = rt.processor.image_processor
        size = getattr(ip, "size", None)
        lo = getattr(size, "shortest_edge", None) or getattr(ip, "min_pixels", None)  # transformers 5 keeps them in size
        hi = getattr(size, "longest_edge", None) or getattr(ip, "max_pixels", None)
        f = vc.patch_size * vc.spatial_merge_size
        info.update(preprocess="qwen smart_resize", min_pixels=None if lo is None else int(lo),
                    max_pixels=None if hi is None else int(hi), patch_size=vc.patch_size,
                    spatial_merge_size=vc.spatial_merge_size,
                    tokens_per_image=f"dynamic: (H/{f})*(W/{f}) after smart resize within [min_pixels, max_pixels]")
        return info
    info.update(next_layout=rt.processor.next_layout, num_frames=rt.processor.num_frames,
                image_size=vc.image_size, patch_size=vc.patch_size)
    if rt.family == "internvl":
        ip = rt.processor.image_processor
        info.update(preprocess="dynamic tiling (crop_to_patches, thumbnail)", min_tiles=int(ip.min_patches),
                    max_tiles=int(ip.max_patches), tokens_per_tile=rt.processor.tokens_per_crop)
        for k in ("next_layout", "num_frames"):
            info.pop(k)
        return info
    if rt.family == "llava_onevision":
        info.update(preprocess=f"anyres ({getattr(rt.model.config, 'vision_aspect_ratio', 'anyres_max_9')})",
                    tokens_per_crop=rt.processor.tokens_per_crop)
        info.pop("next_layout")
        info.pop("num_frames")
        return info
    info["preprocess"] = "pad" if rt.processor.pad_to_square else "crop"
    return info


def _overlay(rt, inputs, b: int, img, keep: list[int], video: bool, pad_to_square: bool):
    """The kept-token picture of sample ``b``'s unit 0 (the image; NeXT's / OneVision's base crop; a video's
    first frame) in its family's geometry."""
    from .overlay import grid_overlay, kept_overlay, view_mode

    vc = rt.model.config.vision_config
    if rt.family in QWEN_FAMILIES:  # merged tokens of the first image in raster order over its own grid
        thw = inputs["image_grid_thw"]
        first = int((inputs["mm_token_type_ids"][:b] == 1).any(-1).sum()) if b else 0  # images of earlier samples
        _, gh, gw = (int(x) for x in thw[first])
        m = vc.spatial_merge_size
        view = img.convert("RGB").resize((gw * vc.patch_size, gh * vc.patch_size), resample=3)
        rows, cols = gh // m, gw // m
        return grid_overlay(view, rows, cols, sorted({i for i in keep if 0 <= i < rows * cols}))
    if rt.family == "internvl":  # the image's last tile is the whole image (the thumbnail, or the only tile)
        n = rt.processor.tokens_per_crop
        total = int((inputs["input_ids"][b] == rt.model.config.image_token_id).sum())
        side = vc.image_size[0]
        grid = int(round(n ** 0.5))
        view = img.convert("RGB").resize((side, side), resample=3)
        return grid_overlay(view, grid, grid, sorted({i - (total - n) for i in keep if total - n <= i < total}))
    if rt.family == "llava_onevision":  # base crop: the whole image resized to the tower's square
        grid = vc.image_size // vc.patch_size
        n = rt.processor.tokens_per_crop
        shift = grid * grid - n  # 'default' drops the first token
        view = img.convert("RGB").resize((vc.image_size, vc.image_size), resample=3)
        return grid_overlay(view, grid, grid, sorted({i + shift for i in keep if 0 <= i < n}))
    grid = vc.image_size // vc.patch_size
    mode = view_mode(rt.family, video, pad_to_square)
    return kept_overlay(img, mode, grid, vc.image_size, keep, cls_first=video)


def _judge_cfg(cfg: RunConfig):
    from .judge import JudgeConfig

    return JudgeConfig.from_env(cfg.judge_base_url, cfg.judge_model, cfg.judge_api_key_env)


def _guess_launcher() -> str:
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    if any(a.startswith("--local_rank") for a in sys.argv):
        return "deepspeed"
    return "python" if int(os.environ.get("WORLD_SIZE", "1")) == 1 else "unknown"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _infer(cfg, bench, rt, engine, todo, run_dir, info, device, wb, n_total, n_done, qhashes=None):
    import torch
    from tqdm import tqdm

    from llava.preprocess import load_image

    shard = run_dir / "answers" / f"{info.dp}_{info.dp_rank}.jsonl"
    overlay_dir = run_dir / "overlays"
    overlays_left = cfg.overlay_samples if info.writes else 0
    batches = _Batches(todo, cfg.batch_size)
    model_id = cfg.model.rstrip("/").split("/")[-1]
    answered = 0
    warned_noop = False
    sums = {"in": 0.0, "avg": 0.0, "n": 0}
    hasher = InputHasher(bench.root)  # each answer records the content hash of the inputs it read

    def read(q, fn, what):
        return read_input(q, fn, what, answered, shard)

    with (JsonlAppender(shard) if info.writes else NullAppender()) as out:  # a group's other ranks write nothing
        tty = sys.stderr.isatty()
        bar = tqdm(batches, total=len(batches), desc=f"{bench.name} rank {info.rank}/{info.world}",
                   mininterval=5 if tty else 60, dynamic_ncols=tty)
        for nb, batch in enumerate(bar):
            texts = [q.text for q in batch]
            hashes = [hasher.inputs(q) for q in batch]  # before reading: what was read is at least this recent
            if batch[0].modality == "video":
                from .benchmarks.videoqa import load_video

                videos = [read(q, lambda q=q: load_video(q.video, rt.processor.num_frames), "video") for q in batch]
                inputs = rt.processor(texts, videos=videos, device=device)
                pil = None
            elif batch[0].modality == "image":
                pil = [read(q, lambda q=q: load_image(q.load_image()), "image") for q in batch]
                inputs = rt.processor(texts, images=pil, device=device)
            else:
                pil = None
                inputs = rt.processor(texts, images=[None] * len(batch), device=device)
            has_visual = "pixel_values" in inputs or "pixel_values_videos" in inputs
            engine.sample_keys = [q.uid for q in batch]
            prefills = engine.prefills
            _sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                gen = rt.model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=1,
                                        use_cache=True)
            _sync(device)
            t_gen = time.perf_counter() - t0
            engine.sample_keys = None
            new = gen[:, inputs["input_ids"].shape[1]:]
            outs = rt.processor.decode(new)
            if has_visual and engine.prefills != prefills + 1:
                raise RuntimeError("the pruning engine did not handle this batch's prefill (token accounting would be stale)")
            stats = engine.stats if has_visual else None
            eos = rt.tokenizer.eos_token_id
            pad = rt.tokenizer.pad_token_id
            recs = []
            for b, (q, text) in enumerate(zip(batch, outs)):
                rec = bench.record(q, bench.postprocess(text), model_id)
                row = new[b].tolist()
                n_new = next((i + 1 for i, t in enumerate(row) if t == eos), len(row) - sum(1 for t in row if t == pad))
                meta = {"uid": q.uid, "idx": q.idx, "qhash": (qhashes or {}).get(q.uid), "inputs": hashes[b],
                        "rank": info.rank, "batch": len(batch), "new_tokens": n_new, "time": {"generate": t_gen / len(batch)}}
                if stats is not None:
                    s = stats.samples[b].as_dict()
                    meta.update(visual_candidates=s["visual_candidates"], visual_entering_llm=s["visual_entering_llm"],
                                visual_layer_avg=s["visual_layer_avg"], visual_per_layer=s["visual_per_layer"],
                                vision_noop=s.get("vision_noop", False))
                    if (s.get("vision_noop") and s["visual_layer_avg"] >= s["visual_candidates"] and not warned_noop
                            and cfg.budget is not None):  # nothing pruned anywhere (LLM-stage methods: vision_noop always)
                        warned_noop = True  # said once, at the first sample it happens to
                        log.warning("budget %s >= the %d visual tokens of %s: nothing is pruned there (results.json "
                                    "records the effective budget under 'budget')", cfg.budget, s["visual_candidates"], q.uid)
                    meta["time"].update({k: v / len(batch) for k, v in stats.timings.items()})
                    sums["in"] += s["visual_entering_llm"]
                    sums["avg"] += s["visual_layer_avg"]
                    sums["n"] += 1
                    meta["path"] = stats.path  # which path ran this batch's prefill (and why eager, under --fast)
                    if stats.path == "fast":
                        meta["bucket"] = stats.bucket
                        if stats.new_graph:  # compiled / captured here: its time includes the compilation
                            meta["new_graph"] = True
                    elif cfg.fast:
                        meta["path_reason"] = stats.path_reason or "not given by the engine"
                else:
                    meta["path"] = "eager"
                    if cfg.fast:
                        meta["path_reason"] = TEXT_ONLY_REASON
                # the fast path records no selections (its kept indices stay on the device): overlays of eager prefills only
                if (overlays_left > 0 and stats is not None and stats.path == "eager"
                        and ("vision", b) in engine.selections):
                    try:
                        sel = engine.selections[("vision", b)]
                        keep = sel.keep.tolist() + ([] if sel.targets is None else sel.targets.tolist())
                        img = pil[b] if pil is not None else _first_frame(q, rt)
                        ov = _overlay(rt, inputs, b, img, keep, batch[0].modality == "video", rt.processor.pad_to_square)
                        overlay_dir.mkdir(parents=True, exist_ok=True)
                        path = overlay_dir / f"{_safe(q.uid)}.png"
                        ov.save(path)
                        meta["overlay"] = str(path.relative_to(run_dir))
                        overlays_left -= 1
                    except Exception as e:  # noqa: BLE001 - a picture must never stop the run
                        log.warning("overlay for %s failed: %s", q.uid, e)
                rec[EVAL_KEY] = meta
                recs.append(rec)
            out.write(recs)
            out.flush()
            answered += len(batch)
            if wb is not None and wb.active:
                logd = {"progress/answered_rank0": answered, "progress/fraction_rank0": answered / max(len(todo), 1),
                        "time/generate_s_per_sample": t_gen / len(batch)}
                if sums["n"]:
                    logd.update({"tokens/entering_llm_mean": sums["in"] / sums["n"],
                                 "tokens/layer_avg_mean": sums["avg"] / sums["n"]})
                wb.log(logd)
            if cfg.stop_after is not None and nb + 1 >= cfg.stop_after:
                log.warning("--stop-after %d: exiting abruptly (simulated crash)", cfg.stop_after)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(3)
        bar.close()


def _first_frame(q, rt):
    from .benchmarks.videoqa import load_video

    return load_video(q.video, rt.processor.num_frames)[0]


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s)[:100]


def _print_summary(results: dict) -> None:
    fam = results["model"].get("family")
    print(f"\n== {results['benchmark']} | {results['model']['id']}{f' ({fam})' if fam else ''} | {results['method'].get('method')} "
          f"budget={results['method'].get('budget')} ==")
    for k, v in results["metrics"].items():
        print(f"  {k:<24} {v:10.2f}   {results['metric_labels'].get(k, '')}")
    t = results.get("tokens", {})
    if t.get("samples"):
        print(f"  visual tokens: {t['visual_candidates_mean']:.1f} candidates -> {t['tok_in']:.1f} entering the LLM "
              f"(tok-in), {t['tok_eq']:.1f} layer-averaged (tok-eq)")
    b = results.get("budget") or {}
    if b.get("unpruned_samples"):
        print(f"  budget: {b['note']}; effective budget {b['effective'] if b['effective'] is not None else 'none (unpruned)'}")
    paths = results.get("paths")
    if paths and (paths.get("requested") == "fast" or paths.get("fast")):
        n = {k: paths[k] for k in ("fast", "eager", "unrecorded") if paths.get(k)}
        line = ", ".join(f"{k} {v}" for k, v in n.items())
        if paths.get("new_graphs"):
            line += f" ({paths['new_graphs']} compiled a new graph)"
        print(f"  prefill paths (samples): {line}")
        for r, c in (paths.get("eager_reasons") or {}).items():
            print(f"    eager x{c}: {r}")
    for p in results.get("pending", []):
        print(f"  pending: {p}")
    print(f"  results: {results['files']['results']}")
