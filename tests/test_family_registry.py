"""The family registry (llava/families/registry.py): one record per family, and everything else asks it.

A family the project does not ship, registered as one record - LLaVA-1.5's adapter, processors and tiny config
under a new id and a model class of its own (a subclass of transformers' LLaVA class under another name) - answers
through ``llava.cli ask``, ``eval run`` on the POPE fixture, the fast path and ``llava.check`` with no other file
edited. Its tiny model is LLaVA-1.5's (the same config and seed: the same weights), so every answer must equal the
tiny LLaVA-1.5's token for token, and its token counts are LLaVA-1.5's worked-out ones: 16 patches per 56-px image,
ConsensusDrop at 4 per image keeps 4.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest
import transformers as tf
from conftest import ALL_FAMILIES, make_batch

from llava.families import LlavaAdapter, images, registry, tiny
from llava.models import load

ROOT = Path(__file__).resolve().parent.parent


class LlavaCopyForConditionalGeneration(tf.LlavaForConditionalGeneration):
    """LLaVA-1.5 under another class name: the model class of a family the project does not ship."""


class LlavaNoFastForConditionalGeneration(tf.LlavaForConditionalGeneration):
    """Another one, whose record says the fast path does not plan it."""


COPY = registry.Family(
    "llava_copy", "llava-copy", "LLaVA-1.5 (a copy)", "LlavaCopyForConditionalGeneration", LlavaAdapter, "vicuna_v1",
    tiny.llava, images.CLIP, "visual tokens per image", model_type=LlavaCopyForConditionalGeneration,
    tiny_geometry="image")
NO_FAST = dataclasses.replace(COPY, id="llava_nofast", tiny="llava-nofast", model_class="LlavaNoFastForConditionalGeneration",
                              model_type=LlavaNoFastForConditionalGeneration, fast=False,
                              fast_reason="its captured prefill is not written yet")


@pytest.fixture
def copy_family():
    for f in (COPY, NO_FAST):
        registry.register_family(f)
    yield COPY
    for f in (COPY, NO_FAST):
        registry.unregister_family(f.id)


# ------------------------------------------------------------------------------------------------ the records


def test_every_family_is_one_record_with_its_traits():
    """The nine shipped families, their spellings and the traits code asks about (worked out from the models)."""
    fams = registry.families()
    assert [f.tiny for f in fams] == ["llava", "llava-next", "video-llava", "qwen2.5-vl", "llava-onevision",
                                      "qwen3-vl", "internvl", "qwen3.5", "qwen2-vl"]
    assert [f.id for f in fams] == ["llava", "llava_next", "video_llava", "qwen2_5_vl", "llava_onevision", "qwen3_vl",
                                    "internvl", "qwen3_5", "qwen2_vl"]
    assert list(registry.where(tower="clip")) == ["llava", "llava_next", "video_llava"]
    assert list(registry.where(qwen_grid=True)) == ["qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen2_vl"]
    assert list(registry.where(chat="chatml")) == ["qwen2_5_vl", "llava_onevision", "qwen3_vl", "internvl", "qwen3_5",
                                                   "qwen2_vl"]
    assert [f.id for f in fams if f.has_cls] == ["llava", "llava_next", "video_llava", "internvl"]
    assert [f.id for f in fams if not f.video] == ["llava", "llava_next"]
    assert [f.id for f in fams if f.mrope] == list(registry.where(qwen_grid=True))  # M-RoPE = the Qwen grid
    assert all(f.fast for f in fams)
    assert registry.get("qwen2.5-vl") is registry.get("qwen2_5_vl") and registry.key("llava-next") == "llava_next"
    assert registry.by_model_class("Qwen2VLForConditionalGeneration").id == "qwen2_vl"
    with pytest.raises(ValueError, match="unknown model family 'qwen9'"):
        registry.get("qwen9")


def test_a_taken_id_spelling_or_class_is_refused():
    for change in ({"tiny": "llava-copy2"}, {"id": "llava_copy2", "tiny": "llava"},
                   {"id": "llava_copy2", "tiny": "llava-copy2", "model_class": "LlavaForConditionalGeneration"}):
        f = dataclasses.replace(COPY, **{"id": "llava", **change})
        with pytest.raises(ValueError, match="is taken by 'llava'"):
            registry.register_family(f)
    with pytest.raises(ValueError, match="tower must be one of"):
        dataclasses.replace(COPY, tower="vit")
    with pytest.raises(ValueError, match="fast=False needs a fast_reason"):
        dataclasses.replace(COPY, fast=False)


def test_the_suite_runs_every_family():
    """The family-wide tests parametrize over the registry (Qwen2-VL included)."""
    assert ALL_FAMILIES == list(registry.tiny_names()) and "qwen2-vl" in ALL_FAMILIES


def test_a_trait_set_sees_a_family_registered_later(copy_family):
    clip = registry.where(tower="clip")
    assert "llava_copy" in clip and "llava-copy" in clip and "qwen2_5_vl" not in clip
    assert list(clip) == ["llava", "llava_next", "video_llava", "llava_copy", "llava_nofast"]


# ------------------------------------------------------------------------------------------ an eleventh family


def _ask_json(capsys, model):
    from llava.cli import main

    assert main(["ask", "--model", model, "--question", "what is in the picture?", "--method", "consensusdrop",
                 "--budget", "4", "--max-new-tokens", "6", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_ask_answers_on_a_registered_family(copy_family, capsys):
    copy = _ask_json(capsys, "tiny:llava-copy")
    ref = _ask_json(capsys, "tiny:llava")
    assert copy["visual_candidates"] == 16 and copy["visual_entering_llm"] == 4  # 16 patches, 4 kept per image
    assert copy["model"] == "tiny:llava-copy" and copy["answer"]
    keys = ("answer", "visual_candidates", "visual_entering_llm", "visual_per_layer")
    assert {k: copy[k] for k in keys} == {k: ref[k] for k in keys}


def test_eval_run_on_a_registered_family(copy_family, fixture_data, tmp_path, run_env):
    from eval.io import read_jsonl
    from eval.runner import RunConfig, run, run_dir_of

    def go(model):
        cfg = RunConfig(benchmark="pope", model=model, method="consensusdrop", budget=4, data_root=str(fixture_data),
                        out=str(tmp_path), wandb=False, max_new_tokens=4)
        assert run(cfg) == 0
        rd = run_dir_of(cfg)
        return rd, {str(r["question_id"]): r["text"] for r in read_jsonl(rd / "merge.jsonl")}

    rd, copy = go("tiny:llava-copy")
    _, ref = go("tiny:llava")
    assert rd.name == "tiny-llava-copy_consensusdrop_b4" and copy == ref and len(copy) > 0
    mod = json.loads((rd / "results.json").read_text())["model"]
    assert (mod["family"], mod["template"], mod["budget_unit"], mod["preprocess"]) == (
        "llava_copy", "vicuna_v1", "visual tokens per image", "pad")


def test_fast_path_plans_a_registered_family_and_refuses_one_whose_record_says_so(copy_family):
    from llava.check.fast import assert_same_as_eager

    fast = load("tiny:llava-copy", seed=1, fast=True, fast_max_new_tokens=16, fast_backend="none",
                fast_precompile=False)
    eager = load("tiny:llava", seed=1)
    eng = fast.prune("consensusdrop", 4)
    eager.prune("consensusdrop", 4)
    assert eng.fast is not None and eng.fast.refusal is None
    assert_same_as_eager(fast, eager, eng, make_batch(fast))
    assert eng.stats.path == "fast"
    nofast = load("tiny:llava-nofast", seed=1, fast=True, fast_max_new_tokens=16, fast_backend="none",
                fast_precompile=False)
    eng = nofast.prune("consensusdrop", 4)
    assert eng.fast.refusal == "the fast path does not plan llava_nofast models: its captured prefill is not written yet"


def test_llava_check_runs_on_a_registered_family(copy_family, capsys):
    from llava.check.__main__ import main

    code = main(["consensusdrop", "--families", "llava-copy", "--only", "batch", "cached", "selections"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [line for line in out.splitlines() if "llava-copy" in line]
    assert len(rows) == 3 and all("PASS" in r for r in rows), out


def test_a_method_limited_by_trait_takes_a_registered_family(copy_family):
    """HiPrune reads the [CLS] attention of the CLIP towers: its limit is the trait, so the copy runs it; InternVL
    has a [CLS] but not a CLIP tower."""
    from llava.method import method_supports

    assert method_supports("hiprune", "llava_copy") and not method_supports("hiprune", "internvl")


# ------------------------------------------------------------------------------------------ no family lists left

#: the core (llava/ outside llava/families/, eval/, bench/) files whose strings spell a family's name, each with why:
#: none of them is a list of families
SPELLERS = {
    "llava/conversation.py": "the templates qwen2_vl and qwen3_5 (template names, recorded in results.json)",
    "llava/preprocess_qwen_video.py": "the Qwen video rules qwen2_vl / qwen3_vl (after transformers' video processors)",
    "eval/run_config.py": "the default model tiny:llava of a light config module (llava.families imports the models)",
}
#: files where the string "llava" is the package's name, not the family's
PACKAGE_NAME = {"llava/method.py", "llava/fast/precompile.py"}


def _family_strings(path: Path) -> list[tuple[int, str]]:
    names = set(registry.ids()) | set(registry.tiny_names())
    tiny_rx = re.compile(r"tiny:(%s)\b" % "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)))
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docs and (n.value in names or tiny_rx.search(n.value))]


def test_family_ids_are_spelled_in_few_core_files():
    """Code asks the registry, never a list of family names: a string literal naming a family (its id, its tiny
    spelling or a ``tiny:<family>`` model) appears in the core only in the files listed, each for its reason."""
    found = {}
    for room in ("llava", "eval", "bench"):
        for p in sorted((ROOT / room).rglob("*.py")):
            rel = p.relative_to(ROOT).as_posix()
            if rel.startswith("llava/families/"):
                continue
            hits = [h for h in _family_strings(p) if not (rel in PACKAGE_NAME and h[1] == "llava")]
            if hits:
                found[rel] = hits
    assert sorted(found) == sorted(SPELLERS), {k: v[:5] for k, v in found.items() if k not in SPELLERS}
    assert len(SPELLERS) <= 3


def test_no_module_replaces_itself_in_sys_modules():
    """Every import names the module where the code lives: no alias module swaps itself for another."""
    rx = re.compile(r"sys\.modules\[__name__\]\s*=")
    offenders = [p.relative_to(ROOT).as_posix() for room in ("llava", "eval", "bench", "integrations", "baselines",
                                                            "consensusdrop", "visiondrop", "attnmix", "testbed")
                 for p in (ROOT / room).rglob("*.py") if rx.search(p.read_text())]
    assert offenders == []


def test_the_docs_family_table_is_the_registry():
    """docs/models.md's family table is :func:`llava.families.registry.markdown_table` (regenerate it with the
    command in that function's docstring)."""
    text = (ROOT / "docs/models.md").read_text()
    table = text.split("<!-- families:begin -->\n", 1)[1].split("\n<!-- families:end -->", 1)[0]
    assert table == registry.markdown_table()
    assert "nine families" in (ROOT / "docs/architecture.md").read_text() and len(registry.families()) == 9


def test_the_pixel_limits_refusal_names_the_qwen_grid_families_from_the_registry():
    from types import SimpleNamespace

    from eval.families import family_check

    cfg = SimpleNamespace(benchmark="pope", model="tiny:llava", min_pixels=3136, max_pixels=None)
    msg = family_check(cfg, SimpleNamespace(family="llava"), [])
    assert msg == ("--min-pixels / --max-pixels apply to the Qwen-VL grid families only (qwen2_5_vl, qwen3_vl, "
                   "qwen3_5, qwen2_vl), not to tiny:llava (llava)")
