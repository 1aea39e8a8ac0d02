"""Open-ended short answers normalised by the EvalAI answer processor: TextVQA, VQAv2, VizWiz.

Ports, line by line (docs/evaluation.md, section 2):

* haotian-liu/LLaVA ``llava/eval/m4c_evaluator.py`` (``EvalAIAnswerProcessor``, itself copied from mmf;
  ``TextVQAAccuracyEvaluator``'s soft accuracy) and ``llava/eval/eval_textvqa.py``;
* LLaVA ``scripts/convert_vqav2_for_submission.py`` and ``scripts/convert_vizwiz_for_submission.py``;
* the VQA API ``vqaEval.py`` as used for VQAv2 val by lmms-eval (``tasks/vqav2/utils.py``).

Quirks of the originals are kept on purpose (each is marked "upstream quirk") because they change
numbers; where an original would crash, the behaviour chosen here is marked "deviation".
"""

from __future__ import annotations

import re
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
    return {"accuracy": acc, "accuracy_rounded": round(acc, 2), "samples": len(accs), "per_sample": accs}


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
