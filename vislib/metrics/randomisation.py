"""Randomisation: does the map depend on what the model learned (and on the class asked)?

MPRT (Adebayo et al., NeurIPS 2018), Smooth MPRT (Hedström et al., TMLR 2024) and Random Logit
(Sixt, Granz & Landgraf, ICML 2020). The randomised models are deep copies: the shared model (and a
bundle's) is never touched.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from .base import Metric, _check, _device, _module, _scores, as_maps, class_indices
from .similarity import spearman, spearman_rows, ssim


def parameter_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that can re-initialise (``reset_parameters``: convolutions, linear layers,
    normalisations), in the order they were registered (input first), as Quantus."""
    return [(name, m) for name, m in module.named_modules() if hasattr(m, "reset_parameters")]


def _with_model(model, module: nn.Module):
    """``model`` (a bundle or a module) with its module replaced by ``module``."""
    if hasattr(model, "model") and dataclasses.is_dataclass(model):
        return dataclasses.replace(model, model=module, lock=threading.RLock(),  # type: ignore[type-var]
                                   cpu_fallback=None)
    return module


def cascading_randomisation(model, *, seed: int = 0, order: str = "top_down") -> Iterator[tuple[str, object]]:
    """Yield ``(layer name, randomised model)`` for a deep copy whose layers are re-initialised one
    more at a time, from the output down (``"top_down"``, Adebayo et al.'s cascading randomisation)
    or up (``"bottom_up"``). The same copy is yielded each time (cascading); ``model`` is untouched."""
    module = copy.deepcopy(_module(model))
    layers = parameter_layers(module)
    if order == "top_down":
        layers = layers[::-1]
    elif order != "bottom_up":
        raise ValueError(f"order must be 'top_down' or 'bottom_up', not {order!r}")
    wrapped = _with_model(model, module)
    for name, layer in layers:
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            torch.manual_seed(seed + 1)  # as Quantus: the same seed before each layer
            layer.reset_parameters()  # type: ignore[operator]
        yield name, wrapped


def _similarity(kind: str):
    if kind == "spearman":
        return spearman
    if kind == "spearman_abs":
        return lambda a, b: spearman(a, b, absolute=True)
    if kind == "ssim":
        return ssim
    raise ValueError(f"similarity must be 'spearman', 'spearman_abs' or 'ssim', not {kind!r}")


