"""Two models side by side on one image: the same methods, their maps, their top classes, and where
they disagree.

Each model explains the image through its own preprocessing, so the two maps live on two input views
(their sizes, and the crop, can differ). They are compared on a common grid: each map is resized
(bilinear) to the smaller of the two views' sizes. The disagreement is measured three ways:

* top-1: do the two models predict the same label?
* rank correlation: Spearman's ρ between the two maps' pixels (Pearson's r of their ranks, ties
  given their average rank): 1 when one map is a monotone function of the other, about 0 unrelated;
* top-region IoU: the intersection over union of each map's top ``fraction`` pixels (20% by default;
  exactly ⌈fraction·n⌉ pixels, ties broken by position), 1 when both point at the same region.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .explain import Explanation, explain
from .models import ModelBundle, load_model


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's ρ between two maps of the same shape (:func:`vislib.metrics.spearman`; NaN when
    either is constant)."""
    from .metrics import spearman

    return spearman(a, b)


def top_region(values: np.ndarray, fraction: float = 0.2) -> np.ndarray:
    """Boolean mask of the ⌈fraction·n⌉ largest values (ties broken by position, first wins)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], not {fraction}")
    flat = np.asarray(values, dtype=np.float64).ravel()
    k = math.ceil(fraction * flat.size)
    mask = np.zeros(flat.size, dtype=bool)
    mask[np.argsort(-flat, kind="mergesort")[:k]] = True
    return mask.reshape(np.shape(values))


def top_region_iou(a: np.ndarray, b: np.ndarray, fraction: float = 0.2) -> float:
    ma, mb = top_region(a, fraction), top_region(b, fraction)
    return float((ma & mb).sum() / (ma | mb).sum())


def common_grid(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both maps resized (bilinear) to the smaller of their two shapes."""
    shape = min(a.shape, b.shape, key=lambda s: s[0] * s[1])

    def fit(m: np.ndarray) -> np.ndarray:
        if m.shape == shape:
            return np.asarray(m, dtype=np.float32)
        image = Image.fromarray(np.asarray(m, dtype=np.float32), mode="F")
        return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))

    return fit(a), fit(b)


@dataclass(frozen=True)
class MapAgreement:
    spearman: float
    top_iou: float


@dataclass
class Comparison:
    """Both explanations, and per method how their maps agree."""

    left: Explanation
    right: Explanation
    agreement: dict[str, MapAgreement]
    fraction: float
    notes: list[str] = field(default_factory=list)

    @property
    def methods(self) -> list[str]:
        return self.left.methods

    @property
    def top1(self) -> tuple[str, str]:
        return self.left.top_k(1)[0][1], self.right.top_k(1)[0][1]

    @property
    def same_top1(self) -> bool:
        left, right = self.top1
        return left == right

    def summary(self) -> list[str]:
        """One line per disagreement, in words."""
        (left, right), lines = self.top1, []
        lines.append(f"Both predict {left}." if self.same_top1 else
                     f"{self.left.model} predicts {left}, {self.right.model} predicts {right}.")
        for method, agree in self.agreement.items():
            verdict = ("look at the same place" if agree.top_iou >= 0.5 else
                       "overlap in part" if agree.top_iou >= 0.2 else "look at different places")
            lines.append(f"{method}: the maps {verdict} (top {self.fraction:.0%} IoU {agree.top_iou:.2f}, "
                         f"rank correlation {agree.spearman:.2f}).")
        return lines


def _shared_target(a: ModelBundle, b: ModelBundle, target):
    """A label both models know (a class index is read in the first model's labels)."""
    if target is None or isinstance(target, str):
        return target, target
    label = a.labels[int(target)]
    return int(target), (label if label in b.labels else int(target))


def compare(left: ModelBundle | str, right: ModelBundle | str, image,
            methods: Sequence[str] | str = ("gradcam",), *, left_layer: str | None = None,
            right_layer: str | None = None, target=None, fraction: float = 0.2,
            score: str = "logit") -> Comparison:
    """Explain ``image`` with both models and the same ``methods``; ``target``: a label both models
    know (or a class index of the left model, matched by label), or ``None`` for each model's top class."""
    left = load_model(left) if isinstance(left, str) else left
    right = load_model(right) if isinstance(right, str) else right
    left_target, right_target = _shared_target(left, right, target)
    a = explain(left, image, methods=methods, layer=left_layer, target=left_target, score=score)
    b = explain(right, image, methods=methods, layer=right_layer, target=right_target, score=score)
    agreement = {}
    for method in a.methods:
        ma, mb = common_grid(a.maps[method], b.maps[method])
        agreement[method] = MapAgreement(spearman=rank_correlation(ma, mb),
                                         top_iou=top_region_iou(ma, mb, fraction))
    notes = []
    view_a, view_b = a.view(), b.view()
    if view_a.size != view_b.size:
        notes.append(f"the models see the image at {view_a.width}×{view_a.height} and "
                     f"{view_b.width}×{view_b.height}; maps compared at the smaller size")
    if a.target_label() != b.target_label():
        notes.append(f"the maps explain different classes: {a.target_label()} and {b.target_label()}")
    return Comparison(left=a, right=b, agreement=agreement, fraction=fraction, notes=notes)
