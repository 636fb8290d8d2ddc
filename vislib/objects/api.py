"""``detect`` and ``segment``: what a detector or segmenter sees in an image, in input-view pixels."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..errors import ModelError
from .outputs import detections_of, segmentation_logits_of


@dataclass
class Detections:
    """A detector's output for one image, in the pixels of ``view`` (the image as the model saw it).

    ``boxes``: K×4 float (x0, y0, x1, y1); ``scores``: K; ``labels``: K class indices, ``names`` their
    labels; ``masks``: K×H×W in [0, 1] (instance-segmentation models) or None. Sorted by score.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    names: list[str]
    view: Image.Image
    masks: np.ndarray | None = None
    extra: dict = field(default_factory=dict)  # e.g. keypoints

    def __len__(self) -> int:
        return len(self.scores)

    def rows(self) -> list[dict]:
        """One plain dict per detection (index, label, name, score, box)."""
        return [{"index": i, "label": int(self.labels[i]), "name": self.names[i],
                 "score": float(self.scores[i]), "box": [float(v) for v in self.boxes[i]]}
                for i in range(len(self))]


@dataclass
class Segmentation:
    """A segmenter's output for one image at the view's resolution: ``class_map`` H×W (argmax),
    ``logits`` C×H×W, ``labels`` the class names, ``present`` the classes in the map."""

    class_map: np.ndarray
    logits: np.ndarray
    labels: list[str]
    view: Image.Image

    @property
    def present(self) -> list[int]:
        return [int(c) for c in np.unique(self.class_map)]

    def mask(self, label: int) -> np.ndarray:
        """Bool H×W: the pixels predicted as ``label``."""
        return self.class_map == label


def _check_task(bundle, task: str) -> None:
    if getattr(bundle, "task", "classification") != task:
        raise ModelError(f"{bundle.name} is a {bundle.task} model, not a {task} model")


def _inputs(bundle, image) -> tuple[torch.Tensor, Image.Image]:
    from ..imageio import load_image

    inputs, views = bundle.prepare([load_image(image)])
    return inputs, views[0]


def raw_output(bundle, inputs: torch.Tensor):
    """The model's own output of ``inputs`` (no gradient), under the bundle's lock."""
    with bundle.lock, torch.no_grad():
        return bundle.model(inputs)


def detect(bundle, image, *, score_threshold: float = 0.0) -> Detections:
    """The detections of ``image`` (a path, bytes, PIL image or array) by a detection bundle, boxes in
    the pixels of the input view (``Detections.view``), those scoring under ``score_threshold`` dropped
    (the model's own threshold applies first)."""
    from ..models import load_model

    bundle = load_model(bundle) if isinstance(bundle, str) else bundle
    _check_task(bundle, "detection")
    inputs, view = _inputs(bundle, image)
    det = detections_of(raw_output(bundle, inputs))[0]
    keep = det["scores"] >= score_threshold
    order = torch.argsort(det["scores"][keep], descending=True)
    pick = {k: v[keep][order] for k, v in det.items() if isinstance(v, torch.Tensor) and len(v) == len(keep)}
    labels = pick["labels"].long().cpu().numpy()
    mask_t = pick.get("masks")
    masks = None if mask_t is None else mask_t.float().cpu().numpy().reshape(len(labels), *mask_t.shape[-2:])
    names = [bundle.labels[c] if 0 <= c < len(bundle.labels) else f"class {c}" for c in labels]
    extra = {k: v.detach().cpu().numpy() for k, v in pick.items()
             if k not in ("boxes", "scores", "labels", "masks")}
    return Detections(boxes=pick["boxes"].detach().float().cpu().numpy().reshape(-1, 4),
                      scores=pick["scores"].detach().float().cpu().numpy(), labels=labels, names=names,
                      view=view, masks=masks, extra=extra)


def segment(bundle, image) -> Segmentation:
    """The class map and per-class logits of ``image`` at the input view's resolution."""
    from ..models import load_model

    bundle = load_model(bundle) if isinstance(bundle, str) else bundle
    _check_task(bundle, "segmentation")
    inputs, view = _inputs(bundle, image)
    logits = segmentation_logits_of(raw_output(bundle, inputs), (view.height, view.width))[0].float()
    return Segmentation(class_map=logits.argmax(0).cpu().numpy(), logits=logits.cpu().numpy(),
                        labels=list(bundle.labels), view=view)
