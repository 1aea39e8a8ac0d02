"""A model family from an installed package: an entry point of the group ``vtprune.families`` names a family record,
registered with the built-in families by every command and by a registry lookup that finds no family.

The package ``myllava`` holds ``MyLlava``, LLaVA-1.5 under a class and a config ``model_type`` of its own (what a
fine-tuned model saved under the researcher's classes looks like), and ``MY_LLAVA``, the shipped LLaVA-1.5 record
copied under a new id and model class. Its tiny checkpoint holds the tiny LLaVA-1.5's weights, saved once as
``MyLlava`` and once as ``LlavaForConditionalGeneration``: through the user's family every answer must equal
LLaVA-1.5's on the same weights, token for token, with LLaVA-1.5's worked-out token counts (16 patches per 56-px
image, ConsensusDrop at 4 keeps 4). Without the package the checkpoint does not load at all (transformers knows no
``my_llava`` config). The commands run in fresh interpreters (``python -m llava.cli ask``, ``python -m eval run``),
the package in a folder on their path, where ``importlib.metadata`` finds its entry point; nothing is installed into
the environment. ``llava.load``, the route without a package (a file of ``VTPRUNE_METHODS``) and the errors run in
this process on a fresh loader state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

MYLLAVA = '''
import dataclasses

import transformers

from llava.families import registry


class MyLlavaConfig(transformers.LlavaConfig):
    model_type = "my_llava"


class MyLlava(transformers.LlavaForConditionalGeneration):
    """LLaVA-1.5 fine-tuned under a class name of its own."""

    config_class = MyLlavaConfig


transformers.AutoConfig.register("my_llava", MyLlavaConfig, exist_ok=True)

MY_LLAVA = dataclasses.replace(registry.get("llava"), id="my_llava", tiny="my-llava", name="My LLaVA",
                               model_class="MyLlava", model_type=MyLlava)
'''


def _package(folder: Path, name: str, entry_points: str, code: str) -> Path:
    """``name`` as pip installs it into ``folder``: its module and a ``*.dist-info`` folder whose ``entry_points.txt``
    holds ``entry_points``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(code)
    dist = folder / f"{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(entry_points)
    return folder


def _myllava(folder: Path) -> Path:
    return _package(folder, "myllava", "[vtprune.families]\nmy_llava = myllava:MY_LLAVA\n", MYLLAVA)


