"""Parity with the official code itself (``python -m parity``, docs/parity.md): the official LLaVA codebase
(``llava-torch`` 1.2.2.post1) and FlowCut's package (``flowcut`` 1.0.2), installed in ``.venv-official`` by
``scripts/official_env.sh``, run beside ours on the same tiny random weights, prompts, images and answer files.

- :mod:`parity.build`: the weights in the official layout and, by our mapping (``official_to_hf``), in the
  transformers 5 layout we load; the tokenizer; the images.
- :mod:`parity.official_worker`: the official side, a script run by ``.venv-official``'s Python from an empty folder
  (both packages are named ``llava``, and they need different transformers releases: two processes, files between).
- :mod:`parity.llava15`: prompts, ids, pixels, logits, greedy tokens and FlowCut's kept patches per CLIP layer.
- :mod:`parity.next`: the same on LLaVA-NeXT (anyres, spatial_unpad; FlowCut's official NeXT recipe with its LLM
  stage), our side with transformers' anyres geometry (``stock``, ``llava.load``'s default) and with the official
  one (``official``, ``load(next_geometry="official")``: the two traced differences fixed in our runtime).
- :mod:`parity.scorers`: the official ``llava/eval`` scorers vs ours on the same answer files.
- :mod:`parity.jobs`: the official processes' jobs and the one runner every part shares (``--jobs N``, resume).
- :mod:`parity.step_logits`: each decode step's top-2 logits, recorded on both sides.
- :mod:`parity.differ`: what a differing row says about itself (the first differing step, the one-ulp tie rule, the
  replay's verdict).
- :mod:`parity.report`: the checks and their table.
"""
