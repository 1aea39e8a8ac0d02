"""The testbed's synthetic data generator (testbed/data.py): determinism, disjoint splits, balanced
question types, small and salient targets, and an answer vocabulary the tokenizer covers. (The trained
checkpoint and its accuracy regression checks land with the weights.)"""

import collections

from testbed import data as D
from testbed.model import build_tokenizer


def test_generator_is_deterministic():
    for i in (0, 1, 7):
        a, b = D.make_question(0, "test", i), D.make_question(0, "test", i)
        assert (a.question, a.answer, a.qtype, a.salience) == (b.question, b.answer, b.qtype, b.salience)
        assert a.scene.signature() == b.scene.signature()
        assert a.image().tobytes() == b.image().tobytes()
    assert D.make_question(1, "test", 0).scene.signature() != D.make_question(0, "test", 0).scene.signature()


def test_splits_are_disjoint():
    train = {D.make_question(0, "train", i).scene.signature() for i in range(300)}
    test = {q.scene.signature() for q in D.test_set(300)}
    assert len(train) == 300 and len(test) == 300
    assert not train & test


def test_question_types_balanced_and_answers_in_vocabulary():
    qs = D.test_set(400)
    assert collections.Counter(q.qtype for q in qs) == {t: 100 for t in D.QTYPES}
    yes = sum(q.answer == "yes" for q in qs if q.qtype == "existence")
    assert 40 <= yes <= 60  # POPE-style balance
    counts = collections.Counter(q.answer for q in qs if q.qtype == "counting")
    assert set(counts) == {"0", "1", "2", "3"} and min(counts.values()) >= 15
    assert set(collections.Counter(q.answer for q in qs if q.qtype == "spatial")) == set(D.RELATIONS)
    sal = collections.Counter(q.salience for q in qs if q.qtype in ("attribute", "spatial"))
    assert sal["small"] >= 70 and sal["large"] >= 70  # small (non-salient) and salient targets both asked
    vocab = set(D.answer_vocabulary())
    assert all(q.answer in vocab for q in qs)
    tok = build_tokenizer()
    unk = tok.unk_token_id
    for w in vocab:
        assert tok.convert_tokens_to_ids(w) != unk, w
    for q in qs:
        assert unk not in tok(q.prompt).input_ids, q.prompt
    assert q.prompt.endswith("\nAnswer the question using a single word or phrase.")
