"""The official side of the scorer parity check (``parity/scorers.py``): runs in ``.venv-official``
(scripts/official_env.sh: llava-torch 1.2.2.post1, the official LLaVA code), started as a script from an empty
folder, ``python parity/official_scorers.py JOB.json OUT.json``, so that ``import llava`` is the installed official
package (refused otherwise: exit 2). Standard library and the official package only.

Each official script runs unchanged, as its shell scripts run it, through
``runpy.run_module(..., run_name="__main__")`` with ``sys.argv`` set; what it prints or writes is parsed:

* ``llava/eval/eval_pope.py`` (--annotation-dir --question-file --result-file): the per-category block it prints
  (TP/FP/TN/FN, Accuracy, Precision, Recall, F1 score, Yes ratio; floats printed with ``str``, so exact);
* ``llava/eval/eval_textvqa.py`` (--annotation-file --result-file --result-dir): per answer file the samples and
  the accuracy it prints (two decimals); the exact value is the return of
  ``m4c_evaluator.TextVQAAccuracyEvaluator.eval_pred_list``, recorded by a wrapper that calls the original and
  changes nothing;
* ``llava/eval/eval_science_qa.py`` (--base-dir --result-file --output-file --output-result --split): the line
  it prints (Accuracy, IMG-Accuracy, two decimals), its --output-result JSON (acc, correct, count, and per
  problem the parsed answer's index, ``results``) and its --output-file JSON (per problem ``parsed_ans``,
  ``ground_truth``, ``is_multimodal``, in the ``correct`` or ``incorrect`` list).

JOB: ``[{"kind": "pope" | "textvqa" | "sqa", "case": NAME, ...the script's arguments...}]``; OUT: ``{NAME: parsed}``
(``{"error": ..., "stdout": ...}`` where the script raised).
"""

import contextlib
import importlib.util
import io
import json
import os
import re
import runpy
import sys
import sysconfig

HERE = os.path.dirname(os.path.abspath(__file__))
# a script's own folder is sys.path[0]: this repository's parity/ must not be importable here either
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]


def require_official_llava() -> None:
    """Exit 2, one line, unless ``llava`` resolves to the package installed in this interpreter's site-packages."""
    spec = importlib.util.find_spec("llava")
    origin = os.path.realpath(spec.origin) if spec and spec.origin else None
    site = os.path.realpath(sysconfig.get_paths()["purelib"])
    if origin is None or not origin.startswith(site + os.sep):
        print(f"official_scorers: `llava` resolves to {origin}, not the official package in {site}; "
              "run .venv-official's python from an empty folder, without PYTHONPATH", file=sys.stderr)
        sys.exit(2)


