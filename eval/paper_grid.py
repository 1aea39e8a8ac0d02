"""A paper's table as a grid of harness runs: one :class:`Config` per (benchmark, method, budget, options, model,
run settings), the unpruned rows first, shared between the paper's tables where they are the same run.
``python -m eval paper-grid <paper> --dry-run`` prints it with what is done under the run folder and what is
missing (data, benchmark); ``--commands`` prints the runs still to do, one ``scripts/eval/_launch.sh`` call per
line, for ``scripts/papers/<paper>.sh``. A column run through lmms-eval (``bench = "lmms:<task>"``) is a config
like the others, run by ``scripts/eval/lmms.sh`` in the lmms-eval environment, its scores imported into
``OUT/lmms/<task>/<run-name>/lmms_results.json`` (:mod:`eval.lmms_import`). A table's control methods (the spec's
``controls``, or ``random`` and ``downsample`` with ``--controls``) add one config per runnable column at every
budget of its method rows; a control its model cannot run at a budget (a ``downsample`` budget no window stride
reaches on the model's patch grid) is listed as not run, with the reason (:func:`control_reason`)."""

from __future__ import annotations

import json

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .io import read_json
from .lmms_import import RESULTS as LMMS_RESULTS
from .lmms_import import run_dir as lmms_run_dir
from .papers import LMMS_PREFIX, Paper, Row, Table, lmms_task_of
from .run_config import RunConfig, default_run_name


@dataclass(frozen=True)
class Config:
    bench: str
    method: str
    budget: int | None
    model: str
    options: tuple = ()  # sorted (key, value) pairs
    settings: tuple = ()  # sorted (key, value) pairs: next_layout, num_frames, vision_dtype, ...
    tables: tuple = field(default=(), compare=False, hash=False)  # the table ids that use it

    def run_config(self, out: str = "runs", data_root: str = "playground/data/eval") -> RunConfig:
        return RunConfig(benchmark=self.bench, model=self.model, method=self.method, budget=self.budget,
                         options=self.option_dict(), out=str(out), data_root=str(data_root), **dict(self.settings))

    def option_dict(self) -> dict:
        """The options as the method takes them (a dict option thawed)."""
        return {k: _thawed(v) for k, v in self.options}

    @property
    def lmms_task(self) -> str:
        return lmms_task_of(self.bench)

    def run_dir(self, out) -> Path:
        if self.lmms_task:  # the folder scripts/eval/lmms.sh runs it in (no run settings: build_grid)
            return lmms_run_dir(self.lmms_task, self.model, self.method, self.budget, self.option_dict(), out)
        return Path(out) / self.bench / default_run_name(self.run_config(out))

    def launch_args(self) -> list[str]:
        """``scripts/eval/_launch.sh``'s arguments: method, budget, model, then the run flags."""
        args = [self.method, "none" if self.budget is None else str(self.budget), self.model]
        for k, v in self.options:
            args += ["--opt", f"{k}={_opt_value(v)}"]
        for k, v in self.settings:
            if k == "pad_to_square":
                args += [] if v else ["--no-pad"]
            else:
                args += [f"--{k.replace('_', '-')}", str(v)]
        return args

    def label(self) -> str:
        opts = "".join(f" {k}={_opt_value(v)}" for k, v in self.options)
        return f"{self.bench} {self.method}{'' if self.budget is None else f' b{self.budget}'}{opts}"


class FrozenOptions(tuple):
    """A dict option (an add-on's ``base_options``) as sorted (key, value) pairs: hashable, in a :class:`Config`."""


def _thawed(v):
    return {k: _thawed(x) for k, x in v} if isinstance(v, FrozenOptions) else v


def _opt_value(v) -> str:
    if isinstance(v, FrozenOptions):  # JSON, as --opt parses it
        return json.dumps(_thawed(v), separators=(",", ":"), sort_keys=True)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def _frozen(d: dict) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else FrozenOptions(_frozen(v)) if isinstance(v, dict)
                         else v) for k, v in d.items()))


def row_matches(row: Row, budgets: list[int] | None) -> bool:
    """``BUDGETS=64``: a row whose budget as printed or in our convention is listed (the unpruned row always)."""
    return row.vanilla or not budgets or row.budget in budgets or row.paper_budget in budgets


