"""The vLLM plugin's front-end planning (integrations/vllm/spec.py), which needs no vLLM: the token count it
reserves per image equals what the HF engine's vision stage really keeps, for every pre-LLM method; in-LLM
and image-dependent methods are refused with the reason; the spec's validation. (The plugin inside vLLM:
tests/test_vllm_plugin.py, in .venv-vllm.)"""

import pytest
import torch

from integrations.vllm.spec import PluginError, PruneSpec, planned_for_config
from llava.method import _REGISTRY, available_methods, get_method

BUDGET = 8
#: options that make a method run with a fixed budget on tiny:llava
OPTIONS = {"prumerge": {"budget_mode": "fixed"}, "apet": {"llm_stage": False}}
#: budgets other than BUDGET (downsample: s x s windows on the 4 x 4 grid reach 16, 4, 1)
BUDGETS = {"downsample": 4, "none": None}


def pre_llm_methods():
    out = []
    for name in available_methods():
        if _REGISTRY[name].__module__.startswith("test_"):  # planted in another test file (tests/test_check.py)
            continue
        try:
            m = get_method(name, BUDGET, **OPTIONS.get(name, {}))
            m.setup(num_layers=4, num_vision_layers=3, family="llava")
        except (TypeError, ValueError):
            continue
        if (not m.llm_layers and m.supports("llava") and not m.tower_stage and name != "novisual"
                and not m.biases_attention and m.vision_positions != "keep"):  # the plugin refuses those (RESTORE)
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
    """tiny:llava-next / tiny:llava-onevision / tiny:qwen2.5-vl / tiny:qwen3-vl saved as local folders (config,
    weights, tokenizer, image processor): what the twin reads (it never reads the weights)."""
    from llava.models import load

    out = {}
    for name in ("llava-next", "llava-onevision", "qwen2.5-vl", "qwen3-vl"):
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


def pre_llm_methods_for(family: str) -> list[str]:
    """The pre-LLM methods that run on ``family`` (as :func:`pre_llm_methods` for LLaVA)."""
    out = []
    for name in available_methods():
        if _REGISTRY[name].__module__.startswith("test_"):
            continue
        try:
            m = get_method(name, BUDGET, **OPTIONS.get(name, {}))
            m.setup(num_layers=4, num_vision_layers=3, family=family)
        except (TypeError, ValueError):
            continue
        if (not m.llm_layers and m.supports(family) and not m.tower_stage and name != "novisual"
                and not m.biases_attention and m.vision_positions != "keep"):
            out.append(name)
    return out


QWEN_PRE_LLM = pre_llm_methods_for("qwen2_5_vl")
#: videos of (frames, width, height): temporal slices of 2 frames (an odd count padded), resized grids
VIDEOS = ((8, 140, 100), (5, 90, 200), (2, 56, 56))


def test_the_qwen_pre_llm_methods_are_the_expected_ones():
    assert {"consensusdrop", "attnmix", "visionzip", "fastervlm", "divprune", "cdpruner", "vispruner", "downsample",
            "random", "none"} <= set(QWEN_PRE_LLM)


@pytest.mark.parametrize("name", QWEN_PRE_LLM)
def test_planned_video_count_equals_what_the_engine_keeps(saved, name):
    """Qwen2.5-VL videos (each temporal slice a unit): the twin's count for a video's grid (what vLLM's front end
    reserves) equals what the HF engine keeps of videos of that grid, for every pre-LLM method."""
    from PIL import Image

    from integrations.vllm.twin import Twin
    from llava.models import load

    rt = load(saved["qwen2_5_vl"])
    opts = OPTIONS.get(name, {})
    budget = BUDGETS.get(name, BUDGET)
    twin = Twin(saved["qwen2_5_vl"], PruneSpec.from_dict({"method": name, "budget": budget, "options": opts}))
    eng = rt.prune(name, budget, **opts)
    try:
        for i, (n, w, h) in enumerate(VIDEOS):
            g = torch.Generator().manual_seed(i)
            frames = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]
            enc = rt.processor(["what happens in the video?"], videos=[frames])
            with torch.inference_mode():
                rt.model(**enc)
            grid = [int(x) for x in enc["video_grid_thw"][0]]
            stock = int((enc["input_ids"] == rt.model.config.video_token_id).sum())
            assert twin.video_count(*grid) == (stock, eng.stats.samples[0].visual_entering_llm), (name, grid)
            if name not in ("none", "downsample") and i == 0:  # pruned, per temporal slice
                assert eng.stats.samples[0].visual_entering_llm < stock
    finally:
        eng.remove()


