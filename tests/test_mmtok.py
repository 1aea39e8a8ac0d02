"""MMTok: the coverage matrix and the greedy against a transcription of the official ``mm_coverage_selection`` /
``greedy_merged_jit_kernel`` (plain Python over worked inputs), a hand-worked greedy, ties, batching, the reference
mode, the keyword filter, and the method on the tiny models (question-aware, keyword rows, retain_ratio, refusals).
Keep-all, tokens per unit, cached == recompute, batch == alone, device placement, host syncs: the shared suites
(tests/test_method_guarantees.py, test_gpu_ready.py, test_device_placement.py)."""

import math

import pytest
import torch
from conftest import check_generate_batch_equals_alone, make_batch, slice_batch

import baselines.mmtok  # noqa: F401  (registers "mmtok")
from baselines.mmtok import (MMTok, coverage_greedy, coverage_greedy_official, coverage_matrix, keyword_token_mask,
                             mmtok)
from llava.ops import unit_layout

# ------------------------------------------------------------------ (a) transcription of the official code


def _rows_normalised(x):
    return [[v / max(math.sqrt(sum(u * u for u in r)), 1e-8) for v in r] for r in x]


def _softmax(row):
    mx = max(row)
    e = [math.exp(v - mx) for v in row]
    s = sum(e)
    return [v / s for v in e]


def official_transcription(Z, X, V, T, tv=0.02, vv=0.2, alpha=0.5):
    """``mm_coverage_selection`` (semantic_selector.py 103-148) in plain Python (float64): normalised rows,
    P = softmax(Z X^T / tv) / m, Q = softmax(V V^T / vv) / n, C = [P; alpha Q], the greedy of k = min(T, n) steps
    (gain = column sum of max(C - best, 0), the picked columns at -inf, the first maximum), the picks sorted."""
    z, x, v = _rows_normalised(Z), _rows_normalised(X), _rows_normalised(V)
    m, n = len(z), len(x)
    P = [[p / m for p in _softmax([sum(a * b for a, b in zip(zi, xj)) / tv for xj in x])] for zi in z]
    Q = [[q / n for q in _softmax([sum(a * b for a, b in zip(vi, vj)) / vv for vj in v])] for vi in v]
    C = P + [[alpha * q for q in row] for row in Q]
    best = [0.0] * (m + n)
    mask = [0.0] * n
    picks = []
    for _ in range(min(T, n)):
        gain = [sum(max(C[r][j] - best[r], 0.0) for r in range(m + n)) + mask[j] for j in range(n)]
        j = max(range(n), key=lambda i: (gain[i], -i))  # the first maximum (torch.argmax)
        picks.append(j)
        best = [max(best[r], C[r][j]) for r in range(m + n)]
        mask[j] = float("-inf")
    return C, sorted(picks)


@pytest.mark.parametrize("seed", range(5))
def test_coverage_and_greedy_match_the_official_transcription(seed):
    g = torch.Generator().manual_seed(seed)
    m, n, d, dv, T = 4, 9, 6, 5, 4
    Z, X, V = torch.randn(m, d, generator=g), torch.randn(n, d, generator=g), torch.randn(n, dv, generator=g)
    C_ref, picks_ref = official_transcription(Z.double().tolist(), X.double().tolist(), V.double().tolist(), T)
    C = coverage_matrix(Z, X, V, tv_temperature=0.02)
    assert C.shape == (m + n, n) and C.dtype == torch.float32
    torch.testing.assert_close(C.double(), torch.tensor(C_ref, dtype=torch.float64), atol=1e-6, rtol=1e-5)
    # every P row sums to 1 / m, every Q row to alpha / n
    torch.testing.assert_close(C[:m].sum(1), torch.full((m,), 1 / m))
    torch.testing.assert_close(C[m:].sum(1), torch.full((n,), 0.5 / n))
    assert sorted(coverage_greedy(C, T).tolist()) == picks_ref
    assert sorted(coverage_greedy_official(C, T).tolist()) == picks_ref
    # the whole sample: one unit of n tokens
    lay = unit_layout(torch.zeros(n, dtype=torch.long))
    for numerics in ("ours", "official"):
        keep = mmtok(X, V, Z, lay, T, tv_temperature=0.02, numerics=numerics)
        assert keep.tolist() == picks_ref


def test_greedy_by_hand_and_first_index_ties():
    C = torch.tensor([[0.5, 0.4, 0.1],
                      [0.1, 0.2, 0.7],
                      [0.3, 0.3, 0.3]])
    # step 1: column sums 0.9 / 0.9 / 1.1 -> 2; best = (0.1, 0.7, 0.3)
    # step 2: gains 0.4 + 0 + 0 = 0.4 / 0.3 + 0 + 0 = 0.3 / -inf -> 0; best = (0.5, 0.7, 0.3)
    # step 3: column 1 adds nothing but is the only one left
    assert coverage_greedy(C, 3).tolist() == [2, 0, 1]
    assert coverage_greedy_official(C, 3).tolist() == [2, 0, 1]
    assert coverage_greedy(C, 5).tolist() == [2, 0, 1]  # k clipped to n
    ties = torch.tensor([[0.2, 0.4, 0.4], [0.3, 0.1, 0.1]])
    # column sums 0.5 / 0.5 / 0.5: the first; then gains 0 + 0 / 0.2 + 0 / 0.2 + 0: the first of 1 and 2
    assert coverage_greedy(ties, 2).tolist() == [0, 1]
    assert coverage_greedy_official(ties, 2).tolist() == [0, 1]


