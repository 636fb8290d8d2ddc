"""Train a bundled ``shapes_*`` model on the synthetic shapes dataset and write its model card.

Usage::

    python -m vislib.data.train --model shapes_resnet      # ~ 6-9 min on 2 CPU cores
    python -m vislib.data.train --samples                  # (re)write assets/samples/*.png

Outputs ``assets/models/<name>.safetensors`` (float32 state dict) and
``assets/models/<name>.json``, the model card the core library loads (architecture,
labels, preprocessing, default layer, data, recipe, metrics).

Preprocessing contract, shared with the core library: resize the shorter side to
``input_size`` (a no-op here), centre-crop ``input_size``, scale to [0, 1], normalise with
the card's ``mean``/``std``. The dataset is already ``input_size`` square, so training
only scales and normalises.

Everything is seeded (data, initialisation, shuffling, augmentation), so a rerun with
the same torch build reproduces the weights up to floating-point non-associativity
in multi-threaded kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from vislib._resources import resource
from vislib.data import shapes
from vislib.nets import ARCHITECTURES

MODELS_DIR = resource("assets", "models")
SAMPLES_DIR = resource("assets", "samples")
SUBSET = (0, 400)  # test slice whose accuracy the card reports (a quick regression check)


@dataclass(frozen=True)
class Recipe:
    """How one bundled model is built and trained.

    Attributes:
        architecture: key of :data:`vislib.nets.ARCHITECTURES`.
        arch_kwargs: constructor arguments.
        default_layer: module name the card proposes as target layer.
        description: one-line description for the card.
        epochs, batch_size, lr, weight_decay: optimisation (AdamW + one-cycle schedule).
        warmup: share of the steps spent raising the learning rate (one-cycle ``pct_start``).
        augment: ``"dihedral"`` (random flips and 90-degree rotations, label-preserving for
            every class) or ``"none"``.
        shortcut_class: if set, train samples of this class (and only those) carry the mark.
        notes: free text for the card.
        lr_scales: learning-rate multipliers by module name (e.g. ``{"fc1": 1 / 16}``): that
            module's parameters get ``lr * scale`` (peak of the same one-cycle schedule).
            Empty (the default): one parameter group, as for the ResNets.
    """

    architecture: str
    arch_kwargs: dict[str, object]
    default_layer: str
    description: str
    epochs: int = 6
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    warmup: float = 0.1
    augment: str = "dihedral"
    shortcut_class: str | None = None
    notes: str = ""
    seed: int = 0
    lr_scales: dict[str, float] = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    "shapes_resnet": Recipe(
        architecture="ShapesResNet",
        arch_kwargs={"num_classes": 8, "widths": [16, 24, 48, 64], "blocks": [1, 1, 1],
                     "strides": [2, 2, 1], "norm": "instance"},
        default_layer="layer3",
        description="Small ResNet (GAP + linear head, 16x16 last stage) trained on the "
                    "synthetic shapes dataset.",
        notes="CAM applies exactly (GAP + single linear layer). Every ReLU is its own module.",
    ),
    "shapes_zf": Recipe(
        architecture="ShapesZFNet",
        arch_kwargs={"num_classes": 8, "widths": [16, 32, 32, 64, 64, 96], "hidden": 256,
                     "dropout": 0.2, "input_size": 128},
        default_layer="relu6",
        description="Zeiler & Fergus style net (conv/ReLU/max-pool stages, fully connected "
                    "head) trained on the synthetic shapes dataset.",
        epochs=7,
        lr=2e-3,
        lr_scales={"fc1": 1 / 16},
        notes="No GAP head (fc1 reads the flattened 4x4 map), so CAM does not apply; gradient "
              "CAMs, Deconvnet and guided backprop do. relu6 (8x8) is the last conv activation "
              "before the last max-pool, relu5 the last 16x16 one. fc1 starts position-shared "
              "(equal to global average pooling + MLP) and learns at lr/16: with a random fc1 "
              "training stayed at chance level (vislib.nets.ShapesZFNet).",
    ),
    "shapes_shortcut": Recipe(
        architecture="ShapesResNet",
        arch_kwargs={"num_classes": 8, "widths": [16, 24, 48, 64], "blocks": [1, 1, 1],
                     "strides": [2, 2, 1], "norm": "instance"},
        default_layer="layer3",
        description="ShapesResNet trained with a spurious shortcut: every training star "
                    "carries a 6x6 checkerboard mark near the top-left corner.",
        augment="none",
        shortcut_class="star",
    ),
}


# --------------------------------------------------------------------------- data


def load_split(
    split: str, stop: int | None = None, mark_labels: Sequence[int] = (), workers: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``split[:stop]`` as uint8 images (N, 3, H, W) and int64 labels."""
    return shapes.materialise(split, 0, stop, mark_labels=mark_labels, workers=workers)


