"""The Learn page under streamlit.testing.v1.AppTest: every section renders, and the numbers it shows are
the ones vislib computes directly (CAM = Z·Grad-CAM, the ReLU rules, the coverage counts, the sanity
check). The bundled models are needed for the full lesson (skipped, with the reason, until installed);
a tiny GAP model checks the page on any model.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
import torch
from helpers import PLAIN, GapNet
from streamlit.testing.v1 import AppTest

import vislib
from vislib import lessons, models
from vislib.data.shapes import make_sample

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
PAGE = "pages/3_Learn.py"
TIMEOUT = 180
SECTION_TITLES = ["1 · Grad-CAM step by step", "2 · CAM and Grad-CAM", "3 · Gradient, Deconvnet, guided backprop",
                  "4 · Several objects: Grad-CAM++ vs Grad-CAM", "5 · Sanity check: randomise the network",
                  "6 · Concepts: what a layer has learned", "7 · When to trust which method",
                  "8 · Two models look differently"]
needs_resnet = pytest.mark.skipif("shapes_resnet" not in vislib.list_models(),
                                  reason="bundled model shapes_resnet not installed (assets/models)")


@pytest.fixture(scope="module", autouse=True)
def tiny_model():
    threads = torch.get_num_threads()  # the app bounds torch's threads for the server process

    @models.register_model("learn_gap", source="test", description="test model")
    def build(weights):
        torch.manual_seed(0)
        return models.make_bundle("learn_gap", GapNet(channels=6, classes=4), preprocess=PLAIN,
                                  labels=["a", "b", "c", "d"], default_layer="features",
                                  device=torch.device("cpu"), weights="test")

    yield
    models._REGISTRY.pop("learn_gap", None)
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_caches():
    st.cache_data.clear()
    yield


def sample_png(index: int = 0) -> bytes:
    buffer = io.BytesIO()
    make_sample("test", index).image.save(buffer, format="PNG")
    return buffer.getvalue()


def open_page(model: str, data: bytes) -> AppTest:
    """Start at the Explain page (it owns the navigation), switch to Learn, upload ``data``."""
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["model"] = model
    at.session_state["source"] = "Upload"
    at.run()
    at.switch_page(PAGE).run()
    at.file_uploader(key="upload").set_value(("shapes.png", data, "image/png")).run()
    return at


def frame(at: AppTest, column: str):
    """The table that has ``column`` (AppTest does not expose a dataframe's key)."""
    return next(df.value for df in at.dataframe if column in df.value.columns)


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_every_section_renders_on_any_model():
    at = open_page("learn_gap", sample_png(1))
    assert not at.exception
    assert [h.value for h in at.header] == SECTION_TITLES
    errors = [e.value for e in at.error]
    if "shapes_zf" in vislib.list_models():  # the only expected message: CAM refused on the ZF head
        assert len(errors) == 1 and "CAM needs a global-average-pool" in errors[0]
    else:
        assert errors == []
    # the shortcut model calls a marked non-star a star, the clean model does not (vislib.lessons' numbers)
    predictions = [m.value for m in at.markdown if m.value.startswith("predicts ")]
    assert len(predictions) == 4 and "**star**" in predictions[3] and "**star**" not in predictions[1]
    relu = frame(at, "Deconvnet passes")
    assert relu["gradient passes"].tolist() == pytest.approx([0.8, -1.2, 0.0, 0.0])
    assert relu["Deconvnet passes"].tolist() == pytest.approx([0.8, 0.0, 0.6, 0.0])
    assert relu["guided backprop passes"].tolist() == pytest.approx([0.8, 0.0, 0.0, 0.0])
    # Teacher interactions: another class, another sanity step, a stricter coverage rule.
    at.selectbox(key="learn_target").set_value(2).run()
    assert any("after 1 re-initialised" in c for image in at.image for c in image.captions)  # the default
    at.slider(key="learn_sanity_step").set_value(3).run()
    assert not at.exception
    assert any("after 3 re-initialised" in c for image in at.image for c in image.captions)


@needs_resnet
def test_numbers_on_the_bundled_models_match_vislib():
    data = sample_png(0)
    at = open_page("shapes_resnet", data)
    assert not at.exception
    assert [h.value for h in at.header] == SECTION_TITLES
    resnet = vislib.load_model("shapes_resnet")
    image = vislib.load_image(data)

    # 1 · the last step is explain()'s Grad-CAM
    assert any('`vislib.explain(…, "gradcam")` gives the same map (largest difference 0)' in m.value
               for m in at.markdown)

    # 2 · CAM = Z·Grad-CAM on the ResNet-style model, from explain() directly (maps after the ReLU,
    # which commutes with the positive factor Z)
    direct = vislib.explain(resnet, image, ["cam", "gradcam"])
    z = int(np.prod(resnet.layers[resnet.default_layer][1:]))
    cam, grad = direct.raw["cam"], direct.raw["gradcam"]
    assert np.abs(z * grad - cam).max() <= 1e-5 * np.abs(cam).max()
    assert float(metric(at, "max |Z·Grad-CAM − CAM|")) <= 1e-5 * np.abs(cam).max()
    table = frame(at, "w_ck (linear layer)")
    w = resnet.model.fc.weight.detach()[int(direct.target)].numpy()
    np.testing.assert_allclose(table["w_ck (linear layer)"], w[table["channel k"]], rtol=1e-6)
    np.testing.assert_allclose(table["Z·α_k"], w[table["channel k"]], rtol=1e-4, atol=1e-7)
    # … and CAM refused on the ZF-style model, with vislib's own message
    if "shapes_zf" in vislib.list_models():
        with pytest.raises(vislib.MethodError) as refused:
            vislib.explain(vislib.load_model("shapes_zf"), image, ["cam"])
        assert [e.value for e in at.error] == [str(refused.value)]
    else:
        assert not at.error
        assert any("shapes_zf) is not installed" in i.value for i in at.info)

    # 4 · coverage counts as computed directly (page defaults: 24 images, mean ≥ 0.5 × max)
    study = lessons.multi_instance_study(resnet, range(24), threshold=0.5, statistic="mean")
    shown = frame(at, "objects covered")
    assert shown["objects covered"].tolist() == [study.covered("gradcam"), study.covered("gradcam++")]
    assert shown["objects"].tolist() == [study.instances] * 2
    assert any(m.value == lessons.coverage_sentence(study, titles=vislib.ui.method_title) for m in at.markdown)
    assert metric(at, "Grad-CAM++: objects covered") == f"{study.share('gradcam++'):.0%}"

    # 6 · the concepts of the bundled ResNet-style model (first tab) as computed directly
    lesson = lessons.concept_lesson(resnet, count=8, k=5)
    assert any(m.value == lesson.sentence() for m in at.markdown)
    np.testing.assert_allclose(frame(at, "map mass on the objects")["map mass on the objects"], lesson.on_object,
                               rtol=1e-6)

    # 5 · the sanity check's numbers as computed directly
    check = lessons.cascading_randomisation(resnet, image, lessons.DEFAULT_SANITY_METHODS)
    sanity = frame(at, "re-initialised")
    assert sanity["re-initialised"].tolist()[1:] == check.units
    for method in lessons.DEFAULT_SANITY_METHODS:
        np.testing.assert_allclose(sanity[f"{method} ρ"], check.series("spearman", method), atol=1e-9)
        np.testing.assert_allclose(sanity[f"{method} SSIM"], check.series("ssim", method), atol=1e-9)


def test_learn_page_is_linked_from_the_navigation():
    text = (ROOT / "pages" / "common" / "__init__.py").read_text()
    assert re.search(r'page_link\("pages/3_Learn\.py"', text)
