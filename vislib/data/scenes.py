"""Deterministic multi-object "shapes scenes": several shapes of any class on one cluttered background,
with their exact boxes, labels and per-pixel class map, for detectors and segmenters.

Each scene (``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB, the classifier data's size) is drawn with the same
painter as :mod:`vislib.data.shapes`: a textured background, clutter under the objects, then
``1..MAX_OBJECTS`` objects (each of a random class, pose, colour and shading; never overlapping), then
pixel noise. Ground truth per object: its class (index into ``CLASSES``), its visible mask and its
end-exclusive box ``(x0, y0, x1, y1)``; per scene the class map (0 = background, ``c + 1`` = class
``c``), which is what a segmenter predicts.

Determinism: scene ``index`` of ``split`` uses ``np.random.default_rng([SCENE_SEEDS[split], index])``,
so any scene is regenerated from its ``(split, index)`` alone and the splits never share a stream.

Label conventions of the bundled models: detection labels are ``c + 1`` with 0 the background (as
torchvision's detectors and COCO categories); the segmenter's classes are ``SEG_LABELS``.
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .shapes import (
    CLASSES,
    IMAGE_SIZE,
    NUM_CLASSES,
    _background,
    _box,
    _draw_clutter,
    _finish,
    _paint_object,
    _Pose,
    _random_pose,
    _rng,
)

__all__ = [
    "DET_LABELS", "MAX_OBJECTS", "SCENE_SEEDS", "SCENE_SIZES", "SEG_LABELS", "Scene", "SceneDataset",
    "make_scene", "materialise_scenes",
]

SCENE_SEEDS: dict[str, int] = {"train": 20_261, "val": 20_262, "test": 20_263}
SCENE_SIZES: dict[str, int] = {"train": 20_000, "val": 1_000, "test": 1_000}
MAX_OBJECTS = 4
SEG_LABELS: tuple[str, ...] = ("background", *CLASSES)
"""The segmenter's classes: index 0 is the background, ``c + 1`` is ``CLASSES[c]``."""
DET_LABELS: tuple[str, ...] = ("__background__", *CLASSES)
"""The detector's label names: 0 is never predicted (torchvision's convention)."""

_SCENE_RADIUS = (9.0, 22.0)  # circumradius range (px)
_PLACEMENT_TRIES = 60


@dataclass(frozen=True)
class Scene:
    """One generated scene and its ground truth.

    Attributes:
        image: the RGB image.
        labels: one class index (into ``CLASSES``) per object.
        boxes: one end-exclusive ``(x0, y0, x1, y1)`` per object.
        masks: one bool H x W mask per object (objects never overlap).
        split, index: where it comes from.
    """

    image: Image.Image
    labels: tuple[int, ...]
    boxes: tuple[tuple[int, int, int, int], ...]
    masks: tuple[np.ndarray, ...]
    split: str
    index: int

    @property
    def class_map(self) -> np.ndarray:
        """uint8 H x W: 0 background, ``c + 1`` where an object of class ``c`` is."""
        out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        for label, mask in zip(self.labels, self.masks, strict=True):
            out[mask] = label + 1
        return out

    def target(self) -> dict[str, torch.Tensor]:
        """The torchvision detection target: float ``boxes`` (K, 4) and int64 ``labels`` (``c + 1``)."""
        return {"boxes": torch.tensor(self.boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(self.labels, dtype=torch.int64) + 1}


def _check(split: str, index: int) -> None:
    if split not in SCENE_SEEDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SCENE_SEEDS)}")
    if not 0 <= index < SCENE_SIZES[split]:
        raise IndexError(f"index {index} out of range for split {split!r} (size {SCENE_SIZES[split]})")


def _place(rng: np.random.Generator, count: int) -> list[_Pose]:
    """Up to ``count`` poses whose extents never overlap (fewer if the image is full)."""
    poses: list[_Pose] = []
    for _ in range(_PLACEMENT_TRIES):
        if len(poses) == count:
            break
        pose = _random_pose(rng, _SCENE_RADIUS)
        if all(math.hypot(pose.cx - p.cx, pose.cy - p.cy) > pose.extent + p.extent for p in poses):
            poses.append(pose)
    return poses


def make_scene(split: str, index: int) -> Scene:
    """Generate scene ``index`` of ``split`` (a pure function of its arguments)."""
    _check(split, index)
    rng = _rng(SCENE_SEEDS[split], index)
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    canvas = _background(rng)
    _draw_clutter(rng, canvas, int(rng.integers(1, 6)))
    poses = _place(rng, count)
    labels = tuple(int(c) for c in rng.integers(0, NUM_CLASSES, len(poses)))
    masks = tuple(_paint_object(rng, canvas, c, p, False) >= 0.5 for c, p in zip(labels, poses, strict=True))
    return Scene(image=_finish(rng, canvas), labels=labels, boxes=tuple(_box(m) for m in masks),
                 masks=masks, split=split, index=index)


def _render(args: tuple[str, int, int]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    split, start, stop = args
    images = np.empty((stop - start, 3, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    maps = np.empty((stop - start, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    targets = []
    for i, index in enumerate(range(start, stop)):
        scene = make_scene(split, index)
        images[i] = np.asarray(scene.image).transpose(2, 0, 1)
        maps[i] = scene.class_map
        targets.append({"boxes": np.asarray(scene.boxes, np.float32).reshape(-1, 4),
                        "labels": np.asarray(scene.labels, np.int64) + 1})
    return images, maps, targets


def materialise_scenes(split: str, start: int = 0, stop: int | None = None, workers: int = 1,
                       chunk: int = 250) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Render scenes ``start:stop`` of ``split``.

    Returns ``(images, class_maps, targets)``: uint8 (N, 3, H, W), uint8 (N, H, W) and one torchvision
    detection target per scene (float ``boxes`` (K, 4), int64 ``labels`` = class + 1).
    """
    stop = SCENE_SIZES[split] if stop is None else stop
    if stop <= start:
        raise ValueError(f"empty range {start}:{stop}")
    _check(split, start)
    _check(split, stop - 1)
    jobs = [(split, lo, min(lo + chunk, stop)) for lo in range(start, stop, chunk)]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(_render, jobs))
    else:
        parts = [_render(job) for job in jobs]
    targets = [{k: torch.from_numpy(v) for k, v in t.items()} for p in parts for t in p[2]]
    return (torch.from_numpy(np.concatenate([p[0] for p in parts])),
            torch.from_numpy(np.concatenate([p[1] for p in parts])), targets)


class SceneDataset:
    """A map-style view of one split: ``dataset[i]`` is ``(uint8 (3, H, W) image, detection target)``."""

    def __init__(self, split: str) -> None:
        _check(split, 0)
        self.split = split

    def __len__(self) -> int:
        return SCENE_SIZES[self.split]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scene = make_scene(self.split, index)
        image = torch.from_numpy(np.asarray(scene.image).transpose(2, 0, 1).copy())
        return image, scene.target()

    def scene(self, index: int) -> Scene:
        """The full :class:`Scene` behind ``self[index]``."""
        return make_scene(self.split, index)
