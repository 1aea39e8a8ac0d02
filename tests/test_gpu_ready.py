"""What the CUDA path needs, proven on a CPU: batch == alone for every registered method in every
padding case, decode masks, a bounded number of host synchronisations per sample, explicit masks
for no-cache forwards, refused second turns on a pruned cache, released per-prefill scratch."""

import pytest
import torch
from conftest import ALL_FAMILIES, QUESTIONS, rand_image, slice_batch

from llava.method import Selection, available_methods, method_supports
from llava.syncs import SyncCounter

GEN = dict(max_new_tokens=4, do_sample=False, min_new_tokens=4, output_scores=True, return_dict_in_generate=True)
ALL = pytest.mark.parametrize("rt", ALL_FAMILIES, indirect=True)

#: budgets that really prune on the tiny models (16 tokens per image / crop, 17 per frame), each in
#: its method's own convention (docs/methods/README.md's table)
#: tiny Qwen2.5-VL: 4-12 merged tokens per image (dynamic grid); tiny OneVision: 16 per crop + newlines
_PER_UNIT = {"llava": 4, "llava_next": 4, "video_llava": 4, "qwen2_5_vl": 2, "llava_onevision": 4}
_TOTAL = {"llava": 4, "llava_next": 12, "video_llava": 32, "qwen2_5_vl": 2, "llava_onevision": 16}
_IN_LLM = {"llava": 8, "llava_next": 16, "video_llava": 64, "qwen2_5_vl": 4, "llava_onevision": 16}
for _b in (_PER_UNIT, _TOTAL, _IN_LLM):  # tiny Qwen3-VL: Qwen2.5-VL's token geometry (patch 14, merge 2)
    _b["qwen3_vl"] = _b["qwen2_5_vl"]
    _b["internvl"] = _b["llava_next"]  # tiny InternVL: 16 tokens per 112-px tile, 1-5 tiles per image
    _b["qwen3_5"] = _b["qwen2_5_vl"]  # tiny Qwen3.5: Qwen2.5-VL's token geometry
    _b["qwen2_vl"] = _b["qwen2_5_vl"]  # tiny Qwen2-VL: Qwen2.5-VL's token geometry (patch 14, merge 2)
BUDGETS = {
    "none": None, "novisual": None, "pdrop": 192, "sparsevlm": 64,
    "consensusdrop": _PER_UNIT, "visiondrop": _PER_UNIT, "visionzip": _PER_UNIT, "fastervlm": _PER_UNIT,
    "divprune": _PER_UNIT, "otprune": _PER_UNIT, "random": _PER_UNIT, "attnmix": _TOTAL, "fastv": _IN_LLM, "dart": _IN_LLM,
    "hiprune": _PER_UNIT, "vispruner": _PER_UNIT, "downsample": _PER_UNIT,
    "prumerge": None,  # adaptive (IQR outliers): the count depends on the image
    "cdpruner": _PER_UNIT, "flowcut": _PER_UNIT,
    "vscan": 6,  # layer-average per unit: 9 per unit after the tower, 3 from layer 2 on the tiny models
    "duet": 6,  # layer average per unit: 10 per unit after the tower, 5 from layer 2, 0 from layer 3
    "visiontrim": _PER_UNIT,  # per unit B = D + C (4 = 3 + 1 on the tiny models)
    # layer average of 576 on 32 layers refitted to the 4 tiny layers: 16 -> 16/2/1/0; the tiny Qwen images (4-35
    # merged tokens) need 320 to keep tokens at every stage: 6 -> 6/3/2/1, 35 -> 35/21/13/5
    "trio": {"llava": 192, "llava_next": 192, "video_llava": 192, "qwen2_5_vl": 320, "llava_onevision": 192,
             "internvl": 192, "qwen3_vl": 320, "qwen3_5": 320, "qwen2_vl": 320},
    "mmtok": _PER_UNIT,  # per image / crop
    "apet": _PER_UNIT,  # layer-average per unit: 6 per unit after the tower, 2 from layer 2 (Qwen: 3 / 1)
    "priortr": _IN_LLM,  # layer average, as FastV's (K = 3 of 32 -> 1 of 4 layers)
    "clse": 192,  # the official RETAIN_TOKEN: 16 -> 16/9/5/1 (LLaVA-1.5 only)
    "transprune": None,  # the official lists 0.875 / 0.625 / 0.125: 16 -> 16/14/10/2 (not on Qwen3.5)
    "v2drop": None,  # the official schedule: 16 -> 16/8/4/1 (LLaVA rule; Qwen rule .25 / .05 / 0)
    "ivcprune": _IN_LLM,  # layer average, as FastV's (K = 16 of 32 -> 2 of 4 layers)
    "vlmpruner": _IN_LLM,  # layer average, as FastV's (K = 2 of 32 -> 1 of 4 layers; not on Qwen3.5)
}
#: every registered method (test doubles aside); a new method without a budget here fails loudly
METHODS = [m for m in available_methods() if not m.startswith("test_") and m != "layout_spy"]


