"""How well ConsensusDrop's two signals, and their consensus, rank the tokens a question needs (testbed).

    python -m testbed.signal_quality --seeds 21 22 23 --n 800 --out docs/results/consensusdrop-signals.json
    python -m testbed.signal_quality --v2 --seeds 31 32 33 --n 700 --oracle --device cuda   # testbed v2 (576 tokens)

Accuracy at a budget mixes the ranking with the selection rule and the LLM; this measures the ranking
alone, against the testbed's ground truth (:func:`testbed.data.coverage`): a patch belongs to an object
when the object covers at least ``COVER`` of it; the *referenced* patches are those of the objects the
question names (all counted objects for a counting question; questions naming none are skipped there).
On testbed v2 (``--v2``) the ground truth is the scene's own patch sets (:attr:`testbed.data2.Scene.patches`:
each object's patches holding >= 5 % of its visible area) and the referenced patches are the question's
``support`` (every object the answer depends on, named or not: a relation's answer object, a superlative's
group, a scene count's every shape); top k is read at 16 / 32 / 64 of 576 and the oracle runs at 64 / 128 / 192.
Per question, over the image's 64 patches (576 on v2), for each ranking:

    objects vs background   ROC AUC of object patches against background patches
    referenced vs rest      ROC AUC of referenced patches against all others
    referenced vs objects   ROC AUC of referenced patches against the other objects' patches
    all refs in top k       every referenced object has a patch among the top k (k = 2, 4, 8)

The rankings: ``encoder`` (s_v, [CLS] attention), ``cross`` (s_x, for each ``cross_score`` option),
``borda`` (the default's consensus: the mean of the two rank relevances) and ``rrf5`` (reciprocal-rank
fusion 1/(5 + r_v) + 1/(5 + r_x)). Also: for AdaV's s_x (``cross_score=softmax``), the share of questions
whose top token is the peak of a question token that is not a colour, shape or size word (a function word
or the answer-format instruction). Signals are read from the engine while ConsensusDrop runs (budget 4,
the default options otherwise); means over questions, then the mean and sample sd over seeds.

``--oracle`` bounds what any ranking can gain: the accuracy of ConsensusDrop when the best-covered patch of
every referenced object is forced into the kept set first (an oracle no method has), the other picks by
the default's rule (``refs + default``) or by plain max-min coverage (``refs + coverage``), next to the
default on the same questions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from consensusdrop.consensusdrop import (ConsensusDrop, diverse_pick, fused_relevance, maxmin_problem, order_desc,
                                         ranks_from_order)
from llava.ops import cosine_matrix

from . import data as D
from . import evaluate as E

COVER = 0.25
CROSS_SCORES = ("softmax", "prominence")


def metric_names(topk=(2, 4, 8)) -> tuple[str, ...]:
    return ("objects vs background", "referenced vs rest", "referenced vs objects", *(f"all refs in top {k}" for k in topk))


METRICS = metric_names()


class V1:
    """Testbed v1's ground truth: coverage of each object over the 8 x 8 patches; the question's named objects."""
    grid, topk, budgets = D.GRID, (2, 4, 8), (4, 8, 16, 32)

    @staticmethod
    def questions(n, seed):
        return E.questions(n, seed)

    @staticmethod
    def load(threads, device="cpu"):
        return E.load_runtime(threads=threads)

    @staticmethod
    def objects(q):
        return [D.coverage(o) for o in q.scene.objects]

    @staticmethod
    def refs(q):
        return [D.coverage(o) for o in q.refs]

    @staticmethod
    def forced(q):
        return [int(np.argmax(D.coverage(o))) for o in q.refs]

    @staticmethod
    def content_words():
        return set(D.COLORS) | set(D.SHAPES) | set(D.PLURAL.values()) | set(D.SIZES)


class V2:
    """Testbed v2's ground truth: each object's patch set on the 24 x 24 grid (1.0 on its patches); the
    question's support (the objects its answer depends on); the oracle forces each support object's patch
    holding most of its visible area."""
    topk, budgets = (16, 32, 64), (64, 128, 192)

    def __init__(self):
        from . import data2, evaluate2

        self.D, self.E2 = data2, evaluate2
        self.grid = data2.GRID

    def questions(self, n, seed):
        return self.E2.questions(n, seed)

    def load(self, threads, device="cpu"):
        return self.E2.load_runtime(device=device, threads=threads)

    def _mask(self, patches):
        m = np.zeros(self.D.N_TOKENS)
        m[list(patches)] = 1.0
        return m

    def objects(self, q):
        return [self._mask(p) for p in q.scene.patches]

    def refs(self, q):
        return [self._mask(p) for p in q.support_patches]

    def forced(self, q):
        per_patch = self.D.visibility(q.scene.objects)[1]
        return [int(np.argmax(per_patch[i])) for i in q.support]

    def content_words(self):
        D2 = self.D
        return set(D2.COLORS) | set(D2.SHAPES) | set(D2.PLURAL.values()) | set(D2.SIZES) | set(D2.GLYPHS)


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC of scores ``pos`` against ``neg``: P(pos > neg) + P(pos == neg) / 2."""
    p = np.asarray(pos, dtype=np.float64)[:, None]
    n = np.asarray(neg, dtype=np.float64)[None, :]
    return float(((p > n) + 0.5 * (p == n)).mean())


