"""``evaluate_objects``: a detector's mAP or a segmenter's mIoU over an annotated set, and the error list
an engineer reads, each error with its explanation and how well that map sits on the object.

Detection (predictions scoring ≥ ``score_threshold`` matched to the ground truth, best IoU first):
``wrong label`` (IoU ≥ 0.5 with an object of another class), ``misplaced box`` (right class,
0.1 ≤ IoU < 0.5), ``false positive`` (IoU < 0.1 with every object), ``missed`` (an object no
prediction matched). mAP@0.5 and mAP@[.5:.95] by torchmetrics' MeanAveragePrecision (COCO protocol).
Segmentation: mIoU by torchmetrics' JaccardIndex; per image, ``missed region`` (a true class whose
pixels are predicted as it less than half the time, IoU < 0.5) and ``false region`` (a predicted
class absent from the truth).

Each error but the missed ones (there is no detection to explain) gets Grad-CAM of its box (one forward
per image for all its boxes: :func:`vislib.objects.explain_boxes`) or Seg-Grad-CAM of its region, and
the localisation of that map: energy inside the object (the true box / mask it overlaps; for a false
positive its own box) and the pointing game (the map's peak within ``tolerance`` px of it), beside
the image-centre baseline (the centre point in the same box).

:func:`evaluate_rows` is the one per-image step; :func:`evaluate_objects` runs it over the set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.ops import box_iou

from ..errors import InputError
from .datasets import ObjectItem

IOU_MATCH, IOU_NEAR = 0.5, 0.1


@dataclass
class ObjectEvalResult:
    task: str
    metrics: dict
    errors: list[dict] = field(default_factory=list)
    images: int = 0

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for e in self.errors:
            kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
        found = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "no errors"
        m = self.metrics
        main = (f"mAP@0.5 {m['map_50']:.3f}, mAP {m['map']:.3f}" if self.task == "detection"
                else f"mIoU {m['miou']:.3f}")
        return f"{main} on {self.images} images; {found}"


def _scale(boxes: np.ndarray, src: tuple[int, int], dst: tuple[int, int]) -> np.ndarray:
    sx, sy = dst[0] / src[0], dst[1] / src[1]
    return boxes * np.array([sx, sy, sx, sy], np.float32)


def _localisation(sal: np.ndarray, box, tolerance: int) -> dict:
    h, w = sal.shape
    x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x1, y1 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
    total = float(sal.sum())
    energy = float(sal[y0:y1, x0:x1].sum()) / total if total > 0 else 0.0
    py, px = np.unravel_index(int(np.argmax(sal)), sal.shape)
    hit = x0 - tolerance <= px < x1 + tolerance and y0 - tolerance <= py < y1 + tolerance
    cy, cx = h / 2, w / 2
    centre = x0 - tolerance <= cx < x1 + tolerance and y0 - tolerance <= cy < y1 + tolerance
    return {"energy_in_box": round(energy, 4), "pointing_hit": bool(hit), "centre_hit": bool(centre)}


def detection_errors(pred_boxes, pred_labels, pred_scores, true_boxes, true_labels) -> list[dict]:
    """The error list of one image (boxes in the same pixels): see the module docstring."""
    errors = []
    matched_true = set()
    order = np.argsort(-np.asarray(pred_scores))
    iou = (box_iou(torch.as_tensor(pred_boxes).float().reshape(-1, 4),
                   torch.as_tensor(true_boxes).float().reshape(-1, 4)).numpy()
           if len(true_boxes) and len(pred_boxes) else np.zeros((len(pred_boxes), len(true_boxes))))
    for p in order:
        same = [t for t in range(len(true_boxes))
                if true_labels[t] == pred_labels[p] and t not in matched_true]
        best_same = max(same, key=lambda t: iou[p, t], default=None)
        if best_same is not None and iou[p, best_same] >= IOU_MATCH:
            matched_true.add(best_same)
            continue
        best_any = int(np.argmax(iou[p])) if len(true_boxes) else None
        row = {"prediction": int(p), "label": int(pred_labels[p]), "score": float(pred_scores[p]),
               "box": [float(v) for v in pred_boxes[p]]}
        if best_any is not None and iou[p, best_any] >= IOU_MATCH:
            errors.append({**row, "kind": "wrong label", "true_label": int(true_labels[best_any]),
                           "true_box": [float(v) for v in true_boxes[best_any]],
                           "iou": float(iou[p, best_any])})
        elif best_same is not None and iou[p, best_same] >= IOU_NEAR:
            matched_true.add(best_same)
            errors.append({**row, "kind": "misplaced box",
                           "true_box": [float(v) for v in true_boxes[best_same]],
                           "iou": float(iou[p, best_same])})
        else:
            errors.append({**row, "kind": "false positive"})
    for t in range(len(true_boxes)):
        if t not in matched_true and not any(e.get("true_box") == [float(v) for v in true_boxes[t]]
                                             for e in errors):
            errors.append({"kind": "missed", "true_label": int(true_labels[t]),
                           "true_box": [float(v) for v in true_boxes[t]]})
    return errors


def evaluate_rows(bundle, item: ObjectItem, *, score_threshold: float = 0.5, explain: bool = True,
                  tolerance: int = 15) -> dict:
    """The per-image step: predictions, truth at the view's size, errors with their explanations."""
    from .api import detect, segment
    from .explain import explain_boxes, explain_regions

    image = item.load()
    if bundle.task == "detection":
        dets = detect(bundle, image)
        view = dets.view.size
        if item.boxes is None:
            raise InputError(f"{item.name}: no boxes to evaluate a detector against")
        true_boxes = _scale(item.boxes, image.size, view)
        keep = dets.scores >= score_threshold
        errors = detection_errors(dets.boxes[keep], dets.labels[keep], dets.scores[keep], true_boxes,
                                  item.labels)
        explained = [e for e in errors if e["kind"] != "missed"]
        if explain and explained:
            boxes = np.array([e["box"] for e in explained], np.float32)
            maps = explain_boxes(bundle, image, boxes, [e["label"] for e in explained]).maps["gradcam"]
            for e, sal in zip(explained, maps, strict=True):
                where = e.get("true_box", e["box"])
                e["explanation"] = {"method": "gradcam", **_localisation(sal, where, tolerance)}
        for e in errors:
            e["image"] = item.name
            for key in ("label", "true_label"):
                if key in e:
                    e[f"{key}_name"] = _name(bundle, e[key])
        preds = {"boxes": dets.boxes, "scores": dets.scores, "labels": dets.labels}
        return {"name": item.name, "preds": preds, "truth": {"boxes": true_boxes, "labels": item.labels},
                "errors": errors}
    seg = segment(bundle, image)
    from PIL import Image

    if item.class_map is None:
        raise InputError(f"{item.name}: no class map to evaluate a segmenter against")
    truth = np.asarray(Image.fromarray(item.class_map.astype(np.int32)).resize(seg.view.size,
                                                                                Image.Resampling.NEAREST))
    pred = seg.class_map
    errors = []
    for c in sorted(set(np.unique(truth)) | set(np.unique(pred))):
        t, p = truth == c, pred == c
        iou = (t & p).sum() / max((t | p).sum(), 1)
        if t.any() and iou < IOU_MATCH:
            errors.append({"kind": "missed region", "label": int(c), "iou": float(iou)})
        elif not t.any() and p.sum() > 0.001 * p.size:
            errors.append({"kind": "false region", "label": int(c), "pixels": int(p.sum())})
    if explain and errors:
        labels = [e["label"] for e in errors]
        masks = [(pred == c) if (pred == c).any() else (truth == c) for c in labels]
        maps = explain_regions(bundle, image, labels, masks).maps["gradcam"]
        for e, sal, c in zip(errors, maps, labels, strict=True):
            where = truth == c if (truth == c).any() else pred == c
            total = float(sal.sum())
            e["explanation"] = {"method": "gradcam (Seg-Grad-CAM)",
                                "energy_in_mask": round(float(sal[where].sum()) / total, 4) if total else 0.0}
    for e in errors:
        e["image"], e["label_name"] = item.name, _name(bundle, e["label"])
    return {"name": item.name, "pred": pred, "truth": truth, "errors": errors}


