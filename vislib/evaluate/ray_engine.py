"""The Ray engine: the same per-batch step on a Ray Data actor pool, on this machine or a cluster.

``Dataset.map_batches`` over the item numbers 0..n−1 (one block per batch) with a callable class:
each actor builds the model once from its spec (:class:`.plan.ModelRef`, never a pickled module),
opens the image set itself from its recipe (paths or zip members: the driver ships no pixels), and
runs the task on the rows it is given; the driver only collects the rows. Actors take one GPU each
when the cluster has GPUs, and ``threads`` CPU threads (default 1). Ray restarts an actor whose
process dies and retries its batches; the driver keeps the first copy of every row, so a run with a
killed worker still has every image exactly once.

Without ``address`` (or ``RAY_ADDRESS``) the run starts its own Ray and stops it at the end (also on
Ctrl-C or cancel): on the loopback interface only and without the dashboard, so nothing it starts is
reachable from the network. An ``address`` is the operator's own cluster: the run connects to it and
disconnects at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import sys
import threading
import time

import numpy as np
import torch

from .._optional import require
from ..datasets import ImageSet
from ..errors import Cancelled, VislibError
from ..models import ModelBundle
from .engine import EngineError
from .local import Progress, Task
from .plan import ModelRef, recipe_of, reopen

LOOPBACK = "127.0.0.1"
#: Ray reads it when it starts: "0" makes a local node take the loopback address (see _loopback_only)
CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_RUN_LOCK = threading.Lock()  # one Ray run per process at a time (a run may own the process's Ray)


def ray_available() -> bool:
    """Whether Ray (with Ray Data) is installed; does not import it."""
    import importlib.util

    return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.data") is not None


def require_ray():
    """The ``ray`` module (with Ray Data), or a clear error that says how to install it."""
    for module in ("ray.data", "ray"):
        ray = require(module, "ray", feature="the Ray engine", otherwise="use the local engine")
    return ray


@contextlib.contextmanager
def _loopback_only():
    """While a local Ray starts: its node address is the loopback, so every server it starts (GCS,
    raylet, object manager, workers, agents) listens on 127.0.0.1 only. Ray takes the loopback as a
    node's address when clusters are "not enabled", an environment setting read at import (by the
    processes Ray starts) and a constant (in this one); both are restored afterwards, so that a later
    connection to a real cluster from this process uses the network again."""
    from ray._private import ray_constants

    old_env, old_flag = os.environ.get(CLUSTER_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[CLUSTER_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(CLUSTER_ENV, None)
        else:
            os.environ[CLUSTER_ENV] = old_env


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def check_reachable(address: str, timeout: float = 5.0) -> str | None:
    """The host of a ``host:port`` address after checking that something listens there (Ray itself
    retries a wrong address for minutes); None for other forms (``auto``, ``ray://…``)."""
    import socket

    if "://" in address or ":" not in address:
        return None
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise EngineError(f"no Ray cluster answers at {address} ({exc}); check the address (the head "
                          "node's host:port, as `ray start --head` prints it)") from None
    return host


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None):
    """Ray for the duration of a run. Already initialised in this process (e.g. by the caller): used
    as is and left running. ``address`` (or ``RAY_ADDRESS``): connect, disconnect at the end.
    Neither: start a local Ray on the loopback without its dashboard, shut it down at the end.
    Yields a dict: ``owned``, ``address``, ``init_s`` (seconds to start or connect)."""
    ray = require_ray()
    if ray.is_initialized():
        yield {"owned": False, "address": "this process's Ray", "init_s": 0.0}
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    common = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    start = time.perf_counter()
    try:
        if address:
            host = check_reachable(address)
            with _loopback_only() if host is not None and _is_loopback(host) else contextlib.nullcontext():
                ray.init(address=address, **common)  # a loopback address stays one (Ray would rewrite it)
        else:
            with _loopback_only():
                ray.init(address="local", num_cpus=num_cpus, _node_ip_address=LOOPBACK, **common)
    except Exception as exc:  # Ray's own errors (ConnectionError, RuntimeError, ...): one line for the user
        with contextlib.suppress(Exception):
            ray.shutdown()
        where = f"connect to the Ray cluster at {address}" if address else "start a local Ray"
        first = (str(exc).strip().splitlines() or [""])[0]
        raise EngineError(f"could not {where}: {type(exc).__name__}: {first}") from None
    try:
        yield {"owned": True, "address": address or LOOPBACK, "init_s": time.perf_counter() - start}
    finally:
        ray.shutdown()


class _Worker:
    """One actor of the pool: builds the model and opens the image set once, then runs the task on
    each batch of item numbers it is handed."""

    def __init__(self, model: ModelRef, recipe: dict, task: Task, threads: int):
        torch.set_num_threads(max(1, threads))
        self.bundle = model.build()
        self.images = reopen(recipe)
        self.task = task

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.task(self.bundle, self.images, np.asarray(batch["data"], np.int64))


_RAISED = re.compile(r"\b(vislib(?:\.\w+)*)\.(\w+): (.+)")


