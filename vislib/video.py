"""Explain a short video: decode (PyAV), one map per frame, temporal smoothing, MP4 / GIF out.

Decoding goes through PyAV (FFmpeg), never by hand. A video is hostile until proven otherwise:
:func:`probe` checks the file's size, extension, container, stream, dimensions, duration and frame
count **before** a single frame is decoded, and :func:`iter_frames` counts again while decoding (a
container can lie about its length). Every refusal is an :class:`~vislib.InputError` naming the file.

Temporal smoothing is an exponential moving average of the per-frame maps,
``s_0 = m_0``, ``s_t = β·s_{t−1} + (1 − β)·m_t`` with ``β = smoothing`` in [0, 1) (0: none). Each
``m_t`` is in [0, 1], so every ``s_t`` is a convex combination and stays in [0, 1]; a map's weight
halves every ``log(0.5) / log(β)`` frames (β = 0.5: one frame, β = 0.8: about three).
"""

from __future__ import annotations

import io
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .errors import Cancelled, InputError
from .models import ModelBundle
from .render import overlay as overlay_map

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".webm", ".mkv", ".gif")
# FFmpeg demuxer names (PyAV's ``container.format.name`` is a comma-separated list of aliases)
_CONTAINERS = {"mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "gif"}


@dataclass(frozen=True)
class VideoLimits:
    """Caps checked before decoding: file size, duration, frames, width and height, pixels per frame."""

    max_bytes: int = 50 * 1024 * 1024
    max_seconds: float = 60.0
    max_frames: int = 1800
    max_side: int = 3840
    max_pixels: int = 1920 * 1080
    max_explained: int = 120  # frames explained; longer videos are sampled every k-th frame


LIMITS = VideoLimits()


@dataclass(frozen=True)
class VideoInfo:
    """What the container says: size, frame rate, duration and frame count (estimated when absent)."""

    name: str
    container: str
    codec: str
    width: int
    height: int
    fps: float
    seconds: float
    frames: int


def _av():
    from ._optional import require

    return require("av", "video", feature="video")


def _open(data: bytes, name: str):
    av = _av()
    try:
        return av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, ValueError, OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{name} is not a video PyAV can read ({_why(exc)})") from None


def _why(exc: Exception) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text)[:120].rstrip(".").lower()


def probe(data: bytes, name: str = "video", limits: VideoLimits = LIMITS) -> VideoInfo:
    """Check ``data`` against ``limits`` without decoding a frame; the :class:`VideoInfo` when it passes."""
    if not data:
        raise InputError(f"{name} is empty")
    if len(data) > limits.max_bytes:
        raise InputError(f"{name} is {len(data) / 2**20:.1f} MB; videos up to "
                         f"{limits.max_bytes / 2**20:.0f} MB")
    lowered = name.lower()
    if "." in lowered and not lowered.endswith(VIDEO_EXTENSIONS):
        raise InputError(f"{name}: not a video file type; use {', '.join(VIDEO_EXTENSIONS)}")
    container = _open(data, name)
    try:
        return _check(container, name, limits)
    finally:
        container.close()


def _check(container, name: str, limits: VideoLimits) -> VideoInfo:
    formats = set(container.format.name.split(","))
    if not formats & _CONTAINERS:
        raise InputError(f"{name} is a {container.format.long_name or container.format.name} file, not a "
                         "video (MP4, WebM, MOV, MKV or GIF)")
    if not container.streams.video:
        raise InputError(f"{name} has no video stream")
    stream = container.streams.video[0]
    width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    if width <= 0 or height <= 0:
        raise InputError(f"{name}: the video stream has no frame size (a damaged or empty file)")
    if max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise InputError(f"{name} is {width}×{height}; videos up to {limits.max_pixels / 1e6:.1f} megapixels "
                         f"per frame and {limits.max_side} px a side")
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    fps = fps if 0 < fps <= 240 else 25.0
    seconds = 0.0
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / 1_000_000
    if seconds > limits.max_seconds:
        raise InputError(f"{name} lasts {seconds:.0f} s; videos up to {limits.max_seconds:.0f} s")
    frames = int(stream.frames or 0) or int(round(seconds * fps))
    if frames > limits.max_frames:
        raise InputError(f"{name} has {frames} frames; videos up to {limits.max_frames}")
    codec = stream.codec_context.name
    return VideoInfo(name=name, container=container.format.name, codec=codec, width=width, height=height,
                     fps=fps, seconds=seconds, frames=frames)


def iter_frames(data: bytes, name: str = "video", limits: VideoLimits = LIMITS, *,
                every: int = 1, cancel: threading.Event | None = None) -> Iterator[Image.Image]:
    """Decode ``data`` after :func:`probe`: every ``every``-th frame as an RGB PIL image; refuses a
    stream whose decoded frames break the caps and a stream with no frame."""
    av = _av()
    probe(data, name, limits)
    container = _open(data, name)
    decoded = 0
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled by the caller")
            w, h = frame.width, frame.height
            if w * h > limits.max_pixels or max(w, h) > limits.max_side:
                raise InputError(f"{name}: a frame is {w}×{h}, larger than the stream said")
            decoded += 1
            if decoded > limits.max_frames:
                raise InputError(f"{name} has more than {limits.max_frames} frames")
            if (decoded - 1) % every == 0:
                yield frame.to_image().convert("RGB")
    except av.FFmpegError as exc:
        if decoded == 0:
            raise InputError(f"{name}: no frame could be decoded ({_why(exc)}); the file may be damaged"
                             ) from None
        # a truncated tail: keep the frames before the damage
    finally:
        container.close()
    if decoded == 0:
        raise InputError(f"{name} has no frame (an empty or truncated video)")