def test_greedy_steps_are_the_formula_bit_for_bit():
    # coverage_greedy writes each step's difference into one scratch buffer, clamps it there and marks a pick with
    # scatter_: the same reductions as the formula written with fresh tensors, so the same picks on realistic
    # matrices (596 x 576, the official temperatures), on coarse values full of exact ties, and past saturation
    # (every gain 0: the first column not picked yet), batched and alone
    def formula(C3, k):
        B, R, n = C3.shape
        best, mask, out = C3.new_zeros((B, R)), C3.new_zeros((B, n)), []
        items = torch.arange(n)
        for _ in range(k):
            j = ((C3 - best[..., None]).clamp_min(0).sum(dim=-2) + mask).argmax(dim=-1)
            out.append(j)
            best = torch.maximum(best, C3.gather(2, j[:, None, None].expand(B, R, 1))[..., 0])
            mask = mask.masked_fill(items[None] == j[:, None], float("-inf"))
        return torch.stack(out, 1)

    g = torch.Generator().manual_seed(0)
    Z, X, V = torch.randn(20, 64, generator=g), torch.randn(2, 576, 64, generator=g), torch.randn(2, 576, 32, generator=g)
    C = coverage_matrix(Z, X, V, tv_temperature=0.02)
    picks = coverage_greedy(C, 64)
    assert torch.equal(picks, formula(C, 64))
    assert torch.equal(picks[1], coverage_greedy(C[1], 64))
    coarse = torch.randint(0, 4, (3, 30, 25), generator=g).float() / 4  # saturates after a few picks
    assert torch.equal(coverage_greedy(coarse, 25), formula(coarse, 25))
    assert sorted(coverage_greedy(coarse, 25)[0].tolist()) == list(range(25))


def test_batched_units_equal_each_unit_alone():
    g = torch.Generator().manual_seed(7)
    Z, X, V = torch.randn(5, 8, generator=g), torch.randn(3, 12, 8, generator=g), torch.randn(3, 12, 4, generator=g)
    C = coverage_matrix(Z, X, V, tv_temperature=0.02)
    assert C.shape == (3, 17, 12)
    picks = coverage_greedy(C, 5)
    for b in range(3):
        Cb = coverage_matrix(Z, X[b], V[b], tv_temperature=0.02)
        assert torch.equal(C[b], Cb)
        assert torch.equal(picks[b], coverage_greedy(Cb, 5))
        assert torch.equal(picks[b], coverage_greedy_official(Cb, 5))


def test_masked_text_rows_equal_the_gathered_rows():
    """The fast path's padded text block: rows outside the mask give P rows of 0 and do not count in m."""
    g = torch.Generator().manual_seed(3)
    Z, X, V = torch.randn(7, 8, generator=g), torch.randn(10, 8, generator=g), torch.randn(10, 4, generator=g)
    mask = torch.tensor([False, True, True, False, True, True, False])
    C_m = coverage_matrix(Z, X, V, tv_temperature=0.02, text_mask=mask)
    C_g = coverage_matrix(Z[mask], X, V, tv_temperature=0.02)
    assert torch.equal(C_m[:7][~mask], torch.zeros(3, 10))
    torch.testing.assert_close(C_m[:7][mask], C_g[:4], atol=0, rtol=0)
    assert torch.equal(C_m[7:], C_g[4:])
    assert torch.equal(coverage_greedy(C_m, 6), coverage_greedy(C_g, 6))


def test_reference_mode_normalises_in_the_features_dtype():
    """fp16 inputs: the official order (normalise in fp16, then fp32) differs from ours (fp32 first) and equals the
    transcription of ``_l2_normalize(x).float()``."""
    g = torch.Generator().manual_seed(11)
    Z, X, V = (torch.randn(3, 16, generator=g) * 7).half(), (torch.randn(20, 16, generator=g) * 7).half(), \
        (torch.randn(20, 8, generator=g) * 7).half()
    C_off = coverage_matrix(Z, X, V, tv_temperature=0.02, numerics="official")

    def off(x):
        return (x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)).float()

    zn, xn, vn = off(Z), off(X), off(V)
    P = torch.nn.functional.softmax((zn @ xn.T) * (1.0 / 0.02), dim=1) / 3
    Q = torch.nn.functional.softmax((vn @ vn.T) * (1.0 / 0.2), dim=1) / 20
    assert torch.equal(C_off, torch.cat([P, Q * 0.5]))
    C_ours = coverage_matrix(Z, X, V, tv_temperature=0.02)
    assert not torch.equal(C_ours, C_off)
    torch.testing.assert_close(C_ours, C_off, atol=5e-3, rtol=5e-2)


def test_units_budget_and_retain_ratio():
    """Per unit: a unit with n <= T is kept whole, the others keep T; retain_ratio: T = int(r n) per unit;
    newline tokens (unit -1) are kept as layout."""
    g = torch.Generator().manual_seed(2)
    unit = torch.tensor([0] * 6 + [-1] + [1] * 3 + [-1] + [2] * 10)
    X, V, Z = torch.randn(21, 8, generator=g), torch.randn(21, 4, generator=g), torch.randn(3, 8, generator=g)
    lay = unit_layout(unit)
    keep = mmtok(X, V, Z, lay, 4, tv_temperature=0.02)
    per = [int((unit[keep] == u).sum()) for u in (-1, 0, 1, 2)]
    assert per == [2, 4, 3, 4]
    assert keep.tolist() == sorted(keep.tolist())
    keep_r = mmtok(X, V, Z, lay, None, tv_temperature=0.02, retain_ratio=0.35)  # int(2.1) / int(1.05) / int(3.5)
    assert [int((unit[keep_r] == u).sum()) for u in (-1, 0, 1, 2)] == [2, 2, 1, 3]
    keep_n = mmtok(X, V, Z, lay, 4, tv_temperature=0.02, keep_newlines=False)
    assert int((unit[keep_n] == -1).sum()) == 0 and keep_n.numel() == 11
    # unit 2 alone gives the same picks as inside the sample
    idx2 = torch.nonzero(unit == 2).flatten()
    alone = mmtok(X[idx2], V[idx2], Z, unit_layout(torch.zeros(10, dtype=torch.long)), 4, tv_temperature=0.02)
    assert torch.equal(idx2[alone], keep[unit[keep] == 2])


