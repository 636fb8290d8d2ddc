"""What to explain in a detector's or a segmenter's output: box and region scores (shared METHODS.md,
"Targets"), and the bundle views that let every method of the library explain them.

- Box ``b`` of label ``l`` (pytorch-grad-cam's FasterRCNNBoxScoreTarget): over the detections ``d`` of
  label ``l``, the one with the largest ``IoU(b, d)``; if that IoU exceeds the threshold (0.5), the
  score is ``IoU + s_d``, else 0. (pgc takes the largest IoU over *all* detections, then checks the
  label; we take it among the detections of the label, as METHODS.md says: the same where the boxes
  do not overlap across labels.)
- Region ``(c, M)`` (pgc's SemanticSegmentationTarget, Seg-Grad-CAM, Vinogradova et al. 2020):
  ``Σ_{(i,j)∈M} z_{c,i,j}``, class c's logits summed over the mask M; ``M = None`` means the pixels
  the model predicts as c on the image being explained (fixed then, so that perturbed copies are
  scored over the same pixels).

:func:`box_bundle` / :func:`region_bundle` give a view of a detection / segmentation bundle whose
"class scores" are those K scores (one column per box / region, labelled): ``vislib.explain`` with
``target=k`` then explains box / region k with any method (gradient CAMs, guided backprop, gradients,
occlusion, Score-CAM, ...), because every method explains ``bundle.logits(x)[:, target]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from torchvision.ops import box_iou

from ..errors import TargetError
from .outputs import detections_of, segmentation_logits_of

IOU_THRESHOLD = 0.5


def box_score(det: dict[str, torch.Tensor], boxes: torch.Tensor, labels: torch.Tensor,
              iou_threshold: float = IOU_THRESHOLD) -> torch.Tensor:
    """K scores (one per reference box) of one image's detections ``det``: ``IoU + s_d`` of the
    same-label detection with the largest IoU, where that IoU exceeds ``iou_threshold``, else 0."""
    pred_boxes, scores = det["boxes"], det["scores"]
    if len(scores) == 0:
        return scores.new_zeros(len(boxes)) + 0 * pred_boxes.sum()
    ious = box_iou(boxes.to(pred_boxes), pred_boxes)  # K×M
    want = labels.to(det["labels"].device).view(-1, 1)
    same = (want == det["labels"].view(1, -1)) | (want < 0)  # a label of -1: any label
    ious = torch.where(same, ious, torch.full_like(ious, -1.0))
    best_iou, best = ious.max(dim=1)
    score = best_iou + scores[best]
    return torch.where(best_iou > iou_threshold, score, torch.zeros_like(score))


class BoxScores:
    """Output selector: a detector's output → N×K box scores (:func:`box_score`)."""

    def __init__(self, boxes, labels, iou_threshold: float = IOU_THRESHOLD) -> None:
        self.boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        self.labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if len(self.boxes) != len(self.labels):
            raise TargetError(f"{len(self.boxes)} boxes but {len(self.labels)} labels")
        self.iou_threshold = iou_threshold

    def __call__(self, out) -> torch.Tensor:
        return torch.stack([box_score(det, self.boxes, self.labels, self.iou_threshold)
                            for det in detections_of(out)])


class RegionScores:
    """Output selector: a segmenter's output → N×K region scores, ``Σ_{M_k} z_{c_k}``; ``masks``
    K×H×W (bool or weights) at the input view's size. A mask left None is the pixels predicted as
    its class by the *first* output scored (the image explained: N masks, one per image), then kept
    fixed, so that perturbed copies of an image are scored over the same pixels."""

    def __init__(self, labels, masks: list, size: tuple[int, int]) -> None:
        self.labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        self.masks = [None if m is None else torch.as_tensor(m).float() for m in masks]
        h, w = size
        self.size = (h, w)
        self._fixed: torch.Tensor | None = None  # N×K×H×W once the first output was seen

    def _masks(self, logits: torch.Tensor) -> torch.Tensor:
        if self._fixed is None:
            predicted = logits.detach().argmax(1)  # N×H×W
            self._fixed = torch.stack([
                (predicted == c).float() if m is None else m.to(logits.device).expand_as(predicted)
                for c, m in zip(self.labels.tolist(), self.masks, strict=True)], dim=1)
        fixed = self._fixed.to(logits.device)
        if fixed.shape[0] != logits.shape[0]:  # perturbed copies of one image
            fixed = fixed[:1].expand(logits.shape[0], -1, -1, -1)
        return fixed

    def __call__(self, out) -> torch.Tensor:
        logits = segmentation_logits_of(out, self.size)
        picked = logits[:, self.labels]  # N×K×H×W
        return (picked * self._masks(logits)).sum((2, 3))


def _label_index(bundle, label) -> int:
    from ..explain import _target_index

    return _target_index(bundle.labels, label)


def box_bundle(bundle, boxes: Sequence | np.ndarray, labels: Sequence | np.ndarray,
               iou_threshold: float = IOU_THRESHOLD):
    """A view of a detection ``bundle`` whose class scores are the scores of ``boxes`` (K×4, in input
    view pixels) with ``labels`` (indices or names): ``explain(view, image, target=k)`` explains box k.
    Shares the model, its lock and its layers."""
    if bundle.task != "detection":
        raise TargetError(f"a box target needs a detection model; {bundle.name} is a {bundle.task} model")
    idx = [-1 if isinstance(label, (int, np.integer)) and label == -1 else _label_index(bundle, label)
           for label in labels]
    names = [f"{bundle.labels[c] if c >= 0 else 'any'} box {i}" for i, c in enumerate(idx)]
    return replace(bundle, output=BoxScores(boxes, idx, iou_threshold), labels=names, cpu_fallback=None,
                   ref=None)


def region_bundle(bundle, image, labels: Sequence, masks: Sequence | None = None):
    """A view of a segmentation ``bundle`` whose class scores are the region scores of ``labels``
    (indices or names) over ``masks`` (H×W bool each, at the input view's size; None or a None entry:
    the pixels predicted as that label on the image explained, fixed at its first forward).
    ``image`` is not needed (kept for the callers that pass it)."""
    if bundle.task != "segmentation":
        raise TargetError(f"a region target needs a segmentation model; {bundle.name} is a "
                          f"{bundle.task} model")
    idx = [_label_index(bundle, label) for label in labels]
    masks = list(masks) if masks is not None else [None] * len(idx)
    if len(masks) != len(idx):
        raise TargetError(f"{len(idx)} region labels but {len(masks)} masks")
    h, w = bundle.input_hw
    for mask in masks:
        if mask is not None and tuple(np.shape(mask)) != (h, w):
            raise TargetError(f"a region mask must be {h}×{w} (the input view), not {tuple(np.shape(mask))}")
    names = [f"{bundle.labels[c]} region" for c in idx]
    return replace(bundle, output=RegionScores(idx, masks, (h, w)), labels=names, cpu_fallback=None,
                   ref=None)
