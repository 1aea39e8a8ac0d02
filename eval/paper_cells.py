"""A paper table's cells, from our results files: what ran (model, revision, questions answered, protocol
deviations), the results matched to the spec's rows and columns, each cell's difference to the published number
and tolerance verdict, the relative averages and the summary (:class:`TableReport`). Rendered by
:mod:`eval.paper_render`, drawn by :mod:`eval.paper_figure`, the claims checked by :mod:`eval.paper_claims`; the
entry point is :mod:`eval.paper_report`."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .lmms_import import load_imported
from .paper_grid import _frozen, _opt_value
from .papers import RUN_SETTINGS, Paper, Table
from .run_config import RunConfig
from .table import answered_count, full_count, load_results, stderr


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
        if self.table.own:  # nothing published: how much of the table ran
            runnable = [c for c in self.cells.values() if not c.not_run]
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
