"""The Ray engine against the local one, on one local Ray for the whole module (vislib's own
loopback start, 2 CPUs): the same rows and aggregates (sorted by image, float tolerance), zip members
read by the workers, unreadable images listed, a worker process killed mid-run, a worker whose model
differs from the driver's, and the dataset-wide top-k of Zeiler & Fergus.

The workers build their models from ``ray_models`` (imported in each worker, as a user's own model
module would be), found through ``PYTHONPATH``, set before the cluster starts.
"""

from __future__ import annotations

import io
import os
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra: .venv/bin/pip install -r requirements-extras.txt")

import ray_procs  # noqa: E402
from PIL import Image  # noqa: E402

import vislib  # noqa: E402
from vislib import dataset_features, datasets, evaluate  # noqa: E402
from vislib.errors import ModelError  # noqa: E402

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("VISLIB_CACHE", str(tmp_path_factory.mktemp("ray-cache")))
    mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    crash = tmp_path_factory.mktemp("crash") / "flag"
    mp.setenv("VISLIB_TEST_CRASH", str(crash))
    mp.setenv("VISLIB_TEST_WORKER_SEED", "7")  # seen by the workers only: other_ray gets other weights
    import ray_models  # noqa: F401  (registers the test models here too)

    from vislib.evaluate.ray_engine import ray_session

    with ray_session(num_cpus=2) as session:
        mp.delenv("VISLIB_TEST_WORKER_SEED")
        assert session["owned"] and session["address"] == "127.0.0.1"
        yield types.SimpleNamespace(crash=crash)
        started = ray_procs.ray_processes()
    mp.undo()
    assert started and not ray_procs.wait_gone(started), "Ray processes outlived the module's cluster"


def bundle(name: str = "tiny_ray"):
    return vislib.load_model(name, device="cpu")


def png(seed: int, size: int = 20) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_same(a: evaluate.EvalResult, b: evaluate.EvalResult) -> None:
    """Rows (sorted by image) and every aggregate equal within float tolerance."""
    assert a.ids == b.ids and np.array_equal(a.index, b.index) and a.failed == b.failed
    np.testing.assert_array_equal(a.targets, b.targets)
    np.testing.assert_allclose(a.probs, b.probs, rtol=1e-5, atol=1e-6)
    assert set(a.metrics) == set(b.metrics)
    for method in a.metrics:
        for key, values in a.metrics[method].items():
            np.testing.assert_allclose(values, b.metrics[method][key], rtol=1e-5, atol=1e-6, equal_nan=True,
                                       err_msg=f"{method} {key}")
    for method in a.peaks:
        np.testing.assert_array_equal(a.peaks[method], b.peaks[method])
    assert set(a.curves) == set(b.curves)
    for method, c in a.curves.items():
        np.testing.assert_allclose(c.deletion, b.curves[method].deletion, atol=1e-6)
        np.testing.assert_allclose(c.insertion, b.curves[method].insertion, atol=1e-6)
    for ra, rb in zip(a.method_table(), b.method_table(), strict=True):
        assert ra["method"] == rb["method"]
        np.testing.assert_allclose([ra[k] for k in evaluate.METRIC_COLUMNS], [rb[k] for k in evaluate.METRIC_COLUMNS],
                                   rtol=1e-5, atol=1e-6, equal_nan=True)
    assert a.accuracy == b.accuracy and np.array_equal(a.confusion()[0], b.confusion()[0])
    for table in (evaluate.image_table, evaluate.image_metrics_table):
        ta, tb = table(a), table(b)
        for column in ta:
            x, y = np.asarray(ta[column]), np.asarray(tb[column])
            if x.dtype.kind == "f":
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, equal_nan=True)
            else:
                np.testing.assert_array_equal(x, y)


def test_ray_rows_and_aggregates_equal_the_local_engine(cluster):
    """Other batch sizes on the two engines, two workers: the same answers, every image once, the
    progress counting up to the number of images."""
    model = bundle()
    images = datasets.open_dataset("shapes", model.labels, limit=96)
    options = dict(methods=["gradcam", "gradcam++"], curves=6, curve_steps=4, explained="true")
    local = evaluate.evaluate(model, images, batch_size=8, **options)
    seen = []
    remote = evaluate.evaluate(model, images, batch_size=12, engine="ray", workers=2,
                               progress=lambda done, total, text: seen.append((done, total)), **options)
    assert remote.engine == "ray (2 workers)" and local.engine == "local"
    assert_same(local, remote)
    counts = [d for d, t in seen if t]
    assert counts == sorted(counts) and counts[-1] == len(images) == len(remote)
    assert remote.timings["ray_init"] == 0.0  # the module's Ray was reused, not started again
    assert len(remote.curves["gradcam"].deletion) == 6


