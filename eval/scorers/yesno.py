"""Yes / no benchmarks: POPE and MME.

Ports, line by line (docs/evaluation.md, section 2):

* POPE: haotian-liu/LLaVA ``llava/eval/eval_pope.py``;
* MME: LLaVA ``playground/data/eval/MME/convert_answer_to_mme.py`` and MME's ``eval_tool/calculation.py``.

Where an original would crash, the behaviour chosen here is marked "deviation".
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence


# ---------------------------------------------------------------------------------------------
# POPE: LLaVA llava/eval/eval_pope.py
# ---------------------------------------------------------------------------------------------


def pope_parse(text: str) -> str:
    """Keep the text before the first period, drop commas, split on spaces: 'no' if any word is
    'No' / 'no' / 'not', else 'yes'."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    text = text.replace(",", "")
    words = text.split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_confusion(answers: Sequence[str], labels: Sequence[str]) -> dict:
    """TP/FP/TN/FN of parsed answers ('yes'/'no') against labels, paired **in order** (zip: the
    shorter list wins, as upstream)."""
    label_list = [0 if lab == "no" else 1 for lab in labels]
    pred_list = [0 if a == "no" else 1 for a in answers]
    tp = tn = fp = fn = 0
    for pred, label in zip(pred_list, label_list):
        if pred == 1 and label == 1:
            tp += 1
        elif pred == 1 and label == 0:
            fp += 1
        elif pred == 0 and label == 0:
            tn += 1
        elif pred == 0 and label == 1:
            fn += 1
    return {"TP": tp, "FP": fp, "TN": tn, "FN": fn, "yes": pred_list.count(1), "n": len(pred_list)}


