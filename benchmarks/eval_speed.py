"""``python -m benchmarks.eval_speed``: the error-analysis speed promises, measured.

1. Evaluating the shapes test split with a Grad-CAM map for every image: images per second of
   :func:`vislib.evaluate.evaluate` against the bare batched forward + Grad-CAM backward at the same
   batch size, in the same run (:func:`vislib.evaluate.throughput`). Promise: at most 25% overhead.
2. Deletion and insertion curves (RISE, 32 steps: 65 forwards) for one image: promise under 1 s.
3. ``--engines``: images/s of the local engine (1 and 2 torch threads) and of the Ray engine with 1
   and 2 workers (one thread each) on a Ray started by the run, Ray's start-up cost (starting Ray;
   starting the actors up to the first batch), and a simulated two-node cluster
   (``ray.cluster_utils.Cluster``, one CPU per node) reached by its address. The runs alternate
   (local, Ray 1, Ray 2, two-node, again), so that a shared machine's changing load hits all alike;
   medians of ``--repeats``. Ray's rate is given twice: over the whole run (start-up included) and
   after the first batch (the steady rate a long run approaches).

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
    parser.add_argument("--engines", action="store_true", help="local against Ray (1, 2 workers, two nodes)")
    parser.add_argument("--engine-images", type=int, default=1024)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle, weights = shapes_bundle(args.model)
    if args.engines:
        return engines(bundle, weights, args)
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


def engines(bundle, weights: str, args) -> None:
    """Section 3 of the module's docstring."""
    import statistics

    from vislib.evaluate.ray_engine import _loopback_only

    images = datasets.open_dataset("shapes", bundle.labels, limit=args.engine_images)
    n = len(images)
    print(f"{bundle.name} ({weights}), Grad-CAM + localisation metrics on shapes test[:{n}], batch "
          f"{args.batch_size}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    options = dict(methods=["gradcam"], batch_size=args.batch_size, confidence=False)
    rows: dict[str, list[dict]] = {}

    def record(name: str, result, seconds: float) -> None:
        t = result.timings
        first = t.get("ray_first", 0.0)
        after = seconds - t.get("ray_init", 0.0) - first
        rows.setdefault(name, []).append({
            "ips": n / seconds, "init": t.get("ray_init", 0.0), "first": first,
            "steady": (n - args.batch_size) / after if after > 0 and "ray_first" in t else n / seconds})

    def local(threads: int) -> None:
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            start = time.perf_counter()
            result = evaluate.evaluate(bundle, images, **options)
            record(f"local, {threads} thread{'s' * (threads > 1)}", result, time.perf_counter() - start)
        finally:
            torch.set_num_threads(old)

    def ray_run(workers: int, address=None, name=None) -> None:
        start = time.perf_counter()
        result = evaluate.evaluate(bundle, images, engine="ray", workers=workers, address=address, **options)
        record(name or f"Ray, {workers} worker{'s' * (workers > 1)}", result, time.perf_counter() - start)

    def two_nodes() -> None:
        from ray.cluster_utils import Cluster

        with _loopback_only():
            head = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
            cluster = Cluster(initialize_head=True, head_node_args=head)
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        try:
            ray_run(2, address=cluster.address, name="Ray, two simulated nodes × 1 worker")
        finally:
            cluster.shutdown()

    for _ in range(args.repeats):
        local(1)
        local(2)
        ray_run(1)
        ray_run(2)
        two_nodes()
    print("| run | images/s (whole run) | images/s after the first batch | start Ray (s) | actors up to the "
          "first batch (s) |\n|---|---|---|---|---|")
    for name, runs in rows.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {name} | {med['ips']:.0f} | {med['steady']:.0f} | {med['init']:.1f} | {med['first']:.1f} |")
    print(f"medians of {args.repeats} alternating runs; load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
