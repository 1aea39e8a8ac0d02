"""VizWiz test (evaluation.md 5.10): the shipped question file, upload file for the EvalAI server."""

from __future__ import annotations

from pathlib import Path

from .. import scorers
from ..io import write_json
from .base import EVAL_ZIP, Benchmark, DataFile, Metric, loader_questions, read_jsonl_questions


class VizWiz(Benchmark):
    name = "vizwiz"
    title = "VizWiz test (EvalAI submission)"
    metrics = [Metric("VizWiz", "VizWiz test accuracy from the EvalAI server", primary=True)]
    needs_server = True
    QUESTIONS = "vizwiz/llava_test.jsonl"
    IMAGES = "vizwiz/test"

    def files(self):
        return [DataFile(self.QUESTIONS, "inference", EVAL_ZIP + " (use the shipped file; do not regenerate)"),
                DataFile(self.IMAGES, "inference", "VizWiz test images https://vizwiz.cs.colorado.edu/VizWiz_final/images/test.zip", "dir")]

    def load(self):
        return loader_questions(self, self.QUESTIONS, self.IMAGES)

    def finalize(self, records, out_dir: Path, ckpt: str, strict: bool = True):
        questions = read_jsonl_questions(self.path(self.QUESTIONS))
        if not strict:
            answered = {r["question_id"] for r in records}
            questions = [q for q in questions if q["question_id"] in answered]
        upload = scorers.convert_vizwiz_submission(records, questions)
        dst = write_json(out_dir / "answers_upload" / f"{ckpt}.json", upload, indent=None)
        return {"metrics": {}, "files": {"upload": str(dst)},
                "pending": [f"VizWiz: submit {dst} to https://eval.ai/web/challenges/challenge-page/2185, then "
                            "`python -m eval record RESULTS VizWiz=<overall>`"]}
