"""The passes of the CAM family: one forward (capturing one or several layers), the backward passes
its methods need, and the options that repeat or extend that pass.

A group of methods with the same ``pass_key`` (aug_smooth, fuse_layers) shares everything here:

- one forward capturing the target layer (and the layers to fuse);
- one backward per distinct score (``score_key``): the class score S (or S_A − S_B with a
  contrast) for most methods, Finer-CAM's S_c − α·Σ_d w_d S_d for Finer-CAM;
- a Hessian-vector product H·A (one more backward through a graph built with ``create_graph``)
  for the scores whose methods need it (ShapleyCAM);
- with ``aug_smooth``, all of the above on each of the 6 augmented inputs; with ``fuse_layers``,
  the gradients of every layer from the same backward.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import MethodError
from ..hooks import capture_layer, resolve_layer
from .base import ExplainContext, MethodResult, Stopwatch
from .sharing import shared_cam_pass

#: (horizontal flip, input multiplier) of ``aug_smooth``, the unaugmented input first (its logits
#: fix the explained class). pytorch-grad-cam's default test-time augmentation (ttach).
AUGMENTATIONS = ((False, 1.0), (False, 0.9), (False, 1.1), (True, 0.9), (True, 1.0), (True, 1.1))
SHALLOW_GAMMA = 2.0  # LayerCAM eq. 9: shallow maps become tanh(γ·M/max M)


@dataclass
class LayerPass:
    """What one pass gives the methods at one layer: A, and per score key g and H·A."""

    layer: str
    activation: torch.Tensor
    gradients: dict[tuple, torch.Tensor] = field(default_factory=dict)
    hvps: dict[tuple, torch.Tensor] = field(default_factory=dict)


def run_group(ctx: ExplainContext, methods: list, *, aug_smooth: bool, fuse_layers: tuple[str, ...]
              ) -> dict[str, MethodResult]:
    """Maps of ``methods`` (all with the same pass key) at feature resolution, after the ReLU."""
    bundle = ctx.bundle
    names = [ctx.layer] + [name for name in fuse_layers if name != ctx.layer]
    modules = [resolve_layer(bundle, name) for name in names]
    augmentations = AUGMENTATIONS if aug_smooth else AUGMENTATIONS[:1]
    prefix = ("aug_smooth_" if aug_smooth else "") + ("fused_" if len(modules) > 1 else "")
    totals: dict[str, torch.Tensor] = {}
    seconds = {m.name: 0.0 for m in methods}
    class_weights = None
    for step, (flip, factor) in enumerate(augmentations):
        x = ctx.inputs.flip(-1) if flip else ctx.inputs
        x = x * factor if factor != 1.0 else x
        passes = cam_pass(ctx, x, modules, methods, prefix)
        if step == 0:
            share_pass(ctx, passes[0])
            if any(m.name == "cam" for m in methods):
                from .cam import gap_linear_head

                assert ctx.logits is not None and ctx.bound is not None  # cam_pass's forward set them
                head = gap_linear_head(bundle.model, passes[0].activation, ctx.logits, ctx.layer)
                # the target's coefficients on the outputs (one-hot for a class, minus the contrast's)
                class_weights = ctx.bound.head_rows(ctx.logits).to(head.weight.dtype) @ head.weight.detach()
        for method in methods:
            with Stopwatch(bundle.device) as sw:
                maps = [F.relu(method.saliency(p.activation, p.gradients.get(method.score_key),
                                               hvp=p.hvps.get(method.score_key), class_weights=class_weights))
                        for p in passes]
                out = maps[0] if len(maps) == 1 else fuse_maps(maps)
                if flip:
                    out = out.flip(-1)
                if aug_smooth:
                    out = min_max(out)
                totals[method.name] = out if step == 0 else totals[method.name] + out
            seconds[method.name] += sw.seconds
        if aug_smooth:
            ctx.report(step + 1, len(augmentations))
        else:
            ctx.check_cancel()
    results = {}
    for method in methods:
        extra = dict(method.extra(ctx))
        if aug_smooth:
            extra["augmentations"] = len(augmentations)
        if len(modules) > 1:
            extra["fused_layers"] = ", ".join(names)
        mean = totals[method.name] / len(augmentations)
        results[method.name] = MethodResult(mean, seconds[method.name], extra)
    return results


def cam_pass(ctx: ExplainContext, x: torch.Tensor, modules: list, methods: list, prefix: str = ""
             ) -> list[LayerPass]:
    """One forward of ``x`` capturing each layer of ``modules`` ((name, module) pairs), then the
    backward passes the methods need. The first forward's logits fix the targets (``ctx``)."""
    bundle = ctx.bundle
    keys = list(dict.fromkeys(m.score_key for m in methods if m.score_key is not None))
    owners = {key: next(m for m in methods if m.score_key == key) for key in keys}
    hvp_keys = {m.score_key for m in methods if m.needs_hvp}
    if set(keys) <= {("class",)} and not hvp_keys:
        recorded = shared_cam_pass(ctx, x, modules, need_gradient=bool(keys))
        if recorded is not None:  # one forward shared with the backprop family, or a cached pass
            A, g = recorded
            layer_pass = LayerPass(ctx.layer, A)
            if keys:
                layer_pass.gradients[("class",)] = g
                _note_zero_gradient(ctx, layer_pass.layer, g)
            return [layer_pass]
    several = len(modules) > 1
    with bundle.lock, Stopwatch(bundle.device) as forward, ExitStack() as stack:
        if several and keys:
            # Gradients at several layers from one backward: every captured output keeps its graph
            # (the input is made a leaf so that there is one even when no parameter requires grad).
            captures = [stack.enter_context(capture_layer(module, keep_graph=True, view=bundle.view(name)))
                        for name, module in modules]
            stack.enter_context(torch.enable_grad())
            x = x.detach().requires_grad_(True)
        else:
            captures = [stack.enter_context(capture_layer(module, grad=bool(keys), view=bundle.view(name)))
                        for name, module in modules]
            stack.enter_context(torch.no_grad())
        logits = bundle.logits(x)
    _add_time(ctx, prefix + "forward", forward.seconds)
    activations: list[torch.Tensor] = []
    for (name, _), captured in zip(modules, captures, strict=True):
        if captured.activation is None:
            raise MethodError(f"layer {name!r} did not run during the forward pass")
        activations.append(captured.activation)
    passes = [LayerPass(name, A.detach()) for (name, _), A in zip(modules, activations, strict=True)]
    ctx.set_logits(logits)
    with torch.enable_grad():
        for key in keys:
            score = owners[key].score(ctx, logits).sum()
            hvp = key in hvp_keys
            with Stopwatch(bundle.device) as backward:
                grads = torch.autograd.grad(score, activations, retain_graph=True, create_graph=hvp)
            _add_time(ctx, prefix + _backward_label(key), backward.seconds)
            for p, g in zip(passes, grads, strict=True):
                p.gradients[key] = g.detach()
                if key == ("class",):
                    _note_zero_gradient(ctx, p.layer, g)
            if hvp:
                with Stopwatch(bundle.device) as second:
                    for p, g, A in zip(passes, grads, activations, strict=True):
                        p.hvps[key] = hessian_vector_product(g, A)
                _add_time(ctx, prefix + "hessian_vector_product", second.seconds)
    return passes


