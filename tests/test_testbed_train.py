"""The testbed's training inputs and objectives (testbed.train): which tokens carry the LM loss, where
the referring / grounding objectives read, what they predict, and a short run's checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from testbed import data as D
from testbed import train as T
from testbed.model import build


@pytest.fixture(scope="module")
def processor():
    return build(seed=0).processor


def _scene():
    objs = [D.Obj("triangle", "red", "large", 28.0, 28.0, 16.0),
            D.Obj("triangle", "blue", "small", 84.0, 84.0, 6.0),
            D.Obj("circle", "green", "small", 84.0, 28.0, 6.0)]
    return D.Scene(objs, {"kind": "solid", "c0": (128, 128, 128), "c1": (128, 128, 128), "seed": 0}, "hand/0/0")


def _conversation():
    """Turn 1's answer is the word "triangle", which turn 2's mention must not be confused with."""
    s = _scene()
    red, blue, _ = s.objects
    conv = [D.Question("what shape is the large red object?", "triangle", "attribute", "large", "shape", refs=(red,)),
            D.Question("what color is the small triangle?", "blue", "attribute", "small", "color", refs=(blue,)),
            D.Question("how many triangles are there?", "2", "counting", "small", "count_2", refs=(red, blue),
                       shape="triangle")]
    for q in conv:
        q.scene = s
    return conv


def _items():
    conv = _conversation()
    return [(conv, conv[0].image(), D.patch_targets(conv[0].scene))]


def test_lm_labels_are_every_turns_answer_word_and_eos(processor):
    batch, _ = T.Collate(processor)(_items())
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    on = labels != -100
    assert torch.equal(labels[on], ids[on])
    assert processor.tokenizer.convert_ids_to_tokens(ids[on].tolist()) == ["triangle", "</s>", "blue", "</s>", "2", "</s>"]


def test_mentions_of_every_turn_with_their_targets(processor):
    tok = processor.tokenizer
    batch, t = T.Collate(processor, count=True)(_items())
    ids = batch["input_ids"][0]
    words = tok.convert_ids_to_tokens(ids[t["ref_pos"]].tolist())
    assert words == ["object", "triangle", "triangles"]
    answer_1 = int((batch["labels"][0] != -100).nonzero()[0])
    assert tok.convert_ids_to_tokens(int(ids[answer_1])) == "triangle"
    assert t["ref_pos"][1] > answer_1  # turn 2's own "triangle", not turn 1's answer
    # colour, shape, size, patch row, patch column (class ids from 0), count
    red = [0, 2, 1, 2, 2, -100]    # red = colour 0, triangle = shape 2, large = 1, centre (28, 28) -> patch (2, 2)
    blue = [2, 2, 0, 6, 6, -100]   # blue = colour 2, small = 0, centre (84, 84) -> patch (6, 6)
    count = [-100] * 5 + [2]
    assert t["ref_y"].tolist() == [red, blue, count]
    s = _scene()
    cover = [D.coverage(o) >= D.MIN_COVER for o in s.objects]
    assert torch.equal(t["ref_patches"][0], torch.as_tensor(cover[0]))
    assert torch.equal(t["ref_patches"][1], torch.as_tensor(cover[1]))
    assert torch.equal(t["ref_patches"][2], torch.as_tensor(cover[0] | cover[1]))  # all the counted objects
    assert t["ref_patches"][2].sum() > t["ref_patches"][0].sum()

    _, t_off = T.Collate(processor, count=False)(_items())  # counting mentions are opt-in (--count-ref)
    assert t_off["ref_y"].tolist() == [red, blue]


def test_question_text_labels(processor):
    """--lm-text targets: every text token after the image that is not an answer target (the questions,
    their suffix and role tags); never the system prompt, an image token, an answer or padding."""
    tok = processor.tokenizer
    short = [D.Question("is there a green circle in the image?", "yes", "existence", "small", "positive")]
    short[0].scene = _scene()
    batch, t = T.Collate(processor)(_items() + [(short, short[0].image(), D.patch_targets(short[0].scene))])
    ids, labels, text = batch["input_ids"], batch["labels"], t["text_labels"]
    assert tok.convert_ids_to_tokens(ids[1][text[1] != -100].tolist()) == \
        ["\n", *tok.tokenize("is there a green circle in the image?"), "\n", *tok.tokenize(D.SUFFIX), "assistant", ":"]
    words = tok.convert_ids_to_tokens(ids[0][text[0] != -100].tolist())
    assert words[:9] == ["\n", *tok.tokenize("what shape is the large red object?")]
    assert words.count("user") == 2 and words.count("assistant") == 3 and "triangle" in words[9:]  # turns 2-3
    on = text != -100
    assert not (on & (labels != -100)).any() and not (on & (ids == tok.convert_tokens_to_ids("<image>"))).any()
    assert not (on & (batch["attention_mask"] == 0)).any() and on[1].sum() < on[0].sum()


def test_counting_mention_is_the_counted_shapes_plural(processor):
    """The mention of a counting question is the plural of Question.shape (set by the generator), also
    for a count of 0 (no patches to ground); a counting question without it is refused."""
    s = _scene()
    tok = processor.tokenizer
    zero = D.Question("how many squares are there?", "0", "counting", "absent", "count_0", scene=s, shape="square")
    gen = next(q for i in range(200) if (q := D.make_question(0, "train", i)).qtype == "counting" and q.refs)
    assert gen.shape in D.SHAPES and {o.shape for o in gen.refs} == {gen.shape}
    batch, t = T.Collate(processor, count=True)([([zero], zero.image(), D.patch_targets(s)),
                                                 ([gen], gen.image(), D.patch_targets(gen.scene))])
    words = tok.convert_ids_to_tokens(batch["input_ids"][t["ref_rows"], t["ref_pos"]].tolist())
    assert words == ["squares", D.PLURAL[gen.shape]]
    assert t["ref_y"][:, 5].tolist() == [0, int(gen.answer)] and int(gen.answer) == len(gen.refs)
    union = np.any([D.coverage(o) >= D.MIN_COVER for o in gen.refs], axis=0)
    assert t["ref_patches"][0].sum() == 0 and torch.equal(t["ref_patches"][1], torch.as_tensor(union))
    bare = dataclasses.replace(zero, shape="")
    with pytest.raises(ValueError, match="does not name the shape"):
        T.Collate(processor, count=True)([([bare], bare.image(), D.patch_targets(s))])


@torch.no_grad()
def test_referring_loss_skips_targets_that_do_not_apply():
    heads = T.AuxHeads(8, 16)
    torch.nn.init.zeros_(heads.ref.weight)
    torch.nn.init.zeros_(heads.ref.bias)  # uniform logits: each applicable column costs log(#classes)
    h = torch.randn(1, 5, 16)
    obj = [0, 2, 1, 2, 2, -100]
    t = {"ref_rows": torch.tensor([0, 0]), "ref_pos": torch.tensor([1, 3]), "ref_y": torch.tensor([obj, [-100] * 5 + [2]])}
    expected = math.log(8) + math.log(4) + math.log(2) + math.log(8) + math.log(8) + math.log(4)
    assert float(heads.ref_loss(h, t)) == pytest.approx(expected, rel=1e-6)
    only_count = {k: v[1:] for k, v in t.items()}
    assert float(heads.ref_loss(h, only_count)) == pytest.approx(math.log(4), rel=1e-6)
    none = {k: v[:0] for k, v in t.items()}
    assert float(heads.ref_loss(h, none)) == 0.0


def test_short_run_writes_a_checkpoint_the_loader_reads(tmp_path):
    from llava.models import load

    out = tmp_path / "ckpt"
    rc = T.main(["--out", str(out), "--steps", "2", "--vision-steps", "1", "--batch", "4", "--turns", "2",
                 "--count-ref", "--tie", "--workers", "0", "--threads", "1", "--eval-n", "8", "--log-every", "1",
                 "--token-drop", "0.5", "--warmup", "1", "--lm-text", "0.5"])
    assert rc == 0
    log = json.loads((out / "train_log.json").read_text())
    assert [r["phase"] for r in log["curve"]] == ["vision", "full", "full"]
    assert log["command"].startswith(f"python -m testbed.train --out {out} --steps 2 ")  # the whole command line
    assert "--count-ref --tie" in log["command"] and log["args"]["turns"] == 2
    full = log["curve"][-1]
    assert all(np.isfinite(full[k]) and full[k] > 0 for k in ("lm", "cls", "patch", "align"))
    assert log["evals"] and 0 <= log["evals"][-1]["overall"] <= 100
    rt = load(str(out))
    # the question-text loss (--lm-text) of a near-untrained LM is about a uniform guess over the vocabulary
    vocab = rt.model.config.text_config.vocab_size
    assert log["curve"][0]["lm_text"] == 0 and abs(full["lm_text"] - math.log(vocab)) < 0.3, (full, vocab)
    shipped = build(seed=0, text={"tie_word_embeddings": True}).model.state_dict()
    assert set(rt.model.state_dict()) == set(shipped)
    with pytest.raises(ValueError, match="does not match"):
        T.main(["--init", str(out), "--out", str(tmp_path / "x"), "--text-layers", "2", "--steps", "1", "--vision-steps", "0"])


def test_patch_count_labels_and_loss():
    t = D.patch_targets(_scene())  # two triangles and a circle
    shape, count = t["shape"], t["count"]
    assert set(count[shape == D.SHAPE_IDS["triangle"]]) == {2}
    assert set(count[shape == D.SHAPE_IDS["circle"]]) == {1}
    assert set(count[shape == 0]) == {0} and (shape > 0).sum() > 0
    # counts are classes 1..MAX_OBJECTS of the patch head (a scene can hold more than MAX_COUNT of a shape)
    assert max(int(D.patch_targets(D.make_question(0, "train", i).scene)["count"].max()) for i in range(100)) <= D.MAX_OBJECTS
    batch = {k: torch.as_tensor(v)[None] for k, v in t.items()}
    h = torch.randn(1, D.GRID * D.GRID, 8)
    with torch.no_grad():
        plain, counting = T.AuxHeads(8, 16), T.AuxHeads(8, 16, count_patch=True)
        for heads in (plain, counting):
            torch.nn.init.zeros_(heads.patch.weight)
            torch.nn.init.zeros_(heads.patch.bias)
        # uniform logits: the count term adds log(MAX_OBJECTS) (counts 1..5, object patches only)
        assert float(counting.patch_loss(h, batch) - plain.patch_loss(h, batch)) == pytest.approx(math.log(D.MAX_OBJECTS), rel=1e-5)


def test_token_drop_from_starts_the_dropout_at_that_step(tmp_path):
    """With --token-drop 1 every row is thinned, and thinned rows carry no referring / grounding
    targets, so those losses are exactly 0 from --token-drop-from on and positive before it."""
    rc = T.main(["--out", str(tmp_path / "c"), "--steps", "3", "--vision-steps", "0", "--batch", "4", "--turns", "2",
                 "--tie", "--workers", "0", "--threads", "1", "--eval-n", "4", "--log-every", "1", "--warmup", "1",
                 "--token-drop", "1", "--token-drop-from", "2"])
    assert rc == 0
    curve = json.loads((tmp_path / "c" / "train_log.json").read_text())["curve"]
    assert [r["ref"] > 0 for r in curve] == [True, True, False]
    assert [r["attn"] > 0 for r in curve] == [True, True, False]
