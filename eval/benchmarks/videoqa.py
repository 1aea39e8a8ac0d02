"""Zero-shot video QA for Video-LLaVA (evaluation.md 5.11): MSVD-QA, MSRVTT-QA, TGIF-QA,
ActivityNet-QA in Video-LLaVA's GPT_Zero_Shot_QA layout; free-form answers judged by an LLM
(Video-ChatGPT protocol). Reference answers are paired **by question id** (Video-LLaVA's script
indexes them from the start of the answer list in every chunk, which misaligns chunks >= 1)."""

from __future__ import annotations

import os
from pathlib import Path

from .. import scorers
from ..io import read_json
from ..stats import Stat
from .base import Benchmark, DataFile, Metric, Question, unique_uids

VIDEO_FORMATS = [".mp4", ".avi", ".mov", ".mkv"]  # run_inference_video_qa.py
EXTRA_FORMATS = [".gif", ".webm"]  # ours, after the official ones; plus a directory of frame images
SOURCE = ("Video-LLaVA TRAIN_AND_VALIDATE.md, 'GPT_Zero_Shot_QA' downloads "
          "(https://github.com/PKU-YuanGroup/Video-LLaVA/blob/main/TRAIN_AND_VALIDATE.md; videos from Video-ChatGPT)")


def find_video(video_dir: Path, name: str) -> Path | None:
    for fmt in VIDEO_FORMATS + EXTRA_FORMATS:
        p = video_dir / f"{name}{fmt}"
        if p.exists():
            return p
    p = video_dir / name
    return p if p.is_dir() else None


def load_video(path: str | os.PathLike, num_frames: int) -> list:
    """Frames of a video as PIL images, ``num_frames`` sampled uniformly as Video-LLaVA does
    (``np.linspace(0, n - 1, num_frames, dtype=int)`` over the decoded frames).

    Directories of frame images and GIFs are read with PIL; other files need ``decord`` (what
    Video-LLaVA uses) or PyAV (``pip install av``)."""
    import numpy as np
    from PIL import Image

    path = Path(path)
    if path.is_dir():
        frames = [path / f for f in sorted(os.listdir(path))]
        if not frames:
            raise ValueError(f"video folder {path} is empty: put the video's frame images in it, or the video file "
                             f"next to it ({'/'.join(VIDEO_FORMATS + EXTRA_FORMATS)})")
        idx = np.linspace(0, len(frames) - 1, num_frames, dtype=int)
        return [Image.open(frames[i]).convert("RGB") for i in idx]
    from llava.preprocess_video_files import decode_video

    return decode_video(path, num_frames)  # GIF with PIL; else decord, or PyAV (only the sampled frames)


class VideoQA(Benchmark):
    modality = "video"
    protocol = "videollava/eval/video/run_inference_video_qa.py"
    max_new_tokens = 1024
    needs_judge = True
    DIR = ""
    VIDEOS = "videos"
    PREFIX = ""  # ActivityNet file names carry a "v_" prefix (run_inference_video_qa_act.py)
    SHORT = ""

    @property
    def base(self) -> str:
        return f"GPT_Zero_Shot_QA/{self.DIR}"

    def files(self):
        return [DataFile(f"{self.base}/test_q.json", "inference", SOURCE),
                DataFile(f"{self.base}/{self.VIDEOS}", "inference", SOURCE, "dir"),
                DataFile(f"{self.base}/test_a.json", "scoring", SOURCE)]

    def load(self):
        qs = read_json(self.path(f"{self.base}/test_q.json"))
        ans_path = self.path(f"{self.base}/test_a.json")
        answers = read_json(ans_path) if ans_path.exists() else None
        by_id = {}
        if answers is not None:
            if all("question_id" in a for a in answers):
                by_id = {a["question_id"]: a["answer"] for a in answers}
            elif len(answers) == len(qs):  # no ids in the answer file: pair by position over the whole file
                by_id = {q["question_id"]: a["answer"] for q, a in zip(qs, answers)}
        vdir = self.path(f"{self.base}/{self.VIDEOS}")
        uids = unique_uids([q["question_id"] for q in qs])
        out = []
        for i, (q, uid) in enumerate(zip(qs, uids)):
            name = f"{self.PREFIX}{q['video_name']}"
            video = find_video(vdir, name)
            out.append(Question(idx=i, uid=uid, qid=q["question_id"], text=q["question"], prompt=q["question"],
                                video=str(video) if video else str(vdir / name),
                                extra={"answer": by_id.get(q["question_id"]), "video_name": q["video_name"],
                                       "video_found": video is not None,
                                       "video_empty": video is not None and video.is_dir() and not any(video.iterdir())}))
        return out

    def missing_inputs(self, questions) -> list[str]:
        """Videos not found, and frame folders with no frames (named by their path)."""
        return [q.extra["video_name"] if not q.extra["video_found"] else f"{q.extra['video_name']}: empty folder {q.video}"
                for q in questions if not q.extra["video_found"] or q.extra.get("video_empty")]

    def record(self, q, text, model_id):
        return {"id": q.qid, "question": q.text, "answer": q.extra["answer"], "pred": text}

    def postprocess(self, text: str) -> str:
        out = text.strip()
        if out.endswith("</s>"):
            out = out[: -len("</s>")]
        return out.strip()

    def finalize(self, records, out_dir: Path, ckpt: str, strict: bool = True):
        return {"metrics": {}, "files": {},
                "pending": [f"{self.SHORT}: judge with `python -m eval judge {out_dir}` (OpenAI-compatible endpoint)"]}

    def judge_items(self, records) -> dict[str, dict]:
        return {str(r["id"]): {"question": r["question"], "answer": r["answer"], "pred": r["pred"]} for r in records}

    def judged_metrics(self, judgements: dict[str, dict], strict: bool = True) -> dict:
        res = scorers.score_videoqa(judgements)
        units = res.pop("units")
        return {"metrics": {f"{self.SHORT}-acc": res["accuracy"], f"{self.SHORT}-score": res["score"]}, "details": res,
                "units": units}


def _make(name, title, dirname, videos, short, prefix=""):
    metrics = [Metric(f"{short}-acc", f"{title} accuracy (#yes / judged) from an LLM judge (judge model and date in the results)", primary=True),
               Metric(f"{short}-score", f"{title} mean 0-5 score from an LLM judge")]
    # accuracy: judged yes over judged yes-or-no (a ratio of sums); score: the mean 0-5 grade; both bootstrapped
    stats = {f"{short}-acc": Stat(kind="ratio", key="yes", denom="judged_yn"), f"{short}-score": Stat(key="score", scale=1.0)}
    return type(name, (VideoQA,), {"name": name.lower(), "title": title, "DIR": dirname, "VIDEOS": videos,
                                   "SHORT": short, "PREFIX": prefix, "metrics": metrics, "stats": stats,
                                   "difficulty": ("yes", 1.0)})


MSVD = _make("MSVD", "MSVD-QA", "MSVD_Zero_Shot_QA", "videos", "MSVD-QA")
MSRVTT = _make("MSRVTT", "MSRVTT-QA", "MSRVTT_Zero_Shot_QA", "videos/all", "MSRVTT-QA")
TGIF = _make("TGIF", "TGIF-QA", "TGIF_Zero_Shot_QA", "mp4", "TGIF-QA")
ActivityNet = _make("ActivityNet", "ActivityNet-QA", "Activitynet_Zero_Shot_QA", "all_test", "ActivityNet-QA", prefix="v_")
