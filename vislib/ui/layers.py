"""Layers as the dashboard names and walks them: labels with the grid and layout, forward order."""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: How the layer picker names a layer's layout when it is not a plain feature map.
LAYOUT_WORDS = {"tokens": "tokens", "nhwc": "channels-last"}


def layer_label(name: str, shape: Sequence[int], view=None) -> str:
    """``layer4 · 512×7×7``; with the layer's :class:`~vislib.layers.LayerView`, its layout too:
    ``blocks.11.norm1 · 192×14×14 (tokens)`` — the map as the methods see it."""
    text = f"{name} · {'×'.join(str(s) for s in shape)}"
    word = LAYOUT_WORDS.get(getattr(view, "layout", "nchw"))
    return f"{text} ({word})" if word else text


def bundle_layer_label(bundle, name: str) -> str:
    """:func:`layer_label` of one of ``bundle``'s layers (its grid and layout as the methods see it)."""
    return layer_label(name, bundle.layers[name], bundle.view(name))


_SKIP_IN_WALK = ("BatchNorm", "Dropout", "Identity")


def forward_order(names: Sequence[str]) -> list[str]:
    """Module names (definition order) rearranged so that a container follows its children: the
    order in which their outputs are computed (``layer1.0``, ``layer1.1``, ``layer1``, ``layer2.0``…)."""
    out: list[str] = []
    pending: list[str] = []  # open containers, innermost last
    for name in names:
        while pending and not name.startswith(pending[-1] + "."):
            out.append(pending.pop())
        pending.append(name)
    out.extend(reversed(pending))
    return out


def walk_layers(bundle, *, everything: bool = False) -> list[str]:
    """Target layers in forward order, for walking through the network from input to output.

    By default a readable subset: stages and blocks up to two levels deep, without batch norm or
    dropout, and without the last module of a ``Sequential`` (its output *is* the container's);
    ``everything=True`` gives every candidate layer.
    """
    names = forward_order(list(bundle.layers))
    if everything:
        return names
    modules = dict(bundle.model.named_modules())
    keep = [n for n in names
            if n.count(".") <= 1 and not type(modules[n]).__name__.startswith(_SKIP_IN_WALK)]
    same_as_parent = set()
    for name, module in modules.items():
        if isinstance(module, torch.nn.Sequential) and len(module) and name in keep:
            last = f"{name}.{len(module) - 1}" if name else str(len(module) - 1)
            same_as_parent.add(last)
    keep = [n for n in keep if n not in same_as_parent]
    return keep or names
