"""Moved to :mod:`llava.fast.compile` (llava/fast/compile.py): the fast path is the package ``llava.fast``.

This old path stays an alias: importing ``llava.fast_compile`` gives the very module object ``llava.fast.compile`` (it replaces
itself in ``sys.modules``), so ``monkeypatch.setattr(llava.fast_compile, ...)`` patches the real module. New code imports
``llava.fast.compile``."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("llava.fast.compile")
