"""FastV reference mode (``numerics="official"``) against a transcription of the official selection.

Official source (read, not copied): pkunlp-icler/FastV,
``src/transformers/src/transformers/models/llama/modeling_llama.py``:
  * ``LlamaAttention.forward``: ``softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)``
    - the probabilities are cast to the LLM dtype (fp16 in the official runs);
  * ``LlamaModel.forward``, block "FastV Token Rerank" (in-place and attention-mask versions): at layer
    ``AGG_LAYER`` K, ``torch.mean(layer_outputs[1], dim=1)[0]`` (head mean of layer K-1's attentions, in
    fp16), row ``[-1]`` (last token), image columns ``[SYS_LENGTH:SYS_LENGTH+IMAGE_TOKEN_LENGTH]``,
    ``topk(ATTENTION_RANK)``, then sorted with the prefix / text positions.

Compared with ``baselines.fastv.fastv_select`` on random causal attentions with the official shapes
(LLaVA-1.5-7B: 32 heads, 35 prefix + 576 image + 40 text tokens), fp32 and fp16 probabilities, with
planted duplicate image tokens (identical keys: exact ties in every head) and a heavy low-attention tail
(many fp16 ties).
"""

import functools

import pytest
import torch
from conftest import FAMILIES

from baselines.fastv import FastV, fastv_select

SYS, NV, NT, HEADS = 35, 576, 40, 32
S = SYS + NV + NT


def official_fastv(attn_probs_fp32, rank):
    """Transcription: attn_probs (1, H, S, S) softmax output in fp32; returns kept image positions."""
    attn = attn_probs_fp32.to(torch.float16)  # .to(query_states.dtype)
    avg = torch.mean(attn, dim=1)[0]
    row = avg[-1][SYS:SYS + NV]
    return sorted((row.topk(rank).indices + SYS).tolist())


