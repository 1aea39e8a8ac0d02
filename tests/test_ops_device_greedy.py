"""llava.ops.greedy_max_min(device_loop=True): the greedy max-min loop in torch on the device, unrolled
with static shapes, no host read (for a prefill in a CUDA graph / torch.compile(fullgraph=True)); its
picks bit-identical to the host (numpy) loop's."""

import time

import pytest
import torch

from llava.ops import MaxMinProblem, greedy_max_min
from llava.syncs import OpCounter, SyncCounter

# the device loop on a GPU too when there is one (the host loop's numpy picks are the reference)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
INF = float("inf")


def _as_lists(picks):
    return [p.tolist() for p in picks]


def _dist(n, g, ties):
    """An (n, n) fp32 cosine distance with duplicated points (equal rows and columns); ``ties`` also
    rounds it to eighths (many equal distances, equal scores)."""
    x = torch.randn(n, 4, generator=g)
    m = n // 4
    if m:
        x[n - m:] = x[:m]  # duplicates: tied rows / cols
    xn = x / x.norm(dim=1, keepdim=True)
    d = (1.0 - xn @ xn.T).clamp(min=0)
    return (d * 8).round() / 8 if ties else d


def _problems(n, dtype, device, seed):
    """Every combination of k, weight, seeds, starting distance and fill for one n, in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    probs = []
    for ties in (False, True):
        dist = _dist(n, g, ties)
        weights = {
            "none": None,
            "rand": torch.rand(n, generator=g),
            "zeros": torch.rand(n, generator=g).masked_fill(torch.rand(n, generator=g) < 0.4, 0.0),
            "equal": torch.full((n,), 0.5),
        }
        n_seed = max(1, n // 5)
        taken = torch.zeros(n, dtype=torch.bool)
        taken[torch.randperm(n, generator=g)[:n_seed]] = True
        seeded_mind = dist[:, taken].amin(1)
        starts = [(None, None, torch.full((n,), INF)), (None, None, torch.ones(n)),
                  (taken, n_seed, seeded_mind)]
        for k in sorted({0, 1, n // 2, n, n + 3}):
            for w in weights.values():
                for tk, num, mind in starts:
                    for fill in (-INF, -1.0, 0.0):
                        cast = (lambda t: None if t is None else t.to(dtype=dtype, device=device))
                        probs.append(MaxMinProblem(
                            dist=cast(dist), k=k, min_dist=cast(mind),
                            taken=None if tk is None else tk.to(device), weight=cast(w), fill=fill,
                            num_taken=num))
    return probs


# a zero weight times a +inf starting distance is NaN (numpy warns): both loops pick the first NaN
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 5, 64, 200])
def test_device_loop_picks_equal_the_host_loop(n, dtype, device):
    """Bit-identical picks on many problems, all solved in one call each way: k in {0, 1, n/2, n, n+3},
    weight none / random / with zeros / all equal, starting distances +inf / 1 / from seeds (taken +
    num_taken), fill -inf / -1 / 0, duplicated points, rounded (tied) distances, fp16 / bf16 inputs."""
    probs = _problems(n, dtype, device, seed=n)
    before = [(p.min_dist.clone(), None if p.taken is None else p.taken.clone(), p.dist.clone()) for p in probs]
    host = greedy_max_min(probs)
    dev = greedy_max_min(probs, device_loop=True)
    assert len(dev) == len(host) == len(probs)
    for p, h, d in zip(probs, host, dev):
        assert d.dtype == torch.long and d.device.type == device and d.shape == h.shape
        assert d.tolist() == h.tolist(), p
        n_free = n - (p.num_taken or 0)
        assert len(d) == max(0, min(p.k, n_free))
    # the inputs are left as they were (the loop updates its own copies in place; one problem's rows are views)
    assert all(p.taken is None or int(p.taken.sum()) == p.num_taken for p in probs)
    for p, (mind, taken, dist) in zip(probs, before):  # DivPrune's form writes -inf on a diagonal: never its input's
        assert torch.equal(p.min_dist, mind) and (taken is None or torch.equal(p.taken, taken))
        assert torch.equal(p.dist, dist)


@pytest.mark.parametrize("device", DEVICES)
def test_worked_examples_four_points_on_a_line(device):
    """Points 0, 1, 2, 3 on a line, dist |i - j|."""
    i = torch.arange(4.0, device=device)
    D = (i[:, None] - i[None, :]).abs()
    # min_dist +inf, k = 3: all scores +inf -> the first, 0; min_dist = |0 - j| = 0 1 2 3 -> 3;
    # min(0 1 2 3, 3 2 1 0) = 0 1 1 0 -> the first maximum among 1 and 2: 1
    cases = [(MaxMinProblem(D, 3, torch.full((4,), INF, device=device)), [0, 3, 1])]
    # weighted, min_dist 1: scores w = 1 2 3 1 -> 2; min(1, |2 - j|) = 1 1 0 1, scores 1 2 - 1 -> 1;
    # min(1 1 0 1, 1 0 1 2) = 1 0 0 1, scores 1 - - 1 -> 0
    w = torch.tensor([1.0, 2, 3, 1], device=device)
    cases.append((MaxMinProblem(D, 3, torch.ones(4, device=device), weight=w, fill=-1.0), [2, 1, 0]))
    # seed 3 (min_dist |3 - j| = 3 2 1 0), k = 9 clipped to the 3 free tokens: 0; min(3 2 1 0, 0 1 2 3)
    # = 0 1 1 0 -> 1; min(0 1 1 0, 1 0 1 2) = 0 0 1 0 -> 2
    taken = torch.tensor([False, False, False, True], device=device)
    cases.append((MaxMinProblem(D, 9, D[3].clone(), taken, num_taken=1), [0, 1, 2]))
    # k = 0: nothing
    cases.append((MaxMinProblem(D, 0, D[0].clone()), []))
    probs, want = [c[0] for c in cases], [c[1] for c in cases]
    assert _as_lists(greedy_max_min(probs, device_loop=True)) == want
    assert _as_lists(greedy_max_min(probs)) == want
    assert greedy_max_min([], device_loop=True) == []


def test_device_loop_reads_nothing_from_the_host():
    """No host synchronisation at all (SyncCounter: inputs made outside count as device tensors), while
    the host loop's one copy is seen; the device loop's launches grow with k (an unrolled loop)."""
    g = torch.Generator().manual_seed(0)
    dist = _dist(48, g, ties=True)
    w = torch.rand(48, generator=g).masked_fill(torch.rand(48, generator=g) < 0.3, 0.0)
    taken = torch.zeros(48, dtype=torch.bool)
    taken[[3, 17, 40]] = True
    mind = dist[:, taken].amin(1)

    def probs(k):
        return [MaxMinProblem(dist.half(), k, mind, taken, w, -1.0, num_taken=3),
                MaxMinProblem(dist, k, torch.full((48,), INF)), MaxMinProblem(dist, 0, mind)]

    ops = {}
    for k in (2, 20):
        with SyncCounter(ops=True) as c:
            out = greedy_max_min(probs(k), device_loop=True)
        assert c.sync_total == 0, dict(c.syncs)
        assert "_local_scalar_dense" not in c.ops, dict(c.ops)  # (its _to_copy: the fp16 -> fp32 cast)
        ops[k] = c.op_total
        assert _as_lists(out) == _as_lists(greedy_max_min(probs(k)))
    assert ops[20] > ops[2]  # per pick on the device, unlike the host loop
    with SyncCounter() as c:
        greedy_max_min(probs(20))
    assert c.total == 1  # the counter does see the host loop's one copy


def test_device_loop_needs_num_taken_with_taken():
    D = torch.rand(5, 5)
    taken = torch.tensor([True, False, False, False, False])
    with pytest.raises(ValueError, match="num_taken"):
        greedy_max_min([MaxMinProblem(D, 2, D[0].clone(), taken)], device_loop=True)
    with pytest.raises(ValueError, match="num_taken"):  # a count without a mask
        greedy_max_min([MaxMinProblem(D, 2, D[0].clone(), num_taken=1)], device_loop=True)
    # the host loop counts `taken` itself; given num_taken must agree
    assert greedy_max_min([MaxMinProblem(D, 2, D[0].clone(), taken)])[0].numel() == 2
    with pytest.raises(ValueError, match="num_taken"):
        greedy_max_min([MaxMinProblem(D, 2, D[0].clone(), taken, num_taken=2)])


def _compile_case(device="cpu"):
    g = torch.Generator().manual_seed(3)
    n = 40
    dist = _dist(n, g, ties=True).to(device)
    w = torch.rand(n, generator=g).masked_fill(torch.rand(n, generator=g) < 0.3, 0.0).to(device)
    taken = torch.zeros(n, dtype=torch.bool)
    taken[[0, 9, 21]] = True
    taken = taken.to(device)
    mind = dist[:, taken].amin(1)

    def probs(dist, mind, taken, w):
        return [MaxMinProblem(dist, 12, mind, taken, w, -1.0, num_taken=3),
                MaxMinProblem(dist, 7, torch.full_like(mind, INF)),
                MaxMinProblem(dist.half(), n + 3, mind, taken, num_taken=3)]

    def fn(dist, mind, taken, w):
        return greedy_max_min(probs(dist, mind, taken, w), device_loop=True)

    args = (dist, mind, taken, w)
    return fn, args, _as_lists(greedy_max_min(probs(*args)))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_device_loop_compiles_in_one_graph(backend):
    """torch.compile(fullgraph=True, dynamic=False) traces the whole unrolled loop with no graph break,
    and the compiled picks equal the host loop's."""
    from torch._dynamo.utils import counters

    fn, args, want = _compile_case()
    torch._dynamo.reset()
    counters.clear()
    t0 = time.perf_counter()
    compiled = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)
    got = _as_lists(compiled(*args))
    elapsed = time.perf_counter() - t0
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    assert got == want
    assert _as_lists(compiled(*args)) == want  # the cached graph again
    print(f"compile ({backend}): {elapsed:.1f} s")
    torch._dynamo.reset()


