"""MME (evaluation.md 5.5): perception (10 subtasks) and cognition (4), score = acc + acc+ per
subtask, with LLaVA's converter restoring MME's own prompt to look up the ground truth."""

from __future__ import annotations

import os
from pathlib import Path

from .. import scorers
from ..stats import Stat
from .base import EVAL_ZIP, Benchmark, DataFile, Metric, loader_questions


def mme_ground_truth(data_path: Path) -> dict:
    """convert_answer_to_mme.get_gt: (category, txt file, question) -> answer."""
    gt = {}
    for category in os.listdir(data_path):
        category_dir = data_path / category
        if not category_dir.is_dir():
            continue
        if (category_dir / "images").exists():
            qa_path = category_dir / "questions_answers_YN"
        else:
            qa_path = category_dir
        for file in os.listdir(qa_path):
            if not file.endswith(".txt"):
                continue
            for line in open(qa_path / file, encoding="utf-8"):
                question, answer = line.strip().split("\t")
                gt[(category, file, question)] = answer
    return gt


class MME(Benchmark):
    name = "mme"
    title = "MME (perception + cognition)"
    metrics = [Metric("MME-P", "MME perception score (10 subtasks, max 2000)", primary=True),
               Metric("MME-C", "MME cognition score (4 subtasks, max 800)"),
               Metric("MME-P+C", "MME perception + cognition (max 2800)")]
    # the unit is an image with its two questions: 50 x (questions right) + 100 x (both right) is its share of
    # the subtask's acc + acc+ (x 100), so a subtask's score is the mean over its images and MME-P / MME-C the sum
    unit = "image"
    difficulty = ("both", 1.0)
    stats = {"MME-P": Stat(key="score", by="task", combine="sum", groups=tuple(scorers.MME_PERCEPTION), scale=1.0),
             "MME-C": Stat(key="score", by="task", combine="sum", groups=tuple(scorers.MME_COGNITION), scale=1.0),
             "MME-P+C": Stat(key="score", by="task", combine="sum",
                             groups=tuple(scorers.MME_PERCEPTION + scorers.MME_COGNITION), scale=1.0)}
    QUESTIONS = "MME/llava_mme.jsonl"
    RELEASE = "MME/MME_Benchmark_release_version"

    def files(self):
        mme = ("MME release (by request): https://github.com/BradyFU/Awesome-Multimodal-Large-Language-Models/tree/Evaluation;"
               " unpack as MME/MME_Benchmark_release_version")
        return [DataFile(self.QUESTIONS, "inference", EVAL_ZIP),
                DataFile(self.RELEASE, "inference", mme + " (images and ground truth)", "dir")]

    def load(self):
        return loader_questions(self, self.QUESTIONS, self.RELEASE)

    def finalize(self, records, out_dir: Path, ckpt: str, strict: bool = True):
        gt = mme_ground_truth(self.path(self.RELEASE))
        per_cat = scorers.mme_convert(records, gt)
        ans_dir = out_dir / "eval_tool" / "answers" / ckpt
        ans_dir.mkdir(parents=True, exist_ok=True)
        unsafe = 0
        for category, rows in per_cat.items():
            with open(ans_dir / f"{category}.txt", "w", encoding="utf-8") as fp:
                for tup in rows:
                    unsafe += any(("\t" in x or "\n" in x) for x in tup)
                    fp.write("\t".join(tup) + "\n")
        res = scorers.score_mme(per_cat)
        units, seen = [], set()
        for category, task in res["tasks"].items():
            for u in task.pop("units"):
                uid = f"{category}/{u['image']}"
                k = 1
                while uid in seen:  # the same image file in two pairs of a subtask: one unit each
                    uid, k = f"{category}/{u['image']}#{k}", k + 1
                seen.add(uid)
                units.append({"id": uid, "tags": {"task": category},
                              "v": {"right": u["right"], "both": u["both"], "score": 50 * u["right"] + 100 * u["both"]}})
        if strict and (res["missing_perception"] or res["missing_cognition"]):
            raise ValueError(f"MME: subtasks without answers: {res['missing_perception'] + res['missing_cognition']}")
        metrics = {"MME-P": res["perception"], "MME-C": res["cognition"], "MME-P+C": res["total"]}
        details = {"tasks": res["tasks"], "missing": res["missing_perception"] + res["missing_cognition"]}
        if unsafe:
            details["warning"] = (f"{unsafe} answer line(s) contain a tab or newline: the official calculation.py would "
                                  "mis-read those files; the scores here come from the answers themselves")
        return {"metrics": metrics, "details": details, "files": {"eval_tool_answers": str(ans_dir)}, "units": units}
