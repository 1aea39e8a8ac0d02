"""Our scorers against the official scoring scripts, on small adversarial answer files in the
official layouts. Every expected value is worked out by hand from the official code's rules and
written in the official order of operations, so floats are compared with ``==``.

Official code read (repository, path, commit):

* haotian-liu/LLaVA @ c121f0432da27facab705978f83c4ada465e46fd:
  llava/eval/eval_science_qa.py (lines 57-107), llava/eval/eval_pope.py (lines 5-62),
  llava/eval/eval_textvqa.py (lines 40-61), llava/eval/m4c_evaluator.py (lines 221-257),
  scripts/convert_gqa_for_eval.py, scripts/convert_seed_for_submission.py (eval_single),
  scripts/v1_5/eval/gqa.sh, docs/Evaluation.md (GQA, MME, MMBench layouts);
* open-compass/VLMEvalKit @ c6bdffd3a3f2772ce9eaa157d7d31ec741b245b0:
  vlmeval/evaluate/multiple_choice.py (report_acc lines 37-60, build_choices 99-104,
  prefetch_sub_data 145-165, eval_data_groups 197-218, multiple_choice_eval 236-362),
  vlmeval/utils/matching_util.py (can_infer);
* GQA eval.py with the v1.2 edits LLaVA's Evaluation.md points to (avg(l) = float(sum(l)) / len(l),
  scores[k] = avg(scores[k]) * 100; "missing predictions" for a balanced question);
* MME eval_tool/calculation.py (process_result: task_score = 0; task_score += v * 100 for acc,
  acc_plus; scores += task_score over eval_type_dict order; parse_pred_ans on the lower-cased answer);
* VQA API vqaEval.py (accuracy: 100 * float(sum(accQA)) / len(accQA)).
"""

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from eval import scorers as S
from eval.benchmarks import get_benchmark
from eval.cli import main as cli_main
from eval.fixtures import write_fixtures
from eval.io import read_json


# ------------------------------------------------------------------------------------------------ helpers
def make_run(tmp: Path, bench_name: str, data: Path, texts, bench_options=None, drop=()) -> Path:
    """A run directory as `eval run` leaves it (run_config.json + one shard of answer records), so
    that `python -m eval score RUN_DIR` scores hand-written answers. ``texts``: one per question in
    question order (a callable gets the Question); ``drop``: question positions left unanswered."""
    b = get_benchmark(bench_name, data, **(bench_options or {}))
    qs = b.load()
    rd = tmp / "runs" / bench_name / "hand"
    (rd / "answers").mkdir(parents=True)
    cfg = {"benchmark": bench_name, "data_root": str(data), "bench_options": bench_options or {}, "model": "hand",
           "method": "none", "budget": None, "limit": None}
    (rd / "run_config.json").write_text(json.dumps({"config": cfg}))
    with open(rd / "answers" / "1_0.jsonl", "w", encoding="utf-8") as f:
        for i, q in enumerate(qs):
            if i in drop:
                continue
            t = texts(q) if callable(texts) else texts[i]
            f.write(json.dumps({**b.record(q, t, "hand"), "_eval": {"uid": q.uid, "idx": i, "time": {}}}) + "\n")
    return rd


def score_cli(rd: Path) -> dict:
    assert cli_main(["score", str(rd)]) == 0
    return read_json(rd / "results.json")


@pytest.fixture()
def data(tmp_path):
    return write_fixtures(tmp_path / "eval_data")


