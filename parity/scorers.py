"""Scorer parity: our POPE, TextVQA and ScienceQA scorers (``eval/scorers/yesno.py``, ``vqa.py``, ``choice.py``, called
as the harness calls them: through the benchmark classes' ``finalize``) against the official LLaVA scripts
(``llava/eval/eval_pope.py``, ``eval_textvqa.py`` + ``m4c_evaluator.py``, ``eval_science_qa.py``, run unchanged by
``parity/official_scorers.py`` in ``.venv-official``) on the same answer files.

Data: the repository's fixture datasets (``eval/fixtures.py``: LLaVA's ``playground/data/eval`` layout, the files our
benchmarks read) with a few questions appended in the same layout, so that the planted answers exercise the parsing:

* POPE (``pope/llava_pope_test.jsonl`` + ``pope/coco/coco_pope_{category}.json``, labels paired by order): the first
  sentence only, commas dropped before splitting on spaces, 'No' / 'no' / 'not' as whole words ('NO', 'Not' are yes);
* TextVQA (``textvqa/llava_textvqa_val_v051_ocr.jsonl`` + ``textvqa/TextVQA_0.5.1_val.json``): the EvalAI
  normalisation (punctuation, articles, number words, contractions, "'s", the 32-period limit) and the soft accuracy
  min(1, matches / 3) over the 10 leave-one-out subsets of the 10 human answers;
* ScienceQA (``scienceqa/llava_test_CQM-A.json``, ``problems.json``, ``pid_splits.json``): 'A', 'B. text',
  'The answer is C.' (its '.' matches any character), two such sentences, garbage and 'E.' -> FAILED, a letter
  beyond the problem's choices, a problem without an answer.

Answer files are in the official format (LLaVA's ``model_vqa_loader`` / ``model_vqa_science`` records, as
``Benchmark.record`` writes them); both sides read the same file. Every metric is compared with ``==``, per question
where the official script exposes it. ``tests/test_parity_scorers.py`` holds the expected values worked out by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

from eval import scorers
from eval.benchmarks import get_benchmark
from eval.fixtures import S, write_fixtures
from eval.io import read_json, read_jsonl, write_json, write_jsonl

from .jobs import Job, JobFailed, Runner, run_job
from .report import Check

WORKER = Path(__file__).with_name("official_scorers.py")
OPTIONS = scorers.SQA_OPTIONS

# -- POPE: fixture questions 1-6 (eval/fixtures.py POPE_OBJECTS), then the appended ones ------------------------
POPE_EXTRA = [  # question_id, category, object, label (appended to the question file and the category's labels)
    (7, "adversarial", "skis", "no"), (8, "adversarial", "surfboard", "yes"), (9, "popular", "cat", "no"),
    (10, "popular", "truck", "yes"), (11, "random", "bird", "no"), (12, "random", "bench", "yes"),
    (13, "random", "chair", "yes")]
POPE_ANSWERS = {
    1: "No, there is not.",  # adversarial, label no
    2: "Yes.",  # adversarial, yes
    3: "Yes, there is a car in the image.",  # popular, yes
    4: "NO",  # popular, no: upper-case NO is not a 'no' word -> yes
    5: "yes",  # random, yes
    6: "not sure",  # random, no
    7: "Yes, there is a pair of skis. It is not red.",  # only the first sentence counts -> yes
    8: "There is no doubt, yes.",  # 'no' as a word -> no
    9: "No",
    10: "Not sure. Probably yes",  # capitalised 'Not' is not 'not' -> yes
    11: "No,there is none",  # the comma is removed, not split on: 'Nothere' -> yes
    12: "I do not think so, but yes",  # 'not' -> no
    13: "A chair. There is not a kite.",  # the 'not' is in the second sentence -> yes
}

# -- TextVQA: fixture questions a1, a2, a2, a3, then the appended ones ------------------------------------------
TEXTVQA_EXTRA = [  # image_id (= question_id in the question file), question, OCR tokens, the 10 human answers
    ("a4", "What does the sign say?", "DONT, WALK", ["don't walk"] * 2 + ["dont walk"] + ["stop"] * 7),
    ("a5", "How many players are there?", "", ["two", "2"] + ["3"] * 8),
    ("a6", "What brand is the drink?", "COCA-COLA", ["coca-cola"] + ["cola"] * 9),
    ("a7", "What is the price?", "$1,000", ["$1,000"] * 10),
    ("a8", "Is the light on?", "", ["yes"] * 10),
    ("a9", "Whose bag is it?", "JOHN'S", ["john's"] * 3 + ["johns"] * 7),
]
TEXTVQA_ANSWERS = [  # in question-file order
    "Kodak!",  # a1: 'kodak' given by 2 of 10 -> 0.6
    "the 22",  # a2 number: article dropped -> 1.0
    "Red.",  # a2 colour: 3 of 10 -> 0.9
    "Ten past ten",  # a3: number words on both sides: '10 past 10', 5 of 10 -> 1.0
    "Dont walk",  # a4: contraction restored: "don't walk" 3 of 10 -> 0.9
    "2",  # a5: 'two' and '2' both normalise to '2' -> 0.6
    "Coca-Cola",  # a6: '-' becomes a space: 'coca cola', 1 of 10 -> 0.3
    "$1,000.",  # a7: commas dropped, final period stripped -> 1.0
    "yes" + "." * 40,  # a8: upstream quirk: at most 32 periods stripped -> 0.0
    "John's",  # a9: "john 's" on both sides, 3 of 10 -> 0.9
]

# -- ScienceQA: fixture problems 4, 5, 11, 15, then the appended ones --------------------------------------------
SQA_EXTRA = [  # pid, question, choices, answer index, with an image
    ("20", "Which is a liquid?", ["water", "rock", "wood"], 0, False),
    ("21", "Which is warmer?", ["ice", "fire"], 1, False),
    ("22", "What is shown?", ["a map", "a cell"], 0, True),
    ("23", "Pick the odd one.", ["1", "2", "3", "odd"], 3, False),
    ("24", "Which is a gas?", ["steam", "stone"], 0, False),
    ("25", "Which letter is last?", ["v", "w", "x", "y", "z"], 4, True),
]
SQA_ANSWERS = {  # None: no answer record (the official script scores it FAILED)
    "4": "B", "5": "The answer is C.", "11": "C",  # 11 has two choices: 'C' parses but is out of range
    "15": "B. whale", "20": "I think it is A", "21": "The answer is A. The answer is B.",  # two matches: FAILED
    "22": "The answer is Ax",  # the pattern's '.' matches any character
    "23": "a", "24": None, "25": "E.",  # 'E.' is neither a letter nor 'E. ...'
}


# -- data and answer files -----------------------------------------------------------------------------------------
def _append_jsonl(path: Path, rows) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def write_data(root: Path) -> Path:
    """The fixtures of POPE, TextVQA and ScienceQA under ``root``, with the extra questions appended in place."""
    write_fixtures(root, ["pope", "textvqa", "sqa"])
    for qid, cat, obj, label in POPE_EXTRA:
        text = f"Is there a {obj} in the image?"
        img = f"COCO_val2014_{qid:012d}.jpg"
        _append_jsonl(root / "pope/llava_pope_test.jsonl", [{"question_id": qid, "image": img, "text": text + S, "category": cat}])
        labels = root / f"pope/coco/coco_pope_{cat}.json"
        n = sum(1 for ln in open(labels) if ln.strip())
        _append_jsonl(labels, [{"question_id": n + 1, "image": img, "text": text, "label": label}])

    _append_jsonl(root / "textvqa/llava_textvqa_val_v051_ocr.jsonl",
                  [{"question_id": i, "image": f"{i}.jpg", "text": f"{q}\nReference OCR token: {o}" + S, "category": "default"}
                   for i, q, o, _ in TEXTVQA_EXTRA])
    ann = read_json(root / "textvqa/TextVQA_0.5.1_val.json")
    for i, q, _, answers in TEXTVQA_EXTRA:
        ann["data"].append({"image_id": i, "question": q, "answers": answers, "question_id": len(ann["data"])})
    write_json(root / "textvqa/TextVQA_0.5.1_val.json", ann, indent=1)

    sqa = root / "scienceqa"
    items, problems, splits = (read_json(sqa / n) for n in ("llava_test_CQM-A.json", "problems.json", "pid_splits.json"))
    for pid, q, choices, answer, image in SQA_EXTRA:
        text = ("<image>\n" if image else "") + q + "".join(f"\n{OPTIONS[k]}. {c}" for k, c in enumerate(choices))
        item = {"id": pid, "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": OPTIONS[answer]}]}
        if image:
            item["image"] = f"{pid}/image.png"
        items.append(item)
        problems[pid] = {"question": q, "choices": choices, "answer": answer, "image": "image.png" if image else None,
                         "split": "test"}
        splits["test"].append(pid)
    for name, obj in (("llava_test_CQM-A.json", items), ("problems.json", problems), ("pid_splits.json", splits)):
        write_json(sqa / name, obj, indent=1)
    return root


def write_answers(bench, answers, path: Path) -> list[dict]:
    """The answer file LLaVA's evaluator writes (one record per answered question, question-file order), read back:
    ``answers`` maps the question id to the output text (a list: by position; None: no record)."""
    qs = bench.load()
    texts = [answers.get(q.qid) for q in qs] if isinstance(answers, dict) else answers  # TextVQA repeats ids
    if len(texts) != len(qs):
        raise ValueError(f"{bench.name}: {len(texts)} answers for {len(qs)} questions")
    write_jsonl(path, [bench.record(q, t, "parity") for q, t in zip(qs, texts) if t is not None])
    return read_jsonl(path)


# -- our side ------------------------------------------------------------------------------------------------------
POPE_KEYS = ("samples", "TP", "FP", "TN", "FN", "accuracy", "precision", "recall", "f1", "yes_ratio")


def ours_pope(data: Path, records: list[dict], out: Path) -> dict:
    res = get_benchmark("pope", data).finalize(records, out, "parity")
    return {c: {k: m[k] for k in POPE_KEYS} for c, m in res["details"]["categories"].items()}


def ours_textvqa(name: str, data: Path, records: list[dict], out: Path) -> dict:
    bench = get_benchmark(name, data)
    res = bench.finalize(records, out, "parity")
    total = res["metrics"][bench.primary_metric()]
    per_q = scorers.score_textvqa(records, read_json(bench.path(bench.ANNOTATIONS))["data"])["per_sample"]
    return {"samples": res["details"]["samples"], "accuracy": total, "printed": f"{total:.2f}", "per_question": per_q}


def ours_sqa(data: Path, records: list[dict], out: Path) -> dict:
    res = get_benchmark("sqa", data).finalize(records, out, "parity")
    written = read_json(res["files"]["result"])
    return {"acc": written["acc"], "correct": written["correct"], "count": written["count"],
            "printed": {"accuracy": f"{res['metrics']['SQA-all']:.2f}", "img_accuracy": f"{res['metrics']['SQA-IMG']:.2f}"},
            "problems": {pid: {k: o[k] for k in ("parsed_ans", "ground_truth", "correct", "is_multimodal")}
                         for pid, o in written["outputs"].items()}}


# -- the official side ---------------------------------------------------------------------------------------------
def official_job(official_python: str, jobs: list[dict], work: Path) -> Job:
    """``official_scorers.py``'s job (each entry one scorer run; the files its SQA run writes are its outputs)."""
    return Job("scorers", official_python, jobs, work, worker=WORKER.name, outputs=("output_file", "output_result"),
               timeout=600, suffix=".official.json")


