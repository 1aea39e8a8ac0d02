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

from .common import InfoMixin, ModelMixin, ProcessorMixin
from .twin import twin_for

FAMILY = "llava_onevision"


class VtpruneLlavaOnevisionProcessingInfo(InfoMixin, LlavaOnevisionProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        spec = self.spec()
        if spec is None:
            return n
        stock, planned = twin_for(self.model_path(), spec).count(int(image_width), int(image_height))
        if stock != n:
            raise RuntimeError(f"vLLM counts {n} tokens for a {image_width}x{image_height} image, the engine {stock}: "
                               "unsupported configuration")
        return planned


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
        pixel_values = self._pixels(kwargs)
        sizes = kwargs["image_sizes"]
        stage = self._stage(pixel_values[0].device)
        twin = twin_for(self._vt_model[0], self._vt_spec)
        visuals, counts = [], []
        for i in range(len(pixel_values)):
            h, w = (int(x) for x in sizes[i])
            visuals.append({"pixel_values": pixel_values[i][None], "image_sizes": sizes[i].reshape(1, 2)})
            counts.append(twin.count(w, h))
        return stage.embed(visuals, prompts, counts, keys, items)
