"""Train the testbed model on the synthetic shapes QA (CPU, fp32).

    python -m testbed.train --seed 0 --out testbed/weights [stage options]
    bash scripts/train_testbed.sh              # the seven-stage recipe of the shipped weights

The whole model (CLIP tower, projector, Llama LM) is trained from scratch with AdamW and

(a) the LM loss on the answer word and ``</s>`` of LLaVA-1.5-style VQA conversations about one image
    (``vicuna_v1`` template, ``<image>`` expanded to 64 image tokens, the benchmark answer-format
    suffix on every question; turn 1 is exactly the evaluation prompt), through the model's normal
    ``forward(..., labels=...)`` (no pruning engine attached);
(b) a [CLS] objective read from the vision tower's [CLS] hidden state at the select layer (-2, the
    layer whose [CLS] attention pruning methods read) and at the last layer: a "caption" of the
    image's salient content, i.e. multi-label (shape, colour) of the *large* objects and their
    number. Like an image-level caption, it does not mention the small objects, so [CLS] attention
    learns to concentrate on the salient objects (the behaviour text-agnostic pruning relies on);
(c) a dense per-patch objective on the select layer's patch features (colour / shape / size of the
    object covering each patch, object-centre patches, and with ``--count-patch`` how many objects of
    that shape the scene holds), and (d) an alignment of the projected patch tokens with the LM's input
    embeddings of the colour / shape / size (and count) words (cosine classification, LLaVA's
    feature-alignment idea);
(e) ``--aux-ref``: the LM hidden state after layer ``--ref-layer`` at each object mention's head word
    (in every turn) predicts that object's colour, shape, size and patch row / column (referring); with
    ``--count-ref``, the state at a counting question's plural shape word predicts the count;
(f) ``--aux-attn``: head 0 of LM layer ``--attn-layer`` attends from each object mention to the
    patches of that object, and with ``--count-ref`` from a plural shape word to all the counted
    objects (grounding; -log attention mass);
(g) ``--token-drop``: on that share of the samples a random fraction of the visual tokens is masked
    out and positions renumbered, so the model tolerates shorter visual sequences;
(h) ``--lm-text`` (off by default, not in the shipped recipe): an LM loss on the question text after the
    image, whose words name objects of the image.

(e)-(h) are our design choices for a CPU budget (docs/testbed.md says why and what they bias).
The heads of (b), (c) and (e) are training-only and are not saved: the checkpoint is a plain
``LlavaForConditionalGeneration`` + tokenizer + CLIP image processor written with
``save_pretrained`` and read back with ``llava.models.load(dir)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data as D
from .model import build, save


class AuxHeads(torch.nn.Module):
    def __init__(self, dv: int, d_lm: int, count_patch: bool = False):
        super().__init__()
        n_pairs = len(D.PAIR_IDS)
        self.cls_sel = torch.nn.Linear(dv, n_pairs + 3)
        self.cls_last = torch.nn.Linear(dv, n_pairs + 3)
        self.patch_split = [len(D.COLORS) + 1, len(D.SHAPES) + 1, 3, 1] + ([D.MAX_OBJECTS] if count_patch else [])
        self.patch = torch.nn.Linear(dv, sum(self.patch_split))
        # colour, shape, size, patch row, patch column of a named object; the count of a counted shape
        self.ref_split = [len(D.COLORS), len(D.SHAPES), 2, D.GRID, D.GRID, D.MAX_COUNT + 1]
        self.ref = torch.nn.Linear(d_lm, sum(self.ref_split))

    def ref_loss(self, h, t):
        """Referring objective: the LM hidden state at each object mention's head word predicts the
        object's colour, shape, size and patch row / column; at a counting question's plural shape
        word, the count (targets of -100 do not apply to that mention)."""
        out = self.ref(h[t["ref_rows"], t["ref_pos"]]).split(self.ref_split, dim=-1)
        y = t["ref_y"]
        losses = [F.cross_entropy(o, y[:, i], ignore_index=-100) for i, o in enumerate(out) if (y[:, i] >= 0).any()]
        return sum(losses) if losses else h.sum() * 0

    def cls_loss(self, head, h, t):
        n_pairs = len(D.PAIR_IDS)
        out = head(h)
        return (F.binary_cross_entropy_with_logits(out[:, :n_pairs], t["caption"])
                + F.cross_entropy(out[:, n_pairs:], t["n_large"].clamp(max=2)))

    def patch_loss(self, h, t):
        c, s, z, ctr, *cnt = self.patch(h).split(self.patch_split, dim=-1)
        loss = (F.cross_entropy(c.flatten(0, 1), t["color"].flatten()) + F.cross_entropy(s.flatten(0, 1), t["shape"].flatten())
                + F.cross_entropy(z.flatten(0, 1), t["size"].flatten())
                + F.binary_cross_entropy_with_logits(ctr.squeeze(-1), t["center"], pos_weight=torch.tensor(4.0)))
        if cnt and (t["count"] > 0).any():  # object patches: how many objects of their shape the scene has
            loss = loss + F.cross_entropy(cnt[0].flatten(0, 1), t["count"].flatten() - 1, ignore_index=-1)
        return loss


class TrainSet(torch.utils.data.Dataset):
    """Sample ``i`` of the train split: a ``turns``-turn conversation about one scene (turn 1 is
    question ``i`` of the split), rendered, with the aux targets."""

    def __init__(self, seed: int, n: int, turns: int = 6, curriculum=(), offset: int = 0):
        self.seed, self.n, self.turns, self.offset = seed, n, turns, offset
        self.curriculum = list(curriculum)  # [(first sample index past the stage, (lo, hi) objects)]

    def __len__(self):
        return self.n

    def n_objects(self, i):
        for end, rng_ in self.curriculum:
            if i < end:
                return rng_
        return None

    def __getitem__(self, i):
        conv = D.make_conversation(self.seed, "train", self.offset + i, self.turns, self.n_objects(i))
        return conv, conv[0].image(), D.patch_targets(conv[0].scene)


def conversation_prompt(template, conv) -> str:
    """LLaVA's multi-turn ``vicuna_v1`` text with the answers: "{system} USER: <image>\n{q1} ASSISTANT:
    {a1}</s>USER: {q2} ASSISTANT: {a2}</s>..." (sep " ", sep2 "</s>"); every question carries the
    answer-format suffix, as in LLaVA-1.5's VQA training data."""
    text = template.prompt(conv[0].prompt) + f" {conv[0].answer}</s>"
    for q in conv[1:]:
        text += f"{template.user}: {q.prompt} {template.assistant}: {q.answer}</s>"
    return text


