"""Zeiler & Fergus across a dataset: the top-k index is exact (recomputed from every activation of
every image), each listed unit's projection is its own (one image at a time, with vislib.features),
the fields and patches line up, the folder round-trips, the cache is reused and a stopped build
leaves nothing; the `features` command."""

from __future__ import annotations

import csv
import io
import threading
import zipfile

import numpy as np
import pytest
import torch
from helpers import PLAIN, GapNet
from PIL import Image

import vislib
from vislib import cli, dataset_features, datasets, features, models
from vislib.errors import Cancelled, InputError, LayerError
from vislib.evaluate import to_inputs
from vislib.hooks import capture_layer, resolve_layer

LABELS = ["circle", "square", "triangle", "star"]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VISLIB_CACHE", str(tmp_path_factory.getbasetemp() / "vislib-cache"))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return vislib.load_model(GapNet(channels=6, classes=4), preprocess=PLAIN, labels=LABELS,
                             default_layer="features", device="cpu", name="tiny")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("VISLIB_CACHE", str(tmp_path_factory.getbasetemp() / "vislib-cache"))
    yield datasets.open_dataset("shapes", LABELS, limit=80)
    mp.undo()


def all_activations(bundle, images, layer: str) -> np.ndarray:
    """Every activation of every image: N×C×h×w, one batch, the evaluation's inputs."""
    rows = list(range(len(images)))
    x, _ = to_inputs(bundle, images.load(rows), rows)
    _, module = resolve_layer(bundle, layer)
    with capture_layer(module) as captured, torch.no_grad():
        bundle.logits(x)
    return captured.activation.numpy()