# -- comparison ----------------------------------------------------------------------------------------------------
def differences(ours, official, where: str = "") -> list[str]:
    """Every leaf that is not ``==``, as 'path: ours X, official Y'."""
    if isinstance(ours, dict) and isinstance(official, dict):
        out = []
        for k in sorted(set(ours) | set(official), key=str):
            if k not in ours or k not in official:
                out.append(f"{where}{k}: only {'official' if k not in ours else 'ours'}")
            else:
                out += differences(ours[k], official[k], f"{where}{k}.")
        return out
    if isinstance(ours, list) and isinstance(official, list) and len(ours) == len(official):
        return [d for i, (a, b) in enumerate(zip(ours, official)) for d in differences(a, b, f"{where}{i}.")]
    return [] if ours == official else [f"{where.rstrip('.')}: ours {ours!r}, official {official!r}"]


def check(case: str, ours: dict, official: dict, summary: str, official_only: dict | None = None) -> Check:
    """``official_only``: what only the official script exposes, kept in ``data``, not compared."""
    if "error" in official:
        return Check("scorers", case, False, f"the official script failed: {official['error']}", {"ours": ours})
    official = {k: v for k, v in official.items() if k != "stdout"}
    diff = differences(ours, official)
    detail = f"{summary}; every metric identical" if not diff else "; ".join(diff[:4]) + (
        f" (+{len(diff) - 4} more)" if len(diff) > 4 else "")
    return Check("scorers", case, not diff, detail, {"ours": ours, "official": official, **(official_only or {})})