# ------------------------------------------------------------------ (b) the keyword filter


def test_keyword_filter_on_worked_questions():
    # "What color is the car?" -> keywords "color car" (what / is / the are stop words; "?" is no word)
    pieces = ["What", " color", " is", " the", " car", "?"]
    assert keyword_token_mask(pieces) == [False, True, False, False, True, False]
    # the lmms-eval answer-format sentence is removed; a word split over two tokens keeps both
    pieces = ["Is", " there", " a", " zeb", "ra", "?", "\n", "Answer", " the", " question", " using", " a", " single",
              " word", " or", " phrase", "."]
    assert keyword_token_mask(pieces) == [False, True, False, True, True] + [False] * 12
    # only stop words: the official fallback keeps the whole text (blank tokens aside)
    assert keyword_token_mask(["What", " is", " it", "?"]) == [True, True, True, True]
    assert keyword_token_mask(["What", " ", "is"]) == [True, False, True]
    # case-insensitive stop words, the option sentence removed
    pieces = ["WHICH", " Dog", "?", " Answer with the option's letter from the given choices directly."]
    assert keyword_token_mask(pieces) == [False, True, False, False]


class _Tok:
    """A word-per-token tokenizer stand-in: ids index ``words``; decode joins them."""

    def __init__(self, words):
        self.words = words

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.words[i] for i in ids)


def test_keyword_rows_of_the_question_ids():
    words = ["What", " color", " is", " the", " car", "?"]
    m = MMTok(4, text="keywords", llm_tokenizer=_Tok(words))
    assert m.keyword_rows(torch.arange(6)).tolist() == [1, 4]
    with pytest.raises(ValueError, match="llm_tokenizer"):
        MMTok(4, text="keywords")
    assert "keywords" in m.capture_refusal() and MMTok(4).capture_refusal() is None
    assert "official" in MMTok(4, numerics="official").capture_refusal()
    with pytest.raises(ValueError, match="budget"):
        MMTok()
    with pytest.raises(ValueError, match="retain_ratio"):
        MMTok(None, retain_ratio=1.5)
    with pytest.raises(ValueError, match="text"):
        MMTok(4, text="caption")
    assert MMTok(None, retain_ratio=0.2).retain_ratio == 0.2


# ------------------------------------------------------------------ (c) on the tiny models


class _Spy(MMTok):
    """MMTok that records its signals, text rows and selections."""

    name = "mmtok_spy_test"

    def select_vision(self, sig):
        sel = super().select_vision(sig)
        self.seen.append((sig, self.text_of(sig), sel.keep))
        return sel


def _spy(rt, inputs, budget, **opts):
    spy = _Spy(budget, **opts)
    spy.seen = []
    rt.prune(spy)
    with torch.no_grad():
        rt.model(**inputs)
    rt.unprune()
    return spy.seen


@pytest.mark.parametrize("rt", ["llava", "llava-next", "qwen2.5-vl"], indirect=True)
def test_selection_follows_the_question_rows(rt):
    """The text rows are the prompt's question rows in order; the selection equals :func:`mmtok` on the signals
    with the family's tau_t; the question matters (another set of rows gives other picks on some sample)."""
    inputs = make_batch(rt)
    b = 2 if rt.family == "qwen2_5_vl" else 4
    seen = _spy(rt, inputs, b)
    tau = 0.01 if rt.family == "qwen2_5_vl" else 0.02
    differs = False
    for sig, (text, mask), keep in seen:
        assert mask is None
        q = torch.nonzero(sig.question_mask).flatten()
        assert torch.equal(text, sig.text_embeds[q]) and q.numel() == sig.question_ids.numel() > 0
        lay = sig.unit_layout()
        assert torch.equal(keep, mmtok(sig.features, sig.vision_features, text, lay, b, tv_temperature=tau))
        other = mmtok(sig.features, sig.vision_features, sig.text_embeds[~sig.question_mask], lay, b,
                      tv_temperature=tau)
        differs |= not torch.equal(keep, other)
        # a large tau_t flattens P: the selection then follows Q alone more closely, also a change somewhere
    assert differs


@pytest.mark.parametrize("rt", ["llava"], indirect=True)
def test_keywords_take_the_question_tokens_of_the_kept_words(rt):
    inputs = make_batch(rt)
    tok = rt.tokenizer
    seen = _spy(rt, inputs, 4, text="keywords", llm_tokenizer=tok)
    q_all = _spy(rt, inputs, 4)
    for (sig, (text, _), keep), (_, (text_q, _), _) in zip(seen, q_all):
        ids = sig.question_ids.tolist()
        words = tok.decode(ids, skip_special_tokens=True)
        kw = [i for i, k in enumerate(keyword_token_mask([tok.decode(ids[:i + 1])[len(tok.decode(ids[:i])):]
                                                          for i in range(len(ids))])) if k]
        assert torch.equal(text, text_q[kw]) and 0 < len(kw) < len(ids), words
    # "what color is the circle on the left?" -> color / circle / on / left
    sig, (text, _), _ = seen[1]
    kept = [tok.decode([i]).strip() for i in sig.question_ids[[i for i in range(sig.question_ids.numel())
                                                                if any(torch.equal(text[r], seen[1][0].text_embeds[
                                                                    torch.nonzero(sig.question_mask).flatten()[i]])
                                                                    for r in range(text.shape[0]))]].tolist()]
    assert "color" in "".join(kept) and "what" not in [k.lower() for k in kept]


