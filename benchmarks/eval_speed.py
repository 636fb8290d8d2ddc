"""``python -m benchmarks.eval_speed``: the error-analysis speed promises, measured.

1. Evaluating the shapes test split with a Grad-CAM map for every image: images per second of
   :func:`vislib.evaluate.evaluate` against the bare batched forward + Grad-CAM backward at the same
   batch size, in the same run (:func:`vislib.evaluate.throughput`). Promise: at most 25% overhead.
2. Deletion and insertion curves (RISE, 32 steps: 65 forwards) for one image: promise under 1 s.

The bundled model is used when it is there; otherwise the same architecture with random weights
(timing does not depend on the weights). The shapes split is rendered once into the cache first, so
"loading" means reading it, as it does on every later evaluation.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import vislib
from vislib import datasets, evaluate, metrics
from vislib.models import Preprocess, make_bundle


def shapes_bundle(name: str):
    if name in vislib.list_models():
        return vislib.load_model(name), "trained weights"
    from vislib.data import shapes
    from vislib.nets import ShapesResNet

    torch.manual_seed(0)
    net = ShapesResNet(num_classes=8, widths=[16, 24, 48, 64], blocks=[1, 1, 1], strides=[2, 2, 1])
    pre = Preprocess(resize=shapes.IMAGE_SIZE, crop=shapes.IMAGE_SIZE, mean=(0.5,) * 3, std=(0.25,) * 3)
    bundle = make_bundle(name, net, preprocess=pre, labels=list(shapes.CLASSES), default_layer="layer3")
    return bundle, "random weights (the bundled model is not there yet; speed does not depend on weights)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes_resnet")
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--curve-images", type=int, default=5)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle, weights = shapes_bundle(args.model)
    print(f"{bundle.name} ({weights}) on {bundle.device}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    t = time.perf_counter()
    images = datasets.open_dataset("shapes", bundle.labels, limit=args.limit)
    print(f"shapes test[:{len(images)}] ready in {time.perf_counter() - t:.1f} s (rendered once, cached)")
    speed = evaluate.throughput(bundle, images, batch_size=args.batch_size, repeats=args.repeats)
    print(f"evaluate: {speed['evaluate_ips']:.0f} images/s ({speed['evaluate_s']:.2f} s: load "
          f"{speed['evaluate_load_s']:.2f}, explain {speed['evaluate_explain_s']:.2f}, metrics "
          f"{speed['evaluate_metrics_s']:.2f}); bare forward + Grad-CAM backward: {speed['bare_ips']:.0f} "
          f"images/s ({speed['bare_s']:.2f} s); overhead {speed['overhead']:+.1%} (promise: at most +25%)")
    batch = images.load(list(range(args.curve_images)))
    x, _ = evaluate.to_inputs(bundle, batch, list(range(args.curve_images)))
    maps = evaluate.explain(bundle, x, ["gradcam"]).maps["gradcam"]
    times = []
    for i in range(args.curve_images):
        t = time.perf_counter()
        metrics.deletion_insertion(bundle, x[i:i + 1], maps[i:i + 1], [0], steps=32)
        times.append(time.perf_counter() - t)
    print(f"deletion + insertion curves, one image (65 forwards): best {min(times):.2f} s, median "
          f"{sorted(times)[len(times) // 2]:.2f} s (promise: under 1 s)")


if __name__ == "__main__":
    main()
