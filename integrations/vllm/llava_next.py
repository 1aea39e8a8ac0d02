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

from .common import InfoMixin, ModelMixin, ProcessorMixin
from .twin import twin_for

FAMILY = "llava_next"


class VtpruneLlavaNextProcessingInfo(InfoMixin, LlavaNextProcessingInfo):
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
