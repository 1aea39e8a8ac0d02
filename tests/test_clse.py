"""CLSE (baselines/clse.py): the spectral score, the evolution factor and the schedule on worked inputs, then the
first stage on the tiny LLaVA against an independent numpy computation from the stock eager model's own tensors."""

import math

import numpy as np
import pytest
import torch
from conftest import make_batch, slice_batch

from baselines.clse import CLSE, clse_scores, evolution_factor, highpass_mask, spectral_score, stage_counts
from llava.method import get_method
from llava.models import load


def test_high_pass_removes_the_mean_and_keeps_the_checkerboard():
    # 4 x 4 grid, sigma = min(2, 2) * 0.1 = 0.2. A constant image is pure DC (the centre of the shifted spectrum,
    # where H = 0): no energy. The checkerboard (-1)^(i+j) is the Nyquist frequency, shifted to (0, 0) at distance
    # sqrt(8) from the centre: H = 1 - exp(-8 / 0.08) = 1 - e^-100, so |x| passes: energy 1 per token and channel.
    i, j = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    board = ((-1.0) ** (i + j)).reshape(16, 1)
    x = torch.cat([3 + board, -2 + 2 * board], dim=1)  # (16, 2): channel means of |.| = (1 + 2) / 2
    assert torch.allclose(spectral_score(torch.full((16, 3), 5.0), 4, 4), torch.zeros(16), atol=1e-5)
    assert torch.allclose(spectral_score(x, 4, 4), torch.full((16,), 1.5), atol=1e-5)
    with pytest.raises(ValueError, match="grid"):
        spectral_score(torch.zeros(15, 2), 4, 4)


