"""LLaVA-OneVision (SigLIP, anyres_max_9 crops with newline tokens) inside vLLM with a pre-LLM pruning method:
``VtpruneLlavaOnevisionForConditionalGeneration``. One image or one video per prompt. As
:mod:`integrations.vllm.llava_next`: each image size's count from the checkpoint's geometry twin.

Videos (opt-in, ``limit_mm_per_prompt={"video": 1}``, as on Qwen2.5-VL): vLLM's OneVision video layout is our
engine's (transformers'): every frame resized to the tower's square (vLLM runs the checkpoint's
``LlavaOnevisionVideoProcessor``, our processor's pixels bit for bit: tested), each frame's patch grid pooled 2x2
bilinearly, one ``image_newline`` after the video: ``frames x ceil(g / 2)^2 + 1`` placeholders (vLLM's
``get_num_video_tokens``). A video's count thus depends on its frame count only: the front end counts it on the
geometry twin (:meth:`integrations.vllm.twin.Twin.video_count`, the engine's own video prompt, layout (a unit per
frame, the newline unit -1) and selection) and reserves that many ``<video>`` placeholders; ``embed_multimodal``
runs the engine's vision stage on the video (``pixel_values_videos``) and returns the engine's kept rows (the newline
row included where the method keeps it), checked against the reserved count.
"""

from __future__ import annotations

from vllm.model_executor.models.llava_onevision import (LlavaOnevisionDummyInputsBuilder,
                                                        LlavaOnevisionForConditionalGeneration,
                                                        LlavaOnevisionMultiModalProcessor,
                                                        LlavaOnevisionProcessingInfo)
from vllm.multimodal import MULTIMODAL_REGISTRY

from .common import ModelMixin, ProcessorMixin, TwinCountMixin, VideoCountMixin
from .spec import PluginError
from .twin import twin_for

FAMILY = "llava_onevision"


class VtpruneLlavaOnevisionProcessingInfo(VideoCountMixin, TwinCountMixin, LlavaOnevisionProcessingInfo):
    VIDEOS = True  # one video per prompt (opt-in), pruned per frame as the HF engine prunes it

    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int, **kwargs) -> int:
        """vLLM's count of a video's placeholders: the twin's planned count for its frame count (after checking that
        the twin's unpruned count is vLLM's own)."""
        n = super().get_num_video_tokens(image_width=image_width, image_height=image_height, num_frames=num_frames,
                                         **kwargs)
        spec = self.spec()
        if spec is None or self._vt_stock or not self.videos_asked():  # (vLLM asks for video counts in any case)
            return n
        stock, planned = twin_for(self.model_path(), spec, self.model_revision()).video_count(int(num_frames))
        if stock != n:
            raise RuntimeError(f"vLLM counts {n} tokens for a video of {num_frames} frames of {image_width}x"
                               f"{image_height}, the engine {stock}: unsupported configuration (a video processor "
                               "setting other than the checkpoint's, or another pooling?)")
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
        video = kwargs.get("pixel_values_videos") is not None or kwargs.get("video_embeds") is not None
        if not video:
            return self._embed_sized(kwargs, prompts, keys, items)
        if kwargs.get("pixel_values") is not None or kwargs.get("image_embeds") is not None:
            raise ValueError("the vtprune plugin embeds one modality per call (vLLM groups items by modality)")
        if kwargs.get("pixel_values_videos") is None:
            raise ValueError("the vtprune plugin prunes videos given as pixels (video embeddings cannot be pruned)")
        return self._embed_videos(kwargs["pixel_values_videos"], prompts, keys, items)

    def _embed_videos(self, pixel_values_videos, prompts, keys, items) -> list:
        """Per video (``pixel_values_videos``: (videos, frames, 3, S, S), or a list of (frames, 3, S, S) when the
        frame counts differ), the engine's kept rows, as many as the front end reserved for its frame count."""
        videos = list(pixel_values_videos)
        stage = self._stage(videos[0].device)
        twin = twin_for(self._vt_model[0], self._vt_spec, self._vt_model[1])
        visuals, counts = [], []
        for px in videos:
            if px.dim() != 4:
                raise ValueError(f"a OneVision video's pixels are (frames, 3, S, S), got {tuple(px.shape)}")
            stock, planned = twin.video_count(int(px.shape[0]))
            vc = self.config.vision_config
            side = -(-(vc.image_size // vc.patch_size) // 2)
            if stock != px.shape[0] * side * side + 1:
                raise PluginError(f"the engine lays a video of {px.shape[0]} frames out as {stock} tokens, vLLM as "
                                  f"{px.shape[0] * side * side + 1}")
            visuals.append({"pixel_values_videos": px[None]})
            counts.append((stock, planned))
        return stage.embed(visuals, prompts, counts, keys, items, self.config.video_token_index)
