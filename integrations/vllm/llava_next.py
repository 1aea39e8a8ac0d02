"""LLaVA-NeXT (anyres crops) inside vLLM with a pre-LLM pruning method: ``VtpruneLlavaNextForConditionalGeneration``.

As :mod:`integrations.vllm.llava`, but an image's token count depends on its size (the crop grid, the unpadded
rows, a newline token per row): the front end counts each size on the checkpoint's geometry twin
(:mod:`integrations.vllm.twin`), the engine's own layout (``next_layout="spatial_unpad"``, transformers' and
vLLM's) and the method's selection on it.
"""

from __future__ import annotations

from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (LlavaNextForConditionalGeneration, LlavaNextMultiModalProcessor,
                                                   LlavaNextProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .common import ModelMixin, ProcessorMixin, TwinCountMixin

FAMILY = "llava_next"


class VtpruneLlavaNextProcessingInfo(TwinCountMixin, LlavaNextProcessingInfo):
    pass


class VtpruneLlavaNextMultiModalProcessor(ProcessorMixin, LlavaNextMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(VtpruneLlavaNextMultiModalProcessor, info=VtpruneLlavaNextProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class VtpruneLlavaNextForConditionalGeneration(ModelMixin, LlavaNextForConditionalGeneration):
    FAMILY = FAMILY
    REPLACED = ("vision_tower", "multi_modal_projector")  # the vision stage runs transformers' own

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vt_init(vllm_config)

    def embed_multimodal(self, **kwargs):
        prompts, keys, items = self._vt_fields(kwargs)
        if self._vt_spec is None:
            return super().embed_multimodal(**kwargs)
        return self._embed_sized(kwargs, prompts, keys, items)
