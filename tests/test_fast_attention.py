"""The fast path's prompt attention as a causal kernel over its padded bucket (llava/fast/attention.py): the
rolled causal attention equals the masked one on every real row, the stock function is untouched without the
fast path's keyword, and with ``fast_attention="causal"`` the fast path's tokens and first scores equal the eager
engine's on every family's plan (a stage inside the LLM, a piecewise prefill, a hybrid decoder), with no host
synchronisation in the rolled attention."""

import pytest
import torch
from fastpath_util import inputs

import llava.fast.attention as fa
from llava.check.fast import assert_same_as_eager
from llava.fast.llm import prompt_mask
from llava.models import load
from llava.syncs import SyncCounter


class _Attn(torch.nn.Module):
    """What the attention functions read of a module: causal or not, and its key/value groups."""

    def __init__(self, causal=True, groups=2):
        super().__init__()
        self.is_causal, self.num_key_value_groups, self.training = causal, groups, False


def _qkv(B=3, H=4, Hkv=2, L=8, C=12, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g)
    k, v = (torch.randn(B, Hkv, C, D, generator=g) for _ in range(2))
    return q, k, v


def test_the_rolled_causal_attention_equals_the_masked_one_on_every_real_row():
    fa.install()
    lens, L, C = [5, 8, 1], 8, 12
    q, k, v = _qkv(L=L, C=C)
    mask = prompt_mask(torch.tensor([L - n for n in lens]), L, C)
    mod = _Attn()
    want, _ = fa._stock(mod, q, k, v, mask, scaling=0.25)
    got, weights = fa._sdpa(mod, q, k, v, mask, scaling=0.25, **{fa.KW: True})
    assert weights is None and got.shape == want.shape == (3, L, 4, 16)
    for b, n in enumerate(lens):
        real = slice(L - n, L)  # left padding: the real rows are the last n
        torch.testing.assert_close(got[b, real], want[b, real], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got).all()
    # a real row's output reads no key of a pad, nor of a slot after the bucket: changing them changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[0, :, :3], v2[0, :, :3] = 100.0, -100.0  # sample 0's three pads
    k2[:, :, L:], v2[:, :, L:] = 50.0, 50.0  # the decode slots
    again, _ = fa._sdpa(mod, q, k2, v2, mask, scaling=0.25, **{fa.KW: True})
    torch.testing.assert_close(again[0, 3:], got[0, 3:], rtol=0, atol=0)


def test_without_the_keyword_or_for_a_non_causal_module_the_stock_function_runs():
    fa.install()
    q, k, v = _qkv()
    mask = prompt_mask(torch.tensor([3, 0, 7]), 8, 12)  # 5, 8, 1 real rows of 8
    called = []

    def spy(*a, **kw):
        called.append(fa.KW in kw)
        return "stock", None

    stock, fa._stock = fa._stock, spy
    try:
        assert fa._sdpa(_Attn(), q, k, v, mask)[0] == "stock"  # the eager engine's calls
        assert fa._sdpa(_Attn(causal=False), q, k, v, mask, **{fa.KW: True})[0] == "stock"  # a vision tower
        assert fa._sdpa(_Attn(), q[:, :, -1:], k, v, mask[:, :, -1:], **{fa.KW: True})[0] == "stock"  # a decode step
        assert fa._sdpa(_Attn(), q, k[:, :, :8], v[:, :, :8], None, **{fa.KW: True})[0] == "stock"  # no mask
        assert fa._sdpa(_Attn(), q, k, v, mask, sliding_window=4, **{fa.KW: True})[0] == "stock"  # in the mask
    finally:
        fa._stock = stock
    assert called == [False] * 5  # the keyword never reaches the stock function
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    fa.install()  # twice: still one wrapper around the stock function
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is fa._sdpa and fa._stock is not fa._sdpa


def test_which_buckets_take_the_causal_kernel():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not fa.wants("auto", 4096, cpu) and not fa.wants("auto", fa.AUTO_MIN_ROWS - 1, cuda)
    assert fa.wants("auto", fa.AUTO_MIN_ROWS, cuda)
    assert fa.wants("causal", 16, cpu) and not fa.wants("masked", 4096, cuda)
    with pytest.raises(ValueError, match="fast_attention must be one of"):
        load("tiny:llava", seed=1, fast=True, fast_attention="flash")


