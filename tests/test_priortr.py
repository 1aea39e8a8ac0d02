"""PriorTR (baselines/priortr.py): the score and the choice on hand-built attention rows with worked-out values,
then the method on the tiny models against the stock eager model's own attention of layer K-1."""

import math

import pytest
import torch
from conftest import make_batch, slice_batch

from baselines.priortr import PriorTR, priortr_scores, priortr_select
from llava.method import get_method
from llava.models import load

# Attention rows over S = 6 tokens: 0 = prefix, 1..4 = visual, 5 = the null token's own column. T = 3 query rows:
# the null token (the prior Q), a question token, the last prompt token. Two identical heads (the head mean is the row).
#   visual columns:  null  [.1, .2, .3, .4]
#                    q1    [.4, .3, .2, .1]
#                    last  [.1, .1, .2, .6]
# "question": P = mean of the 3 rows = [.2, .2, .7/3, 1.1/3] (sums to 1), Q = [.1, .2, .3, .4]
#   S = P log(P / Q) = [.2 ln 2, 0, (.7/3) ln(.7/.9), (1.1/3) ln(1.1/1.2)] = [.13863, 0, -.05864, -.03190]
#   -> order 0, 1, 3, 2. Raw attention (FastV's last row, or P itself) would keep 3 and 2 first.
# "last": P = [.1, .1, .2, .6]: S = [0, .1 ln .5, .2 ln(2/3), .6 ln 1.5] = [0, -.06931, -.08109, .24328]
#   -> order 3, 0, 1, 2.
VIS = [[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.2, 0.6]]


def _rows(dtype=torch.float32):
    r = torch.zeros(3, 6)
    r[:, 1:5] = torch.tensor(VIS)
    r[:, 0] = 0.5  # columns outside the visual ones never enter the score
    return torch.stack([r, r]).to(dtype)  # (H=2, T=3, S=6)


VISUAL = torch.tensor([1, 2, 3, 4])


def test_scores_are_the_v_information_of_the_question_against_the_null_token():
    s = priortr_scores(_rows(), VISUAL)
    want = [0.2 * math.log(2), 0.0, 0.7 / 3 * math.log(0.7 / 0.9), 1.1 / 3 * math.log(1.1 / 1.2)]
    assert s.dtype == torch.float32
    assert torch.allclose(s, torch.tensor(want), atol=1e-6)
    assert priortr_select(s, 2).tolist() == [0, 1]
    assert priortr_select(s, 3).tolist() == [0, 1, 3]
    assert priortr_select(s, 9).tolist() == [0, 1, 2, 3] and priortr_select(s, 0).tolist() == []
    last = priortr_scores(_rows(), VISUAL, queries="last")
    want = [0.0, 0.1 * math.log(0.5), 0.2 * math.log(2 / 3), 0.6 * math.log(1.5)]
    assert torch.allclose(last, torch.tensor(want), atol=1e-6)
    assert priortr_select(last, 2).tolist() == [0, 3]


def test_heads_max_and_the_prior_matters():
    rows = _rows()
    rows[1, :, 1:5] = torch.tensor([0.7, 0.1, 0.1, 0.1])  # head 1: every row on visual 0
    # max over heads: null [.7, .2, .3, .4] (sum 1.6), P = max([.2, .2, .2333, .3667], [.7, .1, .1, .1]) = [.7, .2, .2333, .3667]
    # (sum 1.5): P/Q ratios (after each normalisation) .7/1.5 / (.7/1.6) = 1.0667, .2/1.5 / (.2/1.6) = 1.0667,
    # .2333/1.5 / (.3/1.6) = .8296, .3667/1.5 / (.4/1.6) = .9778 -> S > 0 for visual 0 and 1, order 0, 1, 3, 2
    s = priortr_scores(rows, VISUAL, heads="max")
    assert priortr_select(s, 2).tolist() == [0, 1]
    assert priortr_select(s, 3).tolist() == [0, 1, 3]
    # without the prior (Q uniform) the question's attention alone decides: visual 3 and 2 lead the last row
    flat = _rows()
    flat[:, 0, 1:5] = 0.25
    assert priortr_select(priortr_scores(flat, VISUAL, queries="last"), 2).tolist() == [2, 3]


