"""``python -m eval check-data``: does a data folder hold what each benchmark needs, and if not,
what exactly is missing and where to get it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .benchmarks import BENCHMARKS, Benchmark, get_benchmark
from .shards import check_inputs


@dataclass
class Report:
    bench: str
    root: Path
    lines: list[str] = field(default_factory=list)
    missing_inference: list[str] = field(default_factory=list)
    missing_scoring: list[str] = field(default_factory=list)
    missing_inputs: list[str] = field(default_factory=list)
    n_questions: int | None = None

    @property
    def ok_inference(self) -> bool:
        return not self.missing_inference and not self.missing_inputs

    @property
    def ok_scoring(self) -> bool:
        return not self.missing_scoring

    def text(self) -> str:
        head = f"[{self.bench}] under {self.root}: "
        if self.ok_inference and self.ok_scoring:
            head += "OK" + (f" ({self.n_questions} questions)" if self.n_questions is not None else "")
        elif self.ok_inference:
            head += "can run; scoring files missing (answers are kept; score later with `python -m eval score RUN_DIR`)"
        else:
            head += "MISSING files needed to run"
        return "\n".join([head] + [f"  {ln}" for ln in self.lines])


def check_benchmark(bench: Benchmark, deep: bool = True) -> Report:
    rep = Report(bench.name, bench.root)
    for f in bench.files():
        p = bench.path(f.path)
        ok = p.is_dir() if f.kind == "dir" else p.is_file()
        if ok and f.kind == "dir" and not any(os.scandir(p)):
            ok = False
        if ok:
            rep.lines.append(f"ok       {f.path}")
            continue
        what = "directory" if f.kind == "dir" else "file"
        rep.lines.append(f"MISSING  {f.path}  ({what}, needed for {f.needed_for}) <- {f.source}")
        (rep.missing_inference if f.needed_for == "inference" else rep.missing_scoring).append(f.path)
    if deep and not rep.missing_inference:
        try:
            qs = bench.load()
        except Exception as e:  # noqa: BLE001 - report, do not crash
            rep.lines.append(f"ERROR    cannot read the questions: {type(e).__name__}: {e}")
            rep.missing_inference.append("(unreadable question file)")
            return rep
        rep.n_questions = len(qs)
        miss = check_inputs(bench, qs)
        if miss:
            rep.missing_inputs = miss
            shown = ", ".join(str(m) for m in miss[:5])
            rep.lines.append(f"MISSING  {len(miss)} of {len(qs)} input file(s) the questions refer to, e.g. {shown}")
    return rep


def check_all(data_root, names: list[str] | None = None, deep: bool = True) -> list[Report]:
    names = names or list(BENCHMARKS)
    return [check_benchmark(get_benchmark(n, data_root), deep=deep) for n in names]
