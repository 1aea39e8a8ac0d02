"""Small file helpers: JSON lines that survive a killed writer, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file; a garbled / truncated one raises ValueError naming ``path:line``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write atomically (temp file + rename), so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_jsonl(path: str | os.PathLike, strict: bool = True) -> list[dict]:
    """All records of a JSON-lines file. ``strict=False`` skips lines that do not parse (a
    writer killed mid-line leaves at most one such line, the last)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if strict:
                    raise ValueError(f"{path}:{n}: not a JSON line (garbled or truncated): {line[:120]!r}") from None
    return out


def complete_jsonl_records(path: str | os.PathLike) -> Iterator[dict]:
    """Records of newline-terminated, parseable lines only (an unterminated tail is an
    interrupted write and does not count)."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n")
    if end < 0:
        return
    for line in data[: end + 1].split(b"\n"):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line in the middle (should not happen with append + flush)


def repair_jsonl_tail(path: str | os.PathLike) -> int:
    """Cut an unterminated last line (a write interrupted by a kill) so appending starts on a
    fresh line. Returns the number of bytes removed."""
    if not os.path.exists(path):
        return 0
    size = os.path.getsize(path)
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(0)
        data = f.read()
        if data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
        return size - keep


class JsonlAppender:
    """Append records to a JSON-lines file; ``flush()`` pushes them to disk (fsync)."""

    def __init__(self, path: str | os.PathLike, fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_jsonl_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")
        self.fsync = fsync

    def write(self, records: Iterable[dict]) -> None:
        # one write call per batch: a kill leaves whole lines plus at most one torn last line
        text = "".join(json.dumps(r) + "\n" for r in records)
        if text:
            self._f.write(text)

    def flush(self) -> None:
        self._f.flush()
        if self.fsync:
            try:
                os.fsync(self._f.fileno())
            except OSError:
                pass

    def close(self) -> None:
        if not self._f.closed:
            self.flush()
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class NullAppender(JsonlAppender):
    """A :class:`JsonlAppender` that writes nothing (a tensor-parallel group's ranks other than its writer)."""

    def __init__(self):
        pass

    def write(self, records: Iterable[dict]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return path
