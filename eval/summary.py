"""What a run's answers say once merged: which prefill path (fast / eager) each took, added to results.json
(:func:`add_path_summary`), and the few lines ``eval run`` / ``eval score`` print at the end
(:func:`print_summary`)."""

from __future__ import annotations

from pathlib import Path

from .io import complete_jsonl_records, write_json
from .shards import EVAL_KEY, shard_files


def path_summary(metas: list[dict], fast: bool) -> dict:
    """Which path the prefills of a run's answers took, per sample (a batch's prefill counts for each of its
    samples): ``{"requested": "fast" | "eager", "fast": n, "eager": n, "eager_reasons": {reason: n},
    "new_graphs": n}`` (``new_graphs``: fast prefills that compiled / captured a graph, their time included;
    ``unrecorded``: answers written before paths were recorded)."""
    out: dict = {"requested": "fast" if fast else "eager", "unit": "samples"}
    reasons: dict = {}
    for m in metas:
        p = m.get("path", "unrecorded")
        out[p] = out.get(p, 0) + 1
        if p == "eager" and fast:
            r = m.get("path_reason") or "not recorded"
            reasons[r] = reasons.get(r, 0) + 1
        if m.get("new_graph"):
            out["new_graphs"] = out.get("new_graphs", 0) + 1
    if reasons:
        out["eager_reasons"] = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    return out


def add_path_summary(run_dir: Path, results: dict) -> dict:
    """Add ``paths`` (:func:`path_summary` of every answer of the run) to ``results`` and its results.json."""
    cfg = results.get("config") or {}
    uids, metas = set(), []
    for p in shard_files(Path(run_dir)):
        for r in complete_jsonl_records(p):
            m = r[EVAL_KEY]
            if m["uid"] not in uids:  # the merge checked that every question is answered exactly once
                uids.add(m["uid"])
                metas.append(m)
    results["paths"] = path_summary(metas, bool(cfg.get("fast")))
    files = results.get("files") or {}
    write_json(Path(files.get("results") or Path(run_dir) / "results.json"), results)
    return results


def print_summary(results: dict) -> None:
    """The scores, tokens, effective budget, prefill paths and pending steps of ``results``, on stdout."""
    fam = results["model"].get("family")
    budget = results["method"].get("budget")
    print(f"\n== {results['benchmark']} | {results['model']['id']}{f' ({fam})' if fam else ''} | {results['method'].get('method')}"
          f"{', no budget' if budget is None else f', budget {budget}'} ==")
    from .stats import se_number

    se = results.get("stderr") or {}
    for k, v in results["metrics"].items():
        e = se_number(se.get(k))
        e_txt = f"± {e:6.2f}" if e is not None else ("(server)" if se.get(k) == "server" else "")
        print(f"  {k:<24} {v:10.2f} {e_txt:<8}  {results['metric_labels'].get(k, '')}")
    t = results.get("tokens", {})
    if t.get("samples"):
        print(f"  visual tokens: {t['visual_candidates_mean']:.1f} candidates -> {t['tok_in']:.1f} entering the LLM "
              f"(tok-in), {t['tok_eq']:.1f} layer-averaged (tok-eq)")
    b = results.get("budget") or {}
    if b.get("unpruned_samples"):
        print(f"  budget: {b['note']}; effective budget {b['effective'] if b['effective'] is not None else 'none (unpruned)'}")
    paths = results.get("paths")
    if paths and (paths.get("requested") == "fast" or paths.get("fast")):
        n = {k: paths[k] for k in ("fast", "eager", "unrecorded") if paths.get(k)}
        line = ", ".join(f"{k} {v}" for k, v in n.items())
        if paths.get("new_graphs"):
            line += f" ({paths['new_graphs']} compiled a new graph)"
        print(f"  prefill paths (samples): {line}")
        for r, c in (paths.get("eager_reasons") or {}).items():
            print(f"    eager x{c}: {r}")
    for p in results.get("pending", []):
        print(f"  pending: {p}")
    print(f"  results: {results['files']['results']}")
