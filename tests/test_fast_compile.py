"""Regional compilation and the compile cache folder of the fast path (llava/fast_compile.py).

That the fast path's tokens equal the eager engine's with regions on is every fast-path suite's check
(tests/test_fastpath*.py: the compiling backends mark the layers by default); here: which layers are marked,
that marking changes nothing outside a compile, that dynamo traces a repeated layer once (the traced op count
does not grow with the decoder's depth), the whole-graph option, and the cache folder's key."""

import copy
import os

import pytest
import torch
from conftest import rand_image

from llava.fast_compile import cache_key, layer_lists, mark_regions, region_count, use_cache_dir
from llava.models import load


def _deepen(rt, layers: int):
    """The tiny model's decoder layers repeated to ``layers`` (the same structure at another depth)."""
    lm = rt.model.model.language_model
    base = list(lm.layers)
    while len(lm.layers) < layers:
        layer = copy.deepcopy(base[len(lm.layers) % len(base)])
        layer.self_attn.layer_idx = len(lm.layers)
        lm.layers.append(layer)
    lm.config.num_hidden_layers = rt.model.config.text_config.num_hidden_layers = layers


def _batch(rt):
    return rt.processor(["what is in the picture?", "is there a red square on the left side?"],
                        [rand_image(0), rand_image(1, 56, 56)])


def test_the_decoder_and_each_tower_encoder_are_marked():
    rt = load("tiny:llava", seed=1)
    lm, tower = rt.model.model.language_model, rt.model.model.vision_tower
    lists = layer_lists(lm, [tower])
    assert [id(x) for x in lists] == [id(lm.layers), id(tower.encoder.layers)]
    n = len(lm.layers) + len(tower.encoder.layers)
    assert mark_regions(lists) == n and region_count(rt.model) == n
    assert mark_regions(lists) == 0  # idempotent: a second engine on the same model marks nothing again
    qwen = load("tiny:qwen2_5_vl", seed=1)
    blocks = qwen.model.model.visual.blocks
    assert [id(x) for x in layer_lists(qwen.model.model.language_model, [qwen.model.model.visual])] == [
        id(qwen.model.model.language_model.layers), id(blocks)]


def test_marked_layers_run_as_before_outside_a_compile():
    """Outside torch.compile the region is a plain call: the eager engine's greedy tokens and logits unchanged."""
    plain, marked = load("tiny:llava", seed=1), load("tiny:llava", seed=1)
    lm, tower = marked.model.model.language_model, marked.model.model.vision_tower
    mark_regions(layer_lists(lm, [tower]))
    b = _batch(plain)
    with torch.no_grad():
        a = plain.model.generate(**b, max_new_tokens=6, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        c = marked.model.generate(**b, max_new_tokens=6, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True)
    assert torch.equal(a.sequences, c.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, c.scores))


def _traced_ops(layers: int, regional: bool) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Ops dynamo captured for the fast prefill + decode of the tiny LLaVA at ``layers`` decoder layers
    (backend "eager": dynamo's trace without code generation), and the fast and eager tokens."""
    from torch._dynamo.utils import counters

    fast = load("tiny:llava", seed=1, fast=True, fast_max_new_tokens=8, fast_backend="eager", fast_regional=regional)
    ref = load("tiny:llava", seed=1)
    for rt in (fast, ref):
        _deepen(rt, layers)
    eng = fast.prune("none")
    ref.prune("none")
    assert eng.fast.regional is regional
    b = _batch(fast)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        out = fast.model.generate(**b, max_new_tokens=4, do_sample=False)
        want = ref.model.generate(**b, max_new_tokens=4, do_sample=False)
    assert eng.stats.path == "fast"
    return counters["stats"]["calls_captured"], out, want


def test_a_repeated_layer_is_traced_once():
    """Regional: 4 more decoder layers add a region call each to the prefill's and the decode's traces (measured: 2
    ops a call, 16 in all; not 4 layers' worth of norms, projections, rotary, attention and MLP); the whole graph
    (``fast_regional=False``) traces every layer's ops (688 ops at 4 layers vs 107 regional). Tokens == eager in
    each case (two prompts of different lengths, left-padded)."""
    counts = {}
    for regional, layers in ((True, 4), (True, 8), (False, 4)):
        n, out, want = _traced_ops(layers, regional)
        assert torch.equal(out, want), (regional, layers)
        counts[regional, layers] = n
    assert counts[True, 8] - counts[True, 4] <= 2 * 4 * 3, counts
    assert counts[False, 4] - counts[True, 4] >= 2 * 3 * 20, counts  # 3 of the 4 layers not traced, in 2 graphs


def test_compile_cache_folder_is_keyed_by_the_torch_build(tmp_path, monkeypatch):
    monkeypatch.delenv("VTPRUNE_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-default"))
    assert use_cache_dir(None) is None  # no folder asked for: Inductor's own
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor-default")
    key = cache_key()
    assert key.startswith(f"torch{torch.__version__.split('+')[0]}-")
    assert ("-cpu" in key) == (torch.version.cuda is None)
    got = use_cache_dir(tmp_path / "mine")
    assert got == str(tmp_path / "mine" / key) and os.path.isdir(got)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == got
    monkeypatch.setenv("VTPRUNE_COMPILE_CACHE", str(tmp_path / "from-env"))
    assert use_cache_dir(None) == str(tmp_path / "from-env" / key)


@pytest.mark.parametrize("backend, regional, cached", [("eager", True, False), ("cudagraphs", False, False),
                                                       ("none", False, False), ("inductor", True, True)])
def test_which_backends_mark_regions_and_use_the_cache(tmp_path, monkeypatch, backend, regional, cached):
    """Regions for the backends dynamo traces; the cache folder for Inductor's code only (nothing is compiled on
    the first call of a backend test: the engine is attached, no prefill runs)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "default"))
    rt = load("tiny:llava", seed=1, fast=True, fast_backend=backend, fast_cache=str(tmp_path / "c"))
    eng = rt.engine
    assert eng.fast.regional is regional
    assert (region_count(rt.model) > 0) is regional
    assert (eng.fast.cache_dir == str(tmp_path / "c" / cache_key())) is cached