class _SplitTok:
    """A tokenizer stand-in for ``is_split_into_words``: a BOS, then one id per word (its length), as a dict."""

    bos_token_id = 1

    def __call__(self, words, is_split_into_words=False, truncation=False):
        assert is_split_into_words and truncation
        return {"input_ids": [1] + [100 + len(w) for w in words]}


def test_keyword_string_and_its_retokenised_ids():
    from baselines.mmtok import keyword_string, retokenized_ids

    q = "What color is the car?\nAnswer the question using a single word or phrase."
    assert keyword_string(q) == "color car"
    assert keyword_string("What is it?") == "What is it?"  # no keyword: the text itself (official fallback)
    assert keyword_string("Which dog? Answer with the option's letter from the given choices directly.") == "dog"
    assert keyword_string("") == ""
    assert retokenized_ids(_SplitTok(), "color car") == [105, 103]  # BOS dropped
    assert retokenized_ids(_SplitTok(), "") == [1]  # a lone BOS is kept (official: only when more than one id)


_SAVED = {}


def _saved(rt):
    """The tiny model saved once per family (safetensors), for options given by checkpoint name."""
    import tempfile

    if rt.family not in _SAVED:
        d = tempfile.mkdtemp(prefix=f"mmtok_{rt.family}_")
        rt.model.save_pretrained(d)
        rt.tokenizer.save_pretrained(d)
        _SAVED[rt.family] = d
    return _SAVED[rt.family]


def test_load_input_embedding_reads_the_one_table(tmp_path):
    """A checkpoint's ``*embed_tokens.weight`` read alone (single file and sharded index); none or two: refused."""
    from safetensors.torch import save_file

    from baselines.mmtok import load_input_embedding

    w = torch.randn(7, 3)
    save_file({"language_model.model.embed_tokens.weight": w, "x.weight": torch.zeros(2)},
              tmp_path / "model.safetensors")
    assert torch.equal(load_input_embedding(str(tmp_path)).weight, w)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"model.language_model.embed_tokens.weight": w}, sharded / "b.safetensors")
    (sharded / "model.safetensors.index.json").write_text(
        '{"weight_map": {"model.language_model.embed_tokens.weight": "b.safetensors", "x.weight": "a.safetensors"}}')
    emb = load_input_embedding(str(sharded))
    assert torch.equal(emb(torch.tensor([3, 0])), w[[3, 0]]) and not emb.weight.requires_grad
    (tmp_path / "two").mkdir()
    save_file({"a.embed_tokens.weight": w, "b.embed_tokens.weight": w.clone()}, tmp_path / "two" / "model.safetensors")
    with pytest.raises(ValueError, match="expected one"):
        load_input_embedding(str(tmp_path / "two"))


@pytest.mark.parametrize("rt", ["llava", "llava-next"], indirect=True)
def test_retokenised_keywords_are_embedded_by_the_models_table(rt):
    """text='keywords_retokenized': Z = embed_tokens(the keyword string re-tokenised word by word, BOS dropped), the
    official _encode_text_with_token_pooling; the selection == mmtok() on those rows."""
    from baselines.mmtok import keyword_string, retokenized_ids

    tok, emb = rt.tokenizer, rt.model.get_input_embeddings()
    seen = _spy(rt, make_batch(rt), 4, text="keywords_retokenized", llm_tokenizer=tok, embed_tokens=emb)
    for sig, (text, mask), keep in seen:
        ids = retokenized_ids(tok, keyword_string(tok.decode(sig.question_ids.tolist(), skip_special_tokens=True)))
        assert mask is None and len(ids) > 0 and ids[0] != tok.bos_token_id
        assert torch.equal(text, emb(torch.tensor(ids)))
        assert torch.equal(keep, mmtok(sig.features, sig.vision_features, text, sig.unit_layout(), 4,
                                       tv_temperature=0.02))
    # embed_tokens by name (the harness's --opt): the table read alone from the checkpoint's safetensors
    ckpt = _saved(rt)
    named = _spy(rt, make_batch(rt), 4, text="keywords_retokenized", llm_tokenizer=tok, embed_tokens=str(ckpt))
    for (_, (t_mod, _), k_mod), (_, (t_named, _), k_named) in zip(seen, named):
        assert torch.equal(t_mod, t_named) and torch.equal(k_mod, k_named)
    with pytest.raises(ValueError, match="embed_tokens"):
        MMTok(4, text="keywords_retokenized", llm_tokenizer=tok)
    assert "keywords_retokenized" in MMTok(4, text="keywords_retokenized", llm_tokenizer=tok,
                                           embed_tokens=emb).capture_refusal()