@pytest.fixture
def rolled(monkeypatch):
    """Counts the rolled-attention calls and the host syncs inside them."""
    seen = {"calls": 0, "syncs": 0}
    inner = fa.causal_bucket

    def counted(*a, **k):
        with SyncCounter() as c:
            out = inner(*a, **k)
        seen["calls"] += 1
        seen["syncs"] += c.total + sum(c.uploads.values())
        return out

    monkeypatch.setattr(fa, "causal_bucket", counted)
    return seen


#: per family, methods whose plans differ: unpruned, an llm stage (FastV), a pre-LLM selection (VisionZip), a
#: piecewise prefill (PruMerge: two graphs); Qwen3.5: two of its four layers are full attention
CASES = ([("llava", m, b) for m, b in (("none", None), ("fastv", 8), ("visionzip", 6), ("prumerge", None))]
         + [(f, m, b) for f in ("llava_next", "qwen2.5-vl", "qwen3-vl", "internvl")
            for m, b in (("none", None), ("fastv", 8))]
         + [("qwen3.5", "visionzip", 6)])


@pytest.mark.parametrize("family,method,budget", CASES)
def test_the_fast_path_with_the_causal_kernel_gives_the_eager_tokens(rolled, family, method, budget):
    fast = load(f"tiny:{family}", seed=1, fast=True, fast_max_new_tokens=16, fast_backend="none",
                fast_attention="causal")
    eager = load(f"tiny:{family}", seed=1)
    eng = fast.prune(method, budget)
    eager.prune(method, budget)
    assert eng.fast is not None and eng.fast.refusal is None
    assert_same_as_eager(fast, eager, eng, inputs(fast, 0, n=3))  # 3 prompts of different lengths: padded
    full = 2 if family == "qwen3.5" else 4  # decoder layers with attention (the tiny models have 4)
    assert rolled["calls"] == full  # one prefill: every attention layer took the causal kernel
    assert rolled["syncs"] == 0


def test_the_causal_kernel_traced_by_dynamo_gives_the_eager_tokens(monkeypatch):
    traced, inner = [], fa.causal_bucket
    monkeypatch.setattr(fa, "causal_bucket", lambda *a, **k: traced.append(1) or inner(*a, **k))  # no dispatch mode
    torch._dynamo.reset()
    fast = load("tiny:llava", seed=1, fast=True, fast_max_new_tokens=16, fast_backend="eager",
                fast_attention="causal")
    eager = load("tiny:llava", seed=1)
    eng = fast.prune("consensusdrop", 6)
    eager.prune("consensusdrop", 6)
    assert_same_as_eager(fast, eager, eng, inputs(fast, 0, n=3))
    assert traced  # traced into the compiled prefill (the regions trace a layer once)


def test_a_decoder_on_another_attention_runs_eagerly_and_says_why(rolled):
    """The fast path's masks are boolean, as SDPA takes them; eager attention adds its mask (a boolean one would
    mask nothing: the fast path gave other tokens than the eager engine before it refused): a decoder loaded with
    eager attention runs on the eager engine, with the reason, and gets no keyword."""
    fast = load("tiny:llava", seed=1, fast=True, fast_max_new_tokens=16, fast_backend="none", fast_attention="causal",
                attn_implementation="eager")
    eager = load("tiny:llava", seed=1, attn_implementation="eager")
    eng = fast.prune("visionzip", 6)
    eager.prune("visionzip", 6)
    assert "attn_implementation='sdpa'" in eng.fast.refusal and "'eager'" in eng.fast.refusal
    assert eng.fast._attn(torch.zeros(1, 600, 8)) == {}
    batch = inputs(fast, 0, n=3)
    with torch.no_grad():
        got = fast.model.generate(**batch, max_new_tokens=8, do_sample=False)
        want = eager.model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert eng.stats.path == "eager" and torch.equal(got, want)
    assert rolled["calls"] == 0
