"""Dataset reading (ImageFolder zips and folders, the shapes split), evaluation over a dataset, the
error view, the `evaluate` CLI and its offline HTML report.

Fast tests use tiny analytic models; the tests on the bundled models (pointing game, the shortcut)
run when those models are in assets/models and are skipped otherwise.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import sys
import threading
import zipfile

import numpy as np
import pytest
import torch
from helpers import PLAIN, GapNet
from PIL import Image

import vislib
from vislib import cli, datasets, evaluate, metrics, models
from vislib.errors import Cancelled, InputError

LABELS = ["circle", "square", "triangle", "star"]


@pytest.fixture(autouse=True)
def shapes_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VISLIB_CACHE", str(tmp_path_factory.getbasetemp() / "vislib-cache"))


def png(seed: int = 0, size: int = 20) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_zip(members: dict[str, bytes | None], **kwargs) -> bytes:
    """A zip from path → bytes (None: a directory entry)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", **kwargs) as zf:
        for name, data in members.items():
            if data is None:
                zf.writestr(zipfile.ZipInfo(name.rstrip("/") + "/"), b"")
            else:
                zf.writestr(name, data)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# ImageFolder zips and folders


def test_messy_zip_gives_a_clear_report():
    data = make_zip({
        "export/Circles/a.png": png(1), "export/Circles/b.png": png(2),
        "export/square/deeper/c.png": png(3),  # a subfolder inside a class folder
        "export/03_triangle/d.png": png(4), "export/03_triangle/notes.txt": b"not an image",
        "export/circel/e.png": png(5),  # a typo
        "export/dog/f.png": png(6),
        "export/star/": None,  # empty
        "export/readme.md": b"# hello",
        "export/.DS_Store": b"\0\0", "__MACOSX/export/._a.png": b"junk",
    })
    images = datasets.open_zip(data, LABELS, name="upload.zip")
    report = images.report
    assert report.root == "export/"
    assert {(f, lab) for f, lab, _, _ in report.matched} == {
        ("Circles", "circle"), ("square", "square"), ("03_triangle", "triangle")}
    assert len(images) == report.n_images == 4
    assert sorted(images.ids) == ["export/03_triangle/d.png", "export/Circles/a.png", "export/Circles/b.png",
                                  "export/square/deeper/c.png"]
    assert [LABELS[t] for t in images.targets] == ["triangle", "circle", "circle", "square"]
    assert report.unmatched == [("circel", 1, "circle"), ("dog", 1, None)]
    assert report.empty == ["star"] and report.missing == ["star"]
    assert report.non_images == ["export/03_triangle/notes.txt"]
    assert report.loose == ["export/readme.md"] and report.nested == 1 and report.ignored == 2
    text = "\n".join(report.lines())
    for needle in ("'circel' (1 files; did you mean 'circle'?)", "'dog'", "Empty class folders: 'star'",
                   "not images", "readme.md", "'Circles' → circle (as a plural)", "numeric prefix"):
        assert needle in text
    assert not report.clean and report.summary().startswith("4 images in 3 of the model's 4 classes")
    assert images.image(0).size == (20, 20)


def test_zip_without_wrapper_and_class_indices():
    data = make_zip({"0/a.png": png(1), "2/b.png": png(2)})
    images = datasets.open_zip(data, LABELS)
    assert images.report.root == "" and sorted(images.targets.tolist()) == [0, 2]


def test_a_single_class_folder_is_not_taken_for_a_wrapper():
    images = datasets.open_zip(make_zip({"circle/a.png": png(1), "circle/b.png": png(2)}), LABELS)
    assert images.report.root == "" and images.targets.tolist() == [0, 0]


@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "/etc/passwd", "C:/x.png", "a\\..\\b.png"])
def test_zip_with_unsafe_paths_is_refused(name):
    data = make_zip({"circle/a.png": png(1), name: png(2)})
    with pytest.raises(InputError, match="unsafe path"):
        datasets.open_zip(data, LABELS, name="bad.zip")


