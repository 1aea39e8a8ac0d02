"""Paper specs (``eval/papers/<key>.toml``, format in ``eval/papers/FORMAT.md``): what a paper's tables ran and
printed, loaded into plain dataclasses and checked against the harness (benchmarks, metrics) and the method
registry (names, options, budgets). A table of one's own is a spec file anywhere (a path ending in ``.toml``), its
published numbers optional. :func:`load` raises :class:`SpecError` naming the file and the entry."""

from __future__ import annotations

import math
import os
from decimal import Decimal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent

#: |ours - published| within which a cell counts as reproduced, by metric (FORMAT.md says why); others: 1.0 point
DEFAULT_TOLERANCE = {"MME-P": 30.0, "MME-C": 15.0, "MME-P+C": 40.0, "MM-Vet": 2.0}
for _v in ("MSVD", "MSRVTT", "TGIF", "ActivityNet"):
    DEFAULT_TOLERANCE[f"{_v}-QA-acc"] = 2.0
    DEFAULT_TOLERANCE[f"{_v}-QA-score"] = 0.1
TOLERANCE_POINTS = 1.0
#: run settings a table may set (the harness's ``eval run`` flags of the same names)
RUN_SETTINGS = ("next_layout", "next_geometry", "num_frames", "vision_dtype", "dtype", "pad_to_square", "max_pixels",
                "min_pixels")
#: the control methods ``--controls`` adds to a table whose spec names none (the spec's ``controls``): random
#: selection and VTC-Bench's downsampling, each at the budgets of the table's method rows
DEFAULT_CONTROLS = ("random", "downsample")


class SpecError(ValueError):
    """A spec that does not load: ``str()`` names the file and the entry."""


#: a column run through lmms-eval (its task, ``lmms_task`` in the spec) rather than the harness
LMMS_PREFIX = "lmms:"


def lmms_task_of(bench: str) -> str:
    """The lmms-eval task of a column / config run through lmms-eval (``bench = "lmms:<task>"``), else ""."""
    return bench[len(LMMS_PREFIX):] if bench.startswith(LMMS_PREFIX) else ""


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    bench: str
    metric: str
    tolerance: float
    not_run: str = ""
    #: ours x scale is compared with the paper (an lmms-eval fraction as the paper's percentage: 100)
    scale: float = 1.0

    @property
    def runnable(self) -> bool:
        return bool(self.bench) and not self.not_run

    @property
    def lmms_task(self) -> str:
        return lmms_task_of(self.bench)


@dataclass(frozen=True)
class Row:
    method: str
    label: str
    budget: int | None = None
    paper_budget: Any = None
    options: dict = field(default_factory=dict)
    published: dict = field(default_factory=dict)
    missing: dict = field(default_factory=dict)
    rel_avg: float | None = None
    source: str = ""
    unverified: str = ""
    not_run: str = ""
    #: the heading the paper prints the row under, when it is not the budget (the spec's ``group``)
    group_label: str = ""
    #: the unit of ``paper_budget`` (the table's ``budget_unit``): "tokens", "% TFLOP", ...
    unit: str = "tokens"
    #: column key -> the published number as the spec's TOML literal writes it, the paper's decimals kept ("60.00",
    #: "1862"; a TOML float forgets trailing zeros, so the report prints this text, never the float)
    printed: dict = field(default_factory=dict)
    #: the printed relative average as its literal ("100.00"), "" when the row has none
    rel_avg_printed: str = ""
    #: a numeric ``paper_budget`` as its literal ("11.30"), "" otherwise
    paper_budget_printed: str = ""
    #: a row the report adds for a control run (the table's ``controls``), not a row of the paper
    control: bool = False

    @property
    def vanilla(self) -> bool:
        return self.method == "none"

    @property
    def runnable(self) -> bool:
        return bool(self.method) and not self.not_run

    @property
    def group(self) -> str:
        """The row's group heading: the spec's ``group``, else the budget as the paper prints it, in the table's
        unit ("192 tokens", "15.63% TFLOP")."""
        if self.vanilla:
            return ""
        if self.group_label:
            return self.group_label
        b = self.paper_budget if self.paper_budget is not None else self.budget
        if isinstance(b, (int, float)) and not isinstance(b, bool):
            return f"{self.paper_budget_printed or f'{b:g}'}{'' if self.unit.startswith('%') else ' '}{self.unit}"
        return str(b) if b is not None else "no budget"

    @property
    def name(self) -> str:
        """The row as a reader finds it: its label, and its group heading when it has one."""
        return f"{self.label} ({self.group})" if self.group else self.label