def test_workers_read_zip_members_and_list_unreadable_images(cluster, tmp_path):
    """A zip given as bytes goes once into the object store; the workers read its members, the broken
    one is listed (not fatal) exactly as the local engine lists it; the maps shards are the same."""
    labels = bundle().labels
    members = {f"{c}/{i}.png": png(10 * k + i) for k, c in enumerate(labels) for i in range(5)}
    members["circle/broken.png"] = png(1)[:60]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    images = datasets.open_dataset(buffer.getvalue(), labels, name="upload.zip")
    model = bundle()
    local = evaluate.evaluate(model, images, ["gradcam"], batch_size=6, maps_dir=tmp_path / "local")
    remote = evaluate.evaluate(model, images, ["gradcam"], batch_size=6, engine="ray", workers=2,
                               maps_dir=tmp_path / "ray")
    assert [i for i, _ in remote.failed] == ["circle/broken.png"] and "broken" in remote.failed[0][1]
    assert_same(local, remote)
    a, b = evaluate.read_maps(tmp_path / "local"), evaluate.read_maps(tmp_path / "ray")
    np.testing.assert_array_equal(a["index"], b["index"])
    np.testing.assert_array_equal(a["index"], remote.index)
    np.testing.assert_allclose(a["gradcam"].astype(np.float32), b["gradcam"].astype(np.float32), atol=2e-3)


def test_a_worker_killed_mid_run_still_gives_every_image_exactly_once(cluster):
    """crash_ray's worker process exits (os._exit) on its first batch of the run: Ray restarts the
    actor and retries its batches; the result has every image once, as the local engine's."""
    model = bundle("crash_ray")
    images = datasets.open_dataset("shapes", model.labels, limit=96)
    local = evaluate.evaluate(model, images, ["gradcam"], batch_size=8, confidence=False)
    cluster.crash.write_text("die once")
    remote = evaluate.evaluate(model, images, ["gradcam"], batch_size=8, confidence=False, engine="ray",
                               workers=2)
    assert not cluster.crash.exists()  # a worker process did die
    assert len(set(remote.ids)) == len(remote.ids) == len(images)
    assert_same(local, remote)


def test_a_worker_whose_model_differs_is_refused(cluster):
    """The workers build other_ray with other weights than this process: refused with the reason,
    as a ModelError (not Ray's wrapper), instead of a silently different answer."""
    model = bundle("other_ray")
    images = datasets.open_dataset("shapes", model.labels, limit=16)
    with pytest.raises(ModelError, match="other weights than yours"):
        evaluate.evaluate(model, images, ["gradcam"], engine="ray", workers=1)


def test_features_on_ray_equal_the_local_index(cluster, tmp_path):
    """The top-k index, the receptive fields and the projection shards (written by the workers)."""
    model = bundle()
    images = datasets.open_dataset("shapes", model.labels, limit=64)
    local = dataset_features.build_index(model, images, tmp_path / "local", "features", top=4, batch_size=8)
    remote = dataset_features.build_index(model, images, tmp_path / "ray", "features", top=4, batch_size=8,
                                          engine="ray", workers=2)
    assert remote.engine == "ray (2 workers)"
    for key in ("channel", "rank", "index", "y", "x", "boxes"):
        np.testing.assert_array_equal(getattr(local, key), getattr(remote, key), err_msg=key)
    np.testing.assert_allclose(local.activation, remote.activation, rtol=1e-5)
    for channel in range(model.layers["features"][0]):
        for a, b in zip(dataset_features.unit_views(local, channel), dataset_features.unit_views(remote, channel),
                        strict=True):
            np.testing.assert_allclose(a.projection, b.projection, atol=1e-3)
            assert np.array_equal(np.asarray(a.patch), np.asarray(b.patch))


def test_ray_trust_metrics_equal_the_local_engine(cluster):
    """``evaluate(..., trust=...)``: the trust metrics (ROAD's noise and Faithfulness Correlation's
    subsets seeded by each batch's first image) give the local engine's numbers on two workers."""
    model = bundle()
    images = datasets.open_dataset("shapes", model.labels, limit=24)
    options = dict(methods=["gradcam"], confidence=False, batch_size=8,
                   trust="road_morf,faithfulness_correlation,sparseness,relevance_mass")
    local = evaluate.evaluate(model, images, **options)
    remote = evaluate.evaluate(model, images, engine="ray", workers=2, **options)
    assert_same(local, remote)
    assert {"trust_road_morf", "trust_sparseness"} <= set(remote.metrics["random"])
    assert np.isfinite(remote.metrics["random"]["trust_relevance_mass"]).all()  # 24 images, all measured
    rows = {(r.method, r.metric): r for r in remote.trust_report().rows}
    assert rows["gradcam", "relevance_mass"].images == np.isfinite(remote.metrics["gradcam"]["trust_relevance_mass"]).sum()
