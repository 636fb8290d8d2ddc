"""What ``vislib explain --box / --detection / --region`` explain: a view of the bundle and its target."""

from __future__ import annotations

import numpy as np
from torchvision.ops import box_iou

from ..errors import TargetError


def parse_box(text: str) -> tuple[list[float], str | None]:
    """``"x0,y0,x1,y1[:label]"`` → ([x0, y0, x1, y1], label or None); a clear error otherwise."""
    coords, _, label = text.partition(":")
    try:
        box = [float(v) for v in coords.split(",")]
    except ValueError:
        box = []
    if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
        raise TargetError(f"--box {text!r}: expected x0,y0,x1,y1[:label] with x0 < x1 and y0 < y1 "
                          f"(pixels of the input view)")
    return box, (label.strip() or None)


def object_target(bundle, image, *, box: str | None = None, detection: int | None = None,
                  region: str | None = None):
    """(the bundle view to explain, target index 0, a description) for the CLI's object flags, or
    (bundle, None, None) when none is given."""
    import torch

    from .api import detect
    from .scores import box_bundle, region_bundle

    flags = (("--box", box), ("--detection", detection), ("--region", region))
    given = [f for f, v in flags if v is not None]
    if not given:
        return bundle, None, None
    if len(given) > 1:
        raise TargetError(f"give one of --box, --detection, --region, not {' and '.join(given)}")
    if region is not None:
        return region_bundle(bundle, image, [region]), 0, f"region {region}"
    if bundle.task != "detection":
        raise TargetError(f"{given[0]} needs a detection model; {bundle.name} is a {bundle.task} model")
    dets = detect(bundle, image)
    if detection is not None:
        if not 0 <= detection < len(dets):
            raise TargetError(f"--detection {detection}: the model made {len(dets)} detections "
                              f"(0–{len(dets) - 1}, by score)" if len(dets) else
                              f"--detection {detection}: the model detects nothing in this image")
        row = dets.rows()[detection]
        pick = slice(detection, detection + 1)
        where = [round(v) for v in row["box"]]
        return (box_bundle(bundle, dets.boxes[pick], dets.labels[pick]), 0,
                f"detection {detection}: {row['name']} {row['score']:.2f} at {where}")
    assert box is not None  # one flag was given, and it is neither --region nor --detection
    coords, name = parse_box(box)
    label: int | str
    if name is None:  # the label of the detection that overlaps it most
        if not len(dets):
            raise TargetError(f"--box {box!r}: no label given and the model detects nothing to take it from")
        iou = box_iou(torch.tensor([coords]), torch.as_tensor(dets.boxes))[0]
        label = int(dets.labels[int(iou.argmax())])
    else:
        label = name
    return box_bundle(bundle, np.array([coords]), [label]), 0, f"box {coords} label {label}"


def is_object_set(spec: str) -> bool:
    """Whether ``vislib evaluate``'s data is a detection / segmentation set (see vislib.objects.datasets)."""
    from pathlib import Path

    path = Path(spec)
    return (spec == "scenes" or spec.startswith("scenes:") or path.suffix.lower() == ".json"
            or (path / "labels").is_dir() or (path / "masks").is_dir())


def evaluate_command(args) -> int:
    """``vislib evaluate`` on a detection or segmentation set: metrics and the error list to OUT."""
    import json
    import sys

    from ..cli import output_folder, weights_arg
    from ..errors import VislibError
    from ..models import load_model
    from .datasets import open_object_set
    from .evaluate import evaluate_objects

    if args.engine != "local":
        raise VislibError("detection and segmentation sets run on the local engine (--engine ray: not yet)")
    weights = weights_arg(args.weights)
    bundle = load_model(args.model, weights=weights, device=args.device)
    if bundle.task == "classification":
        raise VislibError(f"{args.data} is a detection / segmentation set but {bundle.name} is a classifier; "
                          f"pass --model shapes_det, shapes_seg or another detector / segmenter")
    items = open_object_set(args.data, bundle.labels, limit=args.limit)
    out = output_folder(args.out)
    def progress(done: int, total: int) -> None:
        print(f"\r{done}/{total}", end="", file=sys.stderr)

    result = evaluate_objects(bundle, items, progress=progress)
    print(file=sys.stderr)
    (out / "objects.json").write_text(json.dumps(
        {"model": bundle.name, "task": result.task, "data": args.data, "images": result.images,
         "metrics": result.metrics, "errors": result.errors}, indent=1, default=float))
    print(f"{bundle.name} on {args.data}: {result.summary()} → {out / 'objects.json'}")
    return 0
