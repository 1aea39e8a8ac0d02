"""Precompiled fast-path functions (llava.fast.precompile): saved ahead of time in the compile cache folder, loaded by a
later fast path without tracing, keyed so that another model, method or call shape never loads a stale one.

The suite runs the aot_eager backend without regions (seconds to compile; its saved regions do not run after loading
in torch 2.13, which ``load`` refuses with the reason); FAST_BACKEND=inductor runs the same tests on Inductor with
regions (minutes), the combination bench.compile_depth --precompile times.

On a torch without the ahead-of-time capture (``llava.fast.precompile.missing``: torch 2.11) the tests of saved and
loaded files skip with the reason, and the fallback's tests run for real (one warning, the regular compile, tokens ==
eager); the same fallback is also simulated here on any torch. tests/test_torch211.py runs this file in a torch 2.11
environment (opt-in: docs/fast-path.md)."""

import os
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters

from llava.fast import precompile as fast_precompile
from llava.demo_image import demo_image
from llava.fast.precompile import MAGIC, Precompiled, describe, mismatch, precompile_folder, requested, static_key
from llava.models import load

BACKEND = "inductor" if os.environ.get("FAST_BACKEND") == "inductor" else "aot_eager"
REGIONAL = BACKEND == "inductor"
PROMPTS = ["what is in the picture?", "describe it"]
LACKS = fast_precompile.missing()  # what this torch lacks of the ahead-of-time capture (None: nothing)
needs_capture = pytest.mark.skipif(LACKS is not None, reason=f"torch {torch.__version__} lacks {LACKS}: its fast "
                                   "path compiles the regular way (tested below)")


def _fast(cache, seed=1, budget=8, method="fastv"):
    rt = load("tiny:llava", seed=seed, fast=True, fast_max_new_tokens=4, fast_backend=BACKEND, fast_cache=cache,
              fast_precompile=True, fast_regional=REGIONAL)
    eng = rt.prune(method, budget)
    return rt, eng


def _generate(rt, n=1):
    batch = rt.processor(PROMPTS[:n], [demo_image()] * n)
    with torch.no_grad():
        return rt.model.generate(**batch, max_new_tokens=3, do_sample=False)[:, -3:].tolist()


def _eager(seed=1, budget=8, n=1):
    rt = load("tiny:llava", seed=seed)
    rt.prune("fastv", budget)
    return _generate(rt, n)


