"""The worker side: our engine's vision stage for the images of a vLLM batch.

The vision stage runs on transformers' own modules (the vision tower, the projector, the embedding table
and, for a method with an LLM probe, the first decoder layers), loaded from the same checkpoint with
``llava.load(..., decoder_layers=N)``: the engine's adapter, signals and the method's ``select_vision`` run
unchanged, so the kept tokens are the HF engine's on the same pixels and prompt. vLLM's decoder then runs
the LLM on the prompt with each image's kept / merged tokens in its placeholders. The tower runs with
transformers' attention (SDPA); vLLM's own tower is freed after loading where nothing else of vLLM's references
it (the LLaVA families: ``ModelMixin.REPLACED``), kept on the Qwen models (their tower's weights are then in
memory twice).
"""

from __future__ import annotations

import json
import logging
import os

import torch

from .spec import PluginError, PruneSpec, check_method

log = logging.getLogger("vtprune.vllm")

#: the processor field that carries each image's prompt (token ids, unexpanded: one placeholder per image)
PROMPT_FIELD = "vtprune_prompt_ids"
#: a request's sample key (``mm_processor_kwargs={"vtprune_sample_key": question_id}``), as the field of its image:
#: seeded methods (random) draw from it as the HF engine draws from ``engine.sample_keys`` (else from the prompt)
KEY_FIELD = "vtprune_sample_key"


#: a processed image's identity (random, drawn when the processor processes it; vLLM's processor cache hands the same
#: processed item, and so the same identity, to identical (image, prompt) requests): the vision stage run when a Qwen
#: request is admitted (for its positions) hands its embeddings to the encoder step under it
ITEM_FIELD = "vtprune_item"
#: embeddings kept between admission and the encoder step (a request admitted but never encoded, e.g. an encoder
#: cache hit, leaves its entry here until it is evicted)
CACHE_SIZE = 256


def new_items(n: int) -> torch.Tensor:
    """(n, 2) random int64 identities of n processed images."""
    import uuid

    return torch.tensor([[int.from_bytes(b[:8], "little", signed=True), int.from_bytes(b[8:], "little", signed=True)]
                         for b in (uuid.uuid4().bytes for _ in range(n))], dtype=torch.long)


def item_key(t) -> tuple | None:
    return None if t is None else tuple(int(v) for v in (t.reshape(-1).tolist() if torch.is_tensor(t) else t))


def encode_key(key) -> torch.Tensor:
    """A sample key as a tensor (its UTF-8 bytes), the form a processor field carries."""
    return torch.tensor(list(str(key).encode("utf-8")) or [-1], dtype=torch.long)


def pruned_ids(ids: list[int], placeholders, per_run: list[int], token: int) -> list[int]:
    """``ids`` with its i-th run of placeholder tokens replaced by ``per_run[i]`` tokens ``token``."""
    out, run, inside = [], 0, False
    for t in ids:
        if t in placeholders:
            if not inside:
                out.extend([token] * per_run[run])
                run += 1
            inside = True
            continue
        inside = False
        out.append(t)
    if run != len(per_run):
        raise RuntimeError(f"{len(per_run)} runs counted, the prompt holds {run}")
    return out


def decode_key(t) -> str | None:
    vals = [int(v) for v in (t.reshape(-1).tolist() if torch.is_tensor(t) else t) if int(v) >= 0]
    return bytes(vals).decode("utf-8") if vals else None


