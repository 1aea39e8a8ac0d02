"""Moved to :mod:`llava.fast.llm` (llava/fast/llm.py): the fast path is the package ``llava.fast``.

This old path stays an alias: importing ``llava.fast_llm`` gives the very module object ``llava.fast.llm`` (it replaces
itself in ``sys.modules``), so ``monkeypatch.setattr(llava.fast_llm, ...)`` patches the real module. New code imports
``llava.fast.llm``."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("llava.fast.llm")
