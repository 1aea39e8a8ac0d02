"""The run folder, as rank 0 keeps it: whether a new session may resume into it (the same configuration, the
same model, template, method and dtype; per answer, the same question and inputs: :mod:`eval.resume`), and
its ``run_config.json`` (the configuration, what it resolved to, the fingerprint, every code version that
wrote answers, one entry per resumed session). Nothing here talks to the other ranks: the runner broadcasts
the verdicts."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from .fingerprint import InputHasher, compare as fp_compare
from .io import read_json, write_json
from .resume import HASH_CACHE, SUPERSEDED, ResumePlan, plan_resume, set_aside
from .run_config import RunConfig, resume_mismatch
from .shards import answered_uids, shard_files
from .throughput import TIMING_DIR

log = logging.getLogger("eval")

CONFIG_FILE = "run_config.json"


def check_config(cfg: RunConfig, run_dir: Path, bench, questions: list,
                 data_fp: dict | None) -> tuple[bool, dict | None, ResumePlan | None]:
    """Before the model loads: may this configuration answer into ``run_dir``? Returns (ok, the folder's
    recorded run_config.json to resume from or None, the per-answer plan: which answers to keep, recompute,
    drop, or None when there is nothing to resume). A folder whose answers were made under another
    configuration is refused (one line on stderr); a folder with no answers takes any configuration."""
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.exists() or cfg.overwrite:
        return True, None, None
    prev_meta = read_json(cfg_path)
    mismatch = resume_mismatch(prev_meta.get("config", {}), cfg)
    changes = [f"{k} ({_short(a)} -> {_short(b)})" for k, (a, b) in mismatch.items()]
    has_answers = bool(answered_uids(run_dir))
    plan = None
    if has_answers and not changes:  # each answer against its question and inputs as they are now
        plan = plan_resume(run_dir, shard_files(run_dir), questions, bench.root,
                           InputHasher(bench.root, run_dir / HASH_CACHE), prev_meta.get("fingerprint"), data_fp)
        if prev_meta.get("fingerprint") is None:
            log.warning("%s has no fingerprint (written before they were recorded): its answers are checked "
                        "against their question text; the fingerprint is recorded from now on", run_dir)
    if changes and has_answers:
        _refuse(run_dir, changes)
        return False, prev_meta, plan
    if changes:  # a folder with no answers never blocks a new configuration
        log.info("%s holds no answers: its run_config.json is replaced by the new configuration", run_dir)
        prev_meta = None
    return True, prev_meta, plan


def check_fingerprint(run_dir: Path, prev_meta: dict | None, fingerprint: dict) -> bool:
    """Once the model is loaded: the run-wide parts that need it (template, weights, resolved method, dtype)
    against those the folder's answers were made under. False (refused, one line on stderr) when one changed;
    a changed code version alone is a warning."""
    if prev_meta is None or "fingerprint" not in prev_meta or not answered_uids(run_dir):
        return True
    changes, warnings = fp_compare(prev_meta["fingerprint"], fingerprint)  # run-wide parts only
    for w in warnings:
        log.warning("%s: resuming answers written under another %s (kept: only the code changed; "
                    "run_config.json lists every code version under 'code_versions')", run_dir, w)
    if changes:
        _refuse(run_dir, changes)
        return False
    return True


def write_run_folder(cfg: RunConfig, run_dir: Path, prev_meta: dict | None, resolved: dict, fingerprint: dict,
                     plan: ResumePlan | None) -> None:
    """Method, options, budget, data and model are good: the folder is written. ``--overwrite`` moves the old
    answers and results to ``<run>/superseded/overwritten-<time>/`` first (:func:`keep_overwritten`); a resumed
    session's stale answers are set aside (``<run>/superseded/``) before any rank looks for what is answered;
    ``run_config.json`` records this session."""
    cfg_path = run_dir / CONFIG_FILE
    if cfg.overwrite and run_dir.exists():
        keep_overwritten(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prev_meta = prev_meta or {}
    meta = {"config": dataclasses.asdict(cfg), "created": prev_meta.get("created") or _now()}
    meta["resolved"] = resolved
    meta["fingerprint"] = fingerprint
    versions = []  # every code version that wrote answers into this folder
    for v in list(prev_meta.get("code_versions") or []) + [(prev_meta.get("fingerprint") or {}).get("code"),
                                                           fingerprint["code"]]:
        if v and v not in versions:
            versions.append(v)
    meta["code_versions"] = versions
    meta["resumes"] = list(prev_meta.get("resumes") or [])
    if plan is not None:  # stale answers aside before any rank looks for what is answered
        aside = set_aside(run_dir, plan)
        for note in plan.data_notes:
            log.info("%s: since the last session: %s", run_dir, note)
        log.info("%s: %s%s", run_dir, plan.summary(),
                 f" (the old answers recomputed are kept in {aside.relative_to(run_dir)})" if aside else "")
        meta["resumes"].append({"at": _now(), **plan.as_dict(),
                                "superseded": str(aside.relative_to(run_dir)) if aside else None})
    write_json(cfg_path, meta)


def keep_overwritten(run_dir: Path) -> Path | None:
    """``--overwrite``: the previous session's answers, merge, results, loop ledgers and run_config.json leave the run folder for
    ``superseded/overwritten-<time>/`` (the same names inside; results.json as results.previous.json, out of
    the way of the tables, which collect every results.json), and one warning says how many answers went where;
    nothing is deleted (as a resume keeps the answers it recomputes under ``superseded/``). Returns that folder, or
    None when there was nothing to move."""
    old = [p for p in shard_files(run_dir) + [run_dir / "merge.jsonl", run_dir / "results.json", run_dir / CONFIG_FILE,
                                              run_dir / TIMING_DIR]
           if p.exists()]
    if not old:
        return None
    n = len(answered_uids(run_dir))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = run_dir / SUPERSEDED / f"overwritten-{stamp}"
    k = 1
    while dest.exists():
        k += 1
        dest = run_dir / SUPERSEDED / f"overwritten-{stamp}-{k}"
    for p in old:  # results.json renamed: `eval table runs/` and the paper reports collect every results.json
        target = dest / p.relative_to(run_dir)
        if p.name == "results.json":
            target = target.with_name("results.previous.json")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, target)
    log.warning("--overwrite: the previous %d answer%s of %s (with %s) moved to %s; delete that folder to free "
                "the space", n, "" if n == 1 else "s", run_dir,
                ", ".join(p.name for p in old if p.parent == run_dir) or "no other file", dest)
    return dest


def _short(v, n: int = 80) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= n else s[: n - 3] + "..."


def _refuse(run_dir: Path, changes: list[str]) -> None:
    print(f"error: {run_dir} holds answers of a different configuration, changed since they were written: "
          f"{'; '.join(changes)}; use another --run-name / --out, or --overwrite to start over", file=sys.stderr)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
