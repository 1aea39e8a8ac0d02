"""A paper table's cells, from our results files: what ran (model, revision, questions answered, protocol
deviations), the results matched to the spec's rows and columns, each cell's difference to the published number
and tolerance verdict, the relative averages and the summary (:class:`TableReport`); the rows of the control runs
found at each budget (:func:`with_controls`) and, for a paper that names its own method, each other row's paired
test against our run of that method (:func:`mark_significance`). Rendered by :mod:`eval.paper_render`, drawn by
:mod:`eval.paper_figure`, the claims checked by :mod:`eval.paper_claims`; the entry point is
:mod:`eval.paper_report`."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import stats as st
from .lmms_import import load_imported
from .paper_grid import _frozen, _opt_value
from .papers import RUN_SETTINGS, Paper, Row, Table
from .run_config import RunConfig
from .table import answered_count, display_name, full_count, load_results, stderr

#: the level of the significance mark: McNemar's exact p below it, or the 95 % paired bootstrap interval excluding 0
ALPHA = 0.05
#: the mark of a cell whose row differs from the paper's own method significantly on our runs
SIGNIFICANT = "⋆"


@dataclass
class Cell:
    ours: float | None = None
    published: float | None = None
    printed: str = ""  # the published number as the paper printed it (its decimals kept: "60.00")
    missing: str = ""  # why the paper has no number
    not_run: str = ""  # why we cannot run it ("" when we can)
    tolerance: float = 1.0
    path: str = ""
    target: bool = True  # False: the published number is shown for reference only (Table.reference_only)
    stderr: float | None = None  # the standard error of ours (eval.table.stderr), where the metric has one
    run: dict = field(default_factory=dict)  # what ran: run_facts() of the results file behind ``ours``
    unpruned: float | None = None  # ours of the table's unpruned row in this column (set by analyse)
    #: this row's run against our run of the paper's own method in its budget group (eval.stats.Paired: b = this
    #: row, a = the paper's method), set by mark_significance where both have per-unit scores on the same questions
    paired: st.Paired | None = None

    @property
    def delta(self) -> float | None:
        return None if self.ours is None or self.published is None else self.ours - self.published

    @property
    def vs_unpruned(self) -> float | None:
        """Ours minus the unpruned row's ours (a table of one's own prints it beside each cell)."""
        return None if self.ours is None or self.unpruned is None else self.ours - self.unpruned

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

    @property
    def significant(self) -> bool | None:
        """Whether this row's run differs from the paper's method's at 5 % (:data:`ALPHA`): McNemar's exact p for
        a mean of 0/1 scores per unit, else the 95 % paired bootstrap interval excluding 0; None when not tested."""
        p = self.paired
        if p is None:
            return None
        if p.p is not None:
            return p.p < ALPHA
        if p.low is None or p.high is None:
            return None
        return p.low > 0 or p.high < 0


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
    tokens = res.get("tokens") or {}
    return {"model": model, "revision": _revision(res), "other_model": not same_model(model, spec_model),
            "answered": answered, "questions": questions, "full": full, "partial": partial, "deviations": devs,
            "path": res.get("_path", ""), "tok_in": tokens.get("tok_in"), "tok_eq": tokens.get("tok_eq"),
            "prefill_tflops": tokens.get("prefill_tflops"), "kv_mb": tokens.get("kv_mb")}


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
            cell = Cell(published=r.published.get(c.key), printed=r.printed.get(c.key, ""),
                        missing=str(r.missing.get(c.key, "")), not_run=c.not_run or r.not_run,
                        tolerance=c.tolerance, target=not table.reference_only)
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


# ----------------------------------------------------------------------------------------------- controls
def control_label(method: str) -> str:
    """A control row's label: the method as its paper prints it, and that it is a control (``Random (control)``)."""
    return f"{display_name(method)} (control)"


