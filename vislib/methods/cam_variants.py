"""More of the CAM family: element-wise Grad-CAM, Eigen-Grad-CAM, KPCA-CAM, ShapleyCAM, Finer-CAM.

They reuse the family's pass (:mod:`~vislib.methods.cam_passes`): the same A and g, plus a
Hessian-vector product for ShapleyCAM and a second score for Finer-CAM. Definitions as the
reference libraries implement them (shared METHODS.md, "More methods"); where we differ, the class
docstring says so and why.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import MethodError
from .base import METHODS, ExplainContext, get_method, register_method
from .cam import SHARED_OPTIONS, CAMMethod

# --------------------------------------------------------------------------------------------------
# Projections


def first_component(M: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """N×h×w projection of each sample's M (HW×C, every channel centred over the positions) on its
    first right singular vector.

    The sign of a singular vector is arbitrary. With a ``reference`` map (N×h×w) the projection is
    turned to correlate positively with it (for the weighted activations: with their sum, the map the
    projection replaces); otherwise, or where the two are orthogonal, its largest-magnitude entry is
    made positive.
    """
    n, c, h, w = M.shape
    X = M.float().flatten(2).transpose(1, 2)  # N×HW×C
    X = X - X.mean(dim=1, keepdim=True)
    _, _, Vh = torch.linalg.svd(X, full_matrices=False)
    proj = torch.einsum("nzc,nc->nz", X, Vh[:, 0])
    return fix_sign(proj, None if reference is None else reference.reshape(n, -1).float()).view(n, h, w)


def fix_sign(proj: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of ``proj`` (N×Z) times ±1: positive correlation with ``reference`` where it is given and
    not orthogonal, else the largest-magnitude entry positive."""
    peak = proj.gather(1, proj.abs().argmax(dim=1, keepdim=True)).squeeze(1).sign()
    sign = torch.where(peak == 0, torch.ones_like(peak), peak)
    if reference is not None:
        dot = (proj * reference).sum(dim=1)
        scale = proj.norm(dim=1) * reference.norm(dim=1)
        sign = torch.where(dot.abs() > 1e-6 * scale, dot.sign(), sign)
    return proj * sign.unsqueeze(1)


KERNELS = ("sigmoid", "rbf", "poly", "linear", "cosine")


def kernel_matrix(X: torch.Tensor, kernel: str, gamma: float, coef0: float = 1.0, degree: int = 3
                  ) -> torch.Tensor:
    """N×Z×Z kernel of the rows of X (N×Z×C), with scikit-learn's parameterisation."""
    dot = X @ X.transpose(1, 2)
    if kernel == "sigmoid":
        return torch.tanh(gamma * dot + coef0)
    if kernel == "rbf":
        sq = X.pow(2).sum(dim=2)
        return torch.exp(-gamma * (sq.unsqueeze(2) + sq.unsqueeze(1) - 2 * dot).clamp_min(0))
    if kernel == "poly":
        return (gamma * dot + coef0).pow(degree)
    if kernel == "cosine":
        norm = X.norm(dim=2).clamp_min(1e-12)
        return dot / (norm.unsqueeze(2) * norm.unsqueeze(1))
    return dot


def kernel_pca(A: torch.Tensor, kernel: str = "sigmoid", gamma: float | None = None, coef0: float = 1.0,
               degree: int = 3) -> torch.Tensor:
    """N×h×w first kernel principal component of A (HW positions as samples, C channels as features,
    centred over the positions): the top eigenvector v of the centred kernel K̃ = K − 1K − K1 + 1K1,
    scaled by √λ (scikit-learn's ``KernelPCA.fit_transform``), largest-magnitude entry positive.
    ``gamma`` defaults to 1/C. Computed in float64 (the kernel's eigen-gap can be small)."""
    n, c, h, w = A.shape
    X = A.double().flatten(2).transpose(1, 2)
    X = X - X.mean(dim=1, keepdim=True)
    K = kernel_matrix(X, kernel, 1.0 / c if gamma is None else float(gamma), coef0, degree)
    K = K - K.mean(dim=1, keepdim=True) - K.mean(dim=2, keepdim=True) + K.mean(dim=(1, 2), keepdim=True)
    values, vectors = torch.linalg.eigh(K)
    proj = vectors[:, :, -1] * values[:, -1:].clamp_min(0).sqrt()
    return fix_sign(proj).float().view(n, h, w)


# --------------------------------------------------------------------------------------------------
# Methods


