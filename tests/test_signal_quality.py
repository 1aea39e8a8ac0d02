"""testbed.signal_quality: ConsensusDrop's signals scored as rankings against the testbed's ground truth."""

import numpy as np
import pytest
import torch

from testbed import signal_quality as SQ


def test_auc_by_hand():
    # pairs (pos, neg): 3 > 1, 3 > 2, 2 > 1, 2 == 2 (half) -> 3.5 / 4
    assert SQ.auc(np.array([3.0, 2.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)
    assert SQ.auc(np.array([0.0]), np.array([1.0, 2.0])) == 0.0


def test_rankings_follow_consensusdrops_ties():
    s_v = torch.tensor([0.5, 0.1, 0.3, 0.1])  # r_v = [1, 3, 2, 4] (the 0.1 tie: lower index first)
    s_x = torch.tensor([0.0, 0.9, 0.2, 0.2])  # r_x = [4, 1, 2, 3] (the 0.2 tie: higher s_v first -> 2)
    r = SQ.rankings(s_v, s_x)
    assert r["encoder"].tolist() == [-1, -3, -2, -4]
    assert r["cross"].tolist() == [-4, -1, -2, -3]
    assert r["borda"].tolist() == pytest.approx([(8 - 5) / 2, (8 - 4) / 2, (8 - 4) / 2, (8 - 7) / 2])
    assert r["rrf5"].tolist() == pytest.approx([1 / 6 + 1 / 9, 1 / 8 + 1 / 6, 1 / 7 + 1 / 7, 1 / 9 + 1 / 8])


def test_question_metrics_by_hand():
    # 6 patches: object A on 0-1 (referenced), object B on 2-3, background 4-5
    a = np.array([1.0, 0.5, 0, 0, 0, 0])
    b = np.array([0, 0, 0.9, 0.3, 0, 0])
    score = np.array([6.0, 1.0, 5.0, 4.0, 3.0, 2.0])  # A's best patch first, its second patch last
    m = SQ.question_metrics(score, [a, b], [a])
    # objects {0,1,2,3} vs background {4,5}: 6 of 8 pairs won (patch 1 loses both)
    assert m["objects vs background"] == pytest.approx(6 / 8)
    # referenced {0,1} vs rest {2,3,4,5}: patch 0 wins 4, patch 1 none
    assert m["referenced vs rest"] == pytest.approx(4 / 8)
    assert m["referenced vs objects"] == pytest.approx(2 / 4)
    assert (m["all refs in top 2"], m["all refs in top 4"]) == (1.0, 1.0)
    m = SQ.question_metrics(-score, [a, b], [a])  # reversed: A's best patch last, its weak patch first
    assert (m["all refs in top 2"], m["all refs in top 8"]) == (1.0, 1.0)  # patch 1 is covered 0.5 >= COVER
    m = SQ.question_metrics(score, [a, b], [])  # a question naming no present object: ref metrics undefined
    assert np.isnan(m["referenced vs rest"]) and np.isnan(m["all refs in top 4"])


def test_shipped_testbed_signals():
    """On the shipped checkpoint: the [CLS] saliency is an object detector that does not know the question;
    AdaV's text-image score knows it better among the objects but is noisy on the background."""
    from testbed import evaluate as E

    rt = E.load_runtime(threads=2)
    r = SQ.measure(rt, 200, 0)
    enc, cross, prom = r["softmax"]["encoder"], r["softmax"]["cross"], r["prominence"]["cross"]
    assert enc["objects vs background"] > 0.85
    assert max(cross["objects vs background"], prom["objects vs background"]) < 0.75
    assert prom["referenced vs objects"] > 0.75 > 0.6 > enc["referenced vs objects"]
    # the consensus of reciprocal ranks ranks the question's patches against all others above either signal
    for how in SQ.CROSS_SCORES:
        best_single = max(r[how]["cross"]["referenced vs rest"], enc["referenced vs rest"])
        assert r[how]["rrf5"]["referenced vs rest"] > best_single
    assert 0.2 < r["function_word_top"] < 0.9


def test_oracle_keeps_the_referenced_patches_first():
    from testbed import data as D
    from testbed import evaluate as E

    class Spy(SQ._Oracle):
        def _select(self, *a, **k):
            sel = super()._select(*a, **k)
            self.kept.append(set(sel.keep.tolist()))
            return sel

    rt = E.load_runtime(threads=2)
    qs = E.questions(12, 0)
    forced = [[int(np.argmax(D.coverage(o))) for o in q.refs] for q in qs]
    assert sum(map(len, forced)) >= 8  # spatial / counting questions force two or more
    for fill in ("fused", "coverage"):
        m = Spy(forced, budget=4, fill=fill)
        m.kept = []
        E.predict(rt, qs, m)
        assert len(m.kept) == 12
        for f, k in zip(forced, m.kept):
            assert set(f[:4]) <= k and len(k) == 4


def test_v2_ground_truth_and_oracle_on_a_tiny_v2_model(tmp_path):
    """The v2 ground truth (patch sets, the questions' support, each support object's best patch) and the
    oracle's forced patches on 576 tokens, run on a tiny random-weight v2 checkpoint (the machinery only)."""
    from testbed import data2 as D2
    from testbed import evaluate as E
    from testbed import model2

    tb = SQ.V2()
    qs = tb.questions(14, 5)
    for q in qs:
        objs, refs, forced = tb.objects(q), tb.refs(q), tb.forced(q)
        assert len(objs) == len(q.scene.objects) and all(o.shape == (576,) for o in objs)
        assert len(refs) == len(forced) == len(q.support)
        for i, p, r in zip(q.support, forced, refs):
            assert p in q.scene.patches[i] and r[p] == 1.0  # the best patch is one of the object's patches
            assert r.sum() == len(q.scene.patches[i])
    assert {q.qtype for q in qs} == set(D2.QTYPES)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 1}
    model2.save(model2.build(vision={**small, "projection_dim": 32}, text={**small, "num_key_value_heads": 1}), tmp_path)
    rt = tb.E2.load_runtime(tmp_path)
    r = SQ.measure(rt, 7, 5, tb)
    assert set(r["softmax"]["encoder"]) == set(SQ.metric_names(tb.topk))
    assert 0.0 <= r["softmax"]["borda"]["referenced vs rest"] <= 1.0

    class Spy(SQ._Oracle):
        def _select(self, *a, **k):
            sel = super()._select(*a, **k)
            self.kept.append(set(sel.keep.tolist()))
            return sel

    qs = tb.questions(7, 5)
    forced = [tb.forced(q) for q in qs]
    m = Spy(forced, budget=64, grid=24)
    m.kept = []
    E.predict(rt, qs, m)
    assert len(m.kept) == 7
    for kept, f in zip(m.kept, forced):
        assert set(f[:64]) <= kept  # every support object's best patch is kept