OV_PRE_LLM = pre_llm_methods_for("llava_onevision")
#: OneVision videos of (frames, width, height): every frame resized to the tower's square (tiny: 56 px, 4 x 4 patches
#: pooled to 2 x 2 tokens per frame), one newline after the video
OV_VIDEOS = ((6, 140, 100), (3, 90, 200), (1, 56, 56))
#: per-frame budgets that prune 4 tokens per frame (downsample: 2 x 2 windows reach 1); AttnMix's budget is per
#: video (2 * floor(floor(B / 2) / frames) per frame)
OV_BUDGETS = {"none": None, "downsample": 1, "attnmix": 12}


def test_the_onevision_pre_llm_methods_are_the_expected_ones():
    assert {"consensusdrop", "attnmix", "visionzip", "fastervlm", "divprune", "cdpruner", "vispruner", "downsample",
            "random", "none", "apet"} <= set(OV_PRE_LLM)


@pytest.mark.parametrize("name", OV_PRE_LLM)
def test_planned_onevision_video_count_equals_what_the_engine_keeps(saved, name):
    """LLaVA-OneVision videos (each frame a unit, one newline after the video): the twin's count for a video's frame
    count (what vLLM's front end reserves) equals what the HF engine keeps of videos of that many frames, whatever
    their size, for every pre-LLM method."""
    from PIL import Image

    from integrations.vllm.twin import Twin
    from llava.models import load

    rt = load(saved["llava_onevision"])
    opts = OPTIONS.get(name, {})
    budget = OV_BUDGETS.get(name, 2)
    twin = Twin(saved["llava_onevision"], PruneSpec.from_dict({"method": name, "budget": budget, "options": opts}))
    eng = rt.prune(name, budget, **opts)
    try:
        for i, (n, w, h) in enumerate(OV_VIDEOS):
            g = torch.Generator().manual_seed(i)
            frames = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]
            enc = rt.processor(["what happens in the video?"], videos=[frames])
            with torch.inference_mode():
                rt.model(**enc)
            stock = int((enc["input_ids"] == rt.model.config.video_token_id).sum())
            assert twin.video_key(enc) == (n,) and stock == n * 4 + 1
            assert twin.video_count(n) == (stock, eng.stats.samples[0].visual_entering_llm), (name, n)
            if name not in ("none",) and i == 0:  # pruned, per frame
                assert eng.stats.samples[0].visual_entering_llm < stock
    finally:
        eng.remove()


QWEN3_PRE_LLM = pre_llm_methods_for("qwen3_vl")
#: Qwen3-VL videos of (frames, width, height): temporal slices of 2 frames (an odd count padded), clips resized by
#: 32-px merged patches
QWEN3_VIDEOS = ((8, 140, 100), (5, 90, 200), (2, 64, 64))
#: methods whose split of a Qwen3-VL video's tokens over its slices depends on the video (served on one-run videos):
#: AttnMix ranks the whole video's tokens by text similarity (its global list L_t), so each slice's share varies
QWEN3_VIDEO_REFUSED = {"attnmix": "splits its tokens over a video's temporal slices depending on the video"}


def test_the_qwen3_pre_llm_methods_are_the_expected_ones():
    assert {"consensusdrop", "attnmix", "visionzip", "fastervlm", "divprune", "cdpruner", "vispruner", "downsample",
            "random", "none", "apet", "test_keep_first_k"} <= set(QWEN3_PRE_LLM)


