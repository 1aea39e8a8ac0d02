"""What every family's vLLM classes share (mixins placed before vLLM's own class in each subclass):

- :class:`InfoMixin` (processing info): the spec from ``hf_overrides``, transformers' PIL image backend (the HF
  engine's preprocessing), one image per prompt (or one video, on the families with ``VIDEOS``);
- :class:`ProcessorMixin` (multimodal processor): each image (video) carries its prompt's token ids (a processor
  field, part of the mm hash, so vLLM's processor and encoder caches key on (item, prompt));
- :class:`ModelMixin` (model): the worker's :class:`~integrations.vllm.stage.VisionStage`, built when the weights
  are loaded (a bad spec fails at start-up).

Without ``hf_overrides["vtprune"]`` every class behaves as vLLM's own.
"""

from __future__ import annotations

import dataclasses
import json
import os
from functools import lru_cache

import torch
from vllm.multimodal.inputs import MultiModalFieldConfig

from .spec import PruneSpec, revision_key
from .stage import ITEM_FIELD, KEY_FIELD, PROMPT_FIELD, VisionStage, encode_key, log, new_items
from .twin import twin_for


@lru_cache(maxsize=8)
def _image_processor(model: str, family: str, revision: str | None, key: tuple):
    from llava.models import checkpoint_processors

    return checkpoint_processors(model, family, revision=revision)[1]


def engine_image_processor(model: str, hf_config, revision: str | None = None):
    """The image processor our HF engine uses for this checkpoint at ``revision`` (its settings, transformers' PIL
    backend; cached per (checkpoint, family, revision))."""
    from llava.models import family_of

    return _image_processor(model, family_of(hf_config), revision, revision_key(revision))


class Replaced(torch.nn.Module):
    """Holds the place of a vLLM module the plugin's vision stage replaces; refuses to run."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"vLLM's {self.name} was freed: the vtprune plugin's vision stage runs instead")


class InfoMixin:
    def spec(self) -> PruneSpec | None:
        spec = PruneSpec.from_config(self.get_hf_config())
        return None if spec is None else spec.check_revision(self.model_revision())

    def model_path(self) -> str:
        return self.ctx.model_config.model

    def model_revision(self) -> str | None:
        """The checkpoint revision vLLM serves (``LLM(revision=...)``; None: the default branch): every file the
        front end reads (the twin's config, tokenizer and image processor, the engine's image processor) is read
        there, as the worker's vision stage and vLLM's own weights."""
        return getattr(self.ctx.model_config, "revision", None)

    def get_hf_processor(self, **kwargs):
        proc = super().get_hf_processor(**kwargs)
        if self.spec() is not None:  # the HF engine's image processor (transformers' PIL backend), not torchvision's
            ip = engine_image_processor(self.model_path(), self.get_hf_config(), self.model_revision())
            if type(proc.image_processor) is not type(ip):
                proc.image_processor = ip
        return proc

    #: the plugin prunes this family's videos inside vLLM (Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision); else its videos
    #: run on the HF engine
    VIDEOS = False

    def videos_asked(self) -> bool:
        """Videos are opt-in (``limit_mm_per_prompt={"video": 1}``): vLLM reserves memory for the largest video it
        allows, and the plugin counts that video on the geometry twin at start-up (minutes of CPU at a 7B model's
        largest frame size), which an image-only server should not pay."""
        limit = self.ctx.get_mm_config().limit_per_prompt.get("video")
        return self.VIDEOS and limit is not None and getattr(limit, "count", limit) > 0

    def get_supported_mm_limits(self):
        limits = super().get_supported_mm_limits()
        if self.spec() is None:
            return limits
        # one image (or, where VIDEOS and asked for, one video) per prompt; the processor refuses both in one prompt
        return {m: (1 if m == "image" or (m == "video" and self.videos_asked()) else 0) for m in limits}


class VideoCountMixin:
    """Processing info of a family whose videos the plugin prunes: vLLM picks its profiling video's frame count from
    the unpruned counts (``_vt_stock`` is set meanwhile: the family's ``get_num_video_tokens`` then answers vLLM's own
    count)."""

    _vt_stock = False  # set while vLLM picks its profiling video's frame count (from the unpruned counts)

    def get_num_frames_with_most_features(self, seq_len: int, mm_counts, *args, **kwargs) -> int:
        """vLLM's frame count for its profiling video, from the unpruned counts (its search adds a frame while the
        video fits ``seq_len``; on the pruned counts a method that keeps a fixed number per video would never stop)."""
        self._vt_stock = True
        try:
            return super().get_num_frames_with_most_features(seq_len, mm_counts, *args, **kwargs)
        finally:
            self._vt_stock = False


class TwinCountMixin(InfoMixin):
    """Processing info of a family whose image count depends on the image's size (NeXT, OneVision, Qwen): vLLM's
    count of an image's placeholders becomes the geometry twin's planned count (:mod:`integrations.vllm.twin`),
    after checking that the twin's unpruned count is vLLM's own."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int, **kwargs) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height, **kwargs)
        spec = self.spec()
        if spec is None:
            return n
        twin = twin_for(self.model_path(), spec, self.model_revision())
        stock, planned = twin.count(int(image_width), int(image_height))
        if stock != n:
            raise RuntimeError(f"vLLM counts {n} tokens for a {image_width}x{image_height} image, the engine {stock}: "
                               "unsupported configuration (an image processor setting other than the checkpoint's, "
                               "e.g. min_pixels / max_pixels?)")
        return planned


