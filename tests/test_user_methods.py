"""A researcher's own method from outside the repository: a bare file or module named by VTPRUNE_METHODS, or an
installed package's entry point (group ``vtprune.methods``), loaded into the same registry, seen by
``python -m llava.cli`` and ``python -m eval``; a module that fails to import is one ``error:`` line naming it and
the exception; a name a built-in method has is refused. Each case in a fresh interpreter (the registry is
process-wide)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

NORMPRUNE = '''
import torch
from llava.method import Method, Selection, register


@register
class NormPrune(Method):
    """Keep the visual tokens with the largest feature norm (a user's example)."""

    name = "{name}"
    vision_stage = True

    def select_vision(self, sig):
        k = min(self.budget, sig.features.shape[0])
        return Selection(keep=sig.features.float().norm(dim=-1).topk(k).indices.sort().values)
'''


def _run(args, env_extra: dict):
    env = {k: v for k, v in os.environ.items() if k != "VTPRUNE_METHODS"}
    extra = dict(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([extra.pop("PYTHONPATH")] if "PYTHONPATH" in extra else []))
    env.update(extra)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_a_bare_file_named_by_the_variable_answers_through_ask(tmp_path):
    f = tmp_path / "my_method.py"
    f.write_text(NORMPRUNE.format(name="normprune"))
    r = _run(["-m", "llava.cli", "ask", "--model", "tiny:llava", "--question", "what is this?", "--method",
              "normprune", "--budget", "4", "--json"], {"VTPRUNE_METHODS": str(f)})
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["method"]["method"] == "normprune" and res["visual_entering_llm"] == 4 and res["visual_candidates"] > 4
    listed = _run(["-m", "llava.cli", "methods"], {"VTPRUNE_METHODS": str(f)})
    assert listed.returncode == 0 and any(line.startswith("normprune ") for line in listed.stdout.splitlines())


def test_a_module_on_the_path_and_an_installed_package_s_entry_point_register_their_methods(tmp_path):
    """The package as pip installs it (its code and a ``*.dist-info`` folder with ``entry_points.txt``) in a folder
    on PYTHONPATH, where importlib.metadata finds the entry point; nothing is installed into the environment."""
    (tmp_path / "mymethods.py").write_text(NORMPRUNE.format(name="normprune_mod"))
    pkg = tmp_path / "normpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(NORMPRUNE.format(name="normprune_pkg"))
    dist = tmp_path / "normpkg-0.1.dist-info"  # what pip writes for an installed package
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: normpkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[vtprune.methods]\nnormprune_pkg = normpkg\n")
    code = "from llava.method import available_methods; m = available_methods(); print('normprune_mod' in m, 'normprune_pkg' in m)"
    r = _run(["-c", code], {"VTPRUNE_METHODS": "mymethods", "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"]
    r = _run(["-c", code], {"PYTHONPATH": str(tmp_path)})  # without the variable: the entry point alone
    assert r.stdout.split() == ["False", "True"]
    r = _run(["-m", "llava.cli", "ask", "--model", "tiny:llava", "--question", "what is this?", "--method",
              "normprune_pkg", "--budget", "3", "--json"], {"PYTHONPATH": str(tmp_path)})  # the package's, in ask
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["method"]["method"] == "normprune_pkg" and res["visual_entering_llm"] == 3


def test_a_module_that_fails_to_import_is_one_error_line_naming_it(tmp_path):
    f = tmp_path / "broken.py"
    f.write_text("import torch\nraise RuntimeError('my bug')\n")
    for args in (["-m", "llava.cli", "methods"], ["-m", "eval", "list"]):
        r = _run(args, {"VTPRUNE_METHODS": f"{f}"})
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == (f"error: cannot load the methods of {str(f)!r} (named by VTPRUNE_METHODS): "
                                    "RuntimeError: my bug")
    r = _run(["-m", "llava.cli", "methods"], {"VTPRUNE_METHODS": "no_such_module_xyz"})
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: cannot load the methods of 'no_such_module_xyz' (named by VTPRUNE_METHODS): "
        "ModuleNotFoundError: No module named 'no_such_module_xyz'")
    r = _run(["-m", "llava.cli", "methods"], {"VTPRUNE_METHODS": str(tmp_path / "absent.py")})
    assert r.returncode == 2 and "FileNotFoundError: no such file: " in r.stderr


def test_a_name_a_built_in_method_has_is_refused(tmp_path):
    f = tmp_path / "clash.py"
    f.write_text(NORMPRUNE.format(name="fastv"))
    r = _run(["-m", "llava.cli", "methods"], {"VTPRUNE_METHODS": str(f)})
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: cannot load the methods of {str(f)!r} (named by VTPRUNE_METHODS): ValueError: "
                                "method name 'fastv' collides with the built-in method FastV (baselines.fastv): give "
                                "the method another name")


def test_the_vllm_plugin_s_spec_builds_a_user_s_pre_llm_method(tmp_path):
    """The vLLM plugin builds its method through the registry (integrations/vllm/spec.py, importable without
    vLLM): a method of VTPRUNE_METHODS is served like a built-in pre-LLM one, and its budget reaches it."""
    f = tmp_path / "my_method.py"
    f.write_text(NORMPRUNE.format(name="normprune"))
    code = ("from integrations.vllm.spec import PruneSpec, check_method\n"
            "m = PruneSpec.from_dict({'method': 'normprune', 'budget': 4}).build()\n"
            "check_method(m, 'llava')\nprint(m.name, m.budget)")
    r = _run(["-c", code], {"VTPRUNE_METHODS": str(f)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["normprune", "4"]
