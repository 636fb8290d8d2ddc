"""One probe of a model: what every module outputs, which outputs are maps, and the default layer.

:func:`probe_model` runs one forward of a seeded random input with a hook on every module (removed in
``finally``) and one backward from the top class's score, so that it knows, for each module that
runs once per forward, its output, how the methods read it (:mod:`vislib.layers`) and whether the
class score's gradient reaches it. :func:`choose_default_layer` turns that into a default target
layer with a one-line reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from ..layers import LayerView, classify_outputs
from .bundle import LayerRow, describe_output, select_output

_POOLING = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool2d)
_CONVS = (nn.Conv2d,)
_RELAYOUTS = {"Permute", "Identity", "Flatten", "Unflatten"}


@dataclass
class Probe:
    """What one probe forward (and backward) of a model found."""

    classes: int
    views: dict[str, LayerView]  # target-able layers, in forward (completion) order
    order: list[str]
    table: list[LayerRow]
    gradient: dict[str, bool | None] = field(default_factory=dict)  # map part reached by ∂S/∂·
    pooling_like: set[str] = field(default_factory=set)
    head_input: bool = False  # the gradient was taken of the head's input (the class score was constant)
    modules: dict[str, nn.Module] = field(default_factory=dict)
    head: str | None = None  # the linear layer whose output is the class scores (None: none such)
    output: torch.Tensor | None = None  # the probe's class scores (1 × classes, detached)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("LayerNorm")


def probe_model(model: nn.Module, shape: tuple[int, int, int], device: torch.device, output=None) -> Probe:
    """Forward a seeded random 1×C×H×W input with every module hooked, then one backward."""
    outputs: dict[str, Any] = {}  # whatever each module returns (tensors are picked out below)
    calls: dict[str, int] = {}
    order: list[str] = []
    first_conv: list[str] = []
    linear_inputs: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = []

    def make_hook(name: str, module: nn.Module):
        def hook(_module, _inputs, out):
            calls[name] = calls.get(name, 0) + 1
            outputs[name] = out
            order.append(name)
            if isinstance(module, _CONVS) and not first_conv:
                first_conv.append(name)
            if isinstance(module, nn.Linear) and _inputs and isinstance(_inputs[0], torch.Tensor):
                linear_inputs[name] = _inputs[0]

        return hook

    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, *shape), generator=gen).to(device).requires_grad_(True)
    try:
        for name, module in modules.items():
            if name:
                handles.append(module.register_forward_hook(make_hook(name, module)))
        with torch.enable_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001  (the user's model: a clear error, not a traceback)
        raise ModelError(f"the model failed on a {(1, *shape)} input: {type(exc).__name__}: {exc}") from None
    finally:
        for handle in handles:
            handle.remove()
    logits = select_output(out, output)
    if logits.dim() != 2 or logits.shape[0] != 1:
        raise ModelError(f"the class scores must be N × classes, not {describe_output(logits)} "
                         f"(the model returned {describe_output(out)}; choose another part with output=)")
    once = [n for n in dict.fromkeys(order) if calls[n] == 1]
    shapes = {n: tuple(outputs[n].shape) for n in once if _batch_tensor(outputs[n])}
    views = classify_outputs(shapes, [n for n in once if n in shapes], first_conv[0] if first_conv else None,
                             (shape[1], shape[2]))
    if not views:
        raise ModelError("the model has no module whose output can be read as a map (N×C×h×w, "
                         "channels-last N×h×w×C, or N×T×C tokens on the patch grid) to explain")
    pool_ids = {id(outputs[n]) for n in once if isinstance(modules[n], _POOLING)}
    probe = Probe(
        classes=int(logits.shape[1]), views=views, order=[n for n in once if n in views],
        table=_table(modules, outputs, calls, views), modules=modules,
        pooling_like={n for n in views if id(outputs[n]) in pool_ids},
    )
    outs = {n: outputs[n] for n in views}
    probe.gradient = _gradient_reaches(logits[0, logits[0].argmax()], outs, views)
    head = [n for n, inp in linear_inputs.items() if outputs[n] is logits]
    probe.head, probe.output = (head[-1] if head else None), logits.detach()
    if head and not any(probe.gradient.values()):
        # the class score is constant (a zero-initialised head, as torchvision's ViTs have): what
        # reaches the head's input is what would reach the score
        features = linear_inputs[head[-1]]
        weights = torch.randn(features.shape, generator=gen).to(features.device)
        probe.gradient = _gradient_reaches((features * weights).sum(), outs, views)
        probe.head_input = True
    return probe


def _batch_tensor(out) -> bool:
    """A 3-D or 4-D tensor with the probe's batch of one first (not per-window, not per-head)."""
    return isinstance(out, torch.Tensor) and out.dim() in (3, 4) and out.shape[0] == 1