def test_question_excluding_the_last_row_is_the_official_qwen_rule():
    """The official Qwen2-VL / Qwen3-VL code: P = mean of rows img_end .. end-1 (Python's ``img_end:-1``): here the
    null row and q1, P = [.25, .25, .25, .25]; Q = [.1, .2, .3, .4]; S = .25 ln(.25 / Q) =
    [.25 ln 2.5, .25 ln 1.25, .25 ln(5/6), .25 ln .625] = [.22907, .05579, -.04558, -.11750]: order 0, 1, 2, 3
    (the LLaVA rule, with the last row, ranks 0, 1, 3, 2). One row only: the official fallback to the last row, which
    is the null row: P == Q, S == 0."""
    s = priortr_scores(_rows(), VISUAL, queries="question_excl_last")
    want = [0.25 * math.log(2.5), 0.25 * math.log(1.25), 0.25 * math.log(5 / 6), 0.25 * math.log(0.625)]
    assert torch.allclose(s, torch.tensor(want), atol=1e-6)
    assert priortr_select(s, 3).tolist() == [0, 1, 2]
    one = priortr_scores(_rows()[:, :1], VISUAL, queries="question_excl_last")
    assert torch.equal(one, torch.zeros(4))
    # padded (the fast path): the last *real* row is left out, the pads never enter
    pad = torch.cat([_rows(), _rows()[:, :1], _rows()[:, :1]], dim=1)
    mask = torch.tensor([True, True, True, False, False])
    assert torch.allclose(priortr_scores(pad, VISUAL, "question_excl_last", row_mask=mask), s, atol=1e-7)
    pad1 = torch.cat([_rows()[:, :1]] * 3, dim=1)
    assert torch.equal(priortr_scores(pad1, VISUAL, "question_excl_last",
                                      row_mask=torch.tensor([True, False, False])), torch.zeros(4))


def test_internvl_prior_is_the_newline_after_the_image_end_tag():
    """The official InternVL code: Q = the row at img_end + 1 (the newline after ``</img>``), P = the mean of every row
    from ``</img>`` on. Here Q = q1 = [.4, .3, .2, .1], P = [.2, .2, .7/3, 1.1/3]: S = [.2 ln .5, .2 ln(2/3),
    (.7/3) ln(7/6), (1.1/3) ln(11/3)] = [-.13863, -.08109, .03597, .47640] -> order 3, 2, 1, 0."""
    s = priortr_scores(_rows(), VISUAL, prior_row=1)
    want = [0.2 * math.log(0.5), 0.2 * math.log(2 / 3), 0.7 / 3 * math.log(7 / 6), 1.1 / 3 * math.log(11 / 3)]
    assert torch.allclose(s, torch.tensor(want), atol=1e-6)
    assert priortr_select(s, 2).tolist() == [2, 3]
    m = get_method("priortr")
    m.setup(num_layers=32, num_vision_layers=24, family="internvl")
    assert m.prior_offset == 1 and m.query_rows == "question"
    m.setup(num_layers=32, num_vision_layers=24, family="llava")
    assert m.prior_offset == 0
    assert PriorTR(prior_row=2).prior_offset == 2


def test_padded_rows_give_the_same_scores():
    """The fast path's padded text block (pad rows repeat row 0, the null token) with its mask == the real rows."""
    rows = _rows()
    pad = torch.cat([rows, rows[:, :1], rows[:, :1]], dim=1)  # (H, 5, S): 2 pad rows at the end
    mask = torch.tensor([True, True, True, False, False])
    for q in ("question", "last"):
        assert torch.allclose(priortr_scores(pad, VISUAL, q, row_mask=mask), priortr_scores(rows, VISUAL, q), atol=1e-7)


