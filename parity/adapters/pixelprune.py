"""PixelPrune (OPPO-Mente-Lab/PixelPrune, Apache-2.0) beside ours: ``python -m parity pixels`` (parity/pixels.py).

The official keep rule is a pure function of the processor's pixels (``pixelprune.compute_merged_keep_indices`` on the
rows ``pixelprune.patches.qwen3_vl_hf.normalize_pixel_values_for_selector`` makes of them), run in this repository's
environment from the clone (it imports torch only); ours runs through the engine (our processor's pixels ->
``Qwen*Adapter.pixel_units`` -> ``select_pixels``) on the tiny Qwen3-VL and Qwen3.5. Every image's kept merged tokens
are compared, per option set of :data:`CONFIGS`."""

PART = "pixels"  # not a model-level adapter: parity/pixels.py runs it
REPOSITORY = "OPPO-Mente-Lab/PixelPrune"
COMMIT = "a870e31b26e674f4f61d3c74a2b059f688b765da"
PACKAGES = ("pixelprune",)
INSTALLED = False  # scripts/official_clones.sh clones it to .official/pixelprune

#: the option sets compared: (name, the official keyword arguments, ours); the paper's setting first
CONFIGS = (
    ("pred_2d max tau=0", {"method": "pred_2d", "metric": "max", "threshold": 0.0}, {}),
    ("pred_2d max tau=0.05 anchored", {"method": "pred_2d", "metric": "max", "threshold": 0.05}, {"threshold": 0.05}),
    # the pages' grey panel steps by 1/255 a token: within 0.01 of its neighbour, drifting past it in 3 tokens, so
    # the anchored and the sliding comparisons keep different sets there
    ("pred_2d max tau=0.01 anchored", {"method": "pred_2d", "metric": "max", "threshold": 0.01}, {"threshold": 0.01}),
    ("pred_2d max tau=0.01 sliding", {"method": "pred_2d", "metric": "max", "threshold": 0.01, "anchored": False},
     {"threshold": 0.01, "anchored": False}),
    ("pred_2d mae tau=0.02 anchored", {"method": "pred_2d", "metric": "mae", "threshold": 0.02},
     {"metric": "mae", "threshold": 0.02}),
    ("pred_2d rmse tau=0.03 sliding", {"method": "pred_2d", "metric": "rmse", "threshold": 0.03, "anchored": False},
     {"metric": "rmse", "threshold": 0.03, "anchored": False}),
    ("raster max tau=0.05", {"method": "raster", "metric": "max", "threshold": 0.05},
     {"rule": "raster", "threshold": 0.05}),
    ("serpentine exact", {"method": "serpentine", "metric": "exact", "threshold": 0.0},
     {"rule": "serpentine", "metric": "exact"}),
)


def official_keep(pixel_values, grid_thw, kwargs: dict) -> list[list[int]]:
    """Per image the official code's kept merged tokens (ascending) for the processor's ``pixel_values``."""
    from pixelprune import compute_merged_keep_indices
    from pixelprune.patches.qwen3_vl_hf import normalize_pixel_values_for_selector

    kw = dict(kwargs)
    anchored = kw.pop("anchored", None)
    extra = {} if anchored is None else {"anchored": anchored}
    rows = normalize_pixel_values_for_selector(pixel_values)
    return [k.tolist() for k in compute_merged_keep_indices(rows, grid_thw, 2, **kw, **extra)]