@pytest.mark.parametrize("rt", ["llava"], indirect=True)
def test_reference_mode_in_the_engine(rt):
    """numerics='official' on the tiny LLaVA (fp32): cached generation == recompute, batch == alone, and (fp32: the
    two normalisation orders agree) the same selections as ours."""
    from conftest import check_reference_mode_in_engine

    check_reference_mode_in_engine(rt, "mmtok", 4, "vision")
    inputs = make_batch(rt)
    ours = {k: v.keep.clone() for k, v in _engine_selections(rt, inputs, 4).items()}
    off = {k: v.keep.clone() for k, v in _engine_selections(rt, inputs, 4, numerics="official").items()}
    assert ours.keys() == off.keys() and all(torch.equal(ours[k], off[k]) for k in ours)


def _engine_selections(rt, inputs, b, **opts):
    eng = rt.prune("mmtok", b, **opts)
    with torch.no_grad():
        rt.model(**inputs)
    sel = dict(eng.selections)
    rt.unprune()
    return sel


@pytest.mark.parametrize("rt", ["qwen2.5-vl"], indirect=True)
def test_retain_ratio_on_qwen(rt):
    """retain_ratio 0.5: int(0.5 n) tokens of each image (the official Qwen2.5-VL count), alone == in the batch."""
    inputs = make_batch(rt)
    eng = rt.prune("mmtok", None, retain_ratio=0.5)
    with torch.no_grad():
        rt.model(**inputs)
    counts = [(s.visual_candidates, s.visual_entering_llm) for s in eng.stats.samples]
    assert all(k == int(0.5 * n) for n, k in counts), counts
    batch = {k: v.keep.clone() for k, v in eng.selections.items()}
    for i in range(3):
        eng = rt.prune("mmtok", None, retain_ratio=0.5)
        with torch.no_grad():
            rt.model(**slice_batch(inputs, i, rt))
        assert torch.equal(eng.selections[("vision", 0)].keep, batch[("vision", i)])
    rt.unprune()


@pytest.mark.parametrize("rt", ["video-llava", "llava-onevision", "internvl"], indirect=True)
def test_refused_outside_the_papers_families(rt):
    with pytest.raises(ValueError, match="mmtok"):
        rt.prune("mmtok", 4)


# ------------------------------------------------------------------ (d) the paper spec and one run of the harness


def test_paper_spec_table_1_recomputes_its_printed_averages():
    """eval/papers/mmtok.toml: Table 1 as printed (arXiv 2508.18264v2): the vanilla row, five rows per budget (FastV,
    SparseVLM, VisionZip, DivPrune, MMTok run; the fine-tuned VisionZip not run), and each printed Avg. recomputed
    from the row's nine cells (mean of cell / vanilla) within 0.15 points (a check of the transcription)."""
    from eval.papers import load

    (t,) = load("mmtok").tables
    van = t.rows[0]
    assert van.method == "none" and van.published["mme"] == 1862.00 and len(van.published) == 9
    assert {(r.method, r.budget) for r in t.rows[1:] if r.runnable} == {
        (m, b) for m in ("fastv", "sparsevlm", "visionzip", "divprune", "mmtok") for b in (192, 128, 64)}
    mm = {r.budget: r for r in t.rows if r.method == "mmtok"}
    assert mm[64].published["pope"] == 85.77 and mm[192].published["seed"] == 59.21
    assert mm[64].options == {"text": "keywords_retokenized", "llm_tokenizer": "llava-hf/llava-1.5-7b-hf",
                              "embed_tokens": "llava-hf/llava-1.5-7b-hf"}
    for r in t.rows[1:]:
        rel = 100 * sum(r.published[k] / van.published[k] for k in van.published) / len(van.published)
        assert abs(rel - r.rel_avg) <= 0.15, (r.label, r.budget, rel, r.rel_avg)


@pytest.mark.parametrize("text", ["keywords_retokenized", "keywords"])
def test_one_config_end_to_end_on_the_tiny_model(fixture_data, tmp_path, run_env, runtimes, text):
    """``python -m eval run pope`` with MMTok's paper options (text=keywords_retokenized: the tokenizer and the
    embedding table named by a checkpoint folder, as the spec names the hub checkpoint; and text=keywords) on tiny
    LLaVA-1.5 at 4 tokens per image: every question answered and scored, 4 tokens entering the LLM."""
    import json

    from eval.cli import main

    rt = runtimes["llava"]
    ckpt = _saved(rt)
    out = tmp_path / "runs"
    opts = ["--opt", f"text={text}", "--opt", f"llm_tokenizer={ckpt}"]
    opts += ["--opt", f"embed_tokens={ckpt}"] if text == "keywords_retokenized" else []
    assert main(["run", "pope", "--model", "tiny:llava", "--method", "mmtok", "--budget", "4", *opts,
                 "--max-new-tokens", "3", "--seed", "1", "--data-root", str(fixture_data), "--out", str(out),
                 "--no-wandb"]) == 0  # seed 1: the weights of the saved checkpoint
    (res_file,) = (out / "pope").glob("*/results.json")
    res = json.loads(res_file.read_text())
    assert res["counts"]["answered"] == res["counts"]["questions"] > 0
    assert res["method"]["method"] == "mmtok" and res["method"]["text"] == text
    assert res["tokens"]["tok_in"] == 4.0 and "POPE-F1avg3" in res["metrics"]


# ------------------------------------------------------------------ (e) the fast path


@pytest.fixture(scope="module")
def fast_rts():
    from fastpath_util import fast_and_eager

    return {fam: fast_and_eager(fam, backend="none") for fam in ("llava", "llava-next", "qwen2.5-vl")}


