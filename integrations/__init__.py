"""Integrations with other engines and harnesses: :mod:`integrations.vllm`, the vLLM plugin (pruning inside
the engine users serve with). The lmms-eval plugin (``eval/lmms_plugin.py``) is to move here with the
``eval/`` restructuring (issue 35)."""
