"""``eval run --backend hf`` (the default): this rank's questions answered by our pruning engine.

The questions go in batches of one modality (text-only ScienceQA problems never share a batch with image
ones); each batch is read, generated greedily and appended to the rank's shard file as one answer record per
question, flushed (and fsynced) after every batch, so a killed run loses at most the batch in flight. A
record's bookkeeping (``_eval``, :data:`eval.shards.EVAL_KEY`) says what it was made from (question and input
hashes), what the engine kept (visual tokens entering the LLM, per layer), which prefill path ran (fast or
eager, and why eager under ``--fast``), the times, and where its kept-token overlay picture is.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from llava.cost import sample_cost

from .families import sample_overlay
from .io import JsonlAppender, NullAppender
from .loader import BatchInputs, Prefetcher, default_workers, to_device
from .shards import EVAL_KEY

log = logging.getLogger("eval")

#: the eager reason recorded for a prompt without an image / video (the stock forward: nothing to prune)
TEXT_ONLY_REASON = "text-only prompt (the stock model's forward: nothing to prune)"


class _Batches:
    """Consecutive questions grouped into batches of one modality (text-only ScienceQA problems
    never share a batch with image ones)."""

    def __init__(self, questions: list, size: int):
        self.batches: list[list] = []
        cur: list = []
        for q in questions:
            if cur and (len(cur) >= size or cur[0].modality != q.modality):
                self.batches.append(cur)
                cur = []
            cur.append(q)
        if cur:
            self.batches.append(cur)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


@dataclass
class _Loop:
    """What lives for one rank's answering loop: the run's pieces, where answers and overlays go, and what
    this session has answered so far."""

    cfg: object  # eval.run_config.RunConfig
    bench: object
    rt: object
    engine: object
    info: object  # eval.dist.DistInfo
    device: object
    run_dir: Path
    qhashes: dict
    shard: Path
    model_id: str
    overlays_left: int
    answered: int = 0
    warned_noop: bool = False
    sums: dict = field(default_factory=lambda: {"in": 0.0, "avg": 0.0, "n": 0})  # visual tokens, for the progress log


def infer(cfg, bench, rt, engine, todo, run_dir, info, device, wb, n_total=None, n_done=None, qhashes=None):
    """Answer ``todo`` (this rank's questions not answered yet), ``cfg.batch_size`` at a time, each batch's answers
    appended to this rank's shard file (a tensor-parallel group's other ranks run the same batches and write
    nothing). The batches' inputs are prepared by ``cfg.loader_workers`` background processes while the device
    answers the batches before (:mod:`eval.loader`; 0: in the loop). Each batch's times go into its answers and
    into the rank's loop ledger (:mod:`eval.throughput`). ``wb``: rank 0's W&B logger for the progress, or None."""
    from .progress import progress
    from .throughput import Ledger

    loop = _Loop(cfg, bench, rt, engine, info, device, run_dir, qhashes or {},
                 shard=run_dir / "answers" / f"{info.dp}_{info.dp_rank}.jsonl",
                 model_id=cfg.model.rstrip("/").split("/")[-1],
                 overlays_left=cfg.overlay_samples if info.writes else 0)
    batches = _Batches(todo, cfg.batch_size).batches
    workers = loader_workers(cfg, len(batches))
    on_gpu = getattr(device, "type", str(device)) == "cuda"
    prefetch = Prefetcher(BatchInputs(batches, rt.processor, bench.root, loop.shard), workers,
                          pin=on_gpu and workers > 0)
    ledger = Ledger(run_dir, info, workers) if info.writes else None
    with (JsonlAppender(loop.shard) if info.writes else NullAppender()) as out:
        items = iter(prefetch)  # the workers fork here, before the progress thread starts
        # a bar on a terminal; off one (a log file), a line at least every 10 s (eval/progress.py)
        bar = progress(len(todo), f"{bench.name} rank {info.rank}/{info.world}")
        try:
            for nb, batch in enumerate(batches):
                t0 = time.perf_counter()
                prepared = next(items)  # the loop waits here when the workers are behind the device
                if prepared.error is not None:  # every batch before it is answered and on disk
                    raise prepared.error
                inputs = to_device(prepared.inputs, device)
                recs, t = _answer_batch(loop, batch, prepared, inputs, t0)
                t1 = time.perf_counter()
                out.write(recs)
                out.flush()
                t["write"] = time.perf_counter() - t1
                if ledger is not None:
                    ledger.add(batch, t, new_graph=any(r[EVAL_KEY].get("new_graph") for r in recs))
                loop.answered += len(batch)
                bar.update(len(batch))
                _log_progress(wb, loop, len(todo), t["generate"] / len(batch))
                if cfg.stop_after is not None and nb + 1 >= cfg.stop_after:
                    log.warning("--stop-after %d: exiting abruptly (simulated crash)", cfg.stop_after)
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(3)
        finally:  # also on an error or Ctrl-C: the timer thread stops, the last count is said, the workers end
            bar.close()
            prefetch.close()
            if ledger is not None:
                ledger.close()


def loader_workers(cfg, n_batches: int) -> int:
    """The loader workers of this rank: ``--loader-workers`` (None: :func:`eval.loader.default_workers`), never
    more than there are batches."""
    n = default_workers() if cfg.loader_workers is None else cfg.loader_workers
    return max(0, min(n, n_batches))


def _answer_batch(loop: _Loop, batch: list, prepared, inputs: dict, t0: float) -> tuple[list[dict], dict]:
    """One batch generated and turned into answer records (with their ``_eval`` bookkeeping); the batch's times:
    ``host_wait`` (from ``t0``, the loop asking for the batch, to the start of generate: the device idle, waiting
    for its inputs), ``generate``, ``post`` (decoding and the records) and ``prepare`` (the inputs' host work,
    in a worker or in the loop)."""
    has_visual = "pixel_values" in inputs or "pixel_values_videos" in inputs
    engine, rt = loop.engine, loop.rt
    engine.sample_keys = [q.uid for q in batch]
    prefills = engine.prefills
    new, t_gen, t_start = _generate(loop, inputs)
    t_post = time.perf_counter()
    engine.sample_keys = None
    outs = rt.processor.decode(new)
    if has_visual and engine.prefills != prefills + 1:
        raise RuntimeError("the pruning engine did not handle this batch's prefill (token accounting would be stale)")
    stats = engine.stats if has_visual else None
    prompt = inputs["attention_mask"].sum(1).tolist() if "attention_mask" in inputs else None  # placeholders included
    n = len(batch)
    times = {"host_wait": t_start - t0, "prepare": prepared.prepare_s, "generate": t_gen}
    recs = []
    for b, (q, text) in enumerate(zip(batch, outs)):
        rec = loop.bench.record(q, loop.bench.postprocess(text), loop.model_id)
        meta = {"uid": q.uid, "idx": q.idx, "qhash": loop.qhashes.get(q.uid), "inputs": prepared.hashes[b],
                "rank": loop.info.rank, "batch": n, "new_tokens": _new_tokens(rt, new[b].tolist()),
                "time": {k: v / n for k, v in times.items()}}
        if stats is not None:
            _record_stats(loop, meta, q, stats, b, n, None if prompt is None else prompt[b])
        else:
            meta["path"] = "eager"
            if loop.cfg.fast:
                meta["path_reason"] = TEXT_ONLY_REASON
        # the fast path records no selections (its kept indices stay on the device): overlays of eager prefills only
        if (loop.overlays_left > 0 and stats is not None and stats.path == "eager"
                and ("vision", b) in engine.selections):
            _save_overlay(loop, meta, q, b, inputs, batch[0].modality == "video")
        rec[EVAL_KEY] = meta
        recs.append(rec)
    times["post"] = time.perf_counter() - t_post
    for rec in recs:  # the records' own making, up to here (the shard write follows: the loop's ledger has it)
        rec[EVAL_KEY]["time"]["post"] = times["post"] / n
    return recs, times


def _generate(loop: _Loop, inputs):
    """Greedy generation of the batch (the protocol's: no sampling, one beam): the new tokens, the seconds
    it took (the device synchronised before and after: the inputs' copy is done before it starts) and when it
    started."""
    import torch

    _sync(loop.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        gen = loop.rt.model.generate(**inputs, max_new_tokens=loop.cfg.max_new_tokens, do_sample=False, num_beams=1,
                                     use_cache=True)
    _sync(loop.device)
    return gen[:, inputs["input_ids"].shape[1]:], time.perf_counter() - t0, t0


def _new_tokens(rt, row: list[int]) -> int:
    """The answer's generated tokens: up to its first end-of-sequence token (included), else without padding."""
    eos, pad = rt.tokenizer.eos_token_id, rt.tokenizer.pad_token_id
    return next((i + 1 for i, t in enumerate(row) if t == eos), len(row) - sum(1 for t in row if t == pad))


def _record_stats(loop: _Loop, meta: dict, q, stats, b: int, n: int, prompt_tokens: int | None) -> None:
    """What the engine did for sample ``b`` of a batch of ``n``: visual tokens (candidates, entering the LLM,
    per layer), the prefill's parts timed, the path it took (fast / eager, and why eager under ``--fast``);
    ``prompt_tokens`` (its attention mask's count, placeholders included): its text tokens and analytic cost."""
    cfg = loop.cfg
    s = stats.samples[b].as_dict()
    meta.update(visual_candidates=s["visual_candidates"], visual_entering_llm=s["visual_entering_llm"],
                visual_layer_avg=s["visual_layer_avg"], visual_per_layer=s["visual_per_layer"],
                vision_noop=s.get("vision_noop", False))
    if prompt_tokens is not None:  # the prompt's text tokens and the analytic cost (llava.cost: FLOPs, KV bytes)
        rt = loop.rt
        meta["text_tokens"] = prompt_tokens - s["visual_candidates"]
        meta.update(sample_cost(rt.model.config, meta["text_tokens"], s["visual_per_layer"],
                                rt.model.get_input_embeddings().weight.element_size()))
    if (s.get("vision_noop") and s["visual_layer_avg"] >= s["visual_candidates"] and not loop.warned_noop
            and cfg.budget is not None):  # nothing pruned anywhere (LLM-stage methods: vision_noop always)
        loop.warned_noop = True  # said once, at the first sample it happens to
        log.warning("budget %s >= the %d visual tokens of %s: nothing is pruned there (results.json "
                    "records the effective budget under 'budget')", cfg.budget, s["visual_candidates"], q.uid)
    meta["time"].update({k: v / n for k, v in stats.timings.items()})
    loop.sums["in"] += s["visual_entering_llm"]
    loop.sums["avg"] += s["visual_layer_avg"]
    loop.sums["n"] += 1
    meta["path"] = stats.path  # which path ran this batch's prefill (and why eager, under --fast)
    if stats.path == "fast":
        meta["bucket"] = stats.bucket
        if stats.new_graph:  # compiled / captured here: its time includes the compilation
            meta["new_graph"] = True
    elif cfg.fast:
        meta["path_reason"] = stats.path_reason or "not given by the engine"


def _save_overlay(loop: _Loop, meta: dict, q, b: int, inputs, video: bool) -> None:
    """Sample ``b``'s kept tokens drawn over its image (a video's first frame) into ``<run>/overlays/``; its
    path goes into ``meta``. A picture that fails is a warning, never the end of the run."""
    try:
        sel = loop.engine.selections[("vision", b)]
        keep = sel.keep.tolist() + ([] if sel.targets is None else sel.targets.tolist())
        img = _first_frame(q, loop.rt) if video else _image(q)  # read again here: the loader keeps no pictures
        ov = sample_overlay(loop.rt, inputs, b, img, keep, video, loop.rt.processor.pad_to_square)
        overlay_dir = loop.run_dir / "overlays"
        overlay_dir.mkdir(parents=True, exist_ok=True)
        path = overlay_dir / f"{_safe(q.uid)}.png"
        ov.save(path)
        meta["overlay"] = str(path.relative_to(loop.run_dir))
        loop.overlays_left -= 1
    except Exception as e:  # noqa: BLE001 - a picture must never stop the run
        log.warning("overlay for %s failed: %s", q.uid, e)


def _log_progress(wb, loop: _Loop, n_todo: int, generate_s: float) -> None:
    """Rank 0's progress to W&B after each batch: answers so far and the mean visual tokens."""
    if wb is None or not wb.active:
        return
    logd = {"progress/answered_rank0": loop.answered, "progress/fraction_rank0": loop.answered / max(n_todo, 1),
            "time/generate_s_per_sample": generate_s}
    sums = loop.sums
    if sums["n"]:
        logd.update({"tokens/entering_llm_mean": sums["in"] / sums["n"],
                     "tokens/layer_avg_mean": sums["avg"] / sums["n"]})
    wb.log(logd)


def _sync(device):
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize(device)


def _image(q):
    from llava.preprocess import load_image

    return load_image(q.load_image())


def _first_frame(q, rt):
    from .benchmarks.videoqa import load_video

    return load_video(q.video, rt.processor.num_frames)[0]


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s)[:100]