@register_method
class GradCAMElementWise(CAMMethod):
    """Grad-CAM element-wise (pytorch-grad-cam): Σ_k relu(g^k ⊙ A^k), the ReLU on every product
    rather than on the sum (HiResCAM) or on the gradient alone (LayerCAM)."""

    name = "gradcam_elementwise"
    title = "Grad-CAM element-wise"
    paper = "Gildenblat et al. 2021, pytorch-grad-cam (GradCAMElementWise)"
    elementwise = True

    def weighted(self, A, g, **kw):
        return F.relu(g * A)


@register_method
class EigenGradCAM(CAMMethod):
    """Eigen-Grad-CAM (pytorch-grad-cam): Eigen-CAM's projection applied to g ⊙ A: each channel of
    g ⊙ A centred over positions, projected on its first right singular vector. The sign is turned to
    correlate with Σ_k g^k ⊙ A^k (HiResCAM's map), so the map shows evidence *for* the class;
    pytorch-grad-cam leaves it to the SVD. Already a projection: no ``eigen_smooth`` option."""

    name = "eigengradcam"
    title = "Eigen-Grad-CAM"
    paper = "Muhammad & Yeasin 2020 (Eigen-CAM) applied to g ⊙ A, as in pytorch-grad-cam"
    passes = "1 fwd + 1 bwd + SVD"
    defaults = {"aug_smooth": False, "fuse_layers": None}

    def saliency(self, A, g, **kw):
        product = g * A
        return first_component(product, reference=product.sum(dim=1))


@register_method
class KPCACAM(CAMMethod):
    """KPCA-CAM (Karmani et al. 2024): the first kernel principal component of A (HW × C, centred
    over positions), as pytorch-grad-cam computes it with scikit-learn's ``KernelPCA``: ``kernel``
    "sigmoid" (default, tanh(γ⟨x, y⟩ + coef0)), "rbf", "poly", "linear" (= centred Eigen-CAM) or
    "cosine"; γ = ``gamma`` or 1/C, ``coef0`` = 1, ``degree`` = 3. Class-agnostic: no gradient, no
    contrast. Costs an eigen-decomposition of an HW × HW matrix per image."""

    name = "kpcacam"
    title = "KPCA-CAM"
    paper = ("Karmani et al. 2024, KPCA-CAM: Visual Explainability of Deep Computer Vision Models using "
             "Kernel PCA")
    passes = "1 fwd + kernel PCA"
    needs_gradients = False
    contrastive = False
    defaults = {"aug_smooth": False, "fuse_layers": None, "kernel": "sigmoid", "gamma": None, "coef0": 1.0,
                "degree": 3}

    def __init__(self, **options):
        super().__init__(**options)
        if self.options["kernel"] not in KERNELS:
            raise MethodError(f"kpcacam: kernel must be one of {', '.join(KERNELS)}, not "
                              f"{self.options['kernel']!r}")
        gamma = self.options["gamma"]
        if gamma is not None:
            _positive_number("kpcacam", "gamma", gamma)
        if not _is_real(self.options["coef0"]):
            raise MethodError(f"kpcacam: coef0 must be a number, not {self.options['coef0']!r}")
        degree = self.options["degree"]
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise MethodError(f"kpcacam: degree must be a positive integer, not {degree!r}")

    def saliency(self, A, g, **kw):
        o = self.options
        return kernel_pca(A, o["kernel"], o["gamma"], float(o["coef0"]), o["degree"])


@register_method
class ShapleyCAM(CAMMethod):
    """ShapleyCAM (Cai 2025): w_k = mean_ij [g − ½ H·A]^k_ij, map Σ_k w_k A^k, with H·A the
    Hessian-vector product of S with respect to A applied to A (one more backward through the graph
    of g, built with ``create_graph``): a second-order estimate of each channel's Shapley value.
    Where the part of the net above A is piecewise linear (ReLU, max-pool, linear), H·A = 0 and
    ShapleyCAM is Grad-CAM."""

    name = "shapleycam"
    title = "ShapleyCAM"
    paper = "Cai 2025, CAMs as Shapley Value-based Explainers"
    passes = "1 fwd + 2 bwd"

    @property
    def needs_hvp(self) -> bool:
        return True

    def channel_weights(self, A, g, *, hvp=None, **kw):
        return (g if hvp is None else g - 0.5 * hvp).mean(dim=(2, 3))


FINER_WEIGHTINGS = ("softmax", "mean")


def finer_bases() -> list[str]:
    """The gradient methods of the CAM family Finer-CAM can run on."""
    return [n for n, c in METHODS.items()
            if c.family == "cam" and issubclass(c, CAMMethod) and c.needs_gradients and n != "finercam"]


