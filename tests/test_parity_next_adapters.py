"""The method adapters on LLaVA-NeXT (``python -m parity next --method fastervlm``; parity/next.py, the adapters'
``NEXT`` hooks in parity/adapters/__init__.py): the official fork's NeXT path (a clone of Theia-4869/FasterVLM, ``bash
scripts/official_clones.sh fastervlm``) in ``.venv-official`` beside our ``fastervlm`` with ``next_layout="spatial"``
and ``next_geometry="official"``, on the tiny NeXT weights of ``parity.build.build_next`` (24 x 24 patches per crop).

The comparison logic runs everywhere; the runs against the official code are opt-in: skipped without
``.venv-official`` or the clone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import OFFICIAL_PY, needs_official

from parity import adapters
from parity import next as nx
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

REPO = Path(__file__).resolve().parents[1]
CLONE = REPO / ".official" / "fastervlm"
needs_clone = pytest.mark.skipif(not (CLONE / "llava").is_dir(),
                                 reason="no clone: run `bash scripts/official_clones.sh fastervlm`")
VP_CLONE = REPO / ".official" / "vispruner"
needs_vp_clone = pytest.mark.skipif(not (VP_CLONE / "llava").is_dir(),
                                    reason="no clone: run `bash scripts/official_clones.sh vispruner`")
CD_CLONE = REPO / ".official" / "cdpruner"
needs_cd_clone = pytest.mark.skipif(not (CD_CLONE / "llava").is_dir(),
                                    reason="no clone: run `bash scripts/official_clones.sh cdpruner`")
VZ_CLONE = REPO / ".official" / "visionzip"
needs_vz_clone = pytest.mark.skipif(not (VZ_CLONE / "visionzip").is_dir(),
                                    reason="no clone: run `bash scripts/official_clones.sh visionzip`")


# -- without the official environment ------------------------------------------------------------------------------
def test_the_next_methods_are_flowcut_and_the_adapters_that_opt_in():
    assert {"flowcut", "fastervlm", "visionzip"} <= set(nx.next_methods())
    assert "pdrop" not in nx.next_methods() and "cdpruner" in nx.next_methods()
    assert adapters.get("vispruner").NEXT_LOAD == {"next_layout": "spatial"}
    assert adapters.get("cdpruner").NEXT_LOAD == {"next_layout": "spatial"}
    assert adapters.get("visionzip").NEXT_LOAD == {"next_layout": "spatial"}
    mod = adapters.get("fastervlm")
    assert mod.NEXT and mod.NEXT_LOAD == {"next_layout": "spatial"}
    assert all(0 < t < 576 for t in mod.NEXT_BUDGETS)  # per crop of 24 x 24 patches: every crop is pruned
    specs = nx.adapter_specs("fastervlm", (58,), 2)
    assert specs == [{"name": "fastervlm", "budget": 58, "batches": [[0], [1], [0, 1]]}]


def test_vispruners_fixed_resolution_on_our_side():
    """The fork's fixed 2 x 2 grid (672 x 672 = 2 x 2 crops of CLIP-L/336) as our runtime gets it: the model's and the
    processor's pinpoints = the one 2 x 2 resolution of the tower."""
    from types import SimpleNamespace

    rt = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(image_size=96),
                                                                      image_grid_pinpoints=[[96, 192]])),
                         processor=SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=[[96, 192]])))
    adapters.get("vispruner").next_runtime(rt)
    assert rt.model.config.image_grid_pinpoints == rt.processor.image_processor.image_grid_pinpoints == [[192, 192]]


