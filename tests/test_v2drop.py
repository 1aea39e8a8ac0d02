"""V2Drop (baselines/v2drop.py): the variation score and the selection on hand-built hidden states, the schedule
arithmetic (the official rules, the reported per-budget ratios, the fitted budgets), the engine's new signal
``LLMSignals.prev_hidden`` (the input of layer K-1) against the model's own layer inputs on two families, and the
selection on the tiny LLaVA against the stock eager model's hidden states."""

import pytest
import torch
from conftest import make_batch, slice_batch

from baselines.v2drop import V2Drop, equivalent_tokens, fit_ratios, stage_counts, v2drop_scores, v2drop_select
from llava.method import get_method
from llava.models import load
from llava.signals import LLMSignals


def _sig(hidden, prev, visual, n_entry=None):
    S = hidden.shape[0]
    return LLMSignals(layer=1, hidden=hidden, position_ids=torch.arange(S), visual=visual, origin=visual,
                      text_after=torch.tensor([S - 1]), question=torch.tensor([S - 1]), prev_hidden=prev,
                      num_visual_entry=int(visual.numel()) if n_entry is None else n_entry)


def test_scores_are_the_norm_of_the_residual_update():
    # 4 tokens, D = 2: updates (3, 4), (0, 0), (5, 12), (-6, 8) -> norms 5, 0, 13, 10, whatever the states were
    prev = torch.tensor([[1.0, 1.0], [2.0, -1.0], [0.0, 0.0], [7.0, -3.0]])
    upd = torch.tensor([[3.0, 4.0], [0.0, 0.0], [5.0, 12.0], [-6.0, 8.0]])
    s = v2drop_scores(prev + upd, prev)
    assert s.dtype == torch.float32 and torch.allclose(s, torch.tensor([5.0, 0.0, 13.0, 10.0]))
    # the reference mode stays in the rows' dtype (the official torch.norm in fp16)
    s16 = v2drop_scores((prev + upd).half(), prev.half(), "official")
    assert s16.dtype == torch.float16 and torch.equal(s16.float(), torch.tensor([5.0, 0.0, 13.0, 10.0]))
    # the largest two, ascending: tokens 2 (13) and 3 (10); ties to the lower index in ours
    assert v2drop_select(s, 2).tolist() == [2, 3]
    assert v2drop_select(torch.tensor([1.0, 3.0, 3.0, 3.0]), 2).tolist() == [1, 2]
    with pytest.raises(ValueError, match="v2drop"):
        v2drop_scores(prev, prev, "fp16")


def test_a_stage_keeps_the_tokens_the_previous_layer_changed_most():
    # 7 rows: text 0, visual 1..5, text 6. Visual updates of norms 1, 9, 4, 0.5, 7 (the text rows change most but
    # are never candidates); the official 0.5 keeps int(5 * .5) = 2 of 5: visual 1 (9) and 4 (7) -> rows 2 and 5
    D = 3
    prev = torch.randn(7, D, generator=torch.Generator().manual_seed(0))
    norms = torch.tensor([100.0, 1.0, 9.0, 4.0, 0.5, 7.0, 100.0])
    direction = torch.tensor([2.0, -1.0, 2.0]) / 3  # unit length
    hidden = prev + norms[:, None] * direction
    m = V2Drop(keep_ratios=(0.5, 0.5, 0.0))
    m.setup(num_layers=4, num_vision_layers=3, family="llava")
    visual = torch.arange(1, 6)
    assert m.select_llm(0, _sig(hidden, prev, visual)).keep.tolist() == [1, 4]
    # the previous layer's *input* is what counts: the same hidden states against another previous input rank anew
    # (visual updates 1, 2, 1, 6, 1: visual 1 and 3)
    prev2 = hidden - torch.tensor([5.0, 1.0, 2.0, 1.0, 6.0, 1.0, 1.0])[:, None] * direction
    assert m.select_llm(0, _sig(hidden, prev2, visual)).keep.tolist() == [1, 3]
    # the last stage's keep ratio 0 still leaves one token (official max(1, int(n * 0))): the largest update
    assert m.select_llm(2, _sig(hidden, prev, visual)).keep.tolist() == [1]
    # the reference mode picks the same here (no ties)
    o = V2Drop(keep_ratios=(0.5, 0.5, 0.0), numerics="official")
    o.setup(num_layers=4, num_vision_layers=3, family="llava")
    assert o.select_llm(0, _sig(hidden, prev, visual)).keep.tolist() == [1, 4]


