"""The contract check of one method: each guarantee of :mod:`llava.check.guarantees` on the tiny model of each
family, as rows (guarantee, family, verdict, detail) with the verdict PASS, FAIL or n.a. (with the reason)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine import HybridRefusal
from ..method import BudgetError, method_class
from ..options import did_you_mean
from ..families import registry
from ..models import load
from .budgets import keep_all_spelling, sync_bound, sync_sizes, tiny_budget
from .fast import check_fast_equals_eager
from .guarantees import (NotApplicable, check_batch_equals_alone, check_cached_equals_recompute, check_device_placement,
                         check_host_syncs, check_keep_all, check_no_mask_forward, check_selections)
from .inputs import key, sized_batch
from .tp import check_tp, deepspeed_missing

#: every guarantee, in the table's order, with what it checks
GUARANTEES = {
    "selections": "a prefill of 3 samples runs and every selection is well-formed (no index twice, none outside)",
    "keep_all": "at a keep-all spelling, the unpruned model bit for bit (logits and tokens)",
    "batch": "each sample of a batch of 3 gives its tokens alone (left-padded and equal-length prompts)",
    "cached": "cached greedy generation == decoding by full recompute without a cache",
    "no_mask": "a forward without mask or cache gives generate()'s last logits",
    "device": "every tensor on the signals' device (a fake accelerator on the CPU)",
    "syncs": "host reads per sample bounded and flat in the visual tokens",
    "fast": "the fast path (captured prefill) == the eager engine (--fast)",
    "tp": "tensor parallelism (TP=2, gloo) == the plain model, for methods reading LLM signals",
}
PASS, FAIL, NA = "PASS", "FAIL", "n.a."


class CheckInputError(ValueError):
    """A bad method, family, guarantee, budget or option: ``python -m llava.check`` prints it as one ``error:`` line
    and exits 2."""


@dataclass
class Row:
    guarantee: str
    family: str
    verdict: str
    detail: str = ""


def _error(e: BaseException) -> str:
    text = str(e.args[0]) if e.args else str(e)
    if isinstance(e, AssertionError):
        return text
    return f"{type(e).__name__}: {text.strip().splitlines()[0] if text.strip() else ''}"


def _resolve(name: str, families, only, budget, keep_all_budget, options):
    """The method's class, the families and the guarantees to run; every bad input as a :class:`CheckInputError`."""
    try:
        cls = method_class(name)
    except KeyError:
        from ..method import available_methods

        raise CheckInputError(f"unknown method {name!r}{did_you_mean(name, available_methods())}; "
                              "`python -m llava.cli methods` lists them") from None
    tiny = registry.tiny_names()
    bad = [f for f in families or [] if f not in tiny]
    if bad:
        raise CheckInputError(f"unknown famil{'ies' if len(bad) > 1 else 'y'} {', '.join(map(repr, bad))}"
                              f"{did_you_mean(bad, tiny)}; the tiny families: {', '.join(tiny)}")
    families = list(families or [f for f in tiny if cls.supports(key(f))])
    bad = [g for g in only or [] if g not in GUARANTEES]
    if bad:
        raise CheckInputError(f"unknown guarantee{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}"
                              f"{did_you_mean(bad, GUARANTEES)}; the guarantees: {', '.join(GUARANTEES)}")
    for b in {budget if budget is not None else tiny_budget(cls.name, f, cls) for f in families} | \
            ({keep_all_budget} if keep_all_budget is not None else set()):
        try:  # an unknown option or a bad budget, before any model runs
            cls(budget=b, **options)
        except (ValueError, TypeError) as e:
            raise CheckInputError(str(e.args[0]) if e.args else str(e)) from None
    return cls, families


def _family_rows(name, cls, family, wanted, budget, options, keep_all_budget, fast_backend):
    """The rows of one family (every guarantee but tp) and the attached method instance, or the tp row's
    (verdict, detail) where the method does not attach."""
    rows = {}
    wanted = [g for g in wanted if g != "tp"]
    if not cls.supports(key(family)):
        why = f"{name} does not support {key(family)} (Method.families)"
        return {g: Row(g, family, NA, why) for g in wanted}, (NA, why)
    b = budget if budget is not None else tiny_budget(name, family, cls)
    rt = load(f"tiny:{family}", seed=1)
    try:
        method = rt.prune(name, b, **options).method
    except HybridRefusal as e:
        return {g: Row(g, family, NA, str(e)) for g in wanted}, (NA, str(e))
    except Exception as e:  # noqa: BLE001 - the method does not attach: the first row says why
        failed, why = (FAIL, f"attach: {_error(e)}"), (NA, "not run: the method does not attach")
        return {g: Row(g, family, *(failed if i == 0 else why)) for i, g in enumerate(wanted)}, \
            why if wanted else failed
    rt.unprune()
    runs = {
        "selections": lambda: check_selections(rt, name, b, **options),
        "keep_all": lambda: _keep_all(rt, name, cls, family, keep_all_budget, options),
        "batch": lambda: "; ".join(check_batch_equals_alone(rt, name, b, batch=k, **options)
                                   for k in ("unequal", "equal_length")),
        "cached": lambda: check_cached_equals_recompute(rt, name, b, **options),
        "no_mask": lambda: check_no_mask_forward(rt, name, b, **options),
        "device": lambda: check_device_placement(rt, name, b, **options),
        "syncs": lambda: _syncs(rt, name, b, options),
        "fast": lambda: _fast(rt, family, method, name, b, options, fast_backend),
    }
    for g in wanted:
        if "selections" in rows and rows["selections"].verdict == FAIL:
            rows[g] = Row(g, family, NA, "not run: the prefill fails (selections)")
            continue
        try:
            rows[g] = Row(g, family, PASS, runs[g]())
        except (NotApplicable, BudgetError) as e:  # BudgetError: an option this input cannot serve
            rows[g] = Row(g, family, NA, str(e))
        except Exception as e:  # noqa: BLE001 - the guarantee does not hold: its row says why
            detail = _error(e)
            if b is None and "NoneType" in detail:  # e.g. min(self.budget, n)
                detail += " (it ran without a budget: pass --budget N or declare check_budget)"
            rows[g] = Row(g, family, FAIL, detail)
        finally:
            rt.unprune()
    return rows, method