class ProcessorMixin:
    def apply(self, inputs, timing_ctx):
        if self.info.spec() is not None:  # the prompt's ids travel with the image (and key its caches)
            kw = {**inputs.hf_processor_mm_kwargs, PROMPT_FIELD: tuple(int(t) for t in inputs.prompt)}
            inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs=kw)
        return super().apply(inputs, timing_ctx)

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        kw = dict(hf_kwargs)
        prompt = kw.pop(PROMPT_FIELD, None)  # never handed to the HF processor
        key = kw.pop(KEY_FIELD, None)
        counts = mm_items.get_all_counts()
        n_image, n_video = counts.get("image", 0), counts.get("video", 0)
        if self.info.spec() is not None and n_image and n_video:
            raise ValueError("the vtprune plugin serves one image or one video per prompt, not both (its selection "
                             "reads the prompt's question; the engine lays out one visual item per prompt here)")
        out = super()._apply_hf_processor_main(mm_items, kw)
        n = n_image + n_video  # items (Qwen's pixel values are flat patches: counted here, not from their rows)
        if self.info.spec() is not None and n:
            ids = torch.tensor(list(prompt) if prompt else [-1], dtype=torch.long)
            out[PROMPT_FIELD] = ids.expand(n, -1).clone()
            out[KEY_FIELD] = encode_key("" if key is None else key).expand(n, -1).clone()
            out[ITEM_FIELD] = new_items(n)
        return out

    def get_dummy_mm_inputs(self, mm_counts, **kwargs):
        """vLLM's dummy request; its processor warm-up asks for one item of every allowed modality in one prompt,
        which the plugin refuses (one image or one video per prompt): warmed up one modality at a time (the last
        one's inputs returned; profiling asks for one modality)."""
        wanted = {m: n for m, n in mm_counts.items() if n}
        if self.info.spec() is None or len(wanted) < 2:
            return super().get_dummy_mm_inputs(mm_counts, **kwargs)
        out = None
        for m, n in wanted.items():
            out = super().get_dummy_mm_inputs({m: n}, **kwargs)
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if self.info.spec() is not None:  # the item's own fields: an image's, or a video's (one or the other)
            modality = "video" if "pixel_values_videos" in hf_inputs else "image"
            for name in (PROMPT_FIELD, KEY_FIELD, ITEM_FIELD):
                fields[name] = MultiModalFieldConfig.batched(modality)
        return fields


class ModelMixin:
    FAMILY = ""

    def _vt_init(self, vllm_config) -> None:
        mc = vllm_config.model_config
        revision = getattr(mc, "revision", None)
        self._vt_spec = PruneSpec.from_config(mc.hf_config)
        if self._vt_spec is not None:
            self._vt_spec.check_revision(revision)
            if (getattr(mc, "tokenizer", None) or mc.model) != mc.model or \
                    (getattr(mc, "tokenizer_revision", None) or revision) != revision:
                log.warning("vtprune: vLLM's tokenizer is %s at %s, the plugin reads the checkpoint's own (%s at %s)",
                            getattr(mc, "tokenizer", None), getattr(mc, "tokenizer_revision", None), mc.model, revision)
        self._vt_model = (mc.model, revision, mc.dtype)
        self._vt_stage = None

    def _stage(self, device) -> VisionStage:
        if self._vt_stage is None:
            model, revision, dtype = self._vt_model
            self._vt_stage = VisionStage(model, self._vt_spec, self.FAMILY, dtype, device, revision)
        return self._vt_stage

    #: vLLM's own modules the plugin's vision stage replaces (freed after loading: the tower's weights would
    #: otherwise be in memory twice). Empty for the Qwen classes, whose tower vLLM's encoder CUDA graphs reference.
    REPLACED: tuple = ()

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        if self._vt_spec is not None:  # the vision stage's modules now, so that a bad spec fails at start-up
            self._stage(next(self.language_model.parameters()).device)
            freed = 0
            for name in self.REPLACED:
                mod = getattr(self, name, None)
                if isinstance(mod, torch.nn.Module) and not isinstance(mod, Replaced):
                    freed += sum(p.numel() for p in mod.parameters())
                    setattr(self, name, Replaced(name))
            record = os.environ.get("VTPRUNE_VLLM_RECORD")
            if record:  # the tests' window on the worker
                with open(record, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"freed_params": freed, "replaced": list(self.REPLACED)}) + "\n")
        return loaded

    @staticmethod
    def _vt_fields(kwargs) -> tuple:
        """(each image's prompt ids, sample key field, identity), taken out of the encoder's kwargs."""
        return kwargs.pop(PROMPT_FIELD, None), kwargs.pop(KEY_FIELD, None), kwargs.pop(ITEM_FIELD, None)

    def _embed_sized(self, kwargs, prompts, keys, items) -> list:
        """The vision stage for images given as per-image crops and their ``image_sizes`` (NeXT, OneVision), each
        image's count from the geometry twin."""
        pixel_values = self._pixels(kwargs)
        sizes = kwargs["image_sizes"]
        stage = self._stage(pixel_values[0].device)
        twin = twin_for(self._vt_model[0], self._vt_spec, self._vt_model[1])
        visuals, counts = [], []
        for i in range(len(pixel_values)):
            h, w = (int(x) for x in sizes[i])
            visuals.append({"pixel_values": pixel_values[i][None], "image_sizes": sizes[i].reshape(1, 2)})
            counts.append(twin.count(w, h))
        return stage.embed(visuals, prompts, counts, keys, items)

    def _pixels(self, kwargs) -> list:
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            raise ValueError("the vtprune plugin prunes images given as pixels (image_embeds cannot be pruned)")
        return pixel_values
