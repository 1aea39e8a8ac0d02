"""Synthetic visual QA, testbed v2 ("shapes-v2"): seeded cluttered scenes at LLaVA-1.5 geometry, with
one-word-answer questions of seven types. A second generator beside :mod:`testbed.data` (v1), same style
and interfaces (``make_question``, ``make_split``, ``test_set``, ``render``, ``answer_vocabulary``,
``EXTRA_WORDS``, ``QTYPES``).

Geometry: 336 x 336 images, patch 14: a 24 x 24 grid, 576 visual tokens (LLaVA-1.5's CLIP-L/336).

Scenes: 8-20 *shapes* (6 shapes x 8 colours) in three size classes, drawn in index order (later ones
over earlier ones):

* ``small``  12-20 px across (50 % of the objects; one to four patches),
* ``medium`` 28-44 px (35 %; about 2 x 2 to 4 x 4 patches),
* ``large``  56-84 px (15 %, at most 3 per scene; about 4 x 4 to 7 x 7 patches),

with random positions, so objects overlap: every object keeps at least ``MIN_VISIBLE`` = 60 % of its
area visible (``Scene.visible`` records each one's visible fraction). Backgrounds: solid, gradient,
noise, blotches, stripes, clutter (low-contrast muted rectangles), never close to an object colour.
Optional *glyphs* (OCR-like objects; 40 % of the scenes have 1-2, glyph questions have 1-3): a white
box (14 x 18 or 21 x 27 px) with one black letter or digit from a built-in 5 x 7 bitmap font (so
rendering does not depend on the installed fonts), drawn after the shapes and never occluded.
Glyphs are not shapes: they are not counted, compared or named by the other question types.

Question types (``Question.qtype``), each with a one-word answer:

* ``attribute`` - "what color is the small triangle?" / "what shape is the red object?" (the
  referent is unique in its scene by the words used; answer uniform over colours / shapes);
* ``existence`` - POPE-style yes / no: "is there a red circle in the image?" (50 % yes; of the
  negatives half *adversarial*, a present shape with its colour or its shape changed, half random);
* ``counting`` - "how many triangles are there?" / "how many red shapes are there?" (0-5, uniform);
* ``scene_count`` - "how many shapes are there, to the nearest five?" -> 10 / 15 / 20 (uniform).
  Exact counts 8-20 would be 13 classes whose neighbours differ by one object among twenty, a
  harder task than the instrument needs; rounding to the nearest five (8-12 -> 10, 13-17 -> 15,
  18-20 -> 20) keeps three one-word numeric answers that still need the whole image;
* ``relation`` - "what shape is to the left of the red circle?" / "what color is the object below
  the blue star?" (left / right / above / below, uniform; the answer object is not named): the
  reference is unique by (colour, shape); exactly one object (shape or glyph) lies within
  ``REL_RANGE`` = 140 px of it in the 90-degree cone around the direction, and that one lies within
  ``REL_NEAR`` = 100 px, in the 53-degree cone (off-axis at most half the on-axis distance), and
  clear of the reference along the axis;
* ``superlative`` - "what color is the largest object?" / "what shape is the smallest red object?" /
  "what color is the largest square?" (the group has >= 2 members; the extreme's size is at least
  ``SUP_MARGIN`` = 1.25 x the runner-up's, or at most 1 / 1.25 of it for "smallest");
* ``glyph`` - "what letter is in the box?" / "what digit is in the box?" (one glyph) or "what is
  written on the leftmost label?" / "rightmost" (2-3 glyphs, the extreme one at least 14 px clear
  along x); answer uniform over the 20 glyphs (digits 0-9 and c e f h k l p r t x: no a, which
  VQA answer normalisation strips as an article, and no letter that a 5 x 7 digit resembles).

Answers are balanced by drawing the target answer first and editing the scene to it (the answer
object's colour / shape / character, a counted class's membership), then checking every constraint
again (visibility included); scenes are redrawn from the same stream until everything holds.

``Question.salience`` is the size class of the object the answer is read from (``small`` /
``medium`` / ``large``; for counting the smallest counted, for relation the smaller of the pair,
``small`` for glyphs and scene counts), or ``absent`` (existence negatives, a count of 0).
``Question.support`` lists the indices (into ``scene.objects``) of the objects the answer depends
on, and ``Question.support_patches`` their patch sets on the 24 x 24 grid (row-major indices 0-575,
from ``Scene.patches``: the patches holding at least ``MIN_COVER`` of the object's *visible* area,
always at least the one holding most of it), so an oracle can force them into the kept set:
attribute: the referent; existence yes: the matching objects; existence no: the shapes sharing the
queried colour or shape (what must be looked at to say no); counting: the counted objects (none for
0); scene_count: every shape; relation: the answer object, then the reference; superlative: the
extreme, then the rest of the group; glyph: the answer glyph, then the other glyphs.

Determinism: question ``i`` of a split is drawn from ``numpy.random.default_rng([seed, split_id, i])``
(``train`` = 0, ``test`` = 1; the ``2`` appended to the seed list keeps v2's streams apart from v1's),
so the splits are disjoint streams and any prefix of either is reproducible on any machine (images are
rendered with PIL at 4x and box-filtered down; occlusion is measured on 2x masks).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 24
N_TOKENS = GRID * GRID  # 576
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (240, 220, 40),
    "white": (248, 248, 248), "black": (15, 15, 15), "orange": (245, 140, 20), "purple": (145, 50, 185),
}
SHAPES = ("circle", "square", "triangle", "cross", "star", "diamond")
PLURAL = {s: (s + "es" if s == "cross" else s + "s") for s in SHAPES}
SIZES = ("small", "medium", "large")
SIZE_PX = {"small": (12, 20), "medium": (28, 44), "large": (56, 84)}  # diameter range
SIZE_P = (0.5, 0.35, 0.15)
MAX_LARGE = 3
N_SHAPES = (8, 20)
RELATIONS = ("left", "right", "above", "below")
QTYPES = ("attribute", "existence", "counting", "scene_count", "relation", "superlative", "glyph")
SALIENCE = ("small", "medium", "large", "absent")
SPLITS = {"train": 0, "test": 1}
VERSION = 2  # appended to the rng seed list: v2 streams never coincide with v1's
SUFFIX = "Answer the question using a single word or phrase."
MAX_COUNT = 5
SCENE_BUCKETS = {"10": (8, 12), "15": (13, 17), "20": (18, 20)}
MIN_VISIBLE = 0.6
MIN_COVER = 0.05
MASK_SS = 2
REL_RANGE, REL_NEAR = 140.0, 100.0
SUP_MARGIN = 1.25
GLYPH_MARGIN = 14.0
GLYPH_P, GLYPHS_PER_SCENE = 0.4, (1, 2)

# 5 x 7 bitmap font (rows top to bottom, "#" = ink)
FONT = {k: v.replace(" ", "") for k, v in {
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.", "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####", "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.", "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.", "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.", "9": ".###. #...# #...# .#### ....# ...#. .##..",
    "c": ".###. #...# #.... #.... #.... #...# .###.", "e": "##### #.... #.... ####. #.... #.... #####",
    "f": "##### #.... #.... ####. #.... #.... #....", "h": "#...# #...# #...# ##### #...# #...# #...#",
    "k": "#...# #..#. #.#.. ##... #.#.. #..#. #...#", "l": "#.... #.... #.... #.... #.... #.... #####",
    "p": "####. #...# #...# ####. #.... #.... #....", "r": "####. #...# #...# ####. #.#.. #..#. #...#",
    "t": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..", "x": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
}.items()}
GLYPHS = tuple(FONT)
DIGITS = tuple(c for c in GLYPHS if c.isdigit())
LETTERS = tuple(c for c in GLYPHS if not c.isdigit())

#: Words the questions and answers use (all of them, BASE_WORDS of llava.tiny_tokenizer or not).
EXTRA_WORDS = sorted(set(list(COLORS) + list(SHAPES) + list(PLURAL.values()) + list(SIZES) + list(RELATIONS) + list(GLYPHS)
                         + list(SCENE_BUCKETS) + [
    "where", "to", "the", "is", "there", "in", "image", "what", "color", "shape", "shapes", "object", "how", "many",
    "are", "yes", "no", "answer", "question", "using", "a", "single", "word", "or", "phrase", "of", "nearest", "five",
    "largest", "smallest", "letter", "digit", "box", "written", "on", "label", "leftmost", "rightmost",
] + [str(i) for i in range(10)]))


def answer_vocabulary() -> list[str]:
    return sorted(set(COLORS) | set(SHAPES) | {"yes", "no"} | {str(i) for i in range(MAX_COUNT + 1)}
                  | set(SCENE_BUCKETS) | set(GLYPHS))


@dataclass(frozen=True)
class Obj:
    shape: str  # one of SHAPES, or "glyph"
    color: str  # a glyph's box is "white"
    size: str
    cx: float  # centre, px
    cy: float
    r: float  # half the bounding-box side (a glyph: half its box height), px
    char: str = ""  # a glyph's character

    @property
    def is_glyph(self) -> bool:
        return self.shape == "glyph"

    def name(self, with_size: bool = False, with_color: bool = True) -> str:
        parts = ([self.size] if with_size else []) + ([self.color] if with_color else []) + [self.shape]
        return " ".join(parts)


@dataclass
class Scene:
    objects: list[Obj]  # in drawing order (later over earlier); glyphs last
    background: dict
    key: str  # "<split>/<seed>/<index>"
    visible: tuple = ()  # per object: the fraction of its area not covered by later objects
    patches: tuple = ()  # per object: sorted patch indices (row-major on GRID x GRID) of its visible area

    def signature(self) -> str:
        """Content hash (objects + background), for disjointness checks."""
        s = repr(([(o.shape, o.color, o.size, o.char, round(o.cx, 2), round(o.cy, 2), round(o.r, 2)) for o in self.objects],
                  sorted(self.background.items())))
        return hashlib.sha1(s.encode()).hexdigest()

    @property
    def shapes(self) -> list[int]:
        return [i for i, o in enumerate(self.objects) if not o.is_glyph]

    @property
    def glyphs(self) -> list[int]:
        return [i for i, o in enumerate(self.objects) if o.is_glyph]


@dataclass
class Question:
    question: str
    answer: str
    qtype: str
    salience: str
    subtype: str = ""
    scene: Scene | None = field(default=None, repr=False)
    index: int = -1
    #: the objects the question names, in the order it names them, or for counting the objects counted
    refs: tuple = field(default=(), repr=False)
    #: for a counting question, the shape it counts ("" for a colour count)
    shape: str = ""
    #: indices into scene.objects of the objects the answer depends on (see the module docstring)
    support: tuple = ()
    #: per support object, its patch set on the 24 x 24 grid (filled in with the scene)
    support_patches: tuple = field(default=(), repr=False)

    @property
    def prompt(self) -> str:
        return f"{self.question}\n{SUFFIX}"

    def image(self) -> Image.Image:
        return render(self.scene)

    def support_mask(self) -> np.ndarray:
        """Boolean keep-mask over the 576 visual tokens: the union of the support's patches."""
        m = np.zeros(N_TOKENS, bool)
        for p in self.support_patches:
            m[list(p)] = True
        return m

    def as_dict(self) -> dict:
        return {"index": self.index, "question": self.question, "answer": self.answer, "qtype": self.qtype,
                "salience": self.salience, "subtype": self.subtype, "scene": self.scene.key if self.scene else None,
                "support": list(self.support)}


