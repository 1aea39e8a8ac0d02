"""Resume per question: a changed data file costs only the answers it touches.

A run folder's answers each carry the hash of their question (``_eval.qhash``) and of every input file
they read (``_eval.inputs``, :class:`eval.fingerprint.InputHasher`). When the same command runs again:

- an answer whose question and inputs are unchanged is **kept**;
- an answer whose question text / fields or any input's bytes changed is **recomputed**: the old record
  is moved to ``<run>/superseded/answers-<time>.jsonl`` (with the reason), never deleted;
- an answer to a question no longer in the question list is **dropped** from the score (left in its
  shard file, reused if the question comes back unchanged);
- a question without an answer is **new**.

One line says how many of each. Run-wide changes (model, method, options, budget, dtype, template, fast
path) are refused before any of this (``eval.runner``). The merge (``eval.results.merge``) applies the same
per-answer check, so ``eval score`` scores an answer only against the question and inputs it was made for.

Answers written before input hashes (no ``_eval.inputs``) are checked against their question as before;
their inputs count as unchanged while the run-level image / video set is (else they are recomputed: which
of them changed cannot be told).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .fingerprint import InputHasher, changed_inputs, data_changes, question_hash, record_matches_question
from .io import complete_jsonl_records
from .shards import EVAL_KEY

log = logging.getLogger("eval")

#: where recomputed answers' old records go (inside the run folder)
SUPERSEDED = "superseded"
#: the run folder's input-hash cache (rank 0 appends the hashes it computes to check answers)
HASH_CACHE = "input_hashes.jsonl"
QUESTION = "question"


def answer_mismatch(rec: dict, q, root, hasher: InputHasher | None, legacy_inputs_ok: bool = True) -> str | None:
    """Why answer record ``rec`` was not made for question ``q`` as it is now (None: it was): ``"question"``
    (its id, text, prompt, input paths or fields differ), ``"input <path>"`` (that input's bytes differ or it
    is gone), or ``"inputs"`` (an answer without input hashes while the image / video set changed)."""
    m = rec[EVAL_KEY]
    h = m.get("qhash")
    if (h is not None and h != question_hash(q, root)) or (h is None and not record_matches_question(rec, q)):
        return QUESTION
    recorded = m.get("inputs")
    if recorded is None:
        return None if legacy_inputs_ok or q.modality == "text" else "inputs"
    if hasher is None:
        return None
    changed = changed_inputs(recorded, hasher.inputs(q, persist=True))
    return f"input {changed[0]}" if changed else None


@dataclass
class Stale:
    shard: Path
    line: int  # index among the shard's complete records
    uid: str
    reason: str


@dataclass
class ResumePlan:
    questions: int
    kept: int = 0
    stale: list[Stale] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # uids answered whose question is gone
    data_notes: list[str] = field(default_factory=list)  # what the run-level data fingerprint says changed

    @property
    def recomputed(self) -> int:
        return len({s.uid for s in self.stale})

    @property
    def new(self) -> int:
        return self.questions - self.kept - self.recomputed

    def as_dict(self) -> dict:
        reasons: dict[str, int] = {}
        for s in self.stale:
            reasons[s.reason] = reasons.get(s.reason, 0) + 1
        return {"kept": self.kept, "recomputed": self.recomputed, "dropped": len(set(self.dropped)), "new": self.new,
                "recompute_reasons": reasons, "dropped_uids": sorted(set(self.dropped))[:20],
                "data_changes": self.data_notes}

    def summary(self) -> str:
        parts = [f"{self.kept} answers kept", f"{self.recomputed} recomputed"]
        inputs = sorted({s.reason[len("input "):] for s in self.stale if s.reason.startswith("input ")})
        why = []
        if inputs:
            more = f" and {len(inputs) - 3} more" if len(inputs) > 3 else ""
            why.append(f"{len(inputs)} input(s) changed: {', '.join(inputs[:3])}{more}")
        nq = len({s.uid for s in self.stale if s.reason == QUESTION})
        if nq:
            why.append(f"{nq} question(s) changed")
        legacy = len({s.uid for s in self.stale if s.reason == "inputs"})
        if legacy:
            why.append(f"{legacy} answer(s) written before input hashes, the image / video set changed")
        if why:
            parts[-1] += f" ({'; '.join(why)})"
        dropped = sorted(set(self.dropped))
        parts.append(f"{len(dropped)} dropped" + (f" (no longer in the question list, e.g. {dropped[:3]})" if dropped else ""))
        parts.append(f"{self.new} new")
        return "resume: " + ", ".join(parts)


def plan_resume(run_dir: Path, shard_paths: list[Path], questions, root, hasher: InputHasher,
                prev_fp: dict | None, data_fp: dict | None) -> ResumePlan:
    """Check every answer in ``shard_paths`` against the questions as they are now (rank 0, before anything is
    written). ``prev_fp`` / ``data_fp``: the recorded and the current run-level fingerprints (the data notes,
    and whether answers without input hashes can be kept)."""
    plan = ResumePlan(questions=len(questions))
    old_data = (prev_fp or {}).get("data") or {}
    if prev_fp is not None and data_fp is not None:
        plan.data_notes = data_changes(old_data, data_fp)
    legacy_ok = prev_fp is None or data_fp is None or old_data.get("inputs") == data_fp.get("inputs")
    by_uid = {q.uid: q for q in questions}
    records = [(p, i, r) for p in shard_paths for i, r in enumerate(complete_jsonl_records(p))]
    for _, _, r in records:
        hasher.seed(r[EVAL_KEY].get("inputs"))
    kept: set[str] = set()
    for p, i, r in records:
        uid = r[EVAL_KEY]["uid"]
        q = by_uid.get(uid)
        if q is None:
            plan.dropped.append(uid)
            continue
        why = answer_mismatch(r, q, root, hasher, legacy_ok)
        if why is None:
            kept.add(uid)
        else:
            plan.stale.append(Stale(p, i, uid, why))
    plan.kept = len(kept)
    return plan


def _fsync_write(path: Path, lines: list[str], mode: str) -> None:
    with open(path, mode, encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())


def set_aside(run_dir: Path, plan: ResumePlan) -> Path | None:
    """Move the stale answers out of the shard files into ``superseded/answers-<time>.jsonl`` (each with
    ``_eval.superseded = {reason, at}``). Kill-safe: the copy aside is written and synced before each shard
    file is atomically replaced by its kept records (a kill in between leaves a record in both places; the
    next resume finds it stale again). Returns the file written, or None when nothing was stale."""
    if not plan.stale:
        return None
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    aside = Path(run_dir) / SUPERSEDED / f"answers-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    aside.parent.mkdir(parents=True, exist_ok=True)
    by_shard: dict[Path, dict[int, str]] = {}
    for s in plan.stale:
        by_shard.setdefault(s.shard, {})[s.line] = s.reason
    moved = []
    for shard, lines in by_shard.items():
        for i, r in enumerate(complete_jsonl_records(shard)):
            if i in lines:
                r[EVAL_KEY]["superseded"] = {"reason": lines[i], "at": now}
                moved.append(json.dumps(r, ensure_ascii=False) + "\n")
    _fsync_write(aside, moved, "a")
    for shard, lines in by_shard.items():
        keep = [json.dumps(r, ensure_ascii=False) + "\n" for i, r in enumerate(complete_jsonl_records(shard)) if i not in lines]
        tmp = shard.with_name(f".{shard.name}.tmp{os.getpid()}")
        _fsync_write(tmp, keep, "w")
        os.replace(tmp, shard)
    return aside