def _name(bundle, label: int) -> str:
    return bundle.labels[label] if 0 <= label < len(bundle.labels) else str(label)


def evaluate_objects(bundle, items: list[ObjectItem], *, score_threshold: float = 0.5, explain: bool = True,
                     progress=None) -> ObjectEvalResult:
    """mAP (detection) or mIoU (segmentation) over ``items``, and the error list."""
    if bundle.task not in ("detection", "segmentation"):
        raise InputError(f"{bundle.name} is a {bundle.task} model; evaluate_objects takes a detector or a "
                         f"segmenter")
    rows = []
    for i, item in enumerate(items):
        rows.append(evaluate_rows(bundle, item, score_threshold=score_threshold, explain=explain))
        if progress is not None:
            progress(i + 1, len(items))
    errors = [e for r in rows for e in r["errors"]]
    if bundle.task == "detection":
        from torchmetrics.detection import MeanAveragePrecision

        map_metric = MeanAveragePrecision(iou_type="bbox", backend="pycocotools")
        for r in rows:
            map_metric.update([{k: torch.as_tensor(v) for k, v in r["preds"].items()}],
                          [{"boxes": torch.as_tensor(r["truth"]["boxes"]).reshape(-1, 4),
                            "labels": torch.as_tensor(r["truth"]["labels"])}])
        out = map_metric.compute()
        metrics = {"map_50": round(float(out["map_50"]), 4), "map": round(float(out["map"]), 4)}
    else:
        from torchmetrics.classification import MulticlassJaccardIndex

        classes = len(bundle.labels)
        iou_metric = MulticlassJaccardIndex(classes, average="macro")
        for r in rows:
            iou_metric.update(torch.as_tensor(r["pred"]).clamp(0, classes - 1).unsqueeze(0),
                              torch.as_tensor(r["truth"]).clamp(0, classes - 1).unsqueeze(0))
        metrics = {"miou": round(float(iou_metric.compute()), 4)}
    return ObjectEvalResult(bundle.task, metrics, errors, len(rows))
