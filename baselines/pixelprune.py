"""PixelPrune (arXiv 2604.00886): drop an image's visual tokens **before the vision tower** by predictive coding on
its pixels; a token is kept where its pixels are not predicted by a neighbour's. Training-free, and its count adapts
to the image (a tolerance, not a budget): documents and screenshots repeat many blocks exactly.

Doc: docs/methods/pixelprune.md. Official code: OPPO-Mente-Lab/PixelPrune at a870e31 (Apache-2.0),
``pixelprune/methods/pred_2d.py`` (the paper's method), ``pixelprune/dedup.py`` (the metrics, the 1-D run rules),
``pixelprune/methods/raster.py`` / ``serpentine.py``, ``pixelprune/core.py`` (its defaults); read, not copied.

Per image, on its grid of visual tokens (Qwen: merged 2 x 2 patch blocks), each token's pixels in [0, 1]
(:class:`llava.tower_signals.PixelSignals`):

1. ``similar(X, Y)`` iff ``dist(X, Y) <= tau``; ``dist`` the largest absolute pixel difference (``metric="max"``,
   the default), their mean (``"mae"``) or root mean square (``"rmse"``); ``"exact"``: ``max`` with tau 0.
2. ``pred_2d`` (the default): with A the token on the left, B above, C above-left, the prediction of X is B where
   ``similar(C, A) and not similar(C, B)`` (an edge running down: copy from above), else A; the first row predicts
   from the left, the first column from above, the top-left token is always kept. X is kept iff it is not similar to
   its prediction.
3. ``anchored`` (the official default; it matters only where similarity is not transitive, tau > 0 with a metric
   other than ``exact``): every comparison reads the *reconstruction* (a dropped token takes its prediction's
   reconstructed pixels), so a drift never builds up past one step. The official code scans in raster order with one
   host read per token; we sweep the anti-diagonals, whose tokens depend only on earlier ones (the same result, no
   host read). ``anchored=False``: every comparison reads the original pixels (the official "sliding" path, also
   what it runs for ``exact`` and ``max`` at tau 0).
4. ``raster`` / ``serpentine`` (the official baselines): a 1-D scan in raster / snake order keeping the first token of
   each run of similar tokens (anchored: compared with the run's first token).

Kept tokens in raster order. The engine then runs the vision tower on their patches only, each with its own position,
and the LLM on them (``docs/architecture.md``, "Pre-tower stage"). Images only; a video's frames run whole (as the
official code). ``budget`` is not used: pass none. Not implemented (documented): the official ``random`` and
``conncomp`` baselines and pruning after a vision block (``PIXELPRUNE_VIT_LAYER`` > 0).
"""

from __future__ import annotations

import torch

from llava.families import registry
from llava.method import Method, register
from llava.options import Option
from llava.selection import Selection

METRICS = ("max", "mae", "rmse", "exact")
RULES = ("pred_2d", "raster", "serpentine")


def distance(x: torch.Tensor, y: torch.Tensor, metric: str) -> torch.Tensor:
    """(..., P) pixel blocks -> (...) their distance under ``metric`` (:data:`METRICS`)."""
    d = x - y
    if metric in ("max", "exact"):
        return d.abs().amax(-1)
    if metric == "mae":
        return d.abs().mean(-1)
    return d.pow(2).mean(-1).sqrt()


def similar(x: torch.Tensor, y: torch.Tensor, metric: str, tau: float) -> torch.Tensor:
    """Whether pixel blocks are similar: ``distance <= tau`` (``exact``: tau 0)."""
    return distance(x, y, metric) <= (0.0 if metric == "exact" else tau)


