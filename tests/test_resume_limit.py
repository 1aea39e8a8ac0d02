"""A resume may extend --limit (issue 63, friction): `--limit 4` then the same command with `--limit 6` keeps the 4
answers and answers the 2 new questions, in the same run folder (the folder's name no longer carries the limit);
lifting the limit answers the rest; a smaller limit scores only its questions and keeps the others on disk."""

import json
import logging

import pytest

from eval.cli import main as eval_main
from eval.shards import EVAL_KEY, shard_files

pytestmark = pytest.mark.usefixtures("run_env")  # fixture_data / data: conftest


def eval_run(data, out, *extra):
    return eval_main(["run", "pope", "--model", "tiny:llava", "--max-new-tokens", "2", "--data-root", str(data),
                      "--out", str(out), "--no-wandb", "--method", "random", "--budget", "4", *extra])


def answers(rd):
    return {json.loads(ln)[EVAL_KEY]["uid"]: json.loads(ln)["answer_id"]
            for p in shard_files(rd) for ln in p.read_text().splitlines()}


def test_a_larger_limit_keeps_the_answers_and_adds_the_new_questions(data, tmp_path, caplog):
    out = tmp_path / "runs"
    assert eval_run(data, out, "--limit", "4") == 0
    (rd,) = (out / "pope").iterdir()
    assert rd.name == "tiny-llava_random_b4"
    first = answers(rd)
    assert len(first) == 4
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="eval"):
        assert eval_run(data, out, "--limit", "6") == 0
    assert any("(4 already answered, 2 to go)" in r.getMessage() for r in caplog.records)
    assert [p.name for p in (out / "pope").iterdir()] == [rd.name]
    now = answers(rd)
    assert len(now) == 6 and {u: now[u] for u in first} == first  # the 4 kept as they were, 2 new
    res = json.loads((rd / "results.json").read_text())
    assert res["counts"]["questions"] == 6 and res["partial"] is True
    resume = json.loads((rd / "run_config.json").read_text())["resumes"][-1]
    assert (resume["kept"], resume["new"]) == (4, 2)


def test_a_smaller_limit_scores_its_questions_and_keeps_the_rest(data, tmp_path):
    out = tmp_path / "runs"
    assert eval_run(data, out, "--limit", "6") == 0
    (rd,) = (out / "pope").iterdir()
    before = answers(rd)
    assert eval_run(data, out, "--limit", "3") == 0
    assert answers(rd) == before  # nothing recomputed, nothing deleted
    res = json.loads((rd / "results.json").read_text())
    assert res["counts"]["questions"] == 3
