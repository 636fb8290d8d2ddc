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
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from ..errors import ModelError
from ..layers import LayerView

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def default_device() -> torch.device:
    """The GPU when there is one, else the CPU (``VISLIB_DEVICE`` overrides)."""
    name = os.environ.get("VISLIB_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _pair(value) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    h, w = value
    return (int(h), int(w))


@dataclass(frozen=True)
class Preprocess:
    """Resize → centre crop → [0, 1] tensor of ``channels`` → normalise.

    ``resize``: an int resizes the *shorter side* to it (aspect ratio kept), an (H, W) pair to exactly
    that size, None not at all; ``crop``: an int or (H, W) centre crop, or None. One of them must fix
    the size. ``view`` gives the model's input view as an RGB PIL image (after resize and crop,
    before normalisation), so that maps at input resolution line up with it pixel for pixel;
    ``view_to_tensor`` turns that view into the model's input exactly as ``__call__`` does (grey for a
    1-channel model, an opaque alpha channel for a 4-channel one).
    """

    resize: int | tuple[int, int] | None
    crop: int | tuple[int, int] | None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: InterpolationMode = InterpolationMode.BILINEAR
    channels: int = 3
    antialias: bool = True

    def __post_init__(self):
        if self.crop is None and not isinstance(self.resize, (tuple, list)):
            raise ModelError("a Preprocess needs a crop or an exact (H, W) resize to fix the input size")
        if self.channels not in _MODES:
            raise ModelError(f"{self.channels} input channels: a Preprocess makes 1, 3 or 4 "
                             f"(pass your own preprocessing callable for other inputs)")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ModelError(f"mean and std need {self.channels} values each (one per input channel), "
                             f"not {len(self.mean)} and {len(self.std)}")

    @property
    def size(self) -> tuple[int, int]:
        """The model's input size (H, W)."""
        size = _pair(self.crop) or _pair(self.resize)
        assert size is not None  # __post_init__ refuses a Preprocess without a crop or an exact resize
        return size

    def geometry(self, img: Image.Image, interpolation: InterpolationMode | None = None) -> Image.Image:
        """Resize and crop any PIL image (an RGB image, or a mask with ``NEAREST``)."""
        if self.resize is not None:
            size = self.resize if isinstance(self.resize, int) else list(self.resize)
            img = TF.resize(img, size, interpolation=interpolation or self.interpolation,
                            antialias=self.antialias)
        if self.crop is not None:
            img = TF.center_crop(img, list(self.size))  # the crop's (H, W)
        return img

    def view(self, img: Image.Image) -> Image.Image:
        return self.geometry(img)

    def view_to_tensor(self, view: Image.Image) -> torch.Tensor:
        mode = _MODES[self.channels]
        if view.mode != mode:
            view = view.convert(mode)
        tensor = TF.pil_to_tensor(view).float().div_(255.0)
        return TF.normalize(tensor, self.mean, self.std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.view_to_tensor(self.view(img))

    def unnormalize(self, tensor: torch.Tensor) -> Image.Image:
        """Inverse of the normalisation: a C×H×W input tensor back to an RGB PIL image."""
        c = tensor.shape[0]
        mean = torch.tensor(self.mean, device=tensor.device).view(c, 1, 1)
        std = torch.tensor(self.std, device=tensor.device).view(c, 1, 1)
        arr = (tensor.detach() * std + mean).clamp(0, 1).mul(255).round().byte()
        return tensor_image(arr)


def tensor_image(arr: torch.Tensor) -> Image.Image:
    """A C×H×W uint8 tensor as an RGB PIL image (grey replicated, a 4th channel dropped)."""
    arr = arr[:3] if arr.shape[0] >= 3 else arr[:1].expand(3, -1, -1)
    return Image.fromarray(arr.permute(1, 2, 0).contiguous().cpu().numpy())


def callable_view(preprocess: Callable, img: Image.Image, tensor: torch.Tensor) -> Image.Image:
    """The input view for a preprocessing callable, without feeding anything back into it.

    From the geometry when the callable is a torchvision transform whose resize / crop steps can be
    replayed on the PIL image (and they give the tensor's size), otherwise from the tensor itself:
    the inverse of its ``Normalize`` step, or a per-image min-max."""
    from torchvision import transforms as T

    steps: list[Any] = list(preprocess.transforms) if isinstance(preprocess, T.Compose) else [preprocess]
    geometric, mean, std = [], None, None
    for step in steps:
        if isinstance(step, (T.Resize, T.CenterCrop)):
            geometric.append(step)
        elif isinstance(step, T.Normalize):
            mean, std = step.mean, step.std
        elif type(step).__name__ == "ImageClassification":  # torchvision weights.transforms()
            geometric.append(T.Resize(step.resize_size, interpolation=step.interpolation,
                                      antialias=step.antialias))
            geometric.append(T.CenterCrop(step.crop_size))
            mean, std = step.mean, step.std
    size = tuple(tensor.shape[-2:])
    if geometric:
        view = img
        for step in geometric:
            view = step(view)
        if (view.height, view.width) == size:
            return view.convert("RGB")
    t = tensor.detach().float()
    if mean is not None and len(mean) == t.shape[0]:
        c = t.shape[0]
        t = t * torch.tensor(std).view(c, 1, 1) + torch.tensor(mean).view(c, 1, 1)
    else:
        lo, hi = t.amin(dim=(1, 2), keepdim=True), t.amax(dim=(1, 2), keepdim=True)
        t = (t - lo) / (hi - lo).clamp_min(1e-12)
    return tensor_image(t.clamp(0, 1).mul(255).round().byte())


@dataclass
class ModelBundle:
    """A model ready to be explained. Shared between threads: never mutate ``model`` in a call.

    ``layers`` maps every possible target layer to its shape *as the methods see it*, (C, h, w);
    ``views`` says how each is read (:class:`vislib.layers.LayerView`: feature map, channels-last,
    tokens); ``default_reason`` says why the default layer was chosen; ``source``, ``weights`` and
    ``labels_from`` say where the model, its weights and its labels come from.
    """

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
    views: dict[str, LayerView] = field(default_factory=dict, repr=False)
    input_shape: tuple[int, int, int] = (3, 224, 224)  # (channels, H, W) of the model's input
    default_reason: str = ""
    source: str = "module"
    labels_from: str = ""
    notes: list[str] = field(default_factory=list)
    layer_table: list[LayerRow] = field(default_factory=list, repr=False)
    description: str = ""
    ref: object = field(default=None, repr=False)  # a ModelRef that rebuilds it elsewhere (vislib.model_ref)
    # what the output is: "logits" | "probabilities" | "sigmoid" (multi-label logits) | "regression" |
    # "embedding" (vislib.targets.OUTPUT_KINDS); the class chart and the default target follow it
    scores: str = "logits"
    head: str | None = None  # the linear layer whose output is the class scores, when the probe found one
    embedding: ModelBundle | None = field(default=None, repr=False)  # made by as_embedding, once
    upload_architecture: str | None = None  # the architecture an uploaded state dict was loaded into
    prompt_bundles: dict = field(default_factory=dict, repr=False)  # with_prompts, by prompt list

    @property
    def prompts(self) -> list[str] | None:
        """The prompts of a zero-shot (CLIP-like) model, which are its labels; None for other models."""
        return getattr(self.model, "prompts", None) if hasattr(self.model, "with_prompts") else None

    def with_prompts(self, prompts: Sequence[str]) -> ModelBundle:
        """This zero-shot model with other prompts as its classes: same weights, lock and layers;
        each prompt's text embedding is computed once (cached across prompt lists)."""
        if self.prompts is None:
            raise ModelError(f"model {self.name!r} takes no prompts (only CLIP-like models do)")
        key = tuple(str(p) for p in prompts)
        zero_shot: Any = self.model
        if key == tuple(self.labels):
            return self
        with self.lock:
            if key not in self.prompt_bundles:
                self.prompt_bundles[key] = replace(
                    self, model=zero_shot.with_prompts(key), labels=list(key), labels_from="prompts",
                    embedding=None, cpu_fallback=None, prompt_bundles=self.prompt_bundles, ref=None)
            return self.prompt_bundles[key]

    def prepare(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, list[Image.Image]]:
        """(the N×C×H×W input batch on the model's device, the input views): the model explains
        exactly ``preprocess(image)``; the views (RGB, for overlays) never go back into it."""
        if isinstance(self.preprocess, Preprocess):
            views = [self.preprocess.view(img) for img in images]
            return self.to_input(views), views
        tensors = [self.preprocess(img) for img in images]
        views = [callable_view(self.preprocess, img, t) for img, t in zip(images, tensors, strict=True)]
        return torch.stack(tensors).to(self.device, torch.float32), views

    def input_view(self, img: Image.Image) -> Image.Image:
        """The image as the model sees it (resized and cropped), for overlays that line up."""
        if isinstance(self.preprocess, Preprocess):
            return self.preprocess.view(img)
        return self.prepare([img])[1][0]

    def to_input(self, views: Sequence[Image.Image]) -> torch.Tensor:
        """Stack input views (from :meth:`input_view`) into an N×C×H×W batch on the model's device.

        Only for a :class:`Preprocess`, whose view carries everything its tensor needs; with a
        preprocessing callable use :meth:`prepare`, which never feeds a view back."""
        if not isinstance(self.preprocess, Preprocess):
            raise TypeError("to_input needs a Preprocess; with a preprocessing callable use bundle.prepare")
        return torch.stack([self.preprocess.view_to_tensor(v) for v in views]).to(self.device)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The class scores (N × classes) of a forward of ``x``: the model's output, or the part of it
        that ``output`` selects for models that return a dict, a tuple or a ``ModelOutput``."""
        return select_output(self.model(x), self.output)

    def view(self, layer: str) -> LayerView:
        """How ``layer``'s output is read as an N×C×h×w map."""
        if layer in self.views:
            return self.views[layer]
        c, h, w = self.layers[layer]
        return LayerView("nchw", c, (h, w))

    @property
    def channels(self) -> int:
        return self.input_shape[0]

    @property
    def input_hw(self) -> tuple[int, int]:
        """(H, W) of the model's input."""
        return (self.input_shape[1], self.input_shape[2])

    @property
    def input_size(self) -> int:
        """The input's side (its height for a non-square input: see :attr:`input_hw`)."""
        return self.input_shape[1]


@dataclass(frozen=True)
class LayerRow:
    """One module of the layer table: what it outputs and how (whether) the methods read it."""

    name: str
    kind: str  # the module's class name
    output: str  # the raw output's shape, e.g. "197×768", or its type
    view: LayerView | None  # None: no map (not a tensor, runs several times, no spatial reading)
    note: str = ""


def describe_output(out, depth: int = 0) -> str:
    """A short structure of a model output, e.g. ``tuple(Tensor[1×10], dict(aux: Tensor[1×4]))``."""
    if isinstance(out, torch.Tensor):
        return f"Tensor[{'×'.join(str(s) for s in out.shape)}]"
    if depth > 2:
        return type(out).__name__
    if isinstance(out, dict) or hasattr(out, "keys"):
        try:
            items = ", ".join(f"{k}: {describe_output(out[k], depth + 1)}" for k in list(out.keys())[:6])
        except Exception:  # noqa: BLE001  (an exotic mapping: its type is enough)
            return type(out).__name__
        return f"{type(out).__name__}({items})"
    if isinstance(out, (tuple, list)):
        return f"{type(out).__name__}({', '.join(describe_output(o, depth + 1) for o in out[:6])})"
    return type(out).__name__


def select_output(out, output=None) -> torch.Tensor:
    """The class scores in a model's output: a tensor as is, ``logits`` of a dict / ``ModelOutput``,
    or what ``output`` (an index, a key, or a callable on the output) selects."""
    if output is not None:
        try:
            picked = output(out) if callable(output) else out[output]
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ModelError(f"output={output!r} does not select anything in the model's output "
                             f"{describe_output(out)} ({type(exc).__name__}: {exc})") from None
        if not isinstance(picked, torch.Tensor):
            raise ModelError(f"output={output!r} selects {describe_output(picked)}, "
                             f"not a tensor of class scores")
        return picked
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise ModelError(f"the model returned {describe_output(out)}, not a tensor of class scores; say which "
                     f"part holds them with output= (an index, a key or a callable on the output)")


def first_conv_in_channels(model: nn.Module) -> int | None:
    """``in_channels`` of the model's first convolution (definition order), if it has one."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv1d, nn.Conv3d)):
            return int(module.in_channels)
    return None


def default_preprocess(channels: int) -> Preprocess:
    if channels == 3:
        return Preprocess(resize=224, crop=224)
    return Preprocess(resize=224, crop=224, mean=(0.5,) * channels, std=(0.5,) * channels, channels=channels)


def input_shape_of(preprocess, channels: int | None) -> tuple[int, int, int]:
    """(C, H, W) the model is fed: from a Preprocess, or by running a callable once on a grey image."""
    if isinstance(preprocess, Preprocess):
        return (preprocess.channels, *preprocess.size)
    try:
        probe = preprocess(Image.new("RGB", (320, 320), (128, 128, 128)))
    except Exception as exc:  # noqa: BLE001  (the user's callable: report, do not crash)
        raise ModelError(f"the preprocessing failed on a 320×320 RGB image: "
                         f"{type(exc).__name__}: {exc}") from None
    if not isinstance(probe, torch.Tensor) or probe.dim() != 3:
        raise ModelError(f"the preprocessing must return a C×H×W tensor, not {describe_output(probe)}")
    if channels is not None and probe.shape[0] != channels:
        raise ModelError(f"the preprocessing makes {probe.shape[0]} channels but the model takes {channels}")
    c, h, w = (int(s) for s in probe.shape)
    return (c, h, w)


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
    output=None,
    channels: int | None = None,
    source: str = "module",
    labels_from: str | None = None,
    notes: Sequence[str] = (),
    default_reason: str | None = None,
    scores: str | None = None,
) -> ModelBundle:
    """Put a model in eval mode on ``device`` and work out its input, layers, labels and default layer.

    ``channels``: the input channels (default: the preprocessing's, else the first convolution's
    ``in_channels``, else 3); ``output``: which part of the model's output holds the class scores;
    ``scores``: what kind of output that is (:data:`vislib.targets.OUTPUT_KINDS`; default: detected,
    :func:`detect_scores`).
    """
    device = device or default_device()
    model = model.to(device).eval()
    channels = channels or (preprocess.channels if isinstance(preprocess, Preprocess) else None) \
        or first_conv_in_channels(model) or 3
    preprocess = preprocess or default_preprocess(channels)
    shape = input_shape_of(preprocess, channels)
    if shape[0] != channels:
        raise ModelError(f"the preprocessing makes {shape[0]} channels but the model takes {channels}")
    from .probe import choose_default_layer, probe_model  # the probe reads the bundle's helpers

    probe = probe_model(model, shape, device, output)
    if labels is None:
        unit = {"regression": "output", "embedding": "feature"}.get(scores or "", "class")
        labels, labels_from = [f"{unit} {i}" for i in range(probe.classes)], labels_from or "numbered"
    elif len(labels) != probe.classes:
        raise ModelError(f"{len(labels)} labels given but the model has {probe.classes} outputs")
    bundle = ModelBundle(
        name=name, model=model, preprocess=preprocess, labels=list(labels),
        layers={n: v.shape for n, v in probe.views.items()}, default_layer="", device=device, weights=weights,
        card=card, output=output, views=probe.views, input_shape=shape, source=source,
        labels_from=labels_from or "given", notes=list(notes), layer_table=probe.table, head=probe.head,
    )
    bundle.scores, note = detect_scores(probe.output, scores)
    if note:
        bundle.notes.append(note)
    if default_layer is None:
        default_layer, bundle.default_reason = choose_default_layer(model, probe)
    else:
        bundle.default_reason = default_reason or "given"
    _check_layer_name(bundle, default_layer)
    bundle.default_layer = default_layer
    return bundle


def _check_layer_name(bundle: ModelBundle, layer: str) -> None:
    from ..hooks import resolve_layer  # local import: hooks imports nothing from here

    resolve_layer(bundle, layer)


def detect_scores(output: torch.Tensor | None, given: str | None) -> tuple[str, str | None]:
    """(output kind, note): ``given`` when set (checked); else "probabilities" where it is safe to
    say so -- at least two classes, every value in [0, 1] and each row summing to 1 on the probe's
    random input (a head that ends in a softmax) -- with a note saying so; else "logits"."""
    from ..targets import OUTPUT_KINDS

    if given is not None:
        if given not in OUTPUT_KINDS:
            raise ModelError(f"scores must be one of {', '.join(OUTPUT_KINDS)}, not {given!r}")
        return given, None
    if output is None or output.dim() != 2 or output.shape[1] < 2:
        return "logits", None
    out = output.detach().float()
    in_range = bool(((out >= 0) & (out <= 1)).all())
    sums_to_one = bool(((out.sum(dim=1) - 1).abs() <= 1e-4).all())
    if in_range and sums_to_one:
        return "probabilities", ("the model returns probabilities (its outputs are in [0, 1] and sum to 1): "
                                 "the chart shows them as given, never a softmax of them; say "
                                 "scores=\"logits\" if that is wrong")
    return "logits", None