# ---------------------------------------------------------------------------------------------
# backgrounds, shapes, rendering
# ---------------------------------------------------------------------------------------------

def _muted(rng: np.random.Generator) -> tuple[int, int, int]:
    base = rng.uniform(85, 175)
    tint = rng.uniform(-22, 22, size=3)
    return tuple(int(np.clip(base + t, 0, 255)) for t in tint)


BACKGROUNDS = ("solid", "gradient", "noise", "blotches", "stripes", "clutter")


def sample_background(rng: np.random.Generator) -> dict:
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    return {"kind": kind, "c0": _muted(rng), "c1": _muted(rng), "angle": float(rng.uniform(0, 2 * np.pi)),
            "amp": float(rng.uniform(6, 18)), "period": float(rng.uniform(16, 48)), "seed": int(rng.integers(2**31))}


def render_background(bg: dict, size: int = IMAGE_SIZE) -> np.ndarray:
    c0 = np.array(bg["c0"], dtype=np.float32)
    c1 = np.array(bg["c1"], dtype=np.float32)
    rng = np.random.default_rng(bg["seed"])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    kind = bg["kind"]
    if kind == "solid":
        img = np.broadcast_to(c0, (size, size, 3)).copy()
    elif kind == "gradient":
        t = (np.cos(bg["angle"]) * (xx - 0.5) + np.sin(bg["angle"]) * (yy - 0.5)) / 0.71 * 0.5 + 0.5
        img = c0 + (c1 - c0) * np.clip(t, 0, 1)[..., None]
    elif kind == "noise":
        img = c0 + rng.normal(0, bg["amp"], size=(size, size, 1)) + rng.normal(0, bg["amp"] / 3, size=(size, size, 3))
    elif kind == "blotches":
        field_ = rng.uniform(0, 1, size=(6, 6)).astype(np.float32)
        t = np.asarray(Image.fromarray((field_ * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
                       dtype=np.float32) / 255
        img = c0 + (c1 - c0) * t[..., None]
    elif kind == "stripes":
        u = (np.cos(bg["angle"]) * xx + np.sin(bg["angle"]) * yy) * (size - 1) / bg["period"]
        t = 0.5 + 0.5 * np.sin(2 * np.pi * u)
        img = c0 + (c1 - c0) * t[..., None]
    else:  # clutter: low-contrast rectangles of muted colours (texture, not objects)
        img = np.broadcast_to(c0, (size, size, 3)).copy()
        for _ in range(40):
            w, h = rng.integers(6, 40, size=2)
            x, y = rng.integers(0, size, size=2)
            img[y:y + h, x:x + w] = c0 + (c1 - c0) * rng.uniform(0.3, 1.0)
    return np.clip(img, 0, 255)


def _glyph_scale(o: Obj) -> float:
    return o.r / 4.5  # box: 7 x 9 font cells (5 x 7 glyph, one cell of padding)


def _draw_shape(draw: ImageDraw.ImageDraw, o: Obj, scale: float, color, ox: float = 0.0, oy: float = 0.0,
                ink=None) -> None:
    """Draw ``o`` at ``scale`` (pixel coordinates shifted by ``-ox, -oy`` before scaling); ``ink``:
    a glyph's character colour (None: the box only, for masks)."""
    cx, cy, r = (o.cx - ox) * scale, (o.cy - oy) * scale, o.r * scale
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif o.shape == "square":
        s = r * 0.86
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=color)
    elif o.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=color)
    elif o.shape == "cross":
        w = r * 0.36
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
    elif o.shape == "star":
        pts = []
        for k in range(10):
            a = -np.pi / 2 + k * np.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * np.cos(a), cy + 0.05 * r + rr * np.sin(a)))
        draw.polygon(pts, fill=color)
    elif o.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=color)
    elif o.shape == "glyph":
        c = _glyph_scale(o) * scale
        draw.rectangle([cx - 3.5 * c, cy - 4.5 * c, cx + 3.5 * c, cy + 4.5 * c], fill=color)
        if ink is not None:
            bits = FONT[o.char]
            for row in range(7):
                for col in range(5):
                    if bits[row * 5 + col] == "#":
                        x0, y0 = cx - 2.5 * c + col * c, cy - 3.5 * c + row * c
                        draw.rectangle([x0, y0, x0 + c - 1, y0 + c - 1], fill=ink)
    else:
        raise ValueError(o.shape)


