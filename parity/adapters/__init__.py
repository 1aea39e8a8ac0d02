"""One adapter per official repository that ``python -m parity`` can run beside ours (docs/parity.md).

An adapter is one module here, ``parity/adapters/<name>.py``, with two halves:

- **the official side**, run by ``parity/official_worker.py`` inside ``.venv-official`` (the module is loaded there by
  its file path, with nothing else of this repository importable, so it imports only the standard library at module
  level and the official code inside its functions):

  - ``enable(model, method)``: switch the method on the loaded official model as the repository's README / eval
    scripts do (``method`` holds ``budget`` and the adapter's ``official`` options);
  - ``record(model, store) -> handles``: hooks that append ``(stage, kept indices)`` to ``store`` where the official
    code holds them (``stage``: e.g. ``1`` for CLIP layer 1, ``"llm2"`` for decoder layer 2; indices a tensor of
    ``(samples, kept)``, ascending), returned so the worker removes them after the run;
  - optional ``OFFICIAL = {"padding_side": "right", "alone": True}`` when the official code cannot run a left-padded
    batch (``alone``: each image alone, on both sides); ``"worker": "hf"`` when the official code is transformers' own
    Llava classes in a fork of transformers (IVC-Prune): ``parity/official_worker_hf.py`` runs it in the Qwen official
    environment with the clone's ``transformers`` first on the path, on our ids and pixels, and calls ``enable``,
    ``inputs(model, input_ids, image_token_id)``, ``record`` and ``disable(model)``;
  - optional ``before_import()``: called before the official side imports ``llava`` (a bridge from a fork written
    for an older transformers to this environment's, e.g. a config name registered twice);
  - optional ``before_load(method)``: called before the official builder loads the model (switches the official
    code reads at load time: environment variables, class attributes); an environment variable the official side
    reads from the caller (SparseVLM's ``USE_VERSION``) belongs in ``parity.jobs.ENVIRON``, so that a job run under
    another value is not resumed;
  - optional ``inputs(model, tokenizer, cases, prompts, input_ids) -> dict``: keyword arguments the method's own
    eval script passes to ``model(...)`` and ``generate(...)`` besides LLaVA's (e.g. the question's text).

- **our side**:

  - ``ours(budget[, dtype][, info]) -> (method, options)``: our registered method and the options that reproduce the
    official code (its reference mode, ``numerics="official"`` where the method has one); with a ``dtype`` parameter
    it gets the precision ("fp32" / "fp16"), with ``info`` the built folders (``parity.build.build``'s paths: e.g.
    CDPruner's CLIP model is the tiny ``clip/`` folder); ``options["budget"]`` replaces the budget (None: an adaptive method);
  - optional ``DTYPES = ("fp16",)``: the precisions the official code can run in (the others are skipped, said on
    stderr);
  - optional ``OURS_LOAD = {"fp16": {...}}``: options of ``llava.load`` for a precision (a fork that casts the
    tower to fp16: ``vision_dtype=None``);
  - ``record_ours(rt, store) -> finish``: called before our prefill; appends the same ``(stage, indices)`` entries
    (by wrapping the method instance, or in ``finish()``, called after the prefill, from ``rt.engine.selections``).

LLaVA-NeXT (``python -m parity next --method <name>``, ``parity/next.py``), optional, for an adapter whose official
code has a NeXT path:

- ``NEXT = True``: the adapter runs on NeXT too: its official half unchanged (``enable`` / ``record`` on the
  official ``llava-v1.6-tiny``; ``record``'s entries hold one row per crop, the crops of the batch's images in
  order, where the official code keeps its indices per crop, e.g. the Theia forks' ``index_masks``), ours on
  ``llava.load(..., next_geometry="official")``;
- ``NEXT_BUDGETS``: the budgets compared, per crop as the papers count NeXT;
- optional ``NEXT_LOAD``: options of ``llava.load`` for the official NeXT recipe (e.g. ``{"next_layout":
  "spatial"}`` where the official code packs each crop's kept tokens without unpad or newlines);
- optional ``ours_next(budget, dtype) -> (method, options)``: our options for the official NeXT recipe (default:
  ``ours``);
- optional ``next_runtime(rt)``: called once after our load, to change our runtime where the official NeXT recipe
  needs it (VisPruner's fork fixes every image's grid at 2 x 2: our pinpoints set to that one resolution);
- optional ``record_ours_next(rt, store) -> finish``: our entries in the layout of ``record`` (default:
  ``parity.next.record_vision_per_crop``, the vision stage's kept patches per crop as ``("vision", (crops, k))``).

Qwen2.5-VL (``python -m parity qwen --method <name>``, ``parity/qwen.py``), optional, for an adapter whose official
code has a Qwen2.5-VL path (run by ``parity/official_worker_qwen.py`` in ``.venv-official-qwen``, transformers 4.52.4):

- ``QWEN = True`` and ``QWEN_BUDGETS`` (in the method's own unit: MMTok's retain ratio);
- the official side: ``qwen_before_import(clone)`` (shims, before the official code is imported; the clone is first on
  the path), ``qwen_enable(model, processor, method)`` (the switch on a freshly loaded model and processor),
  ``qwen_record(model, store) -> handles`` (one entry per prefill: a dict with ``kept`` (ascending indices) and the
  rows the selection read, ``features`` / ``vision`` / ``text``, fp32 copies, reported);
- ours: ``ours_qwen(budget, dtype, rt) -> (method, budget, options)``, ``record_ours_qwen(rt, store) -> finish`` (the
  same entries from our signals), optional ``qwen_replay(entry) -> kept`` (our selection on the official side's
  recorded rows: the method's arithmetic separated from the tower's).

A pre-tower stage's keep rule (``python -m parity pixels``, parity/pixels.py) is an adapter of its own kind, with
``PART = "pixels"``: its official function (``official_keep``) and the option sets it compares (``CONFIGS``); the
model-level registry (:func:`names`) leaves it out, and scripts/official_clones.sh clones it like the others.

Module constants: ``REPOSITORY`` (owner/name on GitHub), ``COMMIT`` (the commit the adapter was written and run
against), ``PACKAGES`` (the top-level folders a clone must hold; the official side puts the clone first on its path,
so its ``llava/`` replaces the installed llava-torch), ``INSTALLED`` (True when ``.venv-official`` already holds the
code: FlowCut's package is on the package index, so its adapter runs without a clone), optional ``ROOT`` (the folder
inside the clone that holds ``llava/``, for a repository that keeps its LLaVA tree in a subfolder, e.g. ``LLaVA``).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent


def part_of(p: Path) -> str:
    """The part of ``python -m parity`` an adapter file serves: its module constant ``PART`` (read without importing
    it), "llava15" where it has none (the model-level adapters of llava15 / next / qwen)."""
    for node in ast.parse(p.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "PART" for t in node.targets):
            return ast.literal_eval(node.value)
    return "llava15"


def names(part: str = "llava15") -> list[str]:
    """Every adapter of ``part``, by name (the file names here, ``_``-prefixed helpers left out): "llava15", the
    model-level adapters (both halves, above); "pixels", a pre-tower stage's keep rule (parity/pixels.py)."""
    return sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_") and part_of(p) == part)


def path(name: str) -> Path:
    return HERE / f"{name}.py"


def get(name: str) -> ModuleType:
    if name not in names():
        raise ValueError(f"no parity adapter for {name!r} (adapters: {', '.join(names())}; docs/parity.md)")
    return importlib.import_module(f"{__name__}.{name}")


def official_root(name: str, clone: str | Path) -> str:
    """The folder of ``clone`` the official side puts first on its path (the clone, or its ``ROOT`` subfolder)."""
    return str(Path(clone) / getattr(get(name), "ROOT", ""))


def clone_problem(name: str, root: str | Path | None) -> str | None:
    """Why ``root`` cannot serve as adapter ``name``'s clone (None: it can, or none is needed)."""
    mod = get(name)
    if root is None:
        return None if mod.INSTALLED else (
            f"{name} needs a clone of {mod.REPOSITORY} (bash scripts/official_clones.sh {name}, then "
            f"--official-path .official/{name})")
    root = Path(root) / getattr(mod, "ROOT", "")
    missing = [p for p in mod.PACKAGES if not (root / p).is_dir()]
    if missing:
        return f"--official-path {root} has no {' or '.join(p + '/' for p in missing)} folder ({mod.REPOSITORY} does)"
    return None
