"""Compare: Spearman's ρ against scipy and by hand, top-region IoU by hand, and two models on one image."""

from __future__ import annotations

import numpy as np
import pytest

import vislib
from vislib.compare import compare, rank_correlation, top_region, top_region_iou


def test_rank_correlation_by_hand_and_against_scipy():
    a = np.arange(16, dtype=np.float32).reshape(4, 4)
    assert rank_correlation(a, a ** 3) == pytest.approx(1.0)  # monotone: ρ = 1
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    assert np.isnan(rank_correlation(a, np.zeros_like(a)))
    # n = 4, no ties: ρ = 1 − 6 Σd² / (n(n²−1)); ranks (0,1,2,3) vs (1,0,3,2): Σd² = 4 → 0.6
    assert rank_correlation(np.array([1, 2, 3, 4.0]), np.array([2, 1, 4, 3.0])) == pytest.approx(0.6)
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = np.round(rng.random((12, 12)), 1)  # many ties, as in ReLU'd maps
    y = np.round(x + 0.3 * rng.random((12, 12)), 1)
    assert rank_correlation(x, y) == pytest.approx(stats.spearmanr(x.ravel(), y.ravel())[0], abs=1e-12)


def test_top_region_iou_by_hand():
    a = np.zeros((10, 10))
    a[:2] = 1.0  # the top 20% is exactly the first two rows
    b = np.zeros((10, 10))
    b[1:3] = 1.0  # shifted by one row: 10 shared of 30
    assert top_region(a).sum() == 20 and top_region(a)[:2].all()
    assert top_region_iou(a, a) == 1.0
    assert top_region_iou(a, b) == pytest.approx(10 / 30)
    assert top_region_iou(a, b[::-1]) == 0.0


def test_compare_the_bundled_pair():
    image = vislib.load_image(vislib.sample_images()[0])
    result = compare("shapes_resnet", "shapes_shortcut", image, ["gradcam", "cam"], target="circle")
    assert result.left.model == "shapes_resnet" and result.right.model == "shapes_shortcut"
    assert result.left.target_label() == result.right.target_label() == "circle"
    for method in ("gradcam", "cam"):
        agree = result.agreement[method]
        assert -1.0 <= agree.spearman <= 1.0 and 0.0 <= agree.top_iou <= 1.0
    same = compare("shapes_resnet", "shapes_resnet", image, ["gradcam"])
    assert same.same_top1 and same.agreement["gradcam"].top_iou == 1.0
    assert same.agreement["gradcam"].spearman == pytest.approx(1.0)
    assert len(result.summary()) == 3
