"""Qwen3-VL through its adapter (llava/families/qwen3_vl.py), on the tiny model (DeepStack after LLM layers 0, 1,
2 of 4): the unpruned engine is the stock model; a pruned prefill equals the stock text model run by hand on
the kept tokens with their DeepStack rows (an independent reference built from the stock modules); the rows
follow merges by the selection's rule and llm stages before the last DeepStack layer; every method runs
(cached == no-cache recompute); the probe adds DeepStack; videos (a timestamp before each temporal slice)."""

import pytest
import torch
from conftest import QUESTIONS, greedy_no_cache, rand_image
from test_gpu_ready import METHODS, budget

from llava import load
from llava.check.budgets import PRUNES_RANDOM_IMAGES
from llava.selection_rows import carry_rows
from llava.method import method_supports
from llava.selection import Selection

GEN = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def rt():
    return load("tiny:qwen3-vl", seed=1)


def batch(rt, n=3):
    sizes = [(60, 90), (100, 70), (90, 150)]
    return rt.processor(QUESTIONS[:n], [rand_image(i, *sizes[i]) for i in range(n)])


def run(rt, inputs):
    with torch.no_grad():
        out = rt.model.generate(**inputs, **GEN)
    return out.sequences[:, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)  # raw logits per step


def stock_vision(rt, inputs):
    """The stock tower's features and DeepStack rows (levels stacked: (T, L, D)), all images in order."""
    with torch.no_grad():
        out = rt.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    return torch.cat(out.pooler_output), torch.stack([torch.cat(lv) for lv in out.deepstack_features], 1)


def test_unpruned_engine_is_the_stock_model(rt):
    inputs = batch(rt)
    rt.unprune()
    ref = run(rt, inputs)
    rt.prune("none")
    got = run(rt, inputs)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    assert rt.engine.adapter.deepstack_levels == 3


def test_pruned_prefill_equals_the_stock_text_model_on_the_kept_tokens(rt):
    """Reference by hand from stock modules: kept image features spliced between the text embeddings, the full
    prompt's M-RoPE positions gathered, the kept tokens' DeepStack rows at their new positions."""
    inputs = batch(rt, 1)
    feats, deep = stock_vision(rt, inputs)
    eng = rt.prune("random", 4, seed=3)
    _, scores = run(rt, inputs)
    keep = eng.selections[("vision", 0)].keep.sort().values
    assert keep.numel() == 4 < feats.shape[0]
    model = rt.model
    ids = inputs["input_ids"][0]
    vis = (ids == model.config.image_token_id).nonzero().flatten()
    pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                        image_grid_thw=inputs["image_grid_thw"])
    first, last = int(vis[0]), int(vis[-1])
    with torch.no_grad():
        emb = model.model.language_model.embed_tokens(ids)
        x = torch.cat([emb[:first], feats[keep], emb[last + 1:]])[None]
        p = torch.cat([pos[:, 0, :first], pos[:, 0, vis[keep]], pos[:, 0, last + 1:]], 1)[:, None]
        at = torch.zeros(1, x.shape[1], dtype=torch.bool)
        at[0, first:first + keep.numel()] = True
        h = model.model.language_model(inputs_embeds=x, attention_mask=torch.ones(1, x.shape[1], dtype=torch.long),
                                       position_ids=p, visual_pos_masks=at,
                                       deepstack_visual_embeds=list(deep[keep].unbind(1))).last_hidden_state
        ref = model.lm_head(h[:, -1])
    torch.testing.assert_close(scores[0, 0], ref[0], rtol=1e-5, atol=1e-5)
    # without the DeepStack rows the reference is another model: the check above can tell them apart
    with torch.no_grad():
        h0 = model.model.language_model(inputs_embeds=x, attention_mask=torch.ones(1, x.shape[1], dtype=torch.long),
                                        position_ids=p).last_hidden_state
    assert (model.lm_head(h0[:, -1]) - ref).abs().max() > 1e-3


def test_carry_rows_follows_keeps_merges_and_order():
    rows = torch.arange(12, dtype=torch.float32).view(4, 3, 1)  # token t, level l: 3t + l
    sel = Selection(keep=torch.tensor([2]), targets=torch.tensor([0]), assign=torch.tensor([-1, 0, -1, 0]),
                    rule="target_plus_mean", order=torch.tensor([1, 0]))
    out = carry_rows(rows, sel)
    # output 0 (order): the merged token: rows of 0 + mean(rows of 1 and 3); output 1: token 2 kept
    expect = torch.stack([rows[0] + (rows[1] + rows[3]) / 2, rows[2]])
    assert torch.equal(out, expect)
    sel = Selection(keep=torch.tensor([3]), targets=torch.tensor([1]), assign=torch.tensor([0, -1, 0, -1]),
                    rule="mean")
    assert torch.equal(carry_rows(rows, sel), torch.stack([rows[3], (rows[1] + rows[0] + rows[2]) / 3]))
    with pytest.raises(ValueError, match="values"):
        carry_rows(rows, Selection(keep=torch.tensor([0]), values=torch.zeros(1, 2)))


