"""Video files -> the frames a video model sees: `n_frames` frames sampled uniformly as Video-LLaVA samples them at
inference (np.linspace(0, n - 1, n_frames) truncated to int, so a short video repeats frames), each resized on its
short side to the model's size (bicubic), centre-cropped and normalised like an image. The original's video
transform also flips frames at random at inference; that is not reproduced (the answer would not repeat).

Decoding uses PyAV (the optional extra `[video]`). A long file is not decoded whole: each sampled frame is reached
by seeking to the keyframe before it. A short one (or one whose header does not say its length) is decoded twice:
once to count its frames, once keeping only the sampled ones, so memory holds n_frames frames. Every failure is a
VideoError naming the file and the problem.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .image import preprocess

MAX_FRAME_PIXELS = 4096 * 4096   # a frame larger than this is refused before anything is decoded
SEEK_ABOVE = 600                  # frames: a shorter video is counted, then decoded keeping the sampled frames;
                                  # a longer one is read by seeking
MAX_FRAMES = 1_000_000            # frames a video may have (checked from the header, or while counting them)


class VideoError(ValueError):
    """A video file that cannot be used: its name and the reason."""


def sample_indices(n_total: int, n_frames: int) -> list[int]:
    """The frame indices Video-LLaVA reads: uniform over the video, repeated when it has fewer than n_frames."""
    return [int(i) for i in np.linspace(0, n_total - 1, n_frames)]


def _av():
    try:
        import av
    except ImportError:
        raise VideoError("reading videos needs PyAV, the [video] extra: pip install 'minifastv[video]'") from None
    return av


def read_frames(path: str | Path | bytes, n_frames: int, max_pixels: int = MAX_FRAME_PIXELS,
                max_frames: int = MAX_FRAMES, name: str | None = None) -> list[Image.Image]:
    """`n_frames` RGB frames of the video file at `path` (or the video in `bytes`, called `name` in errors),
    sampled uniformly (see the module's docstring)."""
    av = _av()
    if isinstance(path, bytes):
        source, path = io.BytesIO(path), name or "the video"
    else:
        path = source = Path(path)
        if not path.is_file():
            raise VideoError(f"{path}: no such file")
    try:
        container = av.open(source if isinstance(source, io.BytesIO) else str(source))
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise VideoError(f"{path}: not a video ({e})") from None
    with container:
        if not container.streams.video:
            raise VideoError(f"{path}: no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max_pixels:
            raise VideoError(f"{path}: frames of {width} x {height} pixels, above the cap of {max_pixels:,} pixels")
        if stream.frames > max_frames:
            raise VideoError(f"{path}: {stream.frames} frames, above the cap of {max_frames}")
        try:
            frames = _decode(container, stream, n_frames, path, max_frames)
        except av.FFmpegError as e:
            raise VideoError(f"{path}: the video stream is damaged ({e})") from None
    if not frames:
        raise VideoError(f"{path}: the video stream has no frames")
    if frames[0].width * frames[0].height > max_pixels:  # where the header did not say
        raise VideoError(f"{path}: frames of {frames[0].width} x {frames[0].height} pixels, above the cap of "
                         f"{max_pixels:,} pixels")
    return frames


def _decode(container, stream, n_frames: int, path, max_frames: int) -> list[Image.Image]:
    n_total = stream.frames  # from the container's header; 0 where it does not say
    if n_total <= SEEK_ABOVE:  # a short video, or one whose header does not say: count the frames (within the
        n_total = 0            # cap), then decode again keeping only the sampled ones
        for n_total, _ in enumerate(container.decode(stream), 1):
            if n_total > max_frames:
                raise VideoError(f"{path}: more than the cap of {max_frames} frames")
        if n_total == 0:
            return []
        container.seek(0)
        wanted = sample_indices(n_total, n_frames)
        kept = {i: frame.to_image() for i, frame in enumerate(container.decode(stream)) if i in wanted}
        return [kept[i] for i in wanted]
    # A long video: seek to the keyframe before each sampled frame and decode up to it. The index becomes a time
    # (variable frame rates make frame n a moment, not a count); the sampled frame is the first at or after it.
    rate = n_total / float(stream.duration * stream.time_base) if stream.duration else float(stream.average_rate)
    start = float((stream.start_time or 0) * stream.time_base)
    out = []
    for index in sample_indices(n_total, n_frames):
        target = start + index / rate
        container.seek(int(target / stream.time_base), stream=stream, backward=True, any_frame=False)
        frame = next((f for f in container.decode(stream) if f.time is None or f.time >= target - 0.5 / rate), None)
        if frame is None:
            raise VideoError(f"{path}: the stream ends before frame {index} of the {n_total} it declares")
        out.append(frame.to_image())
    return out


def video_pixels(path: str | Path, config, max_pixels: int = MAX_FRAME_PIXELS) -> torch.Tensor:
    """[n_frames, 3, S, S]: the video at `path` as the video model `config` sees it."""
    return frames_pixels(read_frames(path, config.n_frames, max_pixels), config)


def frames_pixels(frames, config) -> torch.Tensor:
    """[n_frames, 3, S, S]: a video's frames (PIL images, as many as the model `config` takes) preprocessed as
    Video-LLaVA preprocesses them: short side resized to the model's size (bicubic), centre crop, normalised."""
    if len(frames) != config.n_frames:
        raise VideoError(f"the model takes videos of {config.n_frames} frames, got {len(frames)}")
    size = config.vision.image_size
    return torch.stack([preprocess(frame.convert("RGB"), size, "crop", config.image_mean, config.image_std)
                        for frame in frames])
