"""SEED-Bench (evaluation.md 5.9): LLaVA's question file (images + middle video frames), exact
letter match; all / image-only / video-only accuracy."""

from __future__ import annotations

from pathlib import Path

from .. import scorers
from ..stats import Stat
from ..io import read_json, write_jsonl
from .base import EVAL_ZIP, Benchmark, DataFile, Metric, loader_questions


class SEED(Benchmark):
    name = "seed"
    title = "SEED-Bench"
    metrics = [Metric("SEED-all", "SEED-Bench accuracy, all questions (image + video frame)", primary=True),
               Metric("SEED-IMG", "SEED-Bench accuracy, image questions only"),
               Metric("SEED-video", "SEED-Bench accuracy, video questions only (middle frame)")]
    stats = {"SEED-all": Stat(binomial=True), "SEED-IMG": Stat(where=(("data_type", "image"),), binomial=True),
             "SEED-video": Stat(where=(("data_type", "video"),), binomial=True)}
    QUESTIONS = "seed_bench/llava-seed-bench.jsonl"
    IMAGES = "seed_bench"
    ANNOTATION = "seed_bench/SEED-Bench.json"

    def files(self):
        src = "SEED-Bench DATASET.md https://github.com/AILab-CVC/SEED-Bench/blob/main/DATASET.md"
        return [DataFile(self.QUESTIONS, "inference", EVAL_ZIP),
                DataFile("seed_bench/SEED-Bench-image", "inference", src, "dir"),
                DataFile("seed_bench/SEED-Bench-video-image", "inference",
                         "middle frames of the SEED-Bench videos (LLaVA eval.zip seed_bench/extract_video_frames.py)", "dir"),
                DataFile(self.ANNOTATION, "scoring", src)]

    def load(self):
        return loader_questions(self, self.QUESTIONS, self.IMAGES)

    def finalize(self, records, out_dir: Path, ckpt: str, strict: bool = True):
        ann_path = self.path(self.ANNOTATION)
        if not ann_path.exists():
            return {"metrics": {}, "files": {}, "pending": [f"score: {self.ANNOTATION} missing; then `python -m eval score`"]}
        ann = read_json(ann_path)
        if not strict:
            answered = {str(r["question_id"]) for r in records}
            ann = {**ann, "questions": [q for q in ann["questions"] if str(q["question_id"]) in answered]}
        res = scorers.score_seed(records, ann)
        upload = write_jsonl(out_dir / "answers_upload" / f"{ckpt}.jsonl", scorers.convert_seed_upload(records, ann))
        return {"metrics": {"SEED-all": res["all"], "SEED-IMG": res["image"], "SEED-video": res["video"]},
                "details": {"per_type": res["per_type"], "questions": res["questions"]}, "files": {"upload": str(upload)},
                "units": res["units"]}