@dataclass(frozen=True)
class Table:
    id: str
    caption: str
    model: str
    source: str
    budget_convention: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    settings: dict = field(default_factory=dict)
    notes: str = ""
    #: the unit the paper states its budgets in ("tokens"; DivPrune: "% TFLOP", the TFLOP ratio to the unpruned model)
    budget_unit: str = "tokens"
    #: why the published numbers are shown for reference only, never as pass/fail targets ("" = they are targets)
    reference_only: str = ""
    #: control methods run at every budget of the table's method rows (the spec's ``controls``: the grid adds their
    #: configs, the report their rows under each budget)
    controls: tuple[str, ...] = ()

    def column(self, key: str) -> Column:
        return next(c for c in self.columns if c.key == key)

    @property
    def method_budgets(self) -> tuple[int, ...]:
        """The budgets (our convention) of the table's runnable method rows, each once, in row order: where the
        controls run."""
        out: list[int] = []
        for r in self.rows:
            if r.runnable and not r.vanilla and not r.control and r.budget is not None and r.budget not in out:
                out.append(r.budget)
        return tuple(out)

    def controls_run(self, flag: bool = False) -> tuple[str, ...]:
        """The control methods of this table: the spec's ``controls``, else with ``flag`` (``--controls``) the
        :data:`DEFAULT_CONTROLS`, else none."""
        return self.controls or (DEFAULT_CONTROLS if flag else ())

    @property
    def own(self) -> bool:
        """A table of one's own: no row publishes a number (the report shows each cell's difference to the
        unpruned row of ours instead of to a published number)."""
        return not any(r.published or r.rel_avg is not None for r in self.rows)

    @property
    def slug(self) -> str:
        return "".join(ch if ch.isalnum() else "-" for ch in self.id.lower()).strip("-")


CLAIM_KINDS = ("beats", "pareto", "retains")


@dataclass(frozen=True)
class Claim:
    """A claim a paper states without a table (ConsensusDrop's abstract, a README's headline): ``method`` beats
    each of ``against`` at the same budget, on each of ``tables``' columns (``kind = "beats"``), lies on the
    accuracy vs TTFT / KV Pareto front (``kind = "pareto"``), or keeps at least ``at_least`` % of the unpruned
    model (the relative average over the table's columns, vanilla = ours) at ``budget`` (``kind = "retains"``)."""
    id: str
    text: str
    kind: str
    method: str
    against: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()
    source: str = ""
    budget: int | None = None
    at_least: float | None = None


@dataclass(frozen=True)
class Paper:
    key: str
    title: str
    arxiv: str
    venue: str
    code: str
    method: str
    tables: tuple[Table, ...]
    claims: tuple[Claim, ...] = ()
    path: str = ""

    def table(self, tid: str) -> Table:
        for t in self.tables:
            if tid in (t.id, t.slug):
                return t
        raise KeyError(f"{self.key}: no table {tid!r}; tables: {', '.join(t.id for t in self.tables)}")


def is_path(key: str) -> bool:
    """``key`` names a spec file (``./my_table.toml``, ``specs/t.toml``) rather than a spec under eval/papers/."""
    return key.endswith(".toml") or "/" in key or os.sep in key


def spec_path(key: str) -> Path:
    return Path(key).expanduser() if is_path(key) else HERE / f"{key}.toml"


class _Literal(float):
    """A TOML float that remembers its literal (``60.00``): tomllib's ``parse_float`` hook makes one, so a published
    number keeps the decimals the paper printed."""
    text: str

    def __new__(cls, text: str):
        obj = super().__new__(cls, text)
        obj.text = text
        return obj


def printed_text(v) -> str:
    """A published value as its spec writes it, the printed decimals kept: a TOML float's literal (``60.00``,
    ``1.10``; underscores and a plus sign dropped, an exponent written out), an integer as is (``1862``)."""
    text = getattr(v, "text", None)
    if text is None:
        return str(v) if isinstance(v, int) else repr(float(v))
    text = text.replace("_", "").lstrip("+")
    return format(Decimal(text), "f") if "e" in text.lower() else text


