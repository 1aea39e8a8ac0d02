"""Real video files decoded (PyAV, the `video` extra): mp4 (H.264 and MPEG-4), AVI, MKV and WebM written
here with PyAV, each frame a distinct flat grey, so the sampled frames can be identified exactly."""

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")

from llava.preprocess_video_files import decode_video, sample_frames  # noqa: E402

# frame i is a flat grey of level 8 * i (luma only: it survives YUV 4:2:0 and lossy coding within +-2)
N_FRAMES = 30


def write_video(path, codec, n=N_FRAMES, size=(64, 48), fps=10):
    with av.open(str(path), mode="w") as out:
        st = out.add_stream(codec, rate=fps)
        st.width, st.height = size
        st.pix_fmt = "yuv420p"
        for i in range(n):
            img = np.full((size[1], size[0], 3), 8 * i, dtype=np.uint8)
            for packet in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in st.encode():
            out.mux(packet)
    return path


def frame_index(img) -> int:
    return int(round(float(np.asarray(img).mean()) / 8))


@pytest.mark.parametrize("name,codec", [("v.mp4", "libx264"), ("v2.mp4", "mpeg4"), ("v.avi", "mpeg4"),
                                        ("v.mkv", "libx264"), ("v.webm", "libvpx")])
def test_decoded_frames_are_video_llavas_linspace_sample(tmp_path, name, codec):
    path = write_video(tmp_path / name, codec)
    frames = decode_video(path, 8)
    want = np.linspace(0, N_FRAMES - 1, 8, dtype=int).tolist()  # [0, 4, 8, 12, 16, 20, 24, 29]
    assert want == [0, 4, 8, 12, 16, 20, 24, 29]
    assert [frame_index(f) for f in frames] == want
    assert all(f.size == (64, 48) and f.mode == "RGB" for f in frames)


def test_more_samples_than_frames_repeat_frames_as_linspace_does(tmp_path):
    path = write_video(tmp_path / "short.mp4", "libx264", n=5)
    got = [frame_index(f) for f in decode_video(path, 8)]
    assert got == np.linspace(0, 4, 8, dtype=int).tolist() == [0, 0, 1, 1, 2, 2, 3, 4]


def test_bad_and_missing_files_are_clear_errors(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video")
    with pytest.raises(ValueError, match="cannot decode video"):
        decode_video(bad, 8)
    with pytest.raises(FileNotFoundError, match="video file not found"):
        decode_video(tmp_path / "nope.mp4", 8)
    with pytest.raises(ValueError, match="no such file or directory"):
        sample_frames(str(tmp_path / "nope.mp4"), 8)


def test_a_video_file_runs_through_video_llava_and_the_harness_loader(tmp_path, runtimes):
    """The processor takes the file path (8 frames decoded), the engine prunes it, and the VideoQA
    loader decodes the same frames from a file in the benchmark's layout."""
    from eval.benchmarks.videoqa import load_video

    path = write_video(tmp_path / "clip.mp4", "libx264")
    rt = runtimes["video-llava"]
    batch = rt.processor(["what happens?"], videos=[str(path)])
    ref = rt.processor(["what happens?"], videos=[[f for f in decode_video(path, 8)]])
    assert torch.equal(batch["pixel_values_videos"], ref["pixel_values_videos"])
    eng = rt.prune("visionzip", 4)
    try:
        with torch.no_grad():
            out = rt.model.generate(**batch, max_new_tokens=2, do_sample=False)
        assert out.shape[1] == batch["input_ids"].shape[1] + 2
        assert eng.stats.samples[0].visual_entering_llm < eng.stats.samples[0].visual_candidates
    finally:
        rt.unprune()
    assert [frame_index(f) for f in load_video(path, 8)] == [0, 4, 8, 12, 16, 20, 24, 29]