def test_the_listed_activations_are_the_true_maxima(tiny, images):
    """Odd batches (7), k = 5: every listed value is the activation at its (image, y, x), the image's
    own maximum of the channel; per channel the images are distinct and in order, and no image left
    out is stronger than the weakest listed one."""
    index = dataset_features.top_activations(tiny, images, "features", top=5, batch_size=7)
    A = all_activations(tiny, images, "features")
    n, channels, h, w = A.shape
    assert index.shape == (channels, h, w) and len(index) == channels * 5 and index.n_images == n
    per_image = A.reshape(n, channels, -1).max(axis=2)  # N×C
    for c in range(channels):
        rows = index.rows_of(c)
        assert index.rank[rows].tolist() == [1, 2, 3, 4, 5]
        picked = index.index[rows]
        assert len(set(picked.tolist())) == 5
        values = index.activation[rows]
        np.testing.assert_allclose(values, A[picked, c, index.y[rows], index.x[rows]], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(values, per_image[picked, c], rtol=1e-6, atol=1e-6)
        assert np.all(np.diff(values) <= 1e-6)
        others = np.setdiff1d(np.arange(n), picked)
        assert per_image[others, c].max() <= values[-1] + 1e-5  # nobody left out is stronger
        assert [images.ids[i] for i in picked] == [index.image[r] for r in rows]


def test_top_k_merges_parts_exactly_with_ties_by_image():
    """The streaming reduce by hand: two parts, one channel, ties broken by the lower image index."""
    top = dataset_features.TopK(channels=1, k=3)
    top.update({"index": np.array([5, 6, 7]), "failed": np.array(["", "", "bad"], dtype=object),
                "peak": np.array([[2.0], [9.0], [-np.inf]], np.float32), "where": np.array([[1], [2], [-1]])})
    top.update({"index": np.array([1, 2]), "failed": np.array(["", ""], dtype=object),
                "peak": np.array([[2.0], [3.0]], np.float32), "where": np.array([[4], [5]])})
    assert top.image.tolist() == [[6, 2, 1]] and top.value.tolist() == [[9.0, 3.0, 2.0]]
    assert top.where.tolist() == [[2, 5, 4]] and top.failed == {7: "bad"} and top.seen == 4


def test_projections_fields_and_patches_of_the_index(tiny, images, tmp_path):
    """Each listed unit: its receptive field is the one vislib.features finds for that position, its
    patch is the input view under that field, and its projection is the unit's own Deconvnet
    projection computed alone on its image (a batch of one), cropped to the field."""
    index = dataset_features.build_index(tiny, images, tmp_path / "index", "features", top=3, batch_size=16)
    assert (tmp_path / "index" / "meta.json").is_file() and index.folder == tmp_path / "index"
    for channel in (0, 3, 5):
        views = dataset_features.unit_views(index, channel)
        assert [v.rank for v in views] == [1, 2, 3]
        for view in views:
            i = images.ids.index(view.image)
            assert view.box == features.receptive_field(tiny, "features", view.position)
            top, left, bottom, right = view.box
            picture = tiny.input_view(images.image(i))
            assert np.array_equal(np.asarray(view.patch), np.asarray(picture)[top:bottom, left:right])
            x = tiny.to_input([picture])
            alone = features.project_units(tiny, x, "features", [channel], [view.position])[0]
            np.testing.assert_allclose(view.projection, alone[:, top:bottom, left:right], atol=1e-3, rtol=1e-2)
    figure = dataset_features.channel_figure(dataset_features.unit_views(index, 0))
    assert figure.size[0] > figure.size[1] > 0


def test_batched_unit_projections_equal_one_at_a_time_and_top_channels(tiny, images):
    """project_units on a batch = each sample alone; and for an image's strongest channel it is the
    reconstruction that features.top_channels computes (a different code path)."""
    rows = [0, 1, 2, 3]
    x, _ = to_inputs(tiny, images.load(rows), rows)
    channels, positions = [0, 2, 4, 5], [(1, 2), (7, 7), (0, 0), (4, 3)]
    batched = features.project_units(tiny, x, "features", channels, positions)
    for k in range(4):
        alone = features.project_units(tiny, x[k:k + 1], "features", [channels[k]], [positions[k]])[0]
        np.testing.assert_allclose(batched[k], alone, atol=1e-6)
    best = features.top_channels(tiny, x[0], "features", n=1)[0]
    again = features.project_units(tiny, x[:1], "features", [best.channel], [best.position])[0]
    np.testing.assert_allclose(again, best.reconstruction, atol=1e-6)
    with pytest.raises(InputError, match="one channel and one position per sample"):
        features.project_units(tiny, x, "features", [0], [(0, 0)])


def test_index_folder_round_trip_and_the_cache(tiny, images, tmp_path, monkeypatch):
    first = dataset_features.cached_index(tiny, images, "features", top=2, folder=tmp_path)
    loaded = dataset_features.load_index(first.folder)
    for key in ("channel", "rank", "y", "x", "boxes"):
        np.testing.assert_array_equal(getattr(first, key), getattr(loaded, key))
    assert loaded.image == first.image and loaded.strongest_channels() == first.strongest_channels()
    with open(first.folder / "index.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header[:6] == ["channel", "rank", "image", "y", "x", "activation"]

    def never(*args, **kwargs):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(dataset_features, "build_index", never)
    again = dataset_features.cached_index(tiny, images, "features", top=2, folder=tmp_path)
    assert again.folder == first.folder
    with pytest.raises(AssertionError, match="rebuilt"):  # another layer is another index
        dataset_features.cached_index(tiny, images, "features.0", top=2, folder=tmp_path)
    with pytest.raises(LayerError, match="out of range"):
        dataset_features.unit_views(again, 6)


def test_a_stopped_build_leaves_nothing(tiny, images, tmp_path):
    stop = threading.Event()

    def progress(done, total, text):
        stop.set()

    with pytest.raises(Cancelled):
        dataset_features.cached_index(tiny, images, "features", top=2, batch_size=8, folder=tmp_path,
                                      progress=progress, cancel=stop)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_images_are_listed_not_fatal(tiny, tmp_path):
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(buffer, "w") as zf:
        for label in LABELS:
            for i in range(3):
                picture = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(picture, format="PNG")
                zf.writestr(f"{label}/{i}.png", picture.getvalue())
        zf.writestr("star/broken.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    images = datasets.open_dataset(buffer.getvalue(), LABELS, name="mine.zip")
    index = dataset_features.build_index(tiny, images, tmp_path / "i", "features", top=4)
    assert [i for i, _ in index.failed] == ["star/broken.png"]
    assert "star/broken.png" not in index.image and len(index) == 6 * 4


# --------------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def registered():
    name = "tiny_features"

    @models.register_model(name, source="test", description="test model")
    def build(weights):
        torch.manual_seed(0)
        return models.make_bundle(name, GapNet(channels=6, classes=4), preprocess=PLAIN, labels=LABELS,
                                  default_layer="features", device=torch.device("cpu"), weights="test")

    yield name
    models._REGISTRY.pop(name, None)


def test_features_command_writes_the_index_figures_and_parquet(registered, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    code = cli.main(["features", "shapes", "--model", registered, "--limit", "40", "--top", "3", "--figures",
                     "--parquet", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "features [" in captured.err and "images" in captured.err  # the progress bar, on stderr
    with open(out / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 * 3 and {r["rank"] for r in rows} == {"1", "2", "3"}
    assert all(r["image"].startswith("test/") for r in rows)
    table = pq.read_table(out / "index.parquet").to_pydict()
    assert table["image"] == [r["image"] for r in rows]
    np.testing.assert_allclose(table["activation"], [float(r["activation"]) for r in rows], rtol=1e-5)  # CSV: 6 digits
    assert len(list((out / "figures").glob("channel-*.png"))) == 6
    assert "top 3 of 6 channels over" in captured.out


@pytest.mark.parametrize("args, message", [
    (["--top", "0"], "--top must be a positive number"),
    (["--layer", "nosuch"], "nosuch"),
    (["--address", "127.0.0.1:1"], "--address and --workers go with --engine ray"),
])
def test_features_command_bad_input_is_one_line(registered, tmp_path, capsys, args, message):
    assert cli.main(["features", "shapes", "--model", registered, *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
