"""The model registry: names → builders, mirroring torchvision's idioms (``list_models``, ``load_model``).

``register_model`` refuses duplicates. Each source (bundled, torchvision, ...) registers its models
when its module is imported; :func:`load_model` also wraps a user's own ``nn.Module``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelError
from .bundle import ModelBundle, Preprocess, _check_layer_name, default_device, make_bundle
from .weights import load_state_dict_file


@dataclass(frozen=True)
class ModelSpec:
    """How to build one registered model."""

    name: str
    source: str  # "bundled" or "torchvision"
    description: str
    build: Callable[[object], ModelBundle]


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, *, source: str, description: str = ""):
    """Decorator registering ``build(weights) -> ModelBundle`` under ``name``; refuses duplicates."""

    def decorator(build: Callable[[object], ModelBundle]):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelSpec(name, source, description, build)
        return build

    return decorator


def list_models(source: str | None = None) -> list[str]:
    """Names of the registered models (bundled first), optionally of one ``source`` only."""
    specs = sorted(_REGISTRY.values(), key=lambda s: (s.source != "bundled", s.name))
    return [s.name for s in specs if source is None or s.source == source]


def model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None


def load_model(
    model: str | nn.Module,
    weights: str | os.PathLike | None = "default",
    *,
    labels: Sequence[str] | None = None,
    preprocess: Preprocess | Callable | None = None,
    default_layer: str | None = None,
    device: str | torch.device | None = None,
    name: str | None = None,
    output=None,
    channels: int | None = None,
) -> ModelBundle:
    """Load a registered model by name, or wrap the user's own ``nn.Module``.

    ``weights``: ``"default"`` (bundled weights, or torchvision's pretrained weights from the
    ``TORCH_HOME`` cache / a download), ``None`` (random initialisation), or a path to a state dict
    (``.safetensors`` preferred; ``.pt``/``.pth`` only through ``torch.load(weights_only=True)``).
    For your own module: ``output`` (an index, a key or a callable) selects the class scores in a
    dict / tuple output, ``channels`` sets the input channels (default: the first convolution's).
    """
    dev = torch.device(device) if device is not None else default_device()
    if isinstance(model, nn.Module):
        if weights not in ("default", None):
            load_state_dict_file(model, weights)
        return make_bundle(
            name or type(model).__name__, model, preprocess=preprocess, labels=labels,
            default_layer=default_layer, device=dev, output=output, channels=channels,
            weights=str(weights) if weights not in ("default", None) else "as given",
        )
    bundle = model_spec(model).build(weights)
    if dev != bundle.device:
        bundle.model.to(dev)
        bundle.device = dev
    if labels is not None:
        bundle.labels = list(labels)
    if default_layer is not None:
        _check_layer_name(bundle, default_layer)
        bundle.default_layer = default_layer
    return bundle


def _seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """Build with a fixed seed, so "random" weights are the same in every process (links, caches),
    without touching the caller's random state."""
    from ..seeding import seeded

    with seeded(seed):  # one seeded draw at a time in this process: the same weights in every thread
        return build()

