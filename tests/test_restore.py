"""RESTORE: the density-peak anchors and the clusters' positions worked by hand; the selection over each base on the
tiny LLaVA (the base's own choice at half the budget, every dropped token in one cluster, prompt order); the kept
positions the decoder gets; the attention bias (its terms by hand, its wiring through the attention-function registry,
its removal); refusals. Batch == alone, keep-all, cached (with calibrate=false), device placement: the family-wide
tests (tests/test_method_guarantees.py) and ``python -m llava.check restore``."""

import math

import pytest
import torch
from conftest import make_batch

from baselines.restore import anchor_clusters, cluster_values, lower_medians
from llava.attention_bias import NAME, AttentionBias, BiasSlot, refusal
from llava.models import load

BASES = ("divprune", "vispruner", "holov")


@pytest.fixture(scope="module")
def rt():
    return load("tiny:llava", seed=1)


# ------------------------------------------------------------------------------------------------ anchors
def _unit(*deg):
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in deg])


def test_anchors_by_hand():
    # unit vectors at 0, 10, 20 and 90 degrees: S_ij = cos(angle difference). Densities rho = row sums:
    # rho0 = 1 + .9848 + .9397 + 0 = 2.9245, rho1 = 1 + .9848 + .9848 + .1736 = 3.1432,
    # rho2 = 1 + .9397 + .9848 + .3420 = 3.2665, rho3 = 1 + 0 + .1736 + .3420 = 1.5156.
    # "sparser" (the official code): delta_i = max S_ij over j of lower density, 0 where none:
    # delta = [S03 = 0, S10 = .9848, S21 = .9848, none -> 0] -> score = [2.9245, .0478, .0497, 1.5156]: anchors {0, 3};
    # 1 and 2 join anchor 0 (S10 = .9848 > S13, S20 = .9397 > S23).
    x = _unit(0, 10, 20, 90)
    anchors, slot = anchor_clusters(x, 2, "sparser")
    assert anchors.tolist() == [0, 3] and slot.tolist() == [0, 0, 0, 1]
    # "denser" (density peaks): delta = [S01 = .9848, S12 = .9848, none -> 0, S32 = .3420] -> score = [.0445, .0478,
    # 3.2665, .9973]: anchors {2, 3}; 0 and 1 join anchor 2
    anchors, slot = anchor_clusters(x, 2, "denser")
    assert anchors.tolist() == [2, 3] and slot.tolist() == [0, 0, 0, 1]
    # every row its own anchor when k = N
    anchors, slot = anchor_clusters(x, 4)
    assert anchors.tolist() == [0, 1, 2, 3] and slot.tolist() == [0, 1, 2, 3]


def test_a_cluster_sits_at_its_lower_median():
    members = torch.tensor([5, 9, 2, 7, 11])
    slot = torch.tensor([0, 0, 0, 1, 0])  # cluster 0: {2, 5, 9, 11} (even: the lower median, 5), cluster 1: {7}
    assert lower_medians(members, slot, 2, big=12).tolist() == [5, 7]
    assert lower_medians(members, slot, 2, "first", big=12).tolist() == [2, 7]
    assert lower_medians(members, slot, 2, "last", big=12).tolist() == [11, 7]
    assert lower_medians(torch.tensor([4, 1, 3]), torch.tensor([0, 0, 0]), 1).tolist() == [3]  # {1, 3, 4}


def test_official_cluster_values_are_the_members_mean():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0], [7.0, 1.0]])
    got = cluster_values(x, torch.tensor([0, 3]), torch.tensor([0, 0, 0, 1]))
    assert torch.equal(got, torch.tensor([[3.0, 5.0], [7.0, 1.0]]))  # (1 + 3 + 5) / 3, (2 + 4 + 9) / 3; row 3 alone


