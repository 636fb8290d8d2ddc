"""The model registry: one naming scheme for the API, the CLI, the dashboard, URLs and spec files.

A model name is one of

- a registered name: the bundled models, every torchvision classifier (``resnet50``, ``vit_b_16``,
  ...), and the ``[models.NAME]`` tables of spec files added with ``register_models``;
- ``timm:<name>`` for any timm model, a pretrained tag included (``timm:convnext_tiny.fb_in22k_ft_in1k``);
- ``hf:<repo id>`` or ``hf:<folder>`` for a Hugging Face image classifier;
- ``package.module:callable`` for a factory that returns an ``nn.Module``.

Registered names are listed by :func:`list_models`; the open-ended schemes are resolved by prefix
when asked for (timm's 1,300 names are listed only with ``list_models("timm")``, never at import).
:func:`load_model` builds a bundle from any of them, or wraps a user's own ``nn.Module``;
:func:`model_ref` gives a small picklable :class:`ModelRef` that rebuilds the same bundle in another
process (a Ray worker).
"""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from .bundle import ModelBundle, Preprocess, _check_layer_name, default_device
from .source import SourceModel, finish, scheme_of

#: Order of the sources in listings.
SOURCE_ORDER = ("bundled", "spec", "torchvision", "timm", "hf", "factory")


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model.

    ``build(weights) -> ModelBundle`` always exists. Sources built on :class:`SourceModel` also give
    ``make(weights, kwargs) -> SourceModel``, which lets :func:`load_model` apply its overrides
    before the model is probed; ``origin`` is the spec file a model comes from; ``available()``
    says whether its default weights are at hand without a download.
    """

    name: str
    source: str  # "bundled" | "torchvision" | "spec" | "timm" | "hf" | "factory" | another tag
    description: str
    build: Callable[[object], ModelBundle]
    make: Callable[[object, dict], SourceModel] | None = field(default=None, repr=False)
    origin: str | None = None
    available: Callable[[], bool] | None = field(default=None, repr=False)

    @property
    def spec_file(self) -> str | None:
        """The spec file this model comes from (``origin``), for code that asks by that name."""
        return self.origin


_REGISTRY: dict[str, ModelSpec] = {}
_LOCK = threading.RLock()


def register_model(name: str, *, source: str, description: str = ""):
    """Decorator registering ``build(weights) -> ModelBundle`` under ``name``; refuses duplicates."""

    def decorator(build: Callable[[object], ModelBundle]):
        with _LOCK:
            if name in _REGISTRY:
                raise ValueError(f"model {name!r} is already registered")
            _REGISTRY[name] = ModelSpec(name, source, description, build)
        return build

    return decorator


def source_spec(
    name: str,
    source: str,
    description: str,
    make: Callable[[object, dict], SourceModel],
    *,
    origin: str | None = None,
    available: Callable[[], bool] | None = None,
) -> ModelSpec:
    """A :class:`ModelSpec` for a source that builds :class:`SourceModel` s."""

    def build(weights="default") -> ModelBundle:
        return finish(name, make(weights, {}), default_device())

    return ModelSpec(name, source, description, build, make=make, origin=origin, available=available)


def register_source(spec: ModelSpec, *, replace: bool = False) -> None:
    """Add ``spec`` to the registry; an existing name is an error unless ``replace``."""
    with _LOCK:
        if spec.name in _REGISTRY and not replace:
            raise ValueError(f"model {spec.name!r} is already registered")
        _REGISTRY[spec.name] = spec


def list_models(source: str | None = None) -> list[str]:
    """Names of the models, bundled first.

    Without ``source``: the registered ones (bundled, spec files, torchvision). ``source`` picks one
    source; ``"timm"`` lists every timm architecture (``timm:<name>``; pretrained tags are accepted
    too), ``"hf"`` the Hugging Face image classifiers in the local cache (any hub repo is accepted).
    """
    if source == "timm":
        from .timm_zoo import timm_names

        return timm_names()
    if source == "hf":
        from .huggingface import cached_repos

        return cached_repos()
    with _LOCK:
        specs = list(_REGISTRY.values())
    rank = {s: i for i, s in enumerate(SOURCE_ORDER)}
    specs.sort(key=lambda s: (rank.get(s.source, len(rank)), s.name))
    return [s.name for s in specs if source is None or s.source == source]


def model_spec(name: str) -> ModelSpec:
    """The spec of a registered name, or of a ``timm:`` / ``hf:`` / ``module:callable`` name."""
    with _LOCK:
        spec = _REGISTRY.get(name)
    if spec is not None:
        return spec
    scheme = scheme_of(name)
    if scheme == "timm":
        from .timm_zoo import timm_spec

        return timm_spec(name)
    if scheme == "hf":
        from .huggingface import hf_spec

        return hf_spec(name)
    if scheme == "factory":
        from .factory import factory_spec

        return factory_spec(name)
    import difflib

    close = difflib.get_close_matches(name, list_models(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ModelError(f"unknown model {name!r}.{hint} `python -m vislib models` lists them; timm:<name>, "
                     f"hf:<repo> and package.module:callable names are accepted too")


def pretrained_available(name: str) -> bool:
    """Whether ``name``'s default weights are at hand without a download (bundled, cached, a file)."""
    spec = model_spec(name)
    return True if spec.available is None else bool(spec.available())


