"""LLaVA-1.5 inside vLLM with a pre-LLM pruning method: ``VtpruneLlavaForConditionalGeneration``.

Registered subclasses of vLLM's own LLaVA classes (no vLLM file is patched), with :mod:`integrations.vllm.common`'s
mixins: the processing info reserves each image's *pruned* token count (:func:`integrations.vllm.spec.count_for`,
a dry run on the image's fixed structure) as its placeholder run, so the prompt, the KV cache and the scheduler
see K tokens, not 576; ``embed_multimodal`` returns the vision stage's K tokens per image; the decoder is vLLM's.
"""

from __future__ import annotations

from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                              LlavaMultiModalProcessor, LlavaProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .common import InfoMixin, ModelMixin, ProcessorMixin
from .spec import planned_for_config

FAMILY = "llava"


class VtpruneLlavaProcessingInfo(InfoMixin, LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        spec = self.spec()
        if spec is None:
            return n
        s, planned = planned_for_config(spec, FAMILY, self.get_hf_config())
        if s.tokens != n:
            raise RuntimeError(f"vLLM counts {n} tokens per image, the plugin {s.tokens}: unsupported configuration")
        return planned


class VtpruneLlavaMultiModalProcessor(ProcessorMixin, LlavaMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(VtpruneLlavaMultiModalProcessor, info=VtpruneLlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VtpruneLlavaForConditionalGeneration(ModelMixin, LlavaForConditionalGeneration):
    FAMILY = FAMILY
    REPLACED = ("vision_tower", "multi_modal_projector")  # the vision stage runs transformers' own

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vt_init(vllm_config)

    def embed_multimodal(self, **kwargs):
        prompts, keys, items = self._vt_fields(kwargs)
        if self._vt_spec is None:
            return super().embed_multimodal(**kwargs)
        pixel_values = self._pixels(kwargs)
        s, planned = planned_for_config(self._vt_spec, FAMILY, self.config)
        stage = self._stage(pixel_values[0].device)
        visuals = [{"pixel_values": pixel_values[i][None]} for i in range(len(pixel_values))]
        return stage.embed(visuals, prompts, [(s.tokens, planned)] * len(visuals), keys, items)
