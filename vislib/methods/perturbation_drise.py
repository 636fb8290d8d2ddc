"""D-RISE (Petsiuk et al., CVPR 2021, "Black-box Explanation of Object Detectors via Saliency Maps"):
the black-box method for detectors, in the perturbation family.

RISE masks (Petsiuk et al. 2018): N random s×s binary grids with cell probability p, bilinearly
upsampled to (s+1)·cell and shifted by a random offset in [0, cell) (cropped to H×W). The target
detection d_t = (L_t, O_t, P_t): box, objectness, class-probability vector. For masked image i and
its detections d_j::

    w_i = max_j IoU(L_t, L_j) · cos(P_t, P_j) · O_j          saliency = Σ_i w_i M_i / (N · p)

O_j = 1 for detectors without objectness (torchvision's). torchvision's detectors give one score per
detection, not a class vector: P is the score on the label and the rest spread evenly over the other
classes (``(1 − s)/(C − 1)``), as vision-explanation-methods' ``expand_class_scores`` does. The masked
images are scored in batches (a detector's forward takes a batch), never one by one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from ..errors import MethodError
from .base import register_method
from .perturbation_base import PerturbationMethod, Plan, Session


def rise_masks(count: int, size: tuple[int, int], grid: int = 16, p: float = 0.5,
               generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """``count`` RISE masks (count×H×W, float in [0, 1]): s×s Bernoulli(p) grids, bilinearly upsampled
    to (s+1)·cell, cropped at a random shift in [0, cell)."""
    h, w = size
    ch, cw = math.ceil(h / grid), math.ceil(w / grid)
    cells = (torch.rand(count, 1, grid, grid, generator=generator) < p).float()
    up = F.interpolate(cells, size=((grid + 1) * ch, (grid + 1) * cw), mode="bilinear", align_corners=False)
    dy = torch.randint(0, ch, (count,), generator=generator).tolist()
    dx = torch.randint(0, cw, (count,), generator=generator).tolist()
    out = torch.stack([up[i, 0, y:y + h, x:x + w] for i, (y, x) in enumerate(zip(dy, dx, strict=True))])
    return out.to(device) if device is not None else out


def class_vectors(scores: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """K×C class-probability vectors from one score per detection: the score on its label, the rest
    ``(1 − s)/(C − 1)`` on every other class."""
    rest = ((1 - scores) / max(classes - 1, 1)).clamp_min(0).unsqueeze(1)
    vec = rest.expand(-1, classes).clone()
    vec.scatter_(1, labels.long().view(-1, 1).clamp(0, classes - 1), scores.view(-1, 1).float())
    return vec


def drise_weights(target_boxes: torch.Tensor, target_vectors: torch.Tensor, detections: list[dict],
                  classes: int) -> torch.Tensor:
    """N×K weights: for each masked image's detections and each target, ``max_j IoU · cos · O_j``."""
    rows = []
    for det in detections:
        boxes = det["boxes"].float()
        if len(boxes) == 0:
            rows.append(target_boxes.new_zeros(len(target_boxes)))
            continue
        vectors = class_vectors(det["scores"].float(), det["labels"], classes)
        objectness = det.get("objectness")
        objectness = torch.ones(len(boxes), device=boxes.device) if objectness is None else objectness.float()
        iou = box_iou(target_boxes.to(boxes), boxes)
        cos = F.normalize(target_vectors.to(boxes), dim=1) @ F.normalize(vectors, dim=1).T
        rows.append((iou * cos * objectness.view(1, -1)).amax(dim=1))
    return torch.stack(rows)


def drise_saliency(masks: torch.Tensor, weights: torch.Tensor, p: float) -> torch.Tensor:
    """K×H×W: ``Σ_i w_ik M_i / (N·p)``."""
    return torch.einsum("nk,nhw->khw", weights, masks) / (masks.shape[0] * p)