def test_zip_bomb_is_refused(monkeypatch):
    # one member that expands 1000×: refused before anything is decompressed
    bomb = make_zip({"circle/a.png": png(1), "circle/b.bmp": bytes(5 * 2**20)}, compression=zipfile.ZIP_DEFLATED)
    assert len(bomb) < 100_000
    with pytest.raises(InputError, match="zip bomb"):
        datasets.open_zip(bomb, LABELS, name="bomb.zip")
    # the total declared size (e.g. many members pointing at the same compressed data) is capped too
    monkeypatch.setattr(datasets, "MAX_TOTAL_BYTES", 1000)
    with pytest.raises(InputError, match="zip bomb"):
        datasets.open_zip(make_zip({f"circle/{i}.png": png(i) for i in range(3)}), LABELS, name="many.zip")
    monkeypatch.setattr(datasets, "MAX_MEMBERS", 2)
    with pytest.raises(InputError, match="members"):
        datasets.open_zip(make_zip({f"circle/{i}.png": png(i) for i in range(3)}), LABELS, name="many.zip")


def test_not_a_zip_and_a_broken_image_inside():
    with pytest.raises(InputError, match="not a readable zip"):
        datasets.open_zip(b"PK\x03\x04 nonsense", LABELS, name="x.zip")
    truncated = png(1)[:60]  # a PNG header, then nothing
    images = datasets.open_zip(make_zip({"circle/a.png": png(1), "circle/b.png": truncated}), LABELS)
    batch = images.load([0, 1])
    assert batch.images[0] is not None and batch.images[1] is None and "broken" in batch.failed[1]


def test_folder_on_disk_never_follows_links(tmp_path):
    root = tmp_path / "data" / "wrapped"
    (root / "square").mkdir(parents=True)
    (root / "circle").mkdir()
    (root / "square" / "a.png").write_bytes(png(1))
    (root / "circle" / "b.png").write_bytes(png(2))
    outside = tmp_path / "secret.png"
    outside.write_bytes(png(3))
    (root / "circle" / "link.png").symlink_to(outside)
    images = datasets.open_folder(tmp_path / "data", LABELS)
    assert images.report.root == "wrapped/"
    assert sorted(images.ids) == ["wrapped/circle/b.png", "wrapped/square/a.png"]
    assert images.report.skipped == [("wrapped/circle/link.png", "symbolic link")]
    with pytest.raises(InputError, match="no such folder or zip"):
        datasets.open_dataset(tmp_path / "nothing", LABELS)


def test_subset_keeps_every_class():
    data = make_zip({f"{c}/{i}.png": png(i) for c in ("circle", "square") for i in range(10)})
    images = datasets.open_dataset(data, LABELS, limit=4)
    assert len(images) == 4 and set(images.targets.tolist()) == {0, 1}


def test_shapes_split_maps_classes_by_name_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("VISLIB_CACHE", str(tmp_path))
    datasets._RENDERED.clear()
    images = datasets.open_dataset("shapes", LABELS, limit=24)
    from vislib.data import shapes

    expected = [i for i in range(24) if shapes.CLASSES[shapes.label_of("test", i)] in LABELS]
    assert images.ids == [f"test/{i:05d}" for i in expected]
    assert [LABELS[t] for t in images.targets] == [shapes.CLASSES[shapes.label_of("test", i)] for i in expected]
    assert {f for f, _, _ in images.report.unmatched} == set(shapes.CLASSES) - set(LABELS)
    sample = shapes.make_sample("test", expected[1])
    assert np.array_equal(np.asarray(images.image(1)), np.asarray(sample.image))
    assert np.array_equal(images.mask(1), sample.mask)
    assert len(list(tmp_path.glob("shapes-test-clean-*-24.npz"))) == 1
    datasets._RENDERED.clear()  # from the cache file now
    again = datasets.open_dataset("shapes", LABELS, limit=10)
    assert np.array_equal(np.asarray(again.image(1)), np.asarray(sample.image))
    datasets._RENDERED.clear()
    datasets.open_dataset("shapes", LABELS, limit=30)  # more images: the smaller file is replaced
    assert [p.name.rsplit("-", 1)[1] for p in tmp_path.glob("shapes-test-clean-*.npz")] == ["30.npz"]
    marked = datasets.open_dataset("shapes+mark", LABELS, limit=4)
    x0, y0, x1, y1 = shapes.MARK_BOX
    assert (np.asarray(marked.image(0))[y0:y1, x0:x1] == np.asarray(shapes.apply_mark(
        shapes.make_sample("test", 0)).image)[y0:y1, x0:x1]).all()


# --------------------------------------------------------------------------------------------------
# Evaluation with a tiny model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return vislib.load_model(GapNet(channels=6, classes=4), preprocess=PLAIN, labels=LABELS,
                             default_layer="features", device="cpu", name="tiny")


