"""Train the testbed v2 model (testbed/model2.py) on v2's data with LLaVA's recipe, resumably.

    python -m testbed.train2 --work runs/tb2 --device cuda --dtype bfloat16 --workers 14 --time-limit 540
    python -m testbed.train2 --work runs/tb2 ...        # again: continues where the last call stopped
    python -m testbed.train2 --work runs/tb2 --export testbed/weights2    # once every stage is done
    bash scripts/train_testbed2.sh                     # the recipe of the shipped weights, in 9-minute calls

Three stages, each with a fresh AdamW (warm-up + cosine), fp32 master weights (bf16 autocast on a GPU):

1. ``tower`` - a CLIP-style contrastive pre-training of the vision tower on (image, caption) pairs
   (:func:`testbed.data2.make_caption`: alt-text-like captions that name the large objects always and
   small ones rarely), against a small causal text encoder (training-only); the symmetric InfoNCE loss of
   CLIP on the tower's pooled [CLS] (post-layernorm, then a projection). LLaVA starts from a pre-trained
   CLIP; this stage stands in for it, and it is what gives the [CLS] its salience bias, as CLIP's has.
2. ``align`` - LLaVA's feature-alignment stage: "USER: <image>\\nDescribe the image. ASSISTANT: <caption>"
   with the LM loss on the caption, the tower frozen. LLaVA trains the projector alone (its LLM is a
   pre-trained Vicuna); ours starts from scratch, so by default the LLM trains too (``--align-train``).
3. ``instruct`` - LLaVA's visual instruction tuning on the v2 questions in the evaluation's exact prompt
   (``vicuna_v1``, the short-answer suffix), the LM loss on the answer word and ``</s>``; projector and LLM
   train, the tower frozen (LLaVA-1.5) unless ``--tower-lr-scale`` > 0 (LLaVA-NeXT / OneVision tune it at
   a smaller learning rate).

No auxiliary objective by default. The options that exist (each off unless given) and what they could
favour: ``--token-drop`` (random visual-token dropout in stage 3: robustness to any shorter visual sequence,
so it could flatter every pruning method, dropping more than merging). Nothing supervises the LLM's
attention or the tower's [CLS] attention directly (v1's grounding / referring / [CLS]-caption losses are
not used), so neither text-aware nor [CLS]-based methods are handed their signal.

Resumable: everything the recipe depends on is in ``WORK/recipe.json`` (a second call with another recipe
is refused); ``WORK/state.pt`` holds the model, the training heads, the optimizer and the step of the stage
in progress (saved every ``--save-every`` steps and when ``--time-limit`` is reached); the data of step
``s`` is a pure function of (seed, stage, s), so a resumed run is the uninterrupted one, bit for bit on a
CPU in fp32 (tests/test_testbed_train2.py). ``WORK/model/`` holds the model after each finished stage,
``WORK/log.json`` the curves and evaluations.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data2 as D
from .model2 import NAME, build, save

STAGES = ("tower", "align", "instruct")
DESCRIBE = "Describe the image."
#: stream bases: each stage reads its own part of the train stream (captions: tower, then align)
CAPTION_BASE = {"tower": 0, "align": 50_000_000}

#: recipe arguments (stored in recipe.json; a resumed run must repeat them) vs runtime-only ones
RUNTIME_ARGS = {"work", "device", "dtype", "workers", "time_limit", "save_every", "threads", "export", "export_dtype",
                "log_every", "stop_after"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="working folder: recipe, resumable state, stage models, log")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vision", default="{}", help="JSON overrides of testbed.model2.VISION2 (e.g. narrower for tests)")
    ap.add_argument("--text", default="{}", help="JSON overrides of testbed.model2.TEXT2")
    for st, steps, batch, lr in (("tower", 2000, 128, 1e-3), ("align", 2000, 64, 1e-3), ("instruct", 8000, 64, 5e-4)):
        ap.add_argument(f"--{st}-steps", type=int, default=steps)
        ap.add_argument(f"--{st}-batch", type=int, default=batch)
        ap.add_argument(f"--{st}-lr", type=float, default=lr)
    ap.add_argument("--warmup", type=float, default=0.05, help="warm-up share of each stage's steps")
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--text-encoder-layers", type=int, default=2, help="stage 1's training-only text encoder")
    ap.add_argument("--align-train", choices=("projector", "projector+llm"), default="projector+llm",
                    help="what stage 2 trains (LLaVA: the projector alone, its LLM being pre-trained)")
    ap.add_argument("--tower-lr-scale", type=float, default=0.0,
                    help="stage 3 trains the tower at this fraction of the learning rate (0: frozen, as LLaVA-1.5)")
    ap.add_argument("--token-drop", type=float, default=0.0,
                    help="stage 3: share of samples keeping only a uniform random fraction of their visual tokens")
    ap.add_argument("--eval-n", type=int, default=350, help="held-out questions for stage 3's evaluations")
    ap.add_argument("--eval-every", type=int, default=1000)
    # runtime
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="autocast dtype")
    ap.add_argument("--workers", type=int, default=0, help="data-generation worker processes")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds: save the state and stop before this (the device's per-command limit)")
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--stop-after", type=int, default=None, help="stop (saving the state) after this many steps")
    ap.add_argument("--export", default=None, help="copy the finished model and its log here, and stop")
    ap.add_argument("--export-dtype", choices=("float16", "float32"), default="float16")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------------ data

class Stream(torch.utils.data.Dataset):
    """Samples ``start .. start + n - 1`` of a stage's stream: (Caption | Question) items."""

    def __init__(self, stage: str, seed: int, start: int, n: int):
        self.stage, self.seed, self.start, self.n = stage, seed, start, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        j = self.start + i
        if self.stage == "instruct":
            q = D.make_question(self.seed, "train", j)
        else:
            q = D.make_caption(self.seed, "train", CAPTION_BASE[self.stage] + j)
        return q, q.image()


