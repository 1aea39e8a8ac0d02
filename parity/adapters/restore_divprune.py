"""RESTORE over DivPrune: the ``restore`` adapter (parity/adapters/restore.py: the official repository
``cvlab-yonsei/RESTORE``, its switch, the two literals replaced, what is recorded) with ``--base DivPrune``.

- the official base: ``tore/divprune`` (its ``DivPrune`` picks ``int(n * 0.5)`` rows of the projected features in the
  model's dtype; the dropped rows, ascending, go to ``distinctive_anchor_merging``).
- ours: ``restore`` with ``base="divprune"`` and DivPrune's parity options (``numerics="official"``).
"""

from __future__ import annotations

REPOSITORY = "cvlab-yonsei/RESTORE"
COMMIT = "9b27e687a2b877d6facacae093b8d9686afa5c6f"
PACKAGES = ("llava", "tokenreduction")
INSTALLED = False
OFFICIAL = {"alone": True}
BUDGETS = (16, 32)

BASE = "divprune"
OFFICIAL_BASE = "DivPrune"


# ---- the official side (runs in .venv-official): the ``restore`` adapter's, over DivPrune ----

def before_load(method: dict) -> None:
    from . import restore

    restore.before_load(method)


def enable(model, method: dict) -> None:
    from . import restore

    restore.enable_base(model, method, OFFICIAL_BASE)


def inputs(model, tokenizer, cases, prompts, input_ids) -> dict:
    from . import restore

    return restore.inputs(model, tokenizer, cases, prompts, input_ids)


def record(model, store: list) -> list:
    from . import restore

    return restore.record(model, store)


# ---- our side ----

def ours(budget: int) -> tuple[str, dict]:
    from . import restore

    return restore.ours_base(BASE)


def record_ours(rt, store: list):
    from . import restore

    return restore.record_ours(rt, store)
