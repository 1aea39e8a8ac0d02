"""The adapter registry of ``python -m parity`` (parity/adapters/): every adapter has both halves, its official half
loads with nothing of this repository importable (as the official worker loads it), clones are found and refused
as documented, and scripts/official_clones.sh clones an adapter's repository at its commit."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parity import adapters
from parity.llava15 import clone_for

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", adapters.names())
def test_every_adapter_has_both_halves(name):
    mod = adapters.get(name)
    for attr in ("enable", "record", "ours", "record_ours"):
        assert callable(getattr(mod, attr)), attr
    assert isinstance(mod.REPOSITORY, str) and mod.REPOSITORY.count("/") == 1
    assert len(mod.COMMIT) == 40 and int(mod.COMMIT, 16) >= 0
    assert mod.PACKAGES and all(isinstance(p, str) for p in mod.PACKAGES)
    method, options = mod.ours(16)
    from llava.method import available_methods

    assert method in available_methods(), method
    assert isinstance(options, dict)


@pytest.mark.parametrize("name", adapters.names())
def test_the_official_half_imports_nothing_of_ours_at_load(name, tmp_path):
    """The worker loads the file by path from an empty folder: module level may import the standard library only."""
    tree = ast.parse(adapters.path(name).read_text())
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert all(m == "__future__" or m.split(".")[0] in sys.stdlib_module_names for m in mods), (name, mods)
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('a', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "assert 'llava' not in sys.modules and 'parity' not in sys.modules")
    subprocess.run([sys.executable, "-I", "-c", code, str(adapters.path(name))], cwd=tmp_path, check=True)


def test_unknown_adapter_is_refused():
    with pytest.raises(ValueError, match=r"no parity adapter for 'nope' \(adapters: .*flowcut"):
        adapters.get("nope")
    assert "_ours" not in adapters.names() and "flowcut" in adapters.names()


def test_clone_lookup(tmp_path):
    # flowcut's code is installed in .venv-official: no clone needed, none found
    assert clone_for("flowcut", None, clones=tmp_path) is None
    # a clone under the clones folder is taken when no --official-path is given
    (tmp_path / "flowcut" / "flowcut").mkdir(parents=True)
    assert clone_for("flowcut", None, clones=tmp_path) == str(tmp_path / "flowcut")
    # --official-path wins, and must hold the adapter's package
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ValueError, match=r"has no flowcut/ folder \(TungChintao/FlowCut does\)"):
        clone_for("flowcut", str(other), clones=tmp_path)
    (other / "flowcut").mkdir()
    assert clone_for("flowcut", str(other), clones=tmp_path) == str(other)
    # the unpruned model always runs on the installed code (a method's tree may need its switch to run at all)
    assert clone_for("none", None, clones=tmp_path) is None
    assert clone_for("none", str(other), clones=tmp_path) is None


def test_an_adapter_that_needs_a_clone_says_how_to_get_it(tmp_path, monkeypatch):
    mod = adapters.get("flowcut")
    monkeypatch.setattr(mod, "INSTALLED", False)
    with pytest.raises(ValueError, match=r"flowcut needs a clone of TungChintao/FlowCut "
                                         r"\(bash scripts/official_clones.sh flowcut"):
        clone_for("flowcut", None, clones=tmp_path)


def _git(*args, cwd):
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=env).stdout.strip()


def test_official_clones_script_checks_out_the_adapters_commit(tmp_path):
    """A local repository stands in for GitHub (VTPRUNE_CLONE_URL); the adapter names a commit that is not the
    newest, and the clone must sit on that one."""
    src = tmp_path / "src" / "TungChintao+FlowCut"
    src.mkdir(parents=True)
    _git("init", "-q", cwd=src)
    (src / "flowcut").mkdir()
    (src / "flowcut" / "v.txt").write_text("one")
    _git("add", ".", cwd=src)
    _git("commit", "-qm", "one", cwd=src)
    first = _git("rev-parse", "HEAD", cwd=src)
    (src / "flowcut" / "v.txt").write_text("two")
    _git("commit", "-qam", "two", cwd=src)
    adapters_dir = tmp_path / "repo" / "parity" / "adapters"
    adapters_dir.mkdir(parents=True)
    text = adapters.path("flowcut").read_text().replace(adapters.get("flowcut").COMMIT, first)
    (adapters_dir / "flowcut.py").write_text(text)
    (tmp_path / "repo" / "scripts").mkdir()
    script = tmp_path / "repo" / "scripts" / "official_clones.sh"
    script.write_text((REPO / "scripts" / "official_clones.sh").read_text())
    env = dict(os.environ, VTPRUNE_CLONE_URL=str(tmp_path / "src" / "{owner}+{name}"),
               VTPRUNE_CLONES=str(tmp_path / "clones"))
    out = subprocess.run(["bash", str(script), "flowcut"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    clone = tmp_path / "clones" / "flowcut"
    assert (clone / "flowcut" / "v.txt").read_text() == "one"
    assert _git("rev-parse", "HEAD", cwd=clone) == first
    assert f"flowcut: TungChintao/FlowCut at {first[:12]}" in out.stdout
    # again: idempotent; an unknown adapter is refused
    assert subprocess.run(["bash", str(script), "flowcut"], env=env, capture_output=True).returncode == 0
    bad = subprocess.run(["bash", str(script), "nope"], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "no adapter 'nope'" in bad.stderr
