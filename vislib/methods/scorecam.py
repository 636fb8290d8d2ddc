"""Score-CAM and its smoothed variants (SS-CAM, IS-CAM): one masked-forward template.

All three weight channel k of the target layer by a softmax over channels of the class score of
the input masked by the channel's own normalised, upsampled activation; they differ only in how
each mask is drawn before it multiplies the input:

==========  ============================================  ======================================
method      masked inputs per channel                      exact savings
==========  ============================================  ======================================
Score-CAM   x ⊙ m_k                                        constant and duplicate masks
IS-CAM      x ⊙ c_i·m_k, c_i = Σ_{j≤i} j/n, i = 1..n       constant and duplicate masks
SS-CAM      x ⊙ (m_k + σ·ε_ik), ε ~ N(0, 1) per pixel      none when σ > 0 (σ = 0: Score-CAM)
==========  ============================================  ======================================

with m_k = norm(up(A^k)) and the score averaged over the n draws before the softmax. The template
(:class:`MaskedScores`) owns the selection of the masks, the batched forwards (through the
session: frozen copy on the CPU, large batches and optional autocast on CUDA, progress and
cancel), the zero-image pass and the extras; a variant only says how many draws it makes and how a
draw changes a batch of masks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import MethodError
from .base import register_method
from .perturbation_base import PRECISIONS, PerturbationMethod, Plan, Session, autocast

Perturb = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def upsampled_masks(
    features: torch.Tensor, size: tuple[int, int], align_corners: bool = False
) -> torch.Tensor:
    """norm(up(A)) for B×h×w maps: bilinear upsampling to ``size`` then per-map min-max to [0, 1].

    A constant map has no defined min-max normalisation (0/0); its mask is 0 everywhere.
    """
    up = F.interpolate(features.unsqueeze(1), size=size, mode="bilinear", align_corners=align_corners)
    up = up.squeeze(1)
    lo = up.flatten(1).amin(dim=1).view(-1, 1, 1)
    hi = up.flatten(1).amax(dim=1).view(-1, 1, 1)
    span = hi - lo
    return torch.where(span > 0, (up - lo) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)


def _normalised(a: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max of N×h×w maps (a constant map becomes 0)."""
    flat = a.flatten(1)
    lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return ((flat - lo) / span).view_as(a)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Mean over samples of the Pearson correlation of two N×… tensors (None if one is constant)."""
    a = a.double().flatten(1)
    b = b.double().flatten(1)
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    if bool(((na == 0) | (nb == 0)).any()):
        return None
    return float(((a * b).sum(dim=1) / (na * nb)).mean())


class NoiseRows:
    """σ·N(0, 1) noise, one H×W field per masked input, drawn in row order from a CPU generator
    seeded with ``seed``: the noise (and so the map) does not depend on the device or the batch size.

    Row r of the stream is ``σ · torch.randn(H, W, generator=g)`` after r such draws; when H·W is a
    multiple of 16 this is the same stream as one ``σ · torch.randn(rows, H, W)`` (what torch-cam's
    SS-CAM draws per noise sample, after ``torch.manual_seed(seed)``). Rows are asked for in
    increasing order; the last block is kept so that a batch retried after an out-of-memory error
    gets the same noise.
    """

    def __init__(self, seed: int, shape: tuple[int, int], sigma: float, device: torch.device):
        self.generator = torch.Generator().manual_seed(seed)
        self.shape, self.sigma, self.device = shape, sigma, device
        self.first = 0  # stream index of self.block[0]
        self.block = torch.empty(0, *shape)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if start < self.first:
            raise RuntimeError("noise rows are drawn in increasing order")
        drawn = self.first + len(self.block)
        kept = self.block[max(0, start - self.first):]
        new = [torch.randn(self.shape, generator=self.generator) for _ in range(drawn, stop)]
        block = torch.cat([kept, torch.stack(new)]) if new else kept
        self.first, self.block = min(start, drawn), block
        skip = start - self.first
        return (self.block[skip: skip + stop - start] * self.sigma).to(self.device)


class MaskedScores(PerturbationMethod):
    """Template of Score-CAM and its variants: w_k = softmax_k (1/n) Σ_i S^c(x ⊙ T_i(m_k)),
    map ReLU(Σ_k w_k A^k), with m_k = norm(up(A^k)) and T_i a variant's i-th draw.

    A variant overrides :meth:`draws` (n), :meth:`exact_dedupe` (whether equal masks give equal
    masked inputs, so one forward serves them all) and :meth:`perturbation` (T as a function of a
    batch of masks and their draw indices).
    """

    options_allowed: ClassVar[tuple[str, ...]] = (
        "batch_size", "channels_last", "fast_forward", "align_corners", "top_k", "return_weights",
        "precision", "compare_fp32")
    cuda_batch_size = 256

    def draws(self) -> int:
        return 1

    def exact_dedupe(self) -> bool:
        return self.bool_option("skip", True)

    def perturbation(self, size: tuple[int, int], device: torch.device) -> Perturb:
        """A fresh T for one pass over the rows (a variant with noise starts its stream anew)."""
        return lambda masks, draws, start, stop: masks

    def variant_extras(self) -> dict:
        return {}

    def plan(self, session: Session) -> Plan:
        ctx = session.ctx
        A = session.activation()
        n, c = A.shape[:2]
        align = self.bool_option("align_corners", False)
        top_k = self.int_option("top_k", None)
        precision = self.choice_option("precision", "fp32", PRECISIONS)
        compare = self.bool_option("compare_fp32", False)
        if compare and precision == "fp32":
            raise MethodError(f"{self.name}: compare_fp32 needs precision='bf16' or 'fp16'")
        batch_size = self.batch_size_for(session.device)
        channels_last, fast_forward = self.channels_last, self.fast_forward
        dedupe = self.exact_dedupe()
        draws = self.draws()
        flat = A.flatten(2)
        lo, hi = flat.amin(dim=2), flat.amax(dim=2)
        constant = hi == lo
        considered = torch.ones_like(constant)
        approximate = top_k is not None and top_k < c
        if approximate and top_k is not None:  # (approximate implies it; for the type checker)
            considered = torch.zeros_like(constant)
            considered.scatter_(1, flat.mean(dim=2).topk(top_k, dim=1).indices, True)
        span = torch.where(constant, torch.ones_like(hi), hi - lo).unsqueeze(2)
        normed = torch.where(constant.unsqueeze(2), 0.0, (flat - lo.unsqueeze(2)) / span)
        groups, owner = [], []
        feats: list[torch.Tensor] = []
        for i in range(n):
            wanted = considered[i] & ~constant[i] if dedupe else considered[i]
            channels = wanted.nonzero().squeeze(1)
            rows = normed[i, channels]
            if dedupe and len(rows):
                rows, inverse = torch.unique(rows, dim=0, return_inverse=True)
            else:
                inverse = torch.arange(len(rows), device=A.device)
            groups.append((channels, inverse, sum(len(f) for f in feats)))
            feats.append(rows)
            owner.append(torch.full((len(rows),), i, dtype=torch.long, device=A.device))
        feats_all = torch.cat(feats).view(-1, *A.shape[2:])
        owner_all = torch.cat(owner)
        masks_count = len(feats_all)
        rows_total = draws * masks_count
        zero_pass = dedupe and bool((considered & constant).any())
        size = (int(ctx.inputs.shape[-2]), int(ctx.inputs.shape[-1]))

        def batches() -> Callable[[int, int], torch.Tensor]:
            perturb = self.perturbation(size, ctx.inputs.device)

            def make_batch(start: int, stop: int) -> torch.Tensor:
                row = torch.arange(start, stop, device=A.device)
                mask, draw = row % masks_count, row // masks_count
                masks = perturb(upsampled_masks(feats_all[mask], size, align), draw, start, stop)
                return ctx.inputs[owner_all[mask]] * masks.unsqueeze(1)

            return make_batch

        def weights_at(precision: str) -> torch.Tensor:
            samples = owner_all.repeat(draws)
            row_scores = session.scores(rows_total, batches(), samples, ctx.bound, batch_size,
                                        fast_forward=fast_forward, channels_last=channels_last,
                                        precision=precision)
            per_mask = row_scores.view(draws, masks_count).mean(dim=0) if rows_total else row_scores
            scores = torch.full((n, c), float("-inf"), device=A.device)
            if zero_pass:
                zero_scores = self._zero_image_scores(session, precision)
                scores = torch.where(considered & constant, zero_scores.view(-1, 1), scores)
            for i, (channels, inverse, offset) in enumerate(groups):
                scores[i, channels] = per_mask[offset + inverse]
            return torch.softmax(scores, dim=1)

        def run() -> tuple[torch.Tensor, dict]:
            weights = weights_at(precision)
            forward_info = dict(session.forward_info)
            raw = F.relu(torch.einsum("nc,nchw->nhw", weights, A))
            labels = []
            if approximate:
                labels.append(f"approximate: top {top_k} channels")
            if precision != "fp32":
                labels.append(f"{precision} autocast")
            extra = {
                "channels": n * c,
                "channels_evaluated": masks_count,
                "channels_skipped": int(considered.sum()) - masks_count,
                "forwards": rows_total + int(zero_pass),
                "batch_size": batch_size,
                **self.variant_extras(),
                **forward_info,
                "approximate": bool(labels),
                "title": f"{self.title} ({', '.join(labels)})" if labels else self.title,
            }
            if approximate:
                extra["channels_dropped"] = n * c - int(considered.sum())
            if compare:
                exact = F.relu(torch.einsum("nc,nchw->nhw", weights_at("fp32"), A))
                extra["fp32_pearson"] = _pearson(raw, exact)
                extra["fp32_max_abs_diff"] = float((_normalised(raw) - _normalised(exact)).abs().max())
            elif precision != "fp32":
                extra["fp32_pearson"] = extra["fp32_max_abs_diff"] = None  # compare_fp32=True measures them
            if self.bool_option("return_weights", False):
                extra["weights"] = weights.cpu().tolist()
            return raw, extra

        forwards = rows_total + int(zero_pass)
        return Plan(forwards=forwards * (2 if compare else 1), run=run)

    @staticmethod
    def _zero_image_scores(session: Session, precision: str = "fp32") -> torch.Tensor:
        """Score of every sample's target on the all-zero input (the mask of a constant channel,
        whatever a variant scales it by)."""
        ctx = session.ctx
        zeros = torch.zeros((1, *ctx.inputs.shape[1:]), device=ctx.inputs.device)
        with torch.inference_mode(), autocast(session.device, precision):
            with session.bundle.lock:
                logits = session.bundle.logits(zeros)
            n = ctx.inputs.shape[0]  # each image's target scored on the one zero-image output
            scores = ctx.row_scores(logits.float().expand(n, *logits.shape[1:]))
        session.advance(1)
        return scores


@register_method
class ScoreCAM(MaskedScores):
    """Score-CAM (Wang et al., CVPR-W 2020): w = softmax_k S^c(x ⊙ norm(up(A^k))), map ReLU(Σ_k w_k A^k).

    ``norm(up(·))`` is bilinear upsampling to the input size followed by per-channel min-max to
    [0, 1]; S^c is the class logit (or probability when ``score="probability"``). (torch-cam
    min-maxes at feature resolution before upsampling; the two agree at ρ = 1.0000 on ResNets.)

    Exact savings (``skip=True``, default): the mask of channel k depends on A^k only through its
    min-max normalised version, because norm(up(a·A + b)) = norm(up(A)) for a > 0 (bilinear
    upsampling is linear and preserves constants). So

    * every *constant* channel (identically zero ones included) has the mask 0, hence the masked
      input x ⊙ 0 = 0: one forward on the zero image gives the score of all of them;
    * channels whose feature-resolution normalised maps are equal have identical masked inputs,
      hence identical scores: one forward serves the whole group.

    Every channel still enters the softmax with its own (exact) score, so the map is the one the
    channel-by-channel definition gives (up to float rounding), not an approximation. (The
    peers' ``(up − min)/(max − min + ε)`` also gives the zero mask for zero channels; for a
    non-zero constant channel it amplifies rounding noise of the upsampling instead.)

    Speed: the masked forwards are the whole cost and cannot be shared between channels, so the
    exact gains are the skipped channels plus cheaper forwards: inference mode, batches of 32, and
    on the CPU a frozen copy of the model when it pays (:mod:`vislib.methods.frozen`); on CUDA
    batches of 256 (halved after an out-of-memory error) and, as a labelled option, autocast.

    Options: ``batch_size`` (masked inputs per forward, default 32 on the CPU, 256 on CUDA),
    ``fast_forward`` ("auto", True or False: the frozen copy), ``channels_last`` (memory order of
    eager batches, default True), ``skip`` (default True), ``align_corners`` (bilinear upsampling
    convention, default False; pytorch-grad-cam uses True), ``top_k`` (APPROXIMATE: only the k
    channels with the highest mean activation are scored and enter the softmax), ``precision``
    ("fp32" default, or "bf16" / "fp16": APPROXIMATE, the masked forwards under
    ``torch.autocast``), ``compare_fp32`` (with a reduced precision, also compute the fp32 map and
    put the Pearson r and the largest difference of the min-max normalised maps in the extras:
    twice the forwards), ``return_weights`` (add the N×C channel weights to the extras).
    Approximations are marked ``approximate`` in the extras and in the title.
    """

    name = "scorecam"
    passes = "1 fwd + K masked fwd, batched"
    slow = True
    title = "Score-CAM"
    paper = "Wang et al. 2020, Score-CAM: Score-Weighted Visual Explanations for CNNs"
    options_allowed = MaskedScores.options_allowed + ("skip",)


@register_method
class SSCAM(MaskedScores):
    """SS-CAM (Wang, Naidu et al. 2020): Score-CAM whose channel scores are averaged over n noisy
    masks, w_k = softmax_k (1/n) Σ_i S^c(x ⊙ (m_k + σ·ε_ik)), ε_ik ~ N(0, 1) per pixel.

    As torch-cam's SSCAM (and METHODS.md): the noise is added to the upsampled, min-max normalised
    mask m_k, one H×W field per draw, sample and channel (shared by the colour channels), and the
    average is taken over the raw scores before the softmax (torch-cam subtracts the clean score
    first, which the softmax does not see). Where we differ: m_k is min-maxed after upsampling (as
    our Score-CAM), and the noise comes from a generator seeded by ``seed``, drawn on the CPU in the
    order draw → sample → channel, so a map is reproducible and the same on every device; it is
    torch-cam's stream after ``torch.manual_seed(seed)`` when H·W is a multiple of 16.

    With σ > 0 every masked input is distinct: no channel is skipped (n·N·C forwards, 35× Score-CAM
    at the defaults). With σ = 0 the draws coincide and SS-CAM is Score-CAM, computed as such.

    Options: ``n_samples`` (n, default 35), ``sigma`` (σ in mask units, default 2.0), ``seed``
    (default 0), and Score-CAM's ``batch_size``, ``fast_forward``, ``channels_last``,
    ``align_corners``, ``top_k``, ``precision``, ``compare_fp32``, ``return_weights``.
    """

    name = "sscam"
    passes = "1 fwd + n·K noisy masked fwd, batched"
    slow = True
    title = "SS-CAM"
    paper = "Wang, Naidu et al. 2020, SS-CAM: Smoothed Score-CAM for Sharper Visual Feature Localization"
    options_allowed = MaskedScores.options_allowed + ("n_samples", "sigma", "seed")

    @property
    def sigma(self) -> float:
        return self.float_option("sigma", 2.0)

    def draws(self) -> int:
        n = self.int_option("n_samples", 35)
        return 1 if self.sigma == 0 else n

    def exact_dedupe(self) -> bool:
        return self.sigma == 0

    def perturbation(self, size: tuple[int, int], device: torch.device) -> Perturb:
        sigma = self.sigma
        if sigma == 0:
            return super().perturbation(size, device)
        noise = NoiseRows(self.int_option("seed", 0, low=0), size, sigma, device)
        return lambda masks, draws, start, stop: masks + noise.rows(start, stop)

    def variant_extras(self) -> dict:
        return {"n_samples": self.int_option("n_samples", 35), "sigma": self.sigma,
                "seed": self.int_option("seed", 0, low=0)}


def integration_coefficients(n: int) -> torch.Tensor:
    """IS-CAM's mask scales c_i = Σ_{j=1..i} j/n = i(i+1)/(2n), i = 1..n (mean (n+1)(n+2)/(6n))."""
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return (i * (i + 1) / (2 * n)).float()


