"""The dashboard's pure helpers (vislib.ui): URL state, cache keys, view computation with isolated
errors, cancellation, rendering and downloads. Checked against hand computations and direct calls to
vislib.explain, never against snapshots of our own output."""

from __future__ import annotations

import hashlib
import io
import threading

import numpy as np
import pytest
import torch
from helpers import FlatNet, GapNet, assert_untouched, snapshot, tiny_bundle
from PIL import Image

import vislib
from vislib import ui
from vislib.errors import Cancelled, InputError, LayerError, TargetError
from vislib.render import COLORMAPS
from vislib.ui import compute as ui_compute


@pytest.fixture
def image():
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8))


@pytest.fixture
def gap_bundle():
    return tiny_bundle(GapNet(channels=6, classes=4), labels=["a", "b", "c", "d"])


# --------------------------------------------------------------------------------------------------
# Catalogue and layers


def test_methods_grouped_by_family_in_run_order():
    groups = ui.methods_by_family()
    assert sorted(m for names in groups.values() for m in names) == sorted(vislib.METHODS)
    for family, names in groups.items():
        assert all(vislib.METHODS[m].family == family for m in names)
    order = [f for f in ("cam", "backprop", "perturbation") if f in groups]
    assert list(groups)[: len(order)] == order


def test_default_view_is_six_cams_guided_backprop_and_deconvnet():
    everything = ["cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "guided_backprop",
                  "deconvnet", "occlusion"]
    assert ui.default_methods(everything) == everything[:8]
    assert ui.default_methods(["gradcam", "occlusion"]) == ["gradcam"]


def test_display_order_puts_signals_after_maps():
    names = [m for m in ("deconvnet", "gradcam", "occlusion", "guided_backprop", "hirescam") if m in vislib.METHODS]
    ordered = ui.display_order(names)
    families = [vislib.METHODS[m].family for m in ordered]
    assert families == sorted(families, key=ui.DISPLAY_FAMILY_ORDER.index)
    assert [m for m in ordered if vislib.METHODS[m].family == "backprop"] == \
        [m for m in names if vislib.METHODS[m].family == "backprop"]


def test_plan_rows_repeats_only_layer_dependent_methods():
    rows = ui.plan_rows(["gradcam", "guided_backprop", "occlusion", "hirescam"], "l4", ["l3", "l4", "l3"])
    assert rows == [("l4", ["gradcam", "guided_backprop", "occlusion", "hirescam"]),
                    ("l3", ["gradcam", "hirescam"])]
    assert ui.plan_rows(["guided_backprop"], "l4", ["l3"]) == [("l4", ["guided_backprop"])]


def test_forward_order_puts_containers_after_their_children():
    names = ["conv1", "layer1", "layer1.0", "layer1.0.conv", "layer1.1", "layer2", "layer2.0", "fc"]
    assert ui.forward_order(names) == ["conv1", "layer1.0.conv", "layer1.0", "layer1.1", "layer1", "layer2.0",
                                       "layer2", "fc"]


def test_walk_layers_goes_from_input_to_output():
    torch.manual_seed(0)
    bundle = vislib.load_model("resnet18", weights=None, device="cpu")
    walk = ui.walk_layers(bundle)
    assert walk == ["conv1", "relu", "maxpool", "layer1.0", "layer1", "layer2.0", "layer2", "layer3.0", "layer3",
                    "layer4.0", "layer4", "avgpool"]
    every = ui.walk_layers(bundle, everything=True)
    assert sorted(every) == sorted(bundle.layers)
    assert every.index("layer1.0.conv1") < every.index("layer1.0") < every.index("layer1") < every.index("layer2.0")


def test_layer_label():
    assert ui.layer_label("layer4", (512, 7, 7)) == "layer4 · 512×7×7"


# --------------------------------------------------------------------------------------------------
# URL state and cache keys


