"""Erase and watch: the stroke composite by hand, the drop equals the difference of explain()'s scores."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import vislib
from vislib.edit import apply_strokes, erase_and_watch, painted_fraction


def test_apply_strokes_is_alpha_compositing():
    view = Image.new("RGB", (4, 2), (100, 100, 100))
    strokes = np.zeros((2, 4, 4), np.uint8)
    strokes[0, 0] = (0, 0, 0, 255)  # opaque black
    strokes[1, 3] = (200, 0, 50, 51)  # a = 0.2
    out = np.asarray(apply_strokes(view, strokes))
    assert tuple(out[0, 0]) == (0, 0, 0)
    assert tuple(out[1, 3]) == (120, 80, 90)  # 0.8·100 + 0.2·(200, 0, 50)
    assert tuple(out[0, 1]) == (100, 100, 100)
    assert painted_fraction(strokes) == pytest.approx(2 / 8)
    assert apply_strokes(view, None).tobytes() == view.tobytes()
    big = np.zeros((4, 8, 4), np.uint8)  # a canvas drawn at twice the size is resized to the view
    big[:2, :2] = (0, 0, 0, 255)
    assert tuple(np.asarray(apply_strokes(view, big))[0, 0]) == (0, 0, 0)


def test_erasing_the_object_drops_its_score():
    bundle = vislib.load_model("shapes_resnet")
    image = vislib.load_image(vislib.sample_images()[0])
    view = bundle.input_view(image)
    before = vislib.explain(bundle, view, methods=["gradcam"])
    strokes = np.zeros((view.height, view.width, 4), np.uint8)
    strokes[...] = (128, 128, 128, 255)  # paint everything grey: the evidence is gone
    result = erase_and_watch(bundle, view, strokes, "gradcam")
    after = vislib.explain(bundle, result.edited, methods=["gradcam"], target=int(before.target))
    assert result.target == before.target and result.painted == 1.0
    assert result.probability_drop == pytest.approx(before.probs[before.target] - after.probs[before.target])
    assert result.probability_drop > 0.2
    untouched = erase_and_watch(bundle, view, np.zeros_like(strokes), "gradcam")
    assert untouched.probability_drop == pytest.approx(0.0, abs=1e-6)
