"""eval/ has no import circles, and reaches into testbed/ only through its public interface (issue 17.5).

Module-level imports only: an import inside a function runs after every module has loaded and cannot
make a circle at import time."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVAL = ROOT / "eval"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    mods = {module_name(f): f for f in EVAL.rglob("*.py")}
    graph = {}
    for name, f in mods.items():
        pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if sub in mods else target)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def find_cycle(graph):
    """One import circle as a list of modules, or None (depth-first search with colours)."""
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


def test_eval_has_no_import_circles():
    graph = import_graph()
    assert {"eval.runner", "eval.results", "eval.datacheck", "eval.scorers"} <= set(graph)
    assert find_cycle(graph) is None, find_cycle(graph)


def test_eval_uses_only_the_testbeds_public_interface():
    for f in EVAL.rglob("*.py"):
        text = f.read_text()
        for m in re.finditer(r"from testbed(\.\w+)? import ([\w, ]+)", text):
            assert all(not n.strip().startswith("_") for n in m.group(2).split(",")), (f, m.group(0))
        # no private attribute of a testbed module (data._x, evaluate._Batches, ...)
        if "testbed" in text:
            assert not re.search(r"\b(data|evaluate|model|train)\._\w", text), f
