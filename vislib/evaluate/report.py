"""The report of an evaluation, shared by every engine: per-image tables (CSV and Parquet), the
summary (JSON), plotly figures and a self-contained HTML report (the dashboard uses the same figures).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from .. import metrics
from ..datasets import ImageSet
from ..models import ModelBundle
from .error_view import explain_error
from .records import CENTRE, METRIC_COLUMNS, EvalResult

#: A table column: a list, or a NumPy array (one value, or one row of an N×K array, per row).
Column = Sequence | np.ndarray

# --------------------------------------------------------------------------------------------------
# Tables and figures (plain data and plotly figures: the page and the HTML report share them)


def _plotly(module: str):
    """A plotly module (the ``dashboard`` extra), or a MissingDependency naming the extra."""
    from .._optional import require

    return require(f"plotly.{module}", "dashboard", feature="the evaluation report (report.html)")


def class_names(labels: Sequence[str]) -> list[str]:
    """Labels made unique (ImageNet repeats a few) for axes and tables."""
    labels = list(labels)
    return [f"{lab} (#{i})" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]


def method_label(name: str) -> str:
    if name == CENTRE:
        return "image-centre baseline"
    from ..methods import METHODS

    cls = METHODS.get(name)
    return getattr(cls, "title", name) if cls is not None else name


def table_rows(result: EvalResult) -> list[dict]:
    """:meth:`EvalResult.method_table` with readable method names and column titles, empty columns
    (e.g. no masks) dropped."""
    rows = result.method_table()
    keep = [k for k in METRIC_COLUMNS if any(np.isfinite(r[k]) for r in rows)]
    return [{"Method": method_label(r["method"]), **{METRIC_COLUMNS[k]: r[k] for k in keep}} for r in rows]


def confusion_figure(result: EvalResult, selected: tuple[int, int] | None = None):
    """The confusion matrix as a heatmap (rows: true class, columns: predicted), with a transparent
    marker on every cell carrying ``customdata = [true, predicted]`` so a click selects the cell
    (plotly heatmaps themselves send no selection events)."""
    go = _plotly("graph_objects")

    matrix, classes = result.confusion()
    names = class_names(result.labels)
    axis = [names[c] for c in classes]
    totals = matrix.sum(axis=1, keepdims=True).clip(min=1)
    share = matrix / totals
    text = [[str(v) if v else "" for v in row] for row in matrix]
    fig = go.Figure(go.Heatmap(
        z=share, x=axis, y=axis, text=text, texttemplate="%{text}", colorscale="Blues", zmin=0, zmax=1,
        colorbar=dict(title="share of row", tickformat=".0%"), hoverinfo="skip",
    ))
    cells = [(i, j) for i in range(len(classes)) for j in range(len(classes))]
    fig.add_trace(go.Scatter(
        x=[axis[j] for _, j in cells], y=[axis[i] for i, _ in cells], mode="markers",
        marker=dict(symbol="square", size=max(8, 360 // max(1, len(classes))), color="rgba(0,0,0,0)",
                    line=dict(width=0)),
        customdata=[[classes[i], classes[j]] for i, j in cells],
        hovertemplate="true %{y} → predicted %{x}: %{text}<extra>click to list these images</extra>",
        text=[f"{matrix[i, j]} images" for i, j in cells], showlegend=False,
        selected=dict(marker=dict(color="rgba(228,87,46,0.35)")), unselected=dict(marker=dict(opacity=0)),
    ))
    if selected is not None and selected[0] in classes and selected[1] in classes:
        i, j = classes.index(selected[0]), classes.index(selected[1])
        fig.add_shape(type="rect", x0=j - 0.5, x1=j + 0.5, y0=i - 0.5, y1=i + 0.5,
                      line=dict(color="#e4572e", width=3))
    side = 140 + 42 * len(classes)
    fig.update_layout(
        height=min(900, side), margin=dict(l=8, r=8, t=30, b=8), clickmode="event+select", dragmode=False,
        xaxis=dict(title="predicted", side="top", fixedrange=True, type="category", automargin=True),
        yaxis=dict(title="true", autorange="reversed", fixedrange=True, type="category", automargin=True),
    )
    return fig


def cell_from_selection(selection) -> tuple[int, int] | None:
    """(true, predicted) of the first selected confusion cell, from ``st.plotly_chart``'s event."""
    if selection is None:
        return None
    sel = selection.get("selection", selection) if isinstance(selection, dict) else getattr(
        selection, "selection", selection)
    points = sel.get("points", []) if isinstance(sel, dict) else getattr(sel, "points", [])
    for point in points or []:
        data = point.get("customdata") if isinstance(point, dict) else None
        if isinstance(data, (list, tuple)) and len(data) == 2:
            return int(data[0]), int(data[1])
    return None


