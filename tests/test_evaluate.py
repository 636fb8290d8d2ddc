"""Dataset reading (ImageFolder zips and folders, the shapes split), evaluation over a dataset, the
error view, the `evaluate` CLI and its offline HTML report.

Fast tests use tiny analytic models; the tests on the bundled models (pointing game, the shortcut)
run when those models are in assets/models and are skipped otherwise.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from vislib import datasets
from vislib.errors import InputError

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
    assert {f for f, _, _ in images.report.unmatched} == {"cross", "ring", "crescent", "hexagon"}
    sample = shapes.make_sample("test", expected[1])
    assert np.array_equal(np.asarray(images.image(1)), np.asarray(sample.image))
    assert np.array_equal(images.mask(1), sample.mask)
    assert len(list(tmp_path.glob("shapes-test-clean-*-24.npz"))) == 1
    datasets._RENDERED.clear()  # from the cache file now
    again = datasets.open_dataset("shapes", LABELS, limit=10)
    assert np.array_equal(np.asarray(again.image(1)), np.asarray(sample.image))
    marked = datasets.open_dataset("shapes+mark", LABELS, limit=4)
    x0, y0, x1, y1 = shapes.MARK_BOX
    assert (np.asarray(marked.image(0))[y0:y1, x0:x1] == np.asarray(shapes.apply_mark(
        shapes.make_sample("test", 0)).image)[y0:y1, x0:x1]).all()