class Collate:
    """Stage 1: pixel values + caption ids (right-padded, the last real token's position). Stages 2-3:
    LLaVA prompts through the runtime's processor (left-padded), labels on the answer (caption) tokens
    and ``</s>`` only."""

    def __init__(self, processor, stage: str):
        self.processor, self.stage = processor, stage
        tok = processor.tokenizer
        self.tag = tok(f" {processor.template.assistant}:", add_special_tokens=False).input_ids

    def __call__(self, items):
        samples, images = zip(*items)
        proc = self.processor
        if self.stage == "tower":
            pix = proc.image_processor(list(images), return_tensors="pt")["pixel_values"]
            ids = [proc.tokenizer(s.text).input_ids + [proc.tokenizer.eos_token_id] for s in samples]
            width = max(map(len, ids))
            text = torch.full((len(ids), width), proc.tokenizer.pad_token_id, dtype=torch.long)
            for r, row in enumerate(ids):
                text[r, :len(row)] = torch.tensor(row)
            return {"pixel_values": pix, "text": text, "last": torch.tensor([len(r) - 1 for r in ids])}
        if self.stage == "align":
            questions, answers = [DESCRIBE] * len(samples), [s.text for s in samples]
        else:
            questions, answers = [s.prompt for s in samples], [s.answer for s in samples]
        prompts = [proc.template.prompt(q) + f" {a}</s>" for q, a in zip(questions, answers)]
        b = proc(questions, list(images), prompts=prompts)
        return {**b, "labels": answer_labels(b["input_ids"], b["attention_mask"], self.tag)}


def answer_labels(ids: torch.Tensor, mask: torch.Tensor, tag: list[int]) -> torch.Tensor:
    """-100 everywhere except after the last assistant tag of each row (the answer and ``</s>``)."""
    labels = torch.full_like(ids, -100)
    k = len(tag)
    hits = (ids.unfold(1, k, 1) == torch.tensor(tag)).all(-1)  # (B, S - k + 1)
    for r in range(ids.shape[0]):
        where = hits[r].nonzero().flatten()
        if not len(where):
            raise ValueError(f"row {r} has no assistant tag {tag}")
        p = int(where[-1]) + k
        labels[r, p:] = torch.where(mask[r, p:].bool(), ids[r, p:], -100)
    return labels


# ------------------------------------------------------------------------------------------------ heads

