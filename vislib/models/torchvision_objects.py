"""torchvision's detection zoo (Faster / Mask / Keypoint R-CNN, RetinaNet, FCOS, SSD, SSDlite: all 12
builders) and segmentation zoo (FCN, DeepLabV3, LR-ASPP), by name as the classifiers are, with their
``Weights.DEFAULT`` (COCO; the segmenters COCO with VOC labels) through the torch hub cache.

The input view: the image resized to a square of the model's own size (a detector's
``transform.min_size``: 800, 320 or 300; a segmenter's preset ``resize_size``, 520), unnormalised for
the detectors (their ``GeneralizedRCNNTransform`` normalises inside) and normalised for the
segmenters. A detector's boxes come back in that view's pixels: its transform resizes internally and
maps the boxes back to the size of the tensor it was given.

Random weights (``weights=None``) build offline: no backbone checkpoint either. A random detector is
degenerate (scores near 1/classes, nothing above the default thresholds): :func:`lower_thresholds`
lets it return its candidates for tests.
"""

from __future__ import annotations

from .registry import register_source, source_spec
from .source import SourceModel, preprocess
from .torchvision_zoo import pretrained_available, torchvision_model


def detection_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models.detection))


def segmentation_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models.segmentation))


def lower_thresholds(model, score: float = 0.0) -> None:
    """Let a detector return every candidate (score threshold ``score``): for random weights."""
    for owner in (model, getattr(model, "roi_heads", None)):
        if owner is not None and hasattr(owner, "score_thresh"):
            owner.score_thresh = score


def _view_size(model, task: str, weights_enum) -> int:
    if task == "detection":
        return int(model.transform.min_size[0])
    resize = weights_enum.transforms().resize_size
    return int(resize[0] if isinstance(resize, (list, tuple)) else resize)


def object_source(name: str, task: str, weights, kwargs: dict) -> SourceModel:
    """Build torchvision's detector / segmenter ``name``: pretrained (``"default"``), seeded random
    (None, offline: no backbone weights either) or a user's state dict."""
    import torchvision

    weights_enum = torchvision.models.get_model_weights(name).DEFAULT
    labels, labels_from = list(weights_enum.meta["categories"]), f"torchvision {weights_enum}"
    notes: list[str] = []
    arch = {"weights_backbone": None, **kwargs}
    arch.setdefault("num_classes", len(labels))
    model, weights_id, note = torchvision_model(name, weights, weights_enum, kwargs, arch)
    notes += [note] if note else []
    if weights is None and task == "detection":
        notes.append("random weights: a random detector scores every candidate near 1/classes and "
                     "returns nothing above its default threshold (vislib.models.torchvision_objects."
                     "lower_thresholds shows them)")
    named: list[str] | None = labels  # None: the head was resized, the categories no longer apply
    if kwargs.get("num_classes", len(labels)) != len(labels):
        named, labels_from = None, "class indices"
    size = _view_size(model, task, weights_enum)
    if task == "detection":
        pre = preprocess(resize=(size, size), crop=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    else:
        t = weights_enum.transforms()
        pre = preprocess(resize=(size, size), crop=None, mean=t.mean, std=t.std,
                         interpolation=t.interpolation)
    return SourceModel(
        model=model, preprocess=pre, labels=named, labels_from=labels_from, weights=weights_id,
        source="torchvision", channels=3, task=task, notes=notes,
        description=f"torchvision {name} ({task}, {weights_enum.name})",
    )


def _register(name: str, task: str) -> None:
    register_source(source_spec(
        name, "torchvision", f"torchvision {name} ({task})",
        lambda weights, kwargs: object_source(name, task, weights, kwargs),
        available=lambda: pretrained_available(name),
    ))


for _name in detection_names():
    _register(_name, "detection")
for _name in segmentation_names():
    _register(_name, "segmentation")
