"""Zeiler & Fergus across a dataset: the top-k activations of every unit of a layer (ECCV 2014, Fig. 2).

For each channel c of a layer and each image n of an image set, the image's strongest activation
of the channel, ``a(n, c) = max_{y,x} A_c(n)[y, x]`` at its first maximal position in raster order;
the channel's top-k are the k images with the largest ``a(n, c)`` (ties: the lower image index),
so the nine patches of the figure come from nine images. The pass over the data is a map (the
per-batch step :func:`activation_rows`, on either engine of :mod:`vislib.evaluate`) and a streaming
reduce (:class:`TopK`) on the driver: the top-k of the union of all batches is exact.

Each listed activation is then projected to pixel space alone with the Deconvnet rule
(:func:`vislib.features.project_units`, a batch of units at once) and cropped to the unit's
receptive field, beside the input patch it sees: computed once and written in compressed shards.

An index folder holds ``index.csv`` (``channel, rank, image, y, x, activation`` plus the field
``top, left, bottom, right`` in input pixels; ``image`` is the id of evaluate's per-image table,
``y, x`` on the layer's grid), optionally ``index.parquet``, ``units/units-*.npz`` (the projections
and patches) and ``meta.json``, written last.
"""

from __future__ import annotations

import bisect
import csv
import functools
import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ._version import __version__
from .datasets import ImageSet, cache_dir
from .errors import InputError, LayerError
from .features import project_units, receptive_fields
from .hooks import capture_layer, resolve_layer
from .models import ModelBundle

FORMAT = 1  # of an index folder; a cached index of another format is rebuilt
COLUMNS = ("channel", "rank", "image", "y", "x", "activation", "top", "left", "bottom", "right")


# --------------------------------------------------------------------------------------------------
# The map: each image's strongest activation per channel


def activation_rows(bundle: ModelBundle, images: ImageSet, rows, *, layer: str,
                    cancel: threading.Event | None = None) -> dict[str, np.ndarray]:
    """The per-batch step: for each image at ``rows``, ``peak`` (C values: max over positions per
    channel) and ``where`` (the flat position y·w + x of that maximum, the first in raster order);
    an unreadable image gets its reason in ``failed`` and −inf peaks."""
    from .evaluate.step import to_inputs

    rows = np.asarray(rows, np.int64)
    channels = bundle.layers[layer][0]
    out = {"index": rows, "failed": np.full(len(rows), "", dtype=object),
           "peak": np.full((len(rows), channels), -np.inf, np.float32),
           "where": np.full((len(rows), channels), -1, np.int64)}
    batch = images.load(rows)
    for pos, why in batch.failed.items():
        out["failed"][pos] = why
    keep = [i for i in range(len(rows)) if i not in batch.failed]
    if not keep:
        return out
    name, module = resolve_layer(bundle, layer)
    inputs, _ = to_inputs(bundle, batch, keep)
    with bundle.lock, capture_layer(module, view=bundle.view(name)) as captured, torch.no_grad():
        bundle.logits(inputs)
    if captured.activation is None:
        raise LayerError(f"layer {layer!r} did not run during the forward pass")
    A = captured.activation.float().flatten(2)  # N×C×(h·w)
    peak, where = A.max(dim=2)  # the first maximal position of each row
    out["peak"][keep] = torch.nan_to_num(peak, nan=-np.inf).cpu().numpy()
    out["where"][keep] = where.cpu().numpy()
    return out


class TopK:
    """Running top-k per channel over the rows of :func:`activation_rows`, in any order: by activation
    (largest first), ties broken by the lower image index. Exact: the top-k of a union is the top-k
    of the parts' top-k."""

    NONE = np.iinfo(np.int64).max

    def __init__(self, channels: int, k: int):
        self.k = k
        self.value = np.full((channels, k), -np.inf, np.float32)
        self.image = np.full((channels, k), self.NONE, np.int64)
        self.where = np.full((channels, k), -1, np.int64)
        self.failed: dict[int, str] = {}
        self.seen = 0

    def update(self, part: dict[str, np.ndarray]) -> None:
        failed = np.asarray(part["failed"]).astype(str)
        ok = failed == ""
        index = np.asarray(part["index"], np.int64)
        for i, why in zip(index[~ok], failed[~ok], strict=True):
            self.failed[int(i)] = str(why)
        if not ok.any():
            return
        self.seen += int(ok.sum())
        channels = self.value.shape[0]
        value = np.concatenate([self.value, np.asarray(part["peak"], np.float32)[ok].T], axis=1)
        image = np.concatenate([self.image, np.broadcast_to(index[ok], (channels, int(ok.sum())))], axis=1)
        where = np.concatenate([self.where, np.asarray(part["where"], np.int64)[ok].T], axis=1)
        order = np.lexsort((image, -value.astype(np.float64)), axis=1)[:, :self.k]
        self.value = np.take_along_axis(value, order, axis=1)
        self.image = np.take_along_axis(image, order, axis=1)
        self.where = np.take_along_axis(where, order, axis=1)


