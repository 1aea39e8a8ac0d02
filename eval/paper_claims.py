"""A paper's claims without a table, checked from our results alone: "beats" per benchmark and budget, "pareto"
against the efficiency benchmark's TTFT / KV cache, "retains" (a method keeps at least X % of the unpruned model
at a budget)."""

from __future__ import annotations

from .paper_cells import TableReport
from .papers import Claim, Paper
from .table import display_name

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
