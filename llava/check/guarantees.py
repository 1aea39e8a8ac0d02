"""The guarantees every pruning method gives on the tiny models, one function each: the test suite's generic tests
call them (tests/test_gpu_ready.py, test_method_guarantees.py, test_device_placement.py) and so does
``python -m llava.check`` (:mod:`llava.check.runner`). Each attaches ``method`` (a registered name, or an instance)
to the runtime ``rt``, runs the tiny model and raises :class:`GuaranteeError` (an ``AssertionError``) naming what
differs, or returns a short description of what it checked. fp32 on the CPU; outputs compared exactly unless said."""

from __future__ import annotations

import torch

from ..families import registry
from ..method import Method, get_method
from ..selection import Selection
from ..syncs import SyncCounter
from .budgets import PROMPT_KEYED
from .inputs import equal_length_batch, greedy_no_cache, make_batch, one_sample, slice_batch, unequal_batch
from .placement import DevicePlacementCheck, check_method

#: the engine tests' greedy settings (6 new tokens, no early end)
GEN = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
#: 4 new tokens with the first step's scores (batch == alone)
GEN_SCORES = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4, output_scores=True, return_dict_in_generate=True)


class GuaranteeError(AssertionError):
    """A guarantee that does not hold; the message says where (sample, token, tensor)."""


class NotApplicable(Exception):
    """A guarantee that does not apply to this method, family or input; the message says why."""


def expect(ok, message: str) -> None:
    if not ok:
        raise GuaranteeError(message)


def _close(got: torch.Tensor, ref: torch.Tensor, what: str, atol=1e-5, rtol=1e-4) -> None:
    expect(got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(ref.shape)}")
    bad = ~torch.isclose(got.float(), ref.float(), atol=atol, rtol=rtol)
    if bool(bad.any()):
        diff = float((got.float() - ref.float()).abs()[bad].max())
        raise GuaranteeError(f"{what}: {int(bad.sum())} of {bad.numel()} values differ, by up to {diff:.3g} "
                             f"(atol {atol:g}, rtol {rtol:g})")


def _prune(rt, method, budget, options):
    return rt.prune(method, budget, **options) if not isinstance(method, Method) else rt.prune(method)


def pruned(eng) -> bool:
    """Whether the last prefill left fewer visual tokens than candidates in some LLM layer, in every sample."""
    return all(min(s.visual_per_layer) < s.visual_candidates for s in eng.stats.samples)


def check_selections(rt, method, budget=None, **options) -> str:
    """A prefill of :func:`make_batch` runs (the engine validates every selection: indices in range, no token kept
    twice, a permutation for ``order``, ``assign`` inside the targets), its logits finite, and no LLM layer sees more
    visual tokens than the candidates (unless a selection ``allow_duplicates``)."""
    eng = _prune(rt, method, budget, options)
    inputs = make_batch(rt)
    with torch.no_grad():
        logits = rt.model(**inputs).logits
    expect(bool(torch.isfinite(logits).all()), "the pruned prefill's logits are not all finite")
    cand = [s.visual_candidates for s in eng.stats.samples]
    per_layer = [s.visual_per_layer for s in eng.stats.samples]
    duplicates = any(sel.allow_duplicates for sel in eng.selections.values())  # released code's, on purpose
    expect(duplicates or all(max(p) <= c for p, c in zip(per_layer, cand)),
           f"more visual tokens than candidates: {per_layer} of {cand}")
    avg = sum(s.visual_layer_avg for s in eng.stats.samples)
    whole = [i for i, s in enumerate(eng.stats.samples) if min(s.visual_per_layer) >= s.visual_candidates]
    note = f"; sample {', '.join(map(str, whole))} kept every candidate at this budget" if whole else ""
    return f"{sum(cand)} candidates -> {sum(s.visual_entering_llm for s in eng.stats.samples)} entering the LLM, " \
           f"{avg:.1f} on average over its layers (3 samples){note}"


def stock_outputs(rt):
    """The unpruned model's (logits, greedy tokens) on :func:`make_batch`."""
    rt.unprune()
    inputs = make_batch(rt)
    with torch.no_grad():
        return rt.model(**inputs).logits, rt.model.generate(**inputs, **GEN)


