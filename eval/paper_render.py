"""A paper table as Markdown or LaTeX: each cell ``ours ± stderr [§¶] / paper's (difference) [✗]``, the relative
averages, and the notes under the table (what ran, the vanilla check, the summary, the unverified rows, the cells
the paper left empty, the control rows, the significance mark ⋆ against the paper's own method and the pairs it
could not test). A table of one's own (no published number) prints ``ours ± stderr (ours - unpruned)`` and each
row's visual tokens instead."""

from __future__ import annotations

from . import stats as st
from .paper_cells import ALPHA, MARKS_NOTE, SIGNIFICANT, Cell, TableReport, row_tokens
from .papers import Paper, Table, decimals
from .table import display_name, short_model


def _fmt(v, d=1):
    if v is None:
        return "–"
    return f"{v:.0f}" if abs(v) >= 100 and float(v).is_integer() else f"{v:.{d}f}"


def _cost(v) -> str:
    """An analytic cost to three significant figures (a tiny model's prefill is a few millionths of a TFLOP)."""
    return "–" if v is None else f"{v:.3g}"


def _decimals(c: Cell) -> int:
    """A cell's decimals: the published number's as printed (ours and the difference at the paper's precision),
    else by the size of ours."""
    if c.published is not None and c.printed:
        return decimals(c.printed)
    v = c.published if c.published is not None else c.ours
    return 0 if v is not None and abs(v) >= 1000 else 2 if v is not None and abs(v) < 10 else 1


def cell_text(c: Cell, fmt: str = "md") -> str:
    """``ours ± stderr [§¶] / paper's (difference) [✗]``: § another model than the spec's, ¶ a partial question
    set (then no ✗: the difference is not a verdict)."""
    d = _decimals(c)
    ours = "n/r" if c.not_run else _ours(c, d, fmt)
    pub = "n/p" if c.published is None else c.printed or _fmt(c.published, d)
    txt = f"{ours} / {pub}"
    if c.delta is not None:
        txt += f" ({c.delta:+.{d}f})"
        if not c.within and c.target and c.comparable:
            txt += " ✗" if fmt == "md" else r" $^{\times}$"
    return txt


def own_cell_text(c: Cell, fmt: str = "md", vanilla: bool = False) -> str:
    """A cell of a table of one's own: ``ours ± stderr [§¶] (ours - unpruned)`` (the unpruned row: ours alone)."""
    if c.not_run:
        return "n/r"
    d = _decimals(c)
    dv = None if vanilla else c.vs_unpruned
    return _ours(c, d, fmt) + ("" if dv is None else f" ({dv:+.{d}f})")


def _ours(c: Cell, d: int, fmt: str) -> str:
    """Ours with its standard error and marks (§ another model than the spec's, ¶ a partial question set, ⋆ differs
    from the paper's own method at 5 % on our runs)."""
    txt = _fmt(c.ours, d)
    if c.ours is not None and c.stderr is not None:
        txt += f" ± {c.stderr:.{d}f}" if fmt == "md" else f" $\\pm$ {c.stderr:.{d}f}"
    if c.ours is not None and c.marks:
        txt += " " + c.marks if fmt == "md" else " " + c.marks.replace("§", r"$\S$").replace("¶", r"$\P$")
    if c.ours is not None and c.significant:
        txt += " " + SIGNIFICANT if fmt == "md" else r" $^{\star}$"
    return txt