def _plain(v):
    """``v`` with every :class:`_Literal` a plain float (options, budgets and run settings reach run configs)."""
    if isinstance(v, _Literal):
        return float(v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


def decimals(text: str) -> int:
    """The decimals a printed number shows: ``"60.00"`` -> 2, ``"1862"`` -> 0."""
    return len(text.split(".", 1)[1]) if "." in text else 0


def list_papers() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.toml"))


def load(key: str, check: bool = True) -> Paper:
    """The spec ``key`` (a name under eval/papers/ or a path to a .toml), checked unless ``check=False``."""
    path = spec_path(key)
    if is_path(key) and not path.is_file():
        raise SpecError(f"no spec file {key!r} ({path.resolve()}): a table of your own is a .toml file "
                        "(eval/papers/FORMAT.md)")
    if not path.exists():
        raise SpecError(f"no paper spec {key!r} ({path}); known: {', '.join(list_papers())}")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f, parse_float=_Literal)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None
    return _parse(raw, path, check)


def load_all(check: bool = True) -> list[Paper]:
    return [load(k, check) for k in list_papers()]


# ----------------------------------------------------------------------------------------------- parsing
def _need(d: dict, key: str, where: str, typ=str):
    if key not in d:
        raise SpecError(f"{where}: missing `{key}`")
    v = d[key]
    if typ is not None and not isinstance(v, typ):
        raise SpecError(f"{where}: `{key}` must be {getattr(typ, '__name__', typ)}, got {v!r}")
    return v


def _unknown(d: dict, allowed: set, where: str):
    extra = sorted(set(d) - allowed)
    if extra:
        raise SpecError(f"{where}: unknown field(s) {extra}; allowed: {sorted(allowed)}")


def _number(v, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)):
        raise SpecError(f"{where}: a published value must be a number, got {v!r}")
    return v


def _parse(raw: dict, path: Path, check: bool) -> Paper:
    f = str(path)
    _unknown(raw, {"paper", "tables", "claims"}, f)
    p = _need(raw, "paper", f, dict)
    _unknown(p, {"key", "title", "arxiv", "venue", "code", "method"}, f"{f} [paper]")
    key = _need(p, "key", f"{f} [paper]")
    if key != path.stem:
        raise SpecError(f"{f} [paper]: key {key!r} must equal the file name {path.stem!r}")
    tables = []
    for i, t in enumerate(raw.get("tables", [])):
        tables.append(_table(t, f"{f} tables[{i}]"))
    ids = [t.id for t in tables]
    if len(set(ids)) != len(ids):
        raise SpecError(f"{f}: duplicate table ids {ids}")
    claims = tuple(_claim(c, f"{f} claims[{i}]", ids) for i, c in enumerate(raw.get("claims", [])))
    if not tables:
        raise SpecError(f"{f}: no [[tables]]")
    paper = Paper(key=key, title=_need(p, "title", f"{f} [paper]"), arxiv=str(p.get("arxiv", "")),
                  venue=str(p.get("venue", "")), code=str(p.get("code", "")), method=str(p.get("method", "")),
                  tables=tuple(tables), claims=claims, path=f)
    if check:
        check_paper(paper)
    return paper


