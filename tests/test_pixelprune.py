"""PixelPrune (baselines/pixelprune.py): the pred_2d rule, the anchored (reconstruction) and sliding comparisons, the
1-D raster / serpentine runs and the metrics on hand-worked grids; the anti-diagonal sweep equals a plain raster-order
scan of the reconstruction; the pixels the engine hands it (the normalisation undone); through the engine."""

import numpy as np
import pytest
import torch
from conftest import QUESTIONS
from PIL import Image

from baselines.pixelprune import distance, pixelprune, pred_2d
from llava import load
from llava.families.images import CLIP_MEAN_STD
from llava.families.qwen_kept import token_pixels


def kept(values, rows, cols, **kw):
    px = torch.tensor(values, dtype=torch.float32).reshape(rows * cols, -1)
    idx, count = pixelprune(px, rows, cols, **kw)
    return idx[:int(count)].tolist()


def test_metrics():
    x, y = torch.tensor([0.0, 0.3]), torch.tensor([0.1, 0.0])
    assert distance(x, y, "max").item() == pytest.approx(0.3)
    assert distance(x, y, "exact").item() == pytest.approx(0.3)
    assert distance(x, y, "mae").item() == pytest.approx(0.2)
    assert distance(x, y, "rmse").item() == pytest.approx(0.05 ** 0.5)


def test_pred_2d_worked_grid():
    # 1 1 2 | (0,0) kept; (0,1) = its left: dropped; (0,2) differs from its left: kept
    # 1 3 2 | (1,0) = above: dropped; (1,1): C = A = B = 1, predicted A = 1, X = 3: kept; (1,2): C = 1 differs from
    #       |   A = 3, predicted A = 3, X = 2: kept
    # 1 3 2 | (2,0) = above: dropped; (2,1): C = 1 = A, C != B = 3: an edge running down, predicted B = 3 = X:
    #       |   dropped (the left token, 1, would not predict it); (2,2): C = 3 = A, C != B = 2: predicted B = 2: dropped
    grid = [1, 1, 2, 1, 3, 2, 1, 3, 2]
    assert kept(grid, 3, 3) == [0, 2, 4, 5]
    # the 1-D raster scan keeps every change of value in raster order instead
    assert kept(grid, 3, 3, rule="raster") == [0, 2, 3, 4, 5, 6, 7, 8]
    # a constant image keeps its first token only
    assert kept([0.5] * 12, 3, 4) == [0]


def test_anchored_and_sliding_at_a_tolerance():
    row = [0.0, 0.04, 0.08, 0.12]
    # sliding: every step is within 0.05 of the token before: only the first is kept
    assert kept(row, 1, 4, tau=0.05, anchored=False) == [0]
    # anchored: 0.04 is predicted by 0 (dropped, reconstructed as 0); 0.08 is 0.08 from that reconstruction: kept; 0.12
    # is within 0.05 of 0.08: dropped
    assert kept(row, 1, 4, tau=0.05) == [0, 2]
    assert kept(row, 1, 4, tau=0.05, rule="raster") == [0, 2]
    assert kept(row, 1, 4, tau=0.05, rule="raster", anchored=False) == [0]
    # exact ignores the tolerance
    assert kept(row, 1, 4, tau=0.05, metric="exact") == [0, 1, 2, 3]


def test_serpentine_order():
    # raster order 0 0 1 1 1 0 keeps positions 0, 2, 5; snake order visits 0 1 2 5 4 3: values 0 0 1 0 1 1, keeping the
    # tokens 0, 2, 5, 4
    grid = [0, 0, 1, 1, 1, 0]
    assert kept(grid, 2, 3, rule="raster") == [0, 2, 5]
    assert kept(grid, 2, 3, rule="serpentine") == [0, 2, 4, 5]


def _scan(px, rows, cols, metric, tau):
    """pred_2d anchored as a raster-order loop over the reconstruction (the rule restated, one token at a time)."""
    g = px.reshape(rows, cols, -1)
    rec = g.clone()
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    keep[0, 0] = True

    def sim(a, b):
        return bool(distance(a, b, metric) <= tau)

    for r in range(rows):
        for c in range(cols):
            if r == 0 and c == 0:
                continue
            if r == 0:
                pred = rec[r, c - 1]
            elif c == 0:
                pred = rec[r - 1, c]
            else:
                a, b, cc = rec[r, c - 1], rec[r - 1, c], rec[r - 1, c - 1]
                pred = b if sim(cc, a) and not sim(cc, b) else a
            if not sim(g[r, c], pred):
                keep[r, c] = True
                rec[r, c] = g[r, c]
            else:
                rec[r, c] = pred
    return keep.reshape(-1)


