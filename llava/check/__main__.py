"""Check a pruning method against the guarantees the test suite holds the built-in methods to, on the tiny model
of every family it supports (docs/check.md):

    python -m llava.check fastv
    VTPRUNE_METHODS=./my_method.py python -m llava.check normprune --budget 4 --families llava llava-next
    python -m llava.check consensusdrop --opt fusion=adaptive --only batch cached --fast

Prints a markdown table (guarantee, family, PASS / FAIL / n.a., detail). Exit status 0: every row PASS or n.a.;
1: a FAIL; 2: bad input (one error: line).
"""

from __future__ import annotations

import argparse
import sys

from ..cli import HelpFormatter, load_error, parse_options
from .runner import GUARANTEES, CheckInputError, run_checks, summary, table


def _words(values) -> list[str] | None:
    """Space- or comma-separated values of a flag."""
    return [w for v in values for w in v.split(",") if w] if values else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llava.check", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("method", help="a registered method (built-in, or a user's: VTPRUNE_METHODS / entry points)")
    ap.add_argument("--families", nargs="+", help="tiny families (default: every one the method supports)")
    ap.add_argument("--budget", type=int, default=None, help="the budget on every family (default: the class's "
                    "check_budget, else the built-in table, else none)")
    ap.add_argument("--opt", action="append", default=[], help="method option key=value (repeatable)")
    ap.add_argument("--only", nargs="+", help=f"run these guarantees only: {', '.join(GUARANTEES)}")
    ap.add_argument("--fast", action="store_true", help="include the fast-path check (compiles: minutes)")
    ap.add_argument("--fast-backend", default="auto", help="the fast path's compiler backend "
                    "(llava.fast.path.BACKENDS; auto: inductor on a GPU, eager on a CPU)")
    ap.add_argument("--keep-all-budget", type=int, default=None, help="the budget at which the method keeps every "
                    "visual token (default: the class's check_keep_all, else the built-in table, else n.a.)")
    args = ap.parse_args(argv)
    if err := load_error():  # the user's methods (VTPRUNE_METHODS, entry points) load before anything runs
        print(err, file=sys.stderr)
        return 2
    options = parse_options(args.opt)

    def progress(row):
        print(f"  {row.guarantee:<10} {row.family:<16} {row.verdict}", file=sys.stderr, flush=True)

    try:
        rows = run_checks(args.method, families=_words(args.families), budget=args.budget, options=options,
                          only=_words(args.only), fast=args.fast, keep_all_budget=args.keep_all_budget,
                          fast_backend=args.fast_backend, progress=progress)
    except CheckInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    print()
    print(summary(args.method, rows))
    return 1 if any(r.verdict == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
