"""Video: caps checked before decoding, hostile files refused clearly, per-frame maps equal explain()'s,
the exponential moving average by hand, MP4 / GIF that decode back, progress and cancel."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image
from videos import clip, empty_video, encode, moving_square

import vislib
from vislib.video import (
    VideoLimits,
    encode_gif,
    encode_mp4,
    explain_video,
    iter_frames,
    probe,
    smooth_maps,
)


@pytest.fixture(scope="module")
def bundle():
    return vislib.load_model("shapes_resnet")


@pytest.mark.parametrize("kind", ["mp4", "webm", "gif"])
def test_probe_and_decode(kind):
    data = clip(kind, frames=12, size=(48, 32))
    info = probe(data, f"clip.{kind}")
    assert (info.width, info.height, info.frames) == (48, 32, 12) and info.fps == pytest.approx(10)
    frames = list(iter_frames(data, f"clip.{kind}"))
    assert len(frames) == 12 and frames[0].size == (48, 32)
    # the square moves right: the column of the brightest pixels increases
    cols = [int(np.asarray(f)[..., 0].mean(axis=0).argmax()) for f in frames]
    assert cols[-1] > cols[0]
    assert len(list(iter_frames(data, "clip", every=5))) == 3


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name,make,fragment", [
    ("cut.mp4", lambda: clip("mp4")[: len(clip("mp4")) // 2], "not a video PyAV can read"),
    ("wide.mp4", lambda: encode(moving_square(2, (4096, 16), 4)), "4096×16"),
    ("none.mp4", empty_video, "no video stream"),
    ("none.webm", lambda: empty_video("webm", "libvpx"), "e"),
    ("clip.txt", lambda: clip("mp4"), "not a video file type"),
    ("image.mp4", _png, "not a video"),
    ("noise.mp4", lambda: bytes(range(256)) * 8, "not a video PyAV can read"),
    ("empty.mp4", lambda: b"", "empty"),
])
def test_hostile_videos_get_a_clear_error(name, make, fragment):
    with pytest.raises(vislib.InputError, match=fragment) as info:
        list(iter_frames(make(), name))
    assert name in str(info.value)


def test_caps_are_checked_before_decoding(monkeypatch):
    data = clip("mp4", frames=12)
    for limits, fragment in [(VideoLimits(max_frames=10), "12 frames"), (VideoLimits(max_seconds=1), "lasts"),
                             (VideoLimits(max_pixels=1000), "megapixels"), (VideoLimits(max_bytes=100), "MB")]:
        decoded: list[int] = []
        monkeypatch.setattr("av.VideoFrame.to_image", lambda self, seen=decoded: seen.append(1))
        with pytest.raises(vislib.InputError, match=fragment):
            list(iter_frames(data, "clip.mp4", limits))
        assert decoded == []


def test_smoothing_is_the_exponential_moving_average():
    rng = np.random.default_rng(0)
    maps = rng.random((5, 4, 4)).astype(np.float32)
    beta = 0.7
    expected = [maps[0]]
    for m in maps[1:]:
        expected.append(beta * expected[-1] + (1 - beta) * m)
    np.testing.assert_allclose(smooth_maps(maps, beta), np.stack(expected), rtol=1e-6)
    np.testing.assert_array_equal(smooth_maps(maps, 0.0), maps)
    with pytest.raises(ValueError):
        smooth_maps(maps, 1.0)


def test_explain_video_matches_explain_per_frame(bundle):
    data = clip("mp4", frames=10)
    seen = []
    result = explain_video(bundle, data, "gradcam", name="c.mp4", smoothing=0.5, batch=4,
                           progress=lambda done, total: seen.append((done, total)))
    assert len(result) == 10 and result.maps.shape == (10, *bundle.input_hw)
    assert seen == [(4, 10), (8, 10), (10, 10)]
    frames = list(iter_frames(data, "c.mp4"))
    for t in (0, 7):
        one = vislib.explain(bundle, frames[t], methods=["gradcam"])
        np.testing.assert_allclose(result.maps[t], one.maps["gradcam"], atol=1e-5)
        assert result.targets[t] == one.target
    np.testing.assert_allclose(result.smoothed, smooth_maps(result.maps, 0.5), rtol=1e-6)
    assert result.overlay(3).size == result.views[3].size
    assert result.top_k(0, 2)[0][2] >= result.top_k(0, 2)[1][2]


def test_long_videos_are_sampled(bundle):
    result = explain_video(bundle, clip("mp4", frames=12), "gradcam", limits=VideoLimits(max_explained=4))
    assert result.every == 3 and len(result) == 4 and result.fps == pytest.approx(10 / 3)


def test_cancel(bundle):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(vislib.Cancelled):
        explain_video(bundle, clip("mp4"), "gradcam", cancel=cancel)


def test_encoded_mp4_and_gif_decode_back():
    frames = [Image.fromarray(a) for a in moving_square(8, (63, 41))]  # odd sides: padded for H.264
    mp4 = encode_mp4(frames, fps=8)
    info = probe(mp4, "out.mp4")
    assert (info.codec, info.width, info.height, info.frames) == ("h264", 64, 42, 8)
    back = list(iter_frames(mp4, "out.mp4"))
    err = np.abs(np.asarray(back[4], np.float32)[:41, :63] - np.asarray(frames[4], np.float32)).mean()
    assert err < 12  # lossy, but the same picture
    gif = Image.open(io.BytesIO(encode_gif(frames, fps=10)))  # GIF counts in 10 ms
    assert gif.n_frames == 8 and gif.info["duration"] == 100 and gif.size == (63, 41)
