"""The one per-batch step of an evaluation, called by every engine.

:func:`evaluate_rows` reads a batch of images itself (``images.load``), explains it and measures the
maps, and returns plain per-image columns (:mod:`.records`). The local engine calls it in this
process; each Ray worker calls it on its own copy of the model and of the image set. Nothing else
differs between the engines, so their answers cannot drift apart.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import metrics
from ..datasets import Batch, ImageSet
from ..explain import _compute_chunked, _Job, device_slot
from ..models import ModelBundle, Preprocess
from .records import CENTRE, KEYS, TRUST_PREFIX, TRUST_RANDOM, column

# --------------------------------------------------------------------------------------------------
# Inputs


def to_inputs(bundle: ModelBundle, batch: Batch, keep: list[int]) -> tuple[torch.Tensor, np.ndarray | None]:
    """The model's input tensor for the loaded images at positions ``keep`` of the batch, and their
    object masks at the model's input view (resized and cropped as the image was)."""
    pre = bundle.preprocess
    if batch.arrays is not None:
        arrays = batch.arrays[keep]
        side = arrays.shape[1]
        fast = (isinstance(pre, Preprocess) and pre.crop == pre.resize == side == arrays.shape[2]
                and pre.channels == 3)
        if fast and isinstance(pre, Preprocess):  # plain normalisation: x / (255 std) − mean / std, in place
            x = torch.from_numpy(arrays).to(bundle.device).permute(0, 3, 1, 2)
            x = x.to(torch.float32, memory_format=torch.contiguous_format)
            mean = torch.tensor(pre.mean, device=bundle.device).view(1, 3, 1, 1)
            std = torch.tensor(pre.std, device=bundle.device).view(1, 3, 1, 1)
            masks = batch.masks[keep] if batch.masks is not None else None
            return x.mul_(1.0 / (255.0 * std)).sub_(mean / std), masks
        images = [Image.fromarray(a) for a in arrays]
    else:
        assert batch.images is not None  # a batch has arrays or images
        images = [image for i in keep if (image := batch.images[i]) is not None]  # keep: the loaded ones
    tensor, _ = bundle.prepare(images)
    masks = None
    if batch.masks is not None:
        masks = np.stack([mask_view(bundle, batch.masks[i]) for i in keep])
    return tensor, masks


def mask_view(bundle: ModelBundle, mask: np.ndarray) -> np.ndarray:
    """A mask through the same resize and centre crop as the image (nearest neighbour)."""
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    pre = bundle.preprocess
    if isinstance(pre, Preprocess):
        from torchvision.transforms import InterpolationMode

        img = pre.geometry(img, InterpolationMode.NEAREST)
    else:
        img = img.resize(bundle.input_hw[::-1], Image.Resampling.NEAREST)
    return np.asarray(img) > 127


def reference_mask(bundle: ModelBundle, images: ImageSet) -> np.ndarray | None:
    """The image set's reference box as a mask at the model's input view (None without a box)."""
    return box_mask(bundle, images.reference_box, images.image_size)


def box_mask(bundle: ModelBundle, box, side: int | None) -> np.ndarray | None:
    if box is None or side is None:
        return None
    _, (x0, y0, x1, y1) = box
    mask = np.zeros((side, side), bool)
    mask[y0:y1, x0:x1] = True
    return mask if side == bundle.input_size else mask_view(bundle, mask)


def explain_batch(bundle, inputs, names, layer, target, cancel, notes: list[str]):
    """:func:`vislib.explain` on an input batch, without the per-image input views that an evaluation
    never shows (they cost as much as the rest of the bookkeeping): the same family runners, map
    normalisation and out-of-memory recovery. Returns the batch's maps, flat flags, probabilities
    and targets (numpy, batch first)."""
    job = _Job(names=list(names), layer=layer, score="logit", options={}, progress=None, cancel=cancel)
    with device_slot(bundle.device):  # as explain(): a bounded number of explanations per GPU
        part = _compute_chunked(bundle, inputs, target, job)
    notes += [n for n in job.notes if n not in notes]
    return part


# --------------------------------------------------------------------------------------------------
# The step


@dataclass(frozen=True)
class EvalConfig:
    """Everything the step needs besides the model and the images (picklable: it travels to workers)."""

    methods: tuple[str, ...]
    layer: str
    explained: str = "predicted"
    confidence: bool = True
    curves: int = 0  # deletion / insertion curves for the images with index < curves
    curve_steps: int = 32
    tolerance: int = 0
    reference_box: tuple | None = None
    image_size: int | None = None  # side of the image set's square images (for the reference box)
    maps_dir: str | None = None  # write the maps of every batch there (compressed shards)
    trust: tuple[str, ...] = ()  # vislib.metrics.trust metric names, each beside the random map
    trust_seed: int = 0