def _table(t: dict, where: str) -> Table:
    _unknown(t, {"id", "caption", "model", "source", "budget_convention", "budget_unit", "reference_only", "columns",
                 "rows", "notes", "controls", *RUN_SETTINGS}, where)
    tid = _need(t, "id", where)
    where = f"{where} ({tid})"
    cols = []
    for j, c in enumerate(_need(t, "columns", where, list)):
        w = f"{where} columns[{j}]"
        _unknown(c, {"key", "label", "bench", "metric", "tolerance", "not_run", "lmms_task", "lmms_metric",
                     "lmms_scale"}, w)
        metric, bench, scale = str(c.get("metric", "")), str(c.get("bench", "")), 1.0
        if c.get("lmms_task"):  # run through lmms-eval (scripts/eval/lmms.sh): its task and results key
            if bench or metric:
                raise SpecError(f"{w}: a column with lmms_task takes lmms_metric, not bench / metric")
            bench, metric = LMMS_PREFIX + str(c["lmms_task"]), _need(c, "lmms_metric", w)
            scale = float(_number(c.get("lmms_scale", 100), w + " lmms_scale"))
        elif "lmms_metric" in c or "lmms_scale" in c:
            raise SpecError(f"{w}: lmms_metric / lmms_scale need lmms_task")
        tol = c.get("tolerance", DEFAULT_TOLERANCE.get(metric, TOLERANCE_POINTS))
        cols.append(Column(key=_need(c, "key", w), label=str(c.get("label", c["key"])), bench=bench,
                           metric=metric, tolerance=float(_number(tol, w + " tolerance")),
                           not_run=str(c.get("not_run", "")), scale=scale))
        if not cols[-1].bench and not cols[-1].not_run:
            raise SpecError(f"{w}: bench = \"\" needs a `not_run` reason")
    keys = [c.key for c in cols]
    if not cols or len(set(keys)) != len(keys):
        raise SpecError(f"{where}: columns must be non-empty with unique keys, got {keys}")
    rows = []
    for j, r in enumerate(_need(t, "rows", where, list)):
        w = f"{where} rows[{j}]"
        _unknown(r, {"method", "label", "budget", "paper_budget", "options", "published", "missing", "rel_avg",
                     "source", "unverified", "not_run", "group"}, w)
        method = str(r.get("method", ""))
        w += f" ({r.get('label', method)})"
        if not method and not r.get("not_run"):
            raise SpecError(f"{w}: method = \"\" needs a `not_run` reason")
        pub = dict(r.get("published", {}))
        miss = dict(r.get("missing", {}))
        for k, v in pub.items():
            if k not in keys:
                raise SpecError(f"{w}: published names column {k!r}, not in the table's columns {keys}")
            _number(v, f"{w} published.{k}")
        for k in miss:
            if k not in keys:
                raise SpecError(f"{w}: missing names column {k!r}, not in the table's columns {keys}")
            if k in pub:
                raise SpecError(f"{w}: column {k!r} is both published and missing")
        budget = r.get("budget")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
            raise SpecError(f"{w}: budget must be an integer (our method's convention), got {budget!r}")
        rel = r.get("rel_avg")
        printed = {k: printed_text(v) for k, v in pub.items()}
        pb = r.get("paper_budget")
        pb_text = printed_text(pb) if isinstance(pb, (int, float)) and not isinstance(pb, bool) else ""
        pub = {k: v if isinstance(v, int) else float(v) for k, v in pub.items()}
        rows.append(Row(method=method, label=str(r.get("label", method)), budget=budget,
                        paper_budget=_plain(r.get("paper_budget")), options=_plain(dict(r.get("options", {}))),
                        published=pub, printed=printed,
                        rel_avg_printed="" if rel is None else printed_text(rel), paper_budget_printed=pb_text,
                        missing=miss, rel_avg=None if rel is None else float(_number(rel, w + " rel_avg")),
                        source=str(r.get("source", "")), unverified=str(r.get("unverified", "")),
                        not_run=str(r.get("not_run", "")), group_label=str(r.get("group", "")),
                        unit=str(t.get("budget_unit", "tokens"))))
    if not rows:
        raise SpecError(f"{where}: no rows")
    published = any(r.published or r.rel_avg is not None for r in rows)
    if published or "source" in t:  # a table of one's own prints no number: nothing to cite
        _need(t, "source", where)
    return Table(id=tid, caption=str(t.get("caption", "")), model=_need(t, "model", where),
                 source=str(t.get("source", "")), budget_convention=str(t.get("budget_convention", "")),
                 columns=tuple(cols), rows=tuple(rows), settings={k: _plain(t[k]) for k in RUN_SETTINGS if k in t},
                 notes=str(t.get("notes", "")), budget_unit=str(t.get("budget_unit", "tokens")),
                 reference_only=str(t.get("reference_only", "")), controls=_controls(t, where))


def _controls(t: dict, where: str) -> tuple[str, ...]:
    """The table's ``controls``: a list of method names, each once (whether each is registered and builds at the
    table's budgets is :func:`check_paper`'s)."""
    c = t.get("controls", [])
    if not isinstance(c, list) or not all(isinstance(m, str) and m for m in c):
        raise SpecError(f"{where}: `controls` must be a list of method names, e.g. [\"random\", \"downsample\"], "
                        f"got {c!r}")
    if len(set(c)) != len(c):
        raise SpecError(f"{where}: `controls` names a method twice: {c}")
    return tuple(c)


