"""Similarity of two maps: :func:`spearman` (rank correlation) and :func:`ssim` (structural
similarity), as in the Adebayo et al. (2018) sanity checks."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .base import _as_tensor


def rankdata(values) -> torch.Tensor:
    """Ranks 1..n of a flattened array, ties given the mean of the ranks they span ("average")."""
    x = _as_tensor(values).flatten()
    n = x.numel()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    # start of each run of equal values, then the mean rank of the run
    new_run = torch.ones(n, dtype=torch.bool)
    new_run[1:] = sorted_x[1:] != sorted_x[:-1]
    run_id = torch.cumsum(new_run, 0) - 1
    starts = torch.nonzero(new_run).flatten()
    ends = torch.cat([starts[1:], torch.tensor([n])])
    mean_rank = (starts + ends + 1).double() / 2.0  # mean of start+1 .. end (1-based)
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def spearman(a, b, *, absolute: bool = False) -> float:
    """Spearman rank correlation ρ of two maps (any shape, same number of elements).

    ρ = Pearson correlation of the ranks (ties: average ranks). ``absolute=True`` ranks |a| and |b|
    (the "with absolute value" variant of Adebayo et al. 2018). NaN when either map is constant.
    """
    x, y = _as_tensor(a).flatten(), _as_tensor(b).flatten()
    if x.numel() != y.numel():
        raise ValueError(f"maps differ in size: {x.numel()} vs {y.numel()} values")
    if absolute:
        x, y = x.abs(), y.abs()
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    return float((rx * ry).sum()) / denom if denom > 0 else float("nan")


def _gaussian_window(size: int, sigma: float, dtype=torch.float64) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a, b, *, data_range: float | None = None, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean structural similarity (Wang et al. 2004) of two H×W maps.

    SSIM(x, y) = (2μxμy + C1)(2σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)), with local
    statistics under a ``window``-wide Gaussian (σ = ``sigma``, windows wholly inside the image:
    "valid" mode), C1 = (k1·L)², C2 = (k2·L)², L = ``data_range`` (default: the joint range of the
    two maps, 1 when both are constant), averaged over positions. Maps smaller than the window use
    a window as large as the smaller side (made odd).
    """
    x, y = _as_tensor(a), _as_tensor(b)
    if x.shape != y.shape or x.dim() != 2:
        raise ValueError(f"ssim needs two H×W maps of one shape, not {tuple(x.shape)} and {tuple(y.shape)}")
    if data_range is None:
        lo, hi = min(float(x.min()), float(y.min())), max(float(x.max()), float(y.max()))
        data_range = hi - lo if hi > lo else 1.0
    size = min(window, *x.shape)
    size -= 1 - size % 2  # odd
    g = _gaussian_window(size, sigma)
    kernel = (g[:, None] * g[None, :]).view(1, 1, size, size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t.view(1, 1, *t.shape), kernel)[0, 0]

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    num = (2 * mx * my + c1) * (2 * cxy + c2)
    den = (mx * mx + my * my + c1) * (vx + vy + c2)
    return float((num / den).mean())




def rank_rows(values: torch.Tensor) -> torch.Tensor:
    """Average ranks 1..P of each row of an N×P tensor (ties: the mean of the ranks they span), all
    rows at once: one sort, one scatter."""
    x = values.double()
    n, p = x.shape
    order = torch.argsort(x, dim=1, stable=True)
    sorted_x = x.gather(1, order)
    new_run = torch.ones_like(sorted_x, dtype=torch.bool)
    new_run[:, 1:] = sorted_x[:, 1:] != sorted_x[:, :-1]
    flat = new_run.flatten()  # a row's first value starts a run: runs never span two rows
    run = torch.cumsum(flat, 0) - 1
    starts = torch.nonzero(flat).flatten()
    ends = torch.cat([starts[1:], torch.tensor([n * p])])
    mean = (starts + ends + 1).double() / 2 - (starts // p * p).double()  # mean 1-based rank in its row
    ranks = torch.empty_like(x)
    ranks.scatter_(1, order, mean[run].view(n, p))
    return ranks


def spearman_rows(a: torch.Tensor, b: torch.Tensor, *, absolute: bool = False) -> np.ndarray:
    """:func:`spearman` of each pair of rows of two N×… tensors, batched (NaN for a constant row)."""
    x, y = _as_tensor(a).flatten(1), _as_tensor(b).flatten(1)
    if absolute:
        x, y = x.abs(), y.abs()
    rx, ry = rank_rows(x), rank_rows(y)
    rx, ry = rx - rx.mean(1, keepdim=True), ry - ry.mean(1, keepdim=True)
    den = (rx.pow(2).sum(1) * ry.pow(2).sum(1)).sqrt()
    nan = torch.full_like(den, math.nan)
    return torch.where(den > 0, (rx * ry).sum(1) / den.clamp_min(1e-300), nan).numpy()
