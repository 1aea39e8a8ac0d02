"""Official scoring rules, one function per official script, ported line by line.

Sources (reference/evaluation.md section 5; the upstream files named on each function):

* haotian-liu/LLaVA ``llava/eval/m4c_evaluator.py`` (EvalAI answer processor, TextVQA soft accuracy),
  ``eval_textvqa.py``, ``eval_pope.py``, ``eval_science_qa.py``, ``scripts/convert_*.py``;
  ``playground/data/eval/MME/convert_answer_to_mme.py`` and MME's ``eval_tool/calculation.py``;
* the GQA evaluation script ``eval.py`` (accuracy / binary / open over balanced questions);
* the VQA API ``vqaEval.py`` as used for VQAv2 val by lmms-eval (``tasks/vqav2/utils.py``);
* VLMEvalKit ``vlmeval/utils/matching_util.py`` at commit c6bdffd3 (2024-03-19): MMBench option
  matching (``can_infer``), the rule stage of the official MMBench evaluator;
* MM-Vet's GPT grader (``mm-vet_evaluator``; as ported in Video-LLaVA ``scripts/eval_gpt_mmvet.py``);
* Video-ChatGPT / Video-LLaVA ``eval_video_qa.py`` (judge aggregation).

Quirks of the originals are kept on purpose (each is marked "upstream quirk") because they change
numbers; where an original would crash, the behaviour chosen here is marked "deviation".
"""

from __future__ import annotations

import copy
import re
import string
from collections import defaultdict
from typing import Iterable, Sequence

# ---------------------------------------------------------------------------------------------
# EvalAI answer processor (VQAv2, VizWiz, TextVQA): LLaVA llava/eval/m4c_evaluator.py
# ---------------------------------------------------------------------------------------------


class EvalAIAnswerProcessor:
    """Port of ``EvalAIAnswerProcessor`` (LLaVA m4c_evaluator.py, itself copied from mmf)."""

    CONTRACTIONS = {
        "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
        "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
        "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
        "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
        "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
        "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
        "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
        "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
        "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
        "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
        "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
        "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
        "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
        "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
        "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
        "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
        "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
        "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
        "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
        "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
        "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
        "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
        "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
        "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
        "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
        "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
        "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
        "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
        "youve": "you've",
    }
    NUMBER_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                  "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
    ARTICLES = ["a", "an", "the"]
    # upstream quirk: "(?!<=\d)" is a typo for a look-behind; it is a (no-op) look-ahead for "<=".
    PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
    COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
    PUNCTUATIONS = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                    ",", "?", "!"]

    def word_tokenize(self, word: str) -> str:
        word = word.lower()
        word = word.replace(",", "").replace("?", "").replace("'s", " 's")
        return word.strip()

    def process_punctuation(self, in_text: str) -> str:
        out_text = in_text
        for p in self.PUNCTUATIONS:
            if (p + " " in in_text or " " + p in in_text) or (re.search(self.COMMA_STRIP, in_text) is not None):
                out_text = out_text.replace(p, "")
            else:
                out_text = out_text.replace(p, " ")
        # upstream quirk: `.sub("", text, re.UNICODE)` passes re.UNICODE (= 32) as the *count*:
        # at most 32 periods are stripped.
        out_text = self.PERIOD_STRIP.sub("", out_text, count=int(re.UNICODE))
        return out_text

    def process_digit_article(self, in_text: str) -> str:
        out_text = []
        for word in in_text.lower().split():
            word = self.NUMBER_MAP.get(word, word)
            if word not in self.ARTICLES:
                out_text.append(word)
        for i, word in enumerate(out_text):
            if word in self.CONTRACTIONS:
                out_text[i] = self.CONTRACTIONS[word]
        return " ".join(out_text)

    def __call__(self, item: str) -> str:
        item = self.word_tokenize(item)
        item = item.replace("\n", " ").replace("\t", " ").strip()
        item = self.process_punctuation(item)
        item = self.process_digit_article(item)
        return item


