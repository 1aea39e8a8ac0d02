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


# ------------------------------------------------------------------------------------------------ GQA
def test_gqa_order_of_operations_and_binary_open():
    qs = {"1": {"answer": "yes", "isBalanced": True, "types": {"structural": "verify"}},
          "2": {"answer": "left", "isBalanced": True, "types": {"structural": "choose"}},
          "3": {"answer": "2", "isBalanced": True, "types": {"structural": "compare"}},
          "4": {"answer": "red", "isBalanced": True, "types": {"structural": "query"}},
          "5": {"answer": "cup", "isBalanced": True, "types": {"structural": "query"}}}
    recs = [{"question_id": "1", "text": "Yes."},      # rstrip('.').lower() -> 'yes': right
            {"question_id": "2", "text": "Left side"},  # 'left side' != 'left': wrong
            {"question_id": "3", "text": "Two"},        # no number normalisation: 'two' != '2': wrong
            {"question_id": "4", "text": "RED..."},     # -> 'red': right
            {"question_id": "5", "text": "cup"}]        # right
    r = S.score_gqa(S.convert_gqa_predictions(recs), qs)
    # accuracy [1,0,0,1,1]: avg = 3.0/5 -> 60.0; binary [1,0,0]: float(1)/3 * 100; open [1,1] -> 100.0
    assert r["accuracy"] == float(3) / 5 * 100 == 60.0
    assert r["binary"] == float(1) / 3 * 100 == 33.33333333333333  # (100 * 1 / 3 = 33.333333333333336)
    assert r["open"] == 100.0


def test_gqa_official_question_file_larger_than_the_asked_set():
    tier = {"1": {"answer": "yes", "isBalanced": True, "types": {"structural": "verify"}},
            "2": {"answer": "no", "isBalanced": True, "types": {"structural": "verify"}},
            "9": {"answer": "dog", "isBalanced": True, "types": {"structural": "query"}}}  # not asked by LLaVA's file
    preds = S.convert_gqa_predictions([{"question_id": "1", "text": "yes"}, {"question_id": "2", "text": "yes"}])
    r = S.score_gqa(preds, tier, asked=["1", "2"])
    assert (r["accuracy"], r["samples"], r["not_asked"], r["open"]) == (50.0, 2, 1, 0)  # avg([]) = 0
    with pytest.raises(ValueError, match="no prediction for 1 balanced"):  # an asked question without an answer
        S.score_gqa(preds[:1], tier, asked=["1", "2"])


def test_gqa_cli_score_with_official_tier_file(data, tmp_path):
    # testdev_balanced_questions.json (official layout gqa/data/) holds a question LLaVA's file does not ask
    tier_path = data / "gqa/data/testdev_balanced_questions.json"
    tier = json.loads(tier_path.read_text())
    tier["299"] = {"question": "Extra?", "answer": "yes", "isBalanced": True, "imageId": "n1", "types": {"structural": "verify"}}
    tier_path.write_text(json.dumps(tier))
    # answers yes, red, left, cup, no: 'yes' right, 'red car' wrong, 'left' right, 'cup' right, 'no' right
    rd = make_run(tmp_path, "gqa", data, ["Yes", "Red car", "left.", "Cup", "No."])
    res = score_cli(rd)
    # [1, 0, 1, 1, 1]: 4/5; binary 201 verify, 203 choose, 205 verify -> 3/3; open 202, 204 -> 1/2
    assert res["metrics"] == {"GQA": float(4) / 5 * 100, "GQA-binary": 100.0, "GQA-open": float(1) / 2 * 100}
    assert res["details"]["finalize"]["not_asked"] == 1 and "missing predictions" in res["details"]["finalize"]["warning"]
    # an asked question left unanswered is still refused (by the merge: exactly-once check)
    rd2 = make_run(tmp_path / "b", "gqa", data, ["Yes", "Red car", "left.", "Cup", "No."], drop=(4,))
    assert cli_main(["score", str(rd2)]) == 1


