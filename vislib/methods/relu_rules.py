"""The ReLU rules of the backprop family: a thread-local torch-function mode and an autograd Function.

Gradient, Deconvnet and guided backprop are the same autograd computation with a different rule at
every ReLU (R = the signal coming down, f = the ReLU's input; shared METHODS.md):

=================  =========================
gradient           ``1[f>0] · R``
deconvnet          ``relu(R)``
guided backprop    ``1[f>0] · 1[R>0] · R``
=================  =========================

Mechanism: :func:`relu_rule` activates a :class:`torch.overrides.TorchFunctionMode` for the duration
of one forward pass. Mode stacks are thread-local, so only the calling thread's forward is affected;
the shared model is never touched. The mode redirects every ReLU that reaches ``__torch_function__``
(``nn.ReLU`` → ``F.relu``, ``torch.relu``/``torch.relu_``, ``Tensor.relu``/``Tensor.relu_``) to an
autograd Function whose backward reads the rule from a per-call :class:`ReluRule` when the backward
runs. One forward can therefore serve several rules (one backward each, ``retain_graph`` between
them). Not reached: ReLUs inside compiled graphs and direct ``torch.ops.aten.relu`` calls; a model
with ``nn.ReLU`` modules where no ReLU was intercepted raises a :class:`MethodError` instead of
silently returning the plain gradient.

Other activations (GELU, SiLU, Hardswish, ReLU6, sigmoid, tanh, ...) keep their **ordinary gradient**
under every rule: the papers define the rules for ReLU only, and no peer library defines them
elsewhere. On a network without ReLUs (ConvNeXt: GELU; EfficientNet: SiLU) Deconvnet and guided
backprop are therefore exactly the gradient; on a mixed one (MobileNet-V3: ReLU and Hardswish) only
the ReLUs follow the rule. The mode counts both: ``ReluRule.count`` (ReLUs given the rule) and
``ReluRule.others`` (calls of other activations, by name, left with their gradient); the methods
report them in their extras (:func:`activation_report`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import MethodError

RULES = ("gradient", "deconvnet", "guided", "identity")
_threshold_backward = torch.ops.aten.threshold_backward.default


# --------------------------------------------------------------------------------------------------
# The ReLU rule: a thread-local torch-function mode and an autograd Function


@dataclass
class ReluRule:
    """Per-call state shared by the intercepted ReLUs of one forward pass.

    ``rule`` is read when the backward runs (so one forward serves several rules); ``count`` is the
    number of ReLUs intercepted during the forward, ``others`` the calls of other activations (which
    keep their ordinary gradient).
    """

    rule: str = "gradient"
    count: int = 0
    linearize_pools: bool = False
    frozen_norms: bool = False
    others: dict[str, int] = field(default_factory=dict)  # other activations met (name → calls)

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


RELU_FUNCS = frozenset({F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_})
_MAXPOOL_FUNCS = frozenset({F.max_pool2d, torch.max_pool2d})


def _activation_funcs() -> dict:
    """Functions of the activations other than ReLU (as modules and functional calls reach them)."""
    names: dict[str, list[Callable]] = {
        "gelu": [F.gelu], "silu": [F.silu], "hardswish": [F.hardswish], "mish": [F.mish],
        "relu6/hardtanh": [F.hardtanh, F.hardtanh_, F.relu6], "leaky_relu": [F.leaky_relu, F.leaky_relu_],
        "elu": [F.elu, F.elu_], "selu": [F.selu], "celu": [F.celu], "softplus": [F.softplus],
        "hardsigmoid": [F.hardsigmoid], "prelu": [F.prelu], "sigmoid": [torch.sigmoid, torch.Tensor.sigmoid],
        "tanh": [torch.tanh, torch.Tensor.tanh],
    }
    return {func: name for name, funcs in names.items() for func in funcs}


OTHER_ACTIVATIONS = _activation_funcs()


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
        if func in RELU_FUNCS:
            x, inplace = _relu_call(func, args, kwargs)
            if x.requires_grad and torch.is_grad_enabled():
                self.state.count += 1
                return _RuleReLU.apply(x, self.state, inplace)
        elif func in OTHER_ACTIVATIONS:
            x = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
                name = OTHER_ACTIVATIONS[func]
                self.state.others[name] = self.state.others.get(name, 0) + 1
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




def activation_report(state: ReluRule, rule: str) -> dict:
    """Which activations got which rule in one forward, for a method's extras."""
    report = {"relus_intercepted": state.count, "other_activations": dict(state.others)}
    if rule != "gradient" and state.count == 0:
        report["note"] = (f"no ReLU in this forward: the {rule} rule had nothing to act on, so the result is "
                          f"the plain gradient")
    elif rule != "gradient" and state.others:
        report["note"] = (f"{sum(state.others.values())} call(s) of other activations "
                          f"({', '.join(sorted(state.others))}) kept their ordinary gradient")
    return report