def test_cdpruners_fixed_resolution_and_clip_folder_on_our_side(monkeypatch):
    """CDPruner's fork fixes the same 2 x 2 grid as VisPruner's (our pinpoints = the one 2 x 2 resolution), and our
    NeXT options are the reference mode with the official relevance on the NeXT build's folders (``info``, passed by
    ``our_adapter_method``: ``clip-next/`` and our NeXT checkpoint)."""
    from types import SimpleNamespace

    mod = adapters.get("cdpruner")
    rt = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(image_size=96),
                                                                      image_grid_pinpoints=[[96, 192]])),
                         processor=SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=[[96, 192]])))
    mod.next_runtime(rt)
    assert rt.model.config.image_grid_pinpoints == rt.processor.image_processor.image_grid_pinpoints == [[192, 192]]
    monkeypatch.setattr(mod, "clip_model", lambda folder: ("clip model of", folder))
    name, options = nx.our_adapter_method("cdpruner", 64, "fp32", {"clip": "w/clip-next", "hf": "w/next-hf"})
    assert name == "cdpruner" and options == {"numerics": "official", "relevance": "clip", "reference_dtype": "model",
                                              "clip_model": ("clip model of", "w/clip-next"),
                                              "clip_tokenizer": "w/clip-next", "llm_tokenizer": "w/next-hf"}
    # the adapters without ours_next: their LLaVA-1.5 ``ours``, as before
    assert nx.our_adapter_method("vispruner", 64, "fp32", {"clip": "w/clip-next"}) == \
        ("vispruner", {"numerics": "official", "important_ratio": 0.5})


def test_run_refuses_a_method_without_a_next_adapter():
    with pytest.raises(ValueError, match="no NeXT parity adapter for pdrop"):
        nx.run({"images": [], "hf": "unused"}, "python", Path("."), methods=("pdrop",))


def _runs(**change):
    """One official and one of our adapter runs (an image of 2 crops, T = 2 per crop) that agree; ``change`` plants a
    difference in ours."""
    meth = {"name": "fastervlm", "budget": 2, "batches": [[0]]}
    off = {"method": meth, "batch": [0], "ids": [[1, -200, 4, 5]], "pixel_values": [torch.zeros(2, 3, 2, 2)],
           "logits": torch.zeros(1, 7, 9), "tokens": [[1, 9, 2, 0]], "bos": 1,
           "kept": [("vision", torch.tensor([[0, 3], [1, 2]]))]}
    ours = {"method": meth, "batch": [0], "input_ids": torch.tensor([[1] + [3] * 8 + [4, 5]]),
            "attention_mask": torch.ones(1, 11, dtype=torch.long), "logits": torch.zeros(1, 7, 9), "real": [7],
            "tokens": [[9, 2, 5]], "kept": [("vision", torch.tensor([[0, 3], [1, 2]]))], "crops": [2],
            "image_token_id": 3}
    ours.update(change)
    return {"runs": [off]}, [ours]


def test_compare_adapters_agrees_on_the_same_runs():
    off, mine = _runs()
    (check,) = nx.compare_adapters(off, mine, "fp32 official", 1e-5, eos=2)
    assert check.ok, check.detail
    assert check.group == "next-fastervlm" and check.case == "fp32 official fastervlm T=2/crop batch [0]"
    assert "per crop identical (vision: 2)" in check.detail


@pytest.mark.parametrize("change, words", [
    ({"kept": [("vision", torch.tensor([[0, 3], [1, 3]]))]}, "per crop DIFFER"),
    ({"kept": []}, "per crop DIFFER"),
    ({"crops": [3]}, "crops DIFFER (official [2], ours [3])"),
    ({"logits": torch.zeros(1, 8, 9), "real": [8]}, "logits max abs diff inf"),  # a visual token more
    ({"logits": torch.full((1, 7, 9), 2e-5)}, "logits max abs diff 2.00e-05"),
    ({"tokens": [[8, 2]]}, "greedy tokens DIFFER"),
])
def test_compare_adapters_fails_on_each_kind_of_difference(change, words):
    off, mine = _runs(**change)
    (check,) = nx.compare_adapters(off, mine, "fp32 official", 1e-5, eos=2)
    assert not check.ok and words in check.detail, check.detail


def test_compare_adapters_refuses_runs_out_of_step():
    off, mine = _runs()
    mine[0]["method"] = dict(mine[0]["method"], budget=3)
    with pytest.raises(ValueError, match="out of step"):
        nx.compare_adapters(off, mine, "fp32 official", 1e-5, eos=2)


# -- against the official code (opt-in) -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    from parity.build import build_next

    work = tmp_path_factory.mktemp("parity-next-adapters")
    return work, build_next(work, str(OFFICIAL_PY), seed=request.param)


def _run(built, clones: Path, budgets=(58,)):
    work, info = built
    return nx.run(info, str(OFFICIAL_PY), work, dtypes=("fp32",), budgets=budgets, max_new_tokens=4,
                  methods=("fastervlm",), variants=("official",), clones=clones)


