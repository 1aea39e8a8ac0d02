"""``python -m eval paper <paper> [RUNS...]``: a paper's tables with our results beside the published numbers.

Per cell: ours (± its standard error where the metric has one) / the paper's (difference), marked ✗ when the
difference exceeds the column's tolerance; what ran, under each table: the model and revision of our cells, the
questions each answered of the benchmark's full count, the protocol deviations - a cell of ours from another model
than the spec's is marked §, one from a partial question set ¶, and neither gets a ✗ nor counts in the summary; the
vanilla row is checked first (an off vanilla points at the setup, not the method); the relative average both
ways (vanilla = ours, vanilla = the paper's) next to the paper's printed one and the one recomputed from its
printed cells (a transcription check); a summary line "N of M published cells reproduced within tolerance,
K not run"; one figure per table (accuracy vs budget per benchmark: ours as lines with filled markers, the paper's
as open markers, one colour and marker per row label; a column with no number gets no panel). The cells a paper
left empty are one line per column and reason, the unverified rows one line per reason. A table marked
``reference_only`` shows its published numbers without pass/fail.
Claims without a table (ConsensusDrop's abstract, a README's headline) are checked from our results alone:
"beats" per benchmark and budget, "pareto" against the efficiency benchmark's TTFT / KV cache, "retains" (a
method keeps at least X % of the unpruned model at a budget)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .lmms_import import load_imported
from .paper_grid import _frozen, _opt_value
from .papers import RUN_SETTINGS, Claim, Column, Paper, Row, Table
from .run_config import RunConfig
from .table import answered_count, display_name, full_count, load_results, short_model, stderr

SEEDS = ("consensusdrop", "visiondrop", "attnmix")
COLOURS = {"consensusdrop": "tab:red", "visiondrop": "tab:blue", "attnmix": "tab:green"}


@dataclass
class Cell:
    ours: float | None = None
    published: float | None = None
    missing: str = ""  # why the paper has no number
    not_run: str = ""  # why we cannot run it ("" when we can)
    tolerance: float = 1.0
    path: str = ""
    target: bool = True  # False: the published number is shown for reference only (Table.reference_only)
    stderr: float | None = None  # the standard error of ours (eval.table.stderr), where the metric has one
    run: dict = field(default_factory=dict)  # what ran: run_facts() of the results file behind ``ours``

    @property
    def delta(self) -> float | None:
        return None if self.ours is None or self.published is None else self.ours - self.published

    @property
    def within(self) -> bool | None:
        d = self.delta
        return None if d is None else abs(d) <= self.tolerance + 1e-9

    @property
    def other_model(self) -> bool:
        """Ours ran on another model than the spec's (marked § in the table)."""
        return bool(self.run.get("other_model"))

    @property
    def partial(self) -> bool:
        """Ours answered fewer questions than the benchmark's full count (marked ¶ in the table)."""
        return bool(self.run.get("partial"))

    @property
    def comparable(self) -> bool:
        """Ours can be held against the published number: the spec's model on the full question set."""
        return self.ours is not None and not self.other_model and not self.partial

    @property
    def marks(self) -> str:
        return ("§" if self.other_model else "") + ("¶" if self.partial else "")


MARKS_NOTE = ("§ = ran on another model than the spec's; ¶ = answered fewer questions than the benchmark's full "
              "count (a --limit run, or a subset such as fixture data). Such cells are not comparable with the "
              "published numbers: no ✗, and not counted in the summary line")


# ----------------------------------------------------------------------------------------------- what ran
def same_model(ran: str, spec: str) -> bool:
    """The spec's model: its hub id, or a local folder of the same name (``MODEL=/ckpt/llava-1.5-7b-hf`` for
    ``llava-hf/llava-1.5-7b-hf``: the documented way to run a table from a local copy of its checkpoint)."""
    if not ran or ran == spec:
        return True
    if ran.startswith(("/", "./", "../", "~")) or os.path.isdir(ran):
        return Path(ran.rstrip("/")).name == spec.rstrip("/").split("/")[-1]
    return False


