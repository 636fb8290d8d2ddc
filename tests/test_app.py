"""The dashboard's pages under streamlit.testing.v1.AppTest: upload, pick, see the panels and the chart,
the URL state, caching, and the messages for the errors a user can cause.

Two tiny models are registered for the duration of this module (GAP head and flatten head) so the
pages run in well under a second; they are removed again afterwards.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import APP, PLAIN, TIMEOUT, FlatNet, GapNet, assert_clean, registered_models, run_app
from PIL import Image
from streamlit.testing.v1 import AppTest

import vislib
from vislib import models, ui

ROOT = Path(__file__).resolve().parent.parent
EXPLORER = "pages/1_Layer_explorer.py"
LABELS = ["circle", "square", "triangle", "star"]


def _register(name: str, net_type, **kwargs) -> None:
    @models.register_model(name, source="test", description="test model")
    def build(weights):
        torch.manual_seed(0)
        return models.make_bundle(name, net_type(**kwargs), preprocess=PLAIN, labels=LABELS[: kwargs["classes"]],
                                  default_layer="features", device=torch.device("cpu"), weights="test")


pytestmark = pytest.mark.usefixtures("fresh_caches")  # tests/conftest.py


@pytest.fixture(scope="module", autouse=True)
def tiny_models():
    with registered_models({"tiny_gap": lambda: _register("tiny_gap", GapNet, channels=6, classes=4),
                            "tiny_flat": lambda: _register("tiny_flat", FlatNet, classes=3)}):
        yield


def png_bytes(seed: int = 0, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def captions(at: AppTest) -> list[str]:
    return [c for image in at.image for c in image.captions]


PANEL = re.compile(r"^(.+) · [\d.]+ (ms|s)( · flat map)?$")  # "Grad-CAM · 2.1 ms"


def panel_titles(at: AppTest) -> list[str]:
    return [m.group(1) for m in map(PANEL.match, captions(at)) if m]


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


# --------------------------------------------------------------------------------------------------
# Explain page


def test_default_view_shows_panels_chart_and_downloads():
    at = run_app(model="tiny_gap")
    assert_clean(at)
    expected = [vislib.METHODS[m].title for m in ui.default_methods()]
    assert panel_titles(at) == expected
    assert any(c.startswith("Model input (16×16)") for c in captions(at))
    assert len(at.get("plotly_chart")) == 1
    labels = [b.label for b in at.get("download_button")]
    assert labels.count("PNG") == len(expected) and "All maps (.npz)" in labels
    assert at.selectbox(key="target").value == -1  # the predicted class by default
    assert at.query_params["model"] == "tiny_gap"
    assert at.query_params["methods"] == ",".join(ui.default_methods())
    assert "class" not in at.query_params


def test_upload_pick_methods_and_class():
    at = run_app(model="tiny_gap", methods="gradcam")
    at.segmented_control(key="source").set_value("Upload").run()
    assert_clean(at)
    assert any("Upload an image" in i.value for i in at.info)
    at.file_uploader(key="upload").set_value(("photo.png", png_bytes(3), "image/png")).run()
    assert_clean(at)
    assert any("photo.png" in c for c in captions(at))
    assert panel_titles(at) == ["Grad-CAM"]
    at.pills(key="methods_cam").set_value(["gradcam", "hirescam"]).run()
    assert panel_titles(at) == ["Grad-CAM", "HiResCAM"]
    at.selectbox(key="target").set_value(2).run()
    assert_clean(at)
    assert at.query_params["class"] == "2"
    assert any("**triangle**" in m.value and "class 2" in m.value for m in at.markdown)


def test_camera_photo():
    at = run_app(model="tiny_gap", methods="gradcam")
    at.segmented_control(key="source").set_value("Camera").run()
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(5, size=48))).save(buffer, format="JPEG")
    at.camera_input(key="camera").set_value(("photo.jpg", buffer.getvalue(), "image/jpeg")).run()
    assert_clean(at)
    assert any("camera photo" in c for c in captions(at)) and panel_titles(at) == ["Grad-CAM"]


def test_the_bundled_model_is_the_default():
    at = run_app(methods="gradcam")
    assert_clean(at)
    expected = models.DEFAULT_MODEL if models.DEFAULT_MODEL in vislib.list_models() else "resnet18"
    assert at.selectbox(key="model_pick").value == expected
    assert panel_titles(at) == ["Grad-CAM"]


def test_the_link_reproduces_the_view():
    at = run_app(model="tiny_gap", layer="features.0", **{"class": "1"}, methods="gradcam,layercam",
                 score="probability")
    assert_clean(at)
    assert at.selectbox(key="layer").value == "features.0"
    assert at.selectbox(key="target").value == 1
    assert at.radio(key="score").value == "probability"
    assert panel_titles(at) == ["Grad-CAM", "LayerCAM"]
    assert any("**square**" in m.value and "probability of class 1" in m.value for m in at.markdown)
    assert at.query_params == {"model": "tiny_gap", "weights": "pretrained", "layer": "features.0",
                               "class": "1", "methods": "gradcam,layercam", "score": "probability",
                               "sample": next(iter(ui.sample_choices()))}


def test_opacity_and_colormap_rerender_without_recomputing(monkeypatch):
    calls = []
    real = ui.compute_view

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ui, "compute_view", counting)
    at = run_app(model="tiny_gap", methods="gradcam")
    first = [u for image in at.image for u in image.value]
    at.slider(key="alpha").set_value(0.9).run()
    at.selectbox(key="cmap").set_value("viridis").run()
    assert_clean(at)
    assert len(calls) == 1
    assert [u for image in at.image for u in image.value] != first  # the overlay did change
    at.radio(key="score").set_value("probability").run()
    assert len(calls) == 2  # a parameter of the result does recompute


def test_extra_layer_rows():
    at = run_app(model="tiny_gap", methods="gradcam,deconvnet", layers="features.0")
    assert_clean(at)
    assert panel_titles(at) == ["Grad-CAM", "Deconvnet", "Grad-CAM"]
    assert any("Layer `features.0`" in m.value for m in at.markdown)


# --------------------------------------------------------------------------------------------------
# Errors a user can cause: a short message, never a traceback, the rest of the page keeps working


def test_broken_upload_gives_a_message():
    at = run_app(model="tiny_gap", methods="gradcam")
    at.segmented_control(key="source").set_value("Upload").run()
    at.file_uploader(key="upload").set_value(("broken.png", b"\x89PNG\r\n\x1a\n garbage", "image/png")).run()
    assert_clean(at)
    assert len(at.error) == 1 and "broken.png" in errors(at)[0]
    assert "Traceback" not in errors(at)[0]
    assert len(at.get("plotly_chart")) == 0
    at.segmented_control(key="source").set_value("Sample").run()  # the page keeps working
    assert_clean(at)
    assert not at.error and panel_titles(at) == ["Grad-CAM"]


def test_cam_on_a_head_without_gap_is_shown_disabled_with_the_reason():
    at = run_app(model="tiny_flat", methods="cam,gradcam,hirescam,guided_backprop")
    assert_clean(at)
    assert not at.error  # never an error panel after the fact
    off = at.sidebar.get("button_group")
    disabled = [p for p in off if p.disabled]
    assert len(disabled) == 1 and disabled[0].options == ["CAM"]
    assert any("**CAM**" in c.value and "global-average-pool + linear head" in c.value
               for c in at.sidebar.caption)
    assert panel_titles(at) == ["Grad-CAM", "HiResCAM", "Guided backprop"]
    assert at.query_params["methods"] == "gradcam,hirescam,guided_backprop"
    assert len(at.get("plotly_chart")) == 1


def test_a_layer_that_does_not_fit_the_method():
    # features.0 has 8 channels, the linear head reads 6: CAM does not apply there, Grad-CAM does
    at = run_app(model="tiny_gap", methods="cam,gradcam", layer="features.0")
    assert_clean(at)
    assert not at.error and panel_titles(at) == ["Grad-CAM"]
    assert any("**CAM**" in c.value and "8 channels" in c.value for c in at.sidebar.caption)
    at.selectbox(key="layer").set_value("features").run()  # at the GAP layer CAM is offered again
    assert not [p for p in at.sidebar.get("button_group") if p.disabled]


def test_unknown_layer_in_the_link_falls_back_to_the_default():
    at = run_app(model="tiny_gap", methods="gradcam", layer="nope")
    assert_clean(at)
    assert any("'nope' is not in tiny_gap" in w.value for w in at.warning)
    default = vislib.load_model(at.session_state["model"]).default_layer
    assert at.selectbox(key="layer").value == default and not at.multiselect(key="layers").value


def test_missing_pretrained_weights_offline(monkeypatch):
    monkeypatch.setenv("VISLIB_OFFLINE", "1")
    monkeypatch.setattr(models, "pretrained_available", lambda name: False)
    at = run_app(model="resnet18", weights="pretrained", methods="gradcam")
    assert_clean(at)
    assert len(at.error) == 1 and "pretrained weights for resnet18 are not cached" in errors(at)[0]
    assert any("weights=None" in e or "random" in e for e in errors(at))
    at.radio(key="weights").set_value("random").run()  # random init keeps working
    assert_clean(at)
    assert not at.error and panel_titles(at) == ["Grad-CAM"]


def test_no_method_selected():
    at = run_app(model="tiny_gap", methods="")
    assert_clean(at)
    assert any("at least one method" in i.value for i in at.info)


# --------------------------------------------------------------------------------------------------
# Layer explorer


def test_layer_explorer_walks_the_network():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["model"] = "tiny_gap"
    at.run()
    at.switch_page(EXPLORER).run()
    assert_clean(at)
    walk = ui.walk_layers(vislib.load_model("tiny_gap"))
    assert walk == ["features.0", "features.1", "features.2", "features", "pool"]
    assert at.session_state["walk_layer"] == "features"  # starts at the Explain page's layer
    assert any("channels" in c and "one colour scale" in c for c in captions(at))
    index = walk.index("features")
    at.button(key="walk_prev").click().run()
    assert_clean(at)
    assert at.session_state["walk_layer"] == walk[index - 1]
    at.button(key="walk_next").click().run()
    assert at.session_state["walk_layer"] == "features"


def test_layer_explorer_deconvnet_and_filters_tabs():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["model"] = "tiny_gap"
    at.run()
    at.switch_page(EXPLORER).run()
    at.session_state["explorer_tab"] = "Top-N Deconvnet reconstructions"
    at.run()
    assert_clean(at)
    assert any(c.startswith("channel ") and "field" in c for c in [m.value for m in at.caption])
    pairs = [c for c in captions(at) if c in ("image patch", "projection")]
    assert pairs and pairs[:2] == ["image patch", "projection"]  # issue 25 item 12: the dataset tab's order
    assert pairs == ["image patch", "projection"] * (len(pairs) // 2)
    at.session_state["explorer_tab"] = "First-layer filters"
    at.run()
    assert_clean(at)
    assert any("filters of `features.0`" in c for c in captions(at))


def test_layer_explorer_keeps_the_layer_while_an_upload_is_awaited():
    # issue 25 item 1, the server side (the browser shows the slider: tests/test_e2e_walk.py): the slider is
    # not drawn while there is no image; its layer, the toggle and the tab settings survive that run
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["model"] = "tiny_gap"
    at.run()
    at.switch_page(EXPLORER).run()
    at.select_slider(key="walk_layer").set_value("features.1").run()
    at.toggle(key="walk_all").set_value(True).run()
    at.select_slider(key="fm_count").set_value(16).run()
    at.segmented_control(key="source").set_value("Upload").run()
    assert not at.select_slider  # nothing drawn without an image
    at.file_uploader(key="upload").set_value(("photo.png", png_bytes(4), "image/png")).run()
    assert_clean(at)
    assert at.select_slider(key="walk_layer").value == "features.1" and at.toggle(key="walk_all").value
    assert any(m.value.startswith("#### `features.1`") for m in at.markdown)
    assert at.select_slider(key="fm_count").value == 16


# --------------------------------------------------------------------------------------------------
# What a new user meets (issue 25): reasons on the page, not only in the sidebar


class DeadBranchNet(GapNet):
    """GapNet with a side branch in the graph whose output the score does not depend on (as a ViT's
    patch tokens after its last attention): the class score's gradient is zero there, its maps flat."""

    def __init__(self, channels: int = 6, classes: int = 4):
        super().__init__(channels, classes)
        self.side = torch.nn.Conv2d(channels, 4, 1)

    def forward(self, x):
        features = self.features(x)
        return self.fc(self.pool(features).flatten(1)) + 0.0 * self.side(features).sum()