@pytest.fixture(scope="module")
def folder_zip():
    return make_zip({f"{c}/{i}.png": png(10 * k + i) for k, c in enumerate(LABELS) for i in range(6)}
                    | {"circle/broken.png": png(1)[:60]})


def test_predictions_confusion_and_error_order_follow_the_model(tiny, folder_zip):
    images = datasets.open_zip(folder_zip, LABELS)
    result = evaluate.evaluate(tiny, images, ["gradcam", "hirescam"], batch_size=5)
    assert len(result) == 24 and result.failed == [("circle/broken.png", result.failed[0][1])]
    # the same predictions as the model on the decoded, preprocessed images
    loaded = [i for i, name in enumerate(images.ids) if name != "circle/broken.png"]
    x = tiny.to_input([tiny.input_view(images.image(i)) for i in loaded])
    with torch.no_grad():
        probs = torch.softmax(tiny.model(x), dim=1).numpy()
    np.testing.assert_allclose(result.probs, probs, atol=1e-5)
    assert result.ids == [images.ids[i] for i in loaded]
    preds, targets = probs.argmax(1), images.targets[loaded]
    assert result.accuracy == pytest.approx(float((preds == targets).mean()))
    matrix, classes = result.confusion()
    for i, t in enumerate(classes):
        for j, p in enumerate(classes):
            assert matrix[i, j] == int(((targets == t) & (preds == p)).sum())
    wrong = result.misclassified()
    assert set(wrong.tolist()) == set(np.flatnonzero(preds != targets).tolist())
    assert np.all(np.diff(result.confidence[wrong]) <= 0)  # most confident first
    for t, (acc, count) in result.per_class_accuracy().items():
        assert acc == pytest.approx(float((preds[targets == t] == t).mean())) and count == (targets == t).sum()
    if len(wrong):
        t, p = int(targets[wrong[0]]), int(preds[wrong[0]])
        cell = result.misclassified(true=t, predicted=p)
        assert wrong[0] in cell and all(targets[cell] == t) and all(preds[cell] == p)


def test_metrics_over_the_shapes_split_equal_the_metric_functions(tiny):
    images = datasets.open_dataset("shapes", LABELS, limit=24)
    result = evaluate.evaluate(tiny, images, ["gradcam"], explained="true", curves=3, curve_steps=8,
                               batch_size=7)
    rows = np.arange(len(images))
    x, masks = evaluate.to_inputs(tiny, images.load(rows), list(rows))
    assert masks.shape == (len(images), 16, 16)  # 128-px masks through the model's 16-px view
    ref = vislib.explain(tiny, x, ["gradcam"], target=images.targets.tolist())
    maps = ref.maps["gradcam"]
    got = result.metrics["gradcam"]
    np.testing.assert_array_equal(got["pointing"], metrics.pointing_hits(maps, masks, result.tolerance))
    np.testing.assert_allclose(got["energy"], metrics.energy_inside(maps, masks))
    y = metrics.target_probabilities(tiny, x, images.targets)
    o = metrics.masked_confidence(tiny, x, maps, images.targets)
    np.testing.assert_allclose(got["y"], y.numpy(), rtol=1e-5)
    np.testing.assert_allclose(got["o"], o.numpy(), rtol=1e-5)
    table = {r["method"]: r for r in result.method_table()}
    assert table["gradcam"]["average_drop"] == pytest.approx(metrics.average_drop(y, o), rel=1e-5)
    assert table["gradcam"]["pointing"] == pytest.approx(metrics.per_class_mean(got["pointing"], result.targets))
    c = metrics.deletion_insertion(tiny, x[:3], maps[:3], images.targets[:3], steps=8)
    np.testing.assert_allclose(result.curves["gradcam"].deletion, c.deletion, atol=1e-6)
    np.testing.assert_allclose(got["deletion_auc"][:3], c.deletion_auc, atol=1e-6)
    assert np.isnan(got["deletion_auc"][3:]).all()
    centre = result.metrics[evaluate.CENTRE]
    np.testing.assert_array_equal(centre["pointing"], metrics.centre_hits(masks, result.tolerance))
    assert result.tolerance == 1  # 15 px at 224, scaled to a 16-px input
    assert set(table) == {"gradcam", "centre"}