def _revision(res: dict) -> str:
    """The revision of the weights a run used, in words, from its ``run_config.json`` fingerprint (beside the
    results file) and the revision it asked for."""
    asked = (res.get("config") or {}).get("revision")
    fp = {}
    if res.get("_path"):
        rc = Path(res["_path"]).parent / "run_config.json"
        if rc.is_file():
            try:
                fp = (json.loads(rc.read_text()).get("fingerprint") or {}).get("model") or {}
            except (OSError, ValueError):
                fp = {}
    if fp.get("revision"):
        got = str(fp["revision"])
        return f"revision {got[:12]}" + (f" (asked: {asked})" if asked and not got.startswith(str(asked)) else "")
    if "seed" in fp:
        return f"random weights, seed {fp['seed']}"
    if fp.get("config_sha256"):
        return f"local folder, config.json sha256 {str(fp['config_sha256'])[:12]}"
    return f"revision {asked}" if asked else "revision not recorded"


def run_facts(res: dict, spec_model: str) -> dict:
    """What a results file ran: the model and its revision, whether that is the spec's model, the questions
    answered against the benchmark's full count (eval.table.FULL_QUESTIONS), the protocol deviations."""
    cfg = res.get("config") or {}
    model = str((res.get("model") or {}).get("id") or cfg.get("model") or "")
    answered, full = answered_count(res), full_count(res)
    questions = (res.get("counts") or {}).get("questions")
    limit = cfg.get("limit")
    devs = list((res.get("protocol") or {}).get("deviations") or [])
    if limit is not None and not any(d.startswith("limit=") for d in devs):
        devs.append(f"limit={limit} (partial run)")
    partial = bool(res.get("partial")) or limit is not None or (
        answered is not None and full is not None and answered < full)
    return {"model": model, "revision": _revision(res), "other_model": not same_model(model, spec_model),
            "answered": answered, "questions": questions, "full": full, "partial": partial, "deviations": devs,
            "path": res.get("_path", "")}


def _lmms_stderr(res: dict, metric: str) -> float | None:
    """lmms-eval's own standard error of a column run through it (``<metric>_stderr,none`` in its results file),
    where it printed a number."""
    f = (res.get("lmms") or {}).get("results_file")
    task = str(res.get("benchmark", "")).split(":", 1)[-1]
    try:
        v = ((json.loads(Path(f).read_text()).get("results") or {}).get(task) or {}).get(f"{metric}_stderr,none")
    except (OSError, ValueError, TypeError):
        return None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


# ----------------------------------------------------------------------------------------------- matching
def _settings_key(settings: dict) -> tuple:
    base = RunConfig(benchmark="x")
    return tuple((k, settings.get(k, getattr(base, k))) for k in RUN_SETTINGS)


def _opts_key(options: dict) -> tuple:
    return tuple((k, _opt_value(v)) for k, v in _frozen(options))


def index_results(runs, include_partial: bool = False) -> dict[tuple, dict]:
    """results.json files under ``runs`` by (benchmark, model, method, budget, options, run settings); the newest
    wins where several match (as ``python -m eval table``)."""
    out: dict[tuple, dict] = {}
    # the harness's results.json and the scores of columns run through lmms-eval (scripts/eval/lmms.sh)
    for r in load_results(runs, include_partial=include_partial) + load_imported(runs):
        cfg = r.get("config") or {"benchmark": r.get("benchmark"), "model": (r.get("model") or {}).get("id"),
                                  "method": (r.get("method") or {}).get("method"),
                                  "budget": (r.get("method") or {}).get("budget")}  # written before configs were
        key = (cfg.get("benchmark", r.get("benchmark")), cfg.get("model"), cfg.get("method"), cfg.get("budget"),
               _opts_key(cfg.get("options") or {}), _settings_key(cfg))
        if key not in out or r.get("created", "") >= out[key].get("created", ""):
            out[key] = r
    return out


