"""GPU check (issue 19): prove on a real CUDA device that the pruning engine gives correct answers.

    bash scripts/bench/gpu_check.sh                      # = python -m bench.gpu_check (CUDA, all checks)
    python -m bench.gpu_check --device cpu --no-ttft      # CPU run (fp32): what CI can check
    python -m bench.gpu_check --methods none fastv --families llava --dtypes float16 --no-ttft
    python -m bench.gpu_check --fast-only --fast-dtypes float16       # the fast-path section only

Every registered method (test doubles excluded) and ``none`` (the unpruned model) on the seven tiny
random-weight families (``tiny:llava``, ``tiny:llava-next``, ``tiny:video-llava``, ``tiny:qwen2.5-vl``,
``tiny:llava-onevision``, ``tiny:qwen3-vl``, ``tiny:internvl``), in fp16 and bf16 on the device plus an fp32 reference row, at a small budget
that really prunes (each method's own budget convention, see ``TINY_BUDGETS``); a method whose
``families`` exclude a family (``llava.method.method_supports``), or that a hybrid model (Qwen3.5) refuses at attach
because it reads a linear-attention layer (``llava.engine.HybridRefusal``), is not run there and reported ``n/a``.
Checks, per method x family x dtype:

* **batch == alone**: batches of 3 (``mixed``: unequal prompts and unequal images / crops / videos;
  ``same-question``: one question, unequal images, so the prompts are equally long when the images are;
  Qwen2.5-VL and OneVision are image families like LLaVA, their unequal images giving unequal dynamic
  grids / anyres crops; Video-LLaVA also ``video+images``: a video sample next to two image samples)
  generate greedy tokens (forced length) that must equal each sample run alone; the max |delta logit| of the first generated
  token is reported. fp32: the tokens must be equal and the logits of every generated step within
  ``FP32_LOGIT_TOL`` (a decode step that attends to padding shows here even when greedy agrees).
  fp16 / bf16: the unpruned model itself may differ between batch and alone (other kernels for other
  shapes), so a method fails only on a sample where it differs and the unpruned model does not, unless
  its logits up to the first differing token stayed within the noise band (4x the unpruned model's own
  largest logit delta there, at least 2 ulp(1) of the dtype): then a near tie flipped. Each verdict
  says which rule passed it.
* **cached == no-cache**: the batch's cached generation equals a greedy no-cache full recompute of the
  same tokens with ``engine.replay = True`` (the recorded selections reused; Qwen2.5-VL's M-RoPE
  positions computed by the model from the grown prompt); half precision judged against the unpruned
  model in the same way.
* **host syncs**: ``llava.syncs.SyncCounter`` around one pruned prefill (``model(**batch)``) of the
  ``mixed`` batch, total and per sample; informational unless ``--max-syncs-per-sample`` is given.
* **TTFT** (skip with ``--no-ttft``): ``shape:llava-1.5-7b`` (real shapes, random weights) in fp16,
  unpruned and every method at budget 64, batch 1, median TTFT with the engine's vision / selection /
  LLM breakdown (timed with bench.efficiency's helpers).
* **Fast path** (``load(..., fast=True)``; bench/gpu_check_fast.py; skip with ``--no-fast``, only it with
  ``--fast-only``): on tiny LLaVA / NeXT / Video-LLaVA in the dtypes above, every method's batch-1 greedy
  tokens (``--fast-prompts`` prompts x ``--fast-tokens`` tokens) on the fast path with the device's backend
  (CUDA graphs through Inductor on CUDA) == the same path uncompiled == the eager engine, every prefill of
  a captured method on the fast path (an uncaptured one is listed as eager with its reason); and its
  batch-1 TTFT / TPOT on ``shape:llava-1.5-7b`` and ``shape:llava-next-7b`` with the issue's targets
  reported as met / missed (``--no-fast-ttft``; ``--no-ttft`` skips every timing table).

Writes ``gpu-check-<device>-<date>.json`` and ``.md`` under ``--out`` (default docs/results), with a
PASS / FAIL summary per check and per method; the exit status is 1 when any check fails (a crash is
recorded with the last lines of its traceback and the run goes on; see below for PARTIAL, exit 3). Without a CUDA device and without
``--device`` it says so and exits 0 without running.

On CUDA the checks run in a worker process (``--isolate``, the default there): a device-side assert
leaves a CUDA context unusable, so the worker stops after the task that caused it (every task ends
with a synchronize, so an asynchronous error is charged to its own task) and a fresh worker takes the
remaining tasks; a worker that dies outright charges the task it was on.

Results are never lost (the per-command wall-clock limit of a borrowed GPU machine):

* ``--time-limit SECONDS`` (or env ``GPU_CHECK_TIME_LIMIT``): no task is started once the elapsed time
  plus the longest task so far (its model load included) would pass the limit less ``--time-reserve``
  (default 5 s, for judging and writing the report); at the limit less the reserve a task still running
  is stopped (the worker is killed; in-process a SIGALRM stops it). The report is then written with the
  tasks not run listed as ``not run (time limit)``. Give it a little less than the outer limit, e.g.
  ``timeout 170 python -m bench.gpu_check --time-limit 160``.
* SIGTERM / SIGINT (what ``timeout`` and Ctrl-C send): the parent stops its worker, judges the tasks
  finished so far and writes the report, the rest listed as ``not run (interrupted by SIGTERM)``.
* Every finished task's record is appended (flushed) to ``<report>.partial.jsonl`` (first line a header
  with the config and the task list) as it completes, so even a SIGKILL leaves the finished records. It
  is deleted when a complete report is written and kept beside a partial one; ``--resume`` (that file,
  or ``--resume FILE``) reuses its finished records (same config) and runs only the rest.

A report with tasks not run has ``summary.partial`` true and the overall verdict ``PARTIAL`` (or
``FAIL`` when a task that ran failed). Exit status: 0 PASS (every task ran and passed), 1 FAIL (a
check failed among the tasks that ran, complete or partial), 3 PARTIAL (tasks not run for the time
limit or a signal, no failure among those that ran), 2 bad arguments / a ``--resume`` file that does
not match.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

FAMILIES = ("llava", "llava-next", "video-llava", "qwen2.5-vl", "llava-onevision", "qwen3-vl", "internvl", "qwen3.5")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
#: methods that take no budget
NO_BUDGET = {"none", "novisual"}
#: a budget that really prunes on the tiny models, in each method's own convention (README, Methods):
#: about the 64-of-576 equivalent where the method allows it; the values the method tests use
#: (tests/test_gpu_ready.py's BUDGETS for the two newer families and the methods registered later).
#: Tiny LLaVA / NeXT / Video-LLaVA: 16 patches per image / crop, 17 per video frame, 4 LLM layers;
#: tiny Qwen2.5-VL: 4-12 merged tokens per image (dynamic grid); tiny OneVision: 16 per crop + newlines.
#: Keys: the runtime's family (``rt.family``, see :func:`family_key`).
_PER_UNIT = {"llava": 2, "llava_next": 2, "video_llava": 2, "qwen2_5_vl": 2, "llava_onevision": 4}
#: test_gpu_ready.py's per-unit budgets (the methods registered after the first tiny budgets were set)
_PER_UNIT_NEW = {"llava": 4, "llava_next": 4, "video_llava": 4, "qwen2_5_vl": 2, "llava_onevision": 4}
TINY_BUDGETS = {
    "consensusdrop": _PER_UNIT,  # per image / crop / frame
    "visiondrop": {"llava": 2, "llava_next": 2, "video_llava": 4, "qwen2_5_vl": 2,
                   "llava_onevision": 4},  # layer average per unit
    "attnmix": {"llava": 2, "llava_next": 10, "video_llava": 16, "qwen2_5_vl": 2,
                "llava_onevision": 16},  # total per sample
    "fastv": {"llava": 8, "llava_next": 20, "video_llava": 64, "qwen2_5_vl": 4,
              "llava_onevision": 16},  # layer average
    "pdrop": 192,  # 32-layer schedule scaled: 16 -> 16/2/1/1
    "sparsevlm": {"llava": 192, "llava_next": 192, "video_llava": 192, "qwen2_5_vl": 64,
                  "llava_onevision": 64},  # 16 -> 16/4/3/2
    "dart": {"llava": 8, "llava_next": 16, "video_llava": 64, "qwen2_5_vl": 4,
             "llava_onevision": 16},  # kept after layer K: 16 -> 16/12/12/12
    "visionzip": _PER_UNIT, "fastervlm": _PER_UNIT, "divprune": _PER_UNIT, "random": _PER_UNIT,  # per unit
    "hiprune": _PER_UNIT_NEW, "vispruner": _PER_UNIT_NEW, "downsample": _PER_UNIT_NEW,  # per unit
    "cdpruner": _PER_UNIT_NEW, "flowcut": _PER_UNIT_NEW,  # per unit
    "prumerge": None,  # adaptive (IQR outliers): the count depends on the image
    "vscan": 6,  # layer average per unit: 9 per unit after the tower, 3 from layer 2
    "duet": 6,  # layer average per unit: 10 per unit after the tower, 5 from layer 2, 0 from layer 3
    "visiontrim": _PER_UNIT_NEW,  # per unit B = D + C
    "apet": _PER_UNIT_NEW,  # layer average per unit: 6 per unit after the tower, 2 from layer 2 (Qwen: 3 / 1)
}
for _b in [_PER_UNIT, _PER_UNIT_NEW] + [v for v in TINY_BUDGETS.values() if isinstance(v, dict)]:
    _b.setdefault("qwen3_vl", _b["qwen2_5_vl"])  # the tiny Qwen3-VL tower has Qwen2.5-VL's token geometry
    _b.setdefault("internvl", _b["llava_next"])  # tiny InternVL: 16 tokens per tile, 1-5 tiles per image (NeXT-like)
    _b.setdefault("qwen3_5", _b["qwen2_5_vl"])  # tiny Qwen3.5: Qwen3-VL's tower geometry without DeepStack
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
    families: list = field(default_factory=lambda: list(FAMILIES))
    new_tokens: int = 8
    seed: int = 1
    max_syncs_per_sample: float | None = None
    ttft: bool = True
    ttft_model: str = "shape:llava-1.5-7b"
    ttft_dtype: str = "float16"
    ttft_budget: int = 64
    ttft_methods: list = field(default_factory=list)  # default: the methods above
    ttft_warmup: int = 3
    ttft_runs: int = 10
    ttft_text_words: int = 12
    tiny: bool = True  # the tiny-model checks above (--fast-only: off)
    fast: bool = True  # the fast-path section (bench/gpu_check_fast.py)
    fast_backend: str = "auto"  # the fast path's compile backend (auto: Inductor + CUDA graphs on CUDA)
    fast_dtypes: list = field(default_factory=list)  # default: the dtypes above
    fast_prompts: int = 5  # per family x dtype x method: 14 captured methods x 3 families x 5 >= 200 per dtype
    fast_tokens: int = 32
    fast_ttft: bool = True  # the fast path's timing rows (also off with --no-ttft)
    fast_ttft_model: str = "shape:llava-1.5-7b"
    fast_ttft_methods: list = field(default_factory=list)  # default: gpu_check_fast.FAST_TTFT_METHODS
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
    'llava-next' -> 'llava_next', 'qwen2.5-vl' -> 'qwen2_5_vl' (as llava.models.build_tiny spells it)."""
    return family.replace("-", "_").replace(".", "_")


