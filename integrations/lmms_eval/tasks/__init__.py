"""Local lmms-eval tasks shipped with the repository: a task folder (YAML + utils.py) per task, whose
small dataset is written on disk next to it (no download):

    python -m integrations.lmms_eval.tasks OUT_DIR [TASK] [N]     # OUT_DIR/TASK/{TASK.yaml, utils.py, data/}
    python -m lmms_eval --model vtprune --model_args pretrained=testbed/weights,method=consensusdrop,budget=8 \\
        --include_path OUT_DIR --tasks vtprune_shapes --limit 8 --batch_size 2 --output_path OUT_DIR/logs

Tasks (docs/evaluation.md section 8):

* ``vtprune_shapes`` (default): the trained testbed's synthetic shapes QA (our harness's ``shapes``
  benchmark, seed 0, N questions, default 16), images rendered to PNG. With ``pretrained=testbed/weights``
  the answers mean something (the unpruned testbed is right on most of them).
* ``vtprune_gqa_fixture``: the questions and images of our harness's GQA fixture (eval/fixtures.py, the
  layout of LLaVA's playground/data/eval/gqa); ``OUT_DIR/vtprune_gqa_fixture/data`` is also a
  ``--data-root`` for ``python -m eval run gqa``, so both harnesses read the very same files.

Both use LLaVA's short-answer prompt (question + "\\nAnswer the question using a single word or
phrase."), which is what ``python -m eval run`` sends for the same benchmark.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

HERE = Path(__file__).parent
TASKS = ("vtprune_shapes", "vtprune_gqa_fixture")
POST_PROMPT = "\nAnswer the question using a single word or phrase."  # = the YAMLs'; = eval/fixtures.S
SHAPES_N, SHAPES_SEED = 16, 0


def _copy_task(out_dir, task: str) -> Path:
    if task not in TASKS:
        raise ValueError(f"unknown local task {task!r}; shipped: {', '.join(TASKS)}")
    dst = Path(out_dir) / task
    (dst / "data").mkdir(parents=True, exist_ok=True)
    for f in (f"{task}.yaml", "utils.py"):
        shutil.copyfile(HERE / task / f, dst / f)
    return dst


def _write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _strip_suffix(text: str, what: str) -> str:
    if not text.endswith(POST_PROMPT):
        raise ValueError(f"{what}: expected LLaVA's short-answer suffix, got {text!r}")
    return text[: -len(POST_PROMPT)]


def write_task(out_dir, task: str = "vtprune_shapes", n: int | None = None) -> Path:
    """Copy the task folder (YAML + utils.py) to ``out_dir/<task>`` and write its data into
    ``out_dir/<task>/data``; returns ``out_dir/<task>``. ``n``: the number of shapes questions (seed 0;
    ``python -m eval run shapes --bench-opt n=N`` asks the same ones)."""
    dst = _copy_task(out_dir, task)
    data = dst / "data"
    rows = []
    if task == "vtprune_gqa_fixture":
        from eval.fixtures import gqa

        gqa(data)  # our harness's layout: gqa/llava_gqa_testdev_balanced.jsonl, gqa/data/{images, questions}
        tier = json.loads((data / "gqa/data/testdev_balanced_questions.json").read_text())
        for line in (data / "gqa/llava_gqa_testdev_balanced.jsonl").read_text().splitlines():
            q = json.loads(line)
            rows.append({"question_id": str(q["question_id"]), "question": _strip_suffix(q["text"], q["question_id"]),
                         "image": f"data/gqa/data/images/{q['image']}", "answer": tier[str(q["question_id"])]["answer"]})
    else:
        from testbed import evaluate

        img_dir = data / "images"
        img_dir.mkdir(exist_ok=True)
        for i, q in enumerate(evaluate.questions(int(n or SHAPES_N), SHAPES_SEED)):
            q.image().save(img_dir / f"{i:05d}.png")  # lossless: the pixels the harness feeds
            rows.append({"question_id": i, "question": _strip_suffix(q.prompt, f"shapes question {i}"),
                         "image": f"data/images/{i:05d}.png", "answer": q.answer, "qtype": q.qtype,
                         "salience": q.salience})
    _write_jsonl(data / "questions.jsonl", rows)
    return dst
