"""The CAM family: maps at feature resolution from one forward and one backward pass.

Notation (see shared METHODS.md): ``A`` is the target layer's activation (N×C×h×w), ``g = ∂S/∂A``
the gradient of the explained score S (the class logit by default). Every method here is a small
class whose ``saliency(A, g)`` returns the map *before* the final ReLU, so the equivalences between
methods can be tested on the pure functions. One runner serves any subset of them with a single
forward and a single backward that stops at the target layer.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MethodError
from ..hooks import capture_layer, resolve_layer
from .base import ExplainContext, Method, MethodResult, Stopwatch, register_method
from .registry import register_family


class CAMMethod(Method):
    """Template: a map Σ_k w_k A^k from per-channel weights; subclasses give the weights."""

    family = "cam"
    needs_gradients: ClassVar[bool] = True

    def channel_weights(self, A: torch.Tensor, g: torch.Tensor | None, **kw) -> torch.Tensor:
        raise NotImplementedError

    def saliency(self, A: torch.Tensor, g: torch.Tensor | None, **kw) -> torch.Tensor:
        """N×h×w map before the ReLU."""
        weights = self.channel_weights(A, g, **kw)
        return torch.einsum("nc,nchw->nhw", weights, A)


@register_method
class CAM(CAMMethod):
    """CAM (Zhou et al., CVPR 2016): M_c = Σ_k w_ck A^k with w_c the class row of the linear layer
    that follows global average pooling. Needs exactly a GAP + linear head above the target layer;
    it always explains the logit."""

    name = "cam"
    title = "CAM"
    paper = "Zhou et al. 2016, Learning Deep Features for Discriminative Localization"
    needs_gradients = False

    def channel_weights(self, A, g, *, class_weights=None, **kw):
        if class_weights is None:
            raise MethodError("CAM needs the class weights of a GAP + linear head")
        return class_weights


@register_method
class GradCAM(CAMMethod):
    """Grad-CAM (Selvaraju et al., ICCV 2017): α_k = (1/Z) Σ_ij ∂S/∂A^k_ij, map ReLU(Σ_k α_k A^k)."""

    name = "gradcam"
    title = "Grad-CAM"
    paper = "Selvaraju et al. 2017, Grad-CAM"

    def channel_weights(self, A, g, **kw):
        return g.mean(dim=(2, 3))


@register_method
class GradCAMPlusPlus(CAMMethod):
    """Grad-CAM++ (Chattopadhay et al., WACV 2018): w_k = Σ_ij a_ij relu(g_ij) with
    a_ij = g² / (2g² + Σ_ab A_ab g³), and a_ij = 0 where the denominator is exactly 0.

    No absolute epsilon: gradients at deep layers are ~1e-4, so an additive 1e-6 would distort
    the weights. The closed form assumes the network above the layer is piecewise linear."""

    name = "gradcam++"
    title = "Grad-CAM++"
    paper = "Chattopadhay et al. 2018, Grad-CAM++"

    def channel_weights(self, A, g, **kw):
        g2 = g.pow(2)
        denom = 2 * g2 + A.sum(dim=(2, 3), keepdim=True) * g2 * g
        nonzero = denom != 0
        alpha = torch.where(nonzero, g2 / torch.where(nonzero, denom, torch.ones_like(denom)), 0.0)
        return (alpha * F.relu(g)).sum(dim=(2, 3))


@register_method
class XGradCAM(CAMMethod):
    """XGrad-CAM (Fu et al., BMVC 2020): α_k = Σ_ij (A^k_ij / Σ_ab A^k_ab) g_ij (0 where Σ A = 0)."""

    name = "xgradcam"
    title = "XGrad-CAM"
    paper = "Fu et al. 2020, Axiom-based Grad-CAM"

    def channel_weights(self, A, g, **kw):
        total = A.sum(dim=(2, 3))
        nonzero = total != 0
        weighted = (A * g).sum(dim=(2, 3))
        return torch.where(nonzero, weighted / torch.where(nonzero, total, torch.ones_like(total)), 0.0)


@register_method
class LayerCAM(CAMMethod):
    """LayerCAM (Jiang et al., TIP 2021): element-wise Σ_k relu(g^k) ⊙ A^k."""

    name = "layercam"
    title = "LayerCAM"
    paper = "Jiang et al. 2021, LayerCAM"

    def saliency(self, A, g, **kw):
        return (F.relu(g) * A).sum(dim=1)


@register_method
class HiResCAM(CAMMethod):
    """HiResCAM (Draelos & Carin 2020): element-wise Σ_k g^k ⊙ A^k."""

    name = "hirescam"
    title = "HiResCAM"
    paper = "Draelos & Carin 2020, Use HiResCAM instead of Grad-CAM"

    def saliency(self, A, g, **kw):
        return (g * A).sum(dim=1)


def gap_linear_head(model: nn.Module, A: torch.Tensor, logits: torch.Tensor, layer: str) -> nn.Linear:
    """The linear layer that, after global average pooling, maps ``A`` exactly to ``logits``.

    Checked numerically rather than guessed from the architecture: CAM is only defined when
    logits = W · GAP(A) + b holds for the captured activation.
    """
    channels, classes = A.shape[1], logits.shape[1]
    linears = [
        m for m in model.modules()
        if isinstance(m, nn.Linear) and m.in_features == channels and m.out_features == classes
    ]
    reason = f"no linear layer maps {channels} channels to {classes} classes"
    if linears:
        head = linears[-1]
        with torch.no_grad():
            expected = F.linear(A.mean(dim=(2, 3)), head.weight, head.bias)
            gap = (expected - logits).abs().max() / logits.abs().max().clamp_min(1e-12)
        if gap <= 1e-3:
            return head
        reason = f"the logits differ from W·GAP(A)+b by {100 * gap.item():.1f}%"
    raise MethodError(
        f"CAM needs a global-average-pool + linear head directly on layer {layer!r} ({reason}); "
        f"use gradcam, which generalises CAM to any head"
    )


@register_family("cam")
def run_cam_family(ctx: ExplainContext, names: list[str], options: dict) -> dict[str, MethodResult]:
    """All requested CAM-family methods from one forward and (if needed) one backward pass."""
    from .base import get_method

    bundle = ctx.bundle
    methods = [get_method(n)(**options.get(n, {})) for n in names]
    need_grad = any(m.needs_gradients for m in methods)
    layer, module = resolve_layer(bundle, ctx.layer)
    with bundle.lock:
        with Stopwatch(bundle.device) as forward:
            with capture_layer(module, grad=need_grad, view=bundle.view(layer)) as captured, torch.no_grad():
                logits = bundle.logits(ctx.inputs)
    ctx.pass_timings["forward"] = forward.seconds
    A = captured.activation
    if A is None:
        raise MethodError(f"layer {layer!r} did not run during the forward pass")
    g = None
    with torch.enable_grad():
        targets = ctx.set_logits(logits)
        if need_grad:
            with Stopwatch(bundle.device) as backward:
                (g,) = torch.autograd.grad(ctx.class_score(logits).sum(), A)
            ctx.pass_timings["backward"] = backward.seconds
            if not bool(g.abs().amax() > 0):
                ctx.notes.append(f"the class score's gradient is zero at every position of layer {layer!r}: "
                                 f"its gradient-based maps are flat (a layer the score does not depend on, "
                                 f"e.g. a ViT's patch tokens after its last attention)")
    A = A.detach()
    extra_kw = {}
    if "cam" in names:
        head = gap_linear_head(bundle.model, A, ctx.logits, layer)
        weights = head.weight.detach()
        extra_kw["class_weights"] = weights[targets] - (0 if ctx.contrast is None else weights[ctx.contrast])
    results = {}
    for method in methods:
        with Stopwatch(bundle.device) as sw:
            raw = F.relu(method.saliency(A, g, **extra_kw))
        results[method.name] = MethodResult(raw, sw.seconds)
    ctx.shared["cam_pass"] = {"activation": A, "gradient": g, "layer": layer}
    return results
