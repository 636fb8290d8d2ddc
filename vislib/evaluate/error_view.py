"""One error, looked at closely: an image explained for its predicted and its true class, with the
contrast between the two maps and each map's faithfulness numbers."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import metrics
from ..datasets import ImageSet
from ..errors import InputError
from ..explain import explain, parse_methods
from ..models import ModelBundle
from .step import to_inputs


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
    assert isinstance(first.target, list) and isinstance(first.input_image, list)  # a batch (of one)
    predicted = first.class_index(0)  # target=None: the top class, never None
    classes = [predicted] if predicted == true else [predicted, true]
    result = first if predicted == true else explain(bundle, inputs.expand(2, -1, -1, -1), names,
                                                    layer=layer, target=classes, cancel=cancel)
    size = (inputs.shape[-2], inputs.shape[-1])
    tol = metrics.default_tolerance(*size) if tolerance is None else tolerance
    maps: dict[str, dict[int, np.ndarray]] = {}
    contrast: dict[str, np.ndarray] = {}
    scores: dict[str, dict[int, dict[str, float]]] = {}
    all_curves: dict[str, dict[int, metrics.Curves]] = {}
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
            cv = metrics.deletion_insertion(bundle, x, m, classes, steps=curve_steps, cancel=cancel)
            all_curves[name] = {cls: metrics.Curves(cv.fractions, cv.deletion[i:i + 1], cv.insertion[i:i + 1])
                                for i, cls in enumerate(classes)}
            for i, cls in enumerate(classes):
                scores[name][cls]["deletion_auc"] = float(cv.deletion_auc[i])
                scores[name][cls]["insertion_auc"] = float(cv.insertion_auc[i])
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
    from ..methods.cam_variants import finer_bases

    base = method if method in finer_bases() else "gradcam"
    batch = images.load([index])
    if batch.failed:
        raise InputError(f"{images.ids[index]}: {batch.failed[0]}")
    inputs, _ = to_inputs(bundle, batch, [0])
    result = explain(bundle, inputs, ["finercam"], layer=layer, target=[predicted], contrast=[true],
                     options={"finercam": {"base": base}})
    return result.maps["finercam"][0], base
