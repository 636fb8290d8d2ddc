"""Robustness: does the map stay put when the input barely changes?

Max- and Avg-Sensitivity (Yeh et al., NeurIPS 2019, "On the (in)fidelity and sensitivity of
explanations"), as Quantus implements them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .base import Metric, _check, _device, _module, _scores, as_maps, class_indices


def normalise_by_max(maps: torch.Tensor) -> torch.Tensor:
    """a / max|a| per map (Quantus's ``normalise_by_max``); a zero map stays zero."""
    peak = maps.abs().flatten(1).amax(1).view(-1, *([1] * (maps.dim() - 1)))
    return maps / torch.where(peak > 0, peak, torch.ones_like(peak))


@dataclass(kw_only=True)
class MaxSensitivity(Metric):
    """Max-Sensitivity (Yeh et al. 2019): over ``nr_samples`` perturbations δ ~ U[−r, r] of every
    input value (r = ``lower_bound``), max_δ ‖Φ(x+δ) − Φ(x)‖ / ‖Φ(x)‖ (Frobenius norms; the maps
    divided by their max |a| first when ``normalise``). Quantus 0.6's defaults: no normalisation,
    r = 0.2, 200 samples. With ``skip_changed`` a sample that changes the predicted class is left
    out (NaN). Lower is better. :class:`AvgSensitivity` takes the mean instead of the max. Needs
    ``explain``.
    """

    name: ClassVar[str] = "max_sensitivity"
    group: ClassVar[str] = "robustness"
    higher_is_better: ClassVar[bool] = False
    needs_explain: ClassVar[bool] = True
    fast: ClassVar[bool] = False
    nr_samples: int = 200
    lower_bound: float = 0.2
    normalise: bool = False
    skip_changed: bool = False

    def _reduce(self, values: np.ndarray) -> np.ndarray:
        return np.nanmax(values, axis=1)

    def ratios(self, model, inputs, targets, maps, *, explain, progress=None, cancel=None) -> np.ndarray:
        """N×nr_samples ratios ‖Φ(x+δ) − Φ(x)‖ / ‖Φ(x)‖ (NaN where the prediction changed)."""
        self._require(explain=explain)
        n = inputs.shape[0]
        device = _device(_module(model))
        x = inputs.to(device, torch.float32)
        a = as_maps(maps, n)
        if self.normalise:
            a = normalise_by_max(a)
        classes = class_indices(targets, model, x)
        generator = torch.Generator().manual_seed(self.seed)
        forward = _scores(model)
        with torch.no_grad():
            predicted = forward(x).argmax(1).cpu()
        out = np.full((n, self.nr_samples), np.nan)
        per_chunk = max(1, self.batch_size // n)
        for lo in range(0, self.nr_samples, per_chunk):
            _check(cancel)
            hi = min(self.nr_samples, lo + per_chunk)
            delta = (torch.rand((hi - lo, *x.shape), generator=generator) * 2 - 1) * self.lower_bound
            noisy = (x.unsqueeze(0) + delta.to(device)).flatten(0, 1)
            b = as_maps(explain(model, noisy, classes.repeat(hi - lo)), noisy.shape[0])
            b = b.view(hi - lo, n, *a.shape[1:])
            if self.normalise:
                b = normalise_by_max(b.flatten(0, 1)).view_as(b)
            num = (b - a.unsqueeze(0)).flatten(2).norm(dim=2)
            den = a.flatten(1).norm(dim=1).unsqueeze(0)
            ratio = (num / den).T.numpy()
            if self.skip_changed:
                with torch.no_grad():
                    now = torch.cat([forward(noisy[i:i + self.batch_size]).argmax(1).cpu()
                                     for i in range(0, noisy.shape[0], self.batch_size)])
                ratio = np.where((now.view(hi - lo, n) != predicted.view(1, n)).T.numpy(), np.nan, ratio)
            out[:, lo:hi] = ratio
            if progress is not None:
                progress(hi, self.nr_samples)
        return out

    def __call__(self, model, inputs, targets, maps, *, masks=None, explain=None, progress=None,
                 cancel=None) -> np.ndarray:
        values = self.ratios(model, inputs, targets, maps, explain=explain, progress=progress, cancel=cancel)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return self._reduce(values)


@dataclass(kw_only=True)
class AvgSensitivity(MaxSensitivity):
    """Avg-Sensitivity (Yeh et al. 2019): the mean over δ of ‖Φ(x+δ) − Φ(x)‖ / ‖Φ(x)‖ (see
    :class:`MaxSensitivity`). Lower is better."""

    name: ClassVar[str] = "avg_sensitivity"

    def _reduce(self, values: np.ndarray) -> np.ndarray:
        return np.nanmean(values, axis=1)