def ref_targets(obj) -> list[int]:
    """Referring targets of one named object: colour, shape, size, patch row, patch column (class
    ids); the count column does not apply (-100)."""
    return [D.COLOR_IDS[obj.color] - 1, D.SHAPE_IDS[obj.shape] - 1, D.SIZE_IDS[obj.size] - 1,
            min(int(obj.cy // D.PATCH), D.GRID - 1), min(int(obj.cx // D.PATCH), D.GRID - 1), -100]


def count_targets(q) -> list[int]:
    """Referring targets of a counting question's plural shape word: only the count."""
    return [-100] * 5 + [len(q.refs)]


class Collate:
    """Tokenise conversations with the runtime's processor (LLaVA's image-token rule), left-pad, and
    label the answer word + ``</s>`` of every turn; for every turn, also the token position of each
    object mention's head word (the shape word, or "object") with that object's referring targets
    and patches, and with ``count=True`` the plural shape word of a counting question with the count
    and the patches of all the counted objects."""

    def __init__(self, processor, count: bool = False):
        self.processor = processor
        self.count = count
        tok = processor.tokenizer
        self.tag = tok(f" {processor.template.assistant}:", add_special_tokens=False).input_ids
        self.image_id = tok.convert_tokens_to_ids("<image>")
        self.head_ids = {w: tok.convert_tokens_to_ids(w) for w in (*D.SHAPES, *D.PLURAL.values(), "object")}

    def mentions(self, row, q, start: int, end: int):
        """(position, referring targets, patch mask) of each mention of question ``q``, whose text
        lies in ``row[start:end]`` (the first occurrences of the head words, in order)."""
        if q.qtype == "counting":
            if not self.count:
                return []
            if q.shape not in D.PLURAL:
                raise ValueError(f"counting question {q.question!r} does not name the shape it counts (Question.shape)")
            plural = D.PLURAL[q.shape]
            patches = np.zeros(D.GRID * D.GRID, dtype=bool)
            for o in q.refs:
                patches |= D.coverage(o) >= D.MIN_COVER
            heads = [(plural, count_targets(q), patches)]
        else:
            heads = [("object" if q.subtype == "shape" and q.qtype == "attribute" else o.shape, ref_targets(o),
                      D.coverage(o) >= D.MIN_COVER) for o in q.refs]
        pos, out = start, []
        for w, y, patches in heads:
            hit = (row[pos:end] == self.head_ids[w]).nonzero()
            if not len(hit):
                break
            pos = pos + int(hit[0])
            out.append((pos, y, patches))
            pos += 1
        return out

    def __call__(self, items):
        convs, images, targets = zip(*items)
        tmpl = self.processor.template
        b = self.processor([c[0].prompt for c in convs], list(images),
                           prompts=[conversation_prompt(tmpl, c) for c in convs])
        ids, mask = b["input_ids"], b["attention_mask"]
        labels = torch.full_like(ids, -100)
        k = len(self.tag)
        tag = torch.tensor(self.tag)
        refs = []
        for r in range(ids.shape[0]):
            row = ids[r]
            hits = (row.unfold(0, k, 1) == tag).all(-1).nonzero().flatten() + k  # first answer token
            answers = [p for p in hits.tolist() if p + 1 < row.numel() and mask[r, p]]
            assert len(answers) == len(convs[r]), (len(answers), len(convs[r]))
            start = int((row == self.image_id).nonzero().max()) + 1
            for p, q in zip(answers, convs[r]):
                labels[r, p:p + 2] = row[p:p + 2]  # the answer word and </s>
                refs += [(r, *m) for m in self.mentions(row, q, start, p - k)]
                start = p + 2
        t = {key: torch.as_tensor(np.stack([x[key] for x in targets])) for key in targets[0]}
        t["ref_rows"] = torch.tensor([r for r, _, _, _ in refs], dtype=torch.long)
        t["ref_pos"] = torch.tensor([p for _, p, _, _ in refs], dtype=torch.long)
        t["ref_y"] = torch.tensor([y for _, _, y, _ in refs], dtype=torch.long).reshape(-1, 6)
        t["ref_patches"] = torch.as_tensor(np.array([m for _, _, _, m in refs], dtype=bool).reshape(-1, D.GRID * D.GRID))
        t["image_pos"] = (ids == self.image_id).nonzero()[:, 1].view(ids.shape[0], -1)
        t["n_pad"] = (mask == 0).sum(1)
        # every text token after the image that is not an answer target: the questions (with their
        # suffix and role tags), for the optional question-text loss (--lm-text)
        after_image = torch.arange(ids.shape[1]) > t["image_pos"].max(1, keepdim=True).values
        t["text_labels"] = torch.where(after_image & (mask == 1) & (labels == -100), ids, -100)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": b["pixel_values"], "labels": labels}, t


def quick_eval(rt, questions, batch_size: int = 64) -> dict:
    """First-token greedy accuracy (the answers are one token) of the unpruned model."""
    model = rt.model
    was = model.training
    model.eval()
    tok = rt.tokenizer
    hits: dict[str, list[int]] = {}
    with torch.no_grad():
        for s in range(0, len(questions), batch_size):
            qs = questions[s:s + batch_size]
            b = rt.processor([q.prompt for q in qs], [q.image() for q in qs])
            logits = model(**b, logits_to_keep=1).logits[:, -1]
            pred = logits.argmax(-1).tolist()
            for q, p in zip(qs, pred):
                ok = int(tok.convert_ids_to_tokens(p) == q.answer)
                hits.setdefault(q.qtype, []).append(ok)
                hits.setdefault("overall", []).append(ok)
    model.train(was)
    return {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(hits.items())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="testbed/weights")
    ap.add_argument("--steps", type=int, default=3000, help="steps of the whole model (LM + aux losses)")
    ap.add_argument("--vision-steps", type=int, default=300,
                    help="first, steps of the vision tower alone on the aux losses (about 4x cheaper per step)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--aux-cls", type=float, default=0.5, help="weight of the [CLS] caption loss (each layer)")
    ap.add_argument("--aux-patch", type=float, default=0.5, help="weight of the dense per-patch loss")
    ap.add_argument("--turns", type=int, default=6, help="questions per training conversation (one image)")
    ap.add_argument("--text-layers", type=int, default=None, help="Llama decoder layers (default: testbed.model.TEXT)")
    ap.add_argument("--token-drop", type=float, default=0.5,
                    help="share of training samples whose visual tokens are thinned at random (each keeps a uniform "
                         "random fraction, possibly none): the tiny model otherwise breaks on any shorter visual sequence")
    ap.add_argument("--token-drop-from", type=int, default=0,
                    help="full-phase step from which the token dropout applies (earlier steps see whole images)")
    ap.add_argument("--data-offset", type=int, default=0,
                    help="start at this index of the train stream (a later stage sees fresh scenes)")
    ap.add_argument("--init", default=None,
                    help="start from this checkpoint's weights (a second stage: continue a run with a new schedule)")
    ap.add_argument("--tie", action="store_true", help="tie the LM head to the input embeddings")
    ap.add_argument("--aux-ref", type=float, default=1.0,
                    help="weight of the referring loss (LM hidden state at object mentions -> the object's attributes)")
    ap.add_argument("--aux-attn", type=float, default=1.0,
                    help="weight of the grounding loss: one head of layer --attn-layer attends from each object "
                         "mention to that object's patches")
    ap.add_argument("--attn-layer", type=int, default=1, help="1-based LM layer of the grounding loss (its head 0)")
    ap.add_argument("--ref-layer", type=int, default=2, help="the referring loss reads the output of this LM layer (1-based)")
    ap.add_argument("--count-ref", action="store_true",
                    help="counting questions join the referring and grounding objectives: the plural shape word's "
                         "state predicts the count, and the grounding head attends from it to all the counted objects")
    ap.add_argument("--count-patch", action="store_true",
                    help="each object patch also predicts how many objects of its shape the scene has (dense patch "
                         "label), and the alignment loss matches it to the LM's embeddings of the number words")
    ap.add_argument("--lm-text", type=float, default=0.0,
                    help="weight of an LM loss on the question text after the image (every turn's question, suffix "
                         "and role tags; next-token prediction, like a caption's LM loss): a question names objects "
                         "that are in the image, so predicting its words needs the image")
    ap.add_argument("--aux-align", type=float, default=0.5,
                    help="weight of the alignment loss: projected patch tokens vs the LM's word embeddings")
    ap.add_argument("--curriculum", default="",
                    help="simpler scenes first: 'STEP:LO-HI,...' = until full-phase step STEP, scenes of LO..HI objects")
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop (and save) after this many steps of the schedule, which still spans --steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="data-generation worker processes")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--log-every", type=int, default=50)
    argv_used = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv_used)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    text = {"num_hidden_layers": args.text_layers} if args.text_layers else {}
    if args.tie:
        text["tie_word_embeddings"] = True
    rt = build(seed=args.seed, text=text or None)
    if args.init:
        from .model import load

        state = load(args.init).model.state_dict()
        missing, unexpected = rt.model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if "lm_head" not in k]:
            raise ValueError(f"--init {args.init}: checkpoint does not match (missing {missing}, unexpected {unexpected})")
    model = rt.model
    model.train()
    vt = model.model.vision_tower
    vt = getattr(vt, "vision_model", vt)
    heads = AuxHeads(vt.config.hidden_size, model.config.text_config.hidden_size, args.count_patch)
    captured: dict[str, torch.Tensor] = {}

    def store_output(name):
        return lambda m, i, o: captured.__setitem__(name, o[0] if isinstance(o, tuple) else o)

    layers = vt.encoder.layers
    lm_layers = model.model.language_model.layers
    hooks = [layers[len(layers) + model.config.vision_feature_layer].register_forward_hook(store_output("sel")),
             layers[-1].register_forward_hook(store_output("last")),
             lm_layers[args.ref_layer - 1].register_forward_hook(store_output("ref"))]
    hooks.append(lm_layers[args.attn_layer - 1].register_forward_pre_hook(
        lambda m, a, kw: captured.__setitem__("attn_in", a[0] if a else kw["hidden_states"]), with_kwargs=True))
    rotary = model.model.language_model.rotary_emb

    image_id = model.config.image_token_id
    drop_gen = torch.Generator().manual_seed(args.seed + 1)

    def thin_visual_tokens(batch, t):
        """Random visual-token dropout on a share of the rows: the dropped tokens are masked out of
        attention and the positions are renumbered over the kept ones (what a pre-LLM pruning method
        does). Rows that were thinned carry no referring / grounding targets."""
        ids, mask = batch["input_ids"], batch["attention_mask"].clone()
        rows = torch.rand(ids.shape[0], generator=drop_gen) < args.token_drop
        for r in rows.nonzero().flatten().tolist():
            frac = float(torch.rand((), generator=drop_gen))
            drop = (ids[r] == image_id) & (torch.rand(ids.shape[1], generator=drop_gen) >= frac)
            mask[r, drop] = 0
        batch = {**batch, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}
        keep = ~rows[t["ref_rows"]] if len(t["ref_rows"]) else torch.zeros(0, dtype=torch.bool)
        t = {**t, **{k: t[k][keep] for k in ("ref_rows", "ref_pos", "ref_y", "ref_patches")}}
        return batch, t

    def grounding_loss(t):
        """-log of head 0's attention mass (layer --attn-layer) from each mention onto the patches of
        the object it names (of all the counted objects, for a counting question's plural word); the
        mean over mentions. Queries and keys are computed once per row for all its mentions."""
        from llava.attention_rows import causal_attention_rows, llm_qk

        x, layer = captured["attn_in"], lm_layers[args.attn_layer - 1]
        losses = []
        for r in t["ref_rows"].unique().tolist():
            sel = (t["ref_rows"] == r) & t["ref_patches"].any(1)  # a count of 0: nothing to attend to
            if not sel.any():
                continue
            n_pad = int(t["n_pad"][r])
            xr = x[r, n_pad:]
            rows = t["ref_pos"][sel] - n_pad
            q, k = llm_qk(layer, xr, rotary, torch.arange(xr.shape[0]), rows)
            att = causal_attention_rows(q[:1], k[:1], rows, layer.self_attn.scaling)[0]  # head 0: (mentions, S)
            mass = (att[:, t["image_pos"][r] - n_pad] * t["ref_patches"][sel]).sum(-1)
            losses.append(-torch.log(mass + 1e-6))
        return torch.cat(losses).mean() if losses else x.sum() * 0

    params = list(model.parameters()) + list(heads.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))

    def lr_at(step, total):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        p = (step - args.warmup) / max(1, total - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))

    # word ids of the colour / shape / size words, in the order of testbed.data's label ids (1..)
    tok = rt.tokenizer
    word_ids = {"color": tok.convert_tokens_to_ids(list(D.COLORS)), "shape": tok.convert_tokens_to_ids(list(D.SHAPES)),
                "size": tok.convert_tokens_to_ids(list(D.SIZES))}
    if args.count_patch:  # the number words 1..MAX_OBJECTS, for the per-patch count
        word_ids["count"] = tok.convert_tokens_to_ids([str(i) for i in range(1, D.MAX_OBJECTS + 1)])
    emb = model.get_input_embeddings()
    projector = model.model.multi_modal_projector

    def align_loss(h_patches, t):
        """Projected patch tokens (the LLM's visual inputs) are classified by cosine similarity to the
        LM's own input embeddings of the colour, shape and size words (object patches only): LLaVA's
        feature-alignment idea, which makes visual tokens word-like and grounding fast to learn."""
        v = F.normalize(projector(h_patches), dim=-1)  # (B, P, D)
        obj = t["color"] > 0
        if not obj.any():
            return v.sum() * 0
        v = v[obj]
        loss = 0.0
        for key in word_ids:
            e = F.normalize(emb.weight[word_ids[key]], dim=-1)
            loss = loss + F.cross_entropy(10.0 * v @ e.T, t[key][obj] - 1)
        return loss

    total = args.vision_steps + args.steps
    curriculum = []
    for part in filter(None, args.curriculum.split(",")):
        end, span = part.split(":")
        lo, hi = span.split("-")
        curriculum.append(((args.vision_steps + int(end)) * args.batch, (int(lo), int(hi))))
    loader = torch.utils.data.DataLoader(TrainSet(args.seed, total * args.batch, args.turns, curriculum, args.data_offset), batch_size=args.batch,
                                         shuffle=False, num_workers=args.workers, collate_fn=Collate(rt.processor, args.count_ref),
                                         prefetch_factor=4 if args.workers else None, persistent_workers=False)
    val = D.make_split("test", args.eval_n, seed=args.seed + 1000)  # a held-out stream, not the benchmark's test set
    log = {"args": vars(args), "curve": [], "evals": []}
    t0 = time.time()
    zero = {"lm": 0.0, "lm_text": 0.0, "lm_turn1": 0.0, "cls": 0.0, "patch": 0.0, "align": 0.0, "ref": 0.0, "attn": 0.0, "n": 0}
    run = dict(zero)
    for step, (batch, t) in enumerate(loader):
        if args.stop_after is not None and step >= args.vision_steps + args.stop_after:
            break
        vision_only = step < args.vision_steps
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, args.vision_steps) if vision_only else lr_at(step - args.vision_steps, args.steps)
        if vision_only:  # phase 1: the tower alone on the aux losses
            vt(batch["pixel_values"])
            lm = torch.zeros(())
            l_ref = l_attn = l_text = torch.zeros(())
        else:  # the model's normal forward with labels (every turn's answer word and </s>)
            if args.token_drop and step - args.vision_steps >= args.token_drop_from:
                batch, t = thin_visual_tokens(batch, t)
            out = model(**batch)
            lm = out.loss
            l_ref = heads.ref_loss(captured["ref"], t) if args.aux_ref else torch.zeros(())
            l_attn = grounding_loss(t) if args.aux_attn else torch.zeros(())
            l_text = (F.cross_entropy(out.logits[:, :-1].flatten(0, 1), t["text_labels"][:, 1:].flatten(), ignore_index=-100)
                      if args.lm_text else torch.zeros(()))
            with torch.no_grad():  # turn 1's answer word alone (the evaluation format), for the log
                tgt = batch["labels"][:, 1:]
                first = (tgt != -100).float().argmax(1)
                rows = torch.arange(tgt.shape[0])
                run["lm_turn1"] += float(F.cross_entropy(out.logits[rows, first], tgt[rows, first]))
        h_sel, h_last = captured["sel"], captured["last"]
        l_cls = heads.cls_loss(heads.cls_sel, h_sel[:, 0], t) + heads.cls_loss(heads.cls_last, h_last[:, 0], t)
        l_patch = heads.patch_loss(h_sel[:, 1:], t)
        l_align = align_loss(h_sel[:, 1:], t) if args.aux_align else torch.zeros(())
        loss = lm + args.aux_cls * l_cls + args.aux_patch * l_patch + args.aux_align * l_align + args.aux_ref * l_ref + args.aux_attn * l_attn
        loss = loss + args.lm_text * l_text
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run["lm"] += lm.item()
        run["cls"] += l_cls.item()
        run["patch"] += l_patch.item()
        run["align"] += float(l_align.detach())
        run["ref"] += float(l_ref.detach())
        run["attn"] += float(l_attn.detach())
        run["lm_text"] += float(l_text.detach())
        run["n"] += 1
        if (step + 1) % args.log_every == 0:
            row = {"step": step + 1, "phase": "vision" if vision_only else "full", "time_s": round(time.time() - t0, 1),
                   "lr": round(opt.param_groups[0]["lr"], 6),
                   **{k: round(run[k] / run["n"], 4) for k in ("lm", "lm_text", "lm_turn1", "cls", "patch", "align", "ref", "attn")}}
            log["curve"].append(row)
            print(json.dumps(row), flush=True)
            run = dict(zero)
        if not vision_only and ((step + 1 - args.vision_steps) % args.eval_every == 0 or step + 1 == total):
            ev = {"step": step + 1, "time_s": round(time.time() - t0, 1), **quick_eval(rt, val)}
            log["evals"].append(ev)
            print("eval", json.dumps(ev), flush=True)
            save(rt, args.out)  # the latest checkpoint (also lets a long run be inspected midway)
    for h in hooks:
        h.remove()
    wall = time.time() - t0
    model.eval()
    save(rt, args.out)
    size = sum(f.stat().st_size for f in Path(args.out).iterdir() if f.is_file())
    log.update({"wall_time_s": round(wall, 1), "params": sum(p.numel() for p in model.parameters()),
                "weights_bytes": size, "machine": f"{platform.machine()} {platform.processor()} cpus={os.cpu_count()}",
                "torch": torch.__version__, "command": "python -m testbed.train " + " ".join(shlex.quote(a) for a in argv_used)})
    (Path(args.out) / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"saved {args.out} ({size / 1e6:.2f} MB) after {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
