"""Weights & Biases logging that can never fail or hang a run.

* ``--no-wandb`` (or ``WANDB_MODE=disabled``): wandb is not even imported.
* ``WANDB_MODE`` is honoured (``online`` / ``offline`` / ``disabled``); when it is not set, the run
  is online if an API key is available (``WANDB_API_KEY`` or a ``wandb login`` netrc entry),
  offline otherwise (``wandb sync`` uploads it later).
* Every call is wrapped: an exception is logged once as a warning and the logger turns itself
  off; ``init`` and ``finish`` run in a daemon thread with a hard timeout.

What a harness run holds (``eval run``; see docs/evaluation.md, "W&B"): :func:`run_identity` (name =
``<benchmark>/<run-name>``, group = ``<benchmark>/<model>``, job_type = the budget, tags), :func:`run_config`
(model, method + budget + every option, benchmark, n, commit, run name), :func:`log_results` (every score
under ``metrics/<variant>``, tokens, TTFT, the per-sample ``answers`` table). :func:`log_sweep_to_wandb` logs a
testbed sweep (table + accuracy-vs-tokens plot); :func:`read_offline_run` reads an offline run back.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import sys
import threading
from pathlib import Path
from typing import Any

from .wandb_offline import find_offline_run, read_offline_run  # noqa: F401  (imported from here)

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        auth = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
        return bool(auth and auth[2])
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(enabled: bool = True) -> str:
    if not enabled:
        return "disabled"
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("disabled", "offline", "online"):
        return mode
    if mode in ("dryrun",):
        return "offline"
    return "online" if _has_api_key() else "offline"


def _run_with_timeout(fn, timeout: float):
    """Run ``fn`` in a daemon thread; return (finished, result, exception)."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True, name="wandb-call")
    t.start()
    t.join(timeout)
    if t.is_alive():
        return False, None, None
    return True, box.get("result"), box.get("error")


class WandbLogger:
    def __init__(self, enabled: bool = True, project: str | None = None, entity: str | None = None,
                 name: str | None = None, group: str | None = None, tags: list[str] | None = None,
                 config: dict | None = None, dir: str | None = None, init_timeout: float = 90.0,
                 job_type: str = "eval", hard_timeout: float | None = None):
        self.mode = resolve_mode(enabled)
        self.run = None
        self.wandb = None
        self.error: str | None = None
        self.hung = False
        if self.mode == "disabled":
            return
        try:
            import wandb
        except Exception as e:  # noqa: BLE001 - not installed or broken: run without it
            self._fail("import", e)
            return
        self.wandb = wandb

        def _init():
            settings = wandb.Settings(init_timeout=init_timeout, silent=True)
            return wandb.init(project=project or os.environ.get("WANDB_PROJECT", "vtprune-eval"), entity=entity,
                              name=name, group=group, tags=tags, config=config or {},
                              dir=dir or os.environ.get("WANDB_DIR") or None, mode=self.mode,
                              job_type=job_type, reinit="finish_previous", settings=settings)

        limit = hard_timeout if hard_timeout is not None else init_timeout + 30
        done, run, err = _run_with_timeout(_init, limit)
        if not done:
            self.hung = True
            self._fail("init", TimeoutError(f"wandb.init did not return within {limit:.0f}s"))
        elif err is not None:
            self._fail("init", err)
        else:
            self.run = run

    # ------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.run is not None

    def _fail(self, what: str, e: BaseException) -> None:
        self.error = f"{what}: {type(e).__name__}: {e}"
        log.warning("W&B %s failed (the run continues without W&B): %s", what, e)
        self.run = None

    def _call(self, what: str, fn):
        if self.run is None:
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            self._fail(what, e)
            return None

    def log(self, data: dict, step: int | None = None) -> None:
        self._call("log", lambda: self.run.log(data, step=step))

    def summary(self, data: dict) -> None:
        def _set():
            for k, v in data.items():
                self.run.summary[k] = v

        self._call("summary", _set)

    def config_update(self, data: dict) -> None:
        self._call("config", lambda: self.run.config.update(data, allow_val_change=True))

    def table(self, key: str, columns: list[str], rows: list[list], image_columns: tuple[str, ...] = ()) -> None:
        def _table():
            wb = self.wandb
            img_idx = {columns.index(c) for c in image_columns if c in columns}
            data = []
            for r in rows:
                data.append([wb.Image(v) if (i in img_idx and v is not None) else v for i, v in enumerate(r)])
            self.run.log({key: wb.Table(columns=columns, data=data)})

        self._call("table", _table)

    def info(self) -> dict:
        out = {"mode": self.mode}
        if self.error:
            out["error"] = self.error
        if self.run is not None:
            for k in ("id", "name", "project", "url", "dir"):
                try:
                    v = getattr(self.run, k)
                    out[k] = v if isinstance(v, (str, int, float)) or v is None else str(v)
                except Exception:  # noqa: BLE001
                    pass
        return out

    def finish(self, timeout: float = 120.0) -> bool:
        """Finish the run; False if it failed or did not return in ``timeout`` seconds (the caller
        may then exit with os._exit so a stuck upload cannot hold the process)."""
        if self.run is None:
            return not self.hung
        run = self.run
        self.run = None
        done, _, err = _run_with_timeout(lambda: run.finish(), timeout)
        if not done:
            self.hung = True
            log.warning("W&B finish did not return within %.0fs; continuing without waiting", timeout)
            return False
        if err is not None:
            log.warning("W&B finish failed: %s", err)
            return False
        if self.mode == "offline":  # said once, where the run is and how to upload it (wandb itself is silent here)
            where = offline_dir(run)
            if where:
                print(f"W&B: offline run saved in {where}; upload it with: wandb sync {where}", file=sys.stderr)
        return True


