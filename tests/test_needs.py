"""The method contract as one typed record (llava/needs.py): a method's declared attributes checked once into a
:class:`llava.needs.Needs` when the engine attaches it, the engine and the fast path reading that record; the
tower signals as :class:`TowerRead` values that name their per-token tensors and the VisionSignals fields they
fill; a wrong declaration refused at attach naming the attribute; a method written to the documented attribute
spelling runs unchanged, with no warning."""

import warnings

import pytest
import torch

from llava.check.inputs import make_batch
from llava.method import Method, get_method
from llava.models import load
from llava.needs import Needs, TowerRead, tower_fields
from llava.selection import Selection


@pytest.fixture(scope="module")
def rt():
    return load("tiny:llava", seed=0)


def test_a_tower_read_names_its_tensors_and_fields():
    assert TowerRead("received", 3).names == ("recv:3",)
    assert TowerRead("fullwidth", -1).names == ("fwa:-1", "fwk:-1")
    assert TowerRead("cls_row", 22).names == ("clsl:22",)
    assert TowerRead("received_patches", 5).names == ("rpat:5",)
    assert TowerRead("received_global", 5).names == ("glob:5",)
    assert TowerRead("group_mean", -1).names == ("gmean:-1",)
    with pytest.raises(ValueError, match="kind must be one of"):
        TowerRead("fw", 3)
    with pytest.raises(TypeError, match="layer must be an int"):
        TowerRead("received", "3")


def test_tower_fields_route_each_tensor_to_its_field_heads_first():
    recv = torch.arange(12.0).reshape(4, 3)  # per token (T=4), per head (H=3)
    fwa, fwk, glob = torch.arange(4.0), torch.ones(4, 2), torch.full((4,), 0.5)
    out = tower_fields({"recv:2": recv, "fwa:-1": fwa, "fwk:-1": fwk, "glob:7": glob, "x:in_tower_kept": fwa})
    assert set(out) == {"received_attn", "fullwidth_cls_attn", "fullwidth_keys", "cls_attn_layers",
                        "received_patches", "received_global", "group_mean"}
    assert torch.equal(out["received_attn"][2], recv.T) and out["received_attn"][2].is_contiguous()
    assert out["fullwidth_cls_attn"] == {-1: fwa} and out["fullwidth_keys"] == {-1: fwk}
    assert out["received_global"] == {7: glob}
    assert out["cls_attn_layers"] == out["received_patches"] == out["group_mean"] == {}  # asked for none


def test_the_record_of_built_in_methods(rt):
    """HiPrune's official order of means is the global-attention read; PruMerge+ reads the full-width signals of its
    q / k layer; VScan its two [CLS] rows; FastV a decoder layer before its stage; the unpruned model nothing."""
    eng = rt.prune("hiprune", 6, numerics="official")
    assert eng.needs == eng.method.needs()
    assert {r.kind for r in eng.needs.tower_reads} == {"received_global"}
    assert eng.needs.attention_logits == "model" and eng.needs.vision_stage and not eng.needs.llm_layers
    eng = rt.prune("prumerge")
    assert eng.needs.tower_reads == tuple(TowerRead("fullwidth", v) for v in eng.method.vision_fullwidth_layers)
    eng = rt.prune("vscan", 6)
    assert [r.kind for r in eng.needs.tower_reads] == ["cls_row"] * len(eng.method.vision_cls_layers)
    eng = rt.prune("fastv", 6)
    # K = 2 of 32 layers, scaled to the tiny model's 4 (at least 1)
    assert eng.needs.llm_layers == (1,) and eng.needs.llm_reads == ("prev",) and not eng.needs.vision_stage
    assert eng.llm_layers == eng.needs.llm_layers
    eng = rt.prune("none")
    assert eng.needs == Needs(method="none", capture_kind="full")
    assert not eng.needs.vision_signals


