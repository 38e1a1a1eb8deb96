"""Decoding training clips with PyAV: probe, frame sampling to a target fps, aspect-ratio buckets,
resize + crop.

A clip of ``num_frames`` frames at ``fps`` spans ``(num_frames - 1) / fps`` seconds of the source.
Frame i is the source frame *shown* at ``start + i / fps``: the last frame whose timestamp is at or
before that time (frames repeat when the source is slower than ``fps``, are skipped when faster).
A source whose last frame starts before the clip's last sample time is too short.

Frames are scaled (swscale, bicubic) to cover the bucket and cropped to it; only the sampled frames
are converted to RGB. Everything stays uint8 (F, H, W, 3): the float conversion happens on the
training device (see ``bindweave.data.datamodule.to_model_batch``).
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import av
import numpy as np

_TOLERANCE = 1e-4
"""Seconds of slack when comparing frame timestamps with sample times (rounding of pts)."""

# Pixel formats whose frames PyAV already returns as (h, w, 3) RGB arrays: no swscale conversion,
# which costs 4-9 ms per 64x64 frame (context set-up) against 0.07 ms for the planes themselves.
_RGB_FORMATS = ("rgb24", "gbrp")


def frame_to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """(h, w, 3) uint8 RGB of a decoded frame (lossless RGB video, e.g. libx264rgb, skips swscale)."""
    if frame.format.name in _RGB_FORMATS:
        return frame.to_ndarray()
    return frame.to_ndarray(format="rgb24")


class VideoDecodeError(ValueError):
    """A video that cannot be used: ``reason`` is ``corrupt_video`` or ``short_video``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class VideoInfo:
    """What a container says about its first video stream (``num_frames``/``duration`` may be 0
    when the container does not store them)."""

    width: int
    height: int
    fps: float
    num_frames: int
    duration: float
    codec: str


def _open(data: bytes) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    try:
        container = av.open(io.BytesIO(data))
    except (av.FFmpegError, UnicodeDecodeError) as error:
        raise VideoDecodeError("corrupt_video", f"cannot open the video: {error}") from error
    if not container.streams.video:
        container.close()
        raise VideoDecodeError("corrupt_video", "the file has no video stream")
    return container, container.streams.video[0]


def probe(data: bytes) -> VideoInfo:
    """Read the metadata of an encoded video (no frame is decoded)."""
    container, stream = _open(data)
    with container:
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        if stream.duration is not None:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = (container.duration or 0) / av.time_base
        ctx = stream.codec_context
        return VideoInfo(ctx.width, ctx.height, fps, int(stream.frames or 0), duration, ctx.name)


def scan(data: bytes) -> VideoInfo:
    """Decode every frame (without converting it) to check the video and count its frames.

    ``duration`` is the time from the first to the last frame; raises :class:`VideoDecodeError`.
    """
    container, stream = _open(data)
    with container:
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        first = last = None
        count = 0
        try:
            for frame in container.decode(stream):
                first = frame.time if first is None else first
                last = frame.time
                count += 1
        except av.FFmpegError as error:
            raise VideoDecodeError("corrupt_video", f"decoding failed after {count} frames: {error}") from error
        if count == 0:
            raise VideoDecodeError("corrupt_video", "the video has no decodable frame")
        duration = (last - first) if first is not None and last is not None else 0.0
        ctx = stream.codec_context
        return VideoInfo(ctx.width, ctx.height, fps, count, float(duration), ctx.name)


def clip_span(num_frames: int, fps: float) -> float:
    """Seconds between the first and the last frame of a clip."""
    return (num_frames - 1) / fps


def long_enough(info: VideoInfo, num_frames: int, fps: float | None) -> bool:
    """Whether a video (from :func:`scan`) holds a clip of ``num_frames`` at ``fps``."""
    if fps is None:
        return info.num_frames >= num_frames
    return info.duration + _TOLERANCE >= clip_span(num_frames, fps)


def choose_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) bucket whose aspect ratio is closest to the video's (in log ratio)."""
    if not buckets:
        raise ValueError("buckets is empty: give at least one (height, width).")
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - aspect))