def per_class_figure(result: EvalResult):
    """Accuracy per true class (horizontal bars, worst at the top)."""
    go = _plotly("graph_objects")

    per = result.per_class_accuracy()
    names = class_names(result.labels)
    order = sorted(per, key=lambda c: per[c][0])
    fig = go.Figure(go.Bar(
        x=[per[c][0] for c in order][::-1], y=[names[c] for c in order][::-1], orientation="h",
        text=[f"{per[c][0]:.0%} of {per[c][1]}" for c in order][::-1], textposition="outside",
        cliponaxis=False,
        marker_color=["#e4572e" if per[c][0] < result.accuracy else "#7a9cc6" for c in order][::-1],
    ))
    fig.update_layout(height=80 + 26 * len(order), margin=dict(l=8, r=48, t=8, b=8),
                      xaxis=dict(range=[0, 1.15], tickformat=".0%", fixedrange=True, tickvals=[0, 0.5, 1]),
                      yaxis=dict(fixedrange=True, automargin=True))
    return fig


def curves_figure(curves: dict[str, metrics.Curves], title: str = ""):
    """Mean deletion and insertion curves per entry (e.g. per method), with their mean AUCs."""
    go = _plotly("graph_objects")
    make_subplots = _plotly("subplots").make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("Deletion (lower is better)",
                                                        "Insertion (higher is better)"))
    palette = ["#e4572e", "#4c78a8", "#54a24b", "#b279a2", "#f58518", "#72b7b2", "#9d755d", "#bab0ac"]
    for k, (name, c) in enumerate(curves.items()):
        colour = palette[k % len(palette)]
        label = f"{name} (AUC: deletion {c.deletion_auc.mean():.3f}, insertion {c.insertion_auc.mean():.3f})"
        for col, values in enumerate((c.deletion, c.insertion)):
            fig.add_trace(go.Scatter(
                x=c.fractions, y=values.mean(axis=0), mode="lines", line=dict(color=colour),
                name=label, legendgroup=name, showlegend=col == 0,
            ), row=1, col=col + 1)
    fig.update_xaxes(title="fraction of pixels", range=[0, 1], tickformat=".0%")
    fig.update_yaxes(title="probability of the class", range=[0, 1.02])
    # A title goes above the subplot titles, with room of its own (they sit just above the plots).
    fig.update_layout(height=330 + (40 if title else 0), margin=dict(l=8, r=8, t=80 if title else 40, b=8),
                      title=dict(text=title, y=0.98, yanchor="top") if title else None,
                      legend=dict(orientation="h", y=-0.3))
    return fig


def contrast_image(contrast: np.ndarray, image: Image.Image | None = None, alpha: float = 0.6) -> Image.Image:
    """The contrast map on the diverging ``coolwarm`` colormap (blue: the true class, red: the
    predicted class, grey: neither), over the image."""
    from .. import render

    values = (np.clip(contrast, -1, 1) + 1) / 2
    if image is None:
        return render.heatmap(values, "coolwarm")
    return render.overlay(image, values, alpha=alpha, colormap="coolwarm")


# --------------------------------------------------------------------------------------------------
# Files: CSVs and a self-contained HTML report


def _fmt(value, digits: int = 6) -> str:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "" if not np.isfinite(value) else f"{float(value):.{digits}g}"
    return str(value)


