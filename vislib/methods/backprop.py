"""The backprop family: input-space signals from one forward and one backward pass per ReLU rule.

Gradient, Deconvnet and guided backprop are the same autograd computation with a different rule at
every ReLU (R = the signal coming down, f = the ReLU's input; shared METHODS.md):

=================  =========================
gradient           ``1[f>0] · R``
deconvnet          ``relu(R)``
guided backprop    ``1[f>0] · 1[R>0] · R``
=================  =========================

Max-pool backward in autograd *is* Zeiler & Fergus's unpooling with switches and conv backward *is*
the transposed filter, so swapping the ReLU rule is all a Deconvnet needs.

Mechanism: :func:`relu_rule` activates a :class:`torch.overrides.TorchFunctionMode` for the duration
of one forward pass. Mode stacks are thread-local, so only the calling thread's forward is affected;
the shared model is never touched. The mode redirects every ReLU that reaches ``__torch_function__``
(``nn.ReLU`` → ``F.relu``, ``torch.relu``/``torch.relu_``, ``Tensor.relu``/``Tensor.relu_``) to an
autograd Function whose backward reads the rule from a per-call :class:`ReluRule` when the backward
runs. One forward can therefore serve several rules (one backward each, ``retain_graph`` between
them). Not reached: ReLUs inside compiled graphs and direct ``torch.ops.aten.relu`` calls; a model
with ``nn.ReLU`` modules where no ReLU was intercepted raises a :class:`MethodError` instead of
silently returning the plain gradient. Other activations (GELU, SiLU, Hardswish) keep their
ordinary gradient under every rule, as in the papers, which define the rules for ReLU only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import MethodError
from ..hooks import Captured, capture_layer, resolve_layer
from .base import (
    ExplainContext,
    Method,
    MethodResult,
    Stopwatch,
    get_method,
    register_method,
    target_scores,
)
from .registry import register_family

RULES = ("gradient", "deconvnet", "guided", "identity")
_threshold_backward = torch.ops.aten.threshold_backward.default


# --------------------------------------------------------------------------------------------------
# The ReLU rule: a thread-local torch-function mode and an autograd Function


@dataclass
class ReluRule:
    """Per-call state shared by the intercepted ReLUs of one forward pass.

    ``rule`` is read when the backward runs (so one forward serves several rules); ``count`` is the
    number of ReLUs intercepted during the forward.
    """

    rule: str = "gradient"
    count: int = 0
    linearize_pools: bool = False
    frozen_norms: bool = False

    def __post_init__(self):
        if self.rule not in RULES:
            raise MethodError(f"unknown ReLU rule {self.rule!r}; one of {RULES}")


class _RuleReLU(torch.autograd.Function):
    """ReLU whose backward applies ``state.rule`` (the forward is the ordinary ReLU)."""

    @staticmethod
    def forward(ctx, x, state, inplace):
        if inplace:
            ctx.mark_dirty(x)
            out = x.relu_()
        else:
            out = x.relu()
        ctx.save_for_backward(out)
        ctx.state = state
        return out

    @staticmethod
    def backward(ctx, R):
        (out,) = ctx.saved_tensors
        rule = ctx.state.rule
        if rule == "gradient":
            grad = _threshold_backward(R, out, 0)  # 1[f>0]·R (f>0 ⇔ out>0)
        elif rule == "deconvnet":
            grad = R.clamp_min(0)
        elif rule == "guided":
            grad = _threshold_backward(R, out, 0).clamp_min_(0)  # a fresh tensor: safe in place
        else:  # "identity": used to find receptive fields
            grad = R
        return grad, None, None


def _relu_call(func, args, kwargs) -> tuple[torch.Tensor, bool]:
    """(input, inplace) of any ReLU call the mode intercepts."""
    x = args[0] if args else kwargs["input"]
    if func is F.relu:
        inplace = bool(args[1]) if len(args) > 1 else bool(kwargs.get("inplace", False))
    else:
        inplace = func in (torch.relu_, torch.Tensor.relu_)
    return x, inplace


_RELU_FUNCS = frozenset({F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_})
_MAXPOOL_FUNCS = frozenset({F.max_pool2d, torch.max_pool2d})


def _pool_args(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    return input, kernel_size, stride, padding, dilation, ceil_mode, return_indices


def _local_instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                         use_input_stats=True, momentum=0.1, eps=1e-5):
    """Instance norm with its per-image statistics held constant (``frozen_norms``).

    The statistics couple every output to every input pixel, so a gradient probe through a real
    instance norm would call the whole image the receptive field; the geometric receptive field is
    that of the per-pixel affine map the layer applies for this image."""
    dims = tuple(range(2, input.dim()))
    mean = input.mean(dim=dims, keepdim=True).detach()
    var = input.var(dim=dims, unbiased=False, keepdim=True).detach()
    out = (input - mean) / torch.sqrt(var + eps)
    if weight is not None:
        shape = (1, -1) + (1,) * len(dims)
        out = out * weight.view(shape) + bias.view(shape)
    return out


def _local_group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    """Group norm with its per-image statistics held constant (``frozen_norms``); see above."""
    n, c = input.shape[:2]
    grouped = input.reshape(n, num_groups, -1)
    mean = grouped.mean(dim=2, keepdim=True).detach()
    var = grouped.var(dim=2, unbiased=False, keepdim=True).detach()
    out = ((grouped - mean) / torch.sqrt(var + eps)).reshape(input.shape)
    if weight is not None:
        shape = (1, -1) + (1,) * (input.dim() - 2)
        out = out * weight.view(shape) + bias.view(shape)
    return out


class _ReluRuleMode(TorchFunctionMode):
    """Redirects ReLUs (and, for receptive fields, max-pools) of the current thread's forward."""

    def __init__(self, state: ReluRule):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU_FUNCS:
            x, inplace = _relu_call(func, args, kwargs)
            if x.requires_grad and torch.is_grad_enabled():
                self.state.count += 1
                return _RuleReLU.apply(x, self.state, inplace)
        elif self.state.frozen_norms and func is F.instance_norm:
            return _local_instance_norm(*args, **kwargs)
        elif self.state.frozen_norms and func is F.group_norm:
            return _local_group_norm(*args, **kwargs)
        elif self.state.linearize_pools and func in _MAXPOOL_FUNCS:
            x, k, stride, pad, dilation, ceil, indices = _pool_args(*args, **kwargs)
            if not indices and dilation in (1, (1, 1), [1, 1]):
                return F.avg_pool2d(x, k, stride or k, pad, ceil_mode=ceil, count_include_pad=True)
        return func(*args, **kwargs)