def load_model(
    model: str | nn.Module,
    weights: str | os.PathLike | None = "default",
    *,
    labels: Sequence[str] | None = None,
    preprocess: Preprocess | Callable | None = None,
    default_layer: str | None = None,
    device: str | torch.device | None = None,
    name: str | None = None,
    output: object = None,
    channels: int | None = None,
    kwargs: dict | None = None,
    processor: object = None,
    scores: str | None = None,
) -> ModelBundle:
    """Load a model by name (see the module docstring), or wrap the user's own ``nn.Module``.

    ``weights``: ``"default"`` (bundled weights, the source's pretrained weights from the torch hub
    or Hugging Face cache or a download, a spec file's weights), ``None`` (seeded random
    initialisation), or a path to a state dict (``.safetensors`` preferred; ``.pt``/``.pth`` only
    through ``torch.load(weights_only=True)``). Where the file's classifier head has another number
    of classes, the model is built with that number (a note on the bundle says so).

    ``labels``, ``preprocess``, ``default_layer``, ``output`` (which part of the model's output
    holds the class scores: an index, a key or a callable) and ``channels`` (the input channels;
    default: the preprocessing's, the source's, or the first convolution's) override what the
    source knows;
    ``kwargs`` go to the builder (``torchvision.models.get_model``, ``timm.create_model``, the
    Hugging Face config, a factory); ``processor`` is a Hugging Face image processor for a Hugging
    Face model object. ``scores``: what the output is, "logits" | "probabilities" | "sigmoid"
    (multi-label) | "regression" | "embedding" (default: the source's, else detected: outputs in
    [0, 1] summing to 1 are probabilities).
    """
    dev = torch.device(device) if device is not None else default_device()
    if isinstance(model, nn.Module):
        from .factory import module_source

        src = module_source(model, weights, processor=processor)
        _override(src, labels, preprocess, default_layer, output, channels, scores)
        bundle = finish(name or type(model).__name__, src, dev)
        bundle.ref = None
        return bundle
    spec = model_spec(model)
    if spec.make is None:  # a builder registered with @register_model
        if kwargs or channels:
            raise ModelError(f"model {model!r} takes no kwargs or channels")
        bundle = spec.build(weights)
        _move_and_override(bundle, dev, labels, default_layer, output, scores)
    else:
        src = spec.make(weights, dict(kwargs or {}))
        _override(src, labels, preprocess, default_layer, output, channels, scores)
        bundle = finish(spec.name, src, dev)
    bundle.ref = ModelRef(
        name=spec.name, weights=weights if weights in (None, "default") else absolute(weights),
        spec_files=(spec.origin,) if spec.origin else (),
        labels=tuple(labels) if labels is not None else None, default_layer=default_layer, output=output,
        preprocess=preprocess, channels=channels, kwargs=dict(kwargs) if kwargs else None, scores=scores,
    )
    return bundle


def _override(src: SourceModel, labels, preprocess, default_layer, output, channels, scores=None) -> None:
    if scores is not None:
        src.scores = scores
    if labels is not None:
        src.labels, src.labels_from = list(labels), "given to load_model"
    if preprocess is not None:
        src.preprocess = preprocess
    if default_layer is not None:
        src.default_layer, src.default_reason = default_layer, None
    if output is not None:
        src.output = output
    if channels is not None:
        src.channels = channels


def _move_and_override(bundle: ModelBundle, dev: torch.device, labels, default_layer, output,
                       scores=None) -> None:
    if scores is not None:
        from .bundle import detect_scores

        bundle.scores, _ = detect_scores(None, scores)
    if dev != bundle.device:
        bundle.model.to(dev)
        bundle.device = dev
    if labels is not None:
        bundle.labels = list(labels)
    if output is not None:
        bundle.output = output
    if default_layer is not None:
        _check_layer_name(bundle, default_layer)
        bundle.default_layer = default_layer


@dataclass(frozen=True)
class ModelRef:
    """A small picklable recipe that rebuilds a bundle in another process: the model's name, the
    weights argument, the spec files it needs, and the overrides given to :func:`load_model`.

    ``ref.load(device)`` registers the spec files (idempotent) and calls :func:`load_model`, so the
    bundle is built in the worker, never shipped as a pickled module.
    """

    name: str
    weights: str | None = "default"
    spec_files: tuple[str, ...] = ()
    labels: tuple[str, ...] | None = None
    default_layer: str | None = None
    output: object = None
    preprocess: Preprocess | Callable | None = None
    channels: int | None = None
    kwargs: dict | None = field(default=None, hash=False)
    scores: str | None = None

    def load(self, device: str | torch.device | None = None) -> ModelBundle:
        if self.spec_files:
            from .specfile import register_models

            for path in self.spec_files:
                register_models(path)
        return load_model(self.name, self.weights, labels=self.labels, default_layer=self.default_layer,
                          output=self.output, preprocess=self.preprocess, channels=self.channels,
                          kwargs=self.kwargs, device=device, scores=self.scores)


def model_ref(bundle: ModelBundle) -> ModelRef:
    """The :class:`ModelRef` that rebuilds ``bundle`` in another process, or a :class:`ModelError`
    saying why there is none (a Python object given to :func:`load_model`, an unpicklable override)."""
    ref = getattr(bundle, "ref", None)
    if ref is None:
        raise ModelError(f"model {bundle.name!r} was given as a Python object and cannot be rebuilt in "
                         f"another process; describe it in a spec file (a factory: package.module:callable) "
                         f"and load it by name")
    try:
        pickle.dumps(ref)
    except Exception as exc:
        raise ModelError(f"model {bundle.name!r} cannot be rebuilt in another process: an override given to "
                         f"load_model (preprocess, output) cannot be pickled ({type(exc).__name__}); "
                         f"describe it in a spec file instead") from None
    return ref


def _seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """Build with a fixed seed, so "random" weights are the same in every process (links, caches),
    without touching the caller's random state."""
    from ..seeding import seeded

    with seeded(seed):  # one seeded draw at a time in this process: the same weights in every thread
        return build()


def absolute(path: str | os.PathLike) -> str:
    return str(Path(path).expanduser().resolve())