def offline_dir(run) -> str | None:
    """The folder ``wandb sync`` takes for an offline run (``.../wandb/offline-run-<time>-<id>``), or None."""
    d = getattr(getattr(run, "settings", None), "sync_dir", None)
    if not d:
        try:
            d = str(Path(run.dir).parent)  # run.dir is <sync dir>/files
        except Exception:  # noqa: BLE001
            return None
    return str(d)


# ---------------------------------------------------------------------------------------------
# what an `eval run` holds: identity (name / group / job_type / tags), config, summary, answers table
# ---------------------------------------------------------------------------------------------


def _model_short(model: str) -> str:
    return str(model).rstrip("/").split("/")[-1].replace(":", "-")


def budget_label(budget) -> str:
    """``b64``; ``unpruned`` for no budget (the unpruned baseline / a method's own adaptive count)."""
    return "unpruned" if budget is None else f"b{budget}"


def variant_label(method: str, options: dict | None) -> str:
    """The method with the options that make it a variant: ``consensusdrop[fusion=encoder_only]``."""
    options = options or {}
    if not options:
        return str(method)
    return f"{method}[" + ",".join(f"{k}={options[k]}" for k in sorted(options)) + "]"


def run_identity(benchmark: str, model: str, method: str, budget, run_name: str, family: str | None = None,
                 options: dict | None = None, group: str | None = None, extra_tags=()) -> dict:
    """W&B name / group / job_type / tags of a harness run. ``group`` = ``<benchmark>/<model>``: one
    project-page group holds every method and budget of one benchmark on one model; ``job_type`` =
    the budget (``b64`` / ``unpruned``), so grouping by group + job type puts the methods of one budget
    side by side; tags: benchmark, method, variant, budget, family (and ``--wandb-tag``)."""
    tags = [benchmark, method, budget_label(budget)]
    if options:
        tags.append(variant_label(method, options))
    if family:
        tags.append(family)
    tags += [t for t in extra_tags if t]
    out_tags = []
    for t in tags:  # W&B tags: unique, at most 64 characters
        t = str(t)[:64]
        if t not in out_tags:
            out_tags.append(t)
    return {"name": f"{benchmark}/{run_name}", "group": group or f"{benchmark}/{_model_short(model)}",
            "job_type": budget_label(budget), "tags": out_tags}