_EVALAI = EvalAIAnswerProcessor()


def evalai_normalize(text: str) -> str:
    return _EVALAI(text)


# ---------------------------------------------------------------------------------------------
# TextVQA: LLaVA llava/eval/eval_textvqa.py + m4c_evaluator.TextVQAAccuracyEvaluator
# ---------------------------------------------------------------------------------------------


def textvqa_answer_scores(raw_answers: Sequence[str]) -> dict[str, float]:
    """Soft score of every distinct (normalised) human answer: for each of the 10 leave-one-out
    subsets, min(1, matches / 3), averaged."""
    answers = [_EVALAI(a) for a in raw_answers]
    if len(answers) != 10:
        raise ValueError(f"TextVQA expects 10 human answers per question, got {len(answers)}")
    gt_answers = list(enumerate(answers))
    scores = {}
    for unique_answer in set(answers):
        accs = []
        for gt_answer in gt_answers:
            other_answers = [item for item in gt_answers if item != gt_answer]
            matching = [item for item in other_answers if item[1] == unique_answer]
            accs.append(min(1, float(len(matching)) / 3))
        scores[unique_answer] = sum(accs) / len(accs)
    return scores


def textvqa_question_from_prompt(prompt: str) -> str:
    """``prompt_processor`` of eval_textvqa.py: the question line of the recorded prompt, lower-cased."""
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        question = match.group(1)
    elif "Reference OCR token: " in prompt and len(prompt.split("\n")) == 3:
        question = prompt.split("\n")[1] if prompt.startswith("Reference OCR token:") else prompt.split("\n")[0]
    elif len(prompt.split("\n")) == 2:
        question = prompt.split("\n")[0]
    else:
        raise ValueError(f"TextVQA: cannot recover the question from prompt {prompt!r}")
    return question.lower()


def score_textvqa(records: Iterable[dict], annotations: list[dict]) -> dict:
    """eval_textvqa.eval_single: match each answer to its annotation by (image id, question), then
    the mean soft accuracy x 100."""
    index = {(a["image_id"], a["question"].lower()): a for a in annotations}
    scores = []
    for r in records:
        ann = index[(r["question_id"], textvqa_question_from_prompt(r["prompt"]))]
        scores.append(textvqa_answer_scores(ann["answers"]).get(_EVALAI(r["text"]), 0.0))
    if not scores:
        raise ValueError("TextVQA: no answers to score")
    # eval_textvqa.py line 61: 100. * eval_pred_list(...); m4c_evaluator.py line 256: sum(pred_scores) / len(pred_scores)
    return {"accuracy": 100.0 * (sum(scores) / len(scores)), "samples": len(scores), "per_sample": scores}


# ---------------------------------------------------------------------------------------------
# VQAv2: scripts/convert_vqav2_for_submission.py; val accuracy as vqaEval.py / lmms-eval
# ---------------------------------------------------------------------------------------------


