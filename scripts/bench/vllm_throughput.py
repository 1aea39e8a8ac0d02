"""Throughput of the vLLM plugin against our HF engine, pruned and unpruned, on one machine in one run
(issue 30): requests per second for N image questions answered greedily, written as markdown + JSON.

    .venv-vllm/bin/python scripts/bench/vllm_throughput.py --out docs/results/vllm-throughput-cpu
        [--model DIR] [--size cpu-small] [--requests 32] [--max-new-tokens 16] [--budgets 64 144]
        [--methods visionzip consensusdrop] [--hf-batch 8] [--dtype float32]

Without --model a random-weight checkpoint of LLaVA-1.5's geometry (336 px, 576 tokens per image) and a small
LLM is written first (integrations/vllm/tiny.py SIZES). Rows: the HF engine (``rt.model.generate`` in batches of
--hf-batch), vLLM with the plugin (one ``generate`` call over all requests; vLLM batches them), and stock vLLM
(no plugin) for the unpruned row. Each cell is timed after one warm-up call on other requests. Greedy outputs of
the HF engine and vLLM with the plugin are compared (fp32: equal; said in the table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# vLLM's CPU worker binds its OpenMP threads (default: core 0, leaving one core free); in one process the binding
# also holds for the HF engine's runs after it: give both engines every core
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def images(n: int, seed: int):
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        w, h = 200 + 37 * (i % 5), 160 + 23 * (i % 7)
        out.append(Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()))
    return out


QUESTIONS = ["what is in the image?", "how many objects are there?", "what color is the largest shape?",
             "is there a circle on the left?"]


def requests(rt, imgs):
    """(prompt ids with one <image>, HF expanded ids, pixels) per image; the HF processor without pad-to-square,
    as vLLM's processor sees the image."""
    rt.processor.pad_to_square = False
    tok = rt.model.config.image_token_id
    out = []
    for i, img in enumerate(imgs):
        enc = rt.processor([QUESTIONS[i % len(QUESTIONS)]], images=[img])
        ids = enc["input_ids"][0].tolist()
        first, n = ids.index(tok), sum(1 for t in ids if t == tok)
        out.append((ids[:first] + [tok] + ids[first + n:], enc))
    return out


def time_hf(rt, method, budget, reqs, max_new, batch):
    import torch

    eng = rt.prune(method, budget) if method != "none" else rt.prune("none")
    outs = []

    def run(rs):
        res = []
        for a in range(0, len(rs), batch):
            chunk = rs[a:a + batch]
            enc = rt.processor([QUESTIONS[(a + j) % len(QUESTIONS)] for j in range(len(chunk))],
                               images=[c[2] for c in chunk])
            with torch.inference_mode():
                g = rt.model.generate(**enc, max_new_tokens=max_new, do_sample=False, num_beams=1)
            eos, pad = rt.tokenizer.eos_token_id, rt.tokenizer.pad_token_id
            for row in g[:, enc["input_ids"].shape[1]:].tolist():  # up to and including EOS, as vLLM returns it
                cut = next((i + 1 for i, t in enumerate(row) if t == eos), len(row))
                res.append([t for t in row[:cut] if t != pad or t == eos])
        return res

    run(reqs[:batch])  # warm-up
    t0 = time.perf_counter()
    outs = run(reqs)
    secs = time.perf_counter() - t0
    n_in = eng.stats.samples[0].visual_entering_llm
    eng.remove()
    return secs, outs, n_in


