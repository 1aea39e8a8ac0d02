"""bench.deepspeed_check's configuration (:class:`DSCheckConfig`, every flag), its time limit (:class:`Budget`)
and the tiny-model budget each method runs at; shared by the three parts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import gpu_check as G
from llava.families import registry
from llava.families.registry import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[2]
#: one family per tiny token geometry (the first registered of each, tiny spelling): the check is plain vs DeepSpeed,
#: so one model of each geometry covers what the wrapping could change
_first: dict = {}
for _f in registry.families():
    _first.setdefault(_f.tiny_geometry, _f.tiny)
FAMILIES = tuple(_first.values())
TTFT_METHODS = ("none", "consensusdrop", "visiondrop", "attnmix", "fastv", "visionzip")
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GROUP_RANK", "ROLE_RANK", "CROSS_RANK", "CROSS_SIZE")


@dataclass
class DSCheckConfig:
    device: str | None = None
    equivalence: bool = True
    families: list = field(default_factory=lambda: list(FAMILIES))
    dtypes: list = field(default_factory=list)
    methods: list = field(default_factory=list)  # default: every registered method
    new_tokens: int = 4
    seed: int = 1
    ttft: bool = True
    ttft_model: str = "shape:llava-1.5-7b"
    ttft_dtype: str = "float16"
    ttft_methods: list = field(default_factory=lambda: list(TTFT_METHODS))
    ttft_budget: int = 64
    ttft_runs: int = 20
    ttft_warmup: int = 3
    ttft_text_words: int = 12
    launcher_check: bool = True
    launcher_model: str = DEFAULT_MODEL
    launcher_new_tokens: int = 8
    launcher_timeout: int = 600
    out: str = "docs/results"
    time_limit: float | None = None  # seconds for the whole run (None: no limit)
    time_reserve: float = 5.0  # seconds kept back from the limit for writing the report


class Budget:
    """The time limit of a run: ``check()`` before a step raises Stopped when the step, as long as the
    longest one so far, would end past the deadline (time.time()); ``took()`` records a step's wall time."""

    def __init__(self, deadline: float | None = None):
        self.deadline, self.longest = deadline, 0.0

    def check(self) -> float:
        if not G.may_start(time.time(), self.deadline, self.longest):
            raise G.Stopped(G.TIME_LIMIT)
        return time.perf_counter()

    def took(self, t0: float) -> None:
        self.longest = max(self.longest, time.perf_counter() - t0)


def _fam(family: str) -> str:
    return registry.key(family)


def budget_for(method: str, family: str):
    return G.tiny_budget(method, _fam(family))


def _supports(method: str, fam: str) -> bool:
    from llava.method import method_supports

    try:
        return method_supports(method, fam)
    except KeyError:  # "none" may not be a registry entry
        return True