def _claim(c: dict, where: str, table_ids: list[str]) -> Claim:
    _unknown(c, {"id", "text", "kind", "method", "against", "tables", "source", "budget", "at_least"}, where)
    kind = _need(c, "kind", where)
    if kind not in CLAIM_KINDS:
        raise SpecError(f"{where}: kind must be one of {CLAIM_KINDS}, got {kind!r}")
    tables = tuple(c.get("tables", table_ids))
    for t in tables:
        if t not in table_ids:
            raise SpecError(f"{where}: names table {t!r}, not among {table_ids}")
    budget, at_least = c.get("budget"), c.get("at_least")
    if kind == "retains":
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise SpecError(f"{where}: a 'retains' claim needs `budget` (our convention, an integer), got {budget!r}")
        at_least = float(_number(_need(c, "at_least", where, None), f"{where} at_least"))
    elif budget is not None or at_least is not None:
        raise SpecError(f"{where}: `budget` / `at_least` belong to a 'retains' claim")
    return Claim(id=_need(c, "id", where), text=_need(c, "text", where), kind=kind, method=_need(c, "method", where),
                 against=tuple(c.get("against", ())), tables=tables, source=str(c.get("source", "")),
                 budget=budget, at_least=at_least)


# ----------------------------------------------------------------------------------------------- checks
def check_controls(t: Table, where: str, methods=None) -> None:
    """Each of ``t.controls`` is a registered method that builds at every budget of the table's method rows (a
    budget its model's grid cannot reach is the grid's to list, eval.paper_grid.control_reason); the table has
    such a budget."""
    from llava.method import available_methods, get_method

    if not t.controls:
        return
    methods = set(available_methods()) if methods is None else methods
    w = f"{where} controls"
    for m in t.controls:
        if m not in methods:
            raise SpecError(f"{w}: unknown method {m!r}; known: {', '.join(sorted(methods))}")
    if not t.method_budgets:
        raise SpecError(f"{w}: the table has no runnable method row with a `budget`, and the controls run at those "
                        "budgets")
    for m in t.controls:
        for b in t.method_budgets:
            try:
                get_method(m, b)
            except (TypeError, ValueError, KeyError) as e:
                raise SpecError(f"{w}: {m}(budget={b}) does not build: {e}") from None


def check_paper(paper: Paper) -> None:
    """Every benchmark, metric, method, option and budget of ``paper`` against the harness and the registry."""
    from llava.method import available_methods, get_method

    from ..benchmarks import BENCHMARKS

    methods = set(available_methods())
    f = paper.path
    if paper.method and paper.method not in methods:
        raise SpecError(f"{f} [paper]: method {paper.method!r} is not a registered method")
    for t in paper.tables:
        w = f"{f} table {t.id!r}"
        for c in t.columns:
            if not c.bench or c.lmms_task:  # an lmms-eval task is checked by lmms-eval when it runs
                continue
            if c.bench not in BENCHMARKS:
                raise SpecError(f"{w} column {c.key!r}: unknown benchmark {c.bench!r}; known: {', '.join(BENCHMARKS)}")
            names = [m.name for m in BENCHMARKS[c.bench].metrics]
            if c.metric not in names:
                raise SpecError(f"{w} column {c.key!r}: benchmark {c.bench!r} has no metric {c.metric!r}; "
                                f"its metrics: {', '.join(names)}")
        for r in t.rows:
            if not r.runnable:
                continue
            wr = f"{w} row {r.label!r}"
            if r.method not in methods:
                raise SpecError(f"{wr}: unknown method {r.method!r}; known: {', '.join(sorted(methods))}")
            try:
                get_method(r.method, r.budget, **r.options)
            except (TypeError, ValueError, KeyError) as e:
                raise SpecError(f"{wr}: {r.method}(budget={r.budget}, options={r.options}) does not build: {e}") from None
        check_controls(t, w, methods)
    for c in paper.claims:
        for m in (c.method, *c.against):
            if m not in methods:
                raise SpecError(f"{f} claim {c.id!r}: unknown method {m!r}")
        if c.kind == "retains":
            rows = [r for t in paper.tables if t.id in c.tables for r in t.rows
                    if r.runnable and r.method == c.method and r.budget == c.budget]
            if not rows:
                raise SpecError(f"{f} claim {c.id!r}: no row of {c.method} at budget {c.budget} in {list(c.tables)}")


__all__ = ["Paper", "Table", "Column", "Row", "Claim", "CLAIM_KINDS", "SpecError", "load", "load_all", "list_papers",
           "spec_path", "is_path", "check_paper", "check_controls", "DEFAULT_TOLERANCE", "TOLERANCE_POINTS",
           "DEFAULT_CONTROLS"]
