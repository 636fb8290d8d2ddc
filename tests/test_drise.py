"""D-RISE (vislib.methods.perturbation_drise): the masks, the weights, and a detector whose output is
known by construction (its one detection appears only when the pixels inside one box are visible)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import vislib
from vislib.errors import MethodError
from vislib.methods.perturbation_drise import class_vectors, drise_weights, rise_masks
from vislib.models import Preprocess
from vislib.objects.scores import box_bundle

BOX = (40, 16, 72, 48)  # x0, y0, x1, y1 of the box whose pixels decide the detection


class BoxDetector(nn.Module):
    """One detection of label 1 at BOX per image, kept when the mean of BOX's pixels exceeds 0.5 (the
    full image is all ones; a RISE mask keeps about half): its score is that mean."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)  # a layer for the bundle's probe; unused by the score

    def forward(self, x):
        self.conv(x)
        x0, y0, x1, y1 = BOX
        means = x[:, :, y0:y1, x0:x1].mean((1, 2, 3))
        out = []
        for m in means:
            keep = m > 0.5
            out.append({"boxes": torch.tensor([BOX], dtype=torch.float32)[keep.view(1)],
                        "scores": m.view(1)[keep.view(1)], "labels": torch.ones(1, dtype=torch.int64)[keep.view(1)]})
        return out


@pytest.fixture(scope="module")
def fake():
    pre = Preprocess(resize=(96, 96), crop=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return vislib.load_model(BoxDetector(), labels=["__background__", "thing"], preprocess=pre,
                             task="detection", default_layer="conv")


def test_rise_masks_have_the_cell_probability_and_size():
    masks = rise_masks(400, (50, 70), grid=8, p=0.3, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (400, 50, 70) and masks.min() >= 0 and masks.max() <= 1
    assert abs(float(masks.mean()) - 0.3) < 0.03


def test_weights_are_iou_times_cosine():
    det = {"boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 5]]), "scores": torch.tensor([0.9, 0.8]),
           "labels": torch.tensor([1, 2])}
    target = class_vectors(torch.tensor([0.9]), torch.tensor([1]), 3)
    assert torch.allclose(target, torch.tensor([[0.05, 0.9, 0.05]]))
    w = drise_weights(torch.tensor([[0.0, 0, 10, 10]]), target, [det, {**det, "boxes": det["boxes"][:0],
                                                                      "scores": det["scores"][:0],
                                                                      "labels": det["labels"][:0]}], 3)
    assert torch.allclose(w, torch.tensor([[1.0], [0.0]]))  # same box, same vector: 1; nothing detected: 0


def test_drise_puts_its_mass_in_the_box_that_decides_the_detection(fake):
    image = np.full((96, 96, 3), 255, np.uint8)
    dets = vislib.detect(fake, image)
    assert len(dets) == 1 and dets.boxes[0].tolist() == list(BOX)
    view = box_bundle(fake, dets.boxes, dets.labels)
    result = vislib.explain(view, image, methods=["drise"], target=0,
                            options={"drise": {"masks": 600, "grid": 8, "batch_size": 64}})
    sal = result.raw["drise"]
    x0, y0, x1, y1 = BOX
    inside = np.zeros_like(sal, bool)
    inside[y0:y1, x0:x1] = True
    # Σ w_i M_i / (N p) = E[w] where the masks are independent of w (farther than one mask cell,
    # 96/8 = 12 px, from the box: nearer pixels share cells with it), more inside the box
    near = np.zeros_like(inside)
    near[max(0, y0 - 12):y1 + 12, max(0, x0 - 12):x1 + 12] = True
    centred = np.clip(sal - np.median(sal[~near]), 0, None)
    assert centred[near].sum() / centred.sum() > 0.75  # a map blind to the box: 0.34 (the area share)
    assert centred[inside].mean() > 4 * centred[near & ~inside].mean() > 0
    peak = np.unravel_index(np.argmax(sal), sal.shape)
    assert inside[peak]
    assert result.extras["drise"]["forwards"] == 600


def test_drise_refuses_classifiers_and_explains_the_class_on_a_plain_detection_bundle(fake):
    with pytest.raises(MethodError, match="drise serves detection"):
        vislib.explain("shapes_resnet", np.zeros((32, 32, 3), np.uint8), methods=["drise"])
    image = np.full((96, 96, 3), 255, np.uint8)
    result = vislib.explain(fake, image, methods=["drise"], target=1, options={"drise": {"masks": 64}})
    assert result.raw["drise"].shape == (96, 96)
    with pytest.raises(MethodError, match="detects no"):
        vislib.explain(fake, np.zeros((96, 96, 3), np.uint8), methods=["drise"], target=1,
                       options={"drise": {"masks": 8}})