def empty_rows(rows: np.ndarray, config: EvalConfig, n_classes: int) -> dict[str, np.ndarray]:
    """The columns of a batch before anything is known: NaN metrics, no peak, no failure."""
    n = len(rows)
    out: dict[str, np.ndarray] = {
        "index": np.asarray(rows, np.int64), "failed": np.full(n, "", dtype=object),
        "probs": np.zeros((n, n_classes), np.float32), "note": np.full(n, "", dtype=object),
    }
    for m in [*config.methods, CENTRE]:
        for k in KEYS:
            out[column(m, k)] = np.full(n, np.nan)
    for m in config.methods:
        out[column(m, "peak")] = np.full((n, 2), -1, np.int64)
    for m, name in trust_columns(config):
        out[column(m, TRUST_PREFIX + name)] = np.full(n, np.nan)
    if config.curves > 0:
        width = config.curve_steps + 1
        out["curve"] = np.zeros(n, bool)
        out["curve_fractions"] = np.full((n, width), np.nan)
        for m in [*config.methods, CENTRE]:
            out[column(m, "deletion")] = np.full((n, width), np.nan, np.float32)
            out[column(m, "insertion")] = np.full((n, width), np.nan, np.float32)
    for k in ("load", "explain", "metrics"):
        out[f"t_{k}"] = np.zeros(n)
    return out


def evaluate_rows(bundle: ModelBundle, images: ImageSet, rows, config: EvalConfig, *,
                  cancel: threading.Event | None = None,
                  on_inputs: Callable[[torch.Tensor], float] | None = None) -> dict[str, np.ndarray]:
    """Read, explain and measure the images at positions ``rows`` of ``images``: one row per image
    (an unreadable one with its reason in ``failed``). ``on_inputs(inputs)`` (the throughput
    reference) runs before and after the work and its seconds are left out of the timings."""
    rows = np.asarray(rows, np.int64)
    out = empty_rows(rows, config, len(bundle.labels))
    t0 = time.perf_counter()
    batch = images.load(rows)
    for pos, why in batch.failed.items():
        out["failed"][pos] = why
    keep = [i for i in range(len(rows)) if i not in batch.failed]
    timings = {"load": 0.0, "explain": 0.0, "metrics": 0.0}
    if keep:
        inputs, masks = to_inputs(bundle, batch, keep)
        t1 = time.perf_counter()
        timings["load"] = t1 - t0
        if on_inputs is not None:
            t1 += on_inputs(inputs)
        target = [int(t) for t in images.targets[rows[keep]]] if config.explained == "true" else None
        notes: list[str] = []
        part = explain_batch(bundle, inputs, config.methods, config.layer, target, cancel, notes)
        t2 = time.perf_counter()
        timings["explain"] = t2 - t1
        out["probs"][keep] = part.probs
        out["note"][keep[0]] = "\n".join(notes)
        measure(bundle, inputs, part, masks, np.asarray(keep), rows[keep], out, config, cancel=cancel)
        if config.trust:
            measure_trust(bundle, inputs, part, masks, np.asarray(keep), rows[keep], out, config,
                          cancel=cancel)
        if config.maps_dir:
            write_map_shard(config.maps_dir, rows[keep], {m: part.maps[m] for m in config.methods})
        timings["metrics"] = time.perf_counter() - t2
        if on_inputs is not None:
            on_inputs(inputs)
    else:
        timings["load"] = time.perf_counter() - t0
    for k, seconds in timings.items():
        out[f"t_{k}"][:] = seconds / max(1, len(rows))
    return out


