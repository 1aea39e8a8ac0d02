"""The compile cache folder where none is named (llava.fast.compile.default_cache_dir): ``$XDG_CACHE_HOME/vtprune/compile``,
else ``~/.cache/vtprune/compile``; a fast path with no ``fast_cache=`` and no ``VTPRUNE_COMPILE_CACHE`` saves its
precompiled functions there, a later process loads them without tracing, two processes filling it at once both answer
as the eager engine, and a stale file found there is compiled afresh, never run.

The processes run the aot_eager backend without regions, as tests/test_fast_precompile.py does (seconds to compile);
FAST_BACKEND=inductor runs them on Inductor with its regions (minutes)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import child_env
from llava.demo_image import demo_image
from llava.fast import compile as fast_compile
from llava.fast import precompile as fast_precompile
from llava.fast.compile import cache_key, default_cache_dir, use_cache_dir
from llava.models import load

ROOT = Path(__file__).resolve().parents[1]
BACKEND = "inductor" if os.environ.get("FAST_BACKEND") == "inductor" else "aot_eager"
REGIONAL = BACKEND == "inductor"
PROMPT = "what is in the picture?"
LACKS = fast_precompile.missing()
needs_capture = pytest.mark.skipif(LACKS is not None, reason=f"torch {torch.__version__} lacks {LACKS}: nothing is "
                                   "precompiled (tests/test_fast_precompile.py tests that fallback)")


@pytest.fixture
def no_folder_named(monkeypatch):
    """No folder named: neither variable set, Inductor's own unset (restored after the test, which sets it)."""
    monkeypatch.delenv("VTPRUNE_COMPILE_CACHE", raising=False)
    monkeypatch.delenv("VTPRUNE_FAST_PRECOMPILE", raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "restored after the test")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")


def test_the_default_folder_is_in_the_users_cache_folder(tmp_path, monkeypatch, no_folder_named):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == str(tmp_path / "home" / ".cache" / "vtprune" / "compile")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: ignored, as XDG asks
    assert default_cache_dir() == str(tmp_path / "home" / ".cache" / "vtprune" / "compile")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    want = str(tmp_path / "xdg" / "vtprune" / "compile" / cache_key())
    assert use_cache_dir(None) == want and os.path.isdir(want)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == want
    assert use_cache_dir(None) == want  # the folder this process set: used again
    monkeypatch.setenv("VTPRUNE_COMPILE_CACHE", str(tmp_path / "named"))  # the variable moves it
    assert use_cache_dir(None) == str(tmp_path / "named" / cache_key())
    assert use_cache_dir(tmp_path / "arg") == str(tmp_path / "arg" / cache_key())  # the argument first
    assert not os.path.exists(tmp_path / "home")


def test_a_default_folder_that_cannot_be_made_leaves_inductors_own(tmp_path, monkeypatch, no_folder_named, caplog):
    """XDG_CACHE_HOME naming a file (as a read-only home would): one warning, no folder, nothing precompiled; asked for
    explicitly, precompile is then the error that names the way out."""
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))
    monkeypatch.setattr(fast_compile, "_default_refused", None)
    with caplog.at_level("WARNING", logger="llava.fast.compile"):
        assert use_cache_dir(None) is None
        assert use_cache_dir(None) is None
    said = [r.getMessage() for r in caplog.records if "default folder cannot be used" in r.getMessage()]
    assert len(said) == 1 and "fast_cache=DIR" in said[0], said
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    rt = load("tiny:llava", fast=True, fast_backend="aot_eager", fast_regional=False)
    assert rt.engine.fast.cache_dir is None and rt.engine.fast.precompile is None
    with pytest.raises(ValueError, match="the default one could not be used"):
        load("tiny:llava", fast=True, fast_backend="aot_eager", fast_regional=False, fast_precompile=True)


# ------------------------------------------------------------------ processes on the default folder
_PROCESS = textwrap.dedent("""
    import json, os, sys, time
    import torch
    from torch._dynamo.utils import counters
    from llava.demo_image import demo_image
    from llava.models import load

    backend, regional, barrier, n = sys.argv[1], sys.argv[2] == "1", sys.argv[3], int(sys.argv[4])
    rt = load("tiny:llava", seed=1, fast=True, fast_max_new_tokens=4, fast_backend=backend, fast_regional=regional)
    eng = rt.prune("fastv", 8)
    batch = rt.processor([sys.argv[5]], [demo_image()])
    if barrier:  # the processes of a race: each waits for the others to be ready, then all compile at once
        open(os.path.join(barrier, str(os.getpid())), "w").close()
        deadline = time.time() + 300
        while len(os.listdir(barrier)) < n and time.time() < deadline:
            time.sleep(0.02)
    with torch.no_grad():
        tokens = rt.model.generate(**batch, max_new_tokens=3, do_sample=False)[:, -3:].tolist()
    fns = (eng.fast._tower, eng.fast._prefill, eng.fast._decode)
    print(json.dumps({"cache_dir": eng.fast.cache_dir, "precompile": eng.fast.precompile, "path": eng.stats.path,
                      "counts": [[f.compiled, f.loaded] for f in fns], "graphs": counters["stats"]["unique_graphs"],
                      "tokens": tokens}))
""")