def _captured_deepstack(rt, inputs, monkeypatch):
    """Every DeepStack addition by the engine (the staged decoder's and the probe's): (level, positions, rows)."""
    import llava.layers as layers

    seen, inner = [], layers.add_deepstack

    def spy(h, ds, level):
        seen.append((level, ds.at.clone(), ds.rows[:, level].clone()))
        return inner(h, ds, level)

    monkeypatch.setattr(layers, "add_deepstack", spy)
    out = run(rt, inputs)
    return seen, out


def test_llm_stage_before_the_last_deepstack_layer_carries_the_rows(rt, monkeypatch):
    """FastV on the tiny model prunes before layer 1: levels 1 and 2 are added after the stage at the kept
    tokens' new positions; a stage that keeps everything gives the stock model bit for bit."""
    inputs = batch(rt)
    _, deep = stock_vision(rt, inputs)
    n_vis = [int((ids == rt.model.config.image_token_id).sum()) for ids in inputs["input_ids"]]
    eng = rt.prune("fastv", 4)
    assert eng.llm_layers == (1,)
    seen, _ = _captured_deepstack(rt, inputs, monkeypatch)
    assert [lv for lv, _, _ in seen] == [0, 1, 2]
    per_sample = deep.split(n_vis)
    kept = [per_sample[b][eng.selections[(0, b)].keep.sort().values] for b in range(3)]
    for level in (1, 2):
        _, at, rows = seen[level]
        assert torch.equal(rows, torch.cat([k[:, level] for k in kept]))
        assert at.numel() == sum(k.shape[0] for k in kept) < sum(n_vis)
    rt.unprune()
    ref = run(rt, inputs)
    rt.prune("fastv", 10_000)  # keeps every token: the staged decoder adds the rows exactly as the stock model
    seen, got = _captured_deepstack(rt, inputs, monkeypatch)
    assert len(seen) == 3 and torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


@pytest.mark.parametrize("method", [m for m in METHODS if method_supports(m, "qwen3_vl")])
def test_every_method_cached_generation_equals_no_cache_recompute(rt, method):
    inputs = batch(rt)
    eng = rt.prune(method, budget(method, "qwen2_5_vl"), **({"seed": 5} if method == "random" else {}),
                   **PRUNES_RANDOM_IMAGES.get(method, {}))
    with torch.no_grad():
        cached = rt.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    if method != "none":
        assert any(min(s.visual_per_layer) < s.visual_candidates for s in eng.stats.samples), "nothing pruned"
    eng.replay = True
    assert torch.equal(cached, greedy_no_cache(rt.model, inputs, 3))


def test_the_probe_adds_deepstack(rt, monkeypatch):
    """ConsensusDrop's LLM probe runs layers on the unpruned prompt: with DeepStack, as the stock model."""
    inputs = batch(rt, 1)
    rt.prune("consensusdrop", 4, probe_layer=2, probe_mode="attn")
    seen, _ = _captured_deepstack(rt, inputs, monkeypatch)
    assert [lv for lv, _, _ in seen][:2] == [0, 1]  # the probe's layers 0 and 1


def _video(rt, t=2, h=8, w=8, seed=0):
    """One video as Qwen3-VL prompts it: per temporal slice a timestamp, then its own vision_start ... end run."""
    cfg, tok = rt.model.config, rt.tokenizer
    ids = []
    for f in range(t):
        ids += tok(f"<{0.5 + f:.1f} seconds>", add_special_tokens=False)["input_ids"]
        ids += [cfg.vision_start_token_id] + [cfg.video_token_id] * (h * w // 4) + [cfg.vision_end_token_id]
    ids = torch.tensor([ids + tok("what happens in the video?", add_special_tokens=False)["input_ids"]])
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == cfg.video_token_id).int() * 2,
            "pixel_values_videos": torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=g),
            "video_grid_thw": torch.tensor([[t, h, w]])}


@pytest.mark.parametrize("method", ["none", "visionzip", "fastv", "divprune"])
def test_video_keep_all_is_stock_and_pruned_video_decodes_consistently(rt, method):
    """A video of 2 temporal slices (16 merged tokens each, a timestamp before each): the unpruned engine is
    the stock model; pruned per slice (vision stage) or inside the LLM, cached == no-cache recompute."""
    inputs = _video(rt)
    rt.unprune()
    ref = run(rt, inputs)
    eng = rt.prune(method, {"none": None, "visionzip": 4, "fastv": 8, "divprune": 4}[method])
    got = run(rt, inputs)
    s = eng.stats.samples[0]
    assert s.visual_candidates == 32
    if method == "none":
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
        return
    assert min(s.visual_per_layer) < 32
    if method != "fastv":
        assert s.visual_entering_llm == 8  # 4 per slice: each slice's run keeps its own outputs
    eng.replay = True
    L = inputs["input_ids"].shape[1]
    assert torch.equal(got[0], greedy_no_cache(rt.model, inputs, GEN["max_new_tokens"])[:, L:])
