"""Evaluate a model and its explanations over a labelled image set: pure functions, no UI.

:func:`evaluate` runs the image set through the explanation methods in batches and keeps, per image,
the prediction, the class probabilities and, per method, the numbers of :mod:`vislib.metrics`:
where the map peaks, whether that is on the object (pointing game) and how much of the map lies on it
(energy), wherever the set has object masks; the confidence on ``map ⊙ image`` (Average Drop,
Increase in Confidence); deletion and insertion curves for the first images. The image-centre
baseline is computed beside every method. Maps are not kept in memory (a 2000-image split would
need 130 MB per method; ``maps_dir`` writes them to disk); :func:`explain_error` recomputes the few
that a person looks at.

The package: :mod:`.step` (the one per-batch step), :mod:`.local` and :mod:`.ray_engine` (the
engines that run it), :mod:`.records` (the per-image rows and :class:`EvalResult`), :mod:`.report`
(tables, Parquet, JSON, figures, HTML), :mod:`.error_view` (one error up close), :mod:`.speed`.

The module itself is callable: ``vislib.evaluate(bundle, images, ...)`` is :func:`evaluate`.
"""

from __future__ import annotations

import sys
import types

from ..explain import explain  # noqa: F401  (importable from here, as before the package)
from .api import evaluate
from .engine import ENGINES, EngineError, MissingDependency, run
from .error_view import ErrorView, contrast_map, explain_error, why_rather_than
from .local import Progress
from .plan import ModelRef, weights_fingerprint
from .progress import RateMeter
from .records import (
    CENTRE,
    KEYS,
    METRIC_COLUMNS,
    METRIC_FORMATS,
    EvalResult,
    assemble,
    shortcut_class,
    shortcut_summary,
)
from .report import (
    cell_from_selection,
    class_names,
    confusion_figure,
    contrast_image,
    curves_figure,
    html_report,
    image_metrics_table,
    image_table,
    method_label,
    per_class_figure,
    require_pyarrow,
    summary,
    table_rows,
    write_report,
    write_tables,
)
from .speed import bare_gradcam, throughput
from .step import (
    EvalConfig,
    explain_batch,
    map_bytes,
    mask_view,
    read_maps,
    reference_mask,
    to_inputs,
)


def ray_available() -> bool:
    """Whether the Ray engine can run here (Ray with Ray Data is installed)."""
    from .ray_engine import ray_available as available

    return available()


__all__ = [
    "explain", "evaluate", "ENGINES", "EngineError", "MissingDependency", "run", "ErrorView",
    "contrast_map", "explain_error", "why_rather_than", "Progress", "ModelRef", "weights_fingerprint",
    "RateMeter",
    "CENTRE", "KEYS", "METRIC_COLUMNS", "METRIC_FORMATS", "EvalResult", "assemble", "shortcut_class",
    "shortcut_summary",
    "cell_from_selection", "class_names", "confusion_figure", "contrast_image", "curves_figure",
    "html_report", "image_metrics_table", "image_table", "method_label", "per_class_figure",
    "require_pyarrow", "summary", "table_rows", "write_report", "write_tables", "bare_gradcam",
    "throughput", "EvalConfig", "explain_batch", "map_bytes", "mask_view", "read_maps", "reference_mask",
    "to_inputs", "ray_available",
]


class _CallableModule(types.ModuleType):
    """``vislib.evaluate(...)`` calls :func:`evaluate`; ``vislib.evaluate.X`` is the module's X."""

    def __call__(self, *args, **kwargs):
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