@dataclass(kw_only=True)
class MPRT(Metric):
    """Model Parameter Randomisation Test (Adebayo et al. 2018): re-initialise the layers cascading from
    the top (on a deep copy) and compare the map of the randomised model with the original,
    sim_l = ``similarity``(Φ(x; θ), Φ(x; θ_{randomised ≥ l})) (Spearman ρ by default, as Quantus).
    Per image: the mean of sim_l over the layers (:meth:`layer_scores` gives all of them). A map that
    depends on the learned weights falls towards 0; one that ignores the model stays at 1, failing
    the test. Lower is better. ``layers``: how many of the top layers to randomise (None: all).
    """

    name: ClassVar[str] = "mprt"
    group: ClassVar[str] = "randomisation"
    higher_is_better: ClassVar[bool] = False
    needs_explain: ClassVar[bool] = True
    fast: ClassVar[bool] = False
    similarity: str = "spearman"
    order: str = "top_down"
    layers: int | None = None
    abs: bool = True  # compare |a| (Quantus's default; Adebayo et al. report both)

    def _maps(self, model, inputs, classes, explain) -> torch.Tensor:
        return as_maps(explain(model, inputs, classes), inputs.shape[0])

    def _view(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.abs() if self.abs else maps

    def layer_scores(self, model, inputs, targets, maps, *, explain, progress=None,
                     cancel=None) -> dict[str, np.ndarray]:
        """Layer name → per-image similarity after randomising down to that layer (in order)."""
        self._require(explain=explain)
        x = inputs.to(_device(_module(model)), torch.float32)
        classes = class_indices(targets, model, x)
        original = self._maps(model, x, classes, explain) if self.smooth else as_maps(maps, x.shape[0])
        sim = _similarity(self.similarity)
        total = len(parameter_layers(_module(model)))
        total = min(total, self.layers) if self.layers is not None else total
        out: dict[str, np.ndarray] = {}
        copies = cascading_randomisation(model, seed=self.seed, order=self.order)
        for step, (name, randomised) in enumerate(copies):
            if step >= total:
                break
            _check(cancel)
            after = self._maps(randomised, x, classes, explain)
            a, b = self._view(original), self._view(after)
            if self.similarity in ("spearman", "spearman_abs"):  # all images at once
                out[name] = spearman_rows(a, b, absolute=self.similarity == "spearman_abs")
            else:
                out[name] = np.array([sim(a[i], b[i]) for i in range(x.shape[0])])
            if progress is not None:
                progress(step + 1, total)
        return out

    smooth: ClassVar[bool] = False

    def __call__(self, model, inputs, targets, maps, *, masks=None, explain=None, progress=None,
                 cancel=None) -> np.ndarray:
        scores = self.layer_scores(model, inputs, targets, maps, explain=explain, progress=progress,
                                   cancel=cancel)
        if not scores:  # nothing to re-initialise
            return np.full(inputs.shape[0], np.nan)
        return np.mean(np.stack(list(scores.values())), axis=0)


@dataclass(kw_only=True)
class SmoothMPRT(MPRT):
    """Smooth MPRT (Hedström et al. 2024): :class:`MPRT` with every map (the original's too) averaged
    over ``nr_samples`` noisy copies of the input, x + N(0, σ²), σ = ``noise_magnitude`` × (max x −
    min x) (Quantus's 50 and 0.1), which removes the gradient noise that made MPRT pass shattered
    maps. Lower is better."""

    name: ClassVar[str] = "smooth_mprt"
    smooth: ClassVar[bool] = True
    nr_samples: int = 50
    noise_magnitude: float = 0.1

    def _maps(self, model, inputs, classes, explain) -> torch.Tensor:
        n = inputs.shape[0]
        generator = torch.Generator().manual_seed(self.seed)  # the same noise for every model
        flat = inputs.flatten(1)
        sigma = (flat.amax(1) - flat.amin(1)).view(-1, 1, 1, 1) * self.noise_magnitude
        total = torch.zeros((n, *inputs.shape[-2:]), dtype=torch.float64)
        per_chunk = max(1, self.batch_size // n)
        for lo in range(0, self.nr_samples, per_chunk):
            hi = min(self.nr_samples, lo + per_chunk)
            noise = torch.randn((hi - lo, *inputs.shape), generator=generator).to(inputs.device)
            noisy = (inputs.unsqueeze(0) + noise * sigma.unsqueeze(0)).flatten(0, 1)
            maps = as_maps(explain(model, noisy, classes.repeat(hi - lo)), noisy.shape[0])
            part = maps.view(hi - lo, n, *maps.shape[1:]).sum(0)
            total = total + part
        return total / self.nr_samples


@dataclass(kw_only=True)
class RandomLogit(Metric):
    """Random Logit (Sixt et al. 2020): the similarity (SSIM by default, as Quantus) between the map
    for the explained class and the map for a class drawn uniformly from the ``num_classes`` − 1
    others (seeded). A class-sensitive method gives a low similarity. Lower is better."""

    name: ClassVar[str] = "random_logit"
    group: ClassVar[str] = "randomisation"
    higher_is_better: ClassVar[bool] = False
    needs_explain: ClassVar[bool] = True
    num_classes: int | None = None
    similarity: str = "ssim"

    def __call__(self, model, inputs, targets, maps, *, masks=None, explain=None, progress=None,
                 cancel=None) -> np.ndarray:
        self._require(explain=explain)
        x = inputs.to(_device(_module(model)), torch.float32)
        n = x.shape[0]
        classes = class_indices(targets, model, x)
        k = self.num_classes
        if k is None:
            with torch.no_grad():
                k = int(_scores(model)(x[:1]).shape[1])
        rng = np.random.RandomState(self.seed)
        others = torch.tensor([rng.choice([c for c in range(k) if c != int(t)]) for t in classes])
        a = as_maps(maps, n)
        b = as_maps(explain(model, x, others), n)
        if progress is not None:
            progress(1, 1)
        if self.similarity in ("spearman", "spearman_abs"):
            return spearman_rows(a, b, absolute=self.similarity == "spearman_abs")
        sim = _similarity(self.similarity)
        return np.array([sim(a[i], b[i]) for i in range(n)])
