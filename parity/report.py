"""One comparison's outcome (:class:`Check`) and the table ``python -m parity`` prints and writes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class Check:
    """One comparison of the official code and ours: ``group`` (prep, unpruned, flowcut, scorers, official-path),
    ``case`` (what was compared: model, precision, budget, batch ...), ``ok`` and ``detail`` (the measured
    difference, or what differed first)."""

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
