"""The Qwen-VL families inside vLLM with a pre-LLM pruning method: ``VtpruneQwen2_5_VLForConditionalGeneration``,
``VtpruneQwen3VLForConditionalGeneration`` (mixins over vLLM's classes; Qwen3-VL's DeepStack rows follow each kept
token in vLLM's multiscale layout: [token, level 0, level 1, ...]).

As the LLaVA families, plus M-RoPE: a kept token keeps its 3-D position of the unpruned image and the text after
the image keeps its unpruned positions (our engine's convention). vLLM computes a request's M-RoPE positions when
the request is admitted (``get_mrope_input_positions``, in the worker, with the request's processed image), before
the encoder step; which tokens are kept is then not known yet, so the override runs the vision stage there and
returns the positions the engine gives the pruned prompt (``engine.vision_inputs``), with vLLM's position delta
for decoding (the last prompt position + 1 - prompt length: transformers' generate() decodes after the prompt's last
position, which a video's time axis can pass); the embeddings wait for the image's encoder step under the
processed image's identity (``stage.ITEM_FIELD``), so the vision stage runs once per image. Each
image's count (it depends on the image's resized grid) comes from the checkpoint's geometry twin.

Videos (opt-in, ``limit_mm_per_prompt={"video": 1}``) take the same path, a temporal slice of 2 frames a unit.
Qwen2.5-VL: one run of the twin's count for the video's grid. Qwen3-VL lays a video out as our processor and
transformers 5 do: inside the template's ``<|vision_start|>`` ... ``<|vision_end|>``, per temporal slice its time
``<t seconds>`` (vLLM's ``timestamps``, computed from the item's frame indices and fps: our processor's slice times,
24 fps where the fps is unknown) then its own ``<|vision_start|>`` + the engine's count for that slice +
``<|vision_end|>`` (:meth:`integrations.vllm.twin.Twin.video_slices`; a slice the method empties keeps its text and
markers); the embeddings go to the ``<|video_pad|>`` tokens only, all slices' kept rows (+ DeepStack rows) in order,
and the worker checks at admission that the engine's pruned prompt is vLLM's, token for token.
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
from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

from .common import ModelMixin, ProcessorMixin, TwinCountMixin, VideoCountMixin
from .spec import PluginError, PruneSpec
from .stage import ITEM_FIELD, KEY_FIELD, PROMPT_FIELD, decode_key, item_key
from .twin import VIDEO_KEYS, twin_for


def grid_count(model: str, spec: PruneSpec, config, grid, revision: str | None = None) -> tuple[int, int]:
    """(tokens unpruned, planned) of an image whose patch grid is ``grid`` (t, h, w): the twin's count (the checkpoint
    at ``revision``) for an image of exactly that many patches (smart resize leaves it unchanged)."""
    patch = config.vision_config.patch_size
    _, h, w = (int(x) for x in grid)
    return twin_for(model, spec, revision).count(w * patch, h * patch)


def video_grid(config, grid) -> tuple[int, int, int]:
    """A video's (t, h, w) patch grid as ints, checked against the tower's merge."""
    t, h, w = (int(x) for x in (grid.reshape(-1).tolist() if torch.is_tensor(grid) else grid))
    merge = config.vision_config.spatial_merge_size
    if h % merge or w % merge:
        raise ValueError(f"a video grid of {h} x {w} patches is not a multiple of the merge size {merge}")
    return t, h, w


class QwenInfoMixin(VideoCountMixin, TwinCountMixin):
    """As :class:`TwinCountMixin`, and each video's count (its grid: frames x resized size) from the twin on the
    families of :data:`integrations.vllm.twin.VIDEO_KEYS` (``VIDEOS``), when videos are asked for
    (``limit_mm_per_prompt={"video": 1}``)."""

    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int, image_processor,
                             mm_kwargs, **kwargs) -> int:
        n = super().get_num_video_tokens(image_width=image_width, image_height=image_height, num_frames=num_frames,
                                         image_processor=image_processor, mm_kwargs=mm_kwargs, **kwargs)
        spec = self.spec()
        if spec is None or self._vt_stock or not self.videos_asked():  # (vLLM asks for video counts in any case)
            return n
        size, _ = self._get_vision_info(image_width=image_width, image_height=image_height, num_frames=num_frames,
                                        image_processor=image_processor, mm_kwargs=mm_kwargs, modality="video")
        vc = self.get_hf_config().vision_config
        slices = max(-(-num_frames // vc.temporal_patch_size), 1)  # an odd frame count padded to a whole slice
        grid = (slices, size.height // vc.patch_size, size.width // vc.patch_size)
        stock, planned = twin_for(self.model_path(), spec, self.model_revision()).video_count(*grid)
        if stock != n:
            raise RuntimeError(f"vLLM counts {n} tokens for a video of {num_frames} frames of {image_width}x"
                               f"{image_height}, the engine {stock}: unsupported configuration")
        return planned


class QwenProcessorMixin(ProcessorMixin):
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        spec = self.info.spec()
        if spec is None:
            return updates
        config = self.info.get_hf_config()
        token, video_token = config.image_token_id, config.video_token_id
        twin = twin_for(self.info.model_path(), spec, self.info.model_revision())

        def replacement(item_idx: int):
            size = mm_items.get_items("image", ImageProcessorItems).get_image_size(item_idx)
            return [token] * twin.count(int(size.width), int(size.height))[1]

        def video_replacement(item_idx: int):  # the video's grid as vLLM's processor (transformers') made it
            item = out_mm_kwargs["video"][item_idx]
            t, h, w = video_grid(config, item["video_grid_thw"].data)
            stock, planned = twin.video_count(t, h, w)
            if stock != t * h * w // config.vision_config.spatial_merge_size ** 2:
                raise RuntimeError(f"the engine lays a video of grid {[t, h, w]} out as {stock} tokens, vLLM as "
                                   f"{t * h * w // config.vision_config.spatial_merge_size ** 2}")
            return self._vt_video_replacement(item, (t, h, w), planned, twin)

        image = PromptReplacement(modality="image", target=[token], replacement=replacement)
        if not self.info.videos_asked():
            return [image] + [u for u in updates if u.modality != "image"]
        video = PromptReplacement(modality="video", target=[video_token], replacement=video_replacement)
        return [image, video] + [u for u in updates if u.modality not in ("image", "video")]

    def _vt_video_replacement(self, item, grid: tuple, planned: int, twin):
        """A video's placeholder run in vLLM's prompt (``item``: its processed fields): Qwen2.5-VL one run of the
        planned count (the template's vision markers around it)."""
        return [self.info.get_hf_config().video_token_id] * planned


class QwenModelMixin(ModelMixin):
    #: the processor normalises the pixels (vLLM's default for Qwen moves it into the tower's fused input norm,
    #: handing the model raw uint8 pixels; the engine's vision stage reads normalised ones, as transformers' tower)
    supports_mm_device_do_normalize = False

    def _stage_device(self):
        return next(self.language_model.parameters()).device

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self._vt_spec is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        items = [f for f in mm_features if f.modality in ("image", "video")]
        if not items:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        if len(items) > 1 or len(items) != len(mm_features):
            raise ValueError("the vtprune plugin serves one image or one video per prompt")
        feature = items[0]
        data = feature.data
        field = data.get(PROMPT_FIELD)
        prompt = [] if field is None else [int(t) for t in field.data.reshape(-1).tolist() if int(t) >= 0]
        if not prompt:  # vLLM's profiling run: plain positions of the right length
            n = len(input_tokens)
            return torch.from_numpy(np.broadcast_to(np.arange(n), (3, n)).copy()), 0
        key_field = data.get(KEY_FIELD)
        key = None if key_field is None else decode_key(key_field.data)
        stage = self._stage(self._stage_device())
        dev = self._stage_device()
        visual, tokens, token = self._vt_visual(data, feature.modality, dev)
        embeds, pos, pruned = stage.run_one(visual, prompt, tokens, key, token)
        item = data.get(ITEM_FIELD)
        stage.keep(None if item is None else item_key(item.data), embeds)  # for this item's encoder step
        # decoding continues after the prompt's last position on all three axes (transformers' generate(), so the HF
        # engine): not after the largest one, which a video's time axis can pass (vLLM's own Qwen rule)
        delta = int(pos[:, -1].max()) + 1 - len(input_tokens)
        record = os.environ.get("VTPRUNE_VLLM_RECORD")
        if record:  # the tests' window on the worker: the positions vLLM's decoder will use
            with open(record, "a", encoding="utf-8") as f:
                stamps = data.get("timestamps")  # Qwen3-VL videos: vLLM's slice times (the prompt's <t seconds>)
                f.write(json.dumps({"prompt": prompt, "positions": pos.tolist(), "modality": feature.modality,
                                    "delta": delta, "tokens": [int(t) for t in input_tokens],
                                    "timestamps": None if stamps is None else
                                    [float(x) for x in (stamps.data.tolist() if torch.is_tensor(stamps.data)
                                                        else stamps.data)]}) + "\n")
        if pos.shape[1] != len(input_tokens) or pruned != [int(t) for t in input_tokens]:
            raise RuntimeError(f"the engine's pruned prompt ({pos.shape[1]} tokens) is not vLLM's ({len(input_tokens)}"
                               " tokens): the planned layout (the count per placeholder run) and the selection "
                               "disagree, or the video's timestamps differ")
        return pos, delta

    def _vt_visual(self, data, modality: str, dev) -> tuple[dict, int, int]:
        """(the engine's visual inputs of one processed item (batch dimension 1), its tokens unpruned, its
        placeholder) from vLLM's fields of it."""
        merge = self.config.vision_config.spatial_merge_size
        if modality == "image":
            grid = data["image_grid_thw"].data.reshape(-1)
            return ({"pixel_values": data["pixel_values"].data.to(dev), "image_grid_thw": grid.reshape(1, 3).to(dev)},
                    int(grid.prod()) // merge ** 2, self.config.image_token_id)
        self._vt_check_videos()
        t, h, w = video_grid(self.config, data["video_grid_thw"].data)
        visual = {"pixel_values_videos": data["pixel_values_videos"].data.to(dev),
                  "video_grid_thw": torch.tensor([[t, h, w]], dtype=torch.long, device=dev)}
        secs = data.get("second_per_grid_ts")
        if secs is not None:  # the M-RoPE time axis (Qwen2.5-VL), float32 as the HF processor hands it
            visual["second_per_grid_ts"] = torch.as_tensor(secs.data, dtype=torch.float32).reshape(1).to(dev)
        stamps = data.get("timestamps")
        return (visual, self._vt_video_tokens((t, h, w), None if stamps is None else stamps.data),
                self.config.video_token_id)

    def _vt_video_tokens(self, grid: tuple, timestamps):
        """What a video's placeholder expands to in the engine's prompt: Qwen2.5-VL its t*h*w/4 tokens (a count)."""
        t, h, w = grid
        return t * h * w // self.config.vision_config.spatial_merge_size ** 2

    def _vt_check_videos(self) -> None:
        if self.FAMILY not in VIDEO_KEYS:
            raise PluginError(f"the vtprune plugin prunes {self.FAMILY} images inside vLLM; its videos run on the HF "
                              f"engine (vLLM: {', '.join(VIDEO_KEYS)} videos)")

    def embed_multimodal(self, **kwargs):
        prompts, keys, items = self._vt_fields(kwargs)
        if self._vt_spec is None:
            return super().embed_multimodal(**kwargs)
        video = kwargs.get("pixel_values_videos") is not None or kwargs.get("video_embeds") is not None
        if video and (kwargs.get("pixel_values") is not None or kwargs.get("image_embeds") is not None):
            raise ValueError("the vtprune plugin embeds one modality per call (vLLM groups items by modality)")
        if video:
            self._vt_check_videos()
            if kwargs.get("pixel_values_videos") is None:
                raise ValueError("the vtprune plugin prunes videos given as pixels (video_embeds cannot be pruned)")
            pixel_values, grids = kwargs["pixel_values_videos"], kwargs["video_grid_thw"]
            px_key, grid_key, token = "pixel_values_videos", "video_grid_thw", self.config.video_token_id
        else:
            pixel_values, grids = self._pixels(kwargs), kwargs["image_grid_thw"]
            px_key, grid_key, token = "pixel_values", "image_grid_thw", self.config.image_token_id
        grids = grids.reshape(-1, 3) if torch.is_tensor(grids) else torch.stack([g.reshape(3) for g in grids])
        sizes = [int(g.prod()) for g in grids]
        flat = torch.cat(list(pixel_values)) if isinstance(pixel_values, (list, tuple)) else pixel_values
        parts = flat.split(sizes)
        secs = kwargs.get("second_per_grid_ts") if video else None
        if secs is not None:
            secs = [torch.as_tensor(x, dtype=torch.float32).reshape(1) for x in
                    (secs.reshape(-1) if torch.is_tensor(secs) else secs)]
        stamps = kwargs.get("timestamps") if video else None  # Qwen3-VL: each video's slice times (seconds)
        stage = self._stage(flat.device)
        twin = twin_for(self._vt_model[0], self._vt_spec, self._vt_model[1])
        visuals, counts = [], []
        for i, (px, g) in enumerate(zip(parts, grids)):
            visual = {px_key: px, grid_key: g.reshape(1, 3).to(flat.device)}
            if video:
                if secs is not None:
                    visual["second_per_grid_ts"] = secs[i].to(flat.device)
                grid = video_grid(self.config, g)
                counts.append((self._vt_video_tokens(grid, None if stamps is None else stamps[i]),
                               twin.video_count(*grid)[1]))
            else:
                counts.append(grid_count(self._vt_model[0], self._vt_spec, self.config, g, self._vt_model[1]))
            visuals.append(visual)
        return stage.embed(visuals, prompts, counts, keys, items, token)


class VtpruneQwen2_5_VLProcessingInfo(QwenInfoMixin, Qwen2_5_VLProcessingInfo):
    VIDEOS = True  # one video per prompt, pruned per temporal slice as the HF engine prunes it


class VtpruneQwen2_5_VLMultiModalProcessor(QwenProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(VtpruneQwen2_5_VLMultiModalProcessor, info=VtpruneQwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class VtpruneQwen2_5_VLForConditionalGeneration(QwenModelMixin, Qwen2_5_VLForConditionalGeneration):
    FAMILY = "qwen2_5_vl"

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vt_init(vllm_config)


def slice_run(tokenizer, config, times, counts) -> list[int]:
    """Qwen3-VL's video layout, our processor's (:mod:`llava.preprocess_qwen_video`, transformers 5's): per temporal
    slice its time ``<{t:.1f} seconds>`` (tokenised alone) + ``<|vision_start|>`` + ``counts[i]`` ``<|video_pad|>``
    + ``<|vision_end|>``, all inside the template's own vision markers (not part of the run)."""
    run = []
    for t, n in zip(times, counts, strict=True):
        run += tokenizer(f"<{t:.1f} seconds>", add_special_tokens=False).input_ids
        run += [config.vision_start_token_id] + [config.video_token_id] * int(n) + [config.vision_end_token_id]
    return run


def slice_times(stamps, t: int) -> list[float]:
    """A Qwen3-VL video's slice times (vLLM's ``timestamps`` field) as floats, checked against its t slices."""
    times = [float(x) for x in (stamps.reshape(-1).tolist() if torch.is_tensor(stamps) else stamps)]
    if len(times) != t:
        raise ValueError(f"{len(times)} timestamps for a video of {t} temporal slices")
    return times


class VtpruneQwen3VLProcessingInfo(QwenInfoMixin, Qwen3VLProcessingInfo):
    VIDEOS = True  # one video per prompt (opt-in), pruned per temporal slice as the HF engine prunes it

    def _get_video_second_idx(self, metadata, do_sample_frames=None, sampled_fps=None, sampled_num_frames=None):
        """vLLM's slice times (the prompt's ``<t seconds>``): for a video of unknown fps, transformers' and our
        processor's default (24 fps; vLLM's own rule divides the frame indices by None)."""
        if self.spec() is not None and metadata["fps"] is None:
            from llava.preprocess_qwen_video import VideoSettings

            metadata = {**{k: metadata[k] for k in metadata}, "fps": VideoSettings.default_fps}
        return super()._get_video_second_idx(metadata, do_sample_frames=do_sample_frames, sampled_fps=sampled_fps,
                                             sampled_num_frames=sampled_num_frames)


class VtpruneQwen3VLMultiModalProcessor(QwenProcessorMixin, Qwen3VLMultiModalProcessor):
    def _vt_video_replacement(self, item, grid: tuple, planned: int, twin):
        """Qwen3-VL: per temporal slice its timestamp (vLLM's, == our processor's) and a run of the engine's count for
        that slice (:meth:`integrations.vllm.twin.Twin.video_slices`), the video's embeddings at the ``<|video_pad|>``
        tokens only (the timestamps and markers are text)."""
        if self.info.ctx.get_mm_config().get_video_pruning_spec() is not None:
            raise PluginError("vLLM's own video pruning (video_pruning_rate: EVS / VidCom2) and the vtprune plugin "
                              "both prune the video's tokens: run one of them")
        if not self._expands_only_video_token(self.info.get_hf_processor()):
            raise PluginError("this transformers' Qwen3-VL processor expands <|vision_start|><|video_pad|>"
                              "<|vision_end|> whole (transformers < 5.10), the engine's layout (transformers 5's) "
                              "keeps the template's vision markers around the slices: use transformers >= 5.10 in "
                              "vLLM's environment")
        slices = twin.video_slices(*grid)
        times = slice_times(item["timestamps"].data, grid[0])
        if len(slices) != grid[0] or sum(slices) != planned:
            raise RuntimeError(f"the engine keeps {list(slices)} tokens over the {grid[0]} slices of a video, "
                               f"{planned} in all")
        run = slice_run(twin.rt.tokenizer, self.info.get_hf_config(), times, slices)
        return PromptUpdateDetails.select_token_id(run, self.info.get_hf_config().video_token_id)


@MULTIMODAL_REGISTRY.register_processor(VtpruneQwen3VLMultiModalProcessor, info=VtpruneQwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class VtpruneQwen3VLForConditionalGeneration(QwenModelMixin, Qwen3VLForConditionalGeneration):
    FAMILY = "qwen3_vl"

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vt_init(vllm_config)
        if self._vt_spec is not None and vllm_config.model_config.multimodal_config.get_video_pruning_spec():
            raise PluginError("vLLM's own video pruning (video_pruning_rate: EVS / VidCom2) and the vtprune plugin "
                              "both prune the video's tokens: run one of them")

    def _vt_video_tokens(self, grid: tuple, timestamps):
        """Qwen3-VL: the ids a video's placeholder expands to in the engine's prompt (our processor's layout, the
        checkpoint's tokenizer): every slice's timestamp (vLLM's ``timestamps`` field) and its h*w/4 tokens."""
        if timestamps is None:
            raise ValueError("a Qwen3-VL video comes with its slice times (vLLM's timestamps field)")
        t, h, w = grid
        per = h * w // self.config.vision_config.spatial_merge_size ** 2
        return slice_run(self._vt_stage.rt.tokenizer, self.config, slice_times(timestamps, t), [per] * t)
