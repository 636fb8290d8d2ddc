"""Live explanations of a camera stream: one frame step, a newest-frame slot and a worker between them.

A camera gives frames faster than a model explains them. Frames are never queued: each new frame
replaces the one waiting in a :class:`NewestFrame` slot (the stale one is dropped and counted), and a
:class:`LiveExplainer` worker thread explains whatever is newest when it is free, so the map shown is
never more than one explanation behind the camera. The camera callback (streamlit-webrtc calls it on
its own thread) only calls :meth:`LiveExplainer.submit` and :meth:`LiveExplainer.latest`, which never
wait for the model. The model is shared: :func:`vislib.explain` holds ``bundle.lock`` around its passes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .explain import explain
from .models import ModelBundle
from .render import overlay


@dataclass(frozen=True)
class LiveFrame:
    """One explained frame: the model's input view, its map, the overlay and the top classes."""

    view: Image.Image
    map: np.ndarray
    overlay: Image.Image
    top: list[tuple[int, str, float]]
    target: int
    seconds: float
    number: int = 0  # the frame's submission number (to tell results apart)
    source: np.ndarray | None = None  # the camera frame itself (what "freeze" hands to the Explain page)


def live_step(bundle: ModelBundle, frame: np.ndarray | Image.Image, method: str = "gradcam",
              layer: str | None = None, *, target=None, alpha: float = 0.5, colormap: str = "jet",
              top: int = 3) -> LiveFrame:
    """Explain one RGB frame (H×W×3 uint8 or a PIL image): the map over the model's input view and
    the ``top`` classes. ``target``: a class, or ``None`` for the frame's top class."""
    started = time.perf_counter()
    image = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame, dtype=np.uint8))
    result = explain(bundle, image.convert("RGB"), methods=[method], layer=layer, target=target)
    values = result.maps[method]
    view = result.view()
    return LiveFrame(view=view, map=values, overlay=overlay(view, values, alpha=alpha, colormap=colormap),
                     top=result.top_k(top), target=result.class_index(),
                     seconds=time.perf_counter() - started)


class NewestFrame:
    """A one-place, thread-safe slot: :meth:`put` replaces what waits (counted in ``dropped``),
    :meth:`take` waits for a frame and empties the slot. Never a queue."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: tuple[int, Any] | None = None
        self._number = 0
        self.dropped = 0
        self.put_count = 0

    def put(self, item) -> int:
        """Offer ``item``; returns its number (1, 2, ...). Never blocks for longer than the lock."""
        with self._cond:
            if self._item is not None:
                self.dropped += 1
            self._number += 1
            self.put_count += 1
            self._item = (self._number, item)
            self._cond.notify()
            return self._number

    def take(self, timeout: float | None = None):
        """``(number, item)`` of the newest frame, or ``None`` after ``timeout`` seconds without one."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._item is not None, timeout=timeout):
                return None
            item, self._item = self._item, None
            return item

    def __len__(self) -> int:
        with self._cond:
            return int(self._item is not None)


class LiveExplainer:
    """A worker thread that explains the newest submitted frame with ``step`` (default :func:`live_step`)
    and keeps the latest result; ``settings`` (method, layer, alpha, ...) can change while it runs.
    The worker ends after ``idle`` seconds without a frame (a closed tab leaves no thread behind) and
    starts again with the next :meth:`submit`."""

    def __init__(self, bundle: ModelBundle, *, step: Callable[..., LiveFrame] = live_step, idle: float = 30.0,
                 **settings):
        self.bundle = bundle
        self.step = step
        self.settings = dict(settings)
        self.slot = NewestFrame()
        self.explained = 0
        self.error: str | None = None
        self._latest: LiveFrame | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.idle = idle
        self._thread = threading.Thread(target=self._run, name="vislib-live", daemon=True)
        self._thread.start()

    def submit(self, frame) -> int:
        number = self.slot.put(frame)
        with self._lock:
            if not self._thread.is_alive() and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="vislib-live", daemon=True)
                self._thread.start()
        return number

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def latest(self) -> LiveFrame | None:
        with self._lock:
            return self._latest

    def update(self, **settings) -> None:
        with self._lock:
            self.settings.update(settings)

    def _run(self) -> None:
        from .errors import VislibError

        waited = time.monotonic()
        while not self._stop.is_set():
            taken = self.slot.take(timeout=0.1)
            if taken is None:
                if time.monotonic() - waited > self.idle:
                    return
                continue
            waited = time.monotonic()
            number, frame = taken
            with self._lock:
                settings = dict(self.settings)
            try:
                result = self.step(self.bundle, frame, **settings)
            except VislibError as exc:  # a wrong layer / method: shown, and the stream goes on
                self.error = str(exc)
                continue
            self.error = None
            with self._lock:
                self._latest = _numbered(result, number, frame)
                self.explained += 1

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def __enter__(self) -> LiveExplainer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _numbered(result: LiveFrame, number: int, frame) -> LiveFrame:
    from dataclasses import replace

    return replace(result, number=number, source=frame if isinstance(frame, np.ndarray) else None)


def rtc_configuration(env: dict | None = None) -> dict:
    """The WebRTC configuration of the Live page: no ICE server by default, so nothing outside the
    page's own network is contacted (the browser and the server meet on their local addresses);
    ``VISLIB_ICE_SERVERS`` may give a JSON list, e.g. ``[{"urls": ["stun:stun.example.org:3478"]}]``.
    A value that is not a JSON list is ignored (no server), never an error."""
    import json
    import os

    text = (os.environ if env is None else env).get("VISLIB_ICE_SERVERS", "")
    try:
        servers = json.loads(text) if text.strip() else []
    except json.JSONDecodeError:
        servers = []
    return {"iceServers": servers if isinstance(servers, list) else []}


def synthetic_frames(count: int, size: tuple[int, int] = (640, 480), side: int = 160):
    """A synthetic camera: ``count`` RGB frames of a bright square circling over a gradient."""
    width, height = size
    base = np.zeros((height, width, 3), np.uint8)
    base[..., 0] = np.linspace(40, 120, width, dtype=np.uint8)[None, :]
    base[..., 2] = np.linspace(120, 40, height, dtype=np.uint8)[:, None]
    for t in range(count):
        arr = base.copy()
        angle = 2 * np.pi * t / 60
        x = int((width - side) / 2 * (1 + 0.8 * np.cos(angle)))
        y = int((height - side) / 2 * (1 + 0.8 * np.sin(angle)))
        arr[y:y + side, x:x + side] = (250, 220, 40)
        yield arr
