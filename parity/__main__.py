"""``python -m parity``: the official code beside ours (docs/parity.md). Exit 0 when every check agrees, 1 when one
differs, 2 when the official environment is missing or the arguments are wrong."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .jobs import Runner
from .report import seeds_table, table, write, write_seeds

REPO = Path(__file__).resolve().parents[1]
PARTS = ("all", "build", "llava15", "next", "scorers", "qwen", "pixels")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m parity", description=__doc__)
    p.add_argument("part", nargs="?", default="all", choices=PARTS,
                   help="all (default): build, llava15, next, scorers; build: the weights only; llava15: prompts, "
                        "pixels, logits, tokens, the methods' kept indices; next: the same on LLaVA-NeXT (anyres); "
                        "scorers: llava/eval's scorers vs ours; qwen: Qwen2.5-VL on Hugging Face's own classes "
                        "under transformers 4.52.4 (--qwen-venv) beside ours: prompts, pixels, grids, logits, tokens "
                        "and, with --method, the methods' official Qwen code (adapters with QWEN = True: mmtok, "
                        "ivcprune; priortr on Qwen3-VL under transformers 5.1.0, --qwen3-venv) beside ours "
                        "(not part of all: its environments are others); pixels: a pre-tower stage's keep rule "
                        "(PixelPrune's official selector from its clone, .official/pixelprune or --official-path) "
                        "beside ours through the engine, at Qwen3-VL's and Qwen3.5's patch geometry (not part of all)")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "parity",
                   help="where the weights, images, jobs and results go (default: runs/parity)")
    p.add_argument("--venv", type=Path, default=REPO / ".venv-official",
                   help="the official environment (default: .venv-official, made by scripts/official_env.sh)")
    p.add_argument("--qwen-venv", type=Path, default=REPO / ".venv-official-qwen",
                   help="the official environment of the qwen part and of the adapters whose official code is "
                        "transformers' own classes (IVC-Prune's fork) (default: .venv-official-qwen, made by "
                        "`bash scripts/official_env.sh qwen`)")
    p.add_argument("--qwen3-venv", type=Path, default=REPO / ".venv-official-qwen3",
                   help="the official environment of the qwen part's Qwen3-VL rows (PriorTR's Qwen3-VL code; "
                        "default: .venv-official-qwen3, made by `bash scripts/official_env.sh qwen3`)")
    p.add_argument("--qwen2vl-venv", type=Path, default=REPO / ".venv-official-qwen2vl",
                   help="the official environment of the qwen part's Qwen2-VL rows (V2Drop's and VLM-Pruner's "
                        "Qwen2-VL code with their own transformers 4.45; default: .venv-official-qwen2vl, made by "
                        "`bash scripts/official_env.sh qwen2vl`)")
    p.add_argument("--qwen457-venv", type=Path, default=REPO / ".venv-official-qwen457",
                   help="the official environment of CLSE's Qwen2-VL rows (its copy of transformers 4.57.6; default: "
                        ".venv-official-qwen457, made by `bash scripts/official_env.sh qwen457`)")
    p.add_argument("--official-path", default=None,
                   help="a clone of an official repository (its llava/ tree and its method package replace the "
                        "installed ones on the official side); default: .official/<method> when it exists "
                        "(scripts/official_clones.sh), else the installed official code")
    p.add_argument("--method", nargs="+", default=["flowcut"],
                   help="methods compared, by adapter (parity/adapters/; default: flowcut); next: flowcut and the "
                        "adapters with NEXT = True (fastervlm, visionzip, vispruner, cdpruner)")
    p.add_argument("--budgets", nargs="+", type=int, default=None,
                   help="budgets in each method's own unit (visual tokens kept for most; PyramidDrop / FastV: tokens "
                        "per layer on average); default: the adapter's BUDGETS, else 8 16 32")
    p.add_argument("--dtypes", nargs="+", choices=("fp32", "fp16"), default=["fp32", "fp16"],
                   help="fp32: both sides in fp32; fp16: the official builder's load (fp16 LLM, fp32 tower)")
    p.add_argument("--vision-attn", choices=("eager", "sdpa"), default="eager",
                   help="our CLIP tower's attention (eager = transformers 4.36's CLIP arithmetic; default eager)")
    p.add_argument("--next-budgets", nargs="+", type=int, default=None,
                   help="LLaVA-NeXT budgets: FlowCut's T (int(T/2) patches per crop in the tower, T after decoder "
                        "layer 1; default: 16 64); an adapter's tokens per crop (default: its NEXT_BUDGETS)")
    p.add_argument("--next-dtypes", nargs="+", choices=("fp32", "fp16"), default=["fp32"],
                   help="LLaVA-NeXT precisions (default: fp32; fp16 = the official builder's load)")
    p.add_argument("--next-variants", nargs="+", choices=("stock", "official"), default=None,
                   help="LLaVA-NeXT, our side: stock (llava.load's default next_geometry='transformers', llava-hf's "
                        "geometry: differs from the official code where docs/parity.md traces it) and official "
                        "(load(next_geometry='official'), the official geometry). Default: both for `next`, official "
                        "alone for `all` (so `all` exits 0 when our runtime's official geometry matches; "
                        "--next-variants stock official adds the stock rows)")
    p.add_argument("--qwen-budgets", nargs="+", type=float, default=None,
                   help="qwen part: each method's budgets in its own unit (MMTok: the retain ratio); default: the "
                        "adapter's QWEN_BUDGETS")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="the random weights' seed")
    p.add_argument("--seeds", nargs="+", default=None,
                   help="several builds in one run: seeds (0 4 5), ranges (0-5: both ends included; 0:6: the end "
                        "left out, as Python's range) or both; each seed's weights, jobs and checks.json in its own "
                        "folder WORK/seed<s>, the table per seed, then the checks identical per method (group) and "
                        "precision by seed (seeds.json); replaces --seed. An agreement on one set of random weights "
                        "is a sample, not a proof")
    p.add_argument("--jobs", type=int, default=1,
                   help="official jobs run at a time (default 1; our side runs meanwhile, one group at a time); a "
                        "progress line per finished job: [k/M] <job> <seconds> s")
    p.add_argument("--fresh", action="store_true",
                   help="run every official job again; by default a job whose output and stamp in --work exist with "
                        "unchanged inputs (its spec, the weights and files it reads, the worker code) is resumed")
    return p


def parse_seeds(words: list[str]) -> list[int]:
    """``--seeds``' words as seeds: ``4``, ``0-5`` (0 to 5), ``0:6`` (0 to 5). Raises ValueError on a word that is
    none of those, an empty range, or a seed named twice."""
    seeds: list[int] = []
    for w in words:
        sep = "-" if "-" in w else ":" if ":" in w else None
        parts = w.split(sep) if sep else [w]
        if not all(p.isdigit() for p in parts) or len(parts) > 2:
            raise ValueError(f"--seeds: {w!r} is not a seed (4), a range with both ends (0-5) or a Python range (0:6)")
        if sep is None:
            seeds.append(int(w))
            continue
        a, b = int(parts[0]), int(parts[1]) + (sep == "-")
        if a >= b:
            raise ValueError(f"--seeds: {w!r} is an empty range")
        seeds += range(a, b)
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise ValueError(f"--seeds names a seed twice: {', '.join(map(str, twice))} (in {' '.join(words)})")
    return seeds


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.official_path:  # the official side runs from its own empty folder: a relative path would miss
        args.official_path = str(Path(args.official_path).expanduser().resolve())
    try:
        args.seeds = parse_seeds(args.seeds) if args.seeds else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"error: --jobs must be at least 1, not {args.jobs}", file=sys.stderr)
        return 2
    if args.part == "pixels":
        return main_pixels(args)
    with Runner(jobs=args.jobs, fresh=args.fresh) as runner:
        return main_qwen(args, runner) if args.part == "qwen" else main_llava(args, runner)


def main_pixels(args) -> int:
    """``python -m parity pixels``: PixelPrune's official keep rule beside ours (parity/pixels.py), in this
    repository's environment (the official selector imports torch only)."""
    from . import pixels

    try:
        checks = pixels.run(args.seeds or [args.seed], args.dtypes, args.official_path)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(checks))
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    write(checks, work / "pixels.json")
    print(f"written: {work / 'pixels.json'}")
    return 0 if all(c.ok for c in checks) else 1


