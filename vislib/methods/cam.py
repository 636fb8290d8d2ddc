"""The CAM family: maps at feature resolution from one forward and one backward pass.

Notation (see shared METHODS.md): ``A`` is the target layer's activation (N×C×h×w), ``g = ∂S/∂A``
the gradient of the explained score S (the class logit by default). Every method here is a small
class whose ``saliency(A, g)`` returns the map *before* the final ReLU, so the equivalences between
methods can be tested on the pure functions. One runner serves any subset of them with a single
forward and a single backward that stops at the target layer; the variants in
:mod:`~vislib.methods.cam_variants` add what they need on top of that pass (a Hessian-vector
product, a second score), and the options of :mod:`~vislib.methods.cam_passes` (``aug_smooth``,
``fuse_layers``) repeat it on augmented inputs or extend it to several layers.

Options shared by the family (``explain(..., options={"gradcam": {"eigen_smooth": True}})``):

- ``eigen_smooth``: the first principal component of the weighted activations w_k A^k (N×C×h×w,
  each channel centred over positions) instead of their sum Σ_k w_k A^k, its sign aligned with that
  sum (pytorch-grad-cam leaves the sign to the SVD);
- ``aug_smooth``: the mean over horizontal flip × input multipliers {0.9, 1, 1.1} of the maps, each
  un-flipped and min-max scaled first (6 forward + backward passes; the class is the one of the
  unaugmented image);
- ``fuse_layers``: more layers, fused with the target layer as in LayerCAM §3.3 (see
  :func:`~vislib.methods.cam_passes.fuse_maps`); the raw map is then on the largest grid.

Unknown options, and options a method does not take, are a :class:`~vislib.errors.MethodError`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MethodError
from .base import ExplainContext, Method, MethodResult, register_method
from .registry import register_family

SHARED_OPTIONS = {"aug_smooth": False, "eigen_smooth": False, "fuse_layers": None}


class CAMMethod(Method):
    """Template: a map Σ_k w_k A^k from per-channel weights; subclasses give the weights, or (with
    ``elementwise``) the weighted activations themselves."""

    family = "cam"
    passes = "1 fwd + 1 bwd"
    needs_gradients: ClassVar[bool] = True
    elementwise: ClassVar[bool] = False  # True: ``weighted`` is defined directly, not via channel weights
    defaults: ClassVar[dict] = SHARED_OPTIONS

    def __init__(self, **options):
        self.check_options(options, self.defaults)
        super().__init__(**{**self.defaults, **options})
        for key in ("aug_smooth", "eigen_smooth"):
            if key in self.options and not isinstance(self.options[key], bool):
                raise MethodError(f"{self.name}: option {key!r} must be True or False, not "
                                  f"{self.options[key]!r}")
        if "fuse_layers" in self.options:
            self.options["fuse_layers"] = _layer_list(self.name, self.options["fuse_layers"])

    # -- what the runner needs to know ---------------------------------------------------------------

    @property
    def pass_key(self) -> tuple[bool, tuple[str, ...]]:
        """Methods with the same key share their passes: (aug_smooth, extra layers to fuse)."""
        return bool(self.options.get("aug_smooth")), tuple(self.options.get("fuse_layers") or ())

    @property
    def score_key(self) -> tuple | None:
        """Which score's gradient the method needs (None: none). Methods with the same key share
        one backward pass."""
        return ("class",) if self.needs_gradients else None

    @property
    def needs_hvp(self) -> bool:
        """Whether the method needs the Hessian-vector product H·A of its score (ShapleyCAM)."""
        return False

    def score(self, ctx: ExplainContext, logits: torch.Tensor) -> torch.Tensor:
        """Per-sample score whose gradient the method weighs: S_A, or S_A − S_B with a contrast."""
        return ctx.class_score(logits)

    def extra(self, ctx: ExplainContext) -> dict:
        """Per-call details for ``Explanation.extras`` (lists per sample where they vary)."""
        return {}

    # -- the map -------------------------------------------------------------------------------------

    def channel_weights(self, A: torch.Tensor, g: torch.Tensor | None, **kw) -> torch.Tensor:
        raise NotImplementedError

    def weighted(self, A: torch.Tensor, g: torch.Tensor | None, **kw) -> torch.Tensor:
        """N×C×h×w weighted activations whose sum over channels is the map: w_k A^k by default."""
        return self.channel_weights(A, g, **kw)[:, :, None, None] * A

    def saliency(self, A: torch.Tensor, g: torch.Tensor | None, **kw) -> torch.Tensor:
        """N×h×w map before the ReLU: Σ_k of the weighted activations, or their first principal
        component with ``eigen_smooth``."""
        if self.options.get("eigen_smooth"):
            from .cam_variants import first_component

            weighted = self.weighted(A, g, **kw)
            return first_component(weighted, reference=weighted.sum(dim=1))
        if self.elementwise:
            return self.weighted(A, g, **kw).sum(dim=1)
        return torch.einsum("nc,nchw->nhw", self.channel_weights(A, g, **kw), A)


def _layer_list(method: str, value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise MethodError(f"{method}: option 'fuse_layers' must be a list of layer names, not {value!r}")
    return list(dict.fromkeys(value)) or None


@register_method
class CAM(CAMMethod):
    """CAM (Zhou et al., CVPR 2016): M_c = Σ_k w_ck A^k with w_c the class row of the linear layer
    that follows global average pooling. Needs exactly a GAP + linear head above the target layer;
    it always explains the logit."""

    name = "cam"
    target_needs = ("linear",)
    title = "CAM"
    paper = "Zhou et al. 2016, Learning Deep Features for Discriminative Localization"
    passes = "1 fwd"
    needs_gradients = False
    tasks = ("classification",)
    task_reason = ("it reads the weights of a GAP + linear classifier head; a detector's box or a "
                   "segmenter's region has no such head (Grad-CAM is its gradient form)")
    defaults = {"aug_smooth": False, "eigen_smooth": False}  # fusion needs gradients at every layer

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
    elementwise = True

    def weighted(self, A, g, **kw):
        return F.relu(g) * A


@register_method
class HiResCAM(CAMMethod):
    """HiResCAM (Draelos & Carin 2020): element-wise Σ_k g^k ⊙ A^k."""

    name = "hirescam"
    title = "HiResCAM"
    paper = "Draelos & Carin 2020, Use HiResCAM instead of Grad-CAM"
    elementwise = True

    def weighted(self, A, g, **kw):
        return g * A


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
    """All requested CAM-family methods. Methods with the same ``pass_key`` share their passes:
    by default one forward and one backward (per distinct score) for all of them."""
    from .base import get_method
    from .cam_passes import run_group

    methods = [get_method(n)(**(options.get(n) or {})) for n in names]
    groups: dict[tuple, list[CAMMethod]] = {}
    for method in methods:
        assert isinstance(method, CAMMethod)  # the CAM runner gets CAM-family names only
        groups.setdefault(method.pass_key, []).append(method)
    results: dict[str, MethodResult] = {}
    for (aug_smooth, fuse), group in groups.items():
        results.update(run_group(ctx, group, aug_smooth=aug_smooth, fuse_layers=fuse))
    return {name: results[name] for name in names}


from . import cam_variants  # noqa: E402, F401  (the variants register after the six classic CAMs)
