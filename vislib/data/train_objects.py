"""Train the bundled detector (``shapes_det``) and segmenter (``shapes_seg``) on generated shapes scenes.

Usage (through the training script)::

    python -m vislib.data.train --task detection       # shapes_det: FCOS, ~ 15-20 min on 1 CPU core
    python -m vislib.data.train --task segmentation    # shapes_seg: LR-ASPP, ~ 6-10 min

Data: :mod:`vislib.data.scenes` (train split for training, the 1,000 test scenes for the card's
metrics). Augmentation: one random element of the dihedral group D4 per batch (every class is
label-preserving under it, as for the classifiers), applied to images, boxes and class maps alike.
Metrics (a library's, not hand-written): detection mAP@0.5 and mAP@[.5:.95] with torchmetrics'
``MeanAveragePrecision`` (COCO protocol, pycocotools backend) at a 0.05 score threshold; segmentation
mIoU with torchmetrics' ``JaccardIndex`` (macro over the 9 classes, background included) and pixel
accuracy.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from . import scenes
from .train import channel_stats, save

SUBSET = (0, 200)  # test scenes whose metric the card also reports (a quick regression check)


@dataclass(frozen=True)
class ObjectRecipe:
    """How a bundled detector / segmenter is built and trained (AdamW + one-cycle, as the classifiers)."""

    task: str  # "detection" | "segmentation"
    architecture: str  # key of vislib.nets.ARCHITECTURES
    arch_kwargs: dict[str, object]
    default_layer: str
    description: str
    train_size: int = 8000
    epochs: int = 4
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: float = 0.1
    seed: int = 0
    notes: str = ""
    extra: dict[str, object] = field(default_factory=dict)
    finetune_epochs: int = 0  # a second one-cycle run at finetune_lr after the first (0: none)
    finetune_lr: float = 0.0


OBJECT_RECIPES: dict[str, ObjectRecipe] = {
    "shapes_det": ObjectRecipe(
        task="detection", architecture="ShapesFCOS",
        arch_kwargs={"num_classes": 9, "widths": [16, 32, 64, 96], "fpn_channels": 32, "head_convs": 2},
        default_layer="backbone.fpn.layer_blocks.0",
        description="FCOS (torchvision) on a small 4-stage CNN + FPN, trained on generated shapes scenes "
                    "(1-4 objects of 8 classes on cluttered backgrounds).",
        train_size=6000, epochs=5, batch_size=16, lr=2e-3,
        notes="Labels follow torchvision: 0 is the background (never predicted), c + 1 the shape class c. "
              "The model normalises inside (its GeneralizedRCNNTransform, min_size = max_size = 128).",
    ),
    "shapes_seg": ObjectRecipe(
        task="segmentation", architecture="ShapesLRASPP",
        arch_kwargs={"num_classes": 9, "widths": [16, 32, 64, 96], "inter_channels": 64},
        default_layer="backbone.layer4",
        description="LR-ASPP (torchvision) on a small 4-stage CNN, trained on generated shapes scenes: "
                    "a class per pixel (background + 8 shapes).",
        train_size=5000, epochs=5, batch_size=16, lr=3e-3, finetune_epochs=3, finetune_lr=1e-3,
        notes="Output: a dict with 'out', N x 9 x H x W logits at the input size (class 0 = background).",
    ),
}


def dihedral_boxes(boxes: torch.Tensor, size: int, k: int, flip: bool) -> torch.Tensor:
    """Boxes (K, 4) under a horizontal flip (if ``flip``) then ``torch.rot90(·, k, dims=(-2, -1))``.

    On continuous coordinates: flip ``(x, y) → (size − x, y)``; one rot90 ``(x, y) → (y, size − x)``."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    if flip:
        x0, x1 = size - x1, size - x0
    for _ in range(k % 4):
        x0, y0, x1, y1 = y0, size - x1, y1, size - x0
    return torch.stack([x0, y0, x1, y1], -1)


def _dihedral(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, int, bool]:
    k, flip = torch.randint(0, 4, (2,), generator=generator).tolist()
    if flip % 2:
        images = images.flip(-1)
    return (torch.rot90(images, k, dims=(-2, -1)) if k else images), k, bool(flip % 2)