def rankings(s_v: torch.Tensor, s_x: torch.Tensor) -> dict[str, np.ndarray]:
    """Scores (higher = kept first) of each ranking, with ConsensusDrop's tie rules."""
    r_v = ranks_from_order(order_desc(s_v, torch.zeros_like(s_v))).double()
    r_x = ranks_from_order(order_desc(s_x, s_v)).double()
    n = s_v.numel()
    return {"encoder": (-r_v).numpy(), "cross": (-r_x).numpy(), "borda": ((2 * n - r_v - r_x) / 2).numpy(),
            "rrf5": (1 / (5 + r_v) + 1 / (5 + r_x)).numpy()}


def question_metrics(score: np.ndarray, objects: list[np.ndarray], refs: list[np.ndarray],
                     topk=(2, 4, 8)) -> dict[str, float]:
    """The metrics of one ranking on one question (coverage arrays over the patches); NaN where undefined."""
    obj = np.max(objects, 0) >= COVER
    out = {m: float("nan") for m in metric_names(topk)}
    if obj.any() and (~obj).any():
        out["objects vs background"] = auc(score[obj], score[~obj])
    if refs:
        ref = np.max(refs, 0) >= COVER
        if ref.any() and (~ref).any():
            out["referenced vs rest"] = auc(score[ref], score[~ref])
        if ref.any() and (obj & ~ref).any():
            out["referenced vs objects"] = auc(score[ref], score[obj & ~ref])
        top = np.argsort(-score, kind="stable")
        for k in topk:
            out[f"all refs in top {k}"] = float(all(r[top[:k]].max() >= COVER for r in refs))
    return out


