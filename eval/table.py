"""``python -m eval table``: results JSONs -> the papers' table layout (markdown and LaTeX).

Rows: the unpruned model (method ``none``) first, then one group per token budget (largest
first), one row per method; columns: one per benchmark showing its metric *variant* in the
header (e.g. ``MME-P``, ``POPE-F1avg3``), then the visual tokens actually measured (``tok-in``
entering the LLM, ``tok-eq`` layer-averaged) and ``Avg``. Each cell can show the value relative
to the unpruned row; ``Avg`` is the mean over the row's benchmarks of method / vanilla (x 100 %),
as the papers compute it, labelled ``Avg(rel, vanilla=ours|paper)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import read_json

#: the methods' names as their papers print them (the table rows, the paper report's figure and claims)
DISPLAY = {"none": "Vanilla (unpruned)", "novisual": "No visual tokens", "apet": "ApET", "attnmix": "AttnMix",
           "cdpruner": "CDPruner", "clse": "CLSE", "consensusdrop": "ConsensusDrop", "dart": "DART",
           "divprune": "DivPrune", "downsample": "Downsample", "duet": "DUET-VLM", "fastervlm": "FasterVLM",
           "fastv": "FastV", "flowcut": "FlowCut", "hiprune": "HiPrune", "holov": "HoloV", "pixelprune": "PixelPrune", "mmtok": "MMTok", "otprune": "OTPrune",
           "ivcprune": "IVC-Prune", "pdrop": "PyramidDrop", "priortr": "PriorTR", "prumerge": "PruMerge", "random": "Random",
           "restore": "RESTORE",
           "sparsevlm": "SparseVLM", "transprune": "TransPrune", "trio": "TRIO",
           "v2drop": "V2Drop", "visiondrop": "VisionDrop", "visiontrim": "VisionTrim", "visionzip": "VisionZip",
           "vispruner": "VisPruner", "vlmpruner": "VLM-Pruner", "vscan": "VScan"}

#: each benchmark's full question count: the question file of LLaVA-1.5's evaluation data (eval.zip) that the
#: harness reads (GQA testdev-balanced, MMBench EN dev rows with their circular copies, ScienceQA test, TextVQA
#: val, VQAv2 test-dev and val, VizWiz test). A run that answered fewer is a partial set. Benchmarks not listed
#: here: the count of the data the run read is all the report can say.
FULL_QUESTIONS = {"gqa": 12578, "mme": 2374, "pope": 8910, "sqa": 4241, "textvqa": 5000, "textvqa_noocr": 5000,
                  "vqav2": 107394, "vqav2_val": 214354, "vizwiz": 8000, "mmvet": 218, "mmbench": 4377}

#: metrics that are a mean of one 0/1 score per question, and where ``details.finalize`` of results.json holds
#: how many questions that mean is over: their standard error is sqrt(p (1 - p) / (n - 1)) (x 100), which is what
#: lmms-eval prints for a mean (the sample standard deviation, n - 1 in the denominator, over sqrt(n)). F1, MME's
#: sums and the soft VQA accuracies (0, 1/3, 2/3, 1 per question) have none here (lmms-eval prints N/A for F1 and
#: MME too).
BINARY_N = {"GQA": ("samples",), "SQA-all": ("total",), "SQA-IMG": ("img_total",), "SEED-all": ("questions",),
            "MMB-dev": ("questions",), "MMB-CN-dev": ("questions",), "MMB-dev-local": ("rows",),
            "MMB-CN-dev-local": ("rows",), "POPE-acc-pooled": ("pooled", "n")}


def display_name(method: str | None) -> str:
    """A method key as its paper prints it (``consensusdrop`` -> ``ConsensusDrop``); an unknown key as it is."""
    return DISPLAY.get(method or "", method or "")


def short_model(model: str | None) -> str:
    """A model for a heading: a hub id as it is, a local directory by its folder name (never an absolute path)."""
    m = str(model or "")
    if m.startswith(("/", "./", "../", "~")) or "\\" in m:
        return Path(m.rstrip("/")).name or m
    return m


def full_count(result: dict) -> int | None:
    """The benchmark's full question count (:data:`FULL_QUESTIONS`); an lmms-eval column's ``n-samples``
    original; else None."""
    lm = (result.get("lmms") or {}).get("n_samples") or {}
    if lm.get("original") is not None:
        return int(lm["original"])
    return FULL_QUESTIONS.get(str(result.get("benchmark") or (result.get("config") or {}).get("benchmark")))


def answered_count(result: dict) -> int | None:
    """How many questions the run answered (``counts.answered``; lmms-eval's ``n-samples`` effective)."""
    lm = (result.get("lmms") or {}).get("n_samples") or {}
    if lm.get("effective") is not None:
        return int(lm["effective"])
    n = (result.get("counts") or {}).get("answered")
    return None if n is None else int(n)


def stderr(result: dict, metric: str) -> float | None:
    """The standard error of ``metric`` in ``result`` (same unit: x 100 for percentages): results.json's
    ``stderr`` (eval.stats: the binomial formula for accuracies, a bootstrap over the benchmark's unit for the
    other metrics); for a results file written before it, the metrics of :data:`BINARY_N` by the binomial formula.
    None where there is none: a server's score, a count missing or below 2."""
    from .stats import se_number

    recorded = (result.get("stderr") or {}).get(metric)
    if recorded is not None and (recorded == "server" or not isinstance(recorded, str)):
        return se_number(recorded)
    path = BINARY_N.get(metric)
    v = (result.get("metrics") or {}).get(metric)
    if path is None or v is None:
        return None
    n = ((result.get("details") or {}).get("finalize") or {})
    for k in path:
        n = n.get(k) if isinstance(n, dict) else None
    if not isinstance(n, (int, float)) or n < 2:
        return None
    p = min(max(float(v) / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / (n - 1))


ORDER = ["gqa", "mmbench", "mmbench_cn", "mme", "pope", "sqa", "vqav2", "vqav2_val", "textvqa", "textvqa_noocr",
         "vizwiz", "seed", "mmvet", "msvd", "msrvtt", "tgif", "activitynet"]
VANILLA = "none"


@dataclass
class Row:
    method: str
    budget: Any
    options: dict
    cells: dict[str, dict] = field(default_factory=dict)  # benchmark -> results
    label: str = ""


def find_results(paths) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(p.rglob("results.json")))
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such results file or directory: {p}")
    return out


def load_results(paths, include_partial: bool = False) -> list[dict]:
    res = []
    for p in find_results(paths):
        r = read_json(p)
        if r.get("schema", "").startswith("vtprune.eval.results") and (include_partial or not r.get("partial")):
            r["_path"] = str(p)
            res.append(r)
    return res


def _opts(method_cfg: dict) -> dict:
    return {k: v for k, v in method_cfg.items() if k not in ("method", "budget")}


def build(results: list[dict], metric_override: dict[str, str] | None = None,
          paper_vanilla: dict[str, float] | None = None) -> dict[str, dict]:
    """Per model: columns, rows and the metric used for each benchmark column."""
    from .families import anyres

    metric_override = metric_override or {}
    models: dict[str, dict] = {}
    for r in results:
        mid = r["model"].get("id") or r["model"].get("name")
        layout = r["model"].get("next_layout") if anyres(r["model"].get("family")) else None
        key = mid + (f" [{layout}]" if layout else "") + (f" [{r['model'].get('preprocess')}]" if r["model"].get("preprocess") == "crop" else "")
        m = models.setdefault(key, {"rows": {}, "benches": {}, "labels": {}})
        bench = r["benchmark"]
        metric = metric_override.get(bench) or r.get("primary_metric")
        m["benches"][bench] = metric
        m["labels"][metric] = r.get("metric_labels", {}).get(metric, metric)
        meth = r["method"]
        rk = (meth.get("method"), meth.get("budget"), json.dumps(_opts(meth), sort_keys=True, default=str))
        row = m["rows"].setdefault(rk, Row(meth.get("method"), meth.get("budget"), _opts(meth)))
        prev = row.cells.get(bench)
        if prev is None or r.get("created", "") >= prev.get("created", ""):
            row.cells[bench] = r
    for m in models.values():
        # labels: method name, plus the options that differ between rows of the same method and budget
        by_mb: dict[tuple, list[Row]] = {}
        for row in m["rows"].values():
            by_mb.setdefault((row.method, row.budget), []).append(row)
        for rows in by_mb.values():
            for row in rows:
                row.label = display_name(row.method)
                if len(rows) > 1:
                    keys = sorted({k for o in rows for k in o.options if len({json.dumps(x.options.get(k), default=str) for x in rows}) > 1})
                    row.label += " (" + ", ".join(f"{k}={row.options.get(k)}" for k in keys) + ")"
        m["columns"] = [b for b in ORDER if b in m["benches"]] + sorted(b for b in m["benches"] if b not in ORDER)
        m["paper_vanilla"] = paper_vanilla or {}
    return models


def _value(row: Row, bench: str, metric: str):
    r = row.cells.get(bench)
    if r is None:
        return None
    v = r.get("metrics", {}).get(metric)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _stderr(row: Row, bench: str, metric: str):
    r = row.cells.get(bench)
    return None if r is None else stderr(r, metric)


def server_scored(result: dict | None, metric: str) -> bool:
    """Whether ``metric`` of ``result`` was scored by the benchmark's server (no per-question truth here)."""
    return result is not None and (result.get("stderr") or {}).get(metric) == "server"


def _tokens(row: Row, key: str):
    vals = [r["tokens"].get(key) for r in row.cells.values() if r.get("tokens", {}).get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def _throughput(row: Row) -> tuple[float | None, float | None]:
    """The row's questions/s (its runs' questions over their answering loops' time, the processes side by side) and
    its host-wait fraction (results.json's ``throughput``); None where no run of the row has it."""
    ts = [r["throughput"] for r in row.cells.values() if (r.get("throughput") or {}).get("loop_s")]
    if not ts:
        return None, None
    if len(ts) == 1:  # the run's own figures (from its unrounded seconds)
        return ts[0]["questions_per_s"], ts[0]["host_wait_fraction"]
    wall = sum(t["loop_s"] / max(t.get("processes") or 1, 1) for t in ts)
    loop = sum(t["loop_s"] for t in ts)
    return sum(t["questions"] for t in ts) / wall, sum(t["host_wait_s"] for t in ts) / loop


def _fmt(v, d):
    return "–" if v is None else f"{v:.{d}f}"


def render(models: dict[str, dict], fmt: str = "md", relative: bool = True, decimals: int = 1,
           throughput: bool = False) -> str:
    out = []
    for model, m in models.items():
        cols = m["columns"]
        metrics = [m["benches"][b] for b in cols]
        groups_of = m.get("groups") or {}  # (row key, bench) -> {"A": Estimate, "B": Estimate}, with --control
        rows = list(m["rows"].values())
        vanilla_rows = [r for r in rows if r.method == VANILLA]
        vanilla = vanilla_rows[0] if vanilla_rows else None
        paper = m["paper_vanilla"]
        source = "paper" if paper else "ours"

        def base(bench, metric):
            if paper:
                return paper.get(metric, paper.get(bench))
            return _value(vanilla, bench, metric) if vanilla else None

        def avg(row):
            ratios = []
            for b, met in zip(cols, metrics):
                v, bv = _value(row, b, met), base(b, met)
                if v is not None and bv:
                    ratios.append(v / bv)
            if not ratios:
                return None, 0
            return 100.0 * sum(ratios) / len(ratios), len(ratios)

        others = sorted((r for r in rows if r.method != VANILLA),
                        key=lambda r: (-(r.budget if isinstance(r.budget, (int, float)) else -1), r.label))
        groups: list[tuple[str | None, list[Row]]] = []
        if vanilla_rows:
            groups.append((None, vanilla_rows))
        for r in others:
            title = f"{r.budget} tokens" if r.budget is not None else "no budget"
            if not groups or groups[-1][0] != title:
                groups.append((title, []))
            groups[-1][1].append(r)
        avg_head = f"Avg(rel, vanilla={source})"
        grouped = [b for b in cols if any(k[1] == b for k in groups_of)]
        gheads = [f"{m['benches'][b]} {g}" for b in grouped for g in ("A", "B")]
        header = ["Method", "Budget"] + metrics + gheads + ["tok-in", "tok-eq"] + (["q/s", "host wait"] if throughput else []) + [avg_head]
        body: list[tuple[str | None, list[list[str]]]] = []
        for title, grp in groups:
            lines = []
            for r in grp:
                cells = [r.label, "–" if r.budget is None else str(r.budget)]
                for b, met in zip(cols, metrics):
                    v, bv = _value(r, b, met), base(b, met)
                    c = _fmt(v, decimals)
                    se = _stderr(r, b, met)
                    if se is not None:
                        c += f" ± {se:.{decimals}f}" if fmt == "md" else f" $\\pm$ {se:.{decimals}f}"
                    elif v is not None and server_scored(r.cells.get(b), met):
                        c += " (server)"
                    if relative and v is not None and bv and (r.method != VANILLA or paper):
                        c += f" ({100.0 * v / bv:.1f}%)" if fmt == "md" else f" {{\\scriptsize({100.0 * v / bv:.1f}\\%)}}"
                    cells.append(c)
                for b in grouped:
                    g = groups_of.get((id(r), b))
                    for k in ("A", "B"):
                        e = None if g is None else g[k]
                        if e is None or e.value is None or math.isnan(e.value):
                            cells.append("–")
                            continue
                        pm = " ± " if fmt == "md" else " $\\pm$ "
                        cells.append(f"{e.value:.{decimals}f}" + ("" if e.se is None else f"{pm}{e.se:.{decimals}f}")
                                     + f" (n={e.n})")
                cells += [_fmt(_tokens(r, "tok_in"), 1), _fmt(_tokens(r, "tok_eq"), 1)]
                if throughput:
                    qps, wait = _throughput(r)
                    pct = "\\%" if fmt == "latex" else "%"
                    cells += [_fmt(qps, 2), "–" if wait is None else f"{100 * wait:.1f}{pct}"]
                a, n = avg(r)
                pct = "\\%" if fmt == "latex" else "%"
                a_txt = "–" if a is None else f"{a:.1f}{pct}" + ("*" if n < len(cols) else "")
                cells.append(a_txt)
                lines.append(cells)
            body.append((title, lines))
        notes = [f"Model: {short_model(model)}. All rows are our re-runs (`rerun`); metric variants per column:"]
        notes += [f"  {met}: {m['labels'].get(met, met)}" for met in metrics]
        notes.append("tok-in = visual tokens entering the LLM, tok-eq = layer-averaged visual tokens (means over the row's runs).")
        if throughput:
            notes.append("q/s = questions answered per second of the runs' answering loops (their processes side by side; "
                         "model loading and scoring not counted); host wait = the share of that time the device waited "
                         "for its inputs (results.json 'throughput').")
        notes.append(f"{avg_head}: mean over the row's benchmarks of method / vanilla x 100%; * = some benchmark missing in the row.")
        if any(_stderr(r, b, met) is not None for r in rows for b, met in zip(cols, metrics)):
            notes.append("± = standard error of a mean of per-question 0/1 scores, sqrt(p (1 - p) / (n - 1)), as "
                         "lmms-eval prints it; of the other metrics (F1, MME, soft VQA accuracy, judged scores) the "
                         "standard deviation of a bootstrap over the benchmark's unit (results.json stderr_method "
                         "names the unit, the resamples and the seed); results written before per-unit scores were "
                         "kept have it for the accuracies only.")
        for note in m.get("group_notes", []):
            notes.append(note)
        if any(server_scored(r.cells.get(b), met) for r in rows for b, met in zip(cols, metrics)):
            notes.append("(server) = scored by the benchmark's evaluation server: no per-question truth here, so no "
                         "standard error.")
        if fmt == "md":
            out.append(f"### {short_model(model)}\n")
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            for title, lines in body:
                if title:
                    out.append("| **" + title + "** |" + " |" * (len(header) - 1))
                for ln in lines:
                    out.append("| " + " | ".join(ln) + " |")
            out.append("")
            out.extend(notes)
            out.append("")
        else:
            esc = lambda s: s.replace("%", "\\%").replace("_", "\\_").replace("&", "\\&").replace("#", "\\#")  # noqa: E731
            out.append(f"% {short_model(model)}")
            out.append("\\begin{tabular}{l" + "c" * (len(header) - 1) + "}")
            out.append("\\toprule")
            out.append(" & ".join(esc(h) for h in header) + " \\\\")
            out.append("\\midrule")
            for title, lines in body:
                if title:
                    out.append(f"\\multicolumn{{{len(header)}}}{{l}}{{\\textit{{{esc(title)}}}}} \\\\")
                for ln in lines:
                    out.append(" & ".join([esc(ln[0]), esc(ln[1])] + ln[2:]).replace("–", "--") + " \\\\")
                out.append("\\midrule")
            out[-1] = "\\bottomrule"
            out.append("\\end{tabular}")
            out.extend("% " + n for n in notes)
            out.append("")
    return "\n".join(out)


def add_groups(models: dict[str, dict], control: str) -> None:
    """VTC-Bench's groups (eval.stats): per row and benchmark column, the row's score on the questions the control
    run gets wrong (A) and on the rest (B). ``control``: a run folder or results.json (the control of every row
    of its benchmark), or ``auto``: per model, benchmark and budget, the ``downsample`` run at that budget among the
    results (a budget without one: no groups there, said in a note). Raises :class:`eval.pairing.CompareError`
    where a control cannot be used (none at all, another question set, no per-unit scores)."""
    from . import stats as st
    from .pairing import CompareError, check_same_questions, load_run, stat_for

    loaded: dict = {}

    def load(path):  # each run (and its units) read once, however many rows it controls
        if path not in loaded:
            loaded[path] = load_run(path)
        return loaded[path]

    named = None if control == "auto" else load_run(control)
    for model, m in models.items():
        m["groups"], notes, used = {}, [], []
        for bench, metric in m["benches"].items():
            rows = list(m["rows"].values())
            if named is not None:
                if named.results.get("benchmark") != bench:
                    continue
                ctrl_for = {id(r): named for r in rows}
            else:
                ds = {r.budget: r.cells[bench] for r in rows if r.method == "downsample" and bench in r.cells}
                if not ds:
                    raise CompareError(f"--control auto: no downsample run of {short_model(model)} on {bench} among the "
                                       "results; add one at each budget, or name the control run with --control RUN")
                ctrl_for = {}
                for r in rows:
                    if r.method in (VANILLA, "downsample") or bench not in r.cells:
                        continue
                    if r.budget in ds:
                        ctrl_for[id(r)] = load(ds[r.budget]["_path"])
                    else:
                        notes.append(f"{r.label} at budget {r.budget} on {bench}: no downsample run at that budget, "
                                     "so no groups A / B")
            for r in rows:
                ctrl = ctrl_for.get(id(r))
                if ctrl is None or bench not in r.cells:
                    continue
                run = load(r.cells[bench]["_path"])
                check_same_questions([ctrl, run])
                try:
                    stat = stat_for(run, metric)
                except CompareError:  # a server's number, or a metric without per-unit scores: no groups
                    continue
                m["groups"][(id(r), bench)] = st.on_groups(run.units, ctrl.units, stat)
                if ctrl.path not in used:
                    used.append(ctrl.path)
                    a, b = st.difficult_groups(ctrl.units)
                    key, full = ctrl.units.difficulty
                    notes.append(f"{metric} A / B (VTC-Bench's groups): the row's score on the {len(a)} {ctrl.units.unit}s "
                                 f"where the control run {short_model(str(ctrl.path))} (budget "
                                 f"{ctrl.method.get('budget')}) has {key} below {full:g} (A, difficult) and on the other "
                                 f"{len(b)} (B), ± the standard error, n the units")
        m["group_notes"] = notes


def make_table(paths, fmt: str = "md", metric_override=None, paper_vanilla=None, relative: bool = True,
               decimals: int = 1, include_partial: bool = False, throughput: bool = False,
               control: str | None = None) -> str:
    results = load_results(paths, include_partial=include_partial)
    if not results:
        raise ValueError("no results.json found" + ("" if include_partial else " (partial runs are skipped; --include-partial)"))
    models = build(results, metric_override, paper_vanilla)
    if control is not None:
        add_groups(models, control)
    return render(models, fmt=fmt, relative=relative, decimals=decimals, throughput=throughput)