def run_config(cfg: dict, resolved: dict, benchmark: str, n: int, run_name: str, run_dir: str | None = None) -> dict:
    """The W&B config of a harness run (nested keys show as ``model.family``, ``method.budget``, ...):
    model (id, name, family, dtype, vision_dtype, layout, template, preprocessing), method (name, budget,
    options as given, the variant label, every resolved option), benchmark (+ options), n, commit, run name;
    ``args`` holds the harness's whole RunConfig."""
    from .families import anyres

    model = dict(resolved.get("model") or {"id": cfg.get("model")})
    model.setdefault("id", cfg.get("model"))
    model["vision_dtype"] = cfg.get("vision_dtype") or model.get("dtype")
    # LLaVA-NeXT's feature layout (spatial_unpad / spatial); None where the family has no such choice
    model["layout"] = model.get("next_layout", cfg.get("next_layout")) if anyres(model.get("family")) else None
    model["pad_to_square"] = cfg.get("pad_to_square", True)
    opts = dict(cfg.get("options") or {})
    method = {"name": cfg.get("method"), "budget": cfg.get("budget"), "budget_label": budget_label(cfg.get("budget")),
              "options": opts, "variant": variant_label(cfg.get("method"), opts),
              "resolved": resolved.get("method_config"), "llm_layers": resolved.get("llm_layers"),
              "vision_stage": resolved.get("vision_stage")}
    git = resolved.get("git") or {}
    return {"benchmark": benchmark, "benchmark_options": dict(cfg.get("bench_options") or {}),
            "benchmark_config": resolved.get("benchmark"), "model": model, "method": method, "n": n,
            "limit": cfg.get("limit"), "partial": cfg.get("limit") is not None, "commit": git.get("commit"),
            "git_dirty": git.get("dirty"), "run_name": run_name, "run_dir": run_dir,
            "generation": resolved.get("generation"), "seed": cfg.get("seed"), "world_size": resolved.get("world_size"),
            "launcher": resolved.get("launcher"), "args": cfg}


def results_summary(res: dict) -> dict:
    """The run's summary: every score as ``metrics/<variant>`` (POPE-F1avg3, POPE-F1pooled, ...), the
    primary one also as ``score`` (its name in ``score_name``); tokens (entering the LLM, layer-averaged,
    candidates); TTFT (``time/ttft_ms``: vision tower + selection + LLM prefill, mean per sample) and times;
    counts."""
    out: dict[str, Any] = {}
    for k, v in (res.get("metrics") or {}).items():  # the names eval.results logs too (no second copy)
        out[f"metrics/{k}"] = v
    from .stats import se_number

    ses = {k: se_number(v) for k, v in (res.get("stderr") or {}).items()}  # a server's score has none
    out.update({f"stderr/{k}": v for k, v in ses.items() if v is not None})
    prim = res.get("primary_metric")
    if prim and prim in (res.get("metrics") or {}):
        out["score"] = res["metrics"][prim]
        out["score_name"] = prim
        if ses.get(prim) is not None:
            out["score_stderr"] = ses[prim]
    t = res.get("tokens") or {}
    for src, dst in (("tok_in", "tokens/entering_llm"), ("tok_eq", "tokens/layer_avg"),
                     ("visual_candidates_mean", "tokens/candidates")):
        if t.get(src) is not None:
            out[dst] = t[src]
    if isinstance(t.get("tok_after_k"), dict):
        out["tokens/after_layer_k"] = t["tok_after_k"].get("mean")
    b = res.get("budget") or {}
    if b:
        out["budget/effective"] = b.get("effective")
        out["budget/unpruned_samples"] = b.get("unpruned_samples")
    tm = res.get("timing") or {}
    if tm.get("prefill_total_s_mean") is not None:  # vision tower + selection + LLM prefill: the first token
        out["time/ttft_ms"] = tm["prefill_total_s_mean"] * 1000.0
    for k in ("generate_s_mean", "vision_s_mean", "selection_s_mean", "llm_s_mean", "samples_per_s",
              "new_tokens_mean", "wall_s_last_session"):
        if tm.get(k) is not None:
            out[f"time/{k}"] = tm[k]
    tp = res.get("throughput") or {}  # the answering loops' time (eval/throughput.py): the run's pace
    for k in ("questions_per_s", "questions_per_s_without_compile", "host_wait_fraction", "device_busy_fraction",
              "compile_s", "loop_s"):
        if tp.get(k) is not None:
            out[f"throughput/{k}"] = tp[k]
    c = res.get("counts") or {}
    out["counts/questions"] = c.get("questions")
    out["counts/answered"] = c.get("answered")
    out["partial"] = bool(res.get("partial"))
    out["follows_protocol"] = bool((res.get("protocol") or {}).get("follows_protocol"))
    return out


