"""The fast path (llava.fast.path) on Qwen2.5-VL and Qwen3-VL: the prompt planned on the host (the placeholder run,
the merged tokens per image, the bucket, the splice, the 3-D M-RoPE positions of every row from the model's own
``get_rope_index`` on the host ids), the Qwen tower inside the captured prefill with static shapes (its window /
full-attention segments, window permutation, rotary tables and, for Qwen3-VL, the position-table resampling
planned from the grids: ``qwen_vision.tower_plan`` / ``run_static``), kept visual tokens keeping their (t, h, w)
positions (gathered by each output's source candidate inside the graph), Qwen3-VL's DeepStack rows carried with
the kept tokens, and a one-graph decode at the last prompt position + 1 + step on all three axes. Checked against
the eager engine's ``generate()`` (dynamo without code generation on a CPU, as tests/test_fastpath.py; the
methods whose captured code is already compiled on the LLaVA families run uncompiled here: the same code)."""

import pytest
import torch
from conftest import rand_image
from fastpath_util import BACKEND, PROMPTS, assert_same_as_eager, counting_fast_path, generate

from llava.families import qwen_vision
from llava.fast.path import FastPath
from llava.models import load

#: three image sizes -> three grids (merged 6 x 4 = 24, 4 x 4 = 16, 5 x 3 = 15 tokens; windows of 2 x 2 merged
#: tokens, the last two with cut windows)
SIZES = [(112, 168), (112, 112), (140, 84)]
#: the pre-LLM methods compiled on LLaVA-1.5 in tests/test_fastpath.py, at budgets that prune every image
#: (VisionZip 12 = 10 dominant + 2 contextual: one contextual token hits torch 2.13's CPU Inductor codegen bug in
#: merge_tokens' index_add_ into a one-row buffer under FAST_BACKEND=inductor)
CAPTURED = [("none", None), ("fastervlm", 4), ("random", 4), ("divprune", 4), ("otprune", 4),
            ("visionzip", 12)]
#: the other captured methods (pre-LLM, then with llm stages at the tiny 4-layer LLM's scaled layers)
OTHERS = [("novisual", None), ("downsample", 4), ("vispruner", 4), ("cdpruner", 4), ("attnmix", 12),
          ("consensusdrop", 4), ("fastv", 8), ("pdrop", None), ("visiondrop", 8), ("dart", 12), ("duet", 6),
          ("apet", 8), ("ivcprune", 4)]
FAMILIES = ("qwen2.5-vl", "qwen3-vl")


@pytest.fixture(scope="module")
def rts():
    return {fam: (load(f"tiny:{fam}", seed=1, fast=True, fast_max_new_tokens=16, fast_backend=BACKEND),
                  load(f"tiny:{fam}", seed=1)) for fam in FAMILIES}


def batch_of(rt, n, first=0):
    """n prompts from PROMPTS[first] on, each with its own image size (grid), left-padded."""
    return rt.processor([PROMPTS[(first + j) % len(PROMPTS)] for j in range(n)],
                        [rand_image(first + j, *SIZES[(first + j) % len(SIZES)]) for j in range(n)])


def _visual(batch):
    return {k: batch[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                                  "second_per_grid_ts") if k in batch}


def _uncompiled(eng):
    """The engine's fast path replaced by one running the captured function uncompiled (the same code), its
    prefills' host syncs counted."""
    fp, syncs = counting_fast_path(eng)
    eng.fast = fp
    return syncs


# ------------------------------------------------------------------ the host plan


def test_tower_plan_runs_the_stock_tower_bit_for_bit(rts):
    """The static tower (every segment planned from the grids; equal windows batched into one attention call)
    == the stock tower through ``get_image_features`` with the eager engine's signals, bit for bit, and reads
    nothing from the device; Qwen3-VL's DeepStack rows too."""
    from llava.syncs import SyncCounter

    grid = [[1, 12, 8], [1, 4, 6], [1, 8, 16]]
    for fam in FAMILIES:
        model = rts[fam][1].model
        width = model.model.visual.patch_embed.proj.weight[0].numel()
        px = torch.randn(sum(t * h * w for t, h, w in grid), width, generator=torch.Generator().manual_seed(0))
        ref = qwen_vision.encode(model, px, torch.tensor(grid), want_attn=True)
        plan, tensors = qwen_vision.tower_plan(model.model.visual, grid, None, "received")
        with torch.no_grad(), SyncCounter() as c:
            out = qwen_vision.run_static(model, px, plan, tensors, True)
        assert c.total == 0
        for name in ("features", "vision_features", "saliency", "keys", "deepstack"):
            want = getattr(ref, name)
            assert (name in out) == (want is not None), (fam, name)
            if want is not None:
                assert torch.equal(out[name], want), (fam, name)
        if fam == "qwen2.5-vl":  # 6 x 4, 2 x 3 and 4 x 8 merged tokens in windows of 2 x 2: 7 + 1 + 8 equal runs
            assert plan.window == ((0, 16, 7), (112, 8, 1), (120, 16, 8)) and plan.full_blocks == (1, 3)
            assert plan.full == ((0, 96, 1), (96, 24, 1), (120, 128, 1))


