"""IVC-Prune against its authors' code (``FireRedTeam/IVC-Prune``'s fork of transformers 4.51.3,
parity/adapters/ivcprune.py, run by parity/official_worker_hf.py): the adapter's helpers everywhere; opt-in, the
official fork itself beside ours on the tiny weights (skipped without ``.venv-official-qwen``, ``.venv-official``
for the build, or the clone ``.official/ivcprune``), and planted changes that must fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import OFFICIAL_PY, needs_official

from parity import llava15
from parity.adapters import ivcprune as adapter
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

QWEN_PY = Path(__file__).resolve().parents[1] / ".venv-official-qwen" / "bin" / "python"
needs_qwen_env = pytest.mark.skipif(not QWEN_PY.exists(), reason="no .venv-official-qwen: run "
                                    "`bash scripts/official_env.sh qwen`")
CLONE = llava15.CLONES / "ivcprune"
ROOT = CLONE / adapter.ROOT
needs_clone = pytest.mark.skipif(not (ROOT / "transformers" / "models" / "llama").is_dir(),
                                 reason="no clone of FireRedTeam/IVC-Prune: run "
                                        "`bash scripts/official_clones.sh ivcprune`")


# -- without the official code --------------------------------------------------------------------------------------
def test_the_official_layer_and_our_reference_options():
    from llava.ops import scale_layers

    assert scale_layers([16], 4) == (adapter.LAYER,) and adapter.STAGE == "llm2"
    method, options = adapter.ours(None)
    assert method == "ivcprune" and options["budget"] is None
    assert (options["numerics"], options["rule"], options["caches"]) == ("official", "llava", "pruned")
    assert (options["layer"], options["scale_layers"]) == (adapter.LAYER, False)
    assert adapter.OFFICIAL == {"alone": True, "worker": "hf"} and adapter.ROOT == "transformers/src"


def test_the_image_range_is_read_from_the_prompt_and_refused_when_ambiguous():
    model = SimpleNamespace(config=SimpleNamespace(ivcp_config=None))
    adapter.enable(model, {"name": "ivcprune"})
    adapter.inputs(model, torch.tensor([[1, 5, 9, 9, 9, 7, 8]]), 9)
    assert model.config.ivcp_config == {"ivcp_k": 2, "image_token_start_index": 2, "image_token_length": 3}
    with pytest.raises(ValueError, match="one contiguous image"):
        adapter.inputs(model, torch.tensor([[9, 5, 9, 7]]), 9)
    with pytest.raises(ValueError, match="one sample at a time"):
        adapter.inputs(model, torch.tensor([[9], [9]]), 9)
    adapter.disable(model)
    assert model.config.ivcp_config is None


def test_the_legacy_folder_moves_the_tower_keys_only(tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "hf"
    src.mkdir()
    save_file({"vision_tower.encoder.w": torch.ones(2), "language_model.model.norm.weight": torch.zeros(3),
               "multi_modal_projector.linear_1.bias": torch.full((1,), 2.0)}, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"model_type": "llava"}))
    dst = Path(llava15.hf_legacy_folder({"hf": str(src)}, tmp_path / "work"))
    sd = load_file(dst / "model.safetensors")
    assert sorted(sd) == ["language_model.model.norm.weight", "multi_modal_projector.linear_1.bias",
                          "vision_tower.vision_model.encoder.w"]
    assert torch.equal(sd["vision_tower.vision_model.encoder.w"], torch.ones(2))
    assert json.loads((dst / "config.json").read_text()) == {"model_type": "llava"}


def test_a_missing_environment_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="official_env.sh qwen"):
        llava15.run({"images": [], "hf": str(tmp_path)}, str(OFFICIAL_PY), tmp_path, methods=("ivcprune",),
                    official_path=str(tmp_path), hf_python=str(tmp_path / "no-python"))


# -- against the official code (opt-in) -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    from parity.build import build

    work = tmp_path_factory.mktemp("parity-ivcprune")
    return work, build(work, str(OFFICIAL_PY), seed=request.param)


def _specs(info) -> list:
    return [{"name": "ivcprune", "budget": None, "batches": [[i] for i in range(len(info["images"]))]}]


def _checks(built, dtype: str, root: Path, mine=None) -> list:
    work, info = built
    mine = mine if mine is not None else llava15.ours(info, dtype, _specs(info), 8)
    off = llava15.official_hf(info, str(QWEN_PY), dtype, mine, 8, work / "hf", str(root), 2)
    return llava15.compare(off, mine, dtype, 1e-5 if dtype == "fp32" else None, 2)


@needs_official
@needs_qwen_env
@needs_clone
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_ivcprune_agrees_with_the_official_fork_bit_for_bit(built, dtype):
    """The kept indices (the official union: a count per image), the logits and the greedy tokens with the decode on
    the official caches (layer 0's whole, layers 1..K-1 pruned), bit-identical in both precisions."""
    checks = _checks(built, dtype, ROOT)
    assert len(checks) == 4 and all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]
    assert all("logits max abs diff 0.00e+00" in c.detail for c in checks), [c.detail for c in checks]
    counts = []
    for c in checks:
        ((stage, kept),) = c.data["official_kept"]
        counts.append(len(kept[0]))
        assert stage == "llm2" and 6 <= len(kept[0]) <= 20  # 1 seed + 13 foreground + 3 + 3 coordinates at most
    assert min(counts) >= 13


