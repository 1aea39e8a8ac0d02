"""RESTORE over VisPruner: the ``restore`` adapter (parity/adapters/restore.py: the official repository
``cvlab-yonsei/RESTORE``, its switch, the two literals replaced, what is recorded) with ``--base VisPruner``.

- the official base: ``tore/vispruner`` (its ``encode_images``, bound on the instance: VisPruner's rule with
  ``T = int(n * 0.5)`` and ``important_ratio = 0.5`` on the tower's features and head-mean [CLS] attention; the
  dropped rows of the projected features, ascending, go to ``distinctive_anchor_merging``).
- ours: ``restore`` with ``base="vispruner"`` and VisPruner's parity options (``numerics="official"``; RESTORE's
  recipe sets ``important_ratio=0.5``).
- fp16 (measured 2026-11-29, docs/results/2026-11-29-restore-parity.md): the fork's own ``clip_encoder.py`` casts the
  [CLS] attentions to the images' dtype (``image_attentions.to(images.dtype)``: fp16 in the fp16 run) before
  ``encode_images`` takes their head mean; Theia's VisPruner fork leaves them in the tower's fp32, our VisPruner's
  reference default (``baselines/vispruner.py`` ``OFFICIAL_ATTENTION_DTYPE``). RESTORE's recipe for its VisPruner base
  sets ``official_attention="images"`` (the head mean in the images' dtype): without it two fp16 rows differed (seed
  0, image 3, n = 24 and 32), with it every row is identical.
"""

from __future__ import annotations

REPOSITORY = "cvlab-yonsei/RESTORE"
COMMIT = "9b27e687a2b877d6facacae093b8d9686afa5c6f"
PACKAGES = ("llava", "tokenreduction")
INSTALLED = False
OFFICIAL = {"alone": True}
#: n = 16 is refused by the official VisPruner (base T = 8 of 64 patches: its duplicate-removal loop calls
#: ``expand(-1, -2)``, parity/adapters/vispruner.py); n = 24 and 32 (T = 12, 16) run
BUDGETS = (24, 32)

BASE = "vispruner"
OFFICIAL_BASE = "VisPruner"


# ---- the official side (runs in .venv-official): the ``restore`` adapter's, over VisPruner ----

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