# ------------------------------------------------------------------------------------------------ ScienceQA
def test_sqa_order_of_operations_and_parsing():
    # 17 problems; the official script's order: correct / total * 100
    problems, recs, split = {}, [], []
    spec = [  # (choices, answer index, prediction or None, multimodal)
        (2, 0, "A", True),                              # right
        (3, 1, "B. rabbit", True),                      # 'X. ' prefix -> B, right
        (3, 2, "The answer is C.", True),               # regex -> C, right
        (2, 1, "The answer is B! The answer is A.", False),  # two matches -> FAILED
        (4, 3, "The answer is D!", False),              # upstream regex: final '.' is any character -> D, right
        (2, 0, "C", True),                              # valid letter but only 2 choices -> -1, wrong
        (2, 1, "(B)", False),                           # FAILED
        (2, 1, "b", False),                             # FAILED (lower case)
        (2, 0, None, True),                             # no prediction: FAILED, prompt 'Unknown' -> not IMG
        (3, 0, "A", False),                             # right
        (3, 0, "A", False),                             # right
        (2, 1, "A", True),                              # wrong
        (2, 1, "A", True),                              # wrong
        (2, 1, "A", False),                             # wrong
        (5, 4, "E", True),                              # right
        (2, 1, "A", False),                             # wrong
        (2, 1, "", False),                              # FAILED
    ]
    for k, (n, ans, pred, mm) in enumerate(spec):
        pid = str(100 + k)
        problems[pid] = {"choices": [f"c{j}" for j in range(n)], "answer": ans}
        split.append(pid)
        if pred is not None:
            recs.append({"question_id": pid, "prompt": ("<image>\n" if mm else "") + "q", "text": pred})
    r = S.score_sqa(recs, problems, split)
    # right: 100, 101, 102, 104, 109, 110, 114 -> 7 of 17
    assert (r["correct"], r["total"]) == (7, 17)
    assert r["accuracy"] == 7 / 17 * 100 == 41.17647058823529  # (100.0 * 7 / 17 = 41.1764705882353)
    # IMG: 100, 101, 102, 105, 111, 112, 114 (108 has no prediction -> prompt 'Unknown') -> 4 right of 7
    assert r["img_total"] == 7 and r["img_accuracy"] == 4 / 7 * 100


# ------------------------------------------------------------------------------------------------ POPE
def test_pope_official_f1_per_split_and_mean():
    cats = {i: c for i, c in enumerate(["adversarial"] * 3 + ["popular"] * 3 + ["random"] * 3)}
    labels = {"adversarial": ["yes", "no", "yes"], "popular": ["no", "no", "yes"], "random": ["yes", "yes", "no"]}
    texts = ["Yes, there is a dog. No",  # first sentence only -> yes (TP)
             "No, there is not.",        # no (TN)
             "There is no dog",          # 'no' -> no (FN)
             "Not sure",                 # 'Not' is not in the list -> yes (FP)
             "yes, no",                  # comma dropped -> words yes / no -> no (TN)
             "Yes",                      # TP
             "yes",                      # TP
             "not at all",               # no (FN)
             "Nope"]                     # -> yes (FP)
    r = S.score_pope([{"question_id": i, "text": t} for i, t in enumerate(texts)], cats, labels)

    def f1(tp, fp, fn):  # eval_pope.py lines 53-55
        p = float(tp) / float(tp + fp)
        rec = float(tp) / float(tp + fn)
        return 2 * p * rec / (p + rec)

    fa, fp_, fr = f1(1, 0, 1), f1(1, 1, 0), f1(1, 1, 1)
    assert (r["categories"]["adversarial"]["f1"], r["categories"]["popular"]["f1"], r["categories"]["random"]["f1"]) == (fa, fp_, fr)
    assert r["categories"]["random"]["accuracy"] == (1 + 0) / (1 + 0 + 1 + 1)  # (TP + TN) / (TP + TN + FP + FN)
    assert r["categories"]["random"]["yes_ratio"] == 2 / 3
    assert r["f1_avg3"] == (fa + fp_ + fr) / 3 * 100


# ------------------------------------------------------------------------------------------------ MME
def test_mme_official_task_score_order():
    rows = [("0.txt", "q", g, p) for g, p in [
        ("Yes", "Yes."),            # 'yes.' -> prefix has 'yes' -> yes: right
        ("No", "Not sure"),         # prefix 'not ' contains 'no' -> no: right  -> image 1 both right
        ("Yes", "I think yes"),     # prefix 'i th' -> other: wrong
        ("No", "NO"),               # lower-cased -> no: right
        ("Yes", "unknown"),         # prefix 'unkn' -> other: wrong
        ("No", "yes"),              # wrong
    ]]
    t = S.mme_task_score(rows)
    acc, acc_plus = 3 / 6, 1 / 3
    task_score = 0
    task_score += acc * 100
    task_score += acc_plus * 100
    assert t["score"] == task_score and t["other"] == 2


def test_mme_cli_score_official_release_layout(data, tmp_path):
    # MME/MME_Benchmark_release_version as Evaluation.md documents it (the fixture); ground truth per
    # image (Yes, No). Answer 'Yes' to the first and 'No.' to the second question of every image except
    # 'count' and 'code_reasoning', answered 'yes' twice: 200 per subtask, 50 for those two
    b = get_benchmark("mme", data)

    def answer(q):
        cat = q.extra["category"]
        first = "blue" not in q.text
        if cat in ("count", "code_reasoning"):
            return "yes"
        return "Yes" if first else "No."

    res = score_cli(make_run(tmp_path, "mme", data, answer))
    half = 0
    half += 1 / 2 * 100
    half += 0 / 1 * 100
    assert res["metrics"]["MME-P"] == sum([200.0] * 1 + [half] + [200.0] * 8)
    assert res["metrics"]["MME-C"] == sum([200.0] * 3 + [half])
    assert len(b.load()) == 28