# ------------------------------------------------------------------------------------------------ selection
@pytest.mark.parametrize("base", BASES)
def test_the_selection_over_each_base(rt, base):
    inputs = make_batch(rt)
    n = 8
    eng = rt.prune(base, n // 2, **({"important_ratio": 0.5} if base == "vispruner" else
                                   {"overflow": "redistribute"} if base == "holov" else {}))
    with torch.no_grad():
        rt.model(**inputs)
    alone = [eng.selections[("vision", b)].keep.sort().values for b in range(3)]
    eng = rt.prune("restore", n, base=base)
    assert eng.method.base_method.budget == 4 and eng.method.base_method.name == base
    with torch.no_grad():
        rt.model(**inputs)
    for b in range(3):
        sel = eng.selections[("vision", b)]
        assert torch.equal(sel.keep.sort().values, alone[b])  # the base's own choice at int(n * 0.5)
        assert sel.targets.numel() == n - 4 and sel.rule == "mean" and sel.space == "projected"
        src = torch.cat([sel.keep, sel.targets])[sel.order]
        assert torch.equal(src, src.sort().values)  # the outputs in prompt order
        dropped = torch.ones(16, dtype=torch.bool)
        dropped[alone[b]] = False
        assert torch.equal(sel.assign >= 0, dropped)  # every dropped token in one cluster, no kept token
        sizes = sel.sizes(16)
        assert int(sizes.sum()) == 16 and int((sizes == 1).sum()) >= 4  # every token counted once
        for c, t in enumerate(sel.targets.tolist()):  # each cluster sits at its lower median member
            members = (sel.assign == c).nonzero().flatten()
            assert t == int(members[(members.numel() - 1) // 2])


def test_the_decoder_gets_the_prompt_positions(rt):
    inputs = make_batch(rt)
    eng = rt.prune("restore", 8, base="divprune")
    got = {}
    hook = eng.lm.register_forward_pre_hook(lambda m, a, k: got.update(pos=k.get("position_ids"),
                                                                       mask=k.get("attention_mask")), with_kwargs=True)
    try:
        with torch.no_grad():
            rt.model(**inputs)
    finally:
        hook.remove()
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    for b in range(3):
        sel = eng.selections[("vision", b)]
        first = int((ids[b] == rt.model.config.image_token_id).nonzero()[0])  # the image's first placeholder
        src = torch.cat([sel.keep, sel.targets])[sel.order]
        real = got["mask"][b].bool()
        pos = got["pos"][b][real]  # the stock default numbers the padded row: position = column
        n_text_before = first - int((~am[b].bool()).sum())
        assert torch.equal(pos[n_text_before:n_text_before + 8], first + src)  # each visual row at its source's place
        assert torch.equal(pos[:n_text_before], torch.arange(first - n_text_before, first))  # text before: its own
        after = pos[n_text_before + 8:]
        assert torch.equal(after, torch.arange(first + 16, first + 16 + after.numel()))  # text after: its own


# ------------------------------------------------------------------------------------------------ the bias
def test_the_bias_terms_by_hand(rt):
    inputs = make_batch(rt)
    eng = rt.prune("restore", 8, base="holov")
    seen = {}
    method = eng.method
    orig = method.attention_bias
    method.attention_bias = lambda keys: seen.setdefault("bias", (keys, orig(keys)))[1]
    with torch.no_grad():
        rt.model(**inputs)
    keys, bias = seen["bias"]
    cfg = eng.lm.config
    theta = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    assert torch.equal(keys.inv_freq, theta)  # LLaMA's default rotary in fp32 (the official formula)
    theta = theta.double()
    for b in range(3):
        vis = keys.visual[b]
        assert int(vis.sum()) == 8 and float(keys.sizes[b][vis].sum()) == 16.0  # 8 rows stand for the 16 tokens
        assert torch.equal(bias.keys[b], torch.log(keys.sizes[b]))
        uniform = torch.where(vis, torch.tensor(2.0), torch.tensor(1.0))  # layer 0: N / n = 16 / 8 on visual keys
        assert torch.allclose(bias.layer_keys[0][b], torch.log(uniform))
        p = keys.positions[b]
        real = keys.real[b].nonzero().flatten()
        i, j = int(real[-1]), int(real[0])  # the last query, the first key
        d = int(p[i] - p[j])
        want = math.log(2 - float(torch.cos(d * theta).mean()))
        assert float(bias.pair[b, i, j]) == pytest.approx(want, abs=1e-6)
        assert float(bias.pair[b, i, i]) == 0.0  # distance 0: log(2 - 1)


def test_the_bias_reaches_every_attention_layer_and_leaves_with_the_method(rt):
    inputs = make_batch(rt)
    eng = rt.prune("restore", 8, base="divprune", calibrate=False)
    attn = [layer.self_attn for layer in eng.lm.layers]
    configs = [a.config for a in attn]
    with torch.no_grad():
        plain = rt.model(**inputs).logits
    eng = rt.prune("restore", 8, base="divprune")
    assert all(a.config._attn_implementation == NAME and a._vtprune_bias is eng._bias for a in attn)
    calls = []
    orig = BiasSlot.mask

    def counted(self, layer, *a):
        calls.append(layer)
        return orig(self, layer, *a)

    BiasSlot.mask = counted
    try:
        with torch.no_grad():
            biased = rt.model(**inputs).logits
    finally:
        BiasSlot.mask = orig
    assert sorted(set(calls)) == list(range(len(attn)))  # every decoder layer added it
    assert not torch.allclose(biased, plain, atol=1e-4)  # and it changes the answer
    # a zero bias is the plain attention (the function wraps the model's own)
    eng.method.attention_bias = lambda keys: AttentionBias(keys=torch.zeros_like(keys.sizes))
    with torch.no_grad():
        out = rt.model(**inputs)
    real = eng._state.llm_mask.bool()  # padding rows attend to nothing: their rows are not compared
    torch.testing.assert_close(out.logits[real], plain[real], rtol=1e-5, atol=1e-5)
    rt.unprune()
    assert [a.config for a in attn] == configs and not any(hasattr(a, "_vtprune_bias") for a in attn)
    assert all(a.config._attn_implementation == "sdpa" for a in attn)


def test_decode_adds_the_keys_term_only():
    slot = BiasSlot("sdpa")
    keys = torch.tensor([[0.0, math.log(3.0), 0.0]])
    slot.set(AttentionBias(keys=keys, pair=torch.ones(1, 3, 3), layer_keys={0: torch.zeros(1, 3)}))
    q, k = torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4)
    m = slot.mask(1, q, k, None)  # the prefill, causal: keys + pair below the diagonal, the minimum above
    low = torch.finfo(torch.float32).min
    assert torch.equal(m[0, 0], torch.tensor([[1.0, low, low], [1.0, 1 + math.log(3.0), low],
                                              [1.0, 1 + math.log(3.0), 1.0]]))
    assert torch.equal(slot.mask(0, q, k, None)[0, 0, 2], torch.ones(3))  # layer 0: its own keys term
    slot.decoding()
    m = slot.mask(1, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 5, 4), torch.ones(1, 1, 1, 5, dtype=torch.bool))
    assert torch.equal(m[0, 0, 0], torch.tensor([0.0, math.log(3.0), 0.0, 0.0, 0.0]))  # generated keys: no term


