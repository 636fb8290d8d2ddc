"""Zeiler & Fergus (ECCV 2014) feature visualisations: pure functions returning numpy arrays and PIL
images (no Streamlit).

* :func:`feature_maps`: a layer's activation maps for one image; :func:`tile_maps` tiles any stack
  of maps (or RGB images) into one grid image.
* :func:`top_channels`: the N channels with the strongest activation on this image; each one's
  strongest activation alone (every other activation of the layer set to zero) is projected back to
  pixel space with the Deconvnet rule, and returned with its receptive field in the input and the
  matching input patch — the ZF figure.
* :func:`project_layer`: the whole layer projected at once; :func:`project_units`: one unit per
  sample of a batch (the dataset-wide top-9 of :mod:`vislib.dataset_features`).
* :func:`receptive_field`: found empirically, as the support of the gradient of the unit with
  respect to the input through the *linearised* network (every ReLU passes its signal, every
  max-pool averages its window), so it holds for any architecture (branches, padding, dilation).
* :func:`first_layer_filters`: the first convolution's filters as RGB images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from .errors import InputError, LayerError
from .hooks import capture_layer, resolve_layer
from .methods.backprop import check_rule_reached, relu_rule
from .render import signed_rgb

Box = tuple[int, int, int, int]  # (top, left, bottom, right) in input pixels, bottom/right exclusive


def _single_input(bundle, image) -> tuple[Image.Image, torch.Tensor]:
    """(input view, 1×3×H×W tensor on the model's device) for one image or a 3×H×W tensor."""
    from .explain import _prepare_inputs  # local import: explain imports the methods package

    batched, views, x = _prepare_inputs(bundle, image)
    if x.shape[0] != 1:
        raise InputError(f"feature visualisations take one image, not a batch of {x.shape[0]}")
    return views[0], x


def feature_maps(bundle, image, layer: str | None = None) -> np.ndarray:
    """The activation maps of ``layer`` (default: the bundle's default layer) for one image: C×h×w."""
    name, module = resolve_layer(bundle, layer)
    _, x = _single_input(bundle, image)
    with bundle.lock, capture_layer(module, view=bundle.view(name)) as captured, torch.no_grad():
        bundle.logits(x)
    if captured.activation is None:
        raise LayerError(f"layer {layer!r} did not run during the forward pass")
    return captured.activation[0].float().cpu().numpy()


def tile_maps(
    maps, *, columns: int | None = None, pad: int = 2, normalize: str = "each", colormap: str | None = None,
    scale: int = 1, background: int = 255,
) -> Image.Image:
    """Tile K maps (K×h×w) or RGB images (K×h×w×3) into one grid image.

    ``normalize``: "each" (min-max per tile), "all" (one min-max for all tiles) or "none" (values
    already in [0, 1]); constant tiles become 0. ``colormap`` colours single-channel maps (else
    gray). ``scale`` enlarges each tile by pixel repetition; ``pad`` pixels of ``background`` apart.
    """
    from .render import apply_colormap

    arr = np.asarray(maps, dtype=np.float32)
    if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[-1] != 3) or arr.shape[0] == 0:
        raise InputError(f"tile_maps takes K×h×w maps or K×h×w×3 images, not shape {arr.shape}")
    arr = _normalize_tiles(np.nan_to_num(arr), normalize)
    if arr.ndim == 3 and colormap:
        arr = apply_colormap(arr, colormap).astype(np.float32) / 255.0
    elif arr.ndim == 3:
        arr = arr[..., None].repeat(3, axis=-1)
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    k, h, w, _ = arr.shape
    cols = columns or math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    grid = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, 3), background, np.uint8)
    tiles = (arr * 255.0).round().clip(0, 255).astype(np.uint8)
    for i in range(k):
        r, c = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        grid[top:top + h, left:left + w] = tiles[i]
    return Image.fromarray(grid)


