"""Explain several boxes (or regions) of one image with the gradient CAMs from ONE forward pass.

``vislib.explain(box_bundle(...), image, target=k)`` explains one box with any method; this module is
the fast path for many boxes at once: one forward with the target layer captured as a fresh leaf (the
backward stops there, as in the CAM family's own pass), then one backward per box score through the
retained graph, each map from the methods' own weights (:class:`vislib.methods.cam.CAMMethod`).

Per-box normalisation (pytorch-grad-cam's detection tutorial): each box's map min-max scaled inside
its box and zero outside, so a large object does not drown the small ones.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import MethodError
from ..hooks import capture_layer, resolve_layer
from ..imageio import load_image
from ..methods.base import get_method
from ..methods.cam import CAMMethod
from .scores import box_bundle, region_bundle


@dataclass
class ObjectExplanation:
    """``maps[m]``: K×H×W float32 in [0, 1] at the input view's size, one per box / region;
    ``scores``: the K scores explained; ``seconds``: forward, backward and total time."""

    maps: dict[str, np.ndarray]
    scores: np.ndarray
    names: list[str]
    view: Image.Image
    layer: str
    boxes: np.ndarray | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def per_box_normalise(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """K×H×W maps, each min-max scaled inside its box (x0, y0, x1, y1 in pixels) and zero outside."""
    out = torch.zeros_like(maps)
    h, w = maps.shape[-2:]
    for k, box in enumerate(boxes.tolist()):
        x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
        x1, y1 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
        if x1 <= x0 or y1 <= y0:
            continue
        crop = maps[k, y0:y1, x0:x1]
        lo, hi = crop.min(), crop.max()
        if hi > lo:
            out[k, y0:y1, x0:x1] = (crop - lo) / (hi - lo)
    return out


def _cam_methods(names: Sequence[str]) -> list[CAMMethod]:
    methods = []
    for name in names:
        cls = get_method(name)
        if not (issubclass(cls, CAMMethod) and cls.needs_gradients) or name in ("shapleycam", "finercam"):
            raise MethodError(f"{name}: the one-forward path serves the gradient CAMs (gradcam, gradcam++, "
                              f"xgradcam, layercam, hirescam, gradcam_elementwise, eigengradcam); use "
                              f"vislib.explain on a box_bundle / region_bundle for the others")
        methods.append(cls())
    return methods


def _explain_scores(view_bundle, image, methods, layer, boxes=None, normalise_per_box=False):
    cams = _cam_methods([methods] if isinstance(methods, str) else methods)
    inputs, views = view_bundle.prepare([load_image(image)])
    layer_name, module = resolve_layer(view_bundle, layer)
    start = time.perf_counter()
    with view_bundle.lock, torch.no_grad(), capture_layer(module, grad=True,
                                                           view=view_bundle.view(layer_name)) as cap:
        scores = view_bundle.logits(inputs)[0]
    forward = time.perf_counter() - start
    A = cap.activation
    if A is None:
        raise MethodError(f"layer {layer_name!r} did not run during the forward pass")
    grads = []
    for k in range(len(scores)):
        if not scores[k].requires_grad:  # nothing matched this box: a zero score, no gradient
            grads.append(torch.zeros_like(A))
            continue
        (g,) = torch.autograd.grad(scores[k], A, retain_graph=k < len(scores) - 1, allow_unused=True)
        grads.append(torch.zeros_like(A) if g is None else g)
    backward = time.perf_counter() - start - forward
    g = torch.cat(grads)
    a = A.detach().expand(len(grads), *A.shape[1:])
    size = tuple(inputs.shape[-2:])
    maps = {}
    for cam in cams:
        raw = F.relu(cam.saliency(a, g))
        up = F.interpolate(raw.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
        if normalise_per_box and boxes is not None:
            up = per_box_normalise(up, boxes)
        else:
            lo = up.flatten(1).amin(1).view(-1, 1, 1)
            hi = up.flatten(1).amax(1).view(-1, 1, 1)
            up = torch.where(hi > lo, (up - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(up))
        maps[cam.name] = up.detach().cpu().numpy().astype(np.float32)
    total = time.perf_counter() - start
    return ObjectExplanation(
        maps=maps, scores=scores.detach().cpu().numpy(), names=list(view_bundle.labels), view=views[0],
        layer=layer_name, boxes=None if boxes is None else boxes.cpu().numpy(),
        seconds={"forward": forward, "backward": backward, "total": total},
    )


def explain_boxes(bundle, image, boxes, labels, methods: Sequence[str] | str = ("gradcam",),
                  layer: str | None = None, *, normalise_per_box: bool = False) -> ObjectExplanation:
    """Gradient-CAM maps of K boxes (K×4 in input-view pixels, with their labels) from one forward.

    The score of box k is pytorch-grad-cam's box score (:func:`vislib.objects.scores.box_score`);
    ``normalise_per_box`` scales each map inside its own box (zero outside)."""
    view_bundle = box_bundle(bundle, boxes, labels)
    return _explain_scores(view_bundle, image, methods, layer, view_bundle.output.boxes, normalise_per_box)


def explain_regions(bundle, image, labels, masks=None, methods: Sequence[str] | str = ("gradcam",),
                    layer: str | None = None) -> ObjectExplanation:
    """Seg-Grad-CAM (Vinogradova et al. 2020) and the other gradient CAMs of K regions from one forward:
    the score of region k is class k's logits summed over its mask (None: the predicted pixels)."""
    return _explain_scores(region_bundle(bundle, image, labels, masks), image, methods, layer)
