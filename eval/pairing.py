"""The runs a comparison pairs: a finished run's results and per-unit scores (:class:`Run`), and the check that
runs hold the same questions (:func:`check_same_questions`), for ``eval compare`` and ``eval table --control``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import stats as st
from .io import read_json


class CompareError(ValueError):
    """A comparison that cannot be made honestly (said as one ``error:`` line, exit status 2)."""


@dataclass
class Run:
    path: Path
    results: dict
    units: st.Units | None
    label: str = ""

    @property
    def method(self) -> dict:
        return self.results.get("method") or {}

    @property
    def options(self) -> dict:
        return {k: v for k, v in self.method.items() if k not in ("method", "budget")}


def results_path(p: Path) -> Path:
    p = Path(p)
    if p.is_dir() and (p / "results.json").exists():
        return p / "results.json"
    if p.is_file():
        return p
    raise CompareError(f"{p}: no results.json (a run folder or its results.json)")


def load_run(p) -> Run:
    path = results_path(Path(p))
    res = read_json(path)
    if not str(res.get("schema", "")).startswith("vtprune.eval.results"):
        raise CompareError(f"{path}: not a results file of `eval run`")
    units = None
    if (path.parent / st.UNITS_FILE).exists():
        units = st.read_units(path.parent)
    return Run(path.parent, res, units)


def find_runs(paths) -> list[Run]:
    """Run folders, results.json files, or folders searched for them (sorted), without repeats."""
    out, seen = [], set()
    for p in map(Path, paths):
        if p.is_dir() and not (p / "results.json").exists():
            found = sorted(p.rglob("results.json"))
            if not found:
                raise CompareError(f"{p}: no results.json under it")
        else:
            found = [results_path(p)]
        for f in found:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                out.append(load_run(f))
    return out


def _questions_fp(run: Run) -> dict | None:
    q = run.results.get("questions")
    if q:
        return q
    cfg = run.path / "run_config.json"
    if cfg.exists():
        return ((read_json(cfg).get("fingerprint") or {}).get("data") or {}).get("questions")
    return None


def check_same_questions(runs: list[Run]) -> None:
    """The same benchmark, question list and units in every run, else :class:`CompareError` naming the difference."""
    first = runs[0]
    b0 = first.results.get("benchmark")
    for r in runs[1:]:
        if r.results.get("benchmark") != b0:
            raise CompareError(f"different benchmarks: {first.path} is {b0}, {r.path} is {r.results.get('benchmark')}")
    bo0 = (first.results.get("config") or {}).get("bench_options") or {}
    for r in runs[1:]:
        bo = (r.results.get("config") or {}).get("bench_options") or {}
        if bo != bo0:
            raise CompareError(f"different benchmark options: {first.path} {bo0}, {r.path} {bo}")
    fp0 = _questions_fp(first)
    for r in runs[1:]:
        fp = _questions_fp(r)
        if fp0 and fp and fp != fp0:
            raise CompareError(f"different question sets: {first.path} has {fp0.get('count')} questions "
                               f"(sha256 {str(fp0.get('sha256'))[:12]}), {r.path} has {fp.get('count')} "
                               f"(sha256 {str(fp.get('sha256'))[:12]})")
    for r in runs:
        if r.results.get("partial"):
            raise CompareError(f"{r.path} is a partial run (--limit): compare runs over the whole question set")
        if r.units is None:
            raise CompareError(f"{r.path}: no per-unit scores ({st.UNITS_FILE}); `python -m eval score {r.path}` "
                               "writes them from its answers")
    u0 = first.units
    for r in runs[1:]:
        if set(r.units.ids) != set(u0.ids):
            only_a = len(set(u0.ids) - set(r.units.ids))
            only_b = len(set(r.units.ids) - set(u0.ids))
            raise CompareError(f"different scored units: {first.path} and {r.path} share "
                               f"{len(set(u0.ids) & set(r.units.ids))} {u0.unit}s; {only_a} only in the first, "
                               f"{only_b} only in the second")


def benchmark_of(run: Run):
    """The benchmark object of ``run`` (its name and options; no data is read), which holds its per-unit statistics."""
    from .benchmarks import get_benchmark

    return get_benchmark(run.results.get("benchmark"), ".", **((run.results.get("config") or {}).get("bench_options") or {}))


def stat_for(run: Run, metric: str, bench=None) -> st.Stat:
    """How ``metric`` of ``run`` is computed from its units (``bench``: :func:`benchmark_of`, when the caller has it);
    :class:`CompareError` for a server's number or a metric without a per-unit statistic."""
    if (run.results.get("stderr") or {}).get(metric) == "server":
        raise CompareError(f"{metric} of {run.path} is scored by the benchmark's server: there is no per-question "
                           "truth here to compare on")
    bench = bench or benchmark_of(run)
    stat = bench.stats.get(metric)
    if stat is None:
        raise CompareError(f"{metric}: no per-unit statistic for benchmark {bench.name} (metrics with one: "
                           f"{', '.join(bench.stats) or 'none'})")
    return stat