def collect(paper: Paper, index: dict, table: Table, model: str | None = None) -> dict[tuple[int, str], Cell]:
    """(row index, column key) -> :class:`Cell` for one table."""
    cells = {}
    skey = _settings_key(table.settings)
    for i, r in enumerate(table.rows):
        for c in table.columns:
            cell = Cell(published=r.published.get(c.key), missing=str(r.missing.get(c.key, "")),
                        not_run=c.not_run or r.not_run, tolerance=c.tolerance, target=not table.reference_only)
            if not cell.not_run:
                res = index.get((c.bench, model or table.model, r.method, r.budget, _opts_key(r.options), skey))
                if res is not None:
                    v = (res.get("metrics") or {}).get(c.metric)
                    if v is not None and not (isinstance(v, float) and math.isnan(v)):
                        cell.ours, cell.path = float(v) * c.scale, res.get("_path", "")
                        cell.run = run_facts(res, table.model)
                        se = stderr(res, c.metric) if "lmms" not in res else _lmms_stderr(res, c.metric)
                        cell.stderr = None if se is None else se * c.scale
            cells[(i, c.key)] = cell
    return cells


def rel_avg(values: dict[str, float | None], base: dict[str, float | None]) -> tuple[float | None, int]:
    """The papers' relative average: mean over the columns with both numbers of value / vanilla x 100 (%)."""
    ratios = [values[k] / base[k] for k in values if values.get(k) is not None and base.get(k)]
    return (100.0 * sum(ratios) / len(ratios), len(ratios)) if ratios else (None, 0)


# ----------------------------------------------------------------------------------------------- the report
@dataclass
class TableReport:
    table: Table
    cells: dict
    avgs: list[dict]  # per row: ours_vs_ours, ours_vs_paper, paper_recomputed (value, n)
    vanilla_line: str
    summary: dict

    def summary_line(self) -> str:
        s = self.summary
        line = (f"{s['within']} of {s['published']} published cells reproduced within tolerance, "
                f"{s['not_run']} not run ({s['cannot_run']} cannot be run here)")
        if s.get("not_comparable"):
            line += (f"; {s['not_comparable']} ran on another model or a partial question set (§ / ¶), not "
                     "counted")
        if s.get("reference_only"):
            line += f"; {s['reference_only']} published cells shown for reference only, not pass/fail targets"
        return line


def analyse(table: Table, cells: dict) -> TableReport:
    cols = [c.key for c in table.columns]
    van = next((i for i, r in enumerate(table.rows) if r.vanilla), None)
    ours_v = {k: cells[(van, k)].ours for k in cols} if van is not None else {}
    pub_v = {k: cells[(van, k)].published for k in cols} if van is not None else {}
    avgs = []
    for i, _ in enumerate(table.rows):
        ours = {k: cells[(i, k)].ours for k in cols}
        pub = {k: cells[(i, k)].published for k in cols}
        avgs.append({"ours_vs_ours": rel_avg(ours, ours_v), "ours_vs_paper": rel_avg(ours, pub_v),
                     "paper_recomputed": rel_avg(pub, pub_v)})
    pubs = [c for c in cells.values() if c.published is not None and c.target]
    s = {"published": len(pubs), "within": sum(bool(c.within) and c.comparable for c in pubs),
         "not_run": sum(c.ours is None for c in pubs), "cannot_run": sum(bool(c.not_run) for c in pubs),
         "not_comparable": sum(c.ours is not None and not c.comparable for c in pubs),
         "reference_only": sum(c.published is not None and not c.target for c in cells.values())}
    s["outside"] = s["published"] - s["within"] - s["not_run"] - s["not_comparable"]
    if van is None:
        vline = "No unpruned row in this table."
    elif table.reference_only:  # an unreliable published vanilla cannot point at our setup
        vline = "Vanilla first: not checked against the published row (reference only, below)."
    else:
        vc = [(table.column(k), cells[(van, k)]) for k in cols
              if cells[(van, k)].within is not None and cells[(van, k)].comparable]
        off = [f"{c.label} ({cell.delta:+.2f})" for c, cell in vc if not cell.within]
        vline = (f"Vanilla first: {len(vc) - len(off)} of {len(vc)} compared columns within tolerance"
                 + (f"; off: {', '.join(off)} - check the setup (data, template, preprocessing) before reading the "
                    "method rows of these columns" if off else "") + ".")
        if not vc:
            marked = any(cells[(van, k)].within is not None for k in cols)
            vline = ("Vanilla first: not compared (our unpruned cells ran on another model or a partial question "
                     "set: § / ¶)." if marked else "Vanilla first: not run yet (no column to compare).")
    return TableReport(table, cells, avgs, vline, s)