def budget(method, family):
    """The method's budget on ``family``'s tiny model; skips the test where the method refuses the family
    (``Method.families``; the refusal itself is tested in the method's own test file)."""
    if not method_supports(method, family):
        pytest.skip(f"{method} does not support {family}")
    b = BUDGETS[method]
    return b[family] if isinstance(b, dict) else b


def test_every_registered_method_has_a_budget_here():
    assert sorted(BUDGETS) == sorted(METHODS)


def equal_length_batch(rt):
    """Three samples whose prompts have the same length (one question, same image sizes): generate()
    then drops the all-ones mask, and any padding must come from the pruning itself."""
    qs = [QUESTIONS[1]] * 3
    if rt.family == "video_llava":
        return rt.processor(qs, videos=[[rand_image(10 * i + j, 50, 50) for j in range(8)] for i in range(3)])
    if rt.family == "llava_next":  # 52 tokens each, but 3 / 5 / 3 crops: per-crop budgets keep unequal counts
        return rt.processor(qs, [rand_image(3 + i, *hw) for i, hw in enumerate([(20, 38), (62, 104), (30, 58)])])
    return rt.processor(qs, [rand_image(i, 40, 70) for i in range(3)])


def unequal_batch(rt):
    """Different questions and images (NeXT: different crop counts); Video-LLaVA: video + 2 images."""
    if rt.family == "video_llava":
        vid = [rand_image(j, 50, 50) for j in range(8)]
        return rt.processor(QUESTIONS, images=[None, rand_image(1, 40, 70), rand_image(2, 90, 30)],
                            videos=[vid, None, None])
    return rt.processor(QUESTIONS, [rand_image(i, *s) for i, s in enumerate([(40, 70), (56, 56), (90, 30)])])


def one_sample(inputs, i, rt):
    out = slice_batch(inputs, i, rt)
    if "pixel_values" in inputs and "pixel_values_videos" in inputs:  # mixed batch: pick this sample's
        ids = out["input_ids"][0]
        has_img = bool((ids == rt.model.config.image_token_id).any())
        has_vid = bool((ids == rt.model.config.video_token_id).any())
        img_before = sum(bool((r == rt.model.config.image_token_id).any()) for r in inputs["input_ids"][:i])
        vid_before = sum(bool((r == rt.model.config.video_token_id).any()) for r in inputs["input_ids"][:i])
        out.pop("pixel_values", None)
        out.pop("pixel_values_videos", None)
        if has_img:
            out["pixel_values"] = inputs["pixel_values"][img_before:img_before + 1]
        if has_vid:
            out["pixel_values_videos"] = inputs["pixel_values_videos"][vid_before:vid_before + 1]
    return out


def run(rt, inputs):
    with torch.no_grad():
        out = rt.model.generate(**inputs, **GEN)
    return out.sequences[:, inputs["input_ids"].shape[1]:], out.scores[0]


