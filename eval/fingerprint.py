"""What a run's answers were produced under, so a resume or a merge never mixes answers of other
data, another prompt, another model or another method.

``run_config.json`` holds ``fingerprint``:

- ``data``: sha256 of every inference file of the benchmark (the question file's bytes), a hash
  of the question list as loaded (after ``--limit``), and the image / video set (sorted relative
  paths + sizes of the files the questions reference; cheap, no image bytes are read). Not run-wide:
  a resume says what changed here, and decides per answer (below);
- ``template``: the conversation template (name + its text);
- ``model``: the id, plus the hub revision (commit) where there is one, a listing of a local
  folder (config.json hash; each weight file's name, size and a hash of its size + first and last
  MiB; the index file's hash), or the seed of a ``tiny:`` / ``shape:`` model (random weights);
- ``method``: method, budget, options as given and the method's resolved config;
- ``dtype``;
- ``fast`` (runs with ``--fast`` only): the fast path's backend as resolved on the device, CUDA graphs or
  not, and the static cache's decode slots (the fast path changes the logits in the last bits, like a dtype);
- ``code``: the git commit (a change only warns: answers of the same configuration under a
  newer commit are kept, and ``code_versions`` in run_config.json lists every commit that wrote
  answers).

Every answer record carries ``_eval.qhash``, the hash of its own question (id, text, prompt,
image / video path relative to the data root, extra fields), and ``_eval.inputs``, the content hash
of each input it read (``{relative path: [stat, sha256]}``: an image or video file's bytes, a frame
folder's files; an image embedded in the question file as ``<inline>``), taken when it was answered.
The prompt after templating is the question's text under the run's template, which is run-wide.

A resume keeps every answer whose question and inputs are unchanged and recomputes the
others; only run-wide changes (model, method and options, budget, dtype, template, fast path) refuse
it. :class:`InputHasher` caches content hashes by (path, size + mtime), seeded from the answers
themselves, so re-checking the answers of a 100k-image benchmark costs a ``stat`` per file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

#: files bigger than this are fingerprinted by size only (hashing them would cost minutes)
HASH_LIMIT = 1 << 30


def _sha(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sample_sha256(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """sha256 of a file's size, first and last ``block`` bytes: a cheap weights fingerprint (another
    checkpoint of the same architecture has the same sizes but other values right after the header)."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(block))
        if size > block:
            f.seek(max(block, size - block))
            h.update(f.read(block))
    return h.hexdigest()[:16]


def _rel(p: Any, root: str | os.PathLike | None) -> Any:
    if not isinstance(p, str):
        return None if p is None else "<inline>"  # an image embedded in the question file (its hash covers it)
    if root is not None:
        try:
            return os.path.relpath(p, root)
        except ValueError:
            return p
    return p


def content_digest(path: str | os.PathLike) -> str:
    """sha256 (16 hex) of a file's bytes; a folder (video frames): of its files' names and digests; a
    file above :data:`HASH_LIMIT`: of its size and first / last MiB (``sample:`` prefix)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(e.name for e in os.scandir(path) if e.is_file())
        return _sha(_json([[n, content_digest(os.path.join(path, n))] for n in files]))[:16]
    if os.path.getsize(path) > HASH_LIMIT:
        return "sample:" + sample_sha256(path)
    return sha256_file(path)[:16]


def stat_key(path: str | os.PathLike) -> str | None:
    """What must be unchanged for a cached content hash to stand: a file's size and mtime (ns); a
    folder's file names, sizes and mtimes (hashed); None when the path does not exist."""
    path = os.fspath(path)
    try:
        if os.path.isdir(path):
            ents = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path) if e.is_file())
            return "dir:" + _sha(_json(ents))[:16]
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return None


#: the key of an image embedded in the question file (MMBench's base64 column, a generated testbed image)
INLINE = "<inline>"


def inline_digest(image) -> str | None:
    """Content hash of an image that is not a file: an object with ``digest`` (the question file's
    encoded bytes), or a PIL image (its pixels); None for other callables (the question file's hash covers
    them, run-wide)."""
    d = getattr(image, "digest", None)
    if isinstance(d, str):
        return d
    if hasattr(image, "tobytes") and hasattr(image, "mode"):
        return _sha(f"{image.mode}:{image.size}".encode() + image.tobytes())[:16]
    return None