@pytest.fixture
def fresh_families(monkeypatch, tmp_path):
    """The registries and the loader as a fresh process has them before the user's packages load; the packages'
    folders put on the path by ``use``; everything restored after the test (the registries are process-wide)."""
    import llava.method as method
    import llava.plugins as plugins
    from llava.families import registry

    method.available_methods()
    families, methods, modules = dict(registry._FAMILIES), dict(method._REGISTRY), set(sys.modules)
    monkeypatch.delenv("VTPRUNE_METHODS", raising=False)
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "_failed", None)
    monkeypatch.setattr(registry, "_SOURCES", {})
    yield lambda *folders: [monkeypatch.syspath_prepend(str(f)) for f in folders]
    registry._FAMILIES.clear()
    registry._FAMILIES.update(families)
    method._REGISTRY.clear()
    method._REGISTRY.update(methods)
    for name in set(sys.modules) - modules:  # the packages' modules (in tmp_path)
        if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(the tiny LLaVA-1.5 saved as ``MyLlava`` with its config, the same weights saved as
    ``LlavaForConditionalGeneration``); the classes here are the package's under their names, transformers is not
    told of them in this process."""
    import transformers

    from llava.models import load

    rt = load("tiny:llava")
    my_config = type("MyLlavaConfig", (transformers.LlavaConfig,), {"model_type": "my_llava"})
    my_cls = type("MyLlava", (transformers.LlavaForConditionalGeneration,), {"config_class": my_config})
    mine = my_cls(my_config(**{k: v for k, v in rt.model.config.to_dict().items() if k != "model_type"}))
    mine.load_state_dict(rt.model.state_dict())
    root = tmp_path_factory.mktemp("checkpoints")
    for folder, model in (("mine", mine), ("llava", rt.model)):
        model.save_pretrained(root / folder)
        rt.tokenizer.save_pretrained(root / folder)
        rt.processor.image_processor.save_pretrained(root / folder)
    config = json.loads((root / "mine" / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("my_llava", ["MyLlava"])
    return root / "mine", root / "llava"


def _fresh(args: list[str], path: Path) -> subprocess.CompletedProcess:
    """``python <args>`` in a fresh interpreter with ``path`` on its Python path."""
    env = {k: v for k, v in os.environ.items() if k != "VTPRUNE_METHODS"}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), str(path)]), WANDB_MODE="disabled", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


ASK = ["ask", "--question", "what is in the picture?", "--method", "consensusdrop", "--budget", "4",
       "--max-new-tokens", "6", "--json"]


def test_ask_on_a_checkpoint_of_the_user_s_class_answers_as_the_family_it_copies(checkpoints, tmp_path, capsys):
    from llava.cli import main

    mine, llava = checkpoints
    r = _fresh(["-m", "llava.cli", *ASK, "--model", str(mine)], _myllava(tmp_path / "site"))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    capsys.readouterr()
    assert main([*ASK, "--model", str(llava)]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert got["visual_candidates"] == 16 and got["visual_entering_llm"] == 4 and got["answer"]
    keys = ("answer", "visual_candidates", "visual_entering_llm", "visual_per_layer")
    assert {k: got[k] for k in keys} == {k: ref[k] for k in keys}


def test_eval_run_on_a_checkpoint_of_the_user_s_class_answers_as_the_family_it_copies(checkpoints, fixture_data,
                                                                                      tmp_path, run_env):
    from eval.cli import main

    def run(model: Path):
        return ["run", "pope", "--model", str(model), "--method", "consensusdrop", "--budget", "4", "--data-root",
                str(fixture_data), "--out", str(tmp_path / model.name), "--no-wandb", "--launcher", "python",
                "--max-new-tokens", "4", "--run-name", "r"]

    def answers(model: Path):
        rd = tmp_path / model.name / "pope" / "r"
        rows = [json.loads(line) for line in (rd / "merge.jsonl").read_text().splitlines()]
        return {str(r["question_id"]): r["text"] for r in rows}, json.loads((rd / "results.json").read_text())["model"]

    mine, llava = checkpoints
    r = _fresh(["-m", "eval", *run(mine)], _myllava(tmp_path / "site"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert main(run(llava)) == 0
    (got, got_model), (ref, ref_model) = answers(mine), answers(llava)
    assert got == ref and len(got) > 0
    assert (got_model["family"], ref_model["family"]) == ("my_llava", "llava")
    assert (got_model["template"], got_model["budget_unit"]) == (ref_model["template"], ref_model["budget_unit"])


def test_llava_load_finds_the_family_of_the_checkpoint_s_class(checkpoints, tmp_path, fresh_families):
    """No command ran, only the package was imported (its config known to transformers): the registry, asked for
    the class ``MyLlava`` it does not know, registers the entry points' families."""
    from llava.families import registry
    from llava.models import load

    fresh_families(_myllava(tmp_path / "site"))
    import myllava  # noqa: F401

    assert "my_llava" not in registry.ids()
    rt = load(str(checkpoints[0]))
    assert (rt.family, type(rt.model).__name__, type(rt.model).__module__) == ("my_llava", "MyLlava", "myllava")
    assert registry.get("my-llava") is registry.get("my_llava") and registry.ids()[-1] == "my_llava"


FILE_FAMILY = '''
import dataclasses

import transformers

from llava.families import registry


class FileLlava(transformers.LlavaForConditionalGeneration):
    """LLaVA-1.5 under a class name of its own, its config the shipped one."""


registry.register_family(dataclasses.replace(registry.get("llava"), id="file_llava", tiny="file-llava",
                                             model_class="FileLlava", model_type=FileLlava))
'''


