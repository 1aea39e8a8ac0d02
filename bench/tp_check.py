"""Tensor-parallel check: every method under DeepSpeed AutoTP gives the plain model's greedy tokens.

    python -m bench.tp_check                                   # the full matrix: every method x every tiny family
    python -m bench.tp_check --methods none,fastv --families llava,qwen2.5-vl --tp 2
    bash scripts/bench/tp_check.sh                            # the same, with the threads and accelerator set

No launcher: the check spawns ``--tp`` processes itself (``torch.multiprocessing``, gloo on a CPU, nccl on
CUDA), one tensor-parallel group. Each rank loads every tiny family twice with the same seed: the plain
model, and a copy through ``llava.tp.deepspeed_inference(rt, tp_size=tp)`` (the language model sharded,
the towers replicated). Every registered method (and ``none``) is attached to both after it and greedy
generation of ``--new-tokens`` tokens on bench.gpu_check's ``mixed`` batch of 3 is compared: PASS when the
tokens are equal **on every rank** and every step's logits are within ``--logit-tol`` (1e-5, fp32) of the
plain model's. For each family the report also records what was sharded (the parameters whose shape on
rank 0 differs from the plain model's, and their shapes: the LLM's projections halved at TP=2, the tower
and projector unchanged). A method a family does not support is ``n/a``; a method refused under tensor
parallelism (see llava/tp.py) is ``refused`` with the reason.

Writes ``tp-check-<device>-tp<N>-<date>.{json,md}`` under ``--out`` (default: print only); exit status 0
PASS, 1 FAIL. CPU runs set ``OMP_NUM_THREADS=1`` per rank (DeepSpeed's CPU accelerator otherwise starts
one thread per core in every rank: about 50x slower on a 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llava.check.tp import agreement, rank_env
from llava.tp import _free_port

FAMILIES = ("llava", "llava-next", "video-llava", "qwen2.5-vl", "llava-onevision", "qwen3-vl", "internvl", "qwen3.5")
LOGIT_TOL = 1e-5


@dataclass
class TPCheckConfig:
    tp: int = 2
    device: str = "cpu"
    families: list = field(default_factory=lambda: list(FAMILIES))
    methods: list = field(default_factory=list)  # default: every registered method ("none" included)
    new_tokens: int = 4
    seed: int = 1
    logit_tol: float = LOGIT_TOL
    out: str | None = None


def sharded_params(plain, wrapped) -> dict[str, list[list[int]]]:
    """{name: [plain shape, this rank's shape]} for every parameter whose shape the sharding changed."""
    ref = dict(plain.named_parameters())
    out = {}
    for name, p in wrapped.named_parameters():
        q = ref.get(name)
        if q is not None and tuple(q.shape) != tuple(p.shape):
            out[name] = [list(q.shape), list(p.shape)]
    return out


def _compare(rt_plain, rt_tp, method: str, family: str, cfg: TPCheckConfig, device) -> dict:
    from bench import gpu_check as G

    fam = G.family_key(family)
    budget = G.tiny_budget(method, fam)
    rec = {"method": method, "family": family, "budget": budget}
    if not G.supported(method, fam):
        return {**rec, "verdict": "n/a", "reason": f"{method} does not support {fam}"}
    opts = {"seed": 3} if method == "random" else {}
    try:
        rt_plain.prune(method, budget, **opts)
    except ValueError as e:  # a hybrid model's linear-attention layer, read by the method: refused on both
        G._unprune(rt_plain)
        return {**rec, "verdict": "n/a", "reason": str(e)}
    batch = G.build(rt_plain, G.scenarios(fam)["mixed"], device)
    try:
        t0, l0 = G.generate(rt_plain, batch, cfg.new_tokens)
    finally:
        G._unprune(rt_plain)
    try:
        rt_tp.prune(method, budget, **opts)
    except ValueError as e:
        return {**rec, "verdict": "refused", "reason": str(e)}
    try:
        t1, l1 = G.generate(rt_tp, batch, cfg.new_tokens)
    except Exception as e:  # noqa: BLE001 - recorded, the matrix goes on (every rank raises alike: same inputs)
        return {**rec, "verdict": "FAIL", "error": G._tail(e)}
    finally:
        G._unprune(rt_tp)
    a = agreement(t0, l0, t1, l1)  # every rank must have chosen the plain model's tokens
    equal = a["tokens_equal"] and a["ranks_agree"]
    ok = equal and a["max_logit_delta"] <= cfg.logit_tol
    rec.update(tokens_equal=equal, ranks_agree=a["ranks_agree"], tokens=t0.cpu().tolist(),
               max_logit_delta=a["max_logit_delta"], verdict="PASS" if ok else "FAIL")
    if not equal:
        rec["tp_tokens"] = a["ranks"]
    return rec


def _worker(rank: int, cfg: TPCheckConfig, port: int, result: str) -> None:
    rank_env(rank, cfg.tp, port, cfg.device)
    import torch
    import torch.distributed as dist

    if cfg.device == "cpu":
        torch.set_num_threads(1)
    from bench import gpu_check as G
    from llava.models import load
    from llava.tp import deepspeed_inference, rank_params

    if cfg.device == "cpu":
        device, backend = torch.device("cpu"), "gloo"
    else:
        device, backend = torch.device("cuda", rank), "nccl"
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=cfg.tp)
    methods = cfg.methods or G.registered_methods()  # "none" included
    report = {"config": asdict(cfg), "models": [], "results": []}
    try:
        for family in cfg.families:
            t0 = time.perf_counter()
            plain = load(f"tiny:{family}", seed=cfg.seed, dtype="float32", device=device)
            wrapped = deepspeed_inference(load(f"tiny:{family}", seed=cfg.seed, dtype="float32", device=device),
                                          tp_size=cfg.tp)
            report["models"].append({"family": family, "deepspeed": wrapped.info["deepspeed"],
                                     "sharded": sharded_params(plain.model, wrapped.model),
                                     "params": {"plain": sum(p.numel() for p in plain.model.parameters()),
                                                "rank": sum(p.numel() for p in wrapped.model.parameters()),
                                                "planned": rank_params(plain.model, cfg.tp)}})
            for m in methods:
                t1 = time.perf_counter()
                r = _compare(plain, wrapped, m, family, cfg, device)
                report["results"].append({**r, "seconds": round(time.perf_counter() - t1, 3)})
                if rank == 0:
                    extra = f"  max |dlogit| {r['max_logit_delta']:.2g}" if "max_logit_delta" in r else ""
                    print(f"  {family:15s} {m:14s} {r['verdict']}{extra}", flush=True)
            report["models"][-1]["seconds"] = round(time.perf_counter() - t0, 2)
    finally:
        if rank == 0:
            Path(result).write_text(json.dumps(report))
        dist.destroy_process_group()


def run_check(cfg: TPCheckConfig) -> dict:
    """Spawn ``cfg.tp`` ranks, run the matrix, return rank 0's report (with ``summary``)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result = str(Path(tmp) / "rank0.json")
        mp.start_processes(_worker, args=(cfg, _free_port(), result), nprocs=cfg.tp, start_method="spawn")
        report = json.loads(Path(result).read_text())
    verdicts = [r["verdict"] for r in report["results"]]
    report["summary"] = {v: verdicts.count(v) for v in sorted(set(verdicts))}
    report["overall"] = "FAIL" if "FAIL" in verdicts else "PASS"
    return report


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = [f"# Tensor-parallel check: TP={cfg['tp']} on {cfg['device']}, fp32", "",
             f"Overall **{report['overall']}** ({', '.join(f'{k} {v}' for k, v in report['summary'].items())}); "
             f"tokens equal on every rank and logits within {cfg['logit_tol']:g} of the plain model.", "",
             "| family | method | budget | verdict | max abs logit delta | note |", "|---|---|---|---|---|---|"]
    for r in report["results"]:
        d = r.get("max_logit_delta")
        lines.append(f"| {r['family']} | {r['method']} | {r['budget']} | {r['verdict']} | "
                     f"{'' if d is None else f'{d:.2g}'} | {r.get('reason', '') or ' '.join(r.get('error', [])[-1:])} |")
    lines += ["", "Sharded on rank 0 (plain shape -> this rank's shape), per family:", ""]
    for m in report["models"]:
        names = sorted(m["sharded"])
        lines.append(f"- {m['family']}: {len(names)} parameters sharded, e.g. " +
                     ", ".join(f"`{n}` {m['sharded'][n][0]} -> {m['sharded'][n][1]}" for n in names[:2]))
    return "\n".join(lines) + "\n"


#: the models of the memory plan (docs/evaluation.md section 3): shipped shape configs, built on the meta device
MEMORY_MODELS = ("llava-1.5-7b", "llava-1.5-13b", "llava-next-7b", "qwen2.5-vl-7b", "llava-onevision-7b", "qwen3-vl-8b",
                 "internvl3.5-8b", "llava-next-34b", "qwen2.5-vl-72b", "llava-onevision-72b")
#: per GPU, kept back from its memory for the CUDA context, activations and the KV cache of a batch-1 answer
HEADROOM_GB = 12


def memory_plan(names=MEMORY_MODELS, tps=(1, 2, 4, 8), bytes_per_param: int = 2, gpu_gb: float = 80) -> list[dict]:
    """Per model: parameters, weight memory per GPU at each tensor-parallel size (``llava.tp.rank_params``:
    the language model's linears and ``lm_head`` split, the rest whole on every rank) in fp16 / bf16, the KV
    cache per 1,000 tokens per GPU (its KV heads split across the group), and the smallest size whose weights
    leave ``HEADROOM_GB`` of a ``gpu_gb`` GPU free."""
    from llava.models import load
    from llava.tp import rank_params

    rows = []
    for name in names:
        model = load(f"shape:{name}", device="meta").model
        tc = model.config.get_text_config()
        kinds = getattr(tc, "layer_types", None) or ["full_attention"] * tc.num_hidden_layers
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        kv_layers = sum(k == "full_attention" for k in kinds)
        row = {"model": name, "params_b": round(rank_params(model, 1)["total"] / 1e9, 2), "gb": {}, "kv_mb_per_1k": {}}
        for tp in tps:
            row["gb"][tp] = round(rank_params(model, tp)["per_rank"] * bytes_per_param / 1e9, 1)
            kv_heads = -(-tc.num_key_value_heads // tp)  # heads per rank (a KV head is never split)
            row["kv_mb_per_1k"][tp] = round(2 * kv_layers * kv_heads * head_dim * bytes_per_param * 1000 / 1e6, 1)
        row["min_tp"] = next((tp for tp in tps if row["gb"][tp] + HEADROOM_GB <= gpu_gb), None)
        rows.append(row)
    return rows


def memory_markdown(rows: list[dict], gpu_gb: float = 80) -> str:
    tps = list(rows[0]["gb"])
    lines = ["| model | parameters | " + " | ".join(f"weights / GPU at TP={t}" for t in tps) +
             " | KV cache / GPU per 1k tokens (TP=1) | fewest GPUs per replica on 80 GB |",
             "|---|---|" + "---|" * len(tps) + "---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params_b']:.2f}B | " + " | ".join(f"{r['gb'][t]:.1f} GB" for t in tps) +
                     f" | {r['kv_mb_per_1k'][tps[0]]:.0f} MB | {r['min_tp'] or f'more than {tps[-1]}'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--methods", default="", help="comma-separated (default: every registered method, none included)")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--logit-tol", type=float, default=LOGIT_TOL)
    ap.add_argument("--out", default=None, help="write tp-check-<device>-tp<N>-<date>.{json,md} here")
    ap.add_argument("--memory", action="store_true", help="print the memory plan per model and TP size (no ranks started)")
    a = ap.parse_args(argv)
    if a.memory:
        print(memory_markdown(memory_plan()))
        return 0
    cfg = TPCheckConfig(tp=a.tp, device=a.device, families=[f for f in a.families.split(",") if f],
                        methods=[m for m in a.methods.split(",") if m], new_tokens=a.new_tokens,
                        logit_tol=a.logit_tol, out=a.out)
    report = run_check(cfg)
    md = markdown(report)
    print(md)
    if cfg.out:
        stem = Path(cfg.out) / f"tp-check-{cfg.device}-tp{cfg.tp}-{time.strftime('%Y-%m-%d')}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
        stem.with_suffix(".md").write_text(md)
    return 1 if report["overall"] == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())