@pytest.fixture(scope="module")
def odd_models():
    def register(name, net_type, weights_name):
        @models.register_model(name, source="test", description="test model")
        def build(weights):
            torch.manual_seed(0)
            return models.make_bundle(name, net_type(), preprocess=PLAIN, labels=LABELS, default_layer="features",
                                      device=torch.device("cpu"),
                                      weights="random" if weights is None else weights_name)

    register("tiny_dead", DeadBranchNet, "test")
    register("tiny_random", GapNet, "random")
    yield
    for name in ("tiny_dead", "tiny_random"):
        models._REGISTRY.pop(name, None)


def main_text(at: AppTest) -> str:
    return "\n".join(e.value for kind in ("markdown", "caption", "info", "warning") for e in getattr(at.main, kind))


def test_a_flat_map_says_why_and_which_layer_to_choose(odd_models):
    at = run_app(model="tiny_dead", layer="side", methods="gradcam,layercam")
    assert_clean(at)
    assert all(c.endswith("flat map") for c in captions(at) if PANEL.match(c))
    (note,) = [i.value for i in at.main.info if "Flat map" in i.value]
    assert "Grad-CAM, LayerCAM at `side`" in note and "gradient is zero" in note
    assert "Choose the default layer `features`" in note
    at.selectbox(key="layer").set_value("features").run()
    assert not [i for i in at.main.info if "Flat map" in i.value]


