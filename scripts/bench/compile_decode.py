"""Compiled decoding with a pruning method attached: generate(cache_implementation="static") with
transformers' auto-compiled decode step (torch.compile) must give the same tokens as the eager run.

    python scripts/bench/compile_decode.py --device cuda --method visionzip --budget 4
    python scripts/bench/compile_decode.py --device cpu      # ~1.5 min of compilation on 2 cores

On CUDA transformers compiles the decode step by itself with a static cache; elsewhere the script
asks for it (CompileConfig._compile_all_devices). Prints one line per family and exits 1 on a mismatch.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llava.models import load  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--method", default="visionzip")
    ap.add_argument("--budget", type=int, default=4)
    ap.add_argument("--families", nargs="+", default=["llava"])
    ap.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args(argv)
    from transformers import CompileConfig

    from llava.demo_image import demo_image

    ok = True
    for fam in args.families:
        rt = load(f"tiny:{fam}", seed=1, dtype=args.dtype, device=args.device)
        imgs = [demo_image(), demo_image().rotate(90, expand=True), demo_image().resize((60, 40))]
        if rt.family == "video_llava":
            inputs = rt.processor(["what is this?"] * 3, videos=[[im] * 8 for im in imgs], device=args.device)
        else:
            inputs = rt.processor(["what is this?", "what color is it?", "how many?"], imgs, device=args.device)
        rt.prune(args.method, args.budget)
        gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, cache_implementation="static")
        cc = CompileConfig(fullgraph=False, dynamic=False)
        cc._compile_all_devices = True
        with torch.no_grad():
            eager = rt.model.generate(**inputs, **gen, disable_compile=True)
            t = time.perf_counter()
            compiled = rt.model.generate(**inputs, **gen, compile_config=cc)
            t_first = time.perf_counter() - t
            t = time.perf_counter()
            again = rt.model.generate(**inputs, **gen, compile_config=cc)
            t_again = time.perf_counter() - t
        same = torch.equal(eager, compiled) and torch.equal(eager, again)
        ok &= same
        print(f"{fam} {args.method}@{args.budget} {args.device} {args.dtype}: compiled == eager: {same} "
              f"(first call {t_first:.1f} s incl. compilation, second {t_again:.2f} s)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
