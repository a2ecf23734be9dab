"""Video posts → K keyframes (PyAV), so a video post pairs with its text like an image post does.

Only keyframes are decoded (`skip_frame = "NONKEY"`): with a known duration the reader seeks to K evenly spaced
times and takes the keyframe at or before each; without one it walks the keyframes from the start and keeps K
spread over what it saw. Both stop after `max_seconds`, keeping the frames found so far, so a huge or hostile
file costs bounded time. Frames that repeat (a short clip with one keyframe) are returned once.
"""
from __future__ import annotations

import io
import time
from pathlib import Path

from PIL import Image

from fl_crew_reddit.preprocessing.images import MAX_IMAGE_PIXELS, MediaRejected

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".mpg", ".mpeg"})
DEFAULT_MAX_SECONDS = 10.0
MAX_KEYFRAMES_WALKED = 512  # the walk without a duration keeps at most this many candidates

SKIP_VIDEO_UNREADABLE = "video_unreadable"
SKIP_VIDEO_NO_STREAM = "video_without_video_stream"
SKIP_VIDEO_NO_KEYFRAME = "video_without_keyframe"
SKIP_VIDEO_TOO_LARGE = "video_frame_too_many_pixels"


class VideoRejected(MediaRejected):
    """No keyframe could be had from the video; `reason` is one of the SKIP_VIDEO_* counts."""


def is_video_reference(reference: str) -> bool:
    return Path(reference.split("?", 1)[0]).suffix.lower() in VIDEO_SUFFIXES


def evenly_spaced(items: list, count: int) -> list:
    """`count` items spread over `items` (the middle of each of `count` equal parts), order kept."""
    if len(items) <= count:
        return list(items)
    return [items[int((index + 0.5) * len(items) / count)] for index in range(count)]


def video_keyframes(source: Path | str | bytes, count: int, *, max_seconds: float = DEFAULT_MAX_SECONDS,
                    max_pixels: int = MAX_IMAGE_PIXELS) -> list[Image.Image]:
    """Up to `count` distinct keyframes as RGB images, in time order, from a file, a URL FFmpeg can read, or bytes;
    raises VideoRejected when there are none."""
    import av  # PyAV: imported here so text-only runs never load FFmpeg

    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    deadline = time.monotonic() + max_seconds
    opened = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        with av.open(opened, mode="r", timeout=max_seconds) as container:
            if not container.streams.video:
                raise VideoRejected(SKIP_VIDEO_NO_STREAM, "the file has no video stream")
            stream = container.streams.video[0]
            if stream.width * stream.height > max_pixels:
                raise VideoRejected(SKIP_VIDEO_TOO_LARGE, f"{stream.width}x{stream.height} frames are over the "
                                                          f"{max_pixels:,}-pixel limit")
            stream.codec_context.skip_frame = "NONKEY"
            duration = _duration_in_stream_units(container, stream)
            if duration:
                frames = _seek_keyframes(container, stream, duration, count, deadline)
            else:
                frames = _walk_keyframes(container, stream, count, deadline)
    except VideoRejected:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as error:
        raise VideoRejected(SKIP_VIDEO_UNREADABLE, f"{type(error).__name__}: {error}") from None
    if not frames:
        raise VideoRejected(SKIP_VIDEO_NO_KEYFRAME, "no keyframe could be decoded")
    return frames


def _duration_in_stream_units(container, stream) -> int | None:
    if stream.duration and stream.duration > 0:
        return int(stream.duration)
    if container.duration and container.duration > 0 and stream.time_base:  # container.duration is in µs
        return int(container.duration / 1_000_000 / stream.time_base)
    return None


def _seek_keyframes(container, stream, duration: int, count: int, deadline: float) -> list[Image.Image]:
    """Seek to the middle of each of `count` equal parts and decode the keyframe there."""
    start = stream.start_time or 0
    frames, seen = [], set()
    for index in range(count):
        if time.monotonic() > deadline:
            break
        container.seek(start + int((index + 0.5) * duration / count), stream=stream, backward=True)
        frame = next(container.decode(stream), None)
        if frame is not None and frame.pts not in seen:
            seen.add(frame.pts)
            frames.append((frame.pts if frame.pts is not None else index, frame.to_image()))
    return [image for _, image in sorted(frames, key=lambda item: item[0])]


def _walk_keyframes(container, stream, count: int, deadline: float) -> list[Image.Image]:
    """No duration (a stream without an index): decode keyframes from the start, keep `count` spread over them."""
    candidates = []
    for frame in container.decode(stream):
        candidates.append(frame.to_image())
        if len(candidates) >= MAX_KEYFRAMES_WALKED or time.monotonic() > deadline:
            break
    return evenly_spaced(candidates, count)