def build_grid(paper: Paper, table: str | None = None, only: list[str] | None = None,
               budgets: list[int] | None = None, model: str | None = None, controls: bool = False) -> list[Config]:
    """The configs of ``paper`` (or one ``table``), unpruned first, each once. ``only``: benchmark names or
    column keys to keep; ``budgets``: see :func:`row_matches`; ``model``: replaces every table's model;
    ``controls`` (``--controls``): random and downsample for a table whose spec names no ``controls`` (a spec's
    ``controls`` are always added: :func:`control_runs`)."""
    tables = [paper.table(table)] if table else list(paper.tables)
    seen: dict[Config, list[str]] = {}
    for t in tables:
        runs = [(r.method, r.budget, r.options) for r in t.rows if r.runnable and row_matches(r, budgets)]
        runs += [(m, b, {}) for m, b, why in control_runs(t, controls, budgets, model) if not why]
        for c in t.columns:
            if not c.runnable or (only and c.bench not in only and c.key not in only):
                continue
            if c.lmms_task and t.settings:
                continue  # the lmms-eval plugin takes no run settings: listed by not_runnable
            for method, budget, options in runs:
                cfg = Config(c.bench, method, budget, model or t.model, _frozen(options), _frozen(t.settings))
                seen.setdefault(cfg, [])
                if t.id not in seen[cfg]:
                    seen[cfg].append(t.id)
    out = [Config(c.bench, c.method, c.budget, c.model, c.options, c.settings, tuple(ids)) for c, ids in seen.items()]
    return sorted(out, key=lambda c: (c.method != "none", c.model, c.bench))  # stable: the spec's order otherwise


# ----------------------------------------------------------------------------------------------- controls
def control_runs(t: Table, flag: bool = False, budgets: list[int] | None = None,
                 model: str | None = None) -> list[tuple[str, int, str]]:
    """(method, budget, why not) of every control of ``t`` (:meth:`Table.controls_run`) at every budget of its
    method rows that ``budgets`` keeps (:func:`row_matches`); ``why`` is "" where the control runs on the table's
    model (or ``model``), else the reason (:func:`control_reason`)."""
    kept = [b for b in t.method_budgets
            if any(r.budget == b and not r.vanilla and row_matches(r, budgets) for r in t.rows)]
    return [(m, b, control_reason(m, b, model or t.model)) for m in t.controls_run(flag) for b in kept]


def control_reason(method: str, budget: int, model: str) -> str:
    """Why control ``method`` cannot run at ``budget`` on ``model`` ("" when it can): it does not build at that
    budget, or (``downsample``) no non-overlapping window stride reaches the budget on the model's patch grid
    (:func:`patch_grid`; a grid this machine cannot read is left to the run, which refuses such a budget)."""
    from llava.method import BudgetError, get_method

    try:
        m = get_method(method, budget)
    except (TypeError, ValueError, KeyError) as e:
        return f"{method}(budget={budget}) does not build: {e}"
    if method != "downsample":
        return ""
    grid = patch_grid(model)
    if grid is None or grid == (0, 0):  # unknown here (the run will say); dynamic grids take any budget
        return ""
    try:
        m.strides([grid[0] * grid[1]], [grid])  # the method's own stride rule on one whole unit of the grid
    except BudgetError as e:
        return f"on {model}: {str(e).removeprefix('downsample: ')}"
    return ""


def patch_grid(model: str) -> tuple[int, int] | None:
    """(rows, cols) of one image's / crop's / frame's patch grid on ``model``, as the engine's family adapter
    reads it from the model's config ((0, 0): dynamic grids, Qwen-VL), without loading weights: a ``tiny:`` or
    ``shape:`` model, a hub id whose shape config ships in llava/configs, a local folder or a hub id in the local
    Hugging Face cache; None when none of these has its config."""
    try:
        fam, cfg = _family_config(model)
    except Exception:  # noqa: BLE001 - an unreadable config: the grid is unknown here, the run will say
        return None
    if cfg is None:
        return None
    adapter = fam.adapter.__new__(fam.adapter)  # grid() reads the config only: no model needed
    adapter.config = cfg
    return tuple(adapter.grid())


def _family_config(model: str):
    """(family record, transformers config) of ``model``; (None, None) when its config is not on this machine."""
    import json

    from llava.families import registry
    from llava.models import SHAPES, family_of

    if model.startswith("tiny:"):
        from llava.tiny_tokenizer import build_tiny_tokenizer

        fam = registry.get(model.split(":", 1)[1])
        return fam, fam.tiny_config(build_tiny_tokenizer(**dict.fromkeys(fam.tiny_tokenizer, True)))
    import transformers as tf

    key = model.split(":", 1)[1] if model.startswith("shape:") else next(
        (k for k, p in sorted(SHAPES.items()) if json.loads(p.read_text()).get("hub_id") == model), None)
    if key is not None:
        raw = json.loads(SHAPES[key].read_text())
        cfg = tf.AutoConfig.for_model(**{k: v for k, v in raw.items() if not k.startswith("_") and k != "hub_id"})
    else:
        try:
            cfg = tf.AutoConfig.from_pretrained(str(Path(model).expanduser()) if model.startswith("~") else model,
                                                local_files_only=True)
        except OSError:
            return None, None
    return registry.get(family_of(cfg)), cfg


def shard(configs: list, spec: str | None) -> list:
    """``SHARD=i/n`` (i = 0 .. n-1): every n-th config from the i-th (the unpruned ones spread like the rest)."""
    if not spec:
        return configs
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"SHARD={spec!r}: expected i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"SHARD={spec!r}: need 0 <= i < n")
    return configs[i::n]


