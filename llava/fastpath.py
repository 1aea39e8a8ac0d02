"""Moved to :mod:`llava.fast.path` (llava/fast/path.py): the fast path is the package ``llava.fast``.

This old path stays an alias: importing ``llava.fastpath`` gives the very module object ``llava.fast.path`` (it replaces
itself in ``sys.modules``), so ``monkeypatch.setattr(llava.fastpath, ...)`` patches the real module. New code imports
``llava.fast.path``."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("llava.fast.path")
