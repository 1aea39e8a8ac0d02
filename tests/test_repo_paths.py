"""Every file the repository cites is one it ships (issue 63, item 2).

A user has only this checkout: a doc, a docstring, a ``--help`` text or a generated report that sends them to a
file the repository does not hold is a dead end. Three kinds of citation are checked in every tracked text file:

- the ``shared/`` folder (notes that lived beside the checkout, never shipped), named in any way;
- a spec note cited by section (``name.md section 5``, ``name.md §2.3``, ``name.md 0.4``): the note must be a
  file of the repository;
- in Markdown and TOML (our docs and paper specs): relative Markdown links, and paths that start with one of the
  repository's own top-level folders. ``llava/`` and ``scripts/`` are left out of the path rule: the official
  LLaVA repository has folders of those names, and its files (``llava/model/llava_arch.py``) are cited on
  purpose; links to them are still checked.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Built from pieces, so that this file does not cite the folder it forbids.
_SHARED = "sha" + "red"
SHARED_RE = re.compile(r"(?<![\w-])(?:\.\./)*" + _SHARED + r"/[\w.-]")  # a path into it, not the bare word
SECTION_RE = re.compile(r"(?<![\w./-])([\w-]+\.md)\s*(?:§|section\b|sec\.|\d+\.\d)", re.IGNORECASE)
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")
PATH_RE = re.compile(r"(?<![\w./@:-])((?:[\w.-]+/)+[\w.-]+\.(?:md|py|toml|json|sh|txt|yaml|yml))\b")
SHARED_WITH_LLAVA = {"llava", "scripts"}


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


def _text(path: str) -> str | None:
    try:
        return (ROOT / path).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def dead_references(files: dict[str, str], tracked: set[str]) -> list[str]:
    """``path:line: what`` for each citation in ``files`` (repository path -> text) that does not resolve
    against ``tracked`` (every file of the repository)."""
    dirs = {"/".join(p.split("/")[:i]) for p in tracked for i in range(1, p.count("/") + 1)}
    names = {p.rsplit("/", 1)[-1] for p in tracked}
    tops = {p.split("/")[0] for p in tracked if "/" in p} - SHARED_WITH_LLAVA

    def exists(base: str, target: str) -> bool:
        joined = (Path(base).parent / target).as_posix() if not target.startswith("/") else target.lstrip("/")
        parts: list[str] = []
        for part in joined.split("/"):
            if part == "..":
                if not parts:
                    return False
                parts.pop()
            elif part not in ("", "."):
                parts.append(part)
        norm = "/".join(parts)
        return norm == "" or norm in tracked or norm in dirs

    bad = []
    for path, text in files.items():
        markup = path.endswith((".md", ".toml"))
        fenced = False
        for n, line in enumerate(text.splitlines(), 1):
            where = f"{path}:{n}"
            if line.lstrip().startswith("```"):
                fenced = not fenced
            for m in SHARED_RE.finditer(line):
                bad.append(f"{where}: the {_SHARED}/ folder is not part of the repository: {line.strip()[:120]}")
            for m in SECTION_RE.finditer(line):
                if m.group(1) not in names:
                    bad.append(f"{where}: {m.group(1)} (cited by section) is not a file of the repository")
            if not markup:
                continue
            if path.endswith(".md") and not fenced:  # links: not in code blocks or code spans (`f[l](x)`)
                for m in LINK_RE.finditer(re.sub(r"`[^`]*`", "", line)):
                    target = m.group(1).split("#")[0]
                    if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):
                        continue  # an anchor on the same page, or a URL
                    if not exists(path, target):
                        bad.append(f"{where}: link to {target}, which does not exist")
            for m in PATH_RE.finditer(line):
                target = m.group(1)
                if target.split("/")[0] in tops and target not in tracked and target not in dirs:
                    bad.append(f"{where}: {target} does not exist")
    return bad


#: this file: its worked example plants one dead citation of each kind
SELF = Path(__file__).resolve().relative_to(ROOT).as_posix()


def test_every_cited_file_is_in_the_repository():
    tracked = _tracked()
    files = {p: t for p in tracked if p != SELF and (t := _text(p)) is not None}
    bad = dead_references(files, set(tracked))
    assert not bad, f"{len(bad)} citations of files the repository does not ship:\n" + "\n".join(bad)


def test_the_checker_finds_each_kind_of_dead_citation():
    """Worked example: a planted page with one citation of each kind, beside good ones, gives exactly the bad
    lines (so the real test above cannot pass by finding nothing)."""
    tracked = {"docs/a.md", "docs/methods/pdrop.md", "baselines/pdrop.py", "llava/cli.py", "docs/results/x/r.md"}
    page = "\n".join([
        "Spec: `" + _SHARED + "/reference/methods.md` §5.",            # 1: the folder
        "See [pdrop](methods/pdrop.md) and [gone](methods/gone.md).",  # 2: one good link, one dead
        "Code: `baselines/pdrop.py`, `baselines/nope.py`.",            # 3: one good path, one dead
        "Official: `llava/model/llava_arch.py` (LLaVA's own file).",   # 4: official LLaVA path: allowed
        "Budgets as in methods.md section 0.4; the table of pdrop.md §2.",  # 5: one unknown note, one known
        "Output: [r](results/x/r.md#top), [web](https://example.org/a.md), [here](#anchor).",  # 6: all fine
        "Link up: [up](../baselines/pdrop.py), [out](../../outside.md).",  # 7: one good, one out of the repo
        "A dotted number: paper-tables.md 1.3.",                       # 8: unknown note
        "Code: `y = layer[l](x)` and a block:",                        # 9: a code span, not a link
        "```",
        "z = head[k](y)  # not a link; a note cited in a block: methods.md section 2",  # 11: unknown note
        "```",
    ])
    code = "\n".join([
        '"""Protocol: ../' + _SHARED + '/reference/efficiency.md sections 4-5."""',  # 1: the folder
        "# `baselines/nope.py` in code is not checked by the path rule",           # 2: fine
        "# methods.md section 6",                                                  # 3: unknown note
    ])
    bad = dead_references({"docs/a.md": page, "bench/cost.py": code}, tracked)
    assert [b.split(": ", 1)[0] for b in bad] == [
        "docs/a.md:1", "docs/a.md:2", "docs/a.md:3", "docs/a.md:5", "docs/a.md:7", "docs/a.md:8",
        "docs/a.md:11",
        "bench/cost.py:1", "bench/cost.py:3"]
    assert "link to methods/gone.md" in bad[1] and "baselines/nope.py does not exist" in bad[2]
    assert "methods.md (cited by section)" in bad[3] and "link to ../../outside.md" in bad[4]
