"""The GPU check's tiny-model correctness checks (bench/gpu_check/__init__.py): on a tiny random-weight model, batches
of 3 (``scenarios``) generate greedy tokens that must equal each sample run alone (batch == alone) and a
no-cache full recompute with the recorded selections (cached == no-cache, ``greedy_no_cache``); the host syncs
of one pruned prefill (``count_syncs``); and their verdicts (``judge``: fp32 exact, half precision against the
unpruned model's own noise). ``tiny_task``, which runs them for one method x family x dtype, is in
bench/gpu_check/__init__.py."""

from __future__ import annotations

import math

import torch

from bench.gpu_check.config import (DTYPES, FP32_LOGIT_TOL, IMAGE_SIZES, QUESTIONS, SAME_LENGTH_NEXT, CheckConfig,
                                    family_key)
from bench.gpu_check.device import _tail, _unprune
from llava.families import registry


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------


def rand_image(seed: int, h: int, w: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def scenarios(family: str) -> dict[str, list[tuple]]:
    """Named batches of 3 samples, each a (question, image or None, video frames or None)."""
    imgs = [rand_image(i, *IMAGE_SIZES[i]) for i in range(3)]
    same = imgs
    rec = registry.get(family)
    if rec.layout == "anyres":
        same = [rand_image(3 + i, *SAME_LENGTH_NEXT[i]) for i in range(3)]
    if rec.video_model:
        vids = [[rand_image(10 * i + j, 50, 50) for j in range(8)] for i in range(3)]
        return {"mixed": [(QUESTIONS[i], None, vids[i]) for i in range(3)],
                "same-question": [(QUESTIONS[1], None, vids[i]) for i in range(3)],
                "video+images": [(QUESTIONS[0], None, vids[0]), (QUESTIONS[1], imgs[1], None),
                                 (QUESTIONS[2], imgs[2], None)]}
    return {"mixed": [(QUESTIONS[i], imgs[i], None) for i in range(3)],
            "same-question": [(QUESTIONS[1], same[i], None) for i in range(3)]}


def build(rt, samples, device) -> dict:
    qs = [q for q, _, _ in samples]
    imgs = [im for _, im, _ in samples]
    vids = [v for _, _, v in samples]
    if all(v is None for v in vids):
        vids = None
    return rt.processor(qs, imgs, videos=vids, device=device)


# ------------------------------------------------------------------------------------------------
# generation and comparison
# ------------------------------------------------------------------------------------------------


def _eos_ids(model) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _placeholder_ids(model) -> list[int]:
    """The image / video placeholder ids: a random-weight model may generate them, and a generated
    placeholder would make the no-cache recompute read it as an image, so generation suppresses them."""
    cfg = model.config
    return [int(i) for i in (getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None)) if i is not None]


def generate(rt, batch, steps: int):
    """Greedy generation of exactly ``steps`` tokens, the placeholders suppressed: (new tokens (B, T),
    raw logits (B, T, V) in fp32)."""
    with torch.no_grad():
        out = rt.model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                suppress_tokens=_placeholder_ids(rt.model), output_logits=True,
                                return_dict_in_generate=True)
    new = out.sequences[:, batch["input_ids"].shape[1]:]
    return new, torch.stack([x.float() for x in out.logits], 1)


