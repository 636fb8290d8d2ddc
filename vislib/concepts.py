"""Deep Feature Factorization (Collins, Achanta & Süsstrunk, ECCV 2018): the concepts of a layer.

The layer's activation of one image (or of a batch, factorized jointly) is a non-negative matrix
V (C channels × Z positions) once each channel's minimum is shifted to 0. Non-negative matrix
factorization V ≈ W·H splits it into k concepts: column W_d is what concept d looks like in the
channels, row H_d where it is in the image. Run through the classifier head, a concept vector says
which classes it speaks for.

- NMF: Lee & Seung's multiplicative updates for ‖V − WH‖²_F (float64, on the CPU, seeded: the same
  input gives the same concepts on any device); each update never increases the error.
- Each row H_d is scaled to a maximum of 1 (W_d takes the factor), so W_d + the channel minima is the
  layer's activation at a position where concept d is fully present: the *concept vector*.
- Classes: on a global-average-pool + linear head, logits = W_fc·(concept vector) + b (what
  pytorch-grad-cam's DFF computes with the linear layer). On another head that is a function of the
  layer alone (traced with torch.fx, checked against the model's logits) the head runs on a map that
  shows the concept at every position, which is the same thing on any GAP-based head. Otherwise
  :func:`concepts` refuses (``classes=False`` returns the maps alone).
"""

from __future__ import annotations

import colorsys
import html
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import MethodError
from .hooks import capture_layer, resolve_layer

# --------------------------------------------------------------------------------------------------
# Non-negative matrix factorization


@dataclass
class NMF:
    """V ≈ W·H (W: C×k, H: k×Z, both ≥ 0), the squared error after each iteration."""

    W: torch.Tensor
    H: torch.Tensor
    losses: list[float]
    norm: float = 0.0  # ‖V‖_F

    @property
    def relative_error(self) -> float:
        """‖V − WH‖_F / ‖V‖_F after the last iteration."""
        return math.sqrt(self.losses[-1]) / self.norm if self.norm > 0 else 0.0