def build(recipe: ObjectRecipe, mean: list[float], std: list[float]) -> nn.Module:
    from ..nets import ARCHITECTURES

    kwargs = dict(recipe.arch_kwargs)
    if recipe.task == "detection":
        kwargs.update(mean=mean, std=std)
    return ARCHITECTURES[recipe.architecture](**kwargs)


def train(model: nn.Module, recipe: ObjectRecipe, images: torch.Tensor, maps: torch.Tensor,
          targets: list[dict], normalise: Callable[[torch.Tensor], torch.Tensor],
          log: Callable[[str], None] = print) -> float:
    """Train in place; return the wall time in seconds."""
    generator = torch.Generator().manual_seed(recipe.seed)
    steps = math.ceil(len(images) / recipe.batch_size)
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=recipe.lr, epochs=recipe.epochs,
                                                   steps_per_epoch=steps, pct_start=recipe.warmup)
    size = images.shape[-1]
    model.train()
    start = time.perf_counter()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(images), generator=generator)
        loss_sum, seen = 0.0, 0
        for lo in range(0, len(images), recipe.batch_size):
            idx = order[lo:lo + recipe.batch_size]
            batch, k, flip = _dihedral(images[idx], generator)
            if recipe.task == "detection":
                tgts = [{"boxes": dihedral_boxes(targets[i]["boxes"], size, k, flip),
                         "labels": targets[i]["labels"]} for i in idx.tolist()]
                losses = model(list(normalise(batch)), tgts)
                loss = sum(losses.values())
            else:
                seg = maps[idx].flip(-1) if flip else maps[idx]
                seg = torch.rot90(seg, k, dims=(-2, -1)) if k else seg
                loss = F.cross_entropy(model(normalise(batch))["out"], seg.long())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
            if (lo // recipe.batch_size) % 50 == 0:
                log(f"  epoch {epoch + 1} step {lo // recipe.batch_size}/{steps} loss {float(loss):.4f} "
                    f"{time.perf_counter() - start:.0f}s")
        log(f"epoch {epoch + 1}/{recipe.epochs}  loss {loss_sum / seen:.4f}  "
            f"{time.perf_counter() - start:.0f}s")
    model.eval()
    return time.perf_counter() - start


class _Thresholded(Protocol):
    """A torchvision-style detector: drops the detections scoring under ``score_thresh``."""

    score_thresh: float


@torch.no_grad()
def detection_metrics(model: nn.Module, images: torch.Tensor, targets: list[dict],
                      normalise: Callable, batch_size: int = 50) -> dict[str, float]:
    """mAP@0.5 and mAP@[.5:.95] (torchmetrics, COCO protocol) at a 0.05 score threshold."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(iou_type="bbox", backend="pycocotools")
    model.eval()
    detector = cast(_Thresholded, model)
    thresh, detector.score_thresh = detector.score_thresh, 0.05
    try:
        for lo in range(0, len(images), batch_size):
            preds = model(list(normalise(images[lo:lo + batch_size])))
            metric.update([{k: v.detach() for k, v in p.items()} for p in preds], targets[lo:lo + batch_size])
    finally:
        detector.score_thresh = thresh
    out = metric.compute()
    return {"map_50": round(float(out["map_50"]), 4), "map": round(float(out["map"]), 4)}


@torch.no_grad()
def segmentation_metrics(model: nn.Module, images: torch.Tensor, maps: torch.Tensor,
                         normalise: Callable, batch_size: int = 50) -> dict[str, Any]:
    """mIoU (torchmetrics JaccardIndex, macro over the classes) and pixel accuracy."""
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    classes = len(scenes.SEG_LABELS)
    iou = MulticlassJaccardIndex(classes, average="macro")
    per_class = MulticlassJaccardIndex(classes, average="none")
    acc = MulticlassAccuracy(classes, average="micro")
    model.eval()
    for lo in range(0, len(images), batch_size):
        pred = model(normalise(images[lo:lo + batch_size]))["out"].argmax(1)
        truth = maps[lo:lo + batch_size].long()
        for m in (iou, per_class, acc):
            m.update(pred, truth)
    return {"miou": round(float(iou.compute()), 4), "pixel_accuracy": round(float(acc.compute()), 4),
            "per_class_iou": dict(zip(scenes.SEG_LABELS, (round(float(v), 4) for v in per_class.compute()),
                                      strict=True))}


def evaluate(model: nn.Module, recipe: ObjectRecipe, normalise: Callable, workers: int) -> dict:
    images, maps, targets = scenes.materialise_scenes("test", workers=workers)
    lo, hi = SUBSET
    if recipe.task == "detection":
        full = detection_metrics(model, images, targets, normalise)
        sub = detection_metrics(model, images[lo:hi], targets[lo:hi], normalise)
    else:
        full = segmentation_metrics(model, images, maps, normalise)
        sub = segmentation_metrics(model, images[lo:hi], maps[lo:hi], normalise)
        sub.pop("per_class_iou")
    return {**full, "test_scenes": len(images), "subset": {"split": "test", "start": lo, "stop": hi, **sub}}


def run(name: str, out_dir, workers: int = 2, epochs: int | None = None, train_size: int | None = None,
        log: Callable[[str], None] = print, init_from=None) -> dict:
    """Generate scenes, train, evaluate and save one bundled detector / segmenter; return its card.

    ``init_from``: a ``.safetensors`` of the first run's weights: skip it and run only the fine-tune
    (the same result as the whole recipe: every run seeds its own shuffling)."""
    recipe = OBJECT_RECIPES[name]
    epochs = epochs or recipe.epochs
    train_size = train_size or recipe.train_size
    torch.manual_seed(recipe.seed)
    start = time.perf_counter()
    images, maps, targets = scenes.materialise_scenes("train", 0, train_size, workers=workers)
    log(f"train scenes {tuple(images.shape)} in {time.perf_counter() - start:.0f}s")
    mean, std = channel_stats(images)
    if recipe.task == "detection":  # the detector normalises inside; the bundle feeds [0, 1]
        def normalise(x):
            return x.float() / 255
    else:
        m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

        def normalise(x):
            return (x.float() / 255 - m) / s
    model = build(recipe, mean, std)
    from dataclasses import replace

    if init_from is None:
        seconds = train(model, replace(recipe, epochs=epochs), images, maps, targets, normalise, log)
    else:
        from ..models.weights import load_state_dict_file

        load_state_dict_file(model, Path(init_from))
        previous = Path(init_from).with_suffix(".json")
        seconds = json.loads(previous.read_text())["recipe"]["train_seconds"] if previous.is_file() else 0.0
        log(f"first run's weights from {init_from} ({seconds:.0f}s of training)")
    if recipe.finetune_epochs:
        seconds += train(model, replace(recipe, epochs=recipe.finetune_epochs, lr=recipe.finetune_lr),
                         images, maps, targets, normalise, log)
    del images, maps, targets
    metrics = evaluate(model, recipe, normalise, workers)
    log(f"{name}: {metrics}")
    det = recipe.task == "detection"
    card = {
        "name": name, "task": recipe.task, "architecture": recipe.architecture,
        "arch_kwargs": {**recipe.arch_kwargs, **({"mean": mean, "std": std} if det else {})},
        "labels": list(scenes.DET_LABELS if det else scenes.SEG_LABELS),
        "input_size": scenes.IMAGE_SIZE,
        "mean": [0.0, 0.0, 0.0] if det else mean, "std": [1.0, 1.0, 1.0] if det else std,
        "default_layer": recipe.default_layer, "description": recipe.description,
        "data": {"generator": "vislib.data.scenes", "seeds": dict(scenes.SCENE_SEEDS),
                 "sizes": {**scenes.SCENE_SIZES, "train": train_size}},
        "recipe": {"epochs": epochs, "batch_size": recipe.batch_size,
                   "optimizer": f"AdamW(weight_decay={recipe.weight_decay})", "lr": recipe.lr,
                   "schedule": f"OneCycleLR(pct_start={recipe.warmup}), stepped per batch"
                   + (f"; then {recipe.finetune_epochs} epochs of a second one at lr {recipe.finetune_lr}"
                      if recipe.finetune_epochs else ""),
                   "augment": "dihedral (per batch, boxes and maps alike)",
                   "train_seconds": round(seconds, 1), "torch": torch.__version__.split("+")[0],
                   "command": f"python -m vislib.data.train --task {recipe.task}"},
        "metrics": metrics,
        "notes": recipe.notes,
    }
    save(model, card, out_dir)
    log(f"wrote {out_dir}/{name}.{{json,safetensors}}; total {time.perf_counter() - start:.0f}s")
    return card
