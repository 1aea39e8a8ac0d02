"""The guarantees every pruning method gives, once, parametrised over the registry (issue 35): a method is
covered by being registered. Each test is parametrised at collection time over every registered method
(``test_gpu_ready.METHODS``: the test doubles aside) x the tiny families it supports (``Method.families``;
the others are the refusal test's cases). What differs between methods is in the tables below: the options
a keep-all needs, the budgets and option combinations the methods' own test files used to check, and which
methods keep ``min(budget, n)`` tokens of every unit. What is specific to a method (hand-worked examples,
official transcriptions, special layouts) stays in its own test file.

The generic suites elsewhere, not repeated here: batch == alone at each method's default options on every
family and padding case (``test_gpu_ready.test_batch_equals_each_sample_alone``; here: the budgets and options
the methods' own files added), cached generation == no-cache recompute on the adapter families
(``test_new_families``; here: the CLIP families, and the adapter families where a method's table says so),
device placement (``test_device_placement``). A new method must be entered in KEEP_ALL / NO_KEEP_ALL
(llava/check/budgets.py) and PER_UNIT / COUNTED_ELSEWHERE (test_every_registered_method_is_classified_here fails
until it is). The checks themselves are library code (llava/check/guarantees.py), shared with ``python -m
llava.check``.

fp32 on the CPU; every comparison of outputs is exact (``torch.equal``).
"""

import pytest
from conftest import ALL_FAMILIES, FAMILIES, check_generate_batch_equals_alone, check_per_unit_tokens
from test_gpu_ready import METHODS
from test_gpu_ready import budget as default_budget

from llava.check.budgets import KEEP_ALL, NO_KEEP_ALL, tiny_budget
from llava.check.guarantees import check_cached_equals_recompute, check_keep_all, stock_outputs
from llava.families import registry
from llava.method import method_supports

#: tiny Qwen geometry: 4-12 merged tokens per image of make_batch
QWEN = ("qwen2_5_vl", "qwen3_vl", "qwen3_5", "qwen2_vl")
#: the families of LLaVA-1.5's CLIP tower (the families whose cached decode this file checks for every method;
#: the adapter families: test_new_families.test_every_method_cached_generation_equals_no_cache_recompute)
CLIP = FAMILIES
FIVE = ["llava", "llava-next", "video-llava", "qwen2.5-vl", "llava-onevision"]
#: Downsample's Qwen: own test
POOLED = [f for f in ALL_FAMILIES if f not in ("qwen2.5-vl", "qwen3-vl", "qwen3.5", "qwen2-vl")]


_DEFAULT = object()  # a budget: the method's test_gpu_ready budget


def key(fam: str) -> str:
    """The runtime's family name ('qwen2.5-vl' -> 'qwen2_5_vl'): the key of the per-family tables."""
    return fam.replace("-", "_").replace(".", "_")


def per_family(b, rt):
    """A budget given as one value or as a table per family."""
    return b[rt.family] if isinstance(b, dict) else b


def cases(table, default=None, families=ALL_FAMILIES):
    """pytest params (method, budget, options, family) for every registered method: its entries in ``table``
    (budget, options[, families]), or ``default`` (budget, options) for a method not in it (None: no case),
    on each of those families the method supports."""
    out = []
    for name in METHODS:
        for entry in table.get(name, [default] if default else []):
            b, opts, fams = (*entry, families) if len(entry) == 2 else entry
            for fam in fams:
                fam = registry.find(fam).tiny  # a table's families may be ids (a registry.where set): the runtime's name
                if not method_supports(name, key(fam)):
                    continue
                oid = "".join(f"-{k}={v}" for k, v in opts.items())
                bid = "" if b is None else f"-{b[key(fam)]}" if isinstance(b, dict) else f"-{b}"
                bid = "-default" if b is _DEFAULT else bid
                out.append(pytest.param(name, b, opts, fam, id=f"{name}{bid}{oid}-{fam}"))
    return out


def test_every_registered_method_is_classified_here():
    """A new method must say how its keep-all is spelled and how many tokens it lets through per budget."""
    assert sorted(set(KEEP_ALL) | set(NO_KEEP_ALL)) == sorted(METHODS)
    assert sorted(set(PER_UNIT) | set(COUNTED_ELSEWHERE)) == sorted(METHODS)
    assert not set(KEEP_ALL) & set(NO_KEEP_ALL) and not set(PER_UNIT) & set(COUNTED_ELSEWHERE)


