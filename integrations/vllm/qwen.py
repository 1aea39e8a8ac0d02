"""The Qwen-VL families inside vLLM with a pre-LLM pruning method: ``VtpruneQwen2_5_VLForConditionalGeneration``,
``VtpruneQwen3VLForConditionalGeneration`` (mixins over vLLM's classes; Qwen3-VL's DeepStack rows follow each kept
token in vLLM's multiscale layout: [token, level 0, level 1, ...]).

As the LLaVA families, plus M-RoPE: a kept token keeps its 3-D position of the unpruned image and the text after
the image keeps its unpruned positions (our engine's convention). vLLM computes a request's M-RoPE positions when
the request is admitted (``get_mrope_input_positions``, in the worker, with the request's processed image), before
the encoder step; which tokens are kept is then not known yet, so the override runs the vision stage there and
returns the positions the engine gives the pruned prompt (``engine.vision_inputs``), with vLLM's position delta
for decoding (max position + 1 - prompt length); the embeddings wait for the image's encoder step under the
processed image's identity (``stage.ITEM_FIELD``), so the vision stage runs once per image. Each
image's count (it depends on the image's resized grid) comes from the checkpoint's geometry twin.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (Qwen2_5_VLDummyInputsBuilder, Qwen2_5_VLForConditionalGeneration,
                                                   Qwen2_5_VLMultiModalProcessor, Qwen2_5_VLProcessingInfo)
from vllm.model_executor.models.qwen3_vl import (Qwen3VLDummyInputsBuilder, Qwen3VLForConditionalGeneration,
                                                 Qwen3VLMultiModalProcessor, Qwen3VLProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement

from .common import ModelMixin, ProcessorMixin, TwinCountMixin
from .spec import PruneSpec
from .stage import ITEM_FIELD, KEY_FIELD, PROMPT_FIELD, decode_key, item_key
from .twin import twin_for



def grid_count(model: str, spec: PruneSpec, config, grid, revision: str | None = None) -> tuple[int, int]:
    """(tokens unpruned, planned) of an image whose patch grid is ``grid`` (t, h, w): the twin's count (the checkpoint
    at ``revision``) for an image of exactly that many patches (smart resize leaves it unchanged)."""
    patch = config.vision_config.patch_size
    _, h, w = (int(x) for x in grid)
    return twin_for(model, spec, revision).count(w * patch, h * patch)


class QwenProcessorMixin(ProcessorMixin):
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        spec = self.info.spec()
        if spec is None:
            return updates
        token = self.info.get_hf_config().image_token_id
        twin = twin_for(self.info.model_path(), spec, self.info.model_revision())

        def replacement(item_idx: int):
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
            return [token] * twin.count(int(size.width), int(size.height))[1]

        image = PromptReplacement(modality="image", target=[token], replacement=replacement)
        return [image] + [u for u in updates if u.modality != "image"]


class QwenModelMixin(ModelMixin):
    #: the processor normalises the pixels (vLLM's default for Qwen moves it into the tower's fused input norm,
    #: handing the model raw uint8 pixels; the engine's vision stage reads normalised ones, as transformers' tower)
    supports_mm_device_do_normalize = False

    def _stage_device(self):
        return next(self.language_model.parameters()).device

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self._vt_spec is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        images = [f for f in mm_features if f.modality == "image"]
        if not images:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        if len(images) > 1 or len(images) != len(mm_features):
            raise ValueError("the vtprune plugin serves one image per prompt")
        data = images[0].data
        field = data.get(PROMPT_FIELD)
        prompt = [] if field is None else [int(t) for t in field.data.reshape(-1).tolist() if int(t) >= 0]
        if not prompt:  # vLLM's profiling run: plain positions of the right length
            n = len(input_tokens)
            return torch.from_numpy(np.broadcast_to(np.arange(n), (3, n)).copy()), 0
        grid = data["image_grid_thw"].data.reshape(-1)
        key_field = data.get(KEY_FIELD)
        key = None if key_field is None else decode_key(key_field.data)
        tokens = int(grid.prod()) // (self.config.vision_config.spatial_merge_size ** 2)
        stage = self._stage(self._stage_device())
        dev = self._stage_device()
        visual = {"pixel_values": data["pixel_values"].data.to(dev), "image_grid_thw": grid.reshape(1, 3).to(dev)}
        embeds, pos = stage.run_one(visual, prompt, tokens, key)
        item = data.get(ITEM_FIELD)
        stage.keep(None if item is None else item_key(item.data), embeds)  # for this image's encoder step
        record = os.environ.get("VTPRUNE_VLLM_RECORD")
        if record:  # the tests' window on the worker: the positions vLLM's decoder will use
            with open(record, "a", encoding="utf-8") as f:
                f.write(json.dumps({"prompt": prompt, "positions": pos.tolist(),
                                    "delta": int(pos.max()) + 1 - len(input_tokens)}) + "\n")
        if pos.shape[1] != len(input_tokens):
            raise RuntimeError(f"the pruned prompt has {pos.shape[1]} tokens but vLLM's has {len(input_tokens)}: the "
                               "planned count and the selection disagree")
        return pos, int(pos.max()) + 1 - len(input_tokens)

    def embed_multimodal(self, **kwargs):
        prompts, keys, items = self._vt_fields(kwargs)
        if self._vt_spec is None:
            return super().embed_multimodal(**kwargs)
        if kwargs.get("pixel_values_videos") is not None:
            raise ValueError("the vtprune plugin prunes images; Qwen-VL videos run on the HF engine")
        pixel_values = self._pixels(kwargs)
        grids = kwargs["image_grid_thw"]
        grids = grids.reshape(-1, 3) if torch.is_tensor(grids) else torch.stack([g.reshape(3) for g in grids])
        sizes = [int(g.prod()) for g in grids]
        flat = torch.cat(list(pixel_values)) if isinstance(pixel_values, (list, tuple)) else pixel_values
        parts = flat.split(sizes)
        stage = self._stage(flat.device)
        visuals, counts = [], []
        for px, g in zip(parts, grids):
            visuals.append({"pixel_values": px, "image_grid_thw": g.reshape(1, 3).to(flat.device)})
            counts.append(grid_count(self._vt_model[0], self._vt_spec, self.config, g, self._vt_model[1]))
        return stage.embed(visuals, prompts, counts, keys, items)


class VtpruneQwen2_5_VLProcessingInfo(TwinCountMixin, Qwen2_5_VLProcessingInfo):
    pass


class VtpruneQwen2_5_VLMultiModalProcessor(QwenProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(VtpruneQwen2_5_VLMultiModalProcessor, info=VtpruneQwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class VtpruneQwen2_5_VLForConditionalGeneration(QwenModelMixin, Qwen2_5_VLForConditionalGeneration):
    FAMILY = "qwen2_5_vl"

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vt_init(vllm_config)


class VtpruneQwen3VLProcessingInfo(TwinCountMixin, Qwen3VLProcessingInfo):
    pass


class VtpruneQwen3VLMultiModalProcessor(QwenProcessorMixin, Qwen3VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(VtpruneQwen3VLMultiModalProcessor, info=VtpruneQwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class VtpruneQwen3VLForConditionalGeneration(QwenModelMixin, Qwen3VLForConditionalGeneration):
    FAMILY = "qwen3_vl"

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vt_init(vllm_config)