def test_divprune_s_form_is_three_launches_a_pick():
    """No weight, fill -inf (DivPrune): a pick is its argmax, the picked row's gather and the minimum (the taken
    token's -inf comes from the distances' diagonal, set once on a copy), so 18 more picks are 54 more launches;
    the picks are the host loop's and the inputs are left as they were."""
    g = torch.Generator().manual_seed(5)
    dist = _dist(64, g, ties=True)
    mind, before = torch.full((64,), INF), dist.clone()
    ops, picks = {}, {}
    for k in (2, 20):
        with OpCounter() as c:
            (picks[k],) = greedy_max_min([MaxMinProblem(dist, k, mind)], device_loop=True)
        ops[k] = c.total
    assert ops[20] - ops[2] == 3 * 18, ops
    assert picks[20].tolist() == greedy_max_min([MaxMinProblem(dist, 20, mind)])[0].tolist()
    assert picks[20][:2].tolist() == picks[2].tolist() and len(set(picks[20].tolist())) == 20
    assert torch.equal(dist, before) and torch.equal(mind, torch.full((64,), INF))


def test_problems_of_one_size_share_one_loop():
    """Five problems of one token count, pick count and form (a LLaVA-NeXT image's crops) run as one loop over
    stacked rows: each one's picks are its picks alone, bit for bit, in about a fifth of the launches; a problem
    of another size runs on its own."""
    g = torch.Generator().manual_seed(3)
    crops = []
    for _ in range(5):
        dist = _dist(40, g, ties=True)  # ties: the first-maximum rule matters
        crops.append(MaxMinProblem(dist, 12, torch.full((40,), INF), weight=torch.rand(40, generator=g), fill=-1.0))
    odd = MaxMinProblem(_dist(24, g, ties=False), 12, torch.full((24,), INF))
    alone = [greedy_max_min([p], device_loop=True)[0].tolist() for p in crops + [odd]]
    with OpCounter() as one:
        greedy_max_min(crops[:1], device_loop=True)
    with OpCounter() as five, SyncCounter() as syncs:
        together = greedy_max_min(crops + [odd], device_loop=True)
    assert [p.tolist() for p in together] == alone == [p.tolist() for p in greedy_max_min(crops + [odd])]
    assert len({tuple(p) for p in alone[:5]}) == 5  # five different selections
    assert syncs.total == 0
    # five crops + the odd one: ~2x one crop's launches (the stack and gather aside), not ~6x
    assert five.total < 2.5 * one.total, (five.total, one.total)
