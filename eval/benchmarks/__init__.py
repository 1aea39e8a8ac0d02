"""Benchmarks in LLaVA's ``playground/data/eval`` layout (and Video-LLaVA's ``GPT_Zero_Shot_QA``)."""

from __future__ import annotations

from .base import Benchmark, DataFile, Metric, Question
from .gqa import GQA
from .mmbench import MMBench, MMBenchCN
from .mme import MME
from .mmvet import MMVet
from .pope import POPE
from .scienceqa import ScienceQA
from .seed import SEED
from .shapes import Shapes
from .shapes2 import Shapes2
from .textvqa import TextVQA, TextVQANoOCR
from .videoqa import MSRVTT, MSVD, TGIF, ActivityNet
from .vizwiz import VizWiz
from .vqav2 import VQAv2TestDev, VQAv2Val

BENCHMARKS: dict[str, type[Benchmark]] = {b.name: b for b in (
    GQA, VQAv2TestDev, VQAv2Val, TextVQA, TextVQANoOCR, POPE, MME, ScienceQA, MMBench, MMBenchCN, MMVet, SEED, VizWiz,
    MSVD, MSRVTT, TGIF, ActivityNet, Shapes, Shapes2)}


def get_benchmark(name: str, data_root, **options) -> Benchmark:
    key = name.lower().replace("-", "_")
    if key not in BENCHMARKS:
        from llava.options import did_you_mean

        raise KeyError(f"unknown benchmark {name!r}{did_you_mean(key, BENCHMARKS)}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key](data_root, **options)


__all__ = ["BENCHMARKS", "get_benchmark", "Benchmark", "DataFile", "Metric", "Question"]
