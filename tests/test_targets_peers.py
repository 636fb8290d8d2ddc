"""Targets against pytorch-grad-cam's (grad-cam 1.5.7, requirements-bench.txt): Label against its
BinaryClassifierOutputTarget and ClassifierOutputTarget on a multi-label head, Similarity against the
SimilarityToConceptTarget of its embeddings tutorial (written out below: its package does not ship it).
Grad-CAM maps at a layer with the input's resolution (no resizing convention in between), r ≥ 0.999."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import PLAIN
from torch import nn

import vislib

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam import GradCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import (  # noqa: E402
    BinaryClassifierOutputTarget,
    ClassifierOutputTarget,
)

R_MIN = 0.999


class SimilarityToConceptTarget:
    """pytorch-grad-cam's tutorial target (Pixel Attribution for embeddings): cosine similarity of a
    sample's embedding to a concept's."""

    def __init__(self, features):
        self.features = features

    def __call__(self, model_output):
        return torch.nn.CosineSimilarity(dim=0)(model_output, self.features)


class KeepRes(nn.Module):
    """conv → ReLU → conv → ReLU (``features``, full resolution) → GAP → linear head."""

    def __init__(self, outputs: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1),
                                      nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, outputs)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def bundle_of(net: nn.Module, **kw):
    return vislib.load_model(net, preprocess=PLAIN, default_layer="features", device="cpu", **kw)


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(2)
    return torch.rand(2, 3, 16, 16) * 2 - 0.5


def peer_maps(model: nn.Module, layer: nn.Module, x: torch.Tensor, targets) -> np.ndarray:
    with GradCAM(model=model, target_layers=[layer]) as cam:
        return cam(input_tensor=x, targets=targets)


def test_label_agrees_with_the_binary_and_class_targets(x):
    torch.manual_seed(0)
    binary = KeepRes(1).eval()
    ours = vislib.explain(bundle_of(binary, scores="sigmoid"), x, ["gradcam"], target=vislib.Label(0))
    theirs = peer_maps(binary, binary.features, x, [BinaryClassifierOutputTarget(1)] * 2)
    for i in range(2):
        assert pearson(ours.maps["gradcam"][i], theirs[i]) >= R_MIN
    tags = KeepRes(5).eval()
    ours = vislib.explain(bundle_of(tags, scores="sigmoid"), x, ["gradcam"], target=vislib.Label(3))
    theirs = peer_maps(tags, tags.features, x, [ClassifierOutputTarget(3)] * 2)
    for i in range(2):
        assert pearson(ours.maps["gradcam"][i], theirs[i]) >= R_MIN


def test_similarity_agrees_with_the_tutorials_concept_target(x):
    torch.manual_seed(1)
    net = KeepRes(4).eval()
    reference = torch.rand(3, 16, 16)
    ours = vislib.explain(bundle_of(net), x, ["gradcam"], target=vislib.Similarity(reference))
    embedding = nn.Sequential(net.features, net.pool, nn.Flatten()).eval()
    with torch.no_grad():
        concept = embedding(reference[None])[0]
    theirs = peer_maps(embedding, net.features, x, [SimilarityToConceptTarget(concept)] * 2)
    for i in range(2):
        assert pearson(ours.maps["gradcam"][i], theirs[i]) >= R_MIN
