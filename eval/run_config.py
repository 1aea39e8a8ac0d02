"""What one ``eval run`` is: its configuration (:class:`RunConfig`, the command line's options), which of
them must match to resume into an existing run folder, the folder's name, and the option checks made
before anything is loaded or written (each one error line, or None)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

#: config fields that must match to resume into an existing run directory. ``limit`` is not one: a resume may
#: extend (or lift) ``--limit`` - the answers made keep, only the new questions are answered - and a smaller limit
#: leaves the answers beyond it out of the score (kept on disk, used again when the limit grows)
RESUME_KEYS = ("benchmark", "bench_options", "model", "method", "budget", "options", "max_new_tokens", "batch_size",
               "dtype", "next_layout", "num_frames", "pad_to_square", "seed", "template", "attn_implementation",
               "min_pixels", "max_pixels", "vision_dtype", "fast", "fast_backend", "fast_max_new_tokens", "backend", "tp",
               "revision", "next_geometry", "fast_attention")
#: what a resumed run's config.json lacks (written before the key existed) counts as this value
RESUME_DEFAULTS = {"fast": False, "fast_backend": "auto", "backend": "hf", "tp": 1, "revision": None,
                   "next_geometry": "transformers", "fast_attention": "auto"}
#: who answers: our HF engine, or vLLM with the vtprune plugin (eval/vllm_backend.py)
BACKENDS = ("hf", "vllm")


@dataclass
class RunConfig:
    benchmark: str
    model: str = "tiny:llava"
    revision: str | None = None  # the hub id's branch / tag / commit (None: main); the commit read is fingerprinted
    method: str = "none"
    budget: int | None = None
    options: dict = field(default_factory=dict)
    bench_options: dict = field(default_factory=dict)
    data_root: str = "playground/data/eval"
    out: str = "runs"
    run_name: str | None = None
    batch_size: int = 1
    loader_workers: int | None = None  # processes preparing the next batches' inputs (None: eval.loader.default_workers)
    max_new_tokens: int | None = None  # None: the benchmark's protocol value
    dtype: str | None = None  # None: float16 on GPU, float32 on CPU
    device: str | None = None  # None: cuda:<local_rank> if available, else cpu
    attn_implementation: str = "sdpa"
    next_layout: str = "spatial_unpad"
    next_geometry: str = "transformers"  # LLaVA-NeXT: transformers' anyres geometry or LLaVA's ("official")
    num_frames: int = 8
    pad_to_square: bool = True
    template: str | None = None
    min_pixels: int | None = None  # Qwen2.5-VL only: image area bounds (None: the checkpoint's values)
    vision_dtype: str | None = None  # CLIP families: the tower's dtype under a half-precision LLM (LLaVA's loader: fp32)
    max_pixels: int | None = None
    fast: bool = False  # llava.load(fast=True): planned + captured prefills where the method allows (llava/fast/path.py)
    fast_backend: str = "auto"  # torch.compile backend of the fast path (auto: inductor + CUDA graphs on a GPU)
    fast_max_new_tokens: int | None = None  # static-cache decode slots; None: the run's max_new_tokens
    fast_attention: str = "auto"  # the prompt's attention over its bucket: causal kernel / 4-D mask (llava.fast.attention)
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


def resume_mismatch(prev: dict, cfg: RunConfig) -> dict:
    """{key: (recorded, now)} of the resume keys that differ (a key the recorded config lacks counts as
    its default: run folders written before the key existed resume)."""
    return {k: (prev.get(k, RESUME_DEFAULTS.get(k)), v) for k, v in cfg.resume_view().items()
            if prev.get(k, RESUME_DEFAULTS.get(k)) != v}


def _option_parts(k: str, v) -> str:
    """``k=v`` in a run folder's name; a dict option (an add-on's ``base_options``) one ``k.key=value`` per entry."""
    if isinstance(v, dict):
        return "-".join(_option_parts(f"{k}.{a}", b) for a, b in sorted(v.items())) if v else f"{k}=none"
    return f"{k}={v}"


def default_run_name(cfg: RunConfig) -> str:
    model = cfg.model.rstrip("/").split("/")[-1].replace(":", "-")
    parts = [model] + ([f"rev-{cfg.revision[:12]}"] if cfg.revision is not None else []) + [cfg.method]
    if cfg.budget is not None:
        parts.append(f"b{cfg.budget}")
    if cfg.options:
        parts.append("-".join(_option_parts(k, v) for k, v in sorted(cfg.options.items())))
    if cfg.next_layout != "spatial_unpad":
        parts.append(cfg.next_layout)
    if cfg.next_geometry != "transformers":
        parts.append(f"geom-{cfg.next_geometry}")
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
        if cfg.fast_attention != "auto":
            parts.append(f"attn-{cfg.fast_attention}")
    if cfg.backend != "hf":  # another engine's decoder: its own folder
        parts.append(cfg.backend)
    if cfg.tp > 1:  # sharded matmuls: the logits' last bits differ from one process's
        parts.append(f"tp{cfg.tp}")
    name = "_".join(str(p) for p in parts)
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", name)[:150]


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.out) / cfg.benchmark / (cfg.run_name or default_run_name(cfg))


def option_error(cfg: RunConfig, world: int) -> str | None:
    """The run options that cannot go together (after ``max_new_tokens`` is resolved), as one error line;
    None when they can. ``world``: the number of processes (``--backend vllm`` runs in one)."""
    if cfg.batch_size < 1:
        return f"--batch-size must be >= 1, got {cfg.batch_size}"
    if cfg.loader_workers is not None and cfg.loader_workers < 0:
        return f"--loader-workers must be >= 0 (0: the inputs prepared in the answering loop), got {cfg.loader_workers}"
    bad = fast_check(cfg)
    if not bad and cfg.backend not in BACKENDS:
        bad = f"--backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}"
    if not bad and cfg.tp > 1:
        bad = tp_check(cfg)
    if not bad and cfg.backend == "vllm":
        from .vllm_backend import check as vllm_check

        bad = vllm_check(cfg, world)
    return bad


def fast_check(cfg: RunConfig) -> str | None:
    """The fast-path options (after ``max_new_tokens`` is resolved): one error line, or None. Resolves
    ``fast_max_new_tokens`` to the run's ``max_new_tokens`` when not given."""
    from llava.fast.path import BACKENDS as FAST_BACKENDS

    from llava.fast.attention import MODES

    if not cfg.fast:
        if cfg.fast_backend != "auto" or cfg.fast_max_new_tokens is not None or cfg.fast_attention != "auto":
            return "--fast-backend / --fast-max-new-tokens / --fast-attention apply with --fast only"
        return None
    if cfg.fast_backend not in FAST_BACKENDS:
        return f"--fast-backend must be one of {', '.join(FAST_BACKENDS)}, got {cfg.fast_backend!r}"
    if cfg.fast_attention not in MODES:
        return f"--fast-attention must be one of {', '.join(MODES)}, got {cfg.fast_attention!r}"
    if cfg.fast_max_new_tokens is None:
        cfg.fast_max_new_tokens = cfg.max_new_tokens
    if cfg.fast_max_new_tokens < cfg.max_new_tokens:
        return (f"--fast-max-new-tokens {cfg.fast_max_new_tokens} < --max-new-tokens {cfg.max_new_tokens}: the fast "
                "path's static cache would run out mid-answer (leave it out: it follows --max-new-tokens)")
    return None


def tp_check(cfg: RunConfig) -> str | None:
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