def _fmt(v, d=1):
    if v is None:
        return "–"
    return f"{v:.0f}" if abs(v) >= 100 and float(v).is_integer() else f"{v:.{d}f}"


def _decimals(c: Cell) -> int:
    v = c.published if c.published is not None else c.ours
    return 0 if v is not None and abs(v) >= 1000 else 2 if v is not None and abs(v) < 10 else 1


def cell_text(c: Cell, fmt: str = "md") -> str:
    """``ours ± stderr [§¶] / paper's (difference) [✗]``: § another model than the spec's, ¶ a partial question
    set (then no ✗: the difference is not a verdict)."""
    d = _decimals(c)
    if c.not_run:
        ours = "n/r"
    else:
        ours = _fmt(c.ours, d)
        if c.ours is not None and c.stderr is not None:
            ours += f" ± {c.stderr:.{d}f}" if fmt == "md" else f" $\\pm$ {c.stderr:.{d}f}"
        if c.ours is not None and c.marks:
            ours += " " + c.marks if fmt == "md" else " " + c.marks.replace("§", r"$\S$").replace("¶", r"$\P$")
    pub = _fmt(c.published, d) if c.published is not None else "n/p"
    txt = f"{ours} / {pub}"
    if c.delta is not None:
        txt += f" ({c.delta:+.{d}f})"
        if not c.within and c.target and c.comparable:
            txt += " ✗" if fmt == "md" else r" $^{\times}$"
    return txt


def render_table(paper: Paper, rep: TableReport, fmt: str = "md") -> str:
    t = rep.table
    cols = list(t.columns)
    head = (["Method", "Budget"] + [c.label for c in cols]
            + ["Avg ours (van.=ours)", "Avg ours (van.=paper)", "Avg paper (printed)", "Avg paper (recomputed)"])
    body: list[tuple[str, list[str]]] = []
    for i, r in enumerate(t.rows):
        a = rep.avgs[i]
        avg = [_pct(*a["ours_vs_ours"], len(cols)), _pct(*a["ours_vs_paper"], len(cols)),
               "–" if r.rel_avg is None else f"{r.rel_avg:.1f}%", _pct(*a["paper_recomputed"], len(cols))]
        label = r.label + (" †" if r.unverified else "") + (" (not run)" if r.not_run else "")
        b = r.paper_budget if r.paper_budget is not None else r.budget
        b = "–" if r.vanilla or b is None else str(b)
        body.append((r.group, [label, b] + [cell_text(rep.cells[(i, c.key)], fmt) for c in cols] + avg))
    notes = [f"Model (the spec's) {t.model}" + (f" ({', '.join(f'{k}={v}' for k, v in t.settings.items())})"
                                                if t.settings else "")
             + f"; budgets in the paper's convention ({t.budget_convention or 'as printed'}"
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
                   "lmms-eval prints it (an lmms-eval column: the one it printed); none for F1, MME and the soft VQA "
                   "accuracies.")
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


# ----------------------------------------------------------------------------------------------- claims
def check_claims(paper: Paper, reports: dict[str, TableReport], efficiency: list[dict] | None = None) -> list[dict]:
    out = []
    for cl in paper.claims:
        if cl.kind == "beats":
            out.append(_beats(cl, reports))
        elif cl.kind == "retains":
            out.append(_retains(cl, reports))
        else:
            out.append(_pareto(cl, reports, efficiency or []))
    return out


def _retains(cl: Claim, reports: dict[str, TableReport]) -> dict:
    """``method`` at ``budget`` keeps at least ``at_least`` % of the unpruned model: our relative average
    (vanilla = ours) over every runnable column of each of the claim's tables, checked once all of them ran."""
    held, failed, missing = [], [], []
    for tid in (t for t in cl.tables if t in reports):
        rep = reports[tid]
        runnable = sum(c.runnable for c in rep.table.columns)
        for i, r in enumerate(rep.table.rows):
            if r.method != cl.method or r.budget != cl.budget or not r.runnable:
                continue
            v, n = rep.avgs[i]["ours_vs_ours"]
            where = f"{tid} {r.name}"
            if v is None or n < runnable:
                missing.append(f"{where} ({n} of {runnable} columns run)")
            elif v >= cl.at_least - 1e-9:
                held.append(f"{where}: {v:.1f}%")
            else:
                failed.append(f"{where}: {v:.1f}% < {cl.at_least:g}%")
    verdict = ("not held" if failed else "held" if held and not missing else "not checked yet")
    parts = held + failed + missing
    return {"claim": cl, "held": held, "failed": failed, "missing": missing,
            "line": f"{cl.id}: {verdict} (at least {cl.at_least:g}% of the unpruned model, relative average with "
                    f"vanilla = ours)" + (f"; {'; '.join(parts)}" if parts else "") + "."}