def tiny_budget(method: str, family: str):
    """``method``'s budget on the tiny model of ``family`` (the runtime's form, ``family_key``)."""
    if method in NO_BUDGET:
        return None
    b = TINY_BUDGETS.get(method, FALLBACK_BUDGET)
    return b[family] if isinstance(b, dict) else b


def supported(method: str, family: str) -> bool:
    """Whether ``method`` runs on ``family`` (the runtime's form); 'none' runs everywhere."""
    from llava.method import method_supports

    return method == "none" or method_supports(method, family)


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------


def rand_image(seed: int, h: int, w: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def scenarios(family: str) -> dict[str, list[tuple]]:
    """Named batches of 3 samples, each a (question, image or None, video frames or None)."""
    imgs = [rand_image(i, *IMAGE_SIZES[i]) for i in range(3)]
    same = imgs
    if family == "llava_next":
        same = [rand_image(3 + i, *SAME_LENGTH_NEXT[i]) for i in range(3)]
    if family == "video_llava":
        vids = [[rand_image(10 * i + j, 50, 50) for j in range(8)] for i in range(3)]
        return {"mixed": [(QUESTIONS[i], None, vids[i]) for i in range(3)],
                "same-question": [(QUESTIONS[1], None, vids[i]) for i in range(3)],
                "video+images": [(QUESTIONS[0], None, vids[0]), (QUESTIONS[1], imgs[1], None),
                                 (QUESTIONS[2], imgs[2], None)]}
    return {"mixed": [(QUESTIONS[i], imgs[i], None) for i in range(3)],
            "same-question": [(QUESTIONS[1], same[i], None) for i in range(3)]}


def build(rt, samples, device) -> dict:
    qs = [q for q, _, _ in samples]
    imgs = [im for _, im, _ in samples]
    vids = [v for _, _, v in samples]
    if all(v is None for v in vids):
        vids = None
    return rt.processor(qs, imgs, videos=vids, device=device)


# ------------------------------------------------------------------------------------------------
# generation and comparison
# ------------------------------------------------------------------------------------------------


def _eos_ids(model) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _placeholder_ids(model) -> list[int]:
    """The image / video placeholder ids: a random-weight model may generate them, and a generated
    placeholder would make the no-cache recompute read it as an image, so generation suppresses them."""
    cfg = model.config
    return [int(i) for i in (getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None)) if i is not None]


def generate(rt, batch, steps: int):
    """Greedy generation of exactly ``steps`` tokens, the placeholders suppressed: (new tokens (B, T),
    raw logits (B, T, V) in fp32)."""
    with torch.no_grad():
        out = rt.model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                suppress_tokens=_placeholder_ids(rt.model), output_logits=True,
                                return_dict_in_generate=True)
    new = out.sequences[:, batch["input_ids"].shape[1]:]
    return new, torch.stack([x.float() for x in out.logits], 1)


def greedy_no_cache(model, inputs, steps: int, suppress=()):
    """Greedy decoding by full recompute every step (use_cache=False), positions as generate builds
    them, the end-of-sequence and placeholder ids suppressed as :func:`generate` does: the reference that
    cached generation must equal (with ``engine.replay`` for query-aware methods). Qwen2.5-VL (its batch
    has ``mm_token_type_ids``) takes 3-D M-RoPE positions: none are passed, the model computes them from
    the prompt (``get_rope_index``, left padding included), the generated tokens typed as text."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    mrope = "mm_token_type_ids" in extra
    all_logits = []
    for _ in range(steps):
        pos = None if mrope else (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                           **extra).logits[:, -1].float()
        all_logits.append(logits)
        pick = logits.clone()
        if suppress:
            pick[:, list(suppress)] = -math.inf
        nxt = pick.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        if mrope:  # generated tokens are text (type 0)
            extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros_like(nxt)], 1)
    return ids[:, inputs["input_ids"].shape[1]:], torch.stack(all_logits, 1)


def compare(toks, logits, ref_toks, ref_logits) -> dict:
    """One sample's tokens / logits (T,), (T, V) against its reference: equal tokens, the first token's
    max |delta logit|, and where they part, the step, the delta there and the reference's margin
    between its token and the other run's (a small margin = a near tie)."""
    toks, ref_toks = toks.cpu(), ref_toks.cpu()
    logits, ref_logits = logits.cpu(), ref_logits.cpu()
    equal = bool(torch.equal(toks, ref_toks))
    delta = (logits - ref_logits).abs().amax(-1)  # per step
    rec = {"equal": equal, "first_logit_delta": float(delta[0]), "tokens": toks.tolist(),
           "ref_tokens": ref_toks.tolist()}
    if equal:
        rec["max_logit_delta"] = float(delta.max())
    else:
        s = int(torch.nonzero(toks != ref_toks)[0])
        rec.update(diverge_step=s, max_logit_delta=float(delta[: s + 1].max()),
                   margin=float(ref_logits[s, ref_toks[s]] - ref_logits[s, toks[s]]))
    return rec


# ------------------------------------------------------------------------------------------------
# tiny-model checks
# ------------------------------------------------------------------------------------------------


def _tail(exc: BaseException, n: int = 8) -> list[str]:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).strip().splitlines()[-n:]


