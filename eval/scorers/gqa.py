"""GQA: LLaVA ``scripts/convert_gqa_for_eval.py`` and the GQA evaluation script ``eval.py`` (accuracy,
binary and open over the balanced questions), ported line by line.

Where the original would stop, the behaviour chosen here is marked "deviation".
"""

from __future__ import annotations

from typing import Iterable


# ---------------------------------------------------------------------------------------------
# GQA: scripts/convert_gqa_for_eval.py + GQA eval.py (accuracy over balanced questions)
# ---------------------------------------------------------------------------------------------


def convert_gqa_predictions(records: Iterable[dict]) -> list[dict]:
    """``prediction`` = output with trailing periods removed, lower-cased."""
    return [{"questionId": r["question_id"], "prediction": r["text"].rstrip(".").lower()} for r in records]


def score_gqa(predictions: list[dict], questions: dict, strict: bool = True, asked=None) -> dict:
    """GQA eval.py (as LLaVA runs it: ``eval.py --tier testdev_balanced`` with the v1.2 edits of
    LLaVA's Evaluation.md): exact string match, scores over the balanced questions; accuracy,
    binary (structural type not 'query') and open ('query'), each ``avg(list) * 100`` with
    ``avg(l) = float(sum(l)) / len(l)`` (0 for an empty list).

    ``asked``: the question ids LLaVA's question file asks (llava_gqa_testdev_balanced.jsonl).
    The official ``testdev_balanced_questions.json`` may hold more questions than that; only the
    asked ones are scored (``not_asked`` counts the others; deviation: eval.py itself raises
    "missing predictions" for any balanced question of the tier file without a prediction, so on
    such a file it gives no number at all; with LLaVA's file, which asks the whole testdev-balanced
    set, both score the same questions). A balanced asked question without a
    prediction is an error (eval.py: "missing predictions") unless ``strict=False`` (a partial
    run, scored over the predicted ones only: not the official number)."""
    preds = {str(p["questionId"]): p["prediction"] for p in predictions}
    asked_set = None if asked is None else {str(q) for q in asked}
    scored_q = {qid: q for qid, q in questions.items() if asked_set is None or qid in asked_set}
    not_asked = len(questions) - len(scored_q)
    missing = [qid for qid, q in scored_q.items() if q.get("isBalanced", True) and qid not in preds]
    if missing and strict:
        raise ValueError(f"GQA: no prediction for {len(missing)} balanced question(s), e.g. {missing[:3]} "
                         "(the official evaluator requires all)")
    acc, binary, open_, units = [], [], [], []
    for qid, q in scored_q.items():
        if not q.get("isBalanced", True) or qid not in preds:
            continue
        score = float(1 if preds[qid] == q["answer"] else 0)  # toScore(predicted == gold)
        acc.append(score)
        is_open = q.get("types", {}).get("structural") == "query"
        (open_ if is_open else binary).append(score)
        units.append({"id": qid, "tags": {"type": "open" if is_open else "binary"}, "v": {"correct": int(score)}})

    def avg(xs):  # eval.py avg(): 0 for an empty list, then * 100 at the report
        return float(sum(xs)) / len(xs) if xs else 0

    return {"accuracy": avg(acc) * 100, "binary": avg(binary) * 100, "open": avg(open_) * 100, "samples": len(acc),
            "missing": len(missing), "not_asked": not_asked, "units": units,
            "unknown_predictions": sum(1 for qid in preds if qid not in questions)}
