"""What a differing row says about itself (docs/parity.md, "What a differing row shows"): where the greedy tokens part,
both sides' two largest logits at that decode step, whether the two picks tie within one ulp of the run's precision,
and the replay's verdict on a kept set (our selection on the official side's own rows)."""

from __future__ import annotations

from collections.abc import Callable

import torch

#: a run's precision by the name its cases carry
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: the integer type of each float type's bit pattern
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def ulp(x: float, dtype: torch.dtype) -> float:
    """The spacing of ``dtype``'s values at ``|x|``: from ``|x|`` rounded to ``dtype`` to the next value up (fp16 at
    0.33: 2^-12 = 2.44e-4; bf16 there: 2^-9; fp32: 2^-25)."""
    t = torch.tensor(abs(x), dtype=torch.float64).to(dtype)
    return (torch.nextafter(t, torch.tensor(float("inf"), dtype=dtype)) - t).item()


def steps_apart(a: float, b: float, dtype: torch.dtype) -> int:
    """How many ``dtype`` steps lie between ``a`` and ``b``, each rounded to ``dtype`` first (0: equal, 1: neighbours),
    counted on the bit patterns: sign and magnitude made one ordered integer, so the count holds across a power of two
    (where the spacing doubles) and across zero."""
    bits = _BITS[dtype]
    half = 2 ** (torch.iinfo(bits).bits - 1)
    keys = []
    for x in (a, b):
        i = int(torch.tensor([x], dtype=torch.float64).to(dtype).view(bits).item())
        keys.append(i if i >= 0 else -(i + half))
    return abs(keys[0] - keys[1])


def tie(official: dict, ours: dict, dtype: torch.dtype) -> bool:
    """A tie within one ulp: at the step where the picks part, both sides' two largest logits are the same two tokens
    and on each side those two logits are at most one ``dtype`` step apart (``{"ids": [a, b], "logits": [la, lb]}``
    per side): the two picks are one rounding from each other."""
    return set(official["ids"]) == set(ours["ids"]) and all(
        steps_apart(*side["logits"], dtype) <= 1 for side in (official, ours))


def first_step(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists part (one ending first: the shorter one's length); None: equal."""
    if a == b:
        return None
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def top2(steps: dict | None, n_tokens: int, row: int, j: int, lead: int = 0) -> dict | None:
    """The two largest logits where token ``j`` of ``row`` was picked, from a side's recorded steps
    (:func:`parity.step_logits.stacked`): ``n_tokens`` the row's generated columns as returned, ``lead`` the columns
    left out before ``j`` counts (an official BOS). The steps are the last columns (a BOS has no step). None: not
    recorded there."""
    if steps is None:
        return None
    n = steps["ids"].shape[0]
    k = j + lead - (n_tokens - n)
    if not 0 <= k < n or row >= steps["ids"].shape[1]:
        return None
    return {"ids": steps["ids"][k, row].tolist(), "logits": steps["logits"][k, row].tolist()}


def _pair(side: dict) -> str:
    return ", ".join(f"{t} ({v:.6g})" for t, v in zip(side["ids"], side["logits"]))


def describe(image, step: int, official: dict | None, ours: dict | None, dtype: str) -> tuple[str, dict]:
    """One sample's first differing step: the detail's clause and the data (both sides' top-2, the tie verdict, the
    steps between each side's two logits, the ulp at their magnitude)."""
    data = {"image": image, "step": step, "official": official, "ours": ours}
    head = f"image {image} step {step}: "
    if official is None or ours is None:
        return head + "top logits not recorded", data
    dt = DTYPES[dtype]
    gaps = [steps_apart(*side["logits"], dt) for side in (official, ours)]
    u = ulp(max(abs(v) for v in official["logits"] + ours["logits"]), dt)
    data.update(tie=tie(official, ours, dt), steps_apart=gaps, ulp=u)
    head += f"official {_pair(official)}; ours {_pair(ours)}: "
    if data["tie"]:
        return head + f"tie within one ulp ({dtype} ulp {u:.3g})", data
    if set(official["ids"]) != set(ours["ids"]):
        return head + "no tie (other top-2 tokens)", data
    return head + f"no tie (the top two {gaps[0]} / {gaps[1]} {dtype} steps apart)", data


def token_differences(images: list, official: list[list[int]], ours: list[list[int]],
                      official_top2: Callable[[int, int], dict | None], our_top2: Callable[[int, int], dict | None],
                      dtype: str) -> tuple[str, list[dict]]:
    """Every sample whose greedy tokens part (``images``: the batch's image of each row): :func:`describe` at its first
    differing step, each side's top-2 from ``*_top2(row, step)``. Returns the clauses joined by "; " and the data."""
    clauses, data = [], []
    for row, (a, b) in enumerate(zip(official, ours)):
        j = first_step(a, b)
        if j is not None:
            text, d = describe(images[row], j, official_top2(row, j), our_top2(row, j), dtype)
            clauses.append(text)
            data.append(d)
    return "; ".join(clauses), data


def replay_detail(kept_ok: bool, replay_ok: bool) -> str:
    """The replay's verdict (our selection on the official side's recorded rows): where it gives the official picks and
    the kept sets still differ, the rows each side read differ (the two environments' kernels); where it does not,
    our arithmetic does."""
    if not replay_ok:
        return "replay differs: ours is wrong"
    return "replay on the official rows: identical picks" + ("" if kept_ok else " (the environments' kernels differ)")