def check_keep_all(rt, method, budget=None, stock=None, **options) -> str:
    """At a keep-all spelling the method is the stock model bit for bit: the same logits and greedy tokens, every
    candidate in every LLM layer, the vision stage a no-op. ``stock``: :func:`stock_outputs`, when the caller has it."""
    ref_logits, ref_toks = stock if stock is not None else stock_outputs(rt)
    inputs = make_batch(rt)
    eng = _prune(rt, method, budget, options)
    with torch.no_grad():
        logits, toks = rt.model(**inputs).logits, rt.model.generate(**inputs, **GEN)
    expect(eng.prefills == 2, f"{eng.prefills} prefills through the engine, not 2 (forward and generate)")
    n_layers = len(rt.model.model.language_model.layers)
    for i, s in enumerate(eng.stats.samples):
        expect(s.visual_per_layer == [s.visual_candidates] * n_layers,
               f"sample {i} keeps {s.visual_per_layer} of {s.visual_candidates} candidates per LLM layer")
        expect(not eng.method.vision_stage or s.vision_noop, f"sample {i}: the vision stage changed the tokens")
    expect(torch.equal(logits, ref_logits), f"logits differ from the stock model's (max |diff| "
                                            f"{float((logits - ref_logits).abs().max()):.3g})")
    expect(torch.equal(toks, ref_toks), f"tokens {toks[:, -GEN['max_new_tokens']:].tolist()} vs the stock model's "
                                        f"{ref_toks[:, -GEN['max_new_tokens']:].tolist()}")
    return f"budget {budget}, options {options or '{}'}: logits and {GEN['max_new_tokens']} tokens bit-identical"


def check_generate_batch_equals_alone(rt, method, budget=None, **options) -> str:
    """``generate()`` on :func:`make_batch` (3 samples, left-padded) with ``method`` attached: each sample's
    new tokens equal those of the sample generated alone (greedy, the engine tests' GEN settings)."""
    inputs = make_batch(rt)
    _prune(rt, method, budget, options)
    with torch.no_grad():
        batch = rt.model.generate(**inputs, **GEN)
    new = batch[:, inputs["input_ids"].shape[1]:]
    expect(new.shape == (3, GEN["max_new_tokens"]), f"new tokens of shape {tuple(new.shape)}")
    for i in range(3):
        one = slice_batch(inputs, i, rt)
        with torch.no_grad():
            toks = rt.model.generate(**one, **GEN)[0, one["input_ids"].shape[1]:]
        expect(torch.equal(toks, new[i]), f"sample {i}: {toks.tolist()} alone vs {new[i].tolist()} in the batch")
    return "3 left-padded samples"


def _generate_scores(rt, inputs):
    with torch.no_grad():
        out = rt.model.generate(**inputs, **GEN_SCORES)
    return out.sequences[:, inputs["input_ids"].shape[1]:], out.scores[0]


def check_batch_equals_alone(rt, method, budget=None, batch: str = "unequal", **options) -> str:
    """A batch of 3 (``batch``: "unequal", left-padded prompts of different lengths and images - Video-LLaVA a
    video and two images; or "equal_length", the same prompt length, where any padding comes from the pruning):
    each sample's greedy tokens equal its tokens alone, its first-step scores within 1e-5."""
    inputs = (equal_length_batch if batch == "equal_length" else unequal_batch)(rt)
    expect(batch != "equal_length" or bool(inputs["attention_mask"].all()), "the prompts must have equal lengths")
    _prune(rt, method, budget, options)
    toks, scores = _generate_scores(rt, inputs)
    for i in range(3):
        t1, s1 = _generate_scores(rt, one_sample(inputs, i, rt))
        expect(torch.equal(t1[0], toks[i]), f"{batch} batch, sample {i}: {t1[0].tolist()} alone vs "
                                            f"{toks[i].tolist()} in the batch")
        _close(s1[0], scores[i], f"{batch} batch, sample {i}'s first-step scores alone vs in the batch")
    return f"{batch} batch"


def check_cached_equals_recompute(rt, method, budget=None, *, replay: bool | None = None, must_prune=False,
                                  **options) -> str:
    """Cached greedy generation on :func:`make_batch` == greedy decoding by full recompute (no cache) every step. A
    method whose selection reads the text (query-aware, an llm stage reading the last rows, or the prompt's ids:
    ``budgets.PROMPT_KEYED``) sees the generated tokens in the recompute: it replays the prefill's selections
    (``replay`` None: decided so); the others recompute theirs from scratch. ``must_prune``: every sample pruned."""
    inputs = make_batch(rt)
    eng = _prune(rt, method, budget, options)
    if eng.needs.attention_bias:
        raise NotApplicable("its attention bias has a prefill term (AttentionBias.pair) that decode steps do not add "
                            "(RESTORE's official distance term): a recompute prefills the generated tokens too and "
                            "differs by design; check it with the bias off (RESTORE: calibrate=False)")
    with torch.no_grad():
        cached = rt.model.generate(**inputs, **GEN)
    expect(cached.shape == (3, inputs["input_ids"].shape[1] + GEN["max_new_tokens"]), f"shape {tuple(cached.shape)}")
    expect(not must_prune or pruned(eng), "a sample was not pruned at this budget")
    m = eng.method
    if replay is None:
        replay = bool(m.query_aware or m.llm_layers or m.name in PROMPT_KEYED)
    eng.replay = replay
    ref = greedy_no_cache(rt.model, inputs, GEN["max_new_tokens"])
    n = GEN["max_new_tokens"]
    for i in range(3):
        expect(torch.equal(cached[i], ref[i]), f"sample {i}: cached {cached[i, -n:].tolist()} vs no-cache recompute "
                                               f"{ref[i, -n:].tolist()}" + ("" if replay else
                                               " (recomputed selections: a method reading the text must set "
                                               "query_aware = True)"))
    return f"{n} tokens, selections {'replayed' if replay else 'recomputed'}"


