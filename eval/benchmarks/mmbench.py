"""MMBench EN / CN (evaluation.md 5.7): the TSV (images inline as base64), prompt built as LLaVA's
model_vqa_mmbench does with --single-pred-prompt; on dev the official local evaluation
(VLMEvalKit multiple_choice_eval, CircularEval over the TSV's circular copies, exact matching:
MMB-dev) plus the single-row rate (MMB-dev-local, labelled as such), and the server's xlsx
submission file for any split."""

from __future__ import annotations

import csv
import math
import string
import sys
from pathlib import Path

from .. import scorers
from ..stats import Stat
from .base import LETTER_ANSWER, LETTER_ANSWER_CN, Benchmark, DataFile, Metric, Question, b64_image_loader, short_uuid

ALL_OPTIONS = ["A", "B", "C", "D"]
# pandas.read_table's default NA strings (LLaVA reads the TSV with pandas; these cells become NaN)
PANDAS_NA = scorers.PANDAS_NA_STRINGS
DROP_COLUMNS = ["hint", "category", "source", "image", "comment", "l2-category"]


def read_tsv(path: Path) -> tuple[list[str], list[dict]]:
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader)
        rows = [dict(zip(header, r)) for r in reader if r]
    return header, rows


def is_none(value) -> bool:
    """model_vqa_mmbench.is_none applied to what pandas would hold (NA strings are NaN there)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, str) and (value in PANDAS_NA or value.lower() in ("nan", "none")):
        return True
    return False


def column_types(header, rows) -> dict[str, type]:
    """The dtype pandas would infer per column (int / float / str), for the xlsx cells."""
    out = {}
    for col in header:
        vals = [r.get(col, "") for r in rows if not is_none(r.get(col, ""))]
        t: type = str
        try:
            [int(v) for v in vals]
            t = int
        except ValueError:
            try:
                [float(v) for v in vals]
                t = float
            except ValueError:
                t = str
        out[col] = t
    return out


class MMBench(Benchmark):
    name = "mmbench"
    title = "MMBench (EN)"
    protocol = "llava.eval.model_vqa_mmbench --single-pred-prompt"
    max_new_tokens = 1024
    metrics = [Metric("MMB-dev", "MMBench EN dev, CircularEval: a question is right only if every circular copy "
                      "(same index % 1e6) is right; VLMEvalKit multiple_choice_eval, exact_matching (can_infer, no GPT "
                      "extractor)", primary=True),
               Metric("MMB-dev-local", "MMBench EN dev, single-row rate: every TSV row (circular copies included) scored "
                      "alone; NOT the MMBench score"),
               Metric("MMB-dev-local-circular", "MMBench EN dev, --all-rounds: a question is right only if every LLaVA "
                      "option rotation of every circular copy is right (ours, not an official number)"),
               Metric("MMB-server", "MMBench EN from the official server (CircularEval); record it with `eval record`")]
    # the unit is a circular group (a question and its circular copies, index % 1e6): CircularEval scores it as
    # one; the single-row rate is right rows over rows, its standard error the binomial one over the rows
    unit = "circular group"
    difficulty = ("circular", 1.0)
    stats = {"MMB-dev": Stat(key="circular", where=(("question", "yes"),), binomial=True),
             "MMB-dev-local": Stat(kind="ratio", key="right", denom="rows", binomial=True),
             "MMB-dev-local-circular": Stat(key="rounds", where=(("question", "yes"),), binomial=True)}
    DIR = "mmbench"
    SPLIT = "mmbench_dev_20230712"
    URL = "https://download.openmmlab.com/mmclassification/datasets/mmbench/mmbench_dev_20230712.tsv"
    lang = "en"

    @classmethod
    def option_defaults(cls):
        # split: the TSV name under mmbench/ (e.g. mmbench_test_en_20231003 for the server's test split);
        # all_rounds: LLaVA's --all-rounds (one answer per option rotation)
        return {"split": cls.SPLIT, "all_rounds": False}

    @property
    def tsv(self) -> str:
        return f"{self.DIR}/{self.split}.tsv"

    def files(self):
        src = self.URL if self.split == self.SPLIT else "MMBench TSVs https://github.com/open-compass/MMBench"
        return [DataFile(self.tsv, "inference", src)]

    def load(self):
        path = self.path(self.tsv)
        if not path.exists():
            raise FileNotFoundError(f"question file not found: {path}")
        _, rows = read_tsv(path)
        out = []
        n = 0
        for row in rows:
            options = []
            for o in ALL_OPTIONS:
                if o not in row or is_none(row[o]):
                    break
                options.append(row[o])
            cur_option_char = ALL_OPTIONS[: len(options)]
            rounds = len(options) if self.all_rounds else 1
            idx = int(row["index"])
            for round_idx in range(rounds):
                question = row["question"]
                hint = row.get("hint")
                if not is_none(hint):
                    question = hint + "\n" + question
                for option_char, option in zip(ALL_OPTIONS[: len(options)], options):
                    question = question + "\n" + option_char + ". " + option
                cur_prompt = question
                qs = question + "\n" + (LETTER_ANSWER_CN if self.lang == "cn" else LETTER_ANSWER)
                uid = f"{idx}" if rounds == 1 else f"{idx}/r{round_idx}"
                out.append(Question(idx=n, uid=uid, qid=idx, text=qs, prompt=cur_prompt, image=b64_image_loader(row["image"]),
                                    extra={"round_id": round_idx, "options": list(options), "option_char": list(cur_option_char)}))
                n += 1
                options = options[1:] + options[:1]
                cur_option_char = cur_option_char[1:] + cur_option_char[:1]
        return out

    def record(self, q, text, model_id):
        return {"question_id": q.qid, "round_id": q.extra["round_id"], "prompt": q.prompt, "text": text,
                "options": q.extra["options"], "option_char": q.extra["option_char"], "answer_id": short_uuid(),
                "model_id": model_id, "metadata": {}}

    def finalize(self, records, out_dir: Path, ckpt: str, strict: bool = True):
        header, rows = read_tsv(self.path(self.tsv))
        dst = self.write_submission(header, rows, records, out_dir / "answers_upload" / self.split / f"{ckpt}.xlsx")
        files = {"upload": str(dst)}
        prefix = "MMB-CN" if self.lang == "cn" else "MMB"
        pending = [f"{prefix}-server: upload {dst} to the MMBench server (https://mmbench.opencompass.org.cn), then "
                   f"`python -m eval record RESULTS {prefix}-server=<overall>`"]
        has_answers = "answer" in header and all(not is_none(r.get("answer")) for r in rows)
        if not has_answers:
            return {"metrics": {}, "files": files, "pending": pending}
        records = self.complete_records(records, rows)
        res = scorers.score_mmbench_local(records, [self.score_row(r) for r in rows])
        metrics = {f"{prefix}-dev": res["accuracy"], f"{prefix}-dev-local": res["single_row_accuracy"]}
        if res["rounds"] > 1:
            metrics[f"{prefix}-dev-local-circular"] = res["rounds_accuracy"]
        details = {k: res[k] for k in ("questions", "rows", "copies_max", "unmatched", "rounds", "categories")}
        details["report"] = res["report"]  # multiple_choice.report_acc: fractions per split, l2-category, category
        if res["copies_max"] <= 1:
            details["warning"] = ("the TSV holds no circular copies (index >= 1e6) of the answered questions: "
                                  "CircularEval reduces to the single-row rate")
        return {"metrics": metrics, "details": details, "files": files, "pending": pending, "units": res["units"]}

    @staticmethod
    def score_row(row: dict) -> dict:
        """A TSV row as the official evaluator reads it: its non-NaN A-Z option columns
        (multiple_choice.build_choices), answer, category, l2-category, split."""
        choices = {ch: row[ch] for ch in string.ascii_uppercase if ch in row and not is_none(row[ch])}
        get = lambda k: None if is_none(row.get(k)) else row.get(k)  # noqa: E731
        return {"index": int(row["index"]), "answer": row["answer"], "choices": choices,
                "category": get("category"), "l2-category": get("l2-category"), "split": get("split")}

    def complete_records(self, records, rows) -> list[dict]:
        """Fields the scorer needs that LLaVA's answer files may lack: ``round_id`` (0) and, for a
        rotated round, ``options`` / ``option_char``, recovered from the TSV exactly as
        model_vqa_mmbench builds them (options up to the first NaN, rotated ``round_id`` times).
        A record without ``question_id`` / ``text`` is an error naming the field and the file."""
        by_index = {int(r["index"]): r for r in rows}
        out = []
        for k, rec in enumerate(records):
            for field in ("question_id", "text"):
                if field not in rec:
                    raise ValueError(f"MMBench: answer record {k} has no {field!r} field; cannot be recovered from "
                                     f"{self.path(self.tsv)}")
            rec = dict(rec)
            rnd = int(rec.get("round_id") or 0)
            rec["round_id"] = rnd
            if rnd and ("options" not in rec or "option_char" not in rec):
                row = by_index.get(int(rec["question_id"]))
                if row is None:
                    raise ValueError(f"MMBench: answer record {k} (question_id {rec['question_id']}) has no 'options' / "
                                     f"'option_char' and its index is not in {self.path(self.tsv)}")
                options = []
                for o in ALL_OPTIONS:
                    if o not in row or is_none(row[o]):
                        break
                    options.append(row[o])
                chars = ALL_OPTIONS[: len(options)]
                r = rnd % max(len(options), 1)
                rec.setdefault("options", options[r:] + options[:r])
                rec.setdefault("option_char", chars[r:] + chars[:r])
            out.append(rec)
        return out

    @staticmethod
    def write_submission(header, rows, records, dst: Path) -> Path:
        """convert_mmbench_for_submission.py: annotation columns without hint / category / source /
        image / comment / l2-category, 'prediction' inserted as the 7th column (the last round's
        answer of a question wins, as with pandas .loc assignment)."""
        from openpyxl import Workbook

        cols = [c for c in header if c not in DROP_COLUMNS]
        cols.insert(6, "prediction")
        pred = {}
        for r in records:
            pred[int(r["question_id"])] = r["text"]
        types = column_types(header, rows)
        wb = Workbook()
        ws = wb.active
        ws.append(cols)
        for row in rows:
            cells = []
            for c in cols:
                if c == "prediction":
                    cells.append(pred.get(int(row["index"])))
                    continue
                v = row.get(c)
                if is_none(v):
                    cells.append(None)
                else:
                    cells.append(types[c](v) if types[c] is not str else v)
            ws.append(cells)
        dst.parent.mkdir(parents=True, exist_ok=True)
        wb.save(dst)
        return dst


class MMBenchCN(MMBench):
    name = "mmbench_cn"
    title = "MMBench-CN"
    metrics = [Metric("MMB-CN-dev", "MMBench-CN dev, CircularEval: a question is right only if every circular copy "
                      "(same index % 1e6) is right; VLMEvalKit multiple_choice_eval, exact_matching", primary=True),
               Metric("MMB-CN-dev-local", "MMBench-CN dev, single-row rate: every TSV row scored alone; NOT the MMBench score"),
               Metric("MMB-CN-dev-local-circular", "MMBench-CN dev, --all-rounds: every LLaVA option rotation of every "
                      "circular copy right (ours, not an official number)"),
               Metric("MMB-CN-server", "MMBench-CN from the official server; record it with `eval record`")]
    stats = {"MMB-CN-dev": MMBench.stats["MMB-dev"], "MMB-CN-dev-local": MMBench.stats["MMB-dev-local"],
             "MMB-CN-dev-local-circular": MMBench.stats["MMB-dev-local-circular"]}
    DIR = "mmbench_cn"
    SPLIT = "mmbench_dev_cn_20231003"
    URL = "https://download.openmmlab.com/mmclassification/datasets/mmbench/mmbench_dev_cn_20231003.tsv"
    lang = "cn"