def _normalize_tiles(arr: np.ndarray, mode: str) -> np.ndarray:
    if mode == "none":
        return arr.clip(0, 1)
    axes = tuple(range(1, arr.ndim))
    if mode == "each":
        lo, hi = arr.min(axis=axes, keepdims=True), arr.max(axis=axes, keepdims=True)
    elif mode == "all":
        lo, hi = arr.min(), arr.max()
    else:
        raise InputError(f"normalize must be 'each', 'all' or 'none', not {mode!r}")
    span = hi - lo
    return np.where(span > 0, (arr - lo) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Deconvnet projections


@dataclass
class ChannelProjection:
    """One channel's strongest activation projected to pixel space (Deconvnet rule).

    ``position`` is (row, col) in the layer's map; ``box`` the unit's receptive field in the input
    (top, left, bottom, right; bottom/right exclusive); ``reconstruction`` the signed 3×H×W signal
    at input resolution; ``patch`` the input view cropped to ``box``.
    """

    channel: int
    value: float
    position: tuple[int, int]
    box: Box
    reconstruction: np.ndarray
    patch: Image.Image

    @property
    def reconstruction_patch(self) -> np.ndarray:
        top, left, bottom, right = self.box
        return self.reconstruction[:, top:bottom, left:right]

    def render(self, *, percentile: float = 99.5) -> Image.Image:
        """The reconstruction cropped to the receptive field, as a signed RGB image."""
        return signed_rgb(self.reconstruction_patch, percentile=percentile)


def _deconv_forward(bundle, layer: str | None, x: torch.Tensor, *, rule="deconvnet", linearize=False):
    """Forward with a ReLU rule, recording the layer's map with its graph: (x leaf, A, state)."""
    name, module = resolve_layer(bundle, layer)
    x = x.detach().requires_grad_(True)
    capture = capture_layer(module, keep_graph=True, view=bundle.view(name))
    rules = relu_rule(rule, linearize_pools=linearize, frozen_norms=True)
    with bundle.lock, capture as captured, rules as state:
        with torch.enable_grad():
            bundle.logits(x)
    if captured.activation is None:
        raise LayerError("the layer did not run during the forward pass")
    check_rule_reached(bundle.model, state, rule)
    return x, captured.activation, state


def top_channels(bundle, image, layer: str | None = None, n: int = 9) -> list[ChannelProjection]:
    """The ``n`` channels of ``layer`` with the strongest single activation on ``image`` (strongest
    first), each projected to pixel space with only that activation kept (Zeiler & Fergus 2014).
    Channels whose strongest activation is not positive are left out (they project to nothing)."""
    if n < 1:
        raise InputError(f"n must be at least 1, not {n}")
    name, _ = resolve_layer(bundle, layer)
    view, x = _single_input(bundle, image)
    x, A, _ = _deconv_forward(bundle, name, x)
    peak, where = A[0].detach().flatten(1).max(dim=1)
    order = [c for c in torch.argsort(peak, descending=True).tolist() if peak[c] > 0][:n]
    width = A.shape[-1]
    positions = [divmod(int(where[c]), width) for c in order]
    boxes = receptive_fields(bundle, name, positions, x)
    projections = []
    for k, (c, (i, j)) in enumerate(zip(order, positions, strict=True)):
        signal = torch.zeros_like(A)
        signal[0, c, i, j] = A[0, c, i, j].detach()
        (g,) = torch.autograd.grad(A, x, grad_outputs=signal, retain_graph=k < len(order) - 1)
        top, left, bottom, right = boxes[(i, j)]
        projections.append(ChannelProjection(
            channel=c, value=float(peak[c]), position=(i, j), box=boxes[(i, j)],
            reconstruction=g[0].float().cpu().numpy(), patch=view.crop((left, top, right, bottom)),
        ))
    return projections


def project_units(bundle, x: torch.Tensor, layer: str | None, channels: Sequence[int],
                  positions: Sequence[tuple[int, int]]) -> np.ndarray:
    """For each sample i of the batch ``x``, the activation of channel ``channels[i]`` at
    ``positions[i]`` alone (every other activation of the layer set to zero) projected to pixel
    space with the Deconvnet rule: N×3×H×W. One forward and one backward for the whole batch: the
    samples do not interact (norm statistics are held constant), so each equals its own projection."""
    n = x.shape[0]
    if len(channels) != n or len(positions) != n:
        raise InputError(f"one channel and one position per sample: {n} samples, {len(channels)} channels, "
                         f"{len(positions)} positions")
    x, A, _ = _deconv_forward(bundle, layer, x)
    rows = torch.arange(n, device=A.device)
    c = torch.as_tensor(list(channels), device=A.device)
    ij = torch.as_tensor([tuple(p) for p in positions], device=A.device).view(n, 2)
    signal = torch.zeros_like(A)
    signal[rows, c, ij[:, 0], ij[:, 1]] = A.detach()[rows, c, ij[:, 0], ij[:, 1]]
    (g,) = torch.autograd.grad(A, x, grad_outputs=signal)
    return g.float().cpu().numpy()


def project_layer(
    bundle, image, layer: str | None = None, channels: Sequence[int] | None = None
) -> np.ndarray:
    """The whole activation of ``layer`` (or only ``channels``) projected to pixel space with the
    Deconvnet rule: a signed 3×H×W array."""
    _, x = _single_input(bundle, image)
    x, A, _ = _deconv_forward(bundle, layer, x)
    signal = A.detach()
    if channels is not None:
        keep = torch.zeros(A.shape[1], dtype=torch.bool, device=A.device)
        try:
            keep[list(channels)] = True
        except IndexError:
            raise LayerError(f"channels out of range: the layer has {A.shape[1]}") from None
        signal = signal * keep.view(1, -1, 1, 1)
    (g,) = torch.autograd.grad(A, x, grad_outputs=signal)
    return g[0].float().cpu().numpy()


def receptive_fields(bundle, layer: str, positions: Sequence[tuple[int, int]], x: torch.Tensor) -> dict:
    """{(row, col): box} for units of ``layer`` at ``positions``, for an input shaped like ``x``.

    The box bounds the support of ∂(Σ_c A_c[row, col])/∂x through the linearised network (ReLUs
    pass their signal, max-pools average their window), clipped to the image."""
    unique = list(dict.fromkeys((int(i), int(j)) for i, j in positions))
    if not unique:
        return {}
    x, A, _ = _deconv_forward(bundle, layer, x, rule="identity", linearize=True)
    boxes = {}
    for k, (i, j) in enumerate(unique):
        signal = torch.zeros_like(A)
        signal[0, :, i, j] = 1.0
        (g,) = torch.autograd.grad(A, x, grad_outputs=signal, retain_graph=k < len(unique) - 1)
        boxes[(i, j)] = _support_box(g[0].abs().sum(dim=0))
    return boxes


def receptive_field(bundle, layer: str, position: tuple[int, int], image=None) -> Box:
    """The receptive field (top, left, bottom, right) of the unit at ``position`` of ``layer``, for
    ``image`` (default: a blank input of the bundle's size)."""
    if image is None:
        size = bundle.input_size
        x = torch.zeros(1, 3, size, size, device=bundle.device)
    else:
        _, x = _single_input(bundle, image)
    return receptive_fields(bundle, layer, [position], x)[tuple(position)]


def _support_box(mag: torch.Tensor) -> Box:
    rows = torch.nonzero(mag.amax(dim=1) > 0).flatten()
    cols = torch.nonzero(mag.amax(dim=0) > 0).flatten()
    if rows.numel() == 0:
        return 0, 0, mag.shape[0], mag.shape[1]
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


# --------------------------------------------------------------------------------------------------
# Filters


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The first ``nn.Conv2d`` (in definition order) that reads the 3 input channels."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3 and module.groups == 1:
            return name, module
    raise LayerError("the model has no Conv2d reading 3 input channels")


def first_layer_filters(bundle, normalize: str = "each") -> np.ndarray:
    """The first convolution's filters as RGB images: K×kh×kw×3 in [0, 1].

    ``normalize``: "each" (min-max per filter, as in Zeiler & Fergus's figures) or "all" (one
    symmetric scale for all filters: 0.5 = zero weight, so filters can be compared)."""
    _, conv = first_conv(bundle.model)
    w = conv.weight.detach().float().cpu().numpy().transpose(0, 2, 3, 1)  # K×kh×kw×3
    if normalize == "all":
        scale = np.abs(w).max()
        return (0.5 + 0.5 * w / scale if scale > 0 else np.full_like(w, 0.5)).astype(np.float32)
    if normalize != "each":
        raise InputError(f"normalize must be 'each' or 'all', not {normalize!r}")
    return _normalize_tiles(w, "each")


def filters_grid(bundle, *, normalize: str = "each", scale: int = 8, pad: int = 2) -> Image.Image:
    """The first-layer filters tiled into one image, each enlarged ``scale`` times."""
    return tile_maps(first_layer_filters(bundle, normalize), normalize="none", scale=scale, pad=pad)
