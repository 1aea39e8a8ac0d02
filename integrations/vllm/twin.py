"""Each image's token count after pruning, in vLLM's front end, for families whose count depends on the image
(LLaVA-NeXT's anyres crops and newline tokens): a *geometry twin* of the checkpoint runs our engine's vision stage.

The twin is the checkpoint's architecture with its geometry (image size, patch, crop grid pinpoints, select layer,
strategy, the layer counts, the number of heads) and its own tokenizer and image processor, but widths of 8 per
head and random weights: the engine lays the image out exactly as it will in the worker (the adapter's packing,
the units, the newline tokens, the prompt's question), and the method's vision stage selects on it, so the count
is the count the worker's selection gives, whatever the family. Two images of the requested size with other
pixels must give the same count (else the method's count depends on the image: refused). Counts are cached per
image size; a twin is built once per (checkpoint, revision, spec) and costs a few MB. Its config, tokenizer and
image processor are read at the checkpoint's revision (vLLM's ``revision``; None: the default branch).

Videos (:data:`VIDEO_KEYS`): a video's count depends on its *key* only (:meth:`Twin.video_key`): on Qwen2.5-VL and
Qwen3-VL its patch grid (t temporal slices of h x w patches, what vLLM's processor made of its frames and size), on
LLaVA-OneVision its frame count (every frame is resized to the tower's square, pooled 2x2, one newline after the
video). :meth:`Twin.video_count` runs the twin's own processor (the engine's video prompt) on random frames of exactly
that size (not resized) and the engine's layout (a unit per temporal slice / frame) and selection on them, cached per
key; :meth:`Twin.video_slices` gives the count of each placeholder run (Qwen3-VL: one run per temporal slice, after its
timestamp), whose split must not depend on the video either (checked on the first key of several slices; else every
video is refused with the reason).
"""

from __future__ import annotations

import copy
import dataclasses
from functools import lru_cache

import torch

from .spec import PluginError, PruneSpec, check_method, revision_key

#: the question of the twin's prompts (a query-aware method reads it; the count does not depend on it)
QUESTION = "what is in the image?"
#: per-head widths of the twin: vision 8 with ONE head (the tower's attention over each crop's ~600 tokens is most
#: of a count's cost; a method's count does not depend on the number of heads); text 16 per head (M-RoPE splits a
#: head's rotary half into 3 sections)
HEAD_WIDTH = {"vision": 8, "text": 16}
#: the families whose videos the plugin prunes inside vLLM (their count per video key: :meth:`Twin.video_count`):
#: family -> what a video's count depends on
VIDEO_KEYS = {"qwen2_5_vl": "its patch grid (t, h, w)", "qwen3_vl": "its patch grid (t, h, w)",
              "llava_onevision": "its frame count (frames,)"}
#: the families whose videos the harness's vLLM backend (``eval.vllm_backend``) answers (a video's count keyed by
#: :meth:`Twin.video_key` on our processor's output)
VIDEO_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava_onevision")


