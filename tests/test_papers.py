"""Paper specs (eval/papers/*.toml), their grid (python -m eval paper-grid, scripts/papers/<paper>.sh) and the
report beside the published numbers (python -m eval paper): every spec loads and checks; a bad spec names its
file and entry; the report's cells, differences, tolerance markers, both relative averages and the summary line
on a worked example of constructed results files; the claim checks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eval.paper_grid import build_grid, commands, shard
from eval.paper_report import report
from eval.papers import SpecError, list_papers, load

REPO = Path(__file__).resolve().parents[1]
SEED_PAPERS = {"visiondrop", "adav", "consensusdrop"}

SPEC = """
[paper]
key = "{key}"
title = "A worked example"
arxiv = "0000.00000"
method = "visionzip"

[[tables]]
id = "Table 1"
caption = "worked example"
model = "llava-hf/llava-1.5-7b-hf"
source = "made up for the test"

[[tables.columns]]
key = "gqa"
label = "GQA"
bench = "gqa"
metric = "GQA"

[[tables.columns]]
key = "mme"
label = "MME"
bench = "mme"
metric = "MME-P"

[[tables.columns]]
key = "mmmu"
label = "MMMU"
bench = ""
not_run = "not in the harness"

[[tables.rows]]
method = "none"
label = "Vanilla"
published = {{ gqa = 62.0, mme = 1500, mmmu = 36.3 }}
rel_avg = 100.0

[[tables.rows]]
method = "fastv"
label = "FastV"
budget = 64
options = {{ numerics = "official" }}
published = {{ gqa = 46.0, mme = 1200 }}
rel_avg = 80.0

[[tables.rows]]
method = "visionzip"
label = "VisionZip"
budget = 64
published = {{ gqa = 55.0 }}
missing = {{ mme = "printed as '-'" }}