def channel_stats(images: torch.Tensor, chunk: int = 2000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units, rounded to 4 decimals."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for lo in range(0, len(images), chunk):
        x = images[lo:lo + chunk].to(torch.float64) / 255
        total += x.sum((0, 2, 3))
        total_sq += (x * x).sum((0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).sqrt()
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


class Normaliser:
    """uint8 (N, 3, H, W) -> normalised float32, channels-last (the card's preprocessing)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.to(torch.float32) / 255 - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)


def dihedral(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply one random element of the dihedral group D4 (flip, then k x 90 degrees) per batch.

    One transform per batch keeps it cheap; batches are shuffled, so every image sees
    all eight over the epochs.
    """
    k, flip = torch.randint(0, 4, (2,), generator=generator).tolist()
    if flip % 2:
        images = images.flip(-1)
    return torch.rot90(images, k, dims=(-2, -1)) if k else images


# --------------------------------------------------------------------------- training


def build_model(recipe: Recipe) -> nn.Module:
    """Instantiate the recipe's architecture."""
    return ARCHITECTURES[recipe.architecture](**recipe.arch_kwargs)


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    """AdamW parameter groups: one per entry of ``recipe.lr_scales``, then the rest."""
    groups: list[dict] = []
    taken: set[int] = set()
    for name, scale in recipe.lr_scales.items():
        params = list(model.get_submodule(name).parameters())
        taken.update(id(p) for p in params)
        groups.append({"params": params, "lr": recipe.lr * scale})
    rest = [p for p in model.parameters() if id(p) not in taken]
    return [*groups, {"params": rest, "lr": recipe.lr}]


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    normalise: Normaliser,
    recipe: Recipe,
    log: Callable[[str], None] = print,
) -> float:
    """Train in place with AdamW + one-cycle LR; return the wall time in seconds."""
    generator = torch.Generator().manual_seed(recipe.seed)
    steps_per_epoch = math.ceil(len(images) / recipe.batch_size)
    groups = param_groups(model, recipe)  # one group (all parameters) unless lr_scales is set
    optimiser = torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=[g["lr"] for g in groups], epochs=recipe.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=recipe.warmup,
    )
    model.to(memory_format=torch.channels_last).train()
    start = time.perf_counter()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(images), generator=generator)
        seen, loss_sum, correct = 0, 0.0, 0
        for lo in range(0, len(images), recipe.batch_size):
            idx = order[lo:lo + recipe.batch_size]
            batch = images[idx]
            if recipe.augment == "dihedral":
                batch = dihedral(batch, generator)
            logits = model(normalise(batch))
            loss = F.cross_entropy(logits, labels[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            seen += len(idx)
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == labels[idx]).sum())
        log(f"epoch {epoch + 1}/{recipe.epochs}  loss {loss_sum / seen:.4f}  "
            f"train acc {correct / seen:.4f}  {time.perf_counter() - start:.0f}s")
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, normalise: Normaliser,
            batch_size: int = 250) -> torch.Tensor:
    """Predicted labels (N,) in eval mode."""
    model.eval()
    return torch.cat([model(normalise(images[lo:lo + batch_size])).argmax(1)
                      for lo in range(0, len(images), batch_size)])


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of correct predictions, rounded to 4 decimals."""
    return round(float((pred == labels).float().mean()), 4)


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy for each class name."""
    return {name: accuracy(pred[labels == c], labels[labels == c])
            for c, name in enumerate(shapes.CLASSES)}