def measure(bundle, inputs, part, masks, pos: np.ndarray, index: np.ndarray, out: dict, config: EvalConfig,
            *, cancel=None) -> None:
    """Every metric of the loaded images of a batch, written into the columns ``out`` at positions
    ``pos`` (``index``: their positions in the image set, which decide who gets curves)."""
    count = len(pos)
    size = tuple(inputs.shape[-2:])
    tol = config.tolerance
    centre = torch.from_numpy(metrics.centre_map(*size))
    ref_mask = box_mask(bundle, config.reference_box, config.image_size)
    targets = np.asarray(part.targets)
    y = part.probs[np.arange(count), targets]
    all_maps = {m: torch.from_numpy(part.maps[m]) for m in config.methods}
    all_maps[CENTRE] = centre.expand(count, -1, -1)
    centre_point = np.tile([[size[0] // 2, size[1] // 2]], (count, 1))
    curve_sel = np.flatnonzero(index < config.curves)
    masks_t = torch.from_numpy(masks) if masks is not None else None
    masks_f = masks_t.float() if masks_t is not None else None
    for name, m in all_maps.items():
        def put(key, value, at=pos, name=name):
            out[column(name, key)][at] = value

        if name == CENTRE:
            pts, flat = centre_point, np.zeros(count, bool)
        else:
            pts, flat = metrics.peaks(m, part.flat[name])
            put("peak", pts)
        if masks_t is not None and masks_f is not None:
            put("pointing", metrics.near_mask(pts, masks_t, tol) & ~flat)
            if name == CENTRE:  # Σ centre·mask / Σ centre: one matrix-vector product
                put("energy", (masks_f.flatten(1) @ centre.flatten() / centre.sum()).numpy())
            else:  # maps from explain are in [0, 1]: metrics.energy_inside without its checks
                total = m.flatten(1).sum(dim=1, dtype=torch.float64)
                inside = (m * masks_f).flatten(1).sum(dim=1, dtype=torch.float64)
                put("energy", torch.where(total > 0, inside / total.clamp_min(1e-300), 0.0).numpy())
        if ref_mask is not None:
            put("reference", metrics.near_mask(pts, ref_mask, tol) & ~flat)
        if config.confidence:
            o = metrics.masked_confidence(bundle, inputs, m, targets, cancel=cancel).numpy()
            put("y", y)
            put("o", o)
            put("average_drop", np.maximum(0.0, y - o) / np.maximum(y, 1e-12) * 100)
            put("increase", (o > y) * 100.0)
        if len(curve_sel):
            c = metrics.deletion_insertion(bundle, inputs[curve_sel], m[curve_sel], targets[curve_sel],
                                           steps=config.curve_steps, cancel=cancel)
            at = pos[curve_sel]
            put("deletion", c.deletion, at)
            put("insertion", c.insertion, at)
            put("deletion_auc", c.deletion_auc, at)
            put("insertion_auc", c.insertion_auc, at)
            out["curve"][at] = True
            out["curve_fractions"][at] = c.fractions


def trust_columns(config: EvalConfig) -> list[tuple[str, str]]:
    """(method or baseline, metric) of every trust column: each method, the random map, and the
    image centre for the localisation metrics."""
    if not config.trust:
        return []
    from ..metrics import trust

    out = []
    for name in config.trust:
        metric = trust.make_metric(name)
        owners = [*config.methods, TRUST_RANDOM] + ([CENTRE] if metric.centre_applies else [])
        out += [(m, name) for m in owners]
    return out


def measure_trust(bundle, inputs, part, masks, pos: np.ndarray, index: np.ndarray, out: dict,
                  config: EvalConfig, *, cancel=None) -> None:
    """The trust metrics of a batch (:mod:`vislib.metrics.trust`) for every method, the random map
    (one per image, seeded by the image's index: the same whatever the batches) and the image
    centre. Random draws inside a metric are seeded by the batch's first index, so a batch gives the
    same numbers on every engine."""
    from ..metrics import trust

    n, _, h, w = inputs.shape
    targets = np.asarray(part.targets)
    masks_t = torch.from_numpy(masks) if masks is not None else None
    seed = config.trust_seed + int(index[0])
    random = torch.stack([trust.random_maps(1, h, w, config.trust_seed * 1_000_003 + int(i))[0]
                          for i in index])
    centre = torch.from_numpy(metrics.centre_map(h, w)).double().expand(n, h, w)
    for m, name in trust_columns(config):
        metric = trust.make_metric(name, seed=seed)
        if metric.needs_masks and masks_t is None:
            continue
        explain = None
        if metric.needs_explain:
            explain = (trust.random_explainer(seed, fresh=metric.group == "robustness") if m == TRUST_RANDOM
                       else trust.explainer(m, config.layer, cancel=cancel) if m != CENTRE else None)
            if explain is None:
                continue
        maps = random if m == TRUST_RANDOM else centre if m == CENTRE else torch.from_numpy(part.maps[m])
        values = metric(bundle, inputs, targets, maps, masks=masks_t, explain=explain, cancel=cancel)
        out[column(m, TRUST_PREFIX + name)][pos] = values


# --------------------------------------------------------------------------------------------------
# Maps on disk


def write_map_shard(folder: str | os.PathLike, index: np.ndarray, maps: dict[str, np.ndarray]) -> Path:
    """One compressed shard ``maps-<first index>.npz`` with ``index`` and each method's N×H×W maps as
    float16 (written under a temporary name, then renamed: a retried batch replaces, never doubles)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"maps-{int(index[0]):08d}.npz"
    tmp = folder / f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "wb") as f:
        # numpy's stubs match **maps against allow_pickle: bool; the keys are method names
        np.savez_compressed(f, index=np.asarray(index, np.int64),
                            **{m: np.asarray(v, np.float16) for m, v in maps.items()})  # type: ignore[arg-type]
    os.replace(tmp, path)
    return path


def map_bytes(n_images: int, n_methods: int, size: int) -> int:
    """Upper bound of the maps' size on disk before compression (float16)."""
    return int(n_images) * int(n_methods) * int(size) * int(size) * 2


def read_maps(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """All shards of a maps folder merged: ``index`` and each method's maps, sorted by index."""
    parts = []
    for path in sorted(Path(folder).glob("maps-*.npz")):
        with np.load(path) as z:
            parts.append({k: z[k] for k in z.files})
    if not parts:
        return {}
    table = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(table["index"], kind="stable")
    return {k: v[order] for k, v in table.items()}
