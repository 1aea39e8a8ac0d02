"""LLaVA-1.5: the official code and ours on the same tiny weights (:mod:`parity.build`), case by case.

Both sides get the same questions and image files. The official worker (``.venv-official``) builds the prompt with
``conv_templates['vicuna_v1']``, the ids with ``tokenizer_image_token`` and the pixels with ``process_images``
(pad to square), loads the model with ``load_pretrained_model`` and runs the prefill and ``generate``; for FlowCut
it calls ``flowcut.flowcut(model, T)`` and records the kept patches after every CLIP layer that cut. Ours loads the
mapped transformers 5 checkpoint with :func:`llava.load`, builds the batch with our processor and runs the same,
FlowCut in its reference mode (``numerics="official"``) with the official batch max (``batch_max=True``: the official
adaptive amount is the max over the images of one tower call).

Precisions (``dtype``):

- ``fp32``: both sides in fp32 (the official model loaded by its builder, then ``model.float()`` and LLaMA's RoPE
  tables rebuilt in fp32, see the worker); logits within 1e-5, greedy tokens identical.
- ``fp16``: as the official builder loads a model off CUDA and the eval scripts run it (LLM and projector fp16, the
  CLIP tower fp32: ``device_map='auto'`` leaves it uncast; pixels handed over in fp16, the tower output cast back to
  fp16 before the projector); ours ``dtype="float16", vision_dtype="float32"``, whose processor rounds the pixels to
  fp16 as the official scripts pass them (``rt.processor.pixel_dtype``; the harness does not cast them itself, so the
  fp16 prep check tests that rounding). Greedy tokens identical (logits are reported, not bounded: fp16 GEMMs).
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from . import adapters
from .build import QUESTIONS
from .differ import token_differences, top2
from .jobs import Job, JobFailed, Runner, failed_check, run_job
from .report import Check
from .step_logits import record_top2, stacked

#: where ``python -m parity`` looks for a clone of an adapter's repository when no ``--official-path`` is given
#: (scripts/official_clones.sh puts them there)
CLONES = Path(__file__).resolve().parents[1] / ".official"


#: the batches every comparison runs: each image alone, then all four in one left-padded batch
def batches(n_cases: int) -> list[list[int]]:
    return [[i] for i in range(n_cases)] + [list(range(n_cases))]


def cases(info: dict) -> list[dict]:
    return [{"question": q, "image": img} for q, img in zip(QUESTIONS, info["images"])]


def official_job(info: dict, official_python: str, dtype: str, methods: list[dict], max_new_tokens: int,
                 work: Path, official_path: str | None = None) -> Job:
    """The official worker's job for ``methods`` in ``dtype`` (the CLIP tower folder the model's config names is one
    of its inputs)."""
    job = {"kind": "run", "model": info["official"], "dtype": dtype, "cases": cases(info),
           "batches": batches(len(info["images"])), "methods": methods, "max_new_tokens": max_new_tokens,
           "official_path": official_path}
    name = f"llava15-{dtype}-" + "-".join(m["name"] + str(m.get("budget", "")) for m in methods)
    return Job(name, official_python, job, Path(work), inputs=(info["clip"],) if "clip" in info else ())


def official(info: dict, official_python: str, dtype: str, methods: list[dict], max_new_tokens: int,
             work: Path, official_path: str | None = None, runner: Runner | None = None) -> dict:
    """:func:`official_job`'s output (run now, or resumed)."""
    return run_job(official_job(info, official_python, dtype, methods, max_new_tokens, work, official_path), runner)


def our_method(name: str, budget: int, dtype: str, info: dict | None = None) -> tuple[str, dict]:
    """Adapter ``name``'s (our method, options) for ``budget`` and the precision (``ours(budget, dtype=...)`` when the
    adapter takes it; ``info=``, the built folders' paths of :func:`parity.build.build`, when it takes that: e.g.
    CDPruner's CLIP text tower in ``clip/``); ``options["budget"]``, when there, replaces the budget (None: an
    adaptive method)."""
    import inspect

    fn = adapters.get(name).ours
    params = inspect.signature(fn).parameters
    extra = {k: v for k, v in (("dtype", dtype), ("info", info)) if k in params}
    method, options = fn(budget, **extra)
    return method, dict(options)


