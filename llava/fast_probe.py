"""Moved to :mod:`llava.fast.probe` (llava/fast/probe.py): the fast path is the package ``llava.fast``.

This old path stays an alias: importing ``llava.fast_probe`` gives the very module object ``llava.fast.probe`` (it replaces
itself in ``sys.modules``), so ``monkeypatch.setattr(llava.fast_probe, ...)`` patches the real module. New code imports
``llava.fast.probe``."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("llava.fast.probe")
