"""LLaVA-1.5 inside vLLM with a pre-LLM pruning method: ``VtpruneLlavaForConditionalGeneration``.

Three registered subclasses of vLLM's own LLaVA classes (no vLLM file is patched):

- the processing info reserves each image's *pruned* token count (:func:`integrations.vllm.spec.count_for`)
  as its placeholder run, so the prompt, the KV cache and the scheduler see K tokens, not 576, and
  preprocesses images with transformers' PIL image processor, as the HF engine does (the checkpoint's
  settings; vLLM would pick the torchvision one, whose resize differs in the last bits);
- the multimodal processor hands each image its prompt's token ids (a processor field: the mm hash, and
  so vLLM's processor and encoder caches, key on (image, prompt) - a query-aware selection differs per
  question);
- the model's ``embed_multimodal`` returns the vision stage's K tokens per image
  (:class:`integrations.vllm.stage.VisionStage`); the decoder is vLLM's.

Without ``hf_overrides["vtprune"]`` the class behaves as vLLM's LLaVA.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                              LlavaMultiModalProcessor, LlavaProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig

from .spec import PruneSpec, planned_for_config
from .stage import PROMPT_FIELD, VisionStage

FAMILY = "llava"


class VtpruneLlavaProcessingInfo(LlavaProcessingInfo):
    def spec(self) -> PruneSpec | None:
        return PruneSpec.from_config(self.get_hf_config())

    def get_hf_processor(self, **kwargs):
        if self.spec() is not None:  # the HF engine's image preprocessing (transformers' PIL backend), not torchvision's
            kwargs.setdefault("backend", "pil")
        return super().get_hf_processor(**kwargs)

    def get_supported_mm_limits(self):
        return {"image": 1} if self.spec() is not None else super().get_supported_mm_limits()

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        spec = self.spec()
        if spec is None:
            return n
        s, planned = planned_for_config(spec, FAMILY, self.get_hf_config())
        if s.tokens != n:
            raise RuntimeError(f"vLLM counts {n} tokens per image, the plugin {s.tokens}: unsupported configuration")
        return planned


class VtpruneLlavaMultiModalProcessor(LlavaMultiModalProcessor):
    def apply(self, inputs, timing_ctx):
        if self.info.spec() is not None:  # the prompt's ids travel with the image (and key its caches)
            kw = {**inputs.hf_processor_mm_kwargs, PROMPT_FIELD: tuple(int(t) for t in inputs.prompt)}
            inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs=kw)
        return super().apply(inputs, timing_ctx)

    def _call_hf_processor(self, hf_data, hf_kwargs):
        kw = dict(hf_kwargs)
        prompt = kw.pop(PROMPT_FIELD, None)
        out = super()._call_hf_processor(hf_data, kw)
        if self.info.spec() is not None:
            n = len(out["pixel_values"])
            ids = torch.tensor(list(prompt) if prompt else [-1], dtype=torch.long)
            out[PROMPT_FIELD] = ids.expand(n, -1).clone()
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if self.info.spec() is not None:
            fields[PROMPT_FIELD] = MultiModalFieldConfig.batched("image")
        return fields


@MULTIMODAL_REGISTRY.register_processor(VtpruneLlavaMultiModalProcessor, info=VtpruneLlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VtpruneLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        mc = vllm_config.model_config
        self._vt_spec = PruneSpec.from_config(mc.hf_config)
        self._vt_model = (mc.model, getattr(mc, "revision", None), mc.dtype)
        self._vt_stage: VisionStage | None = None

    def _stage(self, device) -> VisionStage:
        if self._vt_stage is None:
            model, revision, dtype = self._vt_model
            self._vt_stage = VisionStage(model, self._vt_spec, FAMILY, dtype, device, revision)
        return self._vt_stage

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        if self._vt_spec is not None:  # the vision stage's modules now, so that a bad spec fails at start-up
            self._stage(next(self.language_model.parameters()).device)
        return loaded

    def embed_multimodal(self, **kwargs):
        prompts = kwargs.pop(PROMPT_FIELD, None)
        if self._vt_spec is None:
            return super().embed_multimodal(**kwargs)
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            raise ValueError("the vtprune plugin prunes images given as pixels (image_embeds cannot be pruned)")
        s, planned = planned_for_config(self._vt_spec, FAMILY, self.config)
        stage = self._stage(pixel_values[0].device)
        return stage.embed(pixel_values, prompts, s.tokens, planned)
