"""One comparison's outcome (:class:`Check`) and the table ``python -m parity`` prints and writes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class Check:
    """One comparison of the official code and ours: ``group`` (prep, unpruned, a method's adapter, scorers,
    official-job: an official worker that failed), ``case`` (what was compared: model, precision, budget, batch ...),
    ``ok``, ``detail`` (the measured difference, or what differed first) and ``data`` (both sides' values; a row whose
    greedy tokens part: ``first_difference``, :mod:`parity.differ`)."""

    group: str
    case: str
    ok: bool
    detail: str = ""
    data: dict = field(default_factory=dict)


def table(checks: list[Check]) -> str:
    """A markdown table, one row per check, then the count of failures."""
    rows = ["| group | case | result | detail |", "|---|---|---|---|"]
    for c in checks:
        rows.append(f"| {c.group} | {c.case} | {'identical' if c.ok else 'DIFFERS'} | {c.detail} |")
    bad = sum(not c.ok for c in checks)
    rows.append("")
    rows.append(f"{len(checks) - bad} of {len(checks)} checks agree" + (f"; {bad} differ" if bad else ""))
    return "\n".join(rows)


def write(checks: list[Check], path) -> None:
    with open(path, "w") as f:
        json.dump([asdict(c) for c in checks], f, indent=1)


def precision(c: Check) -> str:
    """The precision a check ran in (the first of the case's first three words that is fp32 / fp16: HiPrune's 24 x 24
    tower's rows start with ``grid24``, the Qwen families' with the family and ``fork``), "-" for the scorers."""
    words = [w for w in c.case.split(" ")[:3] if w in ("fp32", "fp16")]
    return words[0] if words else "-"


def seeds_table(per_seed: dict[int, list[Check]]) -> str:
    """``python -m parity --seeds``: a markdown table of the checks identical per method and precision (rows: the
    check's group, which is the method's adapter for a method row, e.g. ``prumerge``, ``next-flowcut``,
    ``qwen-priortr``; ``prep`` / ``unpruned`` / ``scorers`` the rest) and seed (columns), with the total over the
    seeds; then every check that differs, by seed, with its detail (a differing row's top logits and verdicts)."""
    seeds = list(per_seed)
    keys: list[tuple[str, str]] = []
    cells: dict[tuple[str, str, int], list[int]] = {}
    for s in seeds:
        for c in per_seed[s]:
            key = (c.group, precision(c))
            if key not in keys:
                keys.append(key)
            cell = cells.setdefault((*key, s), [0, 0])
            cell[0] += c.ok
            cell[1] += 1
    head = "| method (group) | precision | " + " | ".join(f"seed {s}" for s in seeds) + " | total |"
    rows = [head, "|---|---|" + "---|" * (len(seeds) + 1)]
    for g, d in keys:
        per = [cells.get((g, d, s)) for s in seeds]
        ok = sum(c[0] for c in per if c)
        n = sum(c[1] for c in per if c)
        rows.append(f"| {g} | {d} | " + " | ".join(f"{c[0]} / {c[1]}" if c else "-" for c in per)
                    + f" | {ok} / {n} |")
    ok = sum(c.ok for cs in per_seed.values() for c in cs)
    n = sum(len(cs) for cs in per_seed.values())
    per = ", ".join(f"seed {s} {sum(c.ok for c in per_seed[s])} of {len(per_seed[s])}" for s in seeds)
    rows += ["", f"{ok} of {n} checks agree over {len(seeds)} seeds ({per})"]
    bad = [(s, c) for s in seeds for c in per_seed[s] if not c.ok]
    if bad:
        rows += ["", "Differ:", ""] + [f"- seed {s}: {c.group} | {c.case} | {c.detail}" for s, c in bad]
    return "\n".join(rows)


def write_seeds(per_seed: dict[int, list[Check]], path) -> None:
    """Per seed, every check's group, case, outcome and detail (the data stays in each seed's ``checks.json``)."""
    with open(path, "w") as f:
        json.dump({str(s): [{"group": c.group, "case": c.case, "ok": c.ok, "detail": c.detail} for c in cs]
                   for s, cs in per_seed.items()}, f, indent=1)
