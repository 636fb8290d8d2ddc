"""Layer-wise relevance propagation (Bach et al. 2015; Montavon et al. 2019) through zennit.

LRP redistributes the output relevance layer by layer down to the pixels; each layer type has its
rule (R_j: relevance of output j, z_ij = x_i w_ij, z_j = Σ_i z_ij + b_j)::

    ε       R_i = Σ_j z_ij / (z_j + ε·sign(z_j)) · R_j                       (bias absorbs b_j/z_j·R_j)
    z⁺      R_i = Σ_j z⁺_ij / Σ_i' z⁺_i'j · R_j        (z⁺: x⁺w⁺ + x⁻w⁻; zennit adds b⁺ to the sum)
    flat    R_i = Σ_j 1 / #{i' → j} · R_j                                     (input layer)
    z^B     R_i = Σ_j (x_i w_ij − l_i w⁺_ij − h_i w⁻_ij) / Σ_i'(…) · R_j   (pixels in [l, h])
    γ       R_i = Σ_j x_i (w_ij + γ w⁺_ij) / Σ_i' x_i' (w_i'j + γ w⁺_i'j) · R_j

Composites (option ``composite``), as zennit defines them: ``"epsilon_plus_flat"`` (default: first
layer flat, convolutions z⁺, linear layers ε) and ``"epsilon_gamma_box"`` (first layer z^B with the
bounds l, h of [0, 1] pixels after the model's normalisation, per channel; convolutions γ; linear
layers ε). Both: ReLU and batch norm pass relevance through; batch norm is merged into the preceding
convolution first (a canonizer), and torchvision ResNet blocks' residual sums go through a Norm
rule (R split in proportion to the two branches' contributions).

The output relevance is the target's logit, ``R = e_A · z_A`` (so that Σ R_pixels = z_A minus what
the biases absorb: *conservation*), and with a contrast class B it is ``e_A · z_A − e_B · z_B``
(Σ R = S_A − S_B). A softmax probability has no LRP rule: ``score="probability"`` is refused.

**Supported models**: ReLU networks built from convolutions, linear layers, batch norm right after a
convolution or linear layer, pooling, dropout and torchvision's ResNet blocks (VGG, AlexNet, ResNet).
Anything else gets a :class:`MethodError` that names the module and the reason, decided from the
module types before running (DenseNet: pre-activation batch norms; EfficientNet, MobileNet:
SiLU / Hardswish / ReLU6; ConvNeXt: LayerNorm and GELU; transformers: attention), and during the
forward by a thread-local torch-function mode that watches for what module types cannot show: a sum
of two branches outside the known blocks, a product of two activations (gating, attention), a
non-ReLU activation called as a function. (Pooling written as a function, e.g. ``x.mean((2, 3))``,
passes: it conserves relevance, splitting it evenly where an ``nn.AdaptiveAvgPool2d`` module gets
the Norm rule's split in proportion to the inputs.)

**Isolation**: zennit registers hooks and its canonizers change parameters while they are applied.
The shared model is never touched: zennit runs on a private deep copy, made once per model (under
the bundle's lock), keyed by the identity and version counter of every parameter and buffer (as the
frozen copies of :mod:`.frozen`), so changed weights make a new copy; a per-copy lock serialises the
calls on it, every hook is removed in ``finally`` (zennit's composite context), and a copy that an
unexpected error left in an unknown state is dropped.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .._optional import install_hint, require
from ..errors import Cancelled, MethodError, VislibError
from .backprop import BackpropMethod
from .base import ExplainContext, MethodResult, Stopwatch, register_method
from .frozen import fingerprint
from .relu_rules import OTHER_ACTIVATIONS, RELU_FUNCS

if TYPE_CHECKING:
    from ..models import ModelBundle

COMPOSITES = ("epsilon_plus_flat", "epsilon_gamma_box")
INSTALL_HINT = install_hint("lrp")
RULES_TEXT = {
    "epsilon_plus_flat": "first layer: flat; convolutions: z⁺; linear layers: ε; sums and average pools: "
                         "norm; ReLU and batch norm (merged into the convolution before it): pass",
    "epsilon_gamma_box": "first layer: z^B (pixel bounds of the normalisation); convolutions: γ; linear "
                         "layers: ε; sums and average pools: norm; ReLU and batch norm (merged): pass",
}
SUPPORTED = "ReLU networks of convolutions, linear layers, batch norm after a convolution, pooling and " \
            "torchvision ResNet blocks (e.g. VGG, AlexNet, ResNet)"


def _zennit():
    """The zennit modules used here, or a MethodError saying how to install zennit."""
    for module in ("zennit.canonizers", "zennit.composites", "zennit.torchvision"):
        require(module, "lrp", feature="lrp (through zennit, the LRP library)", error=MethodError)
    import zennit  # the package, its submodules imported above (import_module returns the submodule)

    return zennit


# --------------------------------------------------------------------------------------------------
# Which models zennit's composites and canonizers can explain


_CONV = (nn.modules.conv._ConvNd,)
_LINEAR = (nn.modules.conv._ConvNd, nn.Linear)
_BATCHNORM = (nn.modules.batchnorm._BatchNorm,)
_PASSIVE = (nn.ReLU, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
            nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
            nn.modules.dropout._DropoutNd, nn.Identity, nn.Flatten, nn.Unflatten)
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
_FAMILIES = (("densenet", "DenseNet"), ("efficientnet", "EfficientNet"), ("convnext", "ConvNeXt"),
             ("mobilenet", "MobileNet"), ("regnet", "RegNet"), ("shufflenet", "ShuffleNet"),
             ("inception", "Inception"), ("googlenet", "GoogLeNet"), ("mnasnet", "MNASNet"),
             ("swin", "Swin transformer"), ("maxvit", "MaxViT"), ("vision_transformer", "vision transformer"),
             ("deit", "vision transformer"), ("transformers.models", "transformer"))


def _family(model: nn.Module) -> str:
    where = f"{type(model).__module__}.{type(model).__name__}".lower()
    return next((f" ({name})" for key, name in _FAMILIES if key in where), "")


def _resnet_blocks() -> tuple[type, ...]:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return (BasicBlock, Bottleneck)


def _leaf_problem(module: nn.Module) -> str | None:
    """Why zennit has no rule for this leaf module, or None."""
    if isinstance(module, _LINEAR + _BATCHNORM + _PASSIVE):
        return None
    kind = type(module).__name__
    if isinstance(module, _NORMS):
        return (f"is a {kind}: its statistics come from the input itself, and zennit's composites have no "
                f"rule for it")
    if isinstance(module, nn.MultiheadAttention) or "attention" in kind.lower():
        return f"is attention ({kind}): products of activations have no rule in zennit's composites"
    activations = (nn.GELU, nn.SiLU, nn.Hardswish, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU,
                   nn.CELU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Hardsigmoid, nn.PReLU, nn.Softmax)
    lowered = kind.lower()
    if isinstance(module, activations) or lowered.endswith("activation") or any(
            k in lowered for k in ("gelu", "swish", "silu", "sigmoid")):
        return f"is a {kind} activation: the LRP rules here assume ReLU networks"
    return f"is a {kind}, a layer zennit's composites have no rule for"


def unsupported_reason(model: nn.Module) -> str | None:
    """Why zennit cannot explain ``model`` (checked from its module types), or None when it can."""
    blocks = _resnet_blocks()
    problem = None
    previous: nn.Module | None = None
    for name, module in model.named_modules():
        children = next(module.children(), None) is not None
        label = f"`{name or type(model).__name__}` ({type(module).__name__})"
        if children:
            own = [n for n, _ in module.named_parameters(recurse=False)]
            if own and not isinstance(module, blocks):
                problem = (f"{label} uses its own parameters ({', '.join(own[:3])}) in its forward code "
                           f"(a class token, a position embedding, a layer scale): no rule covers them")
                break
            continue
        why = _leaf_problem(module)
        if why is not None:
            problem = f"{label} {why}"
            break
        if isinstance(module, _BATCHNORM) and not isinstance(previous, _LINEAR):
            problem = (f"{label} does not follow a convolution or linear layer (a pre-activation block), so "
                       f"zennit's canonizer cannot merge it into one")
            break
        previous = module
    if problem is None:
        return None
    return f"lrp cannot explain this model{_family(model)}: {problem}. zennit covers {SUPPORTED}."


# --------------------------------------------------------------------------------------------------
# What the forward does: a thread-local watch for what module types cannot show


_SUMS = {"add", "add_", "__add__", "__iadd__", "__radd__", "sub", "sub_", "__sub__", "__isub__", "__rsub__"}
_PRODUCTS = {"mul", "mul_", "__mul__", "__imul__", "__rmul__", "div", "div_", "__truediv__", "__itruediv__",
             "matmul", "__matmul__", "bmm", "einsum", "baddbmm", "scaled_dot_product_attention"}


class OpWatch(TorchFunctionMode):
    """Counts the ReLUs of one forward and records the first operation no LRP rule here covers: a sum
    or product of two activations (both requiring grad), or a non-ReLU activation function."""

    def __init__(self):
        super().__init__()
        self.relus = 0
        self.problem: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.problem is None and torch.is_grad_enabled():
            self._inspect(func, args, kwargs)
        return func(*args, **kwargs)

    def _inspect(self, func, args, kwargs) -> None:
        if func in RELU_FUNCS:
            self.relus += 1
            return
        name = getattr(func, "__name__", "")
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.requires_grad]
        if func in OTHER_ACTIVATIONS and tensors:
            self.problem = (f"its forward calls {OTHER_ACTIVATIONS[func]}, a non-ReLU activation: the LRP "
                            f"rules here assume ReLU networks")
        elif name in _SUMS and len(tensors) >= 2 and tensors[0].dim() > 0 and tensors[1].dim() > 0:
            self.problem = ("its forward adds two branches (a residual connection) outside the blocks "
                            "zennit's canonizers know (torchvision ResNet): relevance would be duplicated, "
                            "not split")
        elif name in _PRODUCTS and len(tensors) >= 2:
            self.problem = ("its forward multiplies two activations (gating or attention), which no LRP rule "
                            "here covers")
        elif name in ("softmax", "log_softmax") and tensors:
            self.problem = "its forward applies a softmax inside the network, which no LRP rule here covers"


# --------------------------------------------------------------------------------------------------
# The private copy


@dataclass
class PrivateCopy:
    """A deep copy of a shared model (inside a bundle of its own) and the lock of the calls on it."""

    key: tuple
    bundle: ModelBundle
    lock: threading.Lock


_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COPIES_LOCK = threading.Lock()


def _key(bundle) -> tuple:
    return fingerprint(bundle.model) + (str(bundle.device),)


def has_hooks(model: nn.Module) -> bool:
    return any(getattr(m, attr, None) for m in model.modules() for attr in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def private_copy(bundle) -> tuple[PrivateCopy, bool]:
    """The cached private copy for the shared model's current weights, and whether it was built now."""
    with _COPIES_LOCK:
        entry = _COPIES.get(bundle.model)
    if entry is not None and entry.key == _key(bundle):
        return entry, False
    with bundle.lock:  # no vislib pass runs on the shared model while it is copied
        key = _key(bundle)
        try:
            model = copy.deepcopy(bundle.model)
        except Exception as exc:  # noqa: BLE001  (whatever makes a module uncopyable)
            raise MethodError(f"lrp runs on a private copy of the model, and this model cannot be copied "
                              f"({type(exc).__name__}: {exc})") from None
    for module in model.modules():  # hooks of other callers were copied along: drop them
        for attr, value in list(vars(module).items()):
            if "hooks" in attr and isinstance(value, dict):
                setattr(module, attr, type(value)())
    model.eval().requires_grad_(False)
    private = dataclasses.replace(bundle, model=model, lock=threading.RLock(), cpu_fallback=None)
    entry = PrivateCopy(key, private, threading.Lock())
    with _COPIES_LOCK:
        _COPIES[bundle.model] = entry
    return entry, True


