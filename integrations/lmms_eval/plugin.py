"""lmms-eval model plugin: every pruning method of this repository under lmms-eval's tasks.

Install lmms-eval next to this package in its own environment (it pulls torchvision, which must match
torch: ``bash scripts/lmms_eval_env.sh``, docs/evaluation.md section 8), then:

    .venv-lmms/bin/python -m lmms_eval --model vtprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=consensusdrop,budget=64,opts=key1:val1;key2:val2 \\
        --tasks gqa,pope --batch_size 1 --log_samples --output_path logs/
    # under accelerate launch --num_processes 8 -m lmms_eval ... for data parallel

``pretrained``: anything ``llava.models.load`` takes (hub id, local directory, ``shape:<name>``,
``tiny:<family>``). ``--batch_size N`` batches N consecutive requests of one kind (same generation
arguments, same modality) with left padding, as ``python -m eval run --batch-size N`` does (the same
batches on the same question order: the same answers); paper runs use 1. ``loglikelihood`` requests run
one at a time.

Registered through the entry point group ``lmms_eval.models`` (``vtprune = integrations.lmms_eval.plugin:manifest``,
a ModelManifest for lmms-eval >= 0.7 with the manifest registry) and, for older lmms-eval, with
``register_model`` when this module is imported. This module imports lmms_eval at import time, so
nothing in this repository imports it; only lmms-eval loads it.

Notes: lmms-eval task prompts differ from LLaVA's scripts (evaluation.md section 7: pooled POPE,
TextVQA without OCR tokens, ...); the numbers of our own harness (``python -m eval``) are the
paper-protocol ones. The visual-token accounting of every request (the engine's, as our harness records
it) is written at exit to ``$VTPRUNE_TOKEN_LOG`` or to the model argument ``token_log=PATH`` (JSON;
``.rank<N>`` appended under several processes) when one is set: means ``tok_in`` / ``tok_eq`` and one row
per request.
"""

from __future__ import annotations

import atexit
import json
import os

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

try:
    from lmms_eval.api.registry import register_model
except ImportError:  # pragma: no cover - very old / very new layouts
    def register_model(*names):
        return lambda cls: cls


VIDEO_EXT = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")


def _qid(doc):
    """The question id of an lmms-eval doc (most tasks have ``question_id``), or None."""
    qid = doc.get("question_id") if hasattr(doc, "get") else None
    return None if qid is None else str(qid)


def _engine_key(key) -> str:
    """The pruning engine's per-sample key (it seeds per-sample randomness, e.g. the ``random`` baseline):
    the question id where the doc has one, as ``python -m eval run`` keys a question, else
    task/split/doc_id. The same question then gets the same draws under both harnesses."""
    path, qid = key
    return qid if qid is not None else path


def _kw_key(gen_kwargs: dict) -> str:
    return json.dumps(gen_kwargs, sort_keys=True, default=str)


def _parse_opts(s: str) -> dict:
    out = {}
    for part in filter(None, (s or "").split(";")):
        k, _, v = part.partition(":")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


