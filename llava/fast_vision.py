"""Moved to :mod:`llava.fast.vision` (llava/fast/vision.py): the fast path is the package ``llava.fast``.

This old path stays an alias: importing ``llava.fast_vision`` gives the very module object ``llava.fast.vision`` (it replaces
itself in ``sys.modules``), so ``monkeypatch.setattr(llava.fast_vision, ...)`` patches the real module. New code imports
``llava.fast.vision``."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("llava.fast.vision")
