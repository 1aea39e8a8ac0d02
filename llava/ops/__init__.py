"""Small token-selection primitives shared by several methods (one implementation each), by what they do:
:mod:`~llava.ops.select` (ranking, top-k, greedy max-min, unit layouts), :mod:`~llava.ops.merge` (merges and
output orders, similarities), :mod:`~llava.ops.pyset` (CPython's set iteration order as tensor ops), :mod:`~llava.ops.schedules` (in-LLM stage schedules and counts) and
:mod:`~llava.ops.vscan` (VScan's stage 1, shared with TRIO). Import them from here: ``from llava.ops import ...``.


All are pure functions over tensors; scores are compared in fp32. Every tensor they create takes
its device from their inputs, and none of them synchronises with the device per token: data-dependent
sizes come from :func:`unit_layout` (one host read per call) or from counts the caller knows
(:func:`masked_take`). :func:`greedy_max_min` runs its sequential loop on the host (one copy each way
per call) for the eager engine, or on the device with no host read at all (``device_loop=True``) for a
prefill captured in a CUDA graph / ``torch.compile(fullgraph=True)``.
"""

from .select import (  # noqa: F401
    _num_picks, check_numerics, device_ints, greedy_max_min, isin_small, masked_take, MaxMinProblem, NUMERICS,
    NUMERICS_OPTION,    rank_desc, subset_picks, SUBSET_RATIO, topk_desc, unit_layout, UnitLayout,
)
from .merge import (  # noqa: F401
    _arange_runs, best_product_split, best_product_split_k1, block_order, cat_parts, contextual_merge,
    cosine_matrix, dominant_contextual, merge_tokens, merge_tokens_sequential, official_contextual_merge, per_unit_selection,
    text_to_image_score, uniform_targets,
)
from .pyset import reference_set_order, set_order  # noqa: F401
from .schedules import (  # noqa: F401
    equivalent_kept_count, fit_stage_counts, IN_LLM_BUDGET_TABLE, last_row_topk, REFERENCE_DEPTH, REFERENCE_TOKENS, round_half_up,
    scale_layers, scaled_count, stage_layer_counts,
)
from .vscan import (  # noqa: F401
    _vscan_official_assign, _vscan_official_scans, local_counts, local_layer_for, REFERENCE_TOWER, split_budget,
    VSCAN_COSINE_CHUNK, VSCAN_LOCAL_LAYER, VSCAN_OFFICIAL_DTYPE, VSCAN_REMAINDERS, vscan_stage1,
    VSCAN_WINDOWS_PER_SIDE, window_side,
)
