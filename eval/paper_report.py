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
``reference_only`` shows its published numbers without pass/fail. The control runs of a table (its spec's
``controls``, or random and downsample with ``--controls``) found at a budget stand as rows beside the method's;
for a paper that names its own method, each other row's cell is marked ⋆ where it differs from that method's at
5 % on our runs (a paired test over the same questions; eval.paper_cells.mark_significance).
Claims without a table (ConsensusDrop's abstract, a README's headline) are checked from our results alone:
"beats" per benchmark and budget, "pareto" against the efficiency benchmark's TTFT / KV cache, "retains" (a
method keeps at least X % of the unpruned model at a budget)."""

from __future__ import annotations

import json
from pathlib import Path

from .paper_cells import TableReport, analyse, collect, index_results, mark_significance, run_facts, with_controls
from .paper_claims import check_claims
from .paper_figure import draw, figure, panels, series
from .paper_render import not_printed_lines, render_table
from .papers import Paper
from .table import short_model

#: the report's parts, by the modules that hold them (eval.paper_cells, _render, _figure, _claims), in one place
__all__ = ["report", "log_wandb", "wandb_rows", "WANDB_COLUMNS", "TableReport", "analyse", "collect",
           "index_results", "run_facts", "check_claims", "draw", "figure", "panels", "series", "not_printed_lines",
           "render_table", "WANDB_PAIRED_COLUMNS", "with_controls", "mark_significance"]


def report(paper: Paper, runs, table: str | None = None, fmt: str = "md", model: str | None = None,
           efficiency_files=(), figures_dir=None, include_partial: bool = False,
           controls: bool = False) -> tuple[str, dict]:
    """The report text (``fmt`` md / latex / both: the two one after the other) and a dict with every table's
    analysis, the claims, the figure paths and the text per format (``texts``). Each table gets the rows of the
    control runs found at its budgets (its spec's ``controls``; with ``controls`` (``--controls``) random and
    downsample where the spec names none) and, for a paper that names its own method, the significance marks."""
    index = index_results(runs, include_partial) if runs else {}
    tables = [paper.table(table)] if table else list(paper.tables)
    reps = {}
    for t in tables:
        t = with_controls(t, index, t.controls_run(controls), model)
        reps[t.id] = analyse(t, collect(paper, index, t, model))
        mark_significance(paper, reps[t.id])
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
        src = ((f"arXiv {paper.arxiv}" + (f", {paper.venue}" if paper.venue else "")
                + (f"; code {paper.code}" if paper.code else "")) if paper.arxiv
               else f"a table of one's own: {Path(paper.path).name}")
        head = f"## {paper.title}\n\n{src}.\n" if f == "md" else f"% {paper.title} ({src})"
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
#: the columns a cells table adds where its table has control rows or a tested pair (wandb_rows)
WANDB_PAIRED_COLUMNS = ["control", "vs_method_diff", "vs_method_p", "vs_method_low", "vs_method_high",
                        "vs_method_significant"]


def wandb_rows(rep: TableReport) -> tuple[list[str], list[list]]:
    """The W&B cells table of one paper table: per cell ours, the paper's, the difference and the verdict (None
    for a reference-only number or a cell of ours that is not comparable), and what ran: the standard error, the
    table's marks (§ another model, ¶ a partial question set), the model and revision, the questions answered of
    the benchmark's full count and the protocol deviations. Where the table has control rows or a tested pair
    (:data:`WANDB_PAIRED_COLUMNS`): whether the row is a control run, and the paired test against our run of the
    paper's own method (this row minus it, McNemar's p, the 95 % bootstrap interval's ends where that is the
    test, significant at 5 %; None where not tested)."""
    paired = any(r.control for r in rep.table.rows) or rep.significance.tested > 0
    rows = []
    for (i, k), c in rep.cells.items():
        r = rep.table.rows[i]
        verdict = c.within if c.target and (c.ours is None or c.comparable) else None
        ran = c.run if c.ours is not None else {}
        pr = c.paired
        ci = (None, None) if pr is None or pr.p is not None else (pr.low, pr.high)
        rows.append([r.label, r.method, r.budget, rep.table.column(k).label, c.ours, c.published, c.delta, verdict,
                     c.stderr, c.marks if c.ours is not None else "", short_model(ran.get("model")) or None,
                     ran.get("revision"), ran.get("answered"), ran.get("full"),
                     "; ".join(ran.get("deviations") or []) or None]
                    + ([r.control, None if pr is None else pr.diff, None if pr is None else pr.p, *ci, c.significant]
                       if paired else []))
    return list(WANDB_COLUMNS) + (list(WANDB_PAIRED_COLUMNS) if paired else []), rows


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