ANSWER_COLUMNS = ["question_id", "uid", "question", "answer", "prediction", "correct", "tokens_candidates",
                  "tokens_entering_llm", "tokens_layer_avg", "new_tokens", "generate_s"]


def _pope_reference(data_root, records: list[dict]) -> list[Any]:
    """POPE's label for each answer record, paired as eval_pope.py pairs them: within each split, the
    k-th answer with the k-th label of coco_pope_<split>.json (None where a split has fewer labels)."""
    root = Path(data_root)
    lines = (root / "pope/llava_pope_test.jsonl").read_text(encoding="utf-8").splitlines()
    cat = {q["question_id"]: q["category"] for q in (json.loads(ln) for ln in lines if ln.strip())}
    labels: dict[str, list[str]] = {}
    for c in set(cat.values()):
        p = root / f"pope/coco/coco_pope_{c}.json"
        rows = p.read_text(encoding="utf-8").splitlines() if p.exists() else []
        labels[c] = [json.loads(ln)["label"] for ln in rows if ln.strip()]
    seen: dict[str, int] = {}
    out = []
    for r in records:
        c = cat.get(r.get("question_id"))
        k = seen.get(c, 0)
        seen[c] = k + 1
        out.append(labels.get(c, [])[k] if c is not None and k < len(labels.get(c, [])) else None)
    return out


def answer_rows(run_dir, benchmark: str | None = None, data_root=None) -> list[list]:
    """One row per answered question (question-file order) from the run's shard files: question id,
    uid, question, answer (the reference where the question file or the benchmark's labels give it),
    prediction, correct (where a per-sample rule is known: POPE's yes/no parse against its label; None
    elsewhere), visual tokens (candidates, entering the LLM, layer-averaged), new tokens, generate time."""
    from .io import complete_jsonl_records
    from .shards import EVAL_KEY, shard_files

    recs = [r for p in shard_files(Path(run_dir)) for r in complete_jsonl_records(p)]
    recs.sort(key=lambda r: r[EVAL_KEY].get("idx", 0))
    official = [{k: v for k, v in r.items() if k != EVAL_KEY} for r in recs]
    refs: list[Any] = [r.get("answer") for r in official]
    correct: list[Any] = [None] * len(official)
    if benchmark == "pope" and data_root is not None:
        try:
            from .scorers import pope_parse

            refs = _pope_reference(data_root, official)
            correct = [None if lab is None else pope_parse(r.get("text", "")) == lab for r, lab in zip(official, refs)]
        except (OSError, ValueError, KeyError) as e:
            log.warning("W&B answers table: POPE labels not read (%s); 'correct' left empty", e)
    rows = []
    for r, o, ref, ok in zip(recs, official, refs, correct):
        m = r[EVAL_KEY]
        qid = o.get("question_id", o.get("id"))
        rows.append([None if qid is None else str(qid), m.get("uid"), o.get("prompt", o.get("question")),
                     None if ref is None else str(ref), o.get("text", o.get("pred")), ok,
                     m.get("visual_candidates"), m.get("visual_entering_llm"), m.get("visual_layer_avg"),
                     m.get("new_tokens"), (m.get("time") or {}).get("generate")])
    return rows


def log_results(wb: WandbLogger | None, res: dict, run_dir, data_root=None) -> None:
    """Summary (:func:`results_summary`), the metric descriptions and results into the config, and the
    ``answers`` table (every answered question). Never raises."""
    if wb is None or not wb.active:
        return
    res = res if isinstance(res, dict) else {}
    try:
        summary = results_summary(res)
    except Exception as e:  # noqa: BLE001 - W&B must never fail a run
        log.warning("W&B summary not built (logged without it): %s", e)
        summary = {}
    try:
        rows = answer_rows(run_dir, res.get("benchmark"), data_root)
    except Exception as e:  # noqa: BLE001
        log.warning("W&B answers table not built (logged without it): %s", e)
        rows = []
    wb.config_update({"metric_labels": res.get("metric_labels") or {}, "primary_metric": res.get("primary_metric"),
                      "budget_unit": (res.get("model") or {}).get("budget_unit")})
    wb.summary(summary)
    if rows:
        table_cls = getattr(wb.wandb, "Table", None)
        if table_cls is not None and len(rows) > getattr(table_cls, "MAX_ROWS", len(rows)):
            # run.log truncates a table to Table.MAX_ROWS (10,000); keep every answer (the artifact limit)
            table_cls.MAX_ROWS = min(len(rows), getattr(table_cls, "MAX_ARTIFACT_ROWS", len(rows)))
        wb.table("answers", ANSWER_COLUMNS, rows)