def test_official_schedules_and_their_equivalent_tokens():
    m = get_method("v2drop")
    m.setup(num_layers=32, num_vision_layers=24, family="llava")
    assert m.llm_layers == (3, 17, 22) and m.stage_counts(576) == (288, 144, 1)
    counts = m.layer_counts(576)
    assert counts[2:4] == [576, 288] and counts[16:18] == [288, 144] and counts[21:23] == [144, 1]
    # (3 * 576 + 14 * 288 + 5 * 144 + 10 * 1) / 32 = 202.8125
    assert sum(counts) / 32 == 202.8125
    # the Qwen2-VL rule: 3 / 16 / 22 of 28 layers, keep .25 / .05 / 0 of the current count: 1000 -> 250 -> 12 -> 1
    q = get_method("v2drop")
    q.setup(num_layers=28, num_vision_layers=32, family="qwen2_5_vl")
    assert q.rule_name == "qwen2vl" and q.llm_layers == (3, 16, 22) and q.stage_counts(1000) == (250, 12, 1)
    q.setup(num_layers=36, num_vision_layers=27, family="qwen3_vl")  # 3, 16, 22 of 28 scaled to 36 layers
    assert q.llm_layers == (4, 21, 28)
    lq = get_method("v2drop", rule="llava")
    lq.setup(num_layers=28, num_vision_layers=32, family="qwen2_5_vl")
    assert lq.llm_layers == (3, 15, 19) and lq.stage_counts(1000) == (500, 250, 1)
    # the tiny 4-layer LLM: 1 / 2 / 3, 16 -> 8 -> 4 -> 1
    m.setup(num_layers=4, num_vision_layers=3, family="llava")
    assert m.llm_layers == (1, 2, 3) and m.layer_counts(16) == [16, 8, 4, 1]
    assert stage_counts(0, (0.5, 0.5, 0.0)) == (0, 0, 0) and stage_counts(3, (0.5, 0.5, 0.0)) == (1, 1, 1)


def test_reported_per_budget_ratios_are_fractions_of_the_remaining_tokens():
    # prune 50/70/100 %, 72/75/100 %, 95/95/100 % at 3 / 17 / 22: int(576 * .5) = 288, int(288 * .3) = 86, 1;
    # int(576 * .28) = 161, int(161 * .25) = 40, 1; int(576 * .05) = 28, int(28 * .05) = 1, 1
    want = {192: ((288, 86, 1), 193.75), 128: ((161, 40, 1), 131.0), 64: ((28, 1, 1), 66.71875)}
    for b, (counts, eq) in want.items():
        m = get_method("v2drop", b, schedule="reported")
        m.setup(num_layers=32, num_vision_layers=24, family="llava")
        assert m.stage_counts(576) == counts
        assert equivalent_tokens(576, m.llm_layers, counts, 32) == eq  # (3*576 + 14 c1 + 5 c2 + 10 c3) / 32


def test_a_budget_fits_one_factor_of_the_official_ratios():
    m = get_method("v2drop", 192)
    m.setup(num_layers=32, num_vision_layers=24, family="llava")
    assert m.schedule_name == "fit"
    r = m.ratios(576)
    assert r[0] == r[1] and r[2] == 0.0  # the official shape: (.5 a, .5 a, 0)
    c = m.stage_counts(576)
    eq = equivalent_tokens(576, m.llm_layers, c, 32)
    assert c == (269, 126, 1) and eq == (3 * 576 + 14 * 269 + 5 * 126 + 10) / 32 == 191.6875
    # the factor is the largest within the budget: one more token at the first stage overshoots 192
    assert equivalent_tokens(576, m.llm_layers, (270, 126, 1), 32) > 192
    assert stage_counts(576, (r[0] * 1.001, r[1] * 1.001, 0.0)) != c
    # 202.8125 (the official schedule's average) gives back the official ratios
    assert fit_ratios(203, 576, (3, 17, 22), (0.5, 0.5, 0.0), 32)[0] >= 0.5
    assert stage_counts(576, fit_ratios(203, 576, (3, 17, 22), (0.5, 0.5, 0.0), 32)) == (288, 144, 1)
    # below the least average (every stage 1: (3 * 576 + 29) / 32 = 54.9) a = 0, with a warning; above the largest
    # (576 until layer 22, then 1: 396.3) every ratio clips to 1
    low = get_method("v2drop", 40)
    low.setup(num_layers=32, num_vision_layers=24, family="llava")
    assert low.stage_counts(576) == (1, 1, 1)
    high = get_method("v2drop", 500)
    high.setup(num_layers=32, num_vision_layers=24, family="llava")
    assert high.stage_counts(576) == (576, 576, 1)
    # the tiny LLM: budget 8 -> 16 / 9 / 5 / 1 = 7.75 (16 / 10 / 5 / 1 would be 8.0 too: the largest factor wins)
    t = get_method("v2drop", 8)
    t.setup(num_layers=4, num_vision_layers=3, family="llava")
    assert sum(t.layer_counts(16)) / 4 <= 8


