"""Computing a whole view (several layers, errors isolated per family and per method) and a
background job that reports progress and can be cancelled."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
from PIL import Image

from ..errors import Cancelled, VislibError
from ..explain import Explanation, explain
from ..methods import METHODS
from .availability import cam_head_possible
from .catalogues import methods_by_family, uses_layer


@dataclass
class LayerRow:
    """One row of the results grid: the methods computed at one target layer."""

    layer: str
    methods: list[str]
    explanation: Explanation | None = None
    errors: dict[str, str] = field(default_factory=dict)  # method -> message
    explanations: dict[str, Explanation] = field(default_factory=dict)  # method -> its explanation

    def has(self, method: str) -> bool:
        return method in self.explanations


@dataclass
class ViewResult:
    """Everything the Explain page shows, picklable (it goes through ``st.cache_data``)."""

    rows: list[LayerRow]
    probs: np.ndarray | None
    target: int | None
    labels: list[str]
    input_image: Image.Image | None
    model: str
    weights: str
    score: str
    seconds: float
    pass_timings: dict[str, float] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)  # methods whose results came from the pass cache

    def top_k(self, k: int = 5) -> list[tuple[int, str, float]]:
        if self.probs is None:
            return []
        order = np.argsort(-self.probs)[:k]
        return [(int(i), self.labels[i], float(self.probs[i])) for i in order]

    @property
    def errors(self) -> list[tuple[str, str, str]]:
        """(layer, method, message) for every method that failed."""
        return [(row.layer, m, msg) for row in self.rows for m, msg in row.errors.items()]


def plan_rows(methods: Sequence[str], layer: str, extra_layers: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The first row holds every method; extra layer rows only the methods that depend on a layer."""
    rows = [(layer, list(methods))]
    layered = [m for m in methods if uses_layer(m)]
    for extra in extra_layers:
        if extra != layer and layered and extra not in [r[0] for r in rows]:
            rows.append((extra, layered))
    return rows


def split_doomed(bundle, methods: Sequence[str], layer: str) -> list[list[str]]:
    """``methods`` as groups to explain together: CAM alone when its head cannot be there."""
    if "cam" in methods and len(methods) > 1 and not cam_head_possible(bundle, layer):
        return [[m for m in methods if m != "cam"], ["cam"]]
    return [list(methods)]


def _error_text(exc: Exception) -> str:
    if isinstance(exc, VislibError):
        return str(exc)
    return f"unexpected error ({type(exc).__name__}: {exc})"


def _explain_isolated(
    bundle, image, methods, layer, *, explain_kw,
) -> tuple[dict[str, Explanation], dict[str, str]]:
    """Explain ``methods``; when that fails, retry per family, then per method, to isolate the failure.

    A :class:`Cancelled` is never swallowed; any other failure (a method that does not fit the model
    or layer, or a bug) only marks its own panel. Returns (method → explanation, method → message).
    """
    try:
        result = explain(bundle, image, methods, layer=layer, **explain_kw)
        return {m: result for m in methods}, {}
    except Cancelled:
        raise
    except Exception as exc:
        if len(methods) == 1:
            return {}, {methods[0]: _error_text(exc)}
    found: dict[str, Explanation] = {}
    errors: dict[str, str] = {}
    groups = methods_by_family({m: METHODS[m] for m in methods})
    for names in groups.values():
        if len(groups) == 1:  # the whole request was this family: go straight to single methods
            break
        try:
            result = explain(bundle, image, names, layer=layer, **explain_kw)
            found.update({m: result for m in names})
        except Cancelled:
            raise
        except Exception:
            pass
    for name in methods:
        if name in found:
            continue
        try:
            found[name] = explain(bundle, image, [name], layer=layer, **explain_kw)
        except Cancelled:
            raise
        except Exception as exc:
            errors[name] = _error_text(exc)
    return found, errors


