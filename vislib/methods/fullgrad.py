"""FullGrad (Srinivas & Fleuret, NeurIPS 2019): the input-gradient and the bias-gradients of every layer.

For a network with piecewise-linear activations (ReLU, max-pool) the score decomposes exactly
(*completeness*)::

    S(x) = ∇ₓS · x + Σ_l Σ_c b_lc · ∂S/∂b_lc,        ∂S/∂b_lc = Σ_p ∂S/∂z_lc(p)

where b_l is the bias that layer l adds at every position p of its output z_l. Batch norm in eval
mode is an affine layer with weight γ/√(σ²+ε) and *folded* bias β − γμ/√(σ²+ε); its gradient is
∂S/∂z of the batch norm's output. The saliency map sums the input term and the bias terms of the
convolution and batch-norm layers (spatial outputs N×C×h×w)::

    FullGrad(x) = ψ(|x ⊙ ∇ₓS|) + Σ_l Σ_c ψ(|b_lc · ∂S/∂z_lc|)

ψ (option ``psi``):

- ``"channel"`` (default: the paper's eq. 6, ψ per channel c, and pytorch-grad-cam): every channel
  min-maxed to [0, 1] on its own (the input term: every colour channel), channels summed, bilinear
  upsampling (``align_corners=False``). One difference from pytorch-grad-cam: a channel whose values
  are all equal becomes zeros here, where it divides by ``max + 1e-7`` (so a channel whose range is
  below ~1e-7 is shrunk there, stretched here). Note what per-channel min-max implies: |b_c·∂S/∂z_c|
  is rescaled per channel, so the map depends on *which* biases are non-zero, not on their size.
- ``"layer"`` (the authors' code, idiap/fullgrad-saliency): each layer's tensor min-maxed as a whole
  per image, so channels with larger bias-gradients weigh more; channels summed, bilinear upsampling
  with ``align_corners=True`` (the authors divide by ``max + 1e-6``; an exact division here).

Linear-layer biases enter completeness but have no spatial map (as in the authors' code). Group and
instance norms with an affine shift β count like batch norm (their β is added per channel after the
normalisation), so that networks normalised per image (the bundled ``shapes_*`` models) get bias terms
too; completeness does not hold through them (their statistics depend on x), and the reported gap says
so. Layer norms are left out (their bias runs along the last dimension, not the channels). Every
bias-gradient comes from the same backward as the input gradient: the layers' outputs are captured
with their graph during the one forward (hooks inside :func:`capture_outputs`), and one
``torch.autograd.grad`` call returns ∂S/∂x and every ∂S/∂z_l.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MethodError
from ..hooks import this_thread_only

PSI = ("channel", "layer")


_SHIFTED_NORMS = (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def has_bias(module: nn.Module) -> bool:
    """Whether ``module`` adds a bias at every position of its output: a convolution or linear layer
    with a bias, a batch norm in eval mode with running statistics (its folded bias), or a group /
    instance norm with an affine shift β (added per channel after the normalisation; pytorch-grad-cam
    leaves these out, and completeness does not hold through them: their statistics depend on x)."""
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        return module.bias is not None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return not module.training and module.running_mean is not None
    if isinstance(module, _SHIFTED_NORMS):
        return getattr(module, "bias", None) is not None
    return False


def bias_layers(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model`` with a bias in the sense of :func:`has_bias`, in definition order."""
    return [m for m in model.modules() if has_bias(m)]


