"""LLaVA-OneVision (SigLIP, anyres_max_9 crops with newline tokens) inside vLLM with a pre-LLM pruning method:
``VtpruneLlavaOnevisionForConditionalGeneration``. Images only (one per prompt; videos: the HF engine). As
:mod:`integrations.vllm.llava_next`: each image size's count from the checkpoint's geometry twin.
"""

from __future__ import annotations

from vllm.model_executor.models.llava_onevision import (LlavaOnevisionDummyInputsBuilder,
                                                        LlavaOnevisionForConditionalGeneration,
                                                        LlavaOnevisionMultiModalProcessor,
                                                        LlavaOnevisionProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .common import ModelMixin, ProcessorMixin, TwinCountMixin

FAMILY = "llava_onevision"


class VtpruneLlavaOnevisionProcessingInfo(TwinCountMixin, LlavaOnevisionProcessingInfo):
    pass


class VtpruneLlavaOnevisionMultiModalProcessor(ProcessorMixin, LlavaOnevisionMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(VtpruneLlavaOnevisionMultiModalProcessor,
                                        info=VtpruneLlavaOnevisionProcessingInfo,
                                        dummy_inputs=LlavaOnevisionDummyInputsBuilder)
class VtpruneLlavaOnevisionForConditionalGeneration(ModelMixin, LlavaOnevisionForConditionalGeneration):
    FAMILY = FAMILY
    REPLACED = ("vision_tower", "multi_modal_projector")  # the vision stage runs transformers' own

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vt_init(vllm_config)

    def embed_multimodal(self, **kwargs):
        prompts, keys, items = self._vt_fields(kwargs)
        if self._vt_spec is None:
            return super().embed_multimodal(**kwargs)
        if kwargs.get("pixel_values_videos") is not None:
            raise ValueError("the vtprune plugin prunes images; OneVision videos run on the HF engine")
        return self._embed_sized(kwargs, prompts, keys, items)
