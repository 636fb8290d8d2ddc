"""Engines run one task (a per-batch step) over a dataset and hand back the rows of every batch.

``local`` (the default) runs the step in this process; ``ray`` runs it on a Ray Data actor pool, on
this machine or a cluster (:mod:`.ray_engine`). The task is the same function in both, and so is the
code that merges the rows on the driver.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from ..datasets import ImageSet
from ..errors import MissingDependency, VislibError  # noqa: F401  (MissingDependency: re-exported)
from ..models import ModelBundle
from .local import Progress, Task, run_local

ENGINES = ("local", "ray")


class EngineError(VislibError, RuntimeError):
    """An engine that cannot run: a bad option, a cluster that cannot be reached, a worker that fails."""


def check_engine(engine: str, address: str | None, workers: int | None, threads: int | None = None) -> None:
    if engine not in ENGINES:
        raise EngineError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "local" and (address or workers):
        raise EngineError("address and workers are options of engine='ray'")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise EngineError(f"workers must be a positive number, not {workers!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise EngineError(f"threads must be a positive number, not {threads!r}")


def run(task: Task, bundle: ModelBundle, images: ImageSet, n: int, *, engine: str = "local",
        address: str | None = None, workers: int | None = None, batch_size: int = 64,
        progress: Progress | None = None, cancel: threading.Event | None = None,
        unit: str = "images", info: dict | None = None, on_part: Callable[[dict], None] | None = None,
        threads: int | None = None) -> list[dict[str, np.ndarray]]:
    """The rows of ``task`` over items 0..n−1 (in any order: the caller merges them by ``index``;
    every task returns one row per item, with its number in ``index``). With ``on_part`` each batch's
    rows go there as they arrive and nothing is kept. ``info`` receives what the engine did (e.g.
    ``engine``: "ray (2 workers)"). ``threads``: torch threads per Ray worker (default 1)."""
    check_engine(engine, address, workers, threads)
    if batch_size < 1:
        raise EngineError(f"batch_size must be a positive number, not {batch_size}")
    if engine == "local":
        if info is not None:
            info["engine"] = "local"
        return run_local(task, bundle, images, n, batch_size=batch_size, progress=progress, cancel=cancel,
                         unit=unit, on_part=on_part)
    from .ray_engine import run_ray

    return run_ray(task, bundle, images, n, address=address, workers=workers, batch_size=batch_size,
                   progress=progress, cancel=cancel, unit=unit, info=info, on_part=on_part,
                   threads=threads or 1)
