"""The Explain page beyond one softmax class (AppTest): a probabilities model's chart is its output, a
multi-label model gets one row per label above the threshold, and "why similar?" shows both maps."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import PLAIN, GapNet, assert_clean, registered_models, run_app
from streamlit.testing.v1 import AppTest
from test_app import png_bytes

import vislib
from vislib import models

LABELS = ["circle", "square", "triangle", "star"]


class SoftmaxNet(GapNet):
    def forward(self, x):
        return F.softmax(super().forward(x), dim=1)


def _register(name: str, net_type, **kwargs) -> None:
    @models.register_model(name, source="test", description="test model")
    def build(weights):
        torch.manual_seed(0)
        return models.make_bundle(name, net_type(channels=6, classes=4), preprocess=PLAIN, labels=LABELS,
                                  default_layer="features", device=torch.device("cpu"), weights="test", **kwargs)


pytestmark = pytest.mark.usefixtures("fresh_caches")  # tests/conftest.py


@pytest.fixture(scope="module", autouse=True)
def target_models():
    with registered_models({"tiny_probs": lambda: _register("tiny_probs", SoftmaxNet),
                            "tiny_tags": lambda: _register("tiny_tags", GapNet, scores="sigmoid")}):
        yield


def chart_values(at: AppTest) -> list[float]:
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    return spec["data"][1]["x"]  # the bars (the first trace is the clickable track)


def test_a_probabilities_models_chart_is_its_output():
    at = run_app(model="tiny_probs", methods="gradcam")
    assert_clean(at)
    assert any("as given" in c.value for c in at.caption)
    bundle = vislib.load_model("tiny_probs")
    x, _ = bundle.prepare([vislib.load_image(vislib.sample_images()[0])])  # the page's first picture
    with torch.no_grad():
        expected = sorted(bundle.model(x)[0].tolist(), reverse=True)
    values = sorted(chart_values(at), reverse=True)
    assert values == pytest.approx(expected[: len(values)], abs=1e-6)  # never a softmax of probabilities


def test_multilabel_rows_and_why_similar():
    at = run_app(model="tiny_tags", methods="gradcam")
    assert_clean(at)
    assert any("sigmoid" in c.value for c in at.caption)
    assert any(h.value == "Every label above the threshold" for h in at.subheader)
    at.slider(key="label_threshold").set_value(0.05).run()
    assert_clean(at)
    rows = [m.value for m in at.markdown if " · σ = " in m.value]
    assert len(rows) >= 1 and all(any(lab in r for lab in LABELS) for r in rows)
    at.file_uploader(key="similar_upload").set_value(("other.png", png_bytes(5, 16), "image/png")).run()
    assert_clean(at)
    assert any(c.value.startswith("cos = ") and "penultimate" in c.value for c in at.caption)
    sides = [c for image in at.image for c in image.captions if c.startswith("Grad-CAM · ")]
    assert "Grad-CAM · this image" in sides and "Grad-CAM · the second image" in sides
