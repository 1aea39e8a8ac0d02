"""How the fast path's compile time grows with the decoder's depth, and what a warm compile cache saves: the
tiny LLaVA with its decoder layers repeated to N, ``load(fast=True, fast_backend=..., fast_regional=...,
fast_cache=FOLDER)``, the unpruned model's first ``generate`` of 4 tokens (the cold compile of the prefill and the
decode, in a process of its own with an empty cache folder), a second identical ``generate`` in the same process
(nothing should compile), then a second process on the same cache folder (its first ``generate``: what a later job
pays). ``--regional``: with the fast path's regional compilation (every repeated layer class traced once,
:mod:`llava.fast_compile`; the default of ``load``), without it (the whole prefill traced layer by layer), or both.

    python -m bench.compile_depth --layers 4 32 --backend inductor --regional both
    python -m bench.compile_depth --layers 4 32 --backend inductor --regional yes --precompile

``--precompile``: the functions saved ahead of time in the cache folder and loaded by the second process without
tracing (``load(..., fast_precompile=True)``, :mod:`llava.fast_precompile`); each row then says how many functions
its process compiled and loaded.

The rows are printed as they end (JSON). A benchmark, not a test: CPU timings on a shared machine scatter; run
each row alone for the record.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time


def _one(layers: int, regional: bool, backend: str, cache: str) -> dict:
    import torch

    from llava.models import load

    t0 = time.perf_counter()
    rt = load("tiny:llava", seed=1, fast=True, fast_max_new_tokens=8, fast_backend=backend, fast_regional=regional,
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
    from llava.demo_image import demo_image

    batch = rt.processor(["what is in the picture?"], [demo_image()])
    load_s = time.perf_counter() - t0
    from torch._dynamo.utils import counters

    times, graphs = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        with torch.no_grad():
            rt.model.generate(**batch, max_new_tokens=4, do_sample=False)
        times.append(time.perf_counter() - t0)
        graphs.append(counters["stats"]["unique_graphs"])
    fns = [f for f in (eng.fast._tower, eng.fast._prefill, eng.fast._decode) if hasattr(f, "loaded")]
    pre = {"compiled": sum(f.compiled for f in fns), "loaded": sum(f.loaded for f in fns)} if fns else None
    return {"layers": layers, "regional": eng.fast.regional, "backend": backend, "load_s": round(load_s, 2),
            "precompiled": pre,
            "first_s": round(times[0], 2), "second_s": round(times[1], 3), "second_new_graphs": graphs[1] - graphs[0],
            "path": eng.stats.path}


def _process(layers: int, regional: bool, backend: str, cache: str, precompile: bool = False) -> dict:
    """One row's process; its wall time to the end of the first generate (interpreter start and imports included)."""
    env = {**os.environ, "VTPRUNE_FAST_PRECOMPILE": "1" if precompile else "0"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "bench.compile_depth", "--backend", backend, "--one", str(layers),
                        "1" if regional else "0", cache], capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"layers {layers}, regional {regional}: {r.stderr.strip().splitlines()[-1:]}")
    row = json.loads(r.stdout.strip().splitlines()[-1])
    row["process_s"] = round(time.perf_counter() - t0 - row["second_s"], 2)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compile_depth", description=__doc__)
    ap.add_argument("--layers", nargs="+", type=int, default=[4, 32])
    ap.add_argument("--backend", default="inductor", help="the fast path's backend (inductor, eager, aot_eager, ...)")
    ap.add_argument("--regional", choices=["yes", "no", "both"], default="both")
    ap.add_argument("--precompile", action="store_true", help="save the functions ahead of time; the second "
                    "process loads them (fast_precompile)")
    ap.add_argument("--no-second-process", action="store_true", help="skip the second process on the warm cache")
    ap.add_argument("--one", nargs=3, metavar=("LAYERS", "REGIONAL", "CACHE"), help=argparse.SUPPRESS)  # one process
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(_one(int(a.one[0]), a.one[1] == "1", a.backend, a.one[2])))
        return 0
    modes = {"yes": [True], "no": [False], "both": [True, False]}[a.regional]
    for layers in a.layers:
        for regional in modes:
            with tempfile.TemporaryDirectory() as cache:  # an empty compile cache folder per row: the cold compile
                try:
                    row = _process(layers, regional, a.backend, cache, a.precompile)
                    if not a.no_second_process:  # a later job: the same folder, a new process
                        warm = _process(layers, regional, a.backend, cache, a.precompile)
                        row.update(warm_process_first_s=warm["first_s"], warm_process_s=warm["process_s"],
                                   warm_precompiled=warm["precompiled"])
                except RuntimeError as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 1
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