def _write_csv(path, header: list[str], rows) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow([_fmt(v) for v in row])


def write_csv_table(path, table: Mapping[str, Column]) -> None:
    """A column table (name → values) as CSV: empty cells for NaN and None."""
    _write_csv(path, list(table), zip(*table.values(), strict=True))


def require_pyarrow():
    """pyarrow, or a clear error that says how to install it (it comes with ``ray[data]``)."""
    from .._optional import require

    for module in ("pyarrow.parquet", "pyarrow"):
        pyarrow = require(module, "ray", feature="Parquet output", otherwise="leave out --parquet")
    return pyarrow


def write_parquet_table(path, table: Mapping[str, Column]) -> None:
    """A column table as a Parquet file (zstd-compressed); N×K arrays become list columns."""
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    columns = {}
    for name, column in table.items():
        values = np.asarray(column) if not isinstance(column, list) else column
        if isinstance(values, np.ndarray) and values.ndim > 1:
            values = list(values)
        columns[name] = pa.array(values.tolist() if isinstance(values, np.ndarray) and values.dtype == object
                                 else values)
    pq.write_table(pa.table(columns), path, compression="zstd")


def image_table(result: EvalResult) -> dict[str, Column]:
    """One row per image: id, true and predicted class, confidence, p(true class), correct."""
    names = class_names(result.labels)
    p_true = result.probs[np.arange(len(result)), result.targets] if len(result) else np.zeros(0)
    return {"id": list(result.ids), "true": [names[t] for t in result.targets],
            "predicted": [names[p] for p in result.preds], "confidence": result.confidence.astype(np.float64),
            "p_true": p_true.astype(np.float64), "correct": result.correct.astype(np.int64)}


PER_IMAGE_NAMES = {"pointing": "pointing_hit", "reference": "peak_on_reference"}


def image_metrics_table(result: EvalResult) -> dict[str, Column]:
    """One row per image and method (the centre baseline included): the map's peak and every
    per-image number (NaN where not computed)."""
    n = len(result)
    everyone = [*result.methods, CENTRE]
    keys = [k for k in METRIC_COLUMNS if k not in ("average_drop", "increase")]
    table: dict[str, Any] = {"id": list(result.ids) * len(everyone),
                              "method": [m for m in everyone for _ in range(n)], "peak_y": [], "peak_x": []}
    for m in everyone:
        pk = result.peaks.get(m)
        table["peak_y"] += pk[:, 0].tolist() if pk is not None else [None] * n
        table["peak_x"] += pk[:, 1].tolist() if pk is not None else [None] * n
    metric_names = {"p_class": "y", "p_masked": "o", **{PER_IMAGE_NAMES.get(k, k): k for k in keys},
                    "drop_%": "average_drop", "increase_%": "increase"}
    for title, key in metric_names.items():
        table[title] = np.concatenate([np.asarray(result.metrics[m][key], np.float64) for m in everyone]) \
            if n else np.zeros(0)
    return table


def write_tables(result: EvalResult, out, *, parquet: bool = False) -> list:
    """``images.csv`` (one row per image), ``image_metrics.csv`` (one row per image and method, the
    centre baseline included), ``methods.csv`` (the per-method table), ``confusion.csv`` and
    ``misclassified.csv`` (most confident first); with ``parquet``, the two per-image tables also as
    ``images.parquet`` and ``image_metrics.parquet``. Returns the paths."""
    from pathlib import Path

    out = Path(out)
    if parquet:
        require_pyarrow()
    names = class_names(result.labels)
    preds, conf = result.preds, result.confidence
    p_true = result.probs[np.arange(len(result)), result.targets] if len(result) else np.zeros(0)
    paths = [out / n for n in ("images.csv", "image_metrics.csv", "methods.csv", "confusion.csv",
                               "misclassified.csv")]
    per_image = image_table(result)
    per_method = image_metrics_table(result)
    write_csv_table(paths[0], per_image)
    write_csv_table(paths[1], per_method)
    keys = list(METRIC_COLUMNS)
    table = result.method_table()
    _write_csv(paths[2], ["method", *keys], ([r["method"], *[r[k] for k in keys]] for r in table))
    matrix, classes = result.confusion()
    _write_csv(paths[3], ["true \\ predicted", *[names[c] for c in classes]],
               ([names[c], *matrix[i].tolist()] for i, c in enumerate(classes)))
    _write_csv(paths[4], ["rank", "id", "true", "predicted", "confidence", "p_true"],
               ([r + 1, result.ids[i], names[result.targets[i]], names[preds[i]], conf[i], p_true[i]]
                for r, i in enumerate(result.misclassified())))
    if parquet:
        paths += [out / "images.parquet", out / "image_metrics.parquet"]
        write_parquet_table(paths[-2], per_image)
        write_parquet_table(paths[-1], per_method)
    return paths


