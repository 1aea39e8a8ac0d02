"""The fast path's old flat module paths (``llava.fastpath``, ``llava.fast_*``) are aliases of the package ``llava.fast``
(issue 80, part 6): importing one gives the new module object itself, so code that still imports the old paths (eval/,
bench/, ... at the time of the move) and tests that monkeypatch them reach the real module."""

import importlib

import pytest

OLD_TO_NEW = {"fastpath": "path", "fast_plan": "plan", "fast_graphs": "graphs", "fast_compile": "compile",
              "fast_precompile": "precompile", "fast_attention": "attention", "fast_llm": "llm",
              "fast_vision": "vision", "fast_probe": "probe"}


@pytest.mark.parametrize("old", sorted(OLD_TO_NEW))
def test_an_old_path_is_the_new_module_object(old):
    import llava

    new = importlib.import_module(f"llava.fast.{OLD_TO_NEW[old]}")
    assert importlib.import_module(f"llava.{old}") is new
    assert getattr(llava, old) is new  # `import llava.fastpath; llava.fastpath.X` too
    assert new.__name__ == f"llava.fast.{OLD_TO_NEW[old]}"


def test_a_monkeypatch_through_an_old_path_patches_the_real_module(monkeypatch):
    import llava.fast.path
    import llava.fastpath
    from llava.fast_plan import bucket_for as old_name

    assert old_name is llava.fast.path.bucket_for
    monkeypatch.setattr(llava.fastpath, "FAST_FAMILIES", ("nothing",))
    assert llava.fast.path.FAST_FAMILIES == ("nothing",)
    monkeypatch.setattr("llava.fast_precompile.missing", lambda: "patched")
    from llava.fast.precompile import missing

    assert missing() == "patched"
