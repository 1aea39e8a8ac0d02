"""The commands the README and docs/ print, checked against the code (docs/README.md, "Documented commands").

Every fenced shell block (```bash / sh / shell / console) in README.md and docs/**/*.md (dated reports under
docs/results/ excepted) carries a mark on the line before its fence:

    <!-- commands: run -->            runs on a CPU without downloads in seconds: each block is run (exit 0)
    <!-- commands: check (why) -->    needs a GPU, real weights, data, another environment or minutes: checked only

Every block, run or check, is checked for: the shell's syntax (``bash -n``); every ``python -m`` module of this
repository exists; every path under one of the repository's folders exists (but a value of --out and its kind:
written); every ``--flag`` given to one of our modules is one of its parser's options (the subcommand's, e.g.
``python -m eval run``), and every flag given to one of our scripts appears in it (a shell script: or in the shared
``_*.sh`` beside it); every ``VAR=`` given before a command is read by a script (``$VAR``) or a module (``environ``).
Fenced Python blocks: every ``import`` of one of our packages resolves, with the names it imports.

    python scripts/doc_commands.py            # check every page (exit 1 and one line per problem)
    python scripts/doc_commands.py --run      # ... and run the runnable blocks
    python scripts/doc_commands.py --list     # the blocks, their marks and commands
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHELL_LANGS = {"bash", "sh", "shell", "console"}
MARK = re.compile(r"^<!--\s*commands:\s*(run|check)\b\s*(.*?)\s*-->\s*$")
#: this repository's importable packages (a ``python -m`` of anything else is a third-party tool: not checked)
PACKAGES = ("llava", "eval", "bench", "testbed", "integrations", "baselines", "consensusdrop", "visiondrop", "attnmix", "parity")
#: top-level folders a command may name without their existing (outputs, user data)
UNTRACKED = ("runs", "tables", "logs", "playground")
#: flags whose value is a path the command writes (it need not exist)
OUTPUT_FLAGS = ("--out", "--output", "--output_path", "--output-dir", "--json", "--export")
PYTHONS = re.compile(r"^(python3?|\S*/bin/python3?)$")
#: the environment every command here runs in: no downloads, no W&B
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    mark: str | None = None  # "run" / "check" / None (unmarked)
    why: str = ""

    def where(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"


@dataclass
class Command:
    env: dict
    argv: list
    block: Block = field(repr=False, default=None)
    unreadable: str = ""  # why the line could not be split into words


def pages(root: Path = ROOT) -> list[Path]:
    """README.md and every docs page (docs/results/ holds dated reports, not instructions)."""
    docs = sorted(p for p in (root / "docs").rglob("*.md") if "results" not in p.relative_to(root / "docs").parts)
    return [root / "README.md", *docs]


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page, each with the mark on the line before its fence."""
    out, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        m = re.match(r"^\s*```(\S*)", lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1).lower()
        j = i + 1
        while j < len(lines) and not lines[j].lstrip().startswith("```"):
            j += 1
        b = Block(page, start + 1, lang, textwrap.dedent("\n".join(lines[start + 1:j])))  # a block in a list
        prev = lines[start - 1].strip() if start else ""
        mk = MARK.match(prev)
        if mk:
            b.mark, b.why = mk.group(1), mk.group(2).strip("() ")
        out.append(b)
        i = j + 1
    return out


def commands(block: Block) -> list[Command]:
    """The simple commands of a shell block: continuations joined, comments dropped, split at ; && || | and
    newlines, leading VAR=value assignments taken apart."""
    text = block.text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split, lex.commenters = True, "#"
        try:
            tokens = list(lex)
        except ValueError as e:  # e.g. a quote that bash reads across lines: not a command we can check
            out.append(Command({}, [], block, f"cannot read the command {line.strip()!r}: {e}"))
            continue
        cur: list = []
        for tok in tokens + [";"]:
            if tok and set(tok) <= set(";&|"):
                if cur:
                    env = {}
                    while cur and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cur[0]):
                        k, _, v = cur.pop(0).partition("=")
                        env[k] = v
                    out.append(Command(env, cur, block))
                cur = []
            else:
                cur.append(tok)
    return out


