"""Records of an evaluation: the per-image rows that every engine produces, and :class:`EvalResult`,
the table they are merged into on the driver.

A batch's rows are plain columns (``dict[str, np.ndarray]``, one entry per image, images that could
not be read included with the reason), so the local engine and the Ray engine hand back the same
thing and :func:`assemble` turns either into the same :class:`EvalResult`: sorted by image, each
image exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import metrics
from .._version import __version__
from ..metrics import Curves

CENTRE = "centre"  # the image-centre baseline, reported beside the methods
METRIC_COLUMNS = {
    "pointing": "Pointing game (per-class mean)",
    "energy": "Energy inside mask",
    "average_drop": "Average Drop %",
    "increase": "Increase in Confidence %",
    "deletion_auc": "Deletion AUC",
    "insertion_auc": "Insertion AUC",
    "reference": "Peak on reference box",
}
#: How each column of the metrics table is written (printf style): one format per column, so a row
#: never mixes "72.0128" and "2".
METRIC_FORMATS = {
    "pointing": "%.2f", "energy": "%.2f", "average_drop": "%.1f", "increase": "%.1f",
    "deletion_auc": "%.3f", "insertion_auc": "%.3f", "reference": "%.2f",
}
#: the per-image numbers kept for every method (NaN where not computed)
KEYS = ("pointing", "energy", "y", "o", "average_drop", "increase", "deletion_auc", "insertion_auc",
        "reference")
#: per-batch seconds, spread evenly over the batch's rows (so sums over rows are totals)
TIME_COLUMNS = ("load", "explain", "metrics")


TRUST_PREFIX = "trust_"  # per-image columns of vislib.metrics.trust metrics: method|trust_<metric>
TRUST_RANDOM = "random"  # the random-map baseline of the trust metrics


def column(method: str, key: str) -> str:
    """The name of a per-image column: ``method|key``."""
    return f"{method}|{key}"


@dataclass
class EvalResult:
    """Predictions and per-method metrics for every image of an image set (arrays over images)."""

    model: str
    weights: str
    layer: str
    labels: list[str]
    dataset: str
    ids: list[str]
    index: np.ndarray  # position of each image in the image set
    targets: np.ndarray  # true class
    probs: np.ndarray  # N×C softmax
    methods: list[str]
    explained: str  # "predicted" or "true": the class the maps explain
    metrics: dict[str, dict[str, np.ndarray]]  # method (and "centre") → metric → N values (NaN: not computed)
    peaks: dict[str, np.ndarray]  # method → N×2 (y, x) of the map's maximum at input resolution
    curves: dict[str, Curves] = field(default_factory=dict)  # method → curves of the first images
    failed: list[tuple[str, str]] = field(default_factory=list)  # (id, why) of images that did not load
    timings: dict[str, float] = field(default_factory=dict)
    tolerance: int = 0
    has_masks: bool = False
    reference_box: tuple[str, tuple[int, int, int, int]] | None = None
    notes: list[str] = field(default_factory=list)
    engine: str = "local"  # "local" or "ray (N workers)"
    vislib_version: str = __version__  # provenance: the vislib that ran the evaluation

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(axis=1) if len(self) else np.zeros(0, np.int64)

    @property
    def confidence(self) -> np.ndarray:
        """Probability of the predicted class."""
        return self.probs.max(axis=1) if len(self) else np.zeros(0)

    @property
    def correct(self) -> np.ndarray:
        return self.preds == self.targets

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self) else float("nan")

    @property
    def classes(self) -> list[int]:
        """The classes that occur as a true or a predicted class (the confusion matrix's rows)."""
        return sorted(set(self.targets.tolist()) | set(self.preds.tolist()))

    def per_class_accuracy(self) -> dict[int, tuple[float, int]]:
        """True class → (accuracy, number of images), for classes with images."""
        out = {}
        for c in sorted(set(self.targets.tolist())):
            sel = self.targets == c
            out[c] = (float(self.correct[sel].mean()), int(sel.sum()))
        return out

    def confusion(self) -> tuple[np.ndarray, list[int]]:
        """(counts[true, predicted], classes) over :attr:`classes`."""
        classes = self.classes
        pos = {c: i for i, c in enumerate(classes)}
        matrix = np.zeros((len(classes), len(classes)), np.int64)
        for t, p in zip(self.targets.tolist(), self.preds.tolist(), strict=True):
            matrix[pos[t], pos[p]] += 1
        return matrix, classes

    def misclassified(self, true: int | None = None, predicted: int | None = None) -> np.ndarray:
        """Rows of the wrongly classified images, most confident first, optionally one confusion cell."""
        sel = ~self.correct
        if true is not None:
            sel &= self.targets == true
        if predicted is not None:
            sel &= self.preds == predicted
        rows = np.flatnonzero(sel)
        return rows[np.argsort(-self.confidence[rows], kind="stable")]

    def method_table(self) -> list[dict]:
        """One row per method (and the centre baseline): the dataset means of each metric."""
        rows = []
        for name in [*self.methods, CENTRE]:
            values = self.metrics.get(name, {})
            row: dict = {"method": name}
            for key in METRIC_COLUMNS:
                v = values.get(key)
                if v is None or not np.isfinite(v).any():
                    row[key] = float("nan")
                elif key == "pointing":
                    row[key] = metrics.per_class_mean(v, self.targets)
                elif key == "average_drop":
                    row[key] = metrics.average_drop(values["y"][np.isfinite(v)], values["o"][np.isfinite(v)])
                elif key == "increase":
                    row[key] = metrics.increase_in_confidence(values["y"][np.isfinite(v)],
                                                              values["o"][np.isfinite(v)])
                else:
                    row[key] = float(np.nanmean(v))
            rows.append(row)
        return rows

    def trust_report(self, *, n_boot: int = 1000, seed: int = 0):
        """The trust metrics over the dataset (:func:`vislib.metrics.trust.summarise`): per method and
        metric, the mean with its bootstrap interval beside the random map's and the image centre's."""
        from ..metrics import trust

        values = {m: {k[len(TRUST_PREFIX):]: v for k, v in self.metrics.get(m, {}).items()
                      if k.startswith(TRUST_PREFIX)} for m in [*self.methods, TRUST_RANDOM, CENTRE]}
        return trust.summarise(values, [*self.methods], random=TRUST_RANDOM, centre=CENTRE,
                               n_boot=n_boot, seed=seed)

    def reference_share(self, method: str, rows: np.ndarray | None = None) -> float:
        """Share of images (of ``rows``) whose map peaks on the reference box (e.g. the mark corner)."""
        v = self.metrics.get(method, {}).get("reference")
        if v is None:
            return float("nan")
        v = v if rows is None else v[rows]
        return float(np.nanmean(v)) if len(v) else float("nan")


# --------------------------------------------------------------------------------------------------
# Merging the rows of the batches


def concat_rows(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The rows of all batches as one table, sorted by ``index``, each index once (a batch that a
    worker retried after a crash may come back twice: the first copy is kept)."""
    parts = [p for p in parts if len(p.get("index", ()))]
    if not parts:
        return {}
    keys = list(parts[0])
    table = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in keys}
    index = table["index"].astype(np.int64)
    _, first = np.unique(index, return_index=True)  # sorted by index, first occurrence
    return {k: v[first] for k, v in table.items()}


def assemble(parts: list[dict[str, np.ndarray]], *, ids: list[str], targets: np.ndarray, model: str,
             weights: str, layer: str, labels: list[str], dataset: str, methods: list[str], explained: str,
             tolerance: int, has_masks: bool, reference_box=None, wall: float = 0.0,
             engine: str = "local", notes: list[str] | None = None) -> EvalResult:
    """:class:`EvalResult` from the per-image rows of every batch (in any order), ``ids`` and
    ``targets`` of the whole image set. Both engines end here, so their results cannot differ in
    anything but the floating-point noise of the batches themselves."""
    table = concat_rows(parts)
    n_classes = len(labels)
    if not table:
        table = {"index": np.zeros(0, np.int64), "failed": np.zeros(0, str),
                 "probs": np.zeros((0, n_classes), np.float32)}
    index = table["index"].astype(np.int64)
    failed_why = table["failed"].astype(str)
    ok = failed_why == ""
    rows = index[ok]
    values = {m: {k: _get(table, column(m, k), ok, np.nan) for k in KEYS} for m in [*methods, CENTRE]}
    for key in table:  # the trust metrics' columns: method|trust_<metric>, the random map's too
        owner, _, name = key.partition("|")
        if name.startswith(TRUST_PREFIX):
            values.setdefault(owner, {})[name] = table[key][ok].astype(np.float64)
    peaks = {m: _get(table, column(m, "peak"), ok, -1, shape=(2,)).astype(np.int64) for m in methods}
    curves = {}
    if "curve" in table and table["curve"][ok].any():
        has = table["curve"][ok].astype(bool)
        fractions = table["curve_fractions"][ok][has][0]
        for m in [*methods, CENTRE]:
            curves[m] = metrics.Curves(fractions, table[column(m, "deletion")][ok][has],
                                       table[column(m, "insertion")][ok][has])
    timings = {k: float(np.nansum(table[f"t_{k}"])) if f"t_{k}" in table else 0.0 for k in TIME_COLUMNS}
    timings["total"] = wall
    found = list(notes or [])
    for text in table.get("note", np.zeros(0, str)).astype(str):
        for line in filter(None, text.split("\n")):
            if line not in found:
                found.append(line)
    return EvalResult(
        model=model, weights=weights, layer=layer, labels=list(labels), dataset=dataset,
        ids=[ids[i] for i in rows], index=rows, targets=np.asarray(targets)[rows],
        probs=table["probs"][ok].astype(np.float32), methods=list(methods), explained=explained,
        metrics=values, peaks=peaks, curves=curves,
        failed=[(ids[i], str(why)) for i, why in zip(index[~ok], failed_why[~ok], strict=True)],
        timings=timings, tolerance=tolerance, has_masks=has_masks, reference_box=reference_box,
        notes=found, engine=engine,
    )


def _get(table: dict, key: str, ok: np.ndarray, fill, shape: tuple = ()) -> np.ndarray:
    if key in table:
        return np.asarray(table[key])[ok]
    return np.full((int(ok.sum()), *shape), fill, dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# The shortcut, in measured numbers


def shortcut_class(card: dict | None) -> str | None:
    """The class a model card says carried the shortcut mark in training (``None`` if none)."""
    import re

    notes = str((card or {}).get("notes", ""))
    if "SHORTCUT" not in notes:
        return None
    found = re.search(r"SHORTCUT\b[^']*'([^']+)'", notes)  # the first quoted class after the flag
    return found.group(1) if found else None


def shortcut_summary(result: EvalResult, card: dict | None = None, method: str | None = None) -> dict:
    """What the maps and predictions say about a shortcut, measured on this result.

    ``on_mark_all`` / ``on_mark_errors``: share of the images (all / misclassified) whose map (the
    first method's unless ``method``) peaks on the reference box. With a card naming the mark's class
    c: ``class_accuracy`` / ``others_accuracy`` (accuracy on the images of c / of the other classes),
    ``called_c`` (share of the other images predicted c) and ``on_mark_called_c`` (share of those
    whose map peaks on the box). NaN where undefined.
    """
    method = method or result.methods[0]
    wrong = result.misclassified()
    out = {"method": method, "box": result.reference_box[0] if result.reference_box else None,
           "on_mark_all": result.reference_share(method),
           "on_mark_errors": result.reference_share(method, wrong) if len(wrong) else float("nan"),
           "class": None}
    cls = shortcut_class(card)
    if cls is not None and cls in result.labels:
        c = result.labels.index(cls)
        own, others = result.targets == c, result.targets != c
        called = np.flatnonzero(others & (result.preds == c))
        out.update({
            "class": cls,
            "class_accuracy": float(result.correct[own].mean()) if own.any() else float("nan"),
            "others_accuracy": float(result.correct[others].mean()) if others.any() else float("nan"),
            "called_c": float(len(called) / others.sum()) if others.any() else float("nan"),
            "n_called_c": int(len(called)), "n_others": int(others.sum()),
            "on_mark_called_c": result.reference_share(method, called) if len(called) else float("nan"),
        })
    return out
