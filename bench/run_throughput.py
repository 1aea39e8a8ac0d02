"""The main job's pace: ``eval run gqa`` timed end to end on a GQA-layout data root of real-size JPEGs.

    python -m bench.run_throughput                                  # this CPU: the run-cpu model, 0 and 4 workers
    python -m bench.run_throughput --model shape:llava-1.5-7b --dtype float16 --device cuda \\
        --methods none,consensusdrop --budget 64 --fast off,on --loader-workers 4 --questions 300 --out DIR

1. A data root in GQA's layout (``gqa/llava_gqa_testdev_balanced.jsonl``, ``gqa/data/images/*.jpg`` and the
   official question file for the scorer) with ``--questions`` questions over generated photo-like JPEGs of
   ``--image-size`` (GQA's and COCO's are about 640 x 480), one image per ``--questions-per-image`` questions.
2. The host work one question costs in the answering loop (image read + decode, the processor), timed here.
3. Per method and path (eager / fast): the device's own pace, measured in this process on the run's first
   questions: TTFT (``generate`` of 1 token) and TPOT (the extra time per forced token), so that the rate the
   device allows is 1 / (TTFT + (answer tokens - 1) x TPOT), answer tokens = the run's mean.
4. Per method, path and ``--loader-workers``: ``python -m eval run gqa`` as a user runs it (a process of its own,
   ``--no-wandb``, ``--overwrite``), and its results.json ``throughput`` (the loop ledger, eval/throughput.py):
   questions/s, host-wait share, device-busy share, the compile / capture batches apart.

The report (``OUT/run_throughput.md`` and ``.json``) gives each run's questions/s beside the rate its TTFT and TPOT
allow, and the GQA testdev-balanced run (12,578 questions) it extrapolates to.

``--max-new-tokens`` (default 3): GQA's answers are a word or two (2-3 tokens with the end of sequence); a model
with random weights (``shape:`` / the CPU model) never ends its answer, so the runs cap it there. On a CPU the
runs' answering loop gets ``--threads`` threads (default 1) and the loader workers the other cores: the CPU is then
both the device and the host, as a GPU run's host has its own cores.

A benchmark, not a test: timings on a shared machine scatter; each row says what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from eval.provenance import short_commit

ROOT = Path(__file__).resolve().parents[1]
#: GQA testdev-balanced, the LLaVA-1.5 evaluation's question count (eval.table.FULL_QUESTIONS)
GQA_TESTDEV = 12578
#: the CPU's default model: LLaVA-1.5's 336 px geometry, narrow (integrations.vllm.tiny SIZES["run-cpu"])
CPU_MODEL = "run-cpu"
QUESTIONS = ["Is the sky blue?", "What color is the car?", "Which side is the dog on?", "What is on the table?",
             "Are there any chairs?", "Is the man wearing a hat?", "What is the woman holding?",
             "Is the door open or closed?", "How large is the window?", "What animal is on the grass?"]
SUFFIX = "\nAnswer the question using a single word or phrase."


# ---------------------------------------------------------------------------------------------------------------
# 1. the data
# ---------------------------------------------------------------------------------------------------------------


def photo(seed: int, size: tuple[int, int]):
    """A photo-like RGB picture (smooth gradients, a few shapes, fine texture and sensor noise): its JPEG at quality 90
    is about the size of a COCO / GQA photo of the same pixels (~150 KB at 640 x 480) and decodes in about its time;
    plain noise would not compress, a flat picture would decode too fast."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    w, h = size
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([rng.uniform(40, 200) + rng.uniform(-60, 60) * x / w + rng.uniform(-60, 60) * y / h
                     for _ in range(3)], -1)
    img = Image.fromarray(np.clip(base, 0, 255).astype("uint8"))
    d = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.randint(0, w), rng.randint(0, h)
        box = [x0, y0, x0 + rng.randint(2, max(w // 3, 3)), y0 + rng.randint(2, max(h // 3, 3))]
        fill = tuple(int(c) for c in rng.randint(0, 255, 3))
        (d.ellipse if rng.rand() < 0.5 else d.rectangle)(box, fill=fill)
    texture = np.asarray(Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).filter(ImageFilter.GaussianBlur(1.2)))
    px = np.asarray(img, dtype=np.float32) + (texture.astype(np.float32) - 128) + rng.normal(0, 10, (h, w, 3))
    return Image.fromarray(np.clip(px, 0, 255).astype("uint8"))


def make_data(root: Path, n: int, size: tuple[int, int] = (640, 480), per_image: int = 1) -> Path:
    """``n`` GQA questions over ``ceil(n / per_image)`` JPEGs under ``root`` (GQA's layout, as eval reads it);
    kept when a previous call made the same."""
    stamp = root / "gqa" / "made.json"
    want = {"questions": n, "size": list(size), "per_image": per_image}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return root
    img_dir = root / "gqa" / "data" / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows, official = [], {}
    for i in range(n):
        name = f"r{i // per_image:06d}"
        if i % per_image == 0:
            photo(i // per_image, size).save(img_dir / f"{name}.jpg", quality=90)
        q = QUESTIONS[i % len(QUESTIONS)]
        qid = f"{100000 + i}"
        rows.append({"question_id": qid, "image": f"{name}.jpg", "text": q + SUFFIX})
        official[qid] = {"question": q, "answer": "yes", "isBalanced": True, "imageId": name,
                         "types": {"structural": "verify"}}
    (root / "gqa" / "llava_gqa_testdev_balanced.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "gqa" / "data" / "testdev_balanced_questions.json").write_text(json.dumps(official))
    stamp.write_text(json.dumps(want))
    return root


# ---------------------------------------------------------------------------------------------------------------
# 2., 3. the host's work per question, the device's pace
# ---------------------------------------------------------------------------------------------------------------


def cpu_model(folder: Path) -> str:
    """The CPU model's checkpoint (built once under ``folder``)."""
    from integrations.vllm.tiny import save_tiny_llava

    path = folder / "run-cpu-model"
    if not (path / "config.json").exists():
        save_tiny_llava(path, size=CPU_MODEL)
    return str(path)


def _questions(data: Path, k: int) -> list:
    from eval.benchmarks import get_benchmark

    return get_benchmark("gqa", str(data)).load()[:k]


def host_per_question(rt, data: Path, k: int = 20) -> dict:
    """The loop's host work for one question, in ms (median of ``k``): the image read and decoded, the processor."""
    from llava.preprocess import load_image

    read, proc = [], []
    for q in _questions(data, k):
        t0 = time.perf_counter()
        img = load_image(q.load_image())
        t1 = time.perf_counter()
        rt.processor([q.text], images=[img])
        t2 = time.perf_counter()
        read.append(t1 - t0)
        proc.append(t2 - t1)
    r, p = statistics.median(read) * 1e3, statistics.median(proc) * 1e3
    return {"read_ms": round(r, 2), "processor_ms": round(p, 2), "total_ms": round(r + p, 2), "questions": k}


def _sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def device_pace(args, model: str, method: str, fast: bool, data: Path, k: int = 8, tokens: int = 16) -> dict:
    """TTFT and TPOT (ms, medians over ``k`` of the run's questions) of ``method`` on one path, measured after a
    warm-up of each question (the fast path's compiles / captures are not in them): TTFT = ``generate`` of one
    token, TPOT = (``generate`` of ``tokens`` forced tokens - TTFT) / (tokens - 1)."""
    import torch

    from llava.models import load
    from llava.preprocess import load_image

    t_load = time.perf_counter()
    rt = load(model, dtype=args.dtype, device=args.device, fast=fast, fast_backend=_fast_backend(args),
              fast_max_new_tokens=max(tokens, args.max_new_tokens))
    rt.prune(method, None if method == "none" else args.budget)
    batches = [rt.processor([q.text], images=[load_image(q.load_image())], device=args.device)
               for q in _questions(data, k)]
    t_warm = time.perf_counter()

    def gen(b, n):
        _sync(args.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            rt.model.generate(**b, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1)
        _sync(args.device)
        return time.perf_counter() - t0

    for b in batches:  # warm-up: every bucket compiled / captured, every kernel loaded
        gen(b, tokens)
        gen(b, 1)
    t_timed = time.perf_counter()
    ttft = [gen(b, 1) for b in batches]
    full = [gen(b, tokens) for b in batches]
    out = {"ttft_ms": round(statistics.median(ttft) * 1e3, 3),
           "tpot_ms": round(statistics.median([(f - t) / (tokens - 1) for f, t in zip(full, ttft)]) * 1e3, 3),
           "inputs": len(batches), "tokens": tokens, "load_s": round(t_warm - t_load, 2),
           "warmup_s": round(t_timed - t_warm, 2),
           "path": rt.engine.stats.path if getattr(rt.engine, "stats", None) is not None else None}
    del rt, batches
    if str(args.device).startswith("cuda"):
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------------------------
# 4. the runs
# ---------------------------------------------------------------------------------------------------------------


def _fast_backend(args) -> str:
    """The fast path's backend: as given; by default the capture backend on a GPU (graphs in seconds: a run of a few
    hundred questions does not pay Inductor's compile back), the fast path's own default elsewhere."""
    if args.fast_backend:
        return args.fast_backend
    return "cudagraphs" if str(args.device).startswith("cuda") else "auto"


def run_eval(args, model: str, method: str, fast: bool, workers: int, data: Path, out: Path, timeout: float) -> dict:
    """``python -m eval run gqa`` in a process of its own; its throughput (from results.json, or from the loop
    ledger when the run was cut by the time limit) and its process wall time."""
    from eval.throughput import summary

    name = f"{method}_{'fast' if fast else 'eager'}_w{workers}"
    cmd = [sys.executable, "-m", "eval", "run", "gqa", "--model", model, "--method", method, "--data-root", str(data),
           "--out", str(out), "--run-name", name, "--no-wandb", "--overwrite", "--max-new-tokens",
           str(args.max_new_tokens), "--loader-workers", str(workers), "--limit", str(args.questions)]
    if method != "none":
        cmd += ["--budget", str(args.budget)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.device:
        cmd += ["--device", args.device]
    if fast:
        cmd += ["--fast", "--fast-backend", _fast_backend(args)]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    if not str(args.device or "cpu").startswith("cuda"):
        env["OMP_NUM_THREADS"] = str(args.threads)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    run_dir = out / "gqa" / name
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
        code, tail = p.returncode, p.stderr[-1500:]
    except subprocess.TimeoutExpired as e:
        code, tail = "timeout", (e.stderr or b"")[-1500:].decode(errors="replace") if isinstance(e.stderr, bytes) else ""
    wall = time.perf_counter() - t0
    res = run_dir / "results.json"
    tp = json.loads(res.read_text()).get("throughput") if res.exists() and code == 0 else summary(run_dir)
    row = {"method": method, "path": "fast" if fast else "eager", "loader_workers": workers, "exit": code,
           "process_wall_s": round(wall, 2), "run_dir": str(run_dir.relative_to(out.parent))}
    if tp is None:
        row["error"] = tail
        return row
    row["throughput"] = {k: v for k, v in tp.items() if k not in ("sessions", "note")}
    recs = [json.loads(ln) for p in sorted((run_dir / "answers").glob("*.jsonl")) for ln in p.read_text().splitlines()
            if ln.strip()]
    row["new_tokens_mean"] = round(statistics.mean(r["_eval"]["new_tokens"] for r in recs), 3) if recs else None
    row["paths"] = sorted({r["_eval"].get("path") for r in recs})
    if code != 0:
        row["error"] = tail
    return row


def _rate(pace: dict | None, tokens: float | None) -> float | None:
    """Questions/s the device allows: 1 / (TTFT + (answer tokens - 1) x TPOT)."""
    if not pace or tokens is None:
        return None
    return 1e3 / (pace["ttft_ms"] + max(tokens - 1, 0) * pace["tpot_ms"])


# ---------------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------------


def _f(v, d=2, unit=""):
    return "–" if v is None else f"{v:.{d}f}{unit}"


def _dur(s):
    return "–" if s is None else (f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s")


def render(rep: dict) -> str:
    a = rep["args"]
    h = rep["host"]
    on_gpu = str(a["device"] or "").startswith("cuda")
    threads = "" if on_gpu else f", the loop on {a['threads']} thread(s)"
    lines = [f"# The run at the device's pace: eval run gqa, {a['questions']} questions",
             "",
             f"{rep['device']}; model {rep['model']} ({a['dtype'] or 'default dtype'}); torch {rep['torch']}; "
             f"{rep['date']}; code {rep['git']}. Data: {a['questions']} generated {a['image_size']} JPEGs "
             f"(GQA's layout), {a['max_new_tokens']} new tokens at most; fast path backend {rep['fast_backend']}; "
             f"{rep['cores']} cores{threads}.",
             "",
             f"Host work per question in the loop (median of {h['questions']}): image read + decode {h['read_ms']} ms, "
             f"processor {h['processor_ms']} ms: **{h['total_ms']} ms**.",
             "",
             "| Method | Path | Loader workers | q/s | host wait | host wait / q (ms) | prepare / q (ms) | generate / q (ms) "
             "| device busy | answer tokens | TTFT / TPOT (ms) | device allows (q/s) | run / allowed | compile (s) "
             "| GQA testdev (12,578) |",
             "|" + "---|" * 15]
    for r in rep["runs"]:
        t = r.get("throughput")
        if t is None:
            lines.append(f"| {r['method']} | {r['path']} | {r['loader_workers']} | failed ({r['exit']}) |"
                         + " |" * 11)
            continue
        pace = rep["pace"].get(f"{r['method']}/{r['path']}")
        allowed = _rate(pace, r.get("new_tokens_mean"))
        qps = t["questions_per_s"]
        n = t["questions"]
        gen_q = t["generate_s"] / n * 1e3 if n else None
        full = None if not t.get("questions_per_s_without_compile") else (
            GQA_TESTDEV / t["questions_per_s_without_compile"] + t["compile_s"])
        pace_txt = "–" if not pace else f"{pace['ttft_ms']:.1f} / {pace['tpot_ms']:.1f}"
        no_compile = t.get("questions_per_s_without_compile")
        ratio = None if not allowed or not no_compile else no_compile / allowed
        lines.append(
            f"| {r['method']} | {r['path']} | {r['loader_workers']} | {_f(qps)} | {_f(100 * t['host_wait_fraction'], 1, ' %')} "
            f"| {_f(t['host_wait_s_per_question'] * 1e3, 1)} | {_f(t['prepare_s_per_question'] * 1e3, 1)} | {_f(gen_q, 1)} "
            f"| {_f(100 * t['device_busy_fraction'], 1, ' %')} | {_f(r.get('new_tokens_mean'), 1)} "
            f"| {pace_txt} | {_f(allowed)} | {_f(ratio)} "
            f"| {_f(t['compile_s'], 1)} | {_dur(full)} |")
    lines += ["",
              "q/s: questions answered per second of the answering loop (results.json 'throughput'; model loading and "
              "scoring not counted); host wait: the share of the loop the device waited for its inputs; prepare: the "
              "inputs' host work per question (in the loader workers, or in the loop at 0 workers); device busy: "
              "generate's share of the loop. TTFT / TPOT: measured in this process on the run's first questions after "
              "a warm-up; device allows = 1 / (TTFT + (answer tokens - 1) x TPOT); run / allowed compares the run's "
              "rate without its compile / capture batches with it. GQA testdev: 12,578 questions at the run's rate "
              "without compile, plus its compile time."]
    if rep.get("skipped"):
        lines += ["", "Not run (the time limit): " + ", ".join(rep["skipped"]) + "."]
    for r in rep["runs"]:
        if r.get("error"):
            lines += ["", f"{r['method']} {r['path']} w{r['loader_workers']} (exit {r['exit']}):", "```",
                      r["error"].strip()[-1200:], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run_throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=f"default: the CPU model ({CPU_MODEL}) on a CPU")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--device", default=None, help="default: cuda where available, else cpu")
    ap.add_argument("--methods", default="none,consensusdrop")
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--fast", default="off", help="off, on, or off,on (both paths)")
    ap.add_argument("--fast-backend", default=None, help="default: cudagraphs on a GPU, the fast path's auto elsewhere")
    ap.add_argument("--loader-workers", default="0,4", help="comma-separated counts, each a run")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--questions-per-image", type=int, default=1)
    ap.add_argument("--image-size", default="640x480")
    ap.add_argument("--max-new-tokens", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU runs: the answering loop's threads")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds for everything; runs not reached are listed")
    ap.add_argument("--out", default="runs/run-throughput")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    w, hgt = (int(x) for x in args.image_size.lower().split("x"))
    data = make_data(out / "data", args.questions, (w, hgt), args.questions_per_image)
    model = args.model or cpu_model(out)
    methods = [m for m in args.methods.split(",") if m]
    fasts = [{"off": False, "on": True}[f] for f in args.fast.split(",") if f]
    workers = [int(x) for x in args.loader_workers.split(",") if x != ""]

    def left():
        return None if args.time_limit is None else args.time_limit - (time.perf_counter() - t_start)

    if not str(args.device).startswith("cuda"):
        torch.set_num_threads(args.threads)
    from llava.models import load

    # the processor's host work (CPU tensors whatever the model's device); the model built on the run's device: a
    # 7B shape's random weights take a GPU seconds, a CPU over a minute
    rt = load(model, dtype=args.dtype, device=args.device)
    host = host_per_question(rt, data)
    del rt
    if str(args.device).startswith("cuda"):
        torch.cuda.empty_cache()
    rep = {"args": vars(args), "model": model if args.model else f"{CPU_MODEL} (integrations.vllm.tiny)",
           "device": (torch.cuda.get_device_name() if str(args.device).startswith("cuda") else f"CPU ({args.device})"),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "git": short_commit(), "cores": os.cpu_count(),
           "fast_backend": _fast_backend(args), "host": host, "pace": {}, "runs": [], "skipped": []}
    for method in methods:
        for fast in fasts:
            key = f"{method}/{'fast' if fast else 'eager'}"
            if left() is not None and left() < 30:
                rep["skipped"] += [f"{key} w{n}" for n in workers]
                continue
            try:
                rep["pace"][key] = device_pace(args, model, method, fast, data)
            except Exception as e:  # noqa: BLE001 - the runs still say what they can
                rep["pace"][key] = None
                rep.setdefault("pace_errors", {})[key] = f"{type(e).__name__}: {e}"
            for i, n in enumerate(workers):
                budget = left()
                if budget is not None:
                    budget = budget / (len(workers) - i)  # this method and path's runs share what is left
                    if budget < 20:
                        rep["skipped"].append(f"{key} w{n}")
                        continue
                rep["runs"].append(run_eval(args, model, method, fast, n, data, out / "runs", budget or 3600))
                print(json.dumps(rep["runs"][-1]), flush=True)
                (out / "run_throughput.json").write_text(json.dumps(rep, indent=1))
    (out / "run_throughput.json").write_text(json.dumps(rep, indent=1))
    (out / "run_throughput.md").write_text(render(rep))
    print((out / "run_throughput.md").read_text())
    return 0 if rep["runs"] and all(r["exit"] == 0 for r in rep["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
