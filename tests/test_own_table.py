"""A researcher's own method through the scripts and a comparison table of their own (docs/your-method.md): a spec
file anywhere (``python -m eval paper ./my_table.toml``, ``bash scripts/paper.sh ./my_table.toml``,
``scripts/slurm/submit_paper.sh ./my_table.toml``), published numbers optional; the report's cells with the
difference to the unpruned row and each row's visual tokens; ``VTPRUNE_METHODS=./my_method.py`` made absolute by
the scripts (they run from the repository) and saved for the Slurm jobs. The end-to-end test runs the tiny LLaVA on
fixture data (two runs: one through scripts/eval/gqa.sh, the unpruned one through the table's grid)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import child_env
from test_user_methods import NORMPRUNE

from eval.cli import main as eval_main
from eval.fixtures import write_fixtures
from eval.paper_report import report
from eval.papers import load

REPO = Path(__file__).resolve().parents[1]

METHOD = NORMPRUNE.format(name="normprune_t")  # the user's method file of tests/test_user_methods.py

TABLE = """[paper]
key = "my_table"
title = "NormPrune against FastV"
method = "{method}"

[[tables]]
id = "Table 1"
model = "tiny:llava"

[[tables.columns]]
key = "gqa"
label = "GQA"
bench = "gqa"
metric = "GQA"

[[tables.rows]]
method = "none"
label = "Unpruned"

[[tables.rows]]
method = "{method}"
label = "NormPrune"
budget = 4
"""


def _result(root: Path, method: str, budget, gqa: float, tok_in: float, tok_eq: float, tflops: float,
            kv_mb: float) -> None:
    d = root / "gqa" / f"{method}-{budget}"
    d.mkdir(parents=True)
    cfg = {"benchmark": "gqa", "model": "tiny:llava", "method": method, "budget": budget, "options": {}}
    (d / "results.json").write_text(json.dumps({
        "schema": "vtprune.eval.results/1", "benchmark": "gqa", "metrics": {"GQA": gqa}, "partial": False, "created": "2026-01-01", "model": {"id": "tiny:llava"},
        "config": cfg, "counts": {"questions": 5, "answered": 5},
        "tokens": {"tok_in": tok_in, "tok_eq": tok_eq, "prefill_tflops": tflops, "kv_mb": kv_mb}}))


def test_a_spec_file_of_one_s_own_loads_without_published_numbers_and_reports_against_the_unpruned_row(tmp_path):
    spec = tmp_path / "my_table.toml"
    spec.write_text(TABLE.format(method="fastv"))
    paper = load(str(spec))
    t = paper.tables[0]
    assert paper.key == "my_table" and t.own and t.source == ""
    runs = tmp_path / "runs"
    _result(runs, "none", None, 60.0, 16.0, 16.0, 2.5e-06, 0.125)
    _result(runs, "fastv", 4, 45.5, 16.0, 4.0, 1.25e-06, 0.0625)
    text, info = report(paper, [runs], figures_dir=tmp_path / "figs")
    lines = text.splitlines()
    assert "a table of one's own: my_table.toml." in lines
    assert ("| Method | Budget | GQA | Avg (van.=ours) | Visual tokens in | Visual tokens (layer avg) | Prefill TFLOPs "
            "| KV cache (MiB) |") in lines
    # ¶: 5 questions of GQA's 12,578; 45.5 - 60.0 = -14.5; 45.5 / 60 = 75.8 %; FastV keeps the 16 tokens into the
    # LLM, 4 on average over the layers; the analytic cost to three significant figures
    assert "| Unpruned | – | 60.0 ¶ | 100.0% | 16.0 | 16.0 | 2.5e-06 | 0.125 |" in lines
    assert "| NormPrune | 4 | 45.5 ¶ (-14.5) | 75.8% | 16.0 | 4.0 | 1.25e-06 | 0.0625 |" in lines
    assert "- Unpruned row: GQA 60.00." in lines and "- 2 of 2 cells run." in lines
    assert Path(info["figures"]["Table 1"]).is_file()


def test_a_bad_spec_path_or_spec_is_one_error_line(tmp_path, capsys):
    assert eval_main(["paper", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: no spec file {str(tmp_path / 'nope.toml')!r}")
    bad = tmp_path / "my_table.toml"
    bad.write_text(TABLE.format(method="no_such_method"))
    assert eval_main(["paper-grid", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[paper]: method 'no_such_method' is not a registered method" in err[0]
    bad.write_text(TABLE.format(method="fastv").replace('method = "none"\n', 'method = "none"\n'
                                                        'published = { gqa = 61.9 }\n'))
    assert eval_main(["paper", str(bad)]) == 2  # a published number needs its source
    assert "(Table 1): missing `source`" in capsys.readouterr().err


def _study(tmp_path: Path) -> dict:
    """A study folder: the method file, the table, GQA fixtures; the environment a user's shell would have."""
    (tmp_path / "my_method.py").write_text(METHOD)
    (tmp_path / "my_table.toml").write_text(TABLE.format(method="normprune_t"))
    e = child_env(("VTPRUNE_", "SHARD", "REPORT"), PYTHONPATH=REPO, VTPRUNE_METHODS="./my_method.py",
                  OUT=tmp_path / "runs", DATA_ROOT=tmp_path / "data", MODEL="tiny:llava", LAUNCHER="inprocess",
                  EXTRA_ARGS="--max-new-tokens 1 --no-wandb", PYTHON=sys.executable)
    write_fixtures(tmp_path / "data", ["gqa"])
    return e


