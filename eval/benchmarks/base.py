"""What every benchmark provides: its data files (for the data check), questions in file order,
the answer record LLaVA's evaluator writes, and the official conversion + scoring."""

from __future__ import annotations

import base64
import io
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from ..stats import Stat

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
LETTER_ANSWER_CN = "请直接回答选项字母。"
EVAL_ZIP = ("LLaVA's eval.zip (docs/Evaluation.md of haotian-liu/LLaVA: "
            "https://drive.google.com/file/d/1atZSBBrAX54yYpxtVVW33zFvcnaHeFPy), extracted to DATA_ROOT")


@dataclass
class Question:
    idx: int  # position in the question file (merge order)
    uid: str  # unique key (the question id, made unique where the file repeats it, e.g. MME)
    qid: Any  # question_id exactly as in the question file
    text: str  # the user turn after the visual placeholder line: question + answer-format suffix
    prompt: str  # what LLaVA records as "prompt" in the answer file
    image: Any = None  # path, zero-arg callable returning a PIL image, or None (text-only)
    video: str | None = None  # video file / frame directory (Video-LLaVA)
    extra: dict = field(default_factory=dict)  # benchmark fields carried into the record

    @property
    def modality(self) -> str:
        return "video" if self.video is not None else ("image" if self.image is not None else "text")

    def load_image(self):
        return self.image() if callable(self.image) else self.image


@dataclass
class DataFile:
    path: str  # relative to DATA_ROOT
    needed_for: str  # "inference" or "scoring"
    source: str  # where to get it
    kind: str = "file"  # "file" or "dir"


@dataclass
class Metric:
    name: str  # column key, e.g. "MME-P"
    label: str  # the variant in words (evaluation.md section 6)
    primary: bool = False
    higher_is_better: bool = True


class Benchmark:
    """Base class. Subclasses set the class attributes and implement ``load`` and ``finalize``."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    modality: ClassVar[str] = "image"  # image | video
    max_new_tokens: ClassVar[int] = 128  # evaluation.md section 3
    #: LLaVA's evaluator that defines the protocol (for the results file)
    protocol: ClassVar[str] = "llava.eval.model_vqa_loader"
    metrics: ClassVar[list[Metric]] = []
    #: True when no local score exists (test-server benchmarks) or it needs an LLM judge
    needs_server: ClassVar[bool] = False
    needs_judge: ClassVar[bool] = False
    #: how each locally scored metric is computed from the units ``finalize`` returns (eval.stats): the standard
    #: errors, ``eval compare`` and the difficult subset read them; a metric without one has no standard error
    stats: ClassVar[dict[str, Stat]] = {}
    #: what one unit is (a resample draws units): "question", "image", "circular group"
    unit: ClassVar[str] = "question"
    #: (value, full marks): a unit the control run holds below full marks on it is "difficult" (group A)
    difficulty: ClassVar[tuple[str, float]] = ("correct", 1.0)

    def __init__(self, data_root: str | os.PathLike, **options: Any):
        self.root = Path(data_root)
        self.options = options
        unknown = set(options) - set(self.option_defaults())
        if unknown:
            from llava.options import did_you_mean

            raise TypeError(f"{self.name}: unknown benchmark option(s) {sorted(unknown)}"
                            f"{did_you_mean(sorted(unknown), self.option_defaults())}; known: "
                            f"{sorted(self.option_defaults())}")
        for k, v in {**self.option_defaults(), **options}.items():
            setattr(self, k, v)

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {}

    def config(self) -> dict:
        return {"benchmark": self.name, "protocol": self.protocol, "max_new_tokens": self.max_new_tokens,
                **{k: getattr(self, k) for k in self.option_defaults()}}

    # -- data ---------------------------------------------------------------------------------
    def files(self) -> list[DataFile]:
        raise NotImplementedError

    def path(self, rel: str) -> Path:
        return self.root / rel

    def load(self) -> list[Question]:
        """All questions in question-file order."""
        raise NotImplementedError

    # -- answers ------------------------------------------------------------------------------
    def record(self, q: Question, text: str, model_id: str) -> dict:
        """LLaVA's answer record (model_vqa_loader / model_vqa / model_vqa_science)."""
        return {"question_id": q.qid, "prompt": q.prompt, "text": text, "answer_id": short_uuid(),
                "model_id": model_id, "metadata": {}}

    def postprocess(self, text: str) -> str:
        """Output text as the evaluator stores it (decoded with special tokens skipped, stripped)."""
        return text.strip()

    # -- conversion + scoring -----------------------------------------------------------------
    def finalize(self, records: list[dict], out_dir: Path, ckpt: str, strict: bool = True) -> dict:
        """Write the official answer/upload files under ``out_dir`` and score locally where an
        official local score exists. Returns {"metrics": {name: value}, "details": ..., "files":
        {...}, "pending": [...], "units": [...]} (``pending``: steps that need a server or a judge; ``units``: one
        row ``{"id", "tags", "v"}`` per scored unit, from which :attr:`stats` recompute every metric)."""
        raise NotImplementedError

    def metric_labels(self) -> dict[str, str]:
        return {m.name: m.label for m in self.metrics}

    def primary_metric(self) -> str | None:
        for m in self.metrics:
            if m.primary:
                return m.name
        return None


