"""Merge the shard files, run the official conversion + scoring, and write ``results.json``.

Everything here depends only on the run directory (``run_config.json`` + ``answers/``) and the
data folder, so ``python -m eval score RUN_DIR`` reproduces what the run itself wrote."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

from . import stats as st
from .benchmarks import get_benchmark
from .io import complete_jsonl_records, read_json, write_json, write_jsonl
from .shards import EVAL_KEY, shard_files
from .throughput import summary as throughput_summary

log = logging.getLogger(__name__)

SCHEMA = "vtprune.eval.results/1"


class MergeError(RuntimeError):
    pass


def merge(run_dir: Path, questions, root=None, hasher=None, report: dict | None = None) -> tuple[list[dict], list[dict]]:
    """Collect the answer records of every shard file, check that every question is answered
    exactly once and that every answer belongs to its question as it is now (``_eval.qhash`` against the
    question's hash; ``root``: the data root the image paths are relative to) and to its inputs
    (``_eval.inputs`` against the files' content hashes, with ``hasher``: an
    :class:`eval.fingerprint.InputHasher`), write ``merge.jsonl`` (LLaVA's records, question-file order) and
    return (official records, per-record bookkeeping) in that order. Answers to questions no longer in the
    list are left out of the score (``report["left_out"]`` says how many)."""
    from .resume import answer_mismatch

    run_dir = Path(run_dir)
    by_uid: dict[str, list[tuple[str, dict]]] = {}
    for p in shard_files(run_dir):
        for r in complete_jsonl_records(p):
            by_uid.setdefault(r[EVAL_KEY]["uid"], []).append((p.name, r))
            if hasher is not None:
                hasher.seed(r[EVAL_KEY].get("inputs"))
    expected = {q.uid: q for q in questions}
    dup = {u: [f for f, _ in v] for u, v in by_uid.items() if len(v) > 1 and u in expected}
    unknown = sorted(set(by_uid) - set(expected))
    missing = [q.uid for q in questions if q.uid not in by_uid]
    problems = []
    if dup:
        problems.append(f"{len(dup)} question(s) answered more than once, e.g. {dict(list(dup.items())[:3])}")
    if unknown:
        note = (f"{len(unknown)} answer(s) to questions no longer in the question list left out of the score, "
                f"e.g. {unknown[:3]}")
        log.warning("merge of %s: %s", run_dir, note)
        if report is not None:
            report["left_out"] = {"answers": len(unknown), "uids": unknown[:20], "note": note}
    if missing:
        problems.append(f"{len(missing)} of {len(questions)} question(s) have no answer, e.g. {missing[:3]} "
                        "(resume the run with the same command to answer them)")
    if problems:
        raise MergeError(f"merge of {run_dir}: " + "; ".join(problems))
    for q in questions:  # each answer belongs to its question and inputs (answers before the hashes: its text)
        name, r = by_uid[q.uid][0]
        why = answer_mismatch(r, q, root, hasher)
        if why is not None:
            what = "another version of the question" if why == "question" else f"another version of its {why}"
            raise MergeError(f"{run_dir / 'answers' / name}: the answer to question {q.uid} was made for {what}: the "
                             "data changed since it was answered; run the same `eval run` command again (it recomputes "
                             "the answers whose question or inputs changed and keeps the others)")
    ordered = [by_uid[q.uid][0][1] for q in questions]
    official = [{k: v for k, v in r.items() if k != EVAL_KEY} for r in ordered]
    metas = [r[EVAL_KEY] for r in ordered]
    write_jsonl(run_dir / "merge.jsonl", official)
    return official, metas


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def token_summary(metas: list[dict], llm_layers: list[int]) -> dict:
    vis = [m for m in metas if "visual_entering_llm" in m]
    out: dict[str, Any] = {"samples": len(vis), "samples_total": len(metas)}
    if not vis:
        return out
    out["visual_candidates_mean"] = _mean([m["visual_candidates"] for m in vis])
    out["tok_in"] = _mean([m["visual_entering_llm"] for m in vis])  # tokens entering the LLM
    out["tok_eq"] = _mean([m["visual_layer_avg"] for m in vis])  # layer-averaged ("equivalent") tokens
    costed = [m for m in vis if "prefill_tflops" in m]  # the analytic cost (llava.cost.sample_cost)
    if costed:
        out["prefill_tflops"] = _mean([m["prefill_tflops"] for m in costed])
        out["kv_mb"] = _mean([m["kv_mb"] for m in costed])
    per_layer = [m["visual_per_layer"] for m in vis]
    if len({len(p) for p in per_layer}) == 1:
        out["per_layer_mean"] = [sum(col) / len(col) for col in zip(*per_layer)]
        if llm_layers:
            k = llm_layers[0]
            out["tok_after_k"] = {"layer": k, "mean": out["per_layer_mean"][k]}
    out["labels"] = {"tok_in": "visual tokens entering the LLM (mean per sample)",
                     "tok_eq": "visual tokens averaged over decoder layers (mean per sample)",
                     "tok_after_k": "visual tokens in the input of the first pruning layer K",
                     "prefill_tflops": "LLM prefill TFLOPs, analytic: 2 x MACs, convention A (mean per sample)",
                     "kv_mb": "KV-cache MiB the prompt leaves, analytic, in the model's dtype (mean per sample)"}
    return out


def budget_summary(metas: list[dict], method: str, budget) -> dict | None:
    """The budget actually applied: a budget at or above a sample's visual tokens prunes nothing
    there (the engine's ``vision_noop``; for LLM-stage methods every layer kept every token).
    ``effective``: the requested budget, or None (= unpruned, as ``--budget none``) when no sample
    was pruned."""
    vis = [m for m in metas if "visual_entering_llm" in m]
    if budget is None or str(method).lower() == "none" or not vis:
        return None
    # an LLM-stage method (FastV, PDrop, ...) has no vision stage, so vision_noop is always set there:
    # a sample is unpruned only when every decoder layer also kept every visual token
    unpruned = sum(1 for m in vis if (m.get("vision_noop") or m["visual_entering_llm"] >= m["visual_candidates"])
                   and m["visual_layer_avg"] >= m["visual_candidates"])
    out = {"requested": budget, "effective": None if unpruned == len(vis) else budget,
           "unpruned_samples": unpruned, "samples": len(vis)}
    if unpruned:
        out["note"] = (f"budget {budget} >= the visual tokens of {unpruned} of {len(vis)} samples "
                       f"(mean {_mean([m['visual_candidates'] for m in vis]):.1f}): nothing pruned there")
    return out


def timing_summary(metas: list[dict], wall_s: float | None) -> dict:
    keys = sorted({k for m in metas for k in m.get("time", {})})
    out: dict[str, Any] = {f"{k}_s_mean": _mean([m["time"].get(k) for m in metas]) for k in keys}
    total = sum(m["time"].get("generate", 0.0) for m in metas)
    out["generate_s_total"] = total
    out["samples_per_s"] = len(metas) / total if total > 0 else None
    out["new_tokens_mean"] = _mean([m.get("new_tokens") for m in metas])
    out["batch_sizes"] = sorted({m.get("batch") for m in metas})
    out["ranks"] = sorted({m.get("rank") for m in metas})
    if wall_s is not None:
        out["wall_s_last_session"] = wall_s
    out["note"] = "per-sample times are each batch's time divided by its size; prefill parts from engine.stats.timings"
    return out


def score_run(run_dir, data_root: str | None = None, wall_s: float | None = None, wandb=None, judge_cfg=None,
              strict: bool | None = None) -> dict:
    """Merge a run's shards, score them by the benchmark's official conversion (and the judge where it needs one),
    write ``results.json`` and return it. ``strict`` (default: not a ``--limit`` run): every question answered."""
    from .fingerprint import InputHasher
    from .resume import HASH_CACHE

    run_dir = Path(run_dir)
    meta = read_json(run_dir / "run_config.json")
    cfg = meta["config"]
    resolved = meta.get("resolved", {})
    data_root = data_root or cfg["data_root"]
    bench = get_benchmark(cfg["benchmark"], data_root, **cfg.get("bench_options", {}))
    questions = bench.load()
    if cfg.get("limit") is not None:
        questions = questions[: cfg["limit"]]
    merge_report: dict = {}
    official, metas = merge(run_dir, questions, root=bench.root, hasher=InputHasher(bench.root, run_dir / HASH_CACHE),
                            report=merge_report)
    partial = cfg.get("limit") is not None
    strict = not partial if strict is None else strict
    prev_path = run_dir / "results.json"
    prev = read_json(prev_path) if prev_path.exists() else {}
    sc = _scores(bench, official, run_dir, strict, judge_cfg, prev)
    deviations = _deviations(cfg, resolved, bench, partial)
    unc = _uncertainty(bench, sc, run_dir, prev)
    res = {
        "schema": SCHEMA,
        "benchmark": bench.name,
        "title": bench.title,
        "metrics": sc["metrics"],
        "stderr": unc["stderr"],
        "stderr_method": unc["stderr_method"],
        "metric_labels": {k: sc["labels"].get(k, k) for k in sc["metrics"]}
        | {k: v for k, v in sc["labels"].items() if k not in sc["metrics"]},
        "primary_metric": bench.primary_metric(),
        "partial": partial,
        "protocol": {"evaluator": bench.protocol, "follows_protocol": not deviations, "deviations": deviations},
        "pending": sc["pending"],
        "counts": {"questions": len(questions), "answered": len(official),
                   **({"left_out": merge_report["left_out"]} if "left_out" in merge_report else {})},
        "questions": (meta.get("fingerprint") or {}).get("data", {}).get("questions"),
        "units": unc["units"],
        "resumes": meta.get("resumes", []),
        "model": resolved.get("model", {"id": cfg["model"]}),
        "method": resolved.get("method_config", {"method": cfg["method"], "budget": cfg.get("budget"), **cfg.get("options", {})}),
        "method_llm_layers": resolved.get("llm_layers"),
        "config": cfg,
        "generation": resolved.get("generation"),
        "benchmark_config": resolved.get("benchmark", bench.config()),
        "tokens": token_summary(metas, resolved.get("llm_layers") or []),
        "budget": budget_summary(metas, cfg.get("method"), cfg.get("budget")),
        "timing": timing_summary(metas, wall_s),
        "throughput": throughput_summary(run_dir),
        "world_size": resolved.get("world_size"),
        "launcher": resolved.get("launcher"),
        "git": resolved.get("git"),
        "env": resolved.get("env"),
        "judge": sc["judge"],
        "metric_sources": prev.get("metric_sources", {}),
        "details": sc["details"],
        "files": {"merge": str(run_dir / "merge.jsonl"), **sc["files"], "results": str(run_dir / "results.json")},
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if wandb is not None:
        res["wandb"] = wandb.info()
        log_to_wandb(wandb, res, run_dir, metas, official)
        res["wandb"] = wandb.info()
    elif prev.get("wandb"):
        res["wandb"] = prev["wandb"]
    write_json(run_dir / "results.json", res)
    return res


def _scores(bench, official: list[dict], run_dir: Path, strict: bool, judge_cfg, prev: dict) -> dict:
    """The metrics of the merged answers: the benchmark's official conversion, the judge's grades (run now, or
    kept from the previous results.json), server scores recorded earlier with ``eval record``; with their labels,
    details, files and what is still pending."""
    fin = bench.finalize(official, run_dir, ckpt=run_dir.name, strict=strict)
    units = fin.get("units")
    metrics = dict(fin.get("metrics", {}))
    details = {"finalize": fin.get("details", {})}
    pending = list(fin.get("pending", []))
    labels = bench.metric_labels()
    judge_info = None
    if bench.needs_judge:
        if judge_cfg is not None:
            from .judge import run_judge

            jr = run_judge(bench, official, run_dir, judge_cfg, strict=strict)
            judge_info = jr["judge"]
            units = jr.get("units")
            metrics.update(jr["metrics"])
            details["judge"] = jr.get("details", {})
        elif prev.get("judge"):
            judge_info = prev["judge"]
            metrics.update({k: v for k, v in prev.get("metrics", {}).items() if k in labels})
            details["judge"] = prev.get("details", {}).get("judge", {})
            units = _judged_units(bench, official, run_dir, judge_info, strict)
        if judge_info is not None:
            pending = [p for p in pending if "judge" not in p]
            tag = f"judge={judge_info['model']}, {judge_info['date']}"
            labels = {k: f"{v} [{tag}]" for k, v in labels.items()}
            if judge_info.get("failures"):
                pending.append(f"judge: {judge_info['failures']} item(s) failed; rerun `python -m eval judge {run_dir}`")
    # server scores recorded earlier with `eval record` survive a re-score
    for k in prev.get("metric_sources", {}):
        if k in prev.get("metrics", {}):
            metrics[k] = prev["metrics"][k]
            pending = [p for p in pending if not p.startswith(f"{k}:")]
    return {"metrics": metrics, "details": details, "pending": pending, "labels": labels, "judge": judge_info,
            "files": fin.get("files", {}), "units": units}


def _judged_units(bench, official: list[dict], run_dir: Path, judge_info: dict, strict: bool):
    """The per-unit grades of a judge that ran before, from its cache in the run folder (eval.judge keeps every
    item's reply); None where the cache is gone."""
    from .judge import _safe_name

    cache = run_dir / "judge" / _safe_name(str(judge_info.get("model", "")))
    if not cache.is_dir():
        return None
    items = bench.judge_items(official)
    results = {}
    for k in items:
        p = cache / f"{_safe_name(k)}.json"
        if p.exists():
            results[k] = read_json(p)["result"]
    grades = {k: v["score"] for k, v in results.items()} if bench.name == "mmvet" else results
    return bench.judged_metrics(grades, strict=strict and len(results) == len(items)).get("units")


def _uncertainty(bench, sc: dict, run_dir: Path, prev: dict) -> dict:
    """Write the per-unit scores (``units.jsonl``) and return results.json's ``stderr`` (metric -> its standard
    error, or "server" for a number recorded from an evaluation server), ``stderr_method`` (how, in words) and
    ``units`` (the file, what a unit is, how many, their ids' fingerprint). A benchmark scored by a server or
    not yet judged has no units: the file is removed so that no stale one stands beside the results."""
    path = run_dir / st.UNITS_FILE
    server = [k for k in prev.get("metric_sources", {}) if k in sc["metrics"]]
    rows = sc.get("units")
    if rows is None:
        if path.exists():
            path.unlink()
        out = st.summarize(None, {}, sc["metrics"], server=server)
        return {**out, "units": None}
    units = st.Units.from_rows(bench.unit, rows, bench.difficulty)
    st.write_units(run_dir, units, bench.name)
    out = st.summarize(units, bench.stats, sc["metrics"], server=server)
    return {**out, "units": {"file": st.UNITS_FILE, "unit": bench.unit, "count": len(units),
                             "fingerprint": units.fingerprint(), "difficulty": list(units.difficulty)}}


def _deviations(cfg: dict, resolved: dict, bench, partial: bool) -> list[str]:
    """Where the run departs from the benchmark's LLaVA protocol, in words (an empty list: it follows it)."""
    deviations = []
    gen = resolved.get("generation") or {}
    if gen.get("max_new_tokens") not in (None, bench.max_new_tokens):
        deviations.append(f"max_new_tokens={gen.get('max_new_tokens')} (protocol: {bench.max_new_tokens})")
    if (gen.get("batch_size") or 1) != 1:
        deviations.append(f"batch_size={gen.get('batch_size')} (protocol: 1)")
    if not cfg.get("pad_to_square", True):
        deviations.append("image preprocessing: centre crop (protocol: pad to square)")
    px = {k: cfg[k] for k in ("min_pixels", "max_pixels") if cfg.get(k) is not None}
    if px:  # Qwen2.5-VL: another image-area range changes every image's token count
        deviations.append("image resolution " + ", ".join(f"{k}={v}" for k, v in px.items()) + " (protocol: the checkpoint's)")
    if cfg.get("template"):
        deviations.append(f"template override {cfg['template']}")
    if partial:
        deviations.append(f"limit={cfg.get('limit')} (partial run)")
    return deviations


def log_to_wandb(wb, res: dict, run_dir: Path, metas: list[dict], official: list[dict], n_rows: int | None = None) -> None:
    if wb is None or not wb.active:
        return
    cfg = res["config"]
    n_rows = n_rows if n_rows is not None else int(cfg.get("table_samples", 32))
    wb.config_update({"results": {k: res[k] for k in ("benchmark", "model", "method", "generation", "git") if k in res}})
    summary = {f"metrics/{k}": v for k, v in res["metrics"].items()}
    summary.update({f"stderr/{k}": se for k, v in (res.get("stderr") or {}).items() if (se := st.se_number(v)) is not None})
    t = res["tokens"]
    for k in ("tok_in", "tok_eq", "visual_candidates_mean"):
        if t.get(k) is not None:
            summary[f"tokens/{k}"] = t[k]
    for k in ("prefill_tflops", "kv_mb"):
        if t.get(k) is not None:
            summary[f"cost/{k}"] = t[k]
    for k in ("generate_s_mean", "prefill_total_s_mean", "vision_s_mean", "selection_s_mean", "llm_s_mean", "samples_per_s"):
        if res["timing"].get(k) is not None:
            summary[f"time/{k}"] = res["timing"][k]
    summary["counts/answered"] = res["counts"]["answered"]
    wb.log(summary)
    wb.summary(summary)
    # sample table: overlays first, then the first answers in question order
    idx = [i for i, m in enumerate(metas) if m.get("overlay")]
    idx += [i for i in range(len(metas)) if i not in idx]
    rows = []
    for i in idx[:n_rows]:
        m, r = metas[i], official[i]
        pred = r.get("text", r.get("pred"))
        prompt = r.get("prompt", r.get("question"))
        ov = str(run_dir / m["overlay"]) if m.get("overlay") else None
        rows.append([m["uid"], prompt, pred, r.get("answer"), m.get("visual_entering_llm"), m.get("visual_layer_avg"), ov])
    if rows:
        wb.table("samples", ["uid", "prompt", "prediction", "reference", "tok_in", "tok_eq", "kept_tokens"], rows,
                 image_columns=("kept_tokens",))


def record_metric(results_path, name: str, value: float, source: str | None = None) -> dict:
    """Add a number obtained elsewhere (an evaluation server) to a results file."""
    path = Path(results_path)
    if path.is_dir():
        path = path / "results.json"
    res = read_json(path)
    res["metrics"][name] = float(value)
    res.setdefault("metric_sources", {})[name] = {"source": source or "recorded by hand",
                                                   "date": datetime.date.today().isoformat()}
    res["pending"] = [p for p in res.get("pending", []) if not p.startswith(f"{name}:")]
    res.setdefault("metric_labels", {}).setdefault(name, name)
    res.setdefault("stderr", {})[name] = "server"  # no per-question truth here (eval.stats)
    res.setdefault("stderr_method", {})[name] = "scored by the benchmark's server: no per-question truth here"
    write_json(path, res)
    return res