class InputHasher:
    """Content hashes of the files the questions read, cached by (path relative to the data root, stat).

    ``cache_file`` (a JSON-lines file in the run folder, appended to) keeps hashes computed for a check across
    sessions; :meth:`seed` adds those recorded in the answers. A changed size or mtime means the file is
    read again; the same bytes under a new mtime (a copy, a re-download) still match."""

    def __init__(self, root: str | os.PathLike | None, cache_file: str | os.PathLike | None = None):
        self.root = root
        self.cache_file = None if cache_file is None else Path(cache_file)
        self._cache: dict[tuple[str, str], str] = {}
        self.hashed = 0  # files read this session (the rest were cache hits)
        if self.cache_file is not None and self.cache_file.exists():
            from .io import complete_jsonl_records

            for r in complete_jsonl_records(self.cache_file):
                self._cache[(r["path"], r["stat"])] = r["sha256"]

    def seed(self, inputs: dict | None) -> None:
        for rel, (stat, digest) in (inputs or {}).items():
            if stat is not None:
                self._cache.setdefault((rel, stat), digest)

    def file(self, path: str, persist: bool = False) -> list | None:
        """``[stat, digest]`` of an input path (None if it is missing); ``persist``: append a newly computed
        hash to the cache file."""
        rel = _rel(path, self.root)
        stat = stat_key(path)
        if stat is None:
            return None
        digest = self._cache.get((rel, stat))
        if digest is None:
            try:
                digest = content_digest(path)
            except OSError:
                return None
            self.hashed += 1
            self._cache[(rel, stat)] = digest
            if persist and self.cache_file is not None:
                self.cache_file.parent.mkdir(parents=True, exist_ok=True)
                with open(self.cache_file, "a", encoding="utf-8") as f:
                    f.write(_json({"path": rel, "stat": stat, "sha256": digest}) + "\n")
        return [stat, digest]

    def inputs(self, q, persist: bool = False) -> dict:
        """``{relative path: [stat, digest]}`` of every input of question ``q`` (a missing file: ``[None, None]``;
        an embedded image: ``{"<inline>": [None, digest]}``)."""
        out: dict[str, list] = {}
        for p in (q.image, q.video):
            if isinstance(p, str):
                out[_rel(p, self.root)] = self.file(p, persist) or [None, None]
            elif p is not None:
                d = inline_digest(p)
                if d is not None:
                    out[INLINE] = [None, d]
        return out


def changed_inputs(recorded: dict, now: dict) -> list[str]:
    """The inputs whose content differs between a record's ``_eval.inputs`` and the current files."""
    keys = sorted(set(recorded) | set(now))
    return [k for k in keys if (recorded.get(k) or [None, None])[1] != (now.get(k) or [None, None])[1]
            or (now.get(k) or [None, None])[1] is None]


def question_hash(q, root: str | os.PathLike | None = None) -> str:
    """A question's own fingerprint (16 hex): its id, texts, image / video path relative to the
    data root and the fields carried into the record."""
    view = {"qid": q.qid, "uid": q.uid, "text": q.text, "prompt": q.prompt, "image": _rel(q.image, root),
            "video": _rel(q.video, root), "extra": q.extra}
    return _sha(_json(view))[:16]


def record_matches_question(rec: dict, q) -> bool:
    """For answers written before question hashes: the question text the record carries."""
    if "prompt" in rec:
        return rec["prompt"] == q.prompt
    if "question" in rec:
        return rec["question"] == q.text
    return True


def _input_entry(p: str, root) -> tuple:
    rel = _rel(p, root)
    try:
        if os.path.isdir(p):
            return rel, tuple(sorted((e.name, e.stat().st_size) for e in os.scandir(p) if e.is_file()))
        return rel, os.path.getsize(p)
    except OSError:
        return rel, None


def data_fingerprint(bench, questions) -> dict:
    files = {}
    for f in bench.files():
        if f.needed_for != "inference" or f.kind != "file":
            continue
        p = bench.path(f.path)
        if p.is_file():
            size = p.stat().st_size
            files[f.path] = sha256_file(p) if size <= HASH_LIMIT else f"size:{size}"
    paths = sorted({p for q in questions for p in (q.image, q.video) if isinstance(p, str)})
    inputs = [_input_entry(p, bench.root) for p in paths]
    return {"question_files": files,
            "questions": {"count": len(questions),
                          "sha256": _sha("\n".join(question_hash(q, bench.root) for q in questions))},
            "inputs": {"count": len(inputs), "sha256": _sha(_json(inputs))}}