# ------------------------------------------------------------------------------------------- keep all
#: per method, the budgets / options that keep every visual token, each giving the stock model bit for bit, and the
#: methods that have none: llava.check.budgets.KEEP_ALL / NO_KEEP_ALL (`python -m llava.check` reads them too)
_STOCK: dict = {}  # family -> the unpruned model's (logits, tokens) on make_batch


def stock(rt):
    if rt.family not in _STOCK:
        _STOCK[rt.family] = stock_outputs(rt)
    return _STOCK[rt.family]


@pytest.mark.parametrize("name,b,opts,rt", cases(KEEP_ALL), indirect=["rt"])
def test_keep_all_is_bit_identical_to_the_unpruned_model(rt, name, b, opts):
    check_keep_all(rt, name, b, stock=stock(rt), **opts)


# ----------------------------------------------------------------------------- tokens entering the LLM
#: methods whose budget is ``min(budget, n)`` tokens of every image / crop / frame of n candidates, the newline
#: tokens kept as layout, the same count in every LLM layer (conftest.check_per_unit_tokens): budgets (a value or
#: a table per family) and options, from the methods' test files (budgets below every tiny unit's size, so that
#: each unit really prunes; tiny Qwen: 4-12 merged tokens per image)
_CDPRUNER = {"llava": 4, "llava_next": 4, "video_llava": 4, "qwen2_5_vl": 3, "llava_onevision": 4}
_MMTOK = {"llava": 4, "llava_next": 4, "qwen2_5_vl": 3}
MMTOK = ["llava", "llava-next", "qwen2.5-vl"]
#: MMTok's official Qwen2.5-VL route (the re-tokenised text needs tokenizer objects: tests/test_mmtok.py)
_MMTOK_QWEN = {"numerics": "official", "vv_space": "merge_mean", "scope": "sample", "retain_ratio": 0.5}
_CONSENSUS = {"llava": 8, "llava_next": 8, "video_llava": 6}
PER_UNIT = {
    "visiontrim": [(b, {}, ["llava", "video-llava"]) for b in (2, 4, 5)],  # NeXT: newlines dropped (its own test)
    # alpha 1: a = round(0.4 / 0.8 / 1.2) = 0 / 1 / 1 anchors (T = 4: |U| up to 5 > T, the overflow rule)
    "hiprune": [(b, {"alpha": 1.0}) for b in (2, 4, 6)],
    "vispruner": [(b, {}) for b in (2, 4)],  # Video-LLaVA: the frame's [CLS] dropped; tiny Qwen: a 4-token image
    "duet": [(b, {"ratios": (1.0, 1.0)}, CLIP) for b in (2, 4, 6)],  # every layer sees the stage-1 count
    "apet": [(4, {"llm_stage": False}), (5, {"llm_stage": False, "seed_slots": "own", "cls_token": "candidate"})],
    # 64 / 128 / 192 of 576 scaled to 16 patches per unit; VisionZip: min(D + C, n) per unit, FasterVLM: T per
    # image / frame ([CLS] dropped) / crop
    "visionzip": [(b, {}, CLIP) for b in (2, 4, 6)],
    "fastervlm": [(b, {}, CLIP) for b in (2, 4, 6)],
    # HoloV: T rows per unit, the official zero rows included (15 of 16: pad rows on the tiny models) or not
    "holov": [(b, o, CLIP) for b in (4, 15) for o in ({}, {"overflow": "redistribute"})],
    # RESTORE: int(n / 2) kept by the base + the rest as merged anchors = n per unit (DivPrune spreads its share over a
    # NeXT image's crops: one selection per image)
    "restore": [(b, {}, CLIP) for b in (4, 8)] + [(b, {"base": "divprune"}, ["llava", "video-llava"]) for b in (4, 8)],
    "cdpruner": [(_CDPRUNER, {}, FIVE)],
    "mmtok": [(_MMTOK, {}, MMTOK), (_MMTOK, {"keep_newlines": False}, ["llava"])],
    "consensusdrop": [(_CONSENSUS, o, CLIP) for o in (
        {}, {"fusion": "adaptive"}, {"fusion": "borda", "order": "spatial"}, {"probe_layer": 0}, {"merge": "none"},
        {"merge_space": "projected", "merge_rule": "mean"}, {"next_order": "grid_raster"},
        {"probe_mode": "embed_cos", "fusion": "cross_only"}, {"preset": "probe"}, {"select": "rank", "fusion": "rrf"})],
}
#: the others, and where their counts are checked
COUNTED_ELSEWHERE = {
    "none": "keeps everything (test_keep_all_is_bit_identical_to_the_unpruned_model)",
    "novisual": "keeps nothing: test_controls.test_novisual_leaves_only_text",
    "random": "test_controls.test_random_per_unit_by_hand",
    "attnmix": "a total budget (AdaV): test_attnmix.test_token_counts_follow_adav_arithmetic",
    "divprune": "one selection per image (B x units): test_divprune.test_tokens_entering_llm",
    "otprune": "one selection per image (B x units): test_otprune.test_tokens_entering_llm",
    "downsample": "pooled windows: test_downsample.test_tokens_entering_llm",
    "flowcut": "in-tower, [CLS] counted: test_flowcut.test_tokens_entering_llm",
    "prumerge": "adaptive (IQR): test_prumerge.test_tokens_entering_llm_adaptive / _fixed",
    "pixelprune": "adaptive (the pixels): test_pixelprune.test_through_the_engine, test_pre_tower",
    "fastv": "in the LLM: test_fastv.test_per_layer_counts_follow_the_equivalent_budget",
    "priortr": "in the LLM: test_priortr.test_options_counts_and_refusals, test_selection_uses_layer_k_minus_1_rows_of_"
               "the_null_token_and_the_question",
    "clse": "in the LLM: test_clse.test_schedule_options_and_refusals, test_first_stage_against_the_eager_model",
    "v2drop": "in the LLM: test_v2drop.test_official_schedules_and_their_equivalent_tokens, "
              "test_first_stage_against_the_eager_model",
    "vlmpruner": "in the LLM (the greedy walk may keep fewer): test_vlmpruner.test_options_counts_and_refusals, "
                 "test_selection_and_rewrite_against_the_stock_model",
    "ivcprune": "in the LLM (the official union: a count per sample): test_ivcprune.test_counts_and_refusals, "
                "test_selection_matches_an_independent_computation, test_a_count_keeps_exactly_that_many",
    "dart": "in the LLM: test_dart.test_per_layer_counts",
    "pdrop": "in the LLM: test_pdrop.test_per_layer_counts",
    "transprune": "in the LLM: test_transprune.test_depth_mapping_options_and_refusals, test_first_stage_against_a_"
                  "hand_run_of_the_stock_model",
    "sparsevlm": "in the LLM: test_sparsevlm.test_per_layer_counts",
    "visiondrop": "a per-layer schedule: test_visiondrop.test_per_layer_counts_follow_the_schedule",
    "vscan": "a layer average: test_vscan.test_per_layer_counts_follow_the_schedule",
    "trio": "in the LLM: test_trio.test_tokens_per_stage",
}