def slice_counts(sel, per: int, t: int) -> list[int]:
    """The outputs of a video's vision-stage selection per temporal slice (a unit of ``per`` tokens): each kept or
    merged token in its source's slice (None: nothing selected, every token kept)."""
    if sel is None:
        return [per] * t
    src = [sel.keep.cpu()] + ([sel.targets.cpu()] if sel.targets is not None else [])
    return torch.bincount(torch.cat(src) // per, minlength=t).tolist()


@pytest.mark.parametrize("name", QWEN3_PRE_LLM)
def test_planned_qwen3_video_slices_equal_what_the_engine_keeps(saved, name):
    """Qwen3-VL videos (a timestamp and a marked run per temporal slice, each slice a unit): the twin's count per
    slice for a video's grid (what vLLM's front end reserves, slice by slice) equals what the HF engine keeps of each
    slice of videos of that grid (its selection's sources, slice by slice), for every pre-LLM method; a method that
    keeps the first k tokens of the video empties the later slices (a count of 0: the slice keeps its markers)."""
    from PIL import Image

    from integrations.vllm.twin import Twin
    from llava.models import load

    rt = load(saved["qwen3_vl"])
    opts = OPTIONS.get(name, {})
    budget = BUDGETS.get(name, BUDGET)
    twin = Twin(saved["qwen3_vl"], PruneSpec.from_dict({"method": name, "budget": budget, "options": opts}))
    eng = rt.prune(name, budget, **opts)
    refused = []
    try:
        for i, (n, w, h) in enumerate(QWEN3_VIDEOS):
            g = torch.Generator().manual_seed(i)
            frames = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]
            enc = rt.processor(["what happens in the video?"], videos=[frames])
            with torch.inference_mode():
                rt.model(**enc)
            t, gh, gw = grid = [int(x) for x in enc["video_grid_thw"][0]]
            per = gh * gw // 4
            stock = int((enc["input_ids"] == rt.model.config.video_token_id).sum())
            assert twin.video_key(enc) == tuple(grid) and stock == t * per and t == (n + 1) // 2
            n_in = eng.stats.samples[0].visual_entering_llm
            slices = slice_counts(eng.selections.get(("vision", 0)), per, t)
            if name in QWEN3_VIDEO_REFUSED:  # refused with the reason, and the engine's split does vary
                with pytest.raises(PluginError, match=QWEN3_VIDEO_REFUSED[name]):
                    twin.video_count(*grid)
                refused.append(slices)
                continue
            assert twin.video_count(*grid) == (stock, n_in), (name, grid)
            assert list(twin.video_slices(*grid)) == slices and sum(slices) == n_in, (name, grid, slices)
            if name == "test_keep_first_k" and i == 0:
                assert slices[-1] == 0
            elif name != "none" and not name.startswith("test_") and i == 0:  # pruned, the budget per slice
                assert n_in < stock and len(set(slices)) == 1
    finally:
        eng.remove()
    if name in QWEN3_VIDEO_REFUSED:
        assert any(len(set(s)) > 1 for s in refused), refused


def test_a_split_over_the_slices_that_depends_on_the_video_is_refused(saved, monkeypatch):
    """A method keeping the video's k largest-norm tokens wherever they are: a fixed count whose split over the
    temporal slices depends on the pixels; Qwen3-VL's prompt lays each slice's run out before the encoder runs, so
    the twin refuses it with the reason (on Qwen2.5-VL, one run per video, only the total matters: served)."""
    import llava.method as lm
    from integrations.vllm.twin import Twin

    class GlobalNormTopK(lm.Method):
        name = "test_global_norm_topk"
        vision_stage = True

        def select_vision(self, sig):
            return lm.Selection(keep=sig.features.norm(dim=-1).topk(self.budget).indices.sort().values)

    monkeypatch.setitem(lm._REGISTRY, GlobalNormTopK.name, GlobalNormTopK)
    spec = PruneSpec.from_dict({"method": GlobalNormTopK.name, "budget": 6})
    with pytest.raises(PluginError, match="splits its tokens over a video's temporal slices depending on the video"):
        Twin(saved["qwen3_vl"], spec).video_slices(4, 4, 4)
    assert Twin(saved["qwen2_5_vl"], spec).video_count(4, 4, 4)[1] == 6


def test_video_counts_are_refused_with_the_reason(saved):
    """Families whose videos the plugin does not serve (their twin counts none), and a key of the wrong kind."""
    from integrations.vllm.twin import Twin

    twin = Twin(saved["llava_next"], PruneSpec.from_dict({"method": "visionzip", "budget": 6}))
    with pytest.raises(PluginError, match="videos on the HF engine only"):
        twin.video_count(2, 4, 4)
    ov = Twin(saved["llava_onevision"], PruneSpec.from_dict({"method": "visionzip", "budget": 2}))
    with pytest.raises(PluginError, match="keyed by its frame count"):
        ov.video_count(2, 4, 4)
    qwen = Twin(saved["qwen2_5_vl"], PruneSpec.from_dict({"method": "visionzip", "budget": 2}))
    with pytest.raises(PluginError, match="keyed by its patch grid"):
        qwen.video_count(4)
    # AttnMix's budget is per video: 4 over 3 frames keeps nothing per frame, refused with the engine's reason
    am = Twin(saved["llava_onevision"], PruneSpec.from_dict({"method": "attnmix", "budget": 4}))
    with pytest.raises(PluginError, match="keeps nothing"):
        am.video_count(3)