def worker_error(exc: BaseException) -> VislibError | None:
    """The VislibError a worker raised, as a plain error of the same class with the worker's own
    message, dug out of Ray's wrappers: a chained exception, or (an actor that died while it was
    being built) the last ``vislib.<module>.<Class>: message`` line of the text. None if none."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, VislibError):
            cls = next(c for c in type(e).__mro__
                       if issubclass(c, VislibError) and c.__module__.startswith("vislib"))
            text = (str(e.args[0]) if e.args else str(e)).strip()
            return cls(text.splitlines()[0] if text else text)
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    for line in reversed(str(exc).splitlines()):
        found = _RAISED.search(line)
        if found:
            module, name, message = found.groups()
            raised = getattr(sys.modules.get(module), name, None)
            if isinstance(raised, type) and issubclass(raised, VislibError):
                return raised(message.strip())
    return None


def run_ray(task: Task, bundle: ModelBundle, images: ImageSet, n: int, *, address: str | None = None,
            workers: int | None = None, batch_size: int = 64, progress: Progress | None = None,
            cancel: threading.Event | None = None, unit: str = "images", info: dict | None = None,
            threads: int = 1, on_part=None) -> list[dict[str, np.ndarray]]:
    """``task`` over items 0..n−1 on a Ray Data actor pool of ``workers`` actors (default: one per
    GPU of the cluster, else one per CPU). Returns the rows of every batch (in completion order)."""
    ray = require_ray()
    model = ModelRef.of(bundle)
    recipe = recipe_of(images)
    info = info if info is not None else {}
    local_cpus = max(os.cpu_count() or 1, (workers or 1) * threads)
    if not _RUN_LOCK.acquire(blocking=False):
        if progress is not None:
            progress(0, 0, "waiting for another Ray run in this process to finish")
        while not _RUN_LOCK.acquire(timeout=0.2):
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled by the caller")
    try:
        if progress is not None:
            progress(0, 0, "starting Ray")
        with ray_session(address, num_cpus=local_cpus) as session:
            info.update(init_s=session["init_s"], address=session["address"])
            return _run_pool(ray, task, model, recipe, n, workers=workers, batch_size=batch_size,
                             progress=progress, cancel=cancel, unit=unit, info=info, threads=threads,
                             on_part=on_part)
    finally:
        _RUN_LOCK.release()


def _run_pool(ray, task, model, recipe, n, *, workers, batch_size, progress, cancel, unit, info, threads,
              on_part):
    """Size the pool for the cluster (one GPU per worker when it has GPUs), then stream."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if workers is None:
        workers = gpus or max(1, cpus // max(1, threads))
    if gpus and workers > gpus:
        raise EngineError(f"one GPU per worker: the cluster has {gpus} GPUs, so at most {gpus} workers")
    if not gpus and workers * threads > cpus:
        raise EngineError(f"the cluster has {cpus} CPUs: at most {cpus // max(1, threads)} workers of "
                          f"{threads} thread(s)")
    info["engine"] = f"ray ({workers} worker{'s' if workers > 1 else ''}" + (", 1 GPU each)" if gpus else ")")
    if recipe["kind"] == "zip" and isinstance(recipe["data"], bytes):
        recipe = {**recipe, "data": ray.put(recipe["data"])}  # once into the object store, not per actor
    with _quiet_ray_data(ray):
        return _stream(ray, task, model, recipe, n, workers=workers, gpus=gpus, batch_size=batch_size,
                       progress=progress, cancel=cancel, unit=unit, info=info, threads=threads,
                       on_part=on_part)


@contextlib.contextmanager
def _quiet_ray_data(ray):
    """No Ray Data progress bars or execution logs on the user's terminal (vislib draws its own bar);
    the settings are restored afterwards."""
    ctx = ray.data.DataContext.get_current()
    logger = logging.getLogger("ray.data")
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, logger.level)
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start = saved[:2]
        logger.setLevel(saved[2])


def _stream(ray, task, model, recipe, n, *, workers, gpus, batch_size, progress, cancel, unit, info, threads,
            on_part):
    """The actor pool over the item numbers, its rows streamed back as batches finish."""
    blocks = [np.arange(lo, min(n, lo + batch_size), dtype=np.int64) for lo in range(0, n, batch_size)]
    ds = ray.data.from_numpy(blocks).map_batches(
        _Worker, fn_constructor_kwargs=dict(model=model, recipe=recipe, task=task, threads=threads),
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=threads,
        num_gpus=1 if gpus else 0, batch_format="numpy", zero_copy_batch=True,
    )
    out: queue.Queue = queue.Queue()
    stopping = threading.Event()

    def pump() -> None:  # iterate in a helper thread, so that cancel and Ctrl-C are seen at once
        batches = ds.iter_batches(batch_size=None, batch_format="numpy")
        try:
            for part in batches:
                if stopping.is_set():
                    break  # leaving the loop closes the iterator: Ray Data stops its executor
                out.put(("rows", part))
            out.put(("done", None))
        except BaseException as exc:  # handed to the driver's thread
            out.put(("error", exc))

    start = time.perf_counter()
    thread = threading.Thread(target=pump, name="vislib-ray-pump", daemon=True)
    thread.start()
    parts, got = [], np.zeros(n, bool)
    try:
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled by the caller")
            try:
                kind, value = out.get(timeout=0.1)
            except queue.Empty:
                continue
            if kind == "done":
                break
            if kind == "error":
                found = worker_error(value)
                if found is not None:
                    raise found from None
                last = (str(value).strip().splitlines() or [""])[-1]
                raise EngineError(f"the Ray run failed: {type(value).__name__}: {last}")
            if "first_s" not in info:
                info["first_s"] = time.perf_counter() - start
            index = np.asarray(value["index"], np.int64)
            new = ~got[index]
            if not new.all():  # a batch retried after a crash may come twice: keep each item once
                value = {k: np.asarray(v)[new] for k, v in value.items()}
            got[index] = True
            if on_part is not None:
                on_part(value)
            else:
                parts.append(value)
            if progress is not None:
                progress(int(got.sum()), n, unit)
    finally:
        stopping.set()
        thread.join(timeout=2.0)  # a pump waiting for a batch ends when Ray shuts down
    info["run_s"] = time.perf_counter() - start
    return parts
