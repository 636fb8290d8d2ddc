"""Model registry and bundles.

A :class:`ModelBundle` is everything an explanation needs: the model (eval mode, on its device), the
preprocessing (PIL image → input tensor, plus the matching *input view*), the class labels, the
candidate target layers with their output shapes, a default layer, and a lock that serialises
hooked passes on the shared model.

Models come from a registry that mirrors torchvision's idioms (``list_models``, ``load_model``);
``register_model`` refuses duplicates. Two sources are registered: torchvision classifiers and the
models bundled in ``assets/models`` (trained offline by ``vislib.data.train``).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from .errors import ModelError, WeightsError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MODELS_DIR = ASSETS / "models"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_WEIGHTS_BYTES = 2 * 1024**3


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


# --------------------------------------------------------------------------------------------------
# Registry


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
) -> ModelBundle:
    """Load a registered model by name, or wrap the user's own ``nn.Module``.

    ``weights``: ``"default"`` (bundled weights, or torchvision's pretrained weights from the
    ``TORCH_HOME`` cache / a download), ``None`` (random initialisation), or a path to a state dict
    (``.safetensors`` preferred; ``.pt``/``.pth`` only through ``torch.load(weights_only=True)``).
    """
    dev = torch.device(device) if device is not None else default_device()
    if isinstance(model, nn.Module):
        if weights not in ("default", None):
            load_state_dict_file(model, weights)
        return make_bundle(
            name or type(model).__name__, model, preprocess=preprocess, labels=labels,
            default_layer=default_layer, device=dev,
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
    from .hooks import resolve_layer  # local import: hooks imports nothing from here

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


# --------------------------------------------------------------------------------------------------
# Weights files


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict without ever unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.stat().st_size > MAX_WEIGHTS_BYTES:
        raise WeightsError(f"{path.name}: larger than {MAX_WEIGHTS_BYTES // 2**30} GB")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        elif suffix in (".pt", ".pth", ".bin", ".ckpt"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise WeightsError(f"{path.name}: use a .safetensors file (or .pt/.pth state dict)")
    except WeightsError:
        raise
    except Exception as exc:
        raise WeightsError(f"{path.name}: not a loadable state dict ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path.name}: expected a mapping of parameter names to tensors")
    return state


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a WeightsError naming missing/unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_few(shapes)}")
    if problems:
        raise WeightsError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))


def _few(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_state_dict_file(model: nn.Module, path: str | os.PathLike) -> None:
    state = read_state_dict(path)
    check_state_dict(model, state, Path(path).name)
    model.load_state_dict(state)


# --------------------------------------------------------------------------------------------------
# torchvision classifiers

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


def _seeded(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """Build with a fixed seed, so "random" weights are the same in every process (links, caches),
    without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


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
            default_layer=TORCHVISION_DEFAULT_LAYERS.get(name), weights=weights_id,
        )


for _name in TORCHVISION_DEFAULT_LAYERS:
    _register_torchvision(_name)


# --------------------------------------------------------------------------------------------------
# Bundled models (assets/models/<name>.json + .safetensors)


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
        from .nets import ARCHITECTURES

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
            default_layer=card.get("default_layer"), weights=weights_id, card=card,
        )


for _card in sorted(MODELS_DIR.glob("*.json")):
    _register_bundled(_card.stem)

DEFAULT_MODEL = "shapes_resnet"


def sample_images() -> list[Path]:
    """The bundled sample images."""
    return sorted(p for p in (ASSETS / "samples").glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()
