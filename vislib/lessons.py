"""Lessons: what the Learn page shows, computed without Streamlit (so tests can check every number).

Each lesson takes the model and image the class is looking at and opens up one idea of the seed:

* :func:`gradcam_steps`: Grad-CAM one step at a time (activations, gradients, channel weights
  α_k = (1/Z) Σ_ij ∂S/∂A^k_ij, the top weighted maps, their sum, the ReLU, the upsampling), from
  the very pass the CAM family runs, so the last step *is* ``explain(..., "gradcam")``.
* :func:`cam_equality` / :func:`cam_refusal`: on a GAP + linear head ∂S/∂A^k_ij = w_ck / Z, so
  Z · Grad-CAM = CAM; on a fully connected head CAM has no weights to use (vislib refuses it).
* :func:`relu_rules_example` / :func:`backprop_signals`: gradient, Deconvnet and guided backprop
  differ only in what a ReLU passes down.
* :func:`multi_instance_study`: how many objects of a multi-object image each CAM covers.
* :func:`cascading_randomisation`: the sanity check of Adebayo et al. 2018 on a private copy.

The rank and structure similarities of the sanity check are :func:`vislib.metrics.spearman` and
:func:`vislib.metrics.ssim` (torch, no scipy / scikit-image).
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ._optional import require
from .errors import Cancelled, MethodError, VislibError
from .explain import device_slot, explain, normalize_maps, resolve_targets
from .hooks import resolve_layer
from .imageio import load_image
from .methods import METHODS
from .methods.base import ExplainContext
from .methods.cam import CAMMethod
from .methods.registry import FAMILY_RUNNERS
from .metrics import spearman, ssim

if TYPE_CHECKING:
    from .concepts import Concepts

# --------------------------------------------------------------------------------------------------
# One CAM-family pass, exactly as explain() runs it


@dataclass
class CamPass:
    """The target layer's activation A and gradient g = ∂S/∂A (1×C×h×w), the logits and the target."""

    view: Image.Image
    inputs: torch.Tensor
    layer: str
    activation: torch.Tensor
    gradient: torch.Tensor
    logits: torch.Tensor
    target: int


def model_input(bundle, image) -> tuple[Image.Image, torch.Tensor]:
    """(the image as the model sees it, the 1×3×H×W input tensor on the model's device)."""
    tensor, views = bundle.prepare([load_image(image)])
    return views[0], tensor


def cam_pass(bundle, image, layer: str | None = None, target=None, methods: Sequence[str] = ("gradcam",),
             score: str = "logit") -> tuple[CamPass, dict]:
    """Run the CAM family's own runner for ``methods`` and keep what it shares (A and g).

    Returns (the pass, the runner's results): the lesson then works on the same tensors as
    ``explain``, not on a re-implementation of them.
    """
    layer_name, _ = resolve_layer(bundle, layer)
    view, inputs = model_input(bundle, image)
    ctx = ExplainContext(
        bundle=bundle, inputs=inputs, layer=layer_name, score=score, target_spec=target,
        resolve_targets=lambda logits, spec: resolve_targets(bundle.labels, logits, spec),
    )
    with device_slot(bundle.device):  # counts against the concurrent GPU explanations, like explain()
        results = FAMILY_RUNNERS["cam"](ctx, list(methods), {})
    shared = ctx.shared["cam_pass"]
    assert ctx.logits is not None and ctx.targets is not None  # the CAM runner's forward set them
    return CamPass(view, inputs, layer_name, shared["activation"], shared["gradient"], ctx.logits,
                   int(ctx.targets[0])), results


# --------------------------------------------------------------------------------------------------
# Grad-CAM step by step


@dataclass
class GradCAMSteps:
    """Every intermediate of Grad-CAM for one image (arrays at feature resolution h×w unless noted)."""

    layer: str
    target: int
    label: str
    score: float  # the explained logit S
    view: Image.Image  # the model's input view (H×W)
    activation: np.ndarray  # C×h×w: A^k
    gradient: np.ndarray  # C×h×w: ∂S/∂A^k_ij
    weights: np.ndarray  # C: α_k = mean_ij ∂S/∂A^k_ij
    top: list[int]  # channels with the largest α_k
    weighted: np.ndarray  # len(top)×h×w: α_k A^k of those channels
    combination: np.ndarray  # h×w: Σ_k α_k A^k over all channels (before the ReLU)
    relu: np.ndarray  # h×w: ReLU of the combination
    upsampled: np.ndarray  # H×W: bilinear upsampling of the ReLU map
    normalised: np.ndarray  # H×W in [0, 1]: what explain() returns as maps["gradcam"]
    flat: bool  # the ReLU map is constant (e.g. all zero): shown as zeros

    @property
    def channels(self) -> int:
        return int(self.weights.shape[0])

    @property
    def top_share(self) -> float:
        """Share of the positive part of the combination that the top channels' maps add up to."""
        total = np.clip(self.weighted, 0, None).astype(np.float64).sum() if len(self.top) else 0.0
        full = np.clip(self.weights[:, None, None] * self.activation, 0, None).astype(np.float64).sum()
        return min(1.0, float(total / full)) if full > 0 else 0.0  # min: float rounding