def summary(result: EvalResult) -> dict:
    """The run in one JSON-ready dict: model, data, accuracy, failures, per-method means, timings."""
    return {
        "model": result.model, "weights": result.weights, "layer": result.layer, "data": result.dataset,
        "images": len(result), "accuracy": result.accuracy, "misclassified": int((~result.correct).sum()),
        "failed": [{"id": i, "reason": why} for i, why in result.failed], "explained": result.explained,
        "methods": [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
                    for row in result.method_table()],
        "engine": result.engine, "notes": list(result.notes), "timings_s": result.timings,
        "vislib_version": result.vislib_version,
    }


def write_report(result: EvalResult, out, *, bundle: ModelBundle | None = None,
                 images: ImageSet | None = None, gallery: int = 24, parquet: bool = False) -> list:
    """Everything a run writes into ``out``: :func:`write_tables`, ``report.html`` and ``summary.json``."""
    import json
    from pathlib import Path

    out = Path(out)
    paths = write_tables(result, out, parquet=parquet)
    (out / "report.html").write_text(html_report(result, bundle=bundle, images=images, gallery=gallery),
                                     encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary(result), indent=2))
    return [*paths, out / "report.html", out / "summary.json"]


def _b64_png(image: Image.Image) -> str:
    import base64

    from ..render import to_png_bytes

    return "data:image/png;base64," + base64.b64encode(to_png_bytes(image)).decode()


