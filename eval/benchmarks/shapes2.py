"""Testbed v2 (testbed/data2.py, docs/testbed.md "Testbed v2") as a harness benchmark: cluttered 336 px
scenes, 576 visual tokens, seven question types.

Questions are generated (seeded; nothing to download): ``n`` questions of each seed in ``seeds`` (default
the report seeds of ``testbed.evaluate2``, 5 x 800), uids ``<seed>-<index>``. The model is the v2 checkpoint
``testbed/weights2`` by default; prompts, decoding and scoring are ``testbed.evaluate``'s (LLaVA's
``vicuna_v1`` prompt with the short-answer suffix, greedy, exact match), reported overall, per type and per
salience of the object the answer is read from.
"""

from __future__ import annotations

from pathlib import Path

from ..stats import Stat
from .base import Benchmark, Metric, Question

QTYPES = ("attribute", "existence", "counting", "scene_count", "relation", "superlative", "glyph")
SALIENCE = ("small", "medium", "large", "absent")


def _testbed():
    from testbed import data2, evaluate, evaluate2

    return data2, evaluate, evaluate2


class Shapes2(Benchmark):
    name = "shapes2"
    title = "Testbed v2: cluttered shapes QA at 576 tokens"
    protocol = "testbed.evaluate2"
    max_new_tokens = 3
    metrics = [Metric("Shapes2", "testbed v2 accuracy, exact match, all question types", primary=True),
               *(Metric(f"Shapes2-{t}", f"testbed v2 accuracy, {t} questions") for t in QTYPES),
               *(Metric(f"Shapes2-{s}", f"testbed v2 accuracy, answers read from {s} objects") for s in SALIENCE)]

    stats = {"Shapes2": Stat(binomial=True),
             **{f"Shapes2-{t}": Stat(where=(("qtype", t),), binomial=True) for t in QTYPES},
             **{f"Shapes2-{s}": Stat(where=(("salience", s),), binomial=True) for s in SALIENCE}}

    @classmethod
    def option_defaults(cls):
        return {"n": 800, "seeds": "101,102,103,104,105"}

    def files(self):
        return []  # generated on the fly

    def _seeds(self) -> list[int]:
        try:
            return [int(s) for s in str(self.seeds).replace(" ", "").split(",") if s]
        except ValueError:
            raise ValueError(f"shapes2: seeds must be comma-separated integers, got {self.seeds!r}") from None

    def _questions(self):
        """(seed, question) pairs, generated once per benchmark object (4,000 scenes take ~25 s: load and
        finalize both need them)."""
        key = (int(self.n), tuple(self._seeds()))
        if getattr(self, "_made", (None,))[0] != key:
            e2 = _testbed()[2]
            self._made = (key, [(seed, q) for seed in key[1] for q in e2.questions(key[0], seed)])
        return self._made[1]

    def load(self):
        return [Question(idx=i, uid=f"{seed}-{q.index}", qid=f"{seed}-{q.index}", text=q.prompt, prompt=q.prompt,
                         image=q.image, extra={"answer": q.answer, "qtype": q.qtype, "salience": q.salience})
                for i, (seed, q) in enumerate(self._questions())]

    def finalize(self, records, out_dir: Path, ckpt: str, strict: bool = True):
        data2, evaluate, _ = _testbed()
        pairs = self._questions()
        by_id = {str(r["question_id"]): r["text"] for r in records}
        keys = [f"{seed}-{q.index}" for seed, q in pairs]
        missing = [k for k in keys if k not in by_id]
        if missing and strict:
            raise ValueError(f"shapes2: {len(missing)} questions have no answer (e.g. {missing[:5]})")
        kept = [(k, q) for k, (_, q) in zip(keys, pairs) if k in by_id]
        res = evaluate.summarize([q for _, q in kept], [by_id[k] for k, _ in kept], data2.QTYPES, data2.SALIENCE)
        acc = res["accuracy"]
        metrics = {"Shapes2": acc["overall"]}
        metrics.update({f"Shapes2-{t}": acc[t] for t in QTYPES if t in acc})
        metrics.update({f"Shapes2-{s}": acc[f"salience:{s}"] for s in SALIENCE if f"salience:{s}" in acc})
        units = [{"id": k, "tags": {"qtype": q.qtype, "salience": q.salience},
                  "v": {"correct": int(evaluate.is_correct(by_id[k], q.answer))}} for k, q in kept]
        return {"metrics": metrics, "details": {"accuracy": acc, "n": res["n"], "missing": len(missing)}, "files": {},
                "units": units}
