"""What a detector or a segmenter returns, read the same way whatever the source.

- :func:`task_of` tells a model's task from its class (torchvision's detection and segmentation
  models, Hugging Face object-detection / semantic-segmentation heads), ``"classification"`` otherwise;
- :func:`detections_of` reads a detector's output as one dict per image (``boxes`` N×4 in the input's
  pixels, ``scores``, ``labels``, ``masks`` where the model has them), :func:`segmentation_logits_of`
  a segmenter's as N×C×H×W logits at the input's size;
- :func:`task_output` is the *class-score* reading a detection / segmentation bundle gets by default
  (``bundle.logits``), so that every method and page that asks for "the class scores" still works:
  detection: per class, the best score of a detection of that class (0 where there is none);
  segmentation: per class c, ``Σ_{(i,j): argmax = c} z_c`` (pytorch-grad-cam's
  SemanticSegmentationTarget over the pixels predicted as c);
- :func:`choose_object_layer` is the default-layer rule of these tasks.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TASKS = ("classification", "detection", "segmentation")

_TV_DETECTORS = ("GeneralizedRCNN", "RetinaNet", "FCOS", "SSD")
_TV_SEGMENTERS = ("_SimpleSegmentationModel", "LRASPP")


def _class_names(model: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(model).__mro__}


def task_of(model: nn.Module) -> str:
    """The task a model serves, from its class: torchvision detectors (Faster / Mask / Keypoint
    R-CNN, RetinaNet, FCOS, SSD) and segmenters (FCN, DeepLabV3, LR-ASPP), Hugging Face
    ``*ForObjectDetection`` and ``*ForSemanticSegmentation`` / ``*ForUniversalSegmentation``."""
    names = _class_names(model)
    if names & set(_TV_DETECTORS) or any(n.endswith("ForObjectDetection") for n in names):
        return "detection"
    if names & set(_TV_SEGMENTERS) or any(n.endswith(("ForSemanticSegmentation", "ForUniversalSegmentation"))
                                          for n in names):
        return "segmentation"
    return "classification"


def detections_of(out) -> list[dict[str, torch.Tensor]]:
    """A detector's output as one dict per image: ``boxes`` (K×4, x0 y0 x1 y1 in the input's pixels),
    ``scores`` (K), ``labels`` (K, int64) and ``masks`` (K×H×W in [0, 1]) where the model has them.

    torchvision's detectors already return this (their transform maps the boxes back to the size of
    the tensor they were given)."""
    if isinstance(out, (list, tuple)) and all(isinstance(d, dict) and "boxes" in d for d in out):
        return [dict(d) for d in out]
    from ..errors import ModelError
    from ..models.bundle import describe_output

    raise ModelError(f"not a detector's output: {describe_output(out)} (expected one dict with boxes, "
                     f"scores and labels per image)")


def segmentation_logits_of(out, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A segmenter's N×C×H×W logits (torchvision's ``out``, a ``ModelOutput``'s ``logits``, or a
    tensor), bilinearly resized to ``size`` when given and different."""
    if isinstance(out, dict) and isinstance(out.get("out"), torch.Tensor):
        logits = out["out"]
    elif isinstance(out, torch.Tensor):
        logits = out
    elif isinstance(getattr(out, "logits", None), torch.Tensor):
        logits = out.logits
    else:
        from ..errors import ModelError
        from ..models.bundle import describe_output

        raise ModelError(f"not a segmenter's output: {describe_output(out)} (expected N×C×H×W logits)")
    if logits.dim() != 4:
        from ..errors import ModelError

        raise ModelError(f"a segmenter's logits are N×C×H×W, not {tuple(logits.shape)}")
    if size is not None and tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits


class DetectionClassScores:
    """Output selector of a detection bundle: N×classes, the best detection score per class."""

    def __init__(self, classes: int) -> None:
        self.classes = classes

    def __call__(self, out) -> torch.Tensor:
        rows = []
        for det in detections_of(out):
            scores, labels = det["scores"], det["labels"].long().clamp(0, self.classes - 1)
            row = scores.new_zeros(self.classes)
            rows.append(row.scatter_reduce(0, labels, scores, reduce="amax", include_self=True))
        return torch.stack(rows)

    def __repr__(self) -> str:
        return f"DetectionClassScores({self.classes})"


class SegmentationClassScores:
    """Output selector of a segmentation bundle: N×C, class c's logits summed over the pixels
    predicted as c (0 where no pixel is)."""

    def __call__(self, out) -> torch.Tensor:
        logits = segmentation_logits_of(out)
        predicted = F.one_hot(logits.detach().argmax(1), logits.shape[1]).permute(0, 3, 1, 2)
        return (logits * predicted).sum((2, 3))

    def __repr__(self) -> str:
        return "SegmentationClassScores()"


def detector_classes(model: nn.Module) -> int | None:
    """The number of classes (the background included) of a torchvision / Hugging Face detector."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "num_labels", None):
        return int(config.num_labels)
    for path in ("head.classification_head.num_classes", "roi_heads.box_predictor.cls_score.out_features",
                 "head.classification_head.num_columns"):
        obj: Any = model  # any attribute along the path
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return int(obj)
        except AttributeError:
            continue
    return None


def task_output(task: str, classes: int | None):
    """The class-score output selector of a ``task`` bundle (None for classification)."""
    if task == "detection":
        return DetectionClassScores(int(classes or 1))
    if task == "segmentation":
        return SegmentationClassScores()
    return None


def choose_object_layer(probe, task: str) -> tuple[str, str] | None:
    """The default layer of a detector or segmenter, and why (None: the classifier rule applies).

    Detection: a feature pyramid's finest level (``…fpn.layer_blocks.0``: the heads run on every
    level, so they are not one map; the finest level carries the small objects), else the backbone's
    last map with the largest grid (SSD's first source). Segmentation: the backbone's last map (the
    deepest features before the segmentation head, as pytorch-grad-cam's segmentation tutorial)."""
    names = [n for n in probe.order if probe.views[n].spatial]
    backbone = [n for n in names if n.split(".")[0] in ("backbone", "model", "segformer", "encoder")]
    if task == "detection":
        levels = {n: int(m.group(1)) for n in backbone if (m := re.search(r"fpn\.layer_blocks\.(\d+)$", n))}
        if levels:  # the largest grid; on a tie the lowest level
            best = min(levels, key=lambda n: (-probe.views[n].grid[0] * probe.views[n].grid[1], levels[n]))
            h, w = probe.views[best].grid
            return best, (f"the feature pyramid's finest level ({h}×{w}): every head reads it, and it "
                          f"carries the small objects; the heads run once per level, so they are no map")
        if backbone:
            top = max(probe.views[n].grid[0] * probe.views[n].grid[1] for n in backbone)
            best = [n for n in backbone if probe.views[n].grid[0] * probe.views[n].grid[1] == top][-1]
            h, w = probe.views[best].grid
            return best, f"the backbone's last map at its largest grid ({h}×{w}), the first the heads read"
        return None
    if task == "segmentation" and backbone:
        last = backbone[-1]
        h, w = probe.views[last].grid
        return last, (f"the backbone's last map ({h}×{w}): the deepest features before the segmentation "
                      f"head")
    return None
