"""Live: the frame step equals explain(), the newest-frame slot drops and never queues, the worker
keeps up with the newest frame."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import vislib
from vislib.live import LiveExplainer, LiveFrame, NewestFrame, live_step, rtc_configuration, synthetic_frames


@pytest.fixture(scope="module")
def bundle():
    return vislib.load_model("shapes_resnet")


def test_live_step_is_explain_on_the_frame(bundle):
    frame = next(synthetic_frames(1, size=(160, 120), side=40))
    out = live_step(bundle, frame, "gradcam", top=3)
    ref = vislib.explain(bundle, vislib.load_image(frame), methods=["gradcam"])
    np.testing.assert_allclose(out.map, ref.maps["gradcam"], atol=1e-6)
    assert out.top == ref.top_k(3) and out.target == ref.target
    assert out.overlay.size == ref.input_image.size
    expected = vislib.overlay(ref.input_image, ref.maps["gradcam"])
    assert np.abs(np.asarray(out.overlay, np.int16) - np.asarray(expected, np.int16)).max() <= 1


def test_newest_frame_keeps_only_the_newest():
    slot = NewestFrame()
    assert slot.take(timeout=0.01) is None
    for i in range(5):
        slot.put(i)
    assert len(slot) == 1 and slot.dropped == 4
    assert slot.take() == (5, 4)
    assert len(slot) == 0 and slot.take(timeout=0.01) is None


def test_newest_frame_under_threads():
    """A fast producer and a slow consumer: the consumer sees increasing numbers, every frame is
    either taken or dropped, and nothing waits in between."""
    slot = NewestFrame()
    taken: list[int] = []
    done = threading.Event()

    def consume():
        while not done.is_set() or len(slot):
            item = slot.take(timeout=0.01)
            if item is not None:
                taken.append(item[0])
                time.sleep(0.005)

    worker = threading.Thread(target=consume)
    worker.start()
    for i in range(2000):
        slot.put(i)
    done.set()
    worker.join()
    assert taken == sorted(taken) and len(set(taken)) == len(taken)
    assert len(taken) + slot.dropped == 2000 and slot.dropped > 0
    assert taken[-1] == 2000  # the newest frame is never lost


def test_explainer_explains_the_newest_frame(bundle):
    gate = threading.Event()
    calls: list[int] = []

    def slow_step(bundle, frame, **settings):
        gate.wait(5)
        calls.append(int(frame))
        return LiveFrame(view=None, map=np.zeros((2, 2)), overlay=None, top=[], target=0, seconds=0.0)

    with LiveExplainer(bundle, step=slow_step) as live:
        live.submit(0)
        time.sleep(0.2)  # the worker took frame 0 and waits at the gate
        for i in range(1, 10):
            live.submit(i)  # frames 1..8 are dropped, 9 waits
        gate.set()
        deadline = time.time() + 5
        while live.explained < 2 and time.time() < deadline:
            time.sleep(0.01)
    assert calls == [0, 9] and live.slot.dropped == 8 and live.latest().number == 10


def test_explainer_reports_a_bad_setting_and_goes_on(bundle):
    frame = next(synthetic_frames(1, size=(64, 64), side=16))
    with LiveExplainer(bundle, method="gradcam", layer="no_such_layer") as live:
        live.submit(frame)
        deadline = time.time() + 10
        while live.error is None and time.time() < deadline:
            time.sleep(0.02)
        assert "no_such_layer" in live.error
        live.update(layer=None)
        live.submit(frame)
        while live.latest() is None and time.time() < deadline + 10:
            time.sleep(0.02)
    assert live.latest() is not None and live.error is None


def test_idle_worker_ends_and_restarts(bundle):
    frame = next(synthetic_frames(1, size=(64, 64), side=16))
    with LiveExplainer(bundle, idle=0.3) as live:
        deadline = time.time() + 5
        while live.running and time.time() < deadline:
            time.sleep(0.05)
        assert not live.running  # no frame for 0.3 s: the thread is gone
        live.submit(frame)
        assert live.running
        while live.explained == 0 and time.time() < deadline + 10:
            time.sleep(0.02)
    assert live.explained == 1


def test_live_benchmark_row():
    """benchmarks.run --live's row, on a very short run (the figures come from the benchmark, not here)."""
    from benchmarks.live import markdown, measure

    row = measure("shapes_resnet", None, seconds=0.5, warmup=1)
    assert row["model"] == "shapes_resnet" and row["input"] == "128×128"
    assert row["explained fps"] > 0 and row["dropped"] >= 0
    assert markdown([row]).count("\n") == 2


def test_no_outside_ice_server_by_default():
    assert rtc_configuration({}) == {"iceServers": []}
    assert rtc_configuration({"VISLIB_ICE_SERVERS": "not json"}) == {"iceServers": []}
    assert rtc_configuration({"VISLIB_ICE_SERVERS": '{"urls": "x"}'}) == {"iceServers": []}
    given = [{"urls": ["stun:stun.example.org:3478"]}]
    assert rtc_configuration({"VISLIB_ICE_SERVERS": '[{"urls": ["stun:stun.example.org:3478"]}]'}) == {
        "iceServers": given}
