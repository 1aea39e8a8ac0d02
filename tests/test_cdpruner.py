"""CDPruner: relevance and kernel against a direct transcription, the greedy DPP MAP against an exact
log-det greedy, the official ``encode_images`` selection transcribed (LLaVA-1.5 and NeXT shapes),
the question-aware relevance on the tiny families, and the CLIP route on a tiny random CLIP. Keep-all, tokens
per unit, cache, batching: tests/test_method_guarantees.py."""

import itertools

import pytest
import torch
from conftest import QUESTIONS, make_batch

import baselines.cdpruner  # noqa: F401  (registers "cdpruner")
from baselines.cdpruner import (CDPruner, _groups, _normalize, cdpruner, cdpruner_kernel, clip_image_embeds,
                                clip_text_embeds, dpp_greedy, kernel_of_normed, normalize_relevance, relevance_clip,
                                relevance_llm)


# ------------------------------------------------------------------ (a) relevance and kernel


def test_relevance_and_kernel_match_a_direct_transcription():
    g = torch.Generator().manual_seed(0)
    n, d = 7, 5
    c = torch.randn(n, generator=g)
    x = torch.randn(n, d, generator=g)
    r = normalize_relevance(c)  # official: r = -c, (r - min + 1e-6) / (max - min)
    neg = [-v for v in c.tolist()]
    lo, hi = min(neg), max(neg)
    exp = [(v - lo + 1e-6) / (hi - lo) for v in neg]
    assert torch.allclose(r, torch.tensor(exp), atol=1e-6, rtol=1e-6)
    assert int(r.argmin()) == int(c.argmax()) and float(r.min()) == pytest.approx(1e-6 / (hi - lo), rel=1e-3)
    pos = normalize_relevance(c, "pos")
    assert int(pos.argmax()) == int(c.argmax())
    th = normalize_relevance(c, theta=0.5)  # alpha = 0.5 / (2 * 0.5) = 0.5
    assert torch.allclose(th, torch.exp(0.5 * r))
    assert torch.equal(normalize_relevance(torch.ones(4)), torch.ones(4))  # guard: constant relevance
    L = cdpruner_kernel(x, r)
    for i, j in itertools.product(range(n), range(n)):
        xi, xj = x[i], x[j]
        s = float(xi @ xj) / (float(xi.norm()) * float(xj.norm()))
        assert float(L[i, j]) == pytest.approx(float(r[i]) * s * float(r[j]), rel=1e-5, abs=1e-7)
    assert torch.allclose(torch.diagonal(L), r * r, rtol=1e-5)
    # batched kernels = per-unit kernels
    xb, rb = torch.randn(3, n, d, generator=g), torch.rand(3, n, generator=g)
    assert torch.allclose(cdpruner_kernel(xb, rb), torch.stack([cdpruner_kernel(xb[b], rb[b]) for b in range(3)]))


def test_relevance_llm_and_clip():
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(6, 8, generator=g), torch.randn(5, 8, generator=g)
    mask = torch.tensor([False, True, True, False, True])
    cos = torch.nn.functional.cosine_similarity(x[:, None], t[None], dim=-1)
    assert torch.allclose(relevance_llm(x, t, mask), cos[:, mask].mean(1), atol=1e-6)
    assert torch.equal(relevance_llm(x, t, torch.zeros(5, dtype=torch.bool)), torch.zeros(6))
    assert torch.allclose(relevance_clip(x, t[:2]), cos[:, :2].mean(1), atol=1e-6)


# ------------------------------------------------------------------ (b) greedy DPP MAP


def slow_greedy(L, k):
    """Exact greedy MAP: S <- S + argmax_j det(L[S + j]) (first index on ties), float64."""
    L = L.double()
    picked = []
    for _ in range(k):
        best, best_j = None, None
        for j in range(L.shape[0]):
            if j in picked:
                continue
            s = picked + [j]
            sign, logdet = torch.linalg.slogdet(L[s][:, s])
            val = float(logdet) if sign > 0 else float("-inf")
            if best is None or val > best:
                best, best_j = val, j
        picked.append(best_j)
    return picked


