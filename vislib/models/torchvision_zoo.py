"""torchvision classifiers: every model of ``torchvision.models.list_models(module=torchvision.models)``,
each with its ``Weights.DEFAULT``, its own preprocessing (``weights.transforms()``: resize, crop and
interpolation differ per model) and its categories; pretrained checkpoints through the torch hub
cache (``$TORCH_HOME/hub/checkpoints``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelError, WeightsError
from .bundle import Preprocess
from .cache import fetch_url, torch_checkpoint_path
from .registry import _seeded, register_source, source_spec
from .source import SourceModel, preprocess, random_or_file

#: The default layers of the eight torchvision models registered before the whole zoo was; the bundle's
#: default-layer rule gives these same layers (tested) and chooses for every model.
TORCHVISION_DEFAULT_LAYERS = {
    "alexnet": "features.11",
    "vgg16": "features.29",
    "resnet18": "layer4",
    "resnet50": "layer4",
    "densenet121": "features",
    "mobilenet_v3_large": "features",
    "efficientnet_b0": "features",
    "convnext_tiny": "features",
}


def torchvision_names() -> list[str]:
    """Every torchvision classification model."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def pretrained_cache_path(weights_enum) -> Path:
    """Where torchvision keeps (or would download) this pretrained checkpoint."""
    return torch_checkpoint_path(weights_enum.url)


def pretrained_available(name: str) -> bool:
    """Whether torchvision's default pretrained weights for ``name`` are in the local cache."""
    import torchvision

    return pretrained_cache_path(torchvision.models.get_model_weights(name).DEFAULT).is_file()


def preprocess_from_torchvision(transform) -> Preprocess:
    """The :class:`Preprocess` that computes exactly what torchvision's ``ImageClassification``
    preset computes: resize (shorter side) → centre crop → [0, 1] → normalise."""
    from torchvision.transforms._presets import ImageClassification

    if not isinstance(transform, ImageClassification):
        raise ModelError(f"unexpected torchvision preprocessing {type(transform).__name__}")
    resize = list(transform.resize_size)
    crop = list(transform.crop_size)
    return preprocess(
        resize=resize[0] if len(resize) == 1 else tuple(resize),
        crop=crop[0] if len(crop) == 1 else tuple(crop),
        mean=transform.mean, std=transform.std, interpolation=transform.interpolation,
        antialias=bool(transform.antialias),
    )


def torchvision_model(name: str, weights, weights_enum, kwargs: dict, arch: dict):
    """Build torchvision's ``name`` with its weights: ``"default"`` loads ``weights_enum`` through the
    torch hub cache (a clear offline error when missing), ``None`` a seeded random model and a path the
    user's state dict; the random / file model is built with ``arch`` (``kwargs`` plus the
    source's own architecture arguments). Returns (model, weights id, note or None). Shared by the
    classifiers and the detectors / segmenters."""
    import torchvision

    if weights == "default":
        fetch_url(weights_enum.url, name)
        try:
            model = torchvision.models.get_model(name, weights=weights_enum, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{name}: {exc}") from None
        except Exception as exc:
            raise WeightsError(f"could not load the cached weights of {name}: {exc}") from None
        return model, str(weights_enum), None

    def build(num_classes: int | None = None):
        extra = {"num_classes": num_classes} if num_classes else {}
        return _seeded(lambda: torchvision.models.get_model(name, weights=None, **{**arch, **extra}))

    try:
        model = build()
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{name}: {exc}") from None
    return random_or_file(model, weights, build, name)


def torchvision_source(name: str, weights, kwargs: dict) -> SourceModel:
    """Build torchvision's ``name``: pretrained (``"default"``), seeded random (None) or a user's file.

    A random model gets the architecture of the default weights (a ViT's image size), so the
    default weights' preprocessing fits it.
    """
    import torchvision

    weights_enum = torchvision.models.get_model_weights(name).DEFAULT
    pre = preprocess_from_torchvision(weights_enum.transforms())
    categories = list(weights_enum.meta["categories"])
    labels: list[str] | None = categories
    labels_from = f"torchvision {weights_enum}"
    notes, head_note = [], None
    arch = dict(kwargs)
    if weights != "default":
        if name.startswith("vit_") and isinstance(pre.crop, int):
            arch.setdefault("image_size", pre.crop)
        if name in ("googlenet", "inception_v3"):  # PyTorch's initialisation (torchvision's own is
            arch.setdefault("init_weights", False)  # slow, about to change, and warns)
    model, weights_id, note = torchvision_model(name, weights, weights_enum, kwargs, arch)
    notes += [note] if note else []
    if weights not in ("default", None):
        head_note = note  # the file's head has another number of classes
    if head_note or kwargs.get("num_classes", len(categories)) != len(categories):  # another head: no labels
        labels, labels_from = None, "class indices"
    return SourceModel(
        model=model, preprocess=pre, labels=labels, labels_from=labels_from, weights=weights_id,
        source="torchvision", channels=3,  # the default layer: the bundle's rule (the peers' choices, tested)
        description=f"torchvision {name} (ImageNet)", notes=notes,
    )


def _register(name: str) -> None:
    register_source(source_spec(
        name, "torchvision", f"torchvision {name} (ImageNet)",
        lambda weights, kwargs: torchvision_source(name, weights, kwargs),
        available=lambda: pretrained_available(name),
    ))


for _name in torchvision_names():
    _register(_name)
