"""Video files and frame sampling for the processors: a video file decoded to a :class:`Frames` (GIF with PIL, else
decord or PyAV) and Video-LLaVA's uniform sampling over frames, a frame folder or a file. File reading, kept apart
from the prompt and pixel building of :mod:`llava.preprocess` (which re-exports these names)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .preprocess_qwen_video import Frames


VIDEO_FILE_FORMATS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def decode_video(path: "str | os.PathLike", num_frames: int) -> list:
    """``num_frames`` frames of a video file as PIL images (a :class:`Frames`: with the source's fps, frame count and
    the indices taken), sampled as Video-LLaVA does
    (``np.linspace(0, n - 1, num_frames, dtype=int)`` over the decoded frames). A GIF is read with PIL;
    other files with ``decord`` (Video-LLaVA's reader) when installed, else PyAV (``pip install av``,
    the ``video`` extra). Only the sampled frames are converted to images (long ActivityNet videos
    would not fit in memory as thousands of PIL images); the frame count comes from the container, or
    from one decoding pass when the container does not store it."""
    from PIL import ImageSequence

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"video file not found: {path}")
    if path.lower().endswith(".gif"):
        with Image.open(path) as im:
            frames, ms = zip(*[(f.convert("RGB"), f.info.get("duration") or 0) for f in ImageSequence.Iterator(im)])
        idx = np.linspace(0, len(frames) - 1, num_frames, dtype=int)
        return Frames([frames[i] for i in idx], 1000 * len(ms) / sum(ms) if all(ms) else None, len(frames), idx)
    try:
        from decord import VideoReader, cpu

        vr = VideoReader(path, ctx=cpu(0))
        idx = np.linspace(0, len(vr) - 1, num_frames, dtype=int)
        return Frames([Image.fromarray(f) for f in vr.get_batch(list(idx)).asnumpy()], vr.get_avg_fps() or None,
                      len(vr), idx)
    except ImportError:
        pass
    try:
        import av
    except ImportError:
        raise RuntimeError(f"cannot decode {path}: install decord (as Video-LLaVA) or PyAV (`pip install av`, the "
                           "`video` extra), or give a directory of the video's frame images") from None
    try:
        with av.open(path) as container:
            n = stated = int(container.streams.video[0].frames or 0)
            rate = container.streams.video[0].average_rate
        out = _pyav_sample(av, path, num_frames, stated) if stated > 0 else None
        if out is None:  # no frame count in the container, or it over-stated it: count by decoding once
            with av.open(path) as container:
                n = sum(1 for _ in container.decode(video=0))
            if n <= 0:
                raise ValueError(f"no frames decoded from {path}")
            out = _pyav_sample(av, path, num_frames, n)
    except (av.error.FFmpegError, IndexError) as e:
        raise ValueError(f"cannot decode video {path}: {e}") from e
    if out is None:
        raise ValueError(f"cannot decode video {path}: fewer frames than counted")
    return Frames(out, float(rate) if rate else None, n, np.linspace(0, n - 1, num_frames, dtype=int))


def _pyav_sample(av, path: str, num_frames: int, n: int):
    """Decode ``path`` once, converting only the linspace-sampled frames of ``n``; None if fewer decode."""
    idx = np.linspace(0, n - 1, num_frames, dtype=int)
    want: dict[int, int] = {}
    for i in idx:
        want[int(i)] = want.get(int(i), 0) + 1
    out, last = [], int(idx[-1])
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in want:
                out.extend([frame.to_image().convert("RGB")] * want[i])
            if i >= last:
                break
    return out if len(out) == num_frames else None


def sample_frames(video, num_frames: int) -> list:
    """``num_frames`` frames uniformly over a list of frames (Video-LLaVA's rule: linspace over the
    clip, rounded down); a path to a directory of frame images is read in sorted order, a video file
    (mp4 / avi / mov / mkv / webm / gif) is decoded (:func:`decode_video`)."""
    path = None
    if isinstance(video, (str, os.PathLike)):
        path = os.fspath(video)
        if not os.path.isdir(path):
            if os.path.isfile(path):
                return decode_video(path, num_frames)
            raise ValueError(f"video {path}: no such file or directory (give a video file, a directory of frame "
                             "images or a list of frames)")
        video = [os.path.join(path, f) for f in sorted(os.listdir(path))]
    frames = list(video)
    if len(frames) == 0:
        raise ValueError(f"empty video: the folder {path} holds no frame images" if path else "empty video (no frames)")
    idx = np.linspace(0, len(frames) - 1, num_frames).astype(int)
    return [frames[i] for i in idx]