def with_controls(table: Table, index: dict, controls, model: str | None = None) -> Table:
    """``table`` with a row for each control run found in ``index`` (any runnable column; default options, the
    table's model and run settings) at each budget of its method rows, after the last row of each budget group
    (a group holding rows of several budgets gets one per budget); ``table`` itself when none is found. No row is
    added for a run the table already has as a row (the same method and budget, no options). A control row prints
    no published number; its ``paper_budget`` is the group rows' own where they share one (the figure's x)."""
    if not controls:
        return table
    skey = _settings_key(table.settings)
    have = {(r.method, r.budget) for r in table.rows if r.runnable and not r.options}
    groups: dict[tuple[str, int], list[int]] = {}  # (group heading, budget) -> its method rows
    for i, r in enumerate(table.rows):
        if r.runnable and not r.vanilla and r.budget is not None:
            groups.setdefault((r.group, r.budget), []).append(i)
    after: dict[int, list[Row]] = {}
    for (group, budget), rows in groups.items():
        last = max(i for i, r in enumerate(table.rows) if r.group == group)
        pbs = {(table.rows[i].paper_budget, table.rows[i].paper_budget_printed) for i in rows}
        pb, pb_text = next(iter(pbs)) if len(pbs) == 1 else (None, "")
        if isinstance(pb, bool) or not isinstance(pb, (int, float)):
            pb, pb_text = None, ""
        for m in controls:
            found = any(index.get((c.bench, model or table.model, m, budget, _opts_key({}), skey)) is not None
                        for c in table.columns if c.runnable)
            if found and (m, budget) not in have:
                after.setdefault(last, []).append(Row(
                    method=m, label=control_label(m), budget=budget, paper_budget=pb, paper_budget_printed=pb_text,
                    group_label=group, unit=table.budget_unit, control=True))
    if not after:
        return table
    rows = [x for i, r in enumerate(table.rows) for x in [r, *after.get(i, [])]]
    return replace(table, rows=tuple(rows))


# ----------------------------------------------------------------------------------------------- significance
@dataclass
class Significance:
    """The paired tests of one table against the paper's own method (:func:`mark_significance`): per budget group
    the row of the paper's method tested against, the pairs tested, and those not tested with why."""
    method: str = ""  # the paper's method (registry name); "" = the paper names none
    against: dict = field(default_factory=dict)  # group heading -> the label of the paper's method's row there
    tested: int = 0
    marked: int = 0
    kinds: set = field(default_factory=set)  # "mcnemar" / "bootstrap": the tests used
    untested: dict = field(default_factory=dict)  # why -> ["row name column label", ...]
    units_seen: bool = False  # some run of a pair keeps per-unit scores (else the report says nothing of this)

    @property
    def said(self) -> bool:
        """The report explains the marks (or their absence): some pair was tested, or some run has per-unit
        scores; a report of runs that predate them prints what it printed before."""
        return bool(self.method) and (self.tested > 0 or self.units_seen)


def _load(path: str, cache: dict):
    """Our run at ``path`` (eval.compare.Run), or the one-line reason it cannot be compared; each read once."""
    from .pairing import CompareError, load_run

    if path not in cache:
        try:
            cache[path] = load_run(path)
        except (CompareError, OSError, ValueError, KeyError) as e:
            cache[path] = f"its results could not be read ({e})"
    return cache[path]


def _stat(run, metric: str):
    """The per-unit statistic of ``metric`` on ``run``'s benchmark (eval.pairing.stat_for), or why there is none."""
    from .pairing import CompareError, benchmark_of, stat_for

    try:
        bench = benchmark_of(run)
    except (KeyError, TypeError, ValueError) as e:
        return f"benchmark not known here ({e})"
    try:
        return stat_for(run, metric, bench)
    except CompareError as e:  # a server's number, or a metric without per-unit scores
        return str(e).replace(str(run.path), "the paper's method's run")


def paired_test(a_path: str, b_path: str, metric: str, cache: dict):
    """(eval.stats.Paired of b - a, "") over the same units, or (None, why not): a run without per-unit scores
    (units.jsonl), on other questions or other scored units, partial, or a metric without a per-unit statistic.
    An accuracy's test is McNemar's exact p, which needs no resampling: its bootstrap interval (not read) is drawn
    once; any other metric's is the 95 % paired bootstrap (eval.stats.RESAMPLES, SEED)."""
    from .pairing import CompareError, check_same_questions

    a, b = _load(a_path, cache), _load(b_path, cache)
    for run in (a, b):
        if isinstance(run, str):
            return None, run
    missing = [who for who, r in (("the paper's method's run", a), ("this row's run", b)) if r.units is None]
    if missing:
        return None, (f"no per-unit scores in {' and '.join(missing)} ({st.UNITS_FILE}; `python -m eval score RUN` "
                      "writes them from the answers)")
    try:
        check_same_questions([a, b])
    except CompareError as e:
        return None, str(e).replace(str(a.path), "the paper's method's run").replace(str(b.path), "this row's run")
    stat = _stat(a, metric)
    if isinstance(stat, str):
        return None, stat
    return st.paired(a.units, b.units, stat, 1 if stat.paired_exact else st.RESAMPLES, st.SEED), ""