def run_scorers(official_python: str, work: Path, runner: Runner | None = None) -> list[Check]:
    """One Check per POPE category, per TextVQA variant (OCR prompt, no-OCR prompt) and for ScienceQA; the official
    side one job of ``runner`` (:mod:`parity.jobs`)."""
    work = Path(work)
    data = write_data(work / "data")
    out = work / "ours"
    out.mkdir(parents=True, exist_ok=True)
    ours, jobs = {}, []

    pope_records = write_answers(get_benchmark("pope", data), POPE_ANSWERS, work / "pope_answers.jsonl")
    ours["pope"] = ours_pope(data, pope_records, out)
    jobs.append({"kind": "pope", "case": "pope", "annotation_dir": str(data / "pope/coco"),
                 "question_file": str(data / "pope/llava_pope_test.jsonl"), "result_file": str(work / "pope_answers.jsonl")})

    for name in ("textvqa", "textvqa_noocr"):
        records = write_answers(get_benchmark(name, data), TEXTVQA_ANSWERS, work / f"{name}/answers.jsonl")
        per_q = work / f"{name}/per_question"
        for i, r in enumerate(records):  # one answer file per question: the official script prints each one's score
            write_jsonl(per_q / f"q{i:02d}.jsonl", [r])
        ours[name] = ours_textvqa(name, data, records, out)
        jobs.append({"kind": "textvqa", "case": name, "annotation_file": str(data / "textvqa/TextVQA_0.5.1_val.json"),
                     "result_file": str(work / f"{name}/answers.jsonl"), "result_dir": str(per_q)})

    sqa_records = write_answers(get_benchmark("sqa", data), SQA_ANSWERS, work / "sqa_answers.jsonl")
    ours["sqa"] = ours_sqa(data, sqa_records, out)
    jobs.append({"kind": "sqa", "case": "sqa", "base_dir": str(data / "scienceqa"), "result_file": str(work / "sqa_answers.jsonl"),
                 "output_file": str(work / "sqa_official_output.json"), "output_result": str(work / "sqa_official_result.json")})

    try:
        official = run_job(official_job(official_python, jobs, work), runner)
    except JobFailed as e:
        return [Check("scorers", "official scorers", False, str(e))]

    checks = []
    off_pope = official["pope"]
    if "error" in off_pope:
        checks.append(check("pope", ours["pope"], off_pope, ""))
    else:
        for cat in sorted(set(ours["pope"]) | set(off_pope["categories"])):
            o, f = ours["pope"].get(cat, {}), off_pope["categories"].get(cat, {})
            summary = (f"{o.get('samples')} answers, TP/FP/TN/FN {o.get('TP')}/{o.get('FP')}/{o.get('TN')}/{o.get('FN')}, "
                       f"acc {o.get('accuracy')}, F1 {o.get('f1')}, yes ratio {o.get('yes_ratio')}")
            checks.append(check(f"pope {cat}", o, f, summary))

    for name in ("textvqa", "textvqa_noocr"):
        off = official[name]
        if "error" not in off:
            files, n = off["files"], len(ours[name]["per_question"])
            whole = files.get("answers", {"samples": None, "accuracy": float("nan"), "printed": None})
            # eval_textvqa.py prints 100. * eval_pred_list(...): the same product from the recorded return value
            off = {"samples": whole["samples"], "accuracy": 100.0 * whole["accuracy"], "printed": whole["printed"],
                   "per_question": [files.get(f"q{i:02d}", {}).get("accuracy") for i in range(n)]}
        o = ours[name]
        checks.append(check(name, o, off, f"{o['samples']} answers, accuracy {o['accuracy']} (printed {o['printed']}%), "
                                          "per-question soft scores"))

    o, off, only = ours["sqa"], official["sqa"], {}
    if "error" not in off:  # the parsed answer's index (``results``) is official-only: kept, not compared
        only = {"official_pred_idx": {pid: p["pred_idx"] for pid, p in off["problems"].items()}}
        off = {**off, "printed": {k: off["printed"][k] for k in ("accuracy", "img_accuracy")},
               "problems": {pid: {k: v for k, v in p.items() if k != "pred_idx"} for pid, p in off["problems"].items()}}
    checks.append(check("sqa", o, off, f"{o['count']} problems, acc {o['acc']}, IMG {o['printed']['img_accuracy']}%, "
                                        "per-problem parsed answer / correctness / multimodal", only))
    return checks