def convert_vqav2_submission(records: Iterable[dict], test_questions: Iterable[dict]) -> list[dict]:
    """Upload file for EvalAI: every question of the full test2015 file, answers normalised,
    an empty answer where there is none (convert_vqav2_for_submission.py)."""
    results = {x["question_id"]: x["text"] for x in records}
    out = []
    for x in test_questions:
        if x["question_id"] not in results:
            out.append({"question_id": x["question_id"], "answer": ""})
        else:
            out.append({"question_id": x["question_id"], "answer": _EVALAI(results[x["question_id"]])})
    return out


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Standard VQA accuracy of one prediction (VQA API vqaEval.py as applied by lmms-eval's
    ``vqav2_process_results``): the prediction goes through the EvalAI processor; if the humans
    disagree, punctuation / digit-article processing is applied to both sides; then the mean
    over the 10 leave-one-out subsets of min(1, matches / 3)."""
    res = _EVALAI(prediction)
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in gt_answers]
    if len(set(gts)) > 1:
        gts = [_EVALAI.process_digit_article(_EVALAI.process_punctuation(a)) for a in gts]
        res = _EVALAI.process_digit_article(_EVALAI.process_punctuation(res))
    items = list(enumerate(gts))
    accs = []
    for gt in items:
        others = [it for it in items if it != gt]
        accs.append(min(1, float(len([it for it in others if it[1] == res])) / 3))
    return sum(accs) / len(accs)


def score_vqav2_val(records: Iterable[dict], annotations: dict) -> dict:
    """VQAv2 val accuracy x 100 over the answered questions; ``annotations`` maps question id to
    the list of 10 human answers (v2_mscoco_val2014_annotations.json)."""
    accs = [vqa_accuracy(r["text"], annotations[r["question_id"]]) for r in records]
    if not accs:
        raise ValueError("VQAv2 val: no answers to score")
    # vqaEval.py setAccuracy: round(100*float(sum(accQA))/len(accQA), n); unrounded here (``accuracy_rounded``: n = 2)
    acc = 100 * float(sum(accs)) / len(accs)
    return {"accuracy": acc, "accuracy_rounded": round(acc, 2), "samples": len(accs)}


# ---------------------------------------------------------------------------------------------
# VizWiz: scripts/convert_vizwiz_for_submission.py
# ---------------------------------------------------------------------------------------------


def convert_vizwiz_submission(records: Iterable[dict], questions: Iterable[dict]) -> list[dict]:
    results = {x["question_id"]: x["text"] for x in records}
    out = []
    for x in questions:
        if x["question_id"] not in results:  # upstream asserts
            raise ValueError(f"VizWiz: no answer for question {x['question_id']}")
        out.append({"image": x["image"], "answer": _EVALAI(results[x["question_id"]])})
    return out


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
    acc, binary, open_ = [], [], []
    for qid, q in scored_q.items():
        if not q.get("isBalanced", True) or qid not in preds:
            continue
        score = float(1 if preds[qid] == q["answer"] else 0)  # toScore(predicted == gold)
        acc.append(score)
        (open_ if q.get("types", {}).get("structural") == "query" else binary).append(score)

    def avg(xs):  # eval.py avg(): 0 for an empty list, then * 100 at the report
        return float(sum(xs)) / len(xs) if xs else 0

    return {"accuracy": avg(acc) * 100, "binary": avg(binary) * 100, "open": avg(open_) * 100, "samples": len(acc),
            "missing": len(missing), "not_asked": not_asked,
            "unknown_predictions": sum(1 for qid in preds if qid not in questions)}


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
    for cat in sorted(labels):
        answers = [pope_parse(r["text"]) for r in records if question_category[r["question_id"]] == cat]
        if not answers:
            continue
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
    gts, preds, plus = [], [], 0
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
    acc = sum(g == p for g, p in zip(gts, preds)) / len(gts)  # sklearn accuracy_score: mean of the 0/1 hits
    acc_plus = plus / (len(rows) // 2)  # acc_plus_correct_num / img_num
    task_score = 0  # calculation.py: task_score += v * 100 for k in ("acc", "acc_plus"), in that order
    task_score += acc * 100
    task_score += acc_plus * 100
    return {"acc": acc * 100, "acc_plus": acc_plus * 100, "score": task_score,
            "other": preds.count("other"), "questions": len(rows)}


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

    total, per_type, n = one(None)
    img, _, n_img = one("image")
    vid, _, n_vid = one("video")
    return {"all": total, "image": img, "video": vid, "per_type": per_type, "questions": n,
            "image_questions": n_img, "video_questions": n_vid}


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


# ---------------------------------------------------------------------------------------------
# MMBench: VLMEvalKit matching_util.can_infer (c6bdffd3), single round local letter match
# ---------------------------------------------------------------------------------------------


def mmb_can_infer_option(answer: str, choices) -> str | bool:
    if "Failed to obtain answer via API" in answer:
        return False
    reject_to_answer = [
        "Sorry, I can't help with images of people yet.",
        "I can't process this file.",
        "I'm sorry, but without the image provided",
        "Cannot determine the answer",
    ]
    for err in reject_to_answer:
        if err in answer:
            return "Z"

    def count_choice(splits, choices, prefix="", suffix=""):
        return sum(1 for c in choices if prefix + c + suffix in splits)

    answer_mod = copy.copy(answer)
    for c in ".()[],:;!*#{}":
        answer_mod = answer_mod.replace(c, " ")
    splits = [x.strip() for x in answer_mod.split()]
    count = count_choice(splits, choices)
    if count == 1:
        for ch in choices:
            # (the 'A might be a quantifier' rejection only runs with VERBOSE set upstream)
            if ch in splits:
                return ch
    elif count == 0 and count_choice(splits, {"Z", ""}) == 1:
        return "Z"
    return False


def mmb_can_infer_text(answer: str, choices: dict) -> str | bool:
    answer = answer.lower()
    lowered = {}
    for k in choices:
        if k not in string.ascii_uppercase:
            raise ValueError(f"MMBench option key {k!r}")
        lowered[k] = str(choices[k]).lower()
    cands = [k for k in lowered if lowered[k] in answer]
    return cands[0] if len(cands) == 1 else False


def mmb_can_infer(answer, choices: dict) -> str | bool:
    answer = str(answer)
    copt = mmb_can_infer_option(answer, choices)
    return copt if copt else mmb_can_infer_text(answer, choices)


# pandas' default NA strings (read_table / read_excel): a cell holding one of these reads back as NaN
PANDAS_NA_STRINGS = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                               "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
MMB_L2_ABBRS = {  # multiple_choice.py lines 11-18 (c6bdffd3)
    "coarse_perception": "CP",
    "finegrained_perception (instance-level)": "FP-S",
    "finegrained_perception (cross-instance)": "FP-C",
    "logic_reasoning": "LR",
    "relation_reasoning": "RR",
    "attribute_reasoning": "AR",
}
MMB_CIRCULAR = 1000000  # int(1e6): a circular copy of question i has index i + k * 1e6


def mmb_prediction_cell(text) -> str:
    """The prediction as the official evaluator sees it: LLaVA writes it into the submission xlsx,
    VLMEvalKit reads it back with pandas and applies ``str`` (multiple_choice.py line 276), so an
    empty answer or one of pandas' NA strings becomes ``'nan'``."""
    text = "" if text is None else str(text)
    return "nan" if text in PANDAS_NA_STRINGS else text