# ---------------------------------------------------------------- the checkpoint's revision (issue 30 follow-up)

REV_A, REV_B = "a" * 40, "b" * 40
#: revision B of the NeXT repository: one 112 x 112 pinpoint (A: TINY_PINPOINTS, up to 3 crops) in its config and
#: its processor, and another model_max_length in its tokenizer's config
B_PINPOINTS = [[112, 112]]
B_MAX_LEN = 777


def set_json(folder, key, value) -> int:
    """``key`` set to ``value`` wherever it occurs (nested too) in the folder's JSON files; how many were set."""
    import json
    from pathlib import Path

    n = 0

    def walk(o):
        nonlocal n
        if isinstance(o, dict):
            for k in o:
                if k == key:
                    o[k] = value
                    n += 1
                else:
                    walk(o[k])
        elif isinstance(o, list):
            for v in o:
                walk(v)

    for f in Path(folder).glob("*.json"):
        if f.name == "tokenizer.json":
            continue
        data = json.loads(f.read_text())
        walk(data)
        f.write_text(json.dumps(data))
    return n


def hub_repo(hub, repo_id: str, snapshots: dict, main: str):
    """A repository in a hub cache, in the hub's own layout (as tests/test_loading_revision.py builds it):
    ``snapshots/<commit>/`` written by each builder, ``refs/main`` -> ``main``."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    for commit, build in snapshots.items():
        build(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(main)
    return repo


def engine_qwen(path):
    """tiny:qwen2.5-vl saved as a folder, as the ``saved`` fixture does (the vLLM-layout saver needs torchvision's
    video processor, which this environment lacks)."""
    from llava.models import load

    rt = load("tiny:qwen2.5-vl", seed=2)
    rt.model.save_pretrained(path)
    rt.tokenizer.save_pretrained(path)
    rt.processor.image_processor.save_pretrained(path)
    assert set_json(path, "longest_edge", 224 * 224)  # images up to 224^2 px (overrides() counts the largest)


def next_b(path):
    from integrations.vllm.tiny import save_tiny_llava_next

    save_tiny_llava_next(path, seed=2)
    assert set_json(path, "image_grid_pinpoints", B_PINPOINTS) >= 2  # the config's and the processor's
    assert set_json(path, "model_max_length", B_MAX_LEN) == 1


REVISION_CODE = r"""
import json, sys, torch
from PIL import Image
from integrations.vllm import overrides
from integrations.vllm.spec import PruneSpec
from integrations.vllm.twin import twin_for
from llava.models import load

B = sys.argv[1]
SIZES = [(300, 60), (140, 100)]
out = {"twin": {}, "engine": {}, "overrides": {}}
for rev in (None, "main", B):
    row = {}
    for method, budget in (("none", None), ("visionzip", 6)):
        twin = twin_for("org/tiny-next", PruneSpec.from_dict({"method": method, "budget": budget}), rev)
        row[method] = [list(twin.count(w, h)) for w, h in SIZES]
    row["config_pinpoints"] = [list(p) for p in twin.rt.model.config.image_grid_pinpoints]
    row["processor_pinpoints"] = [list(p) for p in twin.rt.processor.image_processor.image_grid_pinpoints]
    row["max_len"] = int(twin.rt.tokenizer.model_max_length)
    out["twin"][str(rev)] = row
for rev in (None, B):  # what the HF engine keeps on the real checkpoint at that revision
    rt = load("org/tiny-next", revision=rev)
    rt.processor.pad_to_square = False
    row = []
    for w, h in SIZES:
        g = torch.Generator().manual_seed(0)
        img = Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())
        enc = rt.processor(["what is in the image?"], images=[img])
        eng = rt.prune("visionzip", 6)
        with torch.inference_mode():
            rt.model(**enc)
        row.append([int((enc["input_ids"] == rt.model.config.image_token_id).sum()),
                    eng.stats.samples[0].visual_entering_llm])
        eng.remove()
    out["engine"][str(rev)] = row
for repo in ("org/tiny-next", "org/tiny-mixed"):
    for rev in (None, B):
        out["overrides"][repo + "@" + str(rev)] = overrides(repo, "visionzip", 6, revision=rev)