# --------------------------------------------------------------------------------------------------
# The index


@dataclass
class TopIndex:
    """The top-k activations of every channel of a layer over an image set, one row per channel and
    rank (arrays over rows, sorted by channel then rank)."""

    model: str
    weights: str
    layer: str
    shape: tuple[int, int, int]  # the layer's (C, h, w)
    dataset: str
    digest: str
    n_images: int
    top: int
    channel: np.ndarray
    rank: np.ndarray  # 1..k
    index: np.ndarray  # position of the image in the image set
    image: list[str]  # image ids
    y: np.ndarray
    x: np.ndarray
    activation: np.ndarray
    boxes: np.ndarray | None = None  # rows × (top, left, bottom, right), the receptive fields
    failed: list[tuple[str, str]] = field(default_factory=list)
    folder: Path | None = None
    engine: str = "local"
    seconds: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.channel)

    def rows_of(self, channel: int) -> np.ndarray:
        """The rows of one channel, strongest first."""
        return np.flatnonzero(self.channel == channel)

    def strongest_channels(self) -> list[int]:
        """Channels ordered by their top-1 activation, strongest first."""
        first = self.rank == 1
        order = np.argsort(-self.activation[first], kind="stable")
        return self.channel[first][order].tolist()

    def table(self) -> dict[str, list]:
        """The index as columns (:data:`COLUMNS`)."""
        boxes = self.boxes if self.boxes is not None else np.full((len(self), 4), -1)
        return {"channel": self.channel.tolist(), "rank": self.rank.tolist(), "image": list(self.image),
                "y": self.y.tolist(), "x": self.x.tolist(), "activation": self.activation.tolist(),
                **{name: boxes[:, i].tolist() for i, name in enumerate(("top", "left", "bottom", "right"))}}


def top_activations(bundle: ModelBundle, images: ImageSet, layer: str | None = None, *, top: int = 9,
                    batch_size: int = 64, engine: str = "local", address: str | None = None,
                    workers: int | None = None, threads: int | None = None, progress=None,
                    cancel: threading.Event | None = None) -> TopIndex:
    """The exact top-``top`` images of every channel of ``layer`` over ``images`` (no projections)."""
    from .evaluate.engine import run

    if top < 1:
        raise InputError(f"top must be at least 1, not {top}")
    name, _ = resolve_layer(bundle, layer)
    c, h, w = (int(s) for s in bundle.layers[name])  # (C, h, w) as the methods see the layer
    shape = (c, h, w)
    if len(images) == 0:
        raise InputError(f"{images.name}: no images")
    reducer = TopK(shape[0], top)
    info: dict = {}
    start = time.perf_counter()
    run(functools.partial(activation_rows, layer=name), bundle, images, len(images), engine=engine,
        address=address, workers=workers, batch_size=batch_size, progress=progress, cancel=cancel,
        unit="images", info=info, on_part=reducer.update, threads=threads)
    keep = reducer.image != TopK.NONE
    channel, rank = np.nonzero(keep)  # row-major: by channel, then rank
    where = reducer.where[keep]
    width = shape[2]
    index = reducer.image[keep]
    return TopIndex(
        model=bundle.name, weights=bundle.weights, layer=name, shape=shape, dataset=images.name,
        digest=images.digest, n_images=len(images), top=top, channel=channel.astype(np.int64),
        rank=rank.astype(np.int64) + 1, index=index, image=[images.ids[i] for i in index],
        y=where // width, x=where % width, activation=reducer.value[keep].astype(np.float32),
        failed=[(images.ids[i], why) for i, why in sorted(reducer.failed.items())],
        engine=info.get("engine", engine), seconds={"activations": time.perf_counter() - start},
    )