[[tables.rows]]
method = ""
label = "ToMe"
not_run = "not implemented here"
published = {{ gqa = 50.0 }}
"""


def write_spec(tmp_path, key="worked", text=None, **subs):
    text = (text or SPEC).format(key=key)
    for old, new in subs.items():
        assert old in text, old
    for old, new in subs.items():
        text = text.replace(old, new)
    p = tmp_path / f"{key}.toml"
    p.write_text(text)
    return p


def result(root, bench, metrics, method, budget, options=None, model="llava-hf/llava-1.5-7b-hf", created="2026-01-01",
           partial=False, **settings):
    d = root / bench / f"{method}-{budget}-{len(list((root / bench).glob('*'))) if (root / bench).exists() else 0}"
    d.mkdir(parents=True)
    cfg = {"benchmark": bench, "model": model, "method": method, "budget": budget, "options": options or {},
           "next_layout": "spatial_unpad", "num_frames": 8, **settings}
    r = {"schema": "vtprune.eval.results/1", "benchmark": bench, "metrics": metrics, "partial": partial,
         "created": created, "model": {"id": model}, "method": {"method": method, "budget": budget},
         "config": cfg, "tokens": {}}
    (d / "results.json").write_text(json.dumps(r))
    return d


# ----------------------------------------------------------------------------------------------- the specs
def test_every_spec_loads_and_checks():
    names = list_papers()
    assert SEED_PAPERS <= set(names)
    assert len(set(names) - SEED_PAPERS) >= 10, names  # ten baseline papers at least
    for n in names:
        p = load(n)  # checked: methods, options, budgets, benchmarks, metrics
        assert p.key == n and p.tables
        script = REPO / "scripts/papers" / f"{n}.sh"
        assert script.exists(), f"no {script} for eval/papers/{n}.toml"
        for t in p.tables:
            assert t.source, (n, t.id)
            for r in t.rows:
                for k, v in r.published.items():
                    assert isinstance(v, (int, float)), (n, t.id, r.label, k)


def test_scripts_match_specs():
    scripts = {p.stem for p in (REPO / "scripts/papers").glob("*.sh") if not p.stem.startswith("_")}
    assert scripts == set(list_papers())


@pytest.mark.parametrize("old,new,needle", [
    ('method = "fastv"', 'method = "fastvv"', "unknown method 'fastvv'"),
    ('numerics = "official"', 'numericz = "official"', "unknown option(s) ['numericz']"),
    ('bench = "mme"', 'bench = "mmee"', "unknown benchmark 'mmee'"),
    ('metric = "MME-P"', 'metric = "MME-Q"', "has no metric 'MME-Q'"),
    ("published = { gqa = 55.0 }", "published = { gqa = 55.0, sqa = 1.0 }", "published names column 'sqa'"),
    ("published = { gqa = 46.0, mme = 1200 }", 'published = { gqa = "46.0" }', "must be a number"),
    ('not_run = "not in the harness"', "", "needs a `not_run` reason"),
])
def test_bad_spec_names_file_and_entry(tmp_path, old, new, needle):
    p = write_spec(tmp_path, **{old: new})
    with pytest.raises(SpecError) as e:
        load(str(p))
    msg = str(e.value)
    assert needle in msg and str(p) in msg
    assert "Table 1" in msg  # the entry: the table, then its row / column


def test_sparsevlm_budget_check_names_the_row(tmp_path):
    p = write_spec(tmp_path, **{'method = "visionzip"\nlabel = "VisionZip"\nbudget = 64':
                                'method = "sparsevlm"\nlabel = "VisionZip"\nbudget = 50'})
    with pytest.raises(SpecError, match=r"table 'Table 1' row 'VisionZip': sparsevlm\(budget=50"):
        load(str(p))


def test_key_must_match_file_name(tmp_path):
    p = write_spec(tmp_path, key="worked")
    p2 = tmp_path / "other.toml"
    p2.write_text(p.read_text())
    with pytest.raises(SpecError, match="must equal the file name 'other'"):
        load(str(p2))


# ----------------------------------------------------------------------------------------------- the grid
def test_grid_unpruned_first_shared_and_filtered(tmp_path):
    paper = load(str(write_spec(tmp_path)))
    grid = build_grid(paper)
    # 2 runnable columns x 3 runnable rows; the not_run column and row are not in the grid
    assert len(grid) == 6
    assert [c.method for c in grid[:2]] == ["none", "none"]
    fastv = next(c for c in grid if c.method == "fastv" and c.bench == "gqa")
    assert fastv.launch_args() == ["fastv", "64", "llava-hf/llava-1.5-7b-hf", "--opt", "numerics=official"]
    assert fastv.run_dir("runs") == Path("runs/gqa/llava-1.5-7b-hf_fastv_b64_numerics=official")
    assert {c.bench for c in build_grid(paper, only=["gqa"])} == {"gqa"}
    assert {c.method for c in build_grid(paper, budgets=[128])} == {"none"}  # the unpruned row always
    assert [c.model for c in build_grid(paper, model="/ckpt/llava")] == ["/ckpt/llava"] * 6
    assert shard(grid, "1/4") == [grid[1], grid[5]] and sum(len(shard(grid, f"{i}/4")) for i in range(4)) == 6
    with pytest.raises(ValueError, match="0 <= i < n"):
        shard(grid, "4/4")


def test_commands_skip_complete_runs(tmp_path):
    paper = load(str(write_spec(tmp_path)))
    grid = build_grid(paper)
    out = tmp_path / "runs"
    done = grid[0].run_dir(out)
    done.mkdir(parents=True)
    (done / "results.json").write_text(json.dumps({"partial": False}))
    part = grid[1].run_dir(out)
    part.mkdir(parents=True)
    (part / "results.json").write_text(json.dumps({"partial": True}))  # a --limit smoke run is not done
    lines = commands(grid, out)
    assert len(lines) == 5 and not any(ln.startswith(f"{grid[0].bench} none") for ln in lines)
    assert "gqa fastv 64 llava-hf/llava-1.5-7b-hf --opt numerics=official" in lines


def test_dry_run_every_paper(tmp_path, capsys):
    """Every paper's script is the shared runner under its own name (checked on the file), and its dry run works:
    one script end to end in a shell (the wiring; README.md's runnable block runs visionzip's), every paper's dry
    run in-process (the same command the script runs; one interpreter start per script would cost ~5 s each)."""
    from eval.cli import main as eval_main

    for n in list_papers():
        text = (REPO / "scripts/papers" / f"{n}.sh").read_text()
        assert f"\nPAPER={n}\n" in text and 'source "$(dirname "${BASH_SOURCE[0]}")/_paper.sh" "$@"' in text, n
        out, root = tmp_path / "runs", tmp_path / "data"
        assert eval_main(["paper-grid", n, "--out", str(out), "--data-root", str(root), "--dry-run"]) == 0
        got = capsys.readouterr().out
        # each config says what it misses: the harness's data, or (DivPrune: every column) lmms-eval's own
        assert got.startswith(f"{n}: ") and "todo" in got and ("data:" in got or "lmms-eval task:" in got), got[:500]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable}  # the interpreter running the tests
    for n in ("consensusdrop",):
        r = subprocess.run(["bash", str(REPO / "scripts/papers" / f"{n}.sh"), "--dry-run"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (n, r.stderr[-2000:])
        assert r.stdout.startswith(f"{n}: ") and "todo" in r.stdout and "data:" in r.stdout, r.stdout[:500]


# ----------------------------------------------------------------------------------------------- the report
@pytest.fixture
def worked(tmp_path):
    paper = load(str(write_spec(tmp_path)))
    runs = tmp_path / "runs"
    result(runs, "gqa", {"GQA": 61.5}, "none", None)
    result(runs, "mme", {"MME-P": 1510.0}, "none", None)
    result(runs, "gqa", {"GQA": 48.0}, "fastv", 64, {"numerics": "official"})
    result(runs, "mme", {"MME-P": 1190.0}, "fastv", 64, {"numerics": "official"})
    result(runs, "gqa", {"GQA": 55.4}, "visionzip", 64)
    result(runs, "gqa", {"GQA": 10.0}, "visionzip", 64, created="2025-01-01")  # older: superseded
    result(runs, "gqa", {"GQA": 30.0}, "fastv", 64)  # other options (ours, not the reference mode): not this row
    result(runs, "gqa", {"GQA": 30.0}, "visionzip", 64, next_layout="spatial")  # another run setting
    return paper, runs


def test_report_worked_example(worked):
    paper, runs = worked
    text, info = report(paper, [runs])
    rep = info["tables"]["Table 1"]
    lines = text.splitlines()
    # vanilla: 61.5 - 62.0 = -0.5 (tol 1), 1510 - 1500 = +10 (tol 30): both within
    assert "| Vanilla | – | 61.5 / 62.0 (-0.5) | 1510 / 1500 (+10) | n/r / 36.3 |" in text
    assert "- Vanilla first: 2 of 2 compared columns within tolerance." in lines
    # FastV: GQA +2.0 > 1.0 -> marked; MME -10 within 30.
    # Avg ours (vanilla = ours): (48/61.5 + 1190/1510) / 2 = (0.78049 + 0.78808) / 2 = 78.43 %
    # Avg ours (vanilla = paper): (48/62 + 1190/1500) / 2 = (0.77419 + 0.79333) / 2 = 78.38 %
    # Avg paper recomputed: (46/62 + 1200/1500) / 2 = (0.74194 + 0.80000) / 2 = 77.10 % (printed 80.0 %)
    # * : 2 of the table's 3 columns
    assert "| FastV | 64 | 48.0 / 46.0 (+2.0) ✗ | 1190 / 1200 (-10) | n/r / n/p | 78.4%* | 78.4%* | 80.0% | 77.1%* |" in text
    a = rep.avgs[1]
    assert a["ours_vs_ours"][0] == pytest.approx(100 * (48 / 61.5 + 1190 / 1510) / 2)
    assert a["ours_vs_paper"][0] == pytest.approx(100 * (48 / 62 + 1190 / 1500) / 2)
    assert a["paper_recomputed"][0] == pytest.approx(100 * (46 / 62 + 1200 / 1500) / 2)
    # VisionZip: the newest run of its config; MME not run yet and not printed
    assert "| VisionZip | 64 | 55.4 / 55.0 (+0.4) | – / n/p | n/r / n/p |" in text
    assert "| ToMe (not run) | – | n/r / 50.0 | n/r / n/p | n/r / n/p |" in text
    # published cells: vanilla 3 (GQA, MME, MMMU), FastV 2, VisionZip 1, ToMe 1 = 7; within: vanilla 2, FastV MME,
    # VisionZip GQA = 4; FastV GQA outside; not run: vanilla MMMU + ToMe GQA = 2, both cannot run here
    assert rep.summary_line() == "4 of 7 published cells reproduced within tolerance, 2 not run (2 cannot be run here)"
    assert rep.summary["outside"] == 1
    assert "- Not run: column MMMU: not in the harness" in lines
    assert "- Not printed: MME (1 row: VisionZip (64 tokens)): printed as '-'" in lines


def test_report_vanilla_off_points_at_setup(tmp_path):
    paper = load(str(write_spec(tmp_path)))
    runs = tmp_path / "runs"
    result(runs, "gqa", {"GQA": 58.0}, "none", None)  # -4.0: the setup, not the method
    text, info = report(paper, [runs])
    assert "Vanilla first: 0 of 1 compared columns within tolerance; off: GQA (-4.00) - check the setup" in text


def test_report_latex_and_figure(worked, tmp_path):
    paper, runs = worked
    text, info = report(paper, [runs], fmt="both", figures_dir=tmp_path / "figs")
    assert "\\begin{tabular}" in text and "48.0 / 46.0 (+2.0) $^{\\times}$" in text and "| FastV |" in text
    png = Path(info["figures"]["Table 1"])
    assert png.exists() and png.stat().st_size > 5000


def test_report_cli(worked, tmp_path, capsys):
    paper, runs = worked
    out = tmp_path / "rep" / "worked.md"
    out.parent.mkdir()
    r = subprocess.run([sys.executable, "-m", "eval", "paper", paper.path, str(runs), "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    assert r.returncode == 0, r.stderr
    assert "worked Table 1: 4 of 7 published cells reproduced within tolerance" in r.stderr
    assert "48.0 / 46.0 (+2.0) ✗" in out.read_text() and (out.parent / "worked-table-1.png").exists()
    from eval.cli import main as eval_main  # the error in this process (the command's process: above)

    capsys.readouterr()
    assert eval_main(["paper", "nosuchpaper"]) == 2
    assert capsys.readouterr().err.startswith("error: no paper spec 'nosuchpaper'")


# ----------------------------------------------------------------------------------------------- claims
CLAIMS = """
[[claims]]
id = "beats"
text = "visionzip beats fastv at identical budgets"
kind = "beats"
method = "visionzip"
against = ["fastv"]