def render(scene: Scene, size: int = IMAGE_SIZE, ss: int = 4) -> Image.Image:
    """The scene as an RGB PIL image (objects drawn at ``ss`` x and box-filtered down)."""
    bg = render_background(scene.background, size)
    big = Image.fromarray(bg.astype(np.uint8)).resize((size * ss, size * ss), Image.NEAREST)
    draw = ImageDraw.Draw(big)
    for o in scene.objects:
        _draw_shape(draw, o, ss * size / IMAGE_SIZE, COLORS[o.color], ink=(10, 10, 10))
    return big.resize((size, size), Image.BOX)


def object_mask(o: Obj, ss: int = MASK_SS) -> tuple[int, int, np.ndarray]:
    """``(y0, x0, mask)``: the object's pixels on the ``ss`` x grid, ``mask`` its bounding-box crop."""
    half = o.r * 1.05 + 1
    x0, y0 = max(int(np.floor((o.cx - half) * ss)), 0), max(int(np.floor((o.cy - half) * ss)), 0)
    x1 = min(int(np.ceil((o.cx + half) * ss)), IMAGE_SIZE * ss)
    y1 = min(int(np.ceil((o.cy + half) * ss)), IMAGE_SIZE * ss)
    m = Image.new("L", (x1 - x0, y1 - y0), 0)
    _draw_shape(ImageDraw.Draw(m), o, ss, 255, ox=x0 / ss, oy=y0 / ss)
    return y0, x0, np.asarray(m) > 127


