"""Engine properties on the tiny random-weight models of all three families (CPU)."""

import pytest
import torch
from conftest import ALL_FAMILIES, FAMILIES, make_batch, slice_batch, greedy_no_cache

from llava.engine import attach

GEN = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
ALL = pytest.mark.parametrize("rt", ALL_FAMILIES, indirect=True)


def stock(rt, inputs, **gen):
    rt.unprune()
    with torch.no_grad():
        return rt.model(**inputs).logits, rt.model.generate(**inputs, **(gen or GEN))


def pruned(rt, method, budget=None, inputs=None, **opts):
    eng = rt.prune(method, budget, **opts)
    with torch.no_grad():
        out = rt.model(**inputs)
        toks = rt.model.generate(**inputs, **GEN)
    return out.logits, toks, eng


@ALL
@pytest.mark.parametrize("method,budget,opts", [
    ("none", None, {}),
    ("test_keep_first_k", 100000, {}),          # budget above the token count: a reported no-op
    ("test_every_other_after2", None, {"stride": 1}),  # llm stage keeping all: our staged decoder loop
])
def test_keep_all_is_bit_identical(rt, method, budget, opts):
    inputs = make_batch(rt)
    ref_logits, ref_toks = stock(rt, inputs)
    logits, toks, eng = pruned(rt, method, budget, inputs, **opts)
    assert eng.prefills == 2  # forward and generate both went through the engine
    assert torch.equal(logits, ref_logits)
    assert torch.equal(toks, ref_toks)
    if method == "test_keep_first_k":
        assert all(s.vision_noop for s in eng.stats.samples)




@ALL
@pytest.mark.parametrize("method,budget,opts", [
    ("test_keep_first_k", 5, {}),
    ("test_keep_first_merge_rest", 6, {}),
    ("test_keep_first_merge_rest", 6, {"space": "projected"}),
    ("test_every_other_after2", None, {}),
    ("test_every_other_after2", None, {"position_mode": "reindex"}),
    ("test_every_other_after2", None, {"layer": 1, "stride": 3}),
    ("test_last_row_topk", 4, {}),
])
def test_cached_generation_equals_no_cache_recompute(rt, method, budget, opts):
    inputs = make_batch(rt)
    eng = rt.prune(method, budget, **opts)
    with torch.no_grad():
        cached = rt.model.generate(**inputs, **GEN)
    eng.replay = True  # the recompute sees generated tokens: query-aware methods must keep the same set
    recomputed = greedy_no_cache(rt.model, inputs, GEN["max_new_tokens"])
    assert torch.equal(cached, recomputed)


@ALL
@pytest.mark.parametrize("method,budget,opts", [
    ("none", None, {}),
    ("test_keep_first_k", 5, {}),
    ("test_every_other_after2", None, {"position_mode": "reindex"}),
    ("test_last_row_topk", 4, {}),
])
def test_batch_equals_each_sample_alone(rt, method, budget, opts):
    inputs = make_batch(rt)
    assert (inputs["attention_mask"] == 0).any(), "the batch must be padded for this test to mean anything"
    rt.prune(method, budget, **opts)
    with torch.no_grad():
        batch_toks = rt.model.generate(**inputs, **GEN)
        batch_logits = rt.model(**inputs).logits[:, -1]
    new = batch_toks[:, inputs["input_ids"].shape[1]:]
    for i in range(3):
        one = slice_batch(inputs, i, rt)
        with torch.no_grad():
            toks = rt.model.generate(**one, **GEN)
            logits = rt.model(**one).logits[:, -1]
        assert torch.equal(toks[0, one["input_ids"].shape[1]:], new[i])
        torch.testing.assert_close(logits[0], batch_logits[i], atol=1e-5, rtol=1e-4)


@ALL
def test_text_only_prompt_passes_through(rt):
    inputs = rt.processor(["what is the color of a red circle?", "how many"], [None, None])
    ref_logits, ref_toks = stock(rt, inputs)
    eng = rt.prune("test_every_other_after2")
    with torch.no_grad():
        toks = rt.model.generate(**inputs, **GEN)
        logits = rt.model(**inputs).logits
    assert torch.equal(toks, ref_toks) and torch.equal(logits, ref_logits)
    assert eng.stats is None  # the engine never ran


@ALL
@pytest.mark.parametrize("method,budget,opts", [
    ("none", None, {}),
    ("test_keep_first_k", 5, {}),
    ("test_keep_first_merge_rest", 6, {}),
    ("test_every_other_after2", None, {}),
    ("test_every_other_after2", None, {"layer": 3, "stride": 3, "position_mode": "reindex"}),
])
def test_reported_token_counts_match_cache_lengths(rt, method, budget, opts):
    inputs = make_batch(rt)
    eng = rt.prune(method, budget, **opts)
    with torch.no_grad():
        out = rt.model(**inputs, use_cache=True)
    cache = out.past_key_values
    # attention layers (a hybrid model's linear-attention layers keep a state, not a length)
    attn = [i for i, layer in enumerate(cache.layers) if hasattr(layer, "keys")]
    assert len(attn) == (2 if rt.family == "qwen3_5" else len(cache.layers))
    lengths = [cache.layers[i].keys.shape[-2] for i in attn]
    assert [eng.stats.seq_len_per_layer[i] for i in attn] == lengths
    # per sample: a single unpadded sample's cache holds exactly its text + visual tokens per layer
    for i in range(3):
        one = slice_batch(inputs, i, rt)
        with torch.no_grad():
            c = rt.model(**one, use_cache=True).past_key_values
        n_text = int((~torch.isin(one["input_ids"][0], torch.tensor([rt.model.config.image_token_id,
                                                                     getattr(rt.model.config, "video_token_id", -1)]))).sum())
        s = eng.stats.samples[0]
        assert [c.layers[j].keys.shape[-2] for j in attn] == [n_text + s.visual_per_layer[j] for j in attn]


