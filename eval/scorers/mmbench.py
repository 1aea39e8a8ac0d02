"""MMBench: the official local evaluation without the GPT answer extractor.

Ports VLMEvalKit at commit c6bdffd3 (2024-03-19): ``vlmeval/utils/matching_util.py`` (option matching,
``can_infer``: the rule stage of the official evaluator) and ``vlmeval/evaluate/multiple_choice.py``
(CircularEval, ``report_acc``); line numbers in the comments refer to that commit.
"""

from __future__ import annotations

import copy
import string
from collections import defaultdict
from typing import Sequence


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
    # the resampling units: one per circular group (index % 1e6) of answered rows; "question": whether CircularEval
    # scores it (its row below 1e6 answered)
    scored = {u["index"]: (u, r) for u, r in zip(units, units_rounds)}
    group_units = []
    for g in sorted(groups):
        rows_g = [m for m in groups[g] if 0 in answered[m]]
        if not rows_g:
            continue
        u, r = scored.get(g, (None, 0))
        group_units.append({"id": str(g), "tags": {"question": "yes" if u else "no"},
                            "v": {"circular": u["hit"] if u else 0, "rounds": r, "right": sum(int(answered[m][0]) for m in rows_g),
                                  "rows": len(rows_g)}})
    report = _report_acc(units) if units else {"split": [], "Overall": []}
    return {"accuracy": _mean([u["hit"] for u in units]) * 100 if units else 0.0,
            "single_row_accuracy": _mean(single) * 100 if single else 0.0,
            "rounds_accuracy": _mean(units_rounds) * 100 if units_rounds else 0.0,
            "report": report,
            "categories": {k: v[0] * 100 for k, v in report.items() if k not in ("split", "Overall") and len(v) == 1},
            "questions": len(units), "rows": len(single), "copies_max": max((u["copies"] for u in units), default=0),
            "rounds": max((len(v) for v in answered.values()), default=0), "unmatched": unmatched,
            "units": group_units}