@pytest.mark.parametrize("family", ["llava", "llava-next", "qwen2.5-vl"])
def test_fast_path_captures_it_equal_to_the_eager_engine(fast_rts, family):
    """text='question': the captured prefill (run uncompiled: the same code with ``sig.captured``, its host reads
    counted) reads nothing from the device, and its tokens, first-step scores and counts == the eager engine's on a
    left-padded batch of three prompts (the padded text block's question rows enter P through their mask)."""
    from fastpath_util import assert_same_as_eager, counting_fast_path, family_batch

    fast, eager = fast_rts[family]
    b = 2 if family == "qwen2.5-vl" else 4
    eng = fast.prune("mmtok", b)
    eager.prune("mmtok", b)
    assert eng.fast is not None and eng.fast.refusal is None
    fp, syncs = counting_fast_path(eng)
    eng.fast = fp
    batch = family_batch(fast, fast.family)
    assert_same_as_eager(fast, eager, eng, batch, tokens=4)
    assert syncs == [0]
    assert not all(s.vision_noop for s in eager.engine.stats.samples)  # the budget prunes


def test_fast_path_refuses_keywords_and_the_reference_mode_and_runs_them_eagerly(fast_rts, tmp_path):
    from fastpath_util import family_batch, generate

    fast, eager = fast_rts["llava"]
    tok = tmp_path / "tok"
    fast.tokenizer.save_pretrained(tok)
    batch = family_batch(fast, "llava")
    for opts, why in (({"text": "keywords", "llm_tokenizer": str(tok)}, "keywords"), ({"numerics": "official"},
                                                                                      "official")):
        eng = fast.prune("mmtok", 4, **opts)
        assert why in eng.fast.refusal
        toks, _ = generate(fast, batch, tokens=3)
        assert eng.stats.path == "eager" and why in eng.stats.path_reason
        eager.prune("mmtok", 4, **opts)
        assert torch.equal(toks, generate(eager, batch, tokens=3)[0])


def test_fast_path_compiled_fullgraph_on_llava():
    """The captured prefill traced whole by dynamo (``torch.compile(fullgraph=True)``, the CPU backend): a graph
    break would raise; tokens == the eager engine's."""
    from fastpath_util import BACKEND, assert_same_as_eager, fast_and_eager, inputs

    torch._dynamo.reset()
    fast, eager = fast_and_eager("llava", backend=BACKEND)
    eng = fast.prune("mmtok", 4)
    eager.prune("mmtok", 4)
    assert_same_as_eager(fast, eager, eng, inputs(fast, 0, n=3), tokens=4)


def test_next_spatial_layout_is_the_official_packing():
    """LLaVA-NeXT with ``next_layout="spatial"``: every crop's 16 tiny patches are candidates (no unpad), no newline
    token, the grid crops in the full canvas's raster order (the official restore_image_features_sorted order); T per
    crop kept, and the picks of each crop == :func:`mmtok` on that crop's tokens alone (one selection per crop)."""
    from llava.models import load

    rt = load("tiny:llava-next", seed=1, next_layout="spatial")
    inputs = make_batch(rt)
    seen = _spy(rt, inputs, 4)
    for sig, (text, _), keep in seen:
        lay = sig.unit_layout()
        assert lay.newlines.numel() == 0 and all(t.numel() == 16 for t in lay.tokens)
        assert keep.numel() == 4 * lay.num_units
        for cand in lay.tokens:
            one = mmtok(sig.features[cand], sig.vision_features[cand], text,
                        unit_layout(torch.zeros(16, dtype=torch.long)), 4, tv_temperature=0.02)
            assert torch.equal(cand[one], keep[torch.isin(keep, cand)])


@pytest.mark.parametrize("rt", ["llava", "llava-next", "qwen2.5-vl"], indirect=True)
def test_options_keep_every_tensor_on_the_signals_device(rt, tmp_path):
    """The options tests/test_device_placement.py does not run (its default case covers text='question'): the
    keyword rows (host indices moved explicitly), the reference mode, retain_ratio, the projected v-v space,
    newlines dropped; each under the device-placement check on a batch of 3, and each pruned."""
    from device_check import check_method

    from llava.method import get_method

    tok = tmp_path / "tok"
    rt.tokenizer.save_pretrained(tok)
    b = 2 if rt.family == "qwen2_5_vl" else 4
    for opts in ({"text": "keywords", "llm_tokenizer": str(tok)}, {"numerics": "official"},
                 {"text": "keywords_retokenized", "llm_tokenizer": str(tok),
                  "embed_tokens": rt.model.get_input_embeddings()},
                 {"text": "keywords_retokenized", "llm_tokenizer": str(tok), "embed_tokens": _saved(rt)},
                 {"retain_ratio": 0.5, "vv_space": "projected", "keep_newlines": False}):
        method = get_method("mmtok", None if "retain_ratio" in opts else b, **opts)
        chk = check_method(method)
        eng = rt.prune(method)
        with torch.no_grad():
            rt.model(**make_batch(rt))
        rt.unprune()
        assert chk.calls["vision"] == 3
        assert all(s.visual_entering_llm < s.visual_candidates for s in eng.stats.samples), opts


@pytest.mark.parametrize("rt", ["llava", "llava-next", "qwen2.5-vl"], indirect=True)
def test_no_cache_no_mask_forward_equals_generate(rt):
    """A log-likelihood style call (no cache, no attention mask) gives generate()'s first-step logits (as
    test_gpu_ready's check of the in-LLM methods), per sample of make_batch."""
    inputs = make_batch(rt)
    rt.prune("mmtok", 2 if rt.family == "qwen2_5_vl" else 4)
    for i in range(3):
        one = {k: v for k, v in slice_batch(inputs, i, rt).items() if k != "attention_mask"}
        with torch.no_grad():
            ref = rt.model.generate(**one, max_new_tokens=1, do_sample=False, output_scores=True,
                                    return_dict_in_generate=True).scores[0]
            bare = rt.model(**one, use_cache=False).logits[:, -1]
        assert rt.engine.stats.samples[0].visual_entering_llm < rt.engine.stats.samples[0].visual_candidates
        torch.testing.assert_close(bare, ref, atol=1e-5, rtol=1e-4)


