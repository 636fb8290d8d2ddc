"""Textbook formulas of the gradient CAMs, written from the papers (see shared METHODS.md), in float64.

An independent arbiter: when two libraries disagree on a method, the one that correlates with these
formulas follows the paper. The activation ``A`` and gradient ``g = ∂S_c/∂A`` (S_c: the target
logit) are captured with a plain forward hook and ``torch.autograd.grad`` on a copy of the model.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

PAPER_FORMULAS = ("cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")


def capture(model: nn.Module, layer: str, inputs: torch.Tensor, targets: torch.Tensor):
    """(A, g, logits) for ``layer``; the model copy is discarded, the caller's model is untouched."""
    model = copy.deepcopy(model).eval()  # parameters keep requires_grad: the graph reaches A
    store = {}

    def hook(_module, _inputs, output):
        store["A"] = output
        return output.clone()  # later in-place operations must not overwrite the captured tensor

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(inputs.detach())
            score = logits.gather(1, targets.view(-1, 1)).sum()
            (g,) = torch.autograd.grad(score, store["A"])
    finally:
        handle.remove()
    return store["A"].detach().double(), g.double(), logits.detach(), model


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def paper_maps(
    model: nn.Module, layer: str, inputs: torch.Tensor, targets: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict]:
    """N×h×w maps (after the final ReLU) of the gradient CAMs, straight from their definitions, and
    the scale of the layer's gradient (see :func:`gradient_scale`).

    CAM is included only when the layer feeds a global average pool and a single linear layer
    (checked numerically: logits = W·GAP(A) + b).
    """
    A, g, logits, copy_ = capture(model, layer, inputs, targets)
    relu = torch.relu
    sum_a = A.sum(dim=(2, 3), keepdim=True)
    grad_pp = _safe_div(g**2, 2 * g**2 + sum_a * g**3) * relu(g)
    maps = {
        # Selvaraju et al. 2017: α_k = (1/Z) Σ_ij g_ij
        "gradcam": (g.mean(dim=(2, 3), keepdim=True) * A).sum(1),
        # Chattopadhay et al. 2018, eq. 19: a_ij = g² / (2g² + Σ_ab A_ab g³), w_k = Σ_ij a_ij relu(g_ij)
        "gradcam++": (grad_pp.sum(dim=(2, 3), keepdim=True) * A).sum(1),
        # Fu et al. 2020: α_k = Σ_ij (A_ij / Σ_ab A_ab) g_ij
        "xgradcam": (_safe_div((A * g).sum(dim=(2, 3), keepdim=True), sum_a) * A).sum(1),
        # Jiang et al. 2021: Σ_k relu(g^k) ⊙ A^k
        "layercam": (relu(g) * A).sum(1),
        # Draelos & Carin 2020: Σ_k g^k ⊙ A^k
        "hirescam": (g * A).sum(1),
    }
    linears = [m for m in copy_.modules() if isinstance(m, nn.Linear)]
    if linears and linears[-1].in_features == A.shape[1]:
        head = linears[-1]
        w = head.weight.double()
        expected = A.mean(dim=(2, 3)) @ w.T + head.bias.double()
        if (expected - logits.double()).abs().max() <= 1e-3 * logits.double().abs().max():
            # Zhou et al. 2016: M_c = Σ_k w_ck A^k
            maps["cam"] = (w[targets].unsqueeze(-1).unsqueeze(-1) * A).sum(1)
    return {name: relu(m) for name, m in maps.items()}, gradient_scale(A, g)


def gradient_scale(A: torch.Tensor, g: torch.Tensor, eps: float = 1e-6) -> dict:
    """How large ∂S/∂A is, and at what share of the positive-gradient positions an absolute ``eps``
    (pytorch-grad-cam's) would exceed the Grad-CAM++ denominator |2g² + Σ_ab A_ab g³| itself."""
    denom = (2 * g**2 + A.sum(dim=(2, 3), keepdim=True) * g**3).abs()
    positive = g > 0
    share = float((denom[positive] < eps).double().mean()) if bool(positive.any()) else 0.0
    return {"median_abs_gradient": float(g.abs().median()), "eps": eps, "eps_dominates_share": share}

