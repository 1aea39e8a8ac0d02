"""OTPrune: the kernel and the greedy DPP picks on hand-worked points, a plain float64 reference loop, the column
normalisation, the kept count, CPython's set order as tensor ops (hand-worked and against the interpreter), and on
the three tiny families the LLM input against the reference loop and the token accounting. Keep-all, batch == alone,
cached decode, device placement, the fast path: the shared lists (tests/test_method_guarantees.py, ...)."""

import math
import random

import pytest
import torch
from conftest import FAMILIES, layout, llm_visual_rows, make_batch

from baselines.otprune import (GAMMA, OTPrune, _dpp_map_loop, dpp_map, num_picks, otprune, otprune_kernel,
                              otprune_select)
from llava.method import get_method
from llava.ops import reference_set_order, set_order
from llava.ops.pyset import probe_table

ALL = pytest.mark.parametrize("rt", FAMILIES, indirect=True)


# ------------------------------------------------------------------------------------- plain references
def ref_kernel(rows, gamma=GAMMA):
    """L = I + gamma G G^T, G = Vc Vc^T, Vc = V with each column divided by its norm over the rows (float64)."""
    n, d = len(rows), len(rows[0])
    norms = [math.sqrt(sum(rows[i][c] ** 2 for i in range(n))) for c in range(d)]
    v = [[rows[i][c] / norms[c] for c in range(d)] for i in range(n)]
    g = [[sum(v[i][c] * v[j][c] for c in range(d)) for j in range(n)] for i in range(n)]
    return [[(1.0 if i == j else 0.0) + gamma * sum(g[i][m] * g[j][m] for m in range(n)) for j in range(n)]
            for i in range(n)]


def ref_greedy(L, k):
    """Chen et al.'s greedy DPP MAP in float64, written out: conditional variances d2, Cholesky rows c."""
    n = len(L)
    d2 = [L[i][i] for i in range(n)]
    c = [[] for _ in range(n)]
    picks = []
    for _ in range(k):
        j = max((i for i in range(n) if i not in picks), key=lambda i: (d2[i], -i))  # ties: lower index
        picks.append(j)
        for i in range(n):
            if i in picks:
                continue
            e = (L[j][i] - sum(a * b for a, b in zip(c[j], c[i]))) / math.sqrt(d2[j])
            c[i].append(e)
            d2[i] -= e * e
        c[j].append(math.sqrt(d2[j]))
    return picks


# ---------------------------------------------------------------------------------- worked values
#: three tokens, two channels. Column norms: sqrt(101), sqrt(2). G = Vc Vc^T:
#: G = [[100/101, 0, 10/101], [0, 1/2, 1/2], [10/101, 1/2, 1/101 + 1/2]]
#: diag(G G^T) = [.9901, .5, .5198] -> first pick 0 (per-token unit rows would give G^2 diag 1.5 / 1.5 / 2 -> 2).
#: After 0: d2_j = L_jj - L_0j^2 / L_00 with L_01 = .01 * .0495, L_02 = .01 * .1485: d2_1 = 1.005 - 2.4e-7,
#: d2_2 = 1.005198 - 2.2e-6 -> 2, then 1.
V3 = [[10.0, 0.0], [0.0, 1.0], [1.0, 1.0]]


def test_kernel_and_picks_on_three_hand_worked_tokens():
    x = torch.tensor(V3)
    L = otprune_kernel(x)
    g = torch.tensor([[100 / 101, 0, 10 / 101], [0, 0.5, 0.5], [10 / 101, 0.5, 1 / 101 + 0.5]], dtype=torch.float64)
    exp = torch.eye(3, dtype=torch.float64) + 0.01 * g @ g.T
    assert torch.allclose(L.double(), exp, atol=1e-6)
    assert torch.allclose(torch.diagonal(L).double(), torch.tensor([1.009901, 1.005, 1.005198], dtype=torch.float64),
                          atol=1e-6)
    assert torch.allclose(L.double(), torch.tensor(ref_kernel(V3), dtype=torch.float64), atol=1e-6)
    assert dpp_map(L, 3).tolist() == [0, 2, 1] == ref_greedy(ref_kernel(V3), 3)
    assert otprune_select(x, 2).tolist() == [0, 2]
    # the official association (gamma G) @ G^T and the fp16 column norm give the same picks here
    assert otprune_select(x.half(), 3, numerics="official").tolist() == [0, 2, 1]


def test_column_normalisation_not_per_token():
    """Scaling a channel leaves the kernel unchanged (column normalisation); scaling a token does not."""
    torch.manual_seed(0)
    x = torch.randn(12, 5, dtype=torch.float64)
    L = otprune_kernel(x)
    assert torch.allclose(otprune_kernel(x * torch.tensor([1.0, 7.0, 0.1, 3.0, 2.0], dtype=torch.float64)), L,
                          atol=1e-5)
    y = x.clone()
    y[3] *= 5
    assert not torch.allclose(otprune_kernel(y), L, atol=1e-3)
    # per-token unit rows would pick token 2 first on V3; we pick 0
    rows = torch.nn.functional.normalize(torch.tensor(V3), dim=1)
    gr = rows @ rows.T
    assert torch.argmax(torch.diagonal(gr @ gr.T)).item() == 2 and otprune_select(torch.tensor(V3), 1).tolist() == [0]