def test_methods_that_do_not_apply_are_grey_panels_with_the_reason():
    at = run_app(model="tiny_flat")  # the default view: CAM needs a GAP + linear head, FlatNet has none
    assert_clean(at)
    assert "CAM" not in panel_titles(at) and "cam" not in at.pills(key="methods_cam").options
    assert "**:gray[CAM]** · :gray[does not apply]" in main_text(at)
    assert "CAM needs a global-average-pool + linear head" in main_text(at)


def test_a_chosen_method_comes_back_on_a_layer_where_it_applies():
    # the pattern of issue 25 item 1 on the Explain page: a choice the pills cannot show is kept
    at = run_app(model="tiny_gap", methods="cam,gradcam")
    assert panel_titles(at) == ["CAM", "Grad-CAM"]
    at.selectbox(key="layer").set_value("features.0").run()  # 8 channels, the head reads 6: no CAM
    assert_clean(at)
    assert panel_titles(at) == ["Grad-CAM"] and ":gray[CAM]" in main_text(at)
    at.selectbox(key="layer").set_value("features").run()
    assert panel_titles(at) == ["CAM", "Grad-CAM"] and ":gray[CAM]" not in main_text(at)
    assert at.query_params["methods"] == "cam,gradcam"


def test_random_weights_are_marked_beside_the_class_chart(odd_models):
    at = run_app(model="tiny_random", weights="random", methods="gradcam")
    assert_clean(at)
    assert any("**Random weights**" in w.value for w in at.main.warning)
    at = run_app(model="tiny_gap", methods="gradcam")
    assert not any("Random weights" in w.value for w in at.main.warning)


