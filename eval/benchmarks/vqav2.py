"""VQAv2 (evaluation.md 5.2): test-dev inference + the EvalAI upload file (server score), and a
local score on val (a different number, label VQAv2-val)."""

from __future__ import annotations

from pathlib import Path

from .. import scorers
from ..stats import Stat
from ..io import read_json, write_json
from .base import EVAL_ZIP, SHORT_ANSWER, Benchmark, DataFile, Metric, Question, loader_questions, read_jsonl_questions


class VQAv2TestDev(Benchmark):
    name = "vqav2"
    title = "VQAv2 test-dev (EvalAI submission)"
    metrics = [Metric("VQAv2-testdev", "VQAv2 test-dev accuracy from the EvalAI server", primary=True)]
    needs_server = True
    SPLIT = "llava_vqav2_mscoco_test-dev2015"
    QUESTIONS = f"vqav2/{SPLIT}.jsonl"
    ALL_TEST = "vqav2/llava_vqav2_mscoco_test2015.jsonl"
    IMAGES = "vqav2/test2015"

    def files(self):
        return [DataFile(self.QUESTIONS, "inference", EVAL_ZIP),
                DataFile(self.IMAGES, "inference", "COCO test2015 images http://images.cocodataset.org/zips/test2015.zip", "dir"),
                DataFile(self.ALL_TEST, "scoring", EVAL_ZIP + " (the upload file lists every test2015 question)")]

    def load(self):
        return loader_questions(self, self.QUESTIONS, self.IMAGES)

    def finalize(self, records, out_dir: Path, ckpt: str, strict: bool = True):
        all_test = self.path(self.ALL_TEST)
        if not all_test.exists():
            return {"metrics": {}, "files": {},
                    "pending": [f"upload file: {self.ALL_TEST} is missing under DATA_ROOT; add it, then `python -m eval score`"]}
        upload = scorers.convert_vqav2_submission(records, read_jsonl_questions(all_test))
        dst = write_json(out_dir / "answers_upload" / self.SPLIT / f"{ckpt}.json", upload, indent=None)
        return {"metrics": {}, "files": {"upload": str(dst)},
                "pending": [f"VQAv2-testdev: submit {dst} to https://eval.ai/web/challenges/challenge-page/830, then "
                            f"`python -m eval record RESULTS VQAv2-testdev=<overall>`"]}


class VQAv2Val(Benchmark):
    """Our layout (LLaVA ships no val question file): the official VQAv2 val question and
    annotation files and COCO val2014 images under vqav2/; prompt = question + the short-answer line."""

    name = "vqav2_val"
    title = "VQAv2 val (local)"
    metrics = [Metric("VQAv2-val", "VQAv2 val accuracy, local (VQA soft accuracy, lmms-eval vqav2_val rule)", primary=True)]
    stats = {"VQAv2-val": Stat(key="acc")}
    difficulty = ("acc", 1.0)
    QUESTIONS = "vqav2/v2_OpenEnded_mscoco_val2014_questions.json"
    ANNOTATIONS = "vqav2/v2_mscoco_val2014_annotations.json"
    IMAGES = "vqav2/val2014"

    def files(self):
        src = "VQAv2 https://visualqa.org/download.html"
        return [DataFile(self.QUESTIONS, "inference", f"{src} (Validation questions 2017 v2.0)"),
                DataFile(self.IMAGES, "inference", "COCO val2014 images http://images.cocodataset.org/zips/val2014.zip", "dir"),
                DataFile(self.ANNOTATIONS, "scoring", f"{src} (Validation annotations 2017 v2.0)")]

    def load(self):
        qs = read_json(self.path(self.QUESTIONS))["questions"]
        out = []
        for i, q in enumerate(qs):
            text = q["question"] + "\n" + SHORT_ANSWER
            img = self.path(self.IMAGES) / f"COCO_val2014_{int(q['image_id']):012d}.jpg"
            out.append(Question(idx=i, uid=str(q["question_id"]), qid=q["question_id"], text=text, prompt=text,
                                image=str(img)))
        return out

    def finalize(self, records, out_dir: Path, ckpt: str, strict: bool = True):
        ann_path = self.path(self.ANNOTATIONS)
        if not ann_path.exists():
            return {"metrics": {}, "files": {}, "pending": [f"score: {self.ANNOTATIONS} is missing; add it, then `python -m eval score`"]}
        ann = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in read_json(ann_path)["annotations"]}
        res = scorers.score_vqav2_val(records, ann)
        units = [{"id": str(r["question_id"]), "v": {"acc": a}} for r, a in zip(records, res["per_sample"])]
        return {"metrics": {"VQAv2-val": res["accuracy"]}, "details": {"samples": res["samples"]}, "files": {},
                "units": units}