def main_llava(args, runner: Runner) -> int:
    """Every part but ``qwen``: build, llava15, next, scorers on one build or several (``--seeds``)."""
    py = args.venv / "bin" / "python"
    if not py.exists():
        print(f"error: no official environment at {args.venv}: run `bash scripts/official_env.sh` first",
              file=sys.stderr)
        return 2
    from . import llava15

    try:
        for m in args.method:
            llava15.clone_for(m, args.official_path)  # an unknown adapter, a missing or wrong clone: refused here
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.part in ("all", "next"):
        from .next import next_methods

        unknown = [m for m in args.method if m not in next_methods()]
        if unknown:
            print(f"error: no NeXT parity adapter for {', '.join(unknown)} (adapters: {', '.join(next_methods())})",
                  file=sys.stderr)
            return 2
    work = args.work.resolve()
    if args.seeds:
        per_seed = {}
        for seed in args.seeds:
            print(f"## seed {seed} (work folder {work / f'seed{seed}'})")
            per_seed[seed] = run_seed(args, py, work / f"seed{seed}", seed, runner)
        if args.part == "build":
            return 0
        print(seeds_table(per_seed))
        write_seeds(per_seed, work / "seeds.json")
        print(f"written: {work / 'seeds.json'}")
        return 0 if all(c.ok for cs in per_seed.values() for c in cs) else 1
    checks = run_seed(args, py, work, args.seed, runner)
    if args.part == "build":
        return 0
    return 0 if all(c.ok for c in checks) else 1