# ------------------------------------------------------------------------------------------------ SEED
def test_seed_official_order():
    ann = {"question_type": {"Scene": 1, "Action": 10},
           "questions": [{"question_id": "1", "data_type": "image", "question_type_id": 1, "answer": "A"},
                         {"question_id": "2", "data_type": "image", "question_type_id": 1, "answer": "B"},
                         {"question_id": "3", "data_type": "image", "question_type_id": 1, "answer": "C"},
                         {"question_id": "4", "data_type": "video", "question_type_id": 10, "answer": "D"},
                         {"question_id": "5", "data_type": "video", "question_type_id": 10, "answer": "A"},
                         {"question_id": "6", "data_type": "video", "question_type_id": 10, "answer": "B"}]}
    recs = [{"question_id": 1, "text": "A"},    # right (question_id as int, matched via int('1'))
            {"question_id": 2, "text": "B."},   # exact equality only: wrong
            {"question_id": 3, "text": "c"},    # wrong
            {"question_id": 4, "text": "D"},    # right
            {"question_id": 5, "text": " A"}]   # wrong; question 6 unanswered: counts, wrong
    r = S.score_seed(recs, ann)
    assert r["per_type"] == {"Scene": 1 / 3 * 100, "Action": 1 / 3 * 100}
    assert r["all"] == 2 / 6 * 100 and r["image"] == 1 / 3 * 100 == 33.33333333333333
    assert r["video"] == 1 / 3 * 100


# ------------------------------------------------------------------------------------------------ TextVQA / VQAv2
def test_textvqa_official_order():
    anns = [{"image_id": "a", "question": "What brand?", "answers": ["dakota"] * 8 + ["kodak"] * 2},
            {"image_id": "b", "question": "How many?", "answers": ["2"] * 3 + ["3"] * 7},
            {"image_id": "c", "question": "What time?", "answers": ["10:10"] * 10}]
    S_ = "\nAnswer the question using a single word or phrase."
    recs = [{"question_id": "a", "prompt": "What brand?\nReference OCR token: DAKOTA" + S_, "text": "The Kodak."},
            {"question_id": "b", "prompt": "How many?" + S_, "text": "two"},   # number word -> '2'
            {"question_id": "c", "prompt": "What time?" + S_, "text": "11:00"}]
    r = S.score_textvqa(recs, anns)
    # leave-one-out subsets in answer order (m4c_evaluator.py lines 235-244): kodak: leaving out one of the
    # 8 'dakota' keeps 2 'kodak' -> 2/3, leaving out a 'kodak' -> 1/3; '2': leaving out one of the three '2'
    # keeps 2 -> 2/3, leaving out a '3' keeps 3 -> 1
    kodak = sum([min(1, 2.0 / 3)] * 8 + [min(1, 1.0 / 3)] * 2) / 10
    two = sum([min(1, 2.0 / 3)] * 3 + [1] * 7) / 10
    assert r["per_sample"] == [kodak, two, 0.0]
    assert r["accuracy"] == 100. * (sum([kodak, two, 0.0]) / 3)


def test_vqav2_val_official_order():
    ann = {1: ["2", "2", "two", "2", "3", "2", "2", "2", "2", "2"], 2: ["red"] * 10, 3: ["yes"] * 10}
    recs = [{"question_id": 1, "text": "3"}, {"question_id": 2, "text": "Red."}, {"question_id": 3, "text": "no"}]
    r = S.score_vqav2_val(recs, ann)
    # humans disagree -> both sides processed ('two' -> '2'); '3' is the 5th answer: leaving it out -> 0 matches
    three = sum([min(1, 1.0 / 3)] * 4 + [0.0] + [min(1, 1.0 / 3)] * 5) / 10
    assert r["accuracy"] == 100 * float(sum([three, 1.0, 0.0])) / 3 and r["accuracy_rounded"] == round(r["accuracy"], 2)


def test_vizwiz_unanswerable_upload_normalised():
    up = S.convert_vizwiz_submission([{"question_id": 0, "text": "Unanswerable."}, {"question_id": 1, "text": "Two dogs"}],
                                     [{"question_id": 0, "image": "a.jpg"}, {"question_id": 1, "image": "b.jpg"}])
    assert up == [{"image": "a.jpg", "answer": "unanswerable"}, {"image": "b.jpg", "answer": "2 dogs"}]