@contextmanager
def relu_rule(rule: str = "gradient", *, linearize_pools: bool = False,
              frozen_norms: bool = False) -> Iterator[ReluRule]:
    """Apply a ReLU backward rule to every ReLU of forward passes run in this thread inside the block.

    The yielded :class:`ReluRule` stays bound to the graph built in the block: set ``state.rule``
    before each ``torch.autograd.grad`` call to backpropagate the same forward with another rule.
    ``linearize_pools`` (receptive-field probes only) also turns max-pools into average pools;
    ``frozen_norms`` holds instance-norm statistics constant, so that a signal projected down stays
    inside the geometric receptive field (Zeiler & Fergus projections, receptive-field probes).
    """
    state = ReluRule(rule, linearize_pools=linearize_pools, frozen_norms=frozen_norms)
    with _ReluRuleMode(state):
        yield state


def check_rule_reached(model: nn.Module, state: ReluRule, rule: str) -> None:
    """Refuse a silent fallback to the plain gradient: a model with ``nn.ReLU`` modules where no ReLU
    was intercepted (compiled code, ``torch.ops.aten.relu``) did not see the rule."""
    if rule != "gradient" and state.count == 0 and any(isinstance(m, nn.ReLU) for m in model.modules()):
        raise MethodError(f"the {rule} ReLU rule could not be applied: no ReLU of this model was "
                          f"intercepted (compiled or scripted code is not supported by the backprop family)")


# --------------------------------------------------------------------------------------------------
# Passes


@dataclass
class BackpropPass:
    """What :func:`backprop_pass` returns: one input-space signal per rule, and optionally the
    target layer's activation and plain gradient (for Grad-CAM)."""

    logits: torch.Tensor
    signals: dict[str, torch.Tensor]
    activation: torch.Tensor | None = None
    layer_gradient: torch.Tensor | None = None
    relus: int = 0
    forward_seconds: float = 0.0
    backward_seconds: dict[str, float] = field(default_factory=dict)


