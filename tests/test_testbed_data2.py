"""The testbed v2 data generator (testbed/data2.py): determinism, disjoint splits, LLaVA-1.5 geometry,
answers re-derived independently from the scene description for every question type, balance, the
occlusion bound, glyph questions only with glyphs, support patch sets, and vocabulary coverage."""

import collections
import re

import numpy as np
import pytest

from testbed import data2 as D

N_PER_TYPE = 60


@pytest.fixture(scope="module")
def pool():
    """7 x 60 test questions (index order cycles the types) plus a typed pool per type from train."""
    qs = D.test_set(7 * N_PER_TYPE)
    return qs


def words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def test_deterministic_and_prefix_reproducible():
    for i in (0, 3, 6, 11):
        a, b = D.make_question(0, "test", i), D.make_question(0, "test", i)
        assert (a.question, a.answer, a.qtype, a.salience, a.subtype, a.support) == \
               (b.question, b.answer, b.qtype, b.salience, b.subtype, b.support)
        assert a.scene.signature() == b.scene.signature()
        assert a.image().tobytes() == b.image().tobytes()
        assert a.support_patches == b.support_patches
    tail = D.make_split("test", 5, start=20)
    assert [q.scene.signature() for q in tail] == [D.make_question(0, "test", i).scene.signature() for i in range(20, 25)]
    assert D.make_question(1, "test", 0).scene.signature() != D.make_question(0, "test", 0).scene.signature()


def test_splits_disjoint():
    train = {D.make_question(0, "train", i).scene.signature() for i in range(150)}
    test = {q.scene.signature() for q in D.test_set(150)}
    assert len(train) == 150 and len(test) == 150 and not train & test


def test_geometry_and_scene_shape(pool):
    assert (D.IMAGE_SIZE, D.PATCH, D.GRID, D.N_TOKENS) == (336, 14, 24, 576)
    img = pool[0].image()
    assert img.size == (336, 336) and img.mode == "RGB"
    for q in pool:
        s = q.scene
        n = len(s.shapes)
        assert 8 <= n <= 20, n
        assert len(s.visible) == len(s.patches) == len(s.objects)
        assert s.glyphs == list(range(n, len(s.objects)))  # glyphs drawn last
        for o in s.objects:
            assert o.r <= o.cx <= D.IMAGE_SIZE - o.r and o.r <= o.cy <= D.IMAGE_SIZE - o.r
            if not o.is_glyph:
                lo, hi = D.SIZE_PX[o.size]
                assert lo <= 2 * o.r <= hi
        assert sum(o.size == "large" for o in s.objects) <= D.MAX_LARGE
        assert len(q.support_patches) == len(q.support)
        for i, p in zip(q.support, q.support_patches):
            assert 0 <= i < len(s.objects) and p == s.patches[i]
            assert p and all(0 <= k < 576 for k in p) and list(p) == sorted(set(p))
    sizes = collections.Counter(o.size for q in pool for o in q.scene.objects if not o.is_glyph)
    assert all(sizes[s] > 0 for s in D.SIZES) and sizes["small"] > sizes["large"]
    # a small object covers 1-4 patches (a 20 px box can reach a third row / column with a sliver, rarely)
    small = np.array([len(p) for q in pool for o, p in zip(q.scene.objects, q.scene.patches)
                      if o.size == "small" and not o.is_glyph])
    assert small.min() >= 1 and small.max() <= 9 and (small <= 4).mean() >= 0.97
    large = [len(p) for q in pool for o, p in zip(q.scene.objects, q.scene.patches) if o.size == "large"]
    assert min(large) >= 9  # several patches
    assert len({q.scene.background["kind"] for q in pool}) == len(D.BACKGROUNDS)


def _owner(objs, ss):
    """Independent occlusion raster: the topmost object per pixel at ``ss`` x (full-image draws)."""
    from PIL import Image, ImageDraw
    owner = np.full((D.IMAGE_SIZE * ss,) * 2, -1)
    area = []
    for i, o in enumerate(objs):
        m = Image.new("L", (D.IMAGE_SIZE * ss,) * 2, 0)
        D._draw_shape(ImageDraw.Draw(m), o, ss, 255)
        m = np.asarray(m) > 127
        owner[m] = i
        area.append(m.sum())
    return owner, np.array(area)