def _beats(cl: Claim, reports: dict[str, TableReport]) -> dict:
    held, failed, missing = [], [], []
    for tid in (t for t in cl.tables if t in reports):  # the tables this report covers
        rep = reports[tid]
        t = rep.table
        groups: dict[str, dict[str, int]] = {}
        for i, r in enumerate(t.rows):
            if not r.vanilla:
                groups.setdefault(r.group, {})[r.method] = i
        for g, rows in groups.items():
            if cl.method not in rows:
                continue
            for c in t.columns:
                if not c.runnable:
                    continue
                where = f"{t.id} {c.label} @ {g}"
                mine = rep.cells[(rows[cl.method], c.key)].ours
                others = {m: rep.cells[(rows[m], c.key)].ours for m in cl.against if m in rows}
                if mine is None or not others or any(v is None for v in others.values()):
                    missing.append(where)
                elif all(mine >= v for v in others.values()):
                    held.append(where)
                else:
                    best = max(others, key=lambda m: others[m])
                    failed.append(f"{where} ({display_name(cl.method)} {mine:.2f} < {display_name(best)} "
                                  f"{others[best]:.2f})")
    return {"claim": cl, "held": held, "failed": failed, "missing": missing,
            "line": f"{cl.id}: held on {len(held)} of {len(held) + len(failed)} compared (benchmark, budget) cells"
                    + (f"; not held: {'; '.join(failed)}" if failed else "") + f"; {len(missing)} not run yet."}


def _pareto(cl: Claim, reports: dict[str, TableReport], efficiency: list[dict]) -> dict:
    """Accuracy (the relative average, vanilla = ours) vs measured TTFT and KV cache of every (method, budget) of
    the claim's tables; the claim holds at a budget when no other point has both a higher accuracy and a lower
    cost."""
    eff = {(e.get("method"), e.get("budget")): e for e in efficiency if not e.get("options")}
    points = []
    for tid in (t for t in cl.tables if t in reports):
        rep = reports[tid]
        for i, r in enumerate(rep.table.rows):
            acc = rep.avgs[i]["ours_vs_ours"][0]
            e = eff.get((r.method, None if r.vanilla else r.budget))
            if acc is None or e is None:
                continue
            points.append({"table": tid, "method": r.method, "budget": r.budget, "acc": acc,
                           "ttft_ms": 1000.0 * float(e["ttft"]["median"]), "kv_mib": float(e["kv_bytes"]) / 2 ** 20})
    verdicts = []
    for p in (q for q in points if q["method"] == cl.method):
        for cost in ("ttft_ms", "kv_mib"):
            dom = [q for q in points if q is not p and q["table"] == p["table"] and q["acc"] >= p["acc"]
                   and q[cost] <= p[cost] and (q["acc"] > p["acc"] or q[cost] < p[cost])]
            verdicts.append({"table": p["table"], "budget": p["budget"], "cost": cost, "on_front": not dom,
                             "dominated_by": [f"{display_name(q['method'])}@{q['budget']}" for q in dom]})
    on = sum(v["on_front"] for v in verdicts)
    line = (f"{cl.id}: on the accuracy-vs-cost Pareto front at {on} of {len(verdicts)} (budget, cost) points"
            if verdicts else f"{cl.id}: not checked (needs our results and an efficiency JSON: --efficiency FILE)")
    off = [f"{v['table']} b{v['budget']} {v['cost']} (dominated by {', '.join(v['dominated_by'])})"
           for v in verdicts if not v["on_front"]]
    return {"claim": cl, "points": points, "verdicts": verdicts, "line": line + (f"; off: {'; '.join(off)}" if off else "")
            + "."}


