"""The Qwen2-VL family (``Qwen2VLForConditionalGeneration``, llava/families/qwen2_vl.py) on the tiny model.

Qwen2-VL is Qwen2.5-VL's language model, prompt and processor before Qwen2-VL's own vision tower (full attention in
every block, LayerNorm, a GELU MLP, the PatchMerger). This file checks what is the family's own: the loading tables,
the unpruned engine against the stock transformers model, the vision signals against a brute-force recomputation
from the stock tower's own q / k, the fast path's static tower and tokens, which methods run and which rule they
resolve to, and the engine's invariants (batch == each sample alone, cached generation == no-cache recompute, device
placement) for a representative set of methods; the suite-wide lists (tests/conftest.ALL_FAMILIES, the registry's
families) check it with every method as well.

fp32 on the CPU; comparisons of outputs are exact (``torch.equal``) unless a tolerance is named.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import greedy_no_cache, make_batch, rand_image, skip_hybrid_refusals, slice_batch
from device_check import DevicePlacementCheck, check_method
from fastpath_util import PROMPTS, assert_same_as_eager, counting_fast_path, generate
from test_device_placement import build
from test_engine import GEN
from test_gpu_ready import budget as gpu_ready_budget

from llava.families import Qwen2VLAdapter, adapter_for, qwen_vision
from llava.method import get_method, method_supports
from llava.families import registry
from llava.models import build_tiny, load

FAM = "qwen2_vl"


@pytest.fixture(scope="module")
def q2():
    return skip_hybrid_refusals(load("tiny:qwen2-vl", seed=1))


@pytest.fixture
def rt(q2):
    yield q2
    q2.unprune()


# ------------------------------------------------------------------------------------------------ loading


def test_tiny_model_tables_and_adapter():
    """``tiny:qwen2-vl`` is a Qwen2VLForConditionalGeneration at the tiny Qwen2.5-VL's sizes (the tower's width is
    ``embed_dim``; its ``hidden_size`` is the merger's output, the LLM's width), on the qwen2_vl template; the
    adapter is Qwen2VLAdapter with the tower's dimensions."""
    rec = registry.get("qwen2-vl")
    assert rec.id == FAM and rec.model_class == "Qwen2VLForConditionalGeneration" and rec.template == "qwen2_vl"
    r = build_tiny("qwen2-vl")
    assert type(r.model).__name__ == "Qwen2VLForConditionalGeneration" and r.family == FAM
    assert r.template.name == "qwen2_vl" and type(r.processor).__name__ == "QwenVLProcessor"
    vc, tc = r.model.config.vision_config, r.model.config.text_config
    assert (vc.depth, vc.embed_dim, vc.hidden_size, vc.num_heads, vc.spatial_merge_size, vc.patch_size) == (
        4, 32, 64, 2, 2, 14)
    assert (tc.num_hidden_layers, tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads) == (4, 64, 4, 2)
    assert tc.rope_parameters["mrope_section"] == [2, 3, 3]
    visual = r.model.model.visual
    assert not qwen_vision.is_windowed(visual) and not qwen_vision.is_qwen3(visual)
    assert not hasattr(visual, "fullatt_block_indexes") and getattr(visual, "pos_embed", None) is None
    ad = adapter_for(r.model)
    assert isinstance(ad, Qwen2VLAdapter) and ad.family == FAM and ad.keeps_positions
    assert ad.signal_widths() == (2, 16, 128)  # heads, embed_dim / heads, embed_dim * merge^2


def test_a_saved_folder_loads_as_the_family(tmp_path, q2):
    """``save_pretrained`` + tokenizer + image processor -> ``llava.load(folder)`` detects Qwen2-VL and gives the
    same logits."""
    q2.model.save_pretrained(tmp_path)
    q2.tokenizer.save_pretrained(tmp_path)
    q2.processor.image_processor.save_pretrained(tmp_path)
    r = load(str(tmp_path))
    assert r.family == FAM and type(r.model).__name__ == "Qwen2VLForConditionalGeneration"
    inputs = make_batch(q2)
    assert torch.equal(r.processor(["what is this?"], [rand_image(0, 40, 70)])["input_ids"],
                       q2.processor(["what is this?"], [rand_image(0, 40, 70)])["input_ids"])
    with torch.no_grad():
        assert torch.equal(r.model(**inputs).logits, q2.model(**inputs).logits)