def run_scenario(rt, eng, samples, device, steps: int, suppress) -> dict:
    batch = build(rt, samples, device)
    res = {"padded": bool((batch["attention_mask"] == 0).any()),
           "prompt_lengths": batch["attention_mask"].sum(1).tolist()}
    eng.replay = False
    toks, logits = generate(rt, batch, steps)
    st = eng.stats
    res["tokens"] = [s.as_dict() for s in st.samples] if st is not None else None
    # cached == no-cache recompute with the selections of this batch's prefill (before any other prefill)
    try:
        eng.replay = True
        ref_toks, ref_logits = greedy_no_cache(rt.model, batch, steps, suppress)
        res["cache"] = {"samples": [compare(toks[i], logits[i], ref_toks[i], ref_logits[i]) for i in range(len(samples))]}
    except Exception as e:  # noqa: BLE001 - recorded, the other checks go on
        res["cache"] = {"error": _tail(e)}
    finally:
        eng.replay = False
    # batch == each sample alone
    alone = []
    try:
        for i, smp in enumerate(samples):
            one = build(rt, [smp], device)
            t1, l1 = generate(rt, one, steps)
            alone.append(compare(toks[i], logits[i], t1[0], l1[0]))
        res["batch_alone"] = {"samples": alone}
    except Exception as e:  # noqa: BLE001
        res["batch_alone"] = {"samples": alone, "error": _tail(e)}
    return res


def count_syncs(rt, samples, device) -> dict:
    from llava.syncs import SyncCounter

    batch = build(rt, samples, device)
    with torch.no_grad():
        rt.model(**batch)  # a first call outside the counter (lazy initialisations are not the hot path)
        with SyncCounter() as c:
            rt.model(**batch)
    n = batch["input_ids"].shape[0]
    return {"total": int(c.total), "per_sample": c.total / n, "batch": n, "counts": dict(sorted(c.counts.items()))}


class DeviceLost(RuntimeError):
    """The CUDA context is unusable (a device-side assert): this process cannot run anything more."""


def device_alive(device) -> bool:
    device = torch.device(device)
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return torch.ones(2, device=device).sum().item() == 2.0
    except Exception:  # noqa: BLE001
        return False


def _finish(device) -> None:
    """Make asynchronous CUDA errors surface in the task that caused them."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _guard(device, rec_or_dict, exc) -> None:
    """Record ``exc``; re-raise as DeviceLost when it took the device down with it."""
    rec_or_dict["error"] = _tail(exc)
    if not device_alive(device):
        raise DeviceLost("; ".join(_tail(exc, 2))) from exc


@contextlib.contextmanager
def _recorded(device, rec: dict):
    """One step of a task: asynchronous CUDA errors surface at its end; an exception is recorded in
    ``rec["error"]`` and the run goes on, unless it took the device down (then DeviceLost)."""
    try:
        yield
        _finish(device)
    except DeviceLost:
        raise
    except Exception as e:  # noqa: BLE001 - recorded, the other steps go on
        _guard(device, rec, e)


def _unprune(rt) -> None:
    try:
        rt.unprune()
    except Exception:  # noqa: BLE001 - best effort after a failed task
        pass


def hybrid_refusal(rt, method: str, budget) -> str | None:
    """The reason ``method`` is refused at attach on ``rt``'s hybrid model (its llm stage or probe reads a
    linear-attention layer), or None."""
    from llava.engine import HybridRefusal

    try:
        rt.prune(method, budget)
    except HybridRefusal as e:
        return str(e)
    except (ValueError, TypeError):  # anything else is the run's to record
        return None
    finally:
        _unprune(rt)
    return None


def tiny_task(ctx: dict, family: str, dtype: str, method: str, cfg: CheckConfig) -> dict:
    """One method on one loaded tiny family in one dtype: every scenario and the sync count."""
    rt, scen, suppress, device = ctx["rt"], ctx["scenarios"], ctx["suppress"], cfg.device
    fam = family_key(family)
    if not supported(method, fam):  # the method refuses this family (its ``families``): n/a, not a failure
        return {"kind": "tiny", "family": family, "dtype": dtype, "method": method, "budget": None,
                "scenarios": {}, "error": None, "skipped": f"n/a: {method} does not support {fam}"}
    budget = tiny_budget(method, fam)
    refusal = hybrid_refusal(rt, method, budget)
    if refusal:  # a hybrid model (Qwen3.5): the method reads a linear-attention layer, refused at attach: n/a
        return {"kind": "tiny", "family": family, "dtype": dtype, "method": method, "budget": budget,
                "scenarios": {}, "error": None, "skipped": f"n/a: {refusal}"}
    rec = {"kind": "tiny", "family": family, "dtype": dtype, "method": method, "budget": budget,
           "scenarios": {}, "error": None}
    try:
        with _recorded(device, rec):
            try:
                eng = rt.prune(method, budget)
            except (ValueError, TypeError) as e:
                if budget is None or method in TINY_BUDGETS:
                    raise
                rec["budget_note"] = f"budget {budget} refused ({e}); ran without a budget"
                rec["budget"] = budget = None
                eng = rt.prune(method, None)
            rec["config"] = _jsonable(eng.method.config())
            for name, samples in scen.items():
                rec["scenarios"][name] = {}
                with _recorded(device, rec["scenarios"][name]):
                    rec["scenarios"][name] = run_scenario(rt, eng, samples, device, cfg.new_tokens, suppress)
            rec["syncs"] = {}
            with _recorded(device, rec["syncs"]):
                rec["syncs"] = count_syncs(rt, scen["mixed"], device)
    finally:
        _unprune(rt)
    return rec


def ttft_task(ctx: dict, method: str, cfg: CheckConfig) -> dict:
    """Batch-1 TTFT of one method on the loaded ``--ttft-model``: warm-ups, then timed prefills."""
    from bench.efficiency import prefill_once, summary

    rt, batches, device = ctx["rt"], ctx["batches"], ctx["device"]
    # an adaptive method (budget None in TINY_BUDGETS, e.g. PruMerge) chooses its own count here too
    budget = None if method in NO_BUDGET or (method in TINY_BUDGETS and TINY_BUDGETS[method] is None) \
        else cfg.ttft_budget
    rec = {"kind": "ttft", "method": method, "budget": budget, "error": None, "build_seconds": ctx["build_seconds"],
           "image_px": ctx["image_px"]}
    try:
        with _recorded(device, rec):
            eng = rt.prune(method, budget)
            for i in range(cfg.ttft_warmup):
                prefill_once(rt, batches[i % len(batches)], device)
            ttft, parts, toks = [], {}, []
            for b in batches[: cfg.ttft_runs]:
                t, o = prefill_once(rt, b, device)
                ttft.append(t)
                for k, v in eng.stats.timings.items():
                    parts.setdefault(k, []).append(v)
                toks.append((eng.stats.samples[0].visual_entering_llm, eng.stats.samples[0].visual_layer_avg))
                del o
            rec.update(ttft=summary(ttft), **{f"t_{k}": summary(v) for k, v in parts.items()},
                       visual_entering_llm=statistics.fmean(a for a, _ in toks),
                       visual_layer_avg=statistics.fmean(b for _, b in toks))
            if device.type == "cuda":
                rec["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    finally:
        _unprune(rt)
    return rec


def _load_tiny(family: str, dtype: str, cfg: CheckConfig) -> dict:
    from llava.models import load

    rt = load(f"tiny:{family}", seed=cfg.seed, dtype=dtype, device=cfg.device)
    return {"rt": rt, "scenarios": scenarios(family_key(family)),
            "suppress": _eos_ids(rt.model) + _placeholder_ids(rt.model)}


def _load_ttft(cfg: CheckConfig) -> dict:
    from bench.efficiency import build_batch, make_inputs
    from llava.models import load

    t0 = time.perf_counter()
    rt = load(cfg.ttft_model, dtype=cfg.ttft_dtype, device=cfg.device)
    device = next(rt.model.parameters()).device
    _finish(device)
    size = rt.model.config.vision_config.image_size
    items = make_inputs(rt, max(cfg.ttft_runs, 1), cfg.ttft_text_words, 0, (size, size))
    return {"rt": rt, "device": device, "batches": [build_batch(rt, [it], device) for it in items],
            "build_seconds": round(time.perf_counter() - t0, 1), "image_px": size}


def task_key(t: dict) -> tuple:
    if t["kind"] == "fast_ttft":  # a fast-path timing row: model, dtype, method, total visual tokens
        return (t["kind"], t["model"], t["dtype"], t["method"], t.get("tokens"))
    return (t["kind"], t.get("family"), t.get("dtype"), t["method"])


def make_tasks(cfg: CheckConfig, methods: list[str]) -> list[dict]:
    from bench import gpu_check_fast

    tasks = [{"kind": "tiny", "family": f, "dtype": d, "method": m}
             for f in cfg.families for d in cfg.dtypes for m in methods] if cfg.tiny else []
    if cfg.ttft:
        tm = cfg.ttft_methods or methods
        tasks += [{"kind": "ttft", "method": m} for m in ["none"] + [x for x in tm if x != "none"]]
    return tasks + gpu_check_fast.tasks(cfg, methods)


#: test hook: seconds to sleep at the end of every task (tests/test_gpu_check.py's signal / time-limit tests)
TEST_SLEEP_ENV = "GPU_CHECK_TEST_TASK_SLEEP"
#: the exit status of a worker that stopped before its tasks were done because of the time limit
WORKER_TIME_LIMIT = 4
TIME_LIMIT = "time limit"


class Stopped(BaseException):
    """The run was stopped (the time limit, SIGTERM / SIGINT): the finished tasks are reported, the rest
    listed as not run. A BaseException, so that no ``except Exception`` of a task records it as a crash."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def may_start(now: float, deadline: float | None, margin: float) -> bool:
    """Whether a task may start at ``now`` (time.time()) when the last one must end by ``deadline``:
    ``margin`` is the longest task (wall time with its model load) so far."""
    return deadline is None or now + margin <= deadline


