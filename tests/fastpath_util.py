"""Shared pieces of the fast-path tests (tests/test_fastpath*.py): prompts, inputs per family, greedy
generation with the first step's scores, the fast == eager check and a fast path whose captured function
runs uncompiled with its host syncs counted."""

import os

import torch
from conftest import QUESTIONS, rand_image

from llava.check.fast import assert_same_as_eager, generate  # noqa: F401 (fast == eager: shared with llava.check)
from llava.families.base import sample_units
from llava.fast.path import FastPath
from llava.syncs import SyncCounter



def per_prompt(units):
    """Each image / video's :func:`sample_units` when prompt b holds image / video b (the captured plan's samples)."""
    out, t0 = [], 0
    for n in units.sizes:
        out.append(sample_units(units, torch.arange(t0, t0 + n)))
        t0 += n
    return out


PROMPTS = QUESTIONS + ["describe the picture in every detail you can see, please"]
#: more questions of other lengths (the graph tests pick those the host plan puts in one bucket)
MORE_PROMPTS = PROMPTS + ["is it red?", "what is next to the square?", "is there a small blue star near the top?",
                          "how many circles are on the right side of the picture?"]
#: FAST_BACKEND=inductor (scripts/bench/fast_path_check.sh) compiles with code generation: much slower
BACKEND = os.environ.get("FAST_BACKEND", "auto")
#: LLaVA-1.5 prompts checked one at a time per method, besides the batch of 3 (3 prompts of different
#: lengths, left-padded). The suite checks the batch only (CI time; batch 1 == eager is checked by the
#: graph tests on 5 methods and by the piecewise tests); scripts/bench/fast_path_check.sh all three alone.
SINGLES = (0, 1, 2) if os.environ.get("FAST_FULL") == "1" else ()


#: LLaVA-NeXT / Video-LLaVA token tests: dynamo traces the cases a file marks (the family's own plan - crops,
#: newlines, frames - inside a compiled prefill); its other methods run the same static-shape functions
#: uncompiled (fast_backend "none": the host plan, the bucket, path == "fast", tokens, scores and counts are all
#: checked; each method's dynamo capture is its LLaVA-1.5 test). CI time. FAST_FULL=1
#: (scripts/bench/fast_path_check.sh) or an explicit FAST_BACKEND traces every case.
TRACE_EVERY_FAMILY_CASE = os.environ.get("FAST_FULL") == "1" or "FAST_BACKEND" in os.environ


def prune_family(rt, method, budget, traced: bool, **opts):
    """``rt.prune`` on a family test's fast runtime: compiled with its backend when ``traced`` (or
    :data:`TRACE_EVERY_FAMILY_CASE`), else the same fast path uncompiled (backend "none")."""
    saved = rt.fast
    if not (traced or TRACE_EVERY_FAMILY_CASE):
        rt.fast = {**saved, "backend": "none"}
    try:
        return rt.prune(method, budget, **opts)
    finally:
        rt.fast = saved


def inputs(rt, i, n=1):
    """n prompts from PROMPTS[i] on, each with its own image size."""
    return rt.processor([PROMPTS[(i + j) % len(PROMPTS)] for j in range(n)],
                        [rand_image(i + j, 40 + 10 * j, 56) for j in range(n)])


def fast_and_eager(name: str, backend: str = BACKEND) -> tuple:
    """The tiny model ``name`` twice (seed 1): on the fast path (16 new tokens, ``backend``) and on the eager engine."""
    from llava.models import load

    return (load(f"tiny:{name}", seed=1, fast=True, fast_max_new_tokens=16, fast_backend=backend),
            load(f"tiny:{name}", seed=1))


def sized_inputs(rt, sizes, first=1):
    """One prompt per (h, w) in ``sizes``, from PROMPTS[first] on, image j of that size (seed j)."""
    return rt.processor([PROMPTS[(first + j) % len(PROMPTS)] for j in range(len(sizes))],
                        [rand_image(j, h, w) for j, (h, w) in enumerate(sizes)])


def family_batch(rt, family, video=None):
    """Three prompts of different lengths in one batch: images of three sizes (LLaVA-NeXT: three crop
    grids / unpadded layouts), or three 8-frame videos (``video``, default for Video-LLaVA)."""
    qs = PROMPTS[1:4]
    if video if video is not None else family == "video_llava":
        return rt.processor(qs, videos=[[rand_image(8 * j + k) for k in range(8)] for j in range(3)])
    return rt.processor(qs, [rand_image(0, 40, 56), rand_image(1, 90, 30), rand_image(2, 60, 60)])


def counting_fast_path(eng, names=("_prefill",)):
    """A fast path of ``eng`` whose captured functions (``names``; a piecewise prefill: ``_vision`` and ``_llm``)
    run uncompiled (``backend="none"``: the same code with ``sig.captured``, no compile time), and the list their
    calls append their host syncs to, uploads of host data included (``SyncCounter.uploads``: a CUDA graph of the
    function, ``fast_backend="cudagraphs"``, cannot record one either). A one-graph prefill's tower function
    (``_tower``, run before the rest of the plan) is counted with the ``_prefill`` call that follows it: one entry
    per prefill."""
    fp = FastPath(eng.env, backend="none", max_new_tokens=16)
    syncs, pending = [], []

    def count(fn, *a, **k):
        with SyncCounter() as c:
            out = fn(*a, **k)
        return out, c.total + sum(c.uploads.values())

    for name in names:
        inner = getattr(fp, name)

        def counted(*a, _inner=inner, **k):
            out, n = count(_inner, *a, **k)
            syncs.append(n + sum(pending))
            pending.clear()
            return out

        setattr(fp, name, counted)
    if "_prefill" in names:
        tower = fp._tower

        def tower_counted(*a, **k):
            out, n = count(tower, *a, **k)
            pending.append(n)
            return out

        fp._tower = tower_counted
    return fp, syncs


def plan_buckets(eng, batch) -> list:
    """The bucket of every segment the fast path's host plan picks for ``batch`` (no device work): the graph tests
    pick prompts of other lengths that stay in the first prompt's buckets."""
    visual = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
    return [seg.width for seg in eng.fast.planner.plan(batch["input_ids"], batch["attention_mask"], visual)[2].segments]


def assert_one_graph_per_bucket(fast, eager, eng, first, candidates, tokens=16):
    """The first prompt compiles its graphs (tokens == eager); then two of ``candidates`` - prompts of another length
    that the host plan puts in the first one's buckets - and ``tokens`` decode steps each compile nothing
    (recompilation raises), with the first one's segment lengths and tokens == eager."""
    assert torch.equal(generate(fast, first, tokens)[0], generate(eager, first, tokens)[0])
    assert eng.stats.path == "fast" and eng.stats.new_graph
    lens = eng.stats.seq_len_per_layer
    others = [b for b in candidates if b["input_ids"].shape[1] != first["input_ids"].shape[1]
              and plan_buckets(eng, b) == plan_buckets(eng, first)]
    assert len(others) >= 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in others[:2]:
            toks = generate(fast, batch, tokens)[0]
            assert eng.stats.path == "fast" and not eng.stats.new_graph and eng.stats.seq_len_per_layer == lens
            assert torch.equal(toks, generate(eager, batch, tokens)[0])
