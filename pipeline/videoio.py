"""Reading and writing mp4 video with PyAV (FFmpeg's libraries): the one codec seam of the project.

Frames are (n, H, W, 3) uint8 RGB arrays throughout. Reading samples a video at given times: the
frame *shown* at time t is the last decoded frame whose presentation time is <= t (plus a small
tolerance for timestamps rounded by the container), which is how a player would show it and what
``ffmpeg -vf fps=...`` keeps for a constant-rate video. :func:`square` crops the centre square and
resizes it, the geometry CLIP's own transform uses, so cached small frames and CLIP inputs show
the same field of view.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UserError
from .store import atomic_file

TIME_TOLERANCE = 1e-3
"""Seconds by which a frame may start after the requested time and still count as shown then."""


def _av():
    try:
        import av
    except ImportError:
        raise UserError("reading and writing mp4 needs PyAV: pip install av") from None
    return av


@dataclass(frozen=True)
class VideoInfo:
    """What a video file says about itself."""

    fps: float  # average frame rate of the stream
    duration: float  # seconds, from the stream or container header
    width: int
    height: int


def _open(path: Path):
    av = _av()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"video not found: {path}")
    try:
        container = av.open(str(path))
    except Exception as exc:  # av.error.InvalidDataError and friends
        raise UserError(f"{path}: not a readable video ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if not container.streams.video:
        container.close()
        raise UserError(f"{path}: has no video stream")
    return container


def probe(path: Path | str) -> VideoInfo:
    """Frame rate, duration and size of a video, from its headers (nothing is decoded)."""
    with _open(Path(path)) as container:
        stream = container.streams.video[0]
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000  # av.time_base
        else:
            duration = 0.0
        rate = stream.average_rate or stream.guessed_rate
        ctx = stream.codec_context
        return VideoInfo(float(rate) if rate else 0.0, duration, int(ctx.width), int(ctx.height))


def read_frames(path: Path | str, times: Sequence[float], size: int | None = None) -> np.ndarray:
    """The frames shown at ``times`` (seconds, ascending), as (n, H, W, 3) uint8; :func:`square` of
    ``size`` when given.

    Seeks to the keyframe before the first time and decodes forward once, so reading a short span
    of a long video is cheap. Every frame is decoded, but only the frames kept are converted to RGB
    (once each): at 3 of 30 fps that is a tenth of the conversions. A time past the last frame's
    display interval is an error.
    """
    times = np.asarray(times, dtype=np.float64)
    if times.size == 0:
        return np.zeros((0, size or 0, size or 0, 3), np.uint8)
    if np.any(np.diff(times) < 0):
        raise ValueError("times must be ascending")
    path = Path(path)
    out: list[np.ndarray] = []
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        if times[0] > 0 and stream.time_base is not None:
            container.seek(int(times[0] / stream.time_base), stream=stream, backward=True, any_frame=False)
        k, last, last_time = 0, None, None
        last_rgb: np.ndarray | None = None  # ``last`` as RGB, converted when first kept

        def keep() -> None:
            nonlocal k, last_rgb
            if last_rgb is None:
                last_rgb = _as_rgb(last, size)
            out.append(last_rgb)
            k += 1

        try:
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else None
                if t is None:
                    continue
                while k < len(times) and t > times[k] + TIME_TOLERANCE:
                    if last is None:  # the seek landed after the requested time: cannot happen for keyframe seeks
                        raise UserError(f"{path}: no frame is shown at {times[k]:.3f} s")
                    keep()
                if k == len(times):
                    break
                last, last_rgb, last_time = frame, None, t
        except UserError:
            raise
        except Exception as exc:  # a corrupt packet mid-stream
            raise UserError(f"{path}: cannot decode ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        # frames still wanted after the last decoded one: shown only while that frame lasts
        frame_span = 1.0 / rate if rate else 0.0
        while k < len(times) and last is not None and times[k] < last_time + frame_span - TIME_TOLERANCE:
            keep()
    if k < len(times):
        raise UserError(
            f"{path}: video ends before {times[k]:.2f} s (needed up to {times[-1]:.2f} s); is it shorter than its fMRI?"
        )
    return np.stack(out)


def _as_rgb(frame, size: int | None) -> np.ndarray:
    rgb = frame.to_ndarray(format="rgb24")
    return rgb if size is None else square(rgb, size)


def square(image: np.ndarray, size: int) -> np.ndarray:
    """The centre square of an (H, W, 3) uint8 image, resized to (size, size) with bicubic filtering."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    crop = Image.fromarray(image[top : top + s, left : left + s])
    return np.asarray(crop.resize((size, size), Image.BICUBIC) if s != size else crop)


X264_REPRODUCIBLE = "threads=1:lookahead-threads=1:sync-lookahead=0:asm=0"


def write_mp4(path: Path | str, frames: np.ndarray, fps: float, crf: int = 18, preset: str = "medium") -> Path:
    """Write (n, H, W, 3) uint8 frames as H.264 mp4 (yuv420p, so H and W must be even), atomically.

    ``fps`` may be fractional; the rate is stored as a fraction. ``crf``/``preset``: libx264's quality
    and speed settings. libx264 runs single-threaded and without its assembly (:data:`X264_REPRODUCIBLE`):
    otherwise the same frames encode to different bytes from call to call (measured with this PyAV
    wheel on 32 px demo clips, even with one thread; not seen at 256 px), and DVC hashes these
    files. It costs ~0.3 s per 16-frame 512 px clip on one CPU core.
    """
    av = _av()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise UserError(f"write_mp4: expected (n, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    h, w = frames.shape[1:3]
    if h % 2 or w % 2:
        raise UserError(f"write_mp4: H.264 needs even frame sizes, got {w}x{h}")
    with atomic_file(Path(path)) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset, "x264-params": X264_REPRODUCIBLE}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)

