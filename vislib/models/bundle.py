"""The bundle: a model ready to be explained, and how it is probed.

A :class:`ModelBundle` is everything an explanation needs: the model (eval mode, on its device), the
preprocessing (PIL image → input tensor, plus the matching *input view*), the class labels, the
candidate target layers with their output shapes, a default layer, which part of the model's output
holds the class scores, and a lock that serialises hooked passes on the shared model. Every model
source (bundled, torchvision, timm, Hugging Face, spec files, a user's module) ends in
:func:`make_bundle`, so nothing downstream knows where a model came from.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..errors import ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)



def default_device() -> torch.device:
    """The GPU when there is one, else the CPU (``VISLIB_DEVICE`` overrides)."""
    name = os.environ.get("VISLIB_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Preprocess:
    """Resize (shorter side) → centre crop → [0, 1] tensor → normalise.

    ``view`` gives the model's input view as a PIL image (after resize and crop, before
    normalisation) so that maps at input resolution line up with it pixel for pixel.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: InterpolationMode = InterpolationMode.BILINEAR

    def view(self, img: Image.Image) -> Image.Image:
        img = TF.resize(img, self.resize, interpolation=self.interpolation)
        return TF.center_crop(img, [self.crop, self.crop])

    def view_to_tensor(self, view: Image.Image) -> torch.Tensor:
        tensor = TF.pil_to_tensor(view).float().div_(255.0)
        return TF.normalize(tensor, self.mean, self.std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.view_to_tensor(self.view(img))

    def unnormalize(self, tensor: torch.Tensor) -> Image.Image:
        """Inverse of the normalisation: a 3×H×W input tensor back to a PIL image."""
        mean = torch.tensor(self.mean, device=tensor.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=tensor.device).view(3, 1, 1)
        arr = (tensor.detach() * std + mean).clamp(0, 1).mul(255).round().byte()
        return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())


@dataclass
class ModelBundle:
    """A model ready to be explained. Shared between threads: never mutate ``model`` in a call."""

    name: str
    model: nn.Module
    preprocess: Preprocess | Callable[[Image.Image], torch.Tensor]
    labels: list[str]
    layers: dict[str, tuple[int, ...]]
    default_layer: str
    device: torch.device
    weights: str = "random"
    card: dict | None = None
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    cpu_fallback: ModelBundle | None = field(default=None, repr=False)  # made on a GPU out-of-memory
    output: object = None  # which part of the model's output holds the class scores (see select_output)

    def input_view(self, img: Image.Image) -> Image.Image:
        """The image as the model sees it (resized and cropped), for overlays that line up."""
        if isinstance(self.preprocess, Preprocess):
            return self.preprocess.view(img)
        tensor = self.preprocess(img)
        lo = tensor.amin(dim=(1, 2), keepdim=True)
        hi = tensor.amax(dim=(1, 2), keepdim=True)
        arr = ((tensor - lo) / (hi - lo).clamp_min(1e-12)).mul(255).round().byte()
        return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())

    def to_input(self, views: Sequence[Image.Image]) -> torch.Tensor:
        """Stack input views into an N×3×H×W batch on the model's device."""
        if isinstance(self.preprocess, Preprocess):
            tensors = [self.preprocess.view_to_tensor(v) for v in views]
        else:
            tensors = [self.preprocess(v) for v in views]
        return torch.stack(tensors).to(self.device)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The class scores (N × classes) of a forward of ``x``: the model's output, or the part of it
        that ``output`` selects for models that return a dict, a tuple or a ``ModelOutput``."""
        return select_output(self.model(x), self.output)

    @property
    def input_size(self) -> int:
        if isinstance(self.preprocess, Preprocess):
            return self.preprocess.crop
        return 224


def select_output(out, output=None) -> torch.Tensor:
    """The class scores in a model's output: a tensor as is, ``logits`` of a dict / ``ModelOutput``,
    or what ``output`` (an index, a key, or a callable on the output) selects."""
    if output is not None:
        return output(out) if callable(output) else out[output]
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise ModelError(f"the model returned {type(out).__name__}, not a tensor of class scores; "
                     f"say which part holds them with output= (an index, a key or a callable)")


def make_bundle(
    name: str,
    model: nn.Module,
    *,
    preprocess: Preprocess | Callable | None = None,
    labels: Sequence[str] | None = None,
    default_layer: str | None = None,
    device: torch.device | None = None,
    weights: str = "random",
    card: dict | None = None,
) -> ModelBundle:
    """Put a model in eval mode on ``device`` and work out its layers, labels and default layer."""
    device = device or default_device()
    model = model.to(device).eval()
    preprocess = preprocess or Preprocess(resize=224, crop=224)
    size = preprocess.crop if isinstance(preprocess, Preprocess) else 224
    layers, order, n_out = probe_layers(model, (1, 3, size, size), device)
    if labels is None:
        labels = [f"class {i}" for i in range(n_out)]
    elif len(labels) != n_out:
        raise ModelError(f"{len(labels)} labels given but the model has {n_out} outputs")
    bundle = ModelBundle(
        name=name, model=model, preprocess=preprocess, labels=list(labels), layers=layers,
        default_layer="", device=device, weights=weights, card=card,
    )
    if default_layer is None:
        default_layer = guess_default_layer(model, layers, order)
    _check_layer_name(bundle, default_layer)
    bundle.default_layer = default_layer
    return bundle


def _check_layer_name(bundle: ModelBundle, layer: str) -> None:
    from ..hooks import resolve_layer  # local import: hooks imports nothing from here

    resolve_layer(bundle, layer)


def probe_layers(model: nn.Module, shape: tuple[int, ...], device: torch.device):
    """One probe forward with hooks on every module (removed in ``finally``).

    Returns (layers, completion_order, n_outputs): ``layers`` maps the name of every module whose
    output is a 4-D tensor and that runs exactly once per forward to its output shape (C, H, W), in
    definition order. Modules that run several times (a shared ReLU) cannot be a target layer.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    calls: dict[str, int] = {}
    order: list[str] = []
    handles = []

    def make_hook(layer_name: str):
        def hook(_module, _inputs, output):
            calls[layer_name] = calls.get(layer_name, 0) + 1
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                shapes[layer_name] = tuple(output.shape[1:])
                order.append(layer_name)

        return hook

    try:
        for layer_name, module in model.named_modules():
            if layer_name:
                handles.append(module.register_forward_hook(make_hook(layer_name)))
        with torch.no_grad():
            out = model(torch.zeros(shape, device=device))
    except Exception as exc:
        raise ModelError(f"the model failed on a {tuple(shape)} input: {exc}") from None
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ModelError("the model must return a 2-D tensor of class scores (N × classes)")
    names = [n for n, _ in model.named_modules() if n in shapes and calls.get(n) == 1]
    layers = {n: shapes[n] for n in names}
    if not layers:
        raise ModelError("the model has no module with a 4-D (N×C×H×W) output to explain")
    return layers, [n for n in order if n in layers], int(out.shape[1])


_POOLING = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool2d)


def guess_default_layer(model: nn.Module, layers: dict, order: list[str]) -> str:
    """The last module (in forward order) with a spatial map larger than 1×1 that is not a pooling."""
    modules = dict(model.named_modules())
    for layer_name in reversed(order):
        _, h, w = layers[layer_name]
        if h * w > 1 and not isinstance(modules[layer_name], _POOLING):
            return layer_name
    return order[-1]

