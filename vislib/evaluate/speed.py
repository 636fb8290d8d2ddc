"""Speed of an evaluation against the bare batched forward + Grad-CAM backward it is built on."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..datasets import ImageSet
from ..hooks import capture_layer, resolve_layer
from ..models import ModelBundle


def bare_gradcam(bundle: ModelBundle, inputs: torch.Tensor, layer: str | None = None) -> torch.Tensor:
    """The reference for :func:`throughput`: one batched forward with the layer captured, one
    backward of the predicted logits to it, Grad-CAM at feature resolution. Nothing else."""
    name, module = resolve_layer(bundle, layer)
    with bundle.lock, capture_layer(module, grad=True, view=bundle.view(name)) as captured, torch.no_grad():
        logits = bundle.logits(inputs)
    A = captured.activation
    assert A is not None  # the forward ran through the layer
    with torch.enable_grad():
        score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
        (g,) = torch.autograd.grad(score, A)
    return F.relu((g.mean(dim=(2, 3), keepdim=True) * A.detach()).sum(dim=1))


def throughput(bundle: ModelBundle, images: ImageSet, *, batch_size: int = 64, repeats: int = 2,
               layer: str | None = None) -> dict[str, float]:
    """Images per second of :func:`evaluate` (Grad-CAM for every image, localisation metrics, no
    extra forwards) against the bare batched forward + Grad-CAM backward at the same batch size on
    the same inputs. The two alternate batch by batch in one run (the reference runs just before and
    just after each evaluated batch, timed apart and counted once), so a shared machine's changing
    load hits both alike; best of ``repeats``. ``overhead`` = evaluate's time / bare time − 1: what
    loading, bookkeeping and storing add."""
    from .api import evaluate

    n = len(images)
    best_eval = best_bare = float("inf")
    detail: dict[str, float] = {}
    for _ in range(repeats):
        bare = [0.0]

        def reference(inputs: torch.Tensor, bare=bare) -> float:
            t = time.perf_counter()
            bare_gradcam(bundle, inputs, layer)
            spent = time.perf_counter() - t
            bare[0] += spent / 2  # it runs twice per batch, just before and just after ours
            return spent

        result = evaluate(bundle, images, ["gradcam"], layer=layer, batch_size=batch_size, confidence=False,
                          _on_batch=reference)
        if result.timings["total"] < best_eval:
            best_eval, detail = result.timings["total"], dict(result.timings)
        best_bare = min(best_bare, bare[0])
    return {
        "images": n, "batch_size": batch_size, "evaluate_s": best_eval, "bare_s": best_bare,
        "evaluate_ips": n / best_eval, "bare_ips": n / best_bare, "overhead": best_eval / best_bare - 1,
        **{f"evaluate_{k}_s": v for k, v in detail.items()},
    }
