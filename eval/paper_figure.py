"""A paper table's figure: accuracy vs budget per benchmark (ours as lines with filled markers and error bars of
± 1 standard error where the cell has one, the paper's as open markers, one colour and marker per row label, the
unpruned rows as horizontal lines, ours with a ± 1 standard error band; a column with no number gets no panel), and
the accuracy-vs-TTFT panel of a Pareto claim."""

from __future__ import annotations

import math
from pathlib import Path

from .paper_cells import TableReport
from .papers import Column, Paper, Row, Table
from .table import display_name, short_model

COLOURS = {"consensusdrop": "tab:red", "visiondrop": "tab:blue", "attnmix": "tab:green"}


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
    line = (f"{name}, {t.id}: accuracy vs budget (the unpruned row dashed)" if t.own else
            f"{name}, {t.id}: ours (filled markers, lines) vs the paper's numbers (open markers)")
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
    barred = False  # some error bar (or the unpruned row's band) drawn: the legend says what it spans
    for ax, c in zip(axes.flat, cols):
        for s in ser:
            xs = [(_x(t.rows[i]), i) for i in s["rows"]]
            lw = 2.0 if s["bold"] else 1.2
            ours = sorted((x, rep.cells[(i, c.key)].ours) for x, i in xs
                          if x is not None and rep.cells[(i, c.key)].ours is not None)
            if ours:  # a marker at every budget: one budget alone is still drawn
                ax.plot(*zip(*ours), "-", marker=s["marker"], ms=5, color=s["colour"], lw=lw, label=s["label"])
                drawn.add(s["label"])
            bars = error_bars(rep, xs, c.key)
            if bars:
                ax.errorbar(*zip(*bars), fmt="none", ecolor=s["colour"], elinewidth=lw * 0.8, capsize=0,
                            label=f"_{s['label']} ± 1 standard error")
                barred = True
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
                    if cell.stderr is not None:
                        ax.axhspan(cell.ours - cell.stderr, cell.ours + cell.stderr, color="k", alpha=0.08, lw=0)
                        barred = True
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
        if barred:
            handles.append(Line2D([], [], color="0.3", marker="|", ms=10, mew=1.2, ls="none",
                                  label=ERROR_BAR_LABEL))
        fig.legend(handles=handles, loc="lower center", ncol=min(5, len(handles)), fontsize=8, frameon=False)
    fig.suptitle(_figure_title(paper, rep), fontsize=11)
    rows_legend = math.ceil(len(handles) / 5) if handles else 0
    fig.tight_layout(rect=(0, min(0.4, 0.035 * rows_legend + 0.02), 1, 0.93))
    return fig


#: what the figure's error bars (and the unpruned row's band) span, as its legend says
ERROR_BAR_LABEL = "ours ± 1 standard error"


def error_bars(rep: TableReport, xs: list[tuple], key: str) -> list[tuple[float, float, float]]:
    """(x, ours, standard error) of a series' points in column ``key`` whose cell has a standard error
    (eval.table.stderr: results.json's, or an lmms-eval column's own): ``xs`` is the series' (x, row index)."""
    out = []
    for x, i in xs:
        cell = rep.cells[(i, key)]
        if x is not None and cell.ours is not None and cell.stderr is not None:
            out.append((x, cell.ours, cell.stderr))
    return sorted(out)


def _x(r: Row):
    b = r.paper_budget if isinstance(r.paper_budget, (int, float)) and not isinstance(r.paper_budget, bool) else r.budget
    return b