def _mean(xs: Sequence) -> float:
    """``np.mean`` of a 0/1 column: the float sum over the count (exact for these sizes)."""
    return sum(xs) / len(xs)


def _report_acc(units: list[dict]) -> dict:
    """multiple_choice.report_acc (lines 37-60): per split, the mean hit overall, then per
    l2-category (abbreviated) and per category, names sorted; fractions, as the script prints."""
    splits = list(dict.fromkeys(u["split"] for u in units))  # upstream: list(set(...)) (order unspecified)
    res: dict = {"split": splits,
                 "Overall": [_mean([u["hit"] for u in units if u["split"] == sp]) for sp in splits]}
    for group in ("l2-category", "category"):
        if all(u.get(group) is None for u in units):
            continue
        for ab in sorted({u.get(group) for u in units}, key=str):
            name = MMB_L2_ABBRS.get(ab, ab)
            sub = [u for u in units if u.get(group) == ab]
            res[name] = [(_mean([u["hit"] for u in sub if u["split"] == sp]) if any(u["split"] == sp for u in sub)
                          else float("nan")) for sp in splits]
    return res


def score_mmbench_local(records: Sequence[dict], rows: Sequence[dict]) -> dict:
    """MMBench dev scored locally as VLMEvalKit's ``multiple_choice_eval`` does with
    ``--model exact_matching`` (vlmeval/evaluate/multiple_choice.py, c6bdffd3), i.e. the official
    local evaluation without the GPT answer extractor.

    ``rows``: the TSV rows in file order, each ``{"index": int, "answer": letter, "choices":
    {letter: text} (the non-NaN A-Z columns, build_choices lines 99-104), "category",
    "l2-category", "split"}``. ``records``: LLaVA's answer records (``question_id`` = the row's
    index, ``round_id``, ``text``; ``options`` / ``option_char`` for rounds > 0).

    CircularEval (lines 302-333, 145-165): the questions are the rows with index < 1e6; a question
    counts right only if *every* row with the same ``index % 1e6`` (its circular copies, which the
    dev TSV holds as separate rows with rotated options and answers) is matched by ``can_infer``
    against that row's own choices to that row's own answer. Overall / per-category / per
    l2-category accuracy = mean hit over the questions (report_acc), reported here x 100.

    The round-0 answer of a row (the prompt with the TSV's own letters) is the one scored; with
    LLaVA's ``--all-rounds`` the other rounds (options rotated in the prompt, matched through the
    record's ``option_char``) give ``rounds_accuracy``: a question counts only if every round of
    every copy is right (ours, not an official number). ``single_row_accuracy``: every answered row
    scored alone (the rate a per-row evaluator reports; not the MMBench score)."""
    by_index = {}
    for row in rows:
        by_index[int(row["index"])] = row
    answered: dict[int, dict[int, bool]] = defaultdict(dict)  # row index -> round -> hit
    letters_of: dict[int, str | bool] = {}
    unmatched = 0
    for r in records:
        idx = int(r["question_id"])
        if idx not in by_index:
            raise ValueError(f"MMBench: answer for question_id {idx}, which is not an index of the TSV")
        row = by_index[idx]
        rnd = int(r.get("round_id", 0) or 0)
        text = mmb_prediction_cell(r.get("text"))
        if rnd == 0:
            hit = mmb_can_infer(text, row["choices"])  # prefetch_answer, lines 107-109
            original = hit
        else:
            for field in ("options", "option_char"):
                if field not in r:
                    raise ValueError(f"MMBench: the answer record of question {idx}, round {rnd} has no {field!r} "
                                     "(needed to map a rotated round's letter back to the TSV's letters)")
            letters = [chr(ord("A") + i) for i in range(len(r["options"]))]
            hit = mmb_can_infer(text, dict(zip(letters, r["options"])))
            original = r["option_char"][letters.index(hit)] if hit in letters else False
        if not hit or hit == "Z":
            unmatched += 1
        if rnd == 0:
            letters_of[idx] = original
        answered[idx][rnd] = original == row["answer"]
    if not answered:
        raise ValueError("MMBench: no answers to score")
    # the question rows: index < 1e6, answered (data_main, lines 302-305); the copies of each one:
    # every answered row with the same index % 1e6 (line 323), sorted by index (line 275)
    groups: dict[int, list[int]] = defaultdict(list)
    for idx in sorted(answered):
        groups[idx % MMB_CIRCULAR].append(idx)
    units, units_rounds = [], []
    for idx in sorted(answered):
        if idx >= MMB_CIRCULAR or 0 not in answered[idx]:
            continue
        members = [m for m in groups[idx] if 0 in answered[m]]
        row = by_index[idx]
        hit = int(all(answered[m][0] for m in members))
        units.append({"index": idx, "hit": hit, "copies": len(members), "category": row.get("category"),
                      "l2-category": row.get("l2-category"), "split": row.get("split") or "none"})
        units_rounds.append(int(all(all(answered[m].values()) for m in groups[idx])))
    single = [int(answered[i][0]) for i in sorted(answered) if 0 in answered[i]]
    report = _report_acc(units) if units else {"split": [], "Overall": []}
    return {"accuracy": _mean([u["hit"] for u in units]) * 100 if units else 0.0,
            "single_row_accuracy": _mean(single) * 100 if single else 0.0,
            "rounds_accuracy": _mean(units_rounds) * 100 if units_rounds else 0.0,
            "report": report,
            "categories": {k: v[0] * 100 for k, v in report.items() if k not in ("split", "Overall") and len(v) == 1},
            "questions": len(units), "rows": len(single), "copies_max": max((u["copies"] for u in units), default=0),
            "rounds": max((len(v) for v in answered.values()), default=0), "unmatched": unmatched}