@pytest.mark.parametrize("seed", range(6))
def test_greedy_equals_exact_logdet_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    n, d = 12, 9  # rank 9: k <= 9 stays non-degenerate
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    r = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    L = r[:, None] * (x @ x.T) * r[None]
    for k in (1, 4, 9):
        assert dpp_greedy(L, k).tolist() == slow_greedy(L, k)
    # batched = one by one
    Lb = torch.stack([L, L.flip(0).flip(1), L * 2])
    got = dpp_greedy(Lb, 5)
    assert got.shape == (3, 5)
    for b in range(3):
        assert got[b].tolist() == slow_greedy(Lb[b], 5)


def test_greedy_ties_go_to_the_first_index():
    assert dpp_greedy(torch.eye(5), 5).tolist() == [0, 1, 2, 3, 4]
    # items 1 and 3 are duplicates of 0 and 2; equal quality: 0 first, then 2 (1 now has zero gain), ...
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    L = x @ x.T
    assert slow_greedy(L, 2) == [0, 2]
    assert dpp_greedy(L, 2).tolist() == [0, 2]
    # past the rank: picks stay distinct (guard; the official loop would produce NaN gains)
    p = dpp_greedy(L, 4).tolist()
    assert p[:2] == [0, 2] and sorted(p) == [0, 1, 2, 3]


