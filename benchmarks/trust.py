"""``python -m benchmarks.trust``: the trust metrics against Quantus 0.6, side by side, and ROAD over
100 images of the bundled model.

1. Each metric that Quantus also implements, at the same settings on the same ``--images`` images of
   the bundled shapes model, seconds for vislib (batched forwards) and for Quantus, in alternation
   (``--repeats``, best of). Both libraries get the model behind a one-channel front (the grey image
   copied to the three channels): Quantus 0.6's ROAD, Pixel-Flipping and Region Perturbation take
   input values as features and its ROAD fails on a colour input with a one-channel map.
   The re-explaining metrics use one explain function for both (|gradient|), so only the metric's
   own work differs. Settings are lighter than the papers' where Quantus would take minutes
   (printed beside each row).
2. ROAD (MoRF and LeRF, the paper's 10 … 90 %) over ``--road-images`` (100) shapes test images with
   their Grad-CAM maps: the target is under 60 s on the 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch import nn

import vislib
from vislib import datasets, evaluate, metrics


class GreyFront(nn.Module):
    """The model on a one-channel input (copied to the three channels)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.expand(-1, 3, -1, -1))


def grad_explain(model, inputs, targets, **_):
    as_numpy = isinstance(inputs, np.ndarray)
    x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32).clone().requires_grad_(True)
    t = torch.as_tensor(np.asarray(targets), dtype=torch.long).view(-1)
    (g,) = torch.autograd.grad(model(x).gather(1, t.view(-1, 1)).sum(), x)
    maps = g.abs().sum(1, keepdim=as_numpy).detach()
    return maps.numpy() if as_numpy else maps.double()


def pairs(quantus, y):
    """(name, settings, ours, theirs(x, y, a) kwargs) at one setting each."""
    q = dict(disable_warnings=True, display_progressbar=False)
    return [
        ("road_morf", "10…90 %, noise 0.01", metrics.ROAD(),
         quantus.ROAD(percentages=list(range(10, 100, 10)), noise=0.01, normalise=False, **q), {}, y),
        ("faithfulness_correlation", "100 runs × 224 px", metrics.FaithfulnessCorrelation(baseline=0.0),
         quantus.FaithfulnessCorrelation(perturb_baseline=0.0, normalise=False, return_aggregate=False, **q),
         {}, _logit(y)),
        ("pixel_flipping", "256 px a step", metrics.PixelFlipping(features_in_step=256, baseline=0.0),
         quantus.PixelFlipping(features_in_step=256, perturb_baseline=0.0, normalise=False, **q), {}, y),
        ("region_perturbation", "8 px patches × 100", metrics.RegionPerturbation(baseline=0.0),
         quantus.RegionPerturbation(perturb_baseline=0.0, normalise=False, **q), {}, y),
        ("max_sensitivity", "20 samples, r 0.2", metrics.MaxSensitivity(nr_samples=20),
         quantus.MaxSensitivity(nr_samples=20, **q), {"explain_func": grad_explain}, y),
        ("avg_sensitivity", "20 samples, r 0.2", metrics.AvgSensitivity(nr_samples=20),
         quantus.AvgSensitivity(nr_samples=20, **q), {"explain_func": grad_explain}, y),
        ("mprt", "every layer, Spearman", metrics.MPRT(seed=42),
         quantus.MPRT(seed=42, normalise=False, return_average_correlation=True, **q),
         {"explain_func": grad_explain}, y),
        ("smooth_mprt", "every layer, 5 noisy copies", metrics.SmoothMPRT(seed=42, nr_samples=5),
         quantus.SmoothMPRT(seed=42, nr_samples=5, normalise=False, return_average_correlation=True, **q),
         {"explain_func": grad_explain}, y),
        ("random_logit", "8 classes, SSIM", metrics.RandomLogit(num_classes=8),
         quantus.RandomLogit(num_classes=8, **q), {"explain_func": grad_explain}, y),
        ("sparseness", "", metrics.Sparseness(), quantus.Sparseness(**q), {}, y),
        ("complexity", "", metrics.Complexity(), quantus.Complexity(**q), {}, y),
        ("relevance_mass", "", metrics.RelevanceMass(), quantus.RelevanceMassAccuracy(normalise=False, **q),
         {"s": True}, y),
        ("relevance_rank_accuracy", "", metrics.RelevanceRankAccuracy(),
         quantus.RelevanceRankAccuracy(normalise=False, **q), {"s": True}, y),
    ]


def _logit(y):
    y = torch.as_tensor(y).long()
    return lambda out, rows: out.gather(1, y.to(out.device)[rows].view(-1, 1)).squeeze(1)


def side_by_side(args) -> None:
    import quantus

    bundle = vislib.load_model(args.model)
    images = datasets.open_dataset("shapes", bundle.labels, limit=args.images)
    batch = images.load(list(range(len(images))))
    x, masks = evaluate.to_inputs(bundle, batch, list(range(len(images))))
    grey = GreyFront(bundle.model).eval()
    xg = x.mean(1, keepdim=True)
    with torch.no_grad():
        y = grey(xg).argmax(1)
    a = grad_explain(grey, xg, y)
    s = torch.as_tensor(masks)
    print(f"{bundle.name}, {len(x)} images of {tuple(xg.shape[1:])}, {torch.get_num_threads()} threads, load "
          f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'metric':<26} {'settings':<28} {'vislib s':>9} {'Quantus s':>9} {'ratio':>6}")
    for name, settings, ours, theirs, extra, target in pairs(quantus, y):
        if args.only and name not in args.only.split(","):
            continue
        kw = {k: v for k, v in extra.items() if k != "s"}
        ours_t, theirs_t = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            ours(grey, xg, target, a, masks=s, explain=kw.get("explain_func"))
            ours_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            theirs(model=grey, x_batch=xg.numpy(), y_batch=y.numpy(),
                   a_batch=a[:, None].numpy().astype(np.float32),
                   s_batch=s[:, None].numpy().astype(float) if "s" in extra else None, device="cpu",
                   batch_size=len(xg), **kw)
            theirs_t.append(time.perf_counter() - t)
        o, q = min(ours_t), min(theirs_t)
        print(f"{name:<26} {settings:<28} {o:9.2f} {q:9.2f} {o / q:6.2f}", flush=True)


def road_hundred(args) -> None:
    bundle = vislib.load_model(args.model)
    images = datasets.open_dataset("shapes", bundle.labels, limit=args.road_images)
    batch = images.load(list(range(len(images))))
    x, _ = evaluate.to_inputs(bundle, batch, list(range(len(images))))
    maps = evaluate.explain(bundle, x, ["gradcam"]).maps["gradcam"]
    targets = images.targets[:len(x)]
    for order in ("morf", "lerf"):
        t, cpu = time.perf_counter(), time.process_time()
        values = metrics.ROAD(order=order)(bundle, x, targets, maps)
        print(f"ROAD {order.upper()} over {len(x)} images ({tuple(x.shape[1:])}, 9 percentages, 900 "
              f"imputations and forwards): {time.perf_counter() - t:.1f} s wall, "
              f"{time.process_time() - cpu:.1f} s CPU, mean score {values.mean():.3f} (target: under 60 s; "
              f"load average {os.getloadavg()[0]:.1f})", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes_resnet")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--road-images", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", default=None, help="comma-separated metric names")
    parser.add_argument("--skip-quantus", action="store_true")
    parser.add_argument("--skip-road", action="store_true")
    args = parser.parse_args(argv)
    if not args.skip_quantus:
        side_by_side(args)
    if not args.skip_road:
        road_hundred(args)


if __name__ == "__main__":
    main()
