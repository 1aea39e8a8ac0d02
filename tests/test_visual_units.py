"""The host layout of the visual tokens both executors read (``llava.families.base.VisualUnits``) and the one gather
of a tower's per-token table into the LLM's order (``gather_tokens``, ``with_cls``), on worked examples."""

from types import SimpleNamespace

import pytest
import torch
from fastpath_util import per_prompt

from llava.candidates import candidate_shapes, gather_tokens, with_cls
from llava.families.base import (TokenTable, VisualLayout, VisualUnits, cls_rows, join_units, packed_units,
                                 sample_units, uniform_units, visual_ids)
from llava.families.clip import clip_units
from llava.models import load
from llava.needs import Needs, TowerRead


def _table():
    return TokenTable.of({"features": torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
                          "vision_features": torch.tensor([[10.0], [20.0], [30.0]]),
                          "in_tower_kept": torch.tensor([True, True, False]),
                          "recv:2": torch.tensor([[0.5, 0.25], [0.75, 1.5], [2.5, 3.5]]),  # [CLS]-query, heads last
                          "fwa:2": torch.tensor([0.125, 4.0, 8.0]),
                          "rpat:1": torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])})  # not a [CLS]-query signal


def test_gather_tokens_fills_a_newline_row_as_the_stock_model_feeds_it():
    got = gather_tokens(_table(), torch.tensor([2, -1, 0]), torch.tensor([9.0, 9.0]))
    assert got.get("features").tolist() == [[5.0, 6.0], [9.0, 9.0], [1.0, 2.0]]
    assert got.get("vision_features").tolist() == [[30.0], [0.0], [10.0]]
    assert got.get("in_tower_kept").tolist() == [False, False, True]
    assert got.get("recv:2").tolist() == [[2.5, 3.5], [0.0, 0.0], [0.5, 0.25]]
    assert got.get("fwa:2").tolist() == [8.0, 0.0, 0.125]
    assert got.get("rpat:1").tolist() == [[3.0, 3.0], [1.0, 1.0], [1.0, 1.0]]  # the row it was gathered from (row 0)


def test_gather_tokens_without_a_newline_is_a_plain_gather():
    t = _table()
    got = gather_tokens(t, torch.tensor([1, 1, 0]))
    assert set(got.entries()) == set(t.entries()) == {"features", "vision_features", "in_tower_kept", "recv:2", "fwa:2",
                                                      "rpat:1"}
    for k, v in t.entries().items():
        assert torch.equal(got.get(k), v[torch.tensor([1, 1, 0])]), k


