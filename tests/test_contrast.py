"""Contrastive targets: explain(..., target=A, contrast=B) explains S_A − S_B ("why A rather than B?")."""

import numpy as np
import pytest
import torch
from helpers import GapNet, assert_untouched, snapshot, tiny_bundle

import vislib


@pytest.fixture
def gap():
    torch.manual_seed(3)
    return tiny_bundle(GapNet(channels=6, classes=4))


@pytest.fixture
def x():
    torch.manual_seed(4)
    return torch.rand(2, 3, 16, 16)


def test_cam_family_on_gap_head_is_the_difference_of_class_rows(gap, x):
    """On GAP + linear, ∂(S_A − S_B)/∂A^k_ij = (W_Ak − W_Bk)/Z, so Grad-CAM and CAM of the contrast
    are ReLU(Σ_k (W_Ak − W_Bk) A^k) up to the factor 1/Z (which min-max removes, not the raw map)."""
    before = snapshot(gap.model)
    result = vislib.explain(gap, x, methods=["cam", "gradcam", "hirescam"], target=[1, 2], contrast=[3, 0])
    assert result.target == [1, 2] and result.contrast == [3, 0]
    A = gap.model.features(x).detach()
    W = gap.model.fc.weight.detach()
    diff = W[[1, 2]] - W[[3, 0]]
    expected = torch.relu(torch.einsum("nc,nchw->nhw", diff, A)).numpy()
    Z = A.shape[2] * A.shape[3]
    np.testing.assert_allclose(result.raw["cam"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.raw["gradcam"], expected / Z, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.raw["hirescam"], expected / Z, rtol=1e-5, atol=1e-7)
    assert_untouched(gap.model, before)


@pytest.mark.parametrize("score", ["logit", "probability"])
def test_input_gradients_are_linear_in_the_score(gap, x, score):
    """∂(S_A − S_B)/∂x = ∂S_A/∂x − ∂S_B/∂x, for the gradient, Input × Gradient and Integrated
    Gradients (same path)."""
    methods = ["gradient", "input_x_gradient", "integrated_gradients"]
    opts = {"integrated_gradients": {"steps": 8}}
    a = vislib.explain(gap, x, methods, target=1, score=score, options=opts)
    b = vislib.explain(gap, x, methods, target=2, score=score, options=opts)
    ab = vislib.explain(gap, x, methods, target=1, contrast=2, score=score, options=opts)
    for m in methods:
        np.testing.assert_allclose(ab.raw[m], a.raw[m] - b.raw[m], rtol=1e-4, atol=1e-6)
    gaps = ab.extras["integrated_gradients"]
    np.testing.assert_allclose(gaps["sum_attributions"], gaps["score_difference"], rtol=0.05, atol=1e-3)


def test_contrast_by_label_and_the_same_class_gives_flat_maps(gap, x):
    labels = gap.labels
    result = vislib.explain(gap, x[0], ["gradcam", "gradient"], target=labels[1], contrast=labels[1])
    assert result.contrast == 1
    assert result.flat["gradcam"] and result.flat["gradient"]


def test_contrast_refused_for_perturbation_methods_and_unknown_classes(gap, x):
    with pytest.raises(vislib.MethodError, match="gradient-based"):
        vislib.explain(gap, x, ["gradcam", "occlusion"], contrast=0)
    with pytest.raises(vislib.TargetError):
        vislib.explain(gap, x, ["gradcam"], contrast="no such class")
