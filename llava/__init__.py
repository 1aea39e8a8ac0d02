"""LLaVA-family runtime on HF transformers with one visual-token pruning engine.

    import llava
    rt = llava.load("llava-hf/llava-1.5-7b-hf", dtype="float16", device="cuda")
    llava.prune(rt, "consensusdrop", budget=64)          # or llava.prune(rt.model, ...)
    batch = rt.processor(["What is on the table?"], ["photo.jpg"], device="cuda")
    out = rt.model.generate(**batch, max_new_tokens=128, do_sample=False)
    print(rt.processor.decode(out[:, batch["input_ids"].shape[1]:]), rt.engine.stats)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

#: the package's names and the module each comes from: imported on first use (PEP 562), so that a command that only
#: plans or reports (``python -m eval paper-grid``, ``eval paper``, ``eval table``) does not pay transformers' import
_LAZY = {"PromptSpec": "plan", "PruningEngine": "engine", "attach": "engine", "Method": "method",
         "Selection": "selection", "available_methods": "method", "get_method": "method", "register": "method",
         "Runtime": "models", "load": "models"}

if TYPE_CHECKING:
    from .engine import PruningEngine, attach
    from .method import Method, available_methods, get_method, register
    from .models import Runtime, load
    from .plan import PromptSpec
    from .selection import Selection


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["load", "prune", "attach", "Runtime", "PruningEngine", "PromptSpec", "Method", "Selection",
           "register", "get_method", "available_methods"]


def prune(target, method: str | Method = "none", budget: int | None = None, *, tokenizer=None, template=None,
          **options) -> PruningEngine:
    """Apply ``method`` at ``budget`` to a :class:`Runtime` (preferred: knows the prompt template and
    LLaVA-NeXT layout) or a bare transformers model; ``generate()`` then prunes. For a bare model,
    query-aware methods need ``tokenizer`` and ``template`` (e.g. 'vicuna_v1') to find the question."""
    from .engine import attach
    from .models import Runtime

    if isinstance(target, Runtime):
        return target.prune(method, budget, **options)
    if tokenizer is not None and template is not None and "prompt_spec" not in options:
        from .models import prompt_spec_for

        options["prompt_spec"] = prompt_spec_for(tokenizer, template)
    return attach(target, method, budget, **options)
