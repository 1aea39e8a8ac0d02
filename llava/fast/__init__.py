"""The fast path (batch-1 latency): ``load(..., fast=True)``'s planned, static-shape, captured prefill and decode.

The package by role (docs/fast-path.md):

- :mod:`llava.fast.path`: :class:`~llava.fast.path.FastPath` (``engine.fast``), the captured functions, the refusals;
- :mod:`llava.fast.plan`: the host plan of a prefill (buckets, the rows' gather and positions, dry-run counts);
- :mod:`llava.fast.vision`: the vision stage inside the captured functions (tower, signals, the selection);
- :mod:`llava.fast.llm`: the decoder segment by segment with the llm stages between, the prompt mask, decode;
- :mod:`llava.fast.probe`: the LLM probe of a vision stage (ConsensusDrop) inside the prefill;
- :mod:`llava.fast.attention`: the prompt's attention over its padded bucket as SDPA's causal kernel;
- :mod:`llava.fast.compile`: regional compile (each repeated layer once) and the compile cache folder;
- :mod:`llava.fast.precompile`: functions saved ahead of time and loaded by later processes;
- :mod:`llava.fast.graphs`: the ``cudagraphs`` backend (CUDA graphs of the uncompiled functions), Inductor's skips.

Importing the package imports none of them (``import llava`` stays light).
"""