@pytest.mark.parametrize("seed", range(4))
def test_picks_equal_the_float64_reference_loop(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 6, generator=g, dtype=torch.float64) * torch.rand(24, 1, generator=g, dtype=torch.float64)
    k = 9
    ref = ref_greedy(ref_kernel(x.tolist(), gamma=0.5), k)  # a larger gamma: well separated gains
    assert otprune_select(x, k, gamma=0.5).tolist() == ref
    assert dpp_map(torch.tensor(ref_kernel(x.tolist(), gamma=0.5)), k).tolist() == ref
    assert sorted(set(otprune_select(x.half(), k, gamma=0.5, numerics="official").tolist())) == sorted(ref)


@pytest.mark.parametrize("seed", range(6))
def test_one_buffer_loop_equals_the_plain_loop_bit_for_bit(seed):
    """The default loop (d2 and the Cholesky rows in one buffer, e written into its row, d2 updated in place, no
    contraction at step 0) against the plain loop it replaces: the same picks, in the same order, on the method's
    shapes (576 tokens of 1024 channels in bf16, T = 64 / 192) and on sizes whose rows are not a multiple of 64
    bytes (C's block then starts after padding rows); and the kernel's + I on its diagonal = eye + product."""
    g = torch.Generator().manual_seed(seed)
    n, d, k = [(576, 1024, 64), (576, 1024, 192), (577, 64, 100), (33, 7, 33), (100, 16, 1), (300, 48, 299)][seed]
    x = (torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g)).bfloat16()
    L = otprune_kernel(x)
    picks = dpp_map(L, k)
    assert torch.equal(picks, _dpp_map_loop(L, k, torch.float32))
    assert sorted(picks.tolist()) == sorted(set(picks.tolist())) and picks.numel() == k
    v = x.float() / x.float().norm(dim=-2, keepdim=True).clamp(min=1e-12)
    gram = v @ v.T
    assert torch.equal(L, torch.eye(n) + (GAMMA * gram) @ gram.T)


def test_kernel_is_at_least_the_identity_so_picks_are_distinct_to_the_last_token():
    torch.manual_seed(1)
    x = torch.randn(10, 3).repeat(2, 1)  # every token twice
    picks = otprune_select(x, 20)
    assert sorted(picks.tolist()) == list(range(20))
    assert (torch.linalg.eigvalsh(otprune_kernel(x).double()) > 1 - 1e-6).all()


def test_count_budget_and_ratio():
    assert num_picks(576, None, 1, None) == 56  # the shipped SUBSET_RATIO 0.098
    assert [num_picks(576, None, 1, r) for r in (64 / 576, 128 / 576, 192 / 576)] == [64, 128, 192]
    assert num_picks(10, None, 1, 0.25) == 2  # round(2.5) = 2 (Python rounds half to even, as int(round()))
    assert num_picks(14, None, 1, 0.25) == 4  # round(3.5) = 4
    assert num_picks(2880, 64, 5, None) == 320 and num_picks(40, 64, 1, None) == 40
    unit = torch.zeros(40, dtype=torch.long)
    x = torch.randn(40, 8)
    assert otprune(x, unit, ratio=0.1).numel() == 4 and otprune(x, unit, budget=7).numel() == 7
    assert torch.equal(otprune(x, unit, budget=40), torch.arange(40))  # at least the scope: kept whole
    with pytest.raises(ValueError, match="budget or a ratio"):
        OTPrune(4, ratio=0.1)
    with pytest.raises(ValueError, match="order"):
        OTPrune(4, order="set")


# ------------------------------------------------------------------------------ CPython's set order
def test_set_order_hand_worked():
    """Table of 8 slots: 33 -> slot 1; 1 -> slot 1 taken, no linear run (1 + 9 > 7), perturb 1 >> 5 = 0,
    slot 5 * 1 + 1 = 6: [33, 1]. 40 -> 0; 8 -> 0 taken, slot 1; 72 -> 0 taken, perturb 72 >> 5 = 2, slot 0 + 1 + 2 =
    3: [40, 8, 72]; inserted as 72, 40, 8: 40 jumps to 0 + 1 + (40 >> 5) = 2, 8 to 1: [72, 8, 40]. 9 -> 1, 1 -> 6,
    2 -> 2: [9, 2, 1]; the fifth insert (5 * 5 >= 3 * 7) grows the table to 32: 9 and 1..4 in their own slots."""
    for seq, exp in (([33, 1], [33, 1]), ([1, 33], [1, 33]), ([40, 8, 72], [40, 8, 72]), ([72, 40, 8], [72, 8, 40]),
                     ([9, 1, 2, 3, 4], [1, 2, 3, 4, 9]), ([9, 1, 2], [9, 2, 1])):
        assert set_order(torch.tensor(seq), 80).tolist() == exp == list(set(seq)) == reference_set_order(seq)
    assert probe_table(3, 8, 3)[1].tolist() == [1, 6, 7]  # 1, 5 * 1 + 1, 5 * 6 + 1 = 31 & 7