def _rows(rep: TableReport, fmt: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The header and the rows (group heading, cells): ours beside the paper's, or (a table of one's own) ours
    with the difference to the unpruned row and the row's visual tokens."""
    t = rep.table
    cols = list(t.columns)
    if t.own:
        head = ["Method", "Budget"] + [c.label for c in cols] + ["Avg (van.=ours)", "Visual tokens in",
                                                                "Visual tokens (layer avg)", "Prefill TFLOPs",
                                                                "KV cache (MiB)"]
    else:
        head = (["Method", "Budget"] + [c.label for c in cols]
                + ["Avg ours (van.=ours)", "Avg ours (van.=paper)", "Avg paper (printed)", "Avg paper (recomputed)"])
    body: list[tuple[str, list[str]]] = []
    for i, r in enumerate(t.rows):
        a = rep.avgs[i]
        if t.own:
            extra = [_pct(*a["ours_vs_ours"], len(cols)), _fmt(row_tokens(rep, i, "tok_in")),
                     _fmt(row_tokens(rep, i, "tok_eq")), _cost(row_tokens(rep, i, "prefill_tflops")),
                     _cost(row_tokens(rep, i, "kv_mb"))]
            cells = [own_cell_text(rep.cells[(i, c.key)], fmt, r.vanilla) for c in cols]
        else:
            extra = [_pct(*a["ours_vs_ours"], len(cols)), _pct(*a["ours_vs_paper"], len(cols)),
                     "–" if r.rel_avg is None else f"{r.rel_avg_printed or f'{r.rel_avg:.1f}'}%",
                     _pct(*a["paper_recomputed"], len(cols))]
            cells = [cell_text(rep.cells[(i, c.key)], fmt) for c in cols]
        label = r.label + (" †" if r.unverified else "") + (" (not run)" if r.not_run else "")
        b = r.paper_budget if r.paper_budget is not None else r.budget
        b = "–" if r.vanilla or b is None else r.paper_budget_printed or str(b)
        body.append((r.group, [label, b] + cells + extra))
    return head, body


OWN_CELLS = ("Cells: ours (ours - the unpruned row's ours); n/r = not run here; – = not run yet. Avg: mean of value / "
             "unpruned x 100 % over the columns with both numbers (* = fewer columns than the table). Visual tokens: "
             "per sample, entering the LLM and averaged over the decoder layers (an in-LLM method's cost), the mean "
             "over the row's runs. Prefill TFLOPs and KV cache: analytic, per sample, from each decoder layer's text "
             "and visual tokens (2 x MACs in FastV's convention, the LLM only; the keys and values the prompt leaves "
             "in the model's dtype), the mean over the row's runs.")


def render_table(paper: Paper, rep: TableReport, fmt: str = "md") -> str:
    t = rep.table
    cols = list(t.columns)
    head, body = _rows(rep, fmt)
    notes = [f"Model (the spec's) {t.model}" + (f" ({', '.join(f'{k}={v}' for k, v in t.settings.items())})"
                                                if t.settings else "")
             + (f"; budgets in the paper's convention ({t.budget_convention or 'as printed'}" if not t.own else
                f"; budgets in each method's convention ({t.budget_convention or 'our --budget'}")
             + (f"; unit: {t.budget_unit}" if t.budget_unit != "tokens" else "") + ").",
             f"Published numbers: {t.source}" + "".join(f"; {r.label}: {r.source}" for r in t.rows if r.source) + ".",
             "Cells: ours / paper's (ours - paper); "
             + ("no tolerance marks (reference only)" if t.reference_only else
                "✗ = outside the column's tolerance (" + ", ".join(f"{c.label} {c.tolerance:g}" for c in cols
                                                                 if c.runnable) + ")")
             + "; n/r = not run here; "
             "n/p = not printed; – = not run yet. Avg: mean of value / vanilla x 100 % over the columns with both "
             "numbers (* = fewer columns than the table).",
             rep.vanilla_line, rep.summary_line() + "."]
    if t.own:  # nothing published: no source, no tolerance
        notes[1:3] = [OWN_CELLS]
    notes[1:1] = run_lines(rep)
    if t.reference_only:
        notes.insert(0, f"Reference only, not pass/fail targets: {t.reference_only} The published numbers are "
                        "shown beside ours without ✗ marks and are not counted in the summary.")
    notes += unverified_lines(t)
    notes += [f"Not run: column {c.label}: {c.not_run}" for c in cols if not c.runnable]
    whys: dict[str, list[str]] = {}
    for r in t.rows:
        if r.not_run:
            whys.setdefault(r.not_run, []).append(r.name)
    notes += [f"Not run: row{'s' if len(rows) > 1 else ''} {', '.join(rows)}: {why}" for why, rows in whys.items()]
    notes += not_printed_lines(t)
    notes += control_lines(t)
    notes += significance_lines(rep)
    if t.notes:
        notes.append(t.notes)
    title = (f"{paper.title} - {t.id}" + (f": {t.caption}" if t.caption else "")
             + (" [reference only, not pass/fail targets]" if t.reference_only else ""))
    if fmt == "md":
        out = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        group = None
        for g, cells in body:
            if g and g != group:
                out.append(f"| **{g}** |" + " |" * (len(head) - 1))
            group = g
            out.append("| " + " | ".join(cells) + " |")
        return "\n".join(out + [""] + [f"- {n}" for n in notes] + [""])
    esc = lambda s: (s.replace("\\", "\\textbackslash{}").replace("%", "\\%").replace("_", "\\_")  # noqa: E731
                     .replace("&", "\\&").replace("#", "\\#").replace("✗", "$\\times$").replace("†", "$\\dagger$")
                     .replace("–", "--"))
    out = [f"% {title}", "\\begin{tabular}{ll" + "c" * (len(head) - 2) + "}", "\\toprule",
           " & ".join(esc(h) for h in head) + " \\\\", "\\midrule"]
    group = None
    for g, cells in body:
        if g and g != group:
            out.append(f"\\multicolumn{{{len(head)}}}{{l}}{{\\textit{{{esc(g)}}}}} \\\\")
        group = g
        out.append(" & ".join([esc(cells[0]), esc(cells[1])] + [esc(x) if "$" not in x else x.replace("–", "--")
                                                                for x in cells[2:]]) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}"] + [f"% {esc(n)}" for n in notes] + [""]
    return "\n".join(out)


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _n(v) -> str:
    return "?" if v is None else f"{v:,}"


