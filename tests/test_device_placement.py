"""Device placement without a GPU (issue 19): every registered method, at every stage, on all three
tiny families with a batch of 3, runs its ``select_vision`` / ``select_llm`` under
:class:`llava.check.placement.DevicePlacementCheck`, which fails on any op that would mix a host tensor with
a device tensor on CUDA (e.g. ``torch.arange(n) < device_tensor``) and on a Selection built on the
host. New methods are covered automatically (``available_methods()``); give them a budget that
prunes on the tiny models in ``BUDGETS`` if the default does not.
"""

import pytest
import torch
from conftest import ALL_FAMILIES, make_batch

from llava.check.guarantees import whole_prefill_violations
from llava.check.placement import DeviceMixError, DevicePlacementCheck, check_method, host_tag
from llava.method import BudgetError, Method, available_methods, get_method, method_supports
from llava.selection import Selection

#: budget per family (tiny models: 16 tokens per image / crop, 17 per frame) that prunes
BUDGETS = {
    "attnmix": {"llava": 8, "llava_next": 12, "video_llava": 32, "qwen2_5_vl": 2, "llava_onevision": 12},
    "consensusdrop": {"llava": 8, "llava_next": 8, "video_llava": 6, "qwen2_5_vl": 2, "llava_onevision": 8},
    "dart": {"llava": 8, "llava_next": 16, "video_llava": 64, "qwen2_5_vl": 4, "llava_onevision": 16},
    "fastv": {"llava": 8, "llava_next": 20, "video_llava": 64, "qwen2_5_vl": 4, "llava_onevision": 20},
    "priortr": {"llava": 8, "llava_next": 20, "video_llava": 64, "qwen2_5_vl": 4, "llava_onevision": 20},
    "clse": 192,
    "v2drop": None,
    "vlmpruner": {"llava": 8, "llava_next": 20, "video_llava": 64, "qwen2_5_vl": 4, "llava_onevision": 20},
    "ivcprune": {"llava": 8, "llava_next": 20, "video_llava": 64, "qwen2_5_vl": 4, "llava_onevision": 20},
    "visiondrop": {"llava": 8, "llava_next": 8, "video_llava": 4, "qwen2_5_vl": 2, "llava_onevision": 8},
    "visionzip": {"llava": 8, "llava_next": 8, "video_llava": 6, "qwen2_5_vl": 2, "llava_onevision": 8},
    "random": 3,
    "pdrop": None,  # the official geometric schedule
    "transprune": None,  # the official lists: 16 -> 14 / 10 / 2
    "sparsevlm": 192,
    "prumerge": None,  # adaptive: the count depends on the image
    "pixelprune": None,  # adaptive: the count depends on the pixels (a pre-tower stage)
    "vscan": 6,  # 4 would leave its local scan empty on the tiny 2x2 windows
    "trio": 192,  # a layer average of 576 on 32 layers, refitted to the tiny 4 layers: 16 -> 16/2/1/0
    "none": None,
    "novisual": None,
}
for _b in BUDGETS.values():  # tiny Qwen3-VL: Qwen2.5-VL's token geometry; tiny InternVL: NeXT's (16 per tile, tiles)
    if isinstance(_b, dict):
        _b.setdefault("qwen3_vl", _b["qwen2_5_vl"])
        _b.setdefault("internvl", _b["llava_next"])
        _b.setdefault("qwen3_5", _b["qwen2_5_vl"])  # tiny Qwen3.5: Qwen2.5-VL's token geometry too
        _b.setdefault("qwen2_vl", _b["qwen2_5_vl"])  # tiny Qwen2-VL: Qwen2.5-VL's token geometry too