def _start(home: Path, barrier: str = "", n: int = 1) -> subprocess.Popen:
    """A process with HOME at ``home`` and no folder named (no XDG_CACHE_HOME, no VTPRUNE_* or TORCHINDUCTOR_*)."""
    env = child_env(drop=("VTPRUNE_", "TORCHINDUCTOR_", "XDG_CACHE_HOME"), HOME=home)
    return subprocess.Popen([sys.executable, "-c", _PROCESS, BACKEND, "1" if REGIONAL else "0", barrier, str(n),
                             PROMPT], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _eager() -> list:
    rt = load("tiny:llava", seed=1)
    rt.prune("fastv", 8)
    with torch.no_grad():
        return rt.model.generate(**rt.processor([PROMPT], [demo_image()]), max_new_tokens=3,
                                 do_sample=False)[:, -3:].tolist()


@pytest.fixture(scope="module")
def race(tmp_path_factory):
    """Two processes started at once on an empty home, both compiling into its default folder."""
    home = tmp_path_factory.mktemp("home")
    barrier = tmp_path_factory.mktemp("barrier")
    procs = [_start(home, str(barrier), 2) for _ in range(2)]
    return home, [_result(p) for p in procs]


def _saved(folder: str) -> list:
    return sorted(os.listdir(folder))


@needs_capture
def test_two_processes_filling_the_default_folder_at_once_both_answer_as_eager(race):
    home, rows = race
    folder = str(home / ".cache" / "vtprune" / "compile" / cache_key())
    want = _eager()
    for row in rows:
        assert row["cache_dir"] == folder
        assert row["precompile"] == os.path.join(folder, "precompiled")
        assert row["path"] == "fast" and row["tokens"] == want
        assert all(c + ld == 1 for c, ld in row["counts"])  # each function compiled, or loaded when the other's
    names = _saved(os.path.join(folder, "precompiled"))  # was saved first; one whole file per function, no leftovers
    assert [n.split("-")[0] for n in names] == ["decode_fn", "prefill_fn", "tower_fn"], names
    for name in names:
        with open(os.path.join(folder, "precompiled", name), "rb") as fh:
            assert fh.readline() == fast_precompile.MAGIC


@needs_capture
def test_a_later_process_loads_them_from_the_default_folder_and_traces_nothing(race):
    home, rows = race
    row = _result(_start(home))
    assert row["cache_dir"] == str(home / ".cache" / "vtprune" / "compile" / cache_key())
    assert row["counts"] == [[0, 1]] * 3 and row["graphs"] == 0  # loaded, none compiled, dynamo traced no graph
    assert row["tokens"] == rows[0]["tokens"]


@needs_capture
def test_a_stale_file_in_the_default_folder_is_compiled_afresh(race, tmp_path, monkeypatch, no_folder_named, caplog):
    """The tower's file copied over the decode step's name: read, its header found to differ, never run; the step is
    compiled afresh and its file rewritten, the other two loaded (a copy of the race's home, in this process)."""
    home = tmp_path / "home"
    shutil.copytree(race[0], home)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    folder = home / ".cache" / "vtprune" / "compile" / cache_key() / "precompiled"
    by_fn = {n.split("-")[0]: folder / n for n in _saved(str(folder))}
    shutil.copyfile(by_fn["tower_fn"], by_fn["decode_fn"])
    rt = load("tiny:llava", seed=1, fast=True, fast_max_new_tokens=4, fast_backend=BACKEND, fast_regional=REGIONAL)
    eng = rt.prune("fastv", 8)
    assert eng.fast.precompile == str(folder)
    with caplog.at_level("WARNING", logger="llava.fast.precompile"), torch.no_grad():
        tokens = rt.model.generate(**rt.processor([PROMPT], [demo_image()]), max_new_tokens=3,
                                   do_sample=False)[:, -3:].tolist()
    assert tokens == race[1][0]["tokens"]
    fns = (eng.fast._tower, eng.fast._prefill, eng.fast._decode)
    assert [(f.compiled, f.loaded, f.stale) for f in fns] == [(0, 1, 0), (0, 1, 0), (1, 0, 1)]
    said = [r.getMessage() for r in caplog.records if "it is not run" in r.getMessage()]
    assert len(said) == 1 and "saved for another function" in said[0], said
    with open(by_fn["decode_fn"], "rb") as fh:  # rewritten: the decode step's own header again
        fh.readline()
        assert json.loads(fh.readline())["function"] == "decode_fn"