def pope_metrics(c: dict) -> dict:
    """Accuracy, precision, recall, F1, yes-ratio from a confusion dict.

    deviation: upstream divides by zero (crashes) when nothing is predicted 'yes' (TP + FP = 0)
    or there are no positive labels; here such a ratio is 0.0 and ``degenerate`` is set."""
    tp, fp, tn, fn = c["TP"], c["FP"], c["TN"], c["FN"]
    degenerate = (tp + fp) == 0 or (tp + fn) == 0
    precision = float(tp) / float(tp + fp) if tp + fp else 0.0  # eval_pope.py lines 53-56
    recall = float(tp) / float(tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    total = tp + tn + fp + fn
    return {"accuracy": (tp + tn) / total if total else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": c["yes"] / c["n"] if c["n"] else 0.0, **c, "degenerate": degenerate}


def score_pope(records: Sequence[dict], question_category: dict, labels: dict[str, list[str]]) -> dict:
    """eval_pope.py: per category, that category's answers in answer-file order paired with the
    category's label file in file order. Adds the paper value (mean F1 over the categories) and
    the pooled variant (lmms-eval's ``pope``: one confusion matrix over all questions).

    question_category: question_id -> category; labels: category -> labels in file order."""
    per_cat = {}
    pooled = {"TP": 0, "FP": 0, "TN": 0, "FN": 0, "yes": 0, "n": 0}
    units = []  # one per scored question: the pairs pope_confusion counts (zip: the shorter list wins)
    for cat in sorted(labels):
        mine = [r for r in records if question_category[r["question_id"]] == cat]
        answers = [pope_parse(r["text"]) for r in mine]
        if not answers:
            continue
        for r, a, lab in zip(mine, answers, labels[cat]):
            pred, pos = a != "no", lab != "no"
            units.append({"id": str(r["question_id"]), "tags": {"split": cat},
                          "v": {"correct": int(pred == pos), "tp": int(pred and pos), "fp": int(pred and not pos),
                                "fn": int(pos and not pred)}})
        c = pope_confusion(answers, labels[cat])
        per_cat[cat] = pope_metrics(c)
        per_cat[cat]["samples"] = len(answers)
        per_cat[cat]["labels"] = len(labels[cat])
        for k in pooled:
            pooled[k] += c[k]
    if not per_cat:
        raise ValueError("POPE: no answers in any category")
    pm = pope_metrics(pooled)
    n = len(per_cat)
    # eval_pope.py prints each split's F1 / accuracy as fractions (lines 53-62); the paper value is
    # their mean, taken here as mean(list) * 100 like the other scorers (no official script averages)
    return {
        "f1_avg3": sum(m["f1"] for m in per_cat.values()) / n * 100,
        "acc_avg3": sum(m["accuracy"] for m in per_cat.values()) / n * 100,
        "f1_pooled": pm["f1"] * 100,
        "acc_pooled": pm["accuracy"] * 100,
        "categories": per_cat,
        "pooled": pm,
        "units": units,
    }


# ---------------------------------------------------------------------------------------------
# MME: convert_answer_to_mme.py + eval_tool/calculation.py
# ---------------------------------------------------------------------------------------------

MME_PERCEPTION = ["existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR"]
MME_COGNITION = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]
SHORT_ANSWER = "Answer the question using a single word or phrase."


def mme_convert(records: Iterable[dict], gt: dict) -> dict[str, list[tuple[str, str, str, str]]]:
    """convert_answer_to_mme.py: per category, in answer order, the tuples (image .txt name,
    prompt with MME's own 'Please answer yes or no.' restored, ground truth, model answer).

    gt: (category, txt file, question) -> 'Yes' / 'No' (from MME_Benchmark_release_version)."""
    results = defaultdict(list)
    for answer in records:
        category = answer["question_id"].split("/")[0]
        file = answer["question_id"].split("/")[-1].split(".")[0] + ".txt"
        results[category].append((file, answer["prompt"], answer["text"]))
    out = {}
    for category, tups in results.items():
        rows = []
        for file, prompt, answer in tups:
            if SHORT_ANSWER in prompt:
                prompt = prompt.replace(SHORT_ANSWER, "").strip()
            if "Please answer yes or no." not in prompt:
                prompt = prompt + " Please answer yes or no."
                if (category, file, prompt) not in gt:
                    prompt = prompt.replace(" Please answer yes or no.", "  Please answer yes or no.")
            key = (category, file, prompt)
            if key not in gt:
                raise KeyError(f"MME: no ground truth for {key} (is MME_Benchmark_release_version complete?)")
            rows.append((file, prompt, gt[key], answer))
        out[category] = rows
    return out


def mme_parse(pred_ans: str) -> str:
    """calculation.py parse_pred_ans (on the lower-cased answer)."""
    if pred_ans in ["yes", "no"]:
        return pred_ans
    prefix = pred_ans[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_task_score(rows: Sequence[tuple]) -> dict:
    """calculation.py for one subtask: 100 * acc (per question) + 100 * acc+ (per image: both of
    its two questions right), images = **consecutive pairs of lines**.

    The official tool reads the .txt lines, so the answer still carries its line's newline;
    parsing "x\\n" and "x" gives the same label (the newline can neither make nor hide "yes"/"no"
    in the first four characters), so the answer is parsed as is."""
    if len(rows) % 2:
        raise ValueError(f"MME: a subtask has an odd number of answers ({len(rows)}); each image needs its two questions")
    gts, preds, plus, units = [], [], 0, []
    for i in range(0, len(rows), 2):
        correct = 0
        for _file, _q, gt_ans, pred_ans in rows[i:i + 2]:
            gt_ans = gt_ans.lower()
            if gt_ans not in ("yes", "no"):
                raise ValueError(f"MME ground truth must be yes/no, got {gt_ans!r}")
            p = mme_parse(pred_ans.lower())
            gts.append(gt_ans)
            preds.append(p)
            correct += int(gt_ans == p)
        plus += int(correct == 2)
        units.append({"image": rows[i][0], "right": correct, "both": int(correct == 2)})
    acc = sum(g == p for g, p in zip(gts, preds)) / len(gts)  # sklearn accuracy_score: mean of the 0/1 hits
    acc_plus = plus / (len(rows) // 2)  # acc_plus_correct_num / img_num
    task_score = 0  # calculation.py: task_score += v * 100 for k in ("acc", "acc_plus"), in that order
    task_score += acc * 100
    task_score += acc_plus * 100
    return {"acc": acc * 100, "acc_plus": acc_plus * 100, "score": task_score,
            "other": preds.count("other"), "questions": len(rows), "units": units}


def score_mme(per_category: dict[str, list[tuple]]) -> dict:
    """Perception (10 subtasks, max 2000), cognition (4, max 800) and their sum."""
    tasks = {c: mme_task_score(rows) for c, rows in per_category.items()}
    missing_p = [c for c in MME_PERCEPTION if c not in tasks]
    missing_c = [c for c in MME_COGNITION if c not in tasks]
    # calculation.py: scores = 0; scores += task_score, over eval_type_dict's order (Python's sum does the same)
    perception = sum(tasks[c]["score"] for c in MME_PERCEPTION if c in tasks)
    cognition = sum(tasks[c]["score"] for c in MME_COGNITION if c in tasks)
    return {"perception": perception, "cognition": cognition, "total": perception + cognition, "tasks": tasks,
            "missing_perception": missing_p, "missing_cognition": missing_c}