def _fork_with(clones: Path, path: str, old: str, new: str) -> Path:
    """A copy of the FasterVLM clone's ``llava/`` under ``clones/fastervlm`` with ``old`` (found exactly once in
    ``path``) replaced by ``new``."""
    shutil.copytree(CLONE / "llava", clones / "fastervlm" / "llava")
    f = clones / "fastervlm" / path
    text = f.read_text()
    assert text.count(old) == 1, f"{old!r} not found exactly once in {path}"
    f.write_text(text.replace(old, new))
    return clones


@needs_official
@needs_clone
def test_fastervlm_on_next_agrees_where_the_fork_cuts_the_same_crops(built):
    """T = 58 per crop (90 % of 576), fp32, each image alone and the batch of four. The 160 x 96 and 90 x 140 images
    (a 1 x 2 and a 2 x 1 grid on both sides): kept patches of every crop, logits (bit-identical) and tokens identical.
    The 96 x 96 and 176 x 99 images: the fork's own ``select_best_resolution`` (``llava/mm_utils.py``: the pinpoint
    with the highest fill ratio) picks 192 x 192 (5 crops) and 192 x 96 (3 crops) where LLaVA's (llava-torch, our
    ``next_geometry="official"``) picks 96 x 192 (3) and 192 x 192 (5)."""
    checks = _run(built, CLONE.parent)
    assert all(c.ok for c in checks if c.group != "next-fastervlm")  # the unpruned model on llava-torch
    rows = {c.case: c for c in checks if c.group == "next-fastervlm"}
    assert len(rows) == 5
    for i in (1, 2):
        c = rows[f"fp32 official fastervlm T=58/crop batch [{i}]"]
        assert c.ok, c.detail
        assert max(c.data["logits_max_abs_diff"]) == 0
        assert c.data["official_crops"] == [3]
        (stage, kept), = c.data["official_kept"]
        assert stage == "vision" and len(kept) == 3 and all(len(k) == 58 for k in kept)
    assert rows["fp32 official fastervlm T=58/crop batch [0]"].data["official_crops"] == [5]
    assert rows["fp32 official fastervlm T=58/crop batch [0]"].data["our_crops"] == [3]
    assert rows["fp32 official fastervlm T=58/crop batch [3]"].data["official_crops"] == [3]
    assert rows["fp32 official fastervlm T=58/crop batch [3]"].data["our_crops"] == [5]
    assert not any(rows[f"fp32 official fastervlm T=58/crop batch [{i}]"].ok for i in (0, 3))


@needs_official
@needs_clone
def test_with_llavas_select_best_resolution_in_the_fork_every_image_agrees(built, tmp_path):
    """The cause of the two rows above, isolated: a copy of the clone whose ``select_best_resolution`` is replaced by
    llava-torch 1.2.2.post1's (max effective resolution, then min waste): every FasterVLM row identical."""
    import glob

    mm = (CLONE / "llava" / "mm_utils.py").read_text()
    ref = Path(glob.glob(str(OFFICIAL_PY.parents[1] / "lib" / "python3*" / "site-packages" / "llava" /
                             "mm_utils.py"))[0]).read_text()

    def fn(text):
        a = text.index("def select_best_resolution")
        return text[a:text.index("\ndef ", a)]

    clones = _fork_with(tmp_path / "clones", "llava/mm_utils.py", fn(mm), fn(ref))
    checks = _run(built, clones)
    bad = [(c.case, c.detail) for c in checks if not c.ok]
    assert not bad, bad


@needs_official
@needs_clone
def test_a_planted_change_in_the_official_fastervlm_makes_next_parity_fail(built, tmp_path):
    """The clone copied, its head mean of the [CLS] attention replaced by the max over heads: the kept patches of the
    rows that agreed differ."""
    clones = _fork_with(tmp_path / "clones", "llava/model/llava_arch.py",
                        "image_attentions = image_attentions.mean(dim=1) # (B, N)",
                        "image_attentions = image_attentions.amax(dim=1) # (B, N)")
    checks = _run(built, clones)
    assert all(c.ok for c in checks if c.group != "next-fastervlm")
    rows = {c.case: c for c in checks if c.group == "next-fastervlm"}
    for i in (1, 2):
        assert "per crop DIFFER" in rows[f"fp32 official fastervlm T=58/crop batch [{i}]"].detail


