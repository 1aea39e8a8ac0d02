"""The vLLM plugin's front-end planning (integrations/vllm/spec.py), which needs no vLLM: the token count it
reserves per image equals what the HF engine's vision stage really keeps, for every pre-LLM method; in-LLM
and image-dependent methods are refused with the reason; the spec's validation. (The plugin inside vLLM:
tests/test_vllm_plugin.py, in .venv-vllm.)"""

import pytest
import torch

from integrations.vllm.spec import PluginError, PruneSpec, planned_for_config
from llava.method import available_methods, get_method

BUDGET = 8
#: options that make a method run with a fixed budget on tiny:llava
OPTIONS = {"prumerge": {"budget_mode": "fixed"}, "apet": {"llm_stage": False}}
#: budgets other than BUDGET (downsample: s x s windows on the 4 x 4 grid reach 16, 4, 1)
BUDGETS = {"downsample": 4, "none": None}


def pre_llm_methods():
    out = []
    for name in available_methods():
        try:
            m = get_method(name, BUDGET, **OPTIONS.get(name, {}))
            m.setup(num_layers=4, num_vision_layers=3, family="llava")
        except (TypeError, ValueError):
            continue
        if not m.llm_layers and m.supports("llava") and not m.tower_stage and name != "novisual":
            out.append(name)
    return out


PRE_LLM = pre_llm_methods()


def test_the_pre_llm_methods_are_the_expected_ones():
    assert {"consensusdrop", "attnmix", "visionzip", "fastervlm", "divprune", "cdpruner", "vispruner", "hiprune",
            "downsample", "random", "prumerge", "none", "visiontrim", "apet"} <= set(PRE_LLM)
    assert not {"fastv", "pdrop", "sparsevlm", "dart"} & set(PRE_LLM)


@pytest.mark.parametrize("name", PRE_LLM)
def test_planned_count_equals_what_the_engine_keeps(runtimes, name):
    rt = runtimes["llava"]
    opts = OPTIONS.get(name, {})
    budget = BUDGETS.get(name, BUDGET)
    spec = PruneSpec.from_dict({"method": name, "budget": budget, "options": opts})
    s, planned = planned_for_config(spec, "llava", rt.model.config)
    assert s.tokens == 16 and s.grid == (4, 4) and s.cls_extra
    eng = rt.prune(name, budget, **opts)
    try:
        for seed, q in ((0, "what is this?"), (1, "how many red things are on the left?")):
            g = torch.Generator().manual_seed(seed)
            from PIL import Image

            img = Image.fromarray((torch.rand(40, 50, 3, generator=g) * 255).byte().numpy())
            inputs = rt.processor([q], images=[img])
            with torch.inference_mode():
                rt.model(**inputs)
            assert eng.stats.samples[0].visual_entering_llm == planned, (name, seed)
    finally:
        eng.remove()


@pytest.mark.parametrize("name,budget,options,why", [
    ("fastv", 8, {}, "prunes inside the LLM"),
    ("sparsevlm", 64, {}, "prunes inside the LLM"),
    ("flowcut", 8, {}, "inside the vision tower"),
    ("novisual", 8, {}, "keeps no visual token"),
    ("prumerge", None, {}, "depends on the image"),
    ("nosuch", 8, {}, "unknown pruning method"),
    ("visionzip", 8, {"nosuch": 1}, "unknown option"),
])
def test_refusals_name_the_reason(runtimes, name, budget, options, why):
    spec = PruneSpec.from_dict({"method": name, "budget": budget, "options": options})
    with pytest.raises(PluginError, match=why):
        planned_for_config(spec, "llava", runtimes["llava"].model.config)


def test_spec_validation():
    with pytest.raises(PluginError, match="must be a dict"):
        PruneSpec.from_dict("visionzip")
    with pytest.raises(PluginError, match="unknown key"):
        PruneSpec.from_dict({"method": "visionzip", "budgt": 64})
    with pytest.raises(PluginError, match="needs 'method'"):
        PruneSpec.from_dict({"budget": 64})
    s = PruneSpec.from_dict({"method": "visionzip", "budget": "64", "options": {"b": 1, "a": 2}})
    assert s.budget == 64 and s.options == (("a", 2), ("b", 1)) and hash(s)
    assert s.as_dict() == {"method": "visionzip", "budget": 64, "options": {"a": 2, "b": 1}, "template": None}


# ---------------------------------------------------------------- the geometry twin (NeXT / OneVision / Qwen counts)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """tiny:llava-next / tiny:llava-onevision / tiny:qwen2.5-vl saved as local folders (config, weights, tokenizer,
    image processor): what the twin reads (it never reads the weights)."""
    from llava.models import load

    out = {}
    for name in ("llava-next", "llava-onevision", "qwen2.5-vl"):
        rt = load(f"tiny:{name}", seed=2)
        d = tmp_path_factory.mktemp(name.replace(".", ""))
        rt.model.save_pretrained(d)
        rt.tokenizer.save_pretrained(d)
        rt.processor.image_processor.save_pretrained(d)
        out[rt.family] = str(d)
    return out


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "qwen2_5_vl"])
def test_twin_counts_equal_what_the_engine_keeps(saved, family):
    from PIL import Image

    from integrations.vllm.twin import Twin
    from llava.models import load

    rt = load(saved[family])
    rt.processor.pad_to_square = False
    tok = rt.model.config.image_token_id
    for method, budget in (("none", None), ("visionzip", 6), ("divprune", 6), ("random", 5)):
        twin = Twin(saved[family], PruneSpec.from_dict({"method": method, "budget": budget}))
        eng = rt.prune(method, budget)
        try:
            for i, (w, h) in enumerate(((140, 100), (90, 200), (300, 60), (56, 56))):
                g = torch.Generator().manual_seed(i)
                img = Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())
                enc = rt.processor(["what is in the image?"], images=[img])
                with torch.inference_mode():
                    rt.model(**enc)
                stock = int((enc["input_ids"] == tok).sum())
                assert twin.count(w, h) == (stock, eng.stats.samples[0].visual_entering_llm), (method, w, h)
        finally:
            eng.remove()
