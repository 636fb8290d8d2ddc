"""Complexity: how concentrated is the map? (no model needed)

Sparseness (Chalasani et al., ICML 2020) and Complexity (Bhatt et al., IJCAI 2020), as Quantus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .base import Metric, as_maps


def gini(maps) -> np.ndarray:
    """Gini index of each map's |a| sorted ascending (+1e-7, as Quantus):
    G = Σ_i (2i − n − 1) a_(i) / (n Σ_i a_(i)), i = 1 … n. 0 for a constant map, → 1 for one pixel."""
    a = as_maps(maps).flatten(1).abs()
    a = torch.sort(a, dim=1).values + 1e-7
    n = a.shape[1]
    i = torch.arange(1, n + 1, dtype=a.dtype)
    return ((2 * i - n - 1) * a).sum(1).div(n * a.sum(1)).numpy()


def entropy(maps) -> np.ndarray:
    """Shannon entropy of each map's |a| / Σ|a| (natural log; 0·log 0 = 0): log n for a constant map."""
    a = as_maps(maps).flatten(1).abs()
    p = a / a.sum(1, keepdim=True).clamp_min(1e-300)
    return -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))).sum(1).numpy()


@dataclass(kw_only=True)
class Sparseness(Metric):
    """Sparseness (Chalasani et al. 2020): the Gini index of |a| (:func:`gini`). Higher: fewer
    features carry the relevance. A constant map has the lowest, 0."""

    name: ClassVar[str] = "sparseness"
    group: ClassVar[str] = "complexity"
    needs_model: ClassVar[bool] = False

    def __call__(self, model, inputs, targets, maps, *, masks=None, explain=None, progress=None,
                 cancel=None) -> np.ndarray:
        return gini(maps)


@dataclass(kw_only=True)
class Complexity(Metric):
    """Complexity (Bhatt et al. 2020): the entropy of the fractional contributions |a_i| / Σ|a|
    (:func:`entropy`). Lower is simpler; a constant map has the highest, log n."""

    name: ClassVar[str] = "complexity"
    group: ClassVar[str] = "complexity"
    higher_is_better: ClassVar[bool] = False
    needs_model: ClassVar[bool] = False

    def __call__(self, model, inputs, targets, maps, *, masks=None, explain=None, progress=None,
                 cancel=None) -> np.ndarray:
        return entropy(maps)
