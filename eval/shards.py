"""A run's answers on disk and the questions' inputs: the pieces the runner, the merge, the data check,
the vLLM backend and the W&B tables all read, kept below them so that every import points one way.

A run folder holds one shard file per answering process, ``<run>/answers/{world}_{rank}.jsonl``: the
question list is cut into ``world`` contiguous chunks of ceil(N / world) (LLaVA's split_list /
get_chunk) and rank r appends its answer records to its file. Each record carries its bookkeeping
(question id, hashes, tokens, times) under :data:`EVAL_KEY`, stripped from ``merge.jsonl``.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from .io import complete_jsonl_records

#: per-record bookkeeping in shard files (stripped from merge.jsonl)
EVAL_KEY = "_eval"
SHARD_RE = re.compile(r"^(\d+)_(\d+)\.jsonl$")


def chunk(items: list, world: int, rank: int) -> list:
    """LLaVA's split_list / get_chunk: contiguous chunks of ceil(N / world)."""
    if not items:
        return []
    size = math.ceil(len(items) / world)
    return items[rank * size:(rank + 1) * size]


def shard_files(run_dir: Path) -> list[Path]:
    """The run's shard files, ordered by (world, rank)."""
    d = run_dir / "answers"
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if SHARD_RE.match(p.name)),
                  key=lambda p: tuple(int(x) for x in SHARD_RE.match(p.name).groups()))


def answered_uids(run_dir: Path) -> set[str]:
    """The question ids answered in any shard file of the run (a torn last line does not count)."""
    out = set()
    for p in shard_files(run_dir):
        for r in complete_jsonl_records(p):
            out.add(r[EVAL_KEY]["uid"])
    return out


class InputError(ValueError):
    """A question's image / video cannot be read (corrupt, truncated, unreadable): the run stops with one line
    naming the file and the question; the answers so far are on disk and the same command goes on."""


def read_input(q, fn, what: str, answered: int, shard: Path):
    """``fn()`` (question ``q``'s image or video loaded), or :class:`InputError` saying which file of which
    question, how many answers of this session are saved in ``shard``, and how to go on."""
    try:
        return fn()
    except (ValueError, OSError, RuntimeError) as e:
        n = f"{answered} answers of this session are saved in {shard}; " if answered else ""
        raise InputError(f"cannot read the {what} of question {q.uid}: {e}. {n}fix or restore the file and run the "
                         "same command again: it answers the questions left") from e


def check_inputs(bench, questions: list) -> list[str]:
    """Missing input files of the questions (images / videos), each once however many questions read it
    (``bench``: an :class:`eval.benchmarks.Benchmark`; a video benchmark says itself what it misses)."""
    if hasattr(bench, "missing_inputs"):
        missing = [f"video {v}" for v in bench.missing_inputs(questions)]
    else:
        missing = [q.image for q in questions if isinstance(q.image, str) and not os.path.exists(q.image)]
    return list(dict.fromkeys(missing))