def test_error_view_maps_contrast_and_scores(tiny):
    images = datasets.open_dataset("shapes", LABELS, limit=40)
    result = evaluate.evaluate(tiny, images, ["gradcam"], confidence=False)
    row = int(result.misclassified()[0])
    view = evaluate.explain_error(tiny, images, int(result.index[row]), ["gradcam", "cam"], curve_steps=4)
    assert (view.true, view.predicted) == (int(result.targets[row]), int(result.preds[row]))
    x, _ = evaluate.to_inputs(tiny, images.load([result.index[row]]), [0])
    for cls in (view.true, view.predicted):
        alone = vislib.explain(tiny, x[0], ["gradcam", "cam"], target=cls)
        np.testing.assert_allclose(view.maps["gradcam"][cls], alone.maps["gradcam"], atol=1e-6)
    # CAM's raw maps share one activation: the contrast is (M_pred − M_true) / max |M| on one scale
    both = vislib.explain(tiny, x.expand(2, -1, -1, -1), ["cam"], target=[view.predicted, view.true])
    expected = evaluate.contrast_map(both.raw["cam"][0], both.raw["cam"][1], (16, 16))
    np.testing.assert_allclose(view.contrast["cam"], expected, atol=1e-6)
    assert np.abs(view.contrast["cam"]).max() == pytest.approx(1.0)
    assert set(view.scores["gradcam"]) == {view.true, view.predicted}
    assert {"drop_%", "pointing_hit", "energy", "deletion_auc", "insertion_auc"} <= set(view.scores["gradcam"][view.true])
    assert view.top_k(2)[0][0] == view.predicted and view.mask.shape == (16, 16)


def test_contrast_map_by_hand():
    a, b = np.array([[2.0, 0.0], [1.0, 0.0]]), np.array([[0.0, 4.0], [1.0, 0.0]])
    np.testing.assert_allclose(evaluate.contrast_map(a, b, (2, 2)), [[0.5, -1.0], [0.0, 0.0]])
    assert not evaluate.contrast_map(np.zeros((2, 2)), np.zeros((2, 2)), (2, 2)).any()


def test_cancel_stops_between_batches(tiny):
    images = datasets.open_dataset("shapes", LABELS, limit=24)
    stop = threading.Event()
    seen = []

    def progress(done, total, _text):
        seen.append(done)
        stop.set()

    with pytest.raises(Cancelled):
        evaluate.evaluate(tiny, images, ["gradcam"], batch_size=4, progress=progress, cancel=stop)
    assert seen == [4]


def test_reference_box_counts_maps_peaking_on_the_mark(tiny):
    images = datasets.open_dataset("shapes+mark", LABELS, limit=16)
    result = evaluate.evaluate(tiny, images, ["gradcam"], confidence=False)
    mark = evaluate.reference_mask(tiny, images)
    # the 128-px box x, y in [4, 10) seen at 16 px (nearest: source pixel 8i + 4) is pixel (0, 0)
    assert mark.shape == (16, 16) and mark[0, 0] and mark.sum() == 1
    peaks = result.peaks["gradcam"]
    near = metrics.distance_to_mask(peaks, np.broadcast_to(mark, (len(peaks), 16, 16)).copy()) <= result.tolerance
    np.testing.assert_array_equal(result.metrics["gradcam"]["reference"].astype(bool), near)


def test_throughput_reports_both_rates(tiny):
    images = datasets.open_dataset("shapes", LABELS, limit=16)
    speed = evaluate.throughput(tiny, images, batch_size=8, repeats=1)
    assert speed["images"] == len(images) and speed["evaluate_ips"] > 0 and speed["bare_ips"] > 0
    assert speed["overhead"] == pytest.approx(speed["evaluate_s"] / speed["bare_s"] - 1)