def test_a_module_of_vtprune_methods_registers_a_family_found_by_a_lookup(tmp_path, fresh_families, monkeypatch):
    """Without a package: a file named by ``VTPRUNE_METHODS`` calls ``register_family`` itself; a lookup of its model
    class, before any method was asked for, imports it with the methods."""
    from llava.families import registry

    f = tmp_path / "my_family.py"
    f.write_text(FILE_FAMILY)
    fresh_families()
    monkeypatch.setenv("VTPRUNE_METHODS", str(f))
    assert "file_llava" not in registry.ids()
    fam = registry.by_model_class("FileLlava")
    assert (fam.id, fam.tiny, fam.model_type.__name__, fam.adapter, fam.template) == (
        "file_llava", "file-llava", "FileLlava", registry.get("llava").adapter, "vicuna_v1")


BUILT_IN_ID = '''
import dataclasses

from llava.families import registry

MINE = dataclasses.replace(registry.get("llava"), tiny="mine", model_class="Mine")
'''

TWIN = '''
import dataclasses

from llava.families import registry

TWIN = dataclasses.replace(registry.get("llava"), id="twin", tiny="twin-{n}", model_class="Twin{n}")
'''


@pytest.mark.parametrize("case", ["not a record", "a module", "fails to import", "a built-in's id",
                                  "a built-in's class", "two packages, one id"])
def test_a_bad_family_package_is_one_error_line_naming_it(case, tmp_path, fresh_families):
    from llava.cli import load_error

    site = tmp_path / "site"
    head = "error: cannot load the family of "
    if case == "not a record":
        _package(site, "badfam", "[vtprune.families]\nbad = badfam:RECORD\n", "RECORD = {'id': 'bad'}\n")
        want = (head + "'badfam:RECORD' (named by entry point 'bad' of 'badfam' (vtprune.families)): TypeError: it "
                "names a dict, not a Family record (llava.families.Family)")
    elif case == "a module":
        _package(site, "badfam", "[vtprune.families]\nbad = badfam\n", "RECORD = None\n")
        want = (head + "'badfam' (named by entry point 'bad' of 'badfam' (vtprune.families)): TypeError: it names a "
                "module, not a Family record (name the record: 'module:ATTRIBUTE')")
    elif case == "fails to import":
        _package(site, "badfam", "[vtprune.families]\nbad = badfam:RECORD\n", "raise RuntimeError('my bug')\n")
        want = (head + "'badfam:RECORD' (named by entry point 'bad' of 'badfam' (vtprune.families)): RuntimeError: "
                "my bug")
    elif case == "a built-in's id":
        _package(site, "badfam", "[vtprune.families]\nmine = badfam:MINE\n", BUILT_IN_ID)
        want = (head + "'badfam:MINE' (named by entry point 'mine' of 'badfam' (vtprune.families)): ValueError: "
                "family 'llava': its id is taken by the built-in family 'llava' (LLaVA-1.5): give the family "
                "another id")
    elif case == "a built-in's class":
        _package(site, "badfam", "[vtprune.families]\nmine = badfam:MINE\n",
                 BUILT_IN_ID.replace('tiny="mine", model_class="Mine"',
                                     'id="mine", tiny="mine", model_class="LlavaForConditionalGeneration"'))
        want = (head + "'badfam:MINE' (named by entry point 'mine' of 'badfam' (vtprune.families)): ValueError: "
                "family 'mine': its model class is taken by the built-in family 'llava' (LLaVA-1.5): serve a class "
                "of its own (a subclass under another name)")
    else:  # the entry points in order of their names: a's registers twin, b's is refused
        _package(tmp_path / "a", "twina", "[vtprune.families]\na = twina:TWIN\n", TWIN.format(n="A"))
        _package(tmp_path / "b", "twinb", "[vtprune.families]\nb = twinb:TWIN\n", TWIN.format(n="B"))
        site = tmp_path / "b"
        fresh_families(tmp_path / "a")
        want = (head + "'twinb:TWIN' (named by entry point 'b' of 'twinb' (vtprune.families)): ValueError: family "
                "'twin': its id is taken by the family 'twin' of entry point 'a' of 'twina' (vtprune.families)")
    fresh_families(site)
    assert load_error() == want
    assert load_error() == want  # again at a later call: never a silent "unknown family"
    from llava.families import registry

    with pytest.raises(ValueError) as e:  # a lookup that finds no family says it too
        registry.get("my_llava")
    assert str(e.value) == want.removeprefix("error: ")
    if case == "two packages, one id":  # the first entry point's family stays registered
        assert registry.get("twin").model_class == "TwinA"