@pytest.mark.parametrize("metric", ["max", "mae", "rmse"])
def test_the_diagonal_sweep_is_the_raster_scan(metric):
    gen = torch.Generator().manual_seed(0)
    differ = 0
    for rows, cols in ((1, 5), (4, 1), (5, 7), (6, 6)):
        px = (torch.randint(0, 4, (rows * cols, 3), generator=gen) * 0.02).float()
        ref = _scan(px, rows, cols, metric, 0.05)
        assert torch.equal(pred_2d(px, rows, cols, metric, 0.05, anchored=True), ref)
        differ += int(not torch.equal(pred_2d(px, rows, cols, metric, 0.05, anchored=False), ref))
    assert differ  # the sliding comparison is another rule at this tolerance


def test_token_pixels_undo_the_normalisation():
    rt = load("tiny:qwen2-vl", seed=1)  # the CLIP mean / std, as its processor
    arr = np.full((56, 84, 3), (200, 30, 90), dtype=np.uint8)
    inputs = rt.processor(QUESTIONS[:1], [Image.fromarray(arr)])
    grid = inputs["image_grid_thw"].tolist()
    vc = rt.model.config.vision_config
    (sig,) = token_pixels(inputs["pixel_values"], grid, vc.patch_size, vc.temporal_patch_size, 2, CLIP_MEAN_STD)
    _, h, w = grid[0]
    assert sig.grid == (h // 2, w // 2) and sig.pixels.shape == (h * w // 4, 4 * 3 * vc.patch_size ** 2)
    per_channel = sig.pixels.reshape(-1, 4, 3, vc.patch_size ** 2)
    for ch, v in enumerate((200, 30, 90)):
        torch.testing.assert_close(per_channel[:, :, ch], torch.full_like(per_channel[:, :, ch], v / 255),
                                   rtol=0, atol=1e-5)


def test_through_the_engine():
    rt = load("tiny:qwen2-vl", seed=1)
    arr = np.zeros((112, 168, 3), dtype=np.uint8)
    arr[:, 84:] = 255  # two flat halves: per row of merged tokens the first and the first of the right half
    inputs = rt.processor(QUESTIONS[:1], [Image.fromarray(arr)])
    eng = rt.prune("pixelprune")
    with torch.no_grad():
        rt.model.generate(**inputs, max_new_tokens=2, do_sample=False)
    _, h, w = inputs["image_grid_thw"][0].tolist()
    rows, cols = h // 2, w // 2
    sel = eng.selections[("pixels", 0, 0)]
    # the half boundary falls on a merged-token boundary (84 px = 3 tokens of 28): row 0 keeps 0 and 3, the rows
    # below are predicted from above
    assert cols == 6 and sel.keep[:int(sel.count)].tolist() == [0, 3]
    assert eng.stats.plan.candidates == (rows * cols,) and eng.stats.plan.segments[0].visual == (2,)


def test_parity_part_needs_the_clone(tmp_path, capsys):
    """``python -m parity pixels`` (its official half is the clone's selector): without a clone it refuses with the
    command that makes one; the pixels adapter is not a model-level one."""
    from parity import adapters
    from parity.__main__ import main

    assert main(["pixels", "--official-path", str(tmp_path), "--work", str(tmp_path)]) == 2
    assert "scripts/official_clones.sh pixelprune" in capsys.readouterr().err
    assert adapters.names("pixels") == ["pixelprune"] and "pixelprune" not in adapters.names()


def test_page_image_is_seeded_and_flat():
    from llava.check.inputs import page_image

    a, b = np.asarray(page_image(4, 1)), np.asarray(page_image(4, 1))
    assert np.array_equal(a, b) and not np.array_equal(a, np.asarray(page_image(5, 1)))
    assert a.shape == (320, 448, 3) and (a == 255).all(-1).mean() > 0.5  # mostly white margins