# -- helpers -----------------------------------------------------------------------------------


def short_uuid() -> str:
    """A short random id like shortuuid.uuid() (22 base57 characters)."""
    alphabet = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    n = uuid.uuid4().int
    out = []
    while n and len(out) < 22:
        n, r = divmod(n, len(alphabet))
        out.append(alphabet[r])
    return "".join(out).ljust(22, alphabet[0])


def read_jsonl_questions(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"question file not found: {path} (run `python -m eval check-data` for where to get it)")
    from ..io import read_jsonl

    return read_jsonl(path)  # a garbled / truncated line: ValueError naming path:line


def unique_uids(qids: list[Any]) -> list[str]:
    """str(question_id), with '#k' appended to the k-th repeat of an id (k >= 1)."""
    seen: dict[str, int] = {}
    out = []
    for q in qids:
        s = str(q)
        k = seen.get(s, 0)
        seen[s] = k + 1
        out.append(s if k == 0 else f"{s}#{k}")
    if len(set(out)) != len(out):  # "a#1" present literally as an id as well: fall back to positions
        return [f"{i}:{q}" for i, q in enumerate(qids)]
    return out


class B64Image:
    """An image embedded in the question file as base64 (MMBench's TSV): called, the decoded RGB image;
    ``digest``: the hash of its encoded bytes (the answer's input hash, no decoding)."""

    __slots__ = ("data", "_digest")

    def __init__(self, data: str):
        self.data = data
        self._digest = None

    def __call__(self):
        from PIL import Image

        return Image.open(io.BytesIO(base64.b64decode(self.data))).convert("RGB")

    @property
    def digest(self) -> str:
        if self._digest is None:
            import hashlib

            self._digest = hashlib.sha256(self.data.encode("ascii", "replace")).hexdigest()[:16]
        return self._digest


def b64_image_loader(data: str) -> Callable:
    return B64Image(data)


def loader_questions(bench: Benchmark, question_file: str, image_folder: str,
                     text_fn: Callable[[dict], str] | None = None) -> list[Question]:
    """Questions of a model_vqa_loader-style jsonl ({question_id, image, text, ...}); the recorded
    prompt is the question text (``cur_prompt = line["text"]``)."""
    lines = read_jsonl_questions(bench.path(question_file))
    uids = unique_uids([ln["question_id"] for ln in lines])
    out = []
    for i, (ln, uid) in enumerate(zip(lines, uids)):
        text = text_fn(ln) if text_fn else ln["text"]
        out.append(Question(idx=i, uid=uid, qid=ln["question_id"], text=text, prompt=text,
                            image=str(bench.path(image_folder) / ln["image"]),
                            extra={k: v for k, v in ln.items() if k not in ("question_id", "text", "image")}))
    return out