def layout(objs: list[Obj], ss: int = MASK_SS) -> tuple[np.ndarray, np.ndarray]:
    """``(owner, area)``: the index of the topmost object at each pixel of the ``ss`` x grid (-1:
    background) and each object's full area in pixels."""
    owner = np.full((IMAGE_SIZE * ss, IMAGE_SIZE * ss), -1, np.int16)
    area = np.zeros(len(objs))
    for i, o in enumerate(objs):
        y0, x0, m = object_mask(o, ss)
        owner[y0:y0 + m.shape[0], x0:x0 + m.shape[1]][m] = i
        area[i] = m.sum()
    return owner, area


_PID = {}


def _patch_ids(ss: int) -> np.ndarray:
    if ss not in _PID:
        g = np.arange(IMAGE_SIZE * ss) // (PATCH * ss)
        _PID[ss] = (g[:, None] * GRID + g[None, :]).astype(np.int64)
    return _PID[ss]


def visibility(objs: list[Obj], ss: int = MASK_SS) -> tuple[np.ndarray, np.ndarray]:
    """``(visible, per_patch)``: each object's visible fraction and its visible pixels per patch
    (n x 576)."""
    owner, area = layout(objs, ss)
    sel = owner >= 0
    per_patch = np.bincount(owner[sel].astype(np.int64) * N_TOKENS + _patch_ids(ss)[sel],
                            minlength=len(objs) * N_TOKENS).reshape(len(objs), N_TOKENS)
    return per_patch.sum(1) / np.maximum(area, 1), per_patch


def _finish(objs: list[Obj], background: dict, key: str) -> Scene | None:
    """The scene with its visibility and patch sets, or None if an occlusion bound fails."""
    vis, per_patch = visibility(objs)
    for o, v in zip(objs, vis):
        if v < (0.999 if o.is_glyph else MIN_VISIBLE):
            return None
    thr = MIN_COVER * (PATCH * MASK_SS) ** 2
    patches = []
    for row in per_patch:
        p = set(np.flatnonzero(row >= thr).tolist()) | {int(row.argmax())}
        patches.append(tuple(sorted(p)))
    return Scene(list(objs), background, key, tuple(float(v) for v in vis), tuple(patches))