# --------------------------------------------------------------------------------------------------
# Projections and patches, in shards


def projection_rows(bundle: ModelBundle, images: ImageSet, rows, *, layer: str, entries: np.ndarray,
                    boxes: np.ndarray, crop: tuple[int, int], folder: str,
                    cancel: threading.Event | None = None) -> dict[str, np.ndarray]:
    """The per-batch step of the projections: for the index rows ``rows`` (``entries``: rows ×
    (image index, channel, y, x); ``boxes``: their receptive fields), the Deconvnet projection of
    each unit alone cropped to its field and the input patch, zero-padded to ``crop``, written to
    ``folder/units-<first row>.npz``. Returns one row per unit (``failed``: an unreadable image)."""
    rows = np.asarray(rows, np.int64)
    out = {"index": rows, "failed": np.full(len(rows), "", dtype=object)}
    wanted = entries[rows]
    unique = sorted(set(wanted[:, 0].tolist()))
    batch = images.load(unique)
    loaded = [i for pos, i in enumerate(unique) if pos not in batch.failed]
    pictures = [batch.picture(unique.index(i)) for i in loaded]
    tensors, views = bundle.prepare(pictures) if pictures else (None, [])
    where = {i: k for k, i in enumerate(loaded)}  # image index → its row in the prepared batch
    for r, (i, *_rest) in enumerate(wanted):
        if int(i) not in where:
            out["failed"][r] = batch.failed.get(unique.index(int(i)), "unreadable")
    ok = [r for r in range(len(rows)) if int(wanted[r, 0]) in where]
    h, w = crop
    channels = bundle.channels
    projections = np.zeros((len(rows), channels, h, w), np.float16)
    patches = np.zeros((len(rows), h, w, 3), np.uint8)
    if ok and tensors is not None:  # ok: some pictures loaded, so there are tensors
        x = tensors[[where[int(wanted[r, 0])] for r in ok]]
        g = project_units(bundle, x, layer, [int(wanted[r, 1]) for r in ok],
                          [(int(wanted[r, 2]), int(wanted[r, 3])) for r in ok])
        for k, r in enumerate(ok):
            top, left, bottom, right = (int(v) for v in boxes[rows[r]])
            view = np.asarray(views[where[int(wanted[r, 0])]].convert("RGB"))
            projections[r, :, :bottom - top, :right - left] = g[k, :, top:bottom, left:right]
            patches[r, :bottom - top, :right - left] = view[top:bottom, left:right]
    _write_shard(Path(folder), rows, projections, patches)
    return out