def test_query_round_trip():
    state = ui.ViewState(model="resnet18", weights="random", layer="layer3", layers=["layer2", "layer1"],
                         target=7, methods=["gradcam", "deconvnet"], score="probability", sample="cat")
    params = ui.to_query(state)
    assert params == {"model": "resnet18", "weights": "random", "layer": "layer3", "layers": "layer2,layer1",
                      "class": "7", "methods": "gradcam,deconvnet", "score": "probability", "sample": "cat"}
    parsed, notes = ui.parse_query(params, models=["resnet18"], methods=["gradcam", "deconvnet"])
    assert parsed == state and notes == []


def test_query_drops_unknown_values_with_a_note():
    params = {"model": "nope", "methods": "gradcam,bogus", "class": "tabby", "score": "softmax",
              "weights": "maybe", "layer": ["a", "b"]}
    parsed, notes = ui.parse_query(params, models=["resnet18"], methods=["gradcam"])
    assert parsed.model is None and parsed.methods == ["gradcam"] and parsed.target is None
    assert parsed.score is None and parsed.weights is None
    assert parsed.layer == "b"  # a repeated key: the last value, as st.query_params does
    assert len(notes) == 3 and any("bogus" in n for n in notes)
    empty, notes = ui.parse_query({}, models=["resnet18"], methods=["gradcam"])
    assert empty == ui.ViewState() and notes == []
    assert ui.to_query(ui.ViewState()) == {}


def test_cache_key_covers_image_bytes_and_every_parameter():
    data = b"\x89PNG fake bytes"
    digest = ui.image_digest(data)
    assert digest == hashlib.sha256(data).hexdigest()
    base = dict(model="m", weights="w", layer="l", layers=[], target=None, score="logit", methods=["gradcam"])
    key = ui.result_key(digest, **base)
    assert key == ui.result_key(digest, **dict(reversed(list(base.items()))))  # order of keywords is free
    assert ui.result_key(ui.image_digest(data + b"!"), **base) != key
    for name, value in [("model", "m2"), ("weights", "random"), ("layer", "l2"), ("layers", ["x"]),
                        ("target", 3), ("score", "probability"), ("methods", ["gradcam", "cam"])]:
        assert ui.result_key(digest, **{**base, name: value}) != key, name


# --------------------------------------------------------------------------------------------------
# Computing a view


def test_compute_view_matches_explain(gap_bundle, image):
    methods = ["gradcam", "hirescam", "guided_backprop"]
    view = ui.compute_view(gap_bundle, image, methods, score="logit")
    direct = vislib.explain(gap_bundle, image, methods)
    row = view.rows[0]
    assert row.layer == "features" and row.methods == methods and not row.errors
    for m in methods:
        np.testing.assert_allclose(row.explanations[m].maps[m], direct.maps[m], atol=1e-6)
    np.testing.assert_allclose(view.probs, direct.probs, atol=1e-6)
    assert view.target == direct.target == int(np.argmax(direct.probs))
    assert view.top_k(2) == [(i, gap_bundle.labels[i], pytest.approx(float(direct.probs[i])))
                             for i in np.argsort(-direct.probs)[:2]]


def test_a_method_that_does_not_fit_only_marks_its_own_panel(image):
    bundle = tiny_bundle(FlatNet())  # flatten + linear head: no GAP, so CAM does not apply
    view = ui.compute_view(bundle, image, ["cam", "gradcam", "hirescam", "deconvnet"])
    row = view.rows[0]
    assert set(row.errors) == {"cam"} and "global-average-pool" in row.errors["cam"]
    direct = vislib.explain(bundle, image, ["gradcam", "hirescam", "deconvnet"])
    for m in ("gradcam", "hirescam", "deconvnet"):
        np.testing.assert_allclose(row.explanations[m].maps[m], direct.maps[m], atol=1e-6)
    panels = ui.panels(view)[0]
    assert [p.method for p in panels] == ["cam", "gradcam", "hirescam", "deconvnet"]
    assert panels[0].error and not panels[1].error and panels[3].signal
    assert [e[1] for e in view.errors] == ["cam"]