def target_detections(bundle, inputs: torch.Tensor, targets: torch.Tensor | None, detections: list[dict]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(boxes N×4, class vectors N×C) of what each sample explains: a box target's box (its matching
    detection's score for P_t, 1 if none matches), or the best detection of the target class."""
    from ..objects.scores import BoxScores

    classes = len(bundle.labels) if not isinstance(bundle.output, BoxScores) else _classes(bundle)
    boxes, vectors = [], []
    for n, det in enumerate(detections):
        t = 0 if targets is None else int(targets[n])  # a Box target: the view's one column
        label: torch.Tensor | int  # a box's label (a tensor), or the target class
        if isinstance(bundle.output, BoxScores):
            box, label = bundle.output.boxes[t].to(inputs.device), bundle.output.labels[t]
            same = (det["labels"] == label) | (label < 0)
            score = torch.tensor(1.0)
            if bool(same.any()):
                iou = box_iou(box.view(1, 4), det["boxes"][same].float())[0]
                score = det["scores"][same][iou.argmax()].float().cpu()
        else:
            same = det["labels"] == t
            if not bool(same.any()):
                raise MethodError(f"drise: the model detects no {bundle.labels[t]!r} in this image; "
                                  f"pick a box to explain (vislib.detect lists the detections)")
            k = int(det["scores"].masked_fill(~same, -1).argmax())
            box, label, score = det["boxes"][k].float(), t, det["scores"][k].float().cpu()
        boxes.append(box.float())
        vectors.append(class_vectors(score.view(1), torch.tensor([label]), classes)[0])
    return torch.stack(boxes), torch.stack(vectors)


def _classes(bundle) -> int:
    from ..objects.outputs import detector_classes

    return int(detector_classes(bundle.model) or bundle.output.labels.max() + 1)


@register_method
class DRISE(PerturbationMethod):
    """D-RISE (Petsiuk et al., CVPR 2021): the black-box saliency of one detection, from the detections
    of N randomly masked copies (see the module docstring for the formula). Options: ``masks``
    (N, default 1000), ``grid`` (s, 16), ``p`` (0.5), ``seed`` (0), ``batch_size`` (16)."""

    name = "drise"
    title = "D-RISE"
    paper = "Petsiuk et al. 2021, Black-box Explanation of Object Detectors via Saliency Maps"
    passes = "1 fwd + N masked fwd, batched"
    uses_layer = False
    slow = True
    needs_activation = False
    default_batch_size = 16
    cuda_batch_size = 64
    options_allowed = ("batch_size", "masks", "grid", "p", "seed")
    tasks = ("detection",)
    task_reason = "it weighs masks by the similarity of the masked image's detections to a box"

    def plan(self, session: Session) -> Plan:
        from ..objects.outputs import detections_of

        ctx, bundle = session.ctx, session.bundle
        count = self.int_option("masks", 1000)
        grid = self.int_option("grid", 16)
        p = self.float_option("p", 0.5)
        if not 0 < p < 1:
            raise MethodError(f"drise: option 'p' must be in (0, 1), not {p}")
        seed = self.int_option("seed", 0, low=0)
        inputs = ctx.inputs
        n, _, h, w = inputs.shape
        session.logits()
        with bundle.lock, torch.no_grad():
            base = detections_of(bundle.model(inputs))
        boxes, vectors = target_detections(bundle, inputs, ctx.targets, base)
        classes = vectors.shape[1]
        generator = torch.Generator().manual_seed(seed)
        masks = rise_masks(count, (h, w), grid, p, generator, inputs.device)
        owner = torch.arange(n, device=inputs.device).repeat_interleave(count)

        def make_batch(start: int, stop: int):
            rows = torch.arange(start, stop, device=inputs.device)
            return rows, inputs[owner[rows]] * masks[rows % count].unsqueeze(1)

        def forward(batch) -> torch.Tensor:
            rows, images = batch
            dets = detections_of(bundle.model(images))
            weights = torch.stack([drise_weights(boxes[o:o + 1], vectors[o:o + 1], [d], classes)[0, 0]
                                   for o, d in zip(owner[rows].tolist(), dets, strict=True)])
            return weights.view(-1, 1)

        def run() -> tuple[torch.Tensor, dict]:
            zeros = torch.zeros(n * count, dtype=torch.long, device=inputs.device)
            weights = session.scores(n * count, make_batch, zeros, "logit", self.batch_size, forward=forward)
            maps = torch.stack([drise_saliency(masks, weights[i * count:(i + 1) * count].view(-1, 1), p)[0]
                                for i in range(n)])
            extra = {"masks": count, "grid": grid, "p": p, "seed": seed, "forwards": n * count,
                     "batch_size": self.batch_size, "boxes": boxes.cpu().tolist()}
            return maps, extra

        return Plan(forwards=n * count, run=run)
