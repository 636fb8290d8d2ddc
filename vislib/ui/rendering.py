"""Rendering a view: overlays, signed-RGB views of input-space signals, colour bars, the top-k bar
chart, panel captions, PNG/NPZ downloads."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .. import render
from .catalogues import method_title
from .compute import LayerRow, ViewResult


def is_signal(raw: np.ndarray) -> bool:
    """An input-space signal (3×H×W, e.g. guided backprop) rather than a map (h×w)."""
    return raw.ndim == 3 and raw.shape[0] == 3


def panel_image(
    row: LayerRow, method: str, *, alpha: float = 0.5, colormap: str = "jet", signal_view: str = "signed RGB",
) -> Image.Image:
    """The picture of one panel: an overlay for maps, the signal itself (or its heatmap) for signals."""
    expl = row.explanations[method]
    raw = expl.raw[method]
    if is_signal(raw) and signal_view == "signed RGB":
        return render.signed_rgb(raw)
    if is_signal(raw) and signal_view == "magnitude":
        return render.magnitude_gray(raw).convert("RGB")
    return render.overlay(expl.view(), expl.maps[method], alpha=alpha, colormap=colormap)


@dataclass
class Panel:
    layer: str
    method: str
    title: str
    seconds: float | None = None
    flat: bool = False
    error: str | None = None
    signal: bool = False

    @property
    def caption(self) -> str:
        if self.error:
            return self.title
        text = f"{self.title} · {format_seconds(self.seconds or 0.0)}"
        return text + " · flat map" if self.flat else text


def panels(result: ViewResult) -> list[list[Panel]]:
    """The grid as rows (one per layer) of panels (one per method), errors included."""
    grid = []
    for row in result.rows:
        line = []
        for method in row.methods:
            title = method_title(method)
            if method in row.errors:
                line.append(Panel(row.layer, method, title, error=row.errors[method]))
                continue
            expl = row.explanations[method]
            line.append(Panel(
                row.layer, method, title, seconds=expl.timings[method],
                flat=bool(np.any(expl.flat[method])), signal=is_signal(expl.raw[method]),
            ))
        grid.append(line)
    return grid


def flat_notes(result: ViewResult, bundle=None) -> list[str]:
    """Why panels show a flat map, one line per layer row that has any (Markdown): the library's
    notes on those maps (e.g. the class score's gradient is zero at that layer) or, without one,
    that the map is constant; and, with ``bundle``, the layer to choose instead (its default)."""
    lines = []
    for row, line in zip(result.rows, panels(result), strict=True):
        flat = [p for p in line if p.flat]
        if not flat:
            continue
        notes: list[str] = []
        for panel in flat:
            notes += [n for n in row.explanations[panel.method].notes if n not in notes]
        why = "; ".join(notes) or "the map is constant over the image (the method found nothing that " \
                                 "changes the score at this layer)"
        text = f"**Flat map** ({', '.join(p.title for p in flat)} at `{row.layer}`): {why}."
        default = getattr(bundle, "default_layer", None)
        if default and row.layer != default:
            text += f" Choose the default layer `{default}` instead, or an earlier one."
        lines.append(text)
    return lines


def format_seconds(seconds: float) -> str:
    if seconds < 1.0:
        return f"{seconds * 1000:.0f} ms" if seconds >= 0.0095 else f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def colorbar(colormap: str = "jet", width: int = 256, height: int = 14) -> Image.Image:
    """A horizontal colour bar for the shared [0, 1] scale."""
    ramp = np.tile(np.linspace(0.0, 1.0, width, dtype=np.float32), (height, 1))
    return render.heatmap(ramp, colormap)


def render_all(
    result: ViewResult, *, alpha: float, colormap: str, signal_view: str,
) -> dict[tuple[str, str], Image.Image]:
    """Every panel image of a view (what a re-render after an opacity/colormap change costs)."""
    out = {}
    for row in result.rows:
        for method in row.explanations:
            out[(row.layer, method)] = panel_image(row, method, alpha=alpha, colormap=colormap,
                                                   signal_view=signal_view)
    return out


def topk_figure(top: Sequence[tuple[int, str, float]], target: int | None):
    """Horizontal bars of the top-k class probabilities, the explained class highlighted.

    Each bar carries its class index in ``customdata`` so a click can be turned back into a class.
    """
    import plotly.graph_objects as go

    top = list(top)[::-1]  # plotly draws the first bar at the bottom
    labels = [f"{label} " for _, label, _ in top]
    colours = ["#e4572e" if idx == target else "#7a9cc6" for idx, _, _ in top]
    top_p = max((p for _, _, p in top), default=1.0)
    span = min(1.0, 1.25 * top_p) or 1.0
    hover = "%{y}: %{customdata[1]:.2%}<br>class %{customdata[0]}<extra>click to explain</extra>"
    customdata = [[idx, p] for idx, _, p in top]
    # A faint full-width track behind every bar: a confident model leaves the other bars a few pixels
    # (or zero) wide, and the track keeps each class clickable.
    track = go.Bar(x=[span] * len(top), y=labels, orientation="h", customdata=customdata,
                   marker_color="rgba(122, 156, 198, 0.10)", hovertemplate=hover, showlegend=False)
    bars = go.Bar(
        x=[p for _, _, p in top], y=labels, orientation="h", marker_color=colours, customdata=customdata,
        text=[f"{p:.1%}" for _, _, p in top], textposition="outside", cliponaxis=False,
        hovertemplate=hover, showlegend=False,
    )
    fig = go.Figure([track, bars])
    tickformat = ".0%" if span >= 0.05 else ".1%" if span >= 0.005 else ".2%"
    fig.update_layout(
        height=60 + 34 * max(1, len(top)), margin=dict(l=8, r=48, t=8, b=8), showlegend=False,
        xaxis=dict(range=[0, span], tickformat=tickformat, title=None, fixedrange=True),
        yaxis=dict(fixedrange=True, automargin=True), clickmode="event+select", dragmode=False,
        bargap=0.25, barmode="overlay",
    )
    return fig


def class_from_selection(selection, classes: Sequence[int] | None = None) -> int | None:
    """The class index of the first selected bar of :func:`topk_figure` (``None`` if none)."""
    if selection is None:
        return None
    sel = selection.get("selection", selection) if isinstance(selection, Mapping) else selection
    points = sel.get("points", []) if isinstance(sel, Mapping) else getattr(sel, "points", [])
    for point in points or []:
        data = point.get("customdata")
        if isinstance(data, (list, tuple)):
            data = data[0] if data else None
        if data is not None:
            return int(data)
        index = point.get("point_index", point.get("point_number"))
        if index is not None and classes is not None:
            ordered = list(classes)[::-1]  # the figure's bar order
            if 0 <= int(index) < len(ordered):
                return int(ordered[int(index)])
    return None


def maps_npz(result: ViewResult) -> bytes:
    """All maps of a view in one ``.npz``: ``<method>@<layer>`` (H×W in [0, 1]), raw outputs as
    ``raw/<method>@<layer>``, the input view, the class probabilities and the target."""
    arrays: dict[str, np.ndarray] = {}
    for row in result.rows:
        for method, expl in row.explanations.items():
            arrays[f"{method}@{row.layer}"] = expl.maps[method]
            arrays[f"raw/{method}@{row.layer}"] = expl.raw[method]
    if result.input_image is not None:
        arrays["input"] = np.asarray(result.input_image)
    if result.probs is not None:
        arrays["probs"] = result.probs
    arrays["target"] = np.array(-1 if result.target is None else result.target)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]  # numpy's stub reads **arrays as allow_pickle
    return buffer.getvalue()


def safe_filename(*parts: str) -> str:
    text = "_".join(parts)
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-") or "file"
