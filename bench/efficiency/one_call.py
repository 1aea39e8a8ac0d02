"""The summary of ``gpu_session.sh one-call`` (every answer of one device call in one page): each step's status and
time, the profile's table, the fast table with each row's floor and distance from it, what the later process did
with the precompiled functions (loaded them, or fell back to the regular Inductor compile on a warm cache) and its
first token from the process start, and the run benchmark's report (or why it was skipped).

    python -m bench.efficiency.one_call --dest OUT --steps OUT/one-call-steps.tsv --out OUT/one-call.md

Reads what the steps left (a step cut by its time limit leaves a partial file, a failed one its log); never fails
on a missing or partial file: it says so in the page instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from eval.provenance import short_commit

STEPS = {"profile": "1. profile: one prefill and one decode step, kernels by kind and the gaps (bench.fast_profile)",
         "table": "2. the fast table with each row's floor (bench.efficiency --fast)",
         "load": "3. a later process on the same compile cache: the precompiled functions, or Inductor's warm cache",
         "throughput": "4. the run benchmark (bench.run_throughput)"}


def _steps(path: Path) -> dict:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 4:
                out[parts[0]] = {"rc": parts[1], "s": parts[2], "limit": parts[3],
                                 "note": parts[4] if len(parts) > 4 else ""}
    return out


def _status(st: dict | None) -> str:
    if st is None:
        return "not run"
    rc = st["rc"]
    if rc == "skipped":
        return f"skipped ({st['note']})" if st["note"] else "skipped"
    if rc == "0":
        return "done"
    if rc in ("124", "137"):
        return f"**stopped at its time limit** (status {rc}): partial"
    return f"**failed** (status {rc})"


def _ms(x) -> str:
    return f"{x * 1e3:.2f}" if isinstance(x, (int, float)) else "-"


def _x(x) -> str:
    return f"{x:.2f}x" if isinstance(x, (int, float)) else "-"


def _profile(dest: Path) -> list[str]:
    p = dest / "one-call-profile.md"
    if not p.exists():
        return ["No profile written (see one-call-profile.log)."]
    lines = p.read_text().splitlines()
    table = [ln for ln in lines if ln.startswith("|")]
    notes = [ln for ln in lines if ln.startswith("**Stopped")]
    return (table or ["The profile has no rows (see one-call-profile.log)."]) + ([""] + notes if notes else [])


def _report(folder: Path) -> tuple[dict | None, str]:
    """(efficiency.json, a note): the report, or the cells a stopped run left."""
    p = folder / "efficiency.json"
    if p.exists():
        try:
            return json.loads(p.read_text()), ""
        except json.JSONDecodeError as e:
            return None, f"efficiency.json unreadable ({e})"
    cells = folder / "cells.jsonl"
    if cells.exists():
        n = sum(1 for ln in cells.read_text().splitlines() if '"result"' in ln)
        return None, f"no report; {n} cell(s) finished in cells.jsonl"
    return None, "no output"


def _table(dest: Path) -> list[str]:
    rep, note = _report(dest / "one-call-table")
    if rep is None:
        return [f"Fast table: {note} (see one-call-table.log)."]
    fast = rep.get("fast") or {}
    out = []
    if not rep.get("complete", True):
        out += ["**The run stopped before its last cell**: the rows below are those it finished.", ""]
    hw = rep.get("hardware")
    if hw:
        from bench.efficiency.hardware import describe

        out += [f"Device limits {describe(hw)}.", ""]
    out += ["| Method | Budget | Eager TTFT (ms) | Fast TTFT (ms) | Floor TTFT (ms) | Fast TTFT / floor | Eager TPOT (ms) "
            "| Fast TPOT (ms) | Floor TPOT (ms) | Fast TPOT / floor | Path taken | Warm-up (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in fast.get("comparison") or []:
        if c.get("batch") != 1:
            continue
        w = c.get("fast_warmup_s")
        out.append(f"| {c['label']} | {c['budget'] if c['budget'] is not None else '-'} | "
                   f"{_ms(c.get('eager_ttft_median'))} | {_ms(c.get('fast_ttft_median'))} | {_ms(c.get('floor_ttft_s'))} "
                   f"| {_x(c.get('fast_ttft_over_floor'))} | {_ms(c.get('eager_tpot_median'))} | "
                   f"{_ms(c.get('fast_tpot_median'))} | {_ms(c.get('floor_tpot_s'))} | {_x(c.get('fast_tpot_over_floor'))} "
                   f"| {c.get('fast_path_taken')} | {f'{w:.1f}' if isinstance(w, (int, float)) else '-'} |")
    if rep.get("errors"):
        out += ["", "Cells that failed: " + "; ".join(f"{e['method']} ({e['path']}): {e['error']}" for e in rep["errors"])]
    out += ["", "The whole report (the eager table, the bars, the floors' terms): one-call-table/efficiency.md."]
    return out


def _load(dest: Path) -> list[str]:
    rep, note = _report(dest / "one-call-load")
    log = dest / "one-call-load.log"
    warnings = []
    if log.exists():
        warnings = sorted({ln.strip() for ln in log.read_text(errors="replace").splitlines()
                           if "fast_precompile" in ln or ("precompile" in ln.lower() and "warn" in ln.lower())})
    if rep is None:
        return [f"Later process: {note} (see one-call-load.log)."] + [f"- log: `{w[:300]}`" for w in warnings[:5]]
    fast = rep.get("fast") or {}
    rows = fast.get("results") or []
    pre = [(r["method"], (r.get("fast") or {}).get("precompile")) for r in rows]
    loaded = sum(p["loaded"] for _, p in pre if p)
    compiled = sum(p["compiled"] for _, p in pre if p)
    if not fast.get("precompile_requested"):
        verdict = ("precompiled functions were turned off (fast_precompile=False or VTPRUNE_FAST_PRECOMPILE=0): this "
                   "process compiled on the compile cache the earlier steps filled")
    elif not any(p for _, p in pre):
        verdict = ("**the precompiled functions were not used**: this torch fell back to the regular Inductor compile, "
                   "so the warm-up column is Inductor's warm cache (a new process: dynamo traces again, Inductor's "
                   "generated code comes from the cache)")
    elif loaded and not compiled:
        verdict = f"**the precompiled functions loaded** ({loaded} functions, none compiled): nothing was traced"
    else:
        verdict = (f"precompiled functions: {loaded} loaded, {compiled} compiled and saved here (a key the earlier "
                   "steps did not write)")
    proc = rep.get("process") or fast.get("process") or {}
    out = [f"Verdict: {verdict}.", ""]
    if proc.get("loaded_s") is not None:
        out += [f"Model loaded {proc['loaded_s']:.1f} s after the process start.", ""]
    out += ["| Method | Budget | Warm-up (s): compile / load | First prefill (s) | First fast-path token from the process "
            "start (s) | Fast TTFT (ms) | Fast TPOT (ms) | Precompiled: loaded / compiled |", "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: f"{v:.1f}" if isinstance(v, (int, float)) else "-"  # noqa: E731
    for r in rows:
        p = (r.get("fast") or {}).get("precompile")
        pc = f"{p['loaded']} / {p['compiled']}" if p else "not precompiled"
        out.append(f"| {r['method']} | {r['budget'] if r['budget'] is not None else '-'} | {fmt(r.get('warmup_s'))} | "
                   f"{fmt(r.get('first_prefill_s'))} | {fmt(r.get('first_token_process_s'))} | "
                   f"{_ms((r.get('ttft') or {}).get('median'))} | {_ms((r.get('tpot') or {}).get('median'))} | {pc} |")
    if warnings:
        out += ["", "Its log on precompiling:"] + [f"- `{w[:300]}`" for w in warnings[:5]]
    return out


def _throughput(dest: Path, st: dict | None) -> list[str]:
    if st is not None and st["rc"] == "skipped":
        return [f"Skipped: {st['note']}."]
    p = dest / "one-call-throughput" / "run_throughput.md"
    if p.exists():
        lines = p.read_text().splitlines()
        return lines[:60] + (["", f"(... {len(lines) - 60} more lines in one-call-throughput/run_throughput.md)"]
                             if len(lines) > 60 else [])
    return ["No run_throughput.md (see one-call-throughput.log)."]


def summary(dest: Path, steps: dict, limit: str = "", dry: bool = False, device: str = "") -> str:
    out = [f"# gpu_session.sh one-call{' (DRYRUN: tiny models on a CPU)' if dry else ''}", "",
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; device {device or 'unknown'}; code {short_commit()}; "
           f"LIMIT {limit} s, each step stopped at its share (a step that ends early leaves its time to the next).", "",
           "| Step | Status | Seconds (its limit) |", "|---|---|---|"]
    for name, what in STEPS.items():
        st = steps.get(name)
        out.append(f"| {what} | {_status(st)} | {st['s'] if st else '-'} ({st['limit'] if st else '-'}) |")
    sections = (("profile", "## 1. Profile (bench.fast_profile)", _profile),
                ("table", "## 2. The fast table and its floors (bench.efficiency --fast)", _table),
                ("load", "## 3. A later process: precompiled functions or Inductor's warm cache", _load))
    for name, title, fn in sections:
        try:
            body = fn(dest)
        except Exception as e:  # noqa: BLE001 - the page must be written whatever a step left
            body = [f"Could not read this step's output: {type(e).__name__}: {e}"]
        out += ["", title, "", *body]
    try:
        body = _throughput(dest, steps.get("throughput"))
    except Exception as e:  # noqa: BLE001
        body = [f"Could not read this step's output: {type(e).__name__}: {e}"]
    out += ["", "## 4. The run benchmark (bench.run_throughput)", "", *body]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.efficiency.one_call", description=__doc__)
    ap.add_argument("--dest", required=True, help="the part's folder (the steps' outputs)")
    ap.add_argument("--steps", required=True, help="the steps' status file (name, status, seconds, limit, note)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", default="")
    ap.add_argument("--device", default="")
    ap.add_argument("--dry", action="store_true")
    a = ap.parse_args(argv)
    text = summary(Path(a.dest), _steps(Path(a.steps)), a.limit, a.dry, a.device)
    Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
