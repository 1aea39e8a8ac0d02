"""llava.syncs.OpCounter: exactly the aten ops that would launch a GPU kernel or memcpy, on device
tensors only (views, allocations and host-side work free), and SyncCounter(ops=True) counting both."""

import numpy as np
import torch

from llava.models import load
from llava.syncs import OpCounter, SyncCounter


def test_arithmetic_counts_one_op_each():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    with OpCounter() as c:
        a + b
        (a * b).sum()
    assert c.total == 3 and dict(c.counts) == {"add": 1, "mul": 1, "sum": 1}


def test_views_allocations_and_metadata_are_free():
    a = torch.randn(4, 3)
    with OpCounter() as c:
        a.view(3, 4), a.reshape(12), a.t(), a.transpose(0, 1).permute(1, 0), a[1:], a[0], a[:, None]
        a.unsqueeze(0).squeeze(0), a.detach(), a.expand(2, 4, 3), a.unbind(0), a.split(2), a.narrow(0, 1, 2)
        a.flatten(), a.as_strided((2,), (1,)), a.view_as(a), a.shape, a.size(0), a.stride()
        torch.empty(5, device=a.device), torch.empty_like(a)
        b = a.clone()
        b.unsqueeze_(0), b.transpose_(1, 2)
    assert c.total == 1 and dict(c.counts) == {"clone": 1}  # the clone is a copy kernel


def test_copies_in_place_ops_factories_on_the_device_and_reads_count():
    a = torch.randn(4, 3)
    with OpCounter() as c:
        a.t().reshape(12)  # reshape of a non-contiguous tensor: a copy (+ a free view)
        a.contiguous()  # already contiguous: nothing
        a.add_(1)
        a[0] = 2.0  # a fill of the selected row
        torch.arange(3, device=a.device)
        a.sum().item()  # sum + the device-to-host read
    assert dict(c.counts) == {"clone": 1, "add_": 1, "fill_": 1, "arange": 1, "sum": 1, "_local_scalar_dense": 1}


def test_host_work_after_cpu_is_free():
    x = torch.randn(16)
    with OpCounter() as c:
        h = (x * 2).cpu()  # mul + one copy to the host
        # a greedy loop on the host copy: none of it would launch
        keep = []
        s = h.clone()
        for _ in range(3):
            i = int(s.argmax())
            keep.append(i)
            s[i] = -float("inf")
            s = torch.minimum(s, h - h[i])
        idx = torch.tensor(sorted(keep))  # made on the host
        idx2 = torch.as_tensor(np.array(keep)).sort().values
        mask = torch.zeros(16, dtype=torch.bool)
        mask[idx] = True
        x.tolist()  # a device read (a copy)
        x[idx.to(x.device)]  # back on the device: one gather
        x[idx2.to(x.device)].sum()  # gather + sum
    assert dict(c.counts) == {"mul": 1, "_to_copy": 2, "index": 2, "sum": 1}


def test_sync_counter_with_ops_counts_both_in_one_pass():
    x = torch.randn(8)
    with SyncCounter(ops=True) as c:
        x[x > 0]  # gt + index (a sync: boolean mask)
        x.sum().item()  # sum + read (a sync)
        h = x.cpu()  # a copy (a sync)
        int(h.max())  # host: free
    assert dict(c.counts) == {"bool_index": 1, "item": 1, "to_host": 1} and c.total == 3
    assert dict(c.ops) == {"gt": 1, "index": 1, "sum": 1, "_local_scalar_dense": 1, "_to_copy": 1}
    assert c.op_total == 5 and c.sync_total == 3
    with OpCounter() as o:  # alone, the op counter leaves the sync counter empty
        x.sum().item()
    assert o.total == 2 and o.sync_total == 0 and not o.syncs


def test_a_pruning_method_adds_launches_over_the_unpruned_prefill():
    from bench.efficiency import build_batch, make_inputs, prefill_ops

    rt = load("tiny:llava", seed=1)
    items = make_inputs(rt, 1, 6, 0, (56, 56))
    batch = build_batch(rt, items, torch.device("cpu"))
    res = {}
    for method, budget in (("none", None), ("fastervlm", 4)):
        eng = rt.prune(method, budget)
        res[method] = prefill_ops(rt, batch)
        assert eng.clock is None  # the engine's timings are seconds again
        rt.unprune()
    none, fv = res["none"], res["fastervlm"]
    assert none["total"] < fv["total"] and none["selection"] < fv["selection"]
    for r in (none, fv):  # the split covers the prefill; the rest is the LM head and the greedy pick
        assert r["vision"] + r["selection"] + r["llm"] == r["prefill_total"] <= r["total"]
        assert r["other"] == r["total"] - r["prefill_total"] > 0 and sum(r["by_op"].values()) == r["total"]
    assert prefill_ops(rt, batch)["total"] < none["total"]  # no engine: the stock forward, no split


def test_inference_mode_counts_the_copies_of_composite_ops():
    """Under inference_mode ``to`` / ``reshape`` / ``contiguous`` / ``flatten`` reach the counter undecomposed (their
    schemas may alias): a copy counts as under no_grad (``_to_copy`` / ``clone``), an alias stays free."""
    x = torch.randn(4, 6)
    counts = []
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            xt = x.t()
            with OpCounter() as c:
                x.to(torch.bfloat16), x.float(), x.to(torch.float32)  # one cast, two no-ops
                xt.reshape(24), x.reshape(24), xt.contiguous(), x.contiguous(), xt.flatten(), x.flatten()
        counts.append(dict(c.counts))
    assert counts[0] == counts[1] == {"_to_copy": 1, "clone": 3}
