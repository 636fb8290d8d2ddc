"""The models bundled in ``assets/models`` (``<name>.json`` card + ``<name>.safetensors``), trained
offline by ``vislib.data.train`` on the generated shapes dataset. Every card found there is
registered (installed packages carry the folder as package data: :mod:`vislib._resources`)."""

from __future__ import annotations

import json
from pathlib import Path

from .._resources import resource
from ..errors import ModelError
from .registry import _seeded, register_source, source_spec
from .source import SourceModel, preprocess
from .weights import load_state_dict_file, load_weights

ASSETS = resource("assets")
MODELS_DIR = resource("assets", "models")
DEFAULT_MODEL = "shapes_resnet"


def read_card(name: str) -> dict:
    path = MODELS_DIR / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"bundled model card missing: {path}") from None


def bundled_source(name: str, weights, kwargs: dict) -> SourceModel:
    """A bundled model: its committed weights (``"default"``), seeded random (None) or a user's file."""
    from ..nets import ARCHITECTURES

    card = read_card(name)
    arch = {**card.get("arch_kwargs", {}), **kwargs}

    def build(num_classes: int | None = None):
        extra = {"num_classes": num_classes} if num_classes else {}
        return _seeded(lambda: ARCHITECTURES[card["architecture"]](**{**arch, **extra}))

    try:
        model = build()
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{name}: {exc}") from None
    notes = []
    if weights == "default":
        path = MODELS_DIR / f"{name}.safetensors"
        load_state_dict_file(model, path)
        weights_id = f"assets/models/{path.name}"
    elif weights is None:
        weights_id = "random"
    else:
        model, note = load_weights(model, weights, build)
        notes += [note] if note else []
        weights_id = str(weights)
    categories = list(card["labels"])
    labels: list[str] | None = categories
    labels_from = f"assets/models/{name}.json"
    if notes or arch.get("num_classes", len(categories)) != len(categories):
        labels, labels_from = None, "class indices"
    size = int(card["input_size"])
    return SourceModel(
        model=model, preprocess=preprocess(resize=size, crop=size, mean=card["mean"], std=card["std"]),
        labels=labels, labels_from=labels_from, weights=weights_id, source="bundled",
        default_layer=card.get("default_layer"), default_reason="the model card's choice", channels=3,
        card=card,
        description=card.get("description", ""), notes=notes,
    )


def _register_bundled(name: str) -> None:
    card = read_card(name)
    register_source(source_spec(name, "bundled", card.get("description", ""),
                                lambda weights, kwargs: bundled_source(name, weights, kwargs)))


for _card in sorted(MODELS_DIR.glob("*.json")):
    _register_bundled(_card.stem)


def sample_images() -> list[Path]:
    """The bundled sample images."""
    found = resource("assets", "samples").glob("*")
    return sorted(p for p in found if p.suffix.lower() in (".png", ".jpg", ".jpeg"))