def run_tasks(tasks: list[dict], cfg: CheckConfig, emit, log, deadline: float | None = None,
              margin: float = 0.0) -> bool:
    """Run ``tasks`` in order in this process (one model load per family x dtype, one for TTFT),
    handing each record to ``emit``. Raises DeviceLost when the device is gone (the record of the
    task that took it down has been emitted). Returns False when it stopped early because the next
    task would not end by ``deadline`` (time.time(); ``margin``: the longest task seen before), else True."""
    ctx, ctx_key, load_error = None, None, None
    sleep = float(os.environ.get(TEST_SLEEP_ENV) or 0)
    for t in tasks:
        if not may_start(time.time(), deadline, margin):
            log(f"  time limit: {len(tasks) - tasks.index(t)} task(s) not started")
            return False
        t_wall = time.perf_counter()
        key = _context_key(t)
        if key != ctx_key:
            ctx, ctx_key, load_error = None, key, None
            if torch.device(cfg.device).type == "cuda":
                torch.cuda.empty_cache()
            try:
                ctx = _load_context(t, cfg)
            except Exception as e:  # noqa: BLE001 - every task of this model fails with the load error
                load_error = ["cannot build the model:"] + _tail(e)
                log(f"  {' '.join(map(str, key))}: cannot build the model: {load_error[-1]}")
        t0 = time.perf_counter()
        lost = None
        if load_error is not None:
            rec = {**t, "error": load_error, "scenarios": {}} if t["kind"] == "tiny" else {**t, "error": load_error}
        else:
            try:
                rec = _run_task(ctx, t, cfg)
            except DeviceLost as e:
                lost = e
                rec = {**t, "scenarios": {}, "error": ["the device was lost (CUDA context unusable):"] + _tail(e.__cause__ or e)}
        if sleep:
            time.sleep(sleep)
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        rec["wall_seconds"] = round(time.perf_counter() - t_wall, 3)  # with the model load, if this task did it
        margin = max(margin, rec["wall_seconds"])
        emit(rec)
        where = _where(t)
        extra = ""
        if t["kind"] in ("ttft", "fast_ttft") and rec.get("ttft"):
            extra = f"  median {rec['ttft']['median'] * 1e3:.2f} ms"
        elif t["kind"] == "fast" and rec.get("refusal"):
            extra = "  eager (not captured)"
        log(f"  {where} {t['method']:14s} {rec['seconds']:6.2f} s" + ("  CRASH" if _has_error(rec) else extra))
        if lost is not None or (load_error is None and not device_alive(cfg.device)):
            raise DeviceLost(str(lost or "device lost"))
    return True


def _context_key(t: dict) -> tuple:
    """The loaded model a task runs on: consecutive tasks with the same key share one load."""
    from bench import gpu_check_fast

    if t["kind"] == "tiny":
        return ("tiny", t["family"], t["dtype"])
    return ("ttft",) if t["kind"] == "ttft" else gpu_check_fast.context_key(t)


def _load_context(t: dict, cfg: CheckConfig) -> dict:
    from bench import gpu_check_fast

    if t["kind"] == "tiny":
        return _load_tiny(t["family"], t["dtype"], cfg)
    if t["kind"] == "ttft":
        return _load_ttft(cfg)
    if t["kind"] == "fast":
        return gpu_check_fast.load_equality(t["family"], t["dtype"], cfg)
    return gpu_check_fast.load_timing(t["model"], cfg)


def _run_task(ctx: dict, t: dict, cfg: CheckConfig) -> dict:
    from bench import gpu_check_fast

    if t["kind"] == "tiny":
        return tiny_task(ctx, t["family"], t["dtype"], t["method"], cfg)
    if t["kind"] == "ttft":
        return ttft_task(ctx, t["method"], cfg)
    if t["kind"] == "fast":
        return gpu_check_fast.equality_task(ctx, t, cfg)
    return gpu_check_fast.timing_task(ctx, t, cfg)


def _where(t: dict) -> str:
    """A task's column in the progress log."""
    from bench import gpu_check_fast

    if t["kind"] == "tiny":
        return f"{t['family']:12s} {t['dtype']:9s}"
    return "TTFT" + " " * 18 if t["kind"] == "ttft" else gpu_check_fast.where(t)


def _has_error(rec: dict) -> bool:
    return bool(rec.get("error")) or any(_scenario_errors(sc) for sc in rec.get("scenarios", {}).values()) \
        or bool((rec.get("syncs") or {}).get("error"))


def _scenario_errors(sc: dict) -> bool:
    return bool(sc.get("error") or (sc.get("cache") or {}).get("error") or (sc.get("batch_alone") or {}).get("error"))


# ------------------------------------------------------------------------------------------------
# isolation: a worker process per CUDA context
# ------------------------------------------------------------------------------------------------


def worker_command(task_file: Path, result_file: Path) -> list[str]:
    return [sys.executable, "-m", "bench.gpu_check", "--worker", str(task_file), str(result_file)]


def run_isolated(tasks: list[dict], cfg: CheckConfig, log, emit=None, deadline: float | None = None,
                 margin: float = 0.0) -> list[dict]:
    """Run the tasks in worker processes. A device-side assert leaves a CUDA context unusable for
    every later task of its process: the worker then stops, and a fresh one takes the remaining tasks
    (a worker that dies without a record charges the task it was on, so every restart makes progress).
    Each record is handed to ``emit`` as soon as the worker has written it. Raises Stopped (after
    killing the worker) on the time limit (``deadline``, time.time(); the worker stops starting tasks
    there) or when the worker was killed by SIGTERM / SIGINT; a Stopped raised by a signal handler
    while a worker runs kills the worker too."""
    import tempfile

    done: dict[tuple, dict] = {}
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for attempt in range(len(tasks) + 1):
            todo = [t for t in tasks if task_key(t) not in done]
            if not todo:
                break
            tf, rf = Path(tmp) / f"tasks{attempt}.json", Path(tmp) / f"results{attempt}.jsonl"
            tf.write_text(json.dumps({"config": asdict(cfg), "tasks": todo, "deadline": deadline, "margin": margin}))
            rf.write_text("")
            ef = Path(tmp) / f"stderr{attempt}.txt"
            got, pos = 0, 0

            def drain():
                nonlocal got, pos, margin
                with open(rf, "rb") as f:
                    f.seek(pos)
                    data = f.read()
                end = data.rfind(b"\n") + 1  # complete lines only: the worker may be writing one
                pos += end
                for line in data[:end].decode().splitlines():
                    if line.strip():
                        rec = json.loads(line)
                        done[task_key(rec)] = rec
                        margin = max(margin, rec.get("wall_seconds") or 0.0)
                        got += 1
                        if emit is not None:
                            emit(rec)

            with open(ef, "w") as err:
                proc = subprocess.Popen(worker_command(tf, rf), cwd=root, stderr=err)
                try:
                    while proc.poll() is None:
                        drain()
                        time.sleep(0.1)
                finally:
                    if proc.poll() is None:  # stopped (signal / time limit) while the worker runs
                        proc.terminate()
                        try:
                            proc.wait(5)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                            proc.wait()
                    drain()
            left = [t for t in todo if task_key(t) not in done]
            if not left:
                continue
            if proc.returncode in (-signal.SIGTERM, -signal.SIGINT):  # e.g. `timeout` signalled the process group
                raise Stopped(f"interrupted by {signal.Signals(-proc.returncode).name}")
            if proc.returncode == WORKER_TIME_LIMIT:
                raise Stopped(TIME_LIMIT)
            if got == 0 or proc.returncode not in (0, 3):
                t = left[0]  # the task it was on when it died
                tail = ef.read_text(errors="replace").strip().splitlines()[-8:]
                log(f"  the worker exited with status {proc.returncode} during "
                    f"{' '.join(str(x) for x in task_key(t) if x)}")
                rec = {**t, "scenarios": {}, "seconds": None,
                       "error": [f"the worker process died (exit status {proc.returncode}):"] + tail}
                done[task_key(t)] = rec
                if emit is not None:
                    emit(rec)
            else:
                log(f"  device lost: a fresh worker takes the {len(left)} remaining task(s)")
    return [done[task_key(t)] for t in tasks if task_key(t) in done]


