"""MM-Vet (evaluation.md 5.8): free-form answers; the results file for the GPT grader; the
grader itself runs through a configurable OpenAI-compatible judge (eval.judge)."""

from __future__ import annotations

from pathlib import Path

from .. import scorers
from ..stats import Stat
from ..io import read_json, write_json
from .base import EVAL_ZIP, Benchmark, DataFile, Metric, loader_questions


class MMVet(Benchmark):
    name = "mmvet"
    title = "MM-Vet"
    protocol = "llava.eval.model_vqa"
    max_new_tokens = 1024
    needs_judge = True
    metrics = [Metric("MM-Vet", "MM-Vet total score from an LLM grader (judge model and date in the results)", primary=True)]
    stats = {"MM-Vet": Stat(key="grade")}  # the judge's 0-1 grade per question, mean x 100: a bootstrap
    difficulty = ("grade", 1.0)
    QUESTIONS = "mm-vet/llava-mm-vet.jsonl"
    IMAGES = "mm-vet/images"
    METADATA = "mm-vet/mm-vet.json"

    def files(self):
        src = "MM-Vet https://github.com/yuweihao/MM-Vet/releases/download/v1/mm-vet.zip (extract to mm-vet)"
        return [DataFile(self.QUESTIONS, "inference", EVAL_ZIP), DataFile(self.IMAGES, "inference", src, "dir"),
                DataFile(self.METADATA, "scoring", src + " (ground truth for the grader)")]

    def load(self):
        return loader_questions(self, self.QUESTIONS, self.IMAGES)

    def finalize(self, records, out_dir: Path, ckpt: str, strict: bool = True):
        dst = write_json(out_dir / "results" / f"{ckpt}.json", scorers.convert_mmvet(records))
        return {"metrics": {}, "files": {"results": str(dst)},
                "pending": [f"MM-Vet: grade with `python -m eval judge {out_dir}` (OpenAI-compatible judge), "
                            f"or upload {dst} to the official grader"]}

    def judge_items(self, records) -> dict[str, dict]:
        meta = read_json(self.path(self.METADATA))
        answers = scorers.convert_mmvet(records)
        return {k: {"question": v["question"], "answer": v["answer"], "pred": answers.get(k, "")}
                for k, v in meta.items() if k in answers}

    def judged_metrics(self, grades: dict[str, float], strict: bool = True) -> dict:
        meta = read_json(self.path(self.METADATA))
        if not strict:
            meta = {k: v for k, v in meta.items() if k in grades}
        res = scorers.score_mmvet(grades, meta)
        units = res.pop("units")
        return {"metrics": {"MM-Vet": res["total"]}, "details": res, "units": units}