def greedy_no_cache(model, inputs, steps: int, suppress=()):
    """Greedy decoding by full recompute every step (use_cache=False), positions as generate builds
    them, the end-of-sequence and placeholder ids suppressed as :func:`generate` does: the reference that
    cached generation must equal (with ``engine.replay`` for query-aware methods). Qwen2.5-VL (its batch
    has ``mm_token_type_ids``) takes 3-D M-RoPE positions: none are passed, the model computes them from
    the prompt (``get_rope_index``, left padding included), the generated tokens typed as text."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    mrope = "mm_token_type_ids" in extra
    all_logits = []
    for _ in range(steps):
        pos = None if mrope else (mask.cumsum(1) - 1).masked_fill(mask == 0, 0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                           **extra).logits[:, -1].float()
        all_logits.append(logits)
        pick = logits.clone()
        if suppress:
            pick[:, list(suppress)] = -math.inf
        nxt = pick.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
        if mrope:  # generated tokens are text (type 0)
            extra["mm_token_type_ids"] = torch.cat([extra["mm_token_type_ids"], torch.zeros_like(nxt)], 1)
    return ids[:, inputs["input_ids"].shape[1]:], torch.stack(all_logits, 1)


def compare(toks, logits, ref_toks, ref_logits) -> dict:
    """One sample's tokens / logits (T,), (T, V) against its reference: equal tokens, the first token's
    max |delta logit|, and where they part, the step, the delta there and the reference's margin
    between its token and the other run's (a small margin = a near tie)."""
    toks, ref_toks = toks.cpu(), ref_toks.cpu()
    logits, ref_logits = logits.cpu(), ref_logits.cpu()
    equal = bool(torch.equal(toks, ref_toks))
    delta = (logits - ref_logits).abs().amax(-1)  # per step
    rec = {"equal": equal, "first_logit_delta": float(delta[0]), "tokens": toks.tolist(),
           "ref_tokens": ref_toks.tolist()}
    if equal:
        rec["max_logit_delta"] = float(delta.max())
    else:
        s = int(torch.nonzero(toks != ref_toks)[0])
        rec.update(diverge_step=s, max_logit_delta=float(delta[: s + 1].max()),
                   margin=float(ref_logits[s, ref_toks[s]] - ref_logits[s, toks[s]]))
    return rec


# ------------------------------------------------------------------------------------------------
# the checks
# ------------------------------------------------------------------------------------------------


def run_scenario(rt, eng, samples, device, steps: int, suppress) -> dict:
    batch = build(rt, samples, device)
    res = {"padded": bool((batch["attention_mask"] == 0).any()),
           "prompt_lengths": batch["attention_mask"].sum(1).tolist()}
    eng.replay = False
    toks, logits = generate(rt, batch, steps)
    st = eng.stats
    res["tokens"] = [s.as_dict() for s in st.samples] if st is not None else None
    # cached == no-cache recompute with the selections of this batch's prefill (before any other prefill)
    try:
        eng.replay = True
        ref_toks, ref_logits = greedy_no_cache(rt.model, batch, steps, suppress)
        res["cache"] = {"samples": [compare(toks[i], logits[i], ref_toks[i], ref_logits[i]) for i in range(len(samples))]}
    except Exception as e:  # noqa: BLE001 - recorded, the other checks go on
        res["cache"] = {"error": _tail(e)}
    finally:
        eng.replay = False
    # batch == each sample alone
    alone = []
    try:
        for i, smp in enumerate(samples):
            one = build(rt, [smp], device)
            t1, l1 = generate(rt, one, steps)
            alone.append(compare(toks[i], logits[i], t1[0], l1[0]))
        res["batch_alone"] = {"samples": alone}
    except Exception as e:  # noqa: BLE001
        res["batch_alone"] = {"samples": alone, "error": _tail(e)}
    return res


def count_syncs(rt, samples, device) -> dict:
    from llava.syncs import SyncCounter

    batch = build(rt, samples, device)
    with torch.no_grad():
        rt.model(**batch)  # a first call outside the counter (lazy initialisations are not the hot path)
        with SyncCounter() as c:
            rt.model(**batch)
    n = batch["input_ids"].shape[0]
    return {"total": int(c.total), "per_sample": c.total / n, "batch": n, "counts": dict(sorted(c.counts.items()))}


def hybrid_refusal(rt, method: str, budget) -> str | None:
    """The reason ``method`` is refused at attach on ``rt``'s hybrid model (its llm stage or probe reads a
    linear-attention layer), or None."""
    from llava.engine import HybridRefusal

    try:
        rt.prune(method, budget)
    except HybridRefusal as e:
        return str(e)
    except (ValueError, TypeError):  # anything else is the run's to record
        return None
    finally:
        _unprune(rt)
    return None


def _load_tiny(family: str, dtype: str, cfg: CheckConfig) -> dict:
    from llava.models import load

    rt = load(f"tiny:{family}", seed=cfg.seed, dtype=dtype, device=cfg.device)
    return {"rt": rt, "scenarios": scenarios(family_key(family)),
            "suppress": _eos_ids(rt.model) + _placeholder_ids(rt.model)}


