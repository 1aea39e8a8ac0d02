"""Testbed v2's model and training recipe (testbed/model2.py, testbed/train2.py) at a tiny width on the CPU:
captions, labels, the contrastive loss, what each stage trains, token dropout, the prompt format against
the evaluation's, resume == an uninterrupted run bit for bit, recipe checks, export -> load -> a pruned run."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from testbed import data2 as D
from testbed import model2, train2

TINY = ["--vision", json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                "num_attention_heads": 1, "projection_dim": 32}),
        "--text", json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 1, "num_key_value_heads": 1}),
        "--tower-steps", "3", "--tower-batch", "3", "--align-steps", "3", "--align-batch", "2",
        "--instruct-steps", "3", "--instruct-batch", "2", "--eval-n", "7", "--eval-every", "2", "--log-every", "1"]


def words(text):
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


@pytest.fixture(scope="module")
def tiny_rt():
    return model2.build(vision=json.loads(TINY[1]), text=json.loads(TINY[3]))


def test_default_model_is_llava_geometry_with_head_size_32():
    cfg = model2.build().model.config
    assert cfg.vision_config.image_size == 336 and cfg.vision_config.patch_size == 14
    assert cfg.vision_config.hidden_size // cfg.vision_config.num_attention_heads == 32
    assert cfg.text_config.hidden_size // cfg.text_config.num_attention_heads == 32
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"


def test_captions_name_large_objects_and_only_words_the_model_knows(tiny_rt):
    unk = tiny_rt.tokenizer.unk_token_id
    seen_small = 0
    for i in range(40):
        c = D.make_caption(0, "train", i)
        assert set(words(c.text)) <= set(D.MODEL_WORDS) | set(".,:"), c.text
        assert unk not in tiny_rt.tokenizer(c.text).input_ids
        objs = c.scene.objects
        large = {j for j in c.scene.shapes if objs[j].size == "large"}
        assert large <= set(c.named), (c.text, large)
        assert c.text.startswith(f"a {c.scene.background['kind']} scene with about {D.round5(len(c.scene.shapes))} shapes")
        for j in c.named:  # every named object is in the text with its colour and shape (or its glyph)
            o = objs[j]
            assert (f"label {o.char}" if o.is_glyph else f"{o.color} {o.shape}") in c.text
        named_shapes = [j for j in c.named if not objs[j].is_glyph]
        assert [objs[j].r for j in named_shapes] == sorted((objs[j].r for j in named_shapes), reverse=True)
        seen_small += sum(objs[j].size == "small" for j in c.named)
    assert seen_small > 0  # small objects are named sometimes (CAPTION_P 0.25), not never
    assert D.make_caption(0, "train", 3).text == D.make_caption(0, "train", 3).text
    assert D.make_caption(0, "train", 3).scene.signature() != D.make_question(0, "train", 3).scene.signature()


def test_answer_labels_cover_the_answer_and_eos_only():
    tag = [7, 8]
    ids = torch.tensor([[0, 0, 5, 7, 8, 9, 7, 8, 3, 2],   # two tags: only after the last one
                        [5, 6, 7, 8, 4, 2, 1, 1, 1, 1]])  # right padding after the answer is masked
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]])
    lab = train2.answer_labels(ids, mask, tag)
    assert lab.tolist() == [[-100] * 8 + [3, 2], [-100] * 4 + [4, 2] + [-100] * 4]
    with pytest.raises(ValueError, match="no assistant tag"):
        train2.answer_labels(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long), tag)


def test_clip_loss_worked_values():
    e = torch.eye(4)
    loss, acc = train2.clip_loss(e, e, torch.tensor(math.log(100.0)))
    # matched one-hot pairs at scale 100: each row's softmax is e^100 / (e^100 + 3), so the loss is ~3e^-100
    assert loss.item() < 1e-30 and acc.item() == 1.0
    loss, acc = train2.clip_loss(e, e[[1, 0, 3, 2]], torch.tensor(0.0))  # scale 1, every pair swapped
    assert acc.item() == 0.0
    assert loss.item() == pytest.approx(-math.log(math.exp(0) / (math.exp(1) + 3 * math.exp(0))), rel=1e-6)


def _grad_names(model):
    return {n.split(".")[1] if n.startswith("model.") else n.split(".")[0]
            for n, p in model.named_parameters() if p.requires_grad}


def test_each_stage_trains_what_the_recipe_says(tiny_rt):
    args = train2.parse_args(["--work", "x"])
    m = tiny_rt.model
    train2.trainable(m, "tower", args)
    assert _grad_names(m) == {"vision_tower"}
    train2.trainable(m, "align", args)
    assert _grad_names(m) == {"multi_modal_projector", "language_model", "lm_head"}
    train2.trainable(m, "align", train2.parse_args(["--work", "x", "--align-train", "projector"]))
    assert _grad_names(m) == {"multi_modal_projector"}
    groups = train2.trainable(m, "instruct", args)
    assert _grad_names(m) == {"multi_modal_projector", "language_model", "lm_head"} and len(groups) == 2
    groups = train2.trainable(m, "instruct", train2.parse_args(["--work", "x", "--tower-lr-scale", "0.1"]))
    assert _grad_names(m) == {"multi_modal_projector", "language_model", "lm_head", "vision_tower"}
    assert [g["scale"] for g in groups] == [1.0, 1.0, 0.1]
    opt = train2.make_optimizer(groups, [], 0.05)
    for g in opt.param_groups:  # weight decay on matrices only
        assert (g["weight_decay"] == 0.05) == all(p.ndim >= 2 for p in g["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in m.parameters())


def test_token_drop_masks_only_visual_tokens_of_chosen_rows_and_renumbers():
    ids = torch.tensor([[3, 4, 4, 4, 4, 5, 6]] * 6)
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = train2.thin_visual_tokens(b, 4, 0.5, torch.Generator().manual_seed(0))
    mask = out["attention_mask"]
    assert (mask[:, [0, 5, 6]] == 1).all()  # text is never dropped
    dropped_rows = (mask == 0).any(1)
    assert 0 < dropped_rows.sum() < 6
    assert out["position_ids"].tolist() == (mask.cumsum(1) - 1).clamp(min=0).tolist()
    assert (out["position_ids"][:, -1] == mask.sum(1) - 1).all()
    assert b["attention_mask"].eq(1).all()  # the input batch is untouched


def test_instruct_prompt_is_the_evaluation_prompt(tiny_rt):
    qs = D.make_split("train", 3)
    col = train2.Collate(tiny_rt.processor, "instruct")
    b = col([(q, q.image()) for q in qs])
    for r, q in enumerate(qs):
        ev = tiny_rt.processor([q.prompt], [q.image()])
        row = b["input_ids"][r][b["attention_mask"][r].bool()]
        n = ev["input_ids"].shape[1]
        assert row[:n].tolist() == ev["input_ids"][0].tolist()  # the prompt, token for token
        assert tiny_rt.tokenizer.convert_ids_to_tokens(row[n:].tolist()) == [q.answer, "</s>"]
        assert b["labels"][r][b["labels"][r] != -100].tolist() == row[n:].tolist()
        assert torch.equal(b["pixel_values"][r], ev["pixel_values"][0])
    assert (b["input_ids"] == tiny_rt.model.config.image_token_id).sum(1).tolist() == [576] * 3


def test_tower_batch_is_pixels_and_caption_ids(tiny_rt):
    caps = [D.make_caption(0, "train", i) for i in range(3)]
    b = train2.Collate(tiny_rt.processor, "tower")([(c, c.image()) for c in caps])
    assert b["pixel_values"].shape == (3, 3, 336, 336)
    eos = tiny_rt.tokenizer.eos_token_id
    for r, c in enumerate(caps):
        assert b["text"][r, b["last"][r]].item() == eos
        assert tiny_rt.tokenizer.decode(b["text"][r, 1:b["last"][r]]).replace(" ", "") == c.text.replace(" ", "")


def _final(work):
    from safetensors.torch import load_file

    return load_file(str(work / "model" / "model.safetensors"))


def test_resumed_run_equals_the_uninterrupted_run(tmp_path, capsys):
    straight, pieces = tmp_path / "a", tmp_path / "b"
    assert train2.main(TINY + ["--work", str(straight)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("DONE")
    outs = []
    for _ in range(5):  # two steps per call: every stage is cut mid-way at least once
        train2.main(TINY + ["--work", str(pieces), "--stop-after", "2"])
        outs.append(capsys.readouterr().out.rstrip().splitlines()[-1])
    assert outs == ["PAUSED (run the same command again to continue; testbed:shapes2)"] * 3 + ["DONE"] * 2
    a, b = _final(straight), _final(pieces)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((pieces / "log.json").read_text())
    assert [r["step"] for r in log["stages"]["tower"]["curve"]] == [1, 2, 3]
    assert all(log["stages"][s]["done"] for s in train2.STAGES) and len(log["calls"]) == 4  # the fifth call found nothing left
    assert [e["step"] for e in log["stages"]["instruct"]["evals"]] == [2, 3]
    last = torch.load(str(pieces / "state.pt"), weights_only=True)
    assert last["stage"] == "instruct" and last["step"] == 3


def test_a_stage_finished_but_not_logged_is_marked_done(tmp_path):
    """A call stopped between a stage's final state and the log (a kill at that moment) still exports later."""
    work = tmp_path / "w"
    train2.main(TINY + ["--work", str(work)])
    log = json.loads((work / "log.json").read_text())
    del log["stages"]["instruct"]["done"]  # the last stage's state is final, the log does not say so
    (work / "log.json").write_text(json.dumps(log))
    before = _final(work)
    train2.main(TINY + ["--work", str(work)])
    assert json.loads((work / "log.json").read_text())["stages"]["instruct"]["done"] is True
    after = _final(work)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing trained again
    train2.main(TINY + ["--work", str(work), "--export", str(tmp_path / "out")])
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_another_recipe_in_the_same_folder_is_refused(tmp_path):
    train2.main(TINY + ["--work", str(tmp_path), "--stop-after", "1"])
    with pytest.raises(SystemExit, match="another recipe"):
        train2.main(TINY + ["--work", str(tmp_path), "--instruct-lr", "1e-3"])
    # runtime options may change between calls
    train2.main(TINY + ["--work", str(tmp_path), "--stop-after", "1", "--log-every", "5"])


