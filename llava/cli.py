"""Command line: answer a question about an image with a chosen model, method and budget.

    python -m llava.cli ask --model tiny:llava --image photo.jpg --question "What is this?" \
        --method random --budget 8
    python -m llava.cli methods
    python -m llava.cli demo          # the tiny-model demo: all families x methods x budgets
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def parse_options(pairs: list[str], what: str = "--opt") -> dict:
    """``key=value`` strings to a dict; values parsed as JSON where they are JSON (3, true, [1,2])."""
    out = {}
    for p in pairs or []:
        if "=" not in p:
            print(f"error: {what} expects key=value, got {p!r}", file=sys.stderr)
            raise SystemExit(2)  # exit code 2, as every other bad input
        k, v = p.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` keeps the description's layout and shows every option's default (options whose default is
    None, False or empty say in their help what leaving them out means)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if ("%(default)" in h or not action.option_strings or action.default in (None, False, argparse.SUPPRESS)
                or action.default == []):
            return h
        return (h + " " if h else "") + "(default: %(default)s)"


def budget_without_method(method, budget) -> str | None:
    """The error of a budget given with the method "none" (which prunes nothing: the budget would be ignored)."""
    if budget is None or str(method).lower() != "none":
        return None
    return (f"--budget {budget} needs a pruning method: the method is 'none' (the default: no pruning), which would "
            "ignore it; add --method NAME (python -m llava.cli methods lists them) or leave the budget out")


class InputError(ValueError):
    """A bad input to :func:`ask` (model, method, budget, option, image or video); the command line
    prints it as one ``error:`` line with exit code 2. Anything else is a bug and keeps its traceback."""


def load_error() -> str | None:
    """The registry loaded (built-in and user methods), or the one line a command prints when a user's module
    failed (``python -m llava.cli``, ``python -m eval``: exit 2)."""
    from .method import available_methods
    from .plugins import MethodPluginError

    try:
        available_methods()
    except MethodPluginError as e:
        return f"error: {e}"
    return None


def _msg(e: BaseException) -> str:
    return str(e.args[0]) if e.args else str(e)


def ask(model, question, image=None, video=None, method="none", budget=None, options=None, dtype=None, device=None,
        max_new_tokens=32, next_layout="spatial_unpad", rt=None):
    """Answer one question; returns a dict with the answer, token accounting and timings."""
    import torch

    from .demo_image import demo_image
    from .families import registry
    from .method import BudgetError
    from .models import load

    bad = budget_without_method(method, budget)
    if bad:
        raise InputError(bad)
    if rt is None:
        try:
            rt = load(model, dtype=dtype, device=device, next_layout=next_layout)
        except (ValueError, OSError) as e:  # unknown tiny family, no such hub id / directory
            raise InputError(f"cannot load model {model!r}: {_msg(e)}") from e
    try:
        eng = rt.prune(method, budget, **(options or {}))  # unknown method / option, budget <= 0
    except (KeyError, ValueError, TypeError) as e:
        raise InputError(_msg(e)) from e
    dev = next(rt.model.parameters()).device
    try:  # missing / unreadable image, empty video folder
        if video is not None:
            batch = rt.processor([question], videos=[video], device=dev)
        else:
            if registry.get(rt.family).video_model and image is None:  # a video model's demo: frames
                batch = rt.processor([question], videos=[[demo_image()] * rt.processor.num_frames], device=dev)
            else:
                batch = rt.processor([question], [image if image is not None else demo_image()], device=dev)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(_msg(e)) from e
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:  # a budget / option the method cannot serve on this input (it sees the layout only now)
        with torch.inference_mode():
            out = rt.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    except BudgetError as e:
        raise InputError(_msg(e)) from e
    if dev.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    answer = rt.processor.decode(out[:, batch["input_ids"].shape[1]:])[0]
    st = eng.stats
    s = st.samples[0]
    res = {
        "model": rt.name, "method": eng.method.config(), "answer": answer,
        "visual_candidates": s.visual_candidates, "visual_entering_llm": s.visual_entering_llm,
        "visual_layer_avg": s.visual_layer_avg, "visual_per_layer": s.visual_per_layer,
        "time_s": {**{k: round(v, 4) for k, v in st.timings.items()}, "generate_total": round(total, 4)},
    }
    # as the harness: a budget at or above the visual tokens prunes nothing (LLM-stage methods: every layer kept all)
    if budget is not None and s.vision_noop and s.visual_layer_avg >= s.visual_candidates:
        res["note"] = (f"budget {budget} >= the {s.visual_candidates} visual tokens of this input: nothing was pruned "
                       "(the answer is the unpruned model's)")
    return res


def _print(res: dict) -> None:
    print(f"answer: {res['answer']}")
    if res.get("note"):
        print(f"note: {res['note']}")
    print(f"visual tokens: {res['visual_candidates']} candidates -> {res['visual_entering_llm']} entering the LLM, "
          f"{res['visual_layer_avg']:.1f} averaged over LLM layers")
    t = res["time_s"]
    print(f"time: vision {t['vision'] * 1e3:.1f} ms, selection {t['selection'] * 1e3:.1f} ms, "
          f"LLM prefill {t['llm'] * 1e3:.1f} ms, generate total {t['generate_total'] * 1e3:.1f} ms")


def demo(budgets=("keep-all", "50%", "small")) -> list[dict]:
    """The embedded default job: tiny random-weight models of the CLIP-tower families (LLaVA-1.5, NeXT, Video-LLaVA),
    a synthetic picture, and each registered control method at keep-all, 50% and a small budget."""
    from .families import registry
    from .models import load

    rows = []
    for f in registry.families():
        if f.tower != "clip":
            continue
        fam = f.tiny
        rt = load(f"tiny:{fam}")
        per_unit = 17 if f.video_model else 16  # a tiny frame keeps its [CLS]
        for method in ("none", "random"):
            for b in budgets if method != "none" else ("keep-all",):
                budget = {"keep-all": None if method == "none" else 10**6, "50%": per_unit // 2, "small": 2}[b]
                res = ask(None, "what color is the circle?", method=method, budget=budget, rt=rt, max_new_tokens=8)
                rows.append({**res, "family": fam, "method": method, "budget": b})
    print(f"{'family':12} {'method':8} {'budget':9} {'cand':>5} {'in LLM':>6} {'avg':>6} {'ms':>7}  answer")
    for r in rows:
        print(f"{r['family']:12} {r['method']:8} {r['budget']:9} {r['visual_candidates']:>5} {r['visual_entering_llm']:>6} "
              f"{r['visual_layer_avg']:>6.1f} {r['time_s']['generate_total'] * 1e3:>7.1f}  {r['answer']!r}")
    print("(tiny random-weight models: the answers are noise; the token counts and timings are real)")
    return rows


def main(argv=None) -> int:
    from .families import registry

    ap = argparse.ArgumentParser(prog="python -m llava.cli", description=__doc__, formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ask", help="answer a question about an image / video", formatter_class=HelpFormatter)
    a.add_argument("--model", default=registry.DEFAULT_MODEL, help="hub id, local dir, shape:<name> or tiny:<family>")
    a.add_argument("--image", help="image file (default: a built-in synthetic picture)")
    a.add_argument("--video", help="directory of frame images (Video-LLaVA)")
    a.add_argument("--question", required=True)
    a.add_argument("--method", default="none", help="pruning method (none: the unpruned model; `python -m llava.cli "
                   "methods` lists them)")
    a.add_argument("--budget", type=int, default=None, help="visual-token budget in the method's own convention "
                   "(docs/methods/README.md); needs --method; most methods require one")
    a.add_argument("--opt", action="append", default=[], help="method option key=value (repeatable)")
    a.add_argument("--dtype", default=None, choices=[None, "float32", "float16", "bfloat16"],
                   help="default: the checkpoint's (tiny / shape models: float32)")
    a.add_argument("--device", default=None, help="default: the CPU; cuda for a GPU")
    a.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit")
    a.add_argument("--next-layout", default="spatial_unpad", choices=["spatial_unpad", "spatial"],
                   help="LLaVA-NeXT: how the crops' tokens are laid out")
    a.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ml = sub.add_parser("methods", help="list the registered methods, or one method's options",
                        formatter_class=HelpFormatter)
    ml.add_argument("name", nargs="?", default=None, help="a method: list its options (default, what each takes)")
    sub.add_parser("demo", help="tiny-model demo over the three families", formatter_class=HelpFormatter)
    args = ap.parse_args(argv)
    if err := load_error():  # the user's methods (VTPRUNE_METHODS, entry points) load before anything runs
        print(err, file=sys.stderr)
        return 2
    if args.cmd == "methods":
        from .method import _REGISTRY, available_methods
        from .options import describe, did_you_mean

        if args.name is not None:
            if args.name.lower() not in _REGISTRY:
                print(f"error: unknown method {args.name!r}{did_you_mean(args.name.lower(), available_methods())}",
                      file=sys.stderr)
                return 2
            print("\n".join(describe(_REGISTRY[args.name.lower()].option_defaults())))
            return 0
        for name in available_methods():  # with the fast path's verdict (llava.load(..., fast=True))
            cls = _REGISTRY[name]
            print(f"{name:<16} " + ({"full": "fast path: captured", "piecewise": "fast path: captured piecewise"}
                                     .get(cls.capturable)
                                     or f"fast path: eager ({cls.capture_reason or 'not capturable'})"))
        return 0
    if args.cmd == "demo":
        demo()
        return 0
    try:
        res = ask(args.model, args.question, image=args.image, video=args.video, method=args.method,
                  budget=args.budget, options=parse_options(args.opt), dtype=args.dtype, device=args.device,
                  max_new_tokens=args.max_new_tokens, next_layout=args.next_layout)
    except InputError as e:  # bad input: one line; a bug elsewhere keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res) if args.json else "", end="\n" if args.json else "")
    if not args.json:
        _print(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
