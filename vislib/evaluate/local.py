"""The local engine: the per-batch step in this process, batch after batch (the embedded default)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from ..datasets import ImageSet
from ..errors import Cancelled
from ..models import ModelBundle

Task = Callable[..., dict]  # task(bundle, images, rows, cancel=...) -> per-row columns
Progress = Callable[[int, int, str], None]


def run_local(task: Task, bundle: ModelBundle, images: ImageSet, n: int, *, batch_size: int = 64,
              progress: Progress | None = None, cancel: threading.Event | None = None,
              unit: str = "images",
              on_part: Callable[[dict], None] | None = None) -> list[dict[str, np.ndarray]]:
    """``task`` over rows 0..n−1 in batches of ``batch_size``; ``progress(done, n, unit)`` after each
    batch; ``cancel`` is checked before each batch (:class:`vislib.Cancelled`). With ``on_part``,
    each batch's rows go there (a streaming reduce) instead of into the returned list."""
    parts = []
    for lo in range(0, n, batch_size):
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled by the caller")
        rows = np.arange(lo, min(n, lo + batch_size))
        part = task(bundle, images, rows, cancel=cancel)
        if on_part is not None:
            on_part(part)
        else:
            parts.append(part)
        if progress is not None:
            progress(int(rows[-1]) + 1, n, unit)
    return parts