def test_export_refuses_unfinished_runs_and_loads_as_a_checkpoint(tmp_path):
    work, out = tmp_path / "w", tmp_path / "weights2"
    train2.main(TINY + ["--work", str(work), "--stop-after", "1"])
    with pytest.raises(SystemExit, match="not every stage is done"):
        train2.main(TINY + ["--work", str(work), "--export", str(out)])
    train2.main(TINY + ["--work", str(work)])
    train2.main(TINY + ["--work", str(work), "--export", str(out)])
    log = json.loads((out / "train_log.json").read_text())
    assert log["recipe"]["instruct_steps"] == 3 and log["weights_bytes"] > 0
    from safetensors.torch import load_file

    half, full = load_file(str(out / "model.safetensors")), _final(work)
    assert all(half[k].dtype == torch.float16 and torch.equal(half[k], full[k].half()) for k in full)
    rt = model2.load(out)
    assert next(rt.model.parameters()).dtype == torch.float32  # upcast on load (the default dtype)
    assert rt.family == "llava"
    q = D.make_question(0, "test", 5)
    b = rt.processor([q.prompt], [q.image()])
    base = rt.model.generate(**b, max_new_tokens=2, do_sample=False)
    engine = rt.prune("consensusdrop", 64)
    pruned = rt.model.generate(**b, max_new_tokens=2, do_sample=False)
    s = engine.stats.samples[0]
    assert (s.visual_candidates, s.visual_entering_llm) == (576, 64)
    assert base.shape == pruned.shape
