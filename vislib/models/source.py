"""What every model source builds, and how it becomes a bundle.

Each source (bundled, torchvision, timm, Hugging Face, a factory, a spec file) turns a name and a
weights choice into a :class:`SourceModel`: the ``nn.Module`` plus what the source knows about it
(its own preprocessing as a :class:`Preprocess`, its labels and where they came from, its input
channels, which weights were loaded, notes worth telling the user). :func:`finish` hands that to
:func:`make_bundle`, so nothing downstream knows where a model came from.

Names: a registered name (bundled, torchvision, spec files), ``timm:<name>[.<tag>]``,
``hf:<repo id or folder>``, or ``package.module:callable`` (a factory). :func:`scheme_of` tells them
apart without building anything.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torchvision.transforms import InterpolationMode

from ..errors import LayerError, ModelError, VislibError
from .bundle import IMAGENET_MEAN, IMAGENET_STD, ModelBundle, Preprocess, make_bundle

FACTORY_PATTERN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

INTERPOLATIONS = {mode.value: mode for mode in InterpolationMode}


@dataclass
class SourceModel:
    """A model as a source built it, before it is probed into a :class:`ModelBundle`."""

    model: nn.Module
    preprocess: Preprocess | Callable | None
    labels: list[str] | None  # None: "class i"
    labels_from: str  # where the labels came from, in words
    weights: str  # which weights: a file, a pretrained tag, or "random"
    source: str  # "bundled" | "torchvision" | "timm" | "hf" | "spec" | "factory" | "module"
    default_layer: str | None = None
    default_reason: str | None = None  # why that default layer (None: make_bundle's rule says why)
    channels: int | None = None
    output: object = None
    card: dict | None = None
    description: str = ""
    notes: list[str] = field(default_factory=list)
    context: str = ""  # "models.toml [models.NAME]": prefixed to the errors of spec-file models
    scores: str | None = None  # the output kind (vislib.targets.OUTPUT_KINDS); None: detected


def scheme_of(name: str) -> str:
    """The kind of a model name, without building it: "timm", "hf", "factory" or "name"."""
    if name.startswith("timm:"):
        return "timm"
    if name.startswith("hf:"):
        return "hf"
    if FACTORY_PATTERN.match(name):
        return "factory"
    return "name"


def interpolation_mode(value: str | InterpolationMode | int) -> InterpolationMode:
    """An ``InterpolationMode`` from its name ("bicubic"), itself, or a PIL resampling code."""
    if isinstance(value, InterpolationMode):
        return value
    if isinstance(value, int):  # PIL.Image.Resampling
        pil = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
        if value in pil:
            return INTERPOLATIONS[pil[value]]
    elif str(value).lower() in INTERPOLATIONS:
        return INTERPOLATIONS[str(value).lower()]
    raise ModelError(f"unknown interpolation {value!r}; use one of {', '.join(INTERPOLATIONS)}")


def fit_stats(mean: Sequence[float], std: Sequence[float], channels: int) -> tuple[tuple, tuple]:
    """Normalisation statistics for ``channels`` inputs: as given when the lengths match, the average
    of the RGB statistics for a one-channel model, otherwise an error asking for them."""
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) == channels and len(std) == channels:
        return mean, std
    if channels == 1 and len(mean) == len(std) == 3:
        return (sum(mean) / 3,), (sum(std) / 3,)
    raise ModelError(f"the model takes {channels} input channels but the normalisation has {len(mean)} "
                     f"values; give mean and std with {channels} values each")


def preprocess(
    *,
    resize: int | tuple[int, int] | None,
    crop: int | tuple[int, int] | None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: InterpolationMode = InterpolationMode.BILINEAR,
    channels: int = 3,
    antialias: bool = True,
) -> Preprocess:
    """A :class:`Preprocess` from a source's own settings: ``resize`` an int (shorter side), (H, W)
    (exact) or None; ``crop`` an int, (H, W) (a square one as an int) or None."""
    if isinstance(crop, (tuple, list)) and crop[0] == crop[1]:
        crop = int(crop[0])
    resize = tuple(resize) if isinstance(resize, list) else resize
    return Preprocess(resize=resize, crop=crop, mean=tuple(mean), std=tuple(std), interpolation=interpolation,
                      channels=channels, antialias=antialias)


def draw_zero_head(model: nn.Module, what: str) -> str | None:
    """Give a randomly initialised model a random classifier head where its initialisation leaves the
    head at zero (torchvision's ViTs): with a zero head every class score is equal, every gradient
    zero and every map flat, which makes a random model useless as a baseline. The last linear layer
    is drawn like any ``nn.Linear`` (under the caller's seed); returns the note saying so, or None."""
    head = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            head = module
    if head is None or bool(head.weight.detach().any()):
        return None
    with torch.no_grad():
        head.reset_parameters()
    return (f"{what}'s own initialisation leaves its classifier head at zero (every map flat); "
            f"vislib draws the head at random like any linear layer")


def random_or_file(model: nn.Module, weights, build: Callable[..., nn.Module], what: str
                   ) -> tuple[nn.Module, str, str | None]:
    """A source model's weights other than its pretrained ones: ``None`` keeps the seeded random
    initialisation (a zero head drawn at random: :func:`draw_zero_head`); a path loads the user's
    state dict (:func:`~vislib.models.weights.load_weights`, which builds the model with the file's
    number of classes through ``build`` when they differ). Returns (model, weights id, note or None)."""
    if weights is None:
        from ..seeding import seeded

        with seeded(1):
            return model, "random", draw_zero_head(model, what)
    from .weights import load_weights

    model, note = load_weights(model, weights, build)
    return model, str(weights), note


def finish(name: str, src: SourceModel, device: torch.device | None = None) -> ModelBundle:
    """Probe a source's model into a bundle.

    For a spec-file model (``src.context`` set) every error names the file and table, and a label
    list or a default layer that does not fit names its key.
    """
    spec_labels = src.labels if src.context else None
    use_labels = getattr(src.model, "use_labels", None)  # a zero-shot model: its labels are its prompts
    if use_labels is not None:
        if src.labels:
            use_labels(src.labels)
        elif getattr(src.model, "prompts", None) is None:
            from .zeroshot import NEEDS_PROMPTS

            raise ModelError(f"{name}: {NEEDS_PROMPTS}")
        spec_labels = None
    try:
        bundle = make_bundle(
            name, src.model, preprocess=src.preprocess,
            labels=None if spec_labels is not None else src.labels, default_layer=src.default_layer,
            default_reason=src.default_reason if src.default_layer else None, device=device,
            weights=src.weights, card=src.card,
            output=src.output, channels=src.channels, source=src.source, labels_from=src.labels_from,
            notes=list(src.notes), scores=src.scores,
        )
    except LayerError as exc:
        if not src.context:
            raise
        raise LayerError(f"{src.context} layer: {exc}") from None
    except VislibError as exc:
        if not src.context:
            raise
        raise type(exc)(f"{src.context}: {exc}") from None
    if spec_labels is not None:
        if len(spec_labels) != len(bundle.labels):
            raise ModelError(f"{src.context} labels: {len(spec_labels)} labels but the model has "
                             f"{len(bundle.labels)} outputs")
        bundle.labels, bundle.labels_from = list(spec_labels), src.labels_from
    bundle.description = src.description
    return bundle