def test_reference_mode_scores_in_the_attention_dtype():
    s = priortr_scores(_rows(torch.float16), VISUAL, numerics="official")
    assert s.dtype == torch.float16
    assert priortr_select(s, 2, "official").tolist() == [0, 1]
    ours = priortr_scores(_rows(torch.float16), VISUAL)  # ours: fp32 whatever the rows' dtype
    assert ours.dtype == torch.float32
    assert torch.allclose(s.float(), ours, atol=2e-3)


def test_options_counts_and_refusals():
    m = get_method("priortr")
    assert (m.layer, m.keep_tokens, m.queries, m.heads, m.position_mode) == (3, None, "auto", "mean", "keep")
    m.setup(num_layers=32, num_vision_layers=24, family="llava")
    assert m.llm_layers == (3,) and m.query_rows == "question"
    assert m.kept_count(576) == 192  # 1/3 of 576
    m.setup(num_layers=32, num_vision_layers=24, family="llava_next")
    assert m.query_rows == "last"  # the official auto rule on LLaVA-1.6
    m = PriorTR(keep_tokens=64)
    m.setup(num_layers=32, num_vision_layers=24, family="llava")
    assert m.kept_count(576) == 64 and m.kept_count(40) == 40
    assert m.layer_counts(576) == [576] * 3 + [64] * 29
    m = PriorTR(192)  # equivalent tokens: (32 * 192 - 3 * 576) / 29 = 4416 / 29 = 152.3 -> 152
    m.setup(num_layers=32, num_vision_layers=24, family="llava")
    assert m.kept_count(576) == 152
    m.setup(num_layers=4, num_vision_layers=3, family="llava")  # K = 3 of 32 -> 1 of 4 layers
    assert m.llm_layers == (1,)
    # the Qwen families: the official Qwen2-VL / Qwen3-VL rules (P without the last row, at least one token of a
    # keep_ratio: max(1, int(n * r)); LLaVA: max(0, int(n * r))), the score layer's attention beside SDPA
    m = PriorTR(keep_ratio=0.1111)
    m.setup(num_layers=32, num_vision_layers=24, family="qwen3_vl")
    assert m.query_rows == "question_excl_last" and m.kept_count(90) == 9 and m.kept_count(4) == 1
    assert m.kept_count(0) == 0
    PriorTR.setup(m, num_layers=32, num_vision_layers=24, family="llava")
    assert m.query_rows == "question" and m.kept_count(4) == 0
    m = PriorTR(keep_ratio=0.1111, min_keep=2, queries="question", numerics="official")
    m.setup(num_layers=32, num_vision_layers=24, family="qwen2_5_vl")
    assert m.query_rows == "question" and m.kept_count(4) == 2 and m.eager_layers == ()
    assert m.causal_scores is False  # the official Qwen look-ahead's rows (no mask under SDPA at batch 1)
    m.setup(num_layers=32, num_vision_layers=24, family="llava")
    assert m.eager_layers == (2,) and m.causal_scores is True
    assert PriorTR(score_mask="none").causal_scores is False
    m = PriorTR(keep_ratio=0.1111, numerics="official", score_mask="causal")
    m.setup(num_layers=32, num_vision_layers=24, family="qwen3_vl")
    assert m.causal_scores is True
    for bad in ({"keep_tokens": -1}, {"keep_tokens": 2.5}, {"queries": "all"}, {"heads": "sum"},
                {"numerics": "fp16"}, {"layer": 0}, {"keep_ratio": 1.5}, {"min_keep": -1}, {"min_keep": 1.5},
                {"score_mask": "full"}, {"prior_row": -1}, {"prior_row": "x"}):
        with pytest.raises(ValueError, match="priortr"):
            PriorTR(**bad)
    with pytest.raises(ValueError, match="either a budget"):
        PriorTR(64, keep_tokens=64)


@pytest.fixture(scope="module")
def eager():
    """A stock eager-attention twin (same seed, same weights) whose attention maps are the reference."""
    return load("tiny:llava", seed=1, attn_implementation="eager")


