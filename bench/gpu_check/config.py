"""The GPU check's configuration (bench/gpu_check/__init__.py): the tiny families and dtypes, each method's budget on
the tiny models, ``CheckConfig`` (every option with its default), the task key, and the small JSON / text
helpers every part of the check uses. The lowest part: it imports no other part of the check."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from llava.families import registry

#: every registered family, in its tiny spelling
FAMILIES = registry.tiny_names()
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
#: methods that take no budget
NO_BUDGET = {"none", "novisual"}
#: a budget that really prunes on the tiny models, in each method's own convention (docs/methods/README.md):
#: about the 64-of-576 equivalent where the method allows it; the values the method tests use
#: (tests/test_gpu_ready.py's BUDGETS for the two newer families and the methods registered later).
#: Tiny LLaVA / NeXT / Video-LLaVA: 16 patches per image / crop, 17 per video frame, 4 LLM layers;
#: tiny Qwen2.5-VL: 4-12 merged tokens per image (dynamic grid); tiny OneVision: 16 per crop + newlines.
#: Keys: the tiny model's token geometry (its family record's ``tiny_geometry``: "image" LLaVA-1.5, "crops" NeXT and
#: InternVL (16 tokens per tile, 1-5 tiles per image), "frames" Video-LLaVA, "grid" the Qwen models, "anyres_max"
#: OneVision).
_PER_UNIT = {"image": 2, "crops": 2, "frames": 2, "grid": 2, "anyres_max": 4}
#: test_gpu_ready.py's per-unit budgets (the methods registered after the first tiny budgets were set)
_PER_UNIT_NEW = {"image": 4, "crops": 4, "frames": 4, "grid": 2, "anyres_max": 4}
TINY_BUDGETS = {
    "consensusdrop": _PER_UNIT,  # per image / crop / frame
    "visiondrop": {"image": 2, "crops": 2, "frames": 4, "grid": 2,
                   "anyres_max": 4},  # layer average per unit
    "attnmix": {"image": 2, "crops": 10, "frames": 16, "grid": 2,
                "anyres_max": 16},  # total per sample
    "fastv": {"image": 8, "crops": 20, "frames": 64, "grid": 4,
              "anyres_max": 16},  # layer average
    "pdrop": 192,  # 32-layer schedule scaled: 16 -> 16/2/1/1
    "sparsevlm": {"image": 192, "crops": 192, "frames": 192, "grid": 64,
                  "anyres_max": 64},  # 16 -> 16/4/3/2
    "dart": {"image": 8, "crops": 16, "frames": 64, "grid": 4,
             "anyres_max": 16},  # kept after layer K: 16 -> 16/12/12/12
    "visionzip": _PER_UNIT, "fastervlm": _PER_UNIT, "divprune": _PER_UNIT, "otprune": _PER_UNIT, "random": _PER_UNIT,  # per unit
    "hiprune": _PER_UNIT_NEW, "vispruner": _PER_UNIT_NEW, "downsample": _PER_UNIT_NEW, "holov": _PER_UNIT_NEW,  # per unit
    "restore": {k: 2 * v for k, v in _PER_UNIT_NEW.items()},  # per unit: half the base's, half merged anchors
    "cdpruner": _PER_UNIT_NEW, "flowcut": _PER_UNIT_NEW,  # per unit
    "prumerge": None,  # adaptive (IQR outliers): the count depends on the image
    "pixelprune": None,  # adaptive: the count depends on the pixels (a pre-tower stage; Qwen families)
    "vscan": 6,  # layer average per unit: 9 per unit after the tower, 3 from layer 2
    "duet": 6,  # layer average per unit: 10 per unit after the tower, 5 from layer 2, 0 from layer 3
    "visiontrim": _PER_UNIT_NEW,  # per unit B = D + C
    # layer average of 576 on 32 layers refitted to the 4 tiny layers: 16 -> 16/2/1/0; the tiny Qwen images (4-35
    # merged tokens) need 320 to keep tokens at every stage: 6 -> 6/3/2/1, 35 -> 35/21/13/5
    "trio": {"image": 192, "crops": 192, "frames": 192, "grid": 320, "anyres_max": 192},
    "mmtok": _PER_UNIT_NEW,  # per image / crop
    "apet": _PER_UNIT_NEW,  # layer average per unit: 6 per unit after the tower, 2 from layer 2 (Qwen: 3 / 1)
    "priortr": {"image": 8, "crops": 20, "frames": 64, "grid": 4,
                "anyres_max": 16},  # layer average, as FastV's
    "clse": 192,  # the official RETAIN_TOKEN: 16 -> 16/9/5/1 (LLaVA-1.5 only)
    "transprune": 192,  # PyramidDrop's table scaled: 16 -> 16/2/1/1 (not on Qwen3.5)
    "v2drop": None,  # the official schedule: 16 -> 16/8/4/1 (LLaVA rule; Qwen rule .25 / .05 / 0)
    "ivcprune": {"image": 8, "crops": 20, "frames": 64, "grid": 4,
                 "anyres_max": 16},  # layer average, as FastV's (K = 16 of 32 -> 2 of 4; eager only)
    "vlmpruner": {"image": 8, "crops": 20, "frames": 64, "grid": 4,
                  "anyres_max": 16},  # layer average, as FastV's (K = 2 of 32 -> 1 of 4; eager only)
}
#: a method registered later and not listed above (tests/test_gpu_check.py asserts there is none)
FALLBACK_BUDGET = 4
FP32_LOGIT_TOL = 1e-3
QUESTIONS = ["what is this?", "what color is the circle on the left?", "how many objects are there in the picture?"]
IMAGE_SIZES = ((40, 70), (56, 56), (90, 30))  # unequal sizes: unequal NeXT crops (52 / 36 / 40 tokens)
#: tiny NeXT images with equally many tokens (52) but 3 / 5 / 3 crops: equally long prompts whose
#: pruned rows differ in length under a per-crop budget (generate then passes no attention mask)
SAME_LENGTH_NEXT = ((20, 38), (62, 104), (30, 58))


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------


@dataclass
class CheckConfig:
    device: str | None = None
    dtypes: list = field(default_factory=list)  # default: float16 bfloat16 float32 on cuda, float32 on cpu
    methods: list = field(default_factory=list)  # default: every registered method
    families: list = field(default_factory=lambda: list(registry.tiny_names()))
    new_tokens: int = 8
    seed: int = 1
    max_syncs_per_sample: float | None = None
    ttft: bool = True
    ttft_model: str = "shape:llava-1.5-7b"
    ttft_dtype: str = "float16"
    ttft_budget: int = 64
    ttft_methods: list = field(default_factory=list)  # default: the methods above
    ttft_warmup: int = 3
    # seconds of unpruned prefills before the first timed row (clocks up, allocator and kernels warm), and the
    # unpruned model timed again after the last method: the first row is no longer the slowest by position alone,
    # and the drift between the two unpruned rows says how far apart rows of the table can be trusted
    ttft_device_warmup: float = 2.0
    ttft_runs: int = 10
    ttft_text_words: int = 12
    tiny: bool = True  # the tiny-model checks above (--fast-only: off)
    fast: bool = True  # the fast-path section (bench/gpu_check/fast.py)
    fast_backend: str = "auto"  # the fast path's compile backend (auto: Inductor + CUDA graphs on CUDA)
    fast_attention: str = "auto"  # the prompt's attention over its bucket (llava.fast.attention; the tiny buckets
    #                               are under auto's 1024 rows: "causal" checks the causal kernel on them)
    fast_dtypes: list = field(default_factory=list)  # default: the dtypes above
    fast_prompts: int = 5  # per family x dtype x method: 14 captured methods x 3 families x 5 >= 200 per dtype
    fast_tokens: int = 32
    fast_ttft: bool = True  # the fast path's timing rows (also off with --no-ttft)
    fast_ttft_model: str = "shape:llava-1.5-7b"
    fast_ttft_methods: list = field(default_factory=list)  # default: bench.gpu_check.fast.FAST_TTFT_METHODS
    fast_next_model: str = "shape:llava-next-7b"
    fast_next_tokens: list = field(default_factory=lambda: [320, 160])  # total visual tokens of 2880
    fast_next_methods: list = field(default_factory=list)  # default: the fast_ttft_methods
    out: str = "docs/results"
    threads: int | None = None
    time_limit: float | None = None  # seconds for the whole run (None: no limit)
    time_reserve: float = 5.0  # seconds kept back from the limit for judging and writing the report


def registered_methods() -> list[str]:
    """Every registered method except test doubles (``test_*``, or defined under tests/)."""
    from llava import method as M

    names = []
    registry = getattr(M, "_REGISTRY", {})
    for name in M.available_methods():
        mod = getattr(registry.get(name), "__module__", "") or ""
        if name.startswith("test_") or mod.split(".")[0] in ("example_methods", "tests", "conftest"):
            continue
        names.append(name)
    return names


def family_key(family: str) -> str:
    """The runtime's family name (``rt.family``) of a ``--families`` / ``tiny:`` name:
    'llava-next' -> 'llava_next', 'qwen2.5-vl' -> 'qwen2_5_vl' (the registry's id)."""
    return registry.key(family)


def tiny_budget(method: str, family: str):
    """``method``'s budget on the tiny model of ``family`` (the runtime's form, ``family_key``)."""
    if method in NO_BUDGET:
        return None
    b = TINY_BUDGETS.get(method, FALLBACK_BUDGET)
    return b[registry.get(family).tiny_geometry] if isinstance(b, dict) else b


def supported(method: str, family: str) -> bool:
    """Whether ``method`` runs on ``family`` (the runtime's form); 'none' runs everywhere."""
    from llava.method import method_supports

    return method == "none" or method_supports(method, family)


def task_key(t: dict) -> tuple:
    if t["kind"] == "fast_ttft":  # a fast-path timing row: model, dtype, method, total visual tokens
        return (t["kind"], t["model"], t["dtype"], t["method"], t.get("tokens"))
    return (t["kind"], t.get("family"), t.get("dtype"), t["method"]) + ((t["again"],) if t.get("again") else ())


# ------------------------------------------------------------------------------------------------
# JSON and text helpers
# ------------------------------------------------------------------------------------------------


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _jsonable_loose(x):
    """Tuples as lists, anything else unknown as its string (NaN / inf kept for _sanitize)."""
    if isinstance(x, dict):
        return {str(k): _jsonable_loose(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable_loose(v) for v in x]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def _sanitize(x):
    """NaN / inf (a diverged half-precision logit) as strings, so the JSON stays valid."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _sanitize(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_sanitize(v) for v in x]
    return x


def _env_float(name: str) -> float | None:
    v = os.environ.get(name, "").strip()
    return float(v) if v else None


def _fmt(x, spec=".2g"):
    return "-" if x is None else format(x, spec)


def _short(lines: list[str]) -> str:
    return (lines[-1] if lines else "?").replace("|", "\\|")[:160]
