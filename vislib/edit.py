"""Erase and watch: paint over the model's input view, explain the edited image, measure the drop.

The hand-made counterpart of occlusion (Zeiler & Fergus 2014): where occlusion slides a grey patch
systematically and records the score each time, here a person paints where they think the evidence
is and sees at once whether the class score falls. The drop is ``p_c(x) − p_c(x')`` for the class ``c``
explained on the original image ``x`` and the edited image ``x'``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .explain import Explanation, explain
from .models import ModelBundle


def apply_strokes(view: Image.Image, strokes: np.ndarray | None) -> Image.Image:
    """``view`` with an RGBA stroke layer (H×W×4 uint8, e.g. a drawing canvas's ``image_data``)
    composited over it: ``out = (1 − a)·view + a·stroke`` with ``a = alpha / 255``. The layer is
    resized (nearest) to the view when its size differs."""
    base = view.convert("RGB")
    if strokes is None:
        return base
    layer = np.asarray(strokes, dtype=np.uint8)
    if layer.ndim != 3 or layer.shape[2] != 4:
        raise ValueError(f"strokes are H×W×4 RGBA, not shape {layer.shape}")
    if layer.shape[:2] != (base.height, base.width):
        layer = np.asarray(Image.fromarray(layer, "RGBA").resize(base.size, Image.Resampling.NEAREST))
    alpha = layer[..., 3:4].astype(np.float32) / 255.0
    out = (1.0 - alpha) * np.asarray(base, np.float32) + alpha * layer[..., :3].astype(np.float32)
    return Image.fromarray(out.round().astype(np.uint8))


def painted_fraction(strokes: np.ndarray | None) -> float:
    """Share of the pixels the strokes touch (alpha > 0)."""
    if strokes is None:
        return 0.0
    return float((np.asarray(strokes)[..., 3] > 0).mean())


@dataclass
class EraseResult:
    before: Explanation
    after: Explanation
    edited: Image.Image
    painted: float  # share of the view painted over

    @property
    def target(self) -> int:
        return self.before.class_index()

    @property
    def probability_drop(self) -> float:
        return float(self.before.probs[self.target] - self.after.probs[self.target])


def erase_and_watch(bundle: ModelBundle, view: Image.Image, strokes: np.ndarray | None,
                    method: str = "gradcam", layer: str | None = None, target=None, *,
                    before: Explanation | None = None,
                    cache=None) -> EraseResult:
    """Explain ``view`` (the model's input view) and the view with ``strokes`` painted over it, for
    the class explained on the original (``target``, or its top class)."""
    if before is None:
        before = explain(bundle, view, methods=[method], layer=layer, target=target, cache=cache)
    edited = apply_strokes(view, strokes)
    after = explain(bundle, edited, methods=[method], layer=layer, target=before.class_index(), cache=cache)
    return EraseResult(before=before, after=after, edited=edited, painted=painted_fraction(strokes))