# ----------------------------------------------------------------------------------------------------------------
# what a command names
# ----------------------------------------------------------------------------------------------------------------


def _flags(args: list) -> list[str]:
    """The ``--flags`` among a command's arguments (``[--x`` of a documented optional flag included)."""
    out = []
    for a in args:
        a = a.lstrip("[")
        if a.startswith("--") and len(a) > 2:
            out.append(re.split(r"[=\]|]", a)[0])
    return out


def _repo_path(tok: str) -> bool:
    """A token that names a path under one of the repository's top-level folders (``scripts/...``,
    ``testbed/weights``), without shell patterns or placeholders: it must exist."""
    if any(c in tok for c in "*?{}<>$[]=") or tok.startswith(("-", "/", "~", ".", "http")) or "/" not in tok:
        return False
    first = tok.split("/")[0]
    return first not in UNTRACKED and (ROOT / first).is_dir()


_READS: set | None = None


def _env_reads() -> set:
    """The environment variables the repository reads: ``$VAR`` / ``${VAR`` in its shell scripts, and a quoted
    ``"VAR"`` / ``'VAR'`` next to ``environ`` / ``getenv`` in its Python files (this checker excluded)."""
    global _READS
    if _READS is None:
        _READS = set()
        for f in (ROOT / "scripts").rglob("*.sh"):
            _READS |= set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", f.read_text(errors="replace")))
        pys = [f for p in PACKAGES for f in (ROOT / p).rglob("*.py")] + list((ROOT / "scripts").rglob("*.py"))
        for f in pys:
            if f.resolve() == Path(__file__).resolve():
                continue
            for line in f.read_text(errors="replace").splitlines():
                if "environ" in line or "getenv" in line:
                    _READS |= set(re.findall(r"[\"']([A-Za-z_][A-Za-z0-9_]*)[\"']", line))
    return _READS


def _script_text(script: Path) -> str:
    """A shell script and the shared ``_*.sh`` files beside it (``scripts/papers/_paper.sh``)."""
    parts = [script.read_text(errors="replace")]
    parts += [p.read_text(errors="replace") for p in sorted(script.parent.glob("_*.sh")) if p != script]
    return "\n".join(parts)


def _has_flag(text: str, flag: str) -> bool:
    """``flag`` as a whole word in ``text`` (``--dry`` is not ``--dry-run``)."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def _own_module(mod: str) -> bool:
    return mod.split(".")[0] in PACKAGES


def module_exists(mod: str) -> bool:
    """``python -m mod`` would find it: a module, or a package with ``__main__``."""
    sys.path.insert(0, str(ROOT))
    try:
        spec = importlib.util.find_spec(mod)
        if spec is None:
            return False
        if spec.submodule_search_locations:  # a package: -m runs its __main__
            return importlib.util.find_spec(mod + ".__main__") is not None
        return True
    except (ImportError, ValueError):
        return False
    finally:
        sys.path.remove(str(ROOT))


def _subcommand(rest: list) -> tuple:
    """The word after ``python -m mod`` when it is not a flag (``eval run``, ``llava.cli ask``): whose options the
    flags are checked against."""
    return (rest[0],) if rest and not rest[0].startswith(("-", "[")) else ()


def help_requests(cmds: list[Command]) -> dict:
    """(module, subcommand words) -> None for every ``python -m <ours>`` with flags: the helps to read."""
    want = {}
    for c in cmds:
        if not c.argv or not PYTHONS.match(c.argv[0]) or len(c.argv) < 3 or c.argv[1] != "-m":
            continue
        mod, rest = c.argv[2], c.argv[3:]
        if not _own_module(mod) or not _flags(rest):
            continue
        want[(mod, _subcommand(rest))] = None
    return want


_HELP_PROGRAM = r"""
import argparse, contextlib, io, json, runpy, sys
def options(parser, file=None):  # --help prints the option strings of the parser it reached, not the prose
    print("\n".join(parser._option_string_actions), file=file or sys.stdout)