def test_a_user_file_method_through_a_benchmark_script_and_a_table_of_one_s_own_end_to_end(tmp_path):
    """VTPRUNE_METHODS=./my_method.py (relative to the study folder) reaches `eval run` through
    scripts/eval/gqa.sh and the table's grid, which run from the repository; the report puts it beside the
    unpruned row."""
    e = _study(tmp_path)
    r = subprocess.run(["bash", str(REPO / "scripts/eval/gqa.sh"), "normprune_t", "4"], env=e, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    mine = json.loads((tmp_path / "runs/gqa/tiny-llava_normprune_t_b4/results.json").read_text())
    assert mine["method"]["method"] == "normprune_t" and mine["tokens"]["tok_in"] == 4.0
    r = subprocess.run(["bash", str(REPO / "scripts/paper.sh"), "./my_table.toml"], env=e, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "my_table: 1 configs to run" in r.stdout  # the unpruned run; normprune_t's ran above
    base = json.loads((tmp_path / "runs/gqa/tiny-llava_none/results.json").read_text())
    md = (tmp_path / "runs/papers/my_table.md").read_text().splitlines()
    g, g0 = mine["metrics"]["GQA"], base["metrics"]["GQA"]
    d = 2 if g < 10 else 1  # the report's decimals
    se = 100 * ((g / 100) * (1 - g / 100) / (5 - 1)) ** 0.5  # 5 fixture questions of 12,578: ¶
    avg = "–" if g0 == 0 else f"{100 * g / g0:.1f}%"
    row = next(line for line in md if line.startswith("| NormPrune |"))
    cost = [f"{mine['tokens'][k]:.3g}" for k in ("prefill_tflops", "kv_mb")]
    assert row == (f"| NormPrune | 4 | {g:.{d}f} ± {se:.{d}f} ¶ ({g - g0:+.{d}f}) | {avg} | 4.0 | 4.0 | {cost[0]} | "
                   f"{cost[1]} |"), row
    # the analytic KV cache: the same prompts with 12 of the 16 visual tokens gone from every layer, fp32
    from llava.cost import kv_bytes_per_token
    from llava.models import load

    per_token = kv_bytes_per_token(load("tiny:llava").model.config) * 4 / 2 ** 20
    assert abs(base["tokens"]["kv_mb"] - mine["tokens"]["kv_mb"] - 12 * per_token) < 1e-12
    assert mine["tokens"]["prefill_tflops"] < base["tokens"]["prefill_tflops"]
    assert (tmp_path / "runs/papers/my_table-table-1.png").is_file()
    assert (tmp_path / "runs/papers/my_table.tex").is_file()


def test_submit_paper_saves_the_spec_and_the_user_s_methods_for_the_jobs(tmp_path):
    """submit_paper.sh ./my_table.toml with VTPRUNE_METHODS=./my_method.py: the jobs' variables hold the absolute
    method file and a copy of the spec (a job runs elsewhere, later); a recording sbatch hands out ids 812, 813;
    sourced from another folder, the variables give the grid the submission counted."""
    e = _study(tmp_path)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    sb = bindir / "sbatch"
    sb.write_text("#!/bin/sh\nn=$(cat \"$COUNTER\" 2>/dev/null || echo 811); n=$((n + 1)); echo $n > \"$COUNTER\"\n"
                  "printf '%s\\n' \"$@\" > \"$COUNTER.$n\"\necho \"$n\"\n")
    sb.chmod(0o755)
    e.update(COUNTER=str(tmp_path / "n"), VENV=sys.prefix, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
    r = subprocess.run(["bash", str(REPO / "scripts/slurm/submit_paper.sh"), "./my_table.toml", "--", "-c", "1"],
                       env=e, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[0] == "my_table: 2 configs in 2 array tasks (SHARDS=2)"
    array = (tmp_path / "n.812").read_text().splitlines()
    assert "--job-name=vtprune-my_table" in array and array[-1] == str(REPO / "scripts/slurm/paper.sbatch")
    envf = Path(next(a for a in array if a.startswith("--export=")).split("VTPRUNE_ENV=", 1)[1])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    show = (f"source {shlex.quote(str(envf))}; echo \"$PAPER|$VTPRUNE_METHODS\"; "
            f"bash {shlex.quote(str(REPO / 'scripts/paper.sh'))} \"$PAPER\" --dry-run")
    job = child_env(("VTPRUNE_", "SHARD", "REPORT"), PYTHONPATH=REPO)
    got = subprocess.run(["bash", "-c", show], env=job, cwd=elsewhere, capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-2000:]
    paper, methods = got.stdout.splitlines()[0].split("|")
    assert methods == str(tmp_path / "my_method.py")
    assert paper == str(envf.with_suffix("") / "my_table.toml")
    assert Path(paper).read_text() == (tmp_path / "my_table.toml").read_text()
    assert "gqa normprune_t b4" in got.stdout and "done 0 of 2" in got.stdout


def test_the_worked_example_s_files_are_the_page_s():
    """docs/your-method.md prints docs/examples/normprune/my_method.py whole, and its table has the unpruned row and
    the six methods at the three budgets (the page's 19 runs)."""
    page = (REPO / "docs/your-method.md").read_text()
    example = REPO / "docs/examples/normprune"
    assert "```python\n" + (example / "my_method.py").read_text() + "```" in page
    t = load(str(example / "my_table.toml"), check=False).tables[0]
    assert t.own and [(r.method, r.budget) for r in t.rows[:2]] == [("none", None), ("normprune", 4)]
    assert len(t.rows) == 19 and {r.budget for r in t.rows[1:]} == {4, 8, 12}
    assert len({r.method for r in t.rows[1:]}) == 6
