"""A report to hand in: one self-contained HTML file for one explanation.

Everything is inline (images as base64 PNG, the style in the page, no script and no outside URL), so
the file opens offline and can be mailed or uploaded as it is. It holds the input view, the model, its
weights (``str(weights)``, and the file's SHA-256 when the weights are a file), the layer, the class,
the score, the methods with their maps and overlays, the top classes, and the versions of vislib, torch
and torchvision; plus the dashboard link's query and the command line that reproduce the view. The
dashboard's "Download report" and ``vislib explain ... --report out.html`` write the same file.
"""

from __future__ import annotations

import hashlib
import platform
import shlex
from html import escape
from pathlib import Path
from urllib.parse import urlencode

from .evaluate.report import _CSS, _b64_png, _html_table, method_label
from .explain import Explanation
from .render import heatmap

_REPORT_CSS = _CSS + """
.maps{display:flex;flex-wrap:wrap;gap:14px} .maps figure{margin:0;border:1px solid #ddd;border-radius:6px;
padding:8px} .maps img{width:224px;height:224px;image-rendering:pixelated;margin-right:4px}
code,pre{background:#f4f4f4;padding:2px 4px;border-radius:3px;white-space:pre-wrap;word-break:break-all}
"""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _weights_file(weights: str) -> Path | None:
    """The weights' file when ``weights`` names one (absolute, relative to the working folder, or to
    the repository, where the bundled models' ``assets/models/...`` lie)."""
    from .models.bundled import ASSETS

    if weights in ("", "random", "default", "pretrained") or len(weights) > 4096:
        return None
    for candidate in (Path(weights), ASSETS.parent / weights):
        try:
            if candidate.is_file():
                return candidate
        except OSError:
            continue
    return None


def weights_identity(weights: str) -> dict[str, str]:
    """``{"weights": str(weights)}``, plus ``"sha256"`` of the file when the weights are a file."""
    found = {"weights": str(weights)}
    path = _weights_file(str(weights))
    if path is not None:
        found["sha256"] = file_sha256(path)
    return found


def versions() -> dict[str, str]:
    """vislib, torch, torchvision, numpy, Pillow and Python versions."""
    import numpy
    import PIL
    import torch
    import torchvision

    from . import __version__

    return {"vislib": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "Pillow": PIL.__version__, "Python": platform.python_version()}


def _weights_choice(weights: str) -> tuple[str, str]:
    """(the dashboard's ``weights`` value, the CLI's ``--weights`` value) for a bundle's weights."""
    if weights == "random":
        return "random", "none"
    path = _weights_file(weights)
    if path is not None and not str(weights).startswith("assets/models/"):
        return "pretrained", str(weights)  # a user's file: the dashboard needs it uploaded again
    return "pretrained", "default"


def dashboard_query(result: Explanation, target_given: bool = True) -> str:
    """The dashboard link's query string for this view (model, weights, layer, class, methods, score)."""
    params = {"model": result.model, "weights": _weights_choice(result.weights)[0], "layer": result.layer}
    if target_given and isinstance(result.target, int):
        params["class"] = str(result.target)
    params.update(methods=",".join(result.methods), score=result.score)
    return urlencode(params, safe=",")


def cli_line(result: Explanation, image_name: str = "IMAGE", out: str = "out") -> str:
    """The ``python -m vislib explain`` line that computes this view again."""
    target = ["--target", str(result.target)] if isinstance(result.target, int) else []
    args = ["python", "-m", "vislib", "explain", image_name, "--model", result.model,
            "--weights", _weights_choice(result.weights)[1], "--layer", result.layer, *target,
            "--methods", ",".join(result.methods), "--score", result.score, "--out", out]
    return shlex.join(args)


def explanation_report(result: Explanation, *, image_name: str = "image", alpha: float = 0.5,
                       colormap: str = "jet", top: int = 5, title: str | None = None) -> str:
    """The self-contained HTML report of one (single-image) :class:`~vislib.Explanation`."""
    if result.batched:
        raise ValueError("a report explains one image; pass one image's Explanation")
    target = result.target if isinstance(result.target, int) else None
    probs = result.probs
    explained = result.describe_target()
    ident = weights_identity(result.weights)
    info = [["image", image_name], ["model", result.model], ["weights", ident["weights"]]]
    if "sha256" in ident:
        info.append(["weights SHA-256", ident["sha256"]])
    info += [["layer", result.layer],
             ["explained", f"{result.labels[target]} (#{target})" if target is not None else explained],
             ["score explained", result.score], ["methods", ", ".join(result.methods)]]
    contrast = result._pick(result.contrast, 0)
    if contrast is not None:
        info.append(["contrast class", f"{result.labels[int(contrast)]} (#{int(contrast)})"])
    top_rows = [[f"{label} (#{i})", p] for i, label, p in result.top_k(top)]
    if target is not None and target not in [i for i, _, _ in result.top_k(top)]:
        top_rows.append([f"{result.labels[target]} (#{target}, explained)", float(probs[target])])
    view = result.view()
    figures = [f"<figure><img src='{_b64_png(view)}' alt='input'>"
               f"<figcaption>input view ({view.width}×{view.height})"
               "</figcaption></figure>"]
    for method in result.methods:
        flat = " (flat: constant map)" if bool(result.flat[method]) else ""
        figures.append(
            f"<figure><img src='{_b64_png(result.overlay(method, alpha=alpha, colormap=colormap))}' "
            f"alt='{escape(method)} overlay'><img src='{_b64_png(heatmap(result.maps[method], colormap))}' "
            f"alt='{escape(method)} map'><figcaption>{escape(method_label(method))}{flat} · "
            f"{result.timings.get(method, 0.0):.2f} s</figcaption></figure>")
    version_rows = [[k, v] for k, v in versions().items()]
    parts = [
        f"<h1>{escape(title or f'{result.model}: {result.target_label()}')}</h1>",
        f"<p class='muted'>vislib explanation report · maps for the {escape(explained)} "
        f"({escape(result.score)}) at layer {escape(result.layer)}</p>",
        "<h3>View</h3>" + _html_table(["field", "value"], info),
        "<h3>Maps</h3><p class='muted'>Each map min–max normalised to [0, 1]; overlay opacity "
        f"{alpha:g}, colormap {escape(colormap)}.</p><div class='maps'>" + "".join(figures) + "</div>",
        "<h3>Top classes</h3>" + _html_table(["class", "probability"], top_rows),
        "<h3>Versions</h3>" + _html_table(["package", "version"], version_rows),
        "<h3>Reproduce</h3><p>Dashboard link (append to the dashboard's address):</p>"
        f"<pre id='query'>?{escape(dashboard_query(result))}</pre><p>Command line:</p>"
        f"<pre id='cli'>{escape(cli_line(result, image_name))}</pre>",
    ]
    for note in result.notes:
        parts.append(f"<div class='note'>{escape(note)}</div>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>vislib report: "
            f"{escape(result.model)}</title><style>{_REPORT_CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>")


def write_explanation_report(result: Explanation, path: str | Path, **kwargs) -> Path:
    """Write :func:`explanation_report` to ``path`` (UTF-8) and return the path."""
    path = Path(path)
    path.write_text(explanation_report(result, **kwargs), encoding="utf-8")
    return path
