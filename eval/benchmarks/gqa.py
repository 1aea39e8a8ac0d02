"""GQA testdev-balanced (evaluation.md 5.1): LLaVA's question file, exact-match accuracy as the
official GQA evaluator computes it."""

from __future__ import annotations

from pathlib import Path

from .. import scorers
from ..stats import Stat
from ..io import read_json, write_json
from .base import EVAL_ZIP, Benchmark, DataFile, Metric, loader_questions, read_jsonl_questions


class GQA(Benchmark):
    name = "gqa"
    title = "GQA (testdev-balanced)"
    metrics = [Metric("GQA", "GQA testdev-balanced accuracy (exact match, official eval.py)", primary=True),
               Metric("GQA-binary", "GQA testdev-balanced, binary questions"),
               Metric("GQA-open", "GQA testdev-balanced, open (query) questions")]
    stats = {"GQA": Stat(binomial=True), "GQA-binary": Stat(where=(("type", "binary"),), binomial=True),
             "GQA-open": Stat(where=(("type", "open"),), binomial=True)}
    QUESTIONS = "gqa/llava_gqa_testdev_balanced.jsonl"
    IMAGES = "gqa/data/images"
    TIER = "gqa/data/testdev_balanced_questions.json"

    def files(self):
        src = "GQA download page https://cs.stanford.edu/people/dorarad/gqa/download.html"
        return [DataFile(self.QUESTIONS, "inference", EVAL_ZIP),
                DataFile(self.IMAGES, "inference", f"{src} (images.zip, extract to gqa/data/images)", "dir"),
                DataFile(self.TIER, "scoring", f"{src} (questions1.2.zip: testdev_balanced_questions.json into gqa/data)")]

    def load(self):
        return loader_questions(self, self.QUESTIONS, self.IMAGES)

    def finalize(self, records, out_dir: Path, ckpt: str, strict: bool = True):
        preds = scorers.convert_gqa_predictions(records)
        pred_file = write_json(out_dir / "upload" / "testdev_balanced_predictions.json", preds, indent=None)
        files = {"predictions": str(pred_file)}
        tier = self.path(self.TIER)
        if not tier.exists():
            return {"metrics": {}, "files": files,
                    "pending": [f"score: {self.TIER} is missing under DATA_ROOT; add it, then `python -m eval score`"]}
        # score the questions LLaVA's question file asks: the official testdev_balanced_questions.json
        # may hold more (counted in details.not_asked); an asked question without an answer stays an error
        asked = [q["question_id"] for q in read_jsonl_questions(self.path(self.QUESTIONS))]
        res = scorers.score_gqa(preds, read_json(tier), strict=strict, asked=asked)
        details = {k: res[k] for k in ("samples", "missing", "not_asked", "unknown_predictions")}
        if res["not_asked"]:
            details["warning"] = (f"{res['not_asked']} balanced question(s) of {self.TIER} are not in {self.QUESTIONS}: "
                                  "scored over the asked ones only; GQA's eval.py itself stops with 'missing "
                                  "predictions' on such a tier file (LLaVA's file asks all 12,578 testdev-balanced "
                                  "questions, where both agree)")
        return {"metrics": {"GQA": res["accuracy"], "GQA-binary": res["binary"], "GQA-open": res["open"]},
                "details": details, "files": files, "units": res["units"]}