@register_method
class FinerCAM(CAMMethod):
    """Finer-CAM (Zhang et al., CVPR 2025): a base CAM (``base``, Grad-CAM by default) of the
    contrastive score S_c − α·Σ_d w_d S_d, d the ``comparisons`` classes whose logits are closest to
    the target's (the most similar classes), so that features shared with them cancel.

    pytorch-grad-cam's convention (written with the paper's authors): α = 1, 3 comparisons, w_d their
    softmax probabilities normalised to sum 1 (``weighting="softmax"``); torch-cam's is the plain mean
    (``weighting="mean"``) with α = 0.6. We take pytorch-grad-cam's defaults, and hold the weights
    constant (taken from the unperturbed logits), so that the map is the weighted mean of the
    contrastive maps S_c − α·S_d; pytorch-grad-cam also differentiates through the softmax weights.
    With a contrast class B (``explain(..., contrast=B)``) the comparison is B alone: S_A − α·S_B,
    which is contrastive Grad-CAM when α = 1.
    """

    name = "finercam"
    target_needs = ("class_axis",)
    title = "Finer-CAM"
    paper = ("Zhang et al. 2025, Finer-CAM: Spotting the Difference Reveals Finer Details for Visual "
             "Explanation")
    passes = "1 fwd + 1 bwd"
    defaults = {**SHARED_OPTIONS, "base": "gradcam", "alpha": 1.0, "comparisons": 3, "weighting": "softmax"}
    tasks = ("classification",)
    task_reason = ("it contrasts a class with the most similar classes of one softmax; a box or region "
                   "has none")

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        bases = finer_bases()
        if o["base"] not in bases:
            raise MethodError(f"finercam: base must be one of {', '.join(bases)}, not {o['base']!r}")
        if not _is_real(o["alpha"]) or not math.isfinite(o["alpha"]) or o["alpha"] < 0:
            raise MethodError(f"finercam: alpha must be a finite number ≥ 0, not {o['alpha']!r}")
        count = o["comparisons"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise MethodError(f"finercam: comparisons must be a positive integer, not {o['comparisons']!r}")
        if o["weighting"] not in FINER_WEIGHTINGS:
            raise MethodError(f"finercam: weighting must be one of {', '.join(FINER_WEIGHTINGS)}, not "
                              f"{o['weighting']!r}")
        self.base = get_method(o["base"])(**({"eigen_smooth": True} if o["eigen_smooth"] else {}))
        self._plan: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def score_key(self) -> tuple:
        o = self.options
        return ("finercam", float(o["alpha"]), o["comparisons"], o["weighting"])

    @property
    def needs_hvp(self) -> bool:
        return self.base.needs_hvp

    def comparisons(self, ctx: ExplainContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(N×T comparison classes, N×T weights), from the unperturbed logits."""
        if self._plan is None:
            assert ctx.logits is not None  # planned after the first forward
            logits, targets = ctx.logits.float(), ctx.targets
            if ctx.contrast is not None:
                classes = ctx.contrast.view(-1, 1)
            else:
                assert targets is not None  # Finer-CAM explains a class
                count = min(self.options["comparisons"], logits.shape[1] - 1)
                gap = (logits - logits.gather(1, targets.view(-1, 1))).abs()
                gap.scatter_(1, targets.view(-1, 1), float("inf"))
                classes = gap.topk(count, dim=1, largest=False).indices
            if self.options["weighting"] == "softmax" and classes.shape[1] > 0:
                p = F.softmax(logits, dim=1).gather(1, classes)
                weights = p / p.sum(dim=1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
            else:
                weights = torch.full(classes.shape, 1.0 / max(classes.shape[1], 1), device=logits.device)
            self._plan = classes, weights
        return self._plan

    def score(self, ctx: ExplainContext, logits: torch.Tensor) -> torch.Tensor:
        classes, weights = self.comparisons(ctx)
        ctx.set_logits(logits)
        assert ctx.bound is not None and ctx.targets is not None  # bound to a class by set_logits
        own = ctx.bound.retarget(ctx.targets).score(logits)
        columns = [ctx.bound.retarget(classes[:, j]).score(logits) for j in range(classes.shape[1])]
        others = torch.stack(columns, dim=1) if columns else torch.zeros_like(weights)
        return own - float(self.options["alpha"]) * (weights * others).sum(dim=1)

    def saliency(self, A, g, **kw):
        return self.base.saliency(A, g, **kw)

    def extra(self, ctx: ExplainContext) -> dict:
        classes, weights = self.comparisons(ctx)
        return {"comparisons": classes.tolist(), "comparison_weights": weights.tolist(),
                "alpha": float(self.options["alpha"]), "base": self.options["base"],
                "weighting": self.options["weighting"]}


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_number(method: str, key: str, value) -> None:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise MethodError(f"{method}: {key} must be a positive number, not {value!r}")