def cover_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the source scaled, keeping its aspect, to just cover ``target``."""
    scale = max(target[0] / height, target[1] / width)
    return max(target[0], round(height * scale)), max(target[1], round(width * scale))


def decode_clip(
    data: bytes,
    num_frames: int,
    fps: float | None,
    size: tuple[int, int] | None = None,
    buckets: list[tuple[int, int]] | None = None,
    random_crop: bool = False,
    rng: random.Random | None = None,
    threads: int = 1,
) -> np.ndarray:
    """Decode a clip of ``num_frames`` frames sampled at ``fps`` (None: consecutive source frames).

    Args:
        data: the encoded video (any container/codec FFmpeg reads).
        num_frames: frames of the clip.
        fps: sample rate of the clip in frames per second; None keeps the source rate.
        size: (height, width) of the output; None picks from ``buckets`` (or keeps the source size).
        buckets: (height, width) sizes; the one closest in aspect ratio to the video is used.
        random_crop: draw the clip's start time and the crop offset from ``rng``; False takes the
            clip from the first frame and crops the centre.
        rng: random source for ``random_crop``.
        threads: FFmpeg decoding threads (1 suits several DataLoader workers per core).

    Returns:
        (F, H, W, 3) uint8 RGB frames.
    """
    rng = rng or random.Random(0)
    container, stream = _open(data)
    with container:
        if threads != 1:
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = threads  # 0: FFmpeg picks
        src_h, src_w = stream.codec_context.height, stream.codec_context.width
        if src_h <= 0 or src_w <= 0:
            raise VideoDecodeError("corrupt_video", f"the video reports a size of {src_w}x{src_h}")
        if size is None:
            size = choose_bucket(src_h, src_w, buckets) if buckets else (src_h, src_w)
        scaled = cover_size(src_h, src_w, size)
        top, left = (scaled[0] - size[0]) // 2, (scaled[1] - size[1]) // 2
        if random_crop:
            top, left = rng.randint(0, scaled[0] - size[0]), rng.randint(0, scaled[1] - size[1])
        t0 = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0

        start = 0.0
        src_fps = float(stream.average_rate or 0)
        if random_crop and fps is not None and stream.frames and src_fps:
            last = (stream.frames - 1) / src_fps
            start = rng.uniform(0.0, max(0.0, last - clip_span(num_frames, fps)))
            start = math.floor(start * src_fps) / src_fps  # on a source frame: no rounding surprises
            if start > 1.0:
                container.seek(int((t0 + start) / stream.time_base), stream=stream, backward=True)

        out = np.empty((num_frames, *size, 3), dtype=np.uint8)

        def convert(frame: av.VideoFrame) -> np.ndarray:
            if scaled == (src_h, src_w):
                rgb = frame_to_rgb(frame)  # (h, w, 3)
            else:
                rgb = frame.reformat(width=scaled[1], height=scaled[0], format="rgb24", interpolation="BICUBIC").to_ndarray()
            return rgb[top : top + size[0], left : left + size[1]]  # (H, W, 3)

        filled = 0
        previous = None
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                t = frame.time - t0
                if fps is None:
                    if t + _TOLERANCE >= start:
                        out[filled] = convert(frame)
                        filled += 1
                else:
                    # Every sample time before this frame's timestamp shows the previous frame.
                    converted = None
                    while filled < num_frames and previous is not None and t > start + filled / fps + _TOLERANCE:
                        converted = convert(previous) if converted is None else converted
                        out[filled] = converted
                        filled += 1
                    previous = frame
                if filled == num_frames:
                    break
            else:
                # End of stream: the last frame covers sample times up to its own timestamp.
                if fps is not None and previous is not None:
                    t_last = previous.time - t0
                    converted = None
                    while filled < num_frames and start + filled / fps <= t_last + _TOLERANCE:
                        converted = convert(previous) if converted is None else converted
                        out[filled] = converted
                        filled += 1
        except av.FFmpegError as error:
            raise VideoDecodeError("corrupt_video", f"decoding failed after {filled} clip frames: {error}") from error
        if filled < num_frames:
            need = f"{num_frames} frames" if fps is None else f"{clip_span(num_frames, fps):.2f} s for {num_frames} frames at {fps:g} fps"
            raise VideoDecodeError("short_video", f"the video is too short: {need}, only {filled} clip frames decoded")
        return out