def expected_counts(rt, method, n_visual, opts):
    L = len(rt.model.model.language_model.layers)
    if method == "test_keep_first_k":
        return [min(5, n_visual)] * L
    if method == "test_every_other_after2":
        k, stride = opts.get("layer", 2), opts.get("stride", 2)
        kept = len(range(0, n_visual, stride))
        return [n_visual] * k + [kept] * (L - k)
    return [n_visual] * L


@ALL
@pytest.mark.parametrize("method,budget,opts", [
    ("test_keep_first_k", 5, {}),
    ("test_every_other_after2", None, {}),
    ("test_every_other_after2", None, {"layer": 3, "stride": 3}),
])
def test_per_layer_schedule_and_layer_average(rt, method, budget, opts):
    inputs = make_batch(rt)
    eng = rt.prune(method, budget, **opts)
    with torch.no_grad():
        rt.model(**inputs)
    for s in eng.stats.samples:
        exp = expected_counts(rt, method, s.visual_candidates, opts)
        assert s.visual_per_layer == exp
        assert s.visual_entering_llm == exp[0]
        assert s.visual_layer_avg == pytest.approx(sum(exp) / len(exp))


def test_question_tokens_exclude_separator_and_role_tag(runtimes):
    rt = runtimes["llava"]
    seen = {}

    from llava.method import Method
    from llava.selection import Selection

    class Spy(Method):
        name = "spy"
        vision_stage = True

        def select_vision(self, sig):
            seen["q"] = sig.question_mask.clone()
            seen["n"] = sig.text_embeds.shape[0]
            return Selection(keep=torch.arange(sig.num_tokens))

    inputs = rt.processor(["what is this?"], [None])  # text-only has no visual block; use an image
    from conftest import rand_image

    inputs = rt.processor(["what is this?"], [rand_image(0)])
    attach(rt.model, Spy(), prompt_spec=rt.prompt_spec())
    with torch.no_grad():
        rt.model(**inputs)
    rt.model._pruning_engine.remove()
    # text after the image: "\n what is this ? assistant :" -> question = "what is this ?"
    assert seen["n"] == 7
    assert seen["q"].tolist() == [False, True, True, True, True, False, False]


def test_llm_signals_entry_embeddings_follow_the_tokens(runtimes):
    """visual_embeds / text_embeds at a later stage are the layer-0 inputs of the surviving tokens."""
    rt = runtimes["llava"]
    from llava.method import Method
    from llava.selection import Selection

    seen = []

    class TwoStage(Method):
        name = "two_stage_probe"

        @property
        def llm_layers(self):
            return (1, 3)

        def select_llm(self, stage, sig):
            sig.state.setdefault("stages", []).append(stage)  # per-sample scratch across stages
            seen.append(sig)
            return Selection(keep=torch.arange(1, sig.num_visual, 2))  # odd positions

    inputs = make_batch(rt, n=2)
    rt.model.model.language_model  # noqa: B018
    attach(rt.model, TwoStage(), prompt_spec=rt.prompt_spec())
    with torch.no_grad():
        out = rt.model(**inputs)
    rt.model._pruning_engine.remove()
    first, second = seen[0], seen[2]  # sample 0 at stages 0 and 1
    assert first.num_visual == 16 and second.num_visual == 8
    assert torch.equal(second.visual_embeds, first.visual_embeds[1::2])
    assert torch.equal(second.origin, torch.arange(1, 16, 2))
    assert torch.equal(second.text_embeds, first.text_embeds)
    assert second.num_visual_entry == first.num_visual_entry == 16
    assert torch.equal(second.entry_visual_embeds, first.visual_embeds)
    assert second.state is first.state and first.state["stages"] == [0, 1]
    assert seen[1].state is not first.state  # sample 1 has its own
    assert torch.allclose(second.final_norm(), rt.model.model.language_model.norm(second.hidden))
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - 16 + 4


def test_next_spatial_layout_is_llava_full_grid_raster():
    """LLaVA's 'spatial' merge: base crop, then (rows, cols, h, w) permuted to (rows, h, cols, w)."""
    from types import SimpleNamespace

    from llava.families.llava_next import next_token_layout

    cfg = SimpleNamespace(image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
                          vision_config=SimpleNamespace(image_size=56))
    # a 40x70 image -> 56x112 pinpoint: 1 row x 2 crops of 2x2 patches (4 tokens each), base first
    idx = next_token_layout((40, 70), cfg, 3, 4, "spatial")
    # base 0-3; crop 1 = tokens 4..7 (patches (0,0),(0,1),(1,0),(1,1)), crop 2 = 8..11.
    # full grid row 0: crop1 p0, p1, crop2 p0, p1; row 1: crop1 p2, p3, crop2 p2, p3
    assert idx.tolist() == [0, 1, 2, 3, 4, 5, 8, 9, 6, 7, 10, 11]