class _ByteTok:
    """A byte-level stand-in: each id is one UTF-8 byte; a prefix ending inside a character decodes it as U+FFFD
    (what a byte-fallback tokenizer's decode does)."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_token_pieces_follow_the_full_decode():
    from baselines.mmtok import token_pieces

    assert token_pieces(_Tok(["What", " color", " is", "?"]), [0, 1, 2, 3]) == ["What", " color", " is", "?"]
    ids = list("a café?".encode())  # "é" is two bytes: its first byte gets an empty piece, the second the character
    pieces = token_pieces(_ByteTok(), ids)
    assert "".join(pieces) == "a café?" and len(pieces) == len(ids)
    assert pieces[5:7] == ["", "é"]
    # the empty piece belongs to the character it starts: both bytes of the keyword's "é" are kept
    assert keyword_token_mask(pieces) == [False, False, True, True, True, True, True, False]
    assert keyword_token_mask(["", "é", " is"]) == [True, True, False]  # a word that starts with a split byte


# ------------------------------------------------------------------ (f) the Qwen2.5-VL reference options
#: the official Qwen2.5-VL route (``mmtok_qwen2_5_vl``): one selection over all the prompt's image tokens, the
#: last ViT block's per-merged-token mean as the vision -> vision space, "Question: " + the text re-tokenised
QWEN_REF = {"numerics": "official", "vv_space": "merge_mean", "scope": "sample"}


def test_scope_sample_selects_once_over_all_units():
    """scope='sample': the units concatenated in prompt order and one greedy over them (T = budget, or
    int(r * all of them)); scope='unit' (default) keeps T per unit. Worked counts on 5 + 8 tokens."""
    g = torch.Generator().manual_seed(3)
    unit = torch.tensor([0] * 5 + [1] * 8)
    X, V, Z = torch.randn(13, 8, generator=g), torch.randn(13, 4, generator=g), torch.randn(3, 8, generator=g)
    lay, one = unit_layout(unit), unit_layout(torch.zeros(13, dtype=torch.long))
    for numerics in ("ours", "official"):
        kw = dict(tv_temperature=0.01, numerics=numerics)
        keep = mmtok(X, V, Z, lay, 4, scope="sample", **kw)
        assert torch.equal(keep, mmtok(X, V, Z, one, 4, **kw)) and keep.numel() == 4
        assert mmtok(X, V, Z, lay, 4, **kw).numel() == 8  # 4 + 4 per unit
        # retain_ratio 0.35: int(0.35 * 13) = 4 over the sample; per unit int(1.75) + int(2.8) = 1 + 2
        keep_r = mmtok(X, V, Z, lay, None, retain_ratio=0.35, scope="sample", **kw)
        assert torch.equal(keep_r, keep)
        assert mmtok(X, V, Z, lay, None, retain_ratio=0.35, **kw).numel() == 3
    # one unit: the two scopes are the same selection
    assert torch.equal(mmtok(X, V, Z, one, 4, tv_temperature=0.01, scope="sample"),
                       mmtok(X, V, Z, one, 4, tv_temperature=0.01))
    with pytest.raises(ValueError, match="scope"):
        mmtok(X, V, Z, lay, 4, tv_temperature=0.01, scope="image")
    with pytest.raises(ValueError, match="scope"):
        MMTok(4, scope="image")


@pytest.mark.parametrize("rt", ["qwen2.5-vl"], indirect=True)
def test_merge_mean_is_the_last_blocks_output_averaged_per_merged_token(rt):
    """VisionSignals.group_mean[-1] (computed only when asked for: vv_space='merge_mean'): the stock tower's last
    block output (its ``last_hidden_state``, window order) averaged over each merged token's 4 rows and put at that
    token's raster index (``window_index``); the selection == mmtok() on it with tau_t 0.01."""
    from transformers.vision_utils import get_vision_window_index

    inputs = make_batch(rt)
    assert all(sig.group_mean == {} for sig, _, _ in _spy(rt, inputs, 2))  # not computed by default
    seen = _spy(rt, inputs, 2, vv_space="merge_mean")
    visual = rt.model.model.visual
    grid = inputs["image_grid_thw"]
    with torch.no_grad():
        last = visual(inputs["pixel_values"], grid_thw=grid).last_hidden_state  # (N patches, C), window order
    index, _ = get_vision_window_index(grid, spatial_merge_size=2, window_size=visual.window_size,
                                       patch_size=visual.patch_size)
    C = last.shape[-1]
    means = torch.empty(len(index), C)
    means[index] = last.reshape(-1, 4, C).mean(1)  # window slot i holds merged token index[i]
    at = 0
    for sig, (text, _), keep in seen:
        n = sig.num_tokens
        assert sig.group_mean[-1].shape == (n, C) and sig.vision_features.shape == (n, 4 * C)
        assert torch.equal(sig.group_mean[-1], means[at:at + n])
        assert torch.equal(keep, mmtok(sig.features, sig.group_mean[-1], text, sig.unit_layout(), 2,
                                       tv_temperature=0.01))
        at += n
    assert at == len(index)


