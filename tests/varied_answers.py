"""A tiny LLaVA whose greedy answers differ by question, for the tests that compare the answers of two ways of
running one evaluation (resumed vs uninterrupted, torchrun ranks vs one process, batched vs batch 1, launchers).

``tiny:llava`` (weights at std 0.02) answers nearly the same words to every question ("with" to five of the six
POPE fixture questions), so two runs agreeing on its answers proves little. The "grid" size of
integrations.vllm.tiny (the Slurm tests' model: weights at std 0.2, 256 visual tokens per image, 16 LLM layers
of width 64) answers the six POPE fixture questions with five or six different texts at 2-4 new tokens, in about
the time of ``tiny:llava``. The trained testbed (testbed/weights) answers POPE's questions with "1" / "0" only (its
vocabulary is the shapes task's), so the POPE-bound tests use this model; tests on the shapes benchmark use the
testbed itself."""

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