def test_shortcut_summary_by_hand():
    """Six images: stars 0-1, others 2-5; the model calls images 1, 2, 3, 4 'star'."""
    labels = ["circle", "star"]
    targets = np.array([1, 1, 0, 0, 0, 0])
    preds = np.array([1, 1, 1, 1, 1, 0])
    probs = np.eye(2, dtype=np.float32)[preds] * 0.8 + 0.1
    on_mark = np.array([0, 1, 1, 1, 0, 0], float)
    result = evaluate.EvalResult(
        model="m", weights="w", layer="l", labels=labels, dataset="shapes test (every image marked)",
        ids=[str(i) for i in range(6)], index=np.arange(6), targets=targets, probs=probs, methods=["gradcam"],
        explained="predicted", metrics={"gradcam": {"reference": on_mark}}, peaks={},
        reference_box=("mark corner", (4, 4, 10, 10)))
    card = {"notes": "SHORTCUT: in training, every 'star' image and no other carries a mark."}
    s = evaluate.shortcut_summary(result, card)
    assert evaluate.shortcut_class(card) == "star" and evaluate.shortcut_class({"notes": "clean"}) is None
    assert s["class"] == "star" and s["class_accuracy"] == 1.0 and s["others_accuracy"] == 0.25
    assert s["called_c"] == pytest.approx(3 / 4) and (s["n_called_c"], s["n_others"]) == (3, 4)
    assert s["on_mark_called_c"] == pytest.approx(2 / 3)  # images 2, 3 of 2, 3, 4
    assert s["on_mark_all"] == pytest.approx(3 / 6) and s["on_mark_errors"] == pytest.approx(2 / 3)
    assert evaluate.shortcut_summary(result)["class"] is None


# --------------------------------------------------------------------------------------------------
# The CLI and the report


@pytest.fixture(scope="module")
def tiny_registered():
    name = "tiny_eval"

    @models.register_model(name, source="test", description="test model")
    def build(weights):
        torch.manual_seed(0)
        return models.make_bundle(name, GapNet(channels=6, classes=4), preprocess=PLAIN, labels=LABELS,
                                  default_layer="features", device=torch.device("cpu"), weights="test")

    yield name
    models._REGISTRY.pop(name, None)


