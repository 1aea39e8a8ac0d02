"""Moved to :mod:`llava.fast.graphs` (llava/fast/graphs.py): the fast path is the package ``llava.fast``.

This old path stays an alias: importing ``llava.fast_graphs`` gives the very module object ``llava.fast.graphs`` (it replaces
itself in ``sys.modules``), so ``monkeypatch.setattr(llava.fast_graphs, ...)`` patches the real module. New code imports
``llava.fast.graphs``."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("llava.fast.graphs")
