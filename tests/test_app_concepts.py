"""The Concepts panel of the Explain page (AppTest): off by default, then concept colours over the image
with a legend naming each concept's top classes, or the maps alone with the reason on a head that cannot
take a concept vector."""

from __future__ import annotations

from pathlib import Path

import pytest
import streamlit as st
import torch
from helpers import PLAIN, GapNet
from streamlit.testing.v1 import AppTest

import vislib
from vislib import models

APP = str(Path(__file__).resolve().parent.parent / "app.py")
LABELS = ["circle", "square", "triangle", "star"]


@pytest.fixture(scope="module", autouse=True)
def tiny_models():
    threads = torch.get_num_threads()
    nets = {"concepts_gap": (GapNet, dict(channels=6, classes=4)), "concepts_skip": (SkipNet, {})}
    for name, (net, kwargs) in nets.items():
        @models.register_model(name, source="test", description="test model")
        def build(weights, _name=name, _net=net, _kwargs=kwargs):
            torch.manual_seed(0)
            return models.make_bundle(_name, _net(**_kwargs), preprocess=PLAIN, labels=LABELS,
                                      default_layer="features", device=torch.device("cpu"), weights="test")
    yield
    for name in nets:
        models._REGISTRY.pop(name, None)
    torch.set_num_threads(threads)


class SkipNet(torch.nn.Module):
    """A skip connection around the target layer: no head that takes the layer alone."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.ReLU())
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(3, 4)

    def forward(self, x):
        y = self.stem(x)
        return self.fc((self.features(y) + y).mean(dim=(2, 3)))


@pytest.fixture(autouse=True)
def fresh_caches():
    st.cache_data.clear()
    yield


def run_app(model: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update({"model": model, "methods": "gradcam"})
    return at.run()


def legend(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown if "Concept 1" in m.value)


def test_concepts_panel_shows_colours_and_classes():
    at = run_app("concepts_gap")
    assert not at.exception
    assert not legend(at)  # off until asked for: it costs a forward pass and a factorization
    at.toggle(key="concepts_on").set_value(True).run()
    assert not at.exception, [e.value for e in at.exception]
    text = legend(at)
    assert "Concept 5" in text and any(label in text for label in LABELS)
    assert any("5 concepts of features" in c for image in at.image for c in image.captions)
    at.slider(key="concepts_k").set_value(3).run()
    assert "Concept 3" in legend(at) and "Concept 4" not in legend(at)


def test_concepts_panel_without_a_usable_head_shows_the_maps_and_why():
    at = run_app("concepts_skip")
    at.toggle(key="concepts_on").set_value(True).run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Concept 3" in legend(at) and "Concept 4" not in legend(at)  # k ≤ the layer's 3 channels
    assert any("not a function of that layer alone" in i.value for i in at.info)
    assert vislib.list_models()  # the registry is intact
