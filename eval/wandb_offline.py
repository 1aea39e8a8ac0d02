"""Reading an offline W&B run back from its files, without syncing it (the tests; a look at a run): the
``run-<id>.wandb`` transaction log (LevelDB-log blocks of protobuf records) and the table files next to it.
:func:`read_offline_run` is re-exported by :mod:`eval.wandb_log`."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

_BLOCK = 32768
_HEADER = 7  # the .wandb file: ":W&B" + magic 0xBEE1 + version, then LevelDB-log blocks of 32 KiB


def _records(path) -> list[bytes]:
    data = Path(path).read_bytes()
    if len(data) < _HEADER:  # just created: nothing written yet
        return []
    ident, magic, _version = struct.unpack("<4sHB", data[:_HEADER])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a .wandb transaction log")
    out, buf, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer: zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        if len(chunk) < length:  # the tail of a record still being written
            break
        pos += _HEADER + length
        if kind == 1:  # full
            out.append(chunk)
        elif kind == 2:  # first
            buf = chunk
        elif kind == 3:  # middle
            buf += chunk
        elif kind == 4:  # last
            out.append(buf + chunk)
            buf = b""
    return out


def _set_nested(d: dict, keys: list[str], value) -> None:
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def _item_key(item) -> list[str]:
    return list(item.nested_key) if len(item.nested_key) else [item.key]


def find_offline_run(path) -> Path:
    """The newest ``offline-run-*`` directory under ``path`` (a harness run folder, its ``wandb/``, or
    the offline run directory itself)."""
    p = Path(path)
    if p.name.startswith(("offline-run-", "run-")) and p.is_dir():
        return p
    cands = sorted(p.glob("offline-run-*")) or sorted(p.glob("wandb/offline-run-*"))
    if not cands:
        raise FileNotFoundError(f"no offline W&B run under {p}")
    return cands[-1]


def read_offline_run(path, wait: float = 15.0) -> dict:
    """An offline run read back from its ``run-<id>.wandb`` file (and the table files next to it):
    ``{"run": {id, name, group, job_type, tags, project}, "config": {...}, "summary": {...},
    "history": [{...} per step], "tables": {key: {"columns": [...], "data": [[...]]}}, "charts": {key:
    custom-chart spec}, "files": [...], "finished": bool}``. W&B's service may still be writing the file
    when ``finish`` has returned: it is read again until it holds the run's exit record and no half-written
    record (up to ``wait`` s)."""
    import time

    from wandb.proto import wandb_internal_pb2 as pb

    d = find_offline_run(path)
    (wfile,) = list(d.glob("run-*.wandb"))[:1] or [None]
    if wfile is None:
        raise FileNotFoundError(f"no run-*.wandb in {d}")
    deadline = time.monotonic() + wait
    from google.protobuf.message import DecodeError

    while True:
        records, torn = [], None
        for raw in _records(wfile):
            rec = pb.Record()
            try:
                rec.ParseFromString(raw)
            except DecodeError as e:  # a record the service is still writing: read the file again
                torn = e
                break
            records.append(rec)
        finished = torn is None and any(r.WhichOneof("record_type") == "exit" for r in records)
        if finished or time.monotonic() > deadline:
            if torn is not None:
                raise RuntimeError(f"{wfile}: a record still unreadable after {wait:.0f} s ({torn})") from torn
            break
        time.sleep(0.2)
    out: dict[str, Any] = {"dir": str(d), "run": {}, "config": {}, "summary": {}, "history": [], "tables": {},
                           "charts": {}, "files": [], "finished": finished}

    def _config(cfg_record):
        for it in cfg_record.update:
            _set_nested(out["config"], _item_key(it), json.loads(it.value_json))

    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out["run"] = {"id": r.run_id, "name": r.display_name, "group": r.run_group, "job_type": r.job_type,
                          "tags": list(r.tags), "project": r.project}
            _config(r.config)
        elif kind == "config":
            _config(rec.config)
        elif kind == "summary":
            for it in rec.summary.update:
                _set_nested(out["summary"], _item_key(it), json.loads(it.value_json))
        elif kind == "history":
            row: dict = {}
            for it in rec.history.item:
                _set_nested(row, _item_key(it), json.loads(it.value_json))
            out["history"].append(row)
        elif kind == "files":
            out["files"] += [f.path for f in rec.files.files]
    wb_cfg = out["config"].pop("_wandb", None)
    out["charts"] = dict((wb_cfg or {}).get("visualize") or {}) if isinstance(wb_cfg, dict) else {}
    files_dir = d / "files"
    for k, v in list(out["summary"].items()):
        if isinstance(v, dict) and v.get("_type") in ("table-file", "table") and v.get("path"):
            t = json.loads((files_dir / v["path"]).read_text())
            out["tables"][k] = {"columns": t["columns"], "data": t["data"]}
    return out
