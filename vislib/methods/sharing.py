"""Passes shared between the method families of one call, and across calls.

**One forward for the default view.** The CAM family needs the target layer's A and ∂S/∂A; the
backprop family's direct methods (gradient, Deconvnet, guided backprop, guided Grad-CAM,
Input × Gradient, FullGrad) need one backward to the input per ReLU rule. Asked together, they share
*one* recorded forward (:func:`share_forward`): the input is a leaf, every ReLU goes through the
rule-switching autograd function (:func:`vislib.methods.relu_rules.relu_rule`), the layer is
captured with its graph; ∂S/∂A is one backward that stops at the layer, and each rule is one more
backward to the input on the same graph. The maps are the ones the separate passes give (the ReLU
rule ``gradient`` is the exact ReLU derivative).

**Reuse across calls.** A :class:`PassCache` keeps, per model (its parameters' identities and
versions, so new weights miss), input and (layer, target, contrast, score): the logits, the CAM
pass (A, ∂S/∂A), the direct backprop pass (one signal per rule) and each method's own result. Asking
again with other methods computes only the methods not seen before, from the recorded passes where
they can: adding a CAM method to a view costs its weights and its sum, not a forward.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, cast

import torch

from ..errors import VislibError
from .base import ExplainContext, MethodResult, get_method

if TYPE_CHECKING:
    from .cam import CAMMethod

DEFAULT_PASS_KEY = (False, ())  # a CAM method's pass without aug_smooth or fusion


def share_forward(ctx: ExplainContext, names: list[str], options: dict) -> bool:
    """Record one forward for the CAM family's default pass and the direct backprop methods, when
    both are asked and nothing recorded already serves them. Returns True when it ran.

    It leaves ``ctx.shared["cam_pass"]`` (A, ∂S/∂A at the target layer) and
    ``ctx.shared["direct_pass"]`` for the two runners. A request it cannot serve in one pass
    (Finer-CAM's other scores, ShapleyCAM's second derivatives, bad options) is left to the runners.
    """
    from .backprop import DIRECT, direct_pass

    direct = [n for n in names if n in DIRECT]
    cams = [n for n in names if get_method(n).family == "cam"]
    if not direct or not cams or "cam_pass" in ctx.shared or "direct_pass" in ctx.shared:
        return False
    try:
        # the family "cam" names are CAMMethod classes
        methods = cast("list[CAMMethod]", [get_method(n)(**(options.get(n) or {})) for n in cams])
        direct_opts = {n: get_method(n)(**(options.get(n) or {})).options for n in direct}
    except VislibError:
        return False  # the runner reports it
    default = [m for m in methods if m.pass_key == DEFAULT_PASS_KEY]
    keys = {m.score_key for m in default if m.score_key is not None}
    if not default or not keys <= {("class",)} or any(m.needs_hvp for m in default):
        return False
    try:
        passed = direct_pass(ctx, direct, direct_opts, with_layer=True)
    except VislibError:
        return False  # e.g. a ReLU rule that cannot be applied: the runners say so, each for itself
    ctx.shared["direct_pass"] = passed
    ctx.shared["cam_pass"] = {"activation": passed.activation, "gradient": passed.layer_gradient,
                              "layer": ctx.layer}
    return True


def shared_cam_pass(ctx: ExplainContext, x: torch.Tensor, modules: list, need_gradient: bool):
    """(A, ∂S/∂A) recorded earlier for exactly this pass (the clean input, the target layer alone),
    or None."""
    shared = ctx.shared.get("cam_pass")
    if (shared is None or x is not ctx.inputs or len(modules) != 1 or modules[0][0] != ctx.layer
            or shared.get("layer") != ctx.layer or shared["activation"].shape[0] != x.shape[0]):
        return None
    if need_gradient and shared.get("gradient") is None:
        return None
    return shared["activation"], shared.get("gradient")


# --------------------------------------------------------------------------------------------------
# Across calls


def input_digest(x: torch.Tensor) -> str:
    """SHA-256 of the input batch's values, shape and dtype."""
    data = x.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(str((tuple(data.shape), str(x.dtype))).encode())
    h.update(data.numpy().tobytes())
    return h.hexdigest()


def _spec(value) -> str:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    return repr(value)


@dataclass
class _Entry:
    """What is known of one (model, input): its logits, and per (layer, targets, contrast, score)
    the recorded passes and each method's result."""

    model: weakref.ReferenceType
    logits: torch.Tensor
    views: dict[tuple, dict] = field(default_factory=dict)


class PassCache:
    """Recorded passes and method results of recent calls (least recently used first out).

    Pass one to :func:`vislib.explain` (``cache=``); it is thread-safe and keeps ``max_entries``
    (model, input) pairs. A model is recognised by its identity and its parameters' identities and
    version counters, so changed weights never hit an old entry.
    """

    def __init__(self, max_entries: int = 16):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0  # methods served from the cache (for tests and the benchmark)

    def _key(self, ctx: ExplainContext) -> tuple:
        from .frozen import fingerprint

        model = ctx.bundle.model
        return (id(model), fingerprint(model), repr(ctx.bundle.output), input_digest(ctx.inputs))

    def _view_key(self, ctx: ExplainContext) -> tuple:
        return (ctx.layer, ctx.target_key, ctx.score)

    def restore(self, ctx: ExplainContext, names: list[str], options: dict) -> dict[str, MethodResult]:
        """Put what is known of this call into ``ctx`` (logits, passes); return the cached results of
        ``names`` (with the same options)."""
        key = self._key(ctx)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.model() is not ctx.bundle.model:
                return {}
            self._entries.move_to_end(key)
        ctx.set_logits(entry.logits)
        view = entry.views.get(self._view_key(ctx))
        if view is None:
            return {}
        for name in ("cam_pass", "direct_pass"):
            if name in view and name not in ctx.shared:
                ctx.shared[name] = view[name]
        found = {}
        for name in names:
            result = view["results"].get((name, _spec(options.get(name))))
            if result is not None:
                found[name] = replace(result, seconds=0.0, extra={**result.extra, "cached": True})
        with self._lock:
            self.hits += len(found)
        return found

    def store(self, ctx: ExplainContext, results: dict[str, MethodResult], options: dict) -> None:
        """Keep this call's logits, passes and results."""
        if ctx.logits is None:
            return
        key = self._key(ctx)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.model() is not ctx.bundle.model:
                entry = _Entry(weakref.ref(ctx.bundle.model), ctx.logits)
                self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            view = entry.views.setdefault(self._view_key(ctx), {"results": {}})
            if ctx.shared.get("cam_pass") is not None and ctx.shared["cam_pass"].get("layer") == ctx.layer:
                view["cam_pass"] = ctx.shared["cam_pass"]
            direct = ctx.shared.get("direct_pass")
            if direct is not None:  # FullGrad's per-layer outputs are large: recomputed when asked again
                view["direct_pass"] = replace(direct, outputs=[], output_gradients=[])
            for name, result in results.items():
                view["results"][(name, _spec(options.get(name)))] = replace(result, extra=dict(result.extra))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
