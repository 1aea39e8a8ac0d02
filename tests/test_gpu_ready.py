"""What the CUDA path needs, proven on a CPU: batch == alone for every registered method in every
padding case, decode masks, a bounded number of host synchronisations per sample, explicit masks
for no-cache forwards, refused second turns on a pruned cache, released per-prefill scratch."""

import pytest
import torch
from conftest import ALL_FAMILIES

from llava.check.budgets import BUDGETS, sync_bound, sync_sizes, tiny_budget
from llava.check.guarantees import (check_batch_equals_alone, check_host_syncs, check_no_mask_forward,  # noqa: F401
                                    count_syncs, stock_syncs)
from llava.check.inputs import equal_length_batch, sized_batch, unequal_batch
from llava.method import available_methods, method_supports
from llava.selection import Selection
from llava.syncs import SyncCounter

ALL = pytest.mark.parametrize("rt", ALL_FAMILIES, indirect=True)

#: every registered method (test doubles aside); a new method without a budget here fails loudly
METHODS = [m for m in available_methods() if not m.startswith("test_") and m != "layout_spy"]


def budget(method, family):
    """The method's budget on ``family``'s tiny model; skips the test where the method refuses the family
    (``Method.families``; the refusal itself is tested in the method's own test file)."""
    if not method_supports(method, family):
        pytest.skip(f"{method} does not support {family}")
    return tiny_budget(method, family)


def test_every_registered_method_has_a_budget_here():
    assert sorted(BUDGETS) == sorted(METHODS)


@ALL
@pytest.mark.parametrize("batch", ["equal_length", "unequal"])
@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_each_sample_alone(rt, method, batch):
    opts = {"seed": 3} if method == "random" else {}
    check_batch_equals_alone(rt, method, budget(method, rt.family), batch=batch, **opts)


# ---------------------------------------------------------------------------------------------- syncs
#: host reads allowed per sample in one pruned prefill (llava.check.budgets: the layout copy, one check per selection,
#: a run count per multi-image sample, the method's own constant few); must not grow with the tokens
SYNC_BOUND = {m: sync_bound(m) for m in METHODS}
next_batch = sized_batch  # the three questions, each with an image of one size (tests/test_trio.py)


_SYNC_INPUTS: dict = {}  # family -> (small batch, large batch, the unpruned model's host reads)


@pytest.mark.parametrize("fam", ["llava-next", "qwen2.5-vl", "llava-onevision"])
@pytest.mark.parametrize("method", METHODS)
def test_host_syncs_per_sample_are_bounded_and_flat_in_visual_tokens(runtimes, method, fam):
    """Small images vs large ones (LLaVA-NeXT: 1-crop-equivalent vs 5 crops, 2-3x the visual tokens;
    Qwen2.5-VL: 6 vs 35 merged tokens; OneVision: 36 vs 104 tokens): the same number of host reads
    per sample (within the stated bound)."""
    rt = runtimes[fam]
    if fam not in _SYNC_INPUTS:  # the batches and the unpruned model's own reads, once per family
        small_in, large_in = (next_batch(rt, size) for size in sync_sizes(rt.family))
        _SYNC_INPUTS[fam] = (small_in, large_in, stock_syncs(rt, small_in, large_in))
    small_in, large_in, stock = _SYNC_INPUTS[fam]
    check_host_syncs(rt, method, budget(method, rt.family), bound=SYNC_BOUND[method], small=small_in, large=large_in,
                     stock=stock, **({"seed": 3} if method == "random" else {}))


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
    check_no_mask_forward(rt, method, budget(method, rt.family))


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