# ------------------------------------------------------------------------------------ unpruned == stock


def test_unpruned_engine_is_the_stock_model_and_batch_equals_alone(rt):
    """A left-padded batch of three prompts with three image sizes (grids 1x4x6, 1x4x4, 1x8x4: 6 / 4 / 8 merged
    tokens): the engine with no method == the stock transformers model (logits, greedy tokens), and each sample's
    greedy tokens in the batch == the sample alone."""
    inputs = make_batch(rt)
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6], [1, 4, 4], [1, 8, 4]]
    assert "second_per_grid_ts" not in inputs
    with torch.no_grad():
        ref_logits, ref_toks = rt.model(**inputs).logits, rt.model.generate(**inputs, **GEN)
    eng = rt.prune("none")
    with torch.no_grad():
        logits, toks = rt.model(**inputs).logits, rt.model.generate(**inputs, **GEN)
    assert eng.prefills == 2 and [s.visual_candidates for s in eng.stats.samples] == [6, 4, 8]
    assert torch.equal(logits, ref_logits) and torch.equal(toks, ref_toks)
    new = toks[:, inputs["input_ids"].shape[1]:]
    for i in range(3):
        one = slice_batch(inputs, i, rt)
        with torch.no_grad():
            alone = rt.model.generate(**one, **GEN)
            stock_logits = rt.model(**one).logits
        assert torch.equal(alone[0, one["input_ids"].shape[1]:], new[i])
        real = inputs["attention_mask"][i].bool()  # the batch's real rows == the sample alone (fp32)
        torch.testing.assert_close(logits[i][real], stock_logits[0], atol=1e-5, rtol=1e-5)


def test_positions_are_the_models_get_rope_index_and_kept_tokens_keep_theirs(rt):
    """The 4 x 6 patch image (2 x 3 merged tokens) after p0 text tokens: the model's ``get_rope_index`` gives
    (t, h, w) = (p0, p0 + row, p0 + col), the text after it continues at p0 + 3; the engine hands the decoder those
    positions at the kept tokens (random keeps 3 of 6) and the text's own."""
    inputs = rt.processor(["what is this?"], [rand_image(0, 56, 84)])
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 6]]
    ids = inputs["input_ids"][0]
    vis = (ids == rt.model.config.image_token_id).nonzero().flatten()
    p0, L = int(vis[0]), ids.numel()
    eng = rt.prune("random", 3, seed=2)
    emb, mask, pos, _ = eng.vision_inputs(inputs["input_ids"], {k: inputs[k] for k in ("pixel_values",
                                                                                       "image_grid_thw")},
                                          inputs["attention_mask"])
    full = torch.stack([torch.cat([torch.arange(p0), p0 + torch.tensor([0] * 6), p0 + 3 + torch.arange(L - p0 - 6)]),
                        torch.cat([torch.arange(p0), p0 + torch.tensor([0, 0, 0, 1, 1, 1]),
                                   p0 + 3 + torch.arange(L - p0 - 6)]),
                        torch.cat([torch.arange(p0), p0 + torch.tensor([0, 1, 2, 0, 1, 2]),
                                   p0 + 3 + torch.arange(L - p0 - 6)])])
    keep = eng.selections[("vision", 0)].keep.sort().values
    want = torch.cat([full[:, :p0], full[:, p0 + keep], full[:, p0 + 6:]], 1)
    assert emb.shape[1] == L - 3 and torch.equal(pos[:, 0], want)