def test_a_link_naming_an_upload_warns_about_the_model_only():
    # issue 25 item 11: the layer belonged to the refused model; no second warning that follows from it
    at = run_app(model="upload:pets.safetensors", layer="layer4", layers="layer3", methods="gradcam")
    assert_clean(at)
    warnings = [w.value for w in at.warning]
    assert len(warnings) == 1 and "uploaded in another browser session" in warnings[0], warnings
    default = vislib.load_model(at.session_state["model"]).default_layer
    assert at.selectbox(key="layer").value == default and not at.multiselect(key="layers").value


def test_trust_panel_measures_on_demand():
    """"How much can I trust these maps?": nothing runs until the button; then the fast metrics for the
    methods shown, each beside the random map, with a verdict."""
    at = run_app(model="tiny_gap", methods="gradcam,gradient")
    assert_clean(at)
    assert not any("random map" in df.value.columns for df in at.dataframe)  # on demand only
    at.button(key="trust_run").click().run()
    assert_clean(at)
    table = next(df.value for df in at.dataframe if "random map" in df.value.columns)
    assert set(table["method"]) == {ui.method_title("gradcam"), ui.method_title("gradient")}
    assert len(table) == 2 * 7 and (table["95% interval"] == "one image").all()
    assert set(table["verdict"]) <= {"beats the random map", "does not beat the random map", "no value"}