[[claims]]
id = "pareto"
text = "visionzip on the Pareto front"
kind = "pareto"
method = "visionzip"
"""


def test_claims_beats_and_pareto(worked, tmp_path):
    _, runs = worked
    paper = load(str(write_spec(tmp_path, key="claimed", text=SPEC + CLAIMS)))
    eff = tmp_path / "eff.json"
    eff.write_text(json.dumps({"results": [
        {"method": "none", "budget": None, "options": {}, "ttft": {"median": 0.100}, "kv_bytes": 2 ** 30},
        {"method": "fastv", "budget": 64, "options": {}, "ttft": {"median": 0.050}, "kv_bytes": 2 ** 28},
        {"method": "visionzip", "budget": 64, "options": {}, "ttft": {"median": 0.040}, "kv_bytes": 2 ** 27}]}))
    text, info = report(paper, [runs], efficiency_files=[eff])
    beats, pareto = info["claims"]
    # GQA @ 64: visionzip 55.4 >= fastv 48.0 -> held; MME: visionzip not run -> not run yet
    assert beats["held"] == ["Table 1 GQA @ 64 tokens"] and beats["failed"] == []
    assert beats["missing"] == ["Table 1 MME @ 64 tokens"]
    # accuracy (vanilla = ours): none 100 %, fastv 78.43 %, visionzip 55.4/61.5 = 90.08 %; visionzip has the lowest
    # TTFT and KV of the pruned points and a higher accuracy than fastv; the unpruned point is more accurate but
    # slower: nothing dominates it
    assert [v["on_front"] for v in pareto["verdicts"]] == [True, True]
    assert "on the accuracy-vs-cost Pareto front at 2 of 2 (budget, cost) points" in text


def test_report_logged_to_wandb_offline(worked, tmp_path, monkeypatch):
    """`python -m eval paper ... --wandb`: one run in group paper/<key>, job type "paper", tagged, the spec in its
    config, per table the cells (ours / paper / difference / within tolerance), the summary line and the figure,
    and the report text; read back from the offline run's files."""
    from eval.cli import main as eval_main
    from eval.wandb_offline import read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    (tmp_path / "wb").mkdir()
    paper, runs = worked
    assert eval_main(["paper", paper.path, str(runs), "--out", str(tmp_path / "rep.md"), "--wandb"]) == 0
    wb = read_offline_run(tmp_path / "wb")
    assert wb["finished"]
    assert wb["run"]["group"] == "paper/worked" and wb["run"]["job_type"] == "paper"
    assert set(wb["run"]["tags"]) >= {"paper", "worked"} and wb["config"]["paper"] == "worked"
    assert wb["summary"]["table-1/summary"] == ("4 of 7 published cells reproduced within tolerance, 2 not run "
                                                 "(2 cannot be run here)")
    cells = wb["tables"]["table-1/cells"]
    assert cells["columns"] == ["row", "method", "budget", "column", "ours", "paper", "difference",
                                "within_tolerance", "stderr", "marks", "model", "revision", "answered", "full_count",
                                "deviations"]
    by = {(r[1], r[2], r[3]): r for r in cells["data"]}
    # the worked example's cell: 48.0 / 46.0 (+2.0), the spec's model, no counts or fingerprint recorded
    assert by[("fastv", 64, "GQA")][4:] == [48.0, 46.0, 2.0, False, None, "", "llava-hf/llava-1.5-7b-hf",
                                            "revision not recorded", None, 12578, None]
    assert "table-1/figure" in wb["summary"] and "report" in wb["summary"]


