"""TextVQA val (evaluation.md 5.3) with the OCR-token prompt (LLaVA's file), and the no-OCR
variant (the OCR line removed; label TextVQA-noOCR)."""

from __future__ import annotations

from pathlib import Path

from .. import scorers
from ..stats import Stat
from ..io import read_json
from .base import EVAL_ZIP, Benchmark, DataFile, Metric, loader_questions


class TextVQA(Benchmark):
    name = "textvqa"
    title = "TextVQA val (OCR tokens in the prompt)"
    metrics = [Metric("TextVQA-OCR", "TextVQA val accuracy, OCR-token prompt (LLaVA eval_textvqa.py)", primary=True)]
    difficulty = ("acc", 1.0)  # soft accuracy: full marks = at least three annotators agree
    stats = {"TextVQA-OCR": Stat(key="acc")}
    QUESTIONS = "textvqa/llava_textvqa_val_v051_ocr.jsonl"
    IMAGES = "textvqa/train_images"
    ANNOTATIONS = "textvqa/TextVQA_0.5.1_val.json"
    ocr = True

    def files(self):
        return [DataFile(self.QUESTIONS, "inference", EVAL_ZIP),
                DataFile(self.IMAGES, "inference", "TextVQA images https://dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip", "dir"),
                DataFile(self.ANNOTATIONS, "scoring", "https://dl.fbaipublicfiles.com/textvqa/data/TextVQA_0.5.1_val.json")]

    def _text(self, line: dict) -> str:
        if self.ocr:
            return line["text"]
        return "\n".join(x for x in line["text"].split("\n") if not x.startswith("Reference OCR token:"))

    def load(self):
        return loader_questions(self, self.QUESTIONS, self.IMAGES, text_fn=self._text)

    def finalize(self, records, out_dir: Path, ckpt: str, strict: bool = True):
        ann = self.path(self.ANNOTATIONS)
        if not ann.exists():
            return {"metrics": {}, "files": {}, "pending": [f"score: {self.ANNOTATIONS} is missing; add it, then `python -m eval score`"]}
        res = scorers.score_textvqa(records, read_json(ann)["data"])
        name = self.metrics[0].name
        units = [{"id": str(r["question_id"]), "v": {"acc": s}} for r, s in zip(records, res["per_sample"])]
        return {"metrics": {name: res["accuracy"]}, "details": {"samples": res["samples"]}, "files": {}, "units": units}


class TextVQANoOCR(TextVQA):
    name = "textvqa_noocr"
    title = "TextVQA val (no OCR tokens)"
    metrics = [Metric("TextVQA-noOCR", "TextVQA val accuracy, prompt without the OCR-token line", primary=True)]
    stats = {"TextVQA-noOCR": Stat(key="acc")}
    ocr = False