def _planted(tmp_path: Path, old: str, new: str) -> Path:
    root = tmp_path / "ivcprune"
    shutil.copytree(ROOT / "transformers", root / "transformers")
    path = root / "transformers" / "models" / "llama" / "modeling_llama.py"
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))
    return root


@needs_official
@needs_qwen_env
@needs_clone
def test_a_planted_change_in_the_official_foreground_makes_the_kept_indices_differ(built, tmp_path):
    root = _planted(tmp_path, "value_related_img.topk(round(IVCP_image_token_length * 0.2))",
                    "value_related_img.topk(round(IVCP_image_token_length * 0.3))")
    checks = _checks(built, "fp32", root)
    assert any("kept indices per stage DIFFER" in c.detail for c in checks)


@needs_official
@needs_qwen_env
@needs_clone
def test_the_caches_are_compared_layer_zero_pruned_or_ours_kept_differ(built, tmp_path):
    """The decode reads the official caches: pruning layer 0's too on the official side, or keeping every earlier
    layer's on ours, changes the greedy tokens (the prefill, its logits and kept indices stay identical)."""
    root = _planted(tmp_path, "if layer_idx < current_layer_idx and layer_idx > 0:\n                    # For layers",
                    "if layer_idx < current_layer_idx:\n                    # For layers")
    checks = _checks(built, "fp32", root)
    assert all("kept indices per stage identical" in c.detail for c in checks)
    assert any("greedy tokens DIFFER" in c.detail for c in checks), [c.detail for c in checks]
    work, info = built
    spec = _specs(info)
    mine = llava15.ours(info, "fp32", spec, 8)
    rt_kept = [dict(m) for m in mine]
    import llava

    rt = llava.load(info["hf"], attn_implementation={"": "sdpa", "text_config": "sdpa", "vision_config": "sdpa"},
                    dtype="float32")
    rt.prune("ivcprune", None, numerics="official", rule="llava", layer=2, scale_layers=False, caches="kept")
    for m in rt_kept:
        with torch.inference_mode():
            gen = rt.model.generate(input_ids=m["input_ids"], attention_mask=m["attention_mask"],
                                    pixel_values=m["pixel_values"], max_new_tokens=8, do_sample=False)
        m["tokens"] = gen[:, m["input_ids"].shape[1]:].tolist()
    assert any(a["tokens"] != b["tokens"] for a, b in zip(rt_kept, mine))


