"""What the guarantees need to know about each built-in method on the tiny models: a budget that really prunes
them, the spellings of its keep-all, its host-read bound. A user's method says the same through class attributes
(``check_budget``, ``check_keep_all``: docs/check.md) or the command line (``--budget``, ``--keep-all-budget``).
The test suite's generic guarantees read these same tables (tests/test_gpu_ready.py, test_method_guarantees.py)."""

from __future__ import annotations

from ..families import registry
from .inputs import key

#: budgets that really prune on the tiny models, each in its method's own convention (docs/methods/README.md's table),
#: keyed by the tiny model's token geometry (its record's ``tiny_geometry``, llava.families.registry): "image" 16
#: tokens per image (LLaVA-1.5), "crops" 16 per crop / tile (NeXT, InternVL: 1-5 tiles of 112 px), "frames" 17 per
#: frame (Video-LLaVA), "grid" 4-12 merged tokens per image (the Qwen models: patch 14, merge 2), "anyres_max" 16 per
#: crop + newlines (OneVision)
_PER_UNIT = {"image": 4, "crops": 4, "frames": 4, "grid": 2, "anyres_max": 4}
_TOTAL = {"image": 4, "crops": 12, "frames": 32, "grid": 2, "anyres_max": 16}
_IN_LLM = {"image": 8, "crops": 16, "frames": 64, "grid": 4, "anyres_max": 16}
BUDGETS = {
    "none": None, "novisual": None, "pdrop": 192, "sparsevlm": 64,
    "consensusdrop": _PER_UNIT, "visiondrop": _PER_UNIT, "visionzip": _PER_UNIT, "fastervlm": _PER_UNIT,
    "divprune": _PER_UNIT, "otprune": _PER_UNIT, "random": _PER_UNIT, "attnmix": _TOTAL,
    "fastv": _IN_LLM, "dart": _IN_LLM,
    "hiprune": _PER_UNIT, "vispruner": _PER_UNIT, "downsample": _PER_UNIT, "holov": _PER_UNIT,
    "prumerge": None,  # adaptive (IQR outliers): the count depends on the image
    "pixelprune": None,  # adaptive: the count depends on the pixels (a pre-tower stage; Qwen families)
    "cdpruner": _PER_UNIT, "flowcut": _PER_UNIT,
    "vscan": 6,  # layer-average per unit: 9 per unit after the tower, 3 from layer 2 on the tiny models
    "duet": 6,  # layer average per unit: 10 per unit after the tower, 5 from layer 2, 0 from layer 3
    "visiontrim": _PER_UNIT,  # per unit B = D + C (4 = 3 + 1 on the tiny models)
    # layer average of 576 on 32 layers refitted to the 4 tiny layers: 16 -> 16/2/1/0; the tiny Qwen images (4-35
    # merged tokens) need 320 to keep tokens at every stage: 6 -> 6/3/2/1, 35 -> 35/21/13/5
    "trio": {"image": 192, "crops": 192, "frames": 192, "grid": 320, "anyres_max": 192},
    "mmtok": _PER_UNIT,  # per image / crop
    "apet": _PER_UNIT,  # layer-average per unit: 6 per unit after the tower, 2 from layer 2 (Qwen: 3 / 1)
    "priortr": _IN_LLM,  # layer average, as FastV's (K = 3 of 32 -> 1 of 4 layers)
    "clse": 192,  # the official RETAIN_TOKEN: 16 -> 16/9/5/1 (LLaVA-1.5 only)
    "transprune": None,  # the official lists 0.875 / 0.625 / 0.125: 16 -> 16/14/10/2 (not on Qwen3.5)
    "v2drop": None,  # the official schedule: 16 -> 16/8/4/1 (LLaVA rule; Qwen rule .25 / .05 / 0)
    "ivcprune": _IN_LLM,  # layer average, as FastV's (K = 16 of 32 -> 2 of 4 layers)
    "vlmpruner": _IN_LLM,  # layer average, as FastV's (K = 2 of 32 -> 1 of 4 layers; not on Qwen3.5)
    "restore": {k: 2 * v for k, v in _PER_UNIT.items()},  # per unit: half the base's, half merged anchors
}

#: options under which a method whose count follows its input prunes the checks' random images (PixelPrune: a
#: tolerance; at tau 0 random pixels repeat no token), for the family-wide tests that ask every method to prune
PRUNES_RANDOM_IMAGES = {"pixelprune": {"metric": "mae", "threshold": 0.4}}