def main_qwen(args, runner: Runner) -> int:
    """``python -m parity qwen [--method <adapters with QWEN = True>]``: the unpruned Qwen2.5-VL (and Qwen3-VL where a
    method runs on it) and the methods' official Qwen code beside ours on one or several builds."""
    from . import qwen

    # flowcut: the default of --method, not asked for here (it has no Qwen path); none: the unpruned model, always run
    methods = [] if args.method == ["flowcut"] else [m for m in args.method if m != "none"]
    try:
        qwen.method_specs(methods, None, args.qwen_budgets, args.official_path)  # unknown, or no clone: refused here
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    families = ["qwen2.5-vl"] + sorted({f for m in methods for f in qwen.families_of(m)} - {"qwen2.5-vl"})
    venvs = {"qwen": args.qwen_venv, "qwen3": args.qwen3_venv, "qwen2vl": args.qwen2vl_venv,
             "qwen457": args.qwen457_venv}
    needed = {qwen.FAMILIES[f]["env"] for f in families if qwen.FAMILIES[f].get("stock", True)}
    needed |= {qwen.env_of(m, f) for m in methods for f in qwen.families_of(m)}
    for env in sorted(needed):
        if not (venvs[env] / "bin" / "python").exists():
            print(f"error: no official environment at {venvs[env]}: run `bash scripts/official_env.sh {env}` first",
                  file=sys.stderr)
            return 2
    pythons = {env: str(v / "bin" / "python") for env, v in venvs.items()}
    work = args.work.resolve()
    seeds = args.seeds or [args.seed]
    per_seed = {}
    for seed in seeds:
        folder = work / f"seed{seed}" if args.seeds else work
        checks = []
        for fam in families:
            info = qwen.build(folder, seed=seed, family=fam)
            print(f"## seed {seed}: {info['model']}")
            checks += qwen.run(info, pythons, folder, dtypes=tuple(args.dtypes),
                               max_new_tokens=args.max_new_tokens, methods=tuple(methods), budgets=args.qwen_budgets,
                               official_path=args.official_path, runner=runner)
        print(table(checks))
        write(checks, folder / "checks.json")
        per_seed[seed] = checks
    if args.seeds:
        print(seeds_table(per_seed))
        write_seeds(per_seed, work / "seeds.json")
    return 0 if all(c.ok for cs in per_seed.values() for c in cs) else 1


def run_seed(args, py: Path, work: Path, seed: int, runner: Runner):
    """One build (``seed``) in ``work``: build, compare, print the table, write ``checks.json``. Returns the checks
    (none for ``build``)."""
    from . import llava15
    from .build import build

    info = build(work, str(py), seed=seed, runner=runner)
    print(f"weights: official {info['official']}, ours {info['hf']}")
    if args.part == "build":
        from .build import build_next

        print(f"LLaVA-NeXT weights: official {build_next(work, str(py), seed=seed, runner=runner)['official']}")
        return []
    checks = []
    if args.part in ("all", "llava15"):
        checks += llava15.run(info, str(py), work, dtypes=tuple(args.dtypes),
                              budgets=tuple(args.budgets) if args.budgets else None,
                              max_new_tokens=args.max_new_tokens, vision_attn=args.vision_attn,
                              methods=tuple(args.method), official_path=args.official_path,
                              hf_python=str(args.qwen_venv / "bin" / "python"), runner=runner)
    if args.part in ("all", "next"):
        from . import next as next_
        from .build import build_next

        variants = args.next_variants or (next_.VARIANTS if args.part == "next" else ("official",))
        info_next = build_next(work, str(py), seed=seed, runner=runner)
        checks += next_.run(info_next, str(py), work, dtypes=tuple(args.next_dtypes),
                            budgets=tuple(args.next_budgets) if args.next_budgets else None,
                            max_new_tokens=args.max_new_tokens, vision_attn=args.vision_attn,
                            methods=tuple(args.method), variants=tuple(variants),
                            official_path=args.official_path, runner=runner)
    if args.part in ("all", "scorers"):
        from .scorers import run_scorers

        checks += run_scorers(str(py), work / "scorers", runner)
    print(table(checks))
    write(checks, work / "checks.json")
    print(f"written: {work / 'checks.json'}")
    return checks


if __name__ == "__main__":
    sys.exit(main())