def _note_zero_gradient(ctx: ExplainContext, layer: str, g: torch.Tensor) -> None:
    if not bool(g.abs().amax() > 0):
        note = (f"the class score's gradient is zero at every position of layer {layer!r}: its "
                f"gradient-based maps are flat (a layer the score does not depend on, e.g. a ViT's patch "
                f"tokens after its last attention)")
        if note not in ctx.notes:
            ctx.notes.append(note)


def _backward_label(key: tuple) -> str:
    return "backward" if key == ("class",) else f"backward_{key[0]}"


def _add_time(ctx: ExplainContext, key: str, seconds: float) -> None:
    ctx.pass_timings[key] = ctx.pass_timings.get(key, 0.0) + seconds


def hessian_vector_product(g: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """H·A, H = ∂²S/∂A² (symmetric): the gradient of ⟨g, A⟩ with A held fixed as the vector, from
    ``g`` computed with ``create_graph=True``. Zero where g does not depend on A (a head above A that
    is piecewise linear: ReLU, max-pool, linear layers)."""
    if not g.requires_grad:
        return torch.zeros_like(A).detach()
    try:
        (hv,) = torch.autograd.grad(g, A, grad_outputs=A.detach(), retain_graph=True, allow_unused=True)
    except RuntimeError as exc:
        if "not implemented" not in str(exc):
            raise
        raise MethodError(f"shapleycam needs second derivatives of the network above the layer, and torch "
                          f"has none for one of its operations ({exc}); use gradcam, which ShapleyCAM "
                          f"extends") from None
    return torch.zeros_like(A).detach() if hv is None else hv.detach()


def share_pass(ctx: ExplainContext, first: LayerPass) -> None:
    """Offer the target layer's A and g (of the class score) to the other families."""
    gradient = first.gradients.get(("class",))
    current = ctx.shared.get("cam_pass")
    if current is None or (current.get("gradient") is None and gradient is not None):
        ctx.shared["cam_pass"] = {"activation": first.activation, "gradient": gradient, "layer": ctx.layer}


def fuse_maps(maps: list[torch.Tensor], gamma: float = SHALLOW_GAMMA) -> torch.Tensor:
    """LayerCAM §3.3 fusion of N×h_l×w_l maps (after the ReLU) of several layers.

    Each map is divided by its maximum (per sample); maps on a finer grid than the coarsest one
    (the shallow layers) become tanh(γ·M/max M) (eq. 9, γ = 2), which lifts their weak responses
    to the scale of the deep map; all are upsampled bilinearly (``align_corners=False``) to the
    largest grid and combined by their element-wise maximum. The result is in [0, 1].
    """
    sizes = [tuple(m.shape[-2:]) for m in maps]
    largest = max(sizes, key=lambda s: s[0] * s[1])
    coarsest = min(s[0] * s[1] for s in sizes)
    fused = None
    for m, size in zip(maps, sizes, strict=True):
        peak = m.flatten(1).amax(dim=1).view(-1, 1, 1)
        unit = torch.where(peak > 0, m / torch.where(peak > 0, peak, torch.ones_like(peak)), 0.0)
        if size[0] * size[1] > coarsest:
            unit = torch.tanh(gamma * unit)
        if size != largest:
            unit = F.interpolate(unit.unsqueeze(1), size=largest, mode="bilinear", align_corners=False)[:, 0]
        fused = unit if fused is None else torch.maximum(fused, unit)
    assert fused is not None  # at least one layer's map
    return fused


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Per-sample (m − min) / (max − min) of N×h×w maps; a constant map becomes zeros."""
    flat = maps.flatten(1)
    lo = flat.amin(dim=1).view(-1, 1, 1)
    span = (flat.amax(dim=1) - flat.amin(dim=1)).view(-1, 1, 1)
    return torch.where(span > 0, (maps - lo) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)