def test_an_unexpected_failure_in_one_method_spares_the_others(gap_bundle, image, monkeypatch):
    from vislib.methods import cam

    def broken(self, A, g, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(cam.LayerCAM, "saliency", broken)
    view = ui.compute_view(gap_bundle, image, ["gradcam", "layercam", "deconvnet"])
    assert view.rows[0].errors == {"layercam": "unexpected error (RuntimeError: boom)"}
    assert set(view.rows[0].explanations) == {"gradcam", "deconvnet"}


def test_cam_that_cannot_apply_is_computed_alone(gap_bundle, image, monkeypatch):
    flat = tiny_bundle(FlatNet())
    assert ui.cam_head_possible(gap_bundle, "features") and not ui.cam_head_possible(gap_bundle, "features.0")
    assert not ui.cam_head_possible(flat, "features")
    assert ui.split_doomed(flat, ["cam", "gradcam", "deconvnet"], "features") == [["gradcam", "deconvnet"], ["cam"]]
    assert ui.split_doomed(gap_bundle, ["cam", "gradcam"], "features") == [["cam", "gradcam"]]
    calls = []
    real = ui_compute.explain  # compute_view looks ``explain`` up in its own module
    monkeypatch.setattr(ui_compute, "explain", lambda *a, **k: calls.append(list(a[2])) or real(*a, **k))
    view = ui.compute_view(flat, image, ["cam", "gradcam", "deconvnet"])
    assert calls == [["gradcam", "deconvnet"], ["cam"]]  # no retry of the shared passes
    assert set(view.rows[0].errors) == {"cam"} and view.rows[0].methods == ["cam", "gradcam", "deconvnet"]


def test_extra_layer_rows_and_a_layer_that_does_not_fit_cam(gap_bundle, image):
    # features.0 has 8 channels but the linear head reads 6: CAM cannot apply there, Grad-CAM can.
    view = ui.compute_view(gap_bundle, image, ["cam", "gradcam", "deconvnet"], extra_layers=["features.0"])
    assert [r.layer for r in view.rows] == ["features", "features.0"]
    assert view.rows[0].errors == {} and view.rows[1].methods == ["cam", "gradcam"]
    assert set(view.rows[1].errors) == {"cam"}
    direct = vislib.explain(gap_bundle, image, ["gradcam"], layer="features.0")
    np.testing.assert_allclose(view.rows[1].explanations["gradcam"].maps["gradcam"], direct.maps["gradcam"])


def test_every_method_failing_still_gives_the_prediction(image):
    bundle = tiny_bundle(FlatNet(), labels=["x", "y", "z"])
    view = ui.compute_view(bundle, image, ["cam"], target="y")
    assert view.rows[0].errors.keys() == {"cam"} and view.target == 1
    logits = bundle.model(bundle.to_input([bundle.input_view(image)]))
    np.testing.assert_allclose(view.probs, torch.softmax(logits, 1)[0].detach().numpy(), atol=1e-6)


def test_whole_view_errors_raise(gap_bundle, image):
    with pytest.raises(LayerError, match="no layer 'nope'"):
        ui.compute_view(gap_bundle, image, ["gradcam"], layer="nope")
    with pytest.raises(LayerError):
        ui.compute_view(gap_bundle, image, ["gradcam"], extra_layers=["pool2"])
    with pytest.raises(InputError):
        ui.compute_view(gap_bundle, b"not an image", ["gradcam"])
    with pytest.raises(TargetError):
        ui.compute_view(gap_bundle, image, ["gradcam"], target=99)


# --------------------------------------------------------------------------------------------------
# Background job: progress, cancel, model left clean


def test_background_job_reports_progress_and_result():
    seen = threading.Event()

    def work(progress, cancel):
        progress(3, 4, "layer")
        seen.set()
        return 42

    job = ui.BackgroundJob(work).start()
    assert job.wait(10) and seen.is_set()
    assert job.result() == 42 and job.fraction == 0.75 and job.text == "layer: 3/4"


def test_background_job_cancel_stops_vislib_and_leaves_model_clean(gap_bundle, image):
    if "scorecam" not in vislib.METHODS:
        pytest.skip("scorecam is not registered")
    before = snapshot(gap_bundle.model)
    started = threading.Event()
    release = threading.Event()

    def work(progress, cancel):
        def slow(done, total, text):
            progress(done, total, text)
            started.set()
            release.wait(10)  # hold the first progress report until the test has cancelled

        return ui.compute_view(gap_bundle, image, ["scorecam"], options={"scorecam": {"batch_size": 1}},
                               progress=slow, cancel=cancel)

    job = ui.BackgroundJob(work).start()
    assert started.wait(30)
    job.cancel_event.set()
    release.set()
    assert job.cancel(join_timeout=30)
    with pytest.raises(Cancelled):
        job.result()
    assert_untouched(gap_bundle.model, before)


def test_background_job_reraises_errors():
    def work(progress, cancel):
        raise InputError("bad image")

    job = ui.BackgroundJob(work).start()
    job.wait(10)
    with pytest.raises(InputError, match="bad image"):
        job.result()


# --------------------------------------------------------------------------------------------------
# Rendering and downloads


def test_panel_image_is_the_overlay_formula(gap_bundle, image):
    view = ui.compute_view(gap_bundle, image, ["gradcam"])
    row = view.rows[0]
    expl = row.explanations["gradcam"]
    alpha = 0.3
    got = np.asarray(ui.panel_image(row, "gradcam", alpha=alpha, colormap="viridis"), dtype=np.float64)
    base = np.asarray(expl.input_image, dtype=np.float64)
    idx = np.clip(expl.maps["gradcam"] * 255.0 + 0.5, 0, 255).astype(np.uint8)
    expected = (1 - alpha) * base + alpha * COLORMAPS["viridis"][idx].astype(np.float64)
    assert np.abs(got - expected).max() <= 0.5 + 1e-6


def test_signal_views(gap_bundle, image):
    view = ui.compute_view(gap_bundle, image, ["deconvnet"])
    row = view.rows[0]
    raw = row.explanations["deconvnet"].raw["deconvnet"]
    assert ui.is_signal(raw)
    rgb = np.asarray(ui.panel_image(row, "deconvnet", signal_view="signed RGB"), dtype=np.float64)
    scale = np.percentile(np.abs(raw), 99.5)
    expected = (0.5 + 0.5 * np.clip(raw / scale, -1, 1)).transpose(1, 2, 0) * 255
    assert np.abs(rgb - expected).max() <= 0.5 + 1e-3  # zero signal is mid-grey
    magnitude = np.asarray(ui.panel_image(row, "deconvnet", signal_view="magnitude"))
    assert magnitude.shape == (16, 16, 3) and (magnitude[..., 0] == magnitude[..., 1]).all()
    heat = ui.panel_image(row, "deconvnet", signal_view="heatmap", alpha=1.0, colormap="gray")
    maps = row.explanations["deconvnet"].maps["deconvnet"]
    np.testing.assert_allclose(np.asarray(heat)[..., 0], np.round(maps * 255), atol=1)


def test_topk_figure_and_bar_selection():
    top = [(5, "cat", 0.6), (2, "dog", 0.3), (9, "fox", 0.1)]
    fig = ui.topk_figure(top, target=2)
    track, bar = fig.data
    classes = [c for c, _ in bar.customdata]
    assert classes == [9, 2, 5]  # drawn bottom-up: the top class ends up on top
    assert list(bar.x) == [0.1, 0.3, 0.6]
    highlighted = [c for c, col in zip(classes, bar.marker.color, strict=True) if col == "#e4572e"]
    assert highlighted == [2]
    # every class keeps a full-width clickable track, however small its probability
    assert [c for c, _ in track.customdata] == classes and set(track.x) == {fig.layout.xaxis.range[1]}
    assert fig.layout.xaxis.range[1] == pytest.approx(0.75)
    # Streamlit's selection event: points carry customdata (or only their index in the trace)
    assert ui.class_from_selection({"selection": {"points": [{"customdata": 2, "point_index": 1}]}}) == 2
    assert ui.class_from_selection({"selection": {"points": [{"customdata": [9]}]}}) == 9
    assert ui.class_from_selection({"selection": {"points": [{"point_index": 2}]}}, [5, 2, 9]) == 5
    assert ui.class_from_selection({"selection": {"points": []}}) is None
    assert ui.class_from_selection(None) is None


def test_npz_holds_every_map(gap_bundle, image):
    view = ui.compute_view(gap_bundle, image, ["gradcam", "deconvnet"], extra_layers=["features.0"])
    data = np.load(io.BytesIO(ui.maps_npz(view)))
    assert set(data.files) == {"gradcam@features", "deconvnet@features", "gradcam@features.0",
                               "raw/gradcam@features", "raw/deconvnet@features", "raw/gradcam@features.0",
                               "input", "probs", "target"}
    np.testing.assert_array_equal(data["gradcam@features.0"],
                                  view.rows[1].explanations["gradcam"].maps["gradcam"])
    np.testing.assert_array_equal(data["input"], np.asarray(view.input_image))
    assert int(data["target"]) == view.target


def test_colorbar_spans_the_colormap():
    bar = np.asarray(ui.colorbar("turbo", width=256, height=3))
    assert bar.shape == (3, 256, 3)
    np.testing.assert_array_equal(bar[1, 0], COLORMAPS["turbo"][0])
    np.testing.assert_array_equal(bar[1, -1], COLORMAPS["turbo"][255])


def test_small_formatters():
    assert ui.format_seconds(0.0042) == "4.2 ms"
    assert ui.format_seconds(0.25) == "250 ms"
    assert ui.format_seconds(1.5) == "1.50 s"
    assert ui.safe_filename("gradcam++", "layer4", "my photo.jpg") == "gradcam--_layer4_my-photo.jpg"
    assert Image.open(io.BytesIO(ui.generated_sample(64))).size == (64, 64)


def test_flat_notes_give_the_librarys_reason_and_the_layer_to_choose(gap_bundle, image):
    class Dead(GapNet):  # a branch in the graph that the score does not depend on
        def __init__(self):
            super().__init__()
            self.side = torch.nn.Conv2d(6, 4, 1)

        def forward(self, x):
            features = self.features(x)
            return self.fc(self.pool(features).flatten(1)) + 0.0 * self.side(features).sum()

    dead = tiny_bundle(Dead())
    view = ui.compute_view(dead, image, ["gradcam", "deconvnet"], layer="side")
    (line,) = ui.flat_notes(view, dead)
    assert line.startswith("**Flat map** (Grad-CAM at `side`)") and "gradient is zero" in line
    assert line.endswith("Choose the default layer `features` instead, or an earlier one.")
    assert ui.flat_notes(ui.compute_view(gap_bundle, image, ["gradcam"]), gap_bundle) == []


def test_progress_says_the_rate_and_the_time_left_per_layer_row():
    # issue 25 item 10: "layer4: 32/506" gains its rate and time left, measured per layer row
    now = [0.0]
    seen = []
    report = ui.with_time_left(lambda done, total, text: seen.append((done, total, text)), clock=lambda: now[0])
    report(0, 0, "waiting for a free GPU slot")  # a status message passes unchanged
    report(10, 100, "layer4")
    now[0] = 2.0
    report(30, 100, "layer4")  # 20 passes in 2 s: 10/s, 70 left: 7 s
    now[0] = 3.0
    report(5, 50, "layer3 (2/2)")  # another row: its own meter
    assert seen[0] == (0, 0, "waiting for a free GPU slot")
    assert seen[1] == (10, 100, "layer4 passes")  # the rate is not known yet
    assert seen[2] == (30, 100, "layer4 passes at 10/s, 7 s left")
    assert seen[3] == (5, 50, "layer3 (2/2) passes")