# ----------------------------------------------------------------------------------------------- figures
def panels(rep: TableReport) -> list[Column]:
    """The columns the figure draws: those with a number to show - ours or the paper's - at a plotted budget, or
    an unpruned row's (a line across the panel). A column with neither is not drawn."""
    t = rep.table

    def has_data(c: Column) -> bool:
        for i, r in enumerate(t.rows):
            cell = rep.cells[(i, c.key)]
            if (cell.ours is not None or cell.published is not None) and (r.vanilla or _x(r) is not None):
                return True
        return False

    return [c for c in t.columns if has_data(c)]


def figure(paper: Paper, rep: TableReport, path, claim_points: list[dict] | None = None):
    fig = draw(paper, rep, claim_points)  # selects the Agg backend first
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "*", "d", "H", "8")
PALETTE = ("tab:purple", "tab:orange", "tab:cyan", "tab:brown", "tab:olive", "navy", "tab:gray", "tab:pink",
           "darkgoldenrod", "teal", "maroon", "darkviolet", "slategray", "yellowgreen", "black")


def series(paper: Paper, t: Table) -> list[dict]:
    """The figure's series: one per row label of the table's pruned rows (FastV at 192 / 128 / 64 is one series,
    VisionZip and VisionZip ‡ two), each with its own colour and marker: the seed methods red / blue / green, the
    paper's own method purple, the others from :data:`PALETTE`; markers in row order, no two series alike."""
    out, seen = [], {}
    for r in t.rows:
        if r.vanilla:
            continue
        if r.label not in seen:
            seen[r.label] = len(out)
            out.append({"label": r.label, "method": r.method, "rows": []})
        out[seen[r.label]]["rows"].append(t.rows.index(r))
    used = set()
    spare = iter(c for c in PALETTE if c not in COLOURS.values() and c != "tab:purple")  # purple: the paper's
    for k, s in enumerate(out):
        m = s["method"]
        colour = COLOURS.get(m) if m in COLOURS else "tab:purple" if m == paper.method else None
        if colour is None or colour in used:
            colour = next((c for c in spare if c not in used), "0.5")
        used.add(colour)
        s.update(colour=colour, marker=MARKERS[k % len(MARKERS)], bold=m in COLOURS or m == paper.method)
    return out


def _figure_title(paper: Paper, rep: TableReport) -> str:
    t = rep.table
    name = paper.title.split(":")[0].strip() if ":" in paper.title else display_name(paper.key)
    if len(name) > 40:
        name = display_name(paper.key)
    line = f"{name}, {t.id}: ours (filled markers, lines) vs the paper's numbers (open markers)"
    if t.reference_only:
        line += " - the paper's: reference only"
    ran = [c for c in rep.cells.values() if c.ours is not None]
    other = sorted({short_model(c.run.get("model")) for c in ran if c.other_model})
    part = [c for c in ran if c.partial]
    warn = []
    if other:
        warn.append(f"ours ran on {', '.join(other)}, not the spec's {short_model(t.model)}")
    if part:
        warn.append(f"{len(part)} of {len(ran)} cells of ours answered only part of the questions")
    return line + ("\n" + "; ".join(warn) + ": not comparable with the paper's" if warn else "")