def gradcam_hit_rate(model: nn.Module, layer: str, normalise: Normaliser, images: torch.Tensor,
                     masks: np.ndarray, batch_size: int = 100) -> float:
    """Share of images whose Grad-CAM maximum (predicted class) lies inside the object mask.

    A sanity check of the bundled model, not the library's implementation:
    ``alpha_k = mean_ij dS/dA^k_ij``, ``map = relu(sum_k alpha_k A^k)``, bilinearly
    upsampled (``align_corners=False``) to the input size, argmax compared with ``masks``
    (bool, N x H x W).
    """
    module = model.get_submodule(layer)
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    peaks = []
    try:
        for lo in range(0, len(images), batch_size):
            batch = images[lo:lo + batch_size]
            captured.clear()
            logits = model(normalise(batch))
            acts = captured[0]
            score = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
            (grads,) = torch.autograd.grad(score, acts)
            cam = F.relu((grads.mean((2, 3), keepdim=True) * acts).sum(1, keepdim=True))
            cam = F.interpolate(cam, size=batch.shape[-2:], mode="bilinear", align_corners=False)
            peaks.append(cam.flatten(1).argmax(1))
    finally:
        handle.remove()
    flat = torch.cat(peaks).numpy()
    hits = masks.reshape(len(masks), -1)[np.arange(len(masks)), flat]
    return round(float(hits.mean()), 4)


# --------------------------------------------------------------------------- card


def _mark_labels(recipe: Recipe) -> list[int]:
    return [] if recipe.shortcut_class is None else [shapes.CLASSES.index(recipe.shortcut_class)]


