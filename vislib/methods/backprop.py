"""The backprop family: input-space signals from one forward and one backward pass per ReLU rule.

Gradient, Deconvnet and guided backprop are the same autograd computation with a different rule at
every ReLU (R = the signal coming down, f = the ReLU's input; shared METHODS.md):

=================  =========================
gradient           ``1[f>0] · R``
deconvnet          ``relu(R)``
guided backprop    ``1[f>0] · 1[R>0] · R``
=================  =========================

Max-pool backward in autograd *is* Zeiler & Fergus's unpooling with switches and conv backward *is*
the transposed filter, so swapping the ReLU rule is all a Deconvnet needs. The rules are applied by
a thread-local torch-function mode that never touches the shared model (:mod:`.relu_rules`).

**Activations other than ReLU** (GELU, SiLU, Hardswish, ReLU6, sigmoid, tanh) keep their ordinary
gradient under every rule: the papers define the rules for ReLU only. On ConvNeXt (GELU) or
EfficientNet (SiLU), which have no ReLU, Deconvnet and guided backprop *are* the gradient; on
MobileNet-V3 only its ReLUs follow the rule. The extras say which: ``relus_intercepted`` (ReLU calls
given the rule), ``other_activations`` (calls of other activations, by name, left with their
gradient) and a ``note`` when the rule had nothing or only part of the network to act on.

One forward serves every method of the family that explains the clean input: gradient, Deconvnet,
guided backprop, guided Grad-CAM, Input × Gradient and FullGrad (one backward per distinct rule;
FullGrad's bias-gradients come from the gradient rule's backward, see :mod:`.fullgrad`). SmoothGrad
(modes mean, square, var) and Integrated Gradients run their own batched passes; LRP runs on a
private copy of the model (:mod:`.lrp`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from typing import ClassVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import MethodError
from ..hooks import Captured, capture_layer, resolve_layer
from . import fullgrad as fg
from .base import (
    ExplainContext,
    Method,
    MethodResult,
    Stopwatch,
    get_method,
    register_method,
)
from .registry import register_family
from .relu_rules import (  # noqa: F401  (re-exported: features.py, lessons.py and tests import them here)
    RULES,
    ReluRule,
    activation_report,
    check_rule_reached,
    relu_rule,
)

# --------------------------------------------------------------------------------------------------
# Passes


@dataclass
class BackpropPass:
    """What :func:`backprop_pass` returns: one input-space signal per rule, optionally the target
    layer's activation and plain gradient (for Grad-CAM), and the captured outputs of
    ``capture_modules`` with their plain gradients (for FullGrad)."""

    logits: torch.Tensor
    signals: dict[str, torch.Tensor]
    activation: torch.Tensor | None = None
    layer_gradient: torch.Tensor | None = None
    relus: int = 0
    forward_seconds: float = 0.0
    backward_seconds: dict[str, float] = field(default_factory=dict)
    state: ReluRule = field(default_factory=ReluRule)
    outputs: list[tuple[nn.Module, torch.Tensor]] = field(default_factory=list)
    output_gradients: list[torch.Tensor | None] = field(default_factory=list)
    score: torch.Tensor | None = None  # the per-sample scores explained


def backprop_pass(
    bundle,
    x: torch.Tensor,
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    rules: list[str],
    *,
    layer_module: nn.Module | None = None,
    layer_view=None,
    capture_modules: Sequence[nn.Module] = (),
) -> BackpropPass:
    """One forward of ``x`` and one backward to the input per rule (no parameter gradients).

    ``score_fn(logits)`` gives the per-sample scores to explain. With ``layer_module`` the layer's
    activation is recorded and its plain gradient ``∂S/∂A`` computed (a backward that stops there).
    With ``capture_modules`` (the ``"gradient"`` rule must be among ``rules``) their outputs are
    recorded with their graph, and the gradient rule's one ``torch.autograd.grad`` call returns ∂S/∂x
    and every ∂S/∂z of them.
    """
    if capture_modules and "gradient" not in rules:
        raise ValueError("capture_modules needs the gradient rule")
    x = x.detach().requires_grad_(True)
    needs_mode = any(r != "gradient" for r in rules)
    mode = relu_rule("gradient") if needs_mode else nullcontext(ReluRule())
    capture: AbstractContextManager[Captured]
    if layer_module is not None:
        capture = capture_layer(layer_module, keep_graph=True, view=layer_view)
    else:
        capture = nullcontext(Captured())
    outputs = fg.capture_outputs(capture_modules) if capture_modules else nullcontext(fg.CapturedOutputs())
    with bundle.lock, Stopwatch(bundle.device) as forward:
        with capture as captured, outputs as recorded, mode as state, torch.enable_grad():
            logits = bundle.logits(x)
    for rule in rules:
        check_rule_reached(bundle.model, state, rule)
    with torch.enable_grad():
        scores = score_fn(logits)
        score = scores.sum()
    result = BackpropPass(logits.detach(), {}, relus=state.count, forward_seconds=forward.seconds,
                          state=state, score=scores.detach())
    steps = list(rules)
    if layer_module is not None:
        if captured.activation is None:
            raise MethodError("the target layer did not run during the forward pass")
        steps.insert(0, "layer")
    for i, name in enumerate(steps):
        keep = i < len(steps) - 1
        state.rule = "gradient" if name == "layer" else name
        with Stopwatch(bundle.device) as backward:
            if name == "layer":
                activation = captured.activation
                assert activation is not None  # checked after the forward
                (g,) = torch.autograd.grad(score, activation, retain_graph=keep)
                result.activation, result.layer_gradient = activation.detach(), g
            elif name == "gradient" and recorded.calls:
                tensors = [out for _, out in recorded.calls]
                g, *rest = torch.autograd.grad(score, [x, *tensors], retain_graph=keep, allow_unused=True)
                result.signals[name] = g
                result.outputs = [(module, out.detach()) for module, out in recorded.calls]
                result.output_gradients = list(rest)  # None where a module's output was unused
            else:
                (g,) = torch.autograd.grad(score, x, retain_graph=keep)
                result.signals[name] = g
        result.backward_seconds[name] = backward.seconds
    return result


def gradcam_map(A: torch.Tensor, g: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ReLU(Σ_k mean_ij(g^k) A^k), bilinearly upsampled to ``size``: N×H×W."""
    cam = F.relu(torch.einsum("nc,nchw->nhw", g.mean(dim=(2, 3)), A))
    return F.interpolate(cam.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def display_map(signal: torch.Tensor, percentile: float = 99.5) -> torch.Tensor:
    """N×H×W display map of an N×3×H×W signal: max |·| over channels, clipped at a per-sample
    percentile so that a few extreme pixels do not wash the rest out."""
    mag = signal.detach().abs().amax(dim=1)
    flat = mag.flatten(1)
    top = flat.amax(dim=1)
    k = min(flat.shape[1], max(1, math.ceil(percentile / 100.0 * flat.shape[1])))
    q = flat.kthvalue(k, dim=1).values  # no size limit, unlike torch.quantile
    q = torch.where(q > 0, q, top)
    return torch.minimum(mag, q.view(-1, 1, 1))


@lru_cache(maxsize=32)
def gauss_legendre(steps: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Nodes and weights of the ``steps``-point Gauss–Legendre rule on [0, 1] (weights sum to 1)."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return tuple((nodes + 1.0) / 2.0), tuple(weights / 2.0)


# --------------------------------------------------------------------------------------------------
# Methods


class BackpropMethod(Method):
    """Template for the family: options are checked against ``defaults``. Most methods are computed by
    the family runner from shared passes; a ``standalone`` one computes itself in :meth:`run`."""

    family = "backprop"
    rule: ClassVar[str] = "gradient"
    defaults: ClassVar[dict] = {}
    standalone: ClassVar[bool] = False
    passes: ClassVar[str] = ""  # the passes it costs, for listings

    def __init__(self, **options):
        self.check_options(options, self.defaults)
        super().__init__(**{**self.defaults, **options})

    def run(self, ctx: ExplainContext) -> MethodResult:
        raise NotImplementedError(f"{self.name} is computed by the family runner")


@register_method
class Gradient(BackpropMethod):
    """Saliency (Simonyan et al. 2014): ∂S/∂x, every ReLU passing ``1[f>0]·R``."""

    name = "gradient"
    passes = "1 fwd + 1 bwd"
    uses_layer = False
    title = "Gradient (saliency)"
    paper = "Simonyan et al. 2014, Deep Inside Convolutional Networks"
    rule = "gradient"


@register_method
class Deconvnet(BackpropMethod):
    """Deconvnet (Zeiler & Fergus, ECCV 2014): autograd with every ReLU passing ``relu(R)``
    (max-pool backward = unpooling with switches, conv backward = transposed filters)."""

    name = "deconvnet"
    passes = "+ 1 bwd (shares the forward)"
    uses_layer = False
    title = "Deconvnet"
    paper = "Zeiler & Fergus 2014, Visualizing and Understanding Convolutional Networks"
    rule = "deconvnet"


@register_method
class GuidedBackprop(BackpropMethod):
    """Guided backpropagation (Springenberg et al. 2015): every ReLU passes ``1[f>0]·1[R>0]·R``."""

    name = "guided_backprop"
    passes = "+ 1 bwd (shares the forward)"
    uses_layer = False
    title = "Guided backprop"
    paper = "Springenberg et al. 2015, Striving for Simplicity: The All Convolutional Net"
    rule = "guided"


@register_method
class GuidedGradCAM(BackpropMethod):
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backprop ⊙ up(ReLU(Grad-CAM)), with Grad-CAM
    at the target layer (bilinear upsampling). Reuses the CAM family's pass when it ran."""

    name = "guided_gradcam"
    passes = "shares guided backprop's and Grad-CAM's"
    title = "Guided Grad-CAM"
    paper = "Selvaraju et al. 2017, Grad-CAM"
    rule = "guided"


@register_method
class InputXGradient(BackpropMethod):
    """Input × Gradient (Shrikumar et al. 2016; Captum InputXGradient): ``x ⊙ ∂S/∂x``, x in the model's
    normalised input space. Shares the forward and the gradient backward of the family."""

    name = "input_x_gradient"
    passes = "shares the gradient's forward and backward"
    uses_layer = False
    title = "Input × Gradient"
    paper = "Shrikumar et al. 2016, Not Just a Black Box: Learning Important Features Through Propagating …"
    rule = "gradient"


@register_method
class FullGrad(BackpropMethod):
    """FullGrad (Srinivas & Fleuret 2019): ψ(|x ⊙ ∇ₓS|) + Σ_l Σ_c ψ(|b_lc · ∂S/∂z_lc|) over the
    convolution and batch-norm layers with a bias (batch norm folded: β − γμ/√(σ²+ε)), all gradients
    from one backward. ψ: ``psi="channel"`` (pytorch-grad-cam: per-channel min-max, bilinear up) or
    ``"layer"`` (the authors' code: per-layer min-max, ``align_corners=True``). Completeness
    S = ∇ₓS·x + Σ b·∂S/∂b (exact on piecewise-linear nets) is checked: its parts and gap are in extras."""

    name = "fullgrad"
    passes = "shares the gradient's forward and backward"
    uses_layer = False
    title = "FullGrad"
    paper = "Srinivas & Fleuret 2019, Full-Gradient Representation for Neural Network Visualization"
    rule = "gradient"
    defaults = {"psi": "channel"}


SMOOTHGRAD_BASES = ("gradient", "deconvnet", "guided_backprop", "guided_gradcam", "input_x_gradient",
                    "integrated_gradients")
SMOOTHGRAD_MODES = ("mean", "square", "var")


@register_method
class SmoothGrad(BackpropMethod):
    """SmoothGrad (Smilkov et al. 2017) over ``n_samples`` noisy copies x + N(0, σ²) of a base method's
    attribution a, σ = ``level``·(max(x) − min(x)) per image, in the model's normalised input space.
    ``mode``: "mean" E[a] (SmoothGrad), "square" E[a²] (SmoothGrad², Hooker et al. 2019) or "var"
    E[a²] − E[a]² (VarGrad, Adebayo et al. 2018), as Captum's NoiseTunnel defines them. The copies go
    through the model in batches of ``batch_size``; ``seed`` makes it reproducible."""

    name = "smoothgrad"
    passes = "n_samples × the base's, batched"
    uses_layer = False  # unless its base is guided_gradcam
    slow = True
    title = "SmoothGrad"
    paper = "Smilkov et al. 2017, SmoothGrad: removing noise by adding noise"
    defaults = {"base": "gradient", "n_samples": 50, "level": 0.15, "batch_size": 16, "seed": 0,
                "base_options": None, "mode": "mean"}


@register_method
class IntegratedGradients(BackpropMethod):
    """Integrated Gradients (Sundararajan et al. 2017): (x − x')·∫₀¹ ∂S(x' + α(x − x'))/∂x dα by
    ``steps``-point Gauss–Legendre quadrature (weights sum to one), path points in batches of
    ``batch_size``. ``baseline``: "zeros" (zeros of the normalised input), "black" (a black image),
    "blur" (the image blurred with σ = ``blur_sigma`` px, default size/25) or a tensor. Completeness
    Σ IG = S(x) − S(x') is checked: the gap is reported in extras."""

    name = "integrated_gradients"
    passes = "steps fwd + bwd, batched"
    uses_layer = False
    slow = True
    title = "Integrated Gradients"
    paper = "Sundararajan et al. 2017, Axiomatic Attribution for Deep Networks"
    defaults = {"baseline": "zeros", "steps": 32, "batch_size": 16, "blur_sigma": None}


def _positive_int(method: str, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise MethodError(f"{method}: option {key} must be a positive integer, not {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------------
# Integrated Gradients


def make_baseline(bundle, x: torch.Tensor, baseline, blur_sigma: float | None = None) -> torch.Tensor:
    """The IG baseline x' for the batch ``x`` (N×3×H×W)."""
    if isinstance(baseline, torch.Tensor):
        base = baseline.to(x.device, torch.float32)
        try:
            return torch.broadcast_to(base, x.shape).clone()
        except RuntimeError:
            raise MethodError(
                f"integrated_gradients: a baseline of shape {tuple(base.shape)} does not fit the input "
                f"{tuple(x.shape)}"
            ) from None
    if baseline == "zeros":
        return torch.zeros_like(x)
    if baseline == "black":
        h, w = x.shape[-2:]
        black = bundle.prepare([Image.new("RGB", (w, h))])[0].to(x.device, torch.float32)
        if black.shape[1:] != x.shape[1:]:
            raise MethodError("integrated_gradients: the model's preprocessing does not keep the size of a "
                              "black image; pass the baseline as a tensor")
        return black.expand_as(x).clone()
    if baseline == "blur":
        return gaussian_blur(x, blur_sigma or max(1.0, max(x.shape[-2:]) / 25.0))
    raise MethodError(f"integrated_gradients: baseline must be 'zeros', 'black', 'blur' or a tensor, "
                      f"not {baseline!r}")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (radius 3σ, capped by the image size)."""
    h, w = x.shape[-2:]
    radius = max(1, min(int(math.ceil(3 * sigma)), h - 1, w - 1))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    out = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def integrated_gradients(
    ctx: ExplainContext, x: torch.Tensor, samples: torch.Tensor | None = None, *,
    baseline="zeros", steps: int = 32, batch_size: int = 16, blur_sigma: float | None = None,
    report: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, dict]:
    """IG of the batch ``x`` for the context's bound target (rows of ``x`` belong to the images
    ``samples``; default: one row per image): (N×3×H×W attributions, completeness numbers)."""
    bundle = ctx.bundle
    x = x.detach()
    n = x.shape[0]
    x0 = make_baseline(bundle, x, baseline, blur_sigma)
    nodes, weights = gauss_legendre(steps)
    alphas = torch.tensor(nodes, device=x.device, dtype=x.dtype)
    w = torch.tensor(weights, device=x.device, dtype=x.dtype)
    owner = torch.arange(n, device=x.device) if samples is None else samples.to(x.device)
    sample = torch.arange(n, device=x.device).repeat_interleave(steps)  # path point → row of x
    alpha, weight = alphas.repeat(n), w.repeat(n)
    total = torch.zeros_like(x)
    delta = x - x0
    for start in range(0, n * steps, batch_size):
        idx = slice(start, min(start + batch_size, n * steps))
        s, a = sample[idx], alpha[idx]
        points = x0[s] + a.view(-1, 1, 1, 1) * delta[s]
        def path_scores(lg: torch.Tensor, rows: torch.Tensor = owner[s]) -> torch.Tensor:
            return ctx.row_scores(lg, rows)

        result = backprop_pass(bundle, points, path_scores, ["gradient"])
        total.index_add_(0, s, result.signals["gradient"] * weight[idx].view(-1, 1, 1, 1))
        if report is not None:
            report(idx.stop)
    attributions = delta * total
    with bundle.lock, torch.no_grad():
        f_x = ctx.row_scores(bundle.logits(x), owner)
        f_x0 = ctx.row_scores(bundle.logits(x0), owner)
    gap = attributions.flatten(1).sum(dim=1) - (f_x - f_x0)
    numbers = {
        "sum_attributions": attributions.flatten(1).sum(dim=1),
        "score_difference": f_x - f_x0,
        "completeness_gap": gap,
    }
    return attributions, numbers


# --------------------------------------------------------------------------------------------------
# The family runner


def _rule_of(name: str) -> str:
    return cast("type[BackpropMethod]", get_method(name)).rule  # a backprop-family name


DIRECT = ("gradient", "deconvnet", "guided_backprop", "guided_gradcam", "input_x_gradient", "fullgrad")


@register_family("backprop")
def run_backprop_family(ctx: ExplainContext, names: list[str], options: dict) -> dict[str, MethodResult]:
    """All requested backprop-family methods; the plain-input ones share one forward pass."""
    bundle = ctx.bundle
    # the family "backprop" names are BackpropMethod classes
    methods = cast("dict[str, BackpropMethod]", {n: get_method(n)(**(options.get(n) or {})) for n in names})
    results: dict[str, MethodResult] = {}
    direct = [n for n in names if n in DIRECT]
    if direct:
        results.update(_run_direct(ctx, direct, {n: methods[n].options for n in direct}))
    for name, method in methods.items():
        if method.standalone:  # e.g. LRP, on its own copy of the model
            results[name] = method.run(ctx)
    if ctx.logits is None:
        with bundle.lock, torch.no_grad(), Stopwatch(bundle.device) as sw:
            ctx.set_logits(bundle.logits(ctx.inputs))
        ctx.pass_timings["forward"] = sw.seconds
    if "integrated_gradients" in methods:
        results["integrated_gradients"] = _run_ig(ctx, methods["integrated_gradients"].options)
    if "smoothgrad" in methods:
        results["smoothgrad"] = _run_smoothgrad(ctx, methods["smoothgrad"].options, options)
    return results


def _cam_pass_for(ctx: ExplainContext):
    shared = ctx.shared.get("cam_pass")
    if shared and shared.get("layer") == ctx.layer and shared.get("gradient") is not None:
        return shared["activation"], shared["gradient"]
    return None


def direct_pass(ctx: ExplainContext, names: list[str], options: dict[str, dict], *,
                with_layer: bool = False) -> BackpropPass:
    """The one forward (and one backward per distinct rule) that every method of :data:`DIRECT` in
    ``names`` reads; ``with_layer`` also records the target layer's A and ∂S/∂A on the same graph
    (guided Grad-CAM, and the CAM family when the two families share the forward)."""
    rules = list(dict.fromkeys(_rule_of(n) for n in names))
    if "fullgrad" in names and options["fullgrad"]["psi"] not in fg.PSI:
        psi = options["fullgrad"]["psi"]
        raise MethodError(f"fullgrad: psi must be one of {', '.join(fg.PSI)}, not {psi!r}")
    layer_module = resolve_layer(ctx.bundle, ctx.layer)[1] if with_layer else None
    capture = fg.bias_layers(ctx.bundle.model) if "fullgrad" in names else ()
    passed = backprop_pass(ctx.bundle, ctx.inputs, ctx.class_score, rules, layer_module=layer_module,
                           layer_view=ctx.bundle.view(ctx.layer), capture_modules=capture)
    key = "backprop_forward" if ctx.pass_timings.get("forward") is not None else "forward"
    ctx.pass_timings[key] = passed.forward_seconds
    for rule, seconds in passed.backward_seconds.items():
        ctx.pass_timings["backward" if rule == "layer" else f"backward_{rule}"] = seconds
    return passed


def _reusable(passed: BackpropPass | None, names: list[str], cam_pass) -> bool:
    """Whether a pass recorded earlier (shared with the CAM family, or cached) serves ``names``."""
    if passed is None:
        return False
    rules = {_rule_of(n) for n in names}
    return (rules <= set(passed.signals) and ("fullgrad" not in names or bool(passed.outputs))
            and ("guided_gradcam" not in names or cam_pass is not None or passed.activation is not None))


def _run_direct(ctx: ExplainContext, names: list[str], options: dict[str, dict]) -> dict[str, MethodResult]:
    """The methods of :data:`DIRECT` on the clean input: one forward, one backward per distinct rule
    (guided backprop and guided Grad-CAM share theirs; gradient, Input × Gradient and FullGrad theirs,
    FullGrad's bias-gradients included), or a pass recorded earlier for them (``ctx.shared``)."""
    reuse = _cam_pass_for(ctx) if "guided_gradcam" in names else None
    passed = ctx.shared.get("direct_pass")
    fresh = not _reusable(passed, names, reuse)
    if fresh:
        passed = direct_pass(ctx, names, options, with_layer="guided_gradcam" in names and reuse is None)
        ctx.shared["direct_pass"] = passed
    assert passed is not None  # reused only when _reusable() found it
    ctx.check_cancel()
    results = {}
    for name in names:
        rule = _rule_of(name)
        with Stopwatch(ctx.bundle.device) as sw:
            signal = passed.signals[rule]
            extra = {"relus_intercepted": passed.relus, "rule": rule}
            if rule != "gradient":
                extra.update(activation_report(passed.state, rule))
            if name == "guided_gradcam":
                A, g = reuse if reuse is not None else (passed.activation, passed.layer_gradient)
                assert A is not None and g is not None  # the pass ran with the layer when none was reused
                size = (int(signal.shape[-2]), int(signal.shape[-1]))
                signal = signal * gradcam_map(A, g, size).unsqueeze(1)
                extra["gradcam_pass"] = "shared with the CAM family" if reuse is not None else "own"
            elif name == "input_x_gradient":
                signal = ctx.inputs.detach() * signal
            if name == "fullgrad":
                signal, extra = _fullgrad_result(ctx.inputs, passed, options["fullgrad"]["psi"])
            else:
                extra["display"] = display_map(signal)
        charged = passed.backward_seconds[rule] if fresh else 0.0  # a reused backward cost nothing now
        results[name] = MethodResult(signal.detach(), sw.seconds + charged, extra)
    return results


def _fullgrad_result(x: torch.Tensor, passed: BackpropPass, psi: str) -> tuple[torch.Tensor, dict]:
    """FullGrad's N×H×W map and its extras (completeness numbers per sample) from a shared pass."""
    grad_x = passed.signals["gradient"]
    modules = [module for module, _ in passed.outputs]
    terms = fg.bias_terms(passed.outputs, passed.output_gradients)
    fullmap, spatial = fg.fullgrad_map(x, grad_x, terms, psi)
    assert passed.score is not None  # backprop_pass records the scores
    numbers = fg.completeness(x, grad_x, terms, passed.score)
    extra: dict[str, object] = {k: v.tolist() for k, v in numbers.items()}
    gap = numbers["completeness_gap"].abs() / numbers["score"].abs().clamp_min(1e-12)
    extra["relative_gap"] = gap.tolist()
    extra.update(psi=psi, bias_layers=len(dict.fromkeys(modules)), spatial_terms=spatial,
                 display=fullmap)
    return fullmap, extra


def _run_ig(ctx: ExplainContext, opts: dict) -> MethodResult:
    steps = _positive_int("integrated_gradients", "steps", opts["steps"])
    batch = _positive_int("integrated_gradients", "batch_size", opts["batch_size"])
    n = ctx.inputs.shape[0]
    with Stopwatch(ctx.bundle.device) as sw:
        ig, numbers = integrated_gradients(
            ctx, ctx.inputs, baseline=opts["baseline"], steps=steps,
            batch_size=batch, blur_sigma=opts["blur_sigma"], report=lambda done: ctx.report(done, n * steps),
        )
        extra = {k: v.tolist() for k, v in numbers.items()}
        extra["relative_gap"] = (numbers["completeness_gap"].abs()
                                 / numbers["score_difference"].abs().clamp_min(1e-12)).tolist()
        extra["baseline"] = opts["baseline"] if isinstance(opts["baseline"], str) else "tensor"
        extra["steps"] = steps
        extra["display"] = display_map(ig)
    return MethodResult(ig.detach(), sw.seconds, extra)


def _run_smoothgrad(ctx: ExplainContext, opts: dict, all_options: dict) -> MethodResult:
    base, mode = opts["base"], opts["mode"]
    if base not in SMOOTHGRAD_BASES:
        raise MethodError(f"smoothgrad: base must be one of {', '.join(SMOOTHGRAD_BASES)}, not {base!r}")
    if mode not in SMOOTHGRAD_MODES:
        raise MethodError(f"smoothgrad: mode must be one of {', '.join(SMOOTHGRAD_MODES)}, not {mode!r}")
    n_samples = _positive_int("smoothgrad", "n_samples", opts["n_samples"])
    batch = _positive_int("smoothgrad", "batch_size", opts["batch_size"])
    level = float(opts["level"])
    if not (math.isfinite(level) and level >= 0):
        raise MethodError(f"smoothgrad: level must be a non-negative number, not {opts['level']!r}")
    base_defaults = cast("type[BackpropMethod]", get_method(base)).defaults  # a backprop-family base
    base_opts = {**base_defaults, **(all_options.get(base) or {}), **(opts["base_options"] or {})}
    get_method(base)(**base_opts)  # validates the base's options
    x = ctx.inputs.detach()
    n = x.shape[0]
    sigma = level * (x.flatten(1).amax(dim=1) - x.flatten(1).amin(dim=1))
    gen = torch.Generator(device=x.device).manual_seed(int(opts["seed"]))
    # E[a] and E[a²] accumulate in float64: VarGrad's E[a²] − E[a]² cancels
    total = torch.zeros_like(x, dtype=torch.float64)
    squares = torch.zeros_like(total) if mode != "mean" else None
    copies = n * n_samples
    sample = torch.arange(n, device=x.device).repeat(n_samples)  # copy → image
    with Stopwatch(ctx.bundle.device) as sw:
        for start in range(0, copies, batch):
            s = sample[start:start + batch]
            noise = torch.randn((s.numel(), *x.shape[1:]), generator=gen, device=x.device, dtype=x.dtype)
            noisy = x[s] + sigma[s].view(-1, 1, 1, 1) * noise
            a = _base_signal(ctx, base, base_opts, noisy, s).double()
            total.index_add_(0, s, a)
            if squares is not None:
                squares.index_add_(0, s, a * a)
            ctx.report(min(start + batch, copies), copies)
        mean = total / n_samples
        if mode == "mean":
            out = mean
        elif mode == "square":
            assert squares is not None  # kept for every mode but "mean"
            out = squares / n_samples
        else:  # a variance: never below zero, whatever the rounding
            assert squares is not None
            out = (squares / n_samples - mean * mean).clamp_min_(0)
        out = out.to(x.dtype)
        extra = {"base": base, "mode": mode, "n_samples": n_samples, "level": level, "sigma": sigma.tolist(),
                 "sigma_space": "normalised model input", "display": display_map(out)}
    return MethodResult(out.detach(), sw.seconds, extra)


def _base_signal(ctx: ExplainContext, base: str, opts: dict, x: torch.Tensor, samples: torch.Tensor):
    """The base method's input-space signal for a batch of (noisy) inputs of the images ``samples``."""
    if base == "integrated_gradients":
        ig, _ = integrated_gradients(
            ctx, x, samples, baseline=opts["baseline"],
            steps=_positive_int(base, "steps", opts["steps"]),
            batch_size=_positive_int(base, "batch_size", opts["batch_size"]), blur_sigma=opts["blur_sigma"],
            report=lambda done: ctx.check_cancel(),
        )
        return ig
    rule = _rule_of(base)
    layer_module = resolve_layer(ctx.bundle, ctx.layer)[1] if base == "guided_gradcam" else None
    passed = backprop_pass(ctx.bundle, x, lambda lg: ctx.row_scores(lg, samples), [rule],
                           layer_module=layer_module, layer_view=ctx.bundle.view(ctx.layer))
    signal = passed.signals[rule]
    if base == "guided_gradcam":
        assert passed.activation is not None and passed.layer_gradient is not None  # run with the layer
        cam = gradcam_map(passed.activation, passed.layer_gradient, (int(x.shape[-2]), int(x.shape[-1])))
        signal = signal * cam.unsqueeze(1)
    elif base == "input_x_gradient":
        signal = x.detach() * signal  # the noisy copy times its gradient (Captum NoiseTunnel(InputXGradient))
    return signal


# LRP is a method of this family computed on its own (a private copy of the model, through zennit);
# imported last so that it is registered right after the family's other methods.
from . import lrp  # noqa: E402, F401