def compute_view(
    bundle,
    image,
    methods: Sequence[str],
    *,
    layer: str | None = None,
    extra_layers: Sequence[str] = (),
    target=None,
    score: str = "logit",
    options: dict | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    cancel: threading.Event | None = None,
    image_name: str | None = None,
    cache=None,
) -> ViewResult:
    """Compute every panel of the Explain page.

    ``image``: anything :func:`vislib.load_image` takes. Input, layer and target errors raise a
    :class:`VislibError` (the whole view is unusable); a method that does not fit the model or layer
    only marks its own panel. ``progress(done, total, text)`` is called from this thread. ``cache``:
    a :class:`vislib.PassCache`, so that a view that differs only in its methods reuses the passes
    and results already computed.
    """
    from ..imageio import load_image

    start = time.perf_counter()
    image = load_image(image, name=image_name) if not isinstance(image, Image.Image) else image
    layer = layer or bundle.default_layer
    if layer not in bundle.layers:
        from ..hooks import resolve_layer

        resolve_layer(bundle, layer)  # raises a LayerError with a hint
    bad = [x for x in extra_layers if x not in bundle.layers]
    if bad:
        from ..hooks import resolve_layer

        resolve_layer(bundle, bad[0])
    plan = plan_rows(methods, layer, extra_layers)
    rows: list[LayerRow] = []
    first: Explanation | None = None
    for index, (row_layer, row_methods) in enumerate(plan):
        label = f"{row_layer} ({index + 1}/{len(plan)})" if len(plan) > 1 else row_layer

        def report(done: int, total: int, _label=label) -> None:
            if progress is not None:
                progress(done, total, _label)

        def waiting() -> None:
            if progress is not None:
                progress(0, 0, "waiting for a free GPU slot (other explanations are running)")

        explain_kw = dict(target=target, score=score, options=options, progress=report, cancel=cancel,
                          on_wait=waiting, cache=cache)
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled by the caller")
        found, errors = {}, {}
        for group in split_doomed(bundle, row_methods, row_layer):
            got, failed = _explain_isolated(bundle, image, group, row_layer, explain_kw=explain_kw)
            found.update(got)
            errors.update(failed)
        row = LayerRow(row_layer, list(row_methods), errors=errors, explanations=found)
        row.explanation = next(iter(found.values()), None)
        first = first or row.explanation
        rows.append(row)
    if first is None:  # every method failed: still show the prediction
        with bundle.lock, torch.no_grad():
            tensor, views = bundle.prepare([image])
            logits = bundle.logits(tensor)
        from ..targets import output_scores

        probs = output_scores(bundle.scores, logits)[0].cpu().numpy()  # never a softmax of probabilities
        from ..explain import resolve_targets

        tgt = int(resolve_targets(bundle.labels, logits, target)[0])
        view = views[0]
    else:
        probs, tgt, view = first.probs, int(cast(int, first.target)), first.view()  # one image: an int target
    timings: dict[str, float] = {}
    for row in rows:
        for expl in {id(e): e for e in row.explanations.values()}.values():
            for k, v in expl.pass_timings.items():
                timings[k] = timings.get(k, 0.0) + v
    return ViewResult(
        rows=rows, probs=probs, target=tgt, labels=list(bundle.labels), input_image=view,
        model=bundle.name, weights=bundle.weights, score=score, seconds=time.perf_counter() - start,
        pass_timings=timings,
        reused=sorted({m for row in rows for e in row.explanations.values() for m in e.reused
                       if m in row.methods}),
    )


def with_time_left(progress: Callable[[int, int, str], None], *, clock=time.monotonic
                   ) -> Callable[[int, int, str], None]:
    """``progress(done, total, label)`` with the rate and the time left added to the label, measured per
    label (one per layer row): ``layer4 passes at 12.3/s, 40 s left`` (from the second update on)."""
    from ..evaluate.progress import RateMeter

    meters: dict[tuple[str, int], RateMeter] = {}

    def report(done: int, total: int, label: str = "") -> None:
        if total:
            meter = meters.setdefault((label, total), RateMeter(clock=clock))
            meter.update(done, total)
            label = meter.rate_text(f"{label} passes" if label else "passes")
        progress(done, total, label)

    return report


class BackgroundJob:
    """Run ``fn(progress, cancel)`` in a worker thread, so the page can poll, draw and cancel.

    ``progress(done, total, text)`` updates :attr:`fraction` and :attr:`text`; :meth:`cancel` sets
    the event that vislib checks between passes (it raises :class:`Cancelled` there, leaving the
    model clean); :meth:`result` re-raises the worker's exception.
    """

    def __init__(self, fn: Callable[[Callable, threading.Event], object]):
        self._fn = fn
        self.cancel_event = threading.Event()
        self._finished = threading.Event()
        self._result: object = None
        self._error: BaseException | None = None
        self.fraction = 0.0
        self.text = ""
        self.started = 0.0
        self._thread = threading.Thread(target=self._run, name="vislib-job", daemon=True)

    def start(self) -> BackgroundJob:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def _progress(self, done: int, total: int, text: str = "") -> None:
        self.fraction = min(1.0, max(0.0, done / total)) if total else 0.0
        if not total:  # a status message (e.g. waiting for the GPU), not a count
            self.text = text
        else:
            self.text = f"{text}: {done}/{total}" if text else f"{done}/{total}"

    def _run(self) -> None:
        try:
            self._result = self._fn(self._progress, self.cancel_event)
        except BaseException as exc:  # handed to the caller in result()
            self._error = exc
        finally:
            self._finished.set()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    def cancel(self, join_timeout: float | None = 60.0) -> bool:
        """Ask the worker to stop and wait for it; True when it has finished."""
        self.cancel_event.set()
        self._thread.join(join_timeout)
        return self.done

    def result(self):
        if not self.done:
            raise RuntimeError("the job has not finished")
        if self._error is not None:
            raise self._error
        return self._result
