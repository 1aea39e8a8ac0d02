"""A tiny LLaVA whose greedy answers differ by question, for the tests that compare the answers of two ways of
running one evaluation (resumed vs uninterrupted, torchrun ranks vs one process, batched vs batch 1, launchers).

``tiny:llava`` (weights at std 0.02) answers nearly the same words to every question ("with" to five or six of the
six POPE fixture questions, "with with ..." to all 28 MME ones), so two runs agreeing on its answers proves little.
The "grid" size of integrations.vllm.tiny (the Slurm tests' model: weights at std 0.2, 256 visual tokens per image,
16 LLM layers of width 64) gives five or six different answers to the six POPE fixture questions from 2 new tokens
on, and 28 to the 28 MME ones; an answer costs about two to three times tiny:llava's at the same number of new tokens (one
thread). The trained testbed (testbed/weights) answers POPE's questions with "1" / "0" only (its vocabulary is the
shapes task's), so the tests bound to a fixture benchmark's files use this model, and the others the testbed on its
shapes benchmark (answers of every kind: a colour, a shape, yes / no, a count, a side)."""

from __future__ import annotations

from pathlib import Path


def save_varied_llava(path: Path) -> Path:
    """The grid-size tiny LLaVA (seed 0) saved at ``path`` (a local checkpoint ``--model`` takes)."""
    from integrations.vllm.tiny import save_tiny_llava

    return save_tiny_llava(path, size="grid")


def assert_answers_vary(texts, at_least: int) -> None:
    """At least ``at_least`` different answer texts: an equality of two runs' answers then means something."""
    texts = list(texts)
    assert len(set(texts)) >= at_least, f"only {len(set(texts))} different answers (want {at_least}): {texts}"