class TextEncoder(torch.nn.Module):
    """Stage 1's caption encoder (training-only): token + position embeddings, a causal pre-norm
    transformer, the last real token's state, a projection (CLIP's text tower in small)."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, out: int, max_len: int = 96):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, width)
        self.pos = torch.nn.Embedding(max_len, width)
        layer = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                                 batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width)
        self.proj = torch.nn.Linear(width, out, bias=False)

    def forward(self, text: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        n = text.shape[1]
        if n > self.pos.num_embeddings:
            raise ValueError(f"caption of {n} tokens > the text encoder's {self.pos.num_embeddings} positions")
        x = self.tok(text) + self.pos(torch.arange(n, device=text.device))
        causal = torch.nn.Transformer.generate_square_subsequent_mask(n, device=text.device)
        x = self.norm(self.blocks(x, mask=causal, is_causal=True))
        return self.proj(x[torch.arange(x.shape[0], device=x.device), last])


class ContrastiveHeads(torch.nn.Module):
    def __init__(self, vocab: int, vision_width: int, layers: int, out: int = 128):
        super().__init__()
        self.text = TextEncoder(vocab, vision_width, layers, max(1, vision_width // 32), out)
        self.visual = torch.nn.Linear(vision_width, out, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's symmetric InfoNCE over a batch of matched pairs (row i of each): the loss and the
    image -> text top-1 accuracy."""
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    logits = logit_scale.exp().clamp(max=100) * img @ txt.T
    target = torch.arange(len(img), device=img.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    return loss, (logits.argmax(1) == target).float().mean()


# ------------------------------------------------------------------------------------------------ stages

def tower_of(model):
    vt = model.model.vision_tower
    return getattr(vt, "vision_model", vt)


def trainable(model, stage: str, args) -> list[dict]:
    """Parameter groups of a stage (the rest is frozen): [(params, lr scale)]."""
    m = model.model
    groups = {"tower": list(tower_of(model).parameters()), "projector": list(m.multi_modal_projector.parameters()),
              "llm": list(m.language_model.parameters()) + list(model.lm_head.parameters())}
    if stage == "tower":
        use = [("tower", 1.0)]
    elif stage == "align":
        use = [("projector", 1.0)] + ([("llm", 1.0)] if args.align_train == "projector+llm" else [])
    else:
        use = [("projector", 1.0), ("llm", 1.0)] + ([("tower", args.tower_lr_scale)] if args.tower_lr_scale > 0 else [])
    for p in model.parameters():
        p.requires_grad_(False)
    out = []
    for name, scale in use:
        for p in groups[name]:
            p.requires_grad_(True)
        out.append({"params": groups[name], "scale": scale})
    return out


def make_optimizer(groups: list[dict], extra: list, wd: float) -> torch.optim.AdamW:
    pg = []
    for g in groups + ([{"params": extra, "scale": 1.0}] if extra else []):
        decay = [p for p in g["params"] if p.ndim >= 2]
        rest = [p for p in g["params"] if p.ndim < 2]
        pg += [{"params": decay, "weight_decay": wd, "scale": g["scale"]},
               {"params": rest, "weight_decay": 0.0, "scale": g["scale"]}]
    return torch.optim.AdamW([g for g in pg if g["params"]], lr=0.0, betas=(0.9, 0.98))


def lr_at(step: int, total: int, peak: float, warmup: float) -> float:
    w = max(1, int(round(warmup * total)))
    if step < w:
        return peak * (step + 1) / w
    p = (step - w) / max(1, total - w)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * p)))


def thin_visual_tokens(batch: dict, image_id: int, share: float, gen: torch.Generator) -> dict:
    """Stage 3's optional token dropout: on ``share`` of the rows only a uniform random fraction of the
    visual tokens stays attended, positions renumbered over what is left (as a pre-LLM method leaves them)."""
    ids, mask = batch["input_ids"], batch["attention_mask"].clone()
    rows = torch.rand(ids.shape[0], generator=gen) < share
    fracs = torch.rand(ids.shape[0], generator=gen)
    draws = torch.rand(ids.shape, generator=gen)
    drop = rows[:, None] & (ids == image_id) & (draws >= fracs[:, None])
    mask[drop] = 0
    return {**batch, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}


def held_out(args) -> list:
    return D.make_split("test", args.eval_n, seed=args.seed + 1000)  # not the benchmark's test stream (seed 0..)


