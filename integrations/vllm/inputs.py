"""vLLM requests holding what our HF engine is given (no vLLM import: the harness and the tests build them).

- :func:`collapse`: the prompt ids our processor expands (an image's or a video's placeholder run; a Qwen3-VL video's
  timestamps and marked runs, one per temporal slice) with the run collapsed to one placeholder, which vLLM's
  processor expands to the planned count (per slice on Qwen3-VL);
- :func:`video_data`: a video (a list of RGB frames, a :class:`llava.preprocess_qwen_video.Frames` with its
  timing) as vLLM's ``multi_modal_data["video"]`` item: the frames as given (vLLM's processor, transformers' video
  processor, resizes and patches them exactly as :mod:`llava.preprocess_qwen_video` does: tested) and the timing
  our processor reads (:func:`llava.preprocess_qwen_video.timing`), so that ``second_per_grid_ts`` (Qwen2.5-VL's
  M-RoPE time axis) and the slice times (Qwen3-VL's ``<t seconds>`` texts, which vLLM computes from the indices and
  the fps; the plugin takes 24 fps where the fps is unknown, as our processor and transformers do) are the same;
  frames are never re-sampled (``do_sample_frames`` False). LLaVA-OneVision takes the
  same item: vLLM's parser drops the metadata there and its processor (transformers' ``LlavaOnevisionVideoProcessor``)
  resizes each frame to the tower's square as :mod:`llava.preprocess_ov_internvl_video` does (tested).
"""

from __future__ import annotations


def collapse(ids: list[int], token: int, markers: tuple[int, int] | None = None) -> list[int]:
    """``ids`` with the (one) run of ``token`` collapsed to one ``token``. ``markers`` (vision start, vision end
    ids): a Qwen3-VL video, which our processor expands to a timestamp and a marked run per temporal slice inside
    the template's own ``<|vision_start|>`` ... ``<|vision_end|>``: all of it collapsed to one ``token`` between
    those two (the prompt vLLM's Qwen3-VL processor expands)."""
    ids = [int(t) for t in ids]
    if token not in ids:
        raise ValueError(f"the prompt holds no placeholder {token}")
    first = ids.index(token)
    n = sum(1 for t in ids if t == token)
    if markers is not None:
        start, end = (int(m) for m in markers)
        last = len(ids) - 1 - ids[::-1].index(token)
        outer = max((i for i in range(first - 1) if ids[i] == start), default=-1)  # before the first slice's own
        if first < 1 or ids[first - 1] != start or outer < 0 or ids[last + 1:last + 3] != [end, end]:
            raise ValueError(f"the prompt's placeholders {token} are not one video's marked slices (<|vision_start|> "
                             "timestamp <|vision_start|> tokens <|vision_end|> ... <|vision_end|>)")
        return ids[:outer + 1] + [token] + ids[last + 2:]
    if ids[first:first + n] != [token] * n:
        raise ValueError(f"the prompt's placeholders {token} are not one run (one image or one video per prompt)")
    return ids[:first] + [token] + ids[first + n:]


def video_data(video, num_frames: int = 8) -> tuple:
    """``(frames (T, H, W, 3) uint8, metadata)``: a vLLM video item (Qwen2.5-VL's processor needs the metadata;
    OneVision's reads the frames only) of ``video`` as our processor reads it (:func:`llava.preprocess.load_frames`:
    frames kept as given, RGB; a frame folder or a video file: ``num_frames`` sampled)."""
    from llava.preprocess import load_frames
    from llava.preprocess_qwen_video import frames_array, timing

    frames = load_frames(video, num_frames)
    arr = frames_array(frames)
    n = int(arr.shape[0])
    indices, fps, total = timing(frames, n)
    if indices is None:  # the frames as consecutive, as our processor's Qwen3-VL slice times take them (Qwen2.5-VL's
        indices, total = range(n), n  # rate, n / n * fps or 24, is unchanged)
    meta = {"total_num_frames": int(total) if total is not None else n, "fps": fps,
            "frames_indices": [int(i) for i in indices], "duration": None,
            "width": int(arr.shape[2]), "height": int(arr.shape[1]), "video_backend": "vtprune",
            "do_sample_frames": False}
    return arr, meta
