"""LLaVA-family runtime on HF transformers with one visual-token pruning engine.

    import llava
    rt = llava.load("llava-hf/llava-1.5-7b-hf", dtype="float16", device="cuda")
    llava.prune(rt, "consensusdrop", budget=64)          # or llava.prune(rt.model, ...)
    batch = rt.processor(["What is on the table?"], ["photo.jpg"], device="cuda")
    out = rt.model.generate(**batch, max_new_tokens=128, do_sample=False)
    print(rt.processor.decode(out[:, batch["input_ids"].shape[1]:]), rt.engine.stats)
"""

from __future__ import annotations

from .engine import PromptSpec, PruningEngine, attach
from .method import Method, Selection, available_methods, get_method, register
from .models import Runtime, load

__all__ = ["load", "prune", "attach", "Runtime", "PruningEngine", "PromptSpec", "Method", "Selection",
           "register", "get_method", "available_methods"]


def prune(target, method: str | Method = "none", budget: int | None = None, *, tokenizer=None, template=None,
          **options) -> PruningEngine:
    """Apply ``method`` at ``budget`` to a :class:`Runtime` (preferred: knows the prompt template and
    LLaVA-NeXT layout) or a bare transformers model; ``generate()`` then prunes. For a bare model,
    query-aware methods need ``tokenizer`` and ``template`` (e.g. 'vicuna_v1') to find the question."""
    if isinstance(target, Runtime):
        return target.prune(method, budget, **options)
    if tokenizer is not None and template is not None and "prompt_spec" not in options:
        from .models import prompt_spec_for

        options["prompt_spec"] = prompt_spec_for(tokenizer, template)
    return attach(target, method, budget, **options)