@register_model("vtprune")
class VTPrune(lmms):
    is_simple = True

    def __init__(self, pretrained: str = "llava-hf/llava-1.5-7b-hf", method: str = "none", budget=None, opts: str = "",
                 dtype: str = "float16", device: str | None = None, next_layout: str = "spatial_unpad",
                 num_frames: int = 8, batch_size=1, max_new_tokens: int = 128, vision_dtype: str | None = None,
                 token_log: str | None = None, **kwargs):
        super().__init__()
        from llava.models import load

        try:
            bs = int(batch_size if batch_size is not None else 1)
        except (TypeError, ValueError):
            raise ValueError(f"vtprune: --batch_size must be a positive integer, got {batch_size!r}") from None
        if bs < 1:
            raise ValueError(f"vtprune: --batch_size must be >= 1, got {bs}")
        self._rank = int(os.environ.get("RANK", "0"))
        self._world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        if self._device.type == "cpu" and dtype == "float16":
            dtype = "float32"
        self.rt = load(str(pretrained), dtype=dtype, device=self._device, next_layout=next_layout,
                       num_frames=int(num_frames), vision_dtype=vision_dtype or None)
        budget = None if budget in (None, "", "none", "None") else int(budget)
        self.engine = self.rt.prune(str(method), budget, **_parse_opts(opts))
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size_per_gpu = bs
        self.tokens = {"samples": 0, "tok_in": 0.0, "tok_eq": 0.0, "method": self.engine.method.config(),
                       "model": str(pretrained), "batch_size": bs, "per_sample": []}
        path = token_log or os.environ.get("VTPRUNE_TOKEN_LOG")  # token_log=: one file per run of a --config list
        if path:
            atexit.register(self._write_tokens, f"{path}.rank{self._rank}" if self._world_size > 1 else path)

    # lmms-eval reads these
    @property
    def device(self):
        return self._device

    @property
    def rank(self):
        return self._rank

    @property
    def world_size(self):
        return self._world_size

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    def _write_tokens(self, path):
        n = max(self.tokens["samples"], 1)
        out = {**self.tokens, "tok_in": self.tokens["tok_in"] / n, "tok_eq": self.tokens["tok_eq"] / n}
        with open(path, "w") as f:
            json.dump(out, f, indent=1)

    def _split_visuals(self, visuals):
        """(images, video) of one request: video files / frame folders become frame lists."""
        from eval.benchmarks.videoqa import load_video

        images, video = [], None
        for v in visuals or []:
            if isinstance(v, str) and (os.path.isdir(v) or v.lower().endswith(VIDEO_EXT)):
                video = load_video(v, self.rt.processor.num_frames)
            else:
                images.append(v)
        return images, video

    def _batch(self, contexts, visuals):
        """Our processor's batch (LLaVA's template, left padding) for several requests of one modality."""
        questions = [c.replace("<image>", "").replace("<video>", "").strip() for c in contexts]
        split = [self._split_visuals(v) for v in visuals]
        if any(video is not None for _, video in split):
            return self.rt.processor(questions, videos=[video for _, video in split], device=self._device)
        return self.rt.processor(questions, images=[imgs or None for imgs, _ in split], device=self._device)

    def _account(self, keys, has_visual: bool):
        st = self.engine.stats
        if not has_visual or st is None:
            return
        for (key, qid), s in zip(keys, st.samples):
            self.tokens["samples"] += 1
            self.tokens["tok_in"] += s.visual_entering_llm
            self.tokens["tok_eq"] += s.visual_layer_avg
            self.tokens["per_sample"].append({"key": key, "question_id": qid, "visual_candidates": s.visual_candidates,
                                              "visual_entering_llm": s.visual_entering_llm,
                                              "visual_layer_avg": s.visual_layer_avg})

    @staticmethod
    def _modality(visuals) -> str:
        vs = visuals or []
        if any(isinstance(v, str) and (os.path.isdir(v) or v.lower().endswith(VIDEO_EXT)) for v in vs):
            return "video"
        return "image" if vs else "text"

    def generate_until(self, requests: list[Instance]) -> list[str]:
        # consecutive requests with the same generation arguments and modality share a batch, in order:
        # the batches of `python -m eval run --batch-size N` on the same questions. Visuals are loaded
        # one batch at a time.
        out, cur = [], []
        bar = tqdm(total=len(requests), disable=self._rank != 0, desc="vtprune")
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            visuals = doc_to_visual(doc)
            it = (context, dict(gen_kwargs or {}), visuals, (f"{task}/{split}/{doc_id}", _qid(doc)))
            if cur and (len(cur) >= self.batch_size_per_gpu or _kw_key(cur[0][1]) != _kw_key(it[1])
                        or self._modality(cur[0][2]) != self._modality(visuals)):
                out.extend(self._generate(cur))
                bar.update(len(cur))
                cur = []
            cur.append(it)
        if cur:
            out.extend(self._generate(cur))
            bar.update(len(cur))
        bar.close()
        return out

    def _generate(self, group) -> list[str]:
        """One batch: [(context, gen_kwargs, visuals, (key, question_id))] -> answers."""
        kw = dict(group[0][1])
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kw.pop("max_new_tokens", self.max_new_tokens))
        temperature = float(kw.pop("temperature", 0) or 0)
        batch = self._batch([g[0] for g in group], [g[2] for g in group])
        has_visual = "pixel_values" in batch or "pixel_values_videos" in batch
        keys = [g[3] for g in group]
        self.engine.sample_keys = [_engine_key(k) for k in keys]
        prefills = self.engine.prefills
        with torch.inference_mode():
            gen = self.rt.model.generate(**batch, max_new_tokens=max_new, do_sample=temperature > 0,
                                         temperature=temperature if temperature > 0 else None, num_beams=1,
                                         use_cache=True)
        self.engine.sample_keys = None
        if has_visual and self.engine.prefills != prefills + 1:
            raise RuntimeError("vtprune: the pruning engine did not handle this batch's prefill")
        self._account(keys, has_visual)
        out = []
        for text in self.rt.processor.decode(gen[:, batch["input_ids"].shape[1]:]):
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            out.append(text.strip())
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        res = []
        tok = self.rt.tokenizer
        for req in tqdm(requests, disable=self._rank != 0, desc="vtprune loglik"):
            context, doc_to_target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            batch = self._batch([context], [doc_to_visual(doc)])
            cont = tok(continuation, add_special_tokens=False, return_tensors="pt").input_ids.to(self._device)
            ids = torch.cat([batch["input_ids"], cont], 1)
            mask = torch.cat([batch["attention_mask"], torch.ones_like(cont)], 1)
            extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
            key = (f"{task}/{split}/{doc_id}", _qid(doc))
            self.engine.sample_keys = [_engine_key(key)]
            with torch.inference_mode():
                logits = self.rt.model(input_ids=ids, attention_mask=mask, **extra).logits
            self.engine.sample_keys = None
            self._account([key], "pixel_values" in batch or "pixel_values_videos" in batch)
            n = cont.shape[1]
            # pruning shortens the sequence before the text: index the continuation from the end
            lp = torch.log_softmax(logits[0, -n - 1:-1].float(), -1)
            tgt = cont[0]
            res.append((float(lp.gather(-1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all())))
        return res

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vtprune: multi-round generation is not supported")


def manifest():
    """Entry-point payload for lmms-eval's manifest registry (``lmms_eval.models`` group)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vtprune", simple_class_path="integrations.lmms_eval.plugin.VTPrune")