def backprop_pass(
    bundle,
    x: torch.Tensor,
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    rules: list[str],
    *,
    layer_module: nn.Module | None = None,
    layer_view=None,
) -> BackpropPass:
    """One forward of ``x`` and one backward to the input per rule (no parameter gradients).

    ``score_fn(logits)`` gives the per-sample scores to explain. With ``layer_module`` the layer's
    activation is recorded and its plain gradient ``∂S/∂A`` computed (a backward that stops there).
    """
    x = x.detach().requires_grad_(True)
    needs_mode = any(r != "gradient" for r in rules)
    mode = relu_rule("gradient") if needs_mode else nullcontext(ReluRule())
    if layer_module is not None:
        capture = capture_layer(layer_module, keep_graph=True, view=layer_view)
    else:
        capture = nullcontext(Captured())
    with bundle.lock, Stopwatch(bundle.device) as forward:
        with capture as captured, mode as state, torch.enable_grad():
            logits = bundle.logits(x)
    for rule in rules:
        check_rule_reached(bundle.model, state, rule)
    with torch.enable_grad():
        score = score_fn(logits).sum()
    result = BackpropPass(logits.detach(), {}, relus=state.count, forward_seconds=forward.seconds)
    outputs = list(rules)
    if layer_module is not None:
        if captured.activation is None:
            raise MethodError("the target layer did not run during the forward pass")
        outputs.insert(0, "layer")
    for i, name in enumerate(outputs):
        keep = i < len(outputs) - 1
        state.rule = "gradient" if name == "layer" else name
        with Stopwatch(bundle.device) as backward:
            if name == "layer":
                (g,) = torch.autograd.grad(score, captured.activation, retain_graph=keep)
                result.activation, result.layer_gradient = captured.activation.detach(), g
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
    """Template for the family: options are checked against ``defaults``."""

    family = "backprop"
    rule: ClassVar[str] = "gradient"
    defaults: ClassVar[dict] = {}

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            valid = ", ".join(self.defaults) or "none"
            raise MethodError(f"{self.name}: unknown option(s) {', '.join(unknown)} (valid: {valid})")
        super().__init__(**{**self.defaults, **options})


@register_method
class Gradient(BackpropMethod):
    """Saliency (Simonyan et al. 2014): ∂S/∂x, every ReLU passing ``1[f>0]·R``."""

    name = "gradient"
    uses_layer = False
    title = "Gradient (saliency)"
    paper = "Simonyan et al. 2014, Deep Inside Convolutional Networks"
    rule = "gradient"


@register_method
class Deconvnet(BackpropMethod):
    """Deconvnet (Zeiler & Fergus, ECCV 2014): autograd with every ReLU passing ``relu(R)``
    (max-pool backward = unpooling with switches, conv backward = transposed filters)."""

    name = "deconvnet"
    uses_layer = False
    title = "Deconvnet"
    paper = "Zeiler & Fergus 2014, Visualizing and Understanding Convolutional Networks"
    rule = "deconvnet"


@register_method
class GuidedBackprop(BackpropMethod):
    """Guided backpropagation (Springenberg et al. 2015): every ReLU passes ``1[f>0]·1[R>0]·R``."""

    name = "guided_backprop"
    uses_layer = False
    title = "Guided backprop"
    paper = "Springenberg et al. 2015, Striving for Simplicity: The All Convolutional Net"
    rule = "guided"


@register_method
class GuidedGradCAM(BackpropMethod):
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backprop ⊙ up(ReLU(Grad-CAM)), with Grad-CAM
    at the target layer (bilinear upsampling). Reuses the CAM family's pass when it ran."""

    name = "guided_gradcam"
    title = "Guided Grad-CAM"
    paper = "Selvaraju et al. 2017, Grad-CAM"
    rule = "guided"


SMOOTHGRAD_BASES = ("gradient", "deconvnet", "guided_backprop", "guided_gradcam", "integrated_gradients")


@register_method
class SmoothGrad(BackpropMethod):
    """SmoothGrad (Smilkov et al. 2017): mean of a base method over ``n_samples`` noisy copies
    x + N(0, σ²), σ = ``level``·(max(x) − min(x)) per image, in the model's normalised input space.
    The copies go through the model in batches of ``batch_size``; ``seed`` makes it reproducible."""

    name = "smoothgrad"
    uses_layer = False  # unless its base is guided_gradcam
    slow = True
    title = "SmoothGrad"
    paper = "Smilkov et al. 2017, SmoothGrad: removing noise by adding noise"
    defaults = {"base": "gradient", "n_samples": 50, "level": 0.15, "batch_size": 16, "seed": 0,
                "base_options": None}


