"""Which methods apply to a model and layer, and why not (one line each, for the UI)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import VislibError
from ..methods import METHODS

#: ReLU-family activations the backprop rules act on; other activations keep their gradient.
_ACTIVATION_NAMES = ("GELU", "SiLU", "Hardswish", "ReLU6", "Mish", "ELU", "LeakyReLU", "Tanh", "Sigmoid",
                     "Hardsigmoid", "Softplus", "QuickGELU", "GELUTanh", "Swish")


@dataclass(frozen=True)
class ModelFacts:
    """What decides which methods apply (computed once per bundle and layer)."""

    relus: int  # ReLUs the backprop family's rules reach (modules, or functional calls on one probe)
    activations: tuple[str, ...]  # other activation types in the network, for the reasons
    cam: str | None  # why CAM cannot run at this layer, or None


class _ReluCounter(torch.overrides.TorchFunctionMode):
    """Counts the ReLU calls (modules and functions) of this thread's forward passes in the block: the
    calls the backprop family's ReLU rules reach."""

    FUNCS = frozenset({torch.nn.functional.relu, torch.relu, torch.relu_, torch.Tensor.relu,
                       torch.Tensor.relu_})

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FUNCS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _probe_input(bundle) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, *bundle.input_shape, generator=generator).to(bundle.device)


def model_facts(bundle, layer: str) -> ModelFacts:
    """:class:`ModelFacts` of ``bundle`` at ``layer``: from the structure, plus at most one probe
    forward (hooks on this thread only, removed in ``finally``) when the structure cannot tell: a
    model without ``nn.ReLU`` modules (are there functional ReLUs?), a layer that may sit under a
    GAP + linear head (does the head reproduce the logits?)."""
    from ..hooks import capture_layer
    from ..methods.cam import gap_linear_head

    modules = list(bundle.model.modules())
    relus = sum(isinstance(m, torch.nn.ReLU) for m in modules)
    activations = tuple(sorted({type(m).__name__ for m in modules
                                if type(m).__name__ in _ACTIVATION_NAMES}))
    cam = None
    need_head = cam_head_possible(bundle, layer)
    if not need_head:
        c = bundle.layers[layer][0]
        cam = (f"CAM needs a global-average-pool + linear head on this layer: no linear layer maps its {c} "
               f"channels to the {len(bundle.labels)} classes. Grad-CAM generalises CAM to any head")
    if need_head or not relus:
        from contextlib import nullcontext

        module = bundle.model.get_submodule(layer)
        counter = _ReluCounter() if not relus else None
        with torch.no_grad(), capture_layer(module, view=bundle.view(layer)) as captured, \
                counter if counter is not None else nullcontext():
            logits = bundle.logits(_probe_input(bundle))
        if counter is not None:  # no ReLU module: count the functional ones the forward called
            relus = counter.count
        if need_head:
            assert captured.activation is not None  # the probe's forward ran through the layer
            try:
                gap_linear_head(bundle.model, captured.activation, logits, layer)
            except VislibError as exc:
                cam = f"{exc}"
    return ModelFacts(relus=relus, activations=activations, cam=cam)


def _builtin_reason(cls, bundle, layer: str, facts: ModelFacts) -> str | None:
    if cls.name == "cam":
        return facts.cam
    rule = getattr(cls, "rule", "gradient")
    if rule != "gradient" and not facts.relus:
        uses = f" (it uses {', '.join(facts.activations)})" if facts.activations else ""
        return (f"{cls.title} changes the backward pass at ReLUs only, and this network has none{uses}: "
                f"it would show the plain gradient. Use Gradient (saliency)")
    return None


def method_availability(bundle, layer: str) -> dict[str, str | None]:
    """Every registered method → why it cannot run on ``bundle`` at ``layer`` (one line for the UI), or
    None when it can.

    Built-in rules: CAM needs a GAP + linear head that reproduces the logits at this layer; Deconvnet,
    guided backprop and guided Grad-CAM need ReLUs. A method class may add its own with a classmethod
    ``unavailable(bundle, layer) -> str | None`` (see :class:`vislib.methods.base.Method`). Cached on
    the bundle per layer, so it costs one probe forward at most per model and layer.
    """
    cache = bundle.__dict__.setdefault("_ui_availability", {})
    if layer in cache:
        return dict(cache[layer])
    facts = model_facts(bundle, layer)
    found: dict[str, str | None] = {}
    for name, cls in METHODS.items():
        reason = _builtin_reason(cls, bundle, layer, facts)
        if reason is None and hasattr(cls, "unavailable"):
            try:
                reason = cls.unavailable(bundle, layer)
            except VislibError as exc:
                reason = str(exc)
        found[name] = reason
    cache[layer] = found
    return dict(found)


def cam_head_possible(bundle, layer: str) -> bool:
    """Whether some linear layer maps ``layer``'s channels to the classes (CAM's GAP + linear head).

    A cheap structural check: when it fails, CAM cannot apply and is computed on its own, so that
    its error does not make the other methods' shared passes run again.
    """
    channels = bundle.layers[layer][0]
    return any(isinstance(m, torch.nn.Linear) and m.in_features == channels
               and m.out_features == len(bundle.labels) for m in bundle.model.modules())
