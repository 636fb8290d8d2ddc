"""The models bundled in ``assets/models`` (``<name>.json`` card + ``<name>.safetensors``), trained
offline by ``vislib.data.train`` on the generated shapes dataset."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelError
from .bundle import Preprocess, make_bundle
from .registry import _seeded, register_model
from .weights import load_state_dict_file

ASSETS = Path(__file__).resolve().parent.parent.parent / "assets"
MODELS_DIR = ASSETS / "models"
DEFAULT_MODEL = "shapes_resnet"


def read_card(name: str) -> dict:
    path = MODELS_DIR / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"bundled model card missing: {path}") from None


def _register_bundled(name: str) -> None:
    card = read_card(name)

    @register_model(name, source="bundled", description=card.get("description", ""))
    def build(weights):
        from ..nets import ARCHITECTURES

        card = read_card(name)
        model = _seeded(lambda: ARCHITECTURES[card["architecture"]](**card.get("arch_kwargs", {})))
        if weights == "default":
            path = MODELS_DIR / f"{name}.safetensors"
            load_state_dict_file(model, path)
            weights_id = f"assets/models/{path.name}"
        elif weights is None:
            weights_id = "random"
        else:
            load_state_dict_file(model, weights)
            weights_id = str(weights)
        size = int(card["input_size"])
        preprocess = Preprocess(resize=size, crop=size, mean=tuple(card["mean"]), std=tuple(card["std"]))
        return make_bundle(
            name, model, preprocess=preprocess, labels=card["labels"],
            default_layer=card.get("default_layer"), default_reason="the model card's choice",
            weights=weights_id, card=card,
        )


for _card in sorted(MODELS_DIR.glob("*.json")):
    _register_bundled(_card.stem)


def sample_images() -> list[Path]:
    """The bundled sample images."""
    return sorted(p for p in (ASSETS / "samples").glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))