def test_spectral_score_is_the_shifted_formula_bit_for_bit():
    # spectral_score multiplies the unshifted spectrum by ifftshift(H) instead of shifting the spectrum there and
    # back: the same products, permuted, so the bits equal the formula as written (fftshift, H around the centre,
    # ifftshift), on even and odd grids, in every input dtype; one mask serves several inputs on a grid.
    def shifted(x, h, w, cutoff=0.1):
        feat = x.float().t().reshape(x.shape[1], h, w)
        spec = torch.fft.fftshift(torch.fft.fft2(feat), dim=(-2, -1))
        yy = torch.arange(h).view(h, 1).float()
        xx = torch.arange(w).view(1, w).float()
        d2 = (yy - h // 2) ** 2 + (xx - w // 2) ** 2
        H = 1 - torch.exp(-d2 / (2 * (min(h // 2, w // 2) * cutoff) ** 2)) if cutoff else torch.ones_like(d2)
        return torch.fft.ifft2(torch.fft.ifftshift(spec * H, dim=(-2, -1))).abs().mean(dim=0).reshape(-1)

    g = torch.Generator().manual_seed(0)
    for h, w in ((24, 24), (7, 5), (4, 6)):
        mask = highpass_mask(h, w, 0.1)
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            x = (3 * torch.randn(h * w, 40, generator=g)).to(dt)
            assert torch.equal(spectral_score(x, h, w), shifted(x, h, w))
            assert torch.equal(spectral_score(x, h, w, mask=mask), shifted(x, h, w))
        x = torch.randn(h * w, 8, generator=g)
        assert torch.equal(spectral_score(x, h, w, cutoff_ratio=0.0), shifted(x, h, w, 0.0))
    # the mask is H with its centre (distance 0) moved to the spectrum's [0, 0]
    assert highpass_mask(4, 4, 0.1)[0, 0] == 0 and highpass_mask(4, 4, 0.1)[2, 2] == 1 - math.exp(-8 / 0.08)


def test_evolution_factor_worked_example():
    # s_L = 1, s_K = [1, 1, 2, 3]: r = |s_K - s_L| / (1 + 1 + 1e-6) = [0, 0, .5, 1] / 2 = [0, 0, .25, .5];
    # mean .1875, unbiased std sqrt(.171875 / 3) = .239357; z = (r - mean) / std / .1 = [-7.833, -7.833, 2.611, 13.056]
    e = evolution_factor(torch.ones(4), torch.tensor([1.0, 1.0, 2.0, 3.0]))
    r = [0.0, 0.0, 0.5 / (2 + 1e-6), 1.0 / (2 + 1e-6)]
    m = sum(r) / 4
    sd = math.sqrt(sum((v - m) ** 2 for v in r) / 3)
    want = [1 / (1 + math.exp(-((v - m) / (sd + 1e-6)) / 0.1)) for v in r]
    assert torch.allclose(e, torch.tensor(want), atol=1e-6)
    assert e[0] < 1e-3 and e[3] > 0.9999  # the tokens whose energy moved most win
    # r is clamped at 1: a token whose energy jumps tenfold counts as much as one that doubles relative to its base
    e2 = evolution_factor(torch.ones(3), torch.tensor([1.0, 5.0, 50.0]))
    assert torch.allclose(e2[1], e2[2])


def test_stage_one_weights_attention_by_the_evolution_and_later_stages_do_not():
    # 4 visual tokens on a 2 x 2 grid (every non-DC frequency passes: H = 1 - e^-50). The high pass leaves each
    # token's deviation from the grid mean, so s = channel mean of |x - mean|.
    #   z_L rows [1, 0], [0, 1], [1, 1], [.5, .5] (mean [.625, .625]): s_L = [.5, .5, .375, .125]
    #   z_K: visual 2 -> [-.5, 2.5], visual 3 -> [2, -1] (same mean): s_K = [.5, .5, 1.5, 1.5]
    #   r = min(|s_K - s_L| / (.375 + s_L), 1) = [0, 0, 1, 1]; z = (r - .5) / .57735 / .1 = [-8.66, -8.66, 8.66, 8.66]
    #   e = sigmoid(z) = [1.7331e-4, 1.7331e-4, .99983, .99983]
    # The attention alone ranks visual 0 first (.4); stage 1 keeps 2 (.2 e) then 3 (.1 e).
    row = torch.tensor([[0.1, 0.4, 0.2, 0.2, 0.1], [0.1, 0.4, 0.2, 0.2, 0.1]])  # (H=2, S=5), visual = 1..4
    vis = torch.tensor([1, 2, 3, 4])
    z_l = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.5]])
    z_k = z_l.clone()
    z_k[2], z_k[3] = torch.tensor([-0.5, 2.5]), torch.tensor([2.0, -1.0])
    attn = clse_scores(row, vis)  # stages 2 and 3: the attention alone
    assert torch.allclose(attn, torch.tensor([0.4, 0.2, 0.2, 0.1]))
    z = 0.5 / math.sqrt(1 / 3) / 0.1
    e_want = torch.tensor([1 / (1 + math.exp(z)), 1 / (1 + math.exp(z)), 1 / (1 + math.exp(-z)), 1 / (1 + math.exp(-z))])
    e = clse_scores(row, vis, z_l, z_k, (2, 2), score="clse")
    assert torch.allclose(e, e_want, atol=1e-5)
    s1 = clse_scores(row, vis, z_l, z_k, (2, 2))
    assert torch.allclose(s1, e * attn)
    assert torch.topk(s1, 2).indices.tolist() == [2, 3] and torch.topk(attn, 1).indices.tolist() == [0]
    assert torch.allclose(clse_scores(row, vis, z_l, z_k, (2, 2), score="attn"), attn)
    assert clse_scores(row.half(), vis, numerics="official").dtype == torch.float16


def test_schedule_options_and_refusals():
    assert [stage_counts(b, 576) for b in (192, 128, 64)] == [(330, 210, 62), (220, 140, 41), (110, 70, 20)]
    assert stage_counts(100, 576) == (172, 109, 32)  # floor(100 * (1.72, 1.09, 0.32))
    assert stage_counts(192, 16) == (9, 5, 1)  # floor(16 * c / 576)
    m = get_method("clse", 192)
    m.setup(num_layers=32, num_vision_layers=24, family="llava")
    assert m.llm_layers == (1, 11, 21)
    counts = m.layer_counts(576)
    assert counts[:2] == [576, 330] and counts[10:12] == [330, 210] and counts[20:22] == [210, 62]
    # equivalent tokens of the official "192": (576 + 10 * 330 + 10 * 210 + 11 * 62) / 32 = 208.06
    assert abs(sum(counts) / 32 - 208.0625) < 1e-9
    m.setup(num_layers=4, num_vision_layers=3, family="llava")
    assert m.llm_layers == (1, 2, 3) and m.layer_counts(16) == [16, 9, 5, 1]
    assert not CLSE.supports("llava_next") and CLSE.supports("llava")
    for bad in ({"score": "energy"}, {"numerics": "fp16"}, {"layer_list": (5, 3, 8)}, {"layer_list": (1, 2)}):
        with pytest.raises(ValueError, match="clse"):
            CLSE(192, **bad)
    with pytest.raises(ValueError, match="budget is required"):
        CLSE()


def test_qwen2_vl_rule_counts_layers_and_options():
    """The official Qwen2-VL rule: shares of the sample's own count, max(1, int(N * q)), stages 1, 10, 19 of 28.
    N = 100: RETAIN_RATIO 0.334 keeps (56, 36, 9) (100 * 0.57 is 56.99999999999999 in binary floating point and the
    official int() truncates it, as ours); 0.5 (not a preset): 0.5 * (1.71, 1.08, 0.294) =
    (.855, .54, .147) -> (85, 54, 14); N = 5 at 0.112: (.95, .6, .17) -> at least one each -> (1, 1, 1)."""
    from baselines.clse import qwen_stage_counts

    assert qwen_stage_counts(0.334, 100) == (56, 36, 9) and int(100 * 0.57) == 56
    assert qwen_stage_counts(0.5, 100) == (85, 54, 14)
    assert qwen_stage_counts(0.112, 5) == (1, 1, 1) and qwen_stage_counts(0.334, 0) == (0, 0, 0)
    m = get_method("clse", 128)
    m.setup(num_layers=28, num_vision_layers=32, family="qwen2_5_vl")
    assert (m.run_rule, m.ratio, m.llm_layers) == ("qwen2_vl", 0.223, (1, 10, 19))
    assert m.stage_counts(100) == (38, 24, 6)  # int(100 * (.38, .24, .066))
    m.setup(num_layers=36, num_vision_layers=32, family="qwen2_5_vl")
    assert m.llm_layers == (1, 13, 24)  # round(10 * 36 / 28), round(19 * 36 / 28)
    m.setup(num_layers=4, num_vision_layers=3, family="qwen2_5_vl")
    assert m.llm_layers == (1, 2, 3)
    m = CLSE(100, numerics="official")
    m.setup(num_layers=28, num_vision_layers=32, family="qwen2_5_vl")
    assert m.ratio == 100 / 576 and m.eager_layers == ()
    m.setup(num_layers=32, num_vision_layers=24, family="llava")
    assert m.run_rule == "llava" and m.eager_layers == (0, 10, 20)
    m = CLSE(64, retain_ratio=0.3, rule="qwen2_vl", layer_list=(2, 4, 6), scale_layers=False)
    m.setup(num_layers=32, num_vision_layers=24, family="llava")
    assert (m.ratio, m.llm_layers) == (0.3, (2, 4, 6))
    assert CLSE.supports("qwen2_5_vl") and not CLSE.supports("qwen3_vl")
    m = CLSE(retain_ratio=0.223)  # the Qwen rule's own budget, without a RETAIN_TOKEN
    m.setup(num_layers=28, num_vision_layers=32, family="qwen2_vl")
    assert m.stage_counts(100) == (38, 24, 6)
    m.setup(num_layers=32, num_vision_layers=24, family="llava")
    with pytest.raises(ValueError, match="LLaVA rule needs a budget"):
        m.stage_counts(576)
    for bad in ({"rule": "qwen"}, {"retain_ratio": 0.0}, {"retain_ratio": 1.5}):
        with pytest.raises(ValueError, match="clse"):
            CLSE(192, **bad)


def _np_spectral(x: np.ndarray, side: int, width: int | None = None) -> np.ndarray:
    """An independent high-pass energy (numpy's FFT, the filter built from its definition) on a side x width grid."""
    width = side if width is None else width
    feat = x.astype(np.float64).T.reshape(-1, side, width)
    spec = np.fft.fftshift(np.fft.fft2(feat), axes=(-2, -1))
    c, cw = side // 2, width // 2
    yy, xx = np.mgrid[0:side, 0:width]
    h = 1 - np.exp(-((yy - c) ** 2 + (xx - cw) ** 2) / (2 * (min(c, cw) * 0.1) ** 2))
    return np.abs(np.fft.ifft2(np.fft.ifftshift(spec * h, axes=(-2, -1)))).mean(0).reshape(-1)


@pytest.fixture(scope="module")
def eager():
    return load("tiny:llava", seed=1, attn_implementation="eager")


@pytest.mark.parametrize("rt", ["llava"], indirect=True)
def test_first_stage_against_the_eager_model(rt, eager):
    """Stage 1 before layer K = 1 (1 of 32 -> 1 of 4): layer 0's last-row attention times the evolution factor of
    the visual tokens between the inputs of layers 0 and 1, from the unpruned eager model's own outputs."""
    one = slice_batch(make_batch(rt), 1, rt)
    with torch.no_grad():
        out = eager.model(**one, output_attentions=True, output_hidden_states=True)
    ids = one["input_ids"][0]
    vis = torch.nonzero(ids == rt.model.config.image_token_id).flatten()
    side = math.isqrt(vis.numel())
    attn = out.attentions[0][0][:, -1, vis].float().mean(0).numpy()
    s_l = _np_spectral(out.hidden_states[0][0, vis].numpy(), side)
    s_k = _np_spectral(out.hidden_states[1][0, vis].numpy(), side)
    r = np.minimum(np.abs(s_k - s_l) / (s_l.mean() + s_l + 1e-6), 1)
    e = 1 / (1 + np.exp(-((r - r.mean()) / (r.std(ddof=1) + 1e-6)) / 0.1))
    score = torch.from_numpy(e * attn)
    expected = torch.topk(score, 9).indices.sort().values
    eng = rt.prune("clse", 192)
    with torch.no_grad():
        rt.model(**one)
    assert torch.equal(eng.selections[(0, 0)].keep, expected)
    assert eng.stats.samples[0].visual_per_layer == [16, 9, 5, 1]


@pytest.mark.parametrize("rt", ["qwen2.5-vl"], indirect=True)
def test_qwen_first_stage_against_the_stock_model(rt):
    """The Qwen2-VL rule on the tiny Qwen2.5-VL, stage 1 before layer 1: layer 0's last-row attention (the eager
    twin's) times the evolution factor on the image's merged grid (H/2 x W/2 of image_grid_thw: 4 x 6 here, not
    square) between the inputs of layers 0 and 1; RETAIN_RATIO 0.334 keeps int(24 * .57) = 13, int(24 * .36) = 8,
    int(24 * .098) = 2."""
    one = make_batch(rt, n=1, sizes=((112, 168),))
    twin = load("tiny:qwen2.5-vl", seed=1, attn_implementation="eager")
    with torch.no_grad():
        out = twin.model(**one, output_attentions=True, output_hidden_states=True)
    ids = one["input_ids"][0]
    vis = torch.nonzero(ids == rt.model.config.image_token_id).flatten()
    _, gh, gw = (int(v) for v in one["image_grid_thw"][0])
    h, w = gh // 2, gw // 2
    assert (h, w) == (4, 6) and vis.numel() == 24
    attn = out.attentions[0][0][:, -1, vis].float().mean(0).numpy()
    s_l = _np_spectral(out.hidden_states[0][0, vis].numpy(), h, w)
    s_k = _np_spectral(out.hidden_states[1][0, vis].numpy(), h, w)
    r = np.minimum(np.abs(s_k - s_l) / (s_l.mean() + s_l + 1e-6), 1)
    e = 1 / (1 + np.exp(-((r - r.mean()) / (r.std(ddof=1) + 1e-6)) / 0.1))
    expected = torch.topk(torch.from_numpy(e * attn), 13).indices.sort().values
    assert not torch.equal(expected, torch.topk(torch.from_numpy(attn), 13).indices.sort().values)
    eng = rt.prune("clse", 192)
    with torch.no_grad():
        rt.model(**one)
    assert torch.equal(eng.selections[(0, 0)].keep, expected)
    assert eng.stats.samples[0].visual_per_layer == [24, 13, 8, 2]


def test_qwen_rule_runs_eagerly_and_says_why():
    """The fast path refuses the Qwen rule's spectral stage with the reason (the grid comes from the eager engine's
    vision signals) and falls back to the eager engine; attention alone captures."""
    m = CLSE(192)
    m.setup(num_layers=4, num_vision_layers=3, family="qwen2_5_vl")
    assert "merged grid" in m.capture_refusal()
    a = CLSE(192, score="attn")
    a.setup(num_layers=4, num_vision_layers=3, family="qwen2_5_vl")
    assert a.capture_refusal() is None and not a.llm_vision_signals
    m.setup(num_layers=4, num_vision_layers=3, family="llava")
    assert m.capture_refusal() is None