def folded_bias(module: nn.Module) -> torch.Tensor:
    """The bias (C,) that ``module`` adds: its ``bias``, or for batch norm β − γμ/√(σ²+ε)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        mean, var = module.running_mean, module.running_var
        assert mean is not None and var is not None  # has_bias(): the running statistics exist
        inv_std = torch.rsqrt(var + module.eps)
        scale = inv_std if module.weight is None else module.weight * inv_std
        shift = -mean * scale
        return shift if module.bias is None else module.bias + shift
    return cast(torch.Tensor, module.bias)  # has_bias(): a parameter (nn.Module: Tensor | Module)


@dataclass
class CapturedOutputs:
    """What :func:`capture_outputs` recorded: (module, output with its graph) per call, in call order."""

    calls: list[tuple[nn.Module, torch.Tensor]] = field(default_factory=list)


@contextmanager
def capture_outputs(modules: Sequence[nn.Module]) -> Iterator[CapturedOutputs]:
    """Record the outputs of ``modules`` during the forward passes of this thread inside the block.

    The output is kept with its graph (gradients w.r.t. it flow from the score) and the rest of the
    network runs on a copy, so a later in-place operation (``ReLU(inplace=True)`` after a batch norm)
    cannot change it. The hooks are removed in ``finally``.
    """
    captured = CapturedOutputs()

    def hook(module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.requires_grad:
            captured.calls.append((module, output))
            return output.clone()
        return None

    guarded = this_thread_only(hook)
    handles = []
    try:
        for module in dict.fromkeys(modules):  # a module listed twice is hooked once
            handles.append(module.register_forward_hook(guarded))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def bias_terms(calls: list[tuple[nn.Module, torch.Tensor]], grads: Sequence[torch.Tensor | None]
               ) -> list[torch.Tensor]:
    """``b_c · ∂S/∂z_c`` for every captured call (N×C×…, the bias broadcast over the positions)."""
    terms = []
    for (module, output), grad in zip(calls, grads, strict=True):
        bias = folded_bias(module).detach().to(output.dtype)
        if grad is None:
            grad = torch.zeros_like(output)
        shape = (1, -1) + (1,) * (output.dim() - 2)
        terms.append(bias.view(shape) * grad)
    return terms


def _minmax(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Min-max to [0, 1] over ``dims``; a slice whose values are all equal becomes zeros."""
    lo = t.amin(dim=dims, keepdim=True)
    span = t.amax(dim=dims, keepdim=True) - lo
    ok = span > 0
    return torch.where(ok, (t - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(t))


def psi(term: torch.Tensor, mode: str, size: tuple[int, int]) -> torch.Tensor:
    """ψ of one N×C×h×w term: |·|, min-max (per channel or per layer), channels summed, bilinear up to
    ``size``: N×H×W."""
    mag = term.detach().abs()
    dims = (2, 3) if mode == "channel" else (1, 2, 3)
    summed = _minmax(mag, dims).sum(dim=1, keepdim=True)
    if tuple(summed.shape[-2:]) != tuple(size):
        summed = F.interpolate(summed, size=size, mode="bilinear", align_corners=mode == "layer")
    return summed[:, 0]


def fullgrad_map(x: torch.Tensor, grad_x: torch.Tensor, terms: list[torch.Tensor], mode: str = "channel"
                 ) -> tuple[torch.Tensor, int]:
    """FullGrad's N×H×W map from the input gradient and the bias terms, and the number of spatial
    bias terms it sums."""
    if mode not in PSI:
        raise MethodError(f"fullgrad: psi must be one of {', '.join(PSI)}, not {mode!r}")
    size = (int(x.shape[-2]), int(x.shape[-1]))
    out = psi(x.detach() * grad_x, mode, size)
    spatial = [t for t in terms if t.dim() == 4]
    for term in spatial:
        out = out + psi(term, mode, size)
    return out, len(spatial)


def completeness(x: torch.Tensor, grad_x: torch.Tensor, terms: list[torch.Tensor], score: torch.Tensor
                 ) -> dict[str, torch.Tensor]:
    """Per-sample numbers of S = ∇ₓS·x + Σ b·∂S/∂b: the two sides' parts and the gap."""
    n = x.shape[0]
    input_term = (x.detach() * grad_x).reshape(n, -1).sum(dim=1)
    bias_term = torch.zeros_like(input_term)
    for term in terms:
        bias_term = bias_term + term.reshape(n, -1).sum(dim=1)
    return {"score": score.detach(), "input_term": input_term, "bias_term": bias_term,
            "completeness_gap": score.detach() - input_term - bias_term}
