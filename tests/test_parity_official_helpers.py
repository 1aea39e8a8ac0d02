"""parity/adapters/_official.py: the official halves' shared source rewriting (a literal or a pattern replaced exactly
as often as expected, or refused; a function compiled again in its own module; a method installed with the official
one kept aside), and the official worker's loading of the adapters as a package (their relative imports)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from parity.adapters import _official

REPO = Path(__file__).resolve().parents[1]


def test_rewrite_counts_and_refuses():
    assert _official.rewrite("a = 35\nb = 350", r"a = 35\b", "a = 7") == "a = 7\nb = 350"
    assert _official.rewrite("x.cuda(); y.cuda()", ".cuda()", ".cpu()", 2, literal=True) == "x.cpu(); y.cpu()"
    with pytest.raises(RuntimeError, match="expected one .* found 0"):
        _official.rewrite("a = 36", r"a = 35\b", "x")
    with pytest.raises(RuntimeError, match="expected 2 .* found 1"):
        _official.rewrite("x.cuda()", ".cuda()", ".cpu()", 2, literal=True)
    # a literal is not a pattern: "." and "(" match themselves only
    with pytest.raises(RuntimeError, match="found 0"):
        _official.rewrite("xacuda()", ".cuda()", "", literal=True)


@pytest.fixture
def probe(tmp_path, monkeypatch):
    (tmp_path / "official_probe_mod.py").write_text(
        "K = 3\n\n"
        "class Base:\n    def f(self):\n        return 100\n\n"
        "class C(Base):\n    def f(self):\n        a = 35\n#        a = 0  (a commented-out line at column 0)\n"
        "        return a + K + super().f()\n\n"
        "def g(x):\n    return x.cuda()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("official_probe_mod")
    yield mod
    sys.modules.pop("official_probe_mod", None)


def test_recompile_in_the_functions_module(probe):
    assert probe.C().f() == 138
    f = _official.recompile(probe.C.f, [(r"a = 35\b", "a = 7")], owner=probe.C)  # module globals (K), super()
    assert f(probe.C()) == 110
    g = _official.recompile(probe.g, [(".cuda()", ".real", 1)], literal=True)
    assert g(2.5) == 2.5


def test_install_starts_from_the_official_method_every_time(probe):
    _official.install(probe.C, "f", [("a = 35", "a = 1")], literal=True)
    assert probe.C().f() == 104
    _official.install(probe.C, "f", [("a = 35", "a = 2")], literal=True)  # from the official source, not the last
    assert probe.C().f() == 105
    assert probe.C._parity_official_f(probe.C()) == 138


def test_the_worker_loads_adapters_as_a_package_with_nothing_of_ours_importable(tmp_path):
    """As the official worker runs: from an empty folder, ``-I``; an adapter whose functions import ``_official`` and
    another adapter (V2Drop: CLSE's shim) relatively."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import official_worker as w; "
            "m = w._adapter('v2drop'); from parity_official_adapters import clse, _official; "
            "assert m.__name__ == 'parity_official_adapters.v2drop'; "
            "assert 'parity' not in sys.modules and 'llava' not in sys.modules; "
            "assert clse.rewrite('a = 1', 'a = 1', 'b') == 'b'; print('ok')")
    r = subprocess.run([sys.executable, "-I", "-c", code, str(REPO / "parity")], cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