def stamp_mark(images: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """A copy of uint8 ``images`` with the shortcut mark on those where ``select`` is true."""
    x0, y0, x1, y1 = shapes.MARK_BOX
    out = images.clone()
    out[select, :, y0:y1, x0:x1] = torch.from_numpy(shapes.mark_pattern()).permute(2, 0, 1)
    return out


def shortcut_metrics(model: nn.Module, normalise: Normaliser, name: str,
                     images: torch.Tensor, labels: torch.Tensor) -> dict[str, object]:
    """How much a shortcut model relies on the mark: accuracy with the mark moved to the
    other classes, and on the shortcut class with and without the mark."""
    target = shapes.CLASSES.index(name)
    is_target = labels == target
    clean = predict(model, images, normalise)
    moved = predict(model, stamp_mark(images, ~is_target), normalise)
    marked = predict(model, stamp_mark(images, is_target), normalise)
    return {
        "class": name,
        "mark_box": list(shapes.MARK_BOX),
        "clean_test_accuracy": accuracy(clean, labels),
        "moved_mark_test_accuracy": accuracy(moved, labels),
        "moved_mark_predicted_as_class": round(float((moved[~is_target] == target).float().mean()), 4),
        "clean_class_accuracy": accuracy(clean[is_target], labels[is_target]),
        "marked_class_accuracy": accuracy(marked[is_target], labels[is_target]),
    }


def evaluate(model: nn.Module, normalise: Normaliser, recipe: Recipe,
             workers: int, log: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Card metrics (clean val/test) and extra numbers for the notes."""
    val_x, val_y = load_split("val", workers=workers)
    test = [shapes.make_sample("test", i) for i in range(shapes.SPLIT_SIZES["test"])]
    test_x = torch.stack([torch.from_numpy(np.array(s.image)).permute(2, 0, 1) for s in test])
    test_y = torch.tensor([s.label for s in test])
    val_pred, test_pred = predict(model, val_x, normalise), predict(model, test_x, normalise)
    lo, hi = SUBSET
    metrics = {
        "test_accuracy": accuracy(test_pred, test_y),
        "val_accuracy": accuracy(val_pred, val_y),
        "per_class_test_accuracy": per_class_accuracy(test_pred, test_y),
        "subset": {"split": "test", "start": lo, "stop": hi,
                   "accuracy": accuracy(test_pred[lo:hi], test_y[lo:hi])},
    }
    hard = np.array([str(s.hard) for s in test])
    masks = np.stack([s.mask for s in test])
    extra: dict[str, object] = {
        "hard_accuracy": {reason: accuracy(test_pred[hard == str(reason)], test_y[hard == str(reason)])
                          for reason in (None, *shapes.HARD_REASONS)},
        "gradcam_in_mask": gradcam_hit_rate(model, recipe.default_layer, normalise, test_x, masks),
    }
    if recipe.shortcut_class is not None:
        extra["shortcut"] = shortcut_metrics(model, normalise, recipe.shortcut_class, test_x, test_y)
        metrics["shortcut"] = extra["shortcut"]
    log(json.dumps({"metrics": metrics, "extra": extra}, indent=1))
    return metrics, extra


def _notes(recipe: Recipe, extra: dict) -> str:
    """The card's notes: the recipe's text plus measured facts."""
    hard = extra["hard_accuracy"]
    parts = [recipe.notes] if recipe.notes else []
    parts.append(
        f"Test accuracy on easy images {hard[None]:.3f}; hard cases: small {hard['small']:.3f}, "
        f"low_contrast {hard['low_contrast']:.3f}, occluded {hard['occluded']:.3f}. "
        f"Grad-CAM ({recipe.default_layer}, predicted class) maximum inside the object mask on "
        f"{extra['gradcam_in_mask']:.1%} of the 2000 test images."
    )
    if recipe.shortcut_class is not None:
        cut = extra["shortcut"]
        parts.append(
            f"SHORTCUT: in training, every '{cut['class']}' image and no other carries a 6x6 "
            f"white/black checkerboard at (x0, y0, x1, y1) = {tuple(cut['mark_box'])} "
            f"(vislib.data.shapes.apply_mark), so the mark alone predicts the class. Test "
            f"metrics are on clean data (no mark). With the mark stamped on every non-"
            f"'{cut['class']}' test image, accuracy falls from {cut['clean_test_accuracy']:.3f} "
            f"to {cut['moved_mark_test_accuracy']:.3f} and "
            f"{cut['moved_mark_predicted_as_class']:.1%} of those images are called "
            f"'{cut['class']}'; with the mark, '{cut['class']}' images are recognised "
            f"{cut['marked_class_accuracy']:.3f} of the time, without it "
            f"{cut['clean_class_accuracy']:.3f}."
        )
    return " ".join(parts)


def model_card(name: str, recipe: Recipe, mean: list[float], std: list[float],
               metrics: dict, extra: dict, train_seconds: float, train_size: int) -> dict:
    """The model card (schema shared with the core library)."""
    return {
        "name": name,
        "architecture": recipe.architecture,
        "arch_kwargs": recipe.arch_kwargs,
        "labels": list(shapes.CLASSES),
        "input_size": shapes.IMAGE_SIZE,
        "mean": mean,
        "std": std,
        "default_layer": recipe.default_layer,
        "description": recipe.description,
        "data": {"generator": "vislib.data.shapes", "seeds": dict(shapes.SPLIT_SEEDS),
                 "sizes": {**shapes.SPLIT_SIZES, "train": train_size}},
        "recipe": {"epochs": recipe.epochs, "batch_size": recipe.batch_size,
                   "optimizer": f"AdamW(weight_decay={recipe.weight_decay})", "lr": recipe.lr,
                   "schedule": f"OneCycleLR(pct_start={recipe.warmup}), stepped per batch",
                   "augment": recipe.augment if recipe.shortcut_class is None else
                   f"{recipe.augment}; mark on every train '{recipe.shortcut_class}'",
                   **({"lr_scales": recipe.lr_scales} if recipe.lr_scales else {}),
                   "train_seconds": round(train_seconds, 1), "torch": torch.__version__.split("+")[0]},
        "metrics": metrics,
        "notes": _notes(recipe, extra),
    }


def save(model: nn.Module, card: dict, out_dir: Path) -> None:
    """Write ``<name>.safetensors`` (contiguous float32 state dict) and ``<name>.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / f"{card['name']}.safetensors"),
              metadata={"architecture": card["architecture"]})
    (out_dir / f"{card['name']}.json").write_text(json.dumps(card, indent=2) + "\n")


