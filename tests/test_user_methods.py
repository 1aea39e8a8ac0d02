"""A researcher's own method from outside the repository: a bare file or module named by VTPRUNE_METHODS, or an
installed package's entry point (group ``vtprune.methods``), loaded into the same registry, seen by
``python -m llava.cli`` and ``python -m eval``; a module that fails to import is one ``error:`` line naming it and
the exception; a name a built-in method has is refused. The bare file's case runs ``python -m llava.cli ask`` in
a fresh interpreter; the others (and its listing) call the command lines' ``main`` in this one, on a fresh plugin state
(:func:`fresh_plugins`: the registry, the loader's flags and the user's modules restored after each test)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

NORMPRUNE = '''
import torch
from llava.method import Method, register
from llava.selection import Selection


@register
class NormPrune(Method):
    """Keep the visual tokens with the largest feature norm (a user's example)."""

    name = "{name}"
    vision_stage = True

    def select_vision(self, sig):
        k = min(self.budget, sig.features.shape[0])
        return Selection(keep=sig.features.float().norm(dim=-1).topk(k).indices.sort().values)
'''


@pytest.fixture
def fresh_plugins(monkeypatch, tmp_path):
    """The registry as a fresh process has it before the user's modules load (the built-ins stay imported), and
    the loader's state; everything restored after the test (the registry is process-wide)."""
    import llava.method as method
    import llava.plugins as plugins

    method.available_methods()  # the built-ins registered, as in any process
    registry, modules = dict(method._REGISTRY), set(sys.modules)
    monkeypatch.delenv("VTPRUNE_METHODS", raising=False)
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "_failed", None)

    def use(**env):
        for k, v in env.items():
            if k == "PYTHONPATH":
                monkeypatch.syspath_prepend(v)  # (it invalidates the import caches itself)
            else:
                monkeypatch.setenv(k, str(v))

    yield use
    method._REGISTRY.clear()
    method._REGISTRY.update(registry)
    for name in set(sys.modules) - modules:  # the user's modules (in tmp_path), not what the test loaded on the way
        if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def _main(which: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """``python -m llava.cli`` / ``python -m eval`` in this process: (exit code, stdout, stderr)."""
    if which == "llava":
        from llava.cli import main
    else:
        from eval.cli import main
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _run(args, env_extra: dict):
    env = {k: v for k, v in os.environ.items() if k != "VTPRUNE_METHODS"}
    extra = dict(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([extra.pop("PYTHONPATH")] if "PYTHONPATH" in extra else []))
    env.update(extra)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_a_bare_file_named_by_the_variable_answers_through_ask(tmp_path, fresh_plugins, capsys):
    f = tmp_path / "my_method.py"
    f.write_text(NORMPRUNE.format(name="normprune"))
    r = _run(["-m", "llava.cli", "ask", "--model", "tiny:llava", "--question", "what is this?", "--method",
              "normprune", "--budget", "4", "--json"], {"VTPRUNE_METHODS": str(f)})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["method"]["method"] == "normprune" and res["visual_entering_llm"] == 4 and res["visual_candidates"] > 4
    # the listing: `python -m llava.cli methods` in this process, on a fresh plugin state (one interpreter fewer)
    fresh_plugins(VTPRUNE_METHODS=f)
    rc, out, err = _main("llava", ["methods"], capsys)
    assert rc == 0 and any(line.startswith("normprune ") for line in out.splitlines()), err


def _package(folder: Path) -> None:
    """A module ``mymethods`` (normprune_mod), and the package ``normpkg`` (normprune_pkg) as pip installs it: its
    code and a ``*.dist-info`` folder whose ``entry_points.txt`` names it in the group ``vtprune.methods``."""
    (folder / "mymethods.py").write_text(NORMPRUNE.format(name="normprune_mod"))
    (folder / "normpkg").mkdir()
    (folder / "normpkg" / "__init__.py").write_text(NORMPRUNE.format(name="normprune_pkg"))
    dist = folder / "normpkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: normpkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vtprune.methods]\nnormprune_pkg = normpkg\n")


def test_an_installed_package_s_entry_point_registers_its_methods(tmp_path, fresh_plugins, capsys):
    """The package in a folder on the path, where importlib.metadata finds the entry point; nothing is installed
    into the environment. Without the variable: the entry point alone, and its method answers through ``ask``."""
    from llava.method import available_methods

    _package(tmp_path)
    fresh_plugins(PYTHONPATH=tmp_path)
    assert "normprune_pkg" in available_methods() and "normprune_mod" not in available_methods()
    rc, out, err = _main("llava", ["ask", "--model", "tiny:llava", "--question", "what is this?", "--method",
                                   "normprune_pkg", "--budget", "3", "--json"], capsys)
    assert rc == 0, err
    res = json.loads(out)
    assert res["method"]["method"] == "normprune_pkg" and res["visual_entering_llm"] == 3


def test_the_variable_adds_a_module_on_the_path_to_the_entry_points(tmp_path, fresh_plugins):
    from llava.method import available_methods

    _package(tmp_path)
    fresh_plugins(PYTHONPATH=tmp_path, VTPRUNE_METHODS="mymethods")
    assert {"normprune_mod", "normprune_pkg"} <= set(available_methods())


@pytest.mark.parametrize("cli", ["llava", "eval"])
def test_a_module_that_fails_to_import_is_one_error_line_naming_it(tmp_path, fresh_plugins, capsys, cli):
    f = tmp_path / "broken.py"
    f.write_text("import torch\nraise RuntimeError('my bug')\n")
    fresh_plugins(VTPRUNE_METHODS=f)
    for _ in range(2):  # and again at a later call in the same process: never a silent "unknown method"
        rc, out, err = _main(cli, ["methods"] if cli == "llava" else ["list"], capsys)
        assert rc == 2 and out == ""
        assert err.strip() == (f"error: cannot load the methods of {str(f)!r} (named by VTPRUNE_METHODS): "
                               "RuntimeError: my bug")


@pytest.mark.parametrize("named,why", [
    ("no_such_module_xyz", "ModuleNotFoundError: No module named 'no_such_module_xyz'"),
    ("absent.py", "FileNotFoundError: no such file: "),
])
def test_a_module_that_is_not_there_is_one_error_line_naming_it(tmp_path, fresh_plugins, capsys, named, why):
    source = str(tmp_path / named) if named.endswith(".py") else named
    fresh_plugins(VTPRUNE_METHODS=source)
    rc, _, err = _main("llava", ["methods"], capsys)
    assert rc == 2 and err.startswith(f"error: cannot load the methods of {source!r} (named by VTPRUNE_METHODS): "
                                      + why), err


def test_a_name_a_built_in_method_has_is_refused(tmp_path, fresh_plugins, capsys):
    f = tmp_path / "clash.py"
    f.write_text(NORMPRUNE.format(name="fastv"))
    fresh_plugins(VTPRUNE_METHODS=f)
    rc, _, err = _main("llava", ["methods"], capsys)
    assert rc == 2
    assert err.strip() == (f"error: cannot load the methods of {str(f)!r} (named by VTPRUNE_METHODS): ValueError: "
                           "method name 'fastv' collides with the built-in method FastV (baselines.fastv): give "
                           "the method another name")
    from llava.method import _REGISTRY

    assert _REGISTRY["fastv"].__module__ == "baselines.fastv"  # the built-in stays


def test_the_vllm_plugin_s_spec_builds_a_user_s_pre_llm_method(tmp_path, fresh_plugins):
    """The vLLM plugin builds its method through the registry (integrations/vllm/spec.py, importable without
    vLLM): a method of VTPRUNE_METHODS is served like a built-in pre-LLM one, and its budget reaches it."""
    from integrations.vllm.spec import PruneSpec, check_method

    f = tmp_path / "my_method.py"
    f.write_text(NORMPRUNE.format(name="normprune"))
    fresh_plugins(VTPRUNE_METHODS=f)
    m = PruneSpec.from_dict({"method": "normprune", "budget": 4}).build()
    check_method(m, "llava")
    assert (m.name, m.budget) == ("normprune", 4) and type(m).__module__.startswith("vtprune_user_")