def _run_vz(built, clones: Path):
    work, info = built
    return nx.run(info, str(OFFICIAL_PY), work, dtypes=("fp32",), budgets=(32,), max_new_tokens=4,
                  methods=("visionzip",), variants=("official",), clones=clones, image_ids=(0, 3))


@needs_official
@needs_vz_clone
def test_visionzip_on_next_agrees_with_the_official_code(built):
    """27 + 5 per crop, fp32, the 96 x 96 (3 crops) and 176 x 99 (5 crops) images alone and together: dominant sets,
    contextual targets and each merged token's target per crop identical, tokens identical, logits within 1e-5
    (two projector calls on our side: docs/parity.md)."""
    checks = _run_vz(built, VZ_CLONE.parent)
    bad = [(c.case, c.detail) for c in checks if not c.ok]
    assert not bad, bad
    rows = [c for c in checks if c.group == "next-visionzip"]
    assert len(rows) == 3
    for c in rows:
        assert [s for s, _ in c.data["official_kept"]] == ["dominant", "targets", "merge"]
        dom = c.data["official_kept"][0][1]
        assert len(dom) == sum(c.data["official_crops"]) and all(len(d) == 27 and d[0] == 0 for d in dom)


@needs_official
@needs_vz_clone
def test_a_planted_change_in_visionzips_next_packing_makes_parity_fail(built, tmp_path):
    """A copy of the clone whose ``restore_image_features_sorted`` lays the grid crops' features out crop by crop (the
    row-major re-assembly's permute dropped, its mask's kept): the kept sets agree, the logits of the 2 x 2 grid
    (176 x 99, alone and in the batch) do not; the 2 x 1 grid (96 x 96: one crop per row, the permute moves nothing)
    still agrees."""
    clones = tmp_path / "clones"
    shutil.copytree(VZ_CLONE / "visionzip", clones / "visionzip" / "visionzip")
    f = clones / "visionzip" / "visionzip" / "llava_arch.py"
    text = f.read_text()
    old = "restored_features = restored_features.permute(0, 2, 1, 3, 4).contiguous()"
    assert text.count(old) == 1
    f.write_text(text.replace(old, "restored_features = restored_features.contiguous()"))
    checks = _run_vz(built, clones)
    rows = [c for c in checks if c.group == "next-visionzip"]
    assert all(c.ok for c in checks if c.group != "next-visionzip")
    assert all(c.data["official_kept"] == c.data["our_kept"] for c in rows)
    by = {c.case.split("batch ")[1]: c for c in rows}
    assert by["[0]"].ok
    assert all(not by[b].ok and max(by[b].data["logits_max_abs_diff"]) > 1e-5 for b in ("[1]", "[0, 1]"))


def _run_vp(built, clones: Path):
    work, info = built
    return nx.run(info, str(OFFICIAL_PY), work, dtypes=("fp32",), budgets=(64, 128), max_new_tokens=4,
                  methods=("vispruner",), variants=("official",), clones=clones, image_ids=(0, 3))


@needs_official
@needs_vp_clone
def test_vispruner_on_next_agrees_with_the_official_code(built):
    """T = 64 and 128 per crop (r = 0.5), fp32, each image alone (``OFFICIAL["alone"]``): the fork's fixed resolution
    mapped to the tiny tower's 2 x 2 grid on both sides (5 crops for every image), the kept patches of every crop,
    logits (bit-identical) and tokens identical. On seed 4 the 176 x 99 image at T = 128 is the row that parted while
    our reference [CLS] row came from the [CLS] query alone (17 patches of crop 4)."""
    checks = _run_vp(built, VP_CLONE.parent)
    bad = [(c.case, c.detail) for c in checks if not c.ok]
    assert not bad, bad
    rows = [c for c in checks if c.group == "next-vispruner"]
    assert len(rows) == 4
    for c in rows:
        t = int(c.case.split("T=")[1].split("/")[0])
        assert c.data["official_crops"] == [5] and max(c.data["logits_max_abs_diff"]) == 0
        (stage, kept), = c.data["official_kept"]
        assert stage == "vision" and len(kept) == 5 and all(len(k) == t for k in kept)