# ------------------------------------------------------------------------------------------------ refusals
def test_refusals(rt):
    with pytest.raises(ValueError, match="must be one of"):
        rt.prune("restore", 8, base="visionzip")
    with pytest.raises(ValueError, match="a budget n"):
        rt.prune("restore", None)
    with pytest.raises(ValueError, match="leaves the base or the anchors no token"):
        rt.prune("restore", 1)
    with pytest.raises(ValueError, match="does not support qwen"):
        load("tiny:qwen2.5-vl", seed=1).prune("restore", 8)
    flash = type("LM", (), {"config": type("Config", (), {"_attn_implementation": "flash_attention_2"})()})()
    assert "'flash_attention_2' attention, which takes no dense additive bias" in refusal(flash)
    assert refusal(type("LM", (), {"config": type("Config", (), {"_attn_implementation": "sdpa"})()})()) is None


def test_the_fast_path_refuses_it_with_the_reason():
    fast = load("tiny:llava", seed=1, fast=True, fast_max_new_tokens=4, fast_backend="none")
    inputs = make_batch(fast)
    eng = fast.prune("restore", 8, base="divprune")
    with torch.no_grad():
        fast.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert eng.stats.path == "eager" and "attention bias" in eng.stats.path_reason
    eng = fast.prune("restore", 8, base="divprune", calibrate=False)
    with torch.no_grad():
        fast.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert eng.stats.path == "eager" and "prompt positions" in eng.stats.path_reason


# ------------------------------------------------------------------------------------------------ the paper spec
def test_paper_script_runs_end_to_end_on_the_tiny_model(tmp_path):
    """`bash scripts/papers/restore.sh` on POPE fixtures at 64 with the tiny LLaVA: every config of the grid runs in
    one process (the RESTORE rows with their base's options, a dict, through --opt as JSON and in the run folders'
    names), and the report puts the project page's numbers beside ours."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import child_env

    from eval.fixtures import write_fixtures

    repo = Path(__file__).resolve().parents[1]
    data = write_fixtures(tmp_path / "data", ["pope"])
    env = child_env(MODEL="tiny:llava", ONLY="pope", BUDGETS="64", DATA_ROOT=data, OUT=tmp_path / "runs",
                    PYTHON=sys.executable, LAUNCHER="inprocess", EXTRA_ARGS="--max-new-tokens 4 --no-wandb")
    r = subprocess.run(["bash", str(repo / "scripts/papers/restore.sh")], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "restore: 8 configs in one process, 1 model load" in r.stdout, r.stdout[-2000:]
    runs = sorted(p.parent.name for p in (tmp_path / "runs" / "pope").glob("*/results.json"))
    assert len(runs) == 8, runs  # the unpruned model, DivPrune, VisPruner, HoloV, VisionZip, RESTORE over three
    assert "tiny-llava_restore_b64_base=divprune-base_options.numerics=official-numerics=official" in runs, runs
    (md,) = (tmp_path / "runs" / "papers").glob("restore*.md")
    text = md.read_text()
    row = next(ln for ln in text.splitlines() if "restore base=holov" in ln and "| 64 |" in ln)
    assert "96.5%" in row  # the page's relative average of HoloV + RESTORE at 64 tokens, beside ours
