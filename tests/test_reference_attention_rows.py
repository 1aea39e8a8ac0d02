"""In-LLM attention rows as the official code computes them (issue 50): ``LLMSignals.attention(..., logits="model")``,
which the reference modes of PyramidDrop, VScan's LLM stage and DUET-VLM's LLM stage read.

Official source (read, not copied): the eager ``LlamaAttention.forward`` of transformers 4.31-4.37, which LLaVA's
code and these methods' forks run in fp16 (``load_pretrained_model``: ``torch_dtype=torch.float16``) and whose
rows ``pdrop_rank_drop`` (Cooperx521/PyramidDrop ``modeling_llama_pdrop.py``), VScan's ``layer_prune`` and
DUET-VLM's stage 2 read:
  * ``attn_weights = torch.matmul(query_states, key_states.transpose(2, 3)) / math.sqrt(self.head_dim)``: fp16
    logits;
  * ``attn_weights = attn_weights + attention_mask`` (causal, ``torch.finfo(fp16).min`` above the diagonal);
  * ``nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)``.

Shapes: LLaMA-7B (32 heads x 128), a LLaVA-1.5 prompt of 35 prefix + N image + 40 text tokens.
"""

import math

import pytest
import torch
from conftest import make_batch

from baselines.pdrop import pdrop_select
from llava.models import load
from llava.signals import causal_attention_rows

SYS, NT, HEADS, HD = 35, 40, 32, 128


def official_rows(q16, k16, rows):
    """The eager LlamaAttention's probabilities (H, Q, S) of the query ``rows``: fp16 q (H, Q, d), k (H, S, d)."""
    s = k16.shape[1]
    mask = torch.zeros(len(rows), s, dtype=torch.float16)
    mask = mask.masked_fill(torch.arange(s)[None, :] > rows[:, None], torch.finfo(torch.float16).min)
    w = torch.matmul(q16, k16.transpose(1, 2)) / math.sqrt(HD)
    w = w + mask[None]
    return torch.nn.functional.softmax(w, dim=-1, dtype=torch.float32).to(q16.dtype)


def qk(seed, n):
    """fp16 queries / keys of a prompt with n image tokens: a shared key direction, image tokens that differ a
    little (their logits crowd together, as in a real layer), and 48 duplicated image keys (exact ties)."""
    g = torch.Generator().manual_seed(seed)
    s = SYS + n + NT
    q = torch.randn(HEADS, s, HD, generator=g)
    k = torch.randn(HEADS, s, HD, generator=g) * 0.35 + torch.randn(HEADS, 1, HD, generator=g)
    dups = min(48, n // 2)
    src = SYS + torch.randint(0, n, (dups,), generator=g)
    dst = SYS + torch.randperm(n, generator=g)[:dups]
    k[:, dst] = k[:, src]
    return (q * 1.4).half(), (k * 1.4).half()


@pytest.mark.parametrize("seed", range(3))
def test_model_logits_are_the_official_eager_attention(seed):
    """Every probability of the last row and of the 40 text rows, bit for bit, in fp16."""
    q, k = qk(seed, 576)
    rows = torch.arange(SYS + 576, SYS + 576 + NT)
    want = official_rows(q[:, rows], k, rows)
    got = causal_attention_rows(q[:, rows], k, rows, HD ** -0.5, logits="model")
    assert got.dtype == torch.float16 and torch.equal(got, want)
    ours = causal_attention_rows(q[:, rows], k, rows, HD ** -0.5)
    assert ours.dtype == torch.float32 and not torch.equal(ours.half(), want)  # fp16 logits round differently


def test_pdrop_reference_mode_keeps_the_official_set_from_q_and_k():
    """PyramidDrop's stages (576 -> 288, 288 -> 144, 144 -> 72) from fp16 q / k, 12 cases: the reference mode on
    the model-dtype rows keeps the official set every time; on the fp32 rows (the signal before this option) it
    does not always - the fp16 logits' rounding decides near-ties at the cut."""
    same_model, same_fp32, cases = 0, 0, 0
    for seed in range(4):
        for n, keep in ((576, 288), (288, 144), (144, 72)):
            q, k = qk(10 + seed, n)
            last = torch.tensor([SYS + n + NT - 1])
            vis = torch.arange(SYS, SYS + n)
            probs = official_rows(q[:, last], k, last)  # (H, 1, S) fp16
            want = (probs.mean(dim=0)[:, SYS:SYS + n].mean(dim=0).topk(keep).indices).sort().values
            model = causal_attention_rows(q[:, last], k, last, HD ** -0.5, logits="model")[:, 0]
            fp32 = causal_attention_rows(q[:, last], k, last, HD ** -0.5)[:, 0]
            same_model += torch.equal(pdrop_select(model, vis, keep, "official"), want)
            same_fp32 += torch.equal(pdrop_select(fp32, vis, keep, "official"), want)
            cases += 1
    assert same_model == cases == 12
    assert same_fp32 == 10  # 2 of 12 cases swap a token at the cut


def test_logits_option_is_checked():
    q, k = qk(0, 8)
    rows = torch.tensor([SYS + 8 + NT - 1])
    with pytest.raises(ValueError, match="logits"):
        causal_attention_rows(q[:, rows], k, rows, HD ** -0.5, logits="fp16")


@pytest.mark.parametrize("method,budget,opts", [("pdrop", None, {}), ("vscan", 6, {}), ("duet", 8, {})])
def test_reference_modes_read_the_model_dtype_rows_in_the_engine(method, budget, opts, monkeypatch):
    """On an fp16 tiny LLaVA, the in-LLM stages of the reference modes ask the signal for the model-dtype rows
    (and get fp16 probabilities), the default modes for fp32 rows."""
    import llava.signals as signals

    seen = []
    inner = signals.causal_attention_rows

    def spy(*a, **kw):
        out = inner(*a, **kw)
        seen.append((kw.get("logits", "fp32"), out.dtype))
        return out

    monkeypatch.setattr(signals, "causal_attention_rows", spy)
    rt = load("tiny:llava", seed=1, dtype="float16")
    batch = make_batch(rt, n=2)
    for numerics, want in (("official", (("model", torch.float16),)), ("ours", (("fp32", torch.float32),))):
        seen.clear()
        rt.prune(method, budget, numerics=numerics, **opts)
        with torch.no_grad():
            rt.model(**batch)
        assert seen and set(seen) == set(want), (numerics, seen)
