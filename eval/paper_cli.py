"""``python -m eval paper`` (the report, ``--list``, ``--check``) and ``python -m eval paper-grid`` (the grid of
runs behind ``scripts/papers/<paper>.sh``: ``--dry-run``, ``--status``, ``--commands``); ``--controls`` on either
adds the control methods random and downsample to a table whose spec names no ``controls``."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parsers(sub) -> None:
    p = sub.add_parser("paper", help="a paper's tables: ours beside the published numbers (eval/papers/<paper>.toml)")
    p.add_argument("paper", nargs="?", help="a spec name (python -m eval paper --list) or a path to a .toml (a "
                   "table of your own: docs/your-method.md)")
    p.add_argument("runs", nargs="*", help="results.json files or run folders, searched recursively (default: runs)")
    p.add_argument("--list", action="store_true", help="list the papers and their tables")
    p.add_argument("--check", nargs="*", metavar="SPEC", default=None,
                   help="validate specs (names or paths; none: every spec); exit 1 naming the file and the entry")
    p.add_argument("--table", default=None, help="one table (its id, e.g. 'Table 1', or its slug 'table-1')")
    p.add_argument("--format", default="md", choices=["md", "latex", "both"])
    p.add_argument("--out", default=None, help="write the report here (both: .md and .tex beside this stem; "
                   "figures beside it)")
    p.add_argument("--model", default=None, help="the model the runs used, when not the spec's (a local directory)")
    p.add_argument("--efficiency", action="append", default=[], help="bench.efficiency JSON for Pareto claims")
    p.add_argument("--include-partial", action="store_true", help="include --limit smoke runs")
    p.add_argument("--controls", action="store_true", help="rows for the control runs (random, downsample) found at "
                   "each budget, for a table whose spec names no `controls` (a spec's controls always get them)")
    p.add_argument("--wandb", action="store_true", help="also log the report to W&B (group paper/<paper>)")
    g = sub.add_parser("paper-grid", help="the runs of a paper's tables (scripts/papers/<paper>.sh uses it)")
    g.add_argument("paper", help="a spec name or a path to a .toml")
    g.add_argument("--table", default=None)
    g.add_argument("--only", default=None, help="benchmarks or column keys, comma-separated (ONLY=gqa,pope)")
    g.add_argument("--budgets", default=None, help="budgets, comma-separated: as printed or in our convention")
    g.add_argument("--model", default=None, help="replaces the tables' model (MODEL=)")
    g.add_argument("--data-root", default="playground/data/eval")
    g.add_argument("--out", default="runs")
    g.add_argument("--shard", default=None, help="i/n: every n-th config from the i-th (0-based; SHARD=)")
    g.add_argument("--controls", action="store_true", help="add the control runs random and downsample at every "
                   "budget of a table's method rows, for a table whose spec names no `controls`")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the grid: each config, its question count, "
                      "what is done under --out and what is missing")
    mode.add_argument("--commands", action="store_true", help="one line per config still to run: "
                      "BENCH METHOD BUDGET MODEL [flags], shell-quoted")
    mode.add_argument("--status", action="store_true", help="print one line, the grid's state under --out: "
                      "done N of M (the dry run's line after the configs)")


def _ints(s):
    return [int(x) for x in s.split(",") if x.strip()] if s else None


def _names(s):
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def list_text(papers) -> str:
    """``python -m eval paper --list``: one line per paper (key, arXiv id, venue, the whole title) and one per
    table (id, model, columns x rows, published cells), each field in a column as wide as its longest entry."""
    kw = max((len(p.key) for p in papers), default=0)
    aw = max((len(str(p.arxiv)) for p in papers), default=0)
    vw = max((len(p.venue or "") for p in papers), default=0)
    tables = [t for p in papers for t in p.tables]
    iw = max((len(t.id) for t in tables), default=0)
    mw = max((len(t.model) for t in tables), default=0)
    out = []
    for p in papers:
        out.append(f"{p.key:{kw}}  arXiv {str(p.arxiv):{aw}}  {p.venue or '':{vw}}  {p.title}".rstrip())
        for t in p.tables:
            pub = sum(len(r.published) for r in t.rows)
            out.append(f"    {t.id:{iw}}  {t.model:{mw}}  {len(t.columns):2} columns x {len(t.rows):2} rows, "
                       f"{pub:3} published cells")
        if p.claims:
            out.append(f"    claims: {', '.join(c.id for c in p.claims)}")
    return "\n".join(out)


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def paper(args, local_rank=None) -> int:
    from .papers import SpecError, list_papers, load, load_all

    if args.check is not None:
        names = args.check or list_papers()
        bad = 0
        for n in names:
            try:
                p = load(n)
                print(f"ok    {p.key}: {len(p.tables)} tables, "
                      f"{sum(len(t.rows) for t in p.tables)} rows, {len(p.claims)} claims")
            except SpecError as e:
                bad += 1
                print(f"error {e}", file=sys.stderr)
        return 1 if bad else 0
    if args.list:
        try:
            papers = load_all()
        except SpecError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(list_text(papers))
        return 0
    if not args.paper:
        print("error: name a paper (python -m eval paper --list)", file=sys.stderr)
        return 2
    from .paper_report import log_wandb, report

    try:
        spec = load(args.paper)
        out = Path(args.out) if args.out else None
        figs = out.parent if out else None
        text, info = report(spec, args.runs or ["runs"], table=args.table, fmt=args.format, model=args.model,
                            efficiency_files=args.efficiency, figures_dir=figs, include_partial=args.include_partial,
                            controls=args.controls)
    except (SpecError, KeyError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if out is None:
        print(text)
    else:
        if args.format == "both":  # OUT is a stem: OUT.md and OUT.tex (a dot inside the name is kept)
            stem = str(out.with_suffix("")) if out.suffix in (".md", ".tex") else str(out)
            Path(stem + ".md").write_text(info["texts"]["md"])
            Path(stem + ".tex").write_text(info["texts"]["latex"])
            wrote = [stem + ".md", stem + ".tex"]
        else:
            out.write_text(text)
            wrote = [str(out)]
        print(f"wrote {_and(wrote + list(info['figures'].values()))}")  # the figures too
    for rep in info["tables"].values():
        print(f"{spec.key} {rep.table.id}: {rep.summary_line()}", file=sys.stderr)
    if args.wandb:
        log_wandb(spec, info, text)
    return 0


def paper_grid(args, local_rank=None) -> int:
    from .paper_grid import build_grid, commands, dry_run_text, not_runnable, shard, status_text
    from .papers import SpecError, load

    try:
        spec = load(args.paper)
        budgets = _ints(args.budgets)
        grid = build_grid(spec, args.table, _names(args.only), budgets, args.model, controls=args.controls)
        grid = shard(grid, args.shard)
    except (SpecError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.commands:
        for line in commands(grid, args.out):
            print(line)
        return 0
    if args.status:
        print(status_text(grid, args.out))
        return 0
    print(dry_run_text(spec, grid, args.out, args.data_root,
                       not_runnable(spec, args.table, args.controls, budgets, args.model)))
    return 0
