"""How the fast path's compile time grows with the decoder's depth: the tiny LLaVA with its decoder layers
repeated to N, ``load(fast=True, fast_backend=...)``, the unpruned model's first ``generate`` of 4 tokens (the
cold compile of the prefill and the decode: each row in its own process with an empty Inductor cache folder, or
``--warm``: the machine's cache, kept between rows) and a second identical one (nothing should compile), with
and without ``torch.compiler.nested_compile_region`` on every decoder layer (the repeated layer marked as one
region; ``--regional``).

    python -m bench.compile_depth --layers 4 32 --backend inductor --regional both

One process per (layers, regional) row (a fresh dynamo / Inductor state each), the rows printed as they end.
A benchmark, not a test: CPU timings on a shared machine scatter; run each row alone for the record.
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
import types


def _one(layers: int, regional: bool, backend: str) -> dict:
    import torch

    from llava.models import load

    rt = load("tiny:llava", seed=1, fast=True, fast_max_new_tokens=8, fast_backend=backend)
    lm = rt.model.model.language_model
    base = list(lm.layers)
    while len(lm.layers) < layers:  # the same layers again: the real model's structure at another depth
        layer = copy.deepcopy(base[len(lm.layers) % len(base)])
        layer.self_attn.layer_idx = len(lm.layers)
        lm.layers.append(layer)
    del lm.layers[layers:]
    lm.config.num_hidden_layers = rt.model.config.text_config.num_hidden_layers = layers
    if regional:
        regions = {}
        for layer in lm.layers:
            cls = type(layer)
            regions.setdefault(cls, torch.compiler.nested_compile_region(cls.forward))
            layer.forward = types.MethodType(regions[cls], layer)
    eng = rt.prune("none")
    from llava.demo_image import demo_image

    batch = rt.processor(["what is in the picture?"], [demo_image()])
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        with torch.no_grad():
            rt.model.generate(**batch, max_new_tokens=4, do_sample=False)
        times.append(time.perf_counter() - t0)
    return {"layers": layers, "regional": regional, "backend": backend, "first_s": round(times[0], 2),
            "second_s": round(times[1], 3), "path": eng.stats.path}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compile_depth", description=__doc__)
    ap.add_argument("--layers", nargs="+", type=int, default=[4, 32])
    ap.add_argument("--backend", default="inductor", help="the fast path's backend (inductor, eager, aot_eager, ...)")
    ap.add_argument("--regional", choices=["yes", "no", "both"], default="both")
    ap.add_argument("--warm", action="store_true", help="keep the machine's Inductor cache (default: a new empty one "
                    "per row: the cold compile)")
    ap.add_argument("--one", nargs=2, metavar=("LAYERS", "REGIONAL"), help=argparse.SUPPRESS)  # a row, in-process
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(_one(int(a.one[0]), a.one[1] == "1", a.backend)))
        return 0
    modes = {"yes": [True], "no": [False], "both": [True, False]}[a.regional]
    for layers in a.layers:
        for regional in modes:
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ) if a.warm else {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                r = subprocess.run([sys.executable, "-m", "bench.compile_depth", "--backend", a.backend, "--one",
                                    str(layers), "1" if regional else "0"], capture_output=True, text=True, env=env)
            if r.returncode:
                print(f"error: layers {layers}, regional {regional}: {r.stderr.strip().splitlines()[-1:]}",
                      file=sys.stderr)
                return 1
            print(json.dumps({**json.loads(r.stdout.strip().splitlines()[-1]), "inductor_cache": "warm" if a.warm
                              else "empty"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
