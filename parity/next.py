"""LLaVA-NeXT (anyres, ``spatial_unpad``): the official code and ours on the same tiny weights
(:func:`parity.build.build_next`), case by case.

The official worker loads ``llava-v1.6-tiny`` (``image_aspect_ratio anyres``, ``mm_patch_merge_type spatial_unpad``)
with the official builder: ``process_images`` (``process_anyres_image``: best pinpoint, resize and pad, the crops,
the base image first), ``prepare_inputs_labels_for_multimodal`` (the crop grid re-assembled, ``unpad_image``, one
``image_newline`` per row). For FlowCut it calls ``flowcut.flowcut(model, T)``: int(T/2) patches per crop in the
tower, the kept crops packed by ``restore_image_features_sorted`` + ``unpad_mask`` (no newlines), and after decoder
layer 1 the image cut to T by the last prompt token's score (``keep_indices``, recorded by a hook on that layer).
Ours loads the mapped ``LlavaNextForConditionalGeneration`` with :func:`llava.load` and runs FlowCut with the
official NeXT recipe (``next_half=True, next_llm_stage=True``) in its reference mode with the official batch max.

Two variants of our side (``variants``), both our runtime on the same checkpoint (``info["hf"]``, the official
``image_grid_pinpoints`` list copied unchanged, as transformers' conversion writes it):

- ``stock``: ``llava.load(..., next_geometry="transformers")`` (the default: llava-hf's geometry, transformers'
  processor and forward).
- ``official``: ``llava.load(..., next_geometry="official")``: the two differences docs/parity.md traces fixed in
  our runtime - each pinpoint pair reversed in the model's config and the image processor (transformers reads a
  pinpoint as (height, width), the official code as (width, height); the set is the same, only a tie between two
  pinpoints breaks the other way) and our NeXT packing unpadding with the official truncation ``int(x)``
  (:func:`llava.families.llava_next.unpad_official`; transformers rounds: ``int(round(x, 7))``); the unpruned model
  then runs through our engine (``rt.engine_required``).

FlowCut's official NeXT LLM stage refuses left padding and its later layers cannot take a padded batch (the 2-D mask
it rebuilds after the cut reaches SDPA's 4-D check), so FlowCut runs each image alone; the unpruned model also runs
the left-padded batch of all images.

The other methods run through their adapters (``parity/adapters/<name>.py`` with ``NEXT = True``; the hooks are
documented in ``parity/adapters/__init__.py``): the official half is the adapter's own (``enable`` / ``record`` on
the clone's code, the same as for LLaVA-1.5, here on ``llava-v1.6-tiny``), one official process per clone; ours is
our runtime with ``next_geometry="official"`` only (the ``stock`` geometry differs from the official code by design),
loaded with the adapter's ``NEXT_LOAD`` (e.g. ``next_layout="spatial"``, the official NeXT packing of FasterVLM /
VisionZip), the method from ``ours_next`` (else ``ours``) and the kept indices from ``record_ours_next`` (else
:func:`record_vision_per_crop`: the vision stage's kept patches per crop, as the Theia forks' ``index_masks``).
Budgets are per crop (``NEXT_BUDGETS``), as the papers count NeXT; the rows are compared as for LLaVA-1.5
(:func:`compare_adapters`: the crops of each image, logits at every real position, fp32 bound 1e-5, greedy tokens,
the kept indices per stage and crop), grouped ``next-<name>``; each image alone and the left-padded batch of all,
unless the adapter's ``OFFICIAL`` says "alone". The adapters run on the ``official`` variant whatever ``variants``
says (the unpruned rows follow ``variants``).
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from . import adapters
from .build import QUESTIONS
from .jobs import Job, JobFailed, Runner, failed_check, run_job
from .adapters._ours import record_tower_cuts
from .llava15 import _collapse, logits_and_tokens
from .report import Check
from .step_logits import record_top2, stacked

#: our FlowCut options for the official NeXT recipe (``flowcut.flowcut(model, T)`` on an anyres model)
OURS = {"flowcut": {"numerics": "official", "batch_max": True, "next_half": True, "next_llm_stage": True}}
#: our side: ``llava.load(next_geometry=...)`` per variant
VARIANTS = ("stock", "official")
GEOMETRY = {"stock": "transformers", "official": "official"}


def batches(n_cases: int) -> list[list[int]]:
    return [[i] for i in range(n_cases)] + [list(range(n_cases))]


def cases(info: dict) -> list[dict]:
    return [{"question": QUESTIONS[i % len(QUESTIONS)], "image": img} for i, img in enumerate(info["images"])]


def methods_for(budgets, names=("flowcut",), n_cases: int = 4) -> list[dict]:
    alone = [[i] for i in range(n_cases)]
    return [{"name": "none"}] + [{"name": m, "budget": t, "padding_side": "right", "batches": alone}
                                 for m in names for t in budgets]


def official_job(info: dict, official_python: str, dtype: str, methods: list[dict], max_new_tokens: int, work: Path,
                 official_path: str | None = None) -> Job:
    """The official worker's job for ``methods`` on NeXT in ``dtype`` (the tower folder of ``clip-next/`` an input)."""
    job = {"kind": "run", "model": info["official"], "dtype": dtype, "cases": cases(info),
           "batches": batches(len(info["images"])), "methods": methods, "max_new_tokens": max_new_tokens,
           "official_path": official_path}
    name = f"next-{dtype}-" + "-".join(m["name"] + str(m.get("budget", "")) for m in methods)
    return Job(name, official_python, job, Path(work), inputs=(info["clip"],))


