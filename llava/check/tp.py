"""Tensor parallelism (DeepSpeed AutoTP, tp = 2 on gloo) for a method that reads LLM signals: two ranks spawned
here, each with the tiny model of every family asked for twice - plain, and its language model sharded across the
ranks (:func:`llava.tp.deepspeed_inference`) - give the same greedy tokens on :func:`make_batch` on every rank,
the logits of every step within 1e-5 of the plain model's. ``python -m bench.tp_check`` is the same comparison
over every registered method with its report."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import tempfile
from datetime import timedelta
from pathlib import Path

from ..tp import _free_port

#: ranks of the group; new tokens compared; the largest logit difference allowed (fp32)
TP = 2
NEW_TOKENS = 4
LOGIT_TOL = 1e-5


def _generate(rt, batch):
    """Greedy tokens (B, NEW_TOKENS) and every step's logits, the placeholders suppressed (a random-weight model
    may generate them)."""
    import torch

    cfg = rt.model.config
    placeholders = [int(i) for i in (getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None))
                    if i is not None]
    with torch.no_grad():
        out = rt.model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                suppress_tokens=placeholders, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, batch["input_ids"].shape[1]:], torch.stack([x.float() for x in out.logits], 1)


def agreement(t0, l0, t1, l1) -> dict:
    """The tensor-parallel model (tokens ``t1``, logits ``l1``, this rank's) against the plain one (``t0``, ``l0``):
    every rank's tokens (gathered: a collective, call it on every rank), whether they agree, whether this rank's
    equal the plain model's, and the largest logit difference (every step's when the tokens are equal, else the
    first step's: the later steps read different prefixes)."""
    import torch
    import torch.distributed as dist

    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, t1.cpu().tolist())
    equal = bool(torch.equal(t0.cpu(), t1.cpu()))
    delta = float((l0 - l1).abs().max()) if equal else float((l0[:, 0] - l1[:, 0]).abs().max())
    return {"ranks": ranks, "ranks_agree": all(r == ranks[0] for r in ranks), "tokens_equal": equal,
            "max_logit_delta": delta}


def rank_env(rank: int, world: int, port: int, device: str = "cpu") -> None:
    """What a launcher would set for ``rank`` of a one-host group, and on a CPU DeepSpeed's CPU accelerator with one
    thread per rank (it otherwise starts one per core in every rank: about 50x slower on a 2-core machine)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), LOCAL_SIZE=str(world))
    if device == "cpu":
        os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def _compare(family: str, name: str, budget, options: dict) -> tuple[str, str]:
    from ..models import load
    from ..tp import deepspeed_inference
    from .inputs import make_batch

    plain = load(f"tiny:{family}", seed=1, dtype="float32")
    wrapped = deepspeed_inference(load(f"tiny:{family}", seed=1, dtype="float32"), tp_size=TP)
    plain.prune(name, budget, **options)
    batch = make_batch(plain)
    t0, l0 = _generate(plain, batch)
    try:
        wrapped.prune(name, budget, **options)
    except ValueError as e:
        return "FAIL", f"refused under tensor parallelism: {e}"
    t1, l1 = _generate(wrapped, batch)
    a = agreement(t0, l0, t1, l1)
    if not a["ranks_agree"]:
        return "FAIL", f"the ranks chose different tokens: {a['ranks']}"
    if not a["tokens_equal"]:
        return "FAIL", f"tokens {t1.tolist()} at TP={TP} vs {t0.tolist()} plain"
    delta = a["max_logit_delta"]
    if delta > LOGIT_TOL:
        return "FAIL", f"logits differ from the plain model's by up to {delta:.3g} (> {LOGIT_TOL:g})"
    return "PASS", f"{NEW_TOKENS} tokens on both ranks, logits within {delta:.2g}"


def _worker(rank: int, job: dict, port: int, folder: str) -> None:
    """One rank: what a launcher would set, DeepSpeed's CPU accelerator, the output in its own log file; rank 0
    writes the verdicts."""
    rank_env(rank, TP, port)
    log = open(Path(folder) / f"rank{rank}.log", "w")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    import torch
    import torch.distributed as dist

    from ..method import available_methods

    torch.set_num_threads(1)
    if job["name"] not in available_methods():  # a class registered by a module the parent imported itself
        importlib.import_module(job["module"])
    dist.init_process_group("gloo", rank=rank, world_size=TP, timeout=timedelta(seconds=300))
    verdicts = {}
    try:
        for family, budget in job["cases"]:
            try:
                verdicts[family] = _compare(family, job["name"], budget, job["options"])
            except Exception as e:  # noqa: BLE001 - the verdict of this family; the others go on
                verdicts[family] = ("FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        if rank == 0:
            (Path(folder) / "verdicts.json").write_text(json.dumps(verdicts))
        dist.destroy_process_group()


def deepspeed_missing() -> str | None:
    """Why the check cannot run here (None: it can)."""
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install -e '.[deepspeed]')"
    return None


def check_tp(name: str, module: str, cases: list[tuple[str, object]], options: dict) -> dict[str, tuple[str, str]]:
    """{family: (verdict, detail)} of method ``name`` (registered by importing ``module``) on each (family, budget)
    of ``cases`` at TP=2: two ranks spawned for all of them (about 10 s to start on a CPU)."""
    import torch.multiprocessing as mp

    job = {"name": name, "module": module, "cases": [list(c) for c in cases], "options": options}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.start_processes(_worker, args=(job, _free_port(), tmp), nprocs=TP, start_method="spawn")
        except Exception as e:  # noqa: BLE001 - a rank died: its log's last line says why
            logs = [p.read_text().strip().splitlines() for p in sorted(Path(tmp).glob("rank*.log"))]
            why = next((lines[-1] for lines in logs if lines), f"{type(e).__name__}: {e}")
            return {f: ("FAIL", f"a rank failed: {why}") for f, _ in cases}
        got = json.loads((Path(tmp) / "verdicts.json").read_text())
    return {f: tuple(v) for f, v in got.items()}