def nmf(V: torch.Tensor, k: int, *, iterations: int = 400, tol: float = 1e-5, seed: int = 0) -> NMF:
    """Factorize a non-negative C×Z matrix into W (C×k) · H (k×Z) by multiplicative updates
    (Lee & Seung 2001): H ← H ⊙ WᵀV / WᵀWH, W ← W ⊙ VHᵀ / WHHᵀ, from a seeded uniform start scaled
    to √(mean V / k) (scikit-learn's ``init="random"`` scale). Stops when an iteration lowers the
    squared error by less than ``tol`` of it. float64 on the CPU."""
    V = V.detach().to("cpu", torch.float64)
    if bool((V < 0).any()):
        raise ValueError("NMF needs a non-negative matrix")
    c, z = V.shape
    gen = torch.Generator().manual_seed(seed)
    scale = math.sqrt(float(V.mean()) / k) if float(V.mean()) > 0 else 1.0
    W = scale * torch.rand(c, k, generator=gen, dtype=torch.float64)
    H = scale * torch.rand(k, z, generator=gen, dtype=torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    norm2 = float(V.pow(2).sum())
    losses: list[float] = []
    for _ in range(iterations):
        H *= (W.T @ V) / (W.T @ W @ H).clamp_min(tiny)
        VHt, HHt = V @ H.T, H @ H.T
        W *= VHt / (W @ HHt).clamp_min(tiny)
        # ‖V − WH‖² = ‖V‖² − 2⟨W, VHᵀ⟩ + ⟨WᵀW, HHᵀ⟩: from the k-column products the update made,
        # without forming the C×Z residual
        losses.append(max(norm2 - 2 * float((W * VHt).sum()) + float(((W.T @ W) * HHt).sum()), 0.0))
        if len(losses) > 1 and losses[-2] - losses[-1] <= tol * losses[-2]:
            break
    return NMF(W, H, losses, norm=float(V.norm()))


# --------------------------------------------------------------------------------------------------
# Concepts of one image (or a batch)


@dataclass
class Concepts:
    """What :func:`concepts` returns. With a batch, ``maps`` and ``raw`` have the batch first."""

    maps: np.ndarray  # k×H×W in [0, 1] at the input resolution (``raw`` upsampled)
    raw: np.ndarray  # k×h×w: the rows of H at feature resolution, each scaled to a maximum of 1 (per batch)
    vectors: np.ndarray  # k×C: the layer's activation where each concept is fully present
    share: np.ndarray  # k: each concept's share ‖W_d‖·‖H_d‖ / Σ of the factorization (sorted, largest first)
    logits: np.ndarray | None  # k×classes: the head applied to the concept vectors
    top_classes: list[list[tuple[int, str, float]]]  # per concept: (class, label, softmax probability)
    head: str  # how the classes were obtained: "gap_linear", "traced_head" or "none"
    relative_error: float  # ‖V − WH‖ / ‖V‖
    losses: list[float]
    layer: str
    model: str
    input_image: Image.Image | list[Image.Image]
    batched: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def k(self) -> int:
        return len(self.vectors)

    def legend(self, top: int = 2) -> list[str]:
        """One line per concept: its share of the layer and its top classes."""
        lines = []
        for d in range(self.k):
            text = f"Concept {d + 1} ({self.share[d]:.0%} of the layer)"
            if self.top_classes:
                text += ": " + ", ".join(f"{label} {p:.0%}" for _, label, p in self.top_classes[d][:top])
            lines.append(text)
        return lines


def concepts(bundle, image, k: int = 5, layer: str | None = None, *, top: int = 3, classes: bool = True,
             iterations: int = 400, seed: int = 0) -> Concepts:
    """Deep Feature Factorization of ``layer`` (default: the bundle's default layer) into ``k``
    concepts: their maps (k×H×W in [0, 1]) and each concept's ``top`` classes through the classifier
    head. ``image``: anything :func:`vislib.explain` takes; a list is factorized jointly (concepts
    shared by the images, maps N×k×H×W). ``classes=False``: the maps alone, for heads that cannot
    take a concept vector (the refusal says why)."""
    from .explain import _prepare_inputs
    from .models import load_model

    if isinstance(bundle, str):
        bundle = load_model(bundle)
    layer_name, module = resolve_layer(bundle, layer)
    batched, views, inputs = _prepare_inputs(bundle, image)
    with bundle.lock, capture_layer(module, view=bundle.view(layer_name)) as captured, torch.no_grad():
        logits = bundle.logits(inputs)
    A = captured.activation
    if A is None or A.dim() != 4:
        raise MethodError(f"layer {layer_name!r} did not give an N×C×h×w activation")
    n, c, h, w = A.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(c, n * h * w):
        raise MethodError(f"k must be an integer from 1 to {min(c, n * h * w)} (the channels and positions "
                          f"of layer {layer_name!r}), not {k!r}")
    V = A.detach().double().cpu().permute(1, 0, 2, 3).reshape(c, -1)  # C × (N·h·w)
    offset = V.amin(dim=1, keepdim=True)
    fit = nmf(V - offset, k, iterations=iterations, seed=seed)
    W, H = fit.W, fit.H
    strength = W.norm(dim=0) * H.norm(dim=1)
    order = torch.argsort(strength, descending=True)
    W, H, strength = W[:, order], H[order], strength[order]
    peak = H.amax(dim=1, keepdim=True)
    H = torch.where(peak > 0, H / torch.where(peak > 0, peak, torch.ones_like(peak)), 0.0)
    W = W * peak.T
    vectors = (W + offset).T  # k × C
    raw = H.reshape(k, n, h, w).permute(1, 0, 2, 3)  # N × k × h × w
    maps = _input_maps(raw.float(), (inputs.shape[-2], inputs.shape[-1]))
    result = Concepts(
        maps=maps if batched else maps[0], raw=raw.float().numpy() if batched else raw[0].float().numpy(),
        vectors=vectors.float().numpy(), share=(strength / strength.sum().clamp_min(1e-300)).numpy(),
        logits=None, top_classes=[], head="none", relative_error=fit.relative_error, losses=fit.losses,
        layer=layer_name, model=bundle.name, input_image=views if batched else views[0], batched=batched,
    )
    if classes:
        concept_logits, result.head = head_logits(bundle, layer_name, A, logits, vectors, (h, w))
        result.logits = concept_logits.numpy()
        probs = F.softmax(concept_logits, dim=1)
        top = min(top, probs.shape[1])
        values, indices = probs.topk(top, dim=1)
        result.top_classes = [[(int(i), bundle.labels[int(i)], float(p)) for p, i in zip(vs, ix, strict=True)]
                              for vs, ix in zip(values, indices, strict=True)]
    return result


def concepts_or_maps(bundle, image, k: int = 5, layer: str | None = None) -> tuple[Concepts, str]:
    """:func:`concepts` with their classes, or, where the head cannot take a concept vector, the maps
    alone and the reason (for a page that shows what it can)."""
    try:
        return concepts(bundle, image, k, layer), ""
    except MethodError as exc:
        if "classes=False" not in str(exc):
            raise
        return concepts(bundle, image, k, layer, classes=False), str(exc)


def _input_maps(raw: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """N×k×h×w rows of H (each already divided by its maximum over the whole batch) → N×k×H×W,
    bilinear (``align_corners=False``). Not min-max scaled per image: a concept that is weak or absent
    in one image of a batch stays dark there."""
    n, k, h, w = raw.shape
    up = F.interpolate(raw.reshape(n * k, 1, h, w), size=size, mode="bilinear", align_corners=False)
    return up.clamp_(0, 1).reshape(n, k, *size).numpy().astype(np.float32)


def head_logits(bundle, layer: str, A: torch.Tensor, logits: torch.Tensor, vectors: torch.Tensor,
                grid: tuple[int, int]) -> tuple[torch.Tensor, str]:
    """k×classes logits of the concept vectors (k×C), and the route taken (see the module docstring)."""
    from .methods.cam import gap_linear_head
    from .methods.perturbation import cached_head

    vectors = vectors.float().to(A.device)
    try:
        fc = gap_linear_head(bundle.model, A.float(), logits.float(), layer)
    except MethodError:
        fc = None
    if fc is not None:
        with torch.no_grad():
            return F.linear(vectors, fc.weight, fc.bias).float().cpu(), "gap_linear"
    with bundle.lock:
        head, reason = cached_head(bundle.model, layer)
    if head is not None:
        try:
            with torch.no_grad():
                check = head(A.clone())
                ok = isinstance(check, torch.Tensor) and check.shape == logits.shape
                gap = float((check - logits).abs().max()) if ok else math.inf
                if ok and gap <= 1e-4 * max(1.0, float(logits.abs().max())):
                    tiled = vectors[:, :, None, None].expand(-1, -1, *grid).contiguous()
                    return head(tiled).float().cpu(), "traced_head"
                reason = "the traced head does not reproduce the model's logits"
        except Exception as exc:  # noqa: BLE001  (a head that cannot take a batch of k maps)
            reason = f"the traced head failed on the concept maps ({type(exc).__name__})"
    raise MethodError(
        f"the concepts of layer {layer!r} cannot go through the classifier: the part of {bundle.name} above "
        f"it is not a function of that layer alone ({reason}). Pick a later layer (the default, "
        f"{bundle.default_layer}, works for most models) or ask for the maps alone (classes=False)."
    )


# --------------------------------------------------------------------------------------------------
# Pictures (no Streamlit here: the pages only place them)


def concept_colors(k: int) -> list[tuple[int, int, int]]:
    """k distinct colours: hues evenly spaced around the wheel (as DFF's gist_rainbow), saturated."""
    rgb = [colorsys.hsv_to_rgb(d / k, 0.85, 0.95) for d in range(k)]
    return [(round(255 * r), round(255 * g), round(255 * b)) for r, g, b in rgb]


def concept_image(image: Image.Image, maps: np.ndarray, *, alpha: float = 0.7,
                  colors: list[tuple[int, int, int]] | None = None) -> Image.Image:
    """Each pixel coloured by its strongest concept, as strongly as that concept is present there:
    (1 − α·m)·image + α·m·colour, m the strongest concept's map value (k×H×W in [0, 1])."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"concept maps are k×H×W, not shape {maps.shape}")
    colors = colors or concept_colors(len(maps))
    if maps.shape[1:] != (image.height, image.width):
        bilinear = Image.Resampling.BILINEAR
        maps = np.stack([np.asarray(Image.fromarray(m, mode="F").resize(image.size, bilinear)) for m in maps])
    strongest = maps.argmax(axis=0)
    strength = np.clip(np.take_along_axis(maps, strongest[None], axis=0)[0], 0, 1)[..., None]
    palette = np.asarray(colors, dtype=np.float32)[strongest]
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = (1 - alpha * strength) * base + alpha * strength * palette
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def legend_html(result: Concepts, top: int = 2) -> str:
    """The legend as HTML lines (a coloured square, then :meth:`Concepts.legend`), text escaped."""
    colors = concept_colors(result.k)
    return "<br>".join(
        f'<span style="color:rgb{colors[d]}">&#9632;</span> {html.escape(line)}'
        for d, line in enumerate(result.legend(top))
    )