def check_no_mask_forward(rt, method, budget=None, **options) -> str:
    """A log-likelihood style call (no cache, no attention mask) gets the last-token logits of ``generate()``."""
    inputs = equal_length_batch(rt)
    one = {k: v for k, v in one_sample(inputs, 0, rt).items() if k != "attention_mask"}
    _prune(rt, method, budget, options)
    with torch.no_grad():
        ref = rt.model.generate(**one, max_new_tokens=1, do_sample=False, output_scores=True,
                                return_dict_in_generate=True).scores[0]
        bare = rt.model(**one, use_cache=False).logits[:, -1]
    _close(bare, ref, "the no-mask forward's last logits vs generate's first scores")
    return "last logits within 1e-5"


def count_syncs(rt, inputs) -> SyncCounter:
    with torch.no_grad(), SyncCounter() as c:
        rt.model(**inputs)
    return c


def stock_syncs(rt, small, large) -> dict:
    """The unpruned model's own host reads on the two batches: transformers' Qwen / OneVision / InternVL code reads
    the host per image and per row (the tower's attention segments, get_rope_index, the anyres packing), the same
    without a method, so only what the engine and the method add is bounded (LLaVA-NeXT: none counted off)."""
    if registry.get(rt.family).layout == "anyres":
        return {"small": 0, "large": 0}
    rt.unprune()
    return {"small": count_syncs(rt, small).total, "large": count_syncs(rt, large).total}


def check_host_syncs(rt, method, budget, *, bound: float, small, large, stock: dict | None = None, **options) -> str:
    """Small images vs large ones (``small`` / ``large``: batches of 3, at least 1.5x the visual tokens): at most
    ``bound`` host reads per sample beyond the unpruned model's (``stock``: :func:`stock_syncs`), and no more for
    the large images than for the small ones (within 3)."""
    stock = stock if stock is not None else stock_syncs(rt, small, large)
    try:
        eng = _prune(rt, method, budget, options)
        s_small = count_syncs(rt, small)
        cand_small = sum(s.visual_candidates for s in eng.stats.samples)
        s_large = count_syncs(rt, large)
        cand_large = sum(s.visual_candidates for s in eng.stats.samples)
    finally:
        rt.unprune()
    expect(cand_large > 1.5 * cand_small, f"the large images give {cand_large} candidates, the small {cand_small}")
    added_small, added_large = s_small.total - stock["small"], s_large.total - stock["large"]
    expect(added_large / 3 <= bound, f"{added_large / 3:.1f} host reads per sample (bound {bound}): "
                                     f"{dict(s_large.counts)}")
    expect(added_large <= added_small + 3, f"host reads grow with the visual tokens: {added_small} for {cand_small} "
                                           f"candidates, {added_large} for {cand_large} ({dict(s_large.counts)})")
    return f"{added_small / 3:.1f} / {added_large / 3:.1f} per sample for {cand_small} / {cand_large} candidates " \
           f"(bound {bound})"


def whole_prefill_violations(rt, method, inputs=None) -> list[str]:
    """The engine and ``method`` (an instance) together around ``generate()`` (prefill and two decode steps) under
    one collecting :class:`DevicePlacementCheck`: its violations."""
    inputs = inputs if inputs is not None else make_batch(rt)
    rt.prune(method)
    chk = DevicePlacementCheck(collect=True)
    try:
        with torch.no_grad(), chk:
            rt.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        rt.unprune()
    return chk.violations