def _counts(eng):
    f = eng.fast
    return [(x.compiled, x.loaded) for x in (f._tower, f._prefill, f._decode)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A first fast path: compiles its three functions and saves them."""
    cache = str(tmp_path_factory.mktemp("cache"))
    rt, eng = _fast(cache)
    tokens = _generate(rt)
    return cache, tokens, _counts(eng), eng.stats.path, eng.fast.precompile


@needs_capture
def test_the_first_fast_path_compiles_and_saves_its_three_functions(saved):
    cache, tokens, counts, path, folder = saved
    assert path == "fast"
    assert counts == [(1, 0)] * 3
    assert folder.startswith(cache) and folder.endswith("precompiled")
    names = sorted(n.split("-")[0] for n in os.listdir(folder))
    assert names == ["decode_fn", "prefill_fn", "tower_fn"]
    assert tokens == _eager()


@needs_capture
def test_a_later_fast_path_loads_them_and_traces_nothing(saved):
    cache, tokens, _, _, _ = saved
    before = counters["stats"]["unique_graphs"]
    rt, eng = _fast(cache)
    assert _generate(rt) == tokens
    assert _counts(eng) == [(0, 1)] * 3
    assert eng.stats.path == "fast"
    assert counters["stats"]["unique_graphs"] == before  # dynamo traced no graph


@needs_capture
def test_weights_are_inputs_of_a_loaded_function_not_part_of_it(saved):
    """Another checkpoint of the same architecture (another seed) loads the same files and answers as its own eager
    model does, which differs from the first model's answer."""
    cache, tokens, _, _, _ = saved
    rt, eng = _fast(cache, seed=2)
    got = _generate(rt)
    assert _counts(eng) == [(0, 1)] * 3
    assert got == _eager(seed=2)
    assert got != tokens


@needs_capture
def test_another_prompt_of_the_same_bucket_loads_the_same_files(saved):
    """The prompt's tokens and length within its bucket are inputs too (its plan: the same structure)."""
    cache, tokens, _, _, folder = saved
    rt, eng = _fast(cache)
    batch = rt.processor(["what is the colour of the sky in the picture?"], [demo_image()])
    with torch.no_grad():
        got = rt.model.generate(**batch, max_new_tokens=3, do_sample=False)[:, -3:].tolist()
    assert _counts(eng) == [(0, 1)] * 3
    rt2 = load("tiny:llava", seed=1)
    rt2.prune("fastv", 8)
    with torch.no_grad():
        assert got == rt2.model.generate(**batch, max_new_tokens=3, do_sample=False)[:, -3:].tolist()
    assert len(os.listdir(folder)) == 3


@needs_capture
def test_a_damaged_file_is_compiled_again_and_rewritten(saved, caplog):
    cache, tokens, _, _, folder = saved
    names = [n for n in sorted(os.listdir(folder)) if n.startswith("decode")]
    for name in names:  # the decode file cut short
        with open(os.path.join(folder, name), "r+b") as fh:
            fh.truncate(100)
    rt, eng = _fast(cache)
    with caplog.at_level("WARNING", logger="llava.fast.precompile"):
        assert _generate(rt) == tokens
    assert _counts(eng) == [(0, 1), (0, 1), (1, 0)]
    assert any("did not load" in r.getMessage() for r in caplog.records)
    sizes = sorted(os.path.getsize(os.path.join(folder, n)) > 100 for n in names)
    assert sizes[-1]  # this call's file rewritten whole
    rt, eng = _fast(cache)
    assert _generate(rt) == tokens and _counts(eng) == [(0, 1)] * 3


def test_the_static_key_follows_the_method_the_model_and_the_options_never_the_weights(tmp_path):
    """What the files' names stand for in place of dynamo's guards (computed without compiling anything)."""
    def key(seed=1, budget=8, method="fastv", **kw):
        rt = load("tiny:llava", seed=seed, fast=True, fast_backend="aot_eager", fast_regional=False,
                  fast_cache=str(tmp_path), fast_precompile=True, **kw)
        return static_key(rt.prune(method, budget).fast)

    base = key()
    assert key(seed=2) == base  # other weights: the same code
    assert key(budget=6) != base
    assert key(method="visionzip") != base
    assert key(fast_attention="masked") != base
    assert key(dtype=torch.bfloat16) != base
    assert key(dtype=torch.bfloat16, vision_dtype=torch.float32) != key(dtype=torch.bfloat16)  # the tower alone


class _Doubler:
    def double(self, x):
        return x * 2 + 1


@needs_capture
def test_grad_mode_is_part_of_the_call_and_a_second_wrapper_loads(tmp_path):
    """Dynamo's global-state guard is dropped with the others: a call under another grad mode (or autocast, default
    dtype) is keyed apart and compiled, never served the file traced under the first; a second wrapper over the same
    folder loads both files."""
    def wrapper():
        fast = SimpleNamespace(_precompile_key="a fixed static key")  # (a fast path's: tested above)
        return Precompiled(_Doubler().double, str(tmp_path), fast=fast, backend="aot_eager")

    p, x = wrapper(), torch.arange(3.0)
    with torch.no_grad():
        assert p(x).tolist() == [1.0, 3.0, 5.0]
    with torch.enable_grad():
        assert p(x).tolist() == [1.0, 3.0, 5.0]
    assert (p.compiled, p.loaded) == (2, 0) and len(os.listdir(tmp_path)) == 2
    q = wrapper()
    with torch.no_grad():
        assert q(x + 1).tolist() == [3.0, 5.0, 7.0]
    with torch.enable_grad():
        q(x)
    assert (q.compiled, q.loaded) == (0, 2)


def test_describe_is_the_call_structure():
    t = torch.zeros(2, 3)
    assert describe(t) == ("T", (2, 3), torch.float32, (3, 1), "cpu")
    assert describe(t.t()) == ("T", (3, 2), torch.float32, (1, 3), "cpu")
    assert describe({"b": 1, "a": None}) == ("D", ("a", ("V", "NoneType", None)), ("b", ("V", "int", 1)))
    assert describe((True,)) != describe((1,))  # equal in Python, another constant in a graph
    assert describe([t]) != describe((t,))


def test_precompile_refusals(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="inductor or aot_eager"):
        precompile_folder(True, "eager", str(tmp_path))
    with pytest.raises(ValueError, match="compile cache folder"):
        precompile_folder(True, "inductor", None)
    with pytest.raises(ValueError, match="fast_regional=False"):
        precompile_folder(True, "aot_eager", str(tmp_path), regional=True)
    assert precompile_folder(False, "eager", None) is None
    monkeypatch.delenv("VTPRUNE_FAST_PRECOMPILE", raising=False)
    # by default: on where it can be (a precompiling backend, a folder, a torch with the capture), else quietly off
    on = os.path.join(str(tmp_path), "precompiled") if LACKS is None else None
    assert precompile_folder(None, "inductor", str(tmp_path)) == on
    assert precompile_folder(None, "aot_eager", str(tmp_path)) == on
    assert precompile_folder(None, "aot_eager", str(tmp_path), regional=True) is None
    assert precompile_folder(None, "eager", str(tmp_path)) is None
    assert precompile_folder(None, "cudagraphs", str(tmp_path)) is None
    assert precompile_folder(None, "inductor", None) is None
    monkeypatch.setenv("VTPRUNE_FAST_PRECOMPILE", "1")
    folder = os.path.join(str(tmp_path), "precompiled") if LACKS is None else None  # None: the regular compile
    assert precompile_folder(None, "inductor", str(tmp_path)) == folder
    monkeypatch.setenv("VTPRUNE_FAST_PRECOMPILE", "0")
    assert precompile_folder(None, "inductor", str(tmp_path)) is None


def test_the_variable_turns_it_on_and_the_run_records_it(tmp_path, monkeypatch):
    monkeypatch.setenv("VTPRUNE_FAST_PRECOMPILE", "1")
    rt = load("tiny:llava", fast=True, fast_backend="aot_eager", fast_regional=False, fast_cache=str(tmp_path))
    assert rt.info["fast"]["precompile"] is True and rt.engine.fast.precompile_requested
    assert rt.info["fast"]["precompile_active"] is (LACKS is None)
    if LACKS is None:
        assert rt.engine.fast.precompile.startswith(str(tmp_path))
    else:  # requested, not active: the regular compile
        assert rt.engine.fast.precompile is None
    rt = load("tiny:llava", fast=True, fast_backend="aot_eager", fast_regional=False, fast_cache=str(tmp_path),
              fast_precompile=False)
    assert rt.info["fast"]["precompile"] is False and rt.engine.fast.precompile is None
    assert rt.info["fast"]["precompile_active"] is False and not rt.engine.fast.precompile_requested
    with pytest.raises(ValueError, match="fast_regional=False"):
        load("tiny:llava", fast=True, fast_backend="aot_eager", fast_cache=str(tmp_path))


@pytest.mark.parametrize("torch_kind", ["simulated", "real"])
def test_a_torch_without_the_capture_warns_once_and_compiles_the_regular_way(torch_kind, tmp_path, monkeypatch,
                                                                              caplog):
    """Precompile requested on a torch without ``aot_compile`` (torch 2.11: ``'function' object has no attribute
    'aot_compile'`` before the check): one warning per process however many fast paths ask, then the regular
    ``torch.compile`` (no file written), whose greedy tokens equal the eager engine's. "simulated": the detection
    monkeypatched (any torch); "real": this torch's own detection (runs where the capture is missing)."""
    if torch_kind == "real" and LACKS is None:
        pytest.skip(f"torch {torch.__version__} has the ahead-of-time capture (tests/test_torch211.py runs torch 2.11)")
    if torch_kind == "simulated":
        monkeypatch.setattr(fast_precompile, "missing", lambda: "torch.compile(fn).aot_compile (simulated)")
    monkeypatch.setattr(fast_precompile, "_warned", False)
    cache = str(tmp_path)
    with caplog.at_level("WARNING", logger="llava.fast.precompile"):
        rt, eng = _fast(cache)
        tokens = _generate(rt)
        rt2, eng2 = _fast(cache, budget=6)  # a second fast path in the same process: no second warning
        _generate(rt2)
    said = [r.getMessage() for r in caplog.records if "need a newer torch" in r.getMessage()]
    assert len(said) == 1, said
    assert "regular compile" in said[0]
    for r, e in ((rt, eng), (rt2, eng2)):
        assert r.info["fast"]["precompile"] is True and r.info["fast"]["precompile_active"] is False
        assert e.fast.precompile_requested and e.fast.precompile is None
        assert not any(isinstance(f, Precompiled) for f in (e.fast._tower, e.fast._prefill, e.fast._decode))
        assert e.stats.path == "fast"
    assert not os.path.exists(os.path.join(cache, "precompiled"))
    assert tokens == _eager()


def test_on_by_default_and_turned_off_by_the_argument_or_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("VTPRUNE_FAST_PRECOMPILE", raising=False)
    assert (requested(None), requested(True), requested(False)) == (None, True, False)
    for value, want in (("1", True), ("0", False), ("yes", True)):
        monkeypatch.setenv("VTPRUNE_FAST_PRECOMPILE", value)
        assert requested(None) is want and requested(True) is True and requested(False) is False
    monkeypatch.delenv("VTPRUNE_FAST_PRECOMPILE")
    kw = dict(fast=True, fast_backend="aot_eager", fast_regional=False, fast_cache=str(tmp_path))
    rt = load("tiny:llava", **kw)  # nothing said: precompiled where this torch can
    assert rt.info["fast"]["precompile"] is True and rt.info["fast"]["precompile_active"] is (LACKS is None)
    assert (rt.engine.fast.precompile is not None) is (LACKS is None)
    rt = load("tiny:llava", fast=True, fast_backend="aot_eager", fast_cache=str(tmp_path))  # regions: quietly off
    assert rt.info["fast"]["precompile_active"] is False and rt.engine.fast.precompile is None
    monkeypatch.setenv("VTPRUNE_FAST_PRECOMPILE", "0")
    rt = load("tiny:llava", **kw)
    assert rt.info["fast"]["precompile"] is False and rt.engine.fast.precompile is None


def test_a_file_header_names_what_differs():
    static = {"build": ["torch2.13"], "code": "abc", "device": ["cpu", "x86_64"]}
    want = fast_precompile.file_header("prefill_fn", static, "call-1")
    assert mismatch(want, want) == []
    assert mismatch(None, want) == ["format"]
    other = fast_precompile.file_header("prefill_fn", {**static, "code": "abd", "device": ["cuda", "H100", [9, 0]]},
                                        "call-2")
    assert mismatch(other, want) == ["code", "device", "call (argument shapes, dtypes, strides, values)"]
    assert mismatch(fast_precompile.file_header("decode_fn", static, "call-1"), want) == ["function"]


@needs_capture
@pytest.mark.parametrize("change", ["code", "torch", "device"])
def test_a_stale_saved_function_is_compiled_afresh_never_run(change, tmp_path, monkeypatch, caplog):
    """After the code, torch or the device change, the saved functions are not loaded: the new key names new files,
    and a file found under the new name that was saved for the old ones (copied over it) is read, found to differ in
    its header and compiled afresh (never run); the tokens stay the eager engine's."""
    cache = str(tmp_path)
    rt, eng = _fast(cache)
    tokens = _generate(rt)
    folder = eng.fast.precompile
    old = {n.split("-")[0]: os.path.join(folder, n) for n in os.listdir(folder)}
    with open(old["prefill_fn"], "rb") as fh:
        assert fh.readline() == MAGIC
    if change == "code":  # an edited .py file of the repository
        digest = fast_precompile.source_digest
        monkeypatch.setattr(fast_precompile, "source_digest", lambda extra=(): "0" * 64 + digest(extra))
    elif change == "torch":  # another build of torch
        monkeypatch.setattr(torch, "__version__", "2.99.0+test")
    else:  # another GPU or CPU under the same folder
        monkeypatch.setattr(fast_precompile, "_device", lambda model: ["cuda", "another device", [0, 0]])
    rt, eng = _fast(cache)
    assert _generate(rt) == tokens == _eager()
    assert _counts(eng) == [(1, 0)] * 3  # new keys: new files, the old ones not read
    now = eng.fast.precompile  # another torch: another cache subfolder too (llava.fast.compile.cache_key)
    assert (now != folder) is (change == "torch")
    new = {n.split("-")[0]: os.path.join(now, n) for n in os.listdir(now) if os.path.join(now, n) not in
           old.values()}
    assert sorted(new) == ["decode_fn", "prefill_fn", "tower_fn"]
    for name in new:  # the old files copied over the new names: found, read, refused
        with open(old[name], "rb") as src, open(new[name], "wb") as dst:
            dst.write(src.read())
    rt, eng = _fast(cache)
    with caplog.at_level("WARNING", logger="llava.fast.precompile"):
        assert _generate(rt) == tokens
    assert _counts(eng) == [(1, 0)] * 3 and sum(f.stale for f in (eng.fast._tower, eng.fast._prefill,
                                                                      eng.fast._decode)) == 3
    part = {"code": "code", "torch": "build", "device": "device"}[change]
    said = [r.getMessage() for r in caplog.records if "it is not run" in r.getMessage()]
    assert len(said) == 3 and all(f"saved for another {part}" in m for m in said), said
    rt, eng = _fast(cache)  # rewritten: the next fast path loads them
    assert _generate(rt) == tokens and _counts(eng) == [(0, 1)] * 3


@needs_capture
def test_another_call_shape_is_compiled_not_served_a_saved_one(saved):
    """A batch of two: the prefill's and decode's call structures differ from the saved batch-1 files."""
    cache, tokens, _, _, folder = saved
    rt, eng = _fast(cache)
    assert _generate(rt, n=2) == _eager(n=2)
    compiled = [c for c, _ in _counts(eng)]
    assert compiled[1:] == [1, 1]