print(json.dumps(out))
"""


def test_the_front_end_reads_the_requested_revision(tmp_path):
    """A hub cache (read offline in a fresh process) with two revisions of a tiny LLaVA-NeXT whose anyres grids differ
    (so the planned counts differ) and a repository whose revision B is another architecture: the geometry twin's
    config, tokenizer and image processor, its counts and overrides() follow the revision asked for; the default
    (None) is refs/main's; the twin's counts at B are what the HF engine loaded at B keeps."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from integrations.vllm.tiny import TINY_PINPOINTS, save_tiny_llava, save_tiny_llava_next

    hub = tmp_path / "hub"
    hub_repo(hub, "org/tiny-next", {REV_A: lambda p: save_tiny_llava_next(p, seed=1), REV_B: next_b}, main=REV_A)
    hub_repo(hub, "org/tiny-mixed", {REV_A: save_tiny_llava, REV_B: engine_qwen}, main=REV_A)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(root)}
    p = subprocess.run([sys.executable, "-c", REVISION_CODE, REV_B], env=env, capture_output=True, text=True, cwd=root,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    twin, engine, ov = out["twin"], out["engine"], out["overrides"]
    assert twin["None"] == twin["main"]  # the default is refs/main
    assert twin["main"]["config_pinpoints"] == twin["main"]["processor_pinpoints"] == TINY_PINPOINTS
    assert twin[REV_B]["config_pinpoints"] == twin[REV_B]["processor_pinpoints"] == B_PINPOINTS
    assert twin["main"]["max_len"] != B_MAX_LEN and twin[REV_B]["max_len"] == B_MAX_LEN  # B's tokenizer
    # B's single pinpoint: fewer crops for the 300 x 60 image, so another count unpruned and planned
    assert twin[REV_B]["none"][0][0] < twin["main"]["none"][0][0]
    assert twin[REV_B]["visionzip"] != twin["main"]["visionzip"]
    # the twin's (unpruned, planned) counts are the HF engine's at the same revision
    assert engine["None"] == twin["main"]["visionzip"] and engine[REV_B] == twin[REV_B]["visionzip"]
    # overrides(): the config at the revision asked for (B of org/tiny-mixed is a Qwen2.5-VL), recorded in the spec
    assert ov["org/tiny-mixed@None"]["architectures"] == ["VtpruneLlavaForConditionalGeneration"]
    assert ov[f"org/tiny-mixed@{REV_B}"]["architectures"] == ["VtpruneQwen2_5_VLForConditionalGeneration"]
    assert ov["org/tiny-next@None"]["architectures"] == ["VtpruneLlavaNextForConditionalGeneration"]
    assert "revision" not in ov["org/tiny-next@None"]["vtprune"]
    assert ov[f"org/tiny-next@{REV_B}"]["vtprune"]["revision"] == REV_B


class Resolved(str):
    """A stand-in for huggingface_hub's ResolvedRevision (what vLLM's model config holds): a str equal to the
    revision asked for, with the commit it resolved to."""

    def __new__(cls, initial, resolved):
        s = super().__new__(cls, initial or "main")
        s.resolved = resolved
        return s


def test_the_spec_refuses_to_be_served_at_another_revision():
    from integrations.vllm.spec import revision_key

    spec = PruneSpec.from_dict({"method": "visionzip", "budget": 8, "revision": "v1"})
    assert spec.revision == "v1" and spec.as_dict()["revision"] == "v1" and PruneSpec.from_dict(spec.as_dict()) == spec
    assert spec.check_revision("v1") is spec and spec.check_revision(Resolved("v1", REV_A)) is spec
    for served in (None, "main", "v2", Resolved(None, REV_A)):
        with pytest.raises(PluginError, match="revision 'v1'.*LLM\\(..., revision='v1'\\)"):
            spec.check_revision(served)
    # a spec made without a revision is served at any; main and None are the default branch
    plain = PruneSpec.from_dict({"method": "visionzip", "budget": 8})
    assert plain.check_revision("v2") is plain and "revision" not in plain.as_dict()
    main = PruneSpec.from_dict({"method": "visionzip", "budget": 8, "revision": "main"})
    assert main.check_revision(None) is main and main.check_revision(Resolved(None, REV_A)) is main
    # a commit asked for in overrides() and the branch vLLM resolved to it
    commit = PruneSpec.from_dict({"method": "visionzip", "budget": 8, "revision": REV_A})
    assert commit.check_revision(Resolved("main", REV_A)) is commit
    # cache keys: a branch resolved to two commits is two keys
    assert revision_key(None) == (None, None) and revision_key("v1") == ("v1", None)
    assert revision_key(Resolved("main", REV_A)) != revision_key(Resolved("main", REV_B))
