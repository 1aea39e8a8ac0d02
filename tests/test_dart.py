"""DART (baselines/dart.py): pivots and duplication-aware picks on hand-placed 2-D features, the
budget arithmetic, then the method on the tiny models (K = 2 of 32 layers scales to K = 1)."""

import math

import pytest
import torch
from conftest import FAMILIES, make_batch, slice_batch

from baselines.dart import DART, dart_key_l1, dart_pivots, dart_select
from llava.method import get_method

ALL = pytest.mark.parametrize("rt", FAMILIES, indirect=True)


def unit(*degrees):
    """Unit vectors at the given angles: cosine similarity = cos(angle difference)."""
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


# ------------------------------------------------------------------------------ pure functions


def test_pivots_are_the_largest_key_l1_norms():
    # visual norms [3, 9, 1, 9, 5]: top-2 = 1 and 3 (tie at 9 -> lower index first); text [2, 7, 7]
    img, txt = dart_pivots(torch.tensor([3., 9, 1, 9, 5]), torch.tensor([2., 7, 7]), 2, 1)
    assert img.tolist() == [1, 3] and txt.tolist() == [1]
    img, txt = dart_pivots(torch.tensor([3., 9]), torch.tensor([]), 4, 4)  # clipped to what exists
    assert img.tolist() == [1, 0] and txt.tolist() == []


def test_each_pivot_adds_its_least_similar_candidates():
    # 6 visual tokens (0..5) at 0, 10, 90, 180, 100, 45 degrees; text tokens 6, 7 at 90 and 0 degrees.
    # key L1 norms: visual [1, 5, 2, 3, 4, .5] -> image pivot = 1; text [2, 1] -> text pivot = 6.
    # candidates {0, 2, 3, 4, 5}; per pivot t = 2; pivots in position order: 1, then 6.
    #   pivot 1 (10 deg): cos to 0: .985, 2: .174, 3: -.985, 4: 0, 5: .819 -> least similar 3, 4
    #   pivot 6 (90 deg): cos to 0: 0, 2: 1, 5: .707 -> least similar 0, 5
    # retained = image pivot 1 + {3, 4} + {0, 5} = [0, 1, 3, 4, 5]; 2 (a duplicate of the text
    # pivot's direction) is dropped; the text pivot itself is text and is not counted.
    feats = unit(0, 10, 90, 180, 100, 45, 90, 0)
    keys = torch.tensor([1, 5, 2, 3, 4, .5, 2, 1])
    keep = dart_select(feats, torch.arange(6), torch.tensor([6, 7]), keys, 2, num_image=1, num_text=1)
    assert keep.tolist() == [0, 1, 3, 4, 5]
    # t = 0: only the image pivots; a huge t: the first pivot takes everything
    assert dart_select(feats, torch.arange(6), torch.tensor([6, 7]), keys, 0, 1, 1).tolist() == [1]
    assert dart_select(feats, torch.arange(6), torch.tensor([6, 7]), keys, 99, 1, 1).tolist() == list(range(6))


def test_pivot_order_decides_who_gets_a_shared_candidate():
    # image pivots P1 = token 0 (0 deg, norm 5) and P2 = token 3 (90 deg, norm 6); candidates
    # x = 1 (225 deg: cos -.707 to both), y = 2 (120 deg: -.5 to P1, .866 to P2),
    # z = 4 (330 deg: .866 to P1, -.5 to P2); t = 1, no text pivot.
    #   "index" (P1 first): P1 takes x (-.707 < -.5), P2 then takes z -> [0, 1, 3, 4]
    #   "score" (P2 first, larger norm): P2 takes x, P1 then takes y -> [0, 1, 2, 3]
    feats = unit(0, 225, 120, 90, 330, 0)
    keys = torch.tensor([5., 1, 1, 6, 1, 1])
    args = (feats, torch.arange(5), torch.tensor([5]), keys, 1, 2, 0)
    assert dart_select(*args, pivot_order="index").tolist() == [0, 1, 3, 4]
    assert dart_select(*args, pivot_order="score").tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        dart_select(*args, pivot_order="set")


