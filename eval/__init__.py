"""Evaluation harness: LLaVA's benchmark protocols on the pruning engine.

Benchmarks (``eval.benchmarks``) read LLaVA's ``playground/data/eval`` layout; ``eval.scorers``
ports the official scoring scripts; ``eval.runner`` shards inference over processes started by
torchrun or the deepspeed launcher (resumable, exactly-once merge: the run's configuration in
``eval.run_config``, its folder in ``eval.run_folder``, shard files in ``eval.shards``, the answering
loops in ``eval.hf_backend`` / ``eval.vllm_backend``); ``eval.results`` writes the results JSON;
``eval.table`` renders paper tables; ``eval.wandb_log`` logs to Weights & Biases without ever failing
a run; ``eval.judge`` grades MM-Vet / video QA with any OpenAI-compatible
endpoint. Command line: ``python -m eval --help``; guide: docs/evaluation.md.
"""