# ----------------------------------------------------------------------------------------------- lmms-eval columns
LMMS_COLUMN = '''key = "mmmu"
label = "MMMU"
lmms_task = "mmmu_val"
lmms_metric = "mmmu_acc"'''


def lmms_output(run_dir, value, task="mmmu_val"):
    """What lmms-eval 0.7 writes under --output_path: <model>/<date>_results.json ("<metric>,<filter>" keys)."""
    d = run_dir / "lmms" / "llava-hf__llava-1.5-7b-hf"
    d.mkdir(parents=True)
    (d / "20261124_120000_results.json").write_text(json.dumps({
        "results": {task: {"alias": task, "mmmu_acc,none": value, "mmmu_acc_stderr,none": "N/A"}},
        "n-samples": {task: {"original": 900, "effective": 900}}, "config": {"model": "vtprune"}}))


def test_lmms_column_spec_grid_and_import(tmp_path):
    """A column with `lmms_task` runs through lmms-eval: the spec's bench is lmms:<task> (scale 100: lmms-eval's
    fraction as the paper's percentage), the grid gives it a config and a command line, `eval lmms-import` turns
    lmms-eval's results file into lmms_results.json in the config's folder, and the report compares 0.359 x 100 with
    the published 36.3 (-0.4, within 1 point)."""
    from eval.cli import main as eval_main
    from eval.paper_grid import is_complete

    spec = write_spec(tmp_path, **{'key = "mmmu"\nlabel = "MMMU"\nbench = ""\nnot_run = "not in the harness"':
                                   LMMS_COLUMN})
    paper = load(str(spec))
    col = paper.tables[0].column("mmmu")
    assert col.runnable and col.lmms_task == "mmmu_val" and col.metric == "mmmu_acc" and col.scale == 100.0
    grid = [c for c in build_grid(paper) if c.lmms_task]
    assert [(c.method, c.budget) for c in grid] == [("none", None), ("fastv", 64), ("visionzip", 64)]
    out = tmp_path / "runs"
    lines = [ln for ln in commands(grid, out)]
    assert lines[1] == "lmms:mmmu_val fastv 64 llava-hf/llava-1.5-7b-hf --opt numerics=official"
    rd = grid[0].run_dir(out)
    assert rd == out / "lmms" / "mmmu_val" / "llava-1.5-7b-hf_none" and not is_complete(rd)
    lmms_output(rd, 0.359)
    assert eval_main(["lmms-import", "mmmu_val", "none", "none", "llava-hf/llava-1.5-7b-hf", "--out", str(out)]) == 0
    assert is_complete(rd) and len(commands(grid, out)) == 2
    imported = json.loads((rd / "lmms_results.json").read_text())
    assert imported["metrics"] == {"mmmu_acc": 0.359}  # the stderr ("N/A") and the alias are not metrics
    assert imported["lmms"]["model_args"] == "pretrained=llava-hf/llava-1.5-7b-hf,method=none"
    text, info = report(paper, [out])
    cell = info["tables"]["Table 1"].cells[(0, "mmmu")]
    assert cell.ours == pytest.approx(35.9) and cell.delta == pytest.approx(-0.4) and cell.within
    for bad, msg in ((LMMS_COLUMN + '\nbench = "gqa"', "lmms_metric, not bench"),
                     ('key = "mmmu"\nlabel = "MMMU"\nlmms_task = "mmmu_val"', "lmms_metric"),
                     ('key = "mmmu"\nlabel = "MMMU"\nbench = ""\nnot_run = "x"\nlmms_scale = 1', "need lmms_task")):
        p = write_spec(tmp_path, key="bad", **{'key = "mmmu"\nlabel = "MMMU"\nbench = ""\nnot_run = "not in the harness"':
                                             bad})
        with pytest.raises(SpecError, match=msg):
            load(str(p))