def eval_batches(rt, questions, batch_size: int = 50) -> list:
    """The held-out prompts, rendered and processed once per stage (not at every evaluation)."""
    return [(questions[s:s + batch_size], rt.processor([q.prompt for q in questions[s:s + batch_size]],
                                                       [q.image() for q in questions[s:s + batch_size]]))
            for s in range(0, len(questions), batch_size)]


@torch.no_grad()
def quick_eval(rt, batches, device) -> dict:
    """First-token greedy accuracy per question type on held-out questions (one-word answers)."""
    model = rt.model
    was = model.training
    model.eval()
    hits: dict[str, list[int]] = {}
    for qs, b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        pred = model(**b, logits_to_keep=1).logits[:, -1].argmax(-1).cpu().tolist()
        for q, p in zip(qs, pred):
            ok = int(rt.tokenizer.convert_ids_to_tokens(p) == q.answer)
            for key in ("overall", q.qtype):
                hits.setdefault(key, []).append(ok)
    model.train(was)
    return {k: round(100 * sum(v) / len(v), 1) for k, v in hits.items()}


# ------------------------------------------------------------------------------------------------ driver

def recipe_of(args) -> dict:
    return {k: v for k, v in sorted(vars(args).items()) if k not in RUNTIME_ARGS}


def check_recipe(work: Path, recipe: dict) -> None:
    path = work / "recipe.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), recipe.get(k)) for k in set(old) | set(recipe) if old.get(k) != recipe.get(k)}
        if diff:
            raise SystemExit(f"{work} holds a run of another recipe (stored vs given: {diff}); use another --work")
    else:
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(recipe, indent=1) + "\n")


def read_log(work: Path) -> dict:
    p = work / "log.json"
    return json.loads(p.read_text()) if p.exists() else {"stages": {}, "calls": []}


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def save_state(work: Path, stage: str, step: int, model, heads, opt) -> None:
    tmp = work / "state.pt.tmp"
    torch.save({"stage": stage, "step": step, "model": model.state_dict(),
                "heads": heads.state_dict() if heads is not None else None, "opt": opt.state_dict()}, tmp)
    os.replace(tmp, work / "state.pt")