def sample_scene(rng: np.random.Generator, key: str = "", n_shapes: tuple[int, int] | None = None,
                 n_glyphs: tuple[int, int] | None = None) -> Scene:
    """``n_shapes`` (default 8-20) shapes and ``n_glyphs`` glyphs (default: none, or with probability
    ``GLYPH_P`` 1-2), placed at random (later over earlier) keeping every object >= MIN_VISIBLE
    visible; glyphs last, overlapping no glyph. A shape that finds no place in 60 tries is dropped
    and drawn again (so the count is exact)."""
    lo, hi = n_shapes or N_SHAPES
    n = int(rng.integers(lo, hi + 1))
    if n_glyphs is None:
        n_glyphs = GLYPHS_PER_SCENE if rng.random() < GLYPH_P else (0, 0)
    ng = int(rng.integers(n_glyphs[0], n_glyphs[1] + 1))
    sizes = list(rng.choice(len(SIZES), size=n, p=SIZE_P))
    while sum(s == 2 for s in sizes) > MAX_LARGE:
        sizes[sizes.index(2)] = 1
    ss = MASK_SS
    owner = np.full((IMAGE_SIZE * ss, IMAGE_SIZE * ss), -1, np.int16)
    objs: list[Obj] = []
    area: list[float] = []
    vis: list[float] = []
    todo = [("shape", SIZES[s]) for s in sizes] + [("glyph", "small")] * ng
    drops = 0
    while todo:
        kind, size = todo[0]
        for _ in range(60):
            if kind == "glyph":
                r = 4.5 * float(rng.choice([2.0, 3.0]))
                o = Obj("glyph", "white", "small", 0, 0, r, GLYPHS[int(rng.integers(len(GLYPHS)))])
            else:
                lo_px, hi_px = SIZE_PX[size]
                r = float(rng.uniform(lo_px, hi_px)) / 2
                o = Obj(SHAPES[int(rng.integers(len(SHAPES)))], list(COLORS)[int(rng.integers(len(COLORS)))], size, 0, 0, r)
            cx = float(rng.uniform(r + 2, IMAGE_SIZE - r - 2))
            cy = float(rng.uniform(r + 2, IMAGE_SIZE - r - 2))
            o = replace(o, cx=cx, cy=cy)
            y0, x0, m = object_mask(o, ss)
            crop = owner[y0:y0 + m.shape[0], x0:x0 + m.shape[1]]
            under = crop[m]
            hit = np.bincount(under[under >= 0].astype(np.int64), minlength=len(objs))
            ok = True
            for j, h in enumerate(hit):
                if h and ((objs[j].is_glyph) or (vis[j] - h) / area[j] < MIN_VISIBLE):
                    ok = False
                    break
            if not ok:
                continue
            for j, h in enumerate(hit):
                vis[j] -= h
            crop[m] = len(objs)
            objs.append(o)
            area.append(float(m.sum()))
            vis.append(float(m.sum()))
            todo.pop(0)
            break
        else:
            todo.pop(0)
            drops += 1
            if kind == "shape" and drops <= 20:
                todo.insert(sum(1 for t in todo if t[0] == "shape"), ("shape", "small"))  # retry smaller
    return _finish(objs, sample_background(rng), key)


def _edit(scene: Scene, changes: dict[int, dict]) -> Scene | None:
    """The scene with some objects' attributes changed (colour changes keep the layout; shape or
    character changes re-measure it), or None if an occlusion bound now fails."""
    objs = list(scene.objects)
    geom = False
    for i, ch in changes.items():
        geom |= "shape" in ch and ch["shape"] != objs[i].shape
        objs[i] = replace(objs[i], **ch)
    if not geom:
        return Scene(objs, scene.background, scene.key, scene.visible, scene.patches)
    return _finish(objs, scene.background, scene.key)


# ---------------------------------------------------------------------------------------------
# questions
# ---------------------------------------------------------------------------------------------

def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _smallest_size(objs) -> str:
    return min((o.size for o in objs), key=SIZES.index) if objs else "absent"


def _describe(objs: list[Obj], i: int, attr: str) -> str | None:
    """The shortest words naming shape ``i`` uniquely by its ``attr`` (+ size), or None."""
    o = objs[i]
    for keys in ((attr,), ("size", attr)):
        if sum(all(getattr(x, k) == getattr(o, k) for k in keys) for x in objs if not x.is_glyph) == 1:
            return " ".join(getattr(o, k) for k in keys)
    return None