@ALL
@pytest.mark.parametrize("batch", ["equal_length", "unequal"])
@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_each_sample_alone(rt, method, batch):
    inputs = (equal_length_batch if batch == "equal_length" else unequal_batch)(rt)
    if batch == "equal_length":
        assert inputs["attention_mask"].all(), "the prompts must have equal lengths here"
    opts = {"seed": 3} if method == "random" else {}
    rt.prune(method, budget(method, rt.family), **opts)
    toks, scores = run(rt, inputs)
    for i in range(3):
        one = one_sample(inputs, i, rt)
        t1, s1 = run(rt, one)
        assert torch.equal(t1[0], toks[i]), f"sample {i}: {t1[0].tolist()} alone vs {toks[i].tolist()} in the batch"
        torch.testing.assert_close(s1[0], scores[i], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- syncs
#: host reads allowed per sample in one pruned prefill (the layout copy, one check per selection, a
#: run count per multi-image sample, the method's own constant few); must not grow with the tokens
SYNC_BOUND = {m: 8 for m in METHODS}  # measured (docs/architecture.md): 1.3-6.7 per sample
SYNC_BOUND.update({"pdrop": 10, "visiondrop": 13, "sparsevlm": 20})  # measured 6.7 / 9.7 / 16.7 (tiny NeXT)


def count_syncs(rt, inputs):
    with torch.no_grad(), SyncCounter() as c:
        rt.model(**inputs)
    return c


def next_batch(rt, size):
    return rt.processor(QUESTIONS, [rand_image(i, *size) for i in range(3)])


_SYNC_INPUTS: dict = {}  # family -> (small batch, large batch, the unpruned model's host reads)


@pytest.mark.parametrize("fam", ["llava-next", "qwen2.5-vl", "llava-onevision"])
@pytest.mark.parametrize("method", METHODS)
def test_host_syncs_per_sample_are_bounded_and_flat_in_visual_tokens(runtimes, method, fam):
    """Small images vs large ones (LLaVA-NeXT: 1-crop-equivalent vs 5 crops, 2-3x the visual tokens;
    Qwen2.5-VL: 6 vs 35 merged tokens; OneVision: 36 vs 104 tokens): the same number of host reads
    per sample (within the stated bound)."""
    rt = runtimes[fam]
    if fam not in _SYNC_INPUTS:  # the batches and the unpruned model's own reads, once per family
        sizes = {"qwen2.5-vl": ((60, 90), (150, 200))}.get(fam, ((30, 30), (90, 120)))  # Qwen: 6 vs 35 tokens
        small_in, large_in = next_batch(rt, sizes[0]), next_batch(rt, sizes[1])
        stock = {"small": 0, "large": 0}
        if fam != "llava-next":
            # transformers' own Qwen2.5-VL / OneVision code reads the host per image and per row (the
            # vision tower's attention segments, get_rope_index, the anyres packing): the same in the
            # unpruned model, so only what the engine and the method add is bounded here
            assert rt.engine is None or rt.engine.method.name == "none"
            stock = {"small": count_syncs(rt, small_in).total, "large": count_syncs(rt, large_in).total}
        _SYNC_INPUTS[fam] = (small_in, large_in, stock)
    small_in, large_in, stock = _SYNC_INPUTS[fam]
    try:
        rt.prune(method, budget(method, rt.family), **({"seed": 3} if method == "random" else {}))
        small = count_syncs(rt, small_in)
        cand_small = sum(s.visual_candidates for s in rt.engine.stats.samples)
        large = count_syncs(rt, large_in)
        cand_large = sum(s.visual_candidates for s in rt.engine.stats.samples)
    finally:
        rt.unprune()
    assert cand_large > 1.5 * cand_small
    added_small, added_large = small.total - stock["small"], large.total - stock["large"]
    per_sample = added_large / 3
    assert per_sample <= SYNC_BOUND[method], (method, dict(large.counts))
    assert added_large <= added_small + 3, (method, dict(small.counts), dict(large.counts))


def test_sync_counter_sees_the_ops_that_stall_a_gpu():
    x = torch.randn(8)
    with SyncCounter() as c:
        x[x > 0]
        x.sum().item()
        torch.nonzero(x > 0)
        x.tolist()
        h = x.cpu()  # one copy to the host; what is then done with it on the host is free
        h.tolist()
        int(h.max())
        torch.arange(4).tolist()  # created on the host
        torch.zeros(2, device=x.device).tolist()  # created on the device
    assert dict(c.counts) == {"bool_index": 1, "item": 1, "nonzero": 1, "tolist": 2, "to_host": 1}


# ---------------------------------------------------------------------------------------------- correctness
@ALL
@pytest.mark.parametrize("method", ["fastv", "dart", "pdrop", "visiondrop", "sparsevlm"])
def test_no_cache_no_mask_forward_equals_generate(rt, method):
    """log-likelihood style calls (no cache, no mask) get the same last-token logits as generate()."""
    inputs = equal_length_batch(rt)
    one = {k: v for k, v in one_sample(inputs, 0, rt).items() if k != "attention_mask"}
    rt.prune(method, budget(method, rt.family))
    with torch.no_grad():
        ref = rt.model.generate(**one, max_new_tokens=1, do_sample=False, output_scores=True,
                                return_dict_in_generate=True).scores[0]
        bare = rt.model(**one, use_cache=False).logits[:, -1]
    torch.testing.assert_close(bare, ref, atol=1e-5, rtol=1e-4)


@ALL
@pytest.mark.parametrize("method", ["random", "fastv"])
def test_second_turn_on_a_pruned_cache_is_refused(rt, method):
    inputs = unequal_batch(rt) if rt.family != "video_llava" else equal_length_batch(rt)
    rt.prune(method, budget(method, rt.family), **({"seed": 1} if method == "random" else {}))
    with torch.no_grad():
        out = rt.model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        follow = rt.processor.tokenizer([" and then?"] * 3, return_tensors="pt", add_special_tokens=False)
        ids = torch.cat([out.sequences, follow["input_ids"]], 1)
        mask = torch.cat([inputs["attention_mask"], torch.ones(3, ids.shape[1] - inputs["attention_mask"].shape[1],
                                                               dtype=torch.long)], 1)
        with pytest.raises(ValueError, match="second turn"):
            rt.model.generate(input_ids=ids, attention_mask=mask, past_key_values=out.past_key_values,
                              max_new_tokens=2, do_sample=False)


def test_duplicate_kept_token_is_an_error_unless_asked_for():
    with pytest.raises(ValueError, match="kept twice"):
        Selection(keep=torch.tensor([0, 2, 2])).validate(4)
    Selection(keep=torch.tensor([0, 2, 2]), allow_duplicates=True).validate(4)
    with pytest.raises(ValueError, match="kept twice"):
        Selection(keep=torch.tensor([0, 1]), targets=torch.tensor([1]), assign=torch.tensor([-1, -1, 0])).validate(3)
    assert Selection(keep=torch.arange(3)).check(3) and not Selection(keep=torch.tensor([0, 2, 1])).check(3)


@ALL
def test_per_prefill_scratch_is_released(rt):
    inputs = unequal_batch(rt)
    eng = rt.prune("consensusdrop", budget("consensusdrop", rt.family))
    with torch.no_grad():
        rt.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    # per-prefill scratch lives in a context passed through the stages; the engine itself keeps only the
    # last selections (for replay) and, until the next call, the decode state
    assert _tensor_attrs(eng) == ["selections"]
    eng = rt.prune("sparsevlm", 64)
    seen = []
    orig = eng.method.select_llm
    eng.method.select_llm = lambda stage, sig: (seen.append(sig), orig(stage, sig))[1]
    with torch.no_grad():
        rt.model(**inputs)
    assert _tensor_attrs(eng) == ["_state", "selections"]  # the decode state of this forward
    assert seen and all(s.vision is None or s.vision._probe_fn is not None for s in seen)
    with pytest.raises(RuntimeError, match="only available while the engine selects"):
        eng2 = rt.prune("consensusdrop", budget("consensusdrop", rt.family))
        kept = []
        orig_v = eng2.method.select_vision
        eng2.method.select_vision = lambda sig: (kept.append(sig), orig_v(sig))[1]
        with torch.no_grad():
            rt.model(**inputs)
        kept[0].probe_attention(0)


def _tensor_attrs(eng) -> list[str]:
    """Names of the engine's attributes that hold tensors (directly or one container level down)."""
    def holds(v):
        if torch.is_tensor(v):
            return True
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, (list, tuple)):
            return any(holds(x) for x in v)
        if hasattr(v, "__dataclass_fields__"):
            return any(holds(getattr(v, f)) for f in v.__dataclass_fields__)
        return False
    return sorted(k for k, v in vars(eng).items() if k not in ("model", "method", "adapter", "lm") and holds(v))