def worker_main(task_file: str, result_file: str) -> int:
    spec = json.loads(Path(task_file).read_text())
    cfg = CheckConfig(**spec["config"])
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops this worker and writes the report
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _precision(cfg.device)
    with open(result_file, "a") as out:
        def emit(rec):
            out.write(json.dumps(_sanitize(_jsonable_loose(rec)), allow_nan=False) + "\n")
            out.flush()

        try:
            if not run_tasks(spec["tasks"], cfg, emit, lambda s: print(s, flush=True),
                             deadline=spec.get("deadline"), margin=spec.get("margin") or 0.0):
                return WORKER_TIME_LIMIT
        except DeviceLost:
            return 3
    return 0


def _precision(device) -> None:
    if torch.device(device).type == "cuda":  # fp32 is the exact reference: no TF32 (half runs unaffected)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


# ------------------------------------------------------------------------------------------------
# verdicts
# ------------------------------------------------------------------------------------------------


def noise_tolerance(dtype: str, ref_delta: float | None) -> float:
    """The half-precision noise band: 4x the unpruned model's own largest batch-vs-alone (or
    cached-vs-recompute) logit delta in the same family and dtype, at least 2 ulp(1) of the dtype."""
    eps = torch.finfo(DTYPES[dtype]).eps
    return max(4 * (ref_delta or 0.0), 2 * eps)


def judge(records: list[dict]) -> None:
    """Add a verdict to every check of every record (in place). Half precision is judged against the
    unpruned model's own agreement in the same family, dtype, scenario and sample."""
    ref = {(r["family"], r["dtype"]): r for r in records if r["method"] == "none"}
    for r in records:
        r["verdicts"] = {}
        base = ref.get((r["family"], r["dtype"]))
        exact = r["dtype"] == "float32"
        for check in ("batch_alone", "cache"):
            if r.get("skipped") or r.get("not_run"):
                r["verdicts"][check] = {"pass": True, "why": "n/a" if r.get("skipped") else f"not run ({r['not_run']})",
                                        "failed": [], "notes": []}
                continue
            if r["error"]:
                r["verdicts"][check] = {"pass": False, "why": "crash"}
                continue
            ref_delta = None
            if base is not None and not exact:
                ds = [s["max_logit_delta"] for sc in base["scenarios"].values() for s in sc.get(check, {}).get("samples", [])]
                ref_delta = max(ds) if ds else None
            tol = None if exact else noise_tolerance(r["dtype"], ref_delta)
            fails, notes = [], []
            for name, sc in r["scenarios"].items():
                if "error" in sc and check not in sc:
                    fails.append(f"{name}: crash")
                    continue
                c = sc.get(check, {})
                if c.get("error"):
                    fails.append(f"{name}: crash")
                for i, s in enumerate(c.get("samples", [])):
                    s["verdict"] = _sample_verdict(s, exact, tol, base, name, check, i, r is base)
                    if s["verdict"] == "FAIL":
                        fails.append(f"{name}[{i}]")
                    elif s["verdict"] != "PASS":
                        notes.append(f"{name}[{i}]: {s['verdict']}")
            r["verdicts"][check] = {"pass": not fails, "failed": fails, "notes": notes, "noise_tolerance": tol}


def _sample_verdict(s, exact, tol, base, scen, check, i, is_base) -> str:
    if exact:
        return "PASS" if s["equal"] and s["max_logit_delta"] <= FP32_LOGIT_TOL else "FAIL"
    if s["equal"]:
        return "PASS"
    if is_base:
        return "PASS (unpruned model: half-precision reference)"
    try:
        b = base["scenarios"][scen][check]["samples"][i]
    except (KeyError, IndexError, TypeError):
        b = None
    if b is not None and not b["equal"]:
        return "PASS (unpruned model also differs)"
    if tol is not None and s["max_logit_delta"] <= tol:  # the logits stayed in the noise band: a near tie flipped
        return (f"PASS (near tie at step {s['diverge_step']}: margin {s['margin']:.3g}, logits within "
                f"{s['max_logit_delta']:.3g} <= {tol:.3g})")
    return "FAIL"


def sync_verdict(r: dict, limit: float | None) -> dict:
    s = r.get("syncs") or {}
    if r.get("skipped"):
        return {"pass": True, "why": "n/a"}
    if r.get("not_run"):
        return {"pass": True, "why": f"not run ({r['not_run']})"}
    if r["error"] or "error" in s:
        return {"pass": limit is None, "why": "not measured (crash)"}
    if limit is None:
        return {"pass": True, "why": "informational"}
    return {"pass": s["per_sample"] <= limit, "why": f"{s['per_sample']:.1f} per sample, limit {limit}"}


def summarize(report: dict, cfg: CheckConfig) -> dict:
    from bench import gpu_check_fast

    recs = report["tiny"]
    checks = {"batch==alone": True, "cached==no-cache": True, "no crash": True, "host syncs": True} if cfg.tiny else {}
    methods: dict[str, dict] = {}
    for r in recs:
        r["verdicts"]["syncs"] = sync_verdict(r, cfg.max_syncs_per_sample)
        crash = bool(r["error"]) or any("error" in sc or sc.get("cache", {}).get("error")
                                        or sc.get("batch_alone", {}).get("error") for sc in r["scenarios"].values()) \
            or "error" in (r.get("syncs") or {})
        ok = {"batch==alone": r["verdicts"]["batch_alone"]["pass"], "cached==no-cache": r["verdicts"]["cache"]["pass"],
              "no crash": not crash, "host syncs": r["verdicts"]["syncs"]["pass"]}
        m = methods.setdefault(r["method"], {"pass": True, "failed": [], "n/a": [], "not run": []})
        if r.get("not_run"):  # the time limit or a signal stopped the run first: neither a pass nor a failure
            m["not run"].append(f"{r['family']}, {r['dtype']}")
            continue
        if r.get("skipped"):  # the method does not support this family: not run, not a failure
            m["n/a"].append(f"{r['family']}, {r['dtype']}")
            continue
        m["ran"] = True
        for k, v in ok.items():
            checks[k] = checks.get(k, True) and v
            if not v:
                m["pass"] = False
                m["failed"].append(f"{k} ({r['family']}, {r['dtype']})")
    if report.get("ttft") is not None:
        t = report["ttft"]
        checks["TTFT runs"] = t.get("error") is None and all(x.get("error") is None for x in t["results"])
        for x in t["results"]:
            m = methods.setdefault(x["method"], {"pass": True, "failed": [], "n/a": [], "not run": []})
            if x.get("not_run"):
                m["not run"].append("TTFT")
            elif x.get("error"):
                m["ran"] = True
                m["pass"] = False
                m["failed"].append("TTFT (crash)")
    gpu_check_fast.summarize(report.get("fast"), checks, methods)
    labels = {k: "PASS" if v else "FAIL" for k, v in checks.items()}
    if cfg.max_syncs_per_sample is None and "host syncs" in labels:
        labels["host syncs"] = "reported (no limit set)"
    labels.update(gpu_check_fast.labels(report.get("fast")))
    every = report["tiny"] + ((report.get("ttft") or {}).get("results") or []) + gpu_check_fast.records(report.get("fast"))
    not_run = [r for r in every if r.get("not_run")]
    ok = all(checks.values())
    summ = {"pass": ok and not not_run, "partial": bool(not_run),
            "verdict": "FAIL" if not ok else "PARTIAL" if not_run else "PASS",
            "tasks": {"total": len(every), "run": len(every) - len(not_run), "not run": len(not_run),
                      "not run reason": sorted({r["not_run"] for r in not_run})},
            "checks": labels,
            "methods": {k: {"verdict": "FAIL" if not v["pass"] else "PARTIAL" if v["not run"] and v.get("ran")
                            else "not run" if v["not run"] else "PASS" if v.get("ran") else "n/a",
                            "failed": v["failed"], "n/a": v["n/a"], **({"not run": v["not run"]} if v["not run"] else {})}
                        for k, v in methods.items()}}
    if not_run:
        labels["all tasks run"] = (f"PARTIAL: {len(not_run)} of {len(every)} not run "
                                   f"({', '.join(summ['tasks']['not run reason'])})")
    return summ