@pytest.mark.parametrize("name,b,opts,rt", cases(PER_UNIT), indirect=["rt"])
def test_tokens_entering_the_llm_per_unit(rt, name, b, opts):
    b = per_family(b, rt)
    for s, sizes, _ in check_per_unit_tokens(rt, name, b, **opts):
        assert s.vision_noop == all(n <= b for n in sizes)  # pruned exactly where a unit holds more than b


# ------------------------------------------------------------------------- cached == no-cache recompute
#: budgets and options from the methods' test files; a method not listed: its test_gpu_ready budget, default
#: options, on the CLIP families (the adapter families' case is test_new_families')
#: TRIO's schedule on the 16-token tiny units (budgets there refit to near 0: test_trio): 7 / 4 / 2 kept
TRIO_TINY = {"image_token_list": (12, 8, 4), "counts": "absolute"}
TRIO_QWEN = {"image_token_list": (3, 2, 1), "counts": "absolute"}  # tiny Qwen images: 4-12 merged tokens
_VISPRUNER = {f: 2 if f in QWEN else 4 for f in map(key, ALL_FAMILIES)}
CACHED = {
    "visiontrim": [(4, {})],
    "hiprune": [(6, {"alpha": 1.0})],
    # RESTORE: int(n / 2) kept by the base + the rest as merged anchors = n per unit (DivPrune spreads its share over a
    # NeXT image's crops: one selection per image)
    "restore": [(b, {}, CLIP) for b in (4, 8)] + [(b, {"base": "divprune"}, ["llava", "video-llava"]) for b in (4, 8)],
    "cdpruner": [(_CDPRUNER, {}, FIVE)],
    "mmtok": [(_MMTOK, {}, MMTOK), (_MMTOK, {"numerics": "official"}, MMTOK), (None, _MMTOK_QWEN, ["qwen2.5-vl"])],
    "vispruner": [(_VISPRUNER, {}, ALL_FAMILIES)],
    "flowcut": [(3, {})],
    "prumerge": [(None, {}), (None, {"variant": "base"}), (5, {"budget_mode": "fixed"})],
    "duet": [(6, {})],  # a vision stage, then two stages, the second keeping no visual token
    "pixelprune": [(None, {"metric": "mae", "threshold": 0.4}, ["qwen3-vl", "qwen2.5-vl"])],  # random images: a tolerance
    "apet": [(6, {}, ALL_FAMILIES)],
    "vscan": [(6, {})],
    "trio": [(None, TRIO_TINY, CLIP), (None, TRIO_QWEN, ["qwen2.5-vl"]),
             (None, dict(TRIO_TINY, numerics="official"), ["llava"]),
             (None, dict(TRIO_QWEN, numerics="official"), ["qwen2.5-vl"])],
    "dart": [({"llava": 8, "llava_next": 16, "video_llava": 64}, {})],
    "downsample": [(4, {}, POOLED)],
    "fastv": [(None, {})],
    "otprune": [(4, {}, CLIP), (4, {"numerics": "official", "order": "official"}, CLIP)],
    "holov": [(4, {}, CLIP), (15, {}, CLIP), (4, {"numerics": "official"}, CLIP)],  # 15: the zero rows
    # its attention bias has a prefill-only term (the guarantee is n.a. with it): kept positions and merging here
    "restore": [(8, {"calibrate": False}, CLIP), (8, {"calibrate": False, "base": "divprune"}, CLIP),
                (8, {"calibrate": False, "base": "vispruner", "numerics": "official"}, CLIP)],
    "priortr": [(None, {"keep_tokens": 6}), (None, {"keep_tokens": 6, "numerics": "official", "queries": "last"})],
    "clse": [(192, {}), (192, {"numerics": "official"})],
    "v2drop": [(None, {}), (None, {"numerics": "official"}), (8, {}, ["llava"])],
    "vlmpruner": [(None, {"keep_tokens": 6}), (None, {"keep_tokens": 6, "numerics": "official"}), (8, {}, ["llava"])],
    "ivcprune": [(None, {}), (None, {"numerics": "official"}), (None, {"keep_tokens": 6, "rule": "qwen"})],
    "pdrop": [(None, {})],  # three stages, re-indexed positions
    "transprune": [(None, {}), (None, {"numerics": "official"}), (192, {})],  # 16 -> 14 / 10 / 2 and 2 / 1 / 1
    "sparsevlm": [(192, {"version": "v1"}), (192, {"version": "v2"}, ["llava"])],
    "consensusdrop": [(_CONSENSUS, {})],
    "visiondrop": [({"llava": 8, "llava_next": 8, "video_llava": 4}, {})],
}
@pytest.mark.parametrize("name,b,opts,rt", cases(CACHED, (_DEFAULT, {}), CLIP), indirect=["rt"])
def test_cached_generation_equals_no_cache_recompute(rt, name, b, opts):
    if b is _DEFAULT:
        b, opts = default_budget(name, rt.family), {"seed": 5} if name == "random" else {}
    # every sample really pruned; a method whose selection reads the text (the question, the last row in the LLM;
    # random: its seed hashes the prompt ids) replays the prefill's selections in the recompute
    check_cached_equals_recompute(rt, name, per_family(b, rt), must_prune=name != "none", **opts)


