"""Synthetic visual QA ("shapes"): seeded images of a few small and large objects on varied
backgrounds, with one-word-answer questions of four types.

Images are 112 x 112 px (the testbed's CLIP tower uses patch 14: an 8 x 8 grid, 64 visual tokens).
A *small* object is 10-13 px across (it covers one to four patches, usually one or two) and is the
non-salient kind of detail that text-agnostic pruning tends to drop; a *large* object is 28-38 px
(about 2 x 2 to 3 x 3 patches) and is salient. Every scene has 1-2 large and 2-3 small objects, no
two with the same (colour, shape).

Question types (``Question.qtype``):

* ``attribute`` - "what color is the small triangle?" / "what shape is the large red object?"
  (the referent is unique in its scene);
* ``existence`` - POPE-style yes / no, balanced: "is there a small red circle in the image?";
  half of the negatives are *adversarial* (a present object with its colour, shape or size
  changed), half random absent combinations;
* ``counting`` - "how many triangles are there?" (answers 0-3, near uniform);
* ``spatial`` - "where is the red circle relative to the blue square?" -> left / right / above /
  below (the two centres differ clearly along the answer's axis).

``Question.salience`` tags what the answer depends on: ``small`` if a small object is among the
objects the question is about (a count that includes a small object; either object of a spatial
pair), ``large`` if only large ones, ``absent`` if the queried object does not exist (existence
negatives, a count of 0). Reports give accuracy overall, per type and per salience.

Determinism: scene ``i`` of a split is drawn from ``numpy.random.default_rng([seed, split_id, i])``
(``train`` = 0, ``test`` = 1), so the two splits are disjoint streams and any prefix of either is
reproducible on any machine (images are rendered with PIL at 4x and box-filtered down).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 112
PATCH = 14
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (240, 220, 40),
    "white": (248, 248, 248), "black": (15, 15, 15), "orange": (245, 140, 20), "purple": (145, 50, 185),
}
SHAPES = ("circle", "square", "triangle", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
SIZES = ("small", "large")
SIZE_PX = {"small": (10, 13), "large": (28, 38)}
RELATIONS = ("left", "right", "above", "below")
QTYPES = ("attribute", "existence", "counting", "spatial")
SALIENCE = ("small", "large", "absent")
SPLITS = {"train": 0, "test": 1}
SUFFIX = "Answer the question using a single word or phrase."
MAX_COUNT = 3
N_LARGE, N_SMALL = (1, 2), (2, 3)  # objects per scene of each size (inclusive ranges)
MAX_OBJECTS = N_LARGE[1] + N_SMALL[1]

#: Words the questions and answers use (beyond llava.tiny_tokenizer.BASE_WORDS, which has most).
EXTRA_WORDS = sorted(set(list(COLORS) + list(SHAPES) + list(PLURAL.values()) + list(SIZES) + list(RELATIONS) + [
    "where", "relative", "to", "the", "is", "there", "in", "image", "what", "color", "shape", "object", "how",
    "many", "are", "yes", "no", "answer", "question", "using", "a", "single", "word", "or", "phrase",
] + [str(i) for i in range(10)]))


def answer_vocabulary() -> list[str]:
    return sorted(set(COLORS) | set(SHAPES) | {"yes", "no"} | set(RELATIONS) | {str(i) for i in range(MAX_COUNT + 1)})


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cx: float  # centre, px
    cy: float
    r: float  # half the bounding-box side, px

    def name(self, with_size: bool = False, with_color: bool = True) -> str:
        parts = ([self.size] if with_size else []) + ([self.color] if with_color else []) + [self.shape]
        return " ".join(parts)


@dataclass
class Scene:
    objects: list[Obj]
    background: dict
    key: str  # "<split>/<seed>/<index>"

    def signature(self) -> str:
        """Content hash (objects + background), for disjointness checks."""
        s = repr((sorted((o.shape, o.color, o.size, round(o.cx, 2), round(o.cy, 2)) for o in self.objects),
                  sorted(self.background.items())))
        return hashlib.sha1(s.encode()).hexdigest()


@dataclass
class Question:
    question: str  # the bare question ("what color is the small triangle?")
    answer: str
    qtype: str
    salience: str
    subtype: str = ""
    scene: Scene | None = field(default=None, repr=False)
    index: int = -1
    #: the objects the question names, in the order it names them, or for counting all the objects
    #: counted (training-only: the referring and grounding objectives of testbed.train); empty when
    #: it names none that exists
    refs: tuple = field(default=(), repr=False)
    #: for a counting question, the shape it counts (its plural names it in the text; training-only)
    shape: str = ""

    @property
    def prompt(self) -> str:
        """The text given to the model (LLaVA's benchmark answer-format suffix on its own line)."""
        return f"{self.question}\n{SUFFIX}"

    def image(self) -> Image.Image:
        return render(self.scene)

    def as_dict(self) -> dict:
        return {"index": self.index, "question": self.question, "answer": self.answer, "qtype": self.qtype,
                "salience": self.salience, "subtype": self.subtype, "scene": self.scene.key if self.scene else None}


# ---------------------------------------------------------------------------------------------
# scenes and rendering
# ---------------------------------------------------------------------------------------------

def _muted(rng: np.random.Generator) -> tuple[int, int, int]:
    """A mid-tone, low-saturation background colour (never close to an object colour)."""
    base = rng.uniform(85, 175)
    tint = rng.uniform(-22, 22, size=3)
    return tuple(int(np.clip(base + t, 0, 255)) for t in tint)


def sample_background(rng: np.random.Generator) -> dict:
    kind = ["solid", "gradient", "noise", "blotches"][int(rng.integers(4))]
    bg = {"kind": kind, "c0": _muted(rng), "c1": _muted(rng), "angle": float(rng.uniform(0, 2 * np.pi)),
          "amp": float(rng.uniform(6, 18)), "seed": int(rng.integers(2**31))}
    return bg


def render_background(bg: dict, size: int = IMAGE_SIZE) -> np.ndarray:
    c0 = np.array(bg["c0"], dtype=np.float32)
    c1 = np.array(bg["c1"], dtype=np.float32)
    rng = np.random.default_rng(bg["seed"])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    if bg["kind"] == "solid":
        img = np.broadcast_to(c0, (size, size, 3)).copy()
    elif bg["kind"] == "gradient":
        t = (np.cos(bg["angle"]) * (xx - 0.5) + np.sin(bg["angle"]) * (yy - 0.5)) / 0.71 * 0.5 + 0.5
        img = c0 + (c1 - c0) * np.clip(t, 0, 1)[..., None]
    elif bg["kind"] == "noise":
        img = c0 + rng.normal(0, bg["amp"], size=(size, size, 1)) + rng.normal(0, bg["amp"] / 3, size=(size, size, 3))
    else:  # blotches: low-frequency random field blending c0 and c1
        field_ = rng.uniform(0, 1, size=(4, 4)).astype(np.float32)
        t = np.asarray(Image.fromarray((field_ * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
                       dtype=np.float32) / 255
        img = c0 + (c1 - c0) * t[..., None]
    return np.clip(img, 0, 255)


def _draw_shape(draw: ImageDraw.ImageDraw, o: Obj, scale: int, color) -> None:
    cx, cy, r = o.cx * scale, o.cy * scale, o.r * scale
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
    else:
        raise ValueError(o.shape)


def render(scene: Scene, size: int = IMAGE_SIZE, ss: int = 4) -> Image.Image:
    """The scene as an RGB PIL image (objects drawn at ``ss`` x and box-filtered down)."""
    bg = render_background(scene.background, size)
    big = Image.fromarray(bg.astype(np.uint8)).resize((size * ss, size * ss), Image.NEAREST)
    draw = ImageDraw.Draw(big)
    for o in scene.objects:
        _draw_shape(draw, o, ss, COLORS[o.color])
    return big.resize((size, size), Image.BOX)


def sample_scene(rng: np.random.Generator, key: str = "", n_objects: tuple[int, int] | None = None) -> Scene:
    """1-2 large and 2-3 small objects, unique (colour, shape), non-overlapping (3 px gap).
    ``n_objects = (lo, hi)``: instead lo..hi objects in all, each large or small at random (the
    training curriculum's simpler scenes)."""
    if n_objects is None:
        n_large, n_small = int(rng.integers(N_LARGE[0], N_LARGE[1] + 1)), int(rng.integers(N_SMALL[0], N_SMALL[1] + 1))
    else:
        n = int(rng.integers(n_objects[0], n_objects[1] + 1))
        n_large = int((rng.random(n) < 0.4).sum())
        n_small = n - n_large
    sizes = ["large"] * n_large + ["small"] * n_small
    pairs = [(s, c) for s in SHAPES for c in COLORS]
    chosen = rng.choice(len(pairs), size=len(sizes), replace=False)
    objs: list[Obj] = []
    for size, pi in zip(sizes, chosen):
        shape, color = pairs[int(pi)]
        lo, hi = SIZE_PX[size]
        for _ in range(200):
            d = float(rng.uniform(lo, hi))
            r = d / 2
            cx = float(rng.uniform(r + 2, IMAGE_SIZE - r - 2))
            cy = float(rng.uniform(r + 2, IMAGE_SIZE - r - 2))
            if all(max(abs(cx - o.cx) - o.r - r, abs(cy - o.cy) - o.r - r) >= 3 for o in objs):
                objs.append(Obj(shape, color, size, cx, cy, r))
                break
    order = rng.permutation(len(objs))
    return Scene(objects=[objs[i] for i in order], background=sample_background(rng), key=key)


# ---------------------------------------------------------------------------------------------
# questions
# ---------------------------------------------------------------------------------------------

def _unique(objs, o, attrs) -> bool:
    return sum(all(getattr(x, a) == getattr(o, a) for a in attrs) for x in objs) == 1


def q_attribute(rng, scene, want) -> Question | None:
    objs = scene.objects
    cands = [o for o in objs if o.size == want["size"]]
    if not cands:
        return None
    o = cands[int(rng.integers(len(cands)))]
    if want["sub"] == "color" and _unique(objs, o, ("size", "shape")):
        return Question(f"what color is the {o.size} {o.shape}?", o.color, "attribute", o.size, "color", refs=(o,))
    if want["sub"] == "shape" and _unique(objs, o, ("size", "color")):
        return Question(f"what shape is the {o.size} {o.color} object?", o.shape, "attribute", o.size, "shape", refs=(o,))
    return None


def q_existence(rng, scene, want) -> Question | None:
    objs = scene.objects
    present = {(o.size, o.color, o.shape) for o in objs}
    if want["kind"] == "positive":
        cands = [o for o in objs if o.size == want["size"]]
        if not cands:
            return None
        o = cands[int(rng.integers(len(cands)))]
        return Question(f"is there a {o.size} {o.color} {o.shape} in the image?", "yes", "existence", o.size, "positive",
                        refs=(o,))
    if want["kind"] == "adversarial":  # one attribute of a present object changed
        o = objs[int(rng.integers(len(objs)))]
        for _ in range(20):
            which = ["size", "color", "shape"][int(rng.integers(3))]
            s, c, sh = o.size, o.color, o.shape
            if which == "size":
                s = "large" if s == "small" else "small"
            elif which == "color":
                c = list(COLORS)[int(rng.integers(len(COLORS)))]
            else:
                sh = SHAPES[int(rng.integers(len(SHAPES)))]
            if (s, c, sh) not in present:
                return Question(f"is there a {s} {c} {sh} in the image?", "no", "existence", "absent",
                                f"negative_{which}")
        return None
    for _ in range(50):  # random absent combination
        s = SIZES[int(rng.integers(2))]
        c = list(COLORS)[int(rng.integers(len(COLORS)))]
        sh = SHAPES[int(rng.integers(len(SHAPES)))]
        if (s, c, sh) not in present:
            return Question(f"is there a {s} {c} {sh} in the image?", "no", "existence", "absent", "negative_random")
    return None


def q_counting(rng, scene, want) -> Question | None:
    objs = scene.objects
    counts = {sh: [o for o in objs if o.shape == sh] for sh in SHAPES}
    shapes = [sh for sh, lst in counts.items() if len(lst) == want["count"]]
    if not shapes:
        return None
    sh = shapes[int(rng.integers(len(shapes)))]
    lst = counts[sh]
    sal = "absent" if not lst else ("small" if any(o.size == "small" for o in lst) else "large")
    return Question(f"how many {PLURAL[sh]} are there?", str(len(lst)), "counting", sal, f"count_{len(lst)}",
                    refs=tuple(lst), shape=sh)


def _relation(a: Obj, b: Obj) -> str | None:
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= 18 and abs(dx) >= 2 * abs(dy):
        return "left" if dx < 0 else "right"
    if abs(dy) >= 18 and abs(dy) >= 2 * abs(dx):
        return "above" if dy < 0 else "below"
    return None


def q_spatial(rng, scene, want) -> Question | None:
    objs = scene.objects
    pairs = [(a, b) for a in objs for b in objs if a is not b and _relation(a, b) == want["rel"]
             and (a.size == "small" or b.size == "small") == (want["size"] == "small")]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    return Question(f"where is the {a.color} {a.shape} relative to the {b.color} {b.shape}?", want["rel"], "spatial",
                    want["size"], want["rel"], refs=(a, b))


def _want(rng, qtype: str) -> dict:
    """The question's target class, drawn before the scene so that answers / salience stay balanced
    (scenes are redrawn until it can be asked)."""
    if qtype == "attribute":
        return {"size": SIZES[int(rng.integers(2))], "sub": ["color", "shape"][int(rng.integers(2))]}
    if qtype == "existence":
        return {"kind": "positive" if rng.random() < 0.5 else ["adversarial", "random"][int(rng.integers(2))],
                "size": SIZES[int(rng.integers(2))]}
    if qtype == "counting":
        return {"count": int(rng.integers(0, MAX_COUNT + 1))}
    if qtype == "spatial":
        return {"rel": RELATIONS[int(rng.integers(4))], "size": SIZES[int(rng.integers(2))]}
    raise ValueError(qtype)


MAKERS = {"attribute": q_attribute, "existence": q_existence, "counting": q_counting, "spatial": q_spatial}


def make_question(seed: int, split: str, index: int, qtype: str | None = None,
                  n_objects: tuple[int, int] | None = None) -> Question:
    """Question ``index`` of ``split``: its own scene (and, if ``qtype`` is None, a type cycling
    attribute / existence / counting / spatial with the index). Scenes are redrawn (same stream)
    until the type's constraints hold."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    qtype = qtype or QTYPES[index % len(QTYPES)]
    want = _want(rng, qtype)
    if qtype == "counting" and n_objects is not None:
        want["count"] = min(want["count"], n_objects[1])
    for attempt in range(1000):
        scene = sample_scene(rng, key=f"{split}/{seed}/{index}" + (f".{attempt}" if attempt else ""), n_objects=n_objects)
        q = MAKERS[qtype](rng, scene, want)
        if q is not None:
            q.scene, q.index = scene, index
            return q
    raise RuntimeError(f"could not make a {qtype} question for {split}/{seed}/{index}")


def make_split(split: str, n: int, seed: int = 0, start: int = 0) -> list[Question]:
    """``n`` questions of ``split`` (indices ``start`` .. ``start + n - 1``), types balanced."""
    return [make_question(seed, split, i) for i in range(start, start + n)]


def test_set(n: int = 400, seed: int = 0) -> list[Question]:
    """The fixed test set of the benchmark (100 per type at the default size)."""
    return make_split("test", n, seed)


# ---------------------------------------------------------------------------------------------
# training targets for the vision tower's auxiliary objectives
# ---------------------------------------------------------------------------------------------

COLOR_IDS = {c: i + 1 for i, c in enumerate(COLORS)}  # 0 = background
SHAPE_IDS = {s: i + 1 for i, s in enumerate(SHAPES)}
SIZE_IDS = {"small": 1, "large": 2}
GRID = IMAGE_SIZE // PATCH
PAIR_IDS = {(s, c): i for i, (s, c) in enumerate((s, c) for s in SHAPES for c in COLORS)}


@functools.lru_cache(maxsize=4096)
def coverage(o: Obj) -> np.ndarray:
    """The share of each patch (row-major, GRID x GRID) that object ``o`` covers (read-only array).
    Memoised per object: a training sample asks for it once for its patch labels and again for the
    grounding targets of each turn that names the object."""
    m = Image.new("L", (IMAGE_SIZE * 2, IMAGE_SIZE * 2), 0)
    _draw_shape(ImageDraw.Draw(m), o, 2, 255)
    a = np.asarray(m, dtype=np.float32).reshape(GRID, PATCH * 2, GRID, PATCH * 2).mean(axis=(1, 3)).reshape(-1) / 255
    a.setflags(write=False)
    return a


#: an object "covers" a patch from this share of its area on (patch labels, grounding targets)
MIN_COVER = 0.08


def patch_targets(scene: Scene, min_cover: float = MIN_COVER) -> dict[str, np.ndarray]:
    """Per-patch labels (row-major over the GRID x GRID patches) and the [CLS] "caption" target.

    color / shape / size: of the object covering the largest share of the patch (if at least
    ``min_cover`` of it), else 0 (background); center: 1 on the patch holding an object's centre;
    caption: multi-hot over the 32 (shape, colour) pairs of the scene's *large* (salient) objects;
    n_large: their number; count: on the patches labelled with a shape, how many objects of that shape
    the scene has (0 elsewhere)."""
    color = np.zeros(GRID * GRID, np.int64)
    shape = np.zeros(GRID * GRID, np.int64)
    size = np.zeros(GRID * GRID, np.int64)
    center = np.zeros(GRID * GRID, np.float32)
    best = np.zeros(GRID * GRID, np.float32)
    caption = np.zeros(len(PAIR_IDS), np.float32)
    for o in scene.objects:
        a = coverage(o)
        upd = (a >= min_cover) & (a > best)
        best[upd] = a[upd]
        color[upd], shape[upd], size[upd] = COLOR_IDS[o.color], SHAPE_IDS[o.shape], SIZE_IDS[o.size]
        center[min(int(o.cy // PATCH), GRID - 1) * GRID + min(int(o.cx // PATCH), GRID - 1)] = 1
        if o.size == "large":
            caption[PAIR_IDS[(o.shape, o.color)]] = 1
    per_shape = np.array([0] + [sum(o.shape == sh for o in scene.objects) for sh in SHAPES], np.int64)
    return {"color": color, "shape": shape, "size": size, "center": center, "caption": caption, "count": per_shape[shape],
            "n_large": np.int64(sum(o.size == "large" for o in scene.objects))}


CAPTION_PROMPT = "describe the image ."


def caption(scene: Scene) -> str:
    """A left-to-right listing of the objects ("a large blue square , a small red circle , ...")."""
    objs = sorted(scene.objects, key=lambda o: (o.cx, o.cy))
    return " , ".join(f"a {o.size} {o.color} {o.shape}" for o in objs)


def make_conversation(seed: int, split: str, index: int, turns: int = 8,
                      n_objects: tuple[int, int] | None = None) -> list[Question]:
    """A multi-turn conversation about one scene, as LLaVA-1.5's VQA training data packs several
    questions about one image: turn 1 is :func:`make_question` (so it follows the test distribution
    exactly), the others are further questions of all types about the same scene (no repeats)."""
    first = make_question(seed, split, index, n_objects=n_objects)
    rng = np.random.default_rng([seed, SPLITS[split], index, 1])
    out, seen = [first], {first.question}
    for t in range(1, turns * 4):
        if len(out) == turns:
            break
        qtype = QTYPES[(index + t) % len(QTYPES)]
        q = None
        for _ in range(10):
            q = MAKERS[qtype](rng, first.scene, _want(rng, qtype))
            if q is not None and q.question not in seen:
                break
            q = None
        if q is not None:
            q.scene, q.index = first.scene, index
            seen.add(q.question)
            out.append(q)
    return out
