"""The fast path (llava.fast.path): a host plan, then one static-shape prefill per length bucket compiled
with ``torch.compile(fullgraph=True)`` (dynamo only here: the compiler without code generation proves
the function is capturable), and a one-graph decode. Checked against the eager engine's ``generate()``."""

import pytest
import torch
from conftest import rand_image
from fastpath_util import (BACKEND, PROMPTS, SINGLES, assert_same_as_eager, counting_fast_path, family_batch, generate,
                           inputs, prune_family, sized_inputs)

from llava.fast.path import BUCKETS, FastPath, bucket_for
from llava.method import available_methods, get_method
from llava.models import load

#: every method declared capturable="full", with a budget that prunes the tiny 16-token images
CAPTURED = [("none", None), ("novisual", None), ("fastervlm", 4), ("random", 4), ("divprune", 4), ("otprune", 4), ("visionzip", 6)]


@pytest.fixture(scope="module")
def rt_fast():
    return load("tiny:llava", seed=1, fast=True, fast_max_new_tokens=16, fast_backend=BACKEND)


@pytest.fixture(scope="module")
def rt_eager():
    return load("tiny:llava", seed=1)


def test_every_method_declares_capturability():
    from llava.method import _REGISTRY

    for name in available_methods():
        cls = _REGISTRY[name]
        if cls.__module__.split(".")[0] not in ("llava", "baselines", "consensusdrop", "visiondrop", "attnmix"):
            continue  # the tests' own example methods
        assert cls.capturable in ("full", "piecewise", None), name
        if cls.capturable is None:
            assert cls.capture_reason, name
    assert get_method("trio", None).capture_refusal() == get_method("trio", None).capture_reason
    assert get_method("fastervlm", 4).capture_refusal() is None
    assert get_method("divprune", 4, numerics="official").capture_refusal()  # the reference mode runs eagerly
    assert get_method("otprune", 4, order="official").capture_refusal()  # the set order: host-built probe tables