DEFAULT_BUDGET = 4  # per image / crop / frame: prunes the tiny models
#: option sets beyond the defaults, to reach each method's other code paths
VARIANTS = {
    "consensusdrop": [{"fusion": "adaptive", "probe_layer": 0, "include_cls": True},
                      {"probe_mode": "embed_cos", "fusion": "cross_only", "order": "spatial",
                       "merge_space": "projected", "merge_rule": "mean"},
                      {"prune_point": "after_probe", "merge": "none", "next_order": "grid_raster",
                       "next_budget_mode": "total", "video_budget_mode": "total"},
                      {"preset": "probe"}, {"select": "dpp", "relevance": "calibrated"},
                      {"select": "nms", "fusion": "product", "peaks": 0.5, "peaks_source": "fused", "fill": "coverage"}],
    "visiondrop": [{"merge": False, "next_order": "unit", "cls_token": False}],
    "visionzip": [{"cls_slot": "patch", "next_order": "spatial"}],
    "sparsevlm": [{"version": "v2"}],
    "priortr": [{"numerics": "official", "queries": "last", "heads": "max", "caches": "pruned"}],
    "clse": [{"numerics": "official", "score": "clse", "caches": "pruned"}],
    "v2drop": [{"numerics": "official", "rule": "qwen2vl"}],
    "vlmpruner": [{"numerics": "official", "rounding": "floor"}],
    "ivcprune": [{"numerics": "official", "rule": "qwen", "caches": "pruned", "rows": "question"}],
    "attnmix": [{"allow_duplicates": True, "text_queries": "question"}],
    "divprune": [{"scope": "unit"}],
    "otprune": [{"scope": "unit"}, {"numerics": "official", "order": "official"}],
    "holov": [{"overflow": "redistribute", "order": "ascending", "scope": "sample", "cls_token": "keep"},
              {"numerics": "official"}],
    "fastervlm": [{"cls_token": "keep"}],
    "prumerge": [{"variant": "base"}, {"numerics": "official"}],
    "vscan": [{"remainder": "global"}],
    "flowcut": [{"next_half": True, "next_llm_stage": True}],  # LLaVA-NeXT's LLM stage (q / k / v of layer 1)
    # reference modes on the signals only they read: the tower in the official arithmetic (PruMerge's full-width
    # row, VisionTrim's received_patches, HiPrune's received_global), the model-dtype LLM rows (PyramidDrop), the
    # kept tokens merged too (ApET's llm stage)
    "visiontrim": [{"numerics": "official"}],
    "hiprune": [{"numerics": "official"}],
    "pdrop": [{"numerics": "official"}],
    "transprune": [{"numerics": "official"}],
    "apet": [{"numerics": "official"}],
}


def method_cases():
    cases = []
    for name in available_methods():
        if name.startswith("test_"):  # tests/example_methods.py: engine test doubles
            continue
        for opts in [{}] + VARIANTS.get(name, []):
            cases.append(pytest.param(name, opts, id=name + "".join(f"-{k}={v}" for k, v in opts.items())))
    return cases


def budget_for(name, family):
    if not method_supports(name, family):  # the refusal is tested in the method's own test file
        pytest.skip(f"{name} does not support {family}")
    b = BUDGETS.get(name, DEFAULT_BUDGET)
    return b[family] if isinstance(b, dict) else b


def build(name, family, opts):
    return get_method(name, budget_for(name, family), **opts)


@pytest.mark.parametrize("fam", ALL_FAMILIES)
@pytest.mark.parametrize("name,opts", method_cases())
def test_method_keeps_every_tensor_on_the_signals_device(runtimes, fam, name, opts):
    rt = runtimes[fam]
    if name == "sparsevlm" and opts.get("version") == "v2" and rt.family in ("qwen2_5_vl", "qwen3_vl", "qwen3_5",
                                                                                 "qwen2_vl"):
        pytest.skip("sparsevlm v2's RoPE gravity is 1-D only: refused on M-RoPE (tests/test_new_families.py)")
    method = build(name, rt.family, opts)
    chk = check_method(method)
    inputs = make_batch(rt)
    eng = rt.prune(method)
    try:
        with torch.no_grad():
            rt.model(**inputs)
    except BudgetError as e:  # an option this family cannot serve (its refusal is tested in the method's tests)
        pytest.skip(str(e))
    finally:
        rt.unprune()
    b = inputs["input_ids"].shape[0]
    assert chk.calls["vision"] == (b if method.vision_stage else 0)
    assert chk.calls["llm"] >= (1 if method.llm_layers else 0)
    if method.vision_stage or method.llm_layers:  # the pruning path ran, not only a budget >= tokens no-op
        assert any(min(s.visual_per_layer) < s.visual_candidates for s in eng.stats.samples), \
            f"{name} pruned nothing on tiny {fam}: give it a smaller budget in BUDGETS"


# ------------------------------------------------------------------------------------------------
# The checker itself
# ------------------------------------------------------------------------------------------------


class _MixesHostIndex(Method):
    """A deliberately bad method: ``torch.arange(n) < x`` style mixing (ConsensusDrop's old bug)."""

    name = "bad_host_mix"
    vision_stage = True

    def select_vision(self, sig):
        n = sig.num_tokens
        first_unit = (torch.arange(n) < 8) & (sig.unit == 0)  # host arange vs device unit ids
        return Selection(keep=torch.nonzero(first_unit).flatten())


class _ReturnsHostSelection(Method):
    """Mixes nothing, but hands the engine a Selection built on the host."""

    name = "bad_host_selection"
    vision_stage = True

    def select_vision(self, sig):
        return Selection(keep=torch.arange(min(4, sig.num_tokens)))