# ------------------------------------------------------------------------------------------------ MMBench
def _b64(seed):
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (seed * 40 % 255, 0, 0)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# The dev TSV layout: a question and its circular copies are separate rows whose index differs by
# multiples of 1e6; each copy has its options rotated and its own answer letter.
MMB_TSV = [
    # index, question, A, B, C, D, answer, category, l2-category
    (0, "What is the main object?", "teddy bear", "rabbit", "cat", "dog", "A", "image_scene", "coarse_perception"),
    (1000000, "What is the main object?", "rabbit", "cat", "dog", "teddy bear", "D", "image_scene", "coarse_perception"),
    (2000000, "What is the main object?", "cat", "dog", "teddy bear", "rabbit", "C", "image_scene", "coarse_perception"),
    (3000000, "What is the main object?", "dog", "teddy bear", "rabbit", "cat", "B", "image_scene", "coarse_perception"),
    (1, "Which season is shown?", "winter", "summer", "autumn", "", "C", "season", "attribute_reasoning"),
    (1000001, "Which season is shown?", "summer", "autumn", "winter", "", "B", "season", "attribute_reasoning"),
    (2000001, "Which season is shown?", "autumn", "winter", "summer", "", "A", "season", "attribute_reasoning"),
    (2, "How many people?", "1", "2", "3", "4", "D", "count", "finegrained_perception (instance-level)"),
]
# answers in TSV order (round 0: the prompt with the TSV's own letters)
MMB_TEXTS = [
    "A",                   # 0: letter, right
    "D. teddy bear",       # 1000000: '.' removed -> tokens D / teddy / bear -> D, right
    "a teddy bear",        # 2000000: no letter token ('a' is lower case), unique option text -> C, right
    "B",                   # 3000000: right -> question 0: every copy right -> hit 1
    "autumn",              # 1: option text -> C, right
    "A or B",              # 1000001: two letters -> no match (can_infer False) -> wrong -> question 1: hit 0
    "",                    # 2000001: empty -> 'nan' through the xlsx (str(NaN)) -> no match, wrong
    "The answer is D",     # 2: single letter token D, right -> hit 1 (no copies)
]


def _write_mmb_tsv(path: Path, rows=MMB_TSV):
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
              "comment", "split"]
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        for k, (i, q, a, b, c, d, ans, cat, l2) in enumerate(rows):
            w.writerow([i, q, "", a, b, c, d, ans, cat, _b64(k), "src", l2, "", "dev"])


def _mmb_rows():
    out = []
    for i, _q, a, b, c, d, ans, cat, l2 in MMB_TSV:
        choices = {k: v for k, v in zip("ABCD", (a, b, c, d)) if v}  # build_choices: the non-NaN columns
        out.append({"index": i, "answer": ans, "choices": choices, "category": cat, "l2-category": l2, "split": "dev"})
    return out


def test_mmbench_circular_eval_groups_copies_by_index_mod_1e6():
    recs = [{"question_id": row[0], "round_id": 0, "text": t} for row, t in zip(MMB_TSV, MMB_TEXTS)]
    r = S.score_mmbench_local(recs, _mmb_rows())
    # questions (index < 1e6): 0 -> copies 0, 1e6, 2e6, 3e6 all right -> 1; 1 -> copy 1000001 wrong -> 0; 2 -> 1
    # report_acc Overall = np.mean([1, 0, 1]) = 2 / 3; printed x 100 in that order
    assert r["accuracy"] == 2 / 3 * 100 == 66.66666666666666  # (not 100 * 2 / 3 = 66.66666666666667)
    assert r["questions"] == 3 and r["copies_max"] == 4
    # the single-row rate (what scoring each row alone gives): 6 of the 8 rows right
    assert r["single_row_accuracy"] == 6 / 8 * 100 == 75.0
    # report_acc: split, Overall, then l2-category (abbreviated, sorted by full name), then category (sorted)
    assert list(r["report"]) == ["split", "Overall", "AR", "CP", "FP-S", "count", "image_scene", "season"]
    assert r["report"]["split"] == ["dev"] and r["report"]["Overall"] == [2 / 3]
    assert (r["report"]["AR"], r["report"]["CP"], r["report"]["FP-S"]) == ([0.0], [1.0], [1.0])
    assert r["categories"] == {"AR": 0.0, "CP": 100.0, "FP-S": 100.0, "count": 100.0, "image_scene": 100.0, "season": 0.0}
    assert r["unmatched"] == 2  # 'A or B' and '' (-> 'nan')