def test_options_and_refusals():
    for bad, match in [({"schedule": "paper"}, "schedule"), ({"rule": "qwen"}, "rule"),
                       ({"keep_ratios": (0.5, 1.5, 0.0)}, "keep_ratios"), ({"layers": (5, 3, 8)}, "layers"),
                       ({"numerics": "fp16"}, "numerics"), ({"schedule": "fit"}, "needs a budget"),
                       ({"keep_ratios": (0.5, 0.5)}, "keep_ratios")]:
        with pytest.raises(ValueError, match=match):
            V2Drop(**bad)
    with pytest.raises(ValueError, match="not both"):
        V2Drop(128, keep_ratios=(0.5, 0.5, 0.0))
    with pytest.raises(ValueError, match="no budget"):
        V2Drop(128, schedule="official")
    with pytest.raises(ValueError, match="192"):
        V2Drop(100, schedule="reported")
    assert not V2Drop.supports("qwen3_5") and all(V2Drop.supports(f) for f in (
        "llava", "llava_next", "video_llava", "llava_onevision", "internvl", "qwen2_5_vl", "qwen3_vl"))
    assert V2Drop().capture_refusal() is None and V2Drop(numerics="official").capture_refusal() is not None


# ------------------------------------------------------------------ the engine's prev_hidden, on the tiny models
class _Spy:
    """Records every stage's LLMSignals (hidden, prev_hidden, visual) and each decoder layer's input."""

    def __init__(self, eng, lm):
        self.sigs, self.inputs, self.hooks = [], {}, []
        inner = eng.method.select_llm

        def spy(stage, sig):
            self.sigs.append((stage, sig.hidden.clone(), sig.prev_hidden.clone(), sig.visual.clone()))
            return inner(stage, sig)

        eng.method.select_llm = spy
        def record(i, args, kwargs):
            self.inputs.setdefault(i, (args[0] if args else kwargs["hidden_states"]).clone())

        for i, layer in enumerate(lm.layers):
            self.hooks.append(layer.register_forward_pre_hook(
                lambda mod, args, kwargs, i=i: record(i, args, kwargs), with_kwargs=True))

    def close(self):
        for h in self.hooks:
            h.remove()


@pytest.mark.parametrize("rt", ["llava", "qwen2.5-vl"], indirect=True)
def test_prev_hidden_is_the_input_of_layer_k_minus_1(rt):
    """At every stage (before layers 1 / 2 / 3 of the tiny LLM) the engine's ``prev_hidden`` is exactly what decoder
    layer K-1 received for those rows, and ``hidden`` what layer K receives before the stage prunes."""
    one = slice_batch(make_batch(rt), 0, rt)
    eng = rt.prune("v2drop", None)
    spy = _Spy(eng, rt.model.model.language_model)
    try:
        with torch.no_grad():
            rt.model(**one)
    finally:
        spy.close()
    assert [s for s, *_ in spy.sigs] == [0, 1, 2]
    for stage, hidden, prev, visual in spy.sigs:
        K = eng.method.llm_layers[stage]
        assert torch.equal(prev, spy.inputs[K - 1][0]) and not torch.equal(prev, hidden)
        # the stage's hidden states are layer K-1's output: layer K's input before this stage gathered it
        kept = eng.selections[(stage, 0)].keep
        rows = torch.cat([torch.arange(visual[0]), visual[kept], torch.arange(visual[-1] + 1, hidden.shape[0])])
        assert torch.equal(hidden[rows], spy.inputs[K][0])


@pytest.fixture(scope="module")
def eager():
    return load("tiny:llava", seed=1, attn_implementation="eager")


@pytest.mark.parametrize("rt", ["llava"], indirect=True)
def test_first_stage_against_the_eager_model(rt, eager):
    """Stage 1 before layer K = 1 (3 of 32 -> 1 of 4): the 8 of 16 visual tokens with the largest change between
    hidden_states[0] and hidden_states[1] of the unpruned stock model."""
    one = slice_batch(make_batch(rt), 1, rt)
    with torch.no_grad():
        out = eager.model(**one, output_hidden_states=True)
    vis = torch.nonzero(one["input_ids"][0] == rt.model.config.image_token_id).flatten()
    upd = (out.hidden_states[1][0, vis] - out.hidden_states[0][0, vis]).double().norm(dim=-1)
    expected = torch.topk(upd, 8).indices.sort().values
    eng = rt.prune("v2drop", None)
    with torch.no_grad():
        rt.model(**one)
    assert torch.equal(eng.selections[(0, 0)].keep, expected)
    assert eng.stats.samples[0].visual_per_layer == [16, 8, 4, 1]