@pytest.mark.parametrize("rt", ["llava", "llava-next"], indirect=True)
def test_merge_mean_is_refused_outside_qwen(rt):
    with pytest.raises(ValueError, match="merge_mean"):
        rt.prune("mmtok", 4, vv_space="merge_mean")
    rt.unprune()
    assert "merge_mean" in MMTok(4, vv_space="merge_mean").capture_refusal()


@pytest.mark.parametrize("rt", ["qwen2.5-vl"], indirect=True)
def test_question_retokenized_is_the_official_qwen_text(rt):
    """text='question_retokenized': "Question: " + the question's text, split on whitespace and tokenised word by
    word (``is_split_into_words``; Qwen's tokenizer adds no BOS), embedded by the model's table; no keyword filter.
    Worked on the tiny word-level tokenizer (it lower-cases): 'what is this?' -> question : what is this ?"""
    from baselines.mmtok import retokenized_ids

    tok, emb = rt.tokenizer, rt.model.get_input_embeddings()
    seen = _spy(rt, make_batch(rt), 2, text="question_retokenized", llm_tokenizer=tok, embed_tokens=emb)
    words = []
    for sig, (text, mask), keep in seen:
        q = tok.decode(sig.question_ids.tolist(), skip_special_tokens=True)
        ids = retokenized_ids(tok, "Question: " + q)
        assert mask is None and torch.equal(text, emb(torch.tensor(ids)))
        assert torch.equal(keep, mmtok(sig.features, sig.vision_features, text, sig.unit_layout(), 2,
                                       tv_temperature=0.01))
        words.append(tok.convert_ids_to_tokens(ids))
    assert words[0] == ["question", ":", "what", "is", "this", "?"]
    assert words[1] == ["question", ":", "what", "color", "is", "the", "circle", "on", "the", "left", "?"]
    # the stand-in tokenizer: "Question:" is one word; its BOS is dropped
    assert retokenized_ids(_SplitTok(), "Question: what color") == [109, 104, 105]
    # a word the tiny vocabulary lacks ("zebra") stays the unknown token, as the official string re-tokenised gives
    from baselines.mmtok import question_text

    ids = tok("what color is the zebra?")["input_ids"]
    assert tok.unk_token_id in ids and question_text(tok, ids) == "what color is the <unk>?"
    assert retokenized_ids(tok, "Question: " + question_text(tok, ids)) == \
        retokenized_ids(tok, "Question: what color is the zebra?")
    with pytest.raises(ValueError, match="embed_tokens"):
        MMTok(4, text="question_retokenized", llm_tokenizer=tok)


@pytest.mark.parametrize("rt", ["qwen2.5-vl"], indirect=True)
def test_qwen_reference_mode_in_the_engine(rt):
    """The whole official Qwen route (reference numerics, merge_mean, one selection per prompt, retain_ratio, the
    re-tokenised question): batch == alone (generate), cached == no-cache recompute, int(0.5 n) tokens kept, the
    device-placement check; and it selects otherwise than the default options somewhere."""
    from conftest import greedy_no_cache
    from device_check import check_method
    from test_engine import GEN

    from llava.method import get_method

    tok, emb = rt.tokenizer, rt.model.get_input_embeddings()
    opts = dict(QWEN_REF, retain_ratio=0.5, text="question_retokenized", llm_tokenizer=tok, embed_tokens=emb)
    check_generate_batch_equals_alone(rt, "mmtok", None, **opts)
    inputs = make_batch(rt)
    method = get_method("mmtok", None, **opts)
    chk = check_method(method)
    eng = rt.prune(method)
    with torch.no_grad():
        cached = rt.model.generate(**inputs, **GEN)
    assert chk.calls["vision"] == 3
    assert [s.visual_entering_llm for s in eng.stats.samples] == [int(0.5 * s.visual_candidates)
                                                                  for s in eng.stats.samples]
    ref = {k: v.keep.clone() for k, v in eng.selections.items()}
    eng.replay = True
    assert torch.equal(cached, greedy_no_cache(rt.model, inputs, GEN["max_new_tokens"]))
    default = _engine_selections(rt, inputs, None, retain_ratio=0.5)
    assert any(not torch.equal(ref[k], default[k].keep) for k in ref)


def test_whole_at_most_keeps_a_small_selection_whole():
    """whole_at_most=w: a selection over n <= w candidates keeps all n whatever T (the official Qwen2.5-VL route's
    64: its core compares n with its default count, not with the ratio's); larger ones keep T as before."""
    g = torch.Generator().manual_seed(4)
    unit = torch.tensor([0] * 5 + [1] * 8)
    X, V, Z = torch.randn(13, 8, generator=g), torch.randn(13, 4, generator=g), torch.randn(3, 8, generator=g)
    lay = unit_layout(unit)
    kw = dict(tv_temperature=0.01, numerics="official")
    keep = mmtok(X, V, Z, lay, 2, whole_at_most=5, **kw)  # unit 0 (5 <= 5) whole, unit 1 (8 > 5) 2 of 8
    assert [int((unit[keep] == u).sum()) for u in (0, 1)] == [5, 2]
    assert torch.equal(keep[5:], mmtok(X, V, Z, lay, 2, **kw)[2:])  # unit 1's picks unchanged
    assert mmtok(X, V, Z, lay, 2, whole_at_most=12, scope="sample", **kw).numel() == 2  # 13 > 12
    assert torch.equal(mmtok(X, V, Z, lay, None, retain_ratio=0.2, whole_at_most=13, scope="sample", **kw),
                       torch.arange(13))  # int(0.2 * 13) = 2, but 13 <= 13: all kept
    with pytest.raises(ValueError, match="whole_at_most"):
        MMTok(2, whole_at_most=-1)