def q_attribute(rng, scene, want):
    objs = scene.objects
    cands = [i for i in scene.shapes if objs[i].size == want["size"]]
    rng.shuffle(cands)
    for i in cands:
        if want["sub"] == "color":
            d = _describe(objs, i, "shape")
            if d is None:
                continue
            new = _edit(scene, {i: {"color": want["answer"]}})
            text = f"what color is the {d}?"
        else:
            d = _describe(objs, i, "color")
            if d is None:
                continue
            new = _edit(scene, {i: {"shape": want["answer"]}})
            text = f"what shape is the {d} object?"
        if new is None:
            return None
        o = new.objects[i]
        return new, Question(text, want["answer"], "attribute", o.size, want["sub"], refs=(o,), support=(i,))
    return None


def q_existence(rng, scene, want):
    objs = scene.objects
    shp = scene.shapes
    present = {(objs[i].color, objs[i].shape) for i in shp}
    if want["kind"] == "positive":
        cands = [i for i in shp if objs[i].size == want["size"]] or shp
        o = objs[_pick(rng, cands)]
        c, sh, sub = o.color, o.shape, "positive"
    elif want["kind"] == "adversarial":
        o = objs[_pick(rng, shp)]
        which = "color" if rng.random() < 0.5 else "shape"
        opts = [(c, o.shape) for c in COLORS] if which == "color" else [(o.color, s) for s in SHAPES]
        opts = [p for p in opts if p not in present]
        if not opts:
            return None
        (c, sh), sub = _pick(rng, opts), f"negative_{which}"
    else:
        opts = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        (c, sh), sub = _pick(rng, opts), "negative_random"
    match = tuple(i for i in shp if (objs[i].color, objs[i].shape) == (c, sh))
    if match:
        sal, support = _smallest_size([objs[i] for i in match]), match
    else:
        sal, support = "absent", tuple(i for i in shp if objs[i].color == c or objs[i].shape == sh)
    return scene, Question(f"is there a {c} {sh} in the image?", "yes" if match else "no", "existence", sal, sub,
                           refs=tuple(objs[i] for i in match), support=support)


def q_counting(rng, scene, want):
    objs = scene.objects
    attr, k = want["attr"], want["count"]
    values = list(SHAPES) if attr == "shape" else list(COLORS)
    v = _pick(rng, values)
    members = [i for i in scene.shapes if getattr(objs[i], attr) == v]
    others = [i for i in scene.shapes if getattr(objs[i], attr) != v]
    changes = {}
    if len(members) > k:
        for i in rng.choice(members, size=len(members) - k, replace=False):
            changes[int(i)] = {attr: _pick(rng, [x for x in values if x != v])}
    elif len(members) < k:
        for i in rng.choice(others, size=k - len(members), replace=False):
            changes[int(i)] = {attr: v}
    new = _edit(scene, changes)
    if new is None:
        return None
    counted = tuple(i for i in new.shapes if getattr(new.objects[i], attr) == v)
    assert len(counted) == k
    text = f"how many {PLURAL[v]} are there?" if attr == "shape" else f"how many {v} shapes are there?"
    return new, Question(text, str(k), "counting", _smallest_size([new.objects[i] for i in counted]), f"{attr}_{k}",
                         refs=tuple(new.objects[i] for i in counted), shape=v if attr == "shape" else "", support=counted)


def round5(n: int) -> str:
    return str(int(5 * np.floor(n / 5 + 0.5)))


def q_scene_count(rng, scene, want):
    n = len(scene.shapes)
    if round5(n) != want["answer"]:
        return None
    return scene, Question("how many shapes are there, to the nearest five?", want["answer"], "scene_count", "small",
                           f"n_{n}", refs=(), support=tuple(scene.shapes))


_DIRS = {"left": (-1, 0), "right": (1, 0), "above": (0, -1), "below": (0, 1)}


def relation_target(objs: list[Obj], b: int, rel: str) -> int | None:
    """The one object clearly ``rel`` of object ``b`` (see the module docstring), or None."""
    ux, uy = _DIRS[rel]
    ref = objs[b]
    inside = []
    for j, a in enumerate(objs):
        if j == b:
            continue
        dx, dy = a.cx - ref.cx, a.cy - ref.cy
        along, off = dx * ux + dy * uy, abs(dx * uy - dy * ux)
        if along > 0 and off <= along and np.hypot(dx, dy) <= REL_RANGE:
            inside.append((j, along, off, np.hypot(dx, dy)))
    if len(inside) != 1:
        return None
    j, along, off, dist = inside[0]
    if off > 0.5 * along or dist > REL_NEAR or along < 0.6 * (objs[j].r + ref.r) + 4:
        return None
    return j