# ------------------------------------------------------------------------------------------------
# TTFT on the real 7B shapes
# ------------------------------------------------------------------------------------------------


def ttft_table(recs: list[dict], cfg: CheckConfig) -> dict:
    """The TTFT records as one table, with speed-up and selection overhead against the unpruned row."""
    out = {"model": cfg.ttft_model, "dtype": cfg.ttft_dtype, "budget": cfg.ttft_budget, "batch": 1,
           "warmup": cfg.ttft_warmup, "runs": cfg.ttft_runs, "results": recs,
           "build_seconds": next((r.get("build_seconds") for r in recs if r.get("build_seconds")), None),
           "peak_gib": max((r.get("peak_gib") or 0 for r in recs), default=0) or None,
           "image_px": next((r.get("image_px") for r in recs if r.get("image_px")), None)}
    base = next((r.get("ttft") for r in recs if r["method"] == "none"), None)
    for r in recs:
        if base and r.get("ttft"):
            r["speedup"] = base["median"] / r["ttft"]["median"]
            if r.get("t_selection"):
                r["selection_overhead"] = r["t_selection"]["median"] / base["median"]
    return out


# ------------------------------------------------------------------------------------------------
# environment and report
# ------------------------------------------------------------------------------------------------


def _run(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    import transformers

    env = {"date": time.strftime("%Y-%m-%d"), "time": time.strftime("%H:%M:%S %Z"), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "platform": platform.platform(),
           "device": str(device)}
    from eval.provenance import git_info

    git = git_info()  # VTPRUNE_GIT_COMMIT overrides a copied tree's stale .git
    if git.get("commit"):
        env["git_commit"] = git["commit"][:12] + ("+dirty" if git.get("dirty") else "")
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   driver=(_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or "").split("\n")[0] or None,
                   tf32_in_fp32_runs=False)
        env["device_name"] = env["gpu"]
    else:
        env.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
        env["device_name"] = "cpu"
    return env


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def _fmt(x, spec=".2g"):
    return "-" if x is None else format(x, spec)


def _cell(r: dict) -> str:
    if r.get("skipped"):
        return "n/a"
    if r.get("not_run"):
        return f"not run ({r['not_run']})"
    if r["error"]:
        return "**crash**"
    v = r["verdicts"]
    bad = [k for k, name in (("batch_alone", "batch"), ("cache", "cache")) if not v[k]["pass"]]
    crash = any("error" in sc or sc.get("cache", {}).get("error") or sc.get("batch_alone", {}).get("error")
                for sc in r["scenarios"].values()) or "error" in (r.get("syncs") or {})
    parts = [{"batch_alone": "batch!=alone", "cache": "cache!=recompute"}[k] for k in bad]
    if crash:
        parts.append("crash")
    if not v["syncs"]["pass"]:
        parts.append("syncs")
    if parts:
        return "**FAIL**: " + ", ".join(parts)
    note = any(v[k]["notes"] for k in ("batch_alone", "cache"))
    return "ok*" if note else "ok"


def _agree(sc: dict, check: str) -> str:
    c = sc.get(check) if isinstance(sc, dict) else None
    if c is None or c.get("error") or ("error" in sc and check not in sc):
        return "crash"
    ss = c["samples"]
    n = sum(s["equal"] for s in ss)
    d1 = max((s["first_logit_delta"] for s in ss), default=None)
    d = max((s["max_logit_delta"] for s in ss), default=None)
    flag = "" if all(s.get("verdict", "PASS").startswith("PASS") for s in ss) else " **x**"
    return f"{n}/{len(ss)}, {_fmt(d1)}, {_fmt(d)}{flag}"


def markdown(report: dict) -> str:
    env, cfg, summ = report["environment"], report["config"], report["summary"]
    recs = report["tiny"]
    dev = env.get("gpu") or f"CPU ({env.get('cpu')}, {env.get('threads')} threads)"
    out = [f"# GPU check: {dev}, {env['date']}", "",
           f"**Overall: {_overall(summ)}**", "",
           f"Device {env['device']}" + (f", driver {env['driver']}, CUDA {env['cuda']}" if env.get("gpu") else "")
           + f"; torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}"
           + (f"; commit {env['git_commit']}" if env.get("git_commit") else "") + ".",
           f"Command: `{report['command']}`; {report['seconds']:.0f} s.", "",
           "Tiny random-weight models (`tiny:<family>`, seed "
           f"{cfg['seed']}), every method at a budget that prunes (its own convention; table below), batches of 3: "
           "`mixed` (unequal prompts and images / crops / videos), `same-question` (equal questions, unequal images), "
           "Video-LLaVA also `video+images` (one video sample, two image samples). Greedy, "
           f"{cfg['new_tokens']} forced new tokens. batch==alone: each row of the batch against the sample run "
           "alone; cached==no-cache: cached generate against a no-cache greedy recompute with the recorded "
           f"selections (`engine.replay`). fp32 must agree exactly (tokens, and the logits of every step within {FP32_LOGIT_TOL:g}); "
           "fp16 / bf16 fail only where the unpruned model agrees and the logits up to the first differing token left "
           "the noise band (4x the unpruned model's own largest delta in that family and dtype, at least 2 ulp(1)); "
           "a flip inside it is a near tie. TF32 is off in the fp32 runs.", "",
           "## Summary", "", "| Check | Result |", "|---|---|"]
    if not cfg.get("tiny", True):  # --fast-only: the paragraph above describes checks that did not run
        out[7] = "Fast-path section only (`--fast-only`): no tiny-model batch / cache checks, no eager TTFT table."
    for k, v in summ["checks"].items():
        out.append(f"| {k} | {'**FAIL**' if v == 'FAIL' else v} |")
    if summ.get("partial"):
        out += ["", f"**Partial report**: {summ['tasks']['not run']} of {summ['tasks']['total']} tasks were not run "
                f"({', '.join(summ['tasks']['not run reason'])}); they are listed as `not run` below. The verdicts "
                "cover the tasks that ran."]
    cols = [(f, d) for f in cfg["families"] for d in cfg["dtypes"]] if cfg.get("tiny", True) else []
    by = {(r["method"], r["family"], r["dtype"]): r for r in recs}
    out += ["", "## Per method", "", "`ok*`: passed with a half-precision note (see the JSON); `n/a`: the method does not support the "
            "family (its `families`), not run; `not run (...)`: stopped before it by the time limit or a signal.", "",
            "| " + " | ".join(["Method", "Verdict", *(f"{f} {d}" for f, d in cols)]) + " |",
            "|---|---|" + "---|" * len(cols)]
    for m in report["methods"]:
        v = summ["methods"].get(m, {}).get("verdict", "-")
        cells = [_cell(by[(m, f, d)]) if (m, f, d) in by else "-" for f, d in cols]
        out.append("| " + " | ".join([m, "**FAIL**" if v == "FAIL" else v, *cells]) + " |")
    if not cfg.get("tiny", True):  # --fast-only: no tiny-model checks
        return _tail_sections(report, out)
    # host syncs: one pruned prefill of the `mixed` batch (3 samples), per sample
    sd = "float32" if "float32" in cfg["dtypes"] else cfg["dtypes"][0]
    limit = cfg.get("max_syncs_per_sample")
    syncs = ["", f"## Host syncs per sample ({sd})", "",
             "`llava.syncs.SyncCounter` around one pruned prefill (`model(**batch)`) of the `mixed` batch of 3, divided "
             "by 3 (total in brackets)" + (f"; limit {limit:g} per sample." if limit is not None else "; reported, no limit set."),
             "", "| Method | " + " | ".join(cfg["families"]) + " |", "|---|" + "---|" * len(cfg["families"])]
    for m in report["methods"]:
        cells = []
        for f in cfg["families"]:
            sy = (by.get((m, f, sd)) or {}).get("syncs") or {}
            if (by.get((m, f, sd)) or {}).get("skipped"):
                cells.append("n/a")
                continue
            if (by.get((m, f, sd)) or {}).get("not_run"):
                cells.append("not run")
                continue
            cells.append("crash" if "error" in sy else (f"{sy['per_sample']:.1f} ({sy['total']})" if sy else "-"))
        syncs.append(f"| {m} | " + " | ".join(cells) + " |")
    out += syncs
    # details
    for f in cfg["families"]:
        for d in cfg["dtypes"]:
            rows = [by[(m, f, d)] for m in report["methods"] if (m, f, d) in by]
            if not rows:
                continue
            names = list(next((r["scenarios"] for r in rows if r["scenarios"]), {}).keys())
            out += ["", f"### {f}, {d}", "",
                    "Cells: samples agreeing / 3, max |delta logit| of the first generated token, max |delta logit| "
                    "over the generated steps (up to the first differing token); **x** = failed. Tokens: visual tokens "
                    "entering the LLM / layer average / candidates per sample (`mixed`).", "",
                    "| Method | Budget | Tokens | " + " | ".join(f"batch==alone {n}" for n in names) + " | "
                    + " | ".join(f"cached==no-cache {n}" for n in names) + " | Syncs/sample (batch 3) |",
                    "|---|---|---|" + "---|" * (2 * len(names) + 1)]
            for r in rows:
                if r.get("skipped"):
                    out.append(f"| {r['method']} | n/a | {r['skipped']} |" + " |" * (2 * len(names) + 1))
                    continue
                if r.get("not_run"):
                    out.append(f"| {r['method']} | {_fmt(r.get('budget'), '')} | not run ({r['not_run']}) |"
                               + " |" * (2 * len(names) + 1))
                    continue
                if r["error"]:
                    out.append(f"| {r['method']} | {_fmt(r['budget'], '')} | crash: `{_short(r['error'])}` |"
                               + " |" * (2 * len(names) + 1))
                    continue
                toks = (r["scenarios"].get("mixed") or {}).get("tokens") or []
                tk = "; ".join(f"{s['visual_entering_llm']}/{s['visual_layer_avg']:.3g}/{s['visual_candidates']}" for s in toks)
                if r["method"] not in ("none",) and toks and not any(s["visual_layer_avg"] < s["visual_candidates"] for s in toks):
                    tk += " (did not prune)"
                ba = [_agree(r["scenarios"].get(n, {}), "batch_alone") for n in names]
                ca = [_agree(r["scenarios"].get(n, {}), "cache") for n in names]
                sy = r.get("syncs") or {}
                syc = "crash" if "error" in sy else (f"{sy['per_sample']:.1f} ({sy['total']})" if sy else "-")
                out.append(f"| {r['method']} | {_fmt(r['budget'], '')} | {tk} | " + " | ".join(ba + ca) + f" | {syc} |")
    return _tail_sections(report, out)


