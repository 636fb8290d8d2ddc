"""Evaluate a model and its explanations over a labelled image set: pure functions, no UI.

:func:`evaluate` runs the image set through :func:`vislib.explain` in batches and keeps, per image,
the prediction, the class probabilities and, per method, the numbers of :mod:`vislib.metrics`:
where the map peaks, whether that is on the object (pointing game) and how much of the map lies on it
(energy), wherever the set has object masks; the confidence on ``map ⊙ image`` (Average Drop,
Increase in Confidence); deletion and insertion curves for the first images. The image-centre
baseline is computed beside every method. Maps themselves are not kept (a 2000-image split would
need 130 MB per method); :func:`explain_error` recomputes the few that a person looks at.

:class:`EvalResult` answers the questions of an error analysis: accuracy, per-class accuracy, the
confusion matrix, the misclassified images sorted by confidence, and a per-method table.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import metrics
from .datasets import Batch, ImageSet
from .errors import InputError, MethodError
from .explain import _compute_resilient, _Job, device_slot, explain, parse_methods
from .hooks import capture_layer, resolve_layer
from .models import ModelBundle, Preprocess

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
    curves: dict[str, metrics.Curves] = field(default_factory=dict)  # method → curves of the first images
    failed: list[tuple[str, str]] = field(default_factory=list)  # (id, why) of images that did not load
    timings: dict[str, float] = field(default_factory=dict)
    tolerance: int = 0
    has_masks: bool = False
    reference_box: tuple[str, tuple[int, int, int, int]] | None = None
    notes: list[str] = field(default_factory=list)

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

    def reference_share(self, method: str, rows: np.ndarray | None = None) -> float:
        """Share of images (of ``rows``) whose map peaks on the reference box (e.g. the mark corner)."""
        v = self.metrics.get(method, {}).get("reference")
        if v is None:
            return float("nan")
        v = v if rows is None else v[rows]
        return float(np.nanmean(v)) if len(v) else float("nan")


# --------------------------------------------------------------------------------------------------
# Inputs


def to_inputs(bundle: ModelBundle, batch: Batch, keep: list[int]) -> tuple[torch.Tensor, np.ndarray | None]:
    """The model's input tensor for the loaded images at positions ``keep`` of the batch, and their
    object masks at the model's input view (resized and cropped as the image was)."""
    pre = bundle.preprocess
    if batch.arrays is not None:
        arrays = batch.arrays[keep]
        side = arrays.shape[1]
        fast = (isinstance(pre, Preprocess) and pre.crop == pre.resize == side == arrays.shape[2]
                and pre.channels == 3)
        if fast:  # the preprocessing is a plain normalisation: x / (255 std) − mean / std, in place
            x = torch.from_numpy(arrays).to(bundle.device).permute(0, 3, 1, 2)
            x = x.to(torch.float32, memory_format=torch.contiguous_format)
            mean = torch.tensor(pre.mean, device=bundle.device).view(1, 3, 1, 1)
            std = torch.tensor(pre.std, device=bundle.device).view(1, 3, 1, 1)
            masks = batch.masks[keep] if batch.masks is not None else None
            return x.mul_(1.0 / (255.0 * std)).sub_(mean / std), masks
        images = [Image.fromarray(a) for a in arrays]
    else:
        images = [batch.images[i] for i in keep]
    tensor, _ = bundle.prepare(images)
    masks = None
    if batch.masks is not None:
        masks = np.stack([mask_view(bundle, batch.masks[i]) for i in keep])
    return tensor, masks


def mask_view(bundle: ModelBundle, mask: np.ndarray) -> np.ndarray:
    """A mask through the same resize and centre crop as the image (nearest neighbour)."""
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    pre = bundle.preprocess
    if isinstance(pre, Preprocess):
        from torchvision.transforms import InterpolationMode

        img = pre.geometry(img, InterpolationMode.NEAREST)
    else:
        img = img.resize(bundle.input_hw[::-1], Image.NEAREST)
    return np.asarray(img) > 127


# --------------------------------------------------------------------------------------------------
# Evaluation