def test_cli_writes_tables_and_an_offline_report(tiny_registered, folder_zip, tmp_path, capsys):
    data = tmp_path / "data.zip"
    data.write_bytes(folder_zip)
    out = tmp_path / "out"
    code = cli.main(["evaluate", str(data), "--model", tiny_registered, "--methods", "gradcam,gradcam++",
                     "--curves", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    for name in ("images.csv", "image_metrics.csv", "methods.csv", "confusion.csv", "misclassified.csv",
                 "report.html", "summary.json"):
        assert (out / name).is_file(), name
    with open(out / "images.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24 and set(rows[0]) == {"id", "true", "predicted", "confidence", "p_true", "correct"}
    with open(out / "image_metrics.csv") as f:
        assert {r["method"] for r in csv.DictReader(f)} == {"gradcam", "gradcam++", "centre"}
    with open(out / "confusion.csv") as f:
        matrix = list(csv.reader(f))
    assert sum(int(v) for row in matrix[1:] for v in row[1:]) == 24
    with open(out / "misclassified.csv") as f:
        wrong = list(csv.DictReader(f))
    assert [float(r["confidence"]) for r in wrong] == sorted((float(r["confidence"]) for r in wrong), reverse=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 24 and len(summary["failed"]) == 1
    assert summary["misclassified"] == len(wrong)
    html = (out / "report.html").read_text()
    assert html.count("<script") == 1 + html.count("Plotly.newPlot")  # plotly.js embedded once
    assert "http://" not in html.split("<body>")[1].replace("http://www.w3.org", "")  # nothing fetched
    assert "src='data:image/png;base64," in html and "Confusion matrix" in html
    assert "circle/broken.png" in html
    err = capsys.readouterr().err
    assert "broken" not in err or "note:" in err


def test_cli_reads_a_folder_on_disk(tiny_registered, tmp_path, capsys):
    for k, c in enumerate(("circle", "square")):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "data" / c / f"{i}.png").write_bytes(png(10 * k + i))
    (tmp_path / "data" / "unicorn").mkdir()
    (tmp_path / "data" / "unicorn" / "u.png").write_bytes(png(99))
    out = tmp_path / "out"
    assert cli.main(["evaluate", str(tmp_path / "data"), "--model", tiny_registered, "--curves", "0",
                     "--gallery", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "note: Folders that match no class of the model, skipped: 'unicorn' (1 files)" in err
    assert json.loads((out / "summary.json").read_text())["images"] == 6


@pytest.mark.parametrize("args, message", [
    (["nowhere"], "no such folder or zip file"),
    (["shapes", "--methods", "nosuch"], "unknown method"),
    (["shapes", "--limit", "0"], "--limit must be a positive number"),
    (["shapes", "--model", "nosuch"], "unknown model"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tiny_registered, tmp_path, capsys, args, message):
    if "--model" not in args:
        args = [*args, "--model", tiny_registered]
    assert cli.main(["evaluate", *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_refuses_a_zip_with_traversal(tiny_registered, tmp_path, capsys):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(make_zip({"circle/a.png": png(1), "../../x.png": png(2)}))
    assert cli.main(["evaluate", str(bad), "--model", tiny_registered, "--out", str(tmp_path / "o")]) == 2
    assert "unsafe path" in capsys.readouterr().err


def test_fast_shapes_inputs_equal_the_preprocessing_path():
    """At the model's own size the shapes arrays are normalised in one vectorised step: the same
    tensor as the input view → to_input path, masks unchanged."""
    from vislib.models import Preprocess

    pre = Preprocess(resize=128, crop=128, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    bundle = vislib.load_model(GapNet(), preprocess=pre, labels=LABELS, default_layer="features", device="cpu")
    images = datasets.open_dataset("shapes", LABELS, limit=12)
    rows = list(range(len(images)))
    batch = images.load(rows)
    fast, masks = evaluate.to_inputs(bundle, batch, rows)
    slow = bundle.to_input([bundle.input_view(images.image(i)) for i in rows])
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    assert np.array_equal(masks, batch.masks)


def test_batched_input_views_equal_the_per_image_inverse_normalisation(tiny):
    """vislib.explain builds the views of a tensor batch at once (a speed change for evaluation)."""
    x = torch.randn(5, 3, 16, 16)
    views = vislib.explain(tiny, x, ["gradcam"]).input_image
    for i in range(5):
        assert np.array_equal(np.asarray(views[i]), np.asarray(tiny.preprocess.unnormalize(x[i])))


# --------------------------------------------------------------------------------------------------
# The bundled models (skipped until they are in assets/models)

RESNET, SHORTCUT = "shapes_resnet", "shapes_shortcut"


def bundled(name: str):
    return pytest.mark.skipif(name not in vislib.list_models(), reason=f"{name} is not bundled yet")


@bundled(RESNET)
def test_gradcam_pointing_game_on_the_shapes_test_split():
    """Grad-CAM of the true class on the whole test split: pointing game at least 0.9 (mean per class,
    9-px tolerance at 128 px), clearly above the image-centre baseline; its energy too."""
    bundle = vislib.load_model(RESNET, device="cpu")
    images = datasets.open_dataset("shapes", bundle.labels)
    result = evaluate.evaluate(bundle, images, ["gradcam"], explained="true", confidence=False)
    table = {r["method"]: r for r in result.method_table()}
    gradcam, centre = table["gradcam"], table[evaluate.CENTRE]
    print(f"pointing game {gradcam['pointing']:.3f} (centre {centre['pointing']:.3f}); energy "
          f"{gradcam['energy']:.3f} (centre {centre['energy']:.3f}); accuracy {result.accuracy:.3f}")
    assert len(result) == 2000
    assert gradcam["pointing"] >= 0.9
    assert gradcam["pointing"] >= centre["pointing"] + 0.3
    assert gradcam["energy"] > centre["energy"]


@bundled(SHORTCUT)
def test_shortcut_model_maps_fall_on_the_mark():
    """The shortcut model saw the mark on every training star and on nothing else. With the mark on
    every test image it calls most other shapes a star, and for most of those its Grad-CAM (for the
    predicted class, star) peaks on the mark's corner; on clean images it does not look there."""
    bundle = vislib.load_model(SHORTCUT, device="cpu")
    star = bundle.labels.index("star")
    assert "SHORTCUT" in bundle.card["notes"] and "'star'" in bundle.card["notes"]
    marked = evaluate.evaluate(bundle, datasets.open_dataset("shapes+mark", bundle.labels, limit=800),
                               ["gradcam"], confidence=False)
    others = marked.targets != star
    confused = np.flatnonzero(others & (marked.preds == star))
    on_mark = marked.reference_share("gradcam", confused)
    clean = evaluate.evaluate(bundle, datasets.open_dataset("shapes", bundle.labels, limit=800), ["gradcam"],
                              confidence=False)
    print(f"marked: {len(confused)} of {others.sum()} non-stars called star, Grad-CAM on the mark for "
          f"{on_mark:.0%} of them; clean: accuracy {clean.accuracy:.3f}, maps on the mark corner "
          f"{clean.reference_share('gradcam'):.0%}")
    assert len(confused) > 0.5 * others.sum()
    assert on_mark > 0.5
    assert clean.reference_share("gradcam") < 0.2


# --------------------------------------------------------------------------------------------------
# Engines, progress, Parquet and map shards (the Ray engine itself: test_ray_engine.py)


def test_the_module_is_callable_and_engines_are_checked(tiny):
    images = datasets.open_dataset("shapes", LABELS, limit=8)
    result = vislib.evaluate(tiny, images, ["gradcam"], confidence=False)
    assert isinstance(result, evaluate.EvalResult) and result.engine == "local" and len(result) == len(images)
    with pytest.raises(evaluate.EngineError, match="engine must be one of local, ray"):
        evaluate.evaluate(tiny, images, engine="spark")
    with pytest.raises(evaluate.EngineError, match="options of engine='ray'"):
        evaluate.evaluate(tiny, images, address="127.0.0.1:6379")
    with pytest.raises(evaluate.EngineError, match="workers must be a positive number"):
        evaluate.evaluate(tiny, images, engine="ray", workers=0)


def test_without_ray_the_ray_engine_says_how_to_install_it(tiny, monkeypatch, tmp_path, capsys, tiny_registered):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if it were not installed
    images = datasets.open_dataset("shapes", LABELS, limit=8)
    with pytest.raises(evaluate.MissingDependency, match=r'pip install "vislib\[ray\]".*requirements-extras.txt'):
        evaluate.evaluate(tiny, images, engine="ray")
    assert not evaluate.ray_available() or importlib.util.find_spec("ray") is not None
    assert cli.main(["evaluate", "shapes", "--model", tiny_registered, "--engine", "ray", "--out",
                     str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "the Ray engine needs ray" in err and "vislib[ray]" in err and err.count("\n") == 1


def test_a_bare_module_cannot_go_to_ray_workers(tiny):
    pytest.importorskip("ray")
    images = datasets.open_dataset("shapes", LABELS, limit=8)
    with pytest.raises(vislib.ModelError, match="cannot be rebuilt in another process.*spec file"):
        evaluate.evaluate(tiny, images, engine="ray")


def test_rate_meter_and_eta_by_hand():
    now = [100.0]
    meter = evaluate.RateMeter(window=10.0, clock=lambda: now[0])
    meter.update(0, 1000)
    assert meter.rate != meter.rate and meter.text() == "0/1000 images"  # NaN: not known yet
    now[0] += 2.0
    meter.update(100, 1000)
    assert meter.rate == pytest.approx(50.0) and meter.eta == pytest.approx(18.0)
    for _ in range(3):  # 20 images/s from now on: the 10-s window forgets the faster start
        now[0] += 5.0
        meter.update(meter.done + 100, 1000)
    assert meter.rate == pytest.approx(20.0) and meter.eta == pytest.approx(30.0)  # (1000 − 400) / 20
    assert meter.text() == "400/1000 images · 20 images/s · 30 s left"
    assert meter.rate_text() == "images at 20/s, 30 s left"
    meter.update(1000, 1000)
    assert meter.eta == 0.0 and "left" not in meter.text()
    from vislib.evaluate.progress import format_bytes, format_duration

    assert [format_duration(s) for s in (7.4, 125, 3840)] == ["7 s", "2 min 05 s", "1 h 04 min"]
    assert format_bytes(3 * 2**30) == "3.0 GB" and format_bytes(512) == "512 B"


def test_progress_bar_on_a_log_prints_few_lines():
    from vislib.evaluate.progress import StderrBar

    stream = io.StringIO()
    bar = StderrBar("evaluating", stream=stream, every=3600)
    bar(0, 0, "starting Ray")
    for done in range(10, 101, 10):
        bar(done, 100, "images")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "evaluating: starting Ray…"
    assert len(lines) == 3 and lines[1].startswith("evaluating [") and lines[-1].startswith("evaluating [")
    assert "100/100 images" in lines[-1] and "images/s" in lines[-1]


def test_parquet_only_when_asked_and_equal_to_the_csv(tiny_registered, folder_zip, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data.zip"
    data.write_bytes(folder_zip)
    out = tmp_path / "out"
    assert cli.main(["evaluate", str(data), "--model", tiny_registered, "--curves", "0", "--parquet",
                     "--gallery", "0", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "evaluating [" in err  # the bar, on stderr
    pq = pytest.importorskip("pyarrow.parquet")
    for name in ("images", "image_metrics"):
        table = pq.read_table(out / f"{name}.parquet").to_pydict()
        with open(out / f"{name}.csv") as f:
            rows = list(csv.DictReader(f))
        assert list(table) == list(rows[0]) and len(table["id"]) == len(rows)
        for column, values in table.items():
            text = [r[column] for r in rows]
            if isinstance(values[0], float) or column in ("peak_y", "peak_x"):
                as_float = [float(t) if t else np.nan for t in text]
                np.testing.assert_allclose([np.nan if v is None else v for v in values], as_float, rtol=1e-5,
                                           equal_nan=True)
            else:
                assert [str(v) for v in values] == text, column
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "local" and summary["images"] == 24
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    assert cli.main(["evaluate", str(data), "--model", tiny_registered, "--parquet", "--out", str(out)]) == 2
    assert "Parquet output needs pyarrow" in capsys.readouterr().err
    assert cli.main(["evaluate", str(data), "--model", tiny_registered, "--curves", "0", "--gallery", "0",
                     "--out", str(tmp_path / "no-parquet")]) == 0  # without --parquet, pyarrow is not needed


def test_map_shards_hold_every_loaded_image_once(tiny, folder_zip, tmp_path):
    images = datasets.open_zip(folder_zip, LABELS)
    result = evaluate.evaluate(tiny, images, ["gradcam", "hirescam"], batch_size=5, confidence=False,
                               maps_dir=tmp_path / "maps")
    shards = sorted((tmp_path / "maps").glob("maps-*.npz"))
    assert len(shards) == 5  # 25 files in batches of 5, one shard per batch with a loaded image
    maps = evaluate.read_maps(tmp_path / "maps")
    np.testing.assert_array_equal(maps["index"], result.index)
    x = tiny.to_input([tiny.input_view(images.image(int(i))) for i in result.index])
    ref = vislib.explain(tiny, x, ["gradcam", "hirescam"])
    for method in ("gradcam", "hirescam"):
        assert maps[method].dtype == np.float16
        np.testing.assert_allclose(maps[method].astype(np.float32), ref.maps[method], atol=1e-3)
    assert evaluate.map_bytes(50_000, 2, 224) == 50_000 * 2 * 224 * 224 * 2


def test_cli_warns_before_writing_more_than_a_gigabyte_of_maps(tiny_registered, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "map_bytes", lambda n, m, size: 3 * 2**30)
    assert cli.main(["evaluate", "shapes", "--model", tiny_registered, "--limit", "8", "--maps", "--curves", "0",
                     "--gallery", "0", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert err.index("note: the maps take up to 3.0 GB") < err.index("evaluating [")
    assert list((tmp_path / "o" / "maps").glob("maps-*.npz"))


def test_rows_merge_in_any_order_each_image_once(tiny, folder_zip):
    """What the Ray engine hands back (batches in any order, a retried batch twice) merges into the
    same result as the local engine's batches in order."""
    import functools

    from vislib.evaluate.step import EvalConfig, evaluate_rows

    images = datasets.open_zip(folder_zip, LABELS)
    config = EvalConfig(methods=("gradcam",), layer="features", curves=4, curve_steps=4, tolerance=1)
    step = functools.partial(evaluate_rows, config=config)
    parts = [step(tiny, images, np.arange(lo, min(len(images), lo + 6))) for lo in range(0, len(images), 6)]
    meta = dict(ids=images.ids, targets=images.targets, model="tiny", weights="w", layer="features",
                labels=LABELS, dataset="d", methods=["gradcam"], explained="predicted", tolerance=1,
                has_masks=False)
    ordered = evaluate.assemble(parts, **meta)
    shuffled = evaluate.assemble([parts[4], parts[2], parts[0], parts[3], parts[2], parts[1]], **meta)
    assert ordered.ids == shuffled.ids and len(ordered) == 24 and ordered.failed == shuffled.failed
    np.testing.assert_array_equal(ordered.probs, shuffled.probs)
    for key, values in ordered.metrics["gradcam"].items():
        np.testing.assert_array_equal(values, shuffled.metrics["gradcam"][key])
    np.testing.assert_array_equal(ordered.curves["gradcam"].deletion, shuffled.curves["gradcam"].deletion)
    readable = sum(images.ids[i] != "circle/broken.png" for i in range(4))
    assert ordered.curves["gradcam"].deletion.shape == (readable, 5)  # the readable ones of the first four
