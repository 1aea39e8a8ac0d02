"""Moved to :mod:`llava.fast.plan` (llava/fast/plan.py): the fast path is the package ``llava.fast``.

This old path stays an alias: importing ``llava.fast_plan`` gives the very module object ``llava.fast.plan`` (it replaces
itself in ``sys.modules``), so ``monkeypatch.setattr(llava.fast_plan, ...)`` patches the real module. New code imports
``llava.fast.plan``."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("llava.fast.plan")
