"""How the fast path's compile time grows with the decoder's depth, and what a warm compile cache saves: the
tiny LLaVA with its decoder layers repeated to N, ``load(fast=True, fast_backend=..., fast_regional=...,
fast_cache=FOLDER)``, the unpruned model's first ``generate`` of 4 tokens (the cold compile of the prefill and the
decode, in a process of its own with an empty cache folder), a second identical ``generate`` in the same process
(nothing should compile), then a second process on the same cache folder (its first ``generate``: what a later job
pays). ``--regional``: with the fast path's regional compilation (every repeated layer class traced once,
:mod:`llava.fast.compile`; the default of ``load``), without it (the whole prefill traced layer by layer), or both.

    python -m bench.compile_depth --layers 4 32 --backend inductor --regional both
    python -m bench.compile_depth --layers 4 32 --backend inductor --regional yes --precompile on

``--precompile``: ``default`` (the variable ``VTPRUNE_FAST_PRECOMPILE`` unset in the processes: what a user gets, the
functions saved ahead of time in the cache folder and loaded by the second process without tracing where the
backend and torch allow, :mod:`llava.fast.precompile`), ``on`` (``=1``: an error where they cannot be) or ``off``
(``=0``: the regular compile, traced in every process); each row says how many functions its process compiled and
loaded.

Every process is timed from outside: the parent takes the wall clock just before it spawns the process, and the
process stamps the wall clock at each phase's end, so ``first_tokens_s`` is from the spawn (the interpreter's start,
checked against the kernel's start time of the process, ``age_at_main_s``) to the end of the first ``generate``; its
``phases`` say where that time went: ``start`` (the interpreter to this module's first line), ``import_torch``,
``import_llava`` (``llava.models``: transformers' modeling stack, the engine), ``bench`` (this benchmark's hook on
the ISA check: 0 s when ``llava.models`` already imported Inductor's module), ``model`` (``load`` and the deeper
decoder, the unpruned engine attached), ``inputs`` (the processor on the demo image) and ``first_generate``;
its ``parts``: ``fast_load`` (inside ``first_generate``: the precompiled functions read, their generated code and
kernels' libraries loaded) and ``vec_isa`` (Inductor's CPU vector-ISA check, once a process: inside ``model`` where
the fast path makes it, :func:`llava.fast.compile.vec_isa`, else inside ``fast_load`` or the compile).
``process_s`` (the measure of the earlier records): the spawn to the process's exit, less its second ``generate``.
``--warm-processes N``: N second processes on the warm folder (their rows, the median and spread of their
``first_tokens_s``); ``--cache DIR``: that folder instead of an empty temporary one (kept: a later call's first
process is warm too).

The rows are printed as they end (JSON). A benchmark, not a test: CPU timings on a shared machine scatter; run
each row alone for the record (the rows give the machine's load average at their start).
"""

from __future__ import annotations

import time

_T_MAIN = time.time()  # this module's first line: the parent's spawn to here is the interpreter's start

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402