# ---------------------------------------------------------------------------------------------
# MM-Vet: convert_mmvet_for_eval.py + the GPT grader's aggregation
# ---------------------------------------------------------------------------------------------


def convert_mmvet(records: Iterable[dict]) -> dict:
    return {f"v1_{r['question_id']}": r["text"] for r in records}


MMVET_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""


def mmvet_grader_prompt(question: str, answer: str, prediction: str, retry: bool = False) -> str:
    text = MMVET_PROMPT + "\n" + " | ".join(
        [question, answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> "), prediction, ""])
    return text + "\nPredict the correctness of the answer (digit): " if retry else text


def mmvet_parse_score(content: str) -> float | None:
    try:
        score = float(content.split(" ")[0].strip())
    except ValueError:
        return None
    return score if 0.0 <= score <= 1.0 else None


def score_mmvet(grades: dict[str, float], metadata: dict) -> dict:
    """Total and per-capability scores x 100 (one grading run): a capability's score is the sum
    of its samples' grades over its sample count."""
    caps: dict[str, list[float]] = defaultdict(list)
    for key, item in metadata.items():
        for c in set(item["capability"]):
            caps[c].append(grades.get(key, 0.0))
    total = sum(grades.get(k, 0.0) for k in metadata) / len(metadata) * 100 if metadata else 0.0
    return {"total": total, "capabilities": {c: 100.0 * sum(v) / len(v) for c, v in caps.items()},
            "graded": sum(1 for k in metadata if k in grades), "questions": len(metadata)}


# ---------------------------------------------------------------------------------------------
# Video QA: Video-LLaVA / Video-ChatGPT eval_video_qa.py
# ---------------------------------------------------------------------------------------------

VIDEOQA_SYSTEM = (
    "You are an intelligent chatbot designed for evaluating the correctness of generative outputs for question-answer pairs. "
    "Your task is to compare the predicted answer with the correct answer and determine if they match meaningfully. Here's how you can accomplish the task:"
    "------"
    "##INSTRUCTIONS: "
    "- Focus on the meaningful match between the predicted answer and the correct answer.\n"
    "- Consider synonyms or paraphrases as valid matches.\n"
    "- Evaluate the correctness of the prediction compared to the answer."
)


def videoqa_user_prompt(question: str, answer: str, pred: str) -> str:
    return ("Please evaluate the following video-based question-answer pair:\n\n"
            f"Question: {question}\n"
            f"Correct Answer: {answer}\n"
            f"Predicted Answer: {pred}\n\n"
            "Provide your evaluation only as a yes/no and score where the score is an integer value between 0 and 5, with 5 indicating the highest meaningful match. "
            "Please generate the response in the form of a Python dictionary string with keys 'pred' and 'score', where value of 'pred' is  a string of 'yes' or 'no' and value of 'score' is in INTEGER, not STRING."
            "DO NOT PROVIDE ANY OTHER OUTPUT TEXT OR EXPLANATION. Only provide the Python dictionary string. "
            "For example, your response should look like this: {'pred': 'yes', 'score': 4.8}.")


def score_videoqa(judgements: dict[str, dict]) -> dict:
    """eval_video_qa.py aggregation: Accuracy = #yes / (#yes + #no) (a 'pred' containing 'yes'
    counts yes, else one containing 'no' counts no); Score = sum of int(score) / #judged
    (an entry whose fields do not parse still counts in the denominator, upstream quirk)."""
    score_sum = count = yes = no = 0
    for result in judgements.values():
        count += 1
        try:
            score_sum += int(result["score"])
            pred = result["pred"]
            if "yes" in pred.lower():
                yes += 1
            elif "no" in pred.lower():
                no += 1
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
    return {"accuracy": 100.0 * yes / (yes + no) if yes + no else 0.0, "score": score_sum / count if count else 0.0,
            "yes": yes, "no": no, "judged": count}
