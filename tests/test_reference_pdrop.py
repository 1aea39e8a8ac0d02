"""PyramidDrop reference mode (``numerics="official"``) against a transcription of the official selection.

Official source (read, not copied): Cooperx521/PyramidDrop, ``llava/model/modeling_llama_pdrop.py``,
``LlamaModel.pdrop_rank_drop`` (inference branch, called by ``LlamaModel.pdrop_forward`` before each layer
of ``layer_list``):
  * a detached copy of the current states through the boundary layer's ``input_layernorm``, ``q_proj`` /
    ``k_proj`` and RoPE (fp16: ``llava/model/builder.py`` ``load_pretrained_model`` loads the LLM with
    ``torch_dtype=torch.float16``);
  * the query = the last instruction token (``prompt_total_len - 1``), shape (H, 1, d);
    ``softmax(q k^T / sqrt(d) + mask, dim=-1, dtype=torch.float32).to(query_states.dtype)`` - the
    probabilities are cast to fp16;
  * ``torch.mean(attn_weights, dim=0)`` (heads, fp16), image columns ``[image_index:image_index+N]``,
    ``torch.mean(.., dim=0)`` (the one query row, fp16);
  * ``.topk(keep_length).indices`` with ``keep_length = int(N_orig * ratio[s+1])``, ``+ image_index``,
    ``.sort().values``.

Compared with ``baselines.pdrop.pdrop_select`` on random last-token rows with the official shapes
(LLaVA-1.5-7B: 32 heads, 35 prefix tokens, the stage's current image tokens, 40 text tokens) for the
official schedule (576 -> 288 -> 144 -> 72) and the budget-192 table (576 -> 300 -> 200 -> 110), fp32 and
fp16 probabilities, with planted duplicate image tokens (identical keys: exact ties in every head) and,
in half of the cases, an exact tie planted across the top-k cut.
"""

import pytest
import torch
from conftest import FAMILIES

from baselines.pdrop import PyramidDrop, pdrop_select

SYS, NT, HEADS = 35, 40, 32


def official_pdrop(logits, n_image, keep_length):
    """Transcription of the inference branch of ``pdrop_rank_drop`` for one sample after q/k: logits
    (H, 1, S) = q k^T / sqrt(d) + mask of the last instruction token. Returns the kept image positions."""
    return official_pdrop_probs(torch.softmax(logits, dim=-1, dtype=torch.float32), n_image, keep_length)


def official_pdrop_probs(probs, n_image, keep_length, image_index=SYS):
    """The same from the fp32 softmax output (H, 1, S)."""
    attn = probs.to(torch.float16)  # .to(query_states.dtype)
    avg_head = torch.mean(attn, dim=0)  # (1, S)
    avg_head = avg_head[:, image_index:image_index + n_image]
    avg_text = torch.mean(avg_head, dim=0)  # (N,)
    top = avg_text.topk(keep_length).indices + image_index
    return top.sort().values.tolist()


def random_row(seed, n_image, dups=48, cut=None):
    """Last-token logits (H, 1, S) with S = 35 + n_image + 40: a few strongly attended image tokens,
    ``dups`` duplicated image tokens (same logit in every head), a long low tail; with ``cut`` = k the
    image tokens ranked k and k+1 by the fp32 head mean are made duplicates (an exact tie at the cut)."""
    g = torch.Generator().manual_seed(seed)
    s = SYS + n_image + NT
    logits = torch.randn(HEADS, 1, s, generator=g) * 2
    logits[..., SYS + torch.randperm(n_image, generator=g)[:20]] += 6
    src = SYS + torch.randint(0, n_image, (dups,), generator=g)
    dst = SYS + torch.randperm(n_image, generator=g)[:dups]
    logits[..., dst] = logits[..., src]
    if cut is not None:
        mean = logits.softmax(-1)[:, 0, SYS:SYS + n_image].mean(0)
        order = mean.sort(descending=True).indices
        logits[..., SYS + order[cut]] = logits[..., SYS + order[cut - 1]]
    return logits


def ours(logits, n_image, k, numerics, dtype):
    row = torch.softmax(logits, dim=-1, dtype=torch.float32)[:, 0].to(dtype)  # (H, S) as the signal gives it
    keep = pdrop_select(row, torch.arange(SYS, SYS + n_image), k, numerics)
    return (keep + SYS).tolist()


# (current image tokens, kept): the official lam = 0.5 schedule and the budget-192 table, N_orig = 576
STAGES = [(576, 288), (288, 144), (144, 72), (576, 300), (300, 200), (200, 110)]
CASES = [(seed, dtype, n, k, cut) for seed in range(3) for dtype in (torch.float32, torch.float16)
         for n, k in STAGES for cut in (False, True)]


@pytest.mark.parametrize("seed,dtype,n,k,cut", CASES)
def test_reference_mode_equals_the_official_selection(seed, dtype, n, k, cut):
    logits = random_row(seed, n, cut=k if cut else None)
    assert ours(logits, n, k, "official", dtype) == official_pdrop(logits, n, k)


def test_planted_ties_are_real():
    # the cases above do hold exact ties: at the cut in fp32 (planted) and many more in fp16
    logits = random_row(0, 576, cut=288)
    p = torch.softmax(logits, dim=-1, dtype=torch.float32)[:, 0, SYS:SYS + 576]
    order = p.mean(0).sort(descending=True)
    assert order.values[287] == order.values[288]
    assert p.mean(0).unique().numel() < 576  # duplicates
    assert p.half().mean(0).unique().numel() < p.mean(0).unique().numel()  # and fp16 ties on top


def test_worked_example_fp16_flips_the_order():
    # 4 heads, 3 image tokens (no prefix); fp16 grid near 0.4: 0.39990234375, 0.400146484375 (midpoint
    # 0.40002441...)
    #   token 0: .40002 x 4            -> fp32 mean .40002;   fp16 heads .39990234 -> mean .39990234
    #   token 1: .40003 x 3, .39992    -> fp32 mean .4000025; fp16 heads .40014648 x 3, .39990234
    #                                     -> mean .40008545, rounded to fp16 .40014648
    #   token 2: .2 x 4
    # k = 1: the default (fp32) keeps token 0, reference mode (fp16, as the official code) token 1
    row = torch.tensor([[.40002, .40003, .2], [.40002, .40003, .2], [.40002, .40003, .2], [.40002, .39992, .2]])
    assert pdrop_select(row, torch.arange(3), 1).tolist() == [0]
    assert pdrop_select(row, torch.arange(3), 1, "official").tolist() == [1]
    assert pdrop_select(row, torch.arange(3), 2, "official").tolist() == [0, 1]
    assert official_pdrop_probs(row[:, None], 3, 1, image_index=0) == [1]
    assert official_pdrop_probs(row[:, None], 3, 2, image_index=0) == [0, 1]


def test_method_option():
    assert PyramidDrop().numerics == "ours" and PyramidDrop(numerics="official").numerics == "official"
    with pytest.raises(ValueError, match="numerics"):
        PyramidDrop(numerics="fp16")
    with pytest.raises(ValueError, match="numerics"):
        pdrop_select(torch.ones(2, 3), torch.arange(3), 1, "half")


# ------------------------------------------------------------------------------ tiny models, engine


@pytest.mark.parametrize("rt", FAMILIES, indirect=True)
def test_reference_mode_runs_in_the_engine(rt):
    """Reference mode on the tiny models (official schedule, stages before layers 1 / 2 / 3): batch 3
    selections equal each sample alone, and cached generation equals recompute."""
    from conftest import check_reference_mode_in_engine

    check_reference_mode_in_engine(rt, "pdrop", None, stage=0)
