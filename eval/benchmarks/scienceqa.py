"""ScienceQA test (evaluation.md 5.6): LLaVA's CQM-A question file with the single-prediction
letter prompt; papers report IMG-Accuracy."""

from __future__ import annotations

from pathlib import Path

from .. import scorers
from ..stats import Stat
from ..io import read_json, write_json
from .base import EVAL_ZIP, LETTER_ANSWER, Benchmark, DataFile, Metric, Question, unique_uids


class ScienceQA(Benchmark):
    name = "sqa"
    title = "ScienceQA test (IMG subset and all)"
    protocol = "llava.eval.model_vqa_science --single-pred-prompt"
    max_new_tokens = 1024
    metrics = [Metric("SQA-IMG", "ScienceQA test, image subset accuracy (IMG-Accuracy)", primary=True),
               Metric("SQA-all", "ScienceQA test, all problems accuracy")]
    # IMG: the problems whose recorded prompt holds the image (a missing answer is not among them, upstream quirk)
    stats = {"SQA-IMG": Stat(where=(("img", "yes"),), binomial=True), "SQA-all": Stat(binomial=True)}
    QUESTIONS = "scienceqa/llava_test_CQM-A.json"
    IMAGES = "scienceqa/images/test"
    PROBLEMS = "scienceqa/problems.json"
    SPLITS = "scienceqa/pid_splits.json"

    def files(self):
        src = "ScienceQA repository data/scienceqa (https://github.com/lupantech/ScienceQA)"
        return [DataFile(self.QUESTIONS, "inference", EVAL_ZIP),
                DataFile(self.IMAGES, "inference", f"{src}: images/test", "dir"),
                DataFile(self.PROBLEMS, "scoring", src), DataFile(self.SPLITS, "scoring", src)]

    def load(self):
        path = self.path(self.QUESTIONS)
        if not path.exists():
            raise FileNotFoundError(f"question file not found: {path}")
        items = read_json(path)
        uids = unique_uids([it["id"] for it in items])
        out = []
        for i, (line, uid) in enumerate(zip(items, uids)):
            qs = line["conversations"][0]["value"].replace("<image>", "").strip()
            cur_prompt = qs
            image = None
            if "image" in line:
                image = str(self.path(self.IMAGES) / line["image"])
                cur_prompt = "<image>" + "\n" + cur_prompt
            qs = qs + "\n" + LETTER_ANSWER
            cur_prompt = cur_prompt + "\n" + LETTER_ANSWER
            out.append(Question(idx=i, uid=uid, qid=line["id"], text=qs, prompt=cur_prompt, image=image))
        return out

    def finalize(self, records, out_dir: Path, ckpt: str, strict: bool = True):
        if not (self.path(self.PROBLEMS).exists() and self.path(self.SPLITS).exists()):
            return {"metrics": {}, "files": {}, "pending": [f"score: {self.PROBLEMS} / {self.SPLITS} missing; then `python -m eval score`"]}
        problems = read_json(self.path(self.PROBLEMS))
        split = read_json(self.path(self.SPLITS))["test"]
        if not strict:
            answered = {r["question_id"] for r in records}
            split = [p for p in split if p in answered]
        res = scorers.score_sqa(records, problems, split)
        out = write_json(out_dir / f"{ckpt}_result.json",
                         {"acc": res["accuracy"], "correct": res["correct"], "count": res["total"], "outputs": res["outputs"]})
        return {"metrics": {"SQA-IMG": res["img_accuracy"], "SQA-all": res["accuracy"]},
                "details": {k: res[k] for k in ("correct", "total", "img_total", "missing")}, "files": {"result": str(out)},
                "units": [{"id": str(pid), "tags": {"img": "yes" if o["is_multimodal"] else "no"},
                           "v": {"correct": int(o["correct"])}} for pid, o in res["outputs"].items()]}