def test_host_positions_worked_example(rts):
    """A 56 x 84 image (grid 1 x 4 x 6: 2 x 3 merged tokens) after p0 text tokens (15 with the tiny ChatML prompt),
    n more after it (10): the image takes t = p0, h = p0 + row, w = p0 + column; the text after continues at
    p0 + max(2, 3) = p0 + 3 (not p0 + 6); pruned to 3 tokens, the text rows keep those positions in their bucket
    (pads: position 0), the visual rows are gathered inside the graph from ``vpos`` by each output's source;
    decoding starts at p0 + 3 + n (28) on all three axes."""
    fast, _ = rts["qwen2.5-vl"]
    eng = fast.prune("random", 3)
    batch = fast.processor(["what is this?"], [rand_image(0, 56, 84)])
    assert batch["image_grid_thw"].tolist() == [[1, 4, 6]]
    ids = batch["input_ids"][0]
    vis = (ids == fast.model.config.image_token_id).nonzero().flatten()
    p0, L = int(vis[0]), ids.numel()
    n = L - p0 - 6
    assert vis.tolist() == list(range(p0, p0 + 6)) and (p0, n) == (15, 10)
    vp = eng.fast.planner.plan_visual(batch["input_ids"], batch["attention_mask"], _visual(batch))
    text = torch.arange(p0)
    after = p0 + 3 + torch.arange(n)
    want = torch.stack([torch.cat([text, p0 + torch.tensor([0, 0, 0, 0, 0, 0]), after]),
                        torch.cat([text, p0 + torch.tensor([0, 0, 0, 1, 1, 1]), after]),
                        torch.cat([text, p0 + torch.tensor([0, 1, 2, 0, 1, 2]), after])])
    assert torch.equal(vp.positions[0], want)
    spec, host, _, nxt = eng.fast.planner.plan_rows(vp)
    pad = spec.bucket - (L - 6 + 3)
    assert spec.mrope == 3 and spec.samples[0].outputs == 3 and pad >= 0
    pos = host.pos[:, 0]
    assert torch.equal(pos[:, :pad], torch.zeros(3, pad, dtype=torch.long))  # pads
    assert torch.equal(pos[:, pad:pad + p0], want[:, :p0])  # the text before the image
    assert torch.equal(pos[:, pad + p0 + 3:], want[:, p0 + 6:])  # and after it
    assert torch.equal(host.vpos, want[:, p0:p0 + 6])  # the candidates' positions, gathered in the graph
    assert nxt[:, 0].tolist() == [p0 + 3 + n] * 3 == [28] * 3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,budget", [("fastervlm", 4), ("visionzip", 12)])
def test_positions_equal_the_eager_engines(rts, family, method, budget):
    """The positions the captured prefill hands the decoder (its first rotary call) == the eager engine's after
    the same selection (``vision_inputs``), row for row over the real rows of a left-padded batch of three grids:
    kept tokens keep their (t, h, w), VisionZip's merged tokens take their targets', the text keeps its own."""
    fast, eager = rts[family]
    eng = fast.prune(method, budget)
    eager.prune(method, budget)
    batch = batch_of(fast, 3)
    emb, mask, want, _ = eager.engine.vision_inputs(batch["input_ids"], _visual(batch), batch["attention_mask"])
    seen = []
    rotary = eng.lm.rotary_emb
    orig = rotary.forward
    rotary.forward = lambda x, position_ids: (seen.append(position_ids), orig(x, position_ids))[1]
    try:
        fp = FastPath(eng.env, backend="none", max_new_tokens=16)
        with torch.no_grad():
            fp.prefill(batch["input_ids"], batch["attention_mask"], _visual(batch))
    finally:
        del rotary.forward
    got = seen[0]
    assert got.shape[0] == 3 and want.shape[0] == 3
    for b in range(3):
        real = want[:, b, mask[b].bool()]
        assert torch.equal(got[:, b, got.shape[-1] - real.shape[1]:], real)
        assert not torch.equal(real[0], real[1])  # the image's rows differ: really 3-D