def _write_shard(folder: Path, rows: np.ndarray, projections: np.ndarray, patches: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"units-{int(rows[0]):07d}.npz"
    tmp = folder / f".{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, rows=rows, projections=projections, patches=patches)
    os.replace(tmp, path)  # a retried batch replaces its shard, never adds a second one


def project_index(bundle: ModelBundle, images: ImageSet, index: TopIndex, folder: str | os.PathLike, *,
                  batch_size: int = 32, engine: str = "local", address: str | None = None,
                  workers: int | None = None, threads: int | None = None, progress=None,
                  cancel: threading.Event | None = None) -> None:
    """Compute the receptive fields of the index's units (on the driver, once per position) and their
    projections and patches (the per-batch step :func:`projection_rows` on the engine), written into
    ``folder/units``; sets ``index.boxes``."""
    from .evaluate.engine import run

    start = time.perf_counter()
    blank = torch.zeros(1, *bundle.input_shape, device=bundle.device)
    positions = list(zip(index.y.tolist(), index.x.tolist(), strict=True))
    fields = receptive_fields(bundle, index.layer, positions, blank) if positions else {}
    index.boxes = np.array([fields[p] for p in positions], np.int64).reshape(-1, 4)
    if not len(index):
        return
    sizes = index.boxes[:, 2:] - index.boxes[:, :2]
    crop = (int(sizes[:, 0].max()), int(sizes[:, 1].max()))
    entries = np.stack([index.index, index.channel, index.y, index.x], axis=1).astype(np.int64)
    task = functools.partial(projection_rows, layer=index.layer, entries=entries, boxes=index.boxes,
                             crop=crop, folder=str(Path(folder) / "units"))
    failed: list[str] = []

    def collect(part):
        failed.extend(str(f) for f in np.asarray(part["failed"]).astype(str) if f)

    run(task, bundle, images, len(index), engine=engine, address=address, workers=workers,
        batch_size=batch_size, progress=progress, cancel=cancel, unit="projections", on_part=collect,
        threads=threads)
    if failed:  # an image that was read in the first pass and not in the second: the data changed
        raise InputError(f"{len(failed)} images could not be read again for their projections ({failed[0]})")
    index.seconds["projections"] = time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# Index folders


def build_index(bundle: ModelBundle, images: ImageSet, out: str | os.PathLike, layer: str | None = None, *,
                top: int = 9, batch_size: int = 64, engine: str = "local", address: str | None = None,
                workers: int | None = None, threads: int | None = None, parquet: bool = False,
                progress=None, cancel: threading.Event | None = None) -> TopIndex:
    """Top-``top`` activations of every channel of ``layer`` over ``images``, their projections and
    patches, written to the folder ``out`` (see the module's docstring)."""
    out = Path(out)
    if parquet:
        from .evaluate.report import require_pyarrow

        require_pyarrow()
    try:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out / "units", ignore_errors=True)
    except OSError as exc:
        raise InputError(f"cannot write to {out}: {exc.strerror}") from None
    index = top_activations(bundle, images, layer, top=top, batch_size=batch_size, engine=engine,
                            address=address, workers=workers, threads=threads, progress=progress,
                            cancel=cancel)
    project_index(bundle, images, index, out, batch_size=max(1, min(batch_size, 32)), engine=engine,
                  address=address, workers=workers, threads=threads, progress=progress, cancel=cancel)
    table = index.table()
    from .evaluate.report import write_csv_table, write_parquet_table

    write_csv_table(out / "index.csv", table)
    if parquet:
        write_parquet_table(out / "index.parquet", table)
    meta = {"format": FORMAT, "model": index.model, "weights": index.weights, "layer": index.layer,
            "shape": list(index.shape), "dataset": index.dataset, "digest": index.digest,
            "n_images": index.n_images, "top": index.top, "engine": index.engine,
            "batch": max(1, min(batch_size, 32)), "failed": [list(f) for f in index.failed],
            "seconds": index.seconds, "vislib_version": __version__}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))  # last: the folder is complete
    index.folder = out
    return index