def smooth_maps(maps: np.ndarray, smoothing: float) -> np.ndarray:
    """Exponential moving average over the first axis: ``s_t = β·s_{t−1} + (1 − β)·m_t``, ``s_0 = m_0``."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), not {smoothing}")
    out = np.empty_like(maps, dtype=np.float32)
    for t, m in enumerate(np.asarray(maps, dtype=np.float32)):
        out[t] = m if t == 0 else smoothing * out[t - 1] + (1.0 - smoothing) * m
    return out


@dataclass
class VideoExplanation:
    """Per-frame results: the model's input views, the maps (raw and smoothed), the probabilities."""

    views: list[Image.Image]
    maps: np.ndarray  # N×H×W in [0, 1], one per explained frame
    smoothed: np.ndarray  # the exponential moving average of ``maps``
    probs: np.ndarray  # N×classes
    targets: list[int]
    labels: list[str]
    fps: float  # of the explained frames (the source's rate / ``every``)
    every: int
    info: VideoInfo
    method: str
    layer: str
    model: str
    weights: str
    smoothing: float
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.views)

    def top_k(self, frame: int, k: int = 5) -> list[tuple[int, str, float]]:
        order = np.argsort(-self.probs[frame])[:k]
        return [(int(i), self.labels[i], float(self.probs[frame][i])) for i in order]

    def overlay(self, frame: int, *, smoothed: bool = True, alpha: float = 0.5, colormap: str = "jet"):
        maps = self.smoothed if smoothed else self.maps
        return overlay_map(self.views[frame], maps[frame], alpha=alpha, colormap=colormap)

    def overlays(self, **kwargs) -> list[Image.Image]:
        return [self.overlay(i, **kwargs) for i in range(len(self))]


def explain_video(
    bundle: ModelBundle, data: bytes, method: str = "gradcam", layer: str | None = None, target=None, *,
    name: str = "video", smoothing: float = 0.6, limits: VideoLimits = LIMITS, batch: int = 16,
    progress: Callable[[int, int], None] | None = None, cancel: threading.Event | None = None,
) -> VideoExplanation:
    """One ``method`` map per frame of a video (``target``: a class for all frames, or ``None`` for
    each frame's top class), smoothed in time (see the module). Videos longer than
    ``limits.max_explained`` frames are sampled every k-th frame. ``progress(done, total)`` after each
    batch of frames; setting ``cancel`` raises :class:`~vislib.Cancelled` between batches."""
    from .explain import explain

    started = time.perf_counter()
    info = probe(data, name, limits)
    every = max(1, math.ceil(info.frames / limits.max_explained)) if info.frames else 1
    total = max(1, math.ceil(info.frames / every)) if info.frames else limits.max_explained
    views, maps, probs, targets, layer_name = [], [], [], [], layer
    pending: list[Image.Image] = []

    def flush():
        nonlocal layer_name
        if not pending:
            return
        result = explain(bundle, list(pending), methods=[method], layer=layer, target=target, cancel=cancel)
        layer_name = result.layer
        views.extend(result.input_image)
        maps.append(result.maps[method])
        probs.append(result.probs)
        targets.extend(int(t) for t in result.target)
        pending.clear()
        if progress is not None:
            progress(min(len(views), total), max(total, len(views)))

    for frame in iter_frames(data, name, limits, every=every, cancel=cancel):
        if len(views) + len(pending) >= limits.max_explained:
            break
        pending.append(frame)
        if len(pending) == batch:
            flush()
    flush()
    stacked = np.concatenate(maps).astype(np.float32)
    notes = [f"every {every}th frame explained ({info.frames} frames)"] if every > 1 else []
    return VideoExplanation(
        views=views, maps=stacked, smoothed=smooth_maps(stacked, smoothing), probs=np.concatenate(probs),
        targets=targets, labels=bundle.labels, fps=info.fps / every, every=every, info=info, method=method,
        layer=layer_name or bundle.default_layer, model=bundle.name, weights=bundle.weights,
        smoothing=smoothing, seconds=time.perf_counter() - started, notes=notes)


# --------------------------------------------------------------------------------------------------
# Encoding


def _even(image: Image.Image) -> np.ndarray:
    """RGB array with even width and height (H.264 in yuv420p needs them), padded by edge copy."""
    arr = np.asarray(image.convert("RGB"))
    h, w = arr.shape[:2]
    return np.pad(arr, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def encode_mp4(frames: Sequence[Image.Image], fps: float) -> bytes:
    """H.264 MP4 (yuv420p, plays in browsers) of ``frames`` at ``fps`` (rounded to a fraction)."""
    from fractions import Fraction

    av = _av()
    if not frames:
        raise InputError("no frame to encode")
    buffer = io.BytesIO()
    rate = Fraction(fps).limit_denominator(1001) if fps > 0 else Fraction(25)
    with av.open(buffer, mode="w", format="mp4") as container:
        first = _even(frames[0])
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = first.shape[1], first.shape[0]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "20", "preset": "veryfast"}
        for image in frames:
            arr = _even(image)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def encode_gif(frames: Sequence[Image.Image], fps: float) -> bytes:
    """An animated GIF (Pillow, looping) of ``frames`` at ``fps``."""
    if not frames:
        raise InputError("no frame to encode")
    buffer = io.BytesIO()
    duration = int(round(1000.0 / fps)) if fps > 0 else 40
    first, *rest = [f.convert("RGB") for f in frames]
    first.save(buffer, format="GIF", save_all=True, append_images=rest, duration=max(duration, 20), loop=0)
    return buffer.getvalue()
