"""Faithfulness: does removing what the map calls important change the model's score?

* Confidence (Chattopadhay et al. 2018): :func:`average_drop`, :func:`increase_in_confidence` from the
  class confidence on the image (Y) and on ``map ⊙ image`` (O, :func:`masked_confidence`).
* Deletion / insertion (Petsiuk et al. 2018): :func:`deletion_insertion` gives both curves for a
  batch of images from batched substrates; :func:`auc` the trapezoid area.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .base import (
    Metric,
    _as_tensor,
    _at_input_size,
    _check,
    _device,
    _module,
    _scores,
    as_maps,
    forward_scores,
    score_function,
    target_probabilities,
)
from .similarity import _gaussian_window


def average_drop(y, o) -> float:
    """Average Drop % = 100 · mean_i max(0, Y_i − O_i) / Y_i.

    ``y``: the softmax confidence of the explained class on each image, ``o``: on ``map ⊙ image``.
    Lower is better: the map kept what the model needed.
    """
    y, o = _as_tensor(y).flatten(), _as_tensor(o).flatten()
    if y.numel() == 0:
        return float("nan")
    return float(100.0 * ((y - o).clamp_min(0) / y.clamp_min(1e-12)).mean())


def increase_in_confidence(y, o) -> float:
    """% Increase in Confidence = 100 · share of images with O_i > Y_i. Higher is better."""
    y, o = _as_tensor(y).flatten(), _as_tensor(o).flatten()
    if y.numel() == 0:
        return float("nan")
    return float(100.0 * (o > y).double().mean())


# --------------------------------------------------------------------------------------------------
# Curves


def auc(values, fractions=None) -> float:
    """Trapezoid area under ``values`` sampled at ``fractions`` of [0, 1] (default: evenly spaced)."""
    y = _as_tensor(values).flatten()
    if y.numel() < 2:
        raise ValueError("a curve needs at least two points")
    if fractions is None:
        x = torch.linspace(0.0, 1.0, y.numel(), dtype=torch.float64)
    else:
        x = _as_tensor(fractions).flatten()
    return float(torch.trapezoid(y, x))


def masked_confidence(model, inputs: torch.Tensor, maps, targets, *, batch_size: int = 128,
                      cancel=None) -> torch.Tensor:
    """O_i: the class confidence on ``map ⊙ image``, the explanation map (in [0, 1], upsampled
    bilinearly if needed) multiplying the input in the model's normalised space, where 0 is the
    dataset mean colour (the same convention as the deletion substrate)."""
    m = _at_input_size(maps, (inputs.shape[-2], inputs.shape[-1]), inputs.device)
    return target_probabilities(model, inputs * m.unsqueeze(1), targets, batch_size=batch_size, cancel=cancel)


def gaussian_blur(inputs: torch.Tensor, kernel: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Per-channel Gaussian blur (``kernel``×``kernel``, σ = ``sigma``) with reflected borders: the
    insertion substrate of RISE (Petsiuk et al. 2018 use kernel 11, σ 5)."""
    g = _gaussian_window(kernel, sigma, torch.float32).to(inputs.device)
    c = inputs.shape[1]
    pad = kernel // 2
    x = F.pad(inputs.float(), (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, kernel).expand(c, 1, 1, kernel), groups=c)
    return F.conv2d(x, g.view(1, 1, kernel, 1).expand(c, 1, kernel, 1), groups=c)


@dataclass
class Curves:
    """Deletion and insertion curves of N images: the class probability after removing (deletion)
    or inserting (insertion) the ``fractions`` of pixels with the highest saliency."""

    fractions: np.ndarray  # (K+1,) in [0, 1]
    deletion: np.ndarray  # N×(K+1)
    insertion: np.ndarray  # N×(K+1)

    @property
    def deletion_auc(self) -> np.ndarray:
        return np.array([auc(c, self.fractions) for c in self.deletion])

    @property
    def insertion_auc(self) -> np.ndarray:
        return np.array([auc(c, self.fractions) for c in self.insertion])


