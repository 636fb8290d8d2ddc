"""Detectors and segmenters: tasks on the bundle, the torchvision zoo offline, detect / segment, and the
box / region scores against pytorch-grad-cam's FasterRCNNBoxScoreTarget / SemanticSegmentationTarget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vislib
from vislib.data.scenes import make_scene
from vislib.errors import ModelError, TargetError
from vislib.models import Preprocess, detection_names, lower_thresholds, segmentation_names
from vislib.objects.scores import BoxScores, box_bundle, box_score, region_bundle

# built in the fast set (the fixture below builds fasterrcnn_mobilenet_v3_large_320_fpn); the rest: slow
FAST_ZOO = ("ssdlite320_mobilenet_v3_large", "lraspp_mobilenet_v3_large")
SMALL_SEG = Preprocess(resize=(128, 128), crop=None)


def test_the_zoo_has_all_twelve_detectors_and_the_segmenters():
    assert len(detection_names()) == 12
    assert {"fcn_resnet50", "deeplabv3_resnet50", "lraspp_mobilenet_v3_large"} <= set(segmentation_names())
    assert set(detection_names()) | set(segmentation_names()) <= set(vislib.list_models())


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=() if n in FAST_ZOO else pytest.mark.slow)
    for n in [*detection_names(), *segmentation_names()]
])
def test_every_zoo_model_builds_offline_with_its_task_and_default_layer(name):
    task = "detection" if name in detection_names() else "segmentation"
    bundle = vislib.load_model(name, weights=None, preprocess=SMALL_SEG if task == "segmentation" else None)
    assert bundle.task == task
    assert bundle.default_layer in bundle.layers and bundle.default_reason
    if task == "detection" and "fpn" in name:
        assert ".fpn.layer_blocks." in bundle.default_layer
    if task == "segmentation":
        assert bundle.default_layer.startswith("backbone.")


def test_classifiers_stay_classifiers():
    assert vislib.load_model("shapes_resnet").task == "classification"


@pytest.fixture(scope="module")
def frcnn():
    bundle = vislib.load_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None)
    lower_thresholds(bundle.model)  # a random detector is degenerate: let it return its candidates
    return bundle


def test_detect_gives_boxes_in_view_pixels_and_refuses_other_tasks(frcnn):
    image = make_scene("test", 0).image
    dets = vislib.detect(frcnn, image)
    assert frcnn.task == "detection" and frcnn.default_layer == "backbone.fpn.layer_blocks.0"
    assert len(dets) > 0 and dets.view.size == (320, 320)
    assert (dets.boxes >= 0).all() and (dets.boxes <= 320).all()
    assert list(dets.scores) == sorted(dets.scores, reverse=True)
    with pytest.raises(ModelError, match="not a segmentation model"):
        vislib.segment(frcnn, image)


def test_box_score_is_iou_plus_score_of_the_best_same_label_detection():
    det = {"boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 60, 60]]),
           "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([1, 2, 1])}
    out = box_score(det, torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]]),
                    torch.tensor([2, 1, 1]))
    assert torch.allclose(out, torch.tensor([0.9 + 0.8, 1.0 + 0.9, 0.0]))
    with pytest.raises(TargetError):
        BoxScores([[0, 0, 1, 1]], [1, 2])


def _pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_gradcam_of_a_box_equals_pytorch_grad_cams_box_target(frcnn):
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    image = make_scene("test", 1).image
    dets = vislib.detect(frcnn, image)
    for k in (3,):
        target = vislib.Box(dets.boxes[k], int(dets.labels[k]))
        ours = vislib.explain(frcnn, image, methods=["gradcam"], target=target).maps["gradcam"]
        x, _ = frcnn.prepare([image])
        cam = pgc.GradCAM(frcnn.model, target_layers=[frcnn.model.get_submodule(frcnn.default_layer)])
        theirs = cam(x, targets=[FasterRCNNBoxScoreTarget(labels=[int(dets.labels[k])],
                                                          bounding_boxes=[dets.boxes[k]])])[0]
        assert _pearson(ours, theirs) >= 0.999


def test_region_gradcam_equals_pytorch_grad_cams_segmentation_target():
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    bundle = vislib.load_model("lraspp_mobilenet_v3_large", weights=None, preprocess=SMALL_SEG)
    image = make_scene("test", 2).image
    seg = vislib.segment(bundle, image)
    assert seg.class_map.shape == (128, 128) and seg.logits.shape == (21, 128, 128)
    label = seg.present[0]
    ours = vislib.explain(bundle, image, methods=["gradcam"], target=vislib.Region(label)).maps["gradcam"]

    class Wrapper(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)["out"]

    x, _ = bundle.prepare([image])
    cam = pgc.GradCAM(Wrapper(bundle.model), target_layers=[bundle.model.get_submodule(bundle.default_layer)])
    theirs = cam(x, targets=[SemanticSegmentationTarget(label, seg.mask(label).astype(np.float32))])[0]
    assert _pearson(ours, theirs) >= 0.999


def test_region_and_box_targets_refuse_the_wrong_task_and_bad_masks(frcnn):
    image = make_scene("test", 0).image
    with pytest.raises(TargetError, match="segmentation model"):
        region_bundle(frcnn, image, [1])
    seg = vislib.load_model("lraspp_mobilenet_v3_large", weights=None, preprocess=SMALL_SEG)
    with pytest.raises(TargetError, match="detection model"):
        box_bundle(seg, [[0, 0, 1, 1]], [1])
    with pytest.raises(TargetError, match="128×128"):
        region_bundle(seg, image, [1], [np.ones((5, 5), bool)])
    with pytest.raises(TargetError, match="needs a detection model"):
        vislib.explain(seg, image, target=vislib.Box([0, 0, 5, 5], 1))
    with pytest.raises(TargetError, match="x0 < x1"):
        vislib.Box([5, 0, 1, 5], 1)


def test_boxes_from_one_forward_equal_one_explanation_per_box_and_per_box_normalisation(frcnn):
    from vislib.objects import explain_boxes

    image = make_scene("test", 0).image
    dets = vislib.detect(frcnn, image)
    boxes, labels = dets.boxes[[0, 4]], dets.labels[[0, 4]]
    shared = explain_boxes(frcnn, image, boxes, labels, methods=["gradcam"])
    assert shared.maps["gradcam"].shape == (2, 320, 320)
    one = vislib.explain(box_bundle(frcnn, boxes, labels), image, methods=["gradcam"], target=1)
    assert _pearson(shared.maps["gradcam"][1], one.maps["gradcam"]) >= 0.9999
    normed = explain_boxes(frcnn, image, boxes, labels, normalise_per_box=True).maps["gradcam"]
    for k, (x0, y0, x1, y1) in enumerate(boxes.round().astype(int)):
        outside = np.ones((320, 320), bool)
        outside[max(0, y0):y1, max(0, x0):x1] = False
        assert (normed[k][outside] == 0).all() and normed[k].max() == 1.0