@needs_official
@needs_vp_clone
def test_vispruners_fixed_resolution_is_refused_when_the_literal_changes(built, tmp_path):
    """A copy of the clone whose fixed NeXT resolution is written another way: the adapter cannot map it to the tiny
    tower and refuses (the official worker fails) rather than run on CLIP-L/336's 672 x 672."""
    clones = tmp_path / "clones"
    shutil.copytree(VP_CLONE / "llava", clones / "vispruner" / "llava")
    f = clones / "vispruner" / "llava" / "mm_utils.py"
    text = f.read_text()
    old = "possible_resolutions = [(672, 672)]"
    assert text.count(old) == 1
    f.write_text(text.replace(old, "possible_resolutions = [(672, 672), ]"))
    with pytest.raises(RuntimeError, match="expected one"):
        _run_vp(built, clones)


def _run_cd(built, clones: Path, dtypes=("fp32",)):
    work, info = built
    return nx.run(info, str(OFFICIAL_PY), work, dtypes=dtypes, budgets=(64,), max_new_tokens=4,
                  methods=("cdpruner",), variants=("official",), clones=clones, image_ids=(0, 3))


@needs_official
@needs_cd_clone
def test_cdpruner_on_next_agrees_with_the_official_code(built):
    """T = 64 per crop, fp32, each image alone (``OFFICIAL["alone"]``): the fork's fixed resolution mapped to the tiny
    tower's 2 x 2 grid on both sides (5 crops for every image), the CLIP text relevance from ``clip-next/`` (a whole
    ``CLIPModel``), one min-max over the image's crops: the kept patches of every crop, logits (bit-identical) and
    tokens identical."""
    import json

    assert json.loads((Path(built[1]["clip"]) / "config.json").read_text())["architectures"] == ["CLIPModel"]
    checks = _run_cd(built, CD_CLONE.parent)
    bad = [(c.case, c.detail) for c in checks if not c.ok]
    assert not bad, bad
    rows = [c for c in checks if c.group == "next-cdpruner"]
    assert len(rows) == 2
    for c in rows:
        assert c.data["official_crops"] == [5] and max(c.data["logits_max_abs_diff"]) == 0
        (stage, kept), = c.data["official_kept"]
        assert stage == "vision" and len(kept) == 5 and all(len(k) == 64 for k in kept)


def _cd_fork_with(clones: Path, path: str, old: str, new: str) -> Path:
    shutil.copytree(CD_CLONE / "llava", clones / "cdpruner" / "llava")
    f = clones / "cdpruner" / path
    text = f.read_text()
    assert text.count(old) == 1, f"{old!r} not found exactly once in {path}"
    f.write_text(text.replace(old, new))
    return clones


@needs_official
@needs_cd_clone
def test_a_planted_change_in_cdpruners_next_relevance_makes_parity_fail(built, tmp_path):
    """A copy of the clone whose relevance min-max runs per crop (``min`` / ``max`` over each row) instead of once
    over all crops of the image (what the fork's one ``encode_images`` call on the image's crops does, our
    ``minmax_scope="image"``): the kept patches differ."""
    clones = _cd_fork_with(tmp_path / "clones", "llava/model/llava_arch.py",
                           "relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())",
                           "relevance = (relevance - relevance.amin(-1, True) + 1e-6) / "
                           "(relevance.amax(-1, True) - relevance.amin(-1, True))")
    checks = _run_cd(built, clones)
    rows = [c for c in checks if c.group == "next-cdpruner"]
    assert all(c.ok for c in checks if c.group != "next-cdpruner")
    assert len(rows) == 2 and all(not c.ok and "per crop DIFFER" in c.detail for c in rows), \
        [(c.case, c.detail) for c in rows]


@needs_official
@needs_cd_clone
def test_cdpruners_fixed_resolution_is_refused_when_the_literal_changes(built, tmp_path):
    """As VisPruner's: a fork whose fixed NeXT resolution is written another way is refused (the official worker
    fails) rather than run on CLIP-L/336's 672 x 672."""
    clones = _cd_fork_with(tmp_path / "clones", "llava/mm_utils.py", "possible_resolutions = [(672, 672)]",
                           "possible_resolutions = [(672, 672), ]")
    with pytest.raises(RuntimeError, match="expected one"):
        _run_cd(built, clones)
