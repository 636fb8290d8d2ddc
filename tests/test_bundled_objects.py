"""The bundled detector and segmenter on generated test scenes: the accuracy their cards promise
(mAP@0.5 ≥ 0.8, mIoU ≥ 0.8, measured by torchmetrics) and their size."""

from __future__ import annotations

import pytest
import torch

import vislib
from vislib.data.scenes import materialise_scenes
from vislib.models import MODELS_DIR

pytest.importorskip("torchmetrics")
SCENES = (0, 100)  # the card's subset is the first 200 test scenes; CI checks the first 100


@pytest.fixture(scope="module")
def scenes():
    return materialise_scenes("test", *SCENES)


@pytest.mark.parametrize("name", ["shapes_det", "shapes_seg"])
def test_bundled_object_models_are_small_and_know_their_task(name):
    assert (MODELS_DIR / f"{name}.safetensors").stat().st_size < 10 * 2**20
    bundle = vislib.load_model(name)
    assert bundle.task == ("detection" if name == "shapes_det" else "segmentation")
    assert bundle.card["metrics"]["subset"]["stop"] == 200


def test_shapes_det_map50_on_test_scenes(scenes):
    from vislib.data.train_objects import detection_metrics

    bundle = vislib.load_model("shapes_det", device="cpu")
    images, _, targets = scenes
    metrics = detection_metrics(bundle.model, images, targets, lambda x: x.float() / 255)
    assert metrics["map_50"] >= 0.8


def test_shapes_seg_miou_on_test_scenes(scenes):
    from vislib.data.train_objects import segmentation_metrics

    bundle = vislib.load_model("shapes_seg", device="cpu")
    images, maps, _ = scenes
    pre = bundle.preprocess
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    metrics = segmentation_metrics(bundle.model, images, maps, lambda x: (x.float() / 255 - mean) / std)
    assert metrics["miou"] >= 0.8


def test_detect_on_the_bundled_detector_finds_the_scene_objects():
    from vislib.data.scenes import make_scene
    from vislib.objects.evaluate import detection_errors

    scene = make_scene("test", 5)
    big = scene.image.resize((256, 256))  # the view is 128×128: boxes come back in its pixels
    dets = vislib.detect("shapes_det", big, score_threshold=0.5)
    import numpy as np

    truth = np.asarray(scene.boxes, np.float32)
    errors = detection_errors(dets.boxes, dets.labels, dets.scores, truth, np.asarray(scene.labels) + 1)
    assert not errors, errors


@pytest.mark.parametrize("name, key", [("shapes_det", "map_50"), ("shapes_seg", "miou")])
def test_evaluate_objects_gives_the_metric_and_explained_errors(name, key):
    from vislib.objects.datasets import open_object_set
    from vislib.objects.evaluate import evaluate_objects

    bundle = vislib.load_model(name)
    result = evaluate_objects(bundle, open_object_set("scenes:4", bundle.labels), score_threshold=0.05)
    assert 0 <= result.metrics[key] <= 1 and result.images == 4
    for error in result.errors:
        assert error["kind"] == "missed" or "explanation" in error