def draw(paper: Paper, rep: TableReport, claim_points: list[dict] | None = None):
    """The table's figure (a matplotlib Figure): one panel per column of :func:`panels` (accuracy vs budget, ours
    as lines with a filled marker at each budget - one budget is a point -, the paper's as open markers of the
    same colour and shape, the unpruned rows as horizontal lines), and the accuracy-vs-TTFT panel of a Pareto
    claim. Each series (:func:`series`) has its own colour and marker and one legend entry; the legend also keys
    the styles (ours / paper's / unpruned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    t = rep.table
    cols = panels(rep)
    ser = series(paper, t)
    n = len(cols) + (1 if claim_points else 0)
    ncol = min(4, max(1, n))
    nrow = max(1, math.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.3 * nrow + 1.2), squeeze=False)
    if n == 0:
        axes.flat[0].axis("off")
        axes.flat[0].text(0.5, 0.5, "nothing to plot yet: no results and no published number at a budget",
                          ha="center", va="center", fontsize=9)
    drawn: set[str] = set()
    for ax, c in zip(axes.flat, cols):
        for s in ser:
            xs = [(_x(t.rows[i]), i) for i in s["rows"]]
            lw = 2.0 if s["bold"] else 1.2
            ours = sorted((x, rep.cells[(i, c.key)].ours) for x, i in xs
                          if x is not None and rep.cells[(i, c.key)].ours is not None)
            if ours:  # a marker at every budget: one budget alone is still drawn
                ax.plot(*zip(*ours), "-", marker=s["marker"], ms=5, color=s["colour"], lw=lw, label=s["label"])
                drawn.add(s["label"])
            pub = sorted((x, rep.cells[(i, c.key)].published) for x, i in xs
                         if x is not None and rep.cells[(i, c.key)].published is not None)
            if pub:
                ax.plot(*zip(*pub), ls="none", marker=s["marker"], color=s["colour"], mfc="none", ms=7, mew=1.2,
                        label=f"{s['label']} (paper)")
                drawn.add(s["label"])
        for i, r in enumerate(t.rows):
            if r.vanilla:
                cell = rep.cells[(i, c.key)]
                if cell.ours is not None:
                    ax.axhline(cell.ours, color="k", ls="--", lw=0.8)
                if cell.published is not None:
                    ax.axhline(cell.published, color="k", ls=":", lw=0.8)
        ax.set_title(c.label + ("" if c.runnable else " (not run here)"), fontsize=10)
        ax.set_xlabel(("visual tokens" if t.budget_unit == "tokens" else t.budget_unit) + " (paper's convention)",
                      fontsize=8)
        ax.tick_params(labelsize=8)
    if claim_points:
        ax = axes.flat[len(cols)]
        by_method = {s["method"]: s for s in ser}
        for m in sorted({p["method"] for p in claim_points}):
            pts = sorted((p["ttft_ms"], p["acc"]) for p in claim_points if p["method"] == m)
            s = by_method.get(m, {"colour": "0.4", "marker": "o", "label": display_name(m)})
            ax.plot(*zip(*pts), "-", marker=s["marker"], color=s["colour"], ms=5)
            drawn.add(s["label"])
        ax.set_xlabel("TTFT (ms)", fontsize=8)
        ax.set_ylabel("relative average (%)", fontsize=8)
        ax.set_title("accuracy vs TTFT", fontsize=10)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles = [Line2D([], [], color=s["colour"], marker=s["marker"], ms=6, lw=1.5, label=s["label"])
               for s in ser if s["label"] in drawn]
    if handles:
        handles += [Line2D([], [], color="0.3", marker="o", ms=6, lw=1.5, label="ours"),
                    Line2D([], [], color="0.3", marker="o", mfc="none", ms=7, ls="none", label="paper's"),
                    Line2D([], [], color="k", ls="--", lw=0.8, label="unpruned, ours"),
                    Line2D([], [], color="k", ls=":", lw=0.8, label="unpruned, paper's")]
        fig.legend(handles=handles, loc="lower center", ncol=min(5, len(handles)), fontsize=8, frameon=False)
    fig.suptitle(_figure_title(paper, rep), fontsize=11)
    rows_legend = math.ceil(len(handles) / 5) if handles else 0
    fig.tight_layout(rect=(0, min(0.4, 0.035 * rows_legend + 0.02), 1, 0.93))
    return fig


def _x(r: Row):
    b = r.paper_budget if isinstance(r.paper_budget, (int, float)) and not isinstance(r.paper_budget, bool) else r.budget
    return b


# ----------------------------------------------------------------------------------------------- entry point
def report(paper: Paper, runs, table: str | None = None, fmt: str = "md", model: str | None = None,
           efficiency_files=(), figures_dir=None, include_partial: bool = False) -> tuple[str, dict]:
    """The report text (``fmt`` md / latex / both: the two one after the other) and a dict with every table's
    analysis, the claims, the figure paths and the text per format (``texts``)."""
    import json

    index = index_results(runs, include_partial) if runs else {}
    tables = [paper.table(table)] if table else list(paper.tables)
    reps = {t.id: analyse(t, collect(paper, index, t, model)) for t in tables}
    eff = []
    for f in efficiency_files:
        eff += json.loads(Path(f).read_text()).get("results", [])
    claims = check_claims(paper, reps, eff) if paper.claims else []
    figs = {}
    if figures_dir is not None:
        Path(figures_dir).mkdir(parents=True, exist_ok=True)
        pareto = [p for c in claims for p in c.get("points", [])]
        for t in tables:
            pts = [p for p in pareto if p["table"] == t.id]
            figs[t.id] = str(figure(paper, reps[t.id], Path(figures_dir) / f"{paper.key}-{t.slug}.png", pts or None))
    texts = {}
    for f in (["md", "latex"] if fmt == "both" else [fmt]):
        head = (f"## {paper.title}\n\narXiv {paper.arxiv}" + (f", {paper.venue}" if paper.venue else "")
                + (f"; code {paper.code}" if paper.code else "") + ".\n") if f == "md" else \
            f"% {paper.title} (arXiv {paper.arxiv})"
        body = [render_table(paper, reps[t.id], f) for t in tables]
        if claims:
            body.append(("### Claims\n\n" if f == "md" else "% Claims\n")
                        + "\n".join(("- " if f == "md" else "% ") + c["claim"].text + " -> " + c["line"]
                                    for c in claims) + "\n")
        if f == "md" and figs:
            body.append("\n".join(f"![{tid}]({Path(p).name})" for tid, p in figs.items()) + "\n")
        texts[f] = "\n".join([head] + body)
    return "\n".join(texts.values()), {"tables": reps, "claims": claims, "figures": figs, "texts": texts}


WANDB_COLUMNS = ["row", "method", "budget", "column", "ours", "paper", "difference", "within_tolerance", "stderr",
                 "marks", "model", "revision", "answered", "full_count", "deviations"]


def wandb_rows(rep: TableReport) -> tuple[list[str], list[list]]:
    """The W&B cells table of one paper table: per cell ours, the paper's, the difference and the verdict (None
    for a reference-only number or a cell of ours that is not comparable), and what ran: the standard error, the
    table's marks (§ another model, ¶ a partial question set), the model and revision, the questions answered of
    the benchmark's full count and the protocol deviations."""
    rows = []
    for (i, k), c in rep.cells.items():
        r = rep.table.rows[i]
        verdict = c.within if c.target and (c.ours is None or c.comparable) else None
        ran = c.run if c.ours is not None else {}
        rows.append([r.label, r.method, r.budget, rep.table.column(k).label, c.ours, c.published, c.delta, verdict,
                     c.stderr, c.marks if c.ours is not None else "", short_model(ran.get("model")) or None,
                     ran.get("revision"), ran.get("answered"), ran.get("full"),
                     "; ".join(ran.get("deviations") or []) or None])
    return list(WANDB_COLUMNS), rows


