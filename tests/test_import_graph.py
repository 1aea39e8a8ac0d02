"""The project's import graph: no import circles anywhere, type-only imports and the imports inside
functions counted, and the rooms depend on each other one way only.

Every module of the project's packages is parsed with ``ast``; every ``import`` / ``from ... import`` in it is an
edge, wherever it stands:

* at module level (they run at import);
* inside a function or method: it runs later than one at the top, but a reader following the code still walks the
  circle, and it is how a circle hides from the import system;
* under ``if TYPE_CHECKING:``: it never runs, but the module's annotations name the other module's types, so the
  module means nothing without it, and a type checker walks it. A circle closed only by a type-only import says that
  a type lives in the wrong module: it goes beside the code that reads it (``PromptSpec`` in ``llava/plan.py``; the
  sharded-linear helpers the engine calls in ``llava/tp_shards.py``, apart from ``llava/tp.py``, which takes a
  ``Runtime``).

An import of a name from a package (``from eval import scorers``) is an edge to the submodule when there is one,
else to the package."""

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("baselines", "consensusdrop", "visiondrop", "attnmix")
PACKAGES = ("llava", "eval", "bench", "integrations", "testbed", "parity", *METHODS)
#: room -> the rooms it may import (docs/architecture.md's "Layout" table): a strict order, so rooms never import each other
#: back. A room is a top-level package, or one integration.
ALLOWED = {
    "llava": set(),  # the runtime: methods register by name, the engine imports none
    **{m: {"llava"} for m in METHODS},  # a method is one file over llava's contract and ops
    "testbed": {"llava", *METHODS},  # a data set and a model: the harness imports it, never the reverse
    "integrations.vllm": {"llava"},  # the vLLM plugin
    "eval": {"llava", "testbed", "integrations.vllm"},  # the protocol (its vLLM backend runs the plugin)
    "integrations.lmms_eval": {"llava", "eval", "testbed"},  # the lmms-eval model and tasks use the harness's data
    "bench": {"llava", "eval", "testbed", "integrations.vllm", *METHODS},  # performance tooling (its small local
    # checkpoints come from integrations.vllm.tiny): never imported by the protocol
    "parity": {"llava", "eval", *METHODS},  # the official code beside ours (its worker's `llava` is the official one)
}


def room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "integrations" and len(parts) > 1 else parts[0]


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its body: functions and ``if TYPE_CHECKING:`` blocks
    included)."""
    mods = {module_name(f, root): f for p in packages if (root / p).is_dir() for f in (root / p).rglob("*.py")}

    def resolve(name: str) -> str | None:  # the longest prefix that is a project module
        while name not in mods:
            if "." not in name:
                return None
            name = name.rsplit(".", 1)[0]
        return name

    graph = {}
    for name, f in mods.items():
        pkg = name if f.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(f.read_text(), str(f))
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                deps.update(resolve(f"{target}.{alias.name}") for alias in node.names)
            elif isinstance(node, ast.Import):
                deps.update(resolve(alias.name) for alias in node.names)
        graph[name] = {d for d in deps if d and d != name}
    return graph


@functools.cache
def project_graph() -> dict[str, set[str]]:
    """:func:`import_graph` of the project, parsed once for the whole file (a few seconds a parse: CI time)."""
    return import_graph()


def find_cycle(graph):
    """One import circle as a list of modules (first == last), or None (depth-first search with colours)."""
    colour, stack = {}, []

    def visit(n):
        colour[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if colour.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in colour and (c := visit(d)):
                return c
        colour[n] = 2
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in colour and (c := visit(n)):
            return c
    return None


def test_the_checker_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_checker_finds_a_circle_planted_in_files(tmp_path):
    """A real package on disk: the circle closes through an import inside a method and a relative import, or
    through an import under TYPE_CHECKING alone."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("import os\n\n\nclass B:\n    def f(self):\n        from pkg.c import g\n")
    (pkg / "c.py").write_text("import os\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == set()
    assert find_cycle(graph) is None
    for c in ("def g():\n    from . import a\n",  # closes at run time
              "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"):  # for the types only
        (pkg / "c.py").write_text(c)
        assert find_cycle(import_graph(tmp_path, ("pkg",))) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"], c


def test_the_project_has_no_import_circles():
    graph = project_graph()
    # the graph holds every room, and function-level imports are edges
    assert {"llava.engine", "eval.runner", "eval.scorers", "bench.gpu_check", "testbed.evaluate",
            "integrations.vllm.spec", "baselines.fastv", "consensusdrop.consensusdrop"} <= set(graph)
    assert "bench.efficiency" in set().union(*(graph[m] for m in graph if m.startswith("bench.gpu_check")))
    # and so are type-only ones (under TYPE_CHECKING, llava/tp.py names models.Runtime, llava/prefill.py PromptSpec)
    assert "llava.models" in graph["llava.tp"] and "llava.plan" in graph["llava.prefill"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circle_inside_a_package(package):
    """The same, package by package, so that a circle in one package does not hide another's (a circle across
    packages is an import against the rooms' arrows: :func:`test_rooms_import_one_way`)."""
    graph = project_graph()
    inside = {m for m in graph if m.split(".")[0] == package}
    sub = {m: graph[m] & inside for m in inside}
    assert sub, package
    cycle = find_cycle(sub)
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_rooms_import_one_way(name):
    graph = project_graph()
    assert any(room(m) == name for m in graph), name
    bad = sorted(f"{m} -> {d}" for m, deps in graph.items() if room(m) == name
                 for d in deps if room(d) not in ALLOWED[name] | {name} and room(d) != "integrations")
    assert not bad, bad


def test_the_room_order_is_strict():
    """ALLOWED is acyclic: no two rooms may import each other, even through a third."""
    assert find_cycle({r: set(ALLOWED[r]) for r in ALLOWED}) is None


def test_no_baseline_imports_another():
    """A method is one file: shared pieces live in llava/ops/ (baselines/__init__ registers them all)."""
    bad = sorted(f"{m} -> {d}" for m, deps in project_graph().items() if m.startswith("baselines.")
                 for d in deps if d.startswith("baselines.") and d != "baselines")
    assert not bad, bad


def test_eval_uses_only_the_testbeds_public_interface():
    for f in (ROOT / "eval").rglob("*.py"):
        text = f.read_text()
        for m in re.finditer(r"from testbed(\.\w+)? import ([\w, ]+)", text):
            assert all(not n.strip().startswith("_") for n in m.group(2).split(",")), (f, m.group(0))
        # no private attribute of a testbed module (data._x, evaluate._Batches, ...)
        if "testbed" in text:
            assert not re.search(r"\b(data|evaluate|model|train)\._\w", text), f


def test_rooms_by_purpose_stay_small():
    """Issue 51: no runtime file over 500 lines (split by purpose, as llava/ops/ and llava/stats.py were), and the
    GPU check is one package (bench/gpu_check/), not flat modules beside bench's other packages."""
    long = {str(f.relative_to(ROOT)): n for f in (ROOT / "llava").rglob("*.py")
            if (n := len(f.read_text().splitlines())) > 500}
    assert long == {}
    assert sorted(p.name for p in (ROOT / "bench").glob("gpu_check*.py")) == []
    assert (ROOT / "bench" / "gpu_check" / "__main__.py").is_file()