@register_method
class IntegratedGradients(BackpropMethod):
    """Integrated Gradients (Sundararajan et al. 2017): (x − x')·∫₀¹ ∂S(x' + α(x − x'))/∂x dα by
    ``steps``-point Gauss–Legendre quadrature (weights sum to one), path points in batches of
    ``batch_size``. ``baseline``: "zeros" (zeros of the normalised input), "black" (a black image),
    "blur" (the image blurred with σ = ``blur_sigma`` px, default size/25) or a tensor. Completeness
    Σ IG = S(x) − S(x') is checked: the gap is reported in extras."""

    name = "integrated_gradients"
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
    ctx: ExplainContext, x: torch.Tensor, targets: torch.Tensor, contrast: torch.Tensor | None = None, *,
    baseline="zeros", steps: int = 32, batch_size: int = 16, blur_sigma: float | None = None,
    report: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, dict]:
    """IG of the batch ``x`` for ``targets`` (minus ``contrast``'s scores when given): (N×3×H×W
    attributions, completeness numbers)."""
    bundle = ctx.bundle
    x = x.detach()
    n = x.shape[0]
    x0 = make_baseline(bundle, x, baseline, blur_sigma)
    nodes, weights = gauss_legendre(steps)
    alphas = torch.tensor(nodes, device=x.device, dtype=x.dtype)
    w = torch.tensor(weights, device=x.device, dtype=x.dtype)
    sample = torch.arange(n, device=x.device).repeat_interleave(steps)  # path point → image
    alpha, weight = alphas.repeat(n), w.repeat(n)
    total = torch.zeros_like(x)
    delta = x - x0
    for start in range(0, n * steps, batch_size):
        idx = slice(start, min(start + batch_size, n * steps))
        s, a = sample[idx], alpha[idx]
        points = x0[s] + a.view(-1, 1, 1, 1) * delta[s]
        rows = contrast[s] if contrast is not None else None
        result = backprop_pass(bundle, points,
                               lambda lg, s=s, rows=rows: target_scores(ctx.score, lg, targets[s], rows),
                               ["gradient"])
        total.index_add_(0, s, result.signals["gradient"] * weight[idx].view(-1, 1, 1, 1))
        if report is not None:
            report(idx.stop)
    attributions = delta * total
    with bundle.lock, torch.no_grad():
        f_x = target_scores(ctx.score, bundle.logits(x), targets, contrast)
        f_x0 = target_scores(ctx.score, bundle.logits(x0), targets, contrast)
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
    return get_method(name).rule


@register_family("backprop")
def run_backprop_family(ctx: ExplainContext, names: list[str], options: dict) -> dict[str, MethodResult]:
    """All requested backprop-family methods; the plain-input ones share one forward pass."""
    bundle = ctx.bundle
    methods = {n: get_method(n)(**(options.get(n) or {})) for n in names}
    results: dict[str, MethodResult] = {}
    direct = [n for n in names if n in ("gradient", "deconvnet", "guided_backprop", "guided_gradcam")]
    if direct:
        results.update(_run_direct(ctx, direct))
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


def _run_direct(ctx: ExplainContext, names: list[str]) -> dict[str, MethodResult]:
    """gradient / deconvnet / guided_backprop / guided_gradcam of the clean input: one forward, one
    backward per distinct rule (guided backprop and guided Grad-CAM share theirs)."""
    rules = list(dict.fromkeys(_rule_of(n) for n in names))
    reuse = _cam_pass_for(ctx) if "guided_gradcam" in names else None
    layer_module = None
    if "guided_gradcam" in names and reuse is None:
        layer_module = resolve_layer(ctx.bundle, ctx.layer)[1]
    passed = backprop_pass(ctx.bundle, ctx.inputs, ctx.class_score, rules, layer_module=layer_module,
                           layer_view=ctx.bundle.view(ctx.layer))
    key = "backprop_forward" if ctx.pass_timings.get("forward") is not None else "forward"
    ctx.pass_timings[key] = passed.forward_seconds
    for rule, seconds in passed.backward_seconds.items():
        ctx.pass_timings[f"backward_{rule}"] = seconds
    ctx.check_cancel()
    results = {}
    for name in names:
        rule = _rule_of(name)
        with Stopwatch(ctx.bundle.device) as sw:
            signal = passed.signals[rule]
            extra = {"relus_intercepted": passed.relus, "rule": rule}
            if name == "guided_gradcam":
                A, g = reuse if reuse is not None else (passed.activation, passed.layer_gradient)
                signal = signal * gradcam_map(A, g, tuple(signal.shape[-2:])).unsqueeze(1)
                extra["gradcam_pass"] = "shared with the CAM family" if reuse is not None else "own"
            extra["display"] = display_map(signal)
        results[name] = MethodResult(signal.detach(), sw.seconds + passed.backward_seconds[rule], extra)
    return results