def log_wandb(paper: Paper, info: dict, text: str, project=None, entity=None) -> dict:
    """The report as one W&B run in group ``paper/<key>``: a table per paper table (:func:`wandb_rows`: row,
    column, ours, paper, difference, within tolerance, and what ran, with the table's marks) and its figure.
    Never raises."""
    from .wandb_log import WandbLogger

    wb = WandbLogger(project=project, entity=entity, job_type="paper", name=f"paper/{paper.key}",
                     group=f"paper/{paper.key}", tags=["paper", paper.key], config={"paper": paper.key,
                                                                                    "arxiv": paper.arxiv})
    if not wb.active:
        return wb.info()

    def _log():
        data = {}
        for tid, rep in info["tables"].items():
            columns, rows = wandb_rows(rep)
            cols = columns
            data[f"{rep.table.slug}/cells"] = wb.wandb.Table(columns=cols, data=rows)
            data[f"{rep.table.slug}/summary"] = rep.summary_line()
            if tid in info["figures"]:
                data[f"{rep.table.slug}/figure"] = wb.wandb.Image(info["figures"][tid])
        data["report"] = wb.wandb.Html(f"<pre>{text}</pre>")
        wb.run.log(data)

    wb._call("paper", _log)
    out = wb.info()
    wb.finish()
    return out