def cached_copy(bundle) -> PrivateCopy | None:
    """The copy cached for this bundle's model (for tests and diagnostics), fresh or not."""
    with _COPIES_LOCK:
        return _COPIES.get(bundle.model)


def _drop(bundle, entry: PrivateCopy) -> None:
    with _COPIES_LOCK:
        if _COPIES.get(bundle.model) is entry:
            del _COPIES[bundle.model]


# --------------------------------------------------------------------------------------------------
# The method


def pixel_bounds(bundle, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high), 1×3×1×1: the pixels 0 and 1 after the bundle's normalisation, per channel."""
    from ..models import Preprocess

    if not isinstance(bundle.preprocess, Preprocess):
        raise MethodError("lrp: the epsilon_gamma_box composite needs the model's normalisation (mean and "
                          "std) to bound the pixels, and this bundle's preprocessing is a custom function; "
                          "use composite='epsilon_plus_flat'")
    mean = torch.tensor(bundle.preprocess.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(bundle.preprocess.std, device=device).view(1, -1, 1, 1)
    return (0.0 - mean) / std, (1.0 - mean) / std


def make_composite(bundle, name: str, epsilon: float, gamma: float, device: torch.device):
    """zennit's composite ``name`` with the canonizers this model needs, and the canonizers' names."""
    zennit = _zennit()
    if any(isinstance(m, _resnet_blocks()) for m in bundle.model.modules()):
        canonizers = [zennit.torchvision.ResNetCanonizer()]
    else:
        canonizers = [zennit.canonizers.SequentialMergeBatchNorm()]
    if name == "epsilon_plus_flat":
        composite = zennit.composites.EpsilonPlusFlat(epsilon=epsilon, canonizers=canonizers)
    else:
        low, high = pixel_bounds(bundle, device)
        composite = zennit.composites.EpsilonGammaBox(low=low, high=high, epsilon=epsilon, gamma=gamma,
                                                      canonizers=canonizers)
    return composite, [type(c).__name__ for c in canonizers]


def relevance_display(relevance: torch.Tensor, percentile: float = 99.5) -> torch.Tensor:
    """N×H×W display map: the positive part of the relevance summed over colour channels (evidence for
    the class), clipped at a per-sample percentile."""
    pos = relevance.detach().sum(dim=1).clamp_min(0)
    flat = pos.flatten(1)
    k = min(flat.shape[1], max(1, int(round(percentile / 100.0 * flat.shape[1]))))
    q = flat.kthvalue(k, dim=1).values
    q = torch.where(q > 0, q, flat.amax(dim=1))
    return torch.minimum(pos, q.view(-1, 1, 1))


def _check_options(opts: dict) -> tuple[str, float, float]:
    composite = opts["composite"]
    if composite not in COMPOSITES:
        raise MethodError(f"lrp: composite must be one of {', '.join(COMPOSITES)}, not {composite!r}")
    numbers = []
    for key in ("epsilon", "gamma"):
        value = opts[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise MethodError(f"lrp: option {key} must be a non-negative number, not {value!r}")
        numbers.append(float(value))
    return composite, numbers[0], numbers[1]


def run_lrp(ctx: ExplainContext, opts: dict) -> MethodResult:
    """LRP of ``ctx.inputs`` for the targets (minus the contrast) on the private copy of the model."""
    composite_name, epsilon, gamma = _check_options(opts)
    assert ctx.target is not None  # ExplainContext builds it
    if ctx.target.score_name != "logit":
        raise MethodError("lrp explains a logit (its relevance starts at the class logit and has no rule "
                          "through the softmax); use score='logit'")
    bundle = ctx.bundle
    _zennit()
    reason = unsupported_reason(bundle.model)
    if reason is not None:
        raise MethodError(reason)
    with Stopwatch(bundle.device) as sw:
        composite, canonizers = make_composite(bundle, composite_name, epsilon, gamma, ctx.inputs.device)
        entry, built = private_copy(bundle)
        with entry.lock:
            try:
                relevance, logits, relus = _relevance(entry.bundle, ctx, composite)
            except (VislibError, Cancelled):
                if has_hooks(entry.bundle.model):  # zennit's context removes them; never reuse one kept
                    _drop(bundle, entry)
                raise
            except BaseException:
                _drop(bundle, entry)  # an unexpected failure may leave a canonizer half applied
                raise
            if has_hooks(entry.bundle.model):
                _drop(bundle, entry)
        n = relevance.shape[0]
        score = ctx.class_score(logits).detach()
        total = relevance.reshape(n, -1).sum(dim=1)
        extra = {
            "composite": composite_name, "rules": RULES_TEXT[composite_name], "canonizers": canonizers,
            "epsilon": epsilon, "relus": relus, "copy": "built now" if built else "cached",
            "output_relevance": score.tolist(), "relevance_sum": total.tolist(),
            "absorbed": (score - total).tolist(), "display": relevance_display(relevance),
        }
        if composite_name == "epsilon_gamma_box":
            extra["gamma"] = gamma
    return MethodResult(relevance.detach(), sw.seconds, extra)


def _relevance(private, ctx: ExplainContext, composite) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(input relevance, logits, ReLU calls) of one forward and one modified backward on the copy."""
    x = ctx.inputs.detach().clone().requires_grad_(True)
    watch = OpWatch()
    with composite.context(private.model):
        with watch, torch.enable_grad():
            logits = private.logits(x)
        if watch.problem is not None:
            raise MethodError(f"lrp cannot explain this model: {watch.problem}. zennit covers {SUPPORTED}.")
        ctx.set_logits(logits)
        ctx.check_cancel()
        assert ctx.bound is not None  # set_logits bound it
        out = ctx.bound.head_rows(logits.detach())  # e: one-hot of the class (minus the contrast's)
        (relevance,) = torch.autograd.grad(logits, x, grad_outputs=out * logits.detach())
    return relevance, logits.detach(), watch.relus


@register_method
class LRP(BackpropMethod):
    """LRP (Bach et al. 2015; Montavon et al. 2019) through zennit: the class logit (S_A − S_B with a
    contrast) redistributed layer by layer to the pixels. ``composite``: "epsilon_plus_flat" (first
    layer flat, convolutions z⁺, linear layers ε = ``epsilon``) or "epsilon_gamma_box" (first layer z^B
    with the pixel bounds of the normalisation, convolutions γ = ``gamma``, linear layers ε); batch
    norm merged, ResNet sums by a Norm rule. ReLU nets only (VGG, ResNet); runs on a private copy."""

    name = "lrp"
    target_needs = ("linear",)
    passes = "1 fwd + 1 modified bwd, on a private copy"
    uses_layer = False
    title = "LRP"
    paper = "Bach et al. 2015, On Pixel-Wise Explanations for Non-Linear Classifier Decisions by LRP"
    defaults = {"composite": "epsilon_plus_flat", "epsilon": 1e-6, "gamma": 0.25}
    standalone = True
    tasks = ("classification",)
    task_reason = ("zennit's rules are not defined through a detector's box decoding and non-maximum "
                   "suppression, and vislib has not verified them on segmentation heads")

    @classmethod
    def unavailable(cls, bundle, layer: str) -> str | None:  # noqa: ARG003  (any layer: input-space)
        """zennit missing, or a model its rules do not cover (from the module types, no forward)."""
        _zennit()
        reason = unsupported_reason(bundle.model)
        return reason

    def run(self, ctx: ExplainContext) -> MethodResult:
        return run_lrp(ctx, self.options)
