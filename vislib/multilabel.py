"""Multi-label: explain every label above a threshold in one call.

One forward records the target layer's activation ``A`` (a leaf: nothing below the layer builds a
graph) and the logits; each selected label ``c`` then costs one backward that stops at the layer,
``g_c = ∂S_c/∂A`` (``S_c`` the label's logit, or its sigmoid with ``score="probability"``), all of
them in one batched backward (``is_grads_batched``) where torch can, one small backward each
otherwise. The CAM family's methods read (A, g_c) recorded for the call (as the families of one
:func:`vislib.explain` call share a pass), so each label's explanation runs no forward of its own;
other methods (input gradients, perturbations) run as
:func:`vislib.explain` runs them, once per label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import TargetError
from .explain import (
    Explanation,
    _Job,
    _prepare_inputs,
    check_target,
    device_slot,
    explain_prepared,
    parse_methods,
)
from .hooks import capture_layer, resolve_layer
from .methods.base import Stopwatch
from .models import ModelBundle, load_model
from .targets import Label, class_index

DEFAULT_THRESHOLD = 0.5


@dataclass
class LabelExplanations:
    """The result of :func:`explain_labels`: one :class:`~vislib.explain.Explanation` per label.

    ``sigmoid``: every label's σ(z) per image (N × labels); ``selected``: the explained label indices
    (those with σ ≥ ``threshold`` in any image, or the ones asked for), in decreasing score;
    ``pass_timings``: the shared forward and the batched backward."""

    explanations: dict[int, Explanation]
    sigmoid: np.ndarray
    threshold: float
    labels: list[str]
    selected: list[int]
    layer: str
    pass_timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, label) -> Explanation:
        index = label if isinstance(label, int) else class_index(self.labels, label)
        return self.explanations[index]

    def rows(self, index: int = 0) -> list[tuple[int, str, float]]:
        """(label index, label, sigmoid) of the explained labels for image ``index``."""
        sig = self.sigmoid[index] if self.sigmoid.ndim == 2 else self.sigmoid
        return [(c, self.labels[c], float(sig[c])) for c in self.selected]


def select_labels(sigmoid: torch.Tensor, threshold: float, labels=None,
                  names: Sequence[str] = ()) -> list[int]:
    """Label indices to explain: ``labels`` as given (indices or names), else those whose σ reaches
    ``threshold`` in any image, in decreasing σ."""
    if labels is not None:
        picked = [class_index(list(names), lab) for lab in labels]
        return list(dict.fromkeys(picked))
    best = sigmoid.amax(dim=0)
    order = torch.argsort(best, descending=True)
    return [int(c) for c in order if float(best[c]) >= threshold]


def explain_labels(
    bundle: ModelBundle | str,
    image_or_batch,
    methods: Sequence[str] | str = ("gradcam",),
    layer: str | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    labels: Sequence[int | str] | None = None,
    score: str = "logit",
    options: dict[str, dict] | None = None,
) -> LabelExplanations:
    """Explain each label of a multi-label (sigmoid) model whose σ reaches ``threshold`` (or the
    ``labels`` given) with ``methods``: one forward, one batched backward that stops at the layer."""
    if isinstance(bundle, str):
        bundle = load_model(bundle)
    if not 0.0 <= float(threshold) <= 1.0:
        raise TargetError(f"threshold must be in [0, 1], not {threshold!r}")
    names = parse_methods(methods)
    check_target(names, Label(0, score=score))
    prepared = _prepare_inputs(bundle, image_or_batch)
    batched, _, inputs = prepared
    layer_name, module = resolve_layer(bundle, layer)
    with device_slot(bundle.device):
        A, logits, forward_s = _forward(bundle, inputs, module, layer_name)
    sigmoid = torch.sigmoid(logits.detach().float())
    chosen = select_labels(sigmoid, threshold, labels, bundle.labels)
    notes = [] if chosen else [f"no label reaches the threshold {threshold:g}"]
    timings = {"forward": forward_s}
    gradients: list[torch.Tensor] = []
    if chosen:
        gradients, timings["backward"] = _gradients(bundle, A, logits, chosen, score)
    results = {}
    for c, g in zip(chosen, gradients, strict=True):  # the CAM family reads (A, g_c): no forward of its own
        seed = {"logits": logits.detach(),
                "shared": {"cam_pass": {"activation": A.detach(), "gradient": g, "layer": layer_name}}}
        job = _Job(names=names, layer=layer_name, score=score, options=options or {}, progress=None,
                   cancel=None, seed=seed)
        results[c] = explain_prepared(bundle, prepared, Label(c, score=score), job)
    return LabelExplanations(results, sigmoid.cpu().numpy() if batched else sigmoid[0].cpu().numpy(),
                             float(threshold), list(bundle.labels), chosen, layer_name, timings, notes)


def _forward(bundle: ModelBundle, inputs: torch.Tensor, module, layer: str):
    """(A as a leaf, logits with the graph above the layer, seconds) of one forward."""
    with bundle.lock, Stopwatch(bundle.device) as sw:
        with capture_layer(module, grad=True, view=bundle.view(layer)) as captured, torch.no_grad():
            logits = bundle.logits(inputs)
    if captured.activation is None:
        raise TargetError(f"layer {layer!r} did not run during the forward pass")
    return captured.activation, logits, sw.seconds


def _gradients(bundle: ModelBundle, A: torch.Tensor, logits: torch.Tensor, chosen: list[int],
               score: str) -> tuple[list[torch.Tensor], float]:
    """g_c = ∂S_c/∂A for each chosen label: one batched backward (one grad_outputs row per label)
    where torch can vmap the graph above the layer, else one backward each."""
    n, k = logits.shape[0], len(chosen)
    with torch.enable_grad(), Stopwatch(bundle.device) as sw:
        columns = torch.tensor(chosen, device=logits.device)
        scores = logits[:, columns] if score == "logit" else torch.sigmoid(logits[:, columns])  # N × K
        eye = torch.eye(k, device=logits.device, dtype=scores.dtype).unsqueeze(1).expand(k, n, k)
        try:
            (stacked,) = torch.autograd.grad(scores, A, grad_outputs=eye, retain_graph=True,
                                             is_grads_batched=True)
            grads = [g.detach() for g in stacked]
        except RuntimeError:  # an operation above the layer without a batching rule
            grads = [torch.autograd.grad(scores[:, j].sum(), A, retain_graph=True)[0].detach()
                     for j in range(k)]
    return grads, sw.seconds
