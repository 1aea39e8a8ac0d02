"""Moved to :mod:`llava.fast.attention` (llava/fast/attention.py): the fast path is the package ``llava.fast``.

This old path stays an alias: importing ``llava.fast_attention`` gives the very module object ``llava.fast.attention`` (it replaces
itself in ``sys.modules``), so ``monkeypatch.setattr(llava.fast_attention, ...)`` patches the real module. New code imports
``llava.fast.attention``."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("llava.fast.attention")