def gradcam_steps(bundle, image, layer: str | None = None, target=None, top: int = 6) -> GradCAMSteps:
    """Grad-CAM decomposed: α_k = (1/Z) Σ_ij ∂S/∂A^k_ij, L = ReLU(Σ_k α_k A^k), then upsample, normalise."""
    passed, _ = cam_pass(bundle, image, layer, target)
    A, g = passed.activation[0], passed.gradient[0]
    alpha = g.mean(dim=(1, 2))
    combination = torch.einsum("c,chw->hw", alpha, A)
    relu = F.relu(combination)
    size = (int(passed.inputs.shape[-2]), int(passed.inputs.shape[-1]))
    upsampled = F.interpolate(relu[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    normalised, flat = normalize_maps(relu[None], size)
    order = torch.argsort(alpha, descending=True)[: max(0, min(top, alpha.numel()))]
    return GradCAMSteps(
        layer=passed.layer, target=passed.target, label=bundle.labels[passed.target],
        score=float(passed.logits[0, passed.target]), view=passed.view, activation=_np(A), gradient=_np(g),
        weights=_np(alpha), top=[int(i) for i in order], weighted=_np(alpha[order, None, None] * A[order]),
        combination=_np(combination), relu=_np(relu), upsampled=_np(upsampled), normalised=_np(normalised[0]),
        flat=bool(flat[0]),
    )


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


# --------------------------------------------------------------------------------------------------
# CAM = Grad-CAM on a GAP + linear head; no CAM on a fully connected head


@dataclass
class CamEquality:
    """The numbers behind Z · Grad-CAM = CAM (maps before the ReLU, at feature resolution)."""

    layer: str
    target: int
    label: str
    Z: int  # h·w
    cam: np.ndarray  # Σ_k w_ck A^k
    gradcam: np.ndarray  # Σ_k α_k A^k
    class_weights: np.ndarray  # w_ck (C)
    alpha: np.ndarray  # α_k (C)
    bias: float
    logit: float  # S_c from the forward pass
    logit_from_cam: float  # (1/Z) Σ_ij CAM_ij + b_c
    gradient_spread: float  # max_k (max_ij g − min_ij g) / max |g|: 0 when g is constant per channel
    cam_map: np.ndarray  # H×W, explain()'s normalised CAM
    gradcam_map: np.ndarray  # H×W, explain()'s normalised Grad-CAM

    @property
    def max_map_difference(self) -> float:
        """max_ij |Z · Grad-CAM − CAM| (should be float rounding)."""
        return float(np.abs(self.Z * self.gradcam - self.cam).max())

    @property
    def relative_map_difference(self) -> float:
        return self.max_map_difference / max(float(np.abs(self.cam).max()), 1e-30)

    @property
    def max_weight_difference(self) -> float:
        """max_k |Z · α_k − w_ck|."""
        return float(np.abs(self.Z * self.alpha - self.class_weights).max())

    @property
    def max_display_difference(self) -> float:
        """max |CAM − Grad-CAM| of the normalised maps explain() returns."""
        return float(np.abs(self.cam_map - self.gradcam_map).max())


def gradient_spread(g: torch.Tensor) -> float:
    """How much ∂S/∂A^k_ij varies over positions within a channel, relative to the largest |g|.

    Zero on a GAP + linear head (g^k_ij = w_ck / Z everywhere); large on a fully connected head.
    """
    g = g.detach().flatten(2)
    span = (g.amax(dim=2) - g.amin(dim=2)).max()
    return float(span / g.abs().max().clamp_min(1e-30))


def cam_equality(bundle, image, layer: str | None = None, target=None) -> CamEquality:
    """CAM and Grad-CAM of one image from the same pass, with the numbers that prove them equal.

    Raises vislib's :class:`MethodError` when the head above ``layer`` is not GAP + linear.
    """
    from .methods.cam import gap_linear_head

    passed, _ = cam_pass(bundle, image, layer, target, methods=("cam", "gradcam"))
    A, g = passed.activation, passed.gradient
    head = gap_linear_head(bundle.model, A, passed.logits, passed.layer)
    w = head.weight.detach()[passed.target]
    b = float(head.bias.detach()[passed.target]) if head.bias is not None else 0.0
    cam_method, gradcam_method = METHODS["cam"](), METHODS["gradcam"]()
    assert isinstance(cam_method, CAMMethod) and isinstance(gradcam_method, CAMMethod)  # the registry's CAMs
    cam = cam_method.saliency(A, g, class_weights=w[None])[0]
    grad = gradcam_method.saliency(A, g)[0]
    expl = explain(bundle, passed.inputs[0], ["cam", "gradcam"], layer=passed.layer, target=passed.target)
    return CamEquality(
        layer=passed.layer, target=passed.target, label=bundle.labels[passed.target], Z=int(A[0, 0].numel()),
        cam=_np(cam), gradcam=_np(grad), class_weights=_np(w), alpha=_np(g[0].mean(dim=(1, 2))), bias=b,
        logit=float(passed.logits[0, passed.target]), logit_from_cam=float(cam.mean()) + b,
        gradient_spread=gradient_spread(g), cam_map=expl.maps["cam"], gradcam_map=expl.maps["gradcam"],
    )


@dataclass
class CamRefusal:
    """What happens when CAM is asked on a model whose head is not GAP + linear."""

    layer: str
    message: str  # vislib's MethodError text ("" if CAM ran after all)
    gradient_spread: float
    head: list[str]  # the modules above the target layer, in order
    gradcam_map: np.ndarray  # Grad-CAM runs anyway

    @property
    def refused(self) -> bool:
        return bool(self.message)


def modules_after(model: nn.Module, layer: str) -> list[str]:
    """``name (Type)`` of the leaf modules defined after ``layer`` (the head above it, in most nets)."""
    names = [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    after = False
    out = []
    for name, module in names:
        if after and not name.startswith(layer + "."):
            out.append(f"{name} ({type(module).__name__})")
        if name == layer or name.startswith(layer + "."):
            after = True
    return out


def cam_refusal(bundle, image, layer: str | None = None, target=None) -> CamRefusal:
    """Ask vislib for CAM (expecting its MethodError) and compute Grad-CAM on the same image."""
    layer_name, _ = resolve_layer(bundle, layer)
    message = ""
    try:
        explain(bundle, image, ["cam"], layer=layer_name, target=target)
    except MethodError as exc:
        message = str(exc)
    passed, _ = cam_pass(bundle, image, layer_name, target)
    expl = explain(bundle, passed.inputs[0], ["gradcam"], layer=layer_name, target=passed.target)
    return CamRefusal(layer_name, message, gradient_spread(passed.gradient),
                      modules_after(bundle.model, layer_name), expl.maps["gradcam"])


# --------------------------------------------------------------------------------------------------
# Gradient, Deconvnet and guided backprop: one ReLU, three rules

#: A ReLU's forward inputs f and the signal R arriving from above: every sign combination once.
RELU_EXAMPLE_F = (1.0, 2.0, -1.5, -0.5)
RELU_EXAMPLE_R = (0.8, -1.2, 0.6, -0.3)
BACKPROP_METHODS = {"gradient": "gradient", "deconvnet": "deconvnet", "guided_backprop": "guided"}


def relu_rules_example(f: Sequence[float] = RELU_EXAMPLE_F, R: Sequence[float] = RELU_EXAMPLE_R
                       ) -> dict[str, list[float]]:
    """What one ReLU passes down under each rule, computed by vislib's own ReLU-rule mechanism.

    Returns ``{"forward": relu(f), "gradient": ..., "deconvnet": ..., "guided": ...}``.
    """
    from .methods.backprop import relu_rule

    x = torch.tensor(f, dtype=torch.float32, requires_grad=True)
    signal = torch.tensor(R, dtype=torch.float32)
    out = {"forward": F.relu(x.detach()).tolist()}
    for rule in ("gradient", "deconvnet", "guided"):
        with relu_rule(rule), torch.enable_grad():
            y = F.relu(x)
        (passed,) = torch.autograd.grad(y, x, grad_outputs=signal)
        out[rule] = passed.tolist()
    return out


def backprop_signals(bundle, image, target=None):
    """The three input-space signals of the image (one forward, one backward per rule)."""
    return explain(bundle, image, list(BACKPROP_METHODS), target=target)


# --------------------------------------------------------------------------------------------------
# Grad-CAM++ vs Grad-CAM on several objects of one class

STATISTICS = ("mean", "max")


def covered_instances(values: np.ndarray, masks: Sequence[np.ndarray], *, threshold: float = 0.5,
                      statistic: str = "mean") -> list[bool]:
    """Which instances a map covers: ``statistic`` (mean or max) of the map inside the instance's
    mask ≥ ``threshold`` × the map's maximum over the whole image. A flat (all-zero) map covers none."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, not {statistic!r}")
    values = np.asarray(values, dtype=np.float64)
    top = float(values.max())
    out = []
    for mask in masks:
        inside = values[np.asarray(mask, bool)]
        stat = float(inside.mean() if statistic == "mean" else inside.max()) if inside.size else 0.0
        out.append(bool(top > 0 and stat >= threshold * top))
    return out


@dataclass
class MultiInstanceImage:
    index: int
    label: int
    view: Image.Image
    masks: list[np.ndarray]  # at the model's input resolution
    maps: dict[str, np.ndarray]  # method → H×W in [0, 1]
    covered: dict[str, list[bool]]
    predicted: int


@dataclass
class MultiInstanceStudy:
    """Coverage of the instances of generated multi-object images, per method."""

    methods: list[str]
    threshold: float
    statistic: str
    layer: str
    images: list[MultiInstanceImage]

    @property
    def instances(self) -> int:
        return sum(len(im.masks) for im in self.images)

    def covered(self, method: str) -> int:
        return sum(sum(im.covered[method]) for im in self.images)

    def share(self, method: str) -> float:
        """Covered instances / all instances, over every image of the set."""
        return self.covered(method) / self.instances if self.instances else 0.0

    def mean_share(self, method: str) -> float:
        """Share of covered instances per image, averaged over the images."""
        per = [sum(im.covered[method]) / len(im.masks) for im in self.images if im.masks]
        return float(np.mean(per)) if per else 0.0

    def all_covered(self, method: str) -> int:
        """Images where every instance is covered."""
        return sum(all(im.covered[method]) for im in self.images)


def _mask_to_view(bundle, mask: np.ndarray) -> np.ndarray:
    img = Image.fromarray(np.asarray(mask, np.uint8) * 255).convert("RGB")
    view = bundle.input_view(img)
    return np.asarray(view.convert("L")) >= 128


def multi_instance_study(
    bundle, indices: Sequence[int], *, methods: Sequence[str] = ("gradcam", "gradcam++"),
    layer: str | None = None, threshold: float = 0.5, statistic: str = "mean", n_objects: int | None = None,
    batch: int = 16,
) -> MultiInstanceStudy:
    """Explain the true class of generated multi-object images and count the instances each map covers.

    The images come from :func:`vislib.data.shapes.make_multi_instance` (2–4 non-overlapping objects
    of one class, or ``n_objects``); the model must have the shapes classes as labels.
    """
    from .data.shapes import CLASSES, make_multi_instance

    if list(bundle.labels) != list(CLASSES):
        raise VislibError(f"model {bundle.name!r} does not classify the generated shapes "
                          f"({', '.join(CLASSES)}); pick a bundled shapes model")
    layer_name, _ = resolve_layer(bundle, layer)
    samples = [make_multi_instance(int(i), n_objects) for i in indices]
    images: list[MultiInstanceImage] = []
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        expl = explain(bundle, [s.image for s in chunk], list(methods), layer=layer_name,
                       target=[s.label for s in chunk])
        for j, sample in enumerate(chunk):
            masks = [_mask_to_view(bundle, m) for m in sample.masks]
            maps = {m: expl.maps[m][j] for m in methods}
            images.append(MultiInstanceImage(
                index=sample.index, label=sample.label, view=expl.view(j), masks=masks, maps=maps,
                covered={m: covered_instances(maps[m], masks, threshold=threshold, statistic=statistic)
                         for m in methods},
                predicted=int(np.argmax(expl.probs[j])),
            ))
    return MultiInstanceStudy(list(methods), threshold, statistic, layer_name, images)


def mask_outline(masks: Sequence[np.ndarray]) -> np.ndarray:
    """H×W bool: the one-pixel boundary of every mask (for drawing instances over a map)."""
    out = None
    for mask in masks:
        m = np.asarray(mask, bool)
        inner = m.copy()
        inner[1:, :] &= m[:-1, :]
        inner[:-1, :] &= m[1:, :]
        inner[:, 1:] &= m[:, :-1]
        inner[:, :-1] &= m[:, 1:]
        edge = m & ~inner
        out = edge if out is None else out | edge
    return out if out is not None else np.zeros((1, 1), bool)


# --------------------------------------------------------------------------------------------------
# Sanity check (Adebayo et al. 2018): cascading randomisation from the top

DEFAULT_SANITY_METHODS = ("gradcam", "gradient", "guided_backprop", "deconvnet")
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def randomisation_units(model: nn.Module) -> list[list[str]]:
    """The model's learnable units in definition order, each a list of module names.

    A unit is a child module with parameters (a convolution, a linear layer, a residual block);
    containers (``Sequential``, ``ModuleList``) holding several such children are opened, and a
    normalisation layer joins the unit before it (a conv and its batch norm are re-initialised
    together). Cascading randomisation re-initialises them from the last one backwards.
    """
    units: list[list[str]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if not _has_params(child):
                continue
            learnable = [c for c in child.children() if _has_params(c)]
            if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(learnable) >= 2:
                walk(child, full + ".")
            elif isinstance(child, _NORMS) and units:
                units[-1].append(full)
            else:
                units.append([full])

    walk(model, "")
    return units


def private_bundle(bundle):
    """A deep copy of the bundle's model in a bundle of its own (own lock), for experiments that
    change weights. Copied under the shared lock, so no request's hook can be copied along."""
    with bundle.lock:
        model = copy.deepcopy(bundle.model)
    return replace(bundle, model=model, lock=threading.RLock(), cpu_fallback=None)


def reinitialise(model: nn.Module, names: Sequence[str], seed: int) -> None:
    """Re-draw the parameters of the named modules with their own initialisers (seeded, without
    touching the global random state); batch norms get fresh statistics too."""
    device = next(model.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    from .seeding import seeded

    with seeded(seed, devices), torch.no_grad():  # no other thread's seeded draw interleaves
        for name in names:
            for module in model.get_submodule(name).modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()  # type: ignore[operator]  # nn.Module.__getattr__ is typed Tensor | Module


@dataclass
class SanityStep:
    """One step of the cascade: the units re-initialised so far and the similarity to the original."""

    randomised: list[str]  # the modules of the unit just re-initialised (empty for the trained model)
    maps: dict[str, np.ndarray]  # method → H×W in [0, 1]
    spearman: dict[str, float]  # rank correlation of |attribution| with the original
    spearman_signed: dict[str, float]  # rank correlation of the signed attribution
    ssim: dict[str, float]  # SSIM of the normalised maps (data range 1)
    flat: dict[str, bool]


@dataclass
class SanityCheck:
    methods: list[str]
    layer: str
    target: int
    label: str
    units: list[str]  # in the order they are re-initialised (top first)
    steps: list[SanityStep]  # steps[0]: the trained model; steps[k]: top k units re-initialised
    view: Image.Image
    seed: int

    def series(self, metric: str, method: str) -> list[float]:
        return [getattr(step, metric)[method] for step in self.steps]


def _attributions(expl, method: str) -> tuple[np.ndarray, np.ndarray]:
    """(|attribution| map, signed map) of one method, for rank correlations.

    Maps of the CAM family are ≥ 0 after their ReLU, so both are the map itself; an input-space signal
    (3×H×W) gives max_c |signal| and Σ_c signal.
    """
    raw = np.asarray(expl.raw[method])
    if raw.ndim == 3 and raw.shape[0] == 3:
        return np.abs(raw).max(axis=0), raw.sum(axis=0)
    m = np.asarray(expl.maps[method])
    return m, m


def _similarity(value: float, flat: bool) -> float:
    """A map that went flat kept no ranking of the original: its rank correlation counts as 0."""
    if flat or math.isnan(value):
        return 0.0
    return value


def cascading_randomisation(
    bundle, image, methods: Sequence[str] = DEFAULT_SANITY_METHODS, *, layer: str | None = None,
    target=None, seed: int = 0, max_units: int | None = None,
    progress: Callable[[int, int], None] | None = None, cancel: threading.Event | None = None,
) -> SanityCheck:
    """Adebayo et al. 2018: re-initialise the units from the top one by one (on a private copy of the
    model; the shared one is never touched) and compare each method's map with the trained model's.

    The explained class stays the trained model's (``target`` or its top-1). Similarities: Spearman ρ
    of |attribution| and of the signed attribution, and SSIM of the normalised maps (data range 1).
    A map that becomes flat counts as ρ = 0 (no ranking left).
    """
    methods = list(methods)
    layer_name, _ = resolve_layer(bundle, layer)
    image = load_image(image)  # decoded once; explain() makes the model's view of it each time
    view = bundle.input_view(image)
    original = explain(bundle, image, methods, layer=layer_name, target=target)
    tgt = original.class_index()
    units = randomisation_units(bundle.model)[::-1]
    if max_units is not None:
        units = units[:max_units]
    private = private_bundle(bundle)
    base = {m: _attributions(original, m) for m in methods}
    steps = [SanityStep([], dict(original.maps), {m: 1.0 for m in methods}, {m: 1.0 for m in methods},
                        {m: 1.0 for m in methods}, {m: bool(original.flat[m]) for m in methods})]
    total = len(units)
    for k, unit in enumerate(units, start=1):
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled by the caller")
        reinitialise(private.model, unit, seed + k)
        expl = explain(private, image, methods, layer=layer_name, target=tgt)
        step = SanityStep(unit, dict(expl.maps), {}, {}, {}, {})
        for m in methods:
            flat = bool(expl.flat[m])
            mag, signed = _attributions(expl, m)
            step.flat[m] = flat
            step.spearman[m] = _similarity(spearman(base[m][0], mag), flat)
            step.spearman_signed[m] = _similarity(spearman(base[m][1], signed), flat)
            step.ssim[m] = ssim(original.maps[m], expl.maps[m], data_range=1.0)
        steps.append(step)
        if progress is not None:
            progress(k, total)
    labels = ["+".join(u) for u in units]
    return SanityCheck(methods, layer_name, tgt, bundle.labels[tgt], labels, steps, view, seed)


# --------------------------------------------------------------------------------------------------
# Concepts of the bundled models (Deep Feature Factorization)

OBJECT_ENRICHMENT = 2.0  # a concept "sits on the objects" when its share there is ≥ 2× the objects' area


@dataclass
class ConceptLesson:
    """DFF of a shapes model's layer over generated test images, factorized jointly, and where each
    concept lies relative to the objects' masks."""

    model: str
    concepts: Concepts  # batched: maps N×k×H×W
    labels: list[int]  # each image's true class
    masks: np.ndarray  # N×H×W bool: the objects at the model's input view
    on_object: np.ndarray  # k: share of each concept's map mass inside the objects

    @property
    def layer(self) -> str:
        return self.concepts.layer

    @property
    def area(self) -> float:
        """Share of the pixels that belong to an object."""
        return float(self.masks.mean())

    @property
    def enrichment(self) -> np.ndarray:
        """on_object / area: how much more of each concept lies on the objects than chance."""
        return self.on_object / max(self.area, 1e-12)

    def kind(self, d: int) -> str:
        e = float(self.enrichment[d])
        return "object" if e >= OBJECT_ENRICHMENT else "background" if e < 1.0 else "mixed"

    def sentence(self) -> str:
        k = self.concepts.k
        kinds = [self.kind(d) for d in range(k)]
        names = lambda group: ", ".join(  # noqa: E731
            f"{d + 1} ({self.concepts.top_classes[d][0][1]})" for d in range(k) if kinds[d] == group)
        parts = [f"In **{self.model}**, layer `{self.layer}`, the {k} concepts of {len(self.labels)} test "
                 f"images (objects cover {self.area:.0%} of the pixels):"]
        groups = (("object", "sit", "on the objects (at least twice their share of the pixels)"),
                  ("mixed", "lie", "partly on the objects"), ("background", "lie", "on the background"))
        for group, verb, text in groups:
            count = kinds.count(group)
            if count:
                verb = verb if count > 1 else verb + "s"
                parts.append(f"{count} {verb} {text}: concept {names(group)};")
        parts[-1] = parts[-1].rstrip(";") + "."
        return " ".join(parts) + (" In brackets, the class each concept's vector speaks for most through "
                                  "the classifier.")


def concept_lesson(bundle, count: int = 8, k: int = 5, layer: str | None = None) -> ConceptLesson:
    """Deep Feature Factorization of ``layer`` over the first ``count`` generated test images (one
    factorization for all of them), and each concept's share of map mass inside the objects' masks."""
    from .concepts import concepts
    from .data.shapes import CLASSES, make_sample

    if list(bundle.labels) != list(CLASSES):
        raise VislibError(f"model {bundle.name!r} does not classify the generated shapes; pick a bundled "
                          f"shapes model")
    samples = [make_sample("test", i) for i in range(count)]
    found = concepts(bundle, [s.image for s in samples], k=k, layer=layer)
    masks = np.stack([_mask_to_view(bundle, s.mask) for s in samples])
    mass = found.maps.sum(axis=(0, 2, 3))
    inside = (found.maps * masks[:, None]).sum(axis=(0, 2, 3))
    return ConceptLesson(bundle.name, found, [s.label for s in samples], masks,
                         inside / np.maximum(mass, 1e-12))


# --------------------------------------------------------------------------------------------------
# When to trust which method


@dataclass(frozen=True)
class Reference:
    key: str
    text: str


REFERENCES = (
    Reference("Zeiler & Fergus 2014", "M. D. Zeiler, R. Fergus. Visualizing and Understanding Convolutional "
              "Networks. ECCV 2014."),
    Reference("Springenberg et al. 2014", "J. T. Springenberg, A. Dosovitskiy, T. Brox, M. Riedmiller. "
              "Striving for Simplicity: The All Convolutional Net. arXiv:1412.6806 (ICLR 2015 workshop)."),
    Reference("Lin et al. 2014", "M. Lin, Q. Chen, S. Yan. Network In Network. ICLR 2014."),
    Reference("Zhou et al. 2016", "B. Zhou, A. Khosla, A. Lapedriza, A. Oliva, A. Torralba. Learning Deep "
              "Features for Discriminative Localization (CAM). CVPR 2016."),
    Reference("Selvaraju et al. 2017", "R. R. Selvaraju, M. Cogswell, A. Das, R. Vedantam, D. Parikh, "
              "D. Batra. Grad-CAM: Visual Explanations from Deep Networks via Gradient-based "
              "Localization. ICCV 2017."),
    Reference("Chattopadhay et al. 2018", "A. Chattopadhay, A. Sarkar, P. Howlader, V. N. Balasubramanian. "
              "Grad-CAM++: Generalized Gradient-based Visual Explanations for Deep Convolutional Networks. "
              "WACV 2018."),
    Reference("Adebayo et al. 2018", "J. Adebayo, J. Gilmer, M. Muelly, I. Goodfellow, M. Hardt, B. Kim. "
              "Sanity Checks for Saliency Maps. NeurIPS 2018."),
    Reference("Collins et al. 2018", "E. Collins, R. Achanta, S. Süsstrunk. Deep Feature Factorization for "
              "Concept Discovery. ECCV 2018."),
)

#: (method, when to trust it, its caveat) in plain language.
TRUST = (
    ("CAM", "The network ends in global average pooling and one linear layer (Lin et al. 2014; Zhou et al. "
     "2016): the map is then an exact decomposition of the class score over positions.",
     "Only that architecture; coarse (the resolution of the last convolution)."),
    ("Grad-CAM", "Any CNN: where in the image the evidence for the class is. Equal to CAM where CAM exists.",
     "Coarse; with several objects it may highlight only some; changes when the top layers are "
     "randomised, which is what a faithful map should do."),
    ("Grad-CAM++", "Several objects of one class, or objects only partly covered by Grad-CAM.",
     "Its closed form assumes a piecewise-linear head (ReLU, max-pool, linear); check it on your images."),
    ("Gradient (saliency)", "Which pixels would change the score most, for this exact image.",
     "Noisy; hard to read on its own."),
    ("Deconvnet / guided backprop", "Sharp pictures of edges and textures the early layers respond to "
                                    "(Zeiler & Fergus 2014; Springenberg et al. 2014).",
     "They barely depend on the class or on the top layers: they still look right after randomising "
     "the weights (Adebayo et al. 2018). Do not use them alone to explain a decision."),
)


#: why the metrics of trust disagree (Hedström et al. 2023, MetaQuantus), each point in plain language.
METRICS_DISAGREE = (
    ("They ask different questions", "Faithfulness (ROAD, Faithfulness Correlation, Region Perturbation) "
     "asks whether removing what the map calls important changes the score; robustness (Max-/Avg-"
     "Sensitivity) whether the map stays put when the input barely moves; randomisation (MPRT, Random "
     "Logit) whether it depends on the weights and the class; complexity (Sparseness) whether it is "
     "concentrated. A constant map is perfectly robust and fails every other test."),
    ("Removal is not neutral", "Deletion puts grey holes in the image, which the network never saw in "
     "training: the score may fall because of the holes, not because of what they hid. ROAD fills them "
     "by interpolation from the neighbours (Rong et al. 2022), and MoRF and LeRF can rank methods "
     "differently."),
    ("Settings decide", "Patch size, baseline colour, noise level and the number of steps move the "
     "numbers, sometimes the ranking: the settings are recorded beside every figure."),
    ("One number hides the spread", "Over a few images the bootstrap interval is wide; two methods "
     "whose intervals overlap are not shown apart. Each figure stands beside the same metric on a "
     "random map: a method that does not beat noise is marked."),
    ("So compare rankings", "The Error analysis page shows how far the metrics agree on the order of "
     "the methods (Kendall τ): low agreement says to read each metric for its own question."),
)

# --------------------------------------------------------------------------------------------------
# Pictures and charts for the page (PIL and plotly, no Streamlit)


def signed_image(values: np.ndarray, *, size: int | None = None, scale: float | None = None) -> Image.Image:
    """A signed map in a diverging colormap (blue < 0, grey = 0, red > 0), symmetric around 0 with
    ``scale`` (default max |values|), enlarged with nearest-neighbour pixels to ``size`` (longer side)."""
    from .render import apply_colormap

    values = np.nan_to_num(np.asarray(values, np.float32))
    scale = float(np.abs(values).max()) if scale is None else scale
    unit = 0.5 + 0.5 * (values / scale if scale > 0 else np.zeros_like(values))
    return _enlarge(Image.fromarray(apply_colormap(unit, "coolwarm")), size)


def map_image(values01: np.ndarray, *, colormap: str = "inferno", size: int | None = None) -> Image.Image:
    """A map already in [0, 1], colour-mapped and enlarged (nearest neighbour) to ``size``."""
    from .render import apply_colormap

    return _enlarge(Image.fromarray(apply_colormap(np.asarray(values01, np.float32), colormap)), size)


def minmax(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, np.float32)
    span = float(values.max() - values.min())
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def _enlarge(img: Image.Image, size: int | None) -> Image.Image:
    if size is None or max(img.size) >= size:
        return img
    factor = max(1, size // max(img.size))
    return img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)


def activation_tiles(maps: np.ndarray, *, columns: int = 3, scale: int = 4) -> Image.Image:
    """K×h×w activations tiled, each on its own scale (viridis), enlarged by ``scale``."""
    from .features import tile_maps

    return tile_maps(np.asarray(maps, np.float32), columns=columns, normalize="each", colormap="viridis",
                     scale=scale)


def signed_tiles(maps: np.ndarray, *, columns: int = 3, scale: int = 4) -> Image.Image:
    """K×h×w signed maps tiled on one symmetric scale (grey = 0), enlarged by ``scale``."""
    from .features import tile_maps

    maps = np.asarray(maps, np.float32)
    top = float(np.abs(maps).max()) if maps.size else 0.0
    unit = 0.5 + 0.5 * (maps / top if top > 0 else np.zeros_like(maps))
    return tile_maps(unit, columns=columns, normalize="none", colormap="coolwarm", scale=scale)


def outline_overlay(image: Image.Image, masks: Sequence[np.ndarray], colour=(255, 255, 255)) -> Image.Image:
    """``image`` with the instances' one-pixel outlines drawn in ``colour``."""
    arr = np.array(image.convert("RGB"))
    edge = mask_outline(masks)
    if edge.shape == arr.shape[:2]:
        arr[edge] = colour
    return Image.fromarray(arr)


def weights_figure(weights: np.ndarray, top: Sequence[int]):
    """Bar chart of the channel weights α_k, sorted, the top channels highlighted."""
    go = require("plotly.graph_objects", "dashboard", feature="the lesson's charts")

    order = np.argsort(-weights)
    highlight = set(int(i) for i in top)
    fig = go.Figure(go.Bar(
        x=list(range(len(order))), y=weights[order].tolist(), customdata=order.tolist(),
        marker_color=["#e4572e" if int(i) in highlight else "#7a9cc6" for i in order],
        hovertemplate="channel %{customdata}<br>α = %{y:.3g}<extra></extra>",
    ))
    fig.update_layout(
        height=260, margin=dict(l=8, r=8, t=8, b=8), showlegend=False, bargap=0.05,
        xaxis=dict(title="channels, sorted by weight", showticklabels=False, fixedrange=True),
        yaxis=dict(title="α_k", fixedrange=True),
    )
    return fig


SANITY_METRICS = {"spearman": "Spearman ρ of |attribution|", "spearman_signed": "Spearman ρ (signed)",
                  "ssim": "SSIM of the maps"}


def sanity_figure(check: SanityCheck, metric: str = "spearman", step: int | None = None, titles=None):
    """One line per method: similarity to the trained model's map over the cascade; a marker at ``step``."""
    go = require("plotly.graph_objects", "dashboard", feature="the lesson's charts")

    x = ["trained"] + [f"+{u}" for u in check.units]
    fig = go.Figure()
    for method in check.methods:
        name = titles(method) if titles else method
        fig.add_trace(go.Scatter(x=x, y=check.series(metric, method), mode="lines+markers", name=name))
    if step is not None:
        fig.add_vline(x=step, line_dash="dot", line_color="#888")
    fig.update_layout(
        height=360, margin=dict(l=8, r=8, t=8, b=8), legend=dict(orientation="h", y=-0.25),
        yaxis=dict(title=SANITY_METRICS.get(metric, metric), range=[-1.05, 1.05]),
        xaxis=dict(title="layers re-initialised, from the top (cumulative)"),
    )
    return fig


def coverage_sentence(study: MultiInstanceStudy, a: str = "gradcam", b: str = "gradcam++",
                      titles=None) -> str:
    """A plain statement of which method covered more instances on this set (never assumed)."""
    ta, tb = (titles(a), titles(b)) if titles else (a, b)
    ca, cb, n = study.covered(a), study.covered(b), study.instances
    if cb > ca:
        verdict = f"{tb} covers more instances than {ta}"
    elif cb < ca:
        verdict = f"{tb} covers fewer instances than {ta}: here the paper's claim does not hold"
    else:
        verdict = f"{tb} and {ta} cover the same number of instances"
    return f"On these {len(study.images)} images, {verdict} ({cb} vs {ca} of {n})."


def sanity_sentence(check: SanityCheck, titles=None) -> str:
    """What the cascade shows, in words, from its own numbers: the methods ranked by ρ after the top
    layer alone and after every layer (never assumed)."""
    name = titles or (lambda m: m)

    def ranked(step: int) -> str:
        values = check.steps[step].spearman
        order = sorted(values, key=lambda m: values[m], reverse=True)
        return ", ".join(f"{name(m)} {values[m]:.2f}" for m in order)

    if len(check.steps) < 2:
        return "This model has no layer to re-initialise."
    text = f"Re-initialising only the top layer (`{check.units[0]}`) leaves ρ = {ranked(1)}."
    if len(check.steps) > 2:
        text += f" With all {len(check.units)} layers re-initialised: {ranked(-1)}."
    return text


# --------------------------------------------------------------------------------------------------
# Two models look differently: the shortcut model, a CNN and a vision transformer


@dataclass(frozen=True)
class ShortcutRow:
    model: str
    marked: bool
    label: str  # the predicted class
    probability: float
    map: np.ndarray  # the method's map for the predicted class, at the input view
    mark_share: float  # share of the map's mass on the mark's box


@dataclass(frozen=True)
class ShortcutLesson:
    clean: Image.Image
    marked: Image.Image
    true_label: str
    box: tuple[int, int, int, int]  # the mark, in input-view pixels
    rows: list[ShortcutRow]


def mark_share(values: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Σ map inside ``box`` (x0, y0, x1, y1) / Σ map: the share of the evidence on the box."""
    values = np.clip(np.asarray(values, np.float64), 0, None)
    x0, y0, x1, y1 = box
    total = values.sum()
    return float(values[y0:y1, x0:x1].sum() / total) if total > 0 else 0.0


def shortcut_lesson(clean_bundle, shortcut_bundle, index: int = 0, method: str = "gradcam") -> ShortcutLesson:
    """A test shape that is not a star, with and without the shortcut mark, through the clean model
    and the shortcut model (trained with the mark on every star): the shortcut model calls the marked
    image a star and its map sits on the mark."""
    from .data.shapes import CLASSES, IMAGE_SIZE, MARK_BOX, apply_mark, make_sample

    found, i = 0, 0
    while True:
        sample = make_sample("test", i)
        i += 1
        if CLASSES[sample.label] != "star":
            if found == index:
                break
            found += 1
    images = {False: sample.image, True: apply_mark(sample).image}
    rows = []
    for bundle in (clean_bundle, shortcut_bundle):
        for marked, image in images.items():
            result = explain(bundle, image, methods=[method])
            top = result.top_k(1)[0]
            view_w, view_h = result.view().size
            sx, sy = view_w / IMAGE_SIZE, view_h / IMAGE_SIZE
            box = (int(MARK_BOX[0] * sx), int(MARK_BOX[1] * sy), math.ceil(MARK_BOX[2] * sx),
                   math.ceil(MARK_BOX[3] * sy))
            rows.append(ShortcutRow(model=bundle.name, marked=marked, label=top[1], probability=top[2],
                                    map=result.maps[method], mark_share=mark_share(result.maps[method], box)))
    return ShortcutLesson(clean=images[False], marked=images[True], true_label=CLASSES[sample.label],
                          box=box, rows=rows)