def run_lines(rep: TableReport) -> list[str]:
    """What our cells ran, in words: the model and revision (and how many cells each), the questions answered per
    column against the benchmark's full count, the protocol deviations, and what § / ¶ mean where a cell has
    one."""
    t = rep.table
    ran = [(t.column(k), c) for (i, k), c in rep.cells.items() if c.ours is not None]
    if not ran:
        return ["Ran: no result of ours yet."]
    models: dict[tuple, int] = {}
    for _, c in ran:
        key = (short_model(c.run.get("model")) or "not recorded", c.run.get("revision") or "revision not recorded",
               c.other_model)
        models[key] = models.get(key, 0) + 1
    out = ["Ran: " + "; ".join(f"{m} ({rev}){' §' if other else ''}: {_count(n, 'cell')}"
                               for (m, rev, other), n in models.items()) + "."]
    per_col: dict[str, dict[tuple, int]] = {}
    for col, c in ran:
        a, full, q = c.run.get("answered"), c.run.get("full"), c.run.get("questions")
        key = (a, full, q if full is None else None, c.partial)
        per_col.setdefault(col.label, {})
        per_col[col.label][key] = per_col[col.label].get(key, 0) + 1

    def one(key, n):
        a, full, q, part = key
        if a is None:
            return f"not recorded ({_count(n, 'cell')})"
        whole = (f"{_n(a)} of {_n(full)}" if full is not None
                 else f"{_n(a)} (full count not recorded here; the data read held {_n(q)})")
        return whole + (" ¶" if part else "") + f" ({_count(n, 'cell')})"

    out.append("Questions answered per cell (of the benchmark's full count): "
               + "; ".join(f"{col} " + ", ".join(one(k, n) for k, n in d.items()) for col, d in per_col.items())
               + ".")
    devs: dict[str, int] = {}
    for _, c in ran:
        for d in c.run.get("deviations") or []:
            devs[d] = devs.get(d, 0) + 1
    if devs:
        out.append("Protocol deviations: " + "; ".join(f"{d} ({_count(n, 'cell')})" for d, n in devs.items())
                   + ".")
    if any(c.marks for _, c in ran):
        out.append(MARKS_NOTE + ".")
    if any(c.stderr is not None for _, c in ran):
        out.append("± = standard error of ours: of a mean of per-question 0/1 scores, sqrt(p (1 - p) / (n - 1)), as "
                   "lmms-eval prints it (an lmms-eval column: the one it printed); of F1, MME, soft VQA accuracy and "
                   "judged scores a bootstrap over the benchmark's unit (the run's results.json stderr_method: unit, "
                   "resamples, seed; runs scored before per-unit scores were kept have none there).")
    return out