def _keep_all(rt, name, cls, family, keep_all_budget, options) -> str:
    spelling = (keep_all_budget, {}) if keep_all_budget is not None else keep_all_spelling(name, family, cls)
    if isinstance(spelling, str):
        raise NotApplicable(spelling)
    b, opts = spelling
    return check_keep_all(rt, name, b, **{**options, **opts})


def _syncs(rt, name, budget, options) -> str:
    sizes = sync_sizes(rt.family)
    if sizes is None:
        raise NotApplicable(f"tiny {rt.family} has a fixed visual token count per image: no larger input to compare")
    small, large = (sized_batch(rt, s) for s in sizes)
    return check_host_syncs(rt, name, budget, bound=sync_bound(name), small=small, large=large, **options)


def _fast(rt, family, method, name, budget, options, backend) -> str:
    why = method.capture_refusal()
    if why:
        raise NotApplicable(why)
    fam = registry.get(rt.family)
    if not fam.fast:
        raise NotApplicable(f"the fast path does not plan {rt.family} models: {fam.fast_reason}")
    fast = load(f"tiny:{family}", seed=1, fast=True, fast_max_new_tokens=16, fast_backend=backend)
    return check_fast_equals_eager(fast, rt, name, budget, **options)


def _tp_rows(name, cls, methods: dict, budget, options) -> dict[str, Row]:
    """The tp row of every family: run at TP=2 where the attached method reads LLM signals."""
    rows, cases = {}, []
    missing = deepspeed_missing()
    for family, m in methods.items():
        if isinstance(m, tuple):  # not attached: (verdict, detail)
            rows[family] = Row("tp", family, *m)
        elif not (m.llm_layers or m.probe_layers):
            rows[family] = Row("tp", family, NA, "reads no LLM signal: the sharded language model is not its concern")
        elif m.llm_grad:
            rows[family] = Row("tp", family, NA, f"{name} takes a gradient in its llm stages (llm_grad): refused "
                                                 "under tensor parallelism at attach")
        elif missing:
            rows[family] = Row("tp", family, NA, missing)
        else:
            cases.append((family, budget if budget is not None else tiny_budget(name, family, cls)))
    if cases:
        for family, (verdict, detail) in check_tp(name, cls.__module__, cases, options).items():
            rows[family] = Row("tp", family, verdict, detail)
    return rows


def run_checks(method: str, families=None, budget: int | None = None, options: dict | None = None, only=None,
               fast: bool = False, keep_all_budget: int | None = None, fast_backend: str = "auto",
               progress=None) -> list[Row]:
    """Every guarantee of ``method`` (a registered name) on the tiny model of each of ``families`` (default: every
    tiny family the method supports): rows in :data:`GUARANTEES` order, then family order. ``budget``: default the
    class's ``check_budget`` or the built-in table (:mod:`llava.check.budgets`); ``only``: a subset of the
    guarantees; ``fast``: include the fast-path check (it compiles: slow); ``keep_all_budget``: the budget that
    keeps every visual token (default: the class's ``check_keep_all`` or the table); ``progress``: called with
    each row as it is decided. Raises :class:`CheckInputError` on bad input, before any model runs."""
    options = dict(options or {})
    cls, families = _resolve(method, families, only, budget, keep_all_budget, options)
    name = cls.name
    wanted = [g for g in GUARANTEES if (g in only if only else g != "fast" or fast)]
    rows, methods = [], {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny models' ops are too small to share: more threads only spin (5-10x the CPU)
    try:
        for family in families:
            got, methods[family] = _family_rows(name, cls, family, wanted, budget, options, keep_all_budget,
                                                fast_backend)
            for row in got.values():
                rows.append(row)
                if progress:
                    progress(row)
    finally:
        torch.set_num_threads(threads)
    if "tp" in wanted:
        for row in _tp_rows(name, cls, methods, budget, options).values():
            rows.append(row)
            if progress:
                progress(row)
    order = {g: i for i, g in enumerate(GUARANTEES)}
    return sorted(rows, key=lambda r: (order[r.guarantee], families.index(r.family)))


def table(rows: list[Row]) -> str:
    """The rows as a markdown table."""
    lines = ["| guarantee | family | result | detail |", "|---|---|---|---|"]
    lines += [f"| {r.guarantee} | {r.family} | {r.verdict} | {r.detail.replace('|', '/')} |" for r in rows]
    return "\n".join(lines)


def summary(name: str, rows: list[Row]) -> str:
    counts = {v: sum(r.verdict == v for r in rows) for v in (PASS, FAIL, NA)}
    failed = sorted({r.guarantee for r in rows if r.verdict == FAIL}, key=list(GUARANTEES).index)
    return (f"{name}: {counts[PASS]} PASS, {counts[FAIL]} FAIL, {counts[NA]} n.a."
            + (f"; failing: {', '.join(failed)}" if failed else ""))