def load_index(folder: str | os.PathLike) -> TopIndex:
    """An index folder written by :func:`build_index`."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        with open(folder / "index.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}: not a complete feature index ({exc})") from None
    if meta.get("format") != FORMAT:
        raise InputError(f"{folder}: an index of another format ({meta.get('format')}); build it again")

    def col(name, dtype=np.int64):
        return np.array([r[name] for r in rows], dtype=dtype) if rows else np.zeros(0, dtype)

    return TopIndex(
        model=meta["model"], weights=meta["weights"], layer=meta["layer"], shape=tuple(meta["shape"]),
        dataset=meta["dataset"], digest=meta["digest"], n_images=meta["n_images"], top=meta["top"],
        channel=col("channel"), rank=col("rank"), index=np.full(len(rows), -1, np.int64),
        image=[r["image"] for r in rows], y=col("y"), x=col("x"),
        activation=col("activation", np.float32),
        boxes=np.stack([col(k) for k in ("top", "left", "bottom", "right")], axis=1) if rows else None,
        failed=[tuple(f) for f in meta.get("failed", [])], folder=folder, engine=meta.get("engine", "local"),
        seconds=meta.get("seconds", {}),
    )


@dataclass
class UnitView:
    """One listed activation: the input patch under the unit's receptive field and the Deconvnet
    projection of that activation alone (signed, 3×h×w), cropped to the same field."""

    channel: int
    rank: int
    image: str
    activation: float
    position: tuple[int, int]
    box: tuple[int, int, int, int]
    patch: Image.Image
    projection: np.ndarray

    def render(self, percentile: float = 99.5) -> Image.Image:
        """The projection as a signed RGB image (as the Layer explorer shows one image's)."""
        from .render import signed_rgb

        return signed_rgb(self.projection.astype(np.float32), percentile=percentile)


def unit_views(index: TopIndex, channel: int) -> list[UnitView]:
    """The channel's listed activations, strongest first, read from the index folder's shards."""
    if index.folder is None or index.boxes is None:
        raise InputError("this index has no projections: build it with build_index")
    if not 0 <= channel < index.shape[0]:
        raise LayerError(f"channel {channel} is out of range: the layer has {index.shape[0]} channels")
    shards = sorted((int(p.stem.split("-")[1]), p) for p in (index.folder / "units").glob("units-*.npz"))
    starts = [s for s, _ in shards]
    views, cache = [], {}
    for row in index.rows_of(channel):
        at = bisect.bisect_right(starts, row) - 1
        if at < 0:
            raise InputError(f"{index.folder}: the projections of row {row} are missing")
        if at not in cache:
            with np.load(shards[at][1]) as z:
                cache[at] = {k: z[k] for k in z.files}
        shard = cache[at]
        k = int(np.flatnonzero(shard["rows"] == row)[0])
        top, left, bottom, right = (int(v) for v in index.boxes[row])
        h, w = bottom - top, right - left
        views.append(UnitView(
            channel=channel, rank=int(index.rank[row]), image=index.image[row],
            activation=float(index.activation[row]), position=(int(index.y[row]), int(index.x[row])),
            box=(top, left, bottom, right), patch=Image.fromarray(shard["patches"][k, :h, :w]),
            projection=shard["projections"][k, :, :h, :w].astype(np.float32)))
    return views


def fit(image: Image.Image, cell: int) -> Image.Image:
    """``image`` scaled (nearest neighbour, aspect kept) and centred on a white ``cell``×``cell`` square."""
    scale = cell / max(image.width, image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    small = image.resize(size, Image.Resampling.NEAREST)
    square = Image.new("RGB", (cell, cell), "white")
    square.paste(small, ((cell - small.width) // 2, (cell - small.height) // 2))
    return square


def channel_figure(views: list[UnitView], cell: int = 96, columns: int = 3) -> Image.Image:
    """The paper's figure for one unit: a grid of (patch | projection) pairs, strongest first."""
    pad = 6
    rows = max(1, -(-len(views) // columns))
    figure = Image.new("RGB", (columns * (2 * cell + 3 * pad), rows * (cell + pad) + pad), "white")
    for i, view in enumerate(views):
        r, c = divmod(i, columns)
        left, top = c * (2 * cell + 3 * pad) + pad, r * (cell + pad) + pad
        figure.paste(fit(view.patch, cell), (left, top))
        figure.paste(fit(view.render(), cell), (left + cell + pad, top))
    return figure


def index_key(bundle: ModelBundle, images: ImageSet, layer: str, top: int) -> str:
    """What a cached index depends on: the model's weights (by their fingerprint), the layer, k, the
    images (by their digest) and the format."""
    from .evaluate.plan import weights_fingerprint

    weights = list(weights_fingerprint(bundle.model))
    text = json.dumps([FORMAT, bundle.name, bundle.weights, weights, layer, top, images.digest, len(images),
                       bundle.input_size], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cached_index(bundle: ModelBundle, images: ImageSet, layer: str | None = None, *, top: int = 9,
                 batch_size: int = 64, progress=None, cancel: threading.Event | None = None,
                 folder: str | os.PathLike | None = None) -> TopIndex:
    """The index from the cache folder (``VISLIB_CACHE``/features, or ``folder``), built there on
    first use (into a temporary folder renamed when complete: a stopped build leaves nothing)."""
    name, _ = resolve_layer(bundle, layer)
    root = Path(folder) if folder is not None else cache_dir() / "features"
    final = root / index_key(bundle, images, name, top)
    if (final / "meta.json").is_file():
        try:
            return load_index(final)
        except InputError:
            shutil.rmtree(final, ignore_errors=True)
    tmp = root / f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        build_index(bundle, images, tmp, name, top=top, batch_size=batch_size, progress=progress,
                    cancel=cancel)
        try:
            os.replace(tmp, final)
        except OSError:  # another process built it meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
        return load_index(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
