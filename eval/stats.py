"""How sure is a number: per-unit scores, standard errors, paired comparisons and the difficult subset.

A benchmark's score is a function of its **units**: the things it scores one at a time and that a resample
draws (a question for GQA, a COCO question for POPE, an image with its two questions for MME, a circular group
for MMBench). :class:`Units` holds one row per unit (an id, string tags such as the question type or the split,
numeric values such as ``correct``); a :class:`Stat` says how a metric is computed from them (a mean, a ratio
of sums, an F1, each over a subset of units, per group and then averaged or summed over the groups). Every
benchmark declares one :class:`Stat` per metric (``Benchmark.stats``) and writes its units to the run folder
(``units.jsonl``), so every figure here is recomputed from a finished run without the model.

What each statistic assumes (docs/evaluation.md, "How sure is a difference"):

* **Accuracy-type metrics** (a mean of one 0/1 score per unit): the standard error is
  ``sqrt(p (1 - p) / (n - 1))``, lmms-eval's (the sample standard deviation over sqrt(n)); the units are taken
  as independent draws from the benchmark's population of questions.
* **Every other metric** (F1, MME's sums, soft VQA accuracy, judged scores): a bootstrap over the units,
  ``resamples`` draws with replacement (default 1000, seed 0, both stated with the number), stratified where
  the metric is computed per group (POPE's splits, MME's subtasks) so each group keeps its size; the standard
  error is the resamples' standard deviation.
* **Paired comparisons** (two runs over the same units): the difference with a 95 % percentile interval from
  one bootstrap that draws the same units for both runs, and for accuracy-type metrics McNemar's exact test
  on the discordant units (two-sided binomial test of b against b + c at 1/2).
* **The difficult subset** (VTC-Bench, arXiv 2510.07143): a control run (image downsampling at the same
  compression) splits the units into group A, those it does not fully get right, and group B, the rest; each
  run's metric is then computed on each group alone.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable

import numpy as np

UNITS_FILE = "units.jsonl"
SCHEMA = "vtprune.eval.units/1"
RESAMPLES = 1000
SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class Stat:
    """How one metric is computed from the units.

    ``kind``: ``mean`` (sum of ``key`` / number of units), ``ratio`` (sum of ``key`` / sum of ``denom``) or ``f1``
    (from the units' ``tp`` / ``fp`` / ``fn``: 2 tp / (2 tp + fp + fn), 0 where nothing is positive); over the
    units whose tags match ``where``; with ``by``, computed per group of that tag (the groups in ``groups``
    order, or every group present, sorted) and combined by ``combine`` (``mean`` or ``sum``) over the groups
    present. ``scale``: the unit of the metric (100: a percentage). ``binomial``: an accuracy: a mean of 0/1
    values (``kind="mean"``), or a ratio of right rows over rows whose standard error the project has always
    given by the binomial formula with n = the rows (MMBench's single-row rate)."""

    kind: str = "mean"
    key: str = "correct"
    denom: str | None = None
    where: tuple[tuple[str, str], ...] = ()
    by: str | None = None
    combine: str = "mean"
    groups: tuple[str, ...] = ()
    scale: float = 100.0
    binomial: bool = False

    @property
    def paired_exact(self) -> bool:
        """McNemar's exact test applies: one 0/1 score per unit."""
        return self.binomial and self.kind == "mean"

    def describe(self) -> str:
        what = {"mean": f"mean of {self.key}", "ratio": f"sum of {self.key} / sum of {self.denom}", "f1": "F1"}[self.kind]
        if self.where:
            what += " where " + ", ".join(f"{k}={v}" for k, v in self.where)
        if self.by:
            what += f", per {self.by}, {self.combine} over the groups"
        return what


def _unique(ids: list[str]) -> list[str]:
    """``ids`` with ``#k`` appended to the k-th repeat of an id (k >= 1), as question uids are made unique."""
    seen: dict[str, int] = {}
    out = []
    for s in ids:
        k = seen.get(s, 0)
        seen[s] = k + 1
        out.append(s if k == 0 else f"{s}#{k}")
    if len(set(out)) != len(out):  # "a#1" present literally as well: positions make them unique
        return [f"{i}:{s}" for i, s in enumerate(ids)]
    return out


@dataclass
class Units:
    """One row per unit: ``ids`` (str), ``tags`` (name -> array of str), ``values`` (name -> float64 array)."""

    unit: str
    ids: list[str]
    tags: dict[str, np.ndarray] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)
    difficulty: tuple[str, float] = ("correct", 1.0)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_rows(cls, unit: str, rows: Iterable[dict], difficulty: tuple[str, float] = ("correct", 1.0)) -> "Units":
        """Rows ``{"id", "tags": {...}, "v": {...}}``; a tag or value a row lacks is "" / 0. An id that repeats (a
        question file that repeats a question id) gets ``#k`` on its k-th repeat, in row order (the merge keeps
        question-file order, so two runs over the same questions name their units alike)."""
        rows = list(rows)
        ids = _unique([str(r["id"]) for r in rows])
        tag_names = sorted({k for r in rows for k in r.get("tags", {})})
        value_names = sorted({k for r in rows for k in r.get("v", {})})
        tags = {k: np.array([str(r.get("tags", {}).get(k, "")) for r in rows], dtype=object) for k in tag_names}
        values = {k: np.array([float(r.get("v", {}).get(k, 0.0)) for r in rows], dtype=np.float64) for k in value_names}
        return cls(unit, ids, tags, values, (str(difficulty[0]), float(difficulty[1])))

    def rows(self) -> list[dict]:
        out = []
        for i, uid in enumerate(self.ids):
            v = {}
            for k, a in self.values.items():
                x = float(a[i])
                v[k] = int(x) if x.is_integer() else x
            out.append({"id": uid, "tags": {k: str(a[i]) for k, a in self.tags.items()}, "v": v})
        return out

    def subset(self, keep: np.ndarray) -> "Units":
        keep = np.asarray(keep, dtype=bool)
        return Units(self.unit, [u for u, k in zip(self.ids, keep) if k], {k: a[keep] for k, a in self.tags.items()},
                     {k: a[keep] for k, a in self.values.items()}, self.difficulty)

    def align(self, ids: list[str]) -> "Units":
        """The same units in the order of ``ids`` (which must be exactly this set)."""
        pos = {u: i for i, u in enumerate(self.ids)}
        order = np.array([pos[u] for u in ids], dtype=np.int64)
        return Units(self.unit, list(ids), {k: a[order] for k, a in self.tags.items()},
                     {k: a[order] for k, a in self.values.items()}, self.difficulty)

    def fingerprint(self) -> str:
        """sha256 (16 hex) of the sorted unit ids: two runs over the same units have the same one."""
        return hashlib.sha256("\n".join(sorted(self.ids)).encode()).hexdigest()[:16]

    def solved(self) -> np.ndarray:
        """Per unit: does it hold full marks on the difficulty value (``difficulty``: key, full value)?"""
        key, full = self.difficulty
        return self.value(key) >= full - 1e-9

    def value(self, key: str) -> np.ndarray:
        if key not in self.values:
            return np.zeros(len(self.ids), dtype=np.float64)
        return self.values[key]

    def tag(self, key: str) -> np.ndarray:
        if key not in self.tags:
            return np.array([""] * len(self.ids), dtype=object)
        return self.tags[key]


# -- computing a metric ------------------------------------------------------------------------------------------


def _mask(units: Units, stat: Stat) -> np.ndarray:
    m = np.ones(len(units), dtype=np.float64)
    for k, v in stat.where:
        m = m * (units.tag(k) == str(v))
    return m


def _sum(a: np.ndarray, idx: np.ndarray | None):
    return a.sum() if idx is None else a[idx].sum(axis=-1)


def _inner(units: Units, stat: Stat, mask: np.ndarray, idx: np.ndarray | None):
    """The metric over the units of ``mask`` (before ``scale``); NaN where it has no units."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if stat.kind == "f1":
            tp, fp, fn = (_sum(units.value(k) * mask, idx) for k in ("tp", "fp", "fn"))
            den = 2 * tp + fp + fn
            n = _sum(mask, idx)
            return np.where(n > 0, np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 0.0), np.nan)
        num = _sum(units.value(stat.key) * mask, idx)
        den = _sum((units.value(stat.denom) if stat.kind == "ratio" else np.ones(len(units))) * mask, idx)
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _groups(units: Units, stat: Stat, mask: np.ndarray) -> list[str]:
    present = set(units.tag(stat.by)[mask > 0].tolist())
    order = list(stat.groups) if stat.groups else sorted(present)
    return [g for g in order if g in present]


def compute(units: Units, stat: Stat, idx: np.ndarray | None = None):
    """The metric (``scale`` applied): a float, or one per row of ``idx`` (resampled unit positions, (B, n))."""
    mask = _mask(units, stat)
    if stat.by is None:
        out = _inner(units, stat, mask, idx)
    else:
        parts = [_inner(units, stat, mask * (units.tag(stat.by) == g), idx) for g in _groups(units, stat, mask)]
        if not parts:
            out = np.array(np.nan) if idx is None else np.full(idx.shape[0], np.nan)
        else:
            stack = np.stack([np.asarray(p, dtype=np.float64) for p in parts])
            out = stack.sum(axis=0) if stat.combine == "sum" else stack.mean(axis=0)
    out = np.asarray(out, dtype=np.float64) * stat.scale
    return float(out) if idx is None else out


def count(units: Units, stat: Stat) -> int:
    """The units the metric is over (for a binomial ratio: the sum of its denominator, MMBench's rows)."""
    mask = _mask(units, stat)
    if stat.kind == "ratio" and stat.binomial:
        return int(round(float((units.value(stat.denom) * mask).sum())))
    return int(mask.sum())


# -- resampling --------------------------------------------------------------------------------------------------


#: unit positions drawn per chunk of resamples (memory: 8 bytes each, a few arrays of it at once)
CHUNK_POSITIONS = 2_000_000


def resample_chunks(units: Units, strata: str | None, resamples: int = RESAMPLES, seed: int = SEED):
    """Yield (k, n) unit positions drawn with replacement, k resamples at a time (``resamples`` in all), within each
    stratum of tag ``strata`` (its groups keep their sizes); reproducible from ``seed`` (the chunking is a function
    of n alone, so the same units and seed draw the same resamples)."""
    n = len(units)
    rng = np.random.default_rng(seed)
    step = max(1, min(resamples, CHUNK_POSITIONS // max(n, 1)))
    strata_pos = None
    if strata is not None:
        tag = units.tag(strata)
        strata_pos = [np.flatnonzero(tag == g) for g in sorted(set(tag.tolist()))]
    done = 0
    while done < resamples:
        k = min(step, resamples - done)
        if strata_pos is None:
            yield rng.integers(0, n, size=(k, n), dtype=np.int64)
        elif not strata_pos:
            yield np.zeros((k, 0), dtype=np.int64)
        else:
            yield np.concatenate([pos[rng.integers(0, len(pos), size=(k, len(pos)), dtype=np.int64)]
                                  for pos in strata_pos], axis=1)
        done += k


def resample(units: Units, strata: str | None, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """All of :func:`resample_chunks`' draws as one (resamples, n) array."""
    return np.concatenate(list(resample_chunks(units, strata, resamples, seed)), axis=0)


def draws(units: Units, stat: Stat, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``stat`` on each resample (NaN where a resample leaves it undefined)."""
    return np.concatenate([compute(units, stat, idx) for idx in resample_chunks(units, stat.by, resamples, seed)])


def binomial_se(p_scaled: float, n: int, scale: float = 100.0) -> float | None:
    """lmms-eval's standard error of a mean of 0/1 scores: sqrt(p (1 - p) / (n - 1)) (x ``scale``); None below n = 2."""
    if n < 2 or p_scaled is None or math.isnan(p_scaled):
        return None
    p = min(max(p_scaled / scale, 0.0), 1.0)
    return scale * math.sqrt(p * (1.0 - p) / (n - 1))


@dataclass
class Estimate:
    value: float
    se: float | None
    n: int
    method: str  # "binomial" | "bootstrap"

    def as_dict(self) -> dict:
        return {"value": self.value, "se": self.se, "n": self.n, "method": self.method}


def estimate(units: Units, stat: Stat, resamples: int = RESAMPLES, seed: int = SEED) -> Estimate:
    """The metric and its standard error (the binomial formula for an accuracy, else the bootstrap)."""
    value, n = compute(units, stat), count(units, stat)
    if stat.binomial:
        return Estimate(value, binomial_se(value, n, stat.scale), n, "binomial")
    if n < 2 or math.isnan(value):
        return Estimate(value, None, n, "bootstrap")
    d = draws(units, stat, resamples, seed)
    d = d[~np.isnan(d)]
    se = float(np.std(d, ddof=1)) if len(d) > 1 else None
    return Estimate(value, se, n, "bootstrap")


def method_text(units: Units, stat: Stat, resamples: int = RESAMPLES, seed: int = SEED) -> str:
    """How a standard error was computed, in words (results.json ``stderr_method``)."""
    if stat.binomial:
        return f"binomial: sqrt(p (1 - p) / (n - 1)) over {count(units, stat)} {'rows' if stat.kind == 'ratio' else units.unit + 's'}"
    strata = f", stratified by {stat.by}" if stat.by else ""
    return f"bootstrap over {len(units)} {units.unit}s{strata}, {resamples} resamples, seed {seed}"


# -- paired comparison -------------------------------------------------------------------------------------------


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p: 2 P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), capped at 1 (1 where b + c = 0)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2 ** n)
    return float(min(Fraction(1), 2 * tail))


@dataclass
class Paired:
    """B minus A over the same units."""

    a: float
    b: float
    diff: float
    low: float | None
    high: float | None
    n: int
    resamples: int
    seed: int
    discordant: tuple[int, int] | None = None  # (A right B wrong, A wrong B right)
    p: float | None = None

    def as_dict(self) -> dict:
        out = {"a": self.a, "b": self.b, "diff": self.diff, "ci95": [self.low, self.high], "n": self.n,
               "bootstrap": {"resamples": self.resamples, "seed": self.seed, "level": LEVEL}}
        if self.discordant is not None:
            out["mcnemar"] = {"a_only": self.discordant[0], "b_only": self.discordant[1], "p": self.p}
        return out


def paired(a: Units, b: Units, stat: Stat, resamples: int = RESAMPLES, seed: int = SEED) -> Paired:
    """The difference b - a of ``stat`` with a paired percentile bootstrap interval (the same units drawn for both
    runs) and, for an accuracy, McNemar's exact test. ``a`` and ``b`` must hold the same units."""
    if set(a.ids) != set(b.ids):
        raise ValueError("paired: the runs hold different units")
    b = b.align(a.ids)
    va, vb = compute(a, stat), compute(b, stat)
    d = np.concatenate([compute(b, stat, idx) - compute(a, stat, idx)
                        for idx in resample_chunks(a, stat.by, resamples, seed)])
    d = d[~np.isnan(d)]
    alpha = (1.0 - LEVEL) / 2
    low, high = (float(np.quantile(d, alpha)), float(np.quantile(d, 1 - alpha))) if len(d) else (None, None)
    out = Paired(va, vb, vb - va, low, high, count(a, stat), resamples, seed)
    if stat.paired_exact:
        mask = _mask(a, stat) > 0
        ra, rb = a.value(stat.key)[mask] >= 0.5, b.value(stat.key)[mask] >= 0.5
        out.discordant = (int((ra & ~rb).sum()), int((~ra & rb).sum()))
        out.p = mcnemar_exact(*out.discordant)
    return out


# -- the difficult subset ----------------------------------------------------------------------------------------


def difficult_groups(control: Units) -> tuple[set[str], set[str]]:
    """(group A, group B): the units the control run does not fully get right, and the rest (VTC-Bench)."""
    solved = control.solved()
    return ({u for u, s in zip(control.ids, solved) if not s}, {u for u, s in zip(control.ids, solved) if s})


def on_groups(units: Units, control: Units, stat: Stat, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """``stat`` of ``units`` on group A and on group B of ``control``: {"A": Estimate, "B": Estimate}."""
    if set(units.ids) != set(control.ids):
        raise ValueError("groups: the run and the control hold different units")
    a, _ = difficult_groups(control)
    in_a = np.array([u in a for u in units.ids])
    return {"A": estimate(units.subset(in_a), stat, resamples, seed),
            "B": estimate(units.subset(~in_a), stat, resamples, seed)}


# -- the run folder ----------------------------------------------------------------------------------------------


def write_units(run_dir: Path, units: Units, benchmark: str) -> Path:
    """``units.jsonl``: a header line (schema, benchmark, unit, difficulty), then one line per unit."""
    path = Path(run_dir) / UNITS_FILE
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"schema": SCHEMA, "benchmark": benchmark, "unit": units.unit,
                            "difficulty": list(units.difficulty), "count": len(units)}) + "\n")
        for r in units.rows():
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_units(run_dir: Path) -> Units:
    path = Path(run_dir)
    if path.name == "results.json":
        path = path.parent
    path = path / UNITS_FILE if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no per-unit scores (runs scored before they were kept: "
                                f"`python -m eval score {path.parent}` writes them from the answers)")
    with open(path, encoding="utf-8") as f:
        head = json.loads(f.readline())
        if head.get("schema") != SCHEMA:
            raise ValueError(f"{path}: not a units file (schema {head.get('schema')!r})")
        rows = [json.loads(ln) for ln in f if ln.strip()]
    return Units.from_rows(head["unit"], rows, tuple(head.get("difficulty") or ("correct", 1.0)))


def se_number(recorded) -> float | None:
    """A standard error as results.json records it (``stderr``), as a number: None for ``"server"``, a missing one
    or NaN."""
    if isinstance(recorded, (int, float)) and not isinstance(recorded, bool) and not math.isnan(recorded):
        return float(recorded)
    return None


def summarize(units: Units, stats: dict[str, Stat], metrics: dict[str, Any], server: Iterable[str] = (),
              resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """results.json's ``stderr`` (metric -> number, or "server" for a server-scored metric) and
    ``stderr_method`` (metric -> how), for the metrics present."""
    se: dict[str, Any] = {}
    how: dict[str, str] = {}
    for name in metrics:
        if name in server:
            se[name] = "server"
            how[name] = "scored by the benchmark's server: no per-question truth here"
            continue
        stat = stats.get(name)
        if stat is None or units is None or not len(units):
            continue
        e = estimate(units, stat, resamples, seed)
        se[name] = e.se
        how[name] = method_text(units, stat, resamples, seed)
    return {"stderr": se, "stderr_method": how}