def is_complete(run_dir) -> bool:
    """A run folder whose results.json is complete (not a ``--limit`` smoke run), or whose lmms-eval scores are
    imported (``lmms_results.json``)."""
    if (Path(run_dir) / LMMS_RESULTS).exists():
        return True
    res = Path(run_dir) / "results.json"
    return res.exists() and not read_json(res).get("partial")


def data_status(bench: str, data_root) -> tuple[int | None, str]:
    """A benchmark's question count under ``data_root``, or None and what is missing (never raises)."""
    from .benchmarks import get_benchmark
    from .datacheck import check_benchmark

    if bench.startswith(LMMS_PREFIX):
        return None, "lmms-eval task: lmms-eval fetches its data (scripts/eval/lmms.sh, .venv-lmms)"
    try:
        b = get_benchmark(bench, data_root)
        rep = check_benchmark(b, deep=False)
        if rep.ok_inference:
            return len(b.load()), ""
        return None, "data: " + "; ".join((rep.missing_inference + rep.missing_inputs)[:2])
    except Exception as e:  # noqa: BLE001 - a dry run reports, never raises
        return None, f"data: {e}"


def status(cfg: Config, out, data_root, data: dict | None = None) -> dict:
    """Where ``cfg`` stands under ``out``: ``done`` (a complete results.json), ``partial`` (answers, not all),
    ``todo``; the question count when the data is there, else what is missing. ``data``: a dict that keeps each
    benchmark's :func:`data_status` across the configs of one grid (its questions are read once)."""
    from .shards import answered_uids

    d = cfg.run_dir(out)
    st = {"config": cfg, "run_dir": str(d), "state": "todo", "questions": None, "answered": 0, "missing": ""}
    if is_complete(d):
        st["state"] = "done"
    elif d.exists():
        st["answered"] = len(answered_uids(d))
        if st["answered"]:
            st["state"] = "partial"
    data = {} if data is None else data
    if cfg.bench not in data:
        data[cfg.bench] = data_status(cfg.bench, data_root)
    st["questions"], st["missing"] = data[cfg.bench]
    return st


def done_line(n_done: int, n: int) -> str:
    """The grid's state in one line, ``done N of M``: the dry run's line after the configs, and all that
    ``paper-grid --status`` prints (scripts/slurm/report.sbatch logs it)."""
    return f"done {n_done} of {n}"


def status_text(configs: list[Config], out) -> str:
    """``paper-grid --status``: :func:`done_line` for ``configs`` under ``out`` (reads no benchmark data)."""
    return done_line(sum(is_complete(c.run_dir(out)) for c in configs), len(configs))


def dry_run_text(paper: Paper, configs: list[Config], out, data_root, skipped: list[str]) -> str:
    lines = [f"{paper.key}: {len(configs)} configs (out {out}, data {data_root})"]
    n_done, data = 0, {}
    for c in configs:
        st = status(c, out, data_root, data)
        n_done += st["state"] == "done"
        q = "?" if st["questions"] is None else str(st["questions"])
        state = st["state"] + (f" {st['answered']}/{q}" if st["state"] == "partial" else "")
        lines.append(f"  {state:14} {c.label():58} {c.model:32} q={q:6} {', '.join(c.tables)}"
                     + (f"  [{st['missing']}]" if st["missing"] else ""))
    lines.append(done_line(n_done, len(configs)))
    lines += [f"not run: {s}" for s in skipped]
    return "\n".join(lines)


def not_runnable(paper: Paper, table: str | None = None, controls: bool = False, budgets: list[int] | None = None,
                 model: str | None = None) -> list[str]:
    """Every column and row of the selected tables that the harness cannot run, with the spec's reason, and every
    control (:func:`control_runs`, the same arguments as :func:`build_grid`) that cannot run at a budget, with
    why."""
    out = []
    tables: list[Table] = [paper.table(table)] if table else list(paper.tables)
    for t in tables:
        out += [f"{t.id} column {c.label}: {c.not_run}" for c in t.columns if not c.runnable]
        out += [f"{t.id} column {c.label}: lmms-eval task {c.lmms_task}: the lmms-eval plugin takes no run settings "
                f"({', '.join(sorted(t.settings))})" for c in t.columns if c.runnable and c.lmms_task and t.settings]
        out += [f"{t.id} row {r.name}: {r.not_run}" for r in t.rows if not r.runnable]
        out += [f"{t.id} control {m} at budget {b}: {why}" for m, b, why in control_runs(t, controls, budgets, model)
                if why]
    return out


def commands(configs: list[Config], out) -> list[str]:
    """One line per config still to run (not complete): ``BENCH METHOD BUDGET MODEL [flags]``, shell-quoted
    (``BENCH`` = ``lmms:<task>`` for an lmms-eval column: ``scripts/eval/lmms.sh <task> ...`` runs it)."""
    return [" ".join([c.bench] + [shlex.quote(a) for a in c.launch_args()])
            for c in configs if not is_complete(c.run_dir(out))]
