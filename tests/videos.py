"""Generated test videos (PyAV itself encodes them): a square moving across a plain background."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np


def moving_square(frames: int = 12, size: tuple[int, int] = (64, 64), side: int = 16) -> list[np.ndarray]:
    """``frames`` RGB frames (H×W×3 uint8): a white square moving left to right on dark blue."""
    h, w = size[1], size[0]
    out = []
    for t in range(frames):
        arr = np.zeros((h, w, 3), np.uint8)
        arr[..., 2] = 90
        x = int(round(t * (w - side) / max(frames - 1, 1)))
        y = (h - side) // 2
        arr[y:y + side, x:x + side] = 255
        out.append(arr)
    return out


def encode(frames: list[np.ndarray], *, fmt: str = "mp4", codec: str = "libx264", fps: int = 10,
           pix_fmt: str = "yuv420p") -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = pix_fmt
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def clip(kind: str = "mp4", frames: int = 12, size: tuple[int, int] = (64, 64)) -> bytes:
    """A moving-square clip as MP4 (H.264), WebM (VP8) or GIF."""
    data = moving_square(frames, size)
    if kind == "mp4":
        return encode(data)
    if kind == "webm":
        return encode(data, fmt="webm", codec="libvpx")
    if kind == "gif":
        return encode(data, fmt="gif", codec="gif", pix_fmt="rgb8")
    raise ValueError(kind)


def empty_video(fmt: str = "mp4", codec: str = "mpeg4", size: tuple[int, int] = (64, 64)) -> bytes:
    """A container whose header is written and holds no frame."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=Fraction(10))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
    return buffer.getvalue()


def y4m(path, frames: int = 30, size: tuple[int, int] = (64, 64)) -> None:
    """A raw YUV4MPEG2 clip (Chromium's fake camera source) whose content changes frame to frame."""
    with av.open(str(path), mode="w", format="yuv4mpegpipe") as container:
        stream = container.add_stream("rawvideo", rate=Fraction(10))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for arr in moving_square(frames, size, side=size[0] // 3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
