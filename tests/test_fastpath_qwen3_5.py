"""Qwen3.5 on the fast path (issue 34): Qwen3-VL's tower without DeepStack before a **hybrid** decoder (Gated DeltaNet
linear-attention layers between full-attention ones). The static cache holds both kinds of layer: the linear layers'
conv and recurrent states are allocated before the first prefill and reset per prompt (``FastPath._cache``); the
language model gets a mask per layer type (the 4-D prompt mask for full attention, the 2-D padding mask for the
linear layers, which zero the bucket's left pads before their recurrence; none at a decode step). Pre-LLM methods
only (an llm stage or probe on a hybrid decoder runs eagerly, with the reason). Greedy tokens and first-step scores
== the eager engine, 0 host syncs, one prefill graph per bucket and no decode recompile."""

import pytest
import torch
from fastpath_util import (assert_one_graph_per_bucket, assert_same_as_eager, counting_fast_path, fast_and_eager,
                           generate)
from test_fastpath_qwen import batch_of


@pytest.fixture(scope="module")
def rts():
    return fast_and_eager("qwen3.5")


def test_the_cache_holds_both_layer_kinds(rts):
    """After a fast prefill the linear layers' states live in the static cache, allocated up front (the shapes of the
    tiny model's Gated DeltaNet), and a new prompt starts from zero states."""
    fast, _ = rts
    eng = fast.prune("fastervlm", 4)
    eng.fast = counting_fast_path(eng)[0]
    generate(fast, batch_of(fast, 1), tokens=2)
    (key, cache), = eng.fast._caches.items()  # (B, C, dtype, device)
    kinds = fast.model.config.text_config.layer_types
    linear = [layer for layer, t in zip(cache.layers, kinds) if t == "linear_attention"]
    assert linear and all(layer.has_previous_state[0] for layer in linear)
    mod = fast.model.model.language_model.layers[kinds.index("linear_attention")].linear_attn
    st = linear[0].recurrent_states[0]
    assert st.shape == (1, mod.num_v_heads, mod.head_k_dim, mod.head_v_dim) and st.dtype == torch.float32
    assert st.abs().sum() > 0  # the prompt's recurrence wrote it
    assert eng.fast._cache(*key[:3], st.device) is cache  # the same objects, reset for a new prompt
    assert not linear[0].has_previous_state[0] and linear[0].recurrent_states[0].abs().sum() == 0


@pytest.mark.parametrize("method,budget", [("none", None), ("fastervlm", 4), ("visionzip", 12), ("divprune", 6),
                                           ("otprune", 6), ("consensusdrop", 6)])
def test_tokens_equal_the_eager_engine_without_a_host_sync(rts, method, budget):
    """Uncompiled (the code the compiled test proves capturable): batch 1 and a left-padded batch of three grids."""
    fast, eager = rts
    eng = fast.prune(method, budget)
    eager.prune(method, budget)
    fp, syncs = counting_fast_path(eng)
    eng.fast = fp
    for batch in (batch_of(fast, 1), batch_of(fast, 3)):
        assert_same_as_eager(fast, eager, eng, batch, tokens=6)
    assert syncs == [0, 0]


def test_compiled_one_prefill_graph_per_bucket_and_no_decode_recompile(rts):
    fast, eager = rts
    torch._dynamo.reset()
    eng = fast.prune("fastervlm", 4)
    eager.prune("fastervlm", 4)
    asks = ["is it red?", "what is next to the square on the left?", "how many circles?", "describe the picture",
            "is there a small blue star near the top of the picture?"]
    candidates = [fast.processor([q], [first_image(fast)]) for q in asks]
    assert_one_graph_per_bucket(fast, eager, eng, batch_of(fast, 1), candidates)


def first_image(rt):
    from conftest import rand_image
    from test_fastpath_qwen import SIZES

    return rand_image(0, *SIZES[0])