class _Recorder(ConsensusDrop):
    """ConsensusDrop that keeps each sample's s_v, s_x and, for AdaV's s_x, the question token behind
    the top token (the signals of the stock tokens, in batch order)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.records: list[dict] = []

    def select_vision(self, sig):
        q = sig.question_mask
        rec = {"ids": sig.question_ids.tolist()}
        if self.cross_score == "softmax":
            p = torch.softmax(100.0 * cosine_matrix(sig.text_embeds[q], sig.features[: sig.num_stock]), dim=1)
            rec["top_word"] = int(p[:, int(p.amax(0).argmax())].argmax())
        self.records.append(rec)
        return super().select_vision(sig)

    def _select(self, s_v, s_x, metric, unit, patch, unit_pos, is_newline, n_stock, *a, **k):
        self.records[-1].update(s_v=s_v[:n_stock].detach().float().cpu(), s_x=s_x[:n_stock].detach().float().cpu())
        return super()._select(s_v, s_x, metric, unit, patch, unit_pos, is_newline, n_stock, *a, **k)


class _Oracle(ConsensusDrop):
    """ConsensusDrop with the referenced objects' best patches forced first (testbed ground truth, one list
    of patch indices per sample in batch order); ``fill='coverage'``: the rest by plain max-min."""

    def __init__(self, forced: list[list[int]], *a, grid: int = D.GRID, **k):
        super().__init__(*a, **k)
        self.forced, self.i, self.cur, self.grid = forced, 0, [], grid

    def select_vision(self, sig):
        if sig.num_stock != self.grid * self.grid:
            raise ValueError(f"the oracle indexes the testbed's single {self.grid} x {self.grid} grid")
        self.cur, self.i = self.forced[self.i], self.i + 1
        return super().select_vision(sig)

    def _dominant(self, s_v, s_x, x, d, defer=False, rows=None):
        seed = torch.tensor(self.cur[:d], dtype=torch.long, device=x.device) if self.cur else None
        rel = fused_relevance(s_v, s_x, self.fusion, self.w_v, self.w_x, self.relevance, self.rrf_k)
        if self.fill == "coverage":
            rel = torch.ones_like(rel)
        if defer:
            return maxmin_problem(x, rel, d, seed, self.alpha, rows=rows)
        return diverse_pick(x, rel, d, seed, "maxmin", self.alpha)


def oracle_accuracy(rt, n: int, seed: int, budgets=None, tb=V1) -> dict:
    """{budget: {"default" | "refs + default" | "refs + coverage": accuracy %}} on the same questions."""
    qs = tb.questions(n, seed)
    batches = E._Batches(rt, qs)
    forced = [tb.forced(q) for q in qs]
    out: dict = {}
    for b in budgets or tb.budgets:
        row = {}
        for name, m in (("default", "consensusdrop"), ("refs + default", _Oracle(forced, budget=b, grid=tb.grid)),
                        ("refs + coverage", _Oracle(forced, budget=b, fill="coverage", grid=tb.grid))):
            ans, _ = E.predict(rt, batches, m, b if isinstance(m, str) else None)
            row[name] = 100.0 * float(np.mean([E.is_correct(a, q.answer) for a, q in zip(ans, qs)]))
        out[b] = row
    return out


def oracle_table(per_seed: dict[int, dict]) -> str:
    seeds = sorted(per_seed)
    budgets = list(per_seed[seeds[0]])
    names = list(per_seed[seeds[0]][budgets[0]])
    lines = [f"Accuracy (%), mean ± sd over seeds {', '.join(map(str, seeds))}: the default against the same "
             "selection with every referenced object's best patch forced first (an oracle).", "",
             "| kept set | " + " | ".join(f"{b} tokens" for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
    for name in names:
        cells = []
        for b in budgets:
            v = np.array([per_seed[s][b][name] for s in seeds])
            cells.append(f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def content_words() -> set[str]:
    return V1.content_words()


def measure(rt, n: int, seed: int, tb=V1) -> dict:
    """{cross_score: {ranking: {metric: mean over questions}}}, plus ``function_word_top`` (softmax)."""
    qs = tb.questions(n, seed)
    batches = E._Batches(rt, qs)
    tok = rt.processor.tokenizer
    words = tb.content_words()
    out: dict = {}
    for how in CROSS_SCORES:
        m = _Recorder(budget=4, cross_score=how)
        E.predict(rt, batches, m)
        if len(m.records) != len(qs):
            raise RuntimeError(f"recorded {len(m.records)} samples for {len(qs)} questions")
        acc: dict[str, dict[str, list[float]]] = {}
        for q, rec in zip(qs, m.records):
            objects, refs = tb.objects(q), tb.refs(q)
            for name, score in rankings(rec["s_v"], rec["s_x"]).items():
                for k, v in question_metrics(score, objects, refs, tb.topk).items():
                    acc.setdefault(name, {}).setdefault(k, []).append(v)
        out[how] = {name: {k: float(np.nanmean(v)) for k, v in d.items()} for name, d in acc.items()}
        if how == "softmax":
            tops = [tok.decode([rec["ids"][rec["top_word"]]]).strip() for rec in m.records]
            out["function_word_top"] = float(np.mean([w not in words for w in tops]))
    return out


def table(per_seed: dict[int, dict], topk=(2, 4, 8)) -> str:
    """Markdown: mean ± sd over seeds of every ranking x metric."""
    seeds = sorted(per_seed)
    names = metric_names(topk)
    lines = [f"Seeds {', '.join(map(str, seeds))}; mean ± sd over seeds of the per-question means.", "",
             "| s_x | ranking | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for how in CROSS_SCORES:
        for name in ("encoder", "cross", "borda", "rrf5"):
            if how != CROSS_SCORES[0] and name == "encoder":
                continue  # the same s_v whatever the cross score
            cells = []
            for k in names:
                v = np.array([per_seed[s][how][name][k] for s in seeds])
                cells.append(f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}")
            lines.append(f"| {how} | {name} | " + " | ".join(cells) + " |")
    fw = np.array([per_seed[s]["function_word_top"] for s in seeds])
    lines += ["", f"AdaV's s_x (softmax): top token set by a non-content question token on {100 * fw.mean():.1f}% "
                  f"of the questions (sd {100 * (fw.std(ddof=1) if len(fw) > 1 else 0.0):.1f})."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[21, 22, 23])
    ap.add_argument("--n", type=int, default=800)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--oracle", action="store_true", help="also the oracle's accuracy bound (4 x 3 runs per seed)")
    ap.add_argument("--out", help="write the per-seed numbers and the table here (.json; .md beside it)")
    ap.add_argument("--v2", action="store_true", help="testbed v2 (testbed/weights2, 576 tokens, the questions' support)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    tb = V2() if args.v2 else V1
    rt = tb.load(args.threads, args.device)
    per_seed = {s: measure(rt, args.n, s, tb) for s in args.seeds}
    md = table(per_seed, tb.topk)
    if args.oracle:
        for s in args.seeds:
            per_seed[s]["oracle"] = oracle_accuracy(rt, args.n, s, tb=tb)
        md += "\n\n" + oracle_table({s: per_seed[s]["oracle"] for s in args.seeds})
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": {"testbed": "v2" if args.v2 else "v1", "n_questions": args.n, "seeds": args.seeds, "cover": COVER,
                                            "command": "python -m testbed.signal_quality "
                                            + " ".join(sys.argv[1:] if argv is None else argv)},
                                   "per_seed": per_seed}, indent=1) + "\n")
        out.with_suffix(".md").write_text(f"# ConsensusDrop's signals as rankings (testbed{' v2' if args.v2 else ''})\n\n"
                                          + md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