def q_relation(rng, scene, want):
    objs = scene.objects
    cands = []
    for b in scene.shapes:
        if sum((x.color, x.shape) == (objs[b].color, objs[b].shape) for x in objs if not x.is_glyph) != 1:
            continue
        a = relation_target(objs, b, want["rel"])
        if a is not None and not objs[a].is_glyph:
            cands.append((a, b))
    if not cands:
        return None
    a, b = _pick(rng, cands)
    new = _edit(scene, {a: {want["sub"]: want["answer"]}})
    if new is None:
        return None
    o, ref = new.objects[a], new.objects[b]
    if sum((x.color, x.shape) == (ref.color, ref.shape) for x in new.objects if not x.is_glyph) != 1 \
            or relation_target(new.objects, b, want["rel"]) != a:
        return None
    where = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}[want["rel"]]
    text = (f"what shape is {where} the {ref.color} {ref.shape}?" if want["sub"] == "shape"
            else f"what color is the object {where} the {ref.color} {ref.shape}?")
    sal = _smallest_size([o, ref])
    return new, Question(text, want["answer"], "relation", sal, f"{want['rel']}_{want['sub']}", refs=(ref,), support=(a, b))


def superlative_target(objs: list[Obj], group: list[int], most: str) -> int | None:
    """The group's clearly largest / smallest member (size ratio >= SUP_MARGIN to the runner-up)."""
    if len(group) < 2:
        return None
    order = sorted(group, key=lambda i: objs[i].r, reverse=(most == "largest"))
    r0, r1 = objs[order[0]].r, objs[order[1]].r
    ok = r0 >= SUP_MARGIN * r1 if most == "largest" else r0 * SUP_MARGIN <= r1
    return order[0] if ok else None


def q_superlative(rng, scene, want):
    objs = scene.objects
    most, sub = want["most"], want["sub"]
    groups = [("object", list(scene.shapes))]
    if sub == "color":
        groups += [(s, [i for i in scene.shapes if objs[i].shape == s]) for s in SHAPES]
    else:
        groups += [(f"{c} object", [i for i in scene.shapes if objs[i].color == c]) for c in COLORS]
    cands = [(name, g, t) for name, g in groups if (t := superlative_target(objs, g, most)) is not None]
    if not cands:
        return None
    name, g, t = _pick(rng, cands)
    new = _edit(scene, {t: {sub: want["answer"]}})
    if new is None:
        return None
    o = new.objects[t]
    return new, Question(f"what {'color' if sub == 'color' else 'shape'} is the {most} {name}?", want["answer"],
                         "superlative", o.size, f"{most}_{sub}_{'all' if name == 'object' else 'group'}", refs=(),
                         support=(t,) + tuple(i for i in g if i != t))


def glyph_target(objs: list[Obj], glyphs: list[int], sub: str) -> int | None:
    if sub == "single":
        return glyphs[0] if len(glyphs) == 1 else None
    if len(glyphs) < 2:
        return None
    order = sorted(glyphs, key=lambda i: objs[i].cx, reverse=(sub == "rightmost"))
    return order[0] if abs(objs[order[0]].cx - objs[order[1]].cx) >= GLYPH_MARGIN else None


def q_glyph(rng, scene, want):
    g = scene.glyphs
    t = glyph_target(scene.objects, g, want["sub"])
    if t is None:
        return None
    new = _edit(scene, {t: {"char": want["answer"]}})
    if want["sub"] == "single":
        text = f"what {'digit' if want['answer'].isdigit() else 'letter'} is in the box?"
    else:
        text = f"what is written on the {want['sub']} label?"
    return new, Question(text, want["answer"], "glyph", "small", want["sub"], refs=(new.objects[t],),
                         support=(t,) + tuple(i for i in g if i != t))


def _want(rng, qtype: str) -> dict:
    """The question's target (answer class etc.), drawn before the scene so that answers stay balanced."""
    size = SIZES[int(rng.integers(3))]
    if qtype == "attribute":
        sub = ["color", "shape"][int(rng.integers(2))]
        return {"size": size, "sub": sub, "answer": _pick(rng, list(COLORS) if sub == "color" else list(SHAPES))}
    if qtype == "existence":
        return {"kind": "positive" if rng.random() < 0.5 else ["adversarial", "random"][int(rng.integers(2))],
                "size": size}
    if qtype == "counting":
        return {"count": int(rng.integers(0, MAX_COUNT + 1)), "attr": ["shape", "color"][int(rng.integers(2))]}
    if qtype == "scene_count":
        return {"answer": _pick(rng, list(SCENE_BUCKETS))}
    if qtype == "relation":
        sub = ["shape", "color"][int(rng.integers(2))]
        return {"rel": _pick(rng, RELATIONS), "sub": sub,
                "answer": _pick(rng, list(SHAPES) if sub == "shape" else list(COLORS))}
    if qtype == "superlative":
        sub = ["color", "shape"][int(rng.integers(2))]
        return {"most": ["largest", "smallest"][int(rng.integers(2))], "sub": sub,
                "answer": _pick(rng, list(COLORS) if sub == "color" else list(SHAPES))}
    if qtype == "glyph":
        return {"sub": _pick(rng, ["single", "single", "leftmost", "rightmost"]), "answer": _pick(rng, GLYPHS)}
    raise ValueError(qtype)


