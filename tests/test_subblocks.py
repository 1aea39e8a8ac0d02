"""The decoder layers' sub-block states (llava/subblocks.py, ``Method.llm_subblock_layers`` ->
``LLMSignals.subblocks``): the recorded attention / feed-forward inputs and outputs rebuild the stock model's own
hidden states on every family with attention layers; the hooks come off; a layer without attention is refused."""

import pytest
import torch
from conftest import make_batch, slice_batch

from llava.subblocks import SubBlockRecorder

FAMS = ["llava", "qwen2.5-vl", "llava-onevision", "internvl"]


def ours(layers) -> int:
    """Our recorder's hooks on the layers' attention / feed-forward sub-modules (transformers installs its own
    output-capturing hooks lazily: not counted)."""
    return sum("SubBlockRecorder" in h.__qualname__ for ly in layers for m in (ly.self_attn, ly.mlp)
               for d in (m._forward_hooks, m._forward_pre_hooks) for h in d.values())


@pytest.mark.parametrize("rt", FAMS, indirect=True)
def test_recorded_states_rebuild_the_stock_layers(rt):
    eng = rt.prune("none")
    lm = eng.adapter.lm
    rt.unprune()
    one = slice_batch(make_batch(rt), 0, rt)
    layer = lm.layers[1]
    rec = SubBlockRecorder(lm.layers, [1])
    assert ours(lm.layers) == 4
    try:
        with torch.no_grad():
            out = rt.model(**one, output_hidden_states=True)
        st = rec.take()[1]
    finally:
        rec.remove()
    x, y = out.hidden_states[1], out.hidden_states[2]  # the input and output of decoder layer 1
    with torch.no_grad():
        assert torch.allclose(st.attn_in, layer.input_layernorm(x), atol=1e-6)
        mid = x + st.attn_out  # the residual after the attention sub-block
        assert torch.allclose(st.mlp_in, layer.post_attention_layernorm(mid), atol=1e-6)
        assert torch.allclose(mid + st.mlp_out, y, atol=1e-5)
        assert torch.allclose(st.mlp_out, layer.mlp(st.mlp_in), atol=1e-6)
    assert st.attn_in.shape == x.shape and st.attn_out.dtype == x.dtype
    assert ours(lm.layers) == 0  # the hooks came off
    assert rec.take() == {}


@pytest.mark.parametrize("rt", ["qwen3.5"], indirect=True)
def test_a_linear_attention_layer_is_refused(rt):
    eng = rt.prune("none")
    lm = eng.adapter.lm
    linear = sorted(eng.adapter.linear_layers)[0]
    with pytest.raises(ValueError, match="no attention sub-module"):
        SubBlockRecorder(lm.layers, [linear])


@pytest.mark.parametrize("rt", ["llava"], indirect=True)
def test_the_engine_hands_each_stage_its_new_layers_and_removes_the_hooks(rt):
    """transprune on the tiny LLaVA: hooks on layers 0..2 during the prefill only; a decode step records nothing."""
    eng = rt.prune("transprune")
    lm = eng.adapter.lm
    calls = []  # per call of a layer's attention: (layer, our recorder's hooks on that layer)
    handles = [ly.self_attn.register_forward_pre_hook(lambda m, a, i=i: calls.append((i, ours([lm.layers[i]]))))
               for i, ly in enumerate(lm.layers)]
    seen = []
    inner = eng.method.select_llm

    def spy(stage, sig):
        seen.append((stage, sorted(sig.subblocks), [tuple(v.attn_in.shape) for v in sig.subblocks.values()],
                     tuple(sig.hidden.shape)))
        return inner(stage, sig)

    eng.method.select_llm = spy
    batch = make_batch(rt)
    try:
        with torch.no_grad():
            rt.model.generate(**batch, max_new_tokens=3, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    assert [(s, ls) for s, ls, _, _ in seen] == [(0, [0])] * 3 + [(1, [1])] * 3 + [(2, [2])] * 3
    # the rows are the sample's real rows at that layer (its hidden states' rows: the prompt, then less what each
    # stage dropped), in the model's width
    assert all(shapes == [hid] for _, _, shapes, hid in seen)
    assert len({hid[0] for s, _, _, hid in seen if s == 0}) == 2  # prompts of 53 / 58 / 58 rows
    assert ours(lm.layers) == 0
    # prefill: layers 0..2 hooked (4 hooks each), layer 3 not; the 2 decode steps: nothing hooked
    assert calls[:4] == [(0, 4), (1, 4), (2, 4), (3, 0)] and all(n == 0 for _, n in calls[4:]) and len(calls) == 12