def time_vllm(model, method, budget, reqs, max_new, dtype, plugin=True):
    from vllm import LLM, SamplingParams

    from integrations.vllm import overrides

    kw = {"hf_overrides": overrides(model, method, budget)} if plugin else {}
    llm = LLM(model=model, dtype=dtype, enforce_eager=True, max_model_len=2048, seed=0,
              limit_mm_per_prompt={"image": 1}, **kw)
    sp = SamplingParams(temperature=0, max_tokens=max_new)
    rs = [{"prompt_token_ids": p, "multi_modal_data": {"image": img}} for p, img in reqs]
    llm.generate(rs[:4], sp, use_tqdm=False)  # warm-up (other requests are cached per (image, prompt): fine)
    t0 = time.perf_counter()
    outs = llm.generate(rs, sp, use_tqdm=False)
    secs = time.perf_counter() - t0
    n_prompt = len(outs[0].prompt_token_ids)
    res = [list(o.outputs[0].token_ids) for o in outs]
    del llm
    import gc

    gc.collect()
    return secs, res, n_prompt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output stem: writes <out>.md and <out>.json")
    ap.add_argument("--model", default=None)
    ap.add_argument("--size", default="cpu-small")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--methods", nargs="+", default=["visionzip", "consensusdrop"])
    ap.add_argument("--budgets", nargs="+", type=int, default=[64])
    ap.add_argument("--hf-batch", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args(argv)

    import torch
    import vllm

    from llava.models import load

    model = a.model
    if model is None:
        from integrations.vllm.tiny import save_tiny_llava

        model = str(save_tiny_llava(Path("/tmp") / f"vtprune_vllm_bench_{a.size}", size=a.size))
    rt = load(model, dtype=a.dtype)
    imgs = images(a.requests, 0)
    reqs = [(p, img, img) for (p, _), img in zip(requests(rt, imgs), imgs)]
    cells = [("none", None)] + [(m, b) for m in a.methods for b in a.budgets]
    rows = []
    for method, budget in cells:
        hf_s, hf_out, n_in = time_hf(rt, method, budget, reqs, a.max_new_tokens, a.hf_batch)
        v_s, v_out, n_prompt = time_vllm(model, method, budget, [(p, img) for p, img, _ in reqs], a.max_new_tokens,
                                         a.dtype)
        row = {"method": method, "budget": budget, "visual_tokens": n_in, "vllm_prompt_len": n_prompt,
               "torch_threads": torch.get_num_threads(),
               "hf_s": hf_s, "hf_req_per_s": a.requests / hf_s, "vllm_s": v_s, "vllm_req_per_s": a.requests / v_s,
               "greedy_equal": sum(x == y for x, y in zip(hf_out, v_out)), "requests": a.requests}
        if method == "none":
            s_s, _, _ = time_vllm(model, method, budget, [(p, img) for p, img, _ in reqs], a.max_new_tokens, a.dtype,
                                  plugin=False)
            row["stock_vllm_s"], row["stock_vllm_req_per_s"] = s_s, a.requests / s_s
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    env = {"date": time.strftime("%Y-%m-%d"), "machine": f"{cpu_name()}, {os.cpu_count()} CPU cores", "torch": torch.__version__, "vllm": vllm.__version__,
           "transformers": __import__("transformers").__version__, "model": model, "size": a.size,
           "dtype": a.dtype, "requests": a.requests, "max_new_tokens": a.max_new_tokens, "hf_batch": a.hf_batch,
           "device": "cuda" if torch.cuda.is_available() else "cpu"}
    lines = [f"# vLLM plugin vs HF engine: throughput ({env['device']}, {env['date']})", "",
             f"Machine: {env['machine']}; torch {env['torch']}, vllm {env['vllm']}, transformers {env['transformers']}; "
             f"model: LLaVA-1.5 geometry `{a.size}` (random weights, integrations/vllm/tiny.py), {a.dtype}; "
             f"{a.requests} image questions, up to {a.max_new_tokens} new tokens each (greedy); HF engine in batches of "
             f"{a.hf_batch}, vLLM one generate call. Command: `.venv-vllm/bin/python scripts/bench/vllm_throughput.py "
             f"--out {a.out}`.", "",
             "| method | budget | visual tokens | HF engine req/s | vLLM + plugin req/s | vLLM / HF | vs unpruned (HF) | vs unpruned (vLLM) | greedy equal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget'] if r['budget'] is not None else '-'} | {r['visual_tokens']} | "
                     f"{r['hf_req_per_s']:.2f} | {r['vllm_req_per_s']:.2f} | {r['vllm_req_per_s'] / r['hf_req_per_s']:.2f}x | "
                     f"{r['hf_req_per_s'] / base['hf_req_per_s']:.2f}x | {r['vllm_req_per_s'] / base['vllm_req_per_s']:.2f}x | "
                     f"{r['greedy_equal']}/{r['requests']} |")
    lines += ["", f"Stock vLLM (no plugin), unpruned: {base['stock_vllm_req_per_s']:.2f} req/s "
              f"(the plugin's unpruned row runs the vision stage on transformers' modules instead of vLLM's tower).", "",
              "On a CPU the numbers measure this machine's cores, not a GPU server: they show that the plugin's pruned "
              "prompts are shorter inside vLLM and what that buys here; GPU throughput is to be measured on one."]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
