"""VLM-Pruner against its authors' code (``Casey-bit/VLMPruner``, parity/adapters/vlmpruner.py): the adapter's helpers
everywhere; opt-in, the official code itself beside ours on the tiny weights (skipped without ``.venv-official`` or
the clone ``.official/vlmpruner``), and planted changes in a copy of the clone that must make the kept indices (the
first pivot) or the logits (the recovery's mix) differ."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import OFFICIAL_PY, needs_official

from parity import llava15
from parity.adapters import vlmpruner as adapter
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

CLONE = llava15.CLONES / "vlmpruner"
SOURCE = Path("llava") / "model" / "language_model" / "modeling_llama_self.py"
needs_clone = pytest.mark.skipif(not (CLONE / SOURCE).is_file(),
                                 reason="no clone of Casey-bit/VLMPruner: run `bash scripts/official_clones.sh vlmpruner`")


# -- without the official code --------------------------------------------------------------------------------------
def test_the_official_layer_and_ratios_map_onto_the_tiny_model():
    from baselines.vlmpruner import VLMPruner
    from llava.ops import scale_layers

    assert scale_layers([2], 4) == (adapter.LAYER,)
    for count, ratio in adapter.RATIOS.items():  # round(64 * (1 - r)) on both sides
        m = VLMPruner(reduction_ratio=ratio)
        m.setup(num_layers=4, num_vision_layers=8, family="llava")
        assert m.kept_count(adapter.PATCHES) == count == round(64 * (1 - ratio))
        method, options = adapter.ours(count)
        assert method == "vlmpruner" and options["budget"] is None and options["reduction_ratio"] == ratio
        assert (options["numerics"], options["layer"], options["scale_layers"]) == ("official", 1, False)
    assert adapter.OFFICIAL == {"alone": True}


@needs_clone
def test_every_shim_matches_the_clone_exactly_once():
    src = (CLONE / SOURCE).read_text()
    for old in ("self.norm_factor = 1.0 / (24*math.sqrt(2))", "torch.topk(last_channel_var, k=256)",
                "dists = torch.cdist(k_states_image_token, k_states_image_token[pivot_indices[:i]])", "width = 24"):
        assert src.count(old) == 1, old
    tower = (CLONE / "llava" / "model" / "multimodal_encoder" / "clip_encoder.py").read_text()
    assert tower.count("self.vision_tower_name = '/cache/huggingface/clip-vit-large-patch14-336'") == 1


# -- against the official code (opt-in) -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    from parity.build import build

    work = tmp_path_factory.mktemp("parity-vlmpruner")
    return work, build(work, str(OFFICIAL_PY), seed=request.param)


def _spec(info, budget: int = 7) -> dict:
    return {"name": "vlmpruner", "budget": budget, "batches": [[i] for i in range(len(info["images"]))]}


def _checks(built, ours, root: Path, dtype: str = "fp32") -> list:
    work, info = built
    off = llava15.official(info, str(OFFICIAL_PY), dtype, [_spec(info)], 8, work, str(root))
    return llava15.compare(off, ours, dtype, 1e-5, 2)


@pytest.fixture(scope="module")
def our_run(built):
    """Our side once (fp32, 7 of 64 = the official 0.889, each image alone)."""
    work, info = built
    return llava15.ours(info, "fp32", [_spec(info)], 8)


@needs_official
@needs_clone
def test_vlmpruner_agrees_with_the_official_code(built, our_run):
    """fp32: the kept indices (7 of 64), the logits (the rewritten kept states: bit-identical) and greedy tokens."""
    checks = _checks(built, our_run, CLONE)
    assert len(checks) == 4
    assert all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]
    assert all("logits max abs diff 0.00e+00" in c.detail for c in checks), [c.detail for c in checks]
    for c in checks:
        assert len(dict(c.data["official_kept"])[adapter.STAGE][0]) == 7


@needs_official
@needs_clone
def test_fp16_agrees_bit_for_bit(built):
    work, info = built
    checks = _checks(built, llava15.ours(info, "fp16", [_spec(info)], 8), CLONE, "fp16")
    assert len(checks) == 4 and all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]
    assert all("logits max abs diff 0.00e+00" in c.detail for c in checks), [c.detail for c in checks]


def _planted(tmp_path, line: str, new: str) -> Path:
    root = tmp_path / "vlmpruner"
    shutil.copytree(CLONE / "llava", root / "llava")
    path = root / SOURCE
    text = path.read_text()
    assert text.count(line) == 1
    path.write_text(text.replace(line, new))
    return root


@needs_official
@needs_clone
def test_a_planted_first_pivot_makes_the_kept_indices_differ(built, our_run, tmp_path):
    root = _planted(tmp_path, "pivot_indices[0] = k_states_image_token_norm.argmax()",
                    "pivot_indices[0] = k_states_image_token_norm.argmin()")
    checks = _checks(built, our_run, root)
    assert any("kept indices per stage DIFFER" in c.detail for c in checks)


@needs_official
@needs_clone
def test_a_planted_recovery_mix_makes_the_logits_differ(built, our_run, tmp_path):
    """The kept indices stay; the kept tokens' rewritten states (0.3 own + 0.7 absorbed -> 0.5 + 0.5) change the
    logits: the merge is compared, not only the selection."""
    root = _planted(tmp_path, "0.7 * aggregated[update_mask]", "0.5 * aggregated[update_mask]")
    root_text = (root / SOURCE).read_text()
    (root / SOURCE).write_text(root_text.replace("0.3 * last_layer_state[0, pivot_global_indices] +",
                                                 "0.5 * last_layer_state[0, pivot_global_indices] +"))
    checks = _checks(built, our_run, root)
    assert all("kept indices per stage identical" in c.detail for c in checks)
    assert not any(c.ok for c in checks), [c.detail for c in checks]
