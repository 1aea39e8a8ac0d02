"""Compiled decoding with a pruning method attached: generate(cache_implementation="static") with
transformers' auto-compiled decode step (torch.compile) must give the same tokens as the eager run AND
decode with one graph: the step is compiled once, at the first decode token, and never again.

    python scripts/bench/compile_decode.py --device cuda --method visionzip --budget 4
    python scripts/bench/compile_decode.py --device cpu      # inductor: ~20 s of compilation on 2 idle cores
    python scripts/bench/compile_decode.py --device cpu --backend eager --method fastv --budget 8 --batch 1 3 16
    python scripts/bench/compile_decode.py --device cpu --backend eager --method none --budget none

On CUDA transformers compiles the decode step by itself with a static cache; elsewhere the script asks
for it (CompileConfig._compile_all_devices). Per family x batch size it runs one eager generate
(disable_compile=True) and two compiled ones (the first compiles: the warm-up), and counts

- graphs: the graphs dynamo compiled during each compiled generate (torch._dynamo.utils.counters
  ["stats"]["unique_graphs"]); one decode graph is 1 in the first call and 0 in the second (more than
  1 in the first call without a recompile would be graph breaks);
- recompiles: every recompilation of a frame that already had a graph (dynamo's "recompiles" log, the
  same messages as TORCH_LOGS=recompiles; the first failing guard of each is printed).

Exits 1 when the compiled tokens differ from the eager ones, or when the decode recompiled after its
first compilation (any recompile, or a graph compiled in the second call). Issue 34: a check that only
prints "compiled == eager" cannot tell compiled from eager; before the fix the step recompiled at every
token and, past dynamo's recompile limit of 8, silently ran eagerly, with the same tokens.
"""

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from llava.models import load  # noqa: E402


@contextlib.contextmanager
def count_recompiles():
    """Collects dynamo's recompilation messages ("Recompiling function ... triggered by the following guard
    failure(s): ...") while the block runs; yields the list they are appended to."""
    messages: list[str] = []

    class _Handler(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    log = logging.getLogger("torch._dynamo.guards.__recompiles")
    handler = _Handler(level=logging.DEBUG)
    torch._logging.set_logs(recompiles=True)
    log.addHandler(handler)
    propagate, log.propagate = log.propagate, False  # counted and summarised here, not printed whole
    try:
        yield messages
    finally:
        log.removeHandler(handler)
        log.propagate = propagate
        torch._logging.set_logs()


def first_guard(message: str) -> str:
    """The first failing guard of a recompilation message (the line after 'guard failure(s):')."""
    lines = message.splitlines()
    for i, line in enumerate(lines):
        if "guard failure" in line and i + 1 < len(lines):
            return lines[i + 1].strip().lstrip("- ").strip()
    return lines[0] if lines else ""


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--method", default="visionzip")
    ap.add_argument("--budget", type=lambda v: None if v.lower() == "none" else int(v), default=4,
                    help="visual tokens kept ('none': the method's default, e.g. for --method none)")
    ap.add_argument("--families", nargs="+", default=["llava"])
    ap.add_argument("--batch", nargs="+", type=int, default=[3], help="batch sizes (rows of different prompts)")
    ap.add_argument("--tokens", type=int, default=33, help="new tokens per generate (the first from the prefill, "
                                                            "then tokens - 1 decode steps)")
    ap.add_argument("--backend", default="inductor",
                    help="torch.compile backend of the decode step (inductor: transformers' default; "
                         "eager / aot_eager: dynamo's guards without code generation, fast on a CPU)")
    args = ap.parse_args(argv)
    from transformers import CompileConfig

    from llava.demo_image import demo_image

    ok = True
    for fam in args.families:
        rt = load(f"tiny:{fam}", seed=1, dtype=args.dtype, device=args.device)
        rt.prune(args.method, args.budget)
        for n in args.batch:
            base = [demo_image(), demo_image().rotate(90, expand=True), demo_image().resize((60, 40))]
            imgs = [base[i % 3] for i in range(n)]
            qs = [["what is this?", "what color is it?", "how many?"][i % 3] for i in range(n)]
            if rt.family == "video_llava":
                inputs = rt.processor(qs, videos=[[im] * 8 for im in imgs], device=args.device)
            else:
                inputs = rt.processor(qs, imgs, device=args.device)
            gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                       cache_implementation="static")
            cc = CompileConfig(fullgraph=False, dynamic=False, backend=args.backend,
                               **({} if args.backend == "inductor" else {"mode": None}))
            cc._compile_all_devices = True
            torch._dynamo.reset()  # a fresh count per case (the engine's forward is one code object)
            with torch.no_grad():
                eager = rt.model.generate(**inputs, **gen, disable_compile=True)
                with count_recompiles() as recompiles:
                    g0, t = _graphs(), time.perf_counter()
                    compiled = rt.model.generate(**inputs, **gen, compile_config=cc)
                    g1, t_first = _graphs(), time.perf_counter() - t
                    t = time.perf_counter()
                    again = rt.model.generate(**inputs, **gen, compile_config=cc)
                    g2, t_again = _graphs(), time.perf_counter() - t
            same = torch.equal(eager, compiled) and torch.equal(eager, again)
            # compiled at the first decode step, never again (more than one graph there = graph breaks)
            once = not recompiles and g1 > g0 and g2 == g1
            ok &= same and once
            print(f"{fam} {args.method}@{args.budget} batch {n} {args.device} {args.dtype} {args.backend}: "
                  f"compiled == eager: {same}; decode graphs compiled {g1 - g0} (first call) + {g2 - g1} (second), "
                  f"recompiles {len(recompiles)} over {args.tokens - 1} decode steps x 2: "
                  f"{'compiled once' if once else 'RECOMPILED'} "
                  f"(first call {t_first:.1f} s incl. compilation, second {t_again:.2f} s)", flush=True)
            for m in recompiles[:3]:
                print(f"    recompiled on: {first_guard(m)}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