def _tail_sections(report: dict, out: list[str]) -> str:
    """The crash list, the TTFT table and the fast-path section after the tiny-model tables."""
    from bench import gpu_check_fast

    crashes = [(r, where, e) for r in report["tiny"] for where, e in _errors(r)]
    if crashes:
        out += ["", "## Crashes (last lines of the traceback)", ""]
        for r, where, e in crashes:
            out += [f"**{r['method']}**, {r['family']}, {r['dtype']}, {where}:", "", "```", *e, "```", ""]
    t = report.get("ttft")
    if t is not None:
        out += ["", f"## TTFT: {t.get('model')}, {t.get('dtype')}, batch 1", ""]
        if t.get("error"):
            out += ["```", *t["error"], "```"]
        else:
            out += [f"Random weights; budget {t['budget']} (each method's own convention), "
                    f"{t['warmup']} warm-up and {t['runs']} timed prefills (seeded random {t.get('image_px')} px images, "
                    f"{report['config']['ttft_text_words']}-word questions); model built in {t['build_seconds']} s"
                    + (f"; peak {t['peak_gib']} GiB" if t.get("peak_gib") else "") + ".", "",
                    "| Method | Budget | Tokens in / layer avg | TTFT median (ms) | p90 | vision / selection / LLM (ms) "
                    "| Selection / unpruned TTFT | Speed-up |", "|---|---|---|---|---|---|---|---|"]
            for r in t["results"]:
                if r.get("not_run"):
                    out.append(f"| {r['method']} | - | not run ({r['not_run']}) | | | | | |")
                    continue
                if r.get("error"):
                    out.append(f"| {r['method']} | {_fmt(r['budget'], '')} | crash: `{_short(r['error'])}` | | | | | |")
                    continue
                ms = lambda s: _fmt(s["median"] * 1e3 if s else None, ".2f")  # noqa: E731
                out.append(f"| {r['method']} | {_fmt(r['budget'], '')} | {r['visual_entering_llm']:.0f} / "
                           f"{r['visual_layer_avg']:.1f} | {ms(r['ttft'])} | {_fmt(r['ttft']['p90'] * 1e3, '.2f')} | "
                           f"{ms(r.get('t_vision'))} / {ms(r.get('t_selection'))} / {ms(r.get('t_llm'))} | "
                           f"{_fmt(r.get('selection_overhead'), '.1%')} | {_fmt(r.get('speedup'), '.2f')}x |")
    out += gpu_check_fast.markdown(report)
    return "\n".join(out) + "\n"


def _overall(summ: dict) -> str:
    v = summ.get("verdict") or ("PASS" if summ["pass"] else "FAIL")
    if summ.get("partial"):
        t = summ["tasks"]
        return (f"{v}" + (" (PARTIAL)" if v != "PARTIAL" else "")
                + f": {t['run']} of {t['total']} tasks run, {t['not run']} not run ({', '.join(t['not run reason'])})")
    return v


def _short(lines: list[str]) -> str:
    return (lines[-1] if lines else "?").replace("|", "\\|")[:160]


def _errors(r: dict):
    if r["error"]:
        yield "setup", r["error"]
        return
    for name, sc in r["scenarios"].items():
        if "error" in sc:
            yield name, sc["error"]
        for check in ("cache", "batch_alone"):
            if (sc.get(check) or {}).get("error"):
                yield f"{name} {check}", sc[check]["error"]
    if "error" in (r.get("syncs") or {}):
        yield "sync count", r["syncs"]["error"]


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


#: config fields that may differ between a run and the run it resumes
RESUME_FREE = ("out", "threads", "time_limit", "time_reserve")


class ResumeError(ValueError):
    """The --resume file is missing or was written for another configuration."""


def _resume_config(cfg: CheckConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE}


def load_partial(path: Path, cfg: CheckConfig, tasks: list[dict]) -> dict[tuple, dict]:
    """The finished records of a ``.partial.jsonl`` (last one per task wins), checked against ``cfg``."""
    if not path.exists():
        raise ResumeError(f"--resume: {path} does not exist")
    header, recs = None, {}
    keys = {task_key(t) for t in tasks}
    for line in path.read_text().splitlines():
        try:
            x = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        if "header" in x:
            header = x["header"]
        elif "kind" in x and not x.get("not_run") and task_key(x) in keys:
            recs[task_key(x)] = x
    want = _jsonable_loose(_resume_config(cfg))
    if header is None or header.get("config") != want:
        diff = sorted(k for k in want if (header or {}).get("config", {}).get(k) != want[k])
        raise ResumeError(f"--resume: {path} was written for another configuration (differs in: {', '.join(diff)})")
    return recs


class _Signals:
    """While armed: SIGTERM / SIGINT, and SIGALRM at the hard time limit, raise Stopped in the main
    thread (once; later signals are only remembered, so that the report gets written)."""

    def __init__(self, hard_deadline: float | None):
        self.armed, self.reason, self.old = False, None, {}
        self.main = threading.current_thread() is threading.main_thread()
        self.hard_deadline = hard_deadline

    def _handler(self, signum, frame):
        reason = TIME_LIMIT if signum == signal.SIGALRM else f"interrupted by {signal.Signals(signum).name}"
        self.reason = self.reason or reason
        if self.armed:
            self.armed = False
            raise Stopped(reason)

    def __enter__(self):
        if self.main:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
                self.old[sig] = signal.signal(sig, self._handler)
            if self.hard_deadline is not None:
                signal.setitimer(signal.ITIMER_REAL, max(self.hard_deadline - time.time(), 1e-3))
        self.armed = True
        return self

    def disarm(self):
        self.armed = False
        if self.main and self.hard_deadline is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def __exit__(self, *exc):
        self.disarm()
        for sig, h in self.old.items():
            signal.signal(sig, h)
        return False