class _DeviceClean(Method):
    """The same selections done right: every tensor takes its device from the signals."""

    name = "good_device"
    vision_stage = True

    def select_vision(self, sig):
        n = sig.num_tokens
        first_unit = (torch.arange(n, device=sig.unit.device) < 8) & (sig.unit == 0)
        keep = torch.nonzero(first_unit).flatten()
        host = torch.randperm(keep.numel(), generator=torch.Generator().manual_seed(0))  # host RNG, then moved
        return Selection(keep=keep[host.to(keep.device)].sort().values)


def _run(rt, method):
    rt.prune(method)
    try:
        with torch.no_grad():
            rt.model(**make_batch(rt))
    finally:
        rt.unprune()


def test_a_toy_method_that_mixes_host_and_device_is_caught(runtimes):
    rt = runtimes["llava"]
    m = _MixesHostIndex()
    check_method(m)
    with pytest.raises(DeviceMixError, match=r"Tensor\.__and__ at tests/test_device_placement\.py:\d+ "
                                             r"\(in select_vision\): host tensor \(16,\) torch\.bool "
                                             r"\(torch\.arange without device="):
        _run(rt, m)


def test_a_selection_built_on_the_host_is_caught(runtimes):
    m = _ReturnsHostSelection()
    check_method(m)
    with pytest.raises(DeviceMixError, match=r"returns Selection\.keep created on the host \(torch\.arange"):
        _run(runtimes["llava"], m)


def test_the_same_method_done_right_passes(runtimes):
    m = _DeviceClean()
    chk = check_method(m)
    _run(runtimes["llava"], m)
    assert chk.calls["vision"] == 3


def test_checker_rules():
    x = torch.randn(6)  # made outside the check: a device tensor
    with DevicePlacementCheck():
        assert x.device.type not in ("cpu", "cuda") and not x.is_cpu  # the fake accelerator
        a = torch.arange(6)
        assert host_tag(a)[0] == "born" and a.device == torch.device("cpu") and a.is_cpu
        assert host_tag(torch.zeros(2, device=x.device)) is None
        assert host_tag(x.new_zeros(3)) is None and host_tag(torch.zeros_like(a)) is not None
        moved = a.to(x.device)
        assert host_tag(moved) is None and host_tag(a) is not None  # the original stays on the host
        assert host_tag(x.cpu())[0] == "host" and host_tag(x) is None  # .cpu(): an explicit host copy
        assert host_tag(torch.topk(x, 2).indices) is None
        assert host_tag(torch.as_tensor(x, dtype=torch.long)) is None
        assert host_tag(torch.tensor([1, 2]))[0] == "born"
        assert host_tag(a + 1)[0] == "born"
        y = x * torch.tensor(2.0)  # a 0-d host tensor is a scalar to CUDA: allowed
        assert host_tag(y) is None
        x[:2].copy_(a[:2])  # an explicit transfer
        for bad in (lambda: a < x, lambda: x[a], lambda: torch.cat([a.float(), x]),
                    lambda: torch.isin(a, x.long()), lambda: a.__setitem__(slice(0, 2), x[:2].long()),
                    lambda: x.cpu() + x, lambda: torch.zeros(6, device="cpu") + x):
            with pytest.raises(DeviceMixError, match="mixed with device tensor"):
                bad()
    chk = DevicePlacementCheck(collect=True)
    with chk:
        for _ in range(2):
            _ = torch.arange(6) + x
    assert len(chk.violations) == 1 and "Tensor.add" in chk.violations[0]


def test_the_fake_accelerator_exists_only_inside_a_check():
    with DevicePlacementCheck():
        assert torch.accelerator.is_available()
    assert not torch.accelerator.is_available() and torch.randn(2).device.type == "cpu"
    torch.manual_seed(0)  # no warning or error from the registered device module


# ------------------------------------------------------------------------------------------------
# The whole prefill: engine + method, around generate()
# ------------------------------------------------------------------------------------------------

WHOLE = sorted({p.values[0] for p in method_cases()})  # every registered method, default options


@pytest.mark.parametrize("fam", ALL_FAMILIES)
@pytest.mark.parametrize("name", WHOLE)
def test_whole_prefill_keeps_every_tensor_on_the_device(runtimes, fam, name):
    """The engine and the method together, around generate() (prefill and two decode steps)."""
    rt = runtimes[fam]
    violations = whole_prefill_violations(rt, build(name, rt.family, {}))
    assert not violations, "\n".join(violations)
