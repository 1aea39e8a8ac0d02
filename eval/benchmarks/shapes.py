"""The trained testbed's synthetic shapes QA (testbed/, docs/testbed.md) as a harness benchmark.

Questions are generated (seeded; nothing to download), the model is the shipped checkpoint
``testbed/weights`` by default; prompts, decoding and scoring are those of ``testbed.evaluate``
(LLaVA's ``vicuna_v1`` prompt with the short-answer suffix, greedy, exact match of the one-word
answer), reported overall, per question type and per salience of the queried object.
"""

from __future__ import annotations

from pathlib import Path

from ..stats import Stat
from .base import Benchmark, Metric, Question


def _testbed():
    from testbed import data, evaluate

    return data, evaluate


class Shapes(Benchmark):
    name = "shapes"
    title = "Testbed: synthetic shapes QA"
    protocol = "testbed.evaluate"
    max_new_tokens = 3  # one-word answers (testbed.evaluate.MAX_NEW_TOKENS)
    metrics = [Metric("Shapes", "testbed accuracy, exact match, all question types", primary=True),
               *(Metric(f"Shapes-{t}", f"testbed accuracy, {t} questions")
                 for t in ("attribute", "existence", "counting", "spatial")),
               *(Metric(f"Shapes-{s}", f"testbed accuracy, questions about {s} objects")
                 for s in ("small", "large", "absent"))]

    stats = {"Shapes": Stat(binomial=True),
             **{f"Shapes-{t}": Stat(where=(("qtype", t),), binomial=True)
                for t in ("attribute", "existence", "counting", "spatial")},
             **{f"Shapes-{s}": Stat(where=(("salience", s),), binomial=True) for s in ("small", "large", "absent")}}

    @classmethod
    def option_defaults(cls):
        return {"n": 400, "seed": 0}

    def files(self):
        return []  # generated on the fly

    def _questions(self):
        return _testbed()[1].questions(int(self.n), int(self.seed))

    def load(self):
        return [Question(idx=i, uid=str(i), qid=i, text=q.prompt, prompt=q.prompt, image=q.image,
                         extra={"answer": q.answer, "qtype": q.qtype, "salience": q.salience})
                for i, q in enumerate(self._questions())]

    def finalize(self, records, out_dir: Path, ckpt: str, strict: bool = True):
        qs = self._questions()
        by_id = {int(r["question_id"]): r["text"] for r in records}
        missing = [i for i in range(len(qs)) if i not in by_id]
        if missing and strict:
            raise ValueError(f"shapes: {len(missing)} questions have no answer (e.g. {missing[:5]})")
        kept = [i for i in range(len(qs)) if i in by_id]
        res = _testbed()[1].summarize([qs[i] for i in kept], [by_id[i] for i in kept])
        acc = res["accuracy"]
        metrics = {"Shapes": acc["overall"]}
        metrics.update({f"Shapes-{t}": acc[t] for t in ("attribute", "existence", "counting", "spatial") if t in acc})
        metrics.update({f"Shapes-{s}": acc[f"salience:{s}"] for s in ("small", "large", "absent")
                        if f"salience:{s}" in acc})
        ev = _testbed()[1]
        units = [{"id": str(i), "tags": {"qtype": qs[i].qtype, "salience": qs[i].salience},
                  "v": {"correct": int(ev.is_correct(by_id[i], qs[i].answer))}} for i in kept]
        return {"metrics": metrics, "details": {"accuracy": acc, "n": res["n"], "missing": len(missing)}, "files": {},
                "units": units}
