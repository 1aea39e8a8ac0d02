"""POPE (evaluation.md 5.4): three COCO splits; per-split F1 and their mean (paper value), pooled
F1 (lmms-eval), accuracy. Scoring pairs answers with labels by order, so the merge keeps
question-file order."""

from __future__ import annotations

import json
from pathlib import Path

from .. import scorers
from ..stats import Stat
from .base import EVAL_ZIP, Benchmark, DataFile, Metric, loader_questions, read_jsonl_questions

CATEGORIES = ("adversarial", "popular", "random")


class POPE(Benchmark):
    name = "pope"
    title = "POPE (COCO: adversarial, popular, random)"
    metrics = [Metric("POPE-F1avg3", "POPE F1 averaged over the three splits (paper convention)", primary=True),
               Metric("POPE-F1pooled", "POPE F1 pooled over all questions (lmms-eval pope)"),
               Metric("POPE-acc", "POPE accuracy averaged over the three splits"),
               Metric("POPE-acc-pooled", "POPE accuracy pooled over all questions")] + [
        Metric(f"POPE-F1-{c}", f"POPE F1, {c} split") for c in CATEGORIES]
    stats = {"POPE-F1avg3": Stat(kind="f1", by="split"), "POPE-F1pooled": Stat(kind="f1"),
             "POPE-acc": Stat(by="split"), "POPE-acc-pooled": Stat(binomial=True),
             **{f"POPE-F1-{c}": Stat(kind="f1", where=(("split", c),)) for c in CATEGORIES}}
    QUESTIONS = "pope/llava_pope_test.jsonl"
    IMAGES = "pope/val2014"
    LABELS = "pope/coco"

    def files(self):
        pope = "POPE repository https://github.com/AoiDragon/POPE/tree/e3e39262c85a6a83f26cf5094022a782cb0df58d/output/coco"
        return [DataFile(self.QUESTIONS, "inference", EVAL_ZIP),
                DataFile(self.IMAGES, "inference", "COCO val2014 images http://images.cocodataset.org/zips/val2014.zip", "dir")] + [
            DataFile(f"{self.LABELS}/coco_pope_{c}.json", "scoring", pope) for c in CATEGORIES]

    def load(self):
        return loader_questions(self, self.QUESTIONS, self.IMAGES)

    def finalize(self, records, out_dir: Path, ckpt: str, strict: bool = True):
        label_files = {c: self.path(self.LABELS) / f"coco_pope_{c}.json" for c in CATEGORIES}
        missing = [str(p) for p in label_files.values() if not p.exists()]
        if missing:
            return {"metrics": {}, "files": {}, "pending": [f"score: label file(s) missing: {missing}; then `python -m eval score`"]}
        labels = {c: [json.loads(ln)["label"] for ln in open(p, encoding="utf-8") if ln.strip()] for c, p in label_files.items()}
        category = {q["question_id"]: q["category"] for q in read_jsonl_questions(self.path(self.QUESTIONS))}
        res = scorers.score_pope(records, category, labels)
        metrics = {"POPE-F1avg3": res["f1_avg3"], "POPE-F1pooled": res["f1_pooled"], "POPE-acc": res["acc_avg3"],
                   "POPE-acc-pooled": res["acc_pooled"]}
        for c, m in res["categories"].items():
            metrics[f"POPE-F1-{c}"] = m["f1"] * 100
        details = {"categories": res["categories"], "pooled": res["pooled"]}
        if any(m["samples"] != m["labels"] for m in res["categories"].values()):
            details["warning"] = "answer and label counts differ in some split: the official pairing by order truncates"
        return {"metrics": metrics, "details": details, "files": {}, "units": res["units"]}
