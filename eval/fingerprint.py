"""What a run's answers were produced under, so a resume or a merge never mixes answers of other
data, another prompt, another model or another method (issue 16, item 1).

``run_config.json`` holds ``fingerprint``:

- ``data``: sha256 of every inference file of the benchmark (the question file's bytes), a hash
  of the question list as loaded (after ``--limit``), and the image / video set (sorted relative
  paths + sizes of the files the questions reference; cheap, no image bytes are read);
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
image / video path relative to the data root, extra fields), which the merge checks.
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


def model_fingerprint(model_id: str, seed: int, config=None) -> dict:
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
    out["revision"] = rev
    return out


def template_fingerprint(template) -> dict:
    view = dataclasses.asdict(template) if dataclasses.is_dataclass(template) else {"repr": repr(template)}
    return {"name": getattr(template, "name", None), "sha256": _sha(_json(view))[:16]}


def compare(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(what changed that refuses a resume, what changed that only warns), in words."""
    changes: list[str] = []
    warnings: list[str] = []
    od, nd = old.get("data", {}), new.get("data", {})
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
    if old.get("template") != new.get("template"):
        o, n = old.get("template", {}), new.get("template", {})
        changes.append(f"prompt template ({o.get('name')} {o.get('sha256')} -> {n.get('name')} {n.get('sha256')})")
    if old.get("model") != new.get("model"):
        changes.append(f"model ({_json(old.get('model'))} -> {_json(new.get('model'))})")
    if old.get("method") != new.get("method"):
        o, n = old.get("method", {}), new.get("method", {})
        diff = {k: (o.get(k), n.get(k)) for k in sorted(set(o) | set(n)) if o.get(k) != n.get(k)}
        changes.append(f"method {_json(diff)} (existing, new)")
    if old.get("dtype") != new.get("dtype"):
        changes.append(f"dtype ({old.get('dtype')} -> {new.get('dtype')})")
    if old.get("fast") != new.get("fast"):  # absent = the eager engine only
        changes.append(f"fast path ({_json(old.get('fast')) if old.get('fast') else 'off'} -> "
                       f"{_json(new.get('fast')) if new.get('fast') else 'off'})")
    oc, nc = (old.get("code") or {}).get("commit"), (new.get("code") or {}).get("commit")
    if oc != nc:
        warnings.append(f"code version {oc} -> {nc}")
    return changes, warnings