@register_method
class ISCAM(MaskedScores):
    """IS-CAM (Naidu et al. 2020): Score-CAM whose channel scores are averaged over n scaled masks,
    w_k = softmax_k (1/n) Σ_i S^c(x ⊙ c_i·m_k), c_i = Σ_{j=1..i} j/n.

    As METHODS.md and torch-cam's ISCAM define it (the scale accumulates: c_i = i(i+1)/(2n), so it
    reaches (n+1)/2 at i = n, 5.5 at the default n = 10; a straight path from the zero image would
    use i/n). torch-cam subtracts the clean score before averaging, which the softmax does not see;
    we min-max m_k after upsampling, as our Score-CAM. With n = 1, c_1 = 1: IS-CAM is Score-CAM.

    Exact savings as Score-CAM's (``skip``): a constant channel's masked inputs are the zero image
    at every scale, and equal masks give equal masked inputs; n·(distinct masks) + 1 forwards.
    Options: ``n_samples`` (n, default 10), ``skip``, and Score-CAM's ``batch_size``,
    ``fast_forward``, ``channels_last``, ``align_corners``, ``top_k``, ``precision``,
    ``compare_fp32``, ``return_weights``.
    """

    name = "iscam"
    passes = "1 fwd + n·K scaled masked fwd, batched"
    slow = True
    title = "IS-CAM"
    paper = "Naidu et al. 2020, IS-CAM: Integrated Score-CAM for axiomatic-based explanations"
    options_allowed = MaskedScores.options_allowed + ("skip", "n_samples")

    def draws(self) -> int:
        return self.int_option("n_samples", 10)

    def perturbation(self, size: tuple[int, int], device: torch.device) -> Perturb:
        scale = integration_coefficients(self.draws()).to(device)
        return lambda masks, draws, start, stop: masks * scale[draws].view(-1, 1, 1)

    def variant_extras(self) -> dict:
        n = self.draws()
        return {"n_samples": n, "mean_scale": round((n + 1) * (n + 2) / (6 * n), 6)}