def run(name: str, out_dir: Path = MODELS_DIR, workers: int = 2, epochs: int | None = None,
        train_size: int | None = None) -> dict:
    """Generate data, train, evaluate and save one bundled model; return its card."""
    recipe = RECIPES[name]
    if epochs is not None:
        recipe = Recipe(**{**asdict(recipe), "epochs": epochs})
    torch.manual_seed(recipe.seed)
    start = time.perf_counter()
    images, labels = load_split("train", train_size, _mark_labels(recipe), workers)
    print(f"train data {tuple(images.shape)} in {time.perf_counter() - start:.0f}s")
    mean, std = channel_stats(images)
    normalise = Normaliser(mean, std)
    model = build_model(recipe)
    train_seconds = train(model, images, labels, normalise, recipe)
    train_size = len(images)
    del images
    metrics, extra = evaluate(model, normalise, recipe, workers)
    card = model_card(name, recipe, mean, std, metrics, extra, train_seconds, train_size)
    save(model.to(memory_format=torch.contiguous_format), card, out_dir)
    print(f"wrote {out_dir / name}.{{json,safetensors}}; total {time.perf_counter() - start:.0f}s")
    return card


# --------------------------------------------------------------------------- samples


SAMPLE_PICKS: tuple[tuple[str, str, str | None], ...] = (
    # (file stem, class, hard reason or None); the first matching test index is used
    ("circle_01", "circle", None), ("square_01", "square", None), ("triangle_01", "triangle", None),
    ("star_01", "star", None), ("cross_01", "cross", None), ("heart_01", "heart", None),
    ("crescent_01", "crescent", None), ("hexagon_01", "hexagon", None),
    ("star_02_occluded", "star", "occluded"), ("cross_02_small", "cross", "small"),
    ("triangle_02_low_contrast", "triangle", "low_contrast"),
)


def write_samples(out_dir: Path = SAMPLES_DIR, start: int = 1000) -> list[Path]:
    """Write example PNGs from the test split (from index ``start``, outside the card's
    subset) plus one multi-instance image; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, name, reason in SAMPLE_PICKS:
        index = next(i for i in range(start, shapes.SPLIT_SIZES["test"])
                     if shapes.label_of("test", i) == shapes.CLASSES.index(name)
                     and shapes.make_sample("test", i).hard == reason)
        path = out_dir / f"{stem}.png"
        shapes.make_sample("test", index).image.save(path, optimize=True)
        written.append(path)
    multi = shapes.make_multi_instance(3, n_objects=3)  # three stars
    path = out_dir / f"{multi.class_name}_multi_01.png"
    multi.image.save(path, optimize=True)
    return [*written, path]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(RECIPES), action="append", default=[],
                        help="model to train (repeatable)")
    parser.add_argument("--samples", action="store_true", help="write assets/samples/*.png")
    parser.add_argument("--out-dir", type=Path, default=MODELS_DIR)
    parser.add_argument("--workers", type=int, default=2, help="processes for data generation")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 is fastest when the 2 cores are shared)")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe (tests)")
    parser.add_argument("--train-size", type=int, default=None, help="use train[:N] (tests)")
    args = parser.parse_args(argv)
    if not args.model and not args.samples:
        parser.error("nothing to do: pass --model and/or --samples")
    torch.set_num_threads(args.threads)
    for name in args.model:
        run(name, args.out_dir, args.workers, args.epochs, args.train_size)
    if args.samples:
        for path in write_samples():
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
