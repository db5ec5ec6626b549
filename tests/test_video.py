"""Video files through PyAV: uniform sampling as Video-LLaVA samples (the sampled frames are the expected ones,
found by the colour each frame was written with), short videos repeat frames, long ones are reached by seeking,
every container the issue names, and a named one-line error for each kind of bad file."""

import numpy as np
import pytest
import torch

from minifastv.models.video_llava import VIDEO_LLAVA_7B
from minifastv.video import SEEK_ABOVE, VideoError, read_frames, sample_indices, video_pixels

av = pytest.importorskip("av")


def write_video(path, n, size=(32, 24), codec="mpeg4", fps=10, shade=lambda i: i * 10):
    """A video whose frame i is one flat colour, red = shade(i), so a decoded frame tells which one it is."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        for i in range(n):
            rgb = np.zeros((size[1], size[0], 3), dtype=np.uint8)
            rgb[..., 0] = shade(i)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())
    return path


def reds(frames):
    return [int(np.asarray(f.convert("RGB"))[..., 0].mean().round()) for f in frames]


def test_sampling_is_video_llavas():
    assert sample_indices(20, 8) == [0, 2, 5, 8, 10, 13, 16, 19]
    assert sample_indices(3, 8) == [0, 0, 0, 0, 1, 1, 1, 2]       # fewer frames than asked: repeats
    assert sample_indices(1, 8) == [0] * 8


@pytest.mark.parametrize("suffix, codec", [(".mp4", "mpeg4"), (".webm", "libvpx-vp9"), (".mkv", "mpeg4"),
                                           (".mov", "mpeg4"), (".gif", "gif")])
def test_each_container_gives_the_sampled_frames(tmp_path, suffix, codec):
    path = write_video(tmp_path / f"v{suffix}", 20, codec=codec)
    got = reds(read_frames(path, 8))
    expected = [i * 10 for i in sample_indices(20, 8)]
    assert all(abs(g - e) <= 6 for g, e in zip(got, expected)), (got, expected)


def test_a_short_video_repeats_frames(tmp_path):
    got = reds(read_frames(write_video(tmp_path / "short.mp4", 3, shade=lambda i: 40 + 80 * i), 8))
    assert all(abs(g - e) <= 6 for g, e in zip(got, [40, 40, 40, 40, 120, 120, 120, 200])), got


def test_a_long_video_is_reached_by_seeking(tmp_path, monkeypatch):
    """Past SEEK_ABOVE frames each sampled frame is found by a seek, not by decoding everything before it."""
    n = SEEK_ABOVE + 300
    path = write_video(tmp_path / "long.mp4", n, size=(16, 16), fps=25, shade=lambda i: i * 250 // n)
    decoded = []
    real = av.container.InputContainer.decode

    def counting(self, *args, **kwargs):
        for frame in real(self, *args, **kwargs):
            decoded.append(1)
            yield frame
    monkeypatch.setattr(av.container.InputContainer, "decode", counting)
    got = reds(read_frames(path, 8))
    expected = [i * 250 // n for i in sample_indices(n, 8)]
    assert all(abs(g - e) <= 6 for g, e in zip(got, expected)), (got, expected)
    assert len(decoded) < n // 2                                   # seeking, not a full decode


def test_video_pixels_are_the_crop_transform_of_each_frame(tmp_path):
    from minifastv.image import preprocess

    path = write_video(tmp_path / "v.mp4", 12, size=(320, 240))
    pixels = video_pixels(path, VIDEO_LLAVA_7B)
    frames = read_frames(path, 8)
    assert pixels.shape == (8, 3, 224, 224)
    torch.testing.assert_close(pixels[3], preprocess(frames[3], 224, "crop", VIDEO_LLAVA_7B.image_mean,
                                                      VIDEO_LLAVA_7B.image_std), rtol=0, atol=0)


def test_bad_files_are_named_one_line_errors(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all")
    with pytest.raises(VideoError, match=r"notes\.mp4: not a video"):
        read_frames(text, 8)
    with pytest.raises(VideoError, match="missing.mp4: no such file"):
        read_frames(tmp_path / "missing.mp4", 8)
    audio = tmp_path / "tone.wav"
    with av.open(str(audio), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    with pytest.raises(VideoError, match=r"tone\.wav: no video stream"):
        read_frames(audio, 8)
    whole = write_video(tmp_path / "whole.mp4", 30, shade=lambda i: i * 8).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole[: len(whole) // 3])
    with pytest.raises(VideoError, match=r"cut\.mp4: "):
        read_frames(cut, 8)
    empty = tmp_path / "empty.mkv"
    with av.open(str(empty), "w") as out:                       # a video stream and no frame in it
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        out.mux(stream.encode())
    with pytest.raises(VideoError, match=r"empty\.mkv: "):
        read_frames(empty, 8)
    with pytest.raises(VideoError, match=r"above the cap of 100 pixels"):
        read_frames(write_video(tmp_path / "big.mp4", 2), 8, max_pixels=100)


def test_huge_frames_are_refused_with_a_named_error(tmp_path, monkeypatch):
    """8192 x 8192 (the largest ffmpeg's encoders write) is refused from the header, before any decoding; a
    20000 x 20000 image, whose size ffmpeg does not even report, is a named error too."""
    from PIL import Image

    big = tmp_path / "big.mov"
    with av.open(str(big), "w") as out:
        stream = out.add_stream("png", rate=1)
        stream.width = stream.height = 8192
        stream.pix_fmt = "gray"
        out.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((8192, 8192), dtype=np.uint8), format="gray")))
        out.mux(stream.encode())
    real = av.container.InputContainer.decode
    monkeypatch.setattr(av.container.InputContainer, "decode", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(VideoError, match=r"big\.mov: frames of 8192 x 8192 pixels, above the cap of 16,777,216"):
        read_frames(big, 8)
    monkeypatch.setattr(av.container.InputContainer, "decode", real)
    huge = tmp_path / "huge.png"
    Image.new("1", (20000, 20000)).save(huge)
    with pytest.raises(VideoError, match=r"huge\.png: "):
        read_frames(huge, 8)


def test_without_pyav_the_message_names_the_extra(monkeypatch, tmp_path):
    import builtins

    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "av" else real(name, *a, **k))
    with pytest.raises(VideoError, match=r"pip install 'minifastv\[video\]'"):
        read_frames(tmp_path / "x.mp4", 8)


def test_a_video_in_memory_reads_as_the_file_does_and_is_named_in_errors(tmp_path):
    path = write_video(tmp_path / "v.mp4", 20, shade=lambda i: 12 * i)
    assert reds(read_frames(path.read_bytes(), 8)) == reds(read_frames(path, 8))
    with pytest.raises(VideoError, match=r"^upload 3: not a video"):
        read_frames(b"not a video", 8, name="upload 3")


@pytest.mark.parametrize("suffix, message", [(".mp4", "12 frames, above the cap of 11"),   # the header counts
                                             (".mkv", "more than the cap of 11 frames")])  # it does not
def test_a_cap_on_frames_refuses_a_longer_video_by_name(tmp_path, suffix, message):
    """mp4 says how many frames it has (refused from the header), Matroska does not (refused while counting,
    without keeping a frame)."""
    path = write_video(tmp_path / f"v{suffix}", 12)
    assert len(read_frames(path, 8, max_frames=12)) == 8
    with pytest.raises(VideoError, match=rf"v\{suffix}: {message}"):
        read_frames(path, 8, max_frames=11)
