"""Compiled decoding on the eager engine (issue 34): generate(cache_implementation="static") with
transformers' auto-compiled decode step must compile the step ONCE, at the first decode token, and give
the eager run's greedy tokens.

Before the fix the engine's decode read and bumped a Python int per step (``_State.gen_len``, a guard:
``engine._state.gen_len == k``) and received generate's 2-D mask one column wider per step (a shape
guard), so the step recompiled at every token, hit dynamo's recompile limit (8) and ran the rest
eagerly while the tokens still matched. Here recompilation raises (``error_on_recompile``) and a
counting backend (no code generation: dynamo's guards and tracing only, which is what decides
recompiles) counts the graphs: exactly one over 16 decode steps, none on a second generate."""

import pytest
import torch
from conftest import QUESTIONS, rand_image
from transformers import CompileConfig

from llava.models import load

#: pre-LLM no-op, a pre-LLM pruning stage, an in-LLM stage (decode over two segments of layers)
CASES = [("none", None), ("visionzip", 4), ("fastv", 8)]
DECODE_STEPS = 16

_GRAPHS: list[int] = []


def _counting_backend(gm, example_inputs):
    """Compiles nothing: counts the graph and runs it as traced (CompileConfig deep-copies its backend,
    so the count lives in a module-level list; functions are copied by reference)."""
    _GRAPHS.append(len(gm.graph.nodes))
    return gm.forward


@pytest.fixture(scope="module")
def rt():
    r = load("tiny:llava", seed=1)
    yield r
    r.unprune()


def _inputs(rt, n):
    return rt.processor([QUESTIONS[i % 3] for i in range(n)], [rand_image(i, 40 + 10 * (i % 3), 56) for i in range(n)])


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("method,budget", CASES)
def test_static_cache_decode_compiles_once(rt, method, budget, batch):
    eng = rt.prune(method, budget)
    inputs = _inputs(rt, batch)
    gen = dict(max_new_tokens=DECODE_STEPS + 1, min_new_tokens=DECODE_STEPS + 1, do_sample=False,
               cache_implementation="static")
    cc = CompileConfig(fullgraph=True, dynamic=False, backend=_counting_backend, mode=None)
    cc._compile_all_devices = True  # transformers compiles the decode step on CUDA only by default
    torch._dynamo.reset()  # the engine's forward is one code object for every engine: start afresh
    with torch.no_grad():
        eager = rt.model.generate(**inputs, **gen, disable_compile=True)
        _GRAPHS.clear()
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = rt.model.generate(**inputs, **gen, compile_config=cc)
            first = len(_GRAPHS)
            again = rt.model.generate(**inputs, **gen, compile_config=cc)
    assert eng.prefills == 3 and eng.stats.path == "eager"
    assert compiled.shape[1] == inputs["input_ids"].shape[1] + DECODE_STEPS + 1
    assert first == 1, f"{first} graphs over {DECODE_STEPS} decode steps (one decode graph expected)"
    assert len(_GRAPHS) == 1, "the second generate compiled again"
    assert torch.equal(compiled, eager) and torch.equal(again, eager)


def test_static_cache_decode_masks_have_the_cache_width(rt):
    """With a static cache generate hands every decode step the engine's own masks: (segments, B,
    max_cache_len) in LLM space, one shape for the whole decode (FastV: two segments of layers, each
    with its own prompt part, then generate's generated columns, then zeros); with a dynamic cache
    generate's own 2-D mask, one column wider per step."""
    eng = rt.prune("fastv", 8)
    inputs = _inputs(rt, 3)
    seen = {"static": [], "dynamic": []}
    orig = eng.decoder.decode
    kind = []

    def spy(st, embeds, attention_mask, position_ids, cache, *a, **k):
        slots = max(layer.get_max_length() for layer in cache.layers)
        seen[kind[-1]].append((attention_mask.clone(), slots))
        return orig(st, embeds, attention_mask, position_ids, cache, *a, **k)

    eng.decoder.decode = spy
    try:
        with torch.no_grad():
            for k, extra in (("static", {"cache_implementation": "static", "disable_compile": True}), ("dynamic", {})):
                kind.append(k)
                rt.model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, **extra)
    finally:
        del eng.decoder.decode
    L = inputs["input_ids"].shape[1]
    assert [tuple(m.shape) for m, _ in seen["dynamic"]] == [(3, L + 1 + i) for i in range(5)]
    assert len(seen["static"]) == 5
    lens = eng.stats.seq_len_per_layer
    n0, n1 = lens[0], lens[eng.llm_layers[0]]  # each segment's prompt part of its cache
    assert n0 == L and n1 < n0
    for step, (mask, slots) in enumerate(seen["static"]):
        assert mask.shape == (2, 3, slots)
        assert torch.equal(mask[0, :, :L], inputs["attention_mask"].to(mask.dtype))
        assert (mask[1, :, :n1].sum(1) < inputs["attention_mask"].sum(1)).all()  # FastV dropped visual tokens
        for s, n in ((0, n0), (1, n1)):
            assert mask[s, :, n:n + step + 1].all() and not mask[s, :, n + step + 1:].any()


def test_one_decode_graph_across_prompt_lengths(rt):
    """With a fixed cache width (``max_cache_len``) the decode graph does not depend on the prompt: prompts of
    different lengths (and pruned to different lengths) reuse the one graph, since neither length reaches
    the traced code."""
    rt.prune("visionzip", 4)
    cc = CompileConfig(fullgraph=True, dynamic=False, backend=_counting_backend, mode=None)
    cc._compile_all_devices = True
    torch._dynamo.reset()
    _GRAPHS.clear()
    lengths = set()
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(3):
            batch = rt.processor([QUESTIONS[i]], [rand_image(i)])
            lengths.add(batch["input_ids"].shape[1])
            rt.model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                              cache_implementation="static", max_cache_len=96, compile_config=cc)
    assert len(lengths) > 1 and len(_GRAPHS) == 1