def test_reference_dtype_is_the_official_llms_dtype():
    """The official ``get_retained_image_token`` computes the key norms and similarities in its LLM's dtype: fp16 in
    the official runs, fp32 when the official model runs in fp32 (``python -m parity``'s fp32 rows: at T = 32 the
    fp16 cast kept another token than the official fp32 run). Tokens 0..4 visual, 5 text; one image and one text
    pivot, t = 1. L1 key norms 2049 / 2048: in fp32 token 0 is the image pivot; in fp16 both are 2048 (a tie,
    resolved as torch.topk resolves it). Each pivot then adds its least similar candidate: token 2 (90 deg from
    both), and the text pivot (0 deg) token 3 (45 deg)."""
    keys = torch.tensor([2049., 2048., 1., 1., 1., 5.]).reshape(6, 1, 1)  # (S, H, d)
    feats = torch.tensor([[1., 0.], [1., 0.01], [0., 1.], [0.7, 0.7], [0.9, 0.3], [1., 0.]])
    vis, txt = torch.arange(5), torch.tensor([5])

    def run(dtype):
        l1 = dart_key_l1(keys, "official", dtype)
        return l1, dart_select(feats, vis, txt, l1, 1, 1, 1, numerics="official", official_dtype=dtype).tolist()

    l1, keep = run(torch.float32)
    assert l1.dtype == torch.float32 and l1[:2].tolist() == [2049., 2048.] and keep == [0, 2, 3]
    l1, keep = run(torch.float16)
    assert l1.dtype == torch.float16 and l1[:2].tolist() == [2048., 2048.]
    assert keep == sorted([int(l1[:5].topk(1).indices), 2, 3])
    # the defaults are the fp16 of the official runs
    assert dart_key_l1(keys, "official").dtype == torch.float16
    assert DART(16).reference_dtype == "model" and DART(16, reference_dtype="float16").reference_dtype == "float16"
    with pytest.raises(ValueError):
        DART(16, reference_dtype="float32")


def test_budget_arithmetic():
    m = DART(128)
    m.setup(num_layers=32, num_vision_layers=24, family="llava")
    assert m.llm_layers == (2,) and m.position_mode == "keep"
    # t = 128 // 8 = 16; retained = 4 image pivots + 8 * 16 picks = 132 (README: above the nominal 128)
    assert m.per_pivot(576) == 16 and m.kept_count(576, 50) == 132
    assert [DART(b).kept_count(576, 50) for b in (192, 64)] == [196, 68]
    # no budget: B = 576 * (1 - 0.778) = 127.87 -> t = 15 -> 124
    assert DART().kept_count(576, 50) == 124
    # equivalent mode: n_K = (32*128 - 2*576) / 30 = 98 -> t = 12 -> 4 + 96 = 100
    m = DART(128, budget_mode="equivalent")
    m.setup(num_layers=32, num_vision_layers=24, family="llava")
    assert m.kept_count(576, 50) == 100
    # fewer text tokens than text pivots: 4 + (4 + 2) * 16 = 100
    assert DART(128).kept_count(576, 2) == 100
    m = get_method("dart", 8)
    m.setup(num_layers=4, num_vision_layers=3, family="llava")
    assert m.llm_layers == (1,) and m.layer_counts(16, 7) == [16, 12, 12, 12]  # 4 + 8 * 1
    with pytest.raises(ValueError):
        DART(budget_mode="average")


# ------------------------------------------------------------------------------ tiny models

BUDGET = {"llava": 8, "llava_next": 16, "video_llava": 64}


@ALL
def test_per_layer_counts(rt):
    # 4 + 8 * floor(B / 8): llava B = 8 -> 12 of 16; NeXT B = 16 -> 20 of 36..52; video B = 64 -> 68 of 136
    eng = rt.prune("dart", BUDGET[rt.family])
    with torch.no_grad():
        rt.model(**make_batch(rt))
    kept = 4 + BUDGET[rt.family]
    for s in eng.stats.samples:
        assert s.visual_per_layer == [s.visual_candidates] + [kept] * 3


@pytest.mark.parametrize("rt", ["llava", "video-llava"], indirect=True)
def test_selection_against_the_stock_model_cache_and_hidden_states(rt):
    """Independent reference from the unpruned model: layer 0's cached (post-RoPE) keys and layer 0's
    output through the final norm, as llmc's DART hooks read them."""
    one = slice_batch(make_batch(rt), 0, rt)
    rt.unprune()
    with torch.no_grad():
        out = rt.model(**one, use_cache=True, output_hidden_states=True)
    keys = out.past_key_values.layers[0].keys[0]  # (Hkv, S, d)
    key_l1 = keys.permute(1, 0, 2).flatten(1).abs().sum(-1)
    feats = rt.model.model.language_model.norm(out.hidden_states[1][0])
    ids = one["input_ids"][0]
    tok = rt.model.config.video_token_id if rt.family == "video_llava" else rt.model.config.image_token_id
    vis = torch.nonzero(ids == tok).flatten()
    text = torch.arange(int(vis.max()) + 1, ids.numel())
    t = BUDGET[rt.family] // 8
    expected = dart_select(feats, vis, text, key_l1, t)
    eng = rt.prune("dart", BUDGET[rt.family])
    with torch.no_grad():
        rt.model(**one)
    keep = eng.selections[(0, 0)].keep
    assert torch.equal(keep, expected) and keep.numel() == 4 + 8 * t
    assert set(dart_pivots(key_l1[vis], key_l1[text])[0].tolist()) <= set(keep.tolist())