def tower_attention(vision_attn: str, load: dict) -> str:
    """Our CLIP tower's ``attn_implementation`` for ``--vision-attn`` and our load options. ``eager`` stands for
    transformers 4.36's ``CLIPAttention``: ``q_proj(x) * scale``, ``bmm``, the softmax **in the tower's dtype**.
    transformers 5's eager attention takes that softmax in fp32 and rounds it once; in an fp32 tower the two are one
    arithmetic, in an fp16 tower (a fork whose builder casts the tower: ``vision_dtype=None`` under an fp16 LLM)
    they part by an fp16 ulp wherever the half softmax rounds otherwise (PruMerge's seed-4 image 0: the tower's
    hidden states from layer 1 on, the [CLS] row's order of patches 54 and 63). There ``eager`` loads
    ``python_sdpa`` (:mod:`llava.python_sdpa`: the same products, scaled by a power of two, and ``torch.softmax``
    in the tower's dtype), which gives 4.36's fp16 tower bit for bit."""
    fp16_tower = load.get("dtype") == "float16" and load.get("vision_dtype") is None
    return "python_sdpa" if vision_attn == "eager" and fp16_tower else vision_attn


def ours(info: dict, dtype: str, methods: list[dict], max_new_tokens: int, vision_attn: str = "eager") -> list[dict]:
    import llava

    half = dtype == "fp16"
    # transformers 4.36's CLIP has one attention, the eager one: the tower on eager (the LLM on SDPA, as 4.36's LLaMA)
    attn = {"": "sdpa", "text_config": "sdpa", "vision_config": vision_attn}
    load = {"dtype": "float16" if half else "float32", "vision_dtype": "float32" if half else None}
    extra: dict = {}
    for m in methods:  # an adapter's load options for this precision (e.g. a fork that casts the tower to fp16)
        for k, v in getattr(adapters.get(m["name"]), "OURS_LOAD", {}).get(dtype, {}).items() if m["name"] != "none" \
                else ():
            if k in extra and extra[k] != v:
                raise ValueError(f"parity: the adapters of {[m['name'] for m in methods]} load our model differently "
                                 f"({k}); run them one at a time")
            extra[k] = v
    llm_attn = extra.pop("attn_implementation", None)  # an adapter's LLM attention (a fork's own attention code)
    if llm_attn is not None:
        attn = {**attn, "": llm_attn, "text_config": llm_attn}
    # an adapter whose official tower is transformers' own CLIP on SDPA (OFFICIAL["worker"] = "hf"), not 4.36's
    vision_attn = extra.pop("vision_attn", vision_attn)
    attn["vision_config"] = tower_attention(vision_attn, {**load, **extra})
    rt = llava.load(info["hf"], attn_implementation=attn, **{**load, **extra})
    out = []
    for method in methods:
        if method["name"] == "none":
            rt.unprune()
        else:
            name, options = our_method(method["name"], method["budget"], dtype, info)
            budget = options.pop("budget", method["budget"])  # an adaptive method: None
            rt.prune(name, budget, **options)
        for batch in method.get("batches", batches(len(info["images"]))):
            cs = [cases(info)[c] for c in batch]
            kept: list = []
            finish = None
            if method["name"] != "none":
                finish = adapters.get(method["name"]).record_ours(rt, kept)
            inputs = rt.processor([c["question"] for c in cs], [c["image"] for c in cs])
            # fp16: the processor rounds the pixels itself (load(vision_dtype=) under a half-precision LLM:
            # rt.processor.pixel_dtype), as the official eval scripts hand them over (images.to(dtype=torch.float16))
            pixels = inputs["pixel_values"]
            with torch.inference_mode():
                logits = rt.model(**inputs).logits.float()
                if finish is not None:
                    finish(len(batch))
                n_prefill = len(kept)
                steps: list = []
                hook = record_top2(rt.model, steps)
                gen = rt.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                hook.remove()
            width = inputs["input_ids"].shape[1]
            out.append({"method": method, "batch": batch, "input_ids": inputs["input_ids"],
                        "attention_mask": inputs["attention_mask"], "pixel_values": pixels.float(), "logits": logits,
                        "tokens": gen[:, width:].tolist(), "top2": stacked(steps), "kept": kept[:n_prefill],
                        "image_token_id": info["image_token_id"]})
    rt.unprune(detach=True)
    return out


def _collapse(ids: list[int], image_token_id: int) -> list[int]:
    """Our ids with each run of image tokens as one -200, the official IMAGE_TOKEN_INDEX."""
    res: list[int] = []
    for t in ids:
        if t == image_token_id:
            if not res or res[-1] != -200:
                res.append(-200)
        else:
            res.append(t)
    return res