@ALL
@pytest.mark.parametrize("method", METHODS)
def test_static_cache_equals_dynamic_cache(rt, method):
    """generate(cache_implementation="static") (compiled decoding, CUDA graphs) with a method attached."""
    inputs = unequal_batch(rt)
    rt.prune(method, budget(method, rt.family), **({"seed": 3} if method == "random" else {}))
    with torch.no_grad():
        dyn = rt.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        static = rt.model.generate(**inputs, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(dyn, static)


@pytest.mark.parametrize("method", ["consensusdrop", "attnmix", "sparsevlm"])
def test_attach_refuses_query_aware_methods_without_a_prompt_spec(runtimes, method):
    import llava
    from llava.engine import attach

    rt = runtimes["llava"]
    try:
        with pytest.raises(ValueError, match="reads the question"):
            attach(rt.model, method, budget("consensusdrop", "llava") if method != "sparsevlm" else 64)
        # a bare model with its tokenizer and template selects exactly as through the Runtime
        inputs = equal_length_batch(rt)
        b = budget(method, rt.family)
        rt.prune(method, b)
        with torch.no_grad():
            rt.model(**inputs)
        ref = {k: v.keep.clone() for k, v in rt.engine.selections.items()}
        rt.unprune()
        eng = llava.prune(rt.model, method, b, tokenizer=rt.tokenizer, template=rt.template)
        with torch.no_grad():
            rt.model(**inputs)
        assert {k: v.keep for k, v in eng.selections.items()}.keys() == ref.keys()
        assert all(torch.equal(eng.selections[k].keep, ref[k]) for k in ref)
    finally:
        rt.model._pruning_engine.remove() if getattr(rt.model, "_pruning_engine", None) else None


def test_visual_only_methods_attach_without_a_prompt_spec(runtimes):
    from llava.engine import attach

    eng = attach(runtimes["llava"].model, "visionzip", 4)
    eng.remove()


def test_one_method_instance_is_not_shared_by_two_models(runtimes):
    from llava.engine import attach
    from llava.method import get_method

    m = get_method("fastv", 8)
    a, b = runtimes["llava"].model, runtimes["llava-next"].model
    eng = attach(a, m)
    try:
        with pytest.raises(ValueError, match="another model"):
            attach(b, m)
        attach(a, m)  # re-attaching to the same model replaces the engine: fine
    finally:
        a._pruning_engine.remove()
    attach(b, m).remove()  # free again once the first engine is gone
    del eng
