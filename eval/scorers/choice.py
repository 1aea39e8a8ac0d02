"""Letter-answer benchmarks scored by LLaVA's own scripts: ScienceQA and SEED-Bench.

Ports, line by line: haotian-liu/LLaVA ``llava/eval/eval_science_qa.py`` and
``scripts/convert_seed_for_submission.py``. MMBench, scored by VLMEvalKit, is in ``mmbench.py``.

Quirks of the originals are kept on purpose (each is marked "upstream quirk"); where an original
would crash, the behaviour chosen here is marked "deviation".
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence


# ---------------------------------------------------------------------------------------------
# ScienceQA: llava/eval/eval_science_qa.py
# ---------------------------------------------------------------------------------------------

SQA_OPTIONS = ["A", "B", "C", "D", "E"]


def sqa_parse(pred_text: str, options: Sequence[str] = SQA_OPTIONS) -> str:
    """A valid letter; or 'X. ...'; or exactly one 'The answer is X.' (upstream regex: the final
    '.' matches any character); else 'FAILED'."""
    if pred_text in options:
        return pred_text
    if len(pred_text) >= 3 and pred_text[0] in options and pred_text[1:3] == ". ":
        return pred_text[0]
    res = re.compile(r"The answer is ([A-Z]).").findall(pred_text)
    return res[0] if len(res) == 1 else "FAILED"


def score_sqa(records: Iterable[dict], problems: dict, split_ids: Sequence[str],
              options: Sequence[str] = SQA_OPTIONS) -> dict:
    """Accuracy over the split's problems and IMG-Accuracy over those whose recorded prompt has
    '<image>'. A missing prediction is FAILED with prompt 'Unknown' (so it counts against
    overall accuracy but, upstream quirk, not in the IMG subset)."""
    predictions = {r["question_id"]: r for r in records}
    correct = incorrect = mm_correct = mm_incorrect = 0
    outputs = {}
    for pid in split_ids:
        prob = problems[pid]
        pred = predictions.get(pid, {"text": "FAILED", "prompt": "Unknown"})
        answer = sqa_parse(pred["text"], options)
        pred_idx = options.index(answer) if answer in options[: len(prob["choices"])] else -1
        ok = pred_idx == prob["answer"]
        mm = "<image>" in pred["prompt"]
        correct += ok
        incorrect += not ok
        mm_correct += ok and mm
        mm_incorrect += (not ok) and mm
        outputs[pid] = {"parsed_ans": answer, "ground_truth": options[prob["answer"]], "correct": ok, "is_multimodal": mm}
    total = correct + incorrect
    mm_total = mm_correct + mm_incorrect
    # eval_science_qa.py lines 105-107: correct / total * 100, multimodal_correct / multimodal_total * 100
    # (deviation: 0.0 instead of ZeroDivisionError for an empty set)
    return {"accuracy": correct / total * 100 if total else 0.0,
            "img_accuracy": mm_correct / mm_total * 100 if mm_total else 0.0,
            "correct": correct, "total": total, "img_total": mm_total,
            "missing": sum(1 for pid in split_ids if pid not in predictions), "outputs": outputs}


# ---------------------------------------------------------------------------------------------
# SEED-Bench: scripts/convert_seed_for_submission.py
# ---------------------------------------------------------------------------------------------


def score_seed(records: Iterable[dict], annotation: dict) -> dict:
    """Exact equality of the raw output with the answer letter, per question type, over **all**
    questions of SEED-Bench.json (an unanswered question counts as wrong); total, image-only and
    video-only accuracy x 100."""
    results = {r["question_id"]: r for r in records}
    names = {i: n for n, i in annotation["question_type"].items()}

    def one(only: str | None):
        counts, correct = {}, {}
        for q in annotation["questions"]:
            if only is not None and q["data_type"] != only:
                continue
            t = q["question_type_id"]
            counts[t] = counts.get(t, 0) + 1
            try:
                qid = int(q["question_id"])
            except (TypeError, ValueError):
                qid = q["question_id"]
            row = results.get(qid, results.get(q["question_id"]))
            if row is None:
                correct[t] = correct.get(t, 0)
                continue
            correct[t] = correct.get(t, 0) + int(row["text"] == q["answer"])
        tc, tt = sum(correct.values()), sum(counts.values())
        # convert_seed_for_submission.py: correct_counts[t] / type_counts[t] * 100; total_correct / total_count * 100
        per_type = {names.get(t, str(t)): correct[t] / counts[t] * 100 for t in sorted(counts)}
        return (tc / tt * 100 if tt else 0.0), per_type, tt

    units = []  # one per question of the annotation (unanswered: wrong), as one(None) counts them
    for q in annotation["questions"]:
        try:
            qid = int(q["question_id"])
        except (TypeError, ValueError):
            qid = q["question_id"]
        row = results.get(qid, results.get(q["question_id"]))
        units.append({"id": str(q["question_id"]), "tags": {"data_type": str(q["data_type"])},
                      "v": {"correct": int(row is not None and row["text"] == q["answer"])}})
    total, per_type, n = one(None)
    img, _, n_img = one("image")
    vid, _, n_vid = one("video")
    return {"all": total, "image": img, "video": vid, "per_type": per_type, "questions": n,
            "image_questions": n_img, "video_questions": n_vid, "units": units}


def convert_seed_upload(records: Iterable[dict], annotation: dict) -> list[dict]:
    results = {r["question_id"]: r for r in records}
    out = []
    for q in annotation["questions"]:
        qid = q["question_id"]
        r = results.get(qid)
        if r is None:
            try:
                r = results.get(int(qid))
            except (TypeError, ValueError):
                r = None
        if r is None:
            continue  # deviation: upstream raises KeyError on an unanswered question
        out.append({"question_id": qid, "prediction": r["text"]})
    return out
