"""The commands the README and docs/ print still work (docs/README.md, "Documented commands"): every shell
block is marked, the blocks marked run run on this CPU, and the names in every block (modules, scripts, paths,
flags, environment variables) exist. The checker is scripts/doc_commands.py; planted mistakes in a temporary
page prove it fails on each kind of stale name."""

import importlib.util
import re
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("doc_commands", ROOT / "scripts" / "doc_commands.py")
dc = importlib.util.module_from_spec(_spec)
sys.modules["doc_commands"] = dc  # dataclasses look their module up while the file runs
_spec.loader.exec_module(dc)


def test_every_documented_command_names_what_exists():
    assert dc.check() == []


def test_the_runnable_blocks_run():
    runnable = [b for p in dc.pages() for b in dc.blocks(p) if b.mark == "run"]
    # the README's quickstart on a tiny model, the paper list and a grid's dry run, the TP memory table, the testbed
    assert {str(b.page.relative_to(ROOT)) for b in runnable} >= {"README.md", "docs/papers.md", "docs/multi-gpu.md",
                                                                 "docs/testbed.md"}
    assert dc.run_blocks() == []


def test_readme_is_a_front_door_and_docs_readme_indexes_every_page():
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 150
    sections = {}
    for line in readme:
        if line.startswith("## "):
            name = line
            sections[name] = 0
        elif sections:
            sections[name] += 1
    assert sections and max(sections.values()) <= 28, sections  # "no section over ~25 lines"
    index = (ROOT / "docs" / "README.md").read_text()
    linked = {(ROOT / "docs" / m).resolve() for m in re.findall(r"\]\(([^)#\s]+)", index)}
    pages = [p for p in (ROOT / "docs").rglob("*.md") if "results" not in p.relative_to(ROOT / "docs").parts]
    missing = [str(p.relative_to(ROOT)) for p in pages if p.resolve() not in linked and p.name != "README.md"]
    assert missing == []
    assert (ROOT / "docs" / "methods" / "README.md").resolve() in linked
    assert "docs/README.md" in "\n".join(readme)  # one click from the README
    # the README names every paper script there is
    listed = re.search(r"`scripts/papers/<paper>.sh` for (.*?)\. Each", " ".join(readme), re.S).group(1)
    names = sorted(re.split(r",\s*|\s+and\s+", listed.strip()))
    assert names == sorted(p.stem for p in (ROOT / "scripts" / "papers").glob("*.sh") if not p.stem.startswith("_"))
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
             "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
             "twenty-one", "twenty-two", "twenty-three", "twenty-four", "twenty-five", "twenty-six", "twenty-seven",
             "twenty-eight", "twenty-nine", "thirty"]
    said = re.search(r"# the ([a-z-]+) papers and their tables", "\n".join(readme)).group(1)
    assert said == words[len(names)], (said, len(names))  # "the twenty papers": as many as the scripts


def test_every_relative_link_resolves():
    bad = []
    for page in dc.pages():
        prose = re.sub(r"`[^`\n]*`", "", re.sub(r"(?ms)^```.*?^```", "", page.read_text()))  # code is not a link
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            path = target.split("#")[0]
            if path and not path.startswith(("http://", "https://", "mailto:")) and not (page.parent / path).exists():
                bad.append(f"{page.relative_to(ROOT)}: {target}")
    assert bad == []


PLANTED = """# A page with stale commands

<!-- commands: check (planted) -->
```bash
python -m llava.no_such_module --help
bash scripts/eval/no_such_benchmark.sh consensusdrop 64
python -m eval run pope --method fastv --no-such-flag 3
NO_SUCH_VARIABLE_ANYWHERE=1 bash scripts/eval/gqa.sh consensusdrop 64
bash scripts/papers/visionzip.sh --no-such-option
python -m eval table testbed/no_such_folder/ --format both
python scripts/bench/no_such_tool.py --device cuda
```

```bash
python -m llava.cli methods
```

<!-- commands: run -->
```bash
if then fi
```

```python
from llava.no_such_part import prune
from llava.method import no_such_name
```

<!-- commands: check -->
```bash
bash scripts/papers/visionzip.sh --dry
python scripts/bench/compile_decode.py --no-such-flag
python -m eval run pope --method fastv --out testbed/new_results_folder
```
"""


def test_planted_mistakes_are_each_reported(tmp_path):
    real = (ROOT / "docs" / "papers.md").read_text()  # a temporary copy of a page, with the mistakes planted in it
    page = tmp_path / "papers.md"
    page.write_text(real + "\n" + PLANTED)
    problems = dc.check([page])
    text = "\n".join(problems)
    for needle in ["python -m llava.no_such_module: no such module",
                   "scripts/eval/no_such_benchmark.sh: no such script",
                   "python -m eval run: no flag --no-such-flag",
                   "NO_SUCH_VARIABLE_ANYWHERE= is read by no script or module",
                   "scripts/papers/visionzip.sh: no flag --no-such-option in the script",
                   "testbed/no_such_folder/: no such path",
                   "scripts/bench/no_such_tool.py: no such file",
                   "shell block without a '<!-- commands: run|check (why) -->' mark",
                   "shell syntax:",
                   "import llava.no_such_part: no such module",
                   "from llava.method import no_such_name: no such name",
                   "a check mark says why the block is not run",
                   "scripts/papers/visionzip.sh: no flag --dry in the script",  # not --dry-run
                   "scripts/bench/compile_decode.py: no flag --no-such-flag in the script"]:
        assert needle in text, (needle, problems)
    assert len(problems) == 14, problems  # a value of --out is written, not read: no problem
    # the same commands, correct, give no problem (the checker reads the real names)
    good = PLANTED.replace("llava.no_such_module --help", "llava.cli methods").replace(
        "no_such_benchmark", "gqa").replace("--no-such-flag 3", "--budget 3").replace(
        "NO_SUCH_VARIABLE_ANYWHERE", "NPROC").replace("--no-such-option", "--dry-run").replace(
        "testbed/no_such_folder/", "testbed/weights").replace("no_such_tool", "compile_decode").replace(
        "```bash\npython -m llava.cli methods", "<!-- commands: run -->\n```bash\npython -m llava.cli methods").replace(
        "if then fi", "true").replace("from llava.no_such_part import prune\n", "").replace(
        "no_such_name", "Selection").replace("<!-- commands: check -->", "<!-- commands: check (planted) -->").replace(
        "visionzip.sh --dry\n", "visionzip.sh --dry-run\n").replace("compile_decode.py --no-such-flag", "compile_decode.py --device cpu")
    page.write_text(real + "\n" + good)
    assert dc.check([page]) == []


def test_a_run_block_that_fails_is_reported(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- commands: run -->\n```bash\ntrue\nls no-such-file\ntrue\n```\n")
    failures = dc.run_blocks([page])
    assert len(failures) == 1 and re.search(r"page.md:2: exit 2\b", failures[0]), failures
    assert "no-such-file" in failures[0]  # the output's tail comes with it