def _neighbours(rows: int, cols: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token of a rows x cols grid (raster order) the raster indices of its A (left), B (above), C (above-left);
    in the first row all three are the left token, in the first column all three the token above (the prediction is
    then that token: C is similar to A and to B), the top-left token its own."""
    r = torch.arange(rows, device=device)[:, None].expand(rows, cols).reshape(-1)
    c = torch.arange(cols, device=device)[None].expand(rows, cols).reshape(-1)
    i = r * cols + c
    left, up = i - 1, i - cols
    edge = torch.where(r == 0, left, up).clamp(min=0)
    inner = (r > 0) & (c > 0)
    return (torch.where(inner, left, edge), torch.where(inner, up, edge), torch.where(inner, up - 1, edge))


def _predicted(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cc: torch.Tensor, metric: str,
               tau: float) -> torch.Tensor:
    """pred_2d's prediction of each token from its neighbours' pixels (rows of a, b, cc)."""
    use_b = similar(cc, a, metric, tau) & ~similar(cc, b, metric, tau)
    return torch.where(use_b[..., None], b, a)


def pred_2d(pixels: torch.Tensor, rows: int, cols: int, metric: str = "max", tau: float = 0.0,
            anchored: bool = True) -> torch.Tensor:
    """(T,) bool: the tokens pred_2d keeps of an image's ``pixels`` (T, P) on a rows x cols grid (raster order)."""
    dev = pixels.device
    a, b, cc = _neighbours(rows, cols, dev)
    first = torch.arange(rows * cols, device=dev) == 0
    if not anchored or metric == "exact" or tau == 0:  # similarity is transitive here: the original pixels
        keep = ~similar(pixels, _predicted(pixels, pixels[a], pixels[b], pixels[cc], metric, tau), metric, tau)
        return keep | first
    recon = pixels.clone()  # the reconstruction: a dropped token takes its prediction's
    keep = first.clone()
    for d in range(1, rows + cols - 1):  # an anti-diagonal's tokens read only the earlier ones
        r = torch.arange(max(0, d - cols + 1), min(rows - 1, d) + 1, device=dev)
        i = r * cols + (d - r)
        x = pixels[i]
        pred = _predicted(x, recon[a[i]], recon[b[i]], recon[cc[i]], metric, tau)
        k = ~similar(x, pred, metric, tau)
        recon[i] = torch.where(k[:, None], x, pred)
        keep[i] = k
    return keep


def runs_1d(pixels: torch.Tensor, metric: str = "max", tau: float = 0.0, anchored: bool = True) -> torch.Tensor:
    """(T,) bool: the first token of each run of similar tokens in the given order (anchored: compared with the
    run's first token; else with the token before)."""
    T = pixels.shape[0]
    keep = torch.ones(T, dtype=torch.bool, device=pixels.device)
    if T < 2:
        return keep
    if not anchored or metric == "exact" or tau == 0:
        keep[1:] = ~similar(pixels[1:], pixels[:-1], metric, tau)
        return keep
    anchor = pixels[0]
    for i in range(1, T):  # each token compared with its run's first: sequential, on the device
        k = ~similar(pixels[i], anchor, metric, tau)
        anchor = torch.where(k, pixels[i], anchor)
        keep[i] = k
    return keep


def snake(rows: int, cols: int, device) -> torch.Tensor:
    """The raster indices of a rows x cols grid in snake order (even rows left to right, odd rows right to left)."""
    g = torch.arange(rows * cols, device=device).reshape(rows, cols)
    g[1::2] = g[1::2].flip(1)
    return g.reshape(-1)


def pixelprune(pixels: torch.Tensor, rows: int, cols: int, rule: str = "pred_2d", metric: str = "max",
               tau: float = 0.0, anchored: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens an image keeps: (T,) every token, the kept ones first in raster order, and their 0-d count."""
    if rule == "pred_2d":
        keep = pred_2d(pixels, rows, cols, metric, tau, anchored)
    elif rule == "raster":
        keep = runs_1d(pixels, metric, tau, anchored)
    else:
        order = snake(rows, cols, pixels.device)
        keep = torch.empty(rows * cols, dtype=torch.bool, device=pixels.device)
        keep[order] = runs_1d(pixels[order], metric, tau, anchored)
    # the kept indices ascending without a host read: a stable sort puts the kept ones first, in order; the engine
    # reads the count once for every image of the prefill
    idx = torch.sort((~keep).to(torch.uint8), stable=True).indices
    return idx, keep.sum()


@register
class PixelPrune(Method):
    name = "pixelprune"
    pixel_stage = True
    budgeted = False  # a tolerance, not a budget
    families = registry.where(pre_tower=True)  # the families whose tower runs a subset of an image's patches
    unsupported_reason = "a pre-tower stage runs on the families whose record has pre_tower (docs/models.md)"
    capture_reason = ("the kept count depends on the pixels, and the captured prefill fixes the tower's shapes "
                      "before the device runs")

    def __init__(self, budget=None, **options):
        if budget is not None:
            raise ValueError("pixelprune keeps as many tokens as the pixels need (a tolerance, `threshold`, not a "
                             "budget): pass no budget")
        super().__init__(None, **options)

    @classmethod
    def option_defaults(cls):
        return {**super().option_defaults(),
                "rule": Option("pred_2d", RULES, doc="pred_2d (the paper's 2-D prediction), or the 1-D raster / "
                                                     "serpentine runs (the official baselines)"),
                "metric": Option("max", METRICS, doc="the pixel distance: largest difference, mean, RMS, or exact"),
                "threshold": Option(0.0, types=(float,), doc="tau, in [0, 1] pixel units: similar iff distance <= tau "
                                                             "(< 0: nothing is similar, every token kept)"),
                "anchored": Option(True, types=(bool,), doc="compare with the reconstruction (official) or with the "
                                                            "original pixels (sliding)")}

    def select_pixels(self, sig) -> Selection:
        rows, cols = sig.grid
        idx, count = pixelprune(sig.pixels, rows, cols, self.rule, self.metric, float(self.threshold), self.anchored)
        return Selection(keep=idx, count=count)  # the first `count` (the engine reads every image's count at once)