def mark_significance(paper: Paper, rep: "TableReport") -> Significance:
    """For a paper that names its own method (``[paper] method``): in each budget group, each other row's cells
    against that method's row (the first in the group) in the same column, a paired test on our runs
    (:func:`paired_test`); the result on the row's :attr:`Cell.paired`, the table's tally on ``rep.significance``.
    A pair where either cell has no result of ours is not a pair; one that cannot be tested is counted with why."""
    sig = Significance(method=paper.method)
    rep.significance = sig
    if not paper.method:
        return sig
    t, cache = rep.table, {}
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(t.rows):
        if r.runnable and not r.vanilla:
            groups.setdefault(r.group, []).append(i)
    for g, rows in groups.items():
        mine = next((i for i in rows if t.rows[i].method == paper.method), None)
        if mine is None:
            continue
        sig.against[g] = t.rows[mine].label
        for i in rows:
            if t.rows[i].method == paper.method:
                continue
            for c in t.columns:
                a, b = rep.cells[(mine, c.key)], rep.cells[(i, c.key)]
                if a.ours is None or b.ours is None:
                    continue
                if c.lmms_task:
                    pr, why = None, "a column run through lmms-eval keeps no per-unit scores here"
                else:
                    pr, why = paired_test(a.path, b.path, c.metric, cache)
                    for run in (cache.get(a.path), cache.get(b.path)):
                        sig.units_seen |= getattr(run, "units", None) is not None
                b.paired = pr
                if pr is None or b.significant is None:
                    why = why or "the metric is undefined on every bootstrap resample"
                    sig.untested.setdefault(why, []).append(f"{t.rows[i].name} {c.label}")
                    b.paired = None
                    continue
                sig.tested += 1
                sig.marked += bool(b.significant)
                sig.kinds.add("mcnemar" if pr.p is not None else "bootstrap")
    return sig


# ----------------------------------------------------------------------------------------------- the report
@dataclass
class TableReport:
    table: Table
    cells: dict
    avgs: list[dict]  # per row: ours_vs_ours, ours_vs_paper, paper_recomputed (value, n)
    vanilla_line: str
    summary: dict
    #: the paired tests against the paper's own method (mark_significance; empty until it runs)
    significance: Significance = field(default_factory=Significance)

    def summary_line(self) -> str:
        s = self.summary
        if self.table.own:  # nothing published: how much of the table ran (its own rows, not the controls)
            runnable = [c for (i, _), c in self.cells.items() if not c.not_run and not self.table.rows[i].control]
            return f"{sum(c.ours is not None for c in runnable)} of {len(runnable)} cells run"
        line = (f"{s['within']} of {s['published']} published cells reproduced within tolerance, "
                f"{s['not_run']} not run ({s['cannot_run']} cannot be run here)")
        if s.get("not_comparable"):
            line += (f"; {s['not_comparable']} ran on another model or a partial question set (§ / ¶), not "
                     "counted")
        if s.get("reference_only"):
            line += f"; {s['reference_only']} published cells shown for reference only, not pass/fail targets"
        return line


def row_tokens(rep: TableReport, i: int, key: str) -> float | None:
    """Row ``i``'s visual tokens (``tok_in``: entering the LLM, ``tok_eq``: averaged over the decoder layers) or
    analytic cost (``prefill_tflops``, ``kv_mb``): the results files' means per sample, averaged over the columns
    it ran."""
    vals = [c.run.get(key) for (j, _), c in rep.cells.items() if j == i and c.ours is not None]
    vals = [v for v in vals if v is not None]
    return sum(vals) / len(vals) if vals else None


def analyse(table: Table, cells: dict) -> TableReport:
    """The table's relative averages, vanilla check and summary; each cell learns the unpruned row's ours."""
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
    if van is not None:
        for (i, k), c in cells.items():
            c.unpruned = ours_v[k]
    if van is None:
        vline = "No unpruned row in this table."
    elif table.own:
        vline = ("Unpruned row: " + ", ".join(f"{table.column(k).label} {cells[(van, k)].ours:.2f}" for k in cols
                                              if cells[(van, k)].ours is not None)
                 if any(v is not None for v in ours_v.values()) else "Unpruned row: not run yet") + "."
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
