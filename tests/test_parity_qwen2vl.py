"""``python -m parity qwen --method v2drop vlmpruner``: the official Qwen2-VL code of V2Drop and VLM-Pruner (each
repository's own ``Qwen2VLForConditionalGeneration`` on its own copy of transformers 4.45.0.dev0) beside ours on the
24-layer tiny Qwen2-VL. The registry, the folder's family entry and our options always; opt-in (skipped without
``.venv-official-qwen2vl`` or the clones: ``bash scripts/official_env.sh qwen2vl``, ``bash scripts/official_clones.sh
v2drop vlmpruner``): two builds, fp32 and fp16, and planted changes on either side that must show."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from parity import qwen
from parity.build import PARITY_SEED_IDS, PARITY_SEEDS

ROOT = Path(__file__).resolve().parents[1]
PY = ROOT / ".venv-official-qwen2vl" / "bin" / "python"
PY457 = ROOT / ".venv-official-qwen457" / "bin" / "python"
CLONES = {m: ROOT / ".official" / m for m in ("v2drop", "vlmpruner", "clse")}
ROOTS = {"v2drop": "Qwen2-VL/transformers/src", "vlmpruner": "Qwen2-VL/transformers/src",
         "clse": "Qwen2VL/transformers-4.57.6/src"}
needs_official = pytest.mark.skipif(
    not PY.exists() or not PY457.exists() or not all((CLONES[m] / r).is_dir() for m, r in ROOTS.items()),
    reason="no .venv-official-qwen2vl / -qwen457 (bash scripts/official_env.sh qwen2vl; ... qwen457) or no "
           ".official/v2drop / vlmpruner / clse (bash scripts/official_clones.sh v2drop vlmpruner clse)")
PYTHONS = {"qwen2vl": str(PY), "qwen457": str(PY457)}


# -- without the official environment -------------------------------------------------------------------------------
def test_the_qwen2_vl_rows_run_in_the_repositories_own_transformers(tmp_path):
    info = {"images": ["a", "b", "c", "d"], "method_images": ["e", "f"]}
    (tmp_path / "llava").mkdir()
    (tmp_path / "LLaVA1.5" / "llava").mkdir(parents=True)
    for r in ROOTS.values():
        (tmp_path / r).mkdir(parents=True, exist_ok=True)
    fam = qwen.FAMILIES["qwen2-vl"]
    assert fam["stock"] is False
    from parity import adapters

    # 4.45's M-RoPE positions come from generate() only; CLSE's copy of 4.57.6 computes them in its forward
    assert adapters.get("v2drop").QWEN_POSITIONS_FROM_GENERATE and adapters.get("vlmpruner").QWEN_POSITIONS_FROM_GENERATE
    assert not getattr(adapters.get("clse"), "QWEN_POSITIONS_FROM_GENERATE", False)
    for name, budgets in (("v2drop", [None]), ("vlmpruner", [0.889, 0.778, 0.667]), ("clse", [0.334, 0.223, 0.112])):
        assert name in qwen.qwen_methods() and qwen.family_of(name) == "qwen2-vl"
        specs = qwen.method_specs([name], info, official_path=str(tmp_path))  # CLSE's LLaVA rows: LLaVA1.5/
        assert [s["budget"] for s in specs[1:]] == budgets
        assert all(s["clone"] == str(tmp_path / ROOTS[name]) for s in specs[1:])
        assert [s["name"] for s in qwen.method_specs([name], info, official_path=str(tmp_path),
                                                     family="qwen3-vl")] == ["none"]


def test_a_fork_job_reads_its_familys_own_folder(tmp_path):
    """A QWEN_FORK job on Qwen2-VL reads the Qwen2-VL folder itself (written for 4.45); only IVC-Prune's fork on
    Qwen2.5-VL reads the 4.51 copy. (A Qwen2-VL copy under the Qwen2.5-VL copy's name broke a later IVC-Prune job in
    the same work folder.)"""
    src = tmp_path / "qwen2.5-vl-tiny"
    src.mkdir()
    (src / "config.json").write_text('{"text_config": {}}')
    base = {"images": ["a"], "model": str(src)}
    jobs = [qwen.official_job(dict(base, family="qwen2-vl", model="/x/qwen2-vl-tiny"), "py", "fp32",
                              [{"name": "none"}], 1, tmp_path, fork="/clone/src"),
            qwen.official_job(dict(base, family="qwen2.5-vl"), "py", "fp32", [{"name": "none"}], 1, tmp_path,
                              fork="/clone/src")]
    assert jobs[0].spec["model"] == "/x/qwen2-vl-tiny"
    assert jobs[1].spec["model"] == str(tmp_path / "qwen2.5-vl-tiny-4.51")
    assert [j.worker for j in jobs] == ["official_worker_qwen.py"] * 2


def test_ours_qwen_is_the_reference_mode_of_the_official_qwen2_vl_rules():
    from parity.adapters import clse, v2drop, vlmpruner

    # the environment per adapter: the 4.45 copies' and CLSE's 4.57.6 copy's
    assert (qwen.env_of("v2drop", "qwen2-vl"), qwen.env_of("clse", "qwen2-vl"), qwen.env_of("mmtok", "qwen2.5-vl")) == (
        "qwen2vl", "qwen457", "qwen")
    assert clse.ours_qwen(0.223, "fp32", None) == (
        "clse", None, {"retain_ratio": 0.223, "numerics": "official", "rule": "qwen2_vl", "layer_list": (1, 10, 19),
                       "scale_layers": False})
    assert v2drop.ours_qwen(None, "fp32", None) == (
        "v2drop", None, {"numerics": "official", "rule": "qwen2vl", "scale_layers": False})
    assert vlmpruner.ours_qwen(0.778, "fp16", None) == (
        "vlmpruner", None, {"reduction_ratio": 0.778, "numerics": "official", "layer": 2, "scale_layers": False})
    assert qwen.QWEN2VL_LAYERS >= max(v2drop.QWEN_LAYERS) + 1  # every official stage at its own layer


class _Tower(torch.nn.Module):
    """A Qwen2-VL tower's attention as transformers 4.45 calls it: one SDPA over every image's patches (heads first,
    3-D) with their block-diagonal boolean mask (1, N, N), one block per temporal slice of each image."""

    def __init__(self, blocks=None):
        super().__init__()
        self.blocks = blocks  # the mask's blocks where they are not the grid's (planted)

    def forward(self, x, grid_thw):
        lengths = self.blocks or torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).tolist()
        mask = torch.block_diag(*[torch.ones(k, k, dtype=torch.bool) for k in lengths])[None]
        q, k, v = x.unbind(0)
        return F.scaled_dot_product_attention(q, k, v, mask, dropout_p=0.0)


def test_tower_per_image_splits_the_towers_masked_call_by_image():
    """The worker's diagnostic (``QWEN_BATCHED_TOWER``): inside the tower, the masked call over three images (the
    last with two temporal slices: four blocks of 4, 6, 3 and 3 patches) becomes four unmasked calls, exactly the
    per-block calls; a call outside the tower (the language model's, any mask) and a single image's pass unchanged;
    a mask that is not the images' blocks is refused; the real SDPA is back afterwards."""
    from parity.official_worker_qwen import tower_per_image

    torch.manual_seed(0)
    grid = torch.tensor([[1, 2, 2], [1, 2, 3], [2, 1, 3]])
    x = torch.randn(3, 2, 16, 8)  # q / k / v, 2 heads, 16 patches, width 8
    tower, real = _Tower(), F.scaled_dot_product_attention
    q, k, v = x.unbind(0)
    per_block = torch.cat([real(a, b, c) for a, b, c in zip(q.split([4, 6, 3, 3], 1), k.split([4, 6, 3, 3], 1),
                                                           v.split([4, 6, 3, 3], 1))], 1)
    text_mask = torch.rand(2, 16, 16) > 0.3
    with tower_per_image(tower) as calls:
        assert torch.equal(tower(x, grid_thw=grid), per_block)
        assert torch.equal(F.scaled_dot_product_attention(q, k, v, text_mask), real(q, k, v, text_mask))
        one = x[:, :, :4]
        assert torch.equal(tower(one, grid_thw=grid[:1]), real(*one.unbind(0), torch.ones(1, 4, 4, dtype=torch.bool)))
        assert calls[0] == 1
    assert F.scaled_dot_product_attention is real
    assert torch.equal(tower(x, grid_thw=grid), real(q, k, v, torch.block_diag(
        *[torch.ones(n, n, dtype=torch.bool) for n in (4, 6, 3, 3)])[None]))
    planted = _Tower(blocks=[4, 6, 6])  # one block for the third image's two slices
    with pytest.raises(RuntimeError, match="not the images' block-diagonal mask"), tower_per_image(planted):
        planted(x, grid_thw=grid)
    assert F.scaled_dot_product_attention is real


def _batch_run(tokens_row2, top2_row2, logits):
    """One unpruned run of a left-padded batch of four (row 0 padded at position 0), 8 tokens each, as both sides
    hand it to :func:`parity.qwen.compare`: rows 0, 1, 3 decode token 5 with a clear margin."""
    ids = torch.zeros(8, 4, 2, dtype=torch.long)
    vals = torch.zeros(8, 4, 2)
    for r in range(4):
        ids[:, r] = torch.tensor([5, 6])
        vals[:, r] = torch.tensor([0.9, 0.1])
    for j, (pair, pv) in enumerate(top2_row2):
        ids[j, 2], vals[j, 2] = torch.tensor(pair), torch.tensor(pv)
    return {"method": {"name": "none"}, "batch": [0, 1, 2, 3], "input_ids": torch.ones(4, 3, dtype=torch.long),
            "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]]),
            "image_grid_thw": torch.ones(4, 3, dtype=torch.long), "pixel_values": torch.zeros(4, 2),
            "logits": logits, "tokens": [[5] * 8, [5] * 8, tokens_row2, [5] * 8],
            "top2": {"ids": ids, "logits": vals}}


def test_the_padded_batch_row_says_whether_the_batched_tower_is_the_whole_difference():
    """Seed 23's row as an outside report measured it (docs/parity.md, Qwen2-VL): at step 3 of image 2 the official
    side picks 98 (0.348877 over 3's 0.348389: two fp16 steps, no tie by the differ's rule) and ours has an exact tie
    (0.348633) that argmax resolves to 3. The row still differs; its detail adds the official batch with the tower
    split by image: here identical to ours (logits 0, tokens identical), or, planted, itself differing."""
    base = torch.zeros(4, 3, 7)
    ours_top2 = [((98, 3), (0.40625, 0.3))] * 3 + [((98, 3), (0.348633, 0.348633))] + [((98, 3), (0.4, 0.3))] * 4
    off_top2 = ours_top2[:3] + [((98, 3), (0.348877, 0.348389))] + ours_top2[4:]
    ours = _batch_run([98, 3, 3, 3, 98, 3, 98, 3], ours_top2, base.clone())
    off_logits = base.clone()
    off_logits[1, 2, 4] += 2 ** -11  # a real position: 4.88e-04
    off_logits[0, 0, 0] += 1.0  # row 0's padding: not compared
    off = _batch_run([98, 3, 3, 98, 98, 3, 98, 3], off_top2, off_logits)
    off["tower_per_image"] = {k: ours[k] for k in ("logits", "tokens", "top2")}
    (prep, row), = [qwen.compare({"runs": [off]}, [ours], "fp16", None, 2)]
    assert prep.ok and not row.ok
    assert row.detail == (
        "logits max abs diff 4.88e-04, greedy tokens DIFFER (image 2 step 3: official 98 (0.348877), 3 (0.348389); "
        "ours 98 (0.348633), 3 (0.348633): no tie (the top two 2 / 0 fp16 steps apart)); official with its tower one "
        "image at a time: logits max abs diff 0.00e+00, greedy tokens identical")
    assert row.data["tower_per_image"]["tokens_identical"] and row.data["tower_per_image"]["logits_max_abs_diff"] == 0
    # planted: the split run differs from ours as well (another token at step 3): the clause says so
    off["tower_per_image"] = {"logits": off_logits, "tokens": off["tokens"], "top2": off["top2"]}
    (_, row), = [qwen.compare({"runs": [off]}, [ours], "fp16", None, 2)]
    assert not row.ok and row.detail.endswith(
        "official with its tower one image at a time: logits max abs diff 4.88e-04, greedy tokens DIFFER (image 2 "
        "step 3: official 98 (0.348877), 3 (0.348389); ours 98 (0.348633), 3 (0.348633): no tie (the top two 2 / 0 "
        "fp16 steps apart))")
    assert not row.data["tower_per_image"]["tokens_identical"]
    # a run without the diagnostic (any other job) reads as before
    del off["tower_per_image"]
    (_, row), = [qwen.compare({"runs": [off]}, [ours], "fp16", None, 2)]
    assert "tower" not in row.detail and "tower_per_image" not in row.data


# -- against the official code (opt-in) -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=PARITY_SEEDS, ids=PARITY_SEED_IDS)
def built(request, tmp_path_factory):
    work = tmp_path_factory.mktemp("parity-qwen2vl")
    return work, qwen.build(work, seed=request.param, family="qwen2-vl")


@needs_official
@pytest.mark.parametrize("method,rows", [("v2drop", 6), ("vlmpruner", 18), ("clse", 18)])
def test_the_official_qwen2_vl_code_agrees(built, method, rows):
    """fp32 and fp16, six images each alone (15 to 143 merged tokens): the official model's own unpruned rows, the
    kept indices of every stage, the logits (bit-identical for V2Drop and VLM-Pruner, within 1e-5 for CLSE, whose
    copy is another release) and the greedy tokens."""
    work, info = built
    checks = qwen.run(info, PYTHONS, work, methods=(method,), official_path=str(CLONES[method]))
    mine = [c for c in checks if c.group == f"qwen-{method}"]
    assert len(mine) == 2 * rows and len(checks) == 20 + 2 * rows
    assert all(c.case.startswith("qwen2-vl fork ") for c in checks)
    assert all(c.ok for c in checks), [(c.case, c.detail) for c in checks if not c.ok]
    batches = [c for c in checks if c.group == "unpruned" and c.case.endswith("batch [0, 1, 2, 3]")]
    assert len(batches) == 2
    if method != "clse":
        assert all("logits max abs diff 0.00e+00" in c.detail for c in mine if " fp32 " in c.case)
        # the 4.45 copies' padded batch again with the tower split by image (QWEN_BATCHED_TOWER): in fp32 the
        # official batch then gives our logits exactly
        assert all("official with its tower one image at a time" in c.detail for c in batches)
        split = [c.data["tower_per_image"] for c in batches if " fp32 " in c.case]
        assert [(d["logits_max_abs_diff"], d["tokens_identical"]) for d in split] == [(0.0, True)]
    else:  # 4.57.6's tower attends one image at a time already
        assert not any("tower" in c.detail for c in batches)


@needs_official
def test_planted_changes_show(built, tmp_path, monkeypatch):
    """The official VLM-Pruner at threshold 0.5 (ours keeps 0.8) picks other tokens in some image; ours with V2Drop's
    LLaVA keep ratios (0.5 / 0.5 / 0 where the Qwen code keeps 0.25 / 0.05 / 0) keeps other counts."""
    work, info = built
    spec = dict(qwen.method_specs(["vlmpruner"], info, [0.778], str(CLONES["vlmpruner"]), family="qwen2-vl")[1])
    off = qwen.official(info, str(PY), "fp32", [{"name": "none"}, dict(spec, official_kwargs={"threshold": 0.5})], 4,
                        tmp_path / "thr", fork=spec["clone"])
    mine = qwen.ours(info, "fp32", [{"name": "none"}, spec], 4)
    runs = [(o, m) for o, m in zip(off["runs"], mine) if m["method"]["name"] == "vlmpruner"]
    for o, m in runs:
        o["method"] = m["method"]
    assert any(not qwen.compare_method(o, m, "planted", 1e-5, info["eos"], "fp32").ok for o, m in runs)
    from parity.adapters import v2drop

    monkeypatch.setattr(v2drop, "ours_qwen", lambda *a: ("v2drop", None, {"numerics": "official", "rule": "llava",
                                                                         "layers": (3, 16, 22), "scale_layers": False}))
    checks = qwen.run(info, PYTHONS, tmp_path / "v2", dtypes=("fp32",), methods=("v2drop",),
                      official_path=str(CLONES["v2drop"]))
    assert any(not c.ok and "kept indices DIFFER" in c.detail for c in checks if c.group == "qwen-v2drop")
