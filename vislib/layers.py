"""Layers as the methods see them: N×C×h×w maps read from convolutional, channels-last and token layers.

The CAM family, Score-CAM, Ablation-CAM, Eigen-CAM and the feature views need a target layer's
output as an N×C×h×w map. A convolutional layer gives one directly; others are *read* as one
(shared METHODS.md, "Token layers"):

- **tokens** (vision transformers, N×T×C): the T − h·w leading tokens (class, distillation,
  register tokens) are dropped and the rest reshaped row-major to the patch grid h×w, which comes
  from the model's patch embedding (never guessed from T alone);
- **channels-last** (Swin, timm NHWC stages, N×h×w×C): permuted to N×C×h×w.

:class:`LayerView` converts both ways: :meth:`LayerView.to_map` gives the map, :meth:`LayerView.from_map`
puts a (possibly changed) map back into the layer's own layout, so that a hook can hand the rest of
the network a tensor computed *from* the map (gradients then reach the map) or an ablated map.

:func:`classify_outputs` decides, from one probe forward, which modules' outputs are maps and how
to read them. The patch grid: the output grid of the first convolution applied to the input (a ViT's
patch embedding, a CNN's stem), and its halvings (Swin's patch merging, LeViT's subsampling); a
token count T is read as tokens only when T − p = h·w for one of those grids and p ≤ 16 leading
tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_PREFIX_TOKENS = 16  # class + distillation + register tokens


@dataclass(frozen=True)
class LayerView:
    """How a layer's output is read as an N×C×h×w map."""

    layout: str  # "nchw", "nhwc" or "tokens"
    channels: int
    grid: tuple[int, int]  # (h, w)
    prefix: int = 0  # tokens before the patch tokens (layout "tokens")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, h, w): the map's shape without the batch."""
        return (self.channels, *self.grid)

    @property
    def spatial(self) -> bool:
        """True when the map has more than one position (a 1×1 map is no map to look at)."""
        return self.grid[0] * self.grid[1] > 1

    def describe(self) -> str:
        if self.layout == "tokens":
            plural = "s" if self.prefix != 1 else ""
            dropped = f", {self.prefix} leading token{plural} dropped" if self.prefix else ""
            return f"tokens read as {self.grid[0]}×{self.grid[1]}{dropped}"
        if self.layout == "nhwc":
            return "channels-last, permuted"
        return "feature map"

    def check(self, out: torch.Tensor) -> None:
        from .errors import LayerError

        expected = self.raw_shape()
        if not isinstance(out, torch.Tensor) or tuple(out.shape[1:]) != expected:
            got = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__
            raise LayerError(f"the target layer's output {got} is not the {expected} the model was probed "
                             f"with (was the input size changed?)")

    def raw_shape(self) -> tuple[int, ...]:
        h, w = self.grid
        if self.layout == "tokens":
            return (self.prefix + h * w, self.channels)
        if self.layout == "nhwc":
            return (h, w, self.channels)
        return (self.channels, h, w)

    def to_map(self, out: torch.Tensor) -> torch.Tensor:
        """The layer's output ``out`` as an N×C×h×w map (a view of ``out`` where possible)."""
        if self.layout == "nchw":
            return out
        if self.layout == "nhwc":
            return out.permute(0, 3, 1, 2)
        h, w = self.grid
        return out[:, self.prefix:, :].reshape(out.shape[0], h, w, self.channels).permute(0, 3, 1, 2)

    def from_map(self, A: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """A tensor in the layer's layout made from the map ``A`` (and ``out``'s leading tokens).

        Always a new tensor computed from ``A``, so the rest of the network depends on ``A`` (its
        gradient is then ∂S/∂A) and in-place operations above the layer cannot change ``A``."""
        if self.layout == "nchw":
            return A.clone()
        if self.layout == "nhwc":
            return A.permute(0, 2, 3, 1).contiguous()
        patches = A.permute(0, 2, 3, 1).reshape(A.shape[0], -1, self.channels)
        if self.prefix:
            return torch.cat([out[:, :self.prefix, :], patches], dim=1)
        return patches.contiguous()


def grid_candidates(first_grid: tuple[int, int] | None) -> set[tuple[int, int]]:
    """The patch grid and its halvings (floor and ceil), down to 1×1."""
    if first_grid is None:
        return set()
    found = set()
    frontier = {(first_grid[0], first_grid[1])}
    while frontier:
        found |= frontier
        nxt = set()
        for h, w in frontier:
            if h > 1 or w > 1:
                for a, b in {(h // 2, w // 2), (-(-h // 2), -(-w // 2))}:
                    if a >= 1 and b >= 1 and (a, b) not in found:
                        nxt.add((a, b))
        frontier = nxt
    return found


def _aspect_ok(h: int, w: int, size: tuple[int, int]) -> bool:
    """Whether an h×w grid has (roughly) the input's aspect ratio (within a factor 1.5)."""
    return abs(math.log((h / w) / (size[0] / size[1]))) <= math.log(1.5)


def token_view(shape: tuple[int, ...], grids: set[tuple[int, int]],
               size: tuple[int, int]) -> LayerView | None:
    """An N×T×C output as tokens on one of the patch ``grids`` (fewest leading tokens first)."""
    _, tokens, channels = shape
    for prefix in range(0, MAX_PREFIX_TOKENS + 1):
        n = tokens - prefix
        if n < 1:
            break
        matches = sorted(g for g in grids if g[0] * g[1] == n)
        if not grids:  # no convolution saw the input: the grid with the input's aspect ratio
            h = round(math.sqrt(n * size[0] / size[1]))
            matches = [(h, n // h)] if h >= 1 and h * (n // h) == n and _aspect_ok(h, n // h, size) else []
        if matches:
            return LayerView("tokens", channels, matches[0], prefix)
    return None


def map_view(shape: tuple[int, ...], grids: set[tuple[int, int]], size: tuple[int, int], *,
             transformer: bool) -> LayerView | None:
    """An N×a×b×c output as a map: channels-first unless the evidence says channels-last.

    Channels-last when (a, b) is a patch grid while (b, c) is neither a grid nor of the input's
    aspect ratio (Swin's 7×7×768); channels-first when (b, c) is a grid or, in a network without
    token layers, of the input's aspect ratio (any CNN). Otherwise (attention heads, N×heads×T×d)
    no map.
    """
    _, a, b, c = shape
    if (a, b) in grids and (b, c) not in grids and not _aspect_ok(b, c, size):
        return LayerView("nhwc", c, (a, b))
    cnn_like = not transformer and _aspect_ok(b, c, size) and b <= 2 * size[0] and c <= 2 * size[1]
    if (b, c) in grids or cnn_like:
        return LayerView("nchw", a, (b, c))
    return None


def classify_outputs(shapes: dict[str, tuple[int, ...]], order: list[str], first_conv: str | None,
                     size: tuple[int, int]) -> dict[str, LayerView]:
    """Views of every module output that can be read as a map.

    ``shapes``: module name → output shape (with batch) of the modules that ran once; ``order``: in
    the order they finished; ``first_conv``: the first convolution applied to the input (its
    output grid is the patch grid); ``size``: the input's (H, W).
    """
    first = shapes.get(first_conv) if first_conv else None
    grids = grid_candidates((first[2], first[3]) if first is not None and len(first) == 4 else None)
    tokens = {n: token_view(s, grids, size) for n, s in shapes.items() if len(s) == 3}
    tokens = {n: v for n, v in tokens.items() if v is not None}
    views: dict[str, LayerView] = {}
    for name in order:
        shape = shapes[name]
        if len(shape) == 4:
            view = map_view(shape, grids, size, transformer=bool(tokens))
        else:
            view = tokens.get(name)
        if view is not None:
            views[name] = view
    return views


def layer_table_lines(bundle, *, everything: bool = False) -> list[str]:
    """The layer table as text: name, module type, raw output, the map the methods see (C×h×w, or
    why there is none), the default layer marked and its reason at the end."""
    rows = [r for r in bundle.layer_table if everything or r.view is not None]
    width = max([len(r.name) for r in rows] + [5])
    kinds = max([len(r.kind) for r in rows] + [6])
    lines = [f"{'layer':{width}s}  {'module':{kinds}s}  {'output':>14s}  map (as the methods see it)"]
    for r in rows:
        if r.view is None:
            seen = f"—  ({r.note})"
        else:
            c, h, w = r.view.shape
            seen = f"{c}×{h}×{w}" + ("" if r.view.layout == "nchw" else f"  ({r.view.describe()})")
            if not r.view.spatial:
                seen += "  (1×1: no spatial map)"
        mark = "  ← default" if r.name == bundle.default_layer else ""
        lines.append(f"{r.name:{width}s}  {r.kind:{kinds}s}  {r.output:>14s}  {seen}{mark}")
    lines.append(f"default layer: {bundle.default_layer} — {bundle.default_reason}")
    return lines
