""":func:`evaluate`: a model and its explanations over a labelled image set, on either engine."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence

import torch

from .. import metrics
from ..datasets import ImageSet
from ..errors import InputError, MethodError
from ..explain import parse_methods
from ..hooks import resolve_layer
from ..metrics.trust import parse_metrics
from ..models import ModelBundle
from .engine import run
from .local import Progress
from .records import EvalResult, assemble
from .step import EvalConfig, evaluate_rows


def evaluate(
    bundle: ModelBundle,
    images: ImageSet,
    methods: Sequence[str] | str = ("gradcam",),
    *,
    layer: str | None = None,
    explained: str = "predicted",
    batch_size: int = 64,
    confidence: bool = True,
    curves: int = 0,
    curve_steps: int = 32,
    tolerance: int | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    engine: str = "local",
    address: str | None = None,
    workers: int | None = None,
    threads: int | None = None,
    maps_dir: str | None = None,
    trust: Sequence[str] | str = (),
    _on_batch: Callable[[torch.Tensor], float] | None = None,
) -> EvalResult:
    """Predict every image of ``images`` and measure the ``methods``' maps.

    ``explained``: the class the maps explain, ``"predicted"`` (why did it say that?) or ``"true"``
    (what did it see of the right class? the pointing game's usual convention). ``confidence``:
    also compute the confidence on ``map ⊙ image`` (one more forward per method and batch).
    ``curves``: deletion and insertion curves for the first N images (2·``curve_steps`` + 1
    forwards per image and method). ``tolerance``: the pointing game's, in px (default: 15 px at
    224, scaled). ``progress(done, total, text)`` is called after every batch; setting ``cancel``
    stops at the next batch with :class:`vislib.Cancelled`.

    ``engine``: ``"local"`` (this process) or ``"ray"`` (a Ray Data actor pool: ``address`` of a
    cluster, else ``RAY_ADDRESS``, else a local Ray started and stopped by this call; ``workers``
    actors, default one per GPU or CPU, each with ``threads`` torch threads, default 1). Both run
    the same per-batch step and merge the rows with the same code: the results are equal up to
    floating-point noise. ``maps_dir``: also write every image's maps there, in compressed shards
    (float16, ``maps-<first index>.npz``). ``trust``: metrics of :mod:`vislib.metrics.trust` (e.g.
    ``"road,faithfulness_correlation"``) per image for every method and the random map; summarised
    by :meth:`EvalResult.trust_report`.
    """
    names = parse_methods(methods)
    if explained not in ("predicted", "true"):
        raise MethodError(f"explained must be 'predicted' or 'true', not {explained!r}")
    if images.labels != bundle.labels:
        raise InputError("the image set was matched to another model's labels")
    layer_name, _ = resolve_layer(bundle, layer)
    n = len(images)
    if n == 0:
        raise InputError(f"{images.name}: no images to evaluate")
    size = bundle.input_size
    tol = metrics.default_tolerance(size, size) if tolerance is None else tolerance
    config = EvalConfig(methods=tuple(names), layer=layer_name, explained=explained, confidence=confidence,
                        curves=max(0, int(curves)), curve_steps=curve_steps, tolerance=tol,
                        reference_box=images.reference_box, image_size=images.image_size,
                        maps_dir=str(maps_dir) if maps_dir else None,
                        trust=tuple(parse_metrics(trust)) if trust else ())
    excluded = [0.0]  # the throughput reference's seconds, left out of the wall time
    on_inputs: Callable[[torch.Tensor], float] | None = None
    if _on_batch is not None:
        def count(inputs: torch.Tensor) -> float:
            spent = _on_batch(inputs)
            excluded[0] += spent
            return spent

        on_inputs = count

    task = functools.partial(evaluate_rows, config=config, on_inputs=on_inputs) if on_inputs else \
        functools.partial(evaluate_rows, config=config)
    info: dict = {}
    start = time.perf_counter()
    parts = run(task, bundle, images, n, engine=engine, address=address, workers=workers,
                batch_size=batch_size, progress=progress, cancel=cancel, unit="images", info=info,
                threads=threads)
    wall = time.perf_counter() - start - excluded[0]
    result = assemble(parts, ids=images.ids, targets=images.targets, model=bundle.name,
                      weights=bundle.weights, layer=layer_name, labels=list(bundle.labels),
                      dataset=images.name, methods=names, explained=explained, tolerance=tol,
                      has_masks=bool(images.has_masks), reference_box=images.reference_box, wall=wall,
                      engine=info.get("engine", engine))
    for key in ("init_s", "first_s"):
        if key in info:
            result.timings[f"ray_{key[:-2]}"] = info[key]
    return result
