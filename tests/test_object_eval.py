"""Object sets and their evaluation: COCO / YOLO / PNG-mask readers with clear errors, the error list."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vislib.objects.datasets import AnnotationError, open_object_set
from vislib.objects.evaluate import detection_errors

LABELS = ["__background__", "circle", "square"]


@pytest.fixture
def coco(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png"}],
            "annotations": [{"image_id": 1, "bbox": [2, 3, 10, 5], "category_id": 7}],
            "categories": [{"id": 7, "name": "Square"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, data


def test_coco_boxes_become_corners_and_categories_match_by_name(coco):
    path, _ = coco
    (item,) = open_object_set(str(path), LABELS)
    assert item.boxes.tolist() == [[2, 3, 12, 8]] and item.labels.tolist() == [2]
    assert item.load().size == (40, 30)


@pytest.mark.parametrize("broken, where", [
    ({"bbox": [2, 3, -1, 5]}, "annotations[0] bbox"),
    ({"image_id": 9}, "annotations[0] refers to no image"),
    ({"category_id": 3}, "annotations[0] category_id 3"),
])
def test_malformed_coco_names_the_file_and_the_entry(coco, broken, where):
    path, data = coco
    data["annotations"][0].update(broken)
    path.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=rf"instances\.json: {where}".replace("[", r"\[").replace("]", r"\]")):
        open_object_set(str(path), LABELS)
    path.write_text("{not json")
    with pytest.raises(AnnotationError, match="instances.json: not JSON"):
        open_object_set(str(path), LABELS)


def test_yolo_boxes_and_a_bad_line_names_file_and_line(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.new("RGB", (100, 50)).save(tmp_path / "images" / "x.png")
    (tmp_path / "labels" / "x.txt").write_text("0 0.5 0.5 0.2 0.4\n")
    (item,) = open_object_set(str(tmp_path), LABELS)
    assert np.allclose(item.boxes, [[40, 15, 60, 35]]) and item.labels.tolist() == [1]  # +1: background
    (tmp_path / "labels" / "x.txt").write_text("0 0.5 0.5 0.2 0.4\n1 0.5 oops 0.1 0.1\n")
    with pytest.raises(AnnotationError, match=r"x\.txt:2: expected 'class cx cy w h'"):
        open_object_set(str(tmp_path), LABELS)


def test_png_masks_and_generated_scenes(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "m.jpg")
    Image.fromarray(np.eye(8, dtype=np.uint8) * 2).save(tmp_path / "masks" / "m.png")
    (item,) = open_object_set(str(tmp_path), LABELS)
    assert item.class_map.max() == 2
    Image.new("RGB", (8, 8)).save(tmp_path / "masks" / "m.png")
    with pytest.raises(AnnotationError, match="m.png: a mask must be one channel"):
        open_object_set(str(tmp_path), LABELS)
    scenes = open_object_set("scenes:3", LABELS)
    assert len(scenes) == 3 and scenes[0].labels.min() >= 1 and scenes[0].class_map.shape == (128, 128)


def test_the_error_list_names_each_kind_of_error():
    truth = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60], [80, 80, 90, 90]], np.float32)
    labels = np.array([1, 1, 2, 1])
    preds = np.array([[0, 0, 10, 10],   # correct
                      [20, 20, 30, 30],  # right place, wrong label
                      [50, 50, 56, 60],  # right label, IoU 0.6: correct? no: label 2 is right → correct
                      [100, 0, 110, 10],  # nothing there
                      [80, 80, 95, 95]], np.float32)  # IoU 100/225 = 0.44: misplaced
    errors = detection_errors(preds, np.array([1, 2, 2, 1, 1]), np.array([0.9, 0.8, 0.7, 0.6, 0.5]), truth, labels)
    kinds = sorted(e["kind"] for e in errors)
    assert kinds == ["false positive", "misplaced box", "wrong label"]
    wrong = next(e for e in errors if e["kind"] == "wrong label")
    assert wrong["true_label"] == 1 and wrong["label"] == 2
    missed = detection_errors(preds[:0], np.zeros(0, int), np.zeros(0), truth[:1], labels[:1])
    assert [e["kind"] for e in missed] == ["missed"]
