"""Regional compilation and the compile cache folder of the fast path (llava/fast/compile.py).

That the fast path's tokens equal the eager engine's with regions on is every fast-path suite's check
(tests/test_fastpath*.py: the compiling backends mark the layers by default); here: which layers are marked,
that marking changes nothing outside a compile, that dynamo traces a repeated layer once and each decoder layer
writes its own cache layer, the cache slot's update, the whole-graph option, and the cache folder's key."""

import copy
import os

import pytest
import torch
from conftest import rand_image

from llava.fast.compile import cache_key, layer_lists, mark_regions, region_count, use_cache_dir
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


def test_a_repeated_layer_is_traced_once_and_each_layer_writes_its_own_cache():
    """The tiny LLaVA with 8 decoder layers (the 4 repeated) and its 3 CLIP layers, backend "eager" (dynamo's trace):
    dynamo traces the CLIP layer once in the prefill and the decoder layer once in the prefill and once in the
    decode, and stamps the rest out (2 + 7 + 7); each decoder layer's region writes its own cache layer (a slot
    mapped onto another layer would leave some layers empty and others written twice), and the greedy tokens equal
    the eager engine's (two prompts of different lengths, left-padded)."""
    from torch._dynamo.utils import compilation_time_metrics as metrics

    fast = load("tiny:llava", seed=1, fast=True, fast_max_new_tokens=8, fast_backend="eager")
    ref = load("tiny:llava", seed=1)
    for rt in (fast, ref):
        _deepen(rt, 8)
    eng = fast.prune("none")  # after the layers changed: the fast path marks them and their slots again
    ref.prune("none")
    assert len(fast.model.model.vision_tower.encoder.layers) == 3
    b = _batch(fast)
    torch._dynamo.reset()
    metrics.clear()
    with torch.no_grad():
        out = fast.model.generate(**b, max_new_tokens=4, do_sample=False)
        want = ref.model.generate(**b, max_new_tokens=4, do_sample=False)
    assert eng.stats.path == "fast"
    assert len(metrics["invoke_subgraph_trace"]) == 3
    assert len(metrics["invoke_subgraph_reuse_stamp_out"]) == 2 + 7 + 7
    (cache,) = eng.fast._caches.values()
    lengths = [int(layer.cumulative_length) for layer in cache.layers]
    assert lengths == [lengths[0]] * 8 and lengths[0] == eng.stats.bucket + 3, lengths  # prompt + 3 steps
    assert all(layer.keys.abs().sum() > 0 for layer in cache.layers)
    assert torch.equal(out, want)


def test_the_whole_graph_option_marks_nothing():
    rt = load("tiny:llava", seed=1, fast=True, fast_backend="eager", fast_regional=False)
    assert rt.engine.fast.regional is False and region_count(rt.model) == 0


@pytest.mark.parametrize("takes_bound", [True, False])
def test_a_region_is_made_with_the_reuse_bound_only_where_torch_takes_it(monkeypatch, takes_bound):
    """torch 2.11 (the GPU image of 2026-11-27) has no ``max_reuse_entries``: passing it raised a TypeError
    at load(fast=True) on every compiling backend."""
    import llava.fast.compile as fc

    made = []

    def region(fn, **kw):
        made.append(kw)
        return fn

    args = {"fn": None, "options": None, **({"max_reuse_entries": None} if takes_bound else {})}
    monkeypatch.setattr(torch.compiler, "nested_compile_region", region)
    monkeypatch.setattr(fc, "_REGION_ARGS", args)
    monkeypatch.setattr(fc, "_REGIONS", {})

    class Layer(torch.nn.Module):
        def forward(self, x):
            return x + 1

    call = fc._region(Layer)
    assert made == [{"max_reuse_entries": fc._REUSE_ENTRIES} if takes_bound else {}]
    assert call(Layer(), torch.ones(2)).tolist() == [2.0, 2.0]  # the class's forward, through the region
    assert fc._region(Layer) is call and len(made) == 1  # one region per class


def test_a_cache_slot_updates_as_the_static_layer_does():
    """The slot's update is the static cache layer's (transformers' StaticLayer): the same tensors written at the
    same rows, the same length, on the cache's own tensors (the slot holds them, not copies)."""
    from transformers.cache_utils import StaticLayer

    from llava.fast.compile import CacheSlot

    g = torch.Generator().manual_seed(0)
    stock, mine = StaticLayer(max_cache_len=9), StaticLayer(max_cache_len=9)
    for layer in (stock, mine):
        layer.lazy_initialization(torch.zeros(2, 3, 1, 4), torch.zeros(2, 3, 1, 5))
    slot = CacheSlot(mine)
    for n in (4, 1, 2):  # a prompt, then decode steps
        k, v = torch.randn(2, 3, n, 4, generator=g), torch.randn(2, 3, n, 5, generator=g)
        a, b = stock.update(k, v), slot.update(k, v, 0, {})
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert b[0] is mine.keys and b[1] is mine.values
    assert int(mine.cumulative_length) == int(stock.cumulative_length) == 7
    assert torch.equal(mine.keys[:, :, 7:], torch.zeros(2, 3, 2, 4))


def test_compile_cache_folder_is_keyed_by_the_torch_build(tmp_path, monkeypatch):
    monkeypatch.delenv("VTPRUNE_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-default"))
    assert use_cache_dir(None) == str(tmp_path / "inductor-default")  # no folder named: Inductor's own, as it is set
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