# shared by the cases of one seed (and cut): a (1, 32, 651, 651) softmax each, 54 MB; the cases run seed by seed, so
# the last five (the seed's uncut one and its four cuts) are all that is reused (CI time)
@functools.lru_cache(maxsize=5)
def random_attention(seed, dups=64, cut=None):
    """Causal softmax (1, H, S, S) in fp32; with ``cut`` = k, the tokens ranked k and k+1 by the last
    row's head mean are made duplicates, so an exact tie straddles the top-k cut."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, HEADS, S, S, generator=g) * 2
    logits[..., SYS + torch.randperm(NV, generator=g)[:25]] += 6  # a few strongly attended image tokens
    src = SYS + torch.randint(0, NV, (dups,), generator=g)
    dst = SYS + torch.randperm(NV, generator=g)[:dups]
    logits[..., dst] = logits[..., src]  # duplicate tokens: same key -> same logit in every row / head
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1, dtype=torch.float32)
    if cut is None:
        return probs
    order = probs[0, :, -1, SYS:SYS + NV].mean(0).sort(descending=True).indices
    a, b = SYS + order[cut - 1], SYS + order[cut]
    logits[..., b] = logits[..., a]
    return logits.masked_fill(~causal, float("-inf")).softmax(-1, dtype=torch.float32)


def ours(probs, rank, numerics, dtype):
    row = probs[0, :, -1, :].to(dtype)  # (H, S): the last token's row per head, as the signal gives it
    keep = fastv_select(row, torch.arange(SYS, SYS + NV), rank, numerics)
    return (keep + SYS).tolist()


CASES = [(seed, dtype, rank, cut) for seed in range(4) for dtype in (torch.float32, torch.float16)
         for rank in (288, 166, 98, 30) for cut in (False, True)]


@pytest.mark.parametrize("seed,dtype,rank,cut", CASES)
def test_reference_mode_equals_the_official_selection(seed, dtype, rank, cut):
    probs = random_attention(seed, cut=rank if cut else None)
    assert ours(probs, rank, "official", dtype) == official_fastv(probs, rank)


def test_worked_example_fp16_tie():
    # 2 heads, 3 image tokens (no prefix): fp32 means .4 / .40001 / .19999 -> default keeps token 1 at
    # k = 1; in fp16 tokens 0 and 1 tie, and reference mode returns what torch.topk returns on the same
    # fp16 values, as the official code
    row = torch.tensor([[.4, .40002, .19998], [.4, .4, .2]])
    assert fastv_select(row, torch.arange(3), 1).tolist() == [1]
    half = row.half()[None].mean(dim=1)[0]
    assert half[0] == half[1]
    assert fastv_select(row, torch.arange(3), 1, "official").tolist() == half.topk(1).indices.tolist()


# three heads, two image tokens (values x 0.25 are exact in binary; u = 2^-10 is fp16's ulp at 1):
#   token 0: 0.25 (1 + .45u) in every head            -> fp32 mean 0.25 (1 + .45u)
#   token 1: 0.25 (1 + .55u), 0.25 (1 + .55u), 0.25 (1 + .2u) -> fp32 mean 0.25 (1 + .433u): token 0 wins
# cast to fp16 (ulp 0.25u there) token 0's three values round down to 0.25, token 1's to 0.25 (1 + u) twice and
# 0.25 once: fp16 means 0.25 and 0.25 (1 + .667u) -> 0.25 (1 + u): token 1 wins. The official code run in fp32
# ranks the fp32 probabilities (token 0); the fp16 cast reverses the order.
U = 2.0 ** -10
REVERSING_ROW = 0.25 * torch.tensor([[1 + .45 * U, 1 + .55 * U], [1 + .45 * U, 1 + .55 * U], [1 + .45 * U, 1 + .2 * U]])


def test_reference_mode_ranks_in_the_given_dtype():
    row, visual = REVERSING_ROW, torch.arange(2)
    assert row.mean(0)[0] > row.mean(0)[1]  # fp32: token 0
    half = row.half()[None].mean(dim=1)[0]
    assert half[1] > half[0]  # fp16: token 1
    assert fastv_select(row, visual, 1, "official", dtype=torch.float32).tolist() == [0]
    assert fastv_select(row, visual, 1, "official", dtype=torch.float16).tolist() == [1]
    assert fastv_select(row, visual, 1, "official").tolist() == [1]  # the default: the official builder's fp16


class _Signals:
    """The few LLMSignals fields FastV's stage reads, around a given (H, S) row; records the logits asked for."""

    def __init__(self, row, dtype):
        self.row, self.asked = row, []
        self.num_visual, self.visual = row.shape[1], torch.arange(row.shape[1])
        self.hidden = torch.zeros(row.shape[1] + 1, 4, dtype=dtype)

    def attention(self, queries, layer="next", logits="fp32"):
        self.asked.append((queries, layer, logits))
        return self.row[:, None]  # (H, 1, S)


@pytest.mark.parametrize("dtype,want", [(torch.float32, [0]), (torch.float16, [1])])
def test_reference_mode_ranks_in_the_run_dtype(dtype, want):
    # parity, LLaVA-1.5 fp32, seed 2, T = 56, image 0: the reference mode cast the fp32 run's row to fp16 and kept
    # patch 22 where the official code (fp32) keeps 21. The stage now ranks in the run's dtype (the hidden
    # states') and asks for the official eager logits; the row above keeps token 0 in fp32, token 1 in fp16.
    sig = _Signals(REVERSING_ROW.to(dtype), dtype)
    keep = FastV(ratio=0.5, numerics="official").select_llm(0, sig).keep
    assert keep.tolist() == want
    assert sig.asked == [("last", "prev", "model")]
    sig = _Signals(REVERSING_ROW, dtype)  # ours: fp32 logits and rows, the fp32 mean, whatever the run's dtype
    assert FastV(ratio=0.5).select_llm(0, sig).keep.tolist() == [0]
    assert sig.asked == [("last", "prev", "fp32")]


def test_method_option():
    assert FastV().numerics == "ours" and FastV(numerics="official").numerics == "official"
    with pytest.raises(ValueError):
        FastV(numerics="fp16")


# ------------------------------------------------------------------------------ tiny models, engine

ENGINE_ARGS = {"llava": (8,), "llava_next": (16,), "video_llava": (64,)}


@pytest.mark.parametrize("rt", FAMILIES, indirect=True)
def test_reference_mode_runs_in_the_engine(rt):
    """Reference mode on the tiny models: batch 3 selections equal each sample alone, and cached
    generation equals recompute."""
    from conftest import check_reference_mode_in_engine

    check_reference_mode_in_engine(rt, "fastv", *ENGINE_ARGS[rt.family], stage=0)