def _sections(sections, total: int) -> list[int]:
    """M-RoPE sections scaled to sum to ``total`` (integers, the remainder on the largest)."""
    s = sum(sections)
    out = [max(1, int(x * total // s)) for x in sections]
    out[out.index(max(out))] += total - sum(out)
    return out


def shrink(config) -> None:
    """Per-head widths of :data:`HEAD_WIDTH` in the text and vision configs (heads, layers and geometry kept)."""
    for kind, sub in (("text", config.text_config), ("vision", config.vision_config)):
        width = HEAD_WIDTH[kind]
        if kind == "vision":
            for attr in ("num_attention_heads", "num_heads"):
                if getattr(sub, attr, None) is not None:
                    setattr(sub, attr, 1)
        heads = getattr(sub, "num_attention_heads", None) or getattr(sub, "num_heads")
        if getattr(sub, "head_dim", None) is not None:
            sub.head_dim = width
        sub.hidden_size = heads * width
        if hasattr(sub, "intermediate_size"):
            sub.intermediate_size = 2 * width
        if hasattr(sub, "projection_dim"):
            sub.projection_dim = heads * width
        for attr in ("rope_parameters", "rope_scaling"):
            rope = getattr(sub, attr, None)
            if isinstance(rope, dict) and rope.get("mrope_section"):
                rope["mrope_section"] = _sections(rope["mrope_section"], width // 2)
    if hasattr(config.vision_config, "out_hidden_size"):  # the Qwen merger's output is the LLM's width
        config.vision_config.out_hidden_size = config.text_config.hidden_size


class Twin:
    def __init__(self, model: str, spec: PruneSpec, revision: str | None = None):
        import transformers as tf

        from llava.families import registry
        from llava.models import _runtime, checkpoint_processors, family_of, restore_decoder, truncate_decoder

        config = tf.AutoConfig.from_pretrained(model, revision=revision)
        self.revision = revision
        self.family = family_of(config)
        config = copy.deepcopy(config)
        shrink(config)
        method = spec.build()
        probe = tuple(method.probe_layers)
        n = max(probe) + 1 if probe else 0
        kept = truncate_decoder(config, n)
        torch.manual_seed(0)
        m = registry.get(self.family).model_cls()(config).eval()
        restore_decoder(m, n, *kept)
        tok, ip = checkpoint_processors(model, self.family, revision=revision)
        self.rt = _runtime(m, tok, ip, self.family, model, spec.template)
        self.rt.processor.pad_to_square = False  # vLLM's processor: the image as given
        try:
            self.engine = self.rt.prune(method)
        except (ValueError, TypeError) as e:
            raise PluginError(str(e.args[0] if e.args else e)) from None
        check_method(self.engine.method, self.family)
        self.image_token = int(m.config.image_token_id)
        self.video_token = getattr(m.config, "video_token_id", None)
        self._checked = self._checked_video = False
        self._video_refusal = ""  # why every video is refused, once the first key's two counts differed

    @torch.inference_mode()
    def _count(self, width: int, height: int, seed: int) -> tuple[int, int]:
        from PIL import Image

        g = torch.Generator().manual_seed(seed)
        img = Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).byte().numpy())
        enc = self.rt.processor([QUESTION], images=[img])
        ids = enc["input_ids"]
        stock = int((ids == self.image_token).sum())
        visual = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        embeds, _, _, _ = self.engine.vision_inputs(ids, visual, enc.get("attention_mask"))
        return stock, int(embeds.shape[1] - (ids.shape[1] - stock))

    @torch.inference_mode()
    def _video_count(self, key: tuple, seed: int) -> tuple[int, int, tuple]:
        from PIL import Image

        proc = self.rt.processor
        settings = proc.video_settings = self._video_settings()
        g = torch.Generator().manual_seed(seed)
        if self.family == "llava_onevision":  # (frames,): frames of the tower's square (not resampled)
            n, h, w = key[0], settings.height, settings.width
        else:  # (t, h, w): t temporal slices of frames of exactly the grid's size
            t, gh, gw = key
            p = settings.patch_size
            n, h, w = t * settings.temporal_patch_size, gh * p, gw * p
        frames = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]
        enc = proc([QUESTION], videos=[frames])
        if self.video_key(enc) != key:
            raise RuntimeError(f"the twin's video of key {list(key)} was processed to {list(self.video_key(enc))}")
        ids = enc["input_ids"]
        stock = int((ids == self.video_token).sum())
        visual = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        embeds, _, _, info = self.engine.vision_inputs(ids, visual, enc.get("attention_mask"))
        _, runs = self.engine.visual_runs(ids, info, enc.get("attention_mask"))[0]
        planned = int(embeds.shape[1] - (ids.shape[1] - stock))
        if sum(runs) != planned:
            raise RuntimeError(f"{sum(runs)} visual rows in the pruned prompt's runs, {planned} in all")
        return stock, planned, tuple(runs)

    def _video_settings(self):
        """The twin's video processing: frames of exactly the key's size, not resized (Qwen: the grid is what the
        serving processor made of the video; OneVision: the tower's square, what every frame is resized to; the count
        depends on nothing else)."""
        vc = self.rt.model.config.vision_config
        if self.family == "llava_onevision":
            from llava.preprocess_ov_internvl_video import FrameVideoSettings, tower_square

            h, w = tower_square(self.family, self.rt.model.config)
            return FrameVideoSettings(family=self.family, height=h, width=w,
                                      source="the vtprune geometry twin: frames of the tower's square")
        from llava.preprocess_qwen_video import VideoSettings, video_rule

        return VideoSettings(rule=video_rule(self.family), min_pixels=1, max_pixels=1 << 62, patch_size=vc.patch_size,
                             temporal_patch_size=vc.temporal_patch_size, merge_size=vc.spatial_merge_size,
                             do_resize=False, source="the vtprune geometry twin: frames of the grid's size")

    def video_key(self, enc) -> tuple:
        """What a video's count depends on, from our processor's output for one video (``enc``: the engine's inputs,
        batch of 1): Qwen2.5-VL its patch grid (t, h, w) (``video_grid_thw``), OneVision its frame count (frames,)
        (``pixel_values_videos`` (1, frames, 3, S, S))."""
        self._check_videos()
        if self.family == "llava_onevision":
            return (int(enc["pixel_values_videos"].shape[1]),)
        return tuple(int(x) for x in enc["video_grid_thw"].reshape(-1, 3)[0])

    def _check_videos(self) -> None:
        if self.family not in VIDEO_KEYS:
            raise PluginError(f"the vtprune plugin prunes {self.family} videos on the HF engine only (vLLM: "
                              f"{', '.join(VIDEO_KEYS)} videos)")

    def video_count(self, *key: int) -> tuple[int, int]:
        """(the tokens of a video unpruned, after the method's vision stage) for its key: Qwen2.5-VL / Qwen3-VL
        ``video_count(t, h, w)`` (its patch grid), LLaVA-OneVision ``video_count(frames)`` (its frame count;
        :meth:`video_key`). The engine's own video prompt (our processor) and layout (a unit per temporal slice /
        frame; OneVision's newline after the video) on frames of that key's size. Checked as :meth:`count` (the
        first key twice)."""
        return self._video(*key)[:2]

    def video_slices(self, *key: int) -> tuple[int, ...]:
        """The tokens after the method's vision stage in each placeholder run of a video of this key, in order:
        on Qwen3-VL one per temporal slice (each slice is its own ``<|vision_start|>`` ... ``<|vision_end|>`` run
        after its timestamp; a slice the method empties keeps its markers and holds 0), one run elsewhere. Checked
        as :meth:`video_count`: a method whose split over the slices depends on the video is refused."""
        return self._video(*key)[2]

    @lru_cache(maxsize=4096)
    def _video(self, *key: int) -> tuple[int, int, tuple]:
        self._check_videos()
        key = tuple(int(x) for x in key)
        want = 1 if self.family == "llava_onevision" else 3
        if len(key) != want or min(key) < 1:
            raise PluginError(f"a {self.family} video's count is keyed by {VIDEO_KEYS[self.family]}, got {list(key)}")
        what = f"{key[0]} frames" if want == 1 else f"grid {list(key)}"
        if self._video_refusal:  # the method's count or split varied on the first key: every key is refused
            raise PluginError(self._video_refusal)
        try:
            a = self._video_count(key, 0)
            b = self._video_count(key, 1) if not self._checked_video else a
            # checked on the first key, on Qwen3-VL the first of several slices (a split over one slice cannot vary)
            self._checked_video = self._checked_video or self.family != "qwen3_vl" or key[0] > 1
        except PluginError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure is the method's refusal here
            raise PluginError(f"{self.engine.method.name}: vLLM must know each video's token count before the encoder "
                              f"runs, and the count for a video of {what} failed ({type(e).__name__}: {e})") from None
        if a[:2] != b[:2]:
            self._video_refusal = (f"{self.engine.method.name} keeps a number of tokens that depends on the video "
                                   f"({a[1]} vs {b[1]} for two videos of {what}), and vLLM must know it before the "
                                   "encoder runs")
        elif a[2] != b[2]:
            self._video_refusal = (f"{self.engine.method.name} splits its tokens over a video's temporal slices "
                                   f"depending on the video ({list(a[2])} vs {list(b[2])} for two videos of {what}), "
                                   "and vLLM lays each slice's run out before the encoder runs (Qwen3-VL: a timestamp "
                                   "and a run per slice)")
        if self._video_refusal:
            raise PluginError(self._video_refusal)
        if a[1] == 0:
            raise PluginError(f"{self.engine.method.name} keeps no visual token, and vLLM needs at least one placeholder "
                              "per video: for the no-video control, send the prompt without its video")
        return a

    @lru_cache(maxsize=4096)
    def count(self, width: int, height: int) -> tuple[int, int]:
        """(the tokens of an image of this size unpruned, after the method's vision stage). The first size a twin
        counts is counted twice, on other pixels (a method whose count depends on the values is refused); later
        sizes once."""
        try:
            a = self._count(width, height, 0)
            b = self._count(width, height, 1) if not self._checked else a
            self._checked = True
        except PluginError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure is the method's refusal here
            raise PluginError(f"{self.engine.method.name}: vLLM must know each image's token count before the encoder "
                              f"runs, and the count for a {width}x{height} image failed ({type(e).__name__}: {e})") from None
        if a != b:
            raise PluginError(f"{self.engine.method.name} keeps a number of tokens that depends on the image ({a[1]} vs "
                              f"{b[1]} for two {width}x{height} images), and vLLM must know it before the encoder runs")
        if a[1] == 0:
            raise PluginError(f"{self.engine.method.name} keeps no visual token, and vLLM needs at least one placeholder "
                              "per image: for the no-image control, send the prompt without its image")
        return a


def twin_for(model: str, spec: PruneSpec, revision: str | None = None) -> Twin:
    """The twin of ``model`` at ``revision`` for ``spec`` (cached; the spec's own revision, a check, is not part of
    the key)."""
    return _twin(model, dataclasses.replace(spec, revision=None), revision, revision_key(revision))


@lru_cache(maxsize=16)
def _twin(model: str, spec: PruneSpec, revision: str | None, key: tuple) -> Twin:
    return Twin(model, spec, revision)  # the revision as vLLM resolved it (a branch pinned to its commit)
