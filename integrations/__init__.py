"""Integrations with other engines and harnesses: :mod:`integrations.vllm`, the vLLM plugin (pruning inside
the engine users serve with); :mod:`integrations.lmms_eval`, the lmms-eval model plugin (``vtprune``) and its
local tasks. Each imports its host (vLLM, lmms-eval) and is never imported by the engine or the harness."""