def _dpp_cases(n, seed):
    """Kernels L = r S r of every kind the loop meets, as one batch (36, n, n) fp32: full rank (d >= n) and
    rank-deficient (d = 3: the pivot clamp and the NaN / -inf guards engage once k passes the rank),
    duplicated tokens and features rounded to halves (exact ties in the gains), relevance random / with
    zeros (zero rows: gains 0) / constant (the min-max guard's r = 1); 3 kernels of each kind."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for d in (3, max(4, n + 2)):
        for ties in (False, True):
            x = torch.randn(3, n, d, generator=g)
            m = n // 4
            if m:
                x[:, n - m:] = x[:, :m]  # duplicates
            if ties:
                x = (x * 2).round() / 2
            rel = {
                "rand": normalize_relevance(torch.randn(3, n, generator=g).reshape(-1)).view(3, n),
                "zeros": torch.rand(3, n, generator=g).masked_fill(torch.rand(3, n, generator=g) < 0.3, 0.0),
                "const": torch.ones(3, n),
            }
            for r in rel.values():
                out.append(cdpruner_kernel(x, r))
    return torch.cat(out)


@pytest.mark.parametrize("n", [1, 2, 5, 16, 64, 200])
def test_device_dpp_picks_equal_the_host_loop(n):
    """dpp_greedy_device (the captured prefill's loop: unrolled, one-hot bookkeeping, no host read) picks
    exactly what the host loop (dpp_greedy on the host copy) picks, in order, ties to the first index:
    k in {0, 1, n/2, n + 3 (clipped to n)}, full-rank and rank-deficient kernels (past the rank the
    guards decide), duplicated / rounded tokens (exact ties), zero / constant relevance; one batch of 36
    kernels, and (small n) each kernel alone."""
    from baselines.cdpruner import dpp_greedy_device

    L = _dpp_cases(n, seed=n)
    B = L.shape[0]
    for k in sorted({0, 1, n // 2, n + 3}):
        host = dpp_greedy(L.clone(), k)
        dev = dpp_greedy_device(L, k)
        assert dev.dtype == torch.long and dev.shape == host.shape == (B, min(k, n))
        assert dev.tolist() == host.tolist(), (n, k)
        assert all(len(set(p)) == len(p) for p in dev.tolist())  # distinct picks (the guard)
        if n <= 16:  # a single kernel (N, N): the same loop on it alone
            for b in range(B):
                assert dpp_greedy_device(L[b], k).tolist() == dpp_greedy(L[b].clone(), k).tolist()


def test_device_dpp_reads_nothing_from_the_host_and_compiles_in_one_graph():
    """No host synchronisation (SyncCounter, inputs counted as device tensors), and the whole cdpruner()
    selection with a planned layout compiles in one graph (torch.compile(fullgraph=True)) with the host
    loop's picks."""
    from torch._dynamo.utils import counters

    from baselines.cdpruner import dpp_greedy_device
    from llava.ops import unit_layout
    from llava.syncs import SyncCounter

    g = torch.Generator().manual_seed(5)
    unit = torch.tensor([0] * 20 + [1] * 12 + [-1] * 2 + [2] * 12 + [-1])
    pos = torch.tensor([[-1, -1], [0, 0], [0, 1]])
    x = torch.randn(unit.numel(), 8, generator=g)
    t = torch.randn(6, 8, generator=g)
    qm = torch.tensor([True, True, False, True, False, False])
    lay = unit_layout(unit, None, unit_pos=pos)  # planned before: host ints + index tensors
    L = cdpruner_kernel(x[:20], normalize_relevance(relevance_llm(x[:20], t, qm)))
    with SyncCounter() as c:
        dpp_greedy_device(L, 12)
    assert c.total == 0, c.counts

    def select(x, t, qm, unit, pos):
        return cdpruner(x, lambda: relevance_llm(x, t, qm), unit, 5, unit_pos=pos, layout=lay, device_loop=True)

    want = cdpruner(x, lambda: relevance_llm(x, t, qm), unit, 5, unit_pos=pos)  # the host loop
    with SyncCounter() as c:
        got = select(x, t, qm, unit, pos)
    assert c.total == 0, c.counts
    assert torch.equal(got, want)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(select, fullgraph=True, dynamic=False, backend="eager")
    assert torch.equal(compiled(x, t, qm, unit, pos), want)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_capture_refusal_by_option():
    """relevance='llm' (default) is captured; the CLIP route (host text work) and the reference mode are not."""
    assert CDPruner(4).capturable == "full" and CDPruner(4).capture_refusal() is None
    assert "clip" in CDPruner(4, relevance="clip", clip_model="x", llm_tokenizer="y").capture_refusal()
    assert "official" in CDPruner(4, numerics="official").capture_refusal()


# ------------------------------------------------------------------ (c) count and order


def test_count_per_unit_ascending_and_small_units_whole():
    g = torch.Generator().manual_seed(3)
    unit = torch.tensor([0] * 10 + [-1] + [1] * 3 + [2] * 10 + [-1])
    x = torch.randn(unit.numel(), 6, generator=g)
    c = torch.randn(unit.numel(), generator=g)
    keep = cdpruner(x, c, unit, 4)
    assert torch.equal(keep, keep.sort().values) and keep.unique().numel() == keep.numel()
    ku = unit[keep]
    assert [(ku == u).sum().item() for u in (-1, 0, 1, 2)] == [2, 4, 3, 4]
    assert cdpruner(x, c, unit, 4, keep_newlines=False).numel() == 11
    assert torch.equal(cdpruner(x, c, unit, 10), torch.arange(unit.numel()))  # budget >= every unit: all
    # the relevance callable is not called when nothing is pruned
    assert torch.equal(cdpruner(x, lambda: 1 / 0, unit, 10), torch.arange(unit.numel()))
    # [CLS] handling (Video-LLaVA frames: patch -1 = [CLS])
    u2 = torch.tensor([0] * 5)
    patch = torch.tensor([-1, 0, 1, 2, 3])
    assert 0 in cdpruner(x[:5], c[:5], u2, 2, patch=patch, cls_token="keep").tolist()
    assert 0 not in cdpruner(x[:5], c[:5], u2, 2, patch=patch, cls_token="drop").tolist()
    assert cdpruner(x[:5], c[:5], u2, 2, patch=patch).numel() == 2


# ------------------------------------------------------------------ (d, e) the official code transcribed


def official_encode_images(image_features, image_embeds, text_embeds, visual_token_num):
    """Theia-4869/CDPruner ``encode_images`` after the projector, transcribed (B crops at once)."""
    B, N, _ = image_features.shape
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    image_normalized = image_normalized.float()
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = torch.matmul(image_embeds, text_embeds.t())
    relevance = (-relevance).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    cis = torch.zeros((visual_token_num, B, N))
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum('tb,tbn->bn', cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float('inf')
    select_idx = torch.sort(select_idx.t()).values
    index_masks = torch.zeros(B, N, dtype=torch.bool)
    index_masks.scatter_(1, select_idx, True)
    return index_masks


def official_inputs(seed, crops, segments):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(crops, 576, 4096, generator=g)
    # low-rank structure + noise, as real tokens: a few shared directions
    feats = feats * 0.5 + torch.randn(crops, 576, 16, generator=g) @ torch.randn(16, 4096, generator=g)
    emb = torch.randn(crops, 576, 768, generator=g)
    text = torch.randn(segments, 768, generator=g)
    return feats, emb, text


@pytest.mark.parametrize("segments,budget", [(1, 64), (2, 128)])
def test_llava15_selection_equals_official_encode_images(segments, budget):
    feats, emb, text = official_inputs(segments, 1, segments)
    mask = official_encode_images(feats, emb, text, budget)[0]
    c = relevance_clip(emb[0], text)
    keep = cdpruner(feats[0], c, torch.zeros(576, dtype=torch.long), budget)
    assert keep.numel() == budget and torch.equal(keep, torch.nonzero(mask).flatten())


def next_signals(crops=5):
    unit = torch.arange(crops).repeat_interleave(576)
    pos = torch.tensor([[-1, -1]] + [[i // 2, i % 2] for i in range(crops - 1)])
    return unit, pos


def test_next_global_minmax_over_the_image_crops():
    """NeXT: 5 crops batched in one encode_images call, min-max over all of them (official), T per crop."""
    feats, emb, text = official_inputs(7, 5, 1)
    budget = 32
    mask = official_encode_images(feats, emb, text, budget)
    c = relevance_clip(emb.reshape(-1, 768), text)
    unit, pos = next_signals()
    keep = cdpruner(feats.reshape(-1, 4096), c, unit, budget, unit_pos=pos)
    assert keep.numel() == 5 * budget
    assert torch.equal(keep, torch.nonzero(mask.reshape(-1)).flatten())
    # scope "unit" = the official code run on each crop alone (its own min-max); differs from "image"
    per = torch.cat([torch.nonzero(official_encode_images(feats[i:i + 1], emb[i:i + 1], text, budget)[0]).flatten()
                     + 576 * i for i in range(5)])
    unit_keep = cdpruner(feats.reshape(-1, 4096), c, unit, budget, unit_pos=pos, minmax_scope="unit")
    assert torch.equal(unit_keep, per) and not torch.equal(unit_keep, keep)


def test_minmax_groups():
    pos = [(-1, -1), (0, 0), (0, 1), (-1, -1), (0, 0)]  # two NeXT / OneVision images in one sample
    assert _groups(5, pos, "image") == [[0, 1, 2], [3, 4]]
    assert _groups(5, pos, "unit") == [[0], [1], [2], [3], [4]]
    assert _groups(5, pos, "sample") == [[0, 1, 2, 3, 4]]
    assert _groups(3, [(-1, -1)] * 3, "image") == [[0], [1], [2]]  # images / frames: one each


def test_options_are_validated():
    with pytest.raises(ValueError):
        CDPruner()
    for bad in ({"relevance": "x"}, {"relevance_sign": "x"}, {"theta": 1.0}, {"minmax_scope": "x"},
                {"cls_token": "x"}, {"relevance": "clip"}, {"reference_dtype": "float32"}):
        with pytest.raises(ValueError):
            CDPruner(4, **bad)
    m = CDPruner(64)
    assert m.query_aware and m.relevance == "llm" and m.relevance_sign == "neg" and m.theta is None
    assert m.reference_dtype == "model"  # as DART: the run's own dtype (fp16 in the official fp16 load)


def test_reference_dtype_model_casts_to_the_features_own_dtype():
    """Reference mode: ``official_dtype=None`` (``reference_dtype="model"``) normalises fp32 features in fp32, the
    default in fp16; on fp16 features both are the same."""
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 8, generator=gen)
    rel = torch.rand(40, generator=gen)
    unit = torch.zeros(40, dtype=torch.long)
    fp32 = cdpruner(feats, rel, unit, 12, numerics="official", official_dtype=None)
    assert torch.equal(fp32, cdpruner(feats, rel, unit, 12, numerics="official", official_dtype=torch.float32))
    half = feats.half()
    assert torch.equal(cdpruner(half, rel, unit, 12, numerics="official", official_dtype=None),
                       cdpruner(half, rel, unit, 12, numerics="official"))
    assert torch.equal(cdpruner(feats, rel, unit, 12, numerics="official"),
                       cdpruner(half, rel, unit, 12, numerics="official"))


# ------------------------------------------------------------------ (f) tiny models


class _Spy(CDPruner):
    """CDPruner that records its signals and selections."""

    name = "cdpruner_spy_test"

    def select_vision(self, sig):
        sel = super().select_vision(sig)
        self.seen.append((sig, sel.keep))
        return sel


@pytest.mark.parametrize("rt", ["llava", "llava-next"], indirect=True)
def test_llm_relevance_is_question_aware_and_matches_the_signals(rt):
    inputs = make_batch(rt)
    spy = _Spy(4)
    spy.seen = []
    rt.prune(spy)
    with torch.no_grad():
        rt.model(**inputs)
    for sig, keep in spy.seen:
        c = relevance_llm(sig.features, sig.text_embeds, sig.question_mask)
        assert torch.equal(keep, cdpruner(sig.features, c, sig.unit, 4, patch=sig.patch, unit_pos=sig.unit_pos))
    # the same image with another question can change the selection; the relevance itself must change
    sig = spy.seen[0][0]
    flipped = relevance_llm(sig.features, sig.text_embeds, ~sig.question_mask)
    assert not torch.allclose(flipped, relevance_llm(sig.features, sig.text_embeds, sig.question_mask))


# ------------------------------------------------------------------ (g) the CLIP route


def _byte_chars():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIPModel (vision width 32 = the tiny LLaVA tower's) + a byte-level CLIP tokenizer
    without merges, saved to a local folder."""
    import transformers as tf

    path = tmp_path_factory.mktemp("tiny_clip")
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 512, 513
    tok = tf.CLIPTokenizer(vocab=vocab, merges=[])
    tok.save_pretrained(path)
    torch.manual_seed(5)
    cfg = tf.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=514, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513, projection_dim=24),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=56, patch_size=14, projection_dim=24),
        projection_dim=24)
    tf.CLIPModel(cfg).save_pretrained(path)
    return path


def official_text_embeds(path, text):
    """clip_encoder.forward's text side transcribed, with the official classes."""
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(path)
    tower = tf.CLIPTextModelWithProjection.from_pretrained(path)
    mpe = tower.config.max_position_embeddings
    text_inputs = tok(text=[text], return_tensors="pt")
    text_segment = (text_inputs.input_ids.shape[1] - 1) // mpe + 1
    text_padding = mpe * text_segment - text_inputs.input_ids.shape[1]
    text_inputs = {k: torch.cat([v, v.new_zeros((v.shape[0], text_padding))], dim=1).reshape(-1, mpe)
                   for k, v in text_inputs.items()}
    with torch.no_grad():
        return tower(**text_inputs).text_embeds


def test_clip_text_segments_equal_the_official_text_side(tiny_clip):
    import transformers as tf

    clip = tf.CLIPModel.from_pretrained(tiny_clip)
    tok = tf.AutoTokenizer.from_pretrained(tiny_clip)
    for text, m in (("what color is the circle?", 1), ("a long question " * 8, 2)):  # > 77 byte tokens: 2
        with torch.no_grad():
            ours = clip_text_embeds(clip, tok, text, torch.device("cpu"))
        ref = official_text_embeds(tiny_clip, text)
        assert ours.shape == (m, 24) and torch.allclose(ours, ref, atol=1e-6)


def test_clip_route_on_tiny_llava_equals_the_official_pipeline(runtimes, tiny_clip):
    import transformers as tf

    rt = runtimes["llava"]
    inputs = make_batch(rt)
    spy = _Spy(4, relevance="clip", clip_model=str(tiny_clip), llm_tokenizer=rt.tokenizer)
    spy.seen = []
    rt.prune(spy)
    try:
        with torch.no_grad():
            out = rt.model(**inputs)
    finally:
        rt.unprune()
    assert torch.isfinite(out.logits).all()
    vis = tf.CLIPVisionModelWithProjection.from_pretrained(tiny_clip)
    for (sig, keep), q in zip(spy.seen, QUESTIONS):
        assert spy.question_text(sig.question_ids) == q
        with torch.no_grad():
            emb = vis.visual_projection(vis.vision_model.post_layernorm(sig.vision_features).float())
        mask = official_encode_images(sig.features[None], emb[None], official_text_embeds(tiny_clip, q), 4)[0]
        assert torch.equal(keep, torch.nonzero(mask).flatten())
        assert torch.allclose(clip_image_embeds(spy._clip_route.clip, sig.vision_features), emb, atol=1e-6)


def test_clip_route_with_a_decode_callable_on_next(runtimes, tiny_clip):
    rt = runtimes["llava-next"]
    inputs = make_batch(rt)
    m = CDPruner(4, relevance="clip", clip_model=str(tiny_clip), llm_tokenizer=lambda ids: rt.tokenizer.decode(ids))
    eng = rt.prune(m)
    try:
        with torch.no_grad():
            rt.model(**inputs)
    finally:
        rt.unprune()
    assert all(not s.vision_noop for s in eng.stats.samples)


@pytest.mark.parametrize("fam", ["qwen2.5-vl", "llava-onevision"])
def test_clip_route_is_refused_without_a_clip_tower(runtimes, tiny_clip, fam):
    rt = runtimes[fam]
    with pytest.raises(ValueError, match="clip"):
        rt.prune("cdpruner", 3, relevance="clip", clip_model=str(tiny_clip), llm_tokenizer=rt.tokenizer)
    rt.unprune()


def test_one_host_sync_per_sample_none_per_greedy_step():
    from llava.syncs import SyncCounter

    dev = torch.device("cpu")  # explicit device: counted as device tensors
    g = torch.Generator().manual_seed(4)
    unit = torch.tensor([0] * 20 + [1] * 12 + [-1] * 2 + [2] * 12, device=dev)
    pos = torch.tensor([[-1, -1], [0, 0], [0, 1]], device=dev)
    x = torch.randn(unit.numel(), 8, generator=g).to(dev)
    t = torch.randn(5, 8, generator=g).to(dev)
    qm = torch.tensor([True, True, False, True, False], device=dev)
    with SyncCounter() as c:
        L = cdpruner_kernel(x[:20], normalize_relevance(relevance_llm(x[:20], t, qm)))
        dpp_greedy(L, 10)
    assert c.total == 0, c.counts
    for budget in (3, 8):
        with SyncCounter() as c:
            cdpruner(x, lambda: relevance_llm(x, t, qm), unit, budget, unit_pos=pos)
        # unit_layout's read (with unit_pos) and one copy of all the sample's kernels to the host, where the
        # greedy steps run; nothing per step or per unit
        assert c.total == 2 and c.counts["to_host"] == 1, c.counts


@pytest.mark.parametrize("seed", range(3))
def test_shared_normalised_features_give_the_same_kernels_and_picks(seed):
    """The method normalises the features once for the relevance and the kernels (``normed``): the kernels of
    the candidates' rows of it equal the kernels that normalise the candidates again, bit for bit (bf16
    features at LLaVA's width, a NeXT-like sample of five units with newlines, candidates in another order),
    and so do the kept tokens."""
    g = torch.Generator().manual_seed(seed)
    unit = torch.tensor([0] * 40 + [1] * 37 + [-1] * 3 + [2] * 40 + [3] * 37 + [4] * 37)
    pos = torch.tensor([[-1, -1], [0, 0], [0, 1], [1, 0], [1, 1]])
    x = torch.randn(unit.numel(), 1024, generator=g).bfloat16()
    t = torch.randn(7, 1024, generator=g).bfloat16()
    qm = torch.tensor([True, True, False, True, True, False, True])
    xn = _normalize(x.float())
    cand = torch.randperm(unit.numel(), generator=g)[:150].view(3, 50)
    r = torch.rand(unit.numel(), generator=g)
    assert torch.equal(kernel_of_normed(xn[cand], r[cand]), cdpruner_kernel(x[cand], r[cand]))
    assert torch.equal(relevance_llm(x, t, qm, normed=xn), relevance_llm(x, t, qm))
    for budget in (8, 30):
        want = cdpruner(x, lambda: relevance_llm(x, t, qm), unit, budget, unit_pos=pos)
        got = cdpruner(x, lambda: relevance_llm(x, t, qm, normed=xn), unit, budget, unit_pos=pos, normed=lambda: xn)
        assert torch.equal(got, want) and got.numel() == 3 + 5 * budget