# ---------------------------------------------------------------------------------------------
# testbed sweep: one run with the table of every method x budget and an accuracy-vs-tokens plot
# ---------------------------------------------------------------------------------------------

SWEEP_COLUMNS = ["method", "options", "label", "budget", "tokens_entering_llm", "tokens_layer_avg", "accuracy",
                 "time_s"]


def sweep_rows(res: dict) -> tuple[list[str], list[list]]:
    rows = res.get("results") or []
    acc_keys = sorted({k for r in rows for k in (r.get("accuracy") or {}) if k != "overall"})
    cols = SWEEP_COLUMNS + [f"accuracy/{k}" for k in acc_keys]
    out = []
    for r in rows:
        opts = r.get("options") or {}
        tok = r.get("tokens") or {}
        acc = r.get("accuracy") or {}
        out.append([r.get("method"), json.dumps(opts, sort_keys=True), variant_label(r.get("method"), opts),
                    r.get("budget"), tok.get("visual_entering_llm"), tok.get("visual_layer_avg"), acc.get("overall"),
                    tok.get("time_s")] + [acc.get(k) for k in acc_keys])
    return cols, out


def log_sweep_to_wandb(res: dict, enabled: bool = True, project: str | None = None, entity: str | None = None,
                       name: str | None = None, group: str | None = None, png=None, dir: str | None = None,
                       tags=()) -> dict:
    """Log a testbed sweep (``testbed.evaluate.run_sweep``'s result) as one W&B run (job_type ``sweep``):
    config = the sweep's meta; table ``sweep`` (method, options, label, budget, tokens entering the LLM,
    layer average, accuracy overall and per question type, time); ``accuracy_vs_tokens`` and
    ``accuracy_vs_tokens_entering``: line plots (one line per method variant) over that table; the sweep's
    matplotlib figure (``png``) as the image ``plot``. Returns the logger's info; never raises."""
    try:
        meta = dict(res.get("meta") or {})
        only = (meta.get("partial") or {}).get("methods") or []  # `sweep --only`: these re-measured
        default_name = f"testbed-sweep/{meta.get('date', '')}".rstrip("/") + (f"/only-{'+'.join(only)}" if only else "")
        wb = WandbLogger(enabled=enabled, project=project, entity=entity, job_type="sweep",
                         name=name or default_name, group=group or "testbed",
                         tags=["testbed", "sweep"] + (["partial"] if only else []) + [t for t in tags if t],
                         config={"sweep": meta}, dir=dir)
    except Exception as e:  # noqa: BLE001
        log.warning("W&B sweep logging failed (the sweep is kept): %s", e)
        return {"mode": "disabled", "error": str(e)}
    if not wb.active:
        return wb.info()

    def _log():
        wandb = wb.wandb
        cols, rows = sweep_rows(res)
        table = wandb.Table(columns=cols, data=rows)
        data = {"sweep": table,
                "accuracy_vs_tokens": wandb.plot.line(table, "tokens_layer_avg", "accuracy", stroke="label",
                                                      title="accuracy vs visual tokens (layer average)"),
                "accuracy_vs_tokens_entering": wandb.plot.line(table, "tokens_entering_llm", "accuracy", stroke="label",
                                                               title="accuracy vs visual tokens entering the LLM")}
        if png is not None and Path(png).exists():
            data["plot"] = wandb.Image(str(png))
        wb.run.log(data)
        wb.run.summary["n_configs"] = len(rows)
        wb.run.summary["n_errors"] = len(res.get("errors") or [])

    wb._call("sweep", _log)
    info = wb.info()
    wb.finish()
    return info