# ------------------------------------------------------------------ tokens == the eager engine (compiled)


@pytest.mark.parametrize("method,budget", CAPTURED)
def test_fast_tokens_equal_the_eager_engine(rts, method, budget):
    """Qwen2.5-VL: greedy tokens, first-step scores and visual tokens of the compiled fast path == the eager
    engine, one prompt alone and a left-padded batch of three grids."""
    fast, eager = rts["qwen2.5-vl"]
    eng = fast.prune(method, budget)
    eager.prune(method, budget)
    assert eng.fast.refusal is None
    assert_same_as_eager(fast, eager, eng, batch_of(fast, 1, first=1))
    assert_same_as_eager(fast, eager, eng, batch_of(fast, 3))
    if budget is not None:
        assert not any(s.vision_noop for s in eager.engine.stats.samples)  # the budget prunes


@pytest.mark.parametrize("family,method,budget", [("qwen2.5-vl", "fastv", 8), ("qwen3-vl", "visionzip", 12),
                                                  ("qwen3-vl", "fastv", 8)])
def test_fast_tokens_equal_the_eager_engine_compiled_stages_and_deepstack(rts, family, method, budget):
    """Compiled: an llm stage on 3-D positions (kept positions gathered with the kept rows), Qwen3-VL's DeepStack
    rows at the kept tokens (merged by VisionZip's rule; all of them carried through FastV's stage before the last
    level). A batch of three grids == the eager engine, visual tokens per layer included. (PyramidDrop, VisionDrop,
    DART, DUET-VLM, ApET below, uncompiled.)"""
    fast, eager = rts[family]
    eng = fast.prune(method, budget)
    eager.prune(method, budget)
    assert_same_as_eager(fast, eager, eng, batch_of(fast, 3))
    assert [s.visual_per_layer for s in eng.stats.samples] == [
        s.visual_per_layer for s in eager.engine.stats.samples]


# ------------------------------------------------------------------ every other method, uncompiled (same code)


#: Qwen3-VL differs from Qwen2.5-VL after the tower only in its DeepStack rows: the llm stages that carry them
#: (PyramidDrop: through stages at layers 1 and 2, dropped after the last level; VisionDrop: merged by its stages'
#: rule; DART), besides none / VisionZip / FastV compiled above
OTHER_CASES = ([("qwen2.5-vl", m, b) for m, b in OTHERS]
               + [("qwen3-vl", m, b) for m, b in OTHERS if m in ("pdrop", "visiondrop", "dart")])


@pytest.mark.parametrize("family,method,budget", OTHER_CASES)
def test_other_methods_equal_the_eager_engine_without_a_host_sync(rts, family, method, budget):
    """Every other captured method (the captured function run uncompiled: the code the compiled tests prove
    capturable, on the LLaVA families for the same selections): tokens, first-step scores and visual tokens per
    layer == the eager engine on a batch of three grids, and 0 host syncs inside the captured prefill."""
    fast, eager = rts[family]
    eng = fast.prune(method, budget)
    eager.prune(method, budget)
    syncs = _uncompiled(eng)
    assert_same_as_eager(fast, eager, eng, batch_of(fast, 3), tokens=4)
    assert [s.visual_per_layer for s in eng.stats.samples] == [
        s.visual_per_layer for s in eager.engine.stats.samples]
    assert syncs == [0]


@pytest.mark.parametrize("method,budget", CAPTURED)
def test_no_host_sync_inside_the_captured_prefill(rts, method, budget):
    fast, _ = rts["qwen2.5-vl"]
    eng = fast.prune(method, budget)
    fp, calls = counting_fast_path(eng)
    batch = batch_of(fast, 2)
    with torch.no_grad():
        fp.prefill(batch["input_ids"], batch["attention_mask"], _visual(batch))
    assert calls == [0]


def test_videos_and_the_pooled_query_saliency(rts):
    """Qwen2.5-VL videos (units = temporal slices; the M-RoPE time axis from ``second_per_grid_ts``, the text after
    the video at the stock model's position) and the ``qwen_saliency="pooled_query"`` option: == the eager engine
    (uncompiled: the same tower code as images)."""
    fast, eager = rts["qwen2.5-vl"]
    vids = [[rand_image(10 * j + k, 56 + 28 * j, 84) for k in range(4 + 2 * j)] for j in range(2)]
    batch = fast.processor(PROMPTS[:2], videos=vids)
    assert batch["video_grid_thw"].tolist() == [[2, 4, 6], [3, 6, 6]]
    for method, budget, opts in (("visionzip", 6, {}),
                                 ("fastervlm", 4, {"family_options": {"qwen_saliency": "pooled_query"}})):
        eng = fast.prune(method, budget, **opts)
        eager.prune(method, budget, **opts)
        syncs = _uncompiled(eng)
        assert_same_as_eager(fast, eager, eng, batch if method != "fastervlm" else batch_of(fast, 3), tokens=4)
        assert syncs == [0]


