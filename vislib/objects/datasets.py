"""Annotated image sets for detectors and segmenters: COCO JSON, YOLO txt, PNG masks, generated scenes.

Every reader yields :class:`ObjectItem` s (the image loader, boxes in the image's own pixels and
labels as the bundle's class indices, or a class map). A malformed file is an :class:`AnnotationError`
naming the file and the entry (a COCO annotation's index, a YOLO file's line).

- ``scenes`` / ``scenes:N``: the generated test scenes (:mod:`vislib.data.scenes`), boxes and class maps;
- ``path/to/instances.json``: COCO detection JSON (``images``, ``annotations`` with ``bbox`` =
  [x, y, w, h], ``categories``); images beside the JSON or under ``images/``; categories matched to the
  model's labels by name, else by id;
- a folder with ``labels/*.txt`` (YOLO: ``class cx cy w h`` normalised to [0, 1]) and ``images/``;
  class i is the model's label named ``classes.txt``'s line i, else index i (+1 when the model's label
  0 is the background);
- a folder with ``masks/*.png`` (pixel value = class index) and ``images/``: a segmentation set.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class AnnotationError(InputError):
    """A malformed annotation file (the message names the file and the entry)."""


@dataclass
class ObjectItem:
    name: str
    load: Callable[[], Image.Image]
    boxes: np.ndarray | None = None  # K×4, the image's own pixels
    labels: np.ndarray | None = None  # K, the bundle's class indices
    class_map: np.ndarray | None = None  # H×W, the bundle's class indices


def open_object_set(spec: str, labels: list[str], limit: int | None = None) -> list[ObjectItem]:
    """The items of a detection or segmentation set (see the module docstring for the forms)."""
    if spec == "scenes" or spec.startswith("scenes:"):
        items = _scenes(int(spec.split(":")[1]) if ":" in spec else 200)
    else:
        path = Path(spec)
        if path.suffix.lower() == ".json":
            items = _coco(path, labels)
        elif (path / "labels").is_dir():
            items = _yolo(path, labels)
        elif (path / "masks").is_dir():
            items = _masks(path)
        else:
            raise InputError(f"{spec}: not an object set (a COCO .json, a folder with labels/ (YOLO) or "
                             f"masks/ (PNG masks), or 'scenes[:N]')")
    if not items:
        raise InputError(f"{spec}: no annotated images")
    return items[:limit] if limit else items


def _scenes(count: int) -> list[ObjectItem]:
    from ..data.scenes import make_scene

    def item(i: int) -> ObjectItem:
        scene = make_scene("test", i)
        boxes = np.asarray(scene.boxes, np.float32).reshape(-1, 4)
        return ObjectItem(f"scene-{i:04d}", lambda: scene.image, boxes,
                          np.asarray(scene.labels, np.int64) + 1, scene.class_map.astype(np.int64))

    return [item(i) for i in range(count)]


def _label_lookup(labels: list[str]) -> dict[str, int]:
    return {name.lower(): i for i, name in enumerate(labels)}


def _coco(path: Path, labels: list[str]) -> list[ObjectItem]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"{path}: not JSON (line {exc.lineno}: {exc.msg})") from None
    for key in ("images", "annotations"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise AnnotationError(f"{path}: a COCO file needs a list {key!r}")
    by_name = _label_lookup(labels)
    cats = {}
    for i, cat in enumerate(data.get("categories", [])):
        if not isinstance(cat, dict) or "id" not in cat:
            raise AnnotationError(f"{path}: categories[{i}] needs an 'id'")
        cats[cat["id"]] = by_name.get(str(cat.get("name", "")).lower(), cat["id"])
    images = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise AnnotationError(f"{path}: images[{i}] needs 'id' and 'file_name'")
        images[img["id"]] = img["file_name"]
    boxes: dict[object, list] = {k: [] for k in images}
    for i, ann in enumerate(data["annotations"]):
        bbox = ann.get("bbox") if isinstance(ann, dict) else None
        if not isinstance(ann, dict) or ann.get("image_id") not in images:
            raise AnnotationError(f"{path}: annotations[{i}] refers to no image in 'images'")
        if (not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox)
                or bbox[2] <= 0 or bbox[3] <= 0):
            raise AnnotationError(f"{path}: annotations[{i}] bbox must be [x, y, w, h] with w, h > 0, "
                                  f"not {bbox!r}")
        if ann.get("category_id") not in cats:
            raise AnnotationError(f"{path}: annotations[{i}] category_id {ann.get('category_id')!r} is not "
                                  f"in 'categories'")
        x, y, w, h = (float(v) for v in bbox)
        boxes[ann["image_id"]].append(([x, y, x + w, y + h], cats[ann["category_id"]]))
    items = []
    for key, name in images.items():
        file = _find_image(path.parent, name)
        rows = boxes[key]
        coords = np.asarray([r[0] for r in rows], np.float32).reshape(-1, 4)
        items.append(ObjectItem(name, _loader(file), coords, np.asarray([r[1] for r in rows], np.int64)))
    return items


def _find_image(root: Path, name: str) -> Path:
    for candidate in (root / name, root / "images" / name):
        if candidate.is_file():
            return candidate
    raise AnnotationError(f"{root}: image {name!r} not found (beside the annotations or under images/)")


def _loader(file: Path) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        from ..imageio import load_image

        return load_image(file)

    return load


def _images_by_stem(root: Path) -> dict[str, Path]:
    folder = root / "images" if (root / "images").is_dir() else root
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def _yolo(root: Path, labels: list[str]) -> list[ObjectItem]:
    names_file = root / "classes.txt"
    by_name = _label_lookup(labels)
    offset = 1 if labels and labels[0].lower().startswith("__background") else 0
    if names_file.is_file():
        names = [n.strip() for n in names_file.read_text().splitlines() if n.strip()]
        mapping = [by_name.get(n.lower(), i + offset) for i, n in enumerate(names)]
    else:
        mapping = None
    images = _images_by_stem(root)
    items = []
    for txt in sorted((root / "labels").glob("*.txt")):
        if txt.stem not in images:
            raise AnnotationError(f"{txt}: no image named {txt.stem}.* under {root / 'images'}")
        with Image.open(images[txt.stem]) as im:
            w, h = im.size
        rows = []
        for n, line in enumerate(txt.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                cls, cx, cy, bw, bh = int(parts[0]), *(float(v) for v in parts[1:5])
                if len(parts) != 5 or cls < 0 or not all(0 <= v <= 1 for v in (cx, cy, bw, bh)):
                    raise ValueError
            except (ValueError, IndexError):
                raise AnnotationError(f"{txt}:{n}: expected 'class cx cy w h' (class an integer ≥ 0, the "
                                      f"rest in [0, 1]), not {line.strip()!r}") from None
            label = mapping[cls] if mapping is not None and cls < len(mapping) else cls + offset
            rows.append(([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], label))
        items.append(ObjectItem(images[txt.stem].name, _loader(images[txt.stem]),
                                np.asarray([r[0] for r in rows], np.float32).reshape(-1, 4),
                                np.asarray([r[1] for r in rows], np.int64)))
    return items


def _masks(root: Path) -> list[ObjectItem]:
    images = _images_by_stem(root)
    items = []
    for png in sorted((root / "masks").glob("*.png")):
        if png.stem not in images:
            raise AnnotationError(f"{png}: no image named {png.stem}.* under {root / 'images'}")
        try:
            with Image.open(png) as im:
                if im.mode not in ("L", "P", "I", "I;16"):
                    raise AnnotationError(f"{png}: a mask must be one channel of class indices, not mode "
                                          f"{im.mode}")
                class_map = np.asarray(im).astype(np.int64)
        except OSError as exc:
            raise AnnotationError(f"{png}: cannot read the mask ({exc})") from None
        items.append(ObjectItem(images[png.stem].name, _loader(images[png.stem]), class_map=class_map))
    return items