def test_mmbench_copy_answered_only_through_its_own_choices():
    # the copy's prediction is matched against *that row's* options: 'teddy bear' is D in row 1e6
    rows = _mmb_rows()[:2]
    ok = S.score_mmbench_local([{"question_id": 0, "text": "teddy bear"}, {"question_id": 1000000, "text": "teddy bear"}], rows)
    assert ok["accuracy"] == 100.0
    # answering the letter of the original order in the copy ('A' = rabbit there) fails the whole question
    bad = S.score_mmbench_local([{"question_id": 0, "text": "A"}, {"question_id": 1000000, "text": "A"}], rows)
    assert bad["accuracy"] == 0.0 and bad["single_row_accuracy"] == 50.0
    # 'Z' (can_infer's refusal letter) never equals an answer
    z = S.score_mmbench_local([{"question_id": 0, "text": "Cannot determine the answer"}], rows[:1])
    assert z["accuracy"] == 0.0 and z["unmatched"] == 1


def test_mmbench_rotated_round_needs_options_or_names_the_field():
    rows = _mmb_rows()[:1]
    with pytest.raises(ValueError, match="'options'"):
        S.score_mmbench_local([{"question_id": 0, "round_id": 0, "text": "A"}, {"question_id": 0, "round_id": 1, "text": "D"}],
                              rows)
    with pytest.raises(ValueError, match="not an index of the TSV"):
        S.score_mmbench_local([{"question_id": 7, "text": "A"}], rows)


def test_mmbench_cli_score_official_tsv_with_copies(data, tmp_path):
    _write_mmb_tsv(data / "mmbench" / "mmbench_dev_20230712.tsv")
    rd = make_run(tmp_path, "mmbench", data, MMB_TEXTS)
    res = score_cli(rd)
    assert res["primary_metric"] == "MMB-dev"
    assert res["metrics"]["MMB-dev"] == 2 / 3 * 100 and res["metrics"]["MMB-dev-local"] == 75.0
    assert "single-row" in res["metric_labels"]["MMB-dev-local"] and "CircularEval" in res["metric_labels"]["MMB-dev"]
    assert res["details"]["finalize"]["report"]["Overall"] == [2 / 3]


def test_mmbench_cli_all_rounds_records_without_options_recovered_from_tsv(data, tmp_path):
    """LLaVA --all-rounds answer records lacking 'options' / 'option_char' (older answer files):
    recovered from the TSV as model_vqa_mmbench builds them (rotated round_id times)."""
    _write_mmb_tsv(data / "mmbench" / "mmbench_dev_20230712.tsv", MMB_TSV[:4])  # question 0 and its 3 copies
    b = get_benchmark("mmbench", data, all_rounds=True)
    qs = b.load()
    assert len(qs) == 16

    def answer(q):  # always the option text 'teddy bear' -> right in every round of every copy
        return "teddy bear"

    rd = make_run(tmp_path, "mmbench", data, answer, bench_options={"all_rounds": True})
    shard = rd / "answers" / "1_0.jsonl"
    recs = [json.loads(x) for x in shard.read_text().splitlines()]
    for r in recs:
        del r["options"], r["option_char"]
    # round 1 of row 0: a letter answer that is right only through the recovered rotation
    # (prompt options rabbit, cat, dog, teddy bear -> 'D' = teddy bear = original A)
    recs[1]["text"] = "D"
    shard.write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = score_cli(rd)
    assert res["metrics"]["MMB-dev"] == 100.0 and res["metrics"]["MMB-dev-local-circular"] == 100.0
    recs[1]["text"] = "A"  # = rabbit in that rotated prompt: wrong -> the all-rounds number drops, MMB-dev not
    shard.write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = score_cli(rd)
    assert res["metrics"]["MMB-dev"] == 100.0 and res["metrics"]["MMB-dev-local-circular"] == 0.0
