"""Where a run's time went: each answering process's loop ledger and results.json's ``throughput`` block.

Every writing process of ``eval run`` appends one line per batch to ``<run>/timing/{groups}_{rank}.jsonl`` (not
fsynced: a lost timing line never loses an answer) with the batch's seconds, split the way the loop spends them:

- ``host_wait``: from the loop asking for the batch's inputs to the start of generate, the device idle meanwhile
  (the inputs not prepared yet, their copy to the device);
- ``generate``: ``model.generate`` with the device synchronised before and after (the device busy, up to the host's
  share of generate itself);
- ``post``: the answers decoded and their records made;
- ``write``: the records appended to the shard file, flushed and fsynced (an answer record cannot hold its own
  write time: it is here only);
- ``prepare``: the host work of the batch's inputs (hashes, image / video decode, processor): in a loader worker,
  hidden behind the device unless ``host_wait`` shows it, or in the loop (``--loader-workers 0``, then inside
  ``host_wait``);
- ``new_graph``: the fast path compiled or captured a graph in this batch (its generate time is compile time).

The loop's time is host_wait + generate + post + write over its batches. :func:`summary` adds the ledgers of every
session and process of a run folder up.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

#: the run folder's ledgers (one file per writing process)
TIMING_DIR = "timing"
#: the loop's parts, in the order a batch spends them
PARTS = ("host_wait", "generate", "post", "write")


class Ledger:
    """One writing process's loop ledger for this session (appended per batch, closed at the end)."""

    def __init__(self, run_dir: Path, info, workers: int):
        d = Path(run_dir) / TIMING_DIR
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / f"{info.dp}_{info.dp_rank}.jsonl"
        self.session = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.head = {"session": self.session, "rank": info.rank, "processes": info.dp, "loader_workers": workers}
        self._f = open(self.path, "a", encoding="utf-8")

    def add(self, batch: list, times: dict, new_graph: bool = False) -> None:
        rec = {**self.head, "n": len(batch), "first": batch[0].uid,
               **{k: round(float(times.get(k, 0.0)), 6) for k in (*PARTS, "prepare")}}
        if new_graph:
            rec["new_graph"] = True
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def ledger_lines(run_dir) -> list[dict]:
    """Every complete ledger line of the run folder (a torn last line is left out)."""
    from .io import complete_jsonl_records

    d = Path(run_dir) / TIMING_DIR
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("*.jsonl")):
        out.extend(complete_jsonl_records(p))
    return out


def _rates(lines: list[dict], processes: int) -> dict:
    """The sums of some ledger lines and the rates they give (``processes`` answering side by side)."""
    n = sum(r["n"] for r in lines)
    s = {k: sum(r.get(k, 0.0) for r in lines) for k in (*PARTS, "prepare")}
    loop = sum(s[k] for k in PARTS)
    compile_s = sum(r["generate"] for r in lines if r.get("new_graph"))
    n_compile = sum(r["n"] for r in lines if r.get("new_graph"))
    per = n / loop if loop > 0 else None
    rest = loop - compile_s
    return {
        "questions": n, "batches": len(lines), "loop_s": round(loop, 3),
        **{f"{k}_s": round(v, 3) for k, v in s.items()},
        "compile_s": round(compile_s, 3), "compile_batches": sum(1 for r in lines if r.get("new_graph")),
        "questions_per_s": None if per is None else round(per * processes, 3),
        "questions_per_s_per_process": None if per is None else round(per, 3),
        "questions_per_s_without_compile": (round((n - n_compile) / rest * processes, 3)
                                            if rest > 0 and n > n_compile else None),
        "host_wait_fraction": round(s["host_wait"] / loop, 4) if loop > 0 else None,
        "device_busy_fraction": round(s["generate"] / loop, 4) if loop > 0 else None,
        "prepare_s_per_question": round(s["prepare"] / n, 5) if n else None,
        "host_wait_s_per_question": round(s["host_wait"] / n, 5) if n else None,
    }


def summary(run_dir) -> dict | None:
    """results.json's ``throughput``: the whole run's loop time by part and its rates, and each session's
    (None for a folder without ledgers, e.g. answered by vLLM or before the ledgers existed)."""
    lines = ledger_lines(run_dir)
    if not lines:
        return None
    sessions: dict[str, list] = {}
    for r in lines:
        sessions.setdefault(r["session"], []).append(r)
    per_session = []
    for sid, ls in sorted(sessions.items()):  # ids begin with their start time
        procs = max(r.get("processes", 1) for r in ls)
        per_session.append({"session": sid, "processes": procs,
                            "loader_workers": sorted({r.get("loader_workers") for r in ls}),
                            **_rates(ls, procs)})
    last = per_session[-1]["processes"]
    return {**_rates(lines, last), "processes": last,
            "loader_workers": sorted({r.get("loader_workers") for r in lines}),
            "sessions": per_session,
            "note": ("seconds summed over the answering processes' loops (each batch: host_wait + generate + post + "
                     "write; prepare is the inputs' host work, in the loader workers unless --loader-workers 0); "
                     "questions_per_s = questions / loop_s x processes (of the last session); device_busy_fraction "
                     "= generate / loop; compile: the batches in which the fast path compiled or captured a graph")}
