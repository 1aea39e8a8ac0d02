"""The lmms-eval integration: ``plugin.py`` (the model ``vtprune``, registered through the entry point group
``lmms_eval.models``; it imports lmms-eval, so it is imported only by lmms-eval) and ``tasks/`` (local tasks
with their data, no download: ``python -m integrations.lmms_eval.tasks OUT_DIR [TASK] [N]``)."""