class _Declared(Method):
    """A method written to the documented attribute spelling (docs/your-method.md), a few of each kind: a vision
    stage reading the [CLS] attention, a tower layer given as a list, the question; an llm stage after layer 1."""

    name = "declared_outside"
    vision_stage = True
    needs_vision_attention = True
    vision_attention_layers = [-2]  # a list: read as the tuple (-2,)
    query_aware = True
    llm_reads = ("prev",)

    @property
    def llm_layers(self):
        return (2,)

    def select_vision(self, sig):
        assert sig.cls_attn is not None and set(sig.received_attn) == {-2}
        score = sig.cls_attn.float().mean(0)[: sig.num_stock]
        return Selection(keep=score.topk(min(self.budget, sig.num_stock)).indices.sort().values)

    def select_llm(self, stage, sig):
        n = sig.num_visual
        return Selection(keep=torch.arange(n - 1, device=sig.hidden.device))


def test_the_documented_spelling_runs_unchanged_without_a_warning(rt):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eng = rt.prune(_Declared(budget=5))
    n = eng.needs
    assert n.tower_attention and n.tower_reads == (TowerRead("received", -2),) and n.query_aware
    assert n.llm_layers == (2,) and n.llm_reads == ("prev",) and n.vision_signals
    with torch.no_grad():
        rt.model(**make_batch(rt, n=2))
    assert eng.prefills == 1
    for s in eng.stats.samples:  # 5 tokens enter the LLM, 4 from layer 2 on
        assert s.visual_per_layer == [5, 5] + [4] * (len(s.visual_per_layer) - 2)


@pytest.mark.parametrize("attr,value,error,words", [
    ("vision_cls_layers", 3, TypeError, "vision_cls_layers must be a tuple of layer indices, got the int 3 (write (3,))"),
    ("vision_attention_layers", (1, "2"), TypeError, "vision_attention_layers must hold ints"),
    ("llm_reads", "prev", ValueError, "llm_reads must be one of ('prev', 'next'), got 'p'"),
    ("position_mode", "renumber", ValueError, "position_mode must be one of ('keep', 'reindex')"),
    ("vision_attention_logits", "fp16", ValueError, "vision_attention_logits must be one of ('fp32', 'model')"),
    ("prune_past_cache", "yes", TypeError, "prune_past_cache must be True or False"),
    ("llm_text_cap", 2.5, TypeError, "llm_text_cap must be an int or None"),
])
def test_a_wrong_declaration_is_refused_at_attach_naming_the_attribute(rt, attr, value, error, words):
    if attr == "position_mode":  # an option: the constructor refuses it as before; set on an instance, attach does
        with pytest.raises(ValueError, match="position_mode must be 'keep' or 'reindex'"):
            type("Wrong", (_Declared,), {"name": "wrong_outside", attr: value})(5)
        m = type("Wrong", (_Declared,), {"name": "wrong_outside"})(5)
        m.position_mode = value
    else:
        m = type("Wrong", (_Declared,), {"name": "wrong_outside", attr: value})(5)
    with pytest.raises(error) as e:
        m.needs()
    assert f"wrong_outside: {words}" in str(e.value)
    with pytest.raises(error, match="wrong_outside: "):
        rt.prune(m)
    assert rt.engine is None or rt.engine.method is not m


def test_a_built_in_s_needs_follow_its_options():
    """Needs are the instance's: HiPrune's ours / official numerics read different tower signals."""
    ours, official = get_method("hiprune", 8), get_method("hiprune", 8, numerics="official")
    for m in (ours, official):
        m.setup(num_layers=4, num_vision_layers=4, family="llava")
    assert {r.kind for r in ours.needs().tower_reads} == {"received"}
    assert {r.kind for r in official.needs().tower_reads} == {"received_global"}


def test_the_contract_check_names_a_wrong_declaration(monkeypatch):
    """``python -m llava.check`` on a method with a wrong declaration: the first row fails at attach with the
    attribute named, the rest are not run."""
    import llava.method as method
    from llava.check import run_checks

    cls = type("BadLayers", (_Declared,), {"name": "test_needs_bad_layers", "vision_cls_layers": 3})
    monkeypatch.setitem(method._REGISTRY, cls.name, cls)
    rows = run_checks(cls.name, families=["llava"], budget=5, only=["selections", "batch"])
    assert [(r.guarantee, r.verdict) for r in rows] == [("selections", "FAIL"), ("batch", "n.a.")]
    assert rows[0].detail == ("attach: TypeError: test_needs_bad_layers: vision_cls_layers must be a tuple of layer "
                              "indices, got the int 3 (write (3,))")
    assert rows[1].detail == "not run: the method does not attach"