#: per method, the budgets / options that keep every visual token (the tiny units hold at most 17 tokens: a
#: Video-LLaVA frame with its [CLS]; 576 is LLaVA-1.5's whole grid), each (budget, options[, families]): each must
#: give the stock model bit for bit
KEEP_ALL = {
    "none": [(None, {})],
    "random": [(576, {"seed": 3})],
    "apet": [(None, {"stage1": 576, "stage2": 576}), (576, {"llm_stage": False})],
    "attnmix": [(10**5, {})],
    "cdpruner": [(4096, {})],
    "consensusdrop": [(17, {})],  # per unit: exactly the largest tiny unit
    "dart": [(100000, {})],  # 4 pivots + 8 x 12500 >= N: everything retained
    "divprune": [(576, {}), (None, {"ratio": 1.0})],
    "otprune": [(576, {}), (None, {"ratio": 1.0})],
    "downsample": [(576, {}), (None, {"stride": 1})],
    "duet": [(None, {"dominant": 576, "contextual": 0, "ratios": (1.0, 1.0)})],
    "fastervlm": [(576, {})],
    "fastv": [(100000, {}), (None, {"ratio": 0.0})],  # n_K clipped to N; R = 0
    # NeXT: FlowCut feeds tower tokens only (no newline tokens), so no budget is the stock NeXT model; at the grid
    # exactly (16): test_flowcut.test_budget_at_or_above_the_grid_is_the_stock_model
    "flowcut": [(576, {}, registry.where(layout="single"))],
    "hiprune": [(576, {})],
    "pixelprune": [(None, {"threshold": -1.0})],  # nothing is similar: every token's patches run
    "holov": [(576, {})],
    "restore": [(2000, {})],  # the base keeps int(2000 * 0.5) >= every token: nothing to merge, no bias
    "mmtok": [(576, {}), (None, {"retain_ratio": 1.0})],
    "priortr": [(None, {"keep_ratio": 1.0}), (None, {"keep_tokens": 10**4})],
    "clse": [(10**4, {})],  # floor(N * 17200 / 576) >= N at every stage
    "v2drop": [(None, {"keep_ratios": (1.0, 1.0, 1.0)})],
    "vlmpruner": [(None, {"keep_tokens": 10**4}), (None, {"reduction_ratio": 0.0})],  # max(1, int(n * 1)) = n
    "ivcprune": [(None, {"keep_tokens": 10**4}), (None, {"rule": "qwen", "fill_ratio": 1.0})],
    "pdrop": [(None, {"ratios": [1.0, 1.0, 1.0]})],
    "transprune": [(None, {"ratios": [1.0, 1.0, 1.0]}), (None, {"ratios": [1.0, 1.0, 1.0], "numerics": "official"})],
    "sparsevlm": [(None, {"schedule": (576, 576, 576)})],  # floor(N * 576 / 576) = N at every stage
    "visiondrop": [(10**4, {})],
    "visiontrim": [(576, {})],
    "visionzip": [(576, {})],
    "vispruner": [(576, {})],
    "vscan": [(None, {"stage1": 576, "stage2": 576})],
    "trio": [(None, {"image_token_list": (576, 576, 576), "counts": "absolute"})],  # no gradient taken
}
NO_KEEP_ALL = {
    "novisual": "drops every visual token by definition (tests/test_controls.py)",
    "prumerge": "every kept token leaves as the merge of its nearest keys (Selection.values), also in the fixed mode "
                "at a budget above the unit; the adaptive mode always prunes (IQR outliers)",
}

#: host reads allowed per sample in one pruned prefill (the layout copy, one check per selection, a run count per
#: multi-image sample, the method's own constant few); must not grow with the tokens. Measured
#: (docs/architecture.md): 1.3-6.7 per sample; PyramidDrop / VisionDrop / SparseVLM 6.7 / 9.7 / 16.7 (tiny NeXT)
DEFAULT_SYNC_BOUND = 8
SYNC_BOUND = {"pdrop": 10, "visiondrop": 13, "sparsevlm": 20}
#: the small and large image of the host-sync check per layout (h, w; a family's record's ``layout``): 2-5x the visual
#: tokens (NeXT: 1-crop-equivalent vs 5 crops; Qwen: 6 vs 35 merged tokens; OneVision: 36 vs 104); a layout not here
#: has a fixed count per image
SYNC_SIZES = {"anyres": ((30, 30), (90, 120)), "anyres_max": ((30, 30), (90, 120)),
              "tiles": ((30, 30), (40, 200)),  # 1 tile vs 4 + the thumbnail: 16 vs 80 tokens
              "grid": ((60, 90), (150, 200))}


def sync_sizes(family: str):
    """:data:`SYNC_SIZES`' entry of ``family``'s layout; None: a fixed count per image."""
    return SYNC_SIZES.get(registry.get(key(family)).layout)
#: built-in methods whose selection reads the prompt's ids without being query-aware: the no-cache recompute replays
#: their prefill's selections, as it does a query-aware method's
PROMPT_KEYED = {"random": "its draws are seeded by a hash of the prompt ids (VisionSignals.key)"}


def tiny_budget(name: str, family: str, cls=None):
    """The budget of method ``name`` on ``family``'s tiny model: the class's ``check_budget`` (a value or a table
    per family), else this module's table (per tiny geometry), else None."""
    b = cls.check_budget if cls is not None else None
    if isinstance(b, dict):
        return b.get(key(family))
    if b is not None:
        return b
    b = BUDGETS.get(name)
    if not isinstance(b, dict):
        return b
    f = registry.find(key(family))
    return b.get(f.tiny_geometry) if f is not None else None


def keep_all_spelling(name: str, family: str, cls=None) -> tuple | str:
    """(budget, options) with which ``name`` keeps every visual token on ``family``, or why none is known: the
    class's ``check_keep_all``, else the first entry of :data:`KEEP_ALL` for that family."""
    declared = cls.check_keep_all if cls is not None else None
    if declared is not None:
        return declared[0], dict(declared[1])
    if name in NO_KEEP_ALL:
        return NO_KEEP_ALL[name]
    for entry in KEEP_ALL.get(name, []):
        b, opts, fams = (*entry, None) if len(entry) == 2 else entry
        if fams is None or family in fams or key(family) in map(key, fams):
            return b, dict(opts)
    if name in KEEP_ALL:
        return f"no keep-all of {name} is the stock {key(family)} model"
    return (f"no keep-all spelling known for {name}: declare check_keep_all = (budget, {{options}}) on the class "
            "or pass --keep-all-budget")


def sync_bound(name: str) -> int:
    return SYNC_BOUND.get(name, DEFAULT_SYNC_BOUND)
