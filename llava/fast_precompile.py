"""Moved to :mod:`llava.fast.precompile` (llava/fast/precompile.py): the fast path is the package ``llava.fast``.

This old path stays an alias: importing ``llava.fast_precompile`` gives the very module object ``llava.fast.precompile`` (it replaces
itself in ``sys.modules``), so ``monkeypatch.setattr(llava.fast_precompile, ...)`` patches the real module. New code imports
``llava.fast.precompile``."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("llava.fast.precompile")