def logits_and_tokens(o: dict, m: dict, diffs: list[float], eos: int | None, logits_atol: float | None,
                      dtype: str) -> tuple[bool, str, dict]:
    """The logits / greedy-token part of one run's check: the official tokens without the BOS ``generate`` puts first
    (where it made them longer than ours) and both cut at the end of sequence; ok when the tokens are identical and
    the worst of ``diffs`` is within ``logits_atol`` (None: not bounded). Where the tokens part: each such sample's
    first differing step with both sides' top-2 logits there and the tie verdict in ``dtype`` (:mod:`parity.differ`).
    Returns (ok, detail, data)."""
    worst = max(diffs)
    bos = o.get("bos")
    lead = [int(bool(t) and t[0] == bos and len(t) > len(mt)) for t, mt in zip(o["tokens"], m["tokens"])]
    off_tokens = [_strip(t[k:], eos) for t, k in zip(o["tokens"], lead)]
    my_tokens = [_strip(t, eos) for t in m["tokens"]]
    tok_ok = off_tokens == my_tokens
    ok = tok_ok and (logits_atol is None or worst <= logits_atol)
    detail = f"logits max abs diff {worst:.2e}" + (f" (bound {logits_atol:g})" if logits_atol is not None else "")
    detail += f", greedy tokens {'identical' if tok_ok else 'DIFFER'}"
    data = {"official_tokens": off_tokens, "our_tokens": my_tokens, "logits_max_abs_diff": diffs}
    if not tok_ok:
        clauses, data["first_difference"] = token_differences(
            o["batch"], off_tokens, my_tokens,
            lambda r, j: top2(o.get("top2"), len(o["tokens"][r]), r, j, lead[r]),
            lambda r, j: top2(m.get("top2"), len(m["tokens"][r]), r, j), dtype)
        detail += f" ({clauses})"
    return ok, detail, data


def _strip(tokens: list[int], eos: int | None) -> list[int]:
    """Generated tokens up to and including the first eos (after it, both sides only pad)."""
    return tokens[: tokens.index(eos) + 1] if eos is not None and eos in tokens else tokens


def compare(off: dict, mine: list[dict], dtype: str, logits_atol: float | None, eos: int | None) -> list[Check]:
    checks = []
    for o, m in zip(off["runs"], mine):
        meth = o["method"]["name"] + (f" T={o['method']['budget']}" if o["method"].get("budget") is not None else "")
        case = f"{dtype} {meth} batch {o['batch']}"
        if meth == "none" and not off.get("handed_over"):
            # prompts and pixels: the same for every method; checked once per batch and precision (not where our ids
            # and pixels were handed to the official side: an official code on transformers' own classes)
            ours_ids = [_collapse(row[mask.bool()].tolist(), m["image_token_id"])
                        for row, mask in zip(m["input_ids"], m["attention_mask"])]
            ids_ok = ours_ids == o["ids"]
            pix = (o["pixel_values"] - m["pixel_values"]).abs().max().item()
            checks.append(Check("prep", case, ids_ok and pix == 0,
                                f"ids {'identical' if ids_ok else 'differ'}, pixels max abs diff {pix:.3g}",
                                {"official_ids": o["ids"], "our_ids": ours_ids}))
        # logits at the real (unpadded) positions of each sample; both sides left-pad
        lens = m["attention_mask"].sum(1).tolist()
        diffs = []
        for i, n in enumerate(lens):
            extra = m["logits"].shape[1] - (m["input_ids"].shape[1])  # 0: the ids are already expanded
            n_full = n + extra
            a = o["logits"][i, -n_full:]
            b = m["logits"][i, -n_full:]
            diffs.append((a - b).abs().max().item() if a.shape == b.shape else float("inf"))
        ok, detail, data = logits_and_tokens(o, m, diffs, eos, logits_atol, dtype)
        group = "unpruned" if meth == "none" else o["method"]["name"]
        if meth != "none":
            o_kept = [(i, k.tolist()) for i, k in o["kept"]]
            m_kept = [(i, k.tolist()) for i, k in m["kept"]]
            kept_ok = o_kept == m_kept
            ok = ok and kept_ok
            detail += f", {kept_detail(o_kept)} {'identical' if kept_ok else 'DIFFER'} ({stages(o_kept)})"
            data.update(official_kept=o_kept, our_kept=m_kept)
        checks.append(Check(group, case, ok, detail, data))
    return checks


def kept_detail(kept: list) -> str:
    """What the kept entries are: patches after CLIP layers (integer stages) or indices per named stage."""
    return "kept patches per CLIP layer" if all(isinstance(i, int) for i, _ in kept) else "kept indices per stage"


def stages(kept: list) -> str:
    """``L1: 49, llm2: 16``: each stage and the first sample's kept count there."""
    return ", ".join(f"{'L' if isinstance(i, int) else ''}{i}: {len(k[0])}" for i, k in kept)