# ------------------------------------------------------------------ graphs


@pytest.mark.parametrize("family,method,budget", [("qwen2.5-vl", "fastervlm", 4), ("qwen3-vl", "fastv", 8)])
def test_one_prefill_graph_per_bucket_and_one_decode_graph(rts, family, method, budget):
    """After the first prompt, prompts of other lengths with an image of the same size (the same tower plan) in
    the same bucket and 16 decode steps compile nothing (recompilation raises); batch 1: tokens == eager."""
    fast, eager = rts[family]
    torch._dynamo.reset()
    eng = fast.prune(method, budget)
    eager.prune(method, budget)
    # 54, 56 and 55 tokens (30 to 32 of text): in the bucket of 64 before and after pruning to 4
    questions = [PROMPTS[1], PROMPTS[3], "is there a red square on the right side?"]
    first = fast.processor(questions[:1], [rand_image(0, *SIZES[0])])
    assert torch.equal(generate(fast, first, tokens=16)[0], generate(eager, first, tokens=16)[0])
    assert eng.stats.path == "fast" and eng.stats.new_graph
    lens = eng.stats.seq_len_per_layer
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, q in enumerate(questions[1:]):
            batch = fast.processor([q], [rand_image(i + 1, *SIZES[0])])
            assert batch["input_ids"].shape[1] != first["input_ids"].shape[1]
            toks = generate(fast, batch, tokens=16)[0]
            assert eng.stats.path == "fast" and eng.stats.seq_len_per_layer == lens and not eng.stats.new_graph
            assert torch.equal(toks, generate(eager, batch, tokens=16)[0])


# ------------------------------------------------------------------ refusals


def test_what_the_plan_cannot_do_runs_eagerly_and_says_why(rts):
    """Refused with the reason, answered by the eager engine: a method that is not captured (TRIO: a backward pass
    in its llm stages), two images in one prompt, Qwen3-VL videos (a vision run per temporal slice), and an llm stage
    on the hybrid Qwen3.5."""
    fast, eager = rts["qwen2.5-vl"]
    eng = fast.prune("trio", None)
    assert eng.fast.refusal.startswith("trio:") and "gradient" in eng.fast.refusal
    batch = batch_of(fast, 1)
    toks, _ = generate(fast, batch, tokens=4)
    assert eng.stats.path == "eager" and eng.stats.path_reason == eng.fast.refusal
    eager.prune("trio", None)
    assert torch.equal(toks, generate(eager, batch, tokens=4)[0])
    eng = fast.prune("fastervlm", 4)
    two = fast.processor(["what differs?"], [[rand_image(0, 56, 56), rand_image(1, 56, 84)]])
    generate(fast, two, tokens=2)
    assert eng.stats.path == "eager" and "one image" in eng.stats.path_reason
    q3 = rts["qwen3-vl"][0]
    eng = q3.prune("fastervlm", 4)
    generate(q3, q3.processor(["what happens?"], videos=[[rand_image(k, 56, 56) for k in range(4)]]), tokens=2)
    assert eng.stats.path == "eager" and "videos" in eng.stats.path_reason
    q35 = load("tiny:qwen3.5", seed=1, fast=True, fast_max_new_tokens=16, fast_backend="none")
    eng = q35.prune("fastv", 8, layer=2, scale_layers=False)  # reads layer 1 (full attention); pre-LLM methods only
    assert "hybrid" in eng.fast.refusal
    generate(q35, batch_of(q35, 1), tokens=2)
    assert eng.stats.path == "eager" and eng.stats.path_reason == eng.fast.refusal


def test_ivcprune_qwen_rule_with_seeds_over_padded_rows_equals_the_eager_engine(rts):
    """IVC-Prune's Qwen rule puts the query rows before the seeds among its anchors; the captured prefill's padded rows
    are masked in that order. On llava.check's batch its stage scores one sample (6 visual tokens to 2), whose kept
    tokens (and so tokens and first-step scores) equal the eager engine's."""
    from llava.check.inputs import make_batch

    fast, eager = rts["qwen2.5-vl"]
    eng = fast.prune("ivcprune", 4)
    eager.prune("ivcprune", 4)
    _uncompiled(eng)
    assert_same_as_eager(fast, eager, eng, make_batch(fast), tokens=3)