# -- Qwen2.5-VL: python -m parity qwen --method ivcprune (the fork's own Qwen path) ----------------------------------
def test_the_qwen_half_is_a_fork_row_of_the_official_qwen_rule():
    from parity import qwen

    assert "ivcprune" in qwen.qwen_methods() and adapter.QWEN_FORK and adapter.QWEN_BUDGETS == (None,)
    name, budget, opts = adapter.ours_qwen(None, "fp32", None)
    assert (name, budget) == ("ivcprune", None)
    assert opts == {"numerics": "official", "rule": "qwen", "layer": 2, "scale_layers": False, "caches": "pruned"}
    from llava.ops import scale_layers

    assert scale_layers([16], 4, reference=28) == (adapter.QWEN_LAYER,)  # the official 16 of Qwen2.5-VL-7B's 28


def test_the_qwen2_vl_half_is_the_fork_s_own_qwen2_vl_rule():
    """The fork's Qwen2-VL path: the same fork in the Qwen official environment (not the Qwen2-VL family's, whose
    tokenizers 4.51.3 refuses), ours with the Qwen2-VL rule at the fork's fixed K = 16 unscaled (the tiny Qwen2-VL
    here has 24 layers); the replay counts the rule's fractions: n = 16 -> no seed, 6 foreground, 2 + 2 IVC."""
    import types

    from parity import qwen

    assert qwen.families_of("ivcprune") == ("qwen2.5-vl", "qwen2-vl")
    assert qwen.env_of("ivcprune", "qwen2-vl") == "qwen" and qwen.qwen_attr("ivcprune", "QWEN_FORK", "qwen2-vl")
    assert qwen.QWEN2VL_LAYERS > adapter.QWEN2_VL_LAYER == 16
    _, _, opts = adapter.ours_qwen(None, "fp32", types.SimpleNamespace(family="qwen2_vl"))
    assert opts == {"numerics": "official", "rule": "qwen2_vl", "layer": 16, "scale_layers": False, "caches": "pruned"}
    g = torch.Generator().manual_seed(0)
    S, start, n = 24, 2, 16
    entry = {"values": torch.randn(S, 2, 4, generator=g), "cos": torch.randn(3, S, 4, generator=g),
             "sin": torch.randn(3, S, 4, generator=g), "start": start, "n": n, "dtype": "float32", "rule": "qwen2_vl"}
    kept = adapter.qwen_replay(entry)
    assert 6 <= kept.numel() <= 10 and torch.equal(kept, kept.sort().values)
    assert adapter.qwen_replay({**entry, "rule": "qwen"}).numel() == 8  # the Qwen2.5-VL rule: filled to half


def test_the_fork_reads_a_config_without_the_text_sub_config(tmp_path):
    from parity import qwen

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl", "hidden_size": 8,
                                                 "text_config": {"hidden_size": 8}}))
    (src / "tokenizer.json").write_text("{}")
    dst = Path(qwen.folder_451({"model": str(src)}, tmp_path / "work"))
    assert json.loads((dst / "config.json").read_text()) == {"model_type": "qwen2_5_vl", "hidden_size": 8}
    assert (dst / "tokenizer.json").read_text() == "{}"


@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def qwen_built(request, tmp_path_factory):
    from parity import qwen

    work = tmp_path_factory.mktemp("parity-ivcprune-qwen")
    return work, qwen.build(work, seed=request.param)


def _qwen_checks(qwen_built, root: Path, dtypes=("fp32", "fp16")) -> list:
    from parity import qwen

    work, info = qwen_built
    return [c for c in qwen.run(info, str(QWEN_PY), work / root.name, dtypes=dtypes, methods=("ivcprune",),
                                official_path=str(root.parent.parent)) if c.case.startswith("fork")]