def test_token_types_are_rebuilt_when_missing(rt):
    """Without ``mm_token_type_ids`` transformers would fall back to 1-D positions; the engine rebuilds them."""
    inputs = make_batch(rt)
    rt.prune("visionzip", 2)
    with torch.no_grad():
        ref = rt.model(**inputs).logits
        bare = rt.model(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"}).logits
    assert torch.equal(ref, bare)


# ------------------------------------------------------------------------------------------ vision signals

GRID = [[1, 12, 8], [1, 4, 6]]  # merged 6 x 4 = 24 and 2 x 3 = 6 tokens


def _pixels(model, grid, seed):
    width = model.model.visual.patch_embed.proj.weight[0].numel()
    return torch.randn(sum(t * h * w for t, h, w in grid), width, generator=torch.Generator().manual_seed(seed))


def _hw_positions(grid):
    """(N, 2) (row, col) of each patch in the processor's merge-block order, written out by hand."""
    out = []
    for t, h, w in grid:
        for _ in range(t):
            for br in range(h // 2):
                for bc in range(w // 2):
                    for i in range(2):
                        for j in range(2):
                            out.append((2 * br + i, 2 * bc + j))
    return torch.tensor(out)


def _brute_force(model, px, grid, layer, video=False):
    """Per head (H, T) received and pooled-query saliency and (T, d) keys in float64 from the block's own captured
    attention input, hand-built rotary positions and a full softmax per image / temporal slice; first checked
    against the block's own attention output (so it sees the q / k the tower used)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    visual = model.model.visual
    attn = visual.blocks[layer].attn
    got = {}
    h1 = attn.register_forward_pre_hook(lambda m, a, kw: got.__setitem__("x", a[0]), with_kwargs=True)
    h2 = attn.register_forward_hook(lambda m, a, o: got.__setitem__("o", o))
    try:
        with torch.no_grad():
            (model.model.get_video_features if video else model.model.get_image_features)(px, torch.tensor(grid))
    finally:
        h1.remove()
        h2.remove()
    x, n, heads = got["x"], got["x"].shape[0], attn.num_heads
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(n, 3, heads, -1).unbind(1)
        k_raw = k.clone()
        cos, sin = visual.rotary_pos_emb(x, _hw_positions(grid))
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (z.transpose(0, 1).double() for z in (q, k, v))
        recv, pooled, o, a = [], [], [], 0
        for t, h, w in grid:
            for _ in range(t):
                s = slice(a, a + h * w)
                p = torch.softmax(q[:, s] @ k[:, s].transpose(1, 2) * attn.scaling, -1)  # (H, S, S)
                o.append((p @ v[:, s]).transpose(0, 1).reshape(h * w, -1))
                recv.append(p.mean(1))
                qm = q[:, s].mean(1, keepdim=True)
                pooled.append(torch.softmax(qm @ k[:, s].transpose(1, 2) * attn.scaling, -1)[:, 0])
                a += h * w
        o = attn.proj(torch.cat(o).float())
    assert torch.allclose(o, got["o"], atol=1e-5), "reference q/k/v disagree with the tower's attention"
    pool4 = lambda y: y.reshape(heads, -1, 4).sum(-1).float()  # noqa: E731
    keys = k_raw.float().mean(1).reshape(-1, 4, k_raw.shape[-1]).mean(1)
    return pool4(torch.cat(recv, 1)), pool4(torch.cat(pooled, 1)), keys


@pytest.fixture(scope="module")
def peaked(q2):
    """The tiny model with its tower's q / k projections scaled up: random-init attention is near uniform (every
    token receives about 1 / n), which a wrong recomputation would match too; here the received attention of the
    tokens of an image differs by a factor of two or more."""
    model = copy.deepcopy(q2.model)
    with torch.no_grad():
        for blk in model.model.visual.blocks:
            c = blk.attn.qkv.weight.shape[0] // 3
            blk.attn.qkv.weight[:2 * c] *= 12
    return model


def test_features_vision_features_and_projection(q2):
    """``features`` == the stock ``get_image_features`` bit for bit; ``vision_features`` == ``merger.ln_q`` of the
    tower's last hidden states, 4 patches per merged token in the tower's own order (no window permutation); the
    merger's MLP maps them back onto ``features``."""
    model = q2.model
    px = _pixels(model, GRID, 1)
    vis = qwen_vision.encode(model, px, torch.tensor(GRID), want_attn=False)
    with torch.no_grad():
        stock = model.model.get_image_features(px, torch.tensor(GRID))
        ref_vf = model.model.visual.merger.ln_q(stock.last_hidden_state).reshape(30, 128)
    assert torch.equal(vis.features, torch.cat(stock.pooler_output)) and vis.features.shape == (30, 64)
    unit, patch, grids, sizes, _, _ = qwen_vision.token_layout(GRID, 2)  # the tokens' layout, in this order
    assert sizes == [24, 6] and grids == [(6, 4), (2, 3)]
    assert torch.equal(unit, torch.tensor([0] * 24 + [1] * 6))
    assert torch.equal(patch, torch.cat([torch.arange(24), torch.arange(6)]))
    assert torch.equal(vis.vision_features, ref_vf)
    with torch.no_grad():
        torch.testing.assert_close(qwen_vision.project(model, vis.vision_features), vis.features, atol=1e-6, rtol=0)
    assert vis.deepstack is None and vis.saliency is None


@pytest.mark.parametrize("layer", [None, 0, 2, -1])
def test_received_attention_and_keys_match_a_brute_force_recomputation(peaked, layer):
    """Every block attends fully (default: the last): the attention each merged token receives (its 4 patches'
    mean over the image's queries, per head) and that block's keys (before RoPE, mean over heads and the 4
    patches) == the float64 brute force; each image sums to 1 per head; the pooled-query proxy too."""
    model = peaked
    px = _pixels(model, GRID, 1)
    vis = qwen_vision.encode(model, px, torch.tensor(GRID), want_attn=True, layer=layer)
    recv, pooled, keys = _brute_force(model, px, GRID, 3 if layer in (None, -1) else layer)
    assert vis.saliency.shape == (2, 30) and vis.keys.shape == (30, 16)
    first = vis.saliency[:, :24]
    assert (first.max(1).values > 2 * first.min(1).values).all()  # far from uniform (1 / 24): rows told apart
    torch.testing.assert_close(vis.saliency, recv, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(vis.keys, keys, atol=1e-6, rtol=1e-5)
    sums = torch.zeros(2, 2).index_add_(1, qwen_vision.token_layout(GRID, 2)[0], vis.saliency)
    torch.testing.assert_close(sums, torch.ones(2, 2), atol=1e-6, rtol=0)
    pq = qwen_vision.encode(model, px, torch.tensor(GRID), want_attn=True, layer=layer, saliency="pooled_query")
    torch.testing.assert_close(pq.saliency, pooled, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(vis.saliency, pq.saliency, atol=1e-3)  # two different signals


def test_video_slices_are_units_and_segments(peaked):
    """Videos: each temporal slice is a unit and its own attention segment."""
    model = peaked
    grid = [[2, 4, 4], [2, 4, 6]]
    px = _pixels(model, grid, 2)
    vis = qwen_vision.encode(model, px, torch.tensor(grid), want_attn=True, video=True)
    recv, _, _ = _brute_force(model, px, grid, 3, video=True)
    unit, _, grids, sizes, _, _ = qwen_vision.token_layout(grid, 2)
    assert sizes == [8, 12] and grids == [(2, 2), (2, 2), (2, 3), (2, 3)]
    torch.testing.assert_close(vis.saliency, recv, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.zeros(2, 4).index_add_(1, unit, vis.saliency), torch.ones(2, 4))


def test_the_engine_hands_the_signals_to_a_method(rt):
    """The block the engine hands a vision-stage method (VisionSignals.cls_attn / keys) is the encoder's, per sample;
    ``qwen_saliency_layer`` picks any block (all attend fully)."""
    inputs = make_batch(rt)
    seen = []
    m = get_method("visionzip", 2)
    inner = m.select_vision
    m.select_vision = lambda sig: (seen.append((sig.cls_attn.clone(), sig.keys.clone())), inner(sig))[1]
    rt.prune(m, family_options={"qwen_saliency_layer": 1})
    with torch.no_grad():
        rt.model(**inputs)
    rows = inputs["image_grid_thw"].prod(-1).tolist()
    a = 0
    for i, (ca, ks) in enumerate(seen):
        px = inputs["pixel_values"][a:a + rows[i]]
        a += rows[i]
        ref = qwen_vision.encode(rt.model, px, inputs["image_grid_thw"][i:i + 1], want_attn=True, layer=1)
        assert torch.equal(ca, ref.saliency) and torch.equal(ks, ref.keys)  # (H, T) and (T, d)


# -------------------------------------------------------------------------------------------- fast path


@pytest.fixture(scope="module")
def fast_eager():
    return (load("tiny:qwen2-vl", seed=1, fast=True, fast_max_new_tokens=16, fast_backend="none"),
            load("tiny:qwen2-vl", seed=1))


def _batch(r, n):
    sizes = [(112, 168), (112, 112), (140, 84)]
    return r.processor([PROMPTS[j] for j in range(n)], [rand_image(j, *sizes[j]) for j in range(n)])


def test_the_static_tower_is_the_stock_tower_bit_for_bit(q2):
    """The fast path's tower plan (no windows: one full-attention segment per image, every block) run with static
    shapes == the eager encoder's outputs and signals, bit for bit, with no host read."""
    from llava.syncs import SyncCounter

    model = q2.model
    grid = [[1, 12, 8], [1, 4, 6], [1, 8, 16]]
    px = _pixels(model, grid, 0)
    ref = qwen_vision.encode(model, px, torch.tensor(grid), want_attn=True)
    plan, tensors = qwen_vision.tower_plan(model.model.visual, grid, None, "received")
    assert plan.window is None and plan.full_blocks == (0, 1, 2, 3) and plan.layer == 3 and not plan.pos_embed
    assert plan.full == ((0, 96, 1), (96, 24, 1), (120, 128, 1))
    with torch.no_grad(), SyncCounter() as c:
        out = qwen_vision.run_static(model, px, plan, tensors, True)
    assert c.total == 0 and "deepstack" not in out
    for name in ("features", "vision_features", "saliency", "keys"):
        assert torch.equal(out[name], getattr(ref, name)), name


@pytest.mark.parametrize("method,budget", [("none", None), ("fastervlm", 4), ("visionzip", 12), ("fastv", 8),
                                           ("pdrop", None), ("priortr", 8), ("random", 4)])
def test_fast_path_equals_the_eager_engine(fast_eager, method, budget):
    """Batch 1 and a left-padded batch of three grids: the fast path (captured function uncompiled, 0 host syncs
    inside it) == the eager engine: greedy tokens, first-step scores, visual tokens per layer."""
    fast, eager = fast_eager
    eng = fast.prune(method, budget)
    eager.prune(method, budget)
    assert eng.fast.refusal is None
    syncs = _uncompiled(eng)
    for batch in (_batch(fast, 1), _batch(fast, 3)):
        assert_same_as_eager(fast, eager, eng, batch, tokens=4)
        assert [s.visual_per_layer for s in eng.stats.samples] == [
            s.visual_per_layer for s in eager.engine.stats.samples]
    assert syncs == [0, 0]


@pytest.mark.parametrize("method,budget", [("visionzip", 12), ("fastv", 8)])
def test_fast_path_compiled_equals_the_eager_engine(method, budget):
    """Compiled (dynamo on a CPU, the suite's fast-path backend): a pre-LLM merge and an llm stage on the 3-D
    positions, a left-padded batch of three grids == the eager engine."""
    from fastpath_util import BACKEND

    fast = load("tiny:qwen2-vl", seed=1, fast=True, fast_max_new_tokens=16, fast_backend=BACKEND)
    eager = load("tiny:qwen2-vl", seed=1)
    eng = fast.prune(method, budget)
    eager.prune(method, budget)
    assert_same_as_eager(fast, eager, eng, _batch(fast, 3))
    assert [s.visual_per_layer for s in eng.stats.samples] == [
        s.visual_per_layer for s in eager.engine.stats.samples]


def _uncompiled(eng):
    fp, syncs = counting_fast_path(eng)
    eng.fast = fp
    return syncs


def test_fast_path_videos_and_refusals(fast_eager):
    """A video per prompt (units = temporal slices, no ``second_per_grid_ts``) is planned like an image; what the
    plan cannot do runs eagerly with one clear reason: CLSE's Qwen2-VL rule (its first stage reads the merged grid),
    two images in one prompt."""
    fast, eager = fast_eager
    vids = [[rand_image(10 * j + k, 56 + 28 * j, 84) for k in range(4)] for j in range(2)]
    batch = fast.processor(PROMPTS[:2], videos=vids)
    assert batch["video_grid_thw"].tolist() == [[2, 4, 6], [2, 6, 6]] and "second_per_grid_ts" not in batch
    eng = fast.prune("visionzip", 6)
    eager.prune("visionzip", 6)
    assert_same_as_eager(fast, eager, eng, batch, tokens=4)
    eng = fast.prune("clse", 192)
    assert eng.fast.refusal.startswith("clse:") and "merged grid" in eng.fast.refusal
    b1 = _batch(fast, 1)
    toks, _ = generate(fast, b1, tokens=3)
    assert eng.stats.path == "eager" and eng.stats.path_reason == eng.fast.refusal
    eager.prune("clse", 192)
    assert torch.equal(toks, generate(eager, b1, tokens=3)[0])
    eng = fast.prune("fastervlm", 4)
    generate(fast, fast.processor(["what differs?"], [[rand_image(0, 56, 56), rand_image(1, 56, 84)]]), tokens=2)
    assert eng.stats.path == "eager" and "one image" in eng.stats.path_reason


# --------------------------------------------------------------------------- which methods run, which rule


def test_methods_with_explicit_families_and_their_rules(rt):
    """Methods that name their families: those whose Qwen code or assumption is the LLM / prompt (V2Drop's and
    VLM-Pruner's official Qwen2-VL rules, CLSE's Qwen2-VL rule, PriorTR's Qwen rows, TransPrune, TRIO, ApET's
    projected space, Downsample's dynamic grids, IVC-Prune's own Qwen2-VL rule) run, with the Qwen rule resolved;
    those that read a CLIP tower's [CLS] layers and MMTok (its paper's families) are refused at attach naming
    themselves."""
    runs = ("v2drop", "vlmpruner", "clse", "priortr", "transprune", "trio", "apet", "downsample", "ivcprune")
    for name in runs:
        assert method_supports(name, FAM), name
    for name in ("flowcut", "hiprune", "prumerge", "visiontrim", "vscan", "mmtok"):
        assert not method_supports(name, FAM), name
        with pytest.raises(ValueError, match=name):
            rt.prune(name, 4)
        assert rt.engine is None
    assert rt.prune("v2drop", None).method.rule_name == "qwen2vl"
    assert rt.prune("vlmpruner", None, keep_tokens=6).method.rounding_rule == "floor"
    assert rt.prune("clse", 192).method.run_rule == "qwen2_vl"
    m = rt.prune("priortr", 4).method
    assert m.qwen_rule and m.query_rows == "question_excl_last"
    assert rt.prune("apet", 4).method._space == "projected"
    m = rt.prune("ivcprune", None).method  # 4 decoder layers: K = round(16 * 4 / 28) = 2
    assert (m.rule_run, m.k_layer, m.past_cache_from) == ("qwen2_vl", 2, 0)
    with pytest.raises(ValueError, match="sparsevlm"):  # v2's RoPE gravity is 1-D only
        rt.prune("sparsevlm", 192, version="v2")
        with torch.no_grad():
            rt.model(**make_batch(rt))


# ---------------------------------------------------------------------------------- engine invariants

#: the representative set: (method, budget, options); budgets that prune the tiny Qwen images (4-12 merged tokens)
INVARIANT = [
    ("random", 2, {"seed": 5}), ("visionzip", 2, {}), ("fastervlm", 2, {}), ("divprune", 2, {}),
    ("downsample", 2, {}), ("consensusdrop", 2, {}), ("fastv", 4, {}), ("pdrop", 192, {}), ("sparsevlm", 64, {}),
    ("dart", 4, {}), ("priortr", None, {"keep_tokens": 6}),
    ("priortr", None, {"keep_tokens": 6, "numerics": "official"}),
    ("v2drop", None, {}), ("v2drop", None, {"numerics": "official"}), ("vlmpruner", None, {"keep_tokens": 6}),
    ("vlmpruner", None, {"keep_tokens": 6, "numerics": "official"}), ("clse", 192, {}),
    ("clse", 192, {"numerics": "official"}), ("transprune", None, {}), ("apet", 6, {}),
    ("trio", None, {"image_token_list": (3, 2, 1), "counts": "absolute"}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in o.items()) for name, _, o in INVARIANT]


@pytest.mark.parametrize("name,b,opts", INVARIANT, ids=IDS)
def test_batch_of_three_equals_each_sample_alone(rt, name, b, opts):
    inputs = make_batch(rt)
    eng = rt.prune(name, b, **opts)
    with torch.no_grad():
        batch = rt.model.generate(**inputs, **GEN)
    assert any(min(s.visual_per_layer) < s.visual_candidates for s in eng.stats.samples)  # it prunes
    new = batch[:, inputs["input_ids"].shape[1]:]
    for i in range(3):
        one = slice_batch(inputs, i, rt)
        with torch.no_grad():
            toks = rt.model.generate(**one, **GEN)
        assert torch.equal(toks[0, one["input_ids"].shape[1]:], new[i])


@pytest.mark.parametrize("name,b,opts", INVARIANT, ids=IDS)
def test_cached_generation_equals_no_cache_recompute(rt, name, b, opts):
    inputs = make_batch(rt)
    eng = rt.prune(name, b, **opts)
    with torch.no_grad():
        cached = rt.model.generate(**inputs, **GEN)
    assert any(min(s.visual_per_layer) < s.visual_candidates for s in eng.stats.samples)  # it prunes
    eng.replay = bool(eng.method.query_aware or eng.method.llm_layers or name == "random")
    assert torch.equal(cached, greedy_no_cache(rt.model, inputs, GEN["max_new_tokens"]))


@pytest.mark.parametrize("name", sorted({n for n, _, _ in INVARIANT}))
def test_every_tensor_stays_on_the_device(rt, name):
    """The method's own calls (each selection's tensors) and the whole prefill around ``generate()`` (engine and
    method together, two decode steps) keep every tensor on the signals' device (tests/device_check.py)."""
    method = build(name, FAM, {})
    chk = check_method(method)
    inputs = make_batch(rt)
    rt.prune(method)
    with torch.no_grad():
        rt.model(**inputs)
    assert chk.calls["vision"] == (3 if method.vision_stage else 0)
    rt.prune(build(name, FAM, {}))
    chk = DevicePlacementCheck(collect=True)
    with torch.no_grad(), chk:
        rt.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert not chk.violations, "\n".join(chk.violations)


@pytest.mark.parametrize("name,b,opts", [("none", None, {}), ("fastv", None, {"ratio": 0.0}),
                                         ("visionzip", 576, {}), ("v2drop", None, {"keep_ratios": (1.0, 1.0, 1.0)}),
                                         ("priortr", None, {"keep_ratio": 1.0}), ("clse", 10**4, {})])
def test_keep_all_is_bit_identical_to_the_stock_model(rt, name, b, opts):
    inputs = make_batch(rt)
    rt.unprune()
    with torch.no_grad():
        ref_logits, ref_toks = rt.model(**inputs).logits, rt.model.generate(**inputs, **GEN)
    rt.prune(name, b, **opts)
    with torch.no_grad():
        logits, toks = rt.model(**inputs).logits, rt.model.generate(**inputs, **GEN)
    assert torch.equal(logits, ref_logits) and torch.equal(toks, ref_toks)


def test_video_keep_all_is_stock_and_a_pruned_video_decodes_consistently(rt):
    """A 4-frame video (2 temporal slices): the unpruned engine == the stock model (the M-RoPE time axis counting
    slices: no ``second_per_grid_ts``); VisionZip per slice: cached generation == the no-cache recompute."""
    frames = [rand_image(k, 56, 84) for k in range(4)]
    inputs = rt.processor(["what happens?"], videos=[frames])
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 6]] and "second_per_grid_ts" not in inputs
    with torch.no_grad():
        ref = rt.model.generate(**inputs, **GEN)
    rt.prune("none")
    with torch.no_grad():
        assert torch.equal(rt.model.generate(**inputs, **GEN), ref)
    eng = rt.prune("visionzip", 3)
    with torch.no_grad():
        cached = rt.model.generate(**inputs, **GEN)
    assert [s.visual_entering_llm for s in eng.stats.samples] == [6]  # 3 per temporal slice
    assert torch.equal(cached, greedy_no_cache(rt.model, inputs, GEN["max_new_tokens"]))


def test_gpu_ready_budgets_prune_here():
    """The shared budget tables (tests/test_gpu_ready.py, bench/gpu_check) give Qwen2-VL Qwen2.5-VL's values."""
    from bench.gpu_check.config import tiny_budget

    for name in ("fastv", "visionzip", "priortr", "trio"):
        assert gpu_ready_budget(name, FAM) == gpu_ready_budget(name, "qwen2_5_vl")
        assert tiny_budget(name, FAM) == tiny_budget(name, "qwen2_5_vl")