def test_buckets():
    assert bucket_for(1) == BUCKETS[0] and bucket_for(64) == 64 and bucket_for(65) == 96
    assert bucket_for(BUCKETS[-1] + 1) == -(-(BUCKETS[-1] + 1) // 256) * 256


@pytest.mark.parametrize("method,budget", CAPTURED)
def test_fast_tokens_equal_the_eager_engine(rt_fast, rt_eager, method, budget):
    """Greedy tokens and first-step scores of the fast path == the eager engine's,
    on a left-padded batch of 3 prompts of different lengths (FAST_FULL=1: also each alone)."""
    torch._dynamo.reset()
    eng = rt_fast.prune(method, budget)
    rt_eager.prune(method, budget)
    assert eng.fast is not None and eng.fast.refusal is None
    for i in SINGLES:
        assert_same_as_eager(rt_fast, rt_eager, eng, inputs(rt_fast, i))
    assert_same_as_eager(rt_fast, rt_eager, eng, inputs(rt_fast, 0, n=3))


@pytest.fixture(scope="module")
def family_rts():
    return {fam: (load(f"tiny:{fam}", seed=1, fast=True, fast_max_new_tokens=16, fast_backend=BACKEND),
                  load(f"tiny:{fam}", seed=1)) for fam in ("llava_next", "video_llava")}


#: novisual (no visual token at all) is the same plan on every family: checked on LLaVA-1.5 only (CI time)
FAMILY_CASES = ([("llava_next", False, m, b) for m, b in CAPTURED if m != "novisual"]
                + [("video_llava", True, m, b) for m, b in CAPTURED if m != "novisual"]
                # Video-LLaVA's images differ from LLaVA-1.5's only in the tower the adapter picks
                + [("video_llava", False, "visionzip", 6)]
                # VisionZip at 2 = 2 dominant + 0 contextual: no merge target in any crop (its order was once
                # compared with the identity on the host there, so the plan failed and the prefill ran eagerly)
                + [("llava_next", False, "visionzip", 2)])


@pytest.mark.parametrize("family,video,method,budget", FAMILY_CASES)
def test_fast_tokens_equal_the_eager_engine_on_next_and_video_llava(family_rts, family, video, method, budget):
    """The other two LLaVA families: LLaVA-NeXT (anyres crops, unpadded grid with newline tokens, one unit
    per crop) and Video-LLaVA (images through the image tower; videos: 8 frames, each a unit with its
    [CLS] kept). Greedy tokens and first-step scores == the eager engine, three prompts in one batch."""
    rt_fast, rt_eager = family_rts[family]
    eng = prune_family(rt_fast, method, budget, traced=method in ("none", "visionzip"))
    rt_eager.prune(method, budget)
    assert_same_as_eager(rt_fast, rt_eager, eng, family_batch(rt_fast, family, video))


@pytest.mark.parametrize("method,budget", [("divprune", 4), ("visionzip", 6)])
def test_one_prefill_graph_per_bucket_and_one_decode_graph(rt_fast, rt_eager, method, budget):
    """After the first prompt, prompts of other lengths in the same bucket and 16 decode steps
    compile nothing (recompilation raises); batch 1: tokens == eager."""
    torch._dynamo.reset()
    eng = rt_fast.prune(method, budget)
    rt_eager.prune(method, budget)
    first = inputs(rt_fast, 0)
    assert torch.equal(generate(rt_fast, first, tokens=16)[0], generate(rt_eager, first, tokens=16)[0])
    bucket = eng.stats.bucket
    assert eng.stats.new_graph
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in (1, 2, 3):
            batch = inputs(rt_fast, i)
            assert batch["input_ids"].shape[1] != first["input_ids"].shape[1] or i == 3
            toks = generate(rt_fast, batch, tokens=16)[0]
            assert eng.stats.path == "fast" and eng.stats.bucket == bucket and not eng.stats.new_graph
            assert torch.equal(toks, generate(rt_eager, batch, tokens=16)[0])


@pytest.mark.parametrize("method,budget", CAPTURED)
def test_no_host_sync_inside_the_captured_prefill(rt_fast, method, budget):
    """The captured function (run uncompiled) reads nothing from the device: the plan did it all."""
    eng = rt_fast.prune(method, budget)
    fp, calls = counting_fast_path(eng)
    batch = inputs(rt_fast, 1, n=2)
    with torch.no_grad():
        fp.prefill(batch["input_ids"], batch["attention_mask"], {"pixel_values": batch["pixel_values"]})
    assert calls == [0]


def test_refused_prefills_run_eagerly_and_say_why(rt_fast, rt_eager):
    eng = rt_fast.prune("trio", None)
    assert "gradient" in eng.fast.refusal
    batch = inputs(rt_fast, 0)
    toks, _ = generate(rt_fast, batch)
    assert eng.stats.path == "eager" and "gradient" in eng.stats.path_reason
    rt_eager.prune("trio", None)
    assert torch.equal(toks, generate(rt_eager, batch)[0])
    eng = rt_fast.prune("fastervlm", 4, numerics="official")
    generate(rt_fast, batch)
    assert eng.stats.path == "eager" and "official" in eng.stats.path_reason


def test_two_images_in_one_prompt_run_eagerly(rt_fast):
    eng = rt_fast.prune("fastervlm", 4)
    batch = rt_fast.processor(["what differs?"], [[rand_image(0), rand_image(1)]])
    generate(rt_fast, batch, tokens=2)
    assert eng.stats.path == "eager" and "one image" in eng.stats.path_reason


def test_decode_beyond_the_static_cache_is_refused(rt_fast):
    rt_fast.prune("fastervlm", 4)
    with pytest.raises(ValueError, match="static cache"):
        generate(rt_fast, inputs(rt_fast, 0), tokens=200)


def test_malformed_selection_is_an_error_not_a_wrong_answer(rt_fast):
    """A method declared capturable whose selection is malformed: the one flag read after the
    prefill raises (the eager engine's Selection.check would have)."""
    from llava.method import Method
    from llava.selection import Selection

    class Dup(Method):
        name = "dup-test"
        vision_stage = True
        capturable = "full"

        def select_vision(self, sig):
            return Selection(keep=sig.unit_layout().tokens[0][:2] * 0)  # token 0 twice

    rt_fast.prune(Dup())
    with pytest.raises(ValueError, match="malformed"):
        generate(rt_fast, inputs(rt_fast, 0), tokens=2)


def _text_topk_method():
    """A query-aware test method: the tokens most similar to the question (AdaV's s_j over the masked
    text rows), top-k; capturable."""
    from llava.method import Method
    from llava.ops import text_to_image_score, topk_desc
    from llava.selection import Selection

    class TextTopK(Method):
        name = "text-topk-test"
        vision_stage = True
        query_aware = True
        capturable = "full"

        def select_vision(self, sig):
            text, mask = sig.text_rows("question")
            s = text_to_image_score(text, sig.features, 100.0, mask)
            return Selection(keep=topk_desc(s, self.budget).sort().values)

    return TextTopK


@pytest.mark.parametrize("family", ["llava"])  # NeXT / Video-LLaVA: AttnMix, ConsensusDrop, CDPruner's own tests
def test_query_aware_methods_read_a_padded_text_block(rt_fast, rt_eager, family_rts, family):
    """The text after the image reaches a captured method padded to a text bucket (``text_mask``,
    ``question_mask``): selections and tokens == the eager engine's (unpadded text), for prompts whose
    questions differ in length, in one batch and alone; one graph serves the bucket."""
    torch._dynamo.reset()
    fast, eager = (rt_fast, rt_eager) if family == "llava" else family_rts[family]
    cls = _text_topk_method()
    eng = fast.prune(cls(5))
    eager.prune(cls(5))
    for n in (1, 3):
        batch = (inputs(fast, 1, n=n) if family == "llava" else fast.processor(
            PROMPTS[:n], [rand_image(j, 40 + 10 * j, 56) for j in range(n)]))
        assert_same_as_eager(fast, eager, eng, batch)


def test_the_padded_text_block_holds_the_eager_question_rows(rt_fast, rt_eager):
    """Row for row: the fast path's masked text block == the eager engine's text after the image, and its
    question mask marks the same rows (the uncompiled function records what the method saw)."""
    cls = _text_topk_method()
    seen = {}

    class Recording(cls):
        def select_vision(self, sig):
            text, mask = sig.text_rows("all")
            if text.is_meta:  # the plan's dry run (shapes only)
                return super().select_vision(sig)
            seen.setdefault(sig.captured, []).append(
                (text, mask if mask is not None else torch.ones(text.shape[0], dtype=torch.bool), sig.question_mask))
            return super().select_vision(sig)

    eng = rt_fast.prune(Recording(5))
    rt_eager.prune(Recording(5))
    batch = inputs(rt_fast, 0, n=3)
    generate(rt_eager, batch, tokens=1)
    fp = FastPath(eng.env, backend="none", max_new_tokens=16)
    with torch.no_grad():
        fp.prefill(batch["input_ids"], batch["attention_mask"], {"pixel_values": batch["pixel_values"]})
    assert len(seen[True]) == len(seen[False]) == 3
    for (ft, fm, fq), (et, em, eq) in zip(seen[True], seen[False]):
        n = int(em.sum())
        assert ft.shape[0] in (16, 32, 64) and ft.shape[0] >= n and bool(em.all())
        assert torch.equal(fm, torch.arange(ft.shape[0]) < n)  # the real rows first, then padding
        torch.testing.assert_close(ft[:n], et)
        assert torch.equal(fq[:n], eq) and not bool(fq[n:].any())


def test_fast_load_captures_the_unpruned_model_without_prune():
    """Issue 50 item 3: ``load(..., fast=True)`` alone (no ``rt.prune``) runs the unpruned model on the fast path
    - the baseline every speed-up is timed against - and its greedy tokens and first-step scores equal the stock
    eager ``generate()`` of the same weights (no engine attached at all)."""
    torch._dynamo.reset()
    fast = load("tiny:llava", seed=1, fast=True, fast_max_new_tokens=16, fast_backend=BACKEND)
    stock = load("tiny:llava", seed=1)
    assert stock.engine is None and fast.engine is not None and fast.engine_by_load
    assert fast.engine.method.name == "none" and fast.engine.fast.refusal is None
    batch = inputs(fast, 0, n=3)
    toks, scores = generate(fast, batch)
    assert fast.engine.stats.path == "fast" and fast.engine.stats.new_graph  # captured, not eager
    ref_toks, ref_scores = generate(stock, batch)
    assert torch.equal(toks, ref_toks)
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-5)
    eng = fast.prune("random", 4)  # a method attached later replaces it, on the fast path as before
    assert not fast.engine_by_load and eng.fast is not None


@pytest.mark.parametrize("method,budget", [("visionzip", 2), ("divprune", 6)])
def test_next_crops_that_unpadding_removes_whole_count_as_no_unit_on_both_paths(family_rts, method, budget):
    """An 8 x 96 image on the tiny LLaVA-NeXT: the 56 x 168 pinpoint (three crops: the base and a 1 x 3 grid), whose
    4 x 12 patch map unpads to 0 rows, so the prompt shows only its base crop's 16 tokens and one newline-free
    layout. Both executors number a prompt's units by the tokens they show (``sample_units``): one unit, beside a
    40 x 56 image's three; tokens, scores and counts == the eager engine."""
    rt_fast, rt_eager = family_rts["llava_next"]
    batch = sized_inputs(rt_fast, [(8, 96), (40, 56)])
    u = rt_fast.prune("none", None).adapter._units(batch["image_sizes"].tolist())
    assert u.counts[0] == 3 and u.sizes[0] == 16 and set(u.unit[:16].tolist()) == {0}
    eng = prune_family(rt_fast, method, budget, traced=False)
    rt_eager.prune(method, budget)
    assert_same_as_eager(rt_fast, rt_eager, eng, batch)
    assert [s.visual_candidates for s in eng.stats.samples][0] == 16