# ---------------------------------------------------------------------------------------- batch == alone
#: make_batch (3 prompts, 3 image sizes / 3 videos, left-padded) at the budgets and option combinations the
#: methods' test files checked; each method's default options at its test_gpu_ready budget:
#: test_gpu_ready.test_batch_equals_each_sample_alone (every registered method, every family)
BATCH = {
    "transprune": [(None, {}), (None, {"numerics": "official"}), (192, {})],
    "visiontrim": [(4, {}), (4, {"numerics": "official"}), (4, {"tgvc_tokens": 2, "dvts_score": "global_local"})],
    "hiprune": [(6, {"alpha": 1.0})],
    # RESTORE: int(n / 2) kept by the base + the rest as merged anchors = n per unit (DivPrune spreads its share over a
    # NeXT image's crops: one selection per image)
    "restore": [(b, {}, CLIP) for b in (4, 8)] + [(b, {"base": "divprune"}, ["llava", "video-llava"]) for b in (4, 8)],
    "cdpruner": [(_CDPRUNER, {}, FIVE)],
    "mmtok": [(_MMTOK, {}, MMTOK), (_MMTOK, {"numerics": "official", "vv_space": "projected"}, MMTOK),
              (None, {"retain_ratio": 0.5}, ["qwen2.5-vl"]), (None, _MMTOK_QWEN, ["qwen2.5-vl"])],
    "vispruner": [(3, {})],
    "flowcut": [(4, {}), (4, {"batch_max": True}), (4, {"next_half": True, "frame_cls": "extra"})],
    "prumerge": [(None, {}), (None, {"variant": "base"}), (5, {"budget_mode": "fixed"})],
    "duet": [({f: 4 if f in QWEN else 6 for f in map(key, ALL_FAMILIES)}, {})],  # Qwen3.5: refused (linear read)
    "apet": [(6, {})],
    "vscan": [(6, {})],
    "pixelprune": [(None, {"metric": "mae", "threshold": 0.4}, ["qwen3-vl", "qwen2.5-vl", "qwen3.5"])],
    "trio": [(None, TRIO_TINY, ["llava"]), (None, TRIO_QWEN, ["qwen2.5-vl"])],
    "divprune": [(4, {}, CLIP)],
    "otprune": [(4, {}, CLIP), (4, {"numerics": "official", "order": "official"}, CLIP)],
    "downsample": [(4, {"space": "vision"}, POOLED), (4, {"space": "projected"}, POOLED)],
    "visionzip": [(4, {}, CLIP)],
    "fastervlm": [(4, {}, CLIP)],
    "priortr": [(None, {"keep_tokens": 6}), (None, {"keep_tokens": 6, "queries": "last", "heads": "max"})],
    "clse": [(192, {}), (128, {"score": "clse"})],
    "v2drop": [(None, {}), (None, {"numerics": "official"}), (8, {}, ["llava", "llava-next"])],
    "vlmpruner": [(None, {"keep_tokens": 6}), (None, {"keep_tokens": 6, "numerics": "official"}),
                  (8, {}, ["llava", "llava-next"])],
    "ivcprune": [(None, {}), (None, {"numerics": "official", "caches": "pruned"}), (8, {}, ["llava", "llava-next"])],
}


@pytest.mark.parametrize("name,b,opts,rt", cases(BATCH), indirect=["rt"])
def test_generate_batch_of_three_equals_each_sample_alone(rt, name, b, opts):
    check_generate_batch_equals_alone(rt, name, per_family(b, rt), **opts)


# -------------------------------------------------------------------------------------------- refusals
def refused_cases():
    return [pytest.param(name, fam, id=f"{name}-{fam}") for name in METHODS for fam in ALL_FAMILIES
            if not method_supports(name, key(fam))]


@pytest.mark.parametrize("name,rt", refused_cases(), indirect=["rt"])
def test_unsupported_family_is_refused_at_attach(rt, name):
    """A method refuses a family outside its ``Method.families`` at attach, naming itself."""
    with pytest.raises(ValueError, match=name):
        rt.prune(name, tiny_budget(name, "llava"))  # LLaVA-1.5's budget: the refusal comes before any budget check
    assert rt.engine is None
