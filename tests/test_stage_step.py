"""One stage step for both executors (llava.stage_step): each method hook is asked from one function in llava/
(llava/check/ aside), a hook that answers something other than a Selection is refused with the method's name on both
executors, and an llm stage's outputs reordered by the eager executor's run order equal those computed in that
order."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from llava.llm_stage import StageRows
from llava.method import Method
from llava.models import load
from llava.selection import Selection
from llava.stage_step import llm_step

ROOT = Path(__file__).resolve().parents[1] / "llava"
#: each hook of the method contract, and the one function of llava/ that may read it off a method
HOOKS = {
    "select_vision": "stage_step.py:ask_vision",
    "select_llm": "stage_step.py:ask_llm",
    "select_tower": "families/clip.py:run_tower_staged",
    "select_tower_masked": "families/clip.py:run_tower_masked",
    "probe_rows": "attention_rows.py:sample_probe",
}


def _readers() -> dict[str, set[str]]:
    """Per hook, every function of llava/ (outside llava/check/ and the class that declares the hooks) that reads the
    attribute (or, for ``probe_rows``, calls the function), as ``file:function`` (the outermost function; a method by
    its own name)."""
    found: dict[str, set[str]] = {h: set() for h in HOOKS}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("check/"):
            continue
        units = []  # (name, node): every top-level function and every method of a top-level class
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                if not (rel == "method.py" and node.name == "Method"):  # the declarations
                    units += [(getattr(item, "name", node.name), item) for item in node.body]
            else:
                units.append((getattr(node, "name", "<module>"), node))
        for name, node in units:
            for sub in ast.walk(node):
                if isinstance(sub, ast.Attribute) and sub.attr in HOOKS and sub.attr != "probe_rows":
                    found[sub.attr].add(f"{rel}:{name}")
                elif isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and sub.func.id == "probe_rows":
                    found["probe_rows"].add(f"{rel}:{name}")
    return found


def test_each_hook_is_asked_from_one_function():
    found = _readers()
    for hook, where in HOOKS.items():
        assert found[hook] == {where}, (hook, sorted(found[hook]))


class _NotASelection(Method):
    """A vision stage (or with ``llm`` an llm stage at decoder layer 1) answering a bare index tensor."""

    name = "not_a_selection"
    capturable = "full"

    @classmethod
    def option_defaults(cls):
        return {**super().option_defaults(), "llm": False}

    @property
    def vision_stage(self):
        return not self.llm

    @property
    def llm_layers(self):
        return (1,) if self.llm else ()

    def select_vision(self, sig):
        return torch.arange(2, device=sig.features.device)

    def select_llm(self, stage, sig):
        return torch.arange(2, device=sig.hidden.device)


@pytest.mark.parametrize("llm", [False, True], ids=["vision", "llm"])
@pytest.mark.parametrize("fast", [False, True], ids=["eager", "captured"])
def test_a_hook_must_answer_a_selection(llm, fast):
    from conftest import make_batch

    opts = dict(fast=True, fast_max_new_tokens=8, fast_backend="none") if fast else {}
    rt = load("tiny:llava", seed=1, **opts)
    rt.prune(_NotASelection(budget=2, llm=llm))
    batch = make_batch(rt)
    where = "select_llm" if llm else "select_vision"
    with torch.no_grad(), pytest.raises(TypeError, match=f"not_a_selection: {where} must return a Selection, got Tensor"):
        rt.model(**batch)


def test_llm_step_permuted_equals_the_outputs_in_that_order():
    g = torch.Generator().manual_seed(0)
    S, D = 9, 4
    x, p = torch.randn(S, D, generator=g), torch.arange(S) * 10
    vis = torch.tensor([2, 3, 4, 6, 7])  # two runs of visual rows
    one = StageRows(x=x, p=p, prev=None, vis=vis, origin=torch.tensor([11, 12, 13, 14, 15]),
                    entry=torch.tensor([0, 1, 2, 3, 4]))
    deep = torch.randn(5, 2, D, generator=g)
    sel = Selection(keep=torch.tensor([4, 0]), targets=torch.tensor([3]), assign=torch.tensor([-1, 0, 0, -1, -1]))
    out = llm_step(sel, one, deep)
    assert out.src.tolist() == [4, 0, 3] and out.pos.tolist() == [70, 20, 60]
    assert out.origin.tolist() == [15, 11, 14] and out.entry.tolist() == [4, 0, 3]
    assert torch.equal(out.rows[0], x[7]) and torch.equal(out.rows[1], x[2]) and torch.equal(out.deep[1], deep[0])
    perm = torch.tensor([1, 2, 0])
    again = out.permuted(perm)
    for a, b in zip(again[1:], (out.rows[perm], out.src[perm], out.pos[perm], out.origin[perm], out.entry[perm],
                                out.deep[perm])):
        assert torch.equal(a, b)