def _has_error(rec: dict) -> bool:
    return bool(rec.get("error")) or any(_scenario_errors(sc) for sc in rec.get("scenarios", {}).values()) \
        or bool((rec.get("syncs") or {}).get("error"))


def _scenario_errors(sc: dict) -> bool:
    return bool(sc.get("error") or (sc.get("cache") or {}).get("error") or (sc.get("batch_alone") or {}).get("error"))


# ------------------------------------------------------------------------------------------------
# verdicts
# ------------------------------------------------------------------------------------------------


def noise_tolerance(dtype: str, ref_delta: float | None) -> float:
    """The half-precision noise band: 4x the unpruned model's own largest batch-vs-alone (or
    cached-vs-recompute) logit delta in the same family and dtype, at least 2 ulp(1) of the dtype."""
    eps = torch.finfo(DTYPES[dtype]).eps
    return max(4 * (ref_delta or 0.0), 2 * eps)


def judge(records: list[dict]) -> None:
    """Add a verdict to every check of every record (in place). Half precision is judged against the
    unpruned model's own agreement in the same family, dtype, scenario and sample."""
    ref = {(r["family"], r["dtype"]): r for r in records if r["method"] == "none"}
    for r in records:
        r["verdicts"] = {}
        base = ref.get((r["family"], r["dtype"]))
        exact = r["dtype"] == "float32"
        for check in ("batch_alone", "cache"):
            if r.get("skipped") or r.get("not_run"):
                r["verdicts"][check] = {"pass": True, "why": "n/a" if r.get("skipped") else f"not run ({r['not_run']})",
                                        "failed": [], "notes": []}
                continue
            if r["error"]:
                r["verdicts"][check] = {"pass": False, "why": "crash"}
                continue
            ref_delta = None
            if base is not None and not exact:
                ds = [s["max_logit_delta"] for sc in base["scenarios"].values() for s in sc.get(check, {}).get("samples", [])]
                ref_delta = max(ds) if ds else None
            tol = None if exact else noise_tolerance(r["dtype"], ref_delta)
            fails, notes = [], []
            for name, sc in r["scenarios"].items():
                if "error" in sc and check not in sc:
                    fails.append(f"{name}: crash")
                    continue
                c = sc.get(check, {})
                if c.get("error"):
                    fails.append(f"{name}: crash")
                for i, s in enumerate(c.get("samples", [])):
                    s["verdict"] = _sample_verdict(s, exact, tol, base, name, check, i, r is base)
                    if s["verdict"] == "FAIL":
                        fails.append(f"{name}[{i}]")
                    elif s["verdict"] != "PASS":
                        notes.append(f"{name}[{i}]: {s['verdict']}")
            r["verdicts"][check] = {"pass": not fails, "failed": fails, "notes": notes, "noise_tolerance": tol}


def _sample_verdict(s, exact, tol, base, scen, check, i, is_base) -> str:
    if exact:
        return "PASS" if s["equal"] and s["max_logit_delta"] <= FP32_LOGIT_TOL else "FAIL"
    if s["equal"]:
        return "PASS"
    if is_base:
        return "PASS (unpruned model: half-precision reference)"
    try:
        b = base["scenarios"][scen][check]["samples"][i]
    except (KeyError, IndexError, TypeError):
        b = None
    if b is not None and not b["equal"]:
        return "PASS (unpruned model also differs)"
    if tol is not None and s["max_logit_delta"] <= tol:  # the logits stayed in the noise band: a near tie flipped
        return (f"PASS (near tie at step {s['diverge_step']}: margin {s['margin']:.3g}, logits within "
                f"{s['max_logit_delta']:.3g} <= {tol:.3g})")
    return "FAIL"


def sync_verdict(r: dict, limit: float | None) -> dict:
    s = r.get("syncs") or {}
    if r.get("skipped"):
        return {"pass": True, "why": "n/a"}
    if r.get("not_run"):
        return {"pass": True, "why": f"not run ({r['not_run']})"}
    if r["error"] or "error" in s:
        return {"pass": limit is None, "why": "not measured (crash)"}
    if limit is None:
        return {"pass": True, "why": "informational"}
    return {"pass": s["per_sample"] <= limit, "why": f"{s['per_sample']:.1f} per sample, limit {limit}"}