def test_lmms_script_needs_its_environment_and_runs_lmms_eval(tmp_path):
    """scripts/eval/lmms.sh: without the lmms-eval environment one error line naming the fix (exit 2); with one
    (here a stand-in for lmms-eval's python that writes a results file where --output_path says, recording its
    arguments) it passes the plugin's model args and the task, and imports the scores."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "runs"),
           "LMMS_PYTHON": str(tmp_path / "no-such-python")}
    args = ["bash", str(REPO / "scripts/eval/lmms.sh"), "mmmu_val", "fastv", "64", "llava-hf/llava-1.5-7b-hf",
            "--opt", "numerics=official"]
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: lmms-eval task mmmu_val needs the lmms-eval environment")
    stand_in = tmp_path / "lmms-python"
    stand_in.write_text(f"""#!/usr/bin/env bash
echo "$@" > {tmp_path}/lmms-args
while [[ $# -gt 0 ]]; do [[ "$1" == --output_path ]] && OUTP="$2"; shift; done
mkdir -p "$OUTP/m" && echo '{{"results": {{"mmmu_val": {{"mmmu_acc,none": 0.31}}}}}}' > "$OUTP/m/x_results.json"
""")
    stand_in.chmod(0o755)
    r = subprocess.run(args, env={**env, "LMMS_PYTHON": str(stand_in)}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = (tmp_path / "lmms-args").read_text().split()
    assert got[:5] == ["-m", "lmms_eval", "--model", "vtprune", "--model_args"]
    assert got[5] == "pretrained=llava-hf/llava-1.5-7b-hf,method=fastv,budget=64,opts=numerics:official"
    assert got[6:8] == ["--tasks", "mmmu_val"]
    (res,) = (tmp_path / "runs" / "lmms" / "mmmu_val").glob("*/lmms_results.json")
    assert json.loads(res.read_text())["metrics"] == {"mmmu_acc": 0.31}