def run(cfg: CheckConfig, command: str = "", log=print, isolate: bool | None = None, resume=None) -> dict:
    """All checks; writes the report files and returns the report. ``isolate`` (default: on CUDA) runs
    them in worker processes, so that a device-side assert cannot take the later methods down.
    ``cfg.time_limit``, SIGTERM / SIGINT: the report of the tasks finished so far, the rest not run.
    ``resume``: True (this report's ``.partial.jsonl``) or a path: reuse its finished records."""
    t_start = time.perf_counter()
    t_wall0 = time.time()
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    _precision(device)
    methods = ["none"] + [m for m in cfg.methods if m != "none"]
    env = environment(device)
    isolate = device.type == "cuda" if isolate is None else isolate
    log(f"gpu_check on {env['device_name']} ({device}); dtypes {' '.join(cfg.dtypes)}; families "
        f"{' '.join(cfg.families)}; {len(methods)} methods" + ("" if cfg.tiny else " (fast-path section only)")
        + ("; TTFT on " + cfg.ttft_model if cfg.ttft else "")
        + (f"; fast path ({cfg.fast_prompts} prompts x {cfg.fast_tokens} tokens"
           + (f", timing on {cfg.fast_ttft_model}" if cfg.fast_ttft else "") + ")" if cfg.fast else "")
        + (f"; time limit {cfg.time_limit:g} s" if cfg.time_limit else ""))
    tasks = make_tasks(cfg, methods)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-check-{slug(env['device_name'])}-{env['date']}"
    partial = out / f"{stem}.partial.jsonl"
    done: dict[tuple, dict] = {}
    if resume:
        done = load_partial(partial if resume is True else Path(resume), cfg, tasks)
        for r in done.values():
            r["resumed"] = True
        log(f"  resumed {len(done)} finished task(s) from {partial if resume is True else resume}")
    deadline = None if not cfg.time_limit else t_wall0 + cfg.time_limit - cfg.time_reserve
    stop_reason = None
    with open(partial, "w") as pf:
        def emit(rec):
            done[task_key(rec)] = rec
            pf.write(json.dumps(_sanitize(_jsonable_loose(rec)), allow_nan=False) + "\n")
            pf.flush()

        pf.write(json.dumps({"header": {"tool": "bench.gpu_check", "command": command,
                                        "config": _jsonable_loose(_resume_config(cfg)), "tasks": tasks}}) + "\n")
        for r in list(done.values()):
            emit(r)
        todo = [t for t in tasks if task_key(t) not in done]
        sig = _Signals(deadline)
        with sig:
            try:
                if todo and isolate:
                    run_isolated(todo, cfg, log, emit=emit, deadline=deadline)
                elif todo:
                    try:
                        if not run_tasks(todo, cfg, emit, log, deadline=deadline):
                            stop_reason = TIME_LIMIT
                    except DeviceLost as e:  # in-process there is no way back: the rest is reported as not run
                        log(f"  device lost ({e}); the remaining tasks did not run (run with isolation)")
            except Stopped as e:
                stop_reason = e.reason
            finally:
                sig.disarm()
            if stop_reason:
                log(f"  stopped: {stop_reason}; writing the report of the {len(done)} finished task(s)")
            recs = []
            for t in tasks:
                if task_key(t) in done:
                    recs.append(done[task_key(t)])
                elif stop_reason:
                    recs.append({**t, "scenarios": {}, "seconds": None, "error": None, "not_run": stop_reason})
                else:
                    recs.append({**t, "scenarios": {}, "seconds": None,
                                 "error": ["not run: an earlier task took the device down"]})
            report = _report(cfg, command, env, device, isolate, methods, recs, t_start, out, stem)
            report["stopped"] = stop_reason
            if report["summary"].get("partial"):
                report["partial_file"] = str(partial)  # kept: --resume runs only the tasks not run
            (out / f"{stem}.json").write_text(json.dumps(_sanitize(_jsonable_loose(report)), indent=1, allow_nan=False))
            (out / f"{stem}.md").write_text(markdown(report))
    if not report["summary"].get("partial"):
        partial.unlink(missing_ok=True)  # the complete report holds every record
    return report


def _report(cfg, command, env, device, isolate, methods, recs, t_start, out, stem) -> dict:
    from bench import gpu_check_fast

    tiny = [r for r in recs if r["kind"] == "tiny"]
    for r in tiny:
        r.setdefault("budget", tiny_budget(r["method"], family_key(r["family"])))
    judge(tiny)
    report = {"tool": "bench.gpu_check", "command": command, "environment": env,
              "config": {**asdict(cfg), "device": str(device)}, "isolated": isolate, "methods": methods,
              "budgets": {m: {f: tiny_budget(m, family_key(f)) if supported(m, family_key(f)) else "n/a"
                              for f in cfg.families} for m in methods},
              "tiny": tiny, "ttft": ttft_table([r for r in recs if r["kind"] == "ttft"], cfg) if cfg.ttft else None,
              "fast": gpu_check_fast.section(cfg, [r for r in recs if r["kind"] in ("fast", "fast_ttft")], tiny)}
    report["summary"] = summarize(report, cfg)
    report["seconds"] = time.perf_counter() - t_start
    report["files"] = [str(out / f"{stem}.json"), str(out / f"{stem}.md")]
    return report


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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
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
    ap.add_argument("--ttft-text-words", type=int, default=d.ttft_text_words)
    f = ap.add_argument_group("fast path (bench/gpu_check_fast.py)")
    f.add_argument("--fast", action=argparse.BooleanOptionalAction, default=d.fast,
                   help="the fast-path section: equality on the tiny LLaVA families and timing (default: on)")
    f.add_argument("--fast-only", action="store_true",
                   help="only the fast-path section (no tiny-model checks, no eager TTFT table)")
    f.add_argument("--fast-backend", default=d.fast_backend, choices=["auto", "inductor", "eager", "aot_eager"],
                   help="the fast path's compile backend, compared with the same path uncompiled (default auto: "
                   "Inductor + CUDA graphs on CUDA, dynamo 'eager' on a CPU)")
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
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        return worker_main(*a.worker)
    device = a.device
    if device is None or device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device is available; nothing was run "
                  "(use --device cpu for a CPU run of the same checks).")
            return 0
        device = device or "cuda"
    is_cpu = torch.device(device).type == "cpu"
    dtypes = a.dtypes or (["float32"] if is_cpu else ["float16", "bfloat16", "float32"])
    try:
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
    except ValueError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    cfg = CheckConfig(device=device, dtypes=dtypes, methods=list(methods), families=list(dict.fromkeys(a.families)),
                      new_tokens=a.new_tokens, seed=a.seed, max_syncs_per_sample=a.max_syncs_per_sample, ttft=a.ttft,
                      ttft_model=a.ttft_model, ttft_dtype=ALIASES.get(a.ttft_dtype, a.ttft_dtype),
                      ttft_budget=a.ttft_budget, ttft_methods=a.ttft_methods or [], ttft_warmup=a.ttft_warmup,
                      ttft_runs=a.ttft_runs, ttft_text_words=a.ttft_text_words, out=a.out, threads=a.threads,
                      time_limit=a.time_limit or None, time_reserve=a.time_reserve, tiny=not a.fast_only,
                      fast=a.fast or a.fast_only, fast_backend=a.fast_backend, fast_dtypes=fast_dtypes,
                      fast_prompts=a.fast_prompts, fast_tokens=a.fast_tokens, fast_ttft=a.fast_ttft and a.ttft,
                      fast_ttft_model=a.fast_ttft_model, fast_ttft_methods=a.fast_ttft_methods or [],
                      fast_next_model=a.fast_next_model, fast_next_tokens=list(a.fast_next_tokens),
                      fast_next_methods=a.fast_next_methods or [])
    if a.fast_only:
        cfg.ttft = False
    command = "python -m bench.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        report = run(cfg, command.strip(), isolate=a.isolate, resume=a.resume)
    except ResumeError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
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
    return exit_status(summ)


def exit_status(summ: dict) -> int:
    """0 PASS (complete), 1 a failed check (complete or partial), 3 PARTIAL with no failure."""
    if summ.get("verdict") == "FAIL" or (not summ["pass"] and not summ.get("partial")):
        return 1
    return 3 if summ.get("partial") else 0


if __name__ == "__main__":
    sys.exit(main())