@pytest.mark.parametrize("n,k", [(64, 16), (576, 56), (576, 192), (2340, 780), (100, 100)])
def test_set_order_equals_the_interpreter(n, k):
    rng = random.Random(n * 1000 + k)
    rows = [rng.sample(range(n), k) for _ in range(3)]
    got = set_order(torch.tensor(rows), n)
    for b in range(3):
        assert got[b].tolist() == list(set(rows[b]))
    assert got[1].tolist() == set_order(torch.tensor(rows[1]), n).tolist()  # batch == alone
    if k < n:
        assert got[0].tolist() != sorted(rows[0])  # collisions: not ascending


def test_official_order_is_the_set_order_of_the_picks():
    torch.manual_seed(3)
    x = torch.randn(64, 16)
    unit = torch.zeros(64, dtype=torch.long)
    picks = otprune_select(x, 16)
    assert torch.equal(otprune(x, unit, budget=16), picks.sort().values)
    assert otprune(x, unit, budget=16, order="official").tolist() == list(set(picks.tolist()))


def test_newline_tokens_and_scopes():
    torch.manual_seed(2)
    x = torch.randn(12, 6)
    unit = torch.tensor([0, 0, 0, 0, 0, -1, 1, 1, 1, 1, 1, -1])
    everything = otprune(x, unit, budget=2)  # sample scope: 4 picks among all 12, newline rows candidates
    assert torch.equal(everything, otprune_select(x, 4).sort().values)
    per_unit = otprune(x, unit, budget=2, per_unit=True)  # newline rows kept as layout
    exp = torch.cat([torch.tensor([5, 11]), otprune_select(x[:5], 2), 6 + otprune_select(x[6:11], 2)]).sort().values
    assert torch.equal(per_unit, exp)
    dropped = otprune(x, unit, budget=2, newlines="drop")
    cand = torch.tensor([0, 1, 2, 3, 4, 6, 7, 8, 9, 10])
    assert torch.equal(dropped, cand[otprune_select(x[cand], 4)].sort().values)
    with pytest.raises(ValueError, match="official"):
        otprune(x, unit, budget=2, per_unit=True, order="official")


def test_official_order_refuses_capture_the_default_is_captured():
    assert get_method("otprune", 4).capture_refusal() is None
    assert "eager" in get_method("otprune", 4, order="official").capture_refusal()
    assert "official" in get_method("otprune", 4, numerics="official").capture_refusal()


# ------------------------------------------------------------------------------ tiny models
@ALL
def test_llm_input_equals_the_reference_loop(rt):
    """The LLM's visual rows = the unpruned rows picked by the float64 reference loop (LLaVA-1.5 4 of 16; NeXT
    ratio .25 of all image rows, newline rows included; Video-LLaVA 4 per frame), in ascending order, and in
    CPython set order with order="official"."""
    inputs = make_batch(rt)
    rt.prune("none")
    stock = llm_visual_rows(rt, inputs)
    opts = {"ratio": 0.25} if rt.family == "llava_next" else {"budget": 4}
    for order in ("sorted", "official"):
        rt.prune("otprune", opts.get("budget"), **{k: v for k, v in opts.items() if k != "budget"}, order=order)
        rows = llm_visual_rows(rt, inputs)
        for b in range(3):
            frames = stock[b].split(17) if rt.family == "video_llava" else [stock[b]]
            expected = []
            for f in frames:
                k = round(0.25 * f.shape[0]) if rt.family == "llava_next" else 4
                picks = ref_greedy(ref_kernel(f.double().tolist()), k)
                expected.append(f[sorted(picks) if order == "sorted" else list(set(picks))])
            assert torch.equal(rows[b], torch.cat(expected)), (order, b)


@ALL
@pytest.mark.parametrize("budget", [2, 4, 6])
def test_tokens_entering_llm(rt, budget):
    inputs = make_batch(rt)
    lay = layout(rt, inputs)
    eng = rt.prune("otprune", budget)
    with torch.no_grad():
        rt.model(**inputs)
    L = len(rt.model.model.language_model.layers)
    for s, (sizes, newlines) in zip(eng.stats.samples, lay):
        if rt.family == "video_llava":  # per frame
            exp = sum(min(budget, n) for n in sizes)
        else:  # one selection per sample: budget x units (NeXT: newline rows are candidates)
            exp = min(budget * len(sizes), sum(sizes) + newlines)
        assert s.visual_candidates == sum(sizes) + newlines
        assert s.visual_per_layer == [exp] * L and s.visual_entering_llm == exp and not s.vision_noop
