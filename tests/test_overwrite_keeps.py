"""``--overwrite`` keeps the previous answers (issue 63, item 8): they move to ``superseded/overwritten-<time>/``
with one warning saying how many went where, instead of being deleted without a word."""

import json
import logging

import pytest

from eval.cli import main as eval_main
from eval.shards import EVAL_KEY, shard_files
from eval.table import find_results

pytestmark = pytest.mark.usefixtures("run_env")  # fixture_data / data: conftest


def eval_run(data, out, *extra):
    return eval_main(["run", "pope", "--model", "tiny:llava", "--max-new-tokens", "2", "--data-root", str(data),
                      "--out", str(out), "--no-wandb", "--run-name", "r", "--method", "random", "--budget", "4", *extra])


def records(paths):
    return [json.loads(ln) for p in paths for ln in p.read_text().splitlines()]


def test_overwrite_moves_the_old_answers_aside_and_says_so(data, tmp_path, caplog):
    rd = tmp_path / "runs" / "pope" / "r"
    assert eval_run(data, tmp_path / "runs") == 0
    first = records(shard_files(rd))
    first_results = json.loads((rd / "results.json").read_text())
    n = len(first)
    assert n == 6
    with caplog.at_level(logging.WARNING, logger="eval"):
        assert eval_run(data, tmp_path / "runs", "--overwrite", "--opt", "seed=5") == 0
    (aside,) = (rd / "superseded").iterdir()
    assert aside.name.startswith("overwritten-")
    assert sorted(p.relative_to(aside).as_posix() for p in aside.rglob("*") if p.is_file()) == [
        "answers/1_0.jsonl", "merge.jsonl", "results.previous.json", "run_config.json", "timing/1_0.jsonl"]
    assert records([aside / "answers" / "1_0.jsonl"]) == first  # every old answer, byte for byte as records
    assert json.loads((aside / "results.previous.json").read_text()) == first_results
    assert json.loads((aside / "run_config.json").read_text())["config"]["options"] == {}
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--overwrite")]
    assert said == [f"--overwrite: the previous {n} answers of {rd} (with merge.jsonl, results.json, run_config.json, timing) "
                    f"moved to {aside}; delete that folder to free the space"]
    # the new session answered everything again, under its own configuration
    assert sorted(r[EVAL_KEY]["uid"] for r in records(shard_files(rd))) == sorted(r[EVAL_KEY]["uid"] for r in first)
    assert json.loads((rd / "run_config.json").read_text())["config"]["options"] == {"seed": 5}
    assert find_results([tmp_path / "runs"]) == [rd / "results.json"]  # the kept results do not reach the tables


def test_overwrite_of_an_empty_folder_moves_nothing(data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="eval"):
        assert eval_run(data, tmp_path / "runs", "--overwrite", "--limit", "2") == 0
    assert not any(r.getMessage().startswith("--overwrite") for r in caplog.records)
    assert not (tmp_path / "runs" / "pope" / "r" / "superseded").exists()