def run_script(module: str, argv: list) -> str:
    """``python -m module argv...`` in this process; its stdout (tqdm's stderr is dropped)."""
    out, saved = io.StringIO(), sys.argv
    sys.argv = [module.rsplit(".", 1)[-1] + ".py"] + [str(a) for a in argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            runpy.run_module(module, run_name="__main__", alter_sys=False)
    except BaseException as e:  # the script's own failure (e.g. ZeroDivisionError) is a result to report
        raise ScriptError(f"{type(e).__name__}: {e}", out.getvalue()) from None
    finally:
        sys.argv = saved
    return out.getvalue()


class ScriptError(Exception):
    def __init__(self, error: str, stdout: str):
        super().__init__(error)
        self.error, self.stdout = error, stdout


POPE_BLOCK = re.compile(r"Category: (\S+), # samples: (\d+)\nTP\tFP\tTN\tFN\t\n(\d+)\t(\d+)\t(\d+)\t(\d+)\n"
                        r"Accuracy: (\S+)\nPrecision: (\S+)\nRecall: (\S+)\nF1 score: (\S+)\nYes ratio: (\S+)\n")


def pope(job: dict) -> dict:
    stdout = run_script("llava.eval.eval_pope", ["--annotation-dir", job["annotation_dir"],
                                                 "--question-file", job["question_file"],
                                                 "--result-file", job["result_file"]])
    out = {}
    for m in POPE_BLOCK.finditer(stdout):
        tp, fp, tn, fn = (int(x) for x in m.groups()[2:6])
        acc, precision, recall, f1, yes_ratio = (float(x) for x in m.groups()[6:])
        out[m.group(1)] = {"samples": int(m.group(2)), "TP": tp, "FP": fp, "TN": tn, "FN": fn, "accuracy": acc,
                           "precision": precision, "recall": recall, "f1": f1, "yes_ratio": yes_ratio}
    return {"categories": out, "stdout": stdout}


TEXTVQA_BLOCK = re.compile(r"^(\S+)\nSamples: (\d+)\nAccuracy: (\S+)%$", re.M)


def textvqa(job: dict) -> dict:
    from llava.eval import m4c_evaluator

    cls = m4c_evaluator.TextVQAAccuracyEvaluator
    original, returned = cls.eval_pred_list, []

    def eval_pred_list(self, pred_list):  # observe only: the original's return value, unchanged
        value = original(self, pred_list)
        returned.append(value)
        return value

    cls.eval_pred_list = eval_pred_list
    try:
        stdout = run_script("llava.eval.eval_textvqa", ["--annotation-file", job["annotation_file"],
                                                        "--result-file", job["result_file"],
                                                        "--result-dir", job["result_dir"]])
    finally:
        cls.eval_pred_list = original
    blocks = TEXTVQA_BLOCK.findall(stdout)
    if len(blocks) != len(returned):
        raise ScriptError(f"{len(blocks)} printed results but {len(returned)} evaluations", stdout)
    # printed in evaluation order: --result-file first, then the --result-dir files sorted by name
    return {"files": {name: {"samples": int(n), "printed": acc, "accuracy": value}
                      for (name, n, acc), value in zip(blocks, returned)}, "stdout": stdout}


SQA_LINE = re.compile(r"Total: (\d+), Correct: (\d+), Accuracy: (\S+)%, IMG-Accuracy: (\S+)%")


def sqa(job: dict) -> dict:
    output_file, output_result = job["output_file"], job["output_result"]
    stdout = run_script("llava.eval.eval_science_qa", ["--base-dir", job["base_dir"], "--result-file", job["result_file"],
                                                       "--output-file", output_file, "--output-result", output_result,
                                                       "--split", job.get("split", "test")])
    m = SQA_LINE.search(stdout)
    if m is None:
        raise ScriptError("no result line printed", stdout)
    with open(output_result) as f:
        result = json.load(f)
    with open(output_file) as f:
        analysis = json.load(f)
    problems = {}
    for verdict in ("correct", "incorrect"):
        for a in analysis[verdict]:
            problems[a["question_id"]] = {"parsed_ans": a["parsed_ans"], "ground_truth": a["ground_truth"],
                                          "correct": verdict == "correct", "is_multimodal": a["is_multimodal"],
                                          "pred_idx": result["results"][a["question_id"]]}
    return {"acc": result["acc"], "correct": result["correct"], "count": result["count"],
            "printed": {"total": int(m.group(1)), "correct": int(m.group(2)), "accuracy": m.group(3),
                        "img_accuracy": m.group(4)},
            "problems": problems, "stdout": stdout}


KINDS = {"pope": pope, "textvqa": textvqa, "sqa": sqa}


def main(argv: list) -> int:
    if len(argv) != 2:
        print("usage: official_scorers.py JOB.json OUT.json", file=sys.stderr)
        return 2
    require_official_llava()
    with open(argv[0]) as f:
        jobs = json.load(f)
    out = {}
    for job in jobs:
        try:
            out[job["case"]] = KINDS[job["kind"]](job)
        except ScriptError as e:
            out[job["case"]] = {"error": e.error, "stdout": e.stdout}
    with open(argv[1], "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