argparse.ArgumentParser.print_help = options
out = {}
for mod, sub in json.loads(sys.argv[1]):
    texts = []
    for argv in ([*sub, "--help"], ["--help"]) if sub else (["--help"],):
        buf = io.StringIO()
        sys.argv = [mod, *argv]
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
                runpy.run_module(mod, run_name="__main__", alter_sys=True)
        except SystemExit:
            pass
        except Exception as e:  # a module without a --help: its flags cannot be checked
            buf.write(f"\n<error {type(e).__name__}: {e}>")
        texts.append(buf.getvalue())
        if buf.getvalue().strip():  # the subcommand's own options when it has a parser
            break
    out[json.dumps([mod, sub])] = texts[-1]
print("\0" + json.dumps(out))
"""


_HELPS: dict = {}


def read_helps(want: dict) -> dict:
    """Every wanted ``--help`` text, read in one interpreter (one import of torch for all of them); kept for
    the next call."""
    keys = [[m, list(s)] for m, s in want if (m, s) not in _HELPS]
    if keys:
        _HELPS.update(_read_helps(keys))
    return {k: _HELPS[k] for k in want}


def _read_helps(keys: list) -> dict:
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", _HELP_PROGRAM, json.dumps(keys)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    if "\0" not in r.stdout:
        raise RuntimeError(f"reading the --help texts failed:\n{r.stderr[-2000:]}")
    got = json.loads(r.stdout.rsplit("\0", 1)[1])
    return {(m, tuple(s)): got[json.dumps([m, s])] for m, s in keys}


def check_command(c: Command, helps: dict) -> list[str]:
    """The problems of one documented command (empty: none)."""
    where, problems = c.block.where(), []
    argv = c.argv
    if c.unreadable:
        return [f"{where}: {c.unreadable}"]
    for k in c.env:
        if k not in _env_reads():
            problems.append(f"{where}: {k}= is read by no script or module")
    if not argv:
        return problems
    prog, args = argv[0], argv[1:]
    if PYTHONS.match(prog):
        if args[:1] == ["-m"] and len(args) > 1:
            mod, rest = args[1], args[2:]
            if _own_module(mod):
                if not module_exists(mod):
                    problems.append(f"{where}: python -m {mod}: no such module")
                else:
                    sub = _subcommand(rest)
                    text = helps.get((mod, sub))
                    for f in _flags(rest):
                        if text is not None and not _has_flag(text, f):
                            problems.append(f"{where}: python -m {mod} {' '.join(sub)}: no flag {f}")
            paths = rest
        else:
            script = next((a for a in args if not a.startswith("-")), None)
            paths = [a for a in args if a != script]
            if script and script.endswith(".py") and _repo_path(script):
                if not (ROOT / script).exists():
                    problems.append(f"{where}: {script}: no such file")
                else:  # a script of ours: its flags in its text (its argparse calls)
                    text = (ROOT / script).read_text(errors="replace")
                    problems += [f"{where}: {script}: no flag {f} in the script" for f in _flags(args)
                                 if not _has_flag(text, f)]
    elif prog in ("bash", "sh") or prog.endswith(".sh"):
        script = prog if prog.endswith(".sh") else next((a for a in args if not a.startswith("-")), None)
        paths = [a for a in args if a != script]
        if script and not script.startswith(("$", ".venv")):
            path = ROOT / script
            if not path.is_file():
                problems.append(f"{where}: {script}: no such script")
            else:
                text = _script_text(path)
                for f in _flags(args):
                    if not _has_flag(text, f):
                        problems.append(f"{where}: {script}: no flag {f} in the script")
    else:
        paths = args
    outputs = {b for a, b in zip(paths, paths[1:]) if a in OUTPUT_FLAGS}
    for tok in paths:
        if tok not in outputs and _repo_path(tok) and not (ROOT / tok.rstrip("/")).exists():
            problems.append(f"{where}: {tok}: no such path")
    return problems


def check_python(block: Block) -> list[str]:
    """A Python block's imports of this repository's packages resolve, and each name imported from one exists
    there (a module that fails to import for a missing third-party package is not judged)."""
    import importlib

    try:
        tree = ast.parse(block.text)
    except SyntaxError as e:
        return [f"{block.where()}: Python syntax: {e.msg} (line {e.lineno})"]
    problems = []
    sys.path.insert(0, str(ROOT))
    try:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods, names = [a.name for a in node.names], []
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                mods, names = [node.module], [a.name for a in node.names]
            else:
                continue
            for mod in mods:
                if not _own_module(mod):
                    continue
                try:
                    found = importlib.util.find_spec(mod) is not None
                except (ImportError, ValueError):
                    found = False
                if not found:
                    problems.append(f"{block.where()}: import {mod}: no such module")
                    continue
                try:
                    m = importlib.import_module(mod)
                except ImportError:  # e.g. integrations.vllm without vLLM here
                    continue
                is_package = hasattr(m, "__path__")  # a submodule imported by name counts as a name
                problems += [f"{block.where()}: from {mod} import {n}: no such name" for n in names
                             if n != "*" and not hasattr(m, n)
                             and not (is_package and importlib.util.find_spec(f"{mod}.{n}") is not None)]
    finally:
        sys.path.remove(str(ROOT))
    return problems


def check(page_list: list[Path] | None = None) -> list[str]:
    """Every problem of the documented commands (empty: all good)."""
    problems, cmds = [], []
    for page in page_list or pages():
        for b in blocks(page):
            if b.lang in SHELL_LANGS:
                if b.mark is None:
                    problems.append(f"{b.where()}: shell block without a '<!-- commands: run|check (why) -->' mark")
                elif b.mark == "check" and not b.why:
                    problems.append(f"{b.where()}: a check mark says why the block is not run: 'check (why)'")
                r = subprocess.run(["bash", "-n"], input=b.text, capture_output=True, text=True)
                if r.returncode:
                    problems.append(f"{b.where()}: shell syntax: {r.stderr.strip()}")
                cmds += commands(b)
            elif b.lang in ("python", "py"):
                problems += check_python(b)
    helps = read_helps(help_requests(cmds))
    for c in cmds:
        problems += check_command(c, helps)
    return problems


def run_blocks(page_list: list[Path] | None = None, timeout: float = 300, workers: int | None = None) -> list[str]:
    """Run every ``run`` block in the repository's root, each with its own temporary OUT (outputs go there), several
    at once (``workers``, default: the CPU count, at most 4: a block is mostly interpreter start-up); the failures,
    in page order."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    todo, done = [], set()
    for page in page_list or pages():
        for b in blocks(page):
            if b.lang not in SHELL_LANGS or b.mark != "run":
                continue
            same = tuple((tuple(sorted(c.env.items())), tuple(c.argv), c.unreadable) for c in commands(b))
            if same not in done:  # the same commands on another page (the README's and papers.md's): run once
                done.add(same)
                todo.append(b)

    def run(b: Block) -> str | None:
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, **OFFLINE, "OUT": tmp}
            try:
                r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", b.text], cwd=ROOT, env=env,
                                   capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return f"{b.where()}: still running after {timeout:.0f} s"
        return f"{b.where()}: exit {r.returncode}\n{(r.stdout + r.stderr)[-1500:]}" if r.returncode else None

    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        return [f for f in pool.map(run, todo) if f]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/doc_commands.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pages", nargs="*", type=Path, help="default: README.md and docs/ (not docs/results/)")
    ap.add_argument("--run", action="store_true", help="also run the blocks marked run")
    ap.add_argument("--list", action="store_true", help="print the blocks, their marks and commands")
    a = ap.parse_args(argv)
    page_list = [p.resolve() for p in a.pages] or None
    if a.list:
        for page in page_list or pages():
            for b in blocks(page):
                if b.lang in SHELL_LANGS:
                    print(f"{b.where()} [{b.mark or 'UNMARKED'}] {b.why}")
                    for c in commands(b):
                        print("   ", " ".join(f"{k}={v}" for k, v in c.env.items()), " ".join(c.argv))
        return 0
    problems = check(page_list)
    if a.run:
        problems += run_blocks(page_list)
    for p in problems:
        print(p)
    print(f"documented commands: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