def saliency_ranks(maps: torch.Tensor) -> torch.Tensor:
    """N×(H·W) rank of every pixel, 0 for the most salient (ties kept in raster order)."""
    flat = maps.flatten(1)
    order = torch.argsort(-flat, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


def deletion_insertion(model, inputs: torch.Tensor, maps, targets, *, steps: int = 32,
                       blur: tuple[int, float] = (11, 5.0), batch_size: int = 128, progress=None,
                       cancel=None) -> Curves:
    """RISE deletion and insertion curves (Petsiuk et al. 2018) for N images at once.

    Pixels are ordered by the map (upsampled bilinearly to the input if needed), most salient first.
    At step k = 0..K (K = ``steps``), the first n_k = round(k·P/K) pixels of the P are replaced by
    the deletion substrate (zeros in the normalised input space: the mean colour) or, for
    insertion, revealed on the substrate (the image blurred with ``blur`` = (kernel, σ)). The curve
    is the softmax probability of the class; the area under it (trapezoid over the fraction of
    pixels, :attr:`Curves.deletion_auc`) is lower for a better deletion and higher for a better
    insertion. All 2K + 1 perturbed inputs of an image (deletion at k = 0 and insertion at k = K are
    the image itself) are batched.
    """
    forward = _scores(model)
    device = _device(_module(model))
    inputs = inputs.to(device, torch.float32)
    n, _, h, w = inputs.shape
    pixels = h * w
    m = _at_input_size(maps, (h, w), device)
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long).view(-1)
    counts = torch.round(torch.arange(steps + 1, dtype=torch.float64) * pixels / steps).long().to(device)
    substrate = gaussian_blur(inputs, *blur)
    deletion = np.empty((n, steps + 1), np.float32)
    insertion = np.empty((n, steps + 1), np.float32)
    per_image = 2 * steps + 1
    chunk = max(1, batch_size // per_image)
    with torch.no_grad():
        for lo in range(0, n, chunk):
            _check(cancel)
            hi = min(n, lo + chunk)
            x = inputs[lo:hi].unsqueeze(1)  # c×1×3×H×W
            ranks = saliency_ranks(m[lo:hi]).view(hi - lo, 1, 1, h, w)
            sel = ranks < counts.view(1, -1, 1, 1, 1)  # c×(K+1)×1×H×W: the first n_k pixels
            removed = torch.where(sel, torch.zeros((), device=device), x)  # c×(K+1)×3×H×W
            inserted = torch.where(sel[:, :-1], x, substrate[lo:hi].unsqueeze(1))  # c×K×3×H×W
            batch = torch.cat([removed, inserted], dim=1).flatten(0, 1)
            probs = []
            for start in range(0, batch.shape[0], batch_size):
                logits = forward(batch[start:start + batch_size]).float()
                probs.append(F.softmax(logits, dim=1))
            p = torch.cat(probs).view(hi - lo, per_image, -1)
            t = targets[lo:hi].to(device).view(-1, 1, 1).expand(-1, per_image, 1)
            scores = p.gather(2, t).squeeze(2).cpu().numpy()
            deletion[lo:hi] = scores[:, :steps + 1]
            insertion[lo:hi, :steps] = scores[:, steps + 1:]
            insertion[lo:hi, steps] = scores[:, 0]
            if progress is not None:
                progress(hi, n)
    return Curves((counts.double() / pixels).cpu().numpy(), deletion, insertion)



# --------------------------------------------------------------------------------------------------
# Removing features in the map's order: the shared engine of ROAD, Pixel-Flipping, Region Perturbation


def _baseline(inputs: torch.Tensor, baseline) -> torch.Tensor:
    """N×C×1×1 (or broadcastable) replacement values: a number, ``"black"`` (each image's minimum,
    Quantus's default), ``"mean"`` (each image's mean per channel) or ``"white"`` (its maximum)."""
    if isinstance(baseline, int | float):
        return torch.full((inputs.shape[0], 1, 1, 1), float(baseline), dtype=inputs.dtype,
                          device=inputs.device)
    flat = inputs.flatten(1)
    if baseline == "black":
        return flat.amin(1).view(-1, 1, 1, 1)
    if baseline == "white":
        return flat.amax(1).view(-1, 1, 1, 1)
    if baseline == "mean":
        return inputs.mean(dim=(2, 3), keepdim=True)
    raise ValueError(f"baseline must be a number, 'black', 'white' or 'mean', not {baseline!r}")


def order_ranks(maps: torch.Tensor, order: str = "morf") -> torch.Tensor:
    """N×P rank of every feature, 0 removed first: most relevant first (``"morf"``) or least (``"lerf"``);
    ties in raster order."""
    flat = maps.flatten(1)
    key = -flat if order == "morf" else flat
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' or 'lerf', not {order!r}")
    idx = torch.argsort(key, dim=1, stable=True)
    ranks = torch.empty_like(idx)
    ranks.scatter_(1, idx, torch.arange(flat.shape[1]).expand_as(idx))
    return ranks


def _removal_curves(model, inputs, score_fn, unit_ranks, unit_of_pixel, counts, baseline, *, batch_size,
                    cancel=None, progress=None, fill=None) -> torch.Tensor:
    """N×K scores after removing, for each k, the units with rank < ``counts[k]`` (pixels of a unit:
    ``unit_of_pixel``, H×W unit ids), replaced by ``baseline`` (or ``fill(x, removed)``)."""
    device = _device(_module(model))
    x = inputs.to(device, torch.float32)
    n, _, h, w = x.shape
    k = len(counts)
    unit_index = unit_of_pixel.to(device).flatten().expand(n, -1)
    pixel_rank = unit_ranks.to(device).gather(1, unit_index).view(n, 1, h, w)
    base = _baseline(x, baseline)
    counts_t = torch.as_tensor(counts, device=device).view(1, -1, 1, 1, 1)
    per_chunk = max(1, batch_size // max(1, n))  # steps per chunk, all images at once
    out = torch.empty(n, k, dtype=torch.float64)
    rows = torch.arange(n).repeat(per_chunk)
    for lo in range(0, k, per_chunk):
        _check(cancel)
        hi = min(k, lo + per_chunk)
        removed = pixel_rank.unsqueeze(1) < counts_t[:, lo:hi]  # N×s×1×H×W
        if fill is None:
            batch = torch.where(removed, base.unsqueeze(1), x.unsqueeze(1))
        else:
            batch = fill(x, removed)
        batch = batch.transpose(0, 1).flatten(0, 1)  # step-major: s·N inputs
        scores = forward_scores(model, batch, rows[:batch.shape[0]], score_fn, batch_size=batch_size,
                                cancel=cancel)
        out[:, lo:hi] = scores.view(hi - lo, n).T
        if progress is not None:
            progress(hi, k)
    return out


# --------------------------------------------------------------------------------------------------
# ROAD: noisy linear imputation


_NEIGHBOURS = ((-1, -1, 1 / 12), (-1, 0, 1 / 6), (-1, 1, 1 / 12), (0, -1, 1 / 6), (0, 1, 1 / 6),
               (1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12))


def _neighbour_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ_j w_j t_j over the 8 neighbours (zero outside the image). The weights (direct 1/6, diagonal
    1/12) are ([1, 2, 1] ⊗ [1, 2, 1] − 4δ) / 12: two separable passes of shifted adds, faster on the
    CPU than a depthwise 3×3 convolution."""
    p = F.pad(t, (1, 1, 1, 1))
    v = p[..., :-2, :] + 2 * p[..., 1:-1, :] + p[..., 2:, :]
    return (v[..., :-2] + 2 * v[..., 1:-1] + v[..., 2:] - 4 * t) / 12


def _conjugate_gradients(known: torch.Tensor, r_mask: torch.Tensor, u: torch.Tensor, tol: float,
                         max_iter: int) -> torch.Tensor:
    """Solve d_i u_i − Σ_{j∈R} w_ij u_j = Σ_{j∉R} w_ij x_j on the removed pixels R of every image and
    channel at once, from the guess ``u`` (zero outside R).

    The system is scaled by 12: its product is ((12 d + 4) v − S v) on R, S the separable
    [1, 2, 1] ⊗ [1, 2, 1] sum, and its right side S x on R (x zero on R). The search direction lives in
    a zero-padded buffer, so S reads shifted views without padding a copy each step, and the updates
    are in place: about half the memory passes of the plain form, the same iterates."""
    h, w = known.shape[-2:]
    ones = torch.ones((1, 1, h, w), dtype=known.dtype, device=known.device)
    diag = 12 * _neighbour_sum(ones) + 4
    buf = known.new_zeros((*known.shape[:-2], h + 2, w + 2))
    p = buf[..., 1:-1, 1:-1]

    def s_of_p() -> torch.Tensor:
        v = torch.add(buf[..., :-2, :], buf[..., 2:, :]).add_(buf[..., 1:-1, :], alpha=2)
        return torch.add(v[..., :-2], v[..., 2:]).add_(v[..., 1:-1], alpha=2)

    def apply_p() -> torch.Tensor:  # 12 A p on R
        return s_of_p().mul_(r_mask).addcmul_(diag, p, value=-1).neg_()

    p.copy_(known)
    b = s_of_p().mul_(r_mask)
    limit = (tol ** 2) * (b * b).sum(dim=(2, 3), keepdim=True).clamp_min(1e-30)
    p.copy_(u)
    r = b.sub_(apply_p())
    p.copy_(r)
    rr = (r * r).sum(dim=(2, 3), keepdim=True)
    for _ in range(max_iter):
        if bool((rr <= limit).all()):
            break
        ap = apply_p()
        alpha = rr / (p * ap).sum(dim=(2, 3), keepdim=True).clamp_min(1e-30)
        u = u.addcmul_(alpha, p)
        r = r.addcmul_(alpha, ap, value=-1)
        rr_new = (r * r).sum(dim=(2, 3), keepdim=True)
        p.mul_(rr_new / rr.clamp_min(1e-30)).add_(r)
        rr = rr_new
    return u


def _cascade(known: torch.Tensor, keep: torch.Tensor, tol: float, max_iter: int) -> torch.Tensor:
    """The imputed values (zero where kept): the problem is first solved on a grid twice as coarse
    (blocks with a kept pixel hold their kept mean), which gives the conjugate gradients a start
    whose long-range part is already right (cascadic multigrid), then refined here."""
    h, w = known.shape[-2:]
    r_mask = 1 - keep
    if min(h, w) >= 8 and not bool(keep.all()):
        num = F.avg_pool2d(known, 2, ceil_mode=True)
        den = F.avg_pool2d(keep.expand_as(known), 2, ceil_mode=True)
        coarse_keep = (den > 0).to(known.dtype)
        coarse_known = num / den.clamp_min(1e-12) * coarse_keep
        coarse = _cascade(coarse_known, coarse_keep[:, :1], tol, max_iter * 2) + coarse_known
        guess = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * r_mask
    else:
        guess = torch.zeros_like(known)
    return _conjugate_gradients(known, r_mask, guess, tol, max_iter)


def noisy_linear_imputation(inputs: torch.Tensor, removed: torch.Tensor, *, noise: float = 0.01,
                            generator: torch.Generator | None = None, tol: float = 1e-3,
                            max_iter: int = 20) -> torch.Tensor:
    """ROAD's imputation (Rong et al. 2022, §4): every removed pixel takes the weighted mean of its
    valid 8 neighbours (direct 1/6, diagonal 1/12), removed neighbours included, plus N(0, noise²).

    For each channel the removed values u solve one sparse linear system, d_i u_i − Σ_{j∈R} w_ij u_j
    = Σ_{j∉R} w_ij x_j (d_i = Σ_j w_ij over the valid neighbours): symmetric, positive definite when
    a pixel is kept. Instead of a sparse factorisation per image and channel (Quantus: scipy
    ``spsolve``), all N×C systems are solved at once by conjugate gradients whose matrix product is
    eight shifted adds, started from the solution on a twice coarser grid (recursively); each level
    stops at relative residual ``tol`` or ``max_iter`` steps (coarser levels: twice as many). The
    defaults leave a root-mean-square error of about 0.013 against the exact solve (12 shapes images),
    of the order of the imputation's own noise (0.01);
    ``tol=1e-12, max_iter=10_000`` gives the exact solution (the tests compare it with Quantus's).
    ``inputs``: N×C×H×W; ``removed``: N×H×W (or N×1×H×W) bools. Returns the imputed inputs.
    """
    x = inputs
    r_mask = removed.view(x.shape[0], 1, *x.shape[-2:]).to(x.dtype)
    keep = 1 - r_mask
    known = x * keep
    u = _cascade(known, keep, tol, max_iter) * r_mask
    if noise:
        draw = torch.randn(u.shape, generator=generator, dtype=u.dtype, device="cpu").to(u.device)
        u = u + noise * draw * r_mask
    return known + u


def _percent_counts(pixels: int, percentages) -> list[int]:
    return [int(pixels * p / 100) for p in percentages]  # as Quantus (int(a_size · p / 100))


@dataclass(kw_only=True)
class ROAD(Metric):
    """ROAD, RemOve And Debias (Rong et al., ICML 2022): remove the top (``order="morf"``) or bottom
    (``"lerf"``) p % of the pixels by the map, fill them by :func:`noisy_linear_imputation` (which hides
    the shape of the removed region from the model, unlike a constant), and score the model without
    retraining. Per image: the curve s(p) for p in ``percentages`` (the paper's 10 … 90 %) and its mean
    ``(1/|P|) Σ_p s(p)``: lower is better for MoRF, higher for LeRF. ``noise``: the imputation's σ
    (0.01, as the paper and Quantus). With ``score_fn = (argmax == label)`` the curve is Quantus's
    accuracy curve (Quantus ``ROAD`` is MoRF only and takes the map per pixel).
    """

    name: ClassVar[str] = "road"
    group: ClassVar[str] = "faithfulness"
    percentages: tuple = (10, 20, 30, 40, 50, 60, 70, 80, 90)
    order: str = "morf"
    noise: float = 0.01
    solver_tol: float = 1e-3  # the imputation's conjugate gradients (see noisy_linear_imputation)
    solver_iter: int = 20

    @property
    def higher_is_better(self) -> bool:  # type: ignore[override]
        return self.order == "lerf"

    def curves(self, model, inputs, targets, maps, *, progress=None, cancel=None) -> torch.Tensor:
        n, _, h, w = inputs.shape
        m = as_maps(maps, n)
        score_fn = score_function(targets, model=model, inputs=inputs)
        generator = torch.Generator().manual_seed(self.seed)

        def fill(x, removed):  # x: N×C×H×W, removed: N×s×1×H×W
            steps = removed.shape[1]
            flat = removed.transpose(0, 1).flatten(0, 1)
            xs = x.unsqueeze(0).expand(steps, *x.shape).flatten(0, 1)
            return noisy_linear_imputation(xs, flat, noise=self.noise, generator=generator,
                                            tol=self.solver_tol, max_iter=self.solver_iter) \
                .view(steps, *x.shape).transpose(0, 1)

        ranks = order_ranks(_at_input_size(m, (h, w), "cpu"), self.order)
        units = torch.arange(h * w).view(h, w)
        counts = _percent_counts(h * w, self.percentages)
        return _removal_curves(model, inputs, score_fn, ranks, units, counts, 0.0,
                               batch_size=self.batch_size, cancel=cancel, progress=progress, fill=fill)

    def __call__(self, model, inputs, targets, maps, *, masks=None, explain=None, progress=None,
                 cancel=None) -> np.ndarray:
        return self.curves(model, inputs, targets, maps, progress=progress, cancel=cancel).mean(dim=1).numpy()


# --------------------------------------------------------------------------------------------------
# Faithfulness Correlation, Pixel-Flipping, Region Perturbation


def _pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    den = (a.pow(2).sum(1) * b.pow(2).sum(1)).sqrt()
    return torch.where(den > 0, (a * b).sum(1) / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


@dataclass(kw_only=True)
class FaithfulnessCorrelation(Metric):
    """Faithfulness Correlation (Bhatt, Weller & Moura, IJCAI 2020): over ``nr_runs`` random subsets S
    of ``subset_size`` pixels, the Pearson correlation between Σ_{i∈S} a_i and f(x) − f(x_{S←b})
    (b = ``baseline``). 1: the map's mass predicts exactly what removing pixels costs. A pixel is all
    of its channels (Quantus draws input values, so a one-channel map over a colour image differs;
    on a one-channel input the two agree draw for draw: the subsets come from
    ``numpy.random.RandomState(seed).choice`` in Quantus's order).
    """

    name: ClassVar[str] = "faithfulness_correlation"
    group: ClassVar[str] = "faithfulness"
    nr_runs: int = 100
    subset_size: int = 224
    baseline: float | str = "black"

    def __call__(self, model, inputs, targets, maps, *, masks=None, explain=None, progress=None,
                 cancel=None) -> np.ndarray:
        n, _, h, w = inputs.shape
        m = _at_input_size(as_maps(maps, n), (h, w), "cpu").double().flatten(1)
        pixels = h * w
        size = min(self.subset_size, pixels)
        rng = np.random.RandomState(self.seed)
        subsets = np.stack([np.stack([rng.choice(pixels, size, replace=False) for _ in range(n)])
                            for _ in range(self.nr_runs)], axis=1)  # N×T×|S|
        subsets_t = torch.from_numpy(subsets)
        sums = m.gather(1, subsets_t.flatten(1)).view(n, self.nr_runs, size).sum(2)
        score_fn = score_function(targets, model=model, inputs=inputs)
        device = _device(_module(model))
        x = inputs.to(device, torch.float32)
        base = _baseline(x, self.baseline)
        full = forward_scores(model, x, torch.arange(n), score_fn, batch_size=self.batch_size, cancel=cancel)
        drops = torch.empty(n, self.nr_runs, dtype=torch.float64)
        runs_per_chunk = max(1, self.batch_size // n)
        for lo in range(0, self.nr_runs, runs_per_chunk):
            hi = min(self.nr_runs, lo + runs_per_chunk)
            removed = torch.zeros(n, hi - lo, pixels, dtype=torch.bool)
            removed.scatter_(2, subsets_t[:, lo:hi], True)
            removed = removed.view(n, hi - lo, 1, h, w).to(device)
            batch = torch.where(removed, base.unsqueeze(1), x.unsqueeze(1)).flatten(0, 1)
            rows = torch.arange(n).repeat_interleave(hi - lo)
            scores = forward_scores(model, batch, rows, score_fn, batch_size=self.batch_size, cancel=cancel)
            drops[:, lo:hi] = full.view(n, 1) - scores.view(n, hi - lo)
            if progress is not None:
                progress(hi, self.nr_runs)
        return _pearson_rows(sums, drops).numpy()


def _patch_units(h: int, w: int, patch: int) -> torch.Tensor:
    """H×W id of the ``patch``×``patch`` cell of each pixel (a non-overlapping grid from the top left;
    cells at the right and bottom edges may be smaller)."""
    cols = -(-w // patch)
    return (torch.arange(h).view(h, 1) // patch) * cols + torch.arange(w).view(1, w) // patch


@dataclass(kw_only=True)
class PixelFlipping(Metric):
    """Pixel-Flipping (Bach et al. 2015): replace the pixels by ``baseline`` in the map's order, most
    relevant first, ``features_in_step`` at a time, and follow the score: the curve
    s_k = f(x with the first k·step pixels replaced), k = 1 … ⌈P/step⌉ (Quantus's curve), and its area
    by the trapezoid rule over the fraction removed, (1/(K−1)) Σ_k (s_k + s_{k+1})/2. Lower is better.
    """

    name: ClassVar[str] = "pixel_flipping"
    group: ClassVar[str] = "faithfulness"
    higher_is_better: ClassVar[bool] = False
    fast: ClassVar[bool] = False
    features_in_step: int = 1
    baseline: float | str = "black"

    def curves(self, model, inputs, targets, maps, *, progress=None, cancel=None) -> torch.Tensor:
        n, _, h, w = inputs.shape
        m = _at_input_size(as_maps(maps, n), (h, w), "cpu")
        step = self.features_in_step
        counts = [min(h * w, (k + 1) * step) for k in range(-(-h * w // step))]
        score_fn = score_function(targets, model=model, inputs=inputs)
        return _removal_curves(model, inputs, score_fn, order_ranks(m, "morf"),
                               torch.arange(h * w).view(h, w), counts, self.baseline,
                               batch_size=self.batch_size, cancel=cancel, progress=progress)

    def __call__(self, model, inputs, targets, maps, *, masks=None, explain=None, progress=None,
                 cancel=None) -> np.ndarray:
        c = self.curves(model, inputs, targets, maps, progress=progress, cancel=cancel)
        if c.shape[1] < 2:
            return c[:, 0].numpy()
        return (torch.trapezoid(c, dim=1) / (c.shape[1] - 1)).numpy()


@dataclass(kw_only=True)
class RegionPerturbation(Metric):
    """Region Perturbation (Samek et al. 2016): the map summed over a grid of ``patch_size`` patches;
    the patches replaced by ``baseline`` cumulatively in that order (``"morf"`` / ``"lerf"``) for
    ``regions_evaluation`` steps; the curve f(x) − f(x_k) and its mean, the AOPC
    (1/K) Σ_k [f(x) − f(x_k)]: higher is better for MoRF (the score falls fast), lower for LeRF.
    """

    name: ClassVar[str] = "region_perturbation"
    group: ClassVar[str] = "faithfulness"
    patch_size: int = 8
    regions_evaluation: int = 100
    order: str = "morf"
    baseline: float | str = "black"

    @property
    def higher_is_better(self) -> bool:  # type: ignore[override]
        return self.order == "morf"

    def curves(self, model, inputs, targets, maps, *, progress=None, cancel=None) -> torch.Tensor:
        n, _, h, w = inputs.shape
        m = _at_input_size(as_maps(maps, n), (h, w), "cpu").double()
        units = _patch_units(h, w, self.patch_size)
        count = int(units.max()) + 1
        sums = torch.zeros(n, count, dtype=torch.float64).index_add_(1, units.flatten(), m.flatten(1))
        ranks = order_ranks(sums, self.order)
        steps = list(range(1, min(count, self.regions_evaluation) + 1))
        score_fn = score_function(targets, model=model, inputs=inputs)
        full = forward_scores(model, inputs, torch.arange(n), score_fn, batch_size=self.batch_size,
                              cancel=cancel)
        after = _removal_curves(model, inputs, score_fn, ranks, units, steps, self.baseline,
                                batch_size=self.batch_size, cancel=cancel, progress=progress)
        return full.view(n, 1) - after

    def __call__(self, model, inputs, targets, maps, *, masks=None, explain=None, progress=None,
                 cancel=None) -> np.ndarray:
        return self.curves(model, inputs, targets, maps, progress=progress, cancel=cancel).mean(dim=1).numpy()