def _gradient_reaches(score: torch.Tensor, outs: dict[str, torch.Tensor],
                      views: dict[str, LayerView]) -> dict[str, bool | None]:
    """For each layer, whether ∂S/∂(map) is non-zero for the scalar ``score`` (None: unknown)."""
    names = [n for n, t in outs.items() if t.requires_grad]
    if not names or not score.requires_grad:
        return {n: None for n in outs}
    try:
        grads = torch.autograd.grad(score, [outs[n] for n in names], allow_unused=True, retain_graph=True)
    except RuntimeError:
        return {n: None for n in outs}
    found: dict[str, bool | None] = {n: None for n in outs}
    for name, g in zip(names, grads, strict=True):
        found[name] = g is not None and bool(views[name].to_map(g).abs().amax() > 0)
    return found


def _table(modules, outputs, calls, views) -> list[LayerRow]:
    rows = []
    for name, module in modules.items():
        if not name or name not in calls:
            continue
        out = outputs[name]
        if isinstance(out, torch.Tensor):
            raw = "×".join(str(s) for s in out.shape[1:])
        else:
            raw = describe_output(out)
        view = views.get(name)
        note = ""
        if calls[name] > 1:
            note = f"runs {calls[name]} times per forward"
        elif view is None and isinstance(out, torch.Tensor):
            note = "no spatial reading" if out.dim() in (3, 4) else "not a map"
        elif view is None:
            note = "not a tensor"
        rows.append(LayerRow(name, type(module).__name__, raw, view, note))
    return rows


def choose_default_layer(model: nn.Module, probe: Probe) -> tuple[str, str]:  # noqa: ARG001
    """The default target layer and why.

    For every architecture: the last layer (in forward order) with a spatial map (h, w > 1), not a
    pooling, whose class-score gradient is non-zero on the probe input. In networks read through
    tokens or channels-last maps (vision transformers, Swin), the last *LayerNorm* of that kind: a
    ViT's last block's first norm (after it, only the class token reaches the score, so the patch
    tokens' gradient is zero), Swin's last stage output norm.
    """
    name, reason = _choose(probe)
    if probe.head_input:
        reason += " (judged at the classifier's input: the class scores were constant on the probe)"
    return name, reason


def _choose(probe: Probe) -> tuple[str, str]:
    candidates = [n for n in probe.order if probe.views[n].spatial and n not in probe.pooling_like]
    if not candidates:
        last = probe.order[-1]
        return last, "no layer has a spatial map larger than 1×1; the last layer with a map"
    reached = [n for n in candidates if probe.gradient.get(n)]
    # a parameter-free re-layout (torchvision's Permute after Swin's norm) shows its input's map
    while len(reached) > 1 and type(probe.modules[reached[-1]]).__name__ in _RELAYOUTS \
            and probe.views[reached[-2]].shape == probe.views[reached[-1]].shape:
        reached.pop()
    if any(v.layout == "tokens" for v in probe.views.values()):
        norms = [n for n in reached if _is_norm(probe.modules[n])]
        if norms:
            view = probe.views[norms[-1]]
            return norms[-1], (f"the last LayerNorm whose {view.grid[0]}×{view.grid[1]} map the class "
                               f"score's gradient reaches ({view.describe()}; in a ViT, the last block's "
                               f"first norm: after it only the class token reaches the score)")
    if reached:
        h, w = probe.views[reached[-1]].grid
        return reached[-1], (f"the last layer with a spatial map ({h}×{w}) that the class score's "
                             f"gradient reaches")
    h, w = probe.views[candidates[-1]].grid
    return candidates[-1], (f"the last layer with a spatial map ({h}×{w}); the class score's gradient "
                            f"reached none on the probe input")