Progress = Callable[[int, int, str], None]


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
    has_masks = bool(images.has_masks)
    probs = np.zeros((n, len(bundle.labels)), np.float32)
    loaded = np.zeros(n, bool)
    keys = ["pointing", "energy", "y", "o", "average_drop", "increase", "deletion_auc", "insertion_auc",
            "reference"]
    values = {m: {k: np.full(n, np.nan) for k in keys} for m in [*names, CENTRE]}
    peaks = {m: np.full((n, 2), -1, np.int64) for m in names}
    curve_parts: dict[str, list[metrics.Curves]] = {m: [] for m in [*names, CENTRE]}
    failed: list[tuple[str, str]] = []
    timings = {"load": 0.0, "explain": 0.0, "metrics": 0.0}
    centre = torch.from_numpy(metrics.centre_map(size, size))
    ref_mask = reference_mask(bundle, images)
    notes: list[str] = []
    start_all = time.perf_counter()
    for lo in range(0, n, batch_size):
        if cancel is not None and cancel.is_set():
            from .errors import Cancelled

            raise Cancelled("cancelled by the caller")
        rows = np.arange(lo, min(n, lo + batch_size))
        t0 = time.perf_counter()
        batch = images.load(rows)
        keep = [i for i in range(len(rows)) if i not in batch.failed]
        failed += [(images.ids[rows[i]], why) for i, why in sorted(batch.failed.items())]
        rows = rows[keep]
        if not len(rows):
            timings["load"] += time.perf_counter() - t0
            continue
        inputs, masks = to_inputs(bundle, batch, keep)
        t1 = time.perf_counter()
        timings["load"] += t1 - t0
        target = [int(t) for t in images.targets[rows]] if explained == "true" else None
        if _on_batch is not None:  # throughput(): the reference, timed apart and left out of ours
            spent = _on_batch(inputs)
            t1 += spent
            start_all += spent
        part = explain_batch(bundle, inputs, names, layer_name, target, cancel, notes)
        t2 = time.perf_counter()
        timings["explain"] += t2 - t1
        probs[rows] = part.probs
        loaded[rows] = True
        _measure(bundle, inputs, part, names, masks, rows, values, peaks, curve_parts,
                 centre=centre, ref_mask=ref_mask, tol=tol, confidence=confidence,
                 curves_left=max(0, curves - lo), curve_steps=curve_steps, cancel=cancel)
        timings["metrics"] += time.perf_counter() - t2
        if _on_batch is not None:  # throughput(): the reference, timed apart and left out of ours
            start_all += _on_batch(inputs)
        if progress is not None:
            progress(int(rows[-1]) + 1, n, "images")
    timings["total"] = time.perf_counter() - start_all
    ok = np.flatnonzero(loaded)
    return EvalResult(
        model=bundle.name, weights=bundle.weights, layer=layer_name, labels=list(bundle.labels),
        dataset=images.name, ids=[images.ids[i] for i in ok], index=ok, targets=images.targets[ok],
        probs=probs[ok], methods=names, explained=explained,
        metrics={m: {k: v[ok] for k, v in d.items()} for m, d in values.items()},
        peaks={m: p[ok] for m, p in peaks.items()},
        curves={m: _join(parts) for m, parts in curve_parts.items() if parts},
        failed=failed, timings=timings, tolerance=tol, has_masks=has_masks,
        reference_box=images.reference_box, notes=notes,
    )


def reference_mask(bundle: ModelBundle, images: ImageSet) -> np.ndarray | None:
    """The image set's reference box as a mask at the model's input view (None without a box)."""
    if images.reference_box is None:
        return None
    _, (x0, y0, x1, y1) = images.reference_box
    side = images.image_size
    mask = np.zeros((side, side), bool)
    mask[y0:y1, x0:x1] = True
    return mask if side == bundle.input_size else mask_view(bundle, mask)


def _join(parts: list[metrics.Curves]) -> metrics.Curves:
    return metrics.Curves(parts[0].fractions, np.concatenate([p.deletion for p in parts]),
                          np.concatenate([p.insertion for p in parts]))


def explain_batch(bundle, inputs, names, layer, target, cancel, notes: list[str]):
    """:func:`vislib.explain` on an input batch, without the per-image input views that an evaluation
    never shows (they cost as much as the rest of the bookkeeping): the same family runners, map
    normalisation and out-of-memory recovery. Returns the batch's maps, flat flags, probabilities
    and targets (numpy, batch first)."""
    job = _Job(names=list(names), layer=layer, score="logit", options={}, progress=None, cancel=cancel)
    with device_slot(bundle.device):  # as explain(): a bounded number of explanations per GPU
        part = _compute_resilient(bundle, inputs, target, job)
    notes += [n for n in job.notes if n not in notes]
    return part


