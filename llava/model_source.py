"""Where a model name points, before anything is read: a name written as a path must be a checkpoint folder
(:func:`local_path_error`), and a hub id is read offline at once when the hub cannot be reached
(:func:`offline_if_hub_unreachable`). Used by :func:`llava.models.load`."""

from __future__ import annotations

import os
import sys

_HUB_CHECKED = False


def offline_if_hub_unreachable(name: str, timeout: float = 5.0) -> bool:
    """Before the first hub read of a process: when offline mode is not set and the hub does not answer one request
    (``timeout`` s, through the hub client's own session: proxies honoured), switch the process to offline mode
    (HF_HUB_OFFLINE=1, also for the processes it starts) with one warning line on stderr - the hub client would
    otherwise retry every file five times with two lines each (half a minute per file) before reading the cache.
    Returns whether it switched. Checked once per process."""
    global _HUB_CHECKED
    from huggingface_hub import constants

    if _HUB_CHECKED or constants.is_offline_mode():
        return False
    _HUB_CHECKED = True
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
        return False  # any answer, even an error status, is a reachable hub
    except Exception as e:  # DNS, refused, timeout, proxy: the hub cannot be reached
        why = f"{type(e).__name__}: {e}".strip().rstrip(":")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        print(f"warning: the Hugging Face hub ({constants.ENDPOINT}) cannot be reached ({why}): reading {name} from "
              "the local cache only (offline mode); set HF_HUB_OFFLINE=1 to skip this check", file=sys.stderr)
    return True


def local_path_error(name: str) -> str | None:
    """Why ``name`` cannot be a model when it is written as a path - absolute, ``./``, ``../`` or ``~``-relative,
    more than one ``/`` (a hub id has one at most), or an existing file - and is not a checkpoint folder: "no such
    directory: ..." / "not a directory: ..."; None for a directory or a hub id (``org/name``). Without this a
    missing folder reaches the hub client, whose complaint is about the form of a repository id."""
    path = os.path.expanduser(name)
    as_path = (name.startswith(("/", "./", "../", "~")) or name in (".", "..") or name.count("/") > 1
               or (os.sep != "/" and os.sep in name) or os.path.exists(path))
    if not as_path or os.path.isdir(path):
        return None
    if os.path.exists(path):
        return f"not a directory: {name} (a model is a checkpoint folder, a hub id, shape:<name> or tiny:<family>)"
    return f"no such directory: {name}"
