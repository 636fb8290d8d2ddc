"""A classifier seen as an embedding: the input of its head (its penultimate layer's features).

``as_embedding(bundle)`` shares every parameter with the classifier (a :func:`shallow_clone` whose
head is an ``nn.Identity``), so "why are these two images similar?" (:class:`vislib.targets.Similarity`)
is asked of the same network, on the features the head reads.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch
from torch import nn

from ..errors import ModelError
from .bundle import ModelBundle


def shallow_clone(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer tensor but no container.

    fx tracing runs the model's Python ``forward`` on proxies, so attribute assignments in a
    forward (a counter, a cached feature map) would land on the shared model; on this copy they do
    not. In-place weight updates of the original stay visible (same tensors). The copy has no
    hooks, so other explanations' hooks on the shared model never fire in its forwards.
    """
    memo: dict[int, nn.Module] = {}

    def clone(module: nn.Module) -> nn.Module:
        if id(module) not in memo:
            copied = copy.copy(module)
            for key, value in list(copied.__dict__.items()):
                if isinstance(value, dict):
                    copied.__dict__[key] = type(value)() if "hook" in key else type(value)(value)
            memo[id(module)] = copied
            copied._modules = type(module._modules)(
                (name, None if child is None else clone(child)) for name, child in module._modules.items()
            )
        return memo[id(module)]

    return clone(model)


def head_of(bundle: ModelBundle) -> str:
    """The name of the linear layer whose output is the bundle's class scores: the probe's, else the
    last ``nn.Linear`` with as many outputs as the bundle has classes."""
    if bundle.head:
        return bundle.head
    width = len(bundle.labels)
    linears = [name for name, m in bundle.model.named_modules()
               if isinstance(m, nn.Linear) and m.out_features == width]
    if not linears:
        raise ModelError(f"model {bundle.name!r} has no linear head with {width} outputs to take the "
                         f"embedding before; load it as an embedding model (scores=\"embedding\")")
    return linears[-1]


def as_embedding(bundle: ModelBundle) -> ModelBundle:
    """The bundle's model up to its head: the output is the head's input (N × D features), the
    output kind "embedding". Made once per bundle; parameters, lock and device are shared."""
    if bundle.scores == "embedding":
        return bundle
    with bundle.lock:
        if bundle.embedding is not None:
            return bundle.embedding
        head = head_of(bundle)
        model = shallow_clone(bundle.model)
        parent_name, _, child = head.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nn.Identity())
        probe = torch.zeros((1, *bundle.input_shape), device=bundle.device)
        with torch.no_grad():
            from .bundle import select_output

            out = select_output(model(probe), bundle.output)
        width = int(out.reshape(out.shape[0], -1).shape[1])
        inside = (head, f"{head}.")
        keep = {n: s for n, s in bundle.layers.items() if n != head and not n.startswith(inside[1])}
        bundle.embedding = replace(
            bundle, model=model, scores="embedding", head=None, embedding=None, cpu_fallback=None,
            labels=[f"feature {i}" for i in range(width)], labels_from="embedding features",
            layers=keep, views={n: v for n, v in bundle.views.items() if n in keep},
            layer_table=[row for row in bundle.layer_table if row.name in keep],
            name=f"{bundle.name} (embedding)", ref=None,
            description=f"the penultimate layer of {bundle.name}: the {width} features its head "
                        f"{head!r} reads",
        )
        return bundle.embedding
