"""Hooks, only ever inside context managers.

``capture_layer`` records a target layer's activation during one forward pass. With ``grad=True``
the activation is replaced by a fresh leaf tensor and autograd is switched on from that point of
the forward pass only: the part of the network below the target layer runs without building a
graph, and ``torch.autograd.grad(score, activation)`` walks back only through the layers above it.
The hook is removed and the caller's grad mode restored in ``finally``, whatever happens.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import LayerError
from .layers import LayerView


def resolve_layer(bundle, layer: str | None) -> tuple[str, nn.Module]:
    """Return (name, module) for ``layer`` (default: the bundle's default layer) or a LayerError."""
    name = layer or bundle.default_layer
    if name not in bundle.layers:
        modules = dict(bundle.model.named_modules())
        if name in modules:
            raise LayerError(
                f"layer {name!r} cannot be a target: its output is not one N×C×H×W tensor "
                f"produced once per forward pass"
            )
        close = difflib.get_close_matches(name, list(bundle.layers), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise LayerError(f"model {bundle.name!r} has no layer {name!r}{hint}")
    return name, bundle.model.get_submodule(name)


@dataclass
class Captured:
    """What ``capture_layer`` recorded: the activation (a leaf when grad was requested)."""

    activation: torch.Tensor | None = None


def this_thread_only(hook):
    """Wrap a module hook so that it acts only on forward passes run by the registering thread.

    Hooks are registered on the shared model, so without this a forward pass of another user's
    request, running at the same time in another thread, would trigger (and corrupt) ours.
    """
    owner = threading.get_ident()

    def guarded(*args):
        if threading.get_ident() != owner:
            return None
        return hook(*args)

    return guarded


@contextmanager
def capture_layer(module: nn.Module, *, grad: bool = False, keep_graph: bool = False,
                  view: LayerView | None = None) -> Iterator[Captured]:
    """Record ``module``'s output, as an N×C×h×w map, during a forward pass run inside this context.

    Three ways, for three kinds of passes:

    - default: the map is recorded detached (a copy: no gradients needed);
    - ``grad=True``: the forward must be called under ``torch.no_grad()``; the recorded map is a
      fresh leaf and the hook turns grad mode on from the target layer upwards, so a backward from
      the score stops at the layer and nothing below it builds a graph;
    - ``keep_graph=True``: the map is recorded with its graph, so gradients of it still flow back
      to the input (for passes that also need input gradients).

    ``view`` (``bundle.view(layer)``) reads token and channels-last outputs as maps; with ``grad`` or
    ``keep_graph`` the rest of the network then runs on a tensor made from the recorded map (its
    gradient is ∂S/∂A, and in-place operations above the layer cannot change it). The hook acts on
    this thread's forward passes only and is removed (and the caller's grad mode restored) in
    ``finally``.
    """
    captured = Captured()
    grad_was = torch.is_grad_enabled()
    reshaped = view is not None and view.layout != "nchw"

    def hook(_module, _inputs, output):
        if not isinstance(output, torch.Tensor):
            raise LayerError("the target layer's output is not a tensor")
        if captured.activation is not None:
            raise LayerError("the target layer runs more than once per forward pass")
        if reshaped:
            view.check(output)
        if keep_graph:
            captured.activation = view.to_map(output) if reshaped else output
            return view.from_map(captured.activation, output) if reshaped else output.clone()
        if not grad:
            captured.activation = (view.to_map(output) if reshaped else output).detach().clone()
            return None
        if reshaped:
            leaf = view.to_map(output.detach()).clone(memory_format=torch.contiguous_format)
            leaf.requires_grad_(True)
        else:
            leaf = output.detach().requires_grad_(True)
        captured.activation = leaf
        torch.set_grad_enabled(True)
        return view.from_map(leaf, output.detach()) if reshaped else leaf.clone()

    handle = module.register_forward_hook(this_thread_only(hook))
    try:
        yield captured
    finally:
        handle.remove()
        torch.set_grad_enabled(grad_was)
