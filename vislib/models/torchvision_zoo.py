"""torchvision classifiers: ``Weights.DEFAULT``, its own preprocessing and categories, the torch hub cache."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import WeightsError
from .bundle import Preprocess, make_bundle
from .registry import _seeded, register_model
from .weights import load_state_dict_file

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


def pretrained_cache_path(weights_enum) -> Path:
    """Where torchvision keeps (or would download) this pretrained checkpoint."""
    filename = os.path.basename(weights_enum.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def pretrained_available(name: str) -> bool:
    """Whether torchvision's default pretrained weights for ``name`` are in the local cache."""
    import torchvision

    return pretrained_cache_path(torchvision.models.get_model_weights(name).DEFAULT).is_file()


def _ensure_pretrained(name: str, weights_enum) -> None:
    path = pretrained_cache_path(weights_enum)
    if path.is_file():
        return
    hint = (
        f"pretrained weights for {name} are not cached: put {path.name} in {path.parent} "
        f"(download it from {weights_enum.url}), or run once with internet access, "
        f"or use weights=None for a randomly initialised model"
    )
    if os.environ.get("VISLIB_OFFLINE", "") not in ("", "0"):
        raise WeightsError(hint)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights_enum.url, str(path), progress=False)
    except Exception as exc:
        path.unlink(missing_ok=True)
        raise WeightsError(f"{hint} [download failed: {type(exc).__name__}]") from None


def _register_torchvision(name: str) -> None:
    @register_model(name, source="torchvision", description=f"torchvision {name} (ImageNet)")
    def build(weights):
        import torchvision

        weights_enum = torchvision.models.get_model_weights(name).DEFAULT
        labels = list(weights_enum.meta["categories"])
        transform = weights_enum.transforms()
        preprocess = Preprocess(
            resize=int(transform.resize_size[0]), crop=int(transform.crop_size[0]),
            mean=tuple(transform.mean), std=tuple(transform.std),
            interpolation=transform.interpolation,
        )
        if weights == "default":
            _ensure_pretrained(name, weights_enum)
            try:
                model = torchvision.models.get_model(name, weights=weights_enum)
            except Exception as exc:
                raise WeightsError(f"could not load the cached weights of {name}: {exc}") from None
            weights_id = str(weights_enum)
        else:
            model = _seeded(lambda: torchvision.models.get_model(name, weights=None))
            weights_id = "random"
            if weights is not None:
                load_state_dict_file(model, weights)
                weights_id = str(weights)
        return make_bundle(
            name, model, preprocess=preprocess, labels=labels,
            weights=weights_id,  # the default layer by the rule (it gives the peers' choices: tested)
        )


for _name in TORCHVISION_DEFAULT_LAYERS:
    _register_torchvision(_name)

