"""The perturbation family: Score-CAM, SS-CAM, IS-CAM, Ablation-CAM, Eigen-CAM and occlusion.

These methods explain by changing what the network sees (an input masked by one channel, an
ablated channel, an occluded patch) and measuring the class score, or (Eigen-CAM) by a closed form
on the activation. All requested methods share one captured activation of the target layer, reused
from the CAM family's pass when it ran on the same layer. The shared machinery (the session, the
batched forward loop, the method template) is in :mod:`vislib.methods.perturbation_base`; Score-CAM
and its smoothed variants share one masked-forward template in :mod:`vislib.methods.scorecam`.

Every batch of perturbed forwards runs under ``torch.inference_mode`` with ``bundle.lock`` held
for that batch only (other explanations can interleave), then reports progress through
``ctx.report(done, total)``, which raises :class:`~vislib.errors.Cancelled` when the caller's cancel
event is set: a cancelled run stops after the batch in flight. The only hook (Ablation-CAM's
fallback path) lives in a context manager removed in ``finally``, while the lock is held.

The score is ``ctx.score`` (the logit unless the caller asks for the softmax probability);
occlusion accepts a per-method ``score`` option to reproduce Zeiler & Fergus (probability).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..errors import LayerError, MethodError
from ..hooks import resolve_layer, this_thread_only
from ..models.embedding import shallow_clone  # noqa: F401  (moved down; importable here)
from .base import ExplainContext, MethodResult, Stopwatch, get_method, register_method
from .frozen import memory_layout
from .perturbation_base import (  # noqa: F401  (re-exported: the family's public names)
    PRECISIONS,
    SCORES,
    PerturbationMethod,
    Plan,
    Session,
    class_scores,
)
from .registry import register_family
from .scorecam import ISCAM, SSCAM, MaskedScores, ScoreCAM, upsampled_masks  # noqa: F401  (registered first)

# --------------------------------------------------------------------------------------------------
# Ablation-CAM


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps the target layer as one opaque call (the cut point).

    While it traces, fx patches ``nn.Module.__call__`` and ``__getattr__`` process-wide; calls
    from any other thread (another model's forward running meanwhile) pass straight through to
    the real module instead of being recorded, so tracing never disturbs them.
    """

    def __init__(self, leaf: str):
        super().__init__()
        self.leaf = leaf
        self.thread = threading.get_ident()

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name == self.leaf or super().is_leaf_module(module, qualified_name)

    def call_module(self, module, forward, args, kwargs):
        if threading.get_ident() != self.thread:
            return forward(*args, **kwargs)
        return super().call_module(module, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != self.thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def trace_head(model: nn.Module, layer: str) -> tuple[fx.GraphModule | None, str]:
    """The part of ``model`` above ``layer`` as a module taking the layer's output, or (None, reason).

    A :func:`shallow_clone` of the model is traced with torch.fx (the target layer kept as a leaf),
    and the nodes that depend on the layer's output are copied into a new graph whose only input is
    that output. This works when nothing above the layer reads a value computed below it (a skip
    connection around the layer, a size taken from the input); otherwise there is no head to cut
    and the caller falls back to full forwards. The head shares the model's parameters; the model
    itself is not changed.
    """
    root = shallow_clone(model)
    try:
        graph = _LeafTracer(layer).trace(root)
    except Exception as exc:  # noqa: BLE001  (tracing fails on data-dependent control flow)
        return None, f"torch.fx could not trace the model ({type(exc).__name__})"
    nodes = list(graph.nodes)
    cuts = [node for node in nodes if node.op == "call_module" and node.target == layer]
    if len(cuts) != 1:
        return None, f"layer {layer!r} is called {len(cuts)} times in the traced graph"
    cut = cuts[0]
    above: set[fx.Node] = set()
    for node in nodes[nodes.index(cut) + 1:]:
        if any(arg is cut or arg in above for arg in node.all_input_nodes):
            above.add(node)
    if nodes[-1].op != "output" or nodes[-1] not in above:
        return None, f"the model's output does not depend on layer {layer!r} alone"
    for node in above:
        for arg in node.all_input_nodes:
            if arg is not cut and arg not in above and arg.op != "get_attr":
                return None, f"the part above {layer!r} also reads {arg.name!r} computed below it"
    head = fx.Graph()
    env = {cut: head.placeholder("activation")}
    for node in nodes:
        if node in above or (node.op == "get_attr" and any(user in above for user in node.users)):
            env[node] = head.node_copy(node, lambda arg: env[arg])
    try:
        return fx.GraphModule(root, head), ""
    except Exception as exc:  # noqa: BLE001
        return None, f"the head above {layer!r} could not be built ({type(exc).__name__})"


_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_HEADS_LOCK = threading.Lock()


def cached_head(model: nn.Module, layer: str, *, refresh: bool = False) -> tuple[fx.GraphModule | None, str]:
    """:func:`trace_head`, traced once per (model, layer) unless ``refresh``."""
    with _HEADS_LOCK:
        per_model = _HEADS.setdefault(model, {})
        if refresh or layer not in per_model:
            per_model[layer] = trace_head(model, layer)
        return per_model[layer]


@contextmanager
def replaced_output(module: nn.Module, replacement: torch.Tensor, view=None) -> Iterator[None]:
    """During a forward inside this context, ``module`` outputs ``replacement`` (same shape), or, with
    a token / channels-last ``view``, the map ``replacement`` put back into the layer's layout (a
    ViT's class token kept as the forward computed it)."""

    def hook(_module, _inputs, output):
        if not isinstance(output, torch.Tensor):
            raise LayerError("the target layer's output is not a tensor")
        mapped = view is not None and view.layout != "nchw"
        if (view.to_map(output) if mapped else output).shape != replacement.shape:
            raise LayerError("the target layer's output does not match the ablated activation")
        return view.from_map(replacement, output) if mapped else replacement

    handle = module.register_forward_hook(this_thread_only(hook))
    try:
        yield
    finally:
        handle.remove()


@register_method
class AblationCAM(PerturbationMethod):
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020): w_k = (S^c − S^c_{A^k=0}) / S^c, map ReLU(Σ_k w_k A^k).

    S^c_{A^k=0} is the class score when channel k of the target layer's output is set to zero.
    Only the part of the network above the layer has to run again: with the ``"fx-head"`` path the
    model is cut at the layer with torch.fx and only the head runs, on batches of ablated copies of
    the captured activation. When that cut does not exist (skip connections around the layer,
    untraceable models) the ``"full-forward"`` path runs the whole model on the input with the
    layer's output replaced by the ablated copies (a hook held under the lock). Identically-zero
    channels are not ablated: zeroing them changes nothing, so their weight is exactly 0. As in the
    definition, a negative S^c flips the weights' sign; where S^c = 0 the difference is not divided.

    Options: ``batch_size`` (head path: 128, fewer where 128 ablated activations would pass
    256 MiB; full path: 32), ``channels_last`` (memory order of the input batches on the full path,
    default True), ``path`` (``"auto"`` | ``"fx-head"`` | ``"full-forward"``).
    The path taken, and why the head was not usable, are in the extras.
    """

    name = "ablationcam"
    passes = "1 fwd + K head fwd (above the layer), batched"
    slow = True
    title = "Ablation-CAM"
    paper = "Desai & Ramaswamy 2020, Ablation-CAM: Gradient-free Localization"
    options_allowed = ("batch_size", "channels_last", "path")
    PATHS: ClassVar[tuple[str, ...]] = ("auto", "fx-head", "full-forward")

    def plan(self, session: Session) -> Plan:
        ctx = session.ctx
        A = session.activation()
        n, c = A.shape[:2]
        wanted = self.options.get("path", "auto")
        if wanted not in self.PATHS:
            raise MethodError(f"ablationcam: path must be one of {self.PATHS}, not {wanted!r}")
        active = A.flatten(2).abs().amax(dim=2) > 0
        owner, channel = active.nonzero(as_tuple=True)
        view = session.bundle.view(ctx.layer)
        if wanted == "full-forward":
            head, reason = None, "full forward requested"
        elif view.layout != "nchw":
            head, reason = None, f"the layer is read as a map ({view.describe()}): the whole model runs"
        else:
            head, reason = self._head(session, A)
        if head is None and wanted == "fx-head":
            raise MethodError(f"ablationcam: no fx head for layer {ctx.layer!r}: {reason}")
        path = "fx-head" if head is not None else "full-forward"
        row_bytes = A[0].numel() * A.element_size()
        default = max(1, min(128, (256 << 20) // row_bytes)) if head is not None else 32
        batch_size = self.int_option("batch_size", default)
        channels_last = self.channels_last
        _, module = resolve_layer(session.bundle, ctx.layer)

        def ablated(start: int, stop: int) -> torch.Tensor:
            batch = A[owner[start:stop]]  # indexing copies
            batch[torch.arange(stop - start, device=A.device), channel[start:stop]] = 0.0
            return batch

        def full_forward(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            inputs, activation = batch
            with replaced_output(module, activation, view):
                return session.bundle.logits(inputs)

        if head is not None:
            make_batch, forward = ablated, head
        else:
            def make_batch(start, stop):
                return memory_layout(ctx.inputs[owner[start:stop]], channels_last), ablated(start, stop)

            forward = full_forward

        def run() -> tuple[torch.Tensor, dict]:
            base = ctx.row_scores(session.logits().float())
            dropped = session.scores(len(owner), make_batch, owner, ctx.bound, batch_size, forward)
            divisor = torch.where(base != 0, base, torch.ones_like(base))
            weights = torch.zeros((n, c), device=A.device)
            weights[owner, channel] = (base[owner] - dropped) / divisor[owner]
            raw = F.relu(torch.einsum("nc,nchw->nhw", weights, A))
            extra = {
                "path": path,
                "channels": n * c,
                "channels_evaluated": len(owner),
                "channels_skipped": n * c - len(owner),
                "forwards": len(owner),
                "batch_size": batch_size,
            }
            if head is None:
                extra["why_full_forward"] = reason
            return raw, extra

        return Plan(forwards=len(owner), run=run)

    @staticmethod
    def _head(session: Session, A: torch.Tensor) -> tuple[Callable | None, str]:
        """The fx head above the layer, checked on the captured activation against the logits.

        A cached head that no longer reproduces the logits (a submodule replaced, or buffers moved
        to another device since it was traced) is traced again once before giving up.
        """
        expected = session.logits()
        reason = ""
        for refresh in (False, True):
            with session.bundle.lock:
                head, reason = cached_head(session.bundle.model, session.ctx.layer, refresh=refresh)
            if head is None:
                return None, reason
            try:
                with torch.inference_mode():
                    logits = head(A.clone())  # the head may work in place (ReLU(inplace=True))
            except Exception as exc:  # noqa: BLE001  (e.g. buffers moved to another device since)
                reason = f"the fx head failed on the activation ({type(exc).__name__}: {exc})"
                continue
            if not isinstance(logits, torch.Tensor) or logits.shape != expected.shape:
                return None, "the fx head does not return the model's logits"
            gap = (logits - expected).abs().max().item()
            if gap <= 1e-4 * max(1.0, expected.abs().max().item()):
                return head, ""
            reason = f"the fx head's logits differ from the model's by {gap:.3g}"
        return None, reason


# --------------------------------------------------------------------------------------------------
# Eigen-CAM


def eigen_cam(A: torch.Tensor, center: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Projection of each sample's activation (HW×C) on its first right singular vector.

    Returns (N×h×w projection, N share of the squared singular values on the first component).
    A singular vector's sign is arbitrary, so the projection's sign is fixed: its sum is made
    positive, or, where the sum vanishes (centred data), its largest-magnitude entry. Both rules
    give the same map for A and −A.
    """
    n, c, h, w = A.shape
    M = A.float().flatten(2).transpose(1, 2)  # N×HW×C
    if center:
        M = M - M.mean(dim=1, keepdim=True)
    _, S, Vh = torch.linalg.svd(M, full_matrices=False)
    proj = torch.einsum("nzc,nc->nz", M, Vh[:, 0])
    total = proj.sum(dim=1)
    peak = proj.gather(1, proj.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    sign = torch.where(total.abs() > 1e-6 * proj.abs().sum(dim=1), total.sign(), peak.sign())
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    energy = S.pow(2)
    share = energy[:, 0] / energy.sum(dim=1).clamp_min(torch.finfo(energy.dtype).tiny)
    return (proj * sign.unsqueeze(1)).view(n, h, w), share


@register_method
class EigenCAM(PerturbationMethod):
    """Eigen-CAM (Muhammad & Yeasin, IJCNN 2020): ReLU of the projection of A (HW×C) on its first
    right singular vector, sign fixed so the map is never randomly inverted.

    Class-agnostic (no score, no forward beyond the shared one). Options: ``center`` (subtract the
    per-channel mean before the SVD, as pytorch-grad-cam does; default False, as in the paper).
    """

    name = "eigencam"
    passes = "1 fwd + SVD"
    title = "Eigen-CAM"
    paper = "Muhammad & Yeasin 2020, Eigen-CAM: Class Activation Map using Principal Components"
    options_allowed = ("center",)

    def plan(self, session: Session) -> Plan:
        A = session.activation()
        center = self.bool_option("center", False)

        def run() -> tuple[torch.Tensor, dict]:
            proj, share = eigen_cam(A, center=center)
            shares = [round(float(s), 6) for s in share]
            return F.relu(proj), {"first_component_share": shares, "center": center}

        return Plan(forwards=0, run=run)


# --------------------------------------------------------------------------------------------------
# Occlusion


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Start offsets of the patch along one axis: every ``stride``, plus one flush with the far edge."""
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def coverage(size: int, starts: list[int], patch: int, device: torch.device) -> torch.Tensor:
    """size×windows float matrix: 1 where the pixel lies under the window."""
    pixels = torch.arange(size, device=device).view(-1, 1)
    first = torch.tensor(starts, device=device).view(1, -1)
    return ((pixels >= first) & (pixels < first + patch)).float()


@register_method
class Occlusion(PerturbationMethod):
    """Occlusion (Zeiler & Fergus, ECCV 2014, §4.3): the drop of the class score when a gray patch
    covers each position, S^c(x) − S^c(x with the patch).

    The patch (``patch``×``patch`` pixels, all channels) slides with ``stride``; one more window
    sits flush with the right/bottom edge so every pixel is covered. The map is at pixel resolution:
    each pixel gets the mean drop over the windows that cover it (patch 1, stride 1: the drop of
    that pixel alone). Options: ``patch`` (default ⌊side/7⌋), ``stride`` (default patch/2),
    ``fill`` (the patch's value in the model's *normalised* input space: default 0.0, i.e. the
    dataset's mean colour, a mid gray for ImageNet statistics; ``"gray"`` for exactly RGB 0.5
    through the bundle's normalisation; or a number / one number per channel), ``score``
    (``"logit"`` | ``"probability"``, default the explanation's score; ZF plot the probability),
    ``batch_size`` (default 32), ``channels_last`` (memory order of the batches, default True).
    """

    name = "occlusion"
    passes = "1 fwd + one fwd per window, batched"
    uses_layer = False
    slow = True
    title = "Occlusion"
    paper = "Zeiler & Fergus 2014, Visualizing and Understanding Convolutional Networks (§4.3)"
    options_allowed = ("batch_size", "channels_last", "fast_forward", "patch", "stride", "fill", "score")
    needs_activation = False

    def plan(self, session: Session) -> Plan:
        ctx = session.ctx
        inputs = ctx.inputs
        n, channels, height, width = inputs.shape
        patch = self.int_option("patch", max(1, min(height, width) // 7))
        if patch > min(height, width):
            raise MethodError(f"occlusion: patch {patch} is larger than the {height}×{width} input")
        stride = self.int_option("stride", max(1, patch // 2))
        score = self.options.get("score", ctx.score)
        if score not in SCORES:
            raise MethodError(f"occlusion: score must be one of {SCORES}, not {score!r}")
        fill, fill_label = self._fill(session, channels)
        rows_y = coverage(height, window_starts(height, patch, stride), patch, inputs.device)
        rows_x = coverage(width, window_starts(width, patch, stride), patch, inputs.device)
        grid_h, grid_w = rows_y.shape[1], rows_x.shape[1]
        per_sample = grid_h * grid_w
        total = n * per_sample
        owner = torch.arange(n, device=inputs.device).repeat_interleave(per_sample)
        window = torch.arange(per_sample, device=inputs.device).repeat(n)

        def make_batch(start: int, stop: int) -> torch.Tensor:
            w = window[start:stop]
            mask = rows_y[:, w // grid_w].T.unsqueeze(2) * rows_x[:, w % grid_w].T.unsqueeze(1)
            return torch.where(mask.unsqueeze(1) > 0, fill, inputs[owner[start:stop]])

        def run() -> tuple[torch.Tensor, dict]:
            session.logits()
            assert ctx.bound is not None and ctx.logits is not None  # session.logits() set them
            target = ctx.bound.with_score(score)
            base = target.score(ctx.logits.float())
            occluded = session.scores(total, make_batch, owner, target, self.batch_size,
                                      fast_forward=self.fast_forward, channels_last=self.channels_last)
            drops = (base[owner] - occluded).view(n, grid_h, grid_w)
            summed = torch.einsum("yi,nij,xj->nyx", rows_y, drops, rows_x)
            counts = rows_y.sum(dim=1).view(-1, 1) * rows_x.sum(dim=1).view(1, -1)
            extra = {
                "patch": patch, "stride": stride, "fill": fill_label, "score": score,
                "windows": [grid_h, grid_w], "forwards": total, "batch_size": self.batch_size,
                **session.forward_info,
            }
            return summed / counts, extra

        return Plan(forwards=total, run=run)

    def _fill(self, session: Session, channels: int) -> tuple[torch.Tensor, str | list[float]]:
        """The patch value as a 1×C×1×1 tensor in the normalised input space, and how to report it."""
        value = self.options.get("fill", 0.0)
        device = session.ctx.inputs.device
        if value == "gray":
            pre = session.bundle.preprocess
            if not hasattr(pre, "mean") or not hasattr(pre, "std"):
                raise MethodError("occlusion: fill='gray' needs a bundle with a mean/std normalisation")
            gray = [(0.5 - m) / s for m, s in zip(pre.mean, pre.std, strict=True)]
            return torch.tensor(gray, device=device).view(1, -1, 1, 1), "gray"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return torch.full((1, channels, 1, 1), float(value), device=device), [float(value)]
        if isinstance(value, (list, tuple)) and len(value) == channels:
            values = [float(v) for v in value]
            return torch.tensor(values, device=device).view(1, -1, 1, 1), values
        raise MethodError(f"occlusion: fill must be a number, {channels} numbers or 'gray', not {value!r}")


# --------------------------------------------------------------------------------------------------
# Family runner


@register_family("perturbation")
def run_perturbation_family(ctx: ExplainContext, names: list[str], options: dict) -> dict[str, MethodResult]:
    """All requested perturbation methods, with progress over the sum of their forwards."""
    # the family "perturbation" names are PerturbationMethod classes
    methods = cast("list[PerturbationMethod]", [get_method(name)(**options.get(name, {})) for name in names])
    session = Session(ctx)
    if any(m.needs_activation for m in methods):
        session.activation()
    session.logits()
    plans: dict[str, Plan] = {}
    for method in methods:
        with Stopwatch(session.device) as sw:
            plans[method.name] = method.plan(session)
        plans[method.name].seconds = sw.seconds
    session.total = sum(plan.forwards for plan in plans.values())
    if session.total:
        ctx.report(0, session.total)
    else:
        ctx.check_cancel()
    results = {}
    for name, plan in plans.items():
        with Stopwatch(session.device) as sw:
            raw, extra = plan.run()
        results[name] = MethodResult(raw, plan.seconds + sw.seconds, extra)
    return results