def _run_ig(ctx: ExplainContext, opts: dict) -> MethodResult:
    steps = _positive_int("integrated_gradients", "steps", opts["steps"])
    batch = _positive_int("integrated_gradients", "batch_size", opts["batch_size"])
    n = ctx.inputs.shape[0]
    with Stopwatch(ctx.bundle.device) as sw:
        ig, numbers = integrated_gradients(
            ctx, ctx.inputs, ctx.targets, ctx.contrast, baseline=opts["baseline"], steps=steps,
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
    base = opts["base"]
    if base not in SMOOTHGRAD_BASES:
        raise MethodError(f"smoothgrad: base must be one of {', '.join(SMOOTHGRAD_BASES)}, not {base!r}")
    n_samples = _positive_int("smoothgrad", "n_samples", opts["n_samples"])
    batch = _positive_int("smoothgrad", "batch_size", opts["batch_size"])
    level = float(opts["level"])
    if not (math.isfinite(level) and level >= 0):
        raise MethodError(f"smoothgrad: level must be a non-negative number, not {opts['level']!r}")
    base_opts = {**get_method(base).defaults, **(all_options.get(base) or {}), **(opts["base_options"] or {})}
    get_method(base)(**base_opts)  # validates the base's options
    x = ctx.inputs.detach()
    n = x.shape[0]
    sigma = level * (x.flatten(1).amax(dim=1) - x.flatten(1).amin(dim=1))
    gen = torch.Generator(device=x.device).manual_seed(int(opts["seed"]))
    total = torch.zeros_like(x)
    copies = n * n_samples
    sample = torch.arange(n, device=x.device).repeat(n_samples)  # copy → image
    with Stopwatch(ctx.bundle.device) as sw:
        for start in range(0, copies, batch):
            s = sample[start:start + batch]
            noise = torch.randn((s.numel(), *x.shape[1:]), generator=gen, device=x.device, dtype=x.dtype)
            noisy = x[s] + sigma[s].view(-1, 1, 1, 1) * noise
            total.index_add_(0, s, _base_signal(ctx, base, base_opts, noisy, *ctx.rows(s)))
            ctx.report(min(start + batch, copies), copies)
        mean = total / n_samples
        extra = {"base": base, "n_samples": n_samples, "level": level, "sigma": sigma.tolist(),
                 "sigma_space": "normalised model input", "display": display_map(mean)}
    return MethodResult(mean.detach(), sw.seconds, extra)


def _base_signal(ctx: ExplainContext, base: str, opts: dict, x: torch.Tensor, targets: torch.Tensor,
                 contrast: torch.Tensor | None):
    """The base method's input-space signal for a batch of (noisy) inputs."""
    if base == "integrated_gradients":
        ig, _ = integrated_gradients(
            ctx, x, targets, contrast, baseline=opts["baseline"],
            steps=_positive_int(base, "steps", opts["steps"]),
            batch_size=_positive_int(base, "batch_size", opts["batch_size"]), blur_sigma=opts["blur_sigma"],
            report=lambda done: ctx.check_cancel(),
        )
        return ig
    rule = _rule_of(base)
    layer_module = resolve_layer(ctx.bundle, ctx.layer)[1] if base == "guided_gradcam" else None
    passed = backprop_pass(ctx.bundle, x, lambda lg: target_scores(ctx.score, lg, targets, contrast), [rule],
                           layer_module=layer_module, layer_view=ctx.bundle.view(ctx.layer))
    signal = passed.signals[rule]
    if base == "guided_gradcam":
        cam = gradcam_map(passed.activation, passed.layer_gradient, tuple(x.shape[-2:]))
        signal = signal * cam.unsqueeze(1)
    return signal