def test_with_cls_appends_the_entries_both_hold():
    cands = TokenTable(torch.zeros(2, 2), torch.zeros(2, 1), deepstack=torch.zeros(2, 3))
    cls = TokenTable(torch.ones(1, 2), torch.ones(1, 1), keys=torch.ones(1, 4))
    got = with_cls(cands, cls)
    assert got.get("features").tolist() == [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
    assert got.get("vision_features").tolist() == [[0.0], [0.0], [1.0]]
    assert got.deepstack.shape == (2, 3) and got.keys is None


def test_uniform_units_and_their_samples():
    """Two videos of three frames, four tokens a frame (patches 0..3 of a 2 x 2 grid)."""
    u = uniform_units(2, 3, 4, torch.arange(4), (2, 2))
    assert u.src.tolist() == list(range(24)) and u.rows == 24
    assert u.unit.tolist() == [f for f in range(6) for _ in range(4)]
    assert u.patch.tolist() == [0, 1, 2, 3] * 6
    assert u.unit_pos.tolist() == [[-1, -1]] * 6 and u.grid == ((2, 2),) * 6
    assert (u.sizes, u.counts) == ((12, 12), (3, 3))
    s = per_prompt(u)
    assert len(s) == 2
    assert s[1].src.tolist() == list(range(12, 24))
    assert s[1].unit.tolist() == [f for f in range(3) for _ in range(4)]  # numbered within the video
    assert s[1].units.tolist() == [3, 4, 5]  # its units' rows among the tower inputs
    assert s[1].grid == ((2, 2),) * 3 and s[1].unit_pos.shape == (3, 2)


def test_join_units_moves_rows_and_units_and_keeps_newlines():
    """A two-crop image packed with a newline (crop-major table of 2 x 2 rows, tokens out of table order), then a
    one-crop image: the second's table rows and units follow the first's."""
    a = VisualUnits(src=torch.tensor([0, 1, 3, -1]), unit=torch.tensor([0, 0, 1, -1]), patch=torch.tensor([0, 1, 1, -1]),
                    unit_pos=torch.tensor([[-1, -1], [0, 0]]), grid=((1, 2), (1, 2)), sizes=(4,), counts=(2,), rows=4)
    b = VisualUnits(src=torch.tensor([1, 0]), unit=torch.tensor([0, 0]), patch=torch.tensor([1, 0]),
                    unit_pos=torch.tensor([[-1, -1]]), grid=((1, 2),), sizes=(2,), counts=(1,), rows=2)
    u = join_units([a, b])
    assert u.src.tolist() == [0, 1, 3, -1, 5, 4]
    assert u.unit.tolist() == [0, 0, 1, -1, 2, 2]
    assert u.patch.tolist() == [0, 1, 1, -1, 1, 0]
    assert u.unit_pos.tolist() == [[-1, -1], [0, 0], [-1, -1]]
    assert (u.grid, u.sizes, u.counts, u.rows) == (((1, 2),) * 3, (4, 2), (2, 1), 6)
    s = per_prompt(u)
    assert s[0].unit.tolist() == [0, 0, 1, -1] and s[0].units.tolist() == [0, 1]
    assert s[1].src.tolist() == [5, 4] and s[1].unit.tolist() == [0, 0] and s[1].units.tolist() == [2]
    assert s[1].unit_pos.tolist() == [[-1, -1]]


def test_packed_units_address_their_own_rows_but_newlines():
    u = packed_units(torch.tensor([0, 0, -1, 1, 1, -1]), torch.tensor([0, 1, -1, 0, 1, -1]), [(1, 2), (1, 2)],
                     [3, 3], [1, 1])
    assert u.src.tolist() == [0, 1, -1, 3, 4, -1] and u.rows == 6
    assert u.unit_pos.tolist() == [[-1, -1]] * 2 and u.grid == ((1, 2), (1, 2))


def test_clip_units_leave_out_the_cls_the_model_drops():
    vc = SimpleNamespace(image_size=28, patch_size=14)  # a 2 x 2 patch grid, 5 tower tokens with the [CLS]
    drop = clip_units(vc, 2, 1, drop_cls=True)
    assert drop.patch.tolist() == [0, 1, 2, 3] * 2 and drop.sizes == (4, 4) and drop.grid == ((2, 2),) * 2
    keep = clip_units(vc, 1, 2, drop_cls=False)  # a video of two frames, the [CLS] fed (patch -1)
    assert keep.patch.tolist() == [-1, 0, 1, 2, 3] * 2 and keep.sizes == (10,) and keep.counts == (2,)


def test_next_units_are_the_eager_and_the_captured_layout():
    """LLaVA-NeXT's one layout function: per image its crops' tokens in next_token_layout's order, the base crop
    first; each token's unit is its crop and its table row crop * tokens + index; a newline has -1."""
    rt = load("tiny:llava-next", seed=0)
    adapter = rt.prune("none", None).adapter
    vc = rt.model.config.vision_config
    g = vc.image_size // vc.patch_size
    sizes = [[30, 60], [60, 30]]
    u = adapter._units(sizes)
    m = g * g  # tokens per crop: the [CLS] dropped ("default")
    assert sum(u.counts) == len(u.grid) == u.unit_pos.shape[0] and u.rows == sum(u.counts) * m
    assert u.src[:m].tolist() == list(range(m)) and u.unit[:m].tolist() == [0] * m  # the base crop
    ok = u.src >= 0
    assert torch.equal(u.unit[ok], u.src[ok] // m) and torch.equal(u.patch[ok], u.src[ok] % m)
    assert torch.equal(u.unit < 0, ~ok) and torch.equal(u.patch < 0, ~ok)
    # 56-px crops of 4 x 4 patches; 30 x 60 picks the 56 x 112 pinpoint (a 1 x 2 crop grid: a 4 x 8 map, no
    # padding to cut, a newline per row): 16 + 32 + 4 tokens; 60 x 30 the 112 x 56 one (2 x 1): 16 + 32 + 8
    assert (g, u.counts, u.sizes, int((~ok).sum())) == (4, (3, 3), (52, 56), 12)
    assert u.unit_pos.tolist() == [[-1, -1], [0, 0], [0, 1], [-1, -1], [0, 0], [1, 0]]
    s = per_prompt(u)
    assert [int(x.src.numel()) for x in s] == list(u.sizes)


def test_sample_units_number_a_prompts_units_in_order_of_first_appearance():
    """One rule for both executors: a prompt's units are numbered 0..U-1 in the order its tokens first show them (a
    unit none of its tokens shows is not one of them); ``units`` are their rows among the call's units."""
    u = VisualUnits(src=torch.arange(7), unit=torch.tensor([0, 0, 5, 5, 3, -1, 3]), patch=torch.tensor([0, 1, 0, 1,
                    0, -1, 1]), unit_pos=torch.arange(12).view(6, 2), grid=tuple((1, k) for k in range(1, 7)),
                    sizes=(2, 5), counts=(1, 5), rows=7)
    s = sample_units(u, torch.arange(2, 7))
    assert s.unit.tolist() == [0, 0, 1, -1, 1] and s.units.tolist() == [5, 3]
    assert s.unit_pos.tolist() == [[10, 11], [6, 7]] and s.grid == ((1, 6), (1, 4))
    assert s.src.tolist() == [2, 3, 4, 5, 6] and s.patch.tolist() == [0, 1, 0, -1, 1]
    asc = sample_units(u, torch.arange(0, 2))  # ascending units (most layouts) take a shorter path, same rule
    assert asc.unit.tolist() == [0, 0] and asc.units.tolist() == [0]


def _two_kinds():
    """Two images (2 tokens of one unit, 1 token of one unit; their [CLS] dropped) and a video of two one-token
    frames, image token 9, video token 8."""
    img = packed_units(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]), [(1, 2), (1, 1)], [2, 1], [1, 1])
    vid = packed_units(torch.tensor([0, 1]), torch.tensor([0, 0]), [(1, 1), (1, 1)], [2], [2])
    return [VisualLayout("pixel_values", 9, "image", True, img), VisualLayout("pixel_values_videos", 8, "frame", False,
                                                                               vid)]