@pytest.mark.parametrize("rt", ["llava"], indirect=True)
@pytest.mark.parametrize("queries", ["question", "last"])
def test_selection_uses_layer_k_minus_1_rows_of_the_null_token_and_the_question(rt, eager, queries):
    """Independent reference: the unpruned eager model's attention of layer K-1 = 0 (K = 3 of 32 -> 1 of 4), the
    null token = the first token after the image, the rows from it to the end of the prompt."""
    one = slice_batch(make_batch(rt), 1, rt)
    with torch.no_grad():
        att = eager.model(**one, output_attentions=True).attentions[0][0].float()  # (H, S, S)
    ids = one["input_ids"][0]
    vis = torch.nonzero(ids == rt.model.config.image_token_id).flatten()
    null = int(vis[-1]) + 1
    a = att[:, null:, vis]
    q = a[:, 0].mean(0)
    p = a.mean(1).mean(0) if queries == "question" else a[:, -1].mean(0)
    p, q = p / p.sum(), q / q.sum()
    s = p * torch.log(p / q)
    expected = torch.topk(s, 6).indices.sort().values
    eng = rt.prune("priortr", None, keep_tokens=6, queries=queries)
    with torch.no_grad():
        rt.model(**one)
    assert torch.equal(eng.selections[(0, 0)].keep, expected)
    assert eng.stats.samples[0].visual_per_layer == [16, 6, 6, 6]


@pytest.mark.parametrize("rt", ["qwen3-vl"], indirect=True)
def test_qwen_reference_mode_reads_the_official_qwen_score_layer(rt):
    """Independent reference on Qwen3-VL (K = 3 of 32 -> 1 of 4: the score layer is layer 0): the layer's q / k
    (q_norm / k_norm, M-RoPE) as the stock SDPA layer computes them, captured by hooks, the official Qwen3-VL
    product ``matmul(q, k^T) * scaling``, fp32 softmax cast back, P over rows img_end .. end-1 (the last row left
    out), ``torch.topk``; the official keep count max(1, int(n * r)); the rows without a causal mask (the official
    look-ahead adds transformers' mask, which SDPA at batch 1 leaves out). The image (24 merged tokens) is one where
    keeping int(24 * 0.25) = 6 differs with the last row in and with the causal mask (checked below)."""
    from transformers.models.qwen3_vl import modeling_qwen3_vl as mq

    one = make_batch(rt, n=1, sizes=((112, 168),))
    ids = one["input_ids"][0]
    vis = torch.nonzero(ids == rt.model.config.image_token_id).flatten()
    got = {}
    real = mq.apply_rotary_pos_emb

    def spy(q, k, cos, sin, *a, **kw):
        q2, k2 = real(q, k, cos, sin, *a, **kw)
        got.setdefault("qk", (q2, k2))
        return q2, k2

    rt.unprune()
    mq.apply_rotary_pos_emb = spy
    try:
        with torch.no_grad():
            rt.model(**one)
    finally:
        mq.apply_rotary_pos_emb = real
    q, k = got["qk"]  # layer 0's (1, H, S, d), (1, H_kv, S, d)
    attn = rt.model.model.language_model.layers[0].self_attn
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = torch.matmul(q, k.transpose(2, 3)) * attn.scaling
    a = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)[0]
    causal = logits + torch.full(logits.shape[-2:], float("-inf")).triu(1)
    causal = torch.softmax(causal, dim=-1, dtype=torch.float32).to(q.dtype)[0]
    null, n = int(vis[-1]) + 1, vis.numel()

    def score(rows, a=a):
        p, qq = rows[:, :, vis].mean(1).mean(0).float(), a[:, null, vis].mean(0).float()
        p, qq = p / (p.sum() + 1e-10), qq / (qq.sum() + 1e-10)
        return p * torch.log((p + 1e-10) / (qq + 1e-10))

    k_off = max(1, int(n * 0.25))
    expected = torch.topk(score(a[:, null:-1]), k_off).indices.sort().values
    assert n == 24 and not torch.equal(expected, torch.topk(score(a[:, null:]), k_off).indices.sort().values)
    causal_pick = torch.topk(score(causal[:, null:-1], causal), k_off).indices.sort().values
    assert not torch.equal(expected, causal_pick)
    eng = rt.prune("priortr", None, keep_ratio=0.25, numerics="official")
    with torch.no_grad():
        rt.model(**one)
    assert torch.equal(eng.selections[(0, 0)].keep, expected)
    assert eng.stats.samples[0].visual_per_layer == [n, k_off, k_off, k_off]
    eng = rt.prune("priortr", None, keep_ratio=0.25, numerics="official", score_mask="causal")
    with torch.no_grad():
        rt.model(**one)
    assert torch.equal(eng.selections[(0, 0)].keep, causal_pick)