def model_fingerprint(model_id: str, seed: int, config=None, revision: str | None = None) -> dict:
    """What the weights are: a built model's name and seed, a local folder's config / weight digests, or a hub id's
    commit (the config's ``_commit_hash``, else the snapshot the hub cache resolves ``revision`` to)."""
    out: dict[str, Any] = {"id": model_id}
    if model_id.startswith(("tiny:", "shape:")):
        out["seed"] = seed  # random weights: the name and the seed are the weights
        return out
    if os.path.isdir(model_id):
        root = Path(model_id)
        cfg = root / "config.json"
        out["config_sha256"] = sha256_file(cfg) if cfg.is_file() else None
        weights = []
        for p in sorted(root.iterdir()):
            if p.suffix in (".safetensors", ".bin", ".pt", ".pth") or p.name.endswith(".index.json"):
                index = p.name.endswith(".index.json")  # the index names which file holds which tensor
                weights.append([p.name, p.stat().st_size, sha256_file(p) if index else sample_sha256(p)])
        out["weights"] = weights
        return out
    rev = getattr(config, "_commit_hash", None) if config is not None else None
    if rev is None:
        rev = _hub_commit(model_id, revision)
    out["revision"] = rev
    return out


def _hub_commit(model_id: str, revision: str | None) -> str | None:
    """The commit a hub id's ``revision`` (None: main) resolves to in the local hub cache, or None (not cached)."""
    try:
        from transformers.utils.hub import cached_file, extract_commit_hash

        path = cached_file(model_id, "config.json", revision=revision, _raise_exceptions_for_missing_entries=False)
        return extract_commit_hash(path, None) if path else None
    except Exception:  # noqa: BLE001 - a fingerprint without the commit, never a failed run
        return None


def template_fingerprint(template) -> dict:
    view = dataclasses.asdict(template) if dataclasses.is_dataclass(template) else {"repr": repr(template)}
    return {"name": getattr(template, "name", None), "sha256": _sha(_json(view))[:16]}


def data_changes(od: dict, nd: dict) -> list[str]:
    """What changed in a benchmark's data between two run-level data fingerprints, in words (said on a
    resume; per-question checks decide which answers are recomputed)."""
    changes: list[str] = []
    ofiles, nfiles = od.get("question_files", {}), nd.get("question_files", {})
    for k in sorted(set(ofiles) | set(nfiles)):
        if ofiles.get(k) != nfiles.get(k):
            changes.append(f"question file {k} (sha256 {str(ofiles.get(k))[:12]} -> {str(nfiles.get(k))[:12]})")
    if od.get("questions") != nd.get("questions") and not changes:
        o, n = od.get("questions", {}), nd.get("questions", {})
        changes.append(f"question list ({o.get('count')} questions {str(o.get('sha256'))[:12]} -> "
                       f"{n.get('count')} questions {str(n.get('sha256'))[:12]})")
    if od.get("inputs") != nd.get("inputs"):
        o, n = od.get("inputs", {}), nd.get("inputs", {})
        changes.append(f"image / video set ({o.get('count')} files {str(o.get('sha256'))[:12]} -> "
                       f"{n.get('count')} files {str(n.get('sha256'))[:12]})")
    return changes


def compare(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(the run-wide changes that refuse a resume, what changed that only warns), in words. The data is not
    run-wide: a resume checks each answer against its question and inputs (:func:`data_changes` says what
    changed)."""
    changes: list[str] = []
    warnings: list[str] = []
    if old.get("template") != new.get("template"):
        o, n = old.get("template", {}), new.get("template", {})
        changes.append(f"prompt template ({o.get('name')} {o.get('sha256')} -> {n.get('name')} {n.get('sha256')})")
    om, nm = old.get("model"), new.get("model")
    if om != nm:
        if om and nm and om.get("revision", 0) is None and {**om, "revision": nm.get("revision")} == nm:
            # a run written before the hub cache's commit was recorded: the same id, its commit now known
            warnings.append(f"model commit not recorded in the existing run; now {nm.get('revision')}")
        else:
            changes.append(f"model ({_json(om)} -> {_json(nm)})")
    if old.get("method") != new.get("method"):
        o, n = old.get("method", {}), new.get("method", {})
        diff = {k: (o.get(k), n.get(k)) for k in sorted(set(o) | set(n)) if o.get(k) != n.get(k)}
        changes.append(f"method {_json(diff)} (existing, new)")
    if old.get("dtype") != new.get("dtype"):
        changes.append(f"dtype ({old.get('dtype')} -> {new.get('dtype')})")
    if old.get("backend") != new.get("backend"):  # absent = our HF engine
        changes.append(f"backend ({_json(old.get('backend')) if old.get('backend') else 'hf'} -> "
                       f"{_json(new.get('backend')) if new.get('backend') else 'hf'})")
    if old.get("fast") != new.get("fast"):  # absent = the eager engine only
        changes.append(f"fast path ({_json(old.get('fast')) if old.get('fast') else 'off'} -> "
                       f"{_json(new.get('fast')) if new.get('fast') else 'off'})")
    oc, nc = (old.get("code") or {}).get("commit"), (new.get("code") or {}).get("commit")
    if oc != nc:
        warnings.append(f"code version {oc} -> {nc}")
    return changes, warnings