def _measure(bundle, inputs, part, names, masks, rows, values, peaks, curve_parts, *, centre,
             ref_mask, tol, confidence, curves_left, curve_steps, cancel) -> None:
    """Every metric of one batch, written into ``values`` / ``peaks`` / ``curve_parts`` at ``rows``."""
    count = len(rows)
    targets = np.asarray(part.targets)
    y = part.probs[np.arange(count), targets]
    all_maps = {m: torch.from_numpy(part.maps[m]) for m in names}
    all_maps[CENTRE] = centre.expand(count, -1, -1)
    centre_point = np.tile([[centre.shape[0] // 2, centre.shape[1] // 2]], (count, 1))
    n_curves = min(count, curves_left)
    masks_t = torch.from_numpy(masks) if masks is not None else None
    masks_f = masks_t.float() if masks_t is not None else None
    for name, m in all_maps.items():
        out = values[name]
        if name == CENTRE:
            pts, flat = centre_point, np.zeros(count, bool)
        else:
            pts, flat = metrics.peaks(m, part.flat[name])
            peaks[name][rows] = pts
        if masks_t is not None:
            out["pointing"][rows] = metrics.near_mask(pts, masks_t, tol) & ~flat
            if name == CENTRE:  # Σ centre·mask / Σ centre: one matrix-vector product
                out["energy"][rows] = (masks_f.flatten(1) @ centre.flatten() / centre.sum()).numpy()
            else:  # maps from explain are in [0, 1]: metrics.energy_inside without its checks
                total = m.flatten(1).sum(dim=1, dtype=torch.float64)
                inside = (m * masks_f).flatten(1).sum(dim=1, dtype=torch.float64)
                out["energy"][rows] = torch.where(total > 0, inside / total.clamp_min(1e-300), 0.0).numpy()
        if ref_mask is not None:
            out["reference"][rows] = metrics.near_mask(pts, ref_mask, tol) & ~flat
        if confidence:
            o = metrics.masked_confidence(bundle, inputs, m, targets, cancel=cancel).numpy()
            out["y"][rows], out["o"][rows] = y, o
            out["average_drop"][rows] = np.maximum(0.0, y - o) / np.maximum(y, 1e-12) * 100
            out["increase"][rows] = (o > y) * 100.0
        if n_curves:
            c = metrics.deletion_insertion(bundle, inputs[:n_curves], m[:n_curves], targets[:n_curves],
                                           steps=curve_steps, cancel=cancel)
            curve_parts[name].append(c)
            out["deletion_auc"][rows[:n_curves]] = c.deletion_auc
            out["insertion_auc"][rows[:n_curves]] = c.insertion_auc


# --------------------------------------------------------------------------------------------------
# One error, looked at closely


@dataclass
class ErrorView:
    """One image explained for its predicted and its true class, with the contrast between them."""

    image: Image.Image  # the model's input view
    id: str
    true: int
    predicted: int
    probs: np.ndarray
    maps: dict[str, dict[int, np.ndarray]]  # method → class → H×W in [0, 1]
    contrast: dict[str, np.ndarray]  # method → H×W in [-1, 1]: predicted minus true
    scores: dict[str, dict[int, dict[str, float]]]  # method → class → metric → value
    curves: dict[str, dict[int, metrics.Curves]]
    mask: np.ndarray | None
    labels: list[str]
    centre: dict[str, float] = field(default_factory=dict)

    def top_k(self, k: int = 5) -> list[tuple[int, str, float]]:
        order = np.argsort(-self.probs)[:k]
        return [(int(i), self.labels[i], float(self.probs[i])) for i in order]


def contrast_map(raw_a: np.ndarray, raw_b: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(a − b) / max(|a|, |b|) at ``size``: the two maps on one scale (unlike their separately
    normalised displays), so the sign says which class the region speaks for. Input-space signals
    (3×H×W) are compared through their magnitude (max |·| over channels)."""
    def prepare(raw):
        t = torch.as_tensor(np.asarray(raw), dtype=torch.float32)
        if t.dim() == 3 and t.shape[0] == 3:
            t = t.abs().amax(dim=0)
        if tuple(t.shape) != tuple(size):
            t = F.interpolate(t[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        return t

    a, b = prepare(raw_a), prepare(raw_b)
    scale = torch.maximum(a.abs().max(), b.abs().max())
    if scale <= 0:
        return np.zeros(size, np.float32)
    return ((a - b) / scale).numpy()


def explain_error(bundle: ModelBundle, images: ImageSet, index: int,
                  methods: Sequence[str] | str = ("gradcam",), *, layer: str | None = None,
                  curve_steps: int = 32, curves: bool = True,
                  tolerance: int | None = None, cancel: threading.Event | None = None) -> ErrorView:
    """Explain image ``index`` of ``images`` for its predicted class and for its true class (one batch
    of two), with the contrast map, the top-k scores and each map's faithfulness numbers."""
    names = parse_methods(methods)
    batch = images.load([index])
    if batch.failed:
        raise InputError(f"{images.ids[index]}: {batch.failed[0]}")
    inputs, masks = to_inputs(bundle, batch, [0])
    true = int(images.targets[index])
    first = explain(bundle, inputs, names, layer=layer, target=None, cancel=cancel)
    predicted = int(first.target[0])
    classes = [predicted] if predicted == true else [predicted, true]
    result = first if predicted == true else explain(bundle, inputs.expand(2, -1, -1, -1), names,
                                                    layer=layer, target=classes, cancel=cancel)
    size = tuple(inputs.shape[-2:])
    tol = metrics.default_tolerance(*size) if tolerance is None else tolerance
    maps, contrast, scores, all_curves = {}, {}, {}, {}
    x = inputs.expand(len(classes), -1, -1, -1)
    y = metrics.target_probabilities(bundle, x, classes).numpy()
    for name in names:
        m = result.maps[name]
        maps[name] = {c: m[i] for i, c in enumerate(classes)}
        raw = result.raw[name]
        contrast[name] = (contrast_map(raw[0], raw[1], size) if len(classes) == 2
                          else np.zeros(size, np.float32))
        o = metrics.masked_confidence(bundle, x, m, classes, cancel=cancel).numpy()
        scores[name] = {}
        for i, c in enumerate(classes):
            s = {"probability": float(y[i]), "masked_probability": float(o[i]),
                 "drop_%": float(max(0.0, y[i] - o[i]) / max(y[i], 1e-12) * 100)}
            if masks is not None:
                s["pointing_hit"] = float(metrics.pointing_hits(m[i:i + 1], masks, tol)[0])
                s["energy"] = float(metrics.energy_inside(m[i:i + 1], masks)[0])
            scores[name][c] = s
        if curves:
            c = metrics.deletion_insertion(bundle, x, m, classes, steps=curve_steps, cancel=cancel)
            all_curves[name] = {cls: metrics.Curves(c.fractions, c.deletion[i:i + 1], c.insertion[i:i + 1])
                                for i, cls in enumerate(classes)}
            for i, cls in enumerate(classes):
                scores[name][cls]["deletion_auc"] = float(c.deletion_auc[i])
                scores[name][cls]["insertion_auc"] = float(c.insertion_auc[i])
    centre = {}
    if masks is not None:
        cm = metrics.centre_map(*size)[None]
        centre = {"pointing_hit": float(metrics.centre_hits(masks, tol)[0]),
                  "energy": float(metrics.energy_inside(cm, masks)[0])}
    return ErrorView(
        image=first.input_image[0], id=images.ids[index], true=true, predicted=predicted,
        probs=first.probs[0], maps=maps, contrast=contrast, scores=scores, curves=all_curves,
        mask=None if masks is None else masks[0], labels=list(bundle.labels), centre=centre,
    )


def why_rather_than(bundle: ModelBundle, images: ImageSet, index: int, predicted: int, true: int, *,
                    method: str = "gradcam", layer: str | None = None) -> tuple[np.ndarray, str]:
    """"Why ``predicted`` rather than ``true``?" for image ``index``: Finer-CAM with the true class as
    its comparison, i.e. a base CAM of S_predicted − S_true (``method`` when it is a gradient CAM, else
    Grad-CAM). Returns the H×W map in [0, 1] (zeros where nothing speaks for the predicted class more
    than for the true one) and the base method used."""
    from .methods.cam_variants import finer_bases

    base = method if method in finer_bases() else "gradcam"
    batch = images.load([index])
    if batch.failed:
        raise InputError(f"{images.ids[index]}: {batch.failed[0]}")
    inputs, _ = to_inputs(bundle, batch, [0])
    result = explain(bundle, inputs, ["finercam"], layer=layer, target=[predicted], contrast=[true],
                     options={"finercam": {"base": base}})
    return result.maps["finercam"][0], base


# --------------------------------------------------------------------------------------------------
# Speed


def bare_gradcam(bundle: ModelBundle, inputs: torch.Tensor, layer: str | None = None) -> torch.Tensor:
    """The reference for :func:`throughput`: one batched forward with the layer captured, one
    backward of the predicted logits to it, Grad-CAM at feature resolution. Nothing else."""
    name, module = resolve_layer(bundle, layer)
    with bundle.lock, capture_layer(module, grad=True, view=bundle.view(name)) as captured, torch.no_grad():
        logits = bundle.logits(inputs)
    A = captured.activation
    with torch.enable_grad():
        score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
        (g,) = torch.autograd.grad(score, A)
    return F.relu((g.mean(dim=(2, 3), keepdim=True) * A.detach()).sum(dim=1))


def throughput(bundle: ModelBundle, images: ImageSet, *, batch_size: int = 64, repeats: int = 2,
               layer: str | None = None) -> dict[str, float]:
    """Images per second of :func:`evaluate` (Grad-CAM for every image, localisation metrics, no
    extra forwards) against the bare batched forward + Grad-CAM backward at the same batch size on
    the same inputs. The two alternate batch by batch in one run (the reference runs just before and
    just after each evaluated batch, timed apart and counted once), so a shared machine's changing
    load hits both alike; best of ``repeats``. ``overhead`` = evaluate's time / bare time − 1: what
    loading, bookkeeping and storing add."""
    n = len(images)
    best_eval = best_bare = float("inf")
    detail: dict[str, float] = {}
    for _ in range(repeats):
        bare = [0.0]

        def reference(inputs: torch.Tensor, bare=bare) -> float:
            t = time.perf_counter()
            bare_gradcam(bundle, inputs, layer)
            spent = time.perf_counter() - t
            bare[0] += spent / 2  # it runs twice per batch, just before and just after ours
            return spent

        result = evaluate(bundle, images, ["gradcam"], layer=layer, batch_size=batch_size, confidence=False,
                          _on_batch=reference)
        if result.timings["total"] < best_eval:
            best_eval, detail = result.timings["total"], dict(result.timings)
        best_bare = min(best_bare, bare[0])
    return {
        "images": n, "batch_size": batch_size, "evaluate_s": best_eval, "bare_s": best_bare,
        "evaluate_ips": n / best_eval, "bare_ips": n / best_bare, "overhead": best_eval / best_bare - 1,
        **{f"evaluate_{k}_s": v for k, v in detail.items()},
    }


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


# --------------------------------------------------------------------------------------------------
# Tables and figures (plain data and plotly figures: the page and the HTML report share them)


def class_names(labels: Sequence[str]) -> list[str]:
    """Labels made unique (ImageNet repeats a few) for axes and tables."""
    labels = list(labels)
    return [f"{lab} (#{i})" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]


def method_label(name: str) -> str:
    if name == CENTRE:
        return "image-centre baseline"
    from .methods import METHODS

    cls = METHODS.get(name)
    return getattr(cls, "title", name) if cls is not None else name


def table_rows(result: EvalResult) -> list[dict]:
    """:meth:`EvalResult.method_table` with readable method names and column titles, empty columns
    (e.g. no masks) dropped."""
    rows = result.method_table()
    keep = [k for k in METRIC_COLUMNS if any(np.isfinite(r[k]) for r in rows)]
    return [{"Method": method_label(r["method"]), **{METRIC_COLUMNS[k]: r[k] for k in keep}} for r in rows]


def confusion_figure(result: EvalResult, selected: tuple[int, int] | None = None):
    """The confusion matrix as a heatmap (rows: true class, columns: predicted), with a transparent
    marker on every cell carrying ``customdata = [true, predicted]`` so a click selects the cell
    (plotly heatmaps themselves send no selection events)."""
    import plotly.graph_objects as go

    matrix, classes = result.confusion()
    names = class_names(result.labels)
    axis = [names[c] for c in classes]
    totals = matrix.sum(axis=1, keepdims=True).clip(min=1)
    share = matrix / totals
    text = [[str(v) if v else "" for v in row] for row in matrix]
    fig = go.Figure(go.Heatmap(
        z=share, x=axis, y=axis, text=text, texttemplate="%{text}", colorscale="Blues", zmin=0, zmax=1,
        colorbar=dict(title="share of row", tickformat=".0%"), hoverinfo="skip",
    ))
    cells = [(i, j) for i in range(len(classes)) for j in range(len(classes))]
    fig.add_trace(go.Scatter(
        x=[axis[j] for _, j in cells], y=[axis[i] for i, _ in cells], mode="markers",
        marker=dict(symbol="square", size=max(8, 360 // max(1, len(classes))), color="rgba(0,0,0,0)",
                    line=dict(width=0)),
        customdata=[[classes[i], classes[j]] for i, j in cells],
        hovertemplate="true %{y} → predicted %{x}: %{text}<extra>click to list these images</extra>",
        text=[f"{matrix[i, j]} images" for i, j in cells], showlegend=False,
        selected=dict(marker=dict(color="rgba(228,87,46,0.35)")), unselected=dict(marker=dict(opacity=0)),
    ))
    if selected is not None and selected[0] in classes and selected[1] in classes:
        i, j = classes.index(selected[0]), classes.index(selected[1])
        fig.add_shape(type="rect", x0=j - 0.5, x1=j + 0.5, y0=i - 0.5, y1=i + 0.5,
                      line=dict(color="#e4572e", width=3))
    side = 140 + 42 * len(classes)
    fig.update_layout(
        height=min(900, side), margin=dict(l=8, r=8, t=30, b=8), clickmode="event+select", dragmode=False,
        xaxis=dict(title="predicted", side="top", fixedrange=True, type="category", automargin=True),
        yaxis=dict(title="true", autorange="reversed", fixedrange=True, type="category", automargin=True),
    )
    return fig


def cell_from_selection(selection) -> tuple[int, int] | None:
    """(true, predicted) of the first selected confusion cell, from ``st.plotly_chart``'s event."""
    if selection is None:
        return None
    sel = selection.get("selection", selection) if isinstance(selection, dict) else getattr(
        selection, "selection", selection)
    points = sel.get("points", []) if isinstance(sel, dict) else getattr(sel, "points", [])
    for point in points or []:
        data = point.get("customdata") if isinstance(point, dict) else None
        if isinstance(data, (list, tuple)) and len(data) == 2:
            return int(data[0]), int(data[1])
    return None


def per_class_figure(result: EvalResult):
    """Accuracy per true class (horizontal bars, worst at the top)."""
    import plotly.graph_objects as go

    per = result.per_class_accuracy()
    names = class_names(result.labels)
    order = sorted(per, key=lambda c: per[c][0])
    fig = go.Figure(go.Bar(
        x=[per[c][0] for c in order][::-1], y=[names[c] for c in order][::-1], orientation="h",
        text=[f"{per[c][0]:.0%} of {per[c][1]}" for c in order][::-1], textposition="outside",
        cliponaxis=False,
        marker_color=["#e4572e" if per[c][0] < result.accuracy else "#7a9cc6" for c in order][::-1],
    ))
    fig.update_layout(height=80 + 26 * len(order), margin=dict(l=8, r=48, t=8, b=8),
                      xaxis=dict(range=[0, 1.15], tickformat=".0%", fixedrange=True, tickvals=[0, 0.5, 1]),
                      yaxis=dict(fixedrange=True, automargin=True))
    return fig


def curves_figure(curves: dict[str, metrics.Curves], title: str = ""):
    """Mean deletion and insertion curves per entry (e.g. per method), with their mean AUCs."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("Deletion (lower is better)",
                                                        "Insertion (higher is better)"))
    palette = ["#e4572e", "#4c78a8", "#54a24b", "#b279a2", "#f58518", "#72b7b2", "#9d755d", "#bab0ac"]
    for k, (name, c) in enumerate(curves.items()):
        colour = palette[k % len(palette)]
        label = f"{name} (AUC: deletion {c.deletion_auc.mean():.3f}, insertion {c.insertion_auc.mean():.3f})"
        for col, values in enumerate((c.deletion, c.insertion)):
            fig.add_trace(go.Scatter(
                x=c.fractions, y=values.mean(axis=0), mode="lines", line=dict(color=colour),
                name=label, legendgroup=name, showlegend=col == 0,
            ), row=1, col=col + 1)
    fig.update_xaxes(title="fraction of pixels", range=[0, 1], tickformat=".0%")
    fig.update_yaxes(title="probability of the class", range=[0, 1.02])
    fig.update_layout(height=330, margin=dict(l=8, r=8, t=40, b=8), title=title or None,
                      legend=dict(orientation="h", y=-0.3))
    return fig


def contrast_image(contrast: np.ndarray, image: Image.Image | None = None, alpha: float = 0.6) -> Image.Image:
    """The contrast map on the diverging ``coolwarm`` colormap (blue: the true class, red: the
    predicted class, grey: neither), over the image."""
    from . import render

    values = (np.clip(contrast, -1, 1) + 1) / 2
    if image is None:
        return render.heatmap(values, "coolwarm")
    return render.overlay(image, values, alpha=alpha, colormap="coolwarm")


# --------------------------------------------------------------------------------------------------
# Files: CSVs and a self-contained HTML report


def _fmt(value, digits: int = 6) -> str:
    if isinstance(value, (float, np.floating)):
        return "" if not np.isfinite(value) else f"{float(value):.{digits}g}"
    return str(value)


def _write_csv(path, header: list[str], rows) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow([_fmt(v) for v in row])


def write_tables(result: EvalResult, out) -> list:
    """``images.csv`` (one row per image), ``image_metrics.csv`` (one row per image and method, the
    centre baseline included), ``methods.csv`` (the per-method table), ``confusion.csv`` and
    ``misclassified.csv`` (most confident first). Returns the paths."""
    from pathlib import Path

    out = Path(out)
    names = class_names(result.labels)
    preds, conf = result.preds, result.confidence
    p_true = result.probs[np.arange(len(result)), result.targets] if len(result) else np.zeros(0)
    paths = [out / n for n in ("images.csv", "image_metrics.csv", "methods.csv", "confusion.csv",
                               "misclassified.csv")]
    _write_csv(paths[0], ["id", "true", "predicted", "confidence", "p_true", "correct"],
               ([result.ids[i], names[result.targets[i]], names[preds[i]], conf[i], p_true[i],
                 int(result.correct[i])] for i in range(len(result))))
    keys = list(METRIC_COLUMNS)
    rows = []
    for name in [*result.methods, CENTRE]:
        vals = result.metrics[name]
        pk = result.peaks.get(name)
        for i in range(len(result)):
            peak = (int(pk[i, 0]), int(pk[i, 1])) if pk is not None else ("", "")
            rows.append([result.ids[i], name, *peak, vals["y"][i], vals["o"][i],
                         *[vals[k][i] for k in keys if k not in ("average_drop", "increase")],
                         vals["average_drop"][i], vals["increase"][i]])
    per_image_keys = [k for k in keys if k not in ("average_drop", "increase")]
    _write_csv(paths[1], ["id", "method", "peak_y", "peak_x", "p_class", "p_masked",
                          *[{"pointing": "pointing_hit", "reference": "peak_on_reference"}.get(k, k)
                            for k in per_image_keys], "drop_%", "increase_%"], rows)
    table = result.method_table()
    _write_csv(paths[2], ["method", *keys], ([r["method"], *[r[k] for k in keys]] for r in table))
    matrix, classes = result.confusion()
    _write_csv(paths[3], ["true \\ predicted", *[names[c] for c in classes]],
               ([names[c], *matrix[i].tolist()] for i, c in enumerate(classes)))
    _write_csv(paths[4], ["rank", "id", "true", "predicted", "confidence", "p_true"],
               ([r + 1, result.ids[i], names[result.targets[i]], names[preds[i]], conf[i], p_true[i]]
                for r, i in enumerate(result.misclassified())))
    return paths


def _b64_png(image: Image.Image) -> str:
    import base64

    from .render import to_png_bytes

    return "data:image/png;base64," + base64.b64encode(to_png_bytes(image)).decode()


def _html_table(header: list[str], rows: list[list]) -> str:
    from html import escape

    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(_fmt(v, 3))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_list(lines: list[str]) -> str:
    from html import escape

    return "<ul>" + "".join(f"<li>{escape(line)}</li>" for line in lines) + "</ul>" if lines else ""


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{margin-bottom:4px} .muted{color:#666} table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:right;font-size:14px} th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left} .gallery{display:flex;flex-wrap:wrap;gap:14px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;font-size:13px}
.card img{width:128px;height:128px;margin-right:4px}
.note{background:#fff6e5;border-left:4px solid #e4a72e;padding:8px 12px}
"""


def html_report(result: EvalResult, *, bundle: ModelBundle | None = None, images: ImageSet | None = None,
                gallery: int = 24, method: str | None = None, card: dict | None = None) -> str:
    """A self-contained HTML report: summary, data report, per-class accuracy, confusion matrix,
    per-method table, mean deletion/insertion curves, and the most confident errors with the maps
    of their predicted and true class and the contrast (images inline as base64 PNG, the plotly
    library embedded once: it opens offline). ``bundle`` and ``images`` are needed for the gallery."""
    from html import escape

    import plotly.io as pio
    from plotly.offline import get_plotlyjs

    from .render import overlay

    def fig_html(fig) -> str:
        return pio.to_html(fig, full_html=False, include_plotlyjs=False, config={"displayModeBar": False})

    names = class_names(result.labels)
    parts = [f"<h1>Error analysis: {escape(result.model)}</h1>",
             f"<p class='muted'>{escape(result.dataset)} · {len(result)} images · weights "
             f"{escape(result.weights)} · layer {escape(result.layer)} · maps explain the "
             f"{escape(result.explained)} class</p>",
             f"<h2>Accuracy {result.accuracy:.1%}</h2>"
             f"<p>{int((~result.correct).sum())} misclassified"
             + (f"; {len(result.failed)} files could not be read" if result.failed else "") + "</p>"]
    card = card if card is not None else (bundle.card if bundle is not None else None)
    if card and card.get("notes"):
        parts.append(f"<div class='note'><b>Model card.</b> {escape(str(card.get('description', '')))} "
                     f"{escape(str(card['notes']))}</div>")
    report = images.report if images is not None else None
    if report is not None:
        parts.append(f"<h3>Data</h3><p>{escape(report.summary())}</p>" + _html_list(report.lines()))
    if result.failed:
        parts.append(_html_list([f"{i}: {why}" for i, why in result.failed[:20]]))
    per = result.per_class_accuracy()
    parts.append("<h3>Per-class accuracy</h3>" + _html_table(
        ["class", "accuracy", "images"], [[names[c], a, n] for c, (a, n) in per.items()]))
    parts.append("<h3>Confusion matrix</h3>" + fig_html(confusion_figure(result)))
    rows = table_rows(result)
    if rows:
        table = _html_table(list(rows[0]), [list(r.values()) for r in rows])
        parts.append("<h3>Explanation metrics</h3>" + table
                     + f"<p class='muted'>Pointing game: hit when the map's maximum lies within "
                       f"{result.tolerance} px of the object (15 px at 224 px, scaled to the input), "
                       "mean over classes. Energy: share of the map's mass on the object. Average Drop / "
                       "Increase in Confidence: the class probability on map ⊙ image (normalised space) "
                       "against the image. Deletion / insertion: RISE, zeros (the mean colour) / a blurred "
                       "image as substrate.</p>")
    if result.reference_box is not None:
        label = result.reference_box[0]
        wrong = result.misclassified()
        shares = [[method_label(m), result.reference_share(m), result.reference_share(m, wrong)]
                  for m in result.methods]
        parts.append(f"<h3>Maps that peak on the {escape(label)}</h3>" + _html_table(
            ["method", "all images", "misclassified images"], shares))
    if result.curves:
        parts.append("<h3>Deletion and insertion</h3>" + fig_html(curves_figure(
            {method_label(m): c for m, c in result.curves.items()},
            f"mean over the first {next(iter(result.curves.values())).deletion.shape[0]} images")))
    wrong = result.misclassified()
    if bundle is not None and images is not None and len(wrong) and gallery:
        method = method or result.methods[0]
        cards = []
        for row in wrong[:gallery]:
            view = explain_error(bundle, images, int(result.index[row]), [method], layer=result.layer,
                                 curves=False)
            pred_map = overlay(view.image, view.maps[method][view.predicted])
            true_map = overlay(view.image, view.maps[method][view.true])
            cards.append(
                f"<div class='card'><img src='{_b64_png(view.image)}' alt='input'>"
                f"<img src='{_b64_png(pred_map)}' alt='predicted'><img src='{_b64_png(true_map)}' alt='true'>"
                f"<img src='{_b64_png(contrast_image(view.contrast[method], view.image))}' alt='contrast'>"
                f"<br>{escape(view.id)}: <b>{escape(names[view.true])}</b> predicted as "
                f"<b>{escape(names[view.predicted])}</b> ({result.confidence[row]:.0%})</div>")
        parts.append(f"<h3>Most confident errors ({min(gallery, len(wrong))} of {len(wrong)})</h3>"
                     f"<p class='muted'>Each: the input; {escape(method_label(method))} for the predicted "
                     "class; for the true class; the contrast (red: speaks for the predicted class, blue: "
                     "for the true class).</p><div class='gallery'>" + "".join(cards) + "</div>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>vislib error analysis</title>"
            f"<style>{_CSS}</style><script>{get_plotlyjs()}</script></head><body>"
            + "\n".join(parts) + "</body></html>")