def official(info: dict, official_python: str, dtype: str, methods: list[dict], max_new_tokens: int, work: Path,
             official_path: str | None = None, runner: Runner | None = None) -> dict:
    """:func:`official_job`'s output (run now, or resumed)."""
    return run_job(official_job(info, official_python, dtype, methods, max_new_tokens, work, official_path), runner)


def _pixels_of(pv: torch.Tensor, sizes, config) -> list[torch.Tensor]:
    """Our (B, max_crops, 3, H, W) pixels as the official per-image (crops, 3, H, W) list (the zero crops our
    processor pads a batch with dropped)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    out = []
    for p, sz in zip(pv, sizes):
        c = image_size_to_num_patches(tuple(int(v) for v in sz), config.image_grid_pinpoints,
                                      config.vision_config.image_size)
        out.append(p[:c].float())
    return out


def ours(info: dict, dtype: str, methods: list[dict], max_new_tokens: int, vision_attn: str = "eager",
         variant: str = "stock") -> list[dict]:
    import llava

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}")
    half = dtype == "fp16"
    attn = {"": "sdpa", "text_config": "sdpa", "vision_config": vision_attn}
    out = []
    rt = llava.load(info["hf"], dtype="float16" if half else "float32", vision_dtype="float32" if half else None,
                    attn_implementation=attn, next_geometry=GEOMETRY[variant])
    all_cases = cases(info)
    for method in methods:
        if method["name"] == "none":
            rt.unprune()
        else:
            rt.prune(method["name"], method["budget"], **OURS[method["name"]])
        for batch in method.get("batches", batches(len(all_cases))):
            cs = [all_cases[c] for c in batch]
            kept: list = []
            if method["name"] != "none":
                record_tower_cuts(rt.engine.method, kept)
            inputs = rt.processor([c["question"] for c in cs], [c["image"] for c in cs])
            pixels = _pixels_of(inputs["pixel_values"], inputs["image_sizes"], rt.model.config)
            with torch.inference_mode():
                logits = rt.model(**inputs).logits.float()
                n_prefill = len(kept)
                llm_kept, per_layer = [], None
                if method["name"] != "none":
                    eng = rt.engine
                    per_layer = [list(s.visual_per_layer) for s in eng.stats.samples]
                    for b in range(len(batch)):
                        sel = eng.selections.get((0, b))
                        n_in = eng.stats.samples[b].visual_per_layer[0]
                        if sel is not None and n_in > method["budget"]:  # official: cut only when > T
                            llm_kept.append(sel.keep.tolist())
                steps: list = []
                hook = record_top2(rt.model, steps)
                gen = rt.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                hook.remove()
            width = inputs["input_ids"].shape[1]
            out.append({"method": method, "batch": batch, "input_ids": inputs["input_ids"],
                        "attention_mask": inputs["attention_mask"], "pixel_values": pixels,
                        "image_sizes": inputs["image_sizes"].tolist(), "logits": logits,
                        "tokens": gen[:, width:].tolist(), "top2": stacked(steps), "kept": kept[:n_prefill],
                        "llm_kept": llm_kept,
                        "visual_per_layer": per_layer, "image_token_id": info["image_token_id"],
                        "engine": rt.engine is not None, "next_geometry": rt.info.get("next_geometry", "transformers")})
    rt.unprune(detach=True)
    return out


def _pixel_diff(a: list, b: list) -> float:
    """Max abs difference of two per-image pixel lists; inf where the crop counts differ."""
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return float("inf")
        worst = max(worst, (x.float() - y.float()).abs().max().item())
    return worst


def _official_visual(o: dict, i: int) -> int:
    """The visual tokens of sample ``i`` entering the official LLM (alone: the prefill length minus the text)."""
    return o["layer_lengths"][0] - (len(o["ids"][i]) - 1)


def compare(off: dict, mine: list[dict], label: str, logits_atol: float | None, eos: int | None) -> list[Check]:
    """One check per run: ``next-prep`` (ids, pixels, the image sizes, the visual token count) for the unpruned
    runs, ``next-unpruned`` / ``next-flowcut`` (logits, greedy tokens; FlowCut: the kept patches per crop after
    every cutting CLIP layer, the LLM stage's kept set, the visual tokens entering each decoder layer)."""
    checks = []
    for o, m in zip(off["runs"], mine):
        if o["batch"] != m["batch"] or o["method"] != m["method"]:
            raise ValueError(f"runs out of step: official {o['method']} {o['batch']}, ours {m['method']} {m['batch']}")
        meth = o["method"]["name"] + (f" T={o['method']['budget']}" if "budget" in o["method"] else "")
        case = f"{label} {meth} batch {o['batch']}"
        n_vis_ours = (m["input_ids"] == m["image_token_id"]).sum(1).tolist()
        if meth == "none":
            ours_ids = [_collapse(row[mask.bool()].tolist(), m["image_token_id"])
                        for row, mask in zip(m["input_ids"], m["attention_mask"])]
            ids_ok = ours_ids == o["ids"]
            pix = _pixel_diff(o["pixel_values"], m["pixel_values"])
            crops = [(tuple(p.shape[:1]), tuple(q.shape[:1])) for p, q in zip(o["pixel_values"], m["pixel_values"])]
            sizes_ok = [list(s[::-1]) for s in o["image_sizes"]] == [list(s) for s in m["image_sizes"]]
            n_vis_off = [_official_visual(o, 0)] if len(o["batch"]) == 1 else None
            vis_ok = n_vis_off is None or n_vis_off == n_vis_ours
            ok = ids_ok and pix == 0 and sizes_ok and vis_ok
            detail = (f"ids {'identical' if ids_ok else 'differ'}, pixels max abs diff {pix:.3g}"
                      + (f" (crops official / ours {crops})" if pix == float("inf") else "")
                      + ("" if sizes_ok else ", image sizes DIFFER"))
            if n_vis_off is not None:
                detail += (f", visual tokens {n_vis_ours[0]}" if vis_ok else
                           f", visual tokens DIFFER: official {n_vis_off[0]}, ours {n_vis_ours[0]}")
            checks.append(Check("next-prep", case, ok, detail,
                                {"official_ids": o["ids"], "our_ids": ours_ids, "pixels_max_abs_diff": pix,
                                 "official_visual": n_vis_off, "our_visual": n_vis_ours}))
        diffs, shapes = [], []
        for i, n in enumerate(m["attention_mask"].sum(1).tolist()):
            # the last position (the first generated token's scores) always; every position when both rows have
            # the same length (an unpruned row; a FlowCut row after its LLM cut on both sides)
            a, b = o["logits"][i], m["logits"][i]
            n_off = a.shape[0] if len(o["batch"]) == 1 else None
            a_last, b_last = a[-1], b[-1]
            d = (a_last - b_last).abs().max().item()
            if n_off is not None and a.shape == b.shape:
                d = max(d, (a - b).abs().max().item())
            elif n_off is None:
                full = m["logits"].shape[1] - (m["input_ids"].shape[1] - n)
                d = (a[-full:] - b[-full:]).abs().max().item() if a.shape[0] >= full else float("inf")
            shapes.append((tuple(a.shape), tuple(b.shape)))
            diffs.append(d)
        ok, detail, data = logits_and_tokens(o, m, diffs, eos, logits_atol, label.split()[0])
        data.update(logits_shapes=shapes, our_engine=m.get("engine"), our_next_geometry=m.get("next_geometry"))
        if meth != "none":
            o_tower = [(i, k.tolist()) for i, k in o["kept"] if isinstance(i, int)]
            m_tower = [(i, k.tolist()) for i, k in m["kept"]]
            o_llm = [k.tolist()[0] for i, k in o["kept"] if not isinstance(i, int)]
            m_llm = m["llm_kept"]
            tower_ok, llm_ok = o_tower == m_tower, o_llm == m_llm
            o_layers = [[L - (len(o["ids"][0]) - 1) for L in o["layer_lengths"]]]
            m_layers = m["visual_per_layer"]
            layers_ok = o_layers == m_layers
            ok = ok and tower_ok and llm_ok and layers_ok
            per_crop = ", ".join(f"L{i}: {len(k[0])}" for i, k in o_tower)
            detail += (f", kept patches per crop after each cutting CLIP layer {'identical' if tower_ok else 'DIFFER'}"
                       f" ({per_crop}), LLM stage kept set {'identical' if llm_ok else 'DIFFERS'}"
                       f" ({len(o_llm[0]) if o_llm else 0} kept), visual tokens per decoder layer "
                       f"{'identical' if layers_ok else 'DIFFER'} ({o_layers[0]}"
                       + ("" if layers_ok else f" vs ours {m_layers[0] if m_layers else None}") + ")")
            data.update(official_kept=o_tower, our_kept=m_tower, official_llm_kept=o_llm, our_llm_kept=m_llm,
                        official_visual_per_layer=o_layers, our_visual_per_layer=m_layers)
        group = "next-unpruned" if meth == "none" else "next-" + o["method"]["name"]
        checks.append(Check(group, case, ok, detail, data))
    return checks


def next_methods() -> list[str]:
    """Every method ``python -m parity next`` compares: FlowCut (its own recipe here) and the adapters with
    ``NEXT = True``."""
    return sorted(set(OURS) | {n for n in adapters.names() if getattr(adapters.get(n), "NEXT", False)})


def adapter_specs(name: str, budgets, n_cases: int) -> list[dict]:
    """The official worker's method specs of adapter ``name`` on NeXT: one per budget (per crop), each image alone
    and the batch of all (or each alone, where the adapter's ``OFFICIAL`` says so)."""
    mod = adapters.get(name)
    extra = getattr(mod, "OFFICIAL", {})
    specs = []
    for t in budgets:
        spec = {"name": name, "budget": t,
                "batches": [[i] for i in range(n_cases)] if extra.get("alone") else batches(n_cases)}
        if extra.get("padding_side"):
            spec["padding_side"] = extra["padding_side"]
        specs.append(spec)
    return specs


def record_vision_per_crop(rt, store: list):
    """Our vision stage's kept patches per crop, as the Theia forks' ``encode_images`` hold them in ``index_masks``:
    one ``("vision", (crops, k))`` entry per prefill, the crops of the batch's images in order (base crop first), each
    row the kept patch indices (0..N-1, ascending; a crop with fewer padded with -1). Wraps the method's
    ``select_vision``; returns ``finish(n_samples)`` (called after the prefill)."""
    from .adapters._ours import seen_vision_selections
    from .adapters._theia_forks import mask_indices

    seen, restore = seen_vision_selections(rt.engine.method)

    def finish(n_samples: int) -> None:
        restore()
        rows = []
        for sig, sel in seen[:n_samples]:
            unit, patch = sig.unit.cpu(), sig.patch.cpu()
            keep = sel.keep.flatten().cpu()
            n_units = int(unit.max()) + 1
            n_patch = int(patch.max()) + 1
            masks = torch.zeros(n_units, n_patch, dtype=torch.bool)
            ku, kp = unit[keep], patch[keep]
            ok = (ku >= 0) & (kp >= 0)
            masks[ku[ok], kp[ok]] = True
            rows += list(masks)
        store.append(("vision", mask_indices(rows)))

    return finish


def our_adapter_method(name: str, budget: int, dtype: str, info: dict | None = None) -> tuple[str, dict]:
    """Adapter ``name``'s (our method, options) for the official NeXT recipe: ``ours_next(budget, dtype)`` when the
    adapter has one (with ``info=``, the NeXT build's paths of :func:`parity.build.build_next`, when it takes that:
    e.g. CDPruner's CLIP text tower in ``clip-next/``), else its LLaVA-1.5 ``ours``."""
    import inspect

    mod = adapters.get(name)
    if hasattr(mod, "ours_next"):
        extra = {"info": info} if "info" in inspect.signature(mod.ours_next).parameters else {}
        method, options = mod.ours_next(budget, dtype, **extra)
        return method, dict(options)
    from .llava15 import our_method

    return our_method(name, budget, dtype)


def ours_adapters(info: dict, dtype: str, specs: list[dict], max_new_tokens: int,
                  vision_attn: str = "eager") -> list[dict]:
    """Our runs of the adapters' specs on NeXT: ``llava.load(..., next_geometry="official", **NEXT_LOAD)``, in the
    shape :func:`compare_adapters` reads (``real``: each sample's real positions in our prefill; ``crops``: each
    image's crops, base crop included)."""
    import llava

    half = dtype == "fp16"
    attn = {"": "sdpa", "text_config": "sdpa", "vision_config": vision_attn}
    load = {"dtype": "float16" if half else "float32", "vision_dtype": "float32" if half else None,
            "next_geometry": "official"}
    extra: dict = {}
    for sp in specs:
        for k, v in getattr(adapters.get(sp["name"]), "NEXT_LOAD", {}).items():
            if k in extra and extra[k] != v:
                raise ValueError(f"parity next: the adapters of {sorted({s['name'] for s in specs})} load our model "
                                 f"differently ({k}); run them one at a time")
            extra[k] = v
    rt = llava.load(info["hf"], attn_implementation=attn, **{**load, **extra})
    hooks = {getattr(adapters.get(sp["name"]), "next_runtime", None) for sp in specs} - {None}
    if len(hooks) > 1:
        raise ValueError(f"parity next: the adapters of {sorted({s['name'] for s in specs})} change our runtime "
                         f"differently (next_runtime); run them one at a time")
    for hook in hooks:
        hook(rt)
    all_cases = cases(info)
    out = []
    for sp in specs:
        name, options = our_adapter_method(sp["name"], sp["budget"], dtype, info)
        budget = options.pop("budget", sp["budget"])
        rt.prune(name, budget, **options)
        mod = adapters.get(sp["name"])
        for batch in sp["batches"]:
            cs = [all_cases[c] for c in batch]
            kept: list = []
            finish = (mod.record_ours_next if hasattr(mod, "record_ours_next") else record_vision_per_crop)(rt, kept)
            inputs = rt.processor([c["question"] for c in cs], [c["image"] for c in cs])
            with torch.inference_mode():
                logits = rt.model(**inputs).logits.float()
                if finish is not None:
                    finish(len(batch))
                n_prefill = len(kept)
                # the real positions of each sample in the prefill: its text tokens + the visual tokens the LLM got
                n_img = (inputs["input_ids"] == info["image_token_id"]).sum(1)
                real = [int(inputs["attention_mask"][b].sum() - n_img[b]) + s.visual_per_layer[0]
                        for b, s in enumerate(rt.engine.stats.samples)]
                steps: list = []
                hook = record_top2(rt.model, steps)
                gen = rt.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
                hook.remove()
            width = inputs["input_ids"].shape[1]
            out.append({"method": sp, "batch": batch, "input_ids": inputs["input_ids"],
                        "attention_mask": inputs["attention_mask"], "logits": logits, "real": real,
                        "tokens": gen[:, width:].tolist(), "top2": stacked(steps), "kept": kept[:n_prefill],
                        "crops": [int(c) for c in _crops(inputs, rt.model.config)],
                        "image_token_id": info["image_token_id"]})
    rt.unprune(detach=True)
    return out


def _crops(inputs, config) -> list[int]:
    """The crops of each image of our processor's batch (base crop included)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return [image_size_to_num_patches(tuple(int(v) for v in sz), config.image_grid_pinpoints,
                                      config.vision_config.image_size) for sz in inputs["image_sizes"]]


def compare_adapters(off: dict, mine: list[dict], label: str, logits_atol: float | None,
                     eos: int | None) -> list[Check]:
    """One check per adapter run (group ``next-<name>``): the crops of each image, the logits at every real position
    (each sample's last ``real`` positions on both sides: both left-pad), the greedy tokens and the kept indices per
    stage (as the adapter records them: per crop, all crops of the batch in order)."""
    from .llava15 import kept_detail, stages

    checks = []
    for o, m in zip(off["runs"], mine):
        if o["batch"] != m["batch"] or o["method"]["name"] != m["method"]["name"] \
                or o["method"]["budget"] != m["method"]["budget"]:
            raise ValueError(f"runs out of step: official {o['method']} {o['batch']}, ours {m['method']} {m['batch']}")
        case = f"{label} {o['method']['name']} T={o['method']['budget']}/crop batch {o['batch']}"
        o_crops = [int(p.shape[0]) for p in o["pixel_values"]]
        crops_ok = o_crops == m["crops"]
        diffs = []
        for i, n in enumerate(m["real"]):
            a, b = o["logits"][i], m["logits"][i]
            if len(o["batch"]) == 1 and a.shape != b.shape:
                diffs.append(float("inf"))
            elif n > a.shape[0]:
                diffs.append(float("inf"))
            else:
                diffs.append((a[-n:] - b[-n:]).abs().max().item())
        ok, detail, data = logits_and_tokens(o, m, diffs, eos, logits_atol, label.split()[0])
        o_kept = [(i, k.tolist()) for i, k in o["kept"]]
        m_kept = [(i, k.tolist()) for i, k in m["kept"]]
        kept_ok = o_kept == m_kept
        ok = ok and kept_ok and crops_ok
        detail = ("" if crops_ok else f"crops DIFFER (official {o_crops}, ours {m['crops']}), ") + detail
        detail += f", {kept_detail(o_kept)} per crop {'identical' if kept_ok else 'DIFFER'} ({stages(o_kept)})"
        data.update(official_kept=o_kept, our_kept=m_kept, official_crops=o_crops, our_crops=m["crops"],
                    logits_shapes=[(tuple(o["logits"][i].shape), tuple(m["logits"][i].shape))
                                   for i in range(len(m["real"]))])
        checks.append(Check("next-" + o["method"]["name"], case, ok, detail, data))
    return checks


def run(info: dict, official_python: str, work: Path, dtypes=("fp32",), budgets=None, max_new_tokens: int = 8,
        vision_attn: str = "eager", methods=("flowcut",), variants=VARIANTS, official_path: str | None = None,
        image_ids=None, clones: Path | None = None, runner: Runner | None = None) -> list[Check]:
    """Every LLaVA-NeXT check: for each precision and variant of our side, the unpruned model (each image alone
    and all in one batch) and FlowCut's official NeXT recipe at each budget (each image alone); then each other
    method of ``methods`` through its adapter (``NEXT = True``; our side with ``next_geometry="official"`` only) at
    each budget per crop (``budgets``, else the adapter's ``NEXT_BUDGETS``), one official process per clone (the
    clone as for LLaVA-1.5: ``official_path``, else ``clones/<name>``). ``budgets``: None for each method's default
    (FlowCut: T = 16 / 64). ``image_ids``: a subset of the images (by index; default all). ``runner``: the official
    jobs' (:class:`parity.jobs.Runner`; default one of its own); a failed job is one failing check."""
    import transformers as tf

    from . import llava15

    known = next_methods()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"no NeXT parity adapter for {', '.join(unknown)} (adapters: {', '.join(known)})")
    if image_ids is not None:
        info = dict(info, images=[info["images"][i] for i in image_ids])
    eos = tf.AutoTokenizer.from_pretrained(info["hf"]).eos_token_id
    n = len(info["images"])
    flow = [m for m in methods if m in OURS]
    others = [m for m in methods if m not in OURS]
    meths = methods_for(budgets or (16, 64), flow, n)
    roots = {m: llava15.clone_for(m, official_path, **({"clones": clones} if clones else {})) for m in others}
    groups: dict = {}
    for m in others:
        specs = adapter_specs(m, budgets or getattr(adapters.get(m), "NEXT_BUDGETS"), n)
        groups.setdefault(roots[m], []).extend(specs)
    with (nullcontext(runner) if runner else Runner()) as runner:
        # every official job first (run on the runner's threads while ours run here), then each in turn
        plan = []
        for dtype in dtypes:
            job = official_job(info, official_python, dtype, meths, max_new_tokens, work,
                               official_path if flow else None)
            plan.append((dtype, None, runner.submit(job)))
            for root, specs in groups.items():
                skip = sorted({sp["name"] for sp in specs
                               if dtype not in getattr(adapters.get(sp["name"]), "DTYPES", (dtype,))})
                for name in skip:
                    print(f"parity next: {name} not compared in {dtype}: its official code cannot run there "
                          f"(parity/adapters/{name}.py DTYPES)", file=sys.stderr)
                specs = [sp for sp in specs if sp["name"] not in skip]
                if specs:
                    job = official_job(info, official_python, dtype, specs, max_new_tokens, work, root)
                    plan.append((dtype, specs, runner.submit(job)))
        checks = []
        for dtype, specs, future in plan:
            label = f"{dtype} official" if specs else dtype
            try:
                if future.done():
                    future.result()  # a job that failed already: ours is not run for it
                if specs is None:  # the unpruned model and FlowCut, each variant of our side
                    mine = {v: ours(info, dtype, meths, max_new_tokens, vision_attn, v) for v in variants}
                else:
                    mine = ours_adapters(info, dtype, specs, max_new_tokens, vision_attn)
                off = future.result()
            except JobFailed as e:
                names = sorted({m["name"] for m in (specs or meths)})
                checks.append(failed_check(f"{label} next " + " ".join(names), e))
                continue
            atol = 1e-5 if dtype == "fp32" else None
            if specs is None:
                for variant in variants:
                    checks += compare(off, mine[variant], f"{dtype} {variant}", atol, eos)
            else:
                checks += compare_adapters(off, mine, label, atol, eos)
    return checks