@needs_qwen_env
@needs_clone
def test_ivcprune_on_qwen_agrees_with_the_official_fork(qwen_built):
    """The fork's unpruned Qwen2.5-VL beside ours, then the Qwen rule on six images alone in fp32 and fp16: kept
    indices (filled to half), logits (fp32 within 1e-5: two torch and two transformers releases) and greedy tokens
    decoded on caches pruned in every layer before K."""
    checks = _qwen_checks(qwen_built, ROOT)
    rows = [c for c in checks if c.group == "qwen-ivcprune"]
    assert len(rows) == 12 and len(checks) == 32, [c.case for c in checks]
    fp32 = [c for c in checks if " fp32 " in c.case]
    assert all(c.ok for c in fp32), [(c.case, c.detail) for c in fp32 if not c.ok]
    # fp16: the two environments' fp16 kernels (torch 2.13 and 2.14.1) are the CPU's; where they part in the last bits
    # of layer K-1's values, a kept set may part too, and only there: the replay on the fork's rows gives its picks
    # (seed 0's image 3 on an AVX512-FP16 / AMX Xeon, 2026-11-26; every row identical on the CPU first measured)
    parted = [c for c in checks if not c.ok]
    assert all(c.group == "qwen-ivcprune" and " fp16 " in c.case and "the environments' kernels differ" in c.detail
               for c in parted), [(c.case, c.detail) for c in parted]
    for c in rows:
        (kept,) = c.data["official_kept"]
        assert len(kept) >= 7  # round(0.5 n) of at least 15 image tokens
        assert c.data["replay_on_official_rows"] is True  # ours on the fork's own value rows and tables


@needs_qwen_env
@needs_clone
def test_a_planted_fill_target_in_the_fork_makes_the_qwen_rows_differ(qwen_built, tmp_path):
    root = tmp_path / "ivcprune" / "transformers" / "src"
    shutil.copytree(ROOT / "transformers", root / "transformers")
    path = root / "transformers" / "models" / "qwen2_5_vl" / "modeling_qwen2_5_vl.py"
    text = path.read_text()
    old = "target_image_token_count = round(IVCP_image_token_length * 0.5)"
    assert text.count(old) == 1
    path.write_text(text.replace(old, "target_image_token_count = round(IVCP_image_token_length * 0.6)"))
    checks = _qwen_checks(qwen_built, root, dtypes=("fp32",))
    assert any("kept indices DIFFER" in c.detail for c in checks if c.group == "qwen-ivcprune")


@needs_qwen_env
@needs_clone
def test_ivcprune_on_qwen2_vl_agrees_with_the_fork_s_qwen2_vl_path(tmp_path):
    """The fork's Qwen2-VL path (K = 16 of the tiny Qwen2-VL's 24 layers) beside ours with the Qwen2-VL rule, one
    build: every fp32 row identical (the union's kept indices, logits within 1e-5, tokens, the replay on the fork's
    own value rows and tables); an fp16 row may part only where the replay gives the fork's picks (the two
    environments' fp16 values apart), as in image 4 of this build."""
    from parity import qwen

    info = qwen.build(tmp_path, seed=0, family="qwen2-vl")
    checks = [c for c in qwen.run(info, {"qwen": str(QWEN_PY)}, tmp_path, methods=("ivcprune",),
                                  official_path=str(ROOT.parent.parent))]
    rows = [c for c in checks if c.group == "qwen-ivcprune"]
    assert len(rows) == 12 and all(c.case.startswith("qwen2-vl fork ") for c in checks), [c.case for c in checks]
    fp32 = [c for c in checks if " fp32 " in c.case]
    assert all(c.ok for c in fp32), [(c.case, c.detail) for c in fp32 if not c.ok]
    for c in rows:
        assert c.data["replay_on_official_rows"] is True, c.detail  # ours on the fork's rows: its picks
        (kept,) = c.data["official_kept"]
        assert 0 < len(kept) <= round(0.61 * 143) + 1  # the union: at most 61 % of n
    parted = [c for c in checks if not c.ok]
    assert all(c.group == "qwen-ivcprune" and "the environments' kernels differ" in c.detail for c in parted)
