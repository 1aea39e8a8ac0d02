"""Fast path == eager engine (``load(..., fast=True)``, :mod:`llava.fast.path`) for a method that declares itself
capturable: on :func:`make_batch` (3 prompts of different lengths, left-padded) the captured prefill and one-graph
decode give the eager engine's greedy tokens, first-step scores (within 1e-5), visual token counts and plan (the
same decoder layers on the same rows, :class:`llava.plan.PrefillPlan`)."""

from __future__ import annotations

import torch

from .guarantees import NotApplicable, expect
from .inputs import make_batch

#: new tokens compared (the fast runtime is loaded for 16)
TOKENS = 8


def generate(rt, batch, tokens: int = TOKENS):
    """Greedy tokens (B, tokens) and the first step's scores."""
    with torch.no_grad():
        out = rt.model.generate(**batch, max_new_tokens=tokens, do_sample=False, output_scores=True,
                                return_dict_in_generate=True)
    return out.sequences[:, batch["input_ids"].shape[1]:], out.scores[0]


def assert_same_as_eager(fast, eager, eng, batch, tokens: int = TOKENS) -> None:
    """The fast runtime's prefill took the fast path and gave the eager runtime's greedy tokens, first-step
    scores and visual token counts (``eng``: the fast runtime's engine; the eager runtime has the same method)."""
    toks, scores = generate(fast, batch, tokens)
    expect(eng.stats.path == "fast", f"the prefill ran eagerly: {eng.stats.path_reason}")
    ref_toks, ref_scores = generate(eager, batch, tokens)
    expect(torch.equal(toks, ref_toks), f"tokens {toks.tolist()} on the fast path vs {ref_toks.tolist()} eager")
    diff = float((scores.float() - ref_scores.float()).abs().max())
    expect(bool(torch.isclose(scores, ref_scores, atol=1e-5, rtol=1e-5).all()),
           f"first-step scores differ from the eager engine's (max |diff| {diff:.3g})")
    ref = eager.engine.stats.samples
    for what in ("visual_entering_llm", "visual_candidates"):
        got, want = [getattr(s, what) for s in eng.stats.samples], [getattr(s, what) for s in ref]
        expect(got == want, f"{what} {got} on the fast path vs {want} eager")
    got, want = ([(s.layers, s.rows, s.visual) for s in p.segments]  # the same layers on the same rows (the widths:
                 for p in (eng.stats.plan, eager.engine.stats.plan))   # bucket vs the longest row)
    expect(got == want, f"the captured prefill ran another plan than the eager one:\n{eng.stats.plan}\n"
                        f"{eager.engine.stats.plan}")


def check_fast_equals_eager(fast_rt, eager_rt, method, budget=None, **options) -> str:
    """``method`` on the fast runtime ``fast_rt`` == on the eager runtime ``eager_rt`` (the same tiny model);
    :class:`NotApplicable` where the fast path refuses the method, its options or this batch, with the reason."""
    eng = fast_rt.prune(method, budget, **options)
    eager_rt.prune(method, budget, **options)
    refusal = eng.fast.refusal if eng.fast is not None else "no fast path on this runtime"
    if refusal:
        raise NotApplicable(refusal)
    batch = make_batch(fast_rt)
    why = eng.fast.refusal_for(batch["input_ids"], {k: v for k, v in batch.items()
                                                    if k not in ("input_ids", "attention_mask")})
    if why:
        raise NotApplicable(f"the fast path runs this batch eagerly: {why}")
    assert_same_as_eager(fast_rt, eager_rt, eng, batch)
    return f"{TOKENS} tokens and the first scores == eager ({eng.fast.backend} backend)"