def check_device_placement(rt, method, budget=None, **options) -> str:
    """Every tensor stays on the signals' device (a fake second device on the CPU, :mod:`llava.check.placement`):
    each ``select_vision`` / ``select_llm`` / ``select_pixels`` call, the Selection it returns, and the whole prefill
    and decode."""
    build = (lambda: method) if isinstance(method, Method) else (lambda: get_method(method, budget, **options))
    m = build()
    chk = check_method(m, collect=True)
    rt.prune(m)
    try:
        with torch.no_grad():
            rt.model(**make_batch(rt))
    finally:
        rt.unprune()
    found = chk.violations + [v for v in whole_prefill_violations(rt, build()) if v not in chk.violations]
    expect(not found, "; ".join(found[:2]) + (f" (+{len(found) - 2} more)" if len(found) > 2 else ""))
    pixels = f" / {chk.calls['pixels']} pre-tower" if chk.calls["pixels"] else ""
    return f"{chk.calls['vision']} vision / {chk.calls['llm']} llm{pixels} selections and the whole generate()"


def check_reference_mode_in_engine(rt, method, budget, stage):
    """A method's ``numerics="official"`` mode on a tiny model: cached generation of a batch of 3 equals
    the no-cache recompute, and each sample's selection at ``stage`` ("vision" or an llm stage index)
    alone equals its selection in the batch."""
    inputs = make_batch(rt)
    eng = rt.prune(method, budget, numerics="official")
    with torch.no_grad():
        cached = rt.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    batch_sel = {k: v.keep.clone() for k, v in eng.selections.items()}
    eng.replay = True
    expect(torch.equal(cached, greedy_no_cache(rt.model, inputs, 3)), "cached generation differs from the recompute")
    for i in range(3):
        eng = rt.prune(method, budget, numerics="official")
        with torch.no_grad():
            rt.model(**slice_batch(inputs, i, rt))
        expect(torch.equal(eng.selections[(stage, 0)].keep, batch_sel[(stage, i)]),
               f"sample {i}'s selection alone differs from its selection in the batch")


class _Layout(Method):
    """Records each sample's stock tokens per unit and its newline count; keeps everything."""

    name = "layout_spy"
    vision_stage = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def select_vision(self, sig):
        self.seen.append(([int((sig.unit == u).sum()) for u in range(sig.num_units)], int(sig.is_newline.sum())))
        return Selection(keep=torch.arange(sig.num_tokens, device=sig.unit.device))


def layout(rt, inputs):
    """Per sample of ``inputs``: (its stock tokens per unit, its newline tokens)."""
    spy = _Layout()
    rt.prune(spy)
    with torch.no_grad():
        rt.model(**inputs)
    rt.unprune()
    return spy.seen


#: the tiny models' layouts of make_batch's samples (unit sizes, newlines) per tiny geometry (a family record's
#: ``tiny_geometry``) and layout: an image of 16 patches, a video of 8 frames of 17; NeXT: 3 crops each (unpadded to
#: 16 / 8 patches), 4 / 4 / 8 newline tokens
_LAYOUTS = {("image", "single"): [([16], 0)] * 3, ("frames", "single"): [([17] * 8, 0)] * 3,
            ("crops", "anyres"): [([16, 16, 16], 4), ([16, 8, 8], 4), ([16, 8, 8], 8)]}


def check_per_unit_tokens(rt, method, budget, **options):
    """A pre-LLM method with ``budget`` tokens per image / crop / frame on :func:`make_batch`: every sample
    has min(budget, n) tokens of each unit of n candidates plus its newline tokens (kept as layout) in every
    LLM layer, and all its candidates counted. Returns [(stats, unit sizes, newlines)] per sample, for the
    caller's own checks (e.g. ``vision_noop``)."""
    inputs = make_batch(rt)
    lay = layout(rt, inputs)
    f = registry.get(rt.family)
    want = _LAYOUTS.get((f.tiny_geometry, f.layout), lay)
    expect(lay == want, f"tiny {rt.family}'s layout is {lay}")
    eng = rt.prune(method, budget, **options)
    with torch.no_grad():
        rt.model(**inputs)
    n_layers = len(rt.model.model.language_model.layers)
    for i, (s, (sizes, newlines)) in enumerate(zip(eng.stats.samples, lay, strict=True)):
        exp = sum(min(budget, n) for n in sizes) + newlines
        expect(s.visual_candidates == sum(sizes) + newlines, f"sample {i}: {s.visual_candidates} candidates")
        expect(s.visual_per_layer == [exp] * n_layers and s.visual_entering_llm == exp,
               f"sample {i}: {s.visual_per_layer} per LLM layer, not {exp}")
    return [(s, sizes, newlines) for s, (sizes, newlines) in zip(eng.stats.samples, lay)]