def _name(token_id):
    return "video" if token_id == 8 else "image"


def test_visual_ids_number_each_kinds_tokens_in_turn_in_row_major_order():
    """Both images' tokens first (row 0's two, then row 1's one), then the video's (row 0): call-wide ids 0..4."""
    ids = torch.tensor([[1, 9, 9, 8, 8, 2], [-1, 1, 9, 3, 4, 2]])
    got = visual_ids(ids, _two_kinds(), _name)
    assert got.tolist() == [[-1, 0, 1, 3, 4, -1], [-1, -1, 2, -1, -1, -1]]


def test_visual_ids_refuse_placeholders_that_are_not_the_tokens():
    img, vid = _two_kinds()
    ids = torch.tensor([[1, 9, 9, 8, 8, 2], [-1, 1, 9, 3, 4, 2]])
    two_each = img._replace(units=img.units._replace(src=torch.arange(4), sizes=(2, 2)))
    with pytest.raises(ValueError, match="the prompt has 3 image placeholder tokens but the 2 image[(]s[)] give 4"):
        visual_ids(ids, [two_each, vid], _name)
    one_then_two = img._replace(units=img.units._replace(sizes=(1, 2)))  # image 1: row 0's last, row 1's one
    with pytest.raises(ValueError, match="image 1 is split across batch rows"):
        visual_ids(ids, [one_then_two, vid], _name)


def test_cls_rows_number_the_units_whose_cls_the_model_drops():
    img, vid = _two_kinds()
    assert cls_rows([img, vid]).tolist() == [0, 1, -1, -1]
    assert cls_rows([vid, img]).tolist() == [-1, -1, 0, 1]


def test_sample_units_append_the_cls_candidates_of_units_that_have_one():
    """Row 0 holds image 0 (unit 0) and the video (units 2, 3): one extra candidate, image 0's [CLS] (row 0 of the
    [CLS] table), after its four tokens: unit 0, patch -1."""
    kinds = _two_kinds()
    u = join_units([k.units for k in kinds])
    s = sample_units(u, torch.tensor([0, 1, 3, 4]), cls_rows(kinds))
    assert s.src.tolist() == [0, 1, 3, 4] and s.units.tolist() == [0, 2, 3]
    assert s.unit.tolist() == [0, 0, 1, 2, 0] and s.patch.tolist() == [0, 1, 0, 0, -1] and s.cls.tolist() == [0]
    plain = sample_units(u, torch.tensor([0, 1, 3, 4]))
    assert plain.unit.tolist() == [0, 0, 1, 2] and plain.cls.numel() == 0


def test_candidate_shapes_list_what_a_dry_run_is_handed():
    """The shapes both dry runs fill (the captured prefill's meta tensors, the vLLM plugin's random values): the tower
    signals the captured prefill computes by flat name, in the method's order (a kind it does not compute, here the
    received patches, is left out: such a method runs on the eager engine), then the features, and the [CLS] attention
    and keys only for a method that reads them."""
    reads = (TowerRead("received", 3), TowerRead("fullwidth", -2), TowerRead("received_patches", 4),
             TowerRead("cls_row", 5))
    widths, tower = (4, 8, 32), (6, 48)  # (heads of cls_attn, keys, vision_features); the tower's (heads, width)
    got = candidate_shapes(Needs(method="m", tower_reads=reads), 10, 64, widths, tower)
    assert got == {"recv:3": (10, 6), "fwa:-2": (10,), "fwk:-2": (10, 48), "clsl:5": (10, 6), "features": (10, 64),
                   "vision_features": (10, 32)}
    assert list(got)[:4] == ["recv:3", "fwa:-2", "fwk:-2", "clsl:5"]
    got = candidate_shapes(Needs(method="m", tower_attention=True), 3, 64, widths, tower)
    assert got == {"features": (3, 64), "vision_features": (3, 32), "cls_attn": (3, 4), "keys": (3, 8)}