class VisionStage:
    """One worker's pruning: ``embed(pixel_values, prompts)`` -> per image its (K, D) LLM inputs."""

    def __init__(self, model: str, spec: PruneSpec, family: str, dtype: torch.dtype, device: torch.device,
                 revision: str | None = None):
        from llava.models import load

        method = spec.build()
        probe = tuple(method.probe_layers)
        layers = max(probe) + 1 if probe else 0
        self.spec = spec
        self.rt = load(model, dtype=dtype, device=device, template=spec.template, decoder_layers=layers, revision=revision)
        if self.rt.family != family:
            raise PluginError(f"{model}: the checkpoint is a {self.rt.family} model, the plugin class serves {family}")
        self.engine = self.rt.prune(method)
        check_method(self.engine.method, family)
        self.family = family
        from collections import OrderedDict

        self._cache: OrderedDict = OrderedDict()  # item -> embeddings computed at admission (Qwen)
        self.runs = 0  # vision-stage runs (each image once: at admission on Qwen, in the encoder step otherwise)
        cfg = self.rt.model.config
        self.image_token = int(cfg.image_token_id)
        #: the video placeholder (Qwen-VL: ``<|video_pad|>``, OneVision: ``<video>``; None where the family has none)
        self.video_token = None if getattr(cfg, "video_token_id", None) is None else int(cfg.video_token_id)
        log.info("vtprune: %s (budget %s, options %s) on %s; vision stage on transformers modules, %d decoder "
                 "layer(s) loaded for its probe", method.name, spec.budget, dict(spec.options), model, layers)

    def expand(self, prompt: list[int], tokens, token: int | None = None) -> list[int]:
        """The prompt as the HF processor expands it: each placeholder ``token`` (default: the image's) repeated
        ``tokens`` times, or replaced by the ids ``tokens`` (a list: Qwen3-VL's video layout, a timestamp and a run
        per temporal slice)."""
        token = self.image_token if token is None else token
        run = [token] * tokens if isinstance(tokens, int) else [int(t) for t in tokens]
        out = []
        for t in prompt:
            out.extend(run if t == token else [t])
        return out

    def embed_one(self, visual: dict, prompt: list[int], tokens, key: str | None = None,
                  token: int | None = None) -> torch.Tensor:
        """(K, D): the item's tokens after the vision stage, for one prompt holding exactly this image or video
        (``visual``: the family's inputs for this one item, batch dimension 1; ``tokens``: its placeholders
        unpruned, a count or the ids its placeholder expands to (:meth:`expand`); ``token``: its placeholder, default
        the image's)."""
        return self.run_one(visual, prompt, tokens, key, token)[0]

    def keep(self, item: tuple | None, embeds: torch.Tensor) -> None:
        """Hold an image's embeddings computed at admission for its encoder step."""
        if item is None:
            return
        self._cache[item] = embeds
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    @torch.inference_mode()
    def run_one(self, visual: dict, prompt: list[int], tokens, key: str | None = None, token: int | None = None):
        """(the item's LLM inputs (K, D'), the positions the engine gives the pruned prompt (rows, L') on the host,
        the pruned prompt's ids (each kept / merged token as the placeholder ``token``)). ``tokens``: the item's
        placeholders unpruned, a count or the ids the placeholder expands to (:meth:`expand`); ``token``: the item's
        placeholder in ``prompt`` (default: the image's; Qwen-VL videos: ``<|video_pad|>``). The visual rows are
        those of every placeholder run of the expanded prompt, in order (Qwen3-VL videos: one run per temporal
        slice, the timestamps' text between them: :meth:`llava.engine.PruningEngine.visual_runs`)."""
        token = self.image_token if token is None else token
        placeholders = {self.image_token, self.video_token} - {None}
        if sum(1 for t in prompt if t == token) != 1 or sum(1 for t in prompt if t in placeholders) != 1:
            raise PluginError("the vtprune plugin serves one image or one video per prompt (its selection reads the "
                              "prompt's question, and the engine lays out one visual item per prompt here)")
        ids = self.expand(prompt, tokens, token)
        px = visual.get("pixel_values", visual.get("pixel_values_videos"))
        input_ids = torch.tensor([ids], dtype=torch.long, device=px.device)
        self.engine.sample_keys = None if key is None else [key]  # consumed by the prefill's selection
        embeds, _, pos, info = self.engine.vision_inputs(input_ids, visual)
        self.runs += 1
        rows, per_run = self.engine.visual_runs(input_ids, info)[0]
        m = int(rows.numel())
        out = embeds[0, rows.to(embeds.device)]
        if info.deepstack is not None:  # Qwen3-VL: each kept token's DeepStack rows after it, as vLLM's multiscale layout
            deep = info.deepstack.rows
            if deep.shape[0] != m:
                raise RuntimeError(f"{deep.shape[0]} DeepStack rows for {m} visual tokens")
            out = torch.cat([out, deep.reshape(m, -1).to(out.dtype)], dim=-1)
        pruned = pruned_ids(ids, placeholders, per_run, token)
        record = os.environ.get("VTPRUNE_VLLM_RECORD")
        if record:  # the tests' window on the worker: each image's selection (a JSON line)
            sel = self.engine.selections.get(("vision", 0))
            row = {"prompt": prompt, "tokens": m, "runs": per_run, "pixels": float(px.double().sum()),
                   "pixel_shape": list(px.shape), "keep": None if sel is None else sel.keep.tolist(),
                   "targets": None if sel is None or sel.targets is None else sel.targets.tolist()}
            with open(record, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        return out, pos[:, 0].cpu() if pos is not None and pos.dim() == 3 else pos, pruned  # M-RoPE: (3, L')

    def embed(self, visuals: list[dict], prompts, counts: list[tuple[int, int]], keys=None, items=None,
              token: int | None = None) -> list[torch.Tensor]:
        """Per image (``visuals[i]``: its inputs, batch dimension 1), its planned LLM inputs; ``prompts``: each
        image's prompt ids ((N, L) or a list; None or -1 rows: vLLM's profiling run, which has no prompt);
        ``counts[i]``: (its tokens unpruned: a count, or the ids its placeholder expands to (Qwen3-VL videos), the
        planned count); ``keys``: each image's sample key field, or None;
        ``items``: each image's identity (embeddings computed at its admission are taken from there); ``token``:
        the items' placeholder (default: the image's; a video's for Qwen-VL videos)."""
        out = []
        emb = self.engine.lm.embed_tokens.weight
        for i, visual in enumerate(visuals):
            tokens, planned = counts[i]
            p = None if prompts is None else prompts[i]
            ids = [] if p is None else [int(t) for t in (p.tolist() if torch.is_tensor(p) else p) if int(t) >= 0]
            if not ids:  # vLLM's memory profiling: shapes only
                px = visual.get("pixel_values", visual.get("pixel_values_videos"))
                out.append(torch.zeros(planned, emb.shape[1], dtype=emb.dtype, device=px.device))
                continue
            held = self._cache.pop(item_key(items[i]), None) if items is not None else None
            x = held if held is not None else self.embed_one(visual, ids, tokens,
                                                             None if keys is None else decode_key(keys[i]), token)
            if x.shape[0] != planned:
                raise RuntimeError(f"{self.engine.method.name} kept {x.shape[0]} tokens of this item, but vLLM reserved "
                                   f"{planned} placeholders for it (planned in the front end): a method whose count "
                                   "depends on the image cannot run inside vLLM")
            out.append(x)
        return out
