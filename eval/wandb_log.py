"""Weights & Biases logging that can never fail or hang a run.

* ``--no-wandb`` (or ``WANDB_MODE=disabled``): wandb is not even imported.
* ``WANDB_MODE`` is honoured (``online`` / ``offline`` / ``disabled``); when it is not set, the run
  is online if an API key is available (``WANDB_API_KEY`` or a ``wandb login`` netrc entry),
  offline otherwise (``wandb sync`` uploads it later).
* Every call is wrapped: an exception is logged once as a warning and the logger turns itself
  off; ``init`` and ``finish`` run in a daemon thread with a hard timeout.
"""

from __future__ import annotations

import logging
import netrc
import os
import threading
from typing import Any

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        auth = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
        return bool(auth and auth[2])
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(enabled: bool = True) -> str:
    if not enabled:
        return "disabled"
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("disabled", "offline", "online"):
        return mode
    if mode in ("dryrun",):
        return "offline"
    return "online" if _has_api_key() else "offline"


def _run_with_timeout(fn, timeout: float):
    """Run ``fn`` in a daemon thread; return (finished, result, exception)."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True, name="wandb-call")
    t.start()
    t.join(timeout)
    if t.is_alive():
        return False, None, None
    return True, box.get("result"), box.get("error")


class WandbLogger:
    def __init__(self, enabled: bool = True, project: str | None = None, entity: str | None = None,
                 name: str | None = None, group: str | None = None, tags: list[str] | None = None,
                 config: dict | None = None, dir: str | None = None, init_timeout: float = 90.0,
                 job_type: str = "eval", hard_timeout: float | None = None):
        self.mode = resolve_mode(enabled)
        self.run = None
        self.wandb = None
        self.error: str | None = None
        self.hung = False
        if self.mode == "disabled":
            return
        try:
            import wandb
        except Exception as e:  # noqa: BLE001 - not installed or broken: run without it
            self._fail("import", e)
            return
        self.wandb = wandb

        def _init():
            settings = wandb.Settings(init_timeout=init_timeout, silent=True)
            return wandb.init(project=project or os.environ.get("WANDB_PROJECT", "vtprune-eval"), entity=entity,
                              name=name, group=group, tags=tags, config=config or {}, dir=dir, mode=self.mode,
                              job_type=job_type, reinit="finish_previous", settings=settings)

        limit = hard_timeout if hard_timeout is not None else init_timeout + 30
        done, run, err = _run_with_timeout(_init, limit)
        if not done:
            self.hung = True
            self._fail("init", TimeoutError(f"wandb.init did not return within {limit:.0f}s"))
        elif err is not None:
            self._fail("init", err)
        else:
            self.run = run

    # ------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.run is not None

    def _fail(self, what: str, e: BaseException) -> None:
        self.error = f"{what}: {type(e).__name__}: {e}"
        log.warning("W&B %s failed (the run continues without W&B): %s", what, e)
        self.run = None

    def _call(self, what: str, fn):
        if self.run is None:
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            self._fail(what, e)
            return None

    def log(self, data: dict, step: int | None = None) -> None:
        self._call("log", lambda: self.run.log(data, step=step))

    def summary(self, data: dict) -> None:
        def _set():
            for k, v in data.items():
                self.run.summary[k] = v

        self._call("summary", _set)

    def config_update(self, data: dict) -> None:
        self._call("config", lambda: self.run.config.update(data, allow_val_change=True))

    def table(self, key: str, columns: list[str], rows: list[list], image_columns: tuple[str, ...] = ()) -> None:
        def _table():
            wb = self.wandb
            img_idx = {columns.index(c) for c in image_columns if c in columns}
            data = []
            for r in rows:
                data.append([wb.Image(v) if (i in img_idx and v is not None) else v for i, v in enumerate(r)])
            self.run.log({key: wb.Table(columns=columns, data=data)})

        self._call("table", _table)

    def info(self) -> dict:
        out = {"mode": self.mode}
        if self.error:
            out["error"] = self.error
        if self.run is not None:
            for k in ("id", "name", "project", "url", "dir"):
                try:
                    v = getattr(self.run, k)
                    out[k] = v if isinstance(v, (str, int, float)) or v is None else str(v)
                except Exception:  # noqa: BLE001
                    pass
        return out

    def finish(self, timeout: float = 120.0) -> bool:
        """Finish the run; False if it failed or did not return in ``timeout`` seconds (the caller
        may then exit with os._exit so a stuck upload cannot hold the process)."""
        if self.run is None:
            return not self.hung
        run = self.run
        self.run = None
        done, _, err = _run_with_timeout(lambda: run.finish(), timeout)
        if not done:
            self.hung = True
            log.warning("W&B finish did not return within %.0fs; continuing without waiting", timeout)
            return False
        if err is not None:
            log.warning("W&B finish failed: %s", err)
            return False
        return True
