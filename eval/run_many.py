"""``python -m eval run-many``: the configs of a grid in one process (``LAUNCHER=inprocess``,
scripts/papers/_paper.sh), the model loaded once for the configs that load it alike.

One config a line on stdin: its label (the text of its progress line), then the arguments of ``python -m eval``
for it, shell-quoted, as scripts/eval/_launch.sh builds them::

    'pope fastv 64 tiny:llava' run pope --model tiny:llava --method fastv --budget 64 ... --launcher python

Each runs through :func:`eval.cli.main` as ``python -m eval run`` runs it in a process of its own: the same run
folder, run_config.json, results.json, resume and W&B run. Between configs :class:`ModelCache` stands in for
:func:`llava.models.load`: the same arguments get the runtime loaded before, as a load leaves it (the method
off, the unpruned one attached again where the model needs the engine, its ``info`` and the random state
after the load restored), so each config gives the answers it gives alone (tests/test_run_many.py). A failing
config is said and the grid goes on; after one the model is loaded afresh.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import random
import shlex
import sys
import traceback
from pathlib import Path
from typing import Callable


def add_parser(sub) -> None:
    p = sub.add_parser("run-many", help="the configs on stdin (one a line: label, then `eval run` arguments, "
                       "shell-quoted) in this process, the model loaded once (scripts: LAUNCHER=inprocess)")
    p.add_argument("--name", default="grid", help="the prefix of the failure lines (the paper's name)")
    p.add_argument("--total", type=int, default=None, help="N of the progress lines [i/N] (default: the lines read)")
    p.add_argument("--record", default=None, help="append '<exit status> <label>' here as each config ends "
                   "(a caller tells the configs a process that died never ran)")


def parse_lines(text: str) -> list[tuple[str, list[str]]]:
    """(label, argv) of each non-empty line; ValueError naming the line where one is not a ``run``."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            words = shlex.split(line)
        except ValueError as e:
            raise ValueError(f"stdin line {n}: {e}: {line!r}") from None
        if len(words) < 2 or words[1] != "run":
            raise ValueError(f"stdin line {n}: a label, then `run BENCH ...` (the arguments of python -m eval), "
                             f"got {line!r}")
        out.append((words[0], words[1:]))
    return out


def _rng_state() -> tuple:
    import numpy as np
    import torch

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    import numpy as np
    import torch

    py, npy, cpu, cuda = state
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class ModelCache:
    """:func:`llava.models.load` for a grid: the last runtime kept, handed out again for the same arguments as a
    fresh load would leave it; other arguments drop it first (one model in memory at a time)."""

    def __init__(self, load):
        self.real = load
        self.key: str | None = None
        self.rt = None
        self.info: dict = {}
        self.rng: tuple = ()
        self.loads = 0  # real loads (the tests count them)

    def __call__(self, name, **kwargs):
        key = repr((name, sorted(kwargs.items())))
        if key == self.key:
            rt = self.rt
            rt.unprune()  # the method off; "none" attached again where load attached it
            rt.info = copy.deepcopy(self.info)
            _set_rng_state(self.rng)  # as right after the load (tiny models seed torch to build their weights)
            return rt
        self.drop()
        rt = self.real(name, **kwargs)
        self.key, self.rt, self.info, self.rng = key, rt, copy.deepcopy(rt.info), _rng_state()
        self.loads += 1
        return rt

    def drop(self) -> None:
        """Forget the runtime (after a failing config, or before another model): the next load is a real one."""
        if self.rt is None:
            return
        self.key = self.rt = None
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def installed(self):
        """``llava.models.load`` is this cache while the grid runs (eval.runner imports it when it loads)."""
        import llava.models as models

        models.load = self
        try:
            yield self
        finally:
            models.load = self.real
            self.drop()


def run_one(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """One config as ``python -m eval`` (``main``: :func:`eval.cli.main`) runs it; a bug's traceback or an exit is
    its status, never the grid's."""
    if "torch._dynamo" in sys.modules:  # the fast path: every config compiles afresh, as in its own process
        sys.modules["torch._dynamo"].reset()
    try:
        return main(argv)
    except SystemExit as e:  # argparse's exit 2 on a bad flag
        return e.code if isinstance(e.code, int) else 1
    except Exception:  # noqa: BLE001 - a bug in one config: its traceback, and the grid goes on
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def run_many(args, main: Callable[[list[str]], int], interrupted: int) -> int:
    """``python -m eval run-many``: every config on stdin through ``main`` (:func:`eval.cli.main`), in order; exit 1
    when one failed, ``interrupted`` (a config's status on Ctrl-C) when one was stopped."""
    import llava.models as models

    try:
        configs = parse_lines(sys.stdin.read())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = args.total or len(configs)
    failed = 0
    with ModelCache(models.load).installed() as cache:
        for i, (label, argv) in enumerate(configs, 1):
            print(f"[{i}/{total}] {label}", flush=True)
            code = run_one(main, argv)
            if args.record:
                with Path(args.record).open("a", encoding="utf-8") as f:
                    f.write(f"{code} {label}\n")
            if code == interrupted:
                return interrupted
            if code:
                failed += 1
                cache.drop()
                print(f"{args.name}: failed: {label} (the grid goes on; rerun the script to resume it)",
                      file=sys.stderr, flush=True)
        loads = cache.loads
    print(f"{args.name}: {len(configs)} config{'' if len(configs) == 1 else 's'} in one process, "
          f"{loads} model load{'' if loads == 1 else 's'}", flush=True)
    return 1 if failed else 0