def test_occlusion_bound_and_patch_sets(pool):
    occluded = 0
    for q in pool[:21]:  # independent check at 3x on 21 scenes
        objs = q.scene.objects
        owner, area = _owner(objs, 3)
        vis = np.array([(owner == i).sum() for i in range(len(objs))]) / area
        assert np.allclose(vis, q.scene.visible, atol=0.05)
        for o, v in zip(objs, vis):
            assert v >= (0.97 if o.is_glyph else D.MIN_VISIBLE - 0.04), (o, v)
        occluded += int((vis < 0.98).sum())
        pid = (np.arange(D.IMAGE_SIZE * 3) // (D.PATCH * 3))
        pid = pid[:, None] * D.GRID + pid[None, :]
        for i, p in enumerate(q.scene.patches):
            cnt = np.bincount(pid[owner == i], minlength=576)
            assert int(cnt.argmax()) in p  # the patch holding most of its visible area
            assert cnt[list(p)].sum() >= 0.8 * cnt.sum()  # the set holds most of it (slivers < 5 % of a patch are left out)
    assert occluded >= 10  # clutter: partial occlusion does happen
    for q in pool:  # the recorded bound everywhere
        assert min(v for o, v in zip(q.scene.objects, q.scene.visible) if not o.is_glyph) >= D.MIN_VISIBLE


# --- answers re-derived from the scene description ----------------------------------------------------

def _find(objs, color=None, shape=None, size=None):
    return [i for i, o in enumerate(objs) if not o.is_glyph and (color is None or o.color == color)
            and (shape is None or o.shape == shape) and (size is None or o.size == size)]


def _parse_ref(ws):
    """colour / shape / size words of a noun phrase."""
    return ({"color": w for w in ws if w in D.COLORS}.get("color"), next((w for w in ws if w in D.SHAPES), None),
            next((w for w in ws if w in D.SIZES), None))


def check_answer(q):
    objs, ws = q.scene.objects, words(q.question)
    t = q.qtype
    if t == "attribute":
        c, s, z = _parse_ref(ws)
        hit = _find(objs, c, s, z)
        assert len(hit) == 1 and q.support == tuple(hit)
        o = objs[hit[0]]
        assert q.answer == (o.color if ws[1] == "color" else o.shape)
        assert q.salience == o.size
    elif t == "existence":
        c, s, _ = _parse_ref(ws)
        hit = _find(objs, c, s)
        assert q.answer == ("yes" if hit else "no")
        assert (q.salience == "absent") == (not hit)
    elif t == "counting":
        if "shapes" in ws:
            hit = _find(objs, color=ws[2])
        else:
            hit = _find(objs, shape=next(s for s in D.SHAPES if D.PLURAL[s] == ws[2]))
        assert q.answer == str(len(hit)) and set(q.support) == set(hit)
    elif t == "scene_count":
        n = len(_find(objs))
        assert q.answer == {**{k: "10" for k in range(8, 13)}, **{k: "15" for k in range(13, 18)},
                            **{k: "20" for k in range(18, 21)}}[n]
    elif t == "relation":
        rel = next(r for r in D.RELATIONS if r in ws)
        c, s, _ = _parse_ref(ws[-2:])
        ref = _find(objs, c, s)
        assert len(ref) == 1
        b = objs[ref[0]]
        u = {"left": (-1, 0), "right": (1, 0), "above": (0, -1), "below": (0, 1)}[rel]
        # every object within 140 px whose direction is within 45 degrees of the relation's
        near = [j for j, o in enumerate(objs) if j != ref[0] and np.hypot(o.cx - b.cx, o.cy - b.cy) <= 140
                and np.degrees(np.arccos(np.clip(((o.cx - b.cx) * u[0] + (o.cy - b.cy) * u[1])
                                                 / np.hypot(o.cx - b.cx, o.cy - b.cy), -1, 1))) <= 45]
        assert len(near) == 1
        a = objs[near[0]]
        ang = np.degrees(np.arctan2(abs((a.cx - b.cx) * u[1] - (a.cy - b.cy) * u[0]),
                                    (a.cx - b.cx) * u[0] + (a.cy - b.cy) * u[1]))
        assert ang <= 26.6 and np.hypot(a.cx - b.cx, a.cy - b.cy) <= 100 and not a.is_glyph
        assert q.answer == (a.shape if ws[1] == "shape" else a.color)
        assert q.support == (near[0], ref[0])
        assert c + " " + s not in q.question.split(" is ")[0]  # the answer object is not named
    elif t == "superlative":
        most = "largest" if "largest" in ws else "smallest"
        after = ws[ws.index(most) + 1:]
        c, s, _ = _parse_ref(after)
        group = _find(objs, c, s)
        assert len(group) >= 2
        rs = sorted((objs[i].r, i) for i in group)
        if most == "largest":
            (r0, i0), (r1, _) = rs[-1], rs[-2]
            assert r0 >= 1.25 * r1
        else:
            (r0, i0), (r1, _) = rs[0], rs[1]
            assert r1 >= 1.25 * r0
        assert q.answer == (objs[i0].color if ws[1] == "color" else objs[i0].shape)
        assert q.support[0] == i0 and set(q.support) == set(group)
    elif t == "glyph":
        g = [o for o in objs if o.is_glyph]
        assert g
        if "box" in ws:
            assert len(g) == 1
            o = g[0]
            assert ("digit" in ws) == o.char.isdigit()
        else:
            side = "leftmost" if "leftmost" in ws else "rightmost"
            g = sorted(g, key=lambda o: o.cx, reverse=side == "rightmost")
            assert len(g) >= 2 and abs(g[0].cx - g[1].cx) >= 14
            o = g[0]
        assert q.answer == o.char and objs[q.support[0]] is o
    else:
        raise AssertionError(t)


def test_answers_correct_by_construction(pool):
    assert collections.Counter(q.qtype for q in pool) == {t: N_PER_TYPE for t in D.QTYPES}
    for q in pool:
        check_answer(q)


def test_typed_questions_and_glyph_only_with_glyphs():
    for t in D.QTYPES:
        for i in range(15):
            q = D.make_question(3, "train", i, qtype=t)
            assert q.qtype == t
            check_answer(q)
            if t != "glyph":
                assert not {"box", "label", "letter", "digit", "written"} & set(words(q.question))


def test_balance(pool):
    by = collections.defaultdict(list)
    for q in pool:
        by[q.qtype].append(q)
    for i in range(7 * N_PER_TYPE, 7 * 200, 7):  # more existence and counting questions (indices of those types)
        by["existence"].append(D.make_question(0, "test", i + 1))
        by["counting"].append(D.make_question(0, "test", i + 2))
    ex = by["existence"]
    yes = sum(q.answer == "yes" for q in ex) / len(ex)
    assert 0.42 <= yes <= 0.58, yes
    sub = collections.Counter(q.subtype for q in ex if q.answer == "no")
    assert sub["negative_random"] > 0 and sub["negative_color"] + sub["negative_shape"] > 0.3 * sum(sub.values())
    cnt = collections.Counter(q.answer for q in by["counting"])
    assert set(cnt) == {str(k) for k in range(6)} and min(cnt.values()) >= 0.06 * len(by["counting"]), cnt  # iid uniform targets
    assert set(collections.Counter(q.answer for q in by["scene_count"])) == set(D.SCENE_BUCKETS)
    assert set(q.answer for q in by["relation"] if "shape" in q.subtype) <= set(D.SHAPES)
    assert len({q.answer for q in by["relation"]}) >= 8 and len({q.subtype.split("_")[0] for q in by["relation"]}) == 4
    assert len({q.answer for q in by["attribute"]}) >= 10 and len({q.answer for q in by["superlative"]}) >= 8
    assert len({q.answer for q in by["glyph"]}) >= 12
    sal = collections.Counter(q.salience for q in pool)
    assert all(sal[s] > 0 for s in D.SALIENCE)


def test_vocabulary_covers_questions_and_answers(pool):
    vocab, answers = set(D.EXTRA_WORDS), set(D.answer_vocabulary())
    assert set(words(D.SUFFIX)) <= vocab
    for q in pool:
        assert set(words(q.question)) <= vocab, q.question
        assert q.answer in answers and q.answer in vocab
    from llava.tiny_tokenizer import build_tiny_tokenizer
    tok = build_tiny_tokenizer(extra_words=D.EXTRA_WORDS)
    for q in pool[:70]:
        assert tok.unk_token_id not in tok(q.prompt + " " + q.answer)["input_ids"]