def _html_table(header: list[str], rows: list[list]) -> str:
    from html import escape

    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(_fmt(v, 3))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_list(lines: list[str]) -> str:
    from html import escape

    return "<ul>" + "".join(f"<li>{escape(line)}</li>" for line in lines) + "</ul>" if lines else ""


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{margin-bottom:4px} .muted{color:#666} table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:right;font-size:14px} th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left} .gallery{display:flex;flex-wrap:wrap;gap:14px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;font-size:13px}
.card img{width:128px;height:128px;margin-right:4px}
.note{background:#fff6e5;border-left:4px solid #e4a72e;padding:8px 12px}
"""


def html_report(result: EvalResult, *, bundle: ModelBundle | None = None, images: ImageSet | None = None,
                gallery: int = 24, method: str | None = None, card: dict | None = None) -> str:
    """A self-contained HTML report: summary, data report, per-class accuracy, confusion matrix,
    per-method table, mean deletion/insertion curves, and the most confident errors with the maps
    of their predicted and true class and the contrast (images inline as base64 PNG, the plotly
    library embedded once: it opens offline). ``bundle`` and ``images`` are needed for the gallery."""
    from html import escape

    pio = _plotly("io")
    get_plotlyjs = _plotly("offline").get_plotlyjs

    from ..render import overlay

    def fig_html(fig) -> str:
        return pio.to_html(fig, full_html=False, include_plotlyjs=False, config={"displayModeBar": False})

    names = class_names(result.labels)
    parts = [f"<h1>Error analysis: {escape(result.model)}</h1>",
             f"<p class='muted'>{escape(result.dataset)} · {len(result)} images · weights "
             f"{escape(result.weights)} · layer {escape(result.layer)} · maps explain the "
             f"{escape(result.explained)} class · run on {escape(result.engine)} · vislib "
             f"{escape(result.vislib_version)}</p>",
             f"<h2>Accuracy {result.accuracy:.1%}</h2>"
             f"<p>{int((~result.correct).sum())} misclassified"
             + (f"; {len(result.failed)} files could not be read" if result.failed else "") + "</p>"]
    card = card if card is not None else (bundle.card if bundle is not None else None)
    if card and card.get("notes"):
        parts.append(f"<div class='note'><b>Model card.</b> {escape(str(card.get('description', '')))} "
                     f"{escape(str(card['notes']))}</div>")
    report = images.report if images is not None else None
    if report is not None:
        parts.append(f"<h3>Data</h3><p>{escape(report.summary())}</p>" + _html_list(report.lines()))
    if result.failed:
        parts.append(_html_list([f"{i}: {why}" for i, why in result.failed[:20]]))
    per = result.per_class_accuracy()
    parts.append("<h3>Per-class accuracy</h3>" + _html_table(
        ["class", "accuracy", "images"], [[names[c], a, n] for c, (a, n) in per.items()]))
    parts.append("<h3>Confusion matrix</h3>" + fig_html(confusion_figure(result)))
    rows = table_rows(result)
    if rows:
        table = _html_table(list(rows[0]), [list(r.values()) for r in rows])
        parts.append("<h3>Explanation metrics</h3>" + table
                     + f"<p class='muted'>Pointing game: hit when the map's maximum lies within "
                       f"{result.tolerance} px of the object (15 px at 224 px, scaled to the input), "
                       "mean over classes. Energy: share of the map's mass on the object. Average Drop / "
                       "Increase in Confidence: the class probability on map ⊙ image (normalised space) "
                       "against the image. Deletion / insertion: RISE, zeros (the mean colour) / a blurred "
                       "image as substrate.</p>")
    if result.reference_box is not None:
        label = result.reference_box[0]
        wrong = result.misclassified()
        shares = [[method_label(m), result.reference_share(m), result.reference_share(m, wrong)]
                  for m in result.methods]
        parts.append(f"<h3>Maps that peak on the {escape(label)}</h3>" + _html_table(
            ["method", "all images", "misclassified images"], shares))
    if result.curves:
        parts.append("<h3>Deletion and insertion</h3>" + fig_html(curves_figure(
            {method_label(m): c for m, c in result.curves.items()},
            f"mean over the first {next(iter(result.curves.values())).deletion.shape[0]} images")))
    wrong = result.misclassified()
    if bundle is not None and images is not None and len(wrong) and gallery:
        method = method or result.methods[0]
        cards = []
        for row in wrong[:gallery]:
            view = explain_error(bundle, images, int(result.index[row]), [method], layer=result.layer,
                                 curves=False)
            pred_map = overlay(view.image, view.maps[method][view.predicted])
            true_map = overlay(view.image, view.maps[method][view.true])
            cards.append(
                f"<div class='card'><img src='{_b64_png(view.image)}' alt='input'>"
                f"<img src='{_b64_png(pred_map)}' alt='predicted'><img src='{_b64_png(true_map)}' alt='true'>"
                f"<img src='{_b64_png(contrast_image(view.contrast[method], view.image))}' alt='contrast'>"
                f"<br>{escape(view.id)}: <b>{escape(names[view.true])}</b> predicted as "
                f"<b>{escape(names[view.predicted])}</b> ({result.confidence[row]:.0%})</div>")
        parts.append(f"<h3>Most confident errors ({min(gallery, len(wrong))} of {len(wrong)})</h3>"
                     f"<p class='muted'>Each: the input; {escape(method_label(method))} for the predicted "
                     "class; for the true class; the contrast (red: speaks for the predicted class, blue: "
                     "for the true class).</p><div class='gallery'>" + "".join(cards) + "</div>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>vislib error analysis</title>"
            f"<style>{_CSS}</style><script>{get_plotlyjs()}</script></head><body>"
            + "\n".join(parts) + "</body></html>")