def clone_for(name: str, official_path: str | None, clones: Path = CLONES) -> str | None:
    """The clone adapter ``name`` runs on: ``official_path`` when given, else ``clones/<name>`` when it exists
    (scripts/official_clones.sh), else None (the installed official code). Raises ValueError with what to do when
    the adapter needs a clone and has none, or the clone lacks the adapter's folders."""
    if name == "none":
        return None  # the unpruned model: always the installed official code (a method's tree may need its switch)
    root = official_path
    if root is None and (clones / name).is_dir():
        root = str(clones / name)
    problem = adapters.clone_problem(name, root)
    if problem:
        raise ValueError(problem)
    return None if root is None else adapters.official_root(name, root).rstrip("/")


#: the budgets compared when neither the command nor the adapter names others (``BUDGETS`` in an adapter: its
#: method's own budget unit, e.g. PyramidDrop's average tokens per layer)
DEFAULT_BUDGETS = (8, 16, 32)


def hf_legacy_folder(info: dict, work: Path) -> str:
    """``llava-1.5-tiny-hf`` as transformers 4.51 reads it (``llava-1.5-tiny-hf-4.51/``): the same tensors and config,
    the CLIP tower's keys under ``vision_tower.vision_model.`` (4.51's ``CLIPVisionModel``; transformers 5 saves the
    tower without that level). Written once per build."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, dst = Path(info["hf"]), work / "llava-1.5-tiny-hf-4.51"
    if not (dst / "model.safetensors").exists():
        dst.mkdir(parents=True, exist_ok=True)
        sd = load_file(src / "model.safetensors")
        sd = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
              for k, v in sd.items()}
        for f in src.iterdir():
            if f.name != "model.safetensors":
                shutil.copy(f, dst / f.name)
        save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return str(dst)


def official_hf(info: dict, hf_python: str, dtype: str, mine: list[dict], max_new_tokens: int, work: Path,
                official_path: str, eos: int | None, runner: Runner | None = None) -> dict:
    """The official side of an adapter whose official code is transformers' own Llava classes in a fork
    (``OFFICIAL["worker"] = "hf"``, ``parity/official_worker_hf.py`` in ``hf_python``, the Qwen official environment):
    the runs of ``mine`` (ours, already run) with our ids, mask and pixels handed over."""
    work.mkdir(parents=True, exist_ok=True)
    name = f"llava15-hf-{dtype}-" + "-".join(sorted({m["method"]["name"] for m in mine}))
    inputs = work / f"{name}.inputs.pt"
    torch.save([{"input_ids": m["input_ids"], "attention_mask": m["attention_mask"],
                 "pixel_values": m["pixel_values"]} for m in mine], inputs)
    job = {"kind": "run_hf", "model": hf_legacy_folder(info, work), "dtype": dtype, "inputs": str(inputs),
           "runs": [{"method": m["method"], "batch": m["batch"]} for m in mine], "max_new_tokens": max_new_tokens,
           "image_token_id": info["image_token_id"], "pad_token_id": eos, "official_path": official_path}
    return run_job(Job(name, hf_python, job, work, worker="official_worker_hf.py"), runner)


#: the Python of the official environment that runs transformers-based official codes (scripts/official_env.sh qwen)
HF_PYTHON = Path(__file__).resolve().parents[1] / ".venv-official-qwen" / "bin" / "python"


def run(info: dict, official_python: str, work: Path, dtypes=("fp32", "fp16"), budgets=None,
        max_new_tokens: int = 8, vision_attn: str = "eager", methods=("flowcut",),
        official_path: str | None = None, clones: Path = CLONES, hf_python: str | None = None,
        runner: Runner | None = None) -> list[Check]:
    """Every LLaVA-1.5 check: for each precision, the unpruned model and each method at each budget, each image
    alone and all in one batch (or each alone, where the adapter says the official code cannot run a left-padded
    batch). Each method runs on its adapter's official code: ``official_path`` when given, else its clone under
    ``clones`` (``.official/<name>``), else the installed official packages; one official process per clone, since
    each ships its own ``llava``. ``vision_attn``: our tower's attention ("eager", 4.36's CLIP arithmetic:
    bit-identical logits in fp32; "sdpa", our default: within ~1.2e-5 on these weights). An adapter whose official
    code is transformers' own Llava classes (``OFFICIAL["worker"] = "hf"``: IVC-Prune's fork) runs in ``hf_python``
    (default: ``.venv-official-qwen``) with its own unpruned row, our ids and pixels handed over. ``runner``: the
    official jobs' (:class:`parity.jobs.Runner`: N at a time, resumed; default one of its own); a failed job is one
    failing check ("official-job"), the others run on."""
    import transformers as tf

    for m in methods:
        adapters.get(m)  # refuses a method without an adapter
    hf = {m for m in methods if getattr(adapters.get(m), "OFFICIAL", {}).get("worker") == "hf"}
    hf_python = str(hf_python or HF_PYTHON)
    if hf and not Path(hf_python).exists():
        raise ValueError(f"{', '.join(sorted(hf))}: the official code runs on transformers' own classes in the Qwen "
                         f"official environment; none at {hf_python} (bash scripts/official_env.sh qwen)")
    eos = tf.AutoTokenizer.from_pretrained(info["hf"]).eos_token_id
    roots = {m: clone_for(m, official_path, clones) for m in methods}
    n = len(info["images"])
    todo = [{"name": "none"}]
    for m in methods:
        extra = getattr(adapters.get(m), "OFFICIAL", {})
        for t in budgets or getattr(adapters.get(m), "BUDGETS", DEFAULT_BUDGETS):
            spec = {"name": m, "budget": t}
            if extra.get("alone"):
                spec["batches"] = [[i] for i in range(n)]
            if extra.get("padding_side"):
                spec["padding_side"] = extra["padding_side"]
            todo.append(spec)
    # one official job per clone and tower; the unpruned model on the installed code (llava-torch). An adapter
    # whose official code hard-codes CLIP-L/336's 24 x 24 grid (``GRID = 24``) runs on weights with that grid, and
    # the unpruned model is compared there too.
    grid_of = {m: getattr(adapters.get(m), "GRID", None) for m in methods}
    default_grid = info["tower"]["image_size"] // info["tower"]["patch_size"] if "tower" in info else None
    grids = {g for g in grid_of.values() if g not in (None, default_grid)}
    infos = {None: info, default_grid: info}
    for g in sorted(grids):
        from .build import build_for

        infos[g] = build_for(g, work, official_python, seed=info.get("seed", 0), runner=runner)
    groups: dict = {}
    for g in [None, *sorted(grids)]:
        if g is None or g in grids:
            groups.setdefault((None, g), []).append({"name": "none"})
    for spec in todo[1:]:
        g = grid_of[spec["name"]] if grid_of[spec["name"]] in grids else None
        key = (roots[spec["name"]], g)
        if spec["name"] in hf and key not in groups:  # the fork's own unpruned model first
            groups[key] = [{"name": "none"}]
        groups.setdefault(key, []).append(spec)
    with (nullcontext(runner) if runner else Runner()) as runner:
        # every official job first (they run on the runner's threads while ours run here), then group by group: ours,
        # the official output, the comparison. An adapter on transformers' own classes (hf) needs ours first: its
        # official side gets our ids and pixels
        plan = []
        for dtype in dtypes:
            for (root, g), specs in groups.items():
                # an adapter whose official code cannot run in a precision (ApET: fp16 only) names its DTYPES
                skip = sorted({sp["name"] for sp in specs if sp["name"] != "none"
                               and dtype not in getattr(adapters.get(sp["name"]), "DTYPES", (dtype,))})
                for name in skip:
                    print(f"parity: {name} not compared in {dtype}: its official code cannot run there "
                          f"(parity/adapters/{name}.py DTYPES)", file=sys.stderr)
                specs = [sp for sp in specs if sp["name"] not in skip]
                if not specs:
                    continue
                job = None if any(sp["name"] in hf for sp in specs) else official_job(
                    infos[g], official_python, dtype, specs, max_new_tokens, work / (f"grid{g}" if g else ""), root)
                plan.append((dtype, root, g, specs, None if job is None else runner.submit(job)))
        checks = []
        for dtype, root, g, specs, future in plan:
            try:
                if future is not None and future.done():
                    future.result()  # a job that failed already: ours is not run for it
                mine = ours(infos[g], dtype, specs, max_new_tokens, vision_attn)
                off = future.result() if future is not None else official_hf(
                    infos[g], hf_python, dtype, mine, max_new_tokens, work / "hf", root, eos, runner)
            except JobFailed as e:
                checks.append(failed_check(f"{dtype} " + " ".join(sorted({sp["name"] for sp in specs})), e))
                continue
            for c in compare(off, mine, dtype, 1e-5 if dtype == "fp32" else None, eos):
                if g:  # the 24 x 24 tower's rows: named apart from the default tower's
                    c.case = f"grid{g} {c.case}"
                if off.get("handed_over"):  # a fork of transformers' own classes: its rows named apart
                    c.case = f"hf {c.case}"
                checks.append(c)
    return checks