def unverified_lines(t: Table) -> list[str]:
    """One line per reason a row is marked † unverified, naming its rows once (a label shared by several budgets
    is named once): ``† Unverified (why): A, B, C.``; ``every row`` when all rows share it."""
    whys: dict[str, list[str]] = {}
    for r in t.rows:
        if r.unverified:
            labels = whys.setdefault(str(r.unverified), [])
            if r.label not in labels:
                labels.append(r.label)
    if len(whys) == 1 and all(r.unverified for r in t.rows):
        return [f"† Unverified, every row: {next(iter(whys))}."]
    return [f"† Unverified ({why}): {', '.join(labels)}." for why, labels in whys.items()]


def not_printed_lines(t: Table) -> list[str]:
    """The cells the paper printed no number for, one line per column and reason (in the table's column order,
    then the reasons in row order): ``Not printed: MME (3 rows: A, B (64 tokens), C (64 tokens)): why``."""
    out = []
    for c in t.columns:
        whys: dict[str, list[str]] = {}
        for r in t.rows:
            if c.key in r.missing:
                whys.setdefault(str(r.missing[c.key]), []).append(r.name)
        for why, rows in whys.items():
            out.append(f"Not printed: {c.label} ({len(rows)} row{'s' if len(rows) != 1 else ''}: {', '.join(rows)}): "
                       f"{why}")
    return out


def _pct(v, n, total):
    return "–" if v is None else f"{v:.1f}%" + ("*" if n < total else "")


def control_lines(t: Table) -> list[str]:
    """What the control rows are, when the table has some: our runs of the control methods at the budget of their
    group, not rows of the spec."""
    rows = [r for r in t.rows if r.control]
    if not rows:
        return []
    labels = list(dict.fromkeys(r.label for r in rows))
    return [f"Controls, not rows of the spec: {', '.join(labels)}: our runs of "
            f"{', '.join(dict.fromkeys(r.method for r in rows))} (default options) at the budget their group's rows "
            "run at, in the control's own convention (visual tokens per image / crop / frame); nothing published."]


def significance_lines(rep: TableReport) -> list[str]:
    """What the significance mark says and which pairs have none: said once some run of the pairs keeps per-unit
    scores or some pair was tested (a report of runs that predate them prints no such line)."""
    sig = rep.significance
    if not sig.said:
        return []
    against = list(dict.fromkeys(sig.against.values()))
    who = (f"{against[0]}" if len(against) == 1 else
           f"{display_name(sig.method)} (its row in each budget group: {', '.join(against)})")
    tests = []
    if "mcnemar" in sig.kinds:
        tests.append(f"McNemar's exact test, p < {ALPHA:g}, where the metric is one 0/1 score per unit")
    if "bootstrap" in sig.kinds:
        tests.append(f"the 95 % paired bootstrap interval of the difference excludes 0 ({st.RESAMPLES} resamples, "
                     f"seed {st.SEED}) for the other metrics")
    out = []
    if sig.tested:
        out.append(f"{SIGNIFICANT} = on our runs, {who} and this row differ significantly at 5 %: a paired test over "
                   f"the same questions ({'; '.join(tests)}); {sig.marked} of {sig.tested} tested cells marked. No "
                   f"{SIGNIFICANT}: no significant difference, or not tested" + (" (below)" if sig.untested else "")
                   + ".")
    else:
        out.append(f"{SIGNIFICANT} (differs significantly from {who} on our runs): no cell could be tested (below).")
    out += [f"No {SIGNIFICANT} test for {', '.join(pairs)}: {why}." for why, pairs in sig.untested.items()]
    return out