def run_stage(stage: str, rt, args, work: Path, log: dict, deadline: float | None) -> bool:
    """Runs (or resumes) one stage; True when it finished, False when it stopped at the deadline."""
    model, device = rt.model, torch.device(args.device)
    steps, batch, peak = (getattr(args, f"{stage}_{k}") for k in ("steps", "batch", "lr"))
    heads = None
    if stage == "tower":
        torch.manual_seed(args.seed + 17)
        heads = ContrastiveHeads(len(rt.tokenizer), tower_of(model).config.hidden_size, args.text_encoder_layers)
        heads.to(device)
    groups = trainable(model, stage, args)
    opt = make_optimizer(groups, list(heads.parameters()) if heads is not None else [], args.weight_decay)
    start = 0
    state_path = work / "state.pt"
    if state_path.exists():
        st = torch.load(state_path, map_location=device, weights_only=True)
        if st["stage"] == stage:
            model.load_state_dict(st["model"])
            if heads is not None:
                heads.load_state_dict(st["heads"])
            opt.load_state_dict(st["opt"])
            start = st["step"]
    entry = log["stages"].setdefault(stage, {"curve": [], "evals": [], "wall_s": 0.0})
    if start >= steps:  # finished in an earlier call that stopped before writing the log (the model was saved first)
        entry["done"] = True
        return True
    loader = torch.utils.data.DataLoader(Stream(stage, args.seed, start * batch, (steps - start) * batch),
                                         batch_size=batch, shuffle=False, num_workers=args.workers,
                                         collate_fn=Collate(rt.processor, stage),
                                         prefetch_factor=4 if args.workers else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    params = [p for g in opt.param_groups for p in g["params"]]
    vt = tower_of(model)
    image_id = model.config.image_token_id
    val = eval_batches(rt, held_out(args)) if stage == "instruct" else None
    model.train()
    t0, acc, step = time.time(), {"loss": 0.0, "extra": 0.0, "n": 0}, start
    for step, b in enumerate(loader, start=start):
        if (deadline is not None and time.time() > deadline) or (args.stop_after is not None and step - start >= args.stop_after):
            save_state(work, stage, step, model, heads, opt)
            entry["wall_s"] = round(entry["wall_s"] + time.time() - t0, 1)
            return False
        for g in opt.param_groups:
            g["lr"] = g["scale"] * lr_at(step, steps, peak, args.warmup)
        if stage == "instruct" and args.token_drop:
            b = thin_visual_tokens(b, image_id, args.token_drop, torch.Generator().manual_seed(args.seed * 1_000_003 + step))
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        with autocast:
            if stage == "tower":
                pooled = vt(b["pixel_values"]).pooler_output
                loss, extra = clip_loss(heads.visual(pooled), heads.text(b["text"], b["last"]), heads.logit_scale)
            else:
                loss = model(**b).loss
                extra = torch.zeros(())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        acc["loss"] += float(loss.detach())
        acc["extra"] += float(extra)
        acc["n"] += 1
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            row = {"step": step + 1, "time_s": round(entry["wall_s"] + time.time() - t0, 1),
                   "lr": round(opt.param_groups[0]["lr"], 7), "loss": round(acc["loss"] / acc["n"], 4)}
            if stage == "tower":
                row["retrieval_top1"] = round(acc["extra"] / acc["n"], 4)
            entry["curve"].append(row)
            print(stage, json.dumps(row), flush=True)
            acc = {"loss": 0.0, "extra": 0.0, "n": 0}
        if stage == "instruct" and ((step + 1) % args.eval_every == 0 or step + 1 == steps):
            ev = {"step": step + 1, **quick_eval(rt, val, device)}
            entry["evals"].append(ev)
            print("eval", json.dumps(ev), flush=True)
        if (step + 1) % args.save_every == 0 and step + 1 < steps:
            save_state(work, stage, step + 1, model, heads, opt)
            write_json(work / "log.json", log)
    entry["wall_s"] = round(entry["wall_s"] + time.time() - t0, 1)
    entry["done"] = True
    save(rt, work / "model")
    save_state(work, stage, steps, model, heads, opt)
    return True


def export(work: Path, out: Path, log: dict, dtype: str = "float16") -> None:
    """The finished model into ``out`` (``save_pretrained``, weights in ``dtype``: float16 by default, half the
    size; loading upcasts to the dtype asked for, so the exported weights are the model every evaluation
    sees) with the log and the recipe."""
    if not all(log["stages"].get(s, {}).get("done") for s in STAGES):
        raise SystemExit(f"{work}: not every stage is done ({ {s: bool(log['stages'].get(s, {}).get('done')) for s in STAGES} })")
    from .model2 import load

    out.mkdir(parents=True, exist_ok=True)
    rt = load(work / "model")
    rt.model.to(getattr(torch, dtype))
    rt.model.config.dtype = dtype
    save(rt, out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file() and f.name != "train_log.json")
    write_json(out / "train_log.json", {**log, "recipe": json.loads((work / "recipe.json").read_text()), "weights_bytes": size})
    print(f"exported {out} ({size / 1e6:.1f} MB)")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    work = Path(args.work)
    t_start = time.time()
    deadline = t_start + args.time_limit if args.time_limit else None
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = recipe_of(args)
    if args.export:
        export(work, Path(args.export), read_log(work), args.export_dtype)
        return 0
    check_recipe(work, recipe)
    log = read_log(work)
    if all(log["stages"].get(s, {}).get("done") for s in STAGES):
        print("DONE", flush=True)  # nothing left: not a call of the run (the log is unchanged)
        return 0
    log["calls"].append({"argv": argv, "device": args.device, "dtype": args.dtype, "torch": torch.__version__,
                         "machine": f"{platform.machine()} cpus={os.cpu_count()}",
                         "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device.startswith("cuda") else None,
                         "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    rt = build(seed=args.seed, vision=json.loads(args.vision), text=json.loads(args.text))
    rt.model.to(args.device)
    if (work / "model" / "config.json").exists():  # the last finished stage's weights
        from .model2 import load

        rt.model.load_state_dict(load(work / "model").model.state_dict())
    finished = True
    for stage in STAGES:
        if log["stages"].get(stage, {}).get("done"):
            continue
        finished = run_stage(stage, rt, args, work, log, deadline)
        write_json(work / "log.json", log)
        if not finished:
            break
    print("DONE" if finished else f"PAUSED (run the same command again to continue; {NAME})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