@pytest.mark.parametrize("rt", ["internvl"], indirect=True)
def test_internvl_selection_reads_the_newline_row_as_the_prior(rt):
    """Independent reference on InternVL: the stock eager twin's attention of layer 0 (K = 3 of 32 -> 1 of 4), Q the
    row of the newline after ``</img>``, P the mean of the rows from ``</img>`` to the end (the official InternVL
    code); reading the ``</img>`` row as Q instead would keep other tokens here."""
    one = slice_batch(make_batch(rt), 1, rt)
    twin = load("tiny:internvl", seed=1, attn_implementation="eager")
    with torch.no_grad():
        att = twin.model(**one, output_attentions=True).attentions[0][0].float()  # (H, S, S)
    ids = one["input_ids"][0]
    vis = torch.nonzero(ids == rt.model.config.image_token_id).flatten()
    end = int(vis[-1]) + 1  # </img>
    a = att[:, end:][:, :, vis]

    def pick(prior):
        p, q = a.mean(1).mean(0), a[:, prior].mean(0)
        p, q = p / p.sum(), q / q.sum()
        return torch.topk(p * torch.log(p / q), 6).indices.sort().values

    expected = pick(1)
    assert not torch.equal(expected, pick(0))
    eng = rt.prune("priortr", None, keep_tokens=6)
    with torch.no_grad():
        rt.model(**one)
    assert torch.equal(eng.selections[(0, 0)].keep, expected)


def test_paper_script_runs_end_to_end_on_the_tiny_model(tmp_path):
    """`bash scripts/papers/priortr.sh README` on POPE fixtures at 64 with the tiny LLaVA: every config of the grid
    runs (in one process: LAUNCHER=inprocess, the model loaded once), and the report puts the README's printed
    averages beside ours, marked as a tiny-model run."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import child_env

    from eval.fixtures import write_fixtures

    repo = Path(__file__).resolve().parents[1]
    data = write_fixtures(tmp_path / "data", ["pope"])
    env = child_env(MODEL="tiny:llava", ONLY="pope", BUDGETS="64", DATA_ROOT=data, OUT=tmp_path / "runs",
                    PYTHON=sys.executable, LAUNCHER="inprocess", EXTRA_ARGS="--max-new-tokens 4 --no-wandb")
    r = subprocess.run(["bash", str(repo / "scripts/papers/priortr.sh"), "README"], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "priortr: 6 configs to run" in r.stdout  # vanilla, FastV, PDrop, SparseVLM, VisPruner, PriorTR at 64
    assert "priortr: 6 configs in one process, 1 model load" in r.stdout
    runs = sorted(p.parent.name for p in (tmp_path / "runs" / "pope").glob("*/results.json"))
    assert any(n.startswith("tiny-llava_priortr_") and "caches=pruned" in n and "keep_tokens=64" in n for n in runs), runs
    assert len(runs) == 6
    (md,) = (tmp_path / "runs" / "papers").glob("priortr*.md")
    text = md.read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("| PriorTR (Ours) | 64 |"))
    assert "94.5%" in row and "§" in row  # the printed average beside ours, ours marked: another model