MAKERS = {"attribute": q_attribute, "existence": q_existence, "counting": q_counting, "scene_count": q_scene_count,
          "relation": q_relation, "superlative": q_superlative, "glyph": q_glyph}


def _scene_args(qtype: str, want: dict) -> dict:
    if qtype == "scene_count":
        return {"n_shapes": SCENE_BUCKETS[want["answer"]]}
    if qtype == "glyph":
        return {"n_glyphs": (1, 1) if want["sub"] == "single" else (2, 3)}
    return {}


def make_question(seed: int, split: str, index: int, qtype: str | None = None) -> Question:
    """Question ``index`` of ``split``: its own scene (and, if ``qtype`` is None, a type cycling
    through QTYPES with the index). Scenes are redrawn (same stream) until the type's constraints hold."""
    rng = np.random.default_rng([seed, SPLITS[split], index, VERSION])
    qtype = qtype or QTYPES[index % len(QTYPES)]
    want = _want(rng, qtype)
    for attempt in range(500):
        scene = sample_scene(rng, key=f"{split}/{seed}/{index}" + (f".{attempt}" if attempt else ""),
                             **_scene_args(qtype, want))
        out = MAKERS[qtype](rng, scene, want)
        if out is not None:
            scene, q = out
            q.scene, q.index = scene, index
            q.support_patches = tuple(scene.patches[i] for i in q.support)
            return q
    raise RuntimeError(f"could not make a {qtype} question for {split}/{seed}/{index}")


def make_split(split: str, n: int, seed: int = 0, start: int = 0) -> list[Question]:
    """``n`` questions of ``split`` (indices ``start`` .. ``start + n - 1``), types balanced."""
    return [make_question(seed, split, i) for i in range(start, start + n)]


def test_set(n: int = 700, seed: int = 0) -> list[Question]:
    """The fixed test set of the v2 benchmark (100 per type at the default size)."""
    return make_split("test", n, seed)


# ---------------------------------------------------------------------------------------------
# captions (the pre-training text of the v2 recipe: testbed/train2.py stages ``tower`` and ``align``)
# ---------------------------------------------------------------------------------------------

#: chance that a caption mentions an object of each size class: alt-text-like captions name what is
#: salient and leave most small details out (the bias real CLIP / LLaVA pre-training text has).
CAPTION_P = {"large": 1.0, "medium": 0.6, "small": 0.25}
CAPTION_GLYPH_P = 0.5
#: the words captions use beyond EXTRA_WORDS (background kinds, connectives)
CAPTION_WORDS = sorted(set(BACKGROUNDS) | {"scene", "with", "and", "about", "label", "more", "background"})
#: the v2 model's vocabulary: questions, answers and captions
MODEL_WORDS = sorted(set(EXTRA_WORDS) | set(CAPTION_WORDS))


@dataclass
class Caption:
    text: str
    scene: Scene = field(repr=False)
    #: indices into scene.objects of the objects the caption names, in the order it names them
    named: tuple = ()

    def image(self) -> Image.Image:
        return render(self.scene)


def caption(scene: Scene, rng: np.random.Generator) -> Caption:
    """A short caption: "a <background> scene with about <10|15|20> shapes : a large red circle , a blue
    star and a label 7 ." Objects are named largest first, each with probability ``CAPTION_P`` of its
    size class (large always), glyphs with ``CAPTION_GLYPH_P``; the size word is said for large and
    small objects. At least one object is named."""
    shapes = sorted(scene.shapes, key=lambda i: -scene.objects[i].r)
    named = [i for i in shapes if rng.random() < CAPTION_P[scene.objects[i].size]]
    named += [i for i in scene.glyphs if rng.random() < CAPTION_GLYPH_P]
    if not named:
        named = [shapes[0]]
    parts = []
    for i in named:
        o = scene.objects[i]
        if o.is_glyph:
            parts.append(f"a label {o.char}")
        else:
            parts.append("a " + (f"{o.size} " if o.size != "medium" else "") + f"{o.color} {o.shape}")
    listed = parts[0] if len(parts) == 1 else " , ".join(parts[:-1]) + " and " + parts[-1]
    text = f"a {scene.background['kind']} scene with about {round5(len(scene.shapes))} shapes : {listed} ."
    return Caption(text, scene, tuple(named))


def make_caption(seed: int, split: str, index: int) -> Caption:
    """Caption ``index`` of ``split``: its own scene (default object counts, glyphs as the questions'
    scenes have them), from a stream disjoint from the questions' (a ``1`` after VERSION)."""
    rng = np.random.default_rng([seed, SPLITS[split], index, VERSION, 1])
    for attempt in range(500):
        scene = sample_scene(rng, key=f"caption/{split}/{seed}/{index}" + (f".{attempt}" if attempt else ""))
        if scene is not None:
            return caption(scene, rng)
    raise RuntimeError(f"could not make a caption scene for {split}/{seed}/{index}")