def _age() -> float | None:
    """Seconds since the kernel started this process (Linux: /proc/self/stat, in clock ticks), else None."""
    try:
        with open("/proc/self/stat") as fh:
            start = int(fh.read().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


_AGE_AT_MAIN = _age()
if _AGE_AT_MAIN is not None:
    _AGE_AT_MAIN -= time.time() - _T_MAIN  # at this module's first line


def _timed_vec_isa(out: dict) -> None:
    """Count the seconds spent in Inductor's CPU vector-ISA check (``valid_vec_isa_list``, once per process) in
    ``out["vec_isa_s"]``: a measurement, the check itself unchanged."""
    import torch._inductor.cpu_vec_isa as isa

    inner = isa.valid_vec_isa_list
    out["vec_isa_s"] = 0.0

    def timed():
        t0 = time.perf_counter()
        try:
            return inner()
        finally:
            out["vec_isa_s"] += time.perf_counter() - t0

    timed.cache_info = inner.cache_info  # still answers as the cached function does
    timed.cache_clear = inner.cache_clear
    isa.valid_vec_isa_list = timed


def _one(layers: int, regional: bool, backend: str, cache: str) -> dict:
    stamps = {"main": _T_MAIN}
    import torch

    stamps["import_torch"] = time.time()
    from llava.families.registry import DEFAULT_MODEL
    from llava.models import load

    stamps["import_llava"] = time.time()
    meta: dict = {}
    _timed_vec_isa(meta)
    stamps["bench"] = time.time()  # the measurement's hook (its import, when llava.models has not made it), apart
    t0 = time.perf_counter()
    rt = load(DEFAULT_MODEL, seed=1, fast=True, fast_max_new_tokens=8, fast_backend=backend, fast_regional=regional,
              fast_cache=cache)
    lm = rt.model.model.language_model
    base = list(lm.layers)
    while len(lm.layers) < layers:  # the same layers again: the real model's structure at another depth
        layer = copy.deepcopy(base[len(lm.layers) % len(base)])
        layer.self_attn.layer_idx = len(lm.layers)
        lm.layers.append(layer)
    del lm.layers[layers:]
    lm.config.num_hidden_layers = rt.model.config.text_config.num_hidden_layers = layers
    eng = rt.prune("none")  # the fast path marks the regions of the layers the model has now
    stamps["model"] = time.time()
    from llava.demo_image import demo_image

    batch = rt.processor(["what is in the picture?"], [demo_image()])
    stamps["inputs"] = time.time()
    load_s = time.perf_counter() - t0
    from torch._dynamo.utils import counters

    times, graphs = [], []
    for i in range(2):
        t0 = time.perf_counter()
        with torch.no_grad():
            rt.model.generate(**batch, max_new_tokens=4, do_sample=False)
        times.append(time.perf_counter() - t0)
        if i == 0:
            stamps["first_generate"] = time.time()
        graphs.append(counters["stats"]["unique_graphs"])
    fns = [f for f in (eng.fast._tower, eng.fast._prefill, eng.fast._decode) if hasattr(f, "loaded")]
    pre = {"compiled": sum(f.compiled for f in fns), "loaded": sum(f.loaded for f in fns)} if fns else None
    fast_load = round(sum(getattr(f, "load_s", 0.0) for f in fns), 3) if fns else None
    return {"layers": layers, "regional": eng.fast.regional, "backend": backend, "load_s": round(load_s, 2),
            "precompiled": pre,
            "first_s": round(times[0], 2), "second_s": round(times[1], 3), "second_new_graphs": graphs[1] - graphs[0],
            "path": eng.stats.path, "stamps": stamps, "age_at_main_s": _AGE_AT_MAIN,
            "fast_load_s": fast_load, "vec_isa_s": round(meta["vec_isa_s"], 3)}


#: the phases of a process's time to its first tokens, each from the previous stamp
PHASES = ("start", "import_torch", "import_llava", "bench", "model", "inputs", "first_generate")


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _process(layers: int, regional: bool, backend: str, cache: str, precompile: str = "default") -> dict:
    """One row's process, timed from its spawn (see the module docstring); ``precompile``: default (the variable
    unset), on or off."""
    env = {k: v for k, v in os.environ.items() if k != "VTPRUNE_FAST_PRECOMPILE"}
    if precompile != "default":
        env["VTPRUNE_FAST_PRECOMPILE"] = "1" if precompile == "on" else "0"
    load_avg = _load()
    t0 = time.perf_counter()
    t_spawn = time.time()  # the wall clock the process's stamps are compared with
    r = subprocess.run([sys.executable, "-m", "bench.compile_depth", "--backend", backend, "--one", str(layers),
                        "1" if regional else "0", cache], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"layers {layers}, regional {regional}: {r.stderr.strip().splitlines()[-1:]}")
    row = json.loads(r.stdout.strip().splitlines()[-1])
    stamps = row.pop("stamps")
    prev, phases = t_spawn, {}
    for name in PHASES:
        key = "main" if name == "start" else name
        phases[name] = round(stamps[key] - prev, 3)
        prev = stamps[key]
    row["phases"] = phases
    row["parts"] = {"fast_load": row.pop("fast_load_s"), "vec_isa": row.pop("vec_isa_s")}
    row["first_tokens_s"] = round(stamps["first_generate"] - t_spawn, 2)
    row["process_s"] = round(wall - row["second_s"], 2)
    row["load_avg"] = load_avg
    if row["age_at_main_s"] is not None:
        row["age_at_main_s"] = round(row["age_at_main_s"], 3)
    return row


def _spread(rows: list[dict], key: str) -> dict:
    xs = sorted(r[key] for r in rows)
    return {"median": round(statistics.median(xs), 2), "min": xs[0], "max": xs[-1], "n": len(xs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compile_depth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", nargs="+", type=int, default=[4, 32])
    ap.add_argument("--backend", default="inductor", help="the fast path's backend (inductor, eager, aot_eager, ...)")
    ap.add_argument("--regional", choices=["yes", "no", "both"], default="both")
    ap.add_argument("--precompile", nargs="?", const="on", default="default", choices=["default", "on", "off"],
                    help="the precompiled functions: default (VTPRUNE_FAST_PRECOMPILE unset: on where they can be), "
                    "on (=1; the bare flag) or off (=0, the regular compile)")
    ap.add_argument("--no-second-process", action="store_true", help="skip the second process on the warm cache")
    ap.add_argument("--warm-processes", type=int, default=1, metavar="N",
                    help="second processes on the warm folder, one after another (default 1)")
    ap.add_argument("--cache", metavar="DIR", help="the compile cache folder (kept) instead of an empty temporary one")
    ap.add_argument("--one", nargs=3, metavar=("LAYERS", "REGIONAL", "CACHE"), help=argparse.SUPPRESS)  # one process
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(_one(int(a.one[0]), a.one[1] == "1", a.backend, a.one[2])))
        return 0
    modes = {"yes": [True], "no": [False], "both": [True, False]}[a.regional]
    for layers in a.layers:
        for regional in modes:
            with tempfile.TemporaryDirectory() as tmp:  # an empty compile cache folder per row: the cold compile
                cache = a.cache or tmp
                try:
                    row = _process(layers, regional, a.backend, cache, a.precompile)
                    if not a.no_second_process:  # a later job: the same folder, a new process
                        warm = [_process(layers, regional, a.backend, cache, a.precompile)
                                for _ in range(max(1, a.warm_processes))]
                        row.update(warm_process_first_s=warm[0]["first_s"], warm_process_s=warm[0]["process_s"],
                                   warm_precompiled=warm[0]["precompiled"],
                                   warm_first_tokens_s=_spread(warm, "first_tokens_s"), warm_rows=warm)
                except RuntimeError as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 1
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
