"""vislib.metrics checked against hand computations, closed forms and analytic tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vislib import metrics

# --------------------------------------------------------------------------------------------------
# Similarity: Spearman and SSIM


def test_rankdata_averages_ties():
    assert metrics.rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert metrics.rankdata([3, 3, 3]).tolist() == [2.0, 2.0, 2.0]


def test_spearman_monotone_reversed_and_hand_case():
    a = np.arange(12.0).reshape(3, 4)
    assert metrics.spearman(a, np.exp(a)) == pytest.approx(1.0)
    assert metrics.spearman(a, -a**3) == pytest.approx(-1.0)
    # by hand: ranks x = 1,2,3,4,5 and y = 2,1,4,3,5 → Σd² = 4, ρ = 1 − 6·4/(5·24) = 0.8
    assert metrics.spearman([1, 2, 3, 4, 5], [20, 10, 40, 30, 50]) == pytest.approx(0.8)
    # ties: ranks y = 1.5,1.5,3 against x = 1,2,3 → Pearson of the ranks = √3/2
    assert metrics.spearman([1, 2, 3], [7, 7, 9]) == pytest.approx(math.sqrt(3) / 2)
    # absolute value variant: signs do not matter
    assert metrics.spearman([-3, 1, 2], [3, 1, 2], absolute=True) == pytest.approx(1.0)
    assert math.isnan(metrics.spearman([1, 1, 1], [1, 2, 3]))


def test_spearman_agrees_with_scipy_on_random_maps():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 6, (8, 8)), rng.normal(size=(8, 8))
    assert metrics.spearman(a, b) == pytest.approx(stats.spearmanr(a.ravel(), b.ravel())[0], abs=1e-12)


def test_ssim_identity_constants_and_symmetry():
    rng = np.random.default_rng(1)
    a = rng.uniform(size=(20, 20))
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    b = rng.uniform(size=(20, 20))
    assert metrics.ssim(a, b) == pytest.approx(metrics.ssim(b, a))
    assert metrics.ssim(a, b) < 0.2
    # two constant maps c, d: no variance, so SSIM = (2cd + C1)/(c² + d² + C1), C1 = (0.01·L)²
    c, d, L = 0.2, 0.6, 1.0
    c1 = (0.01 * L) ** 2
    expected = (2 * c * d + c1) / (c * c + d * d + c1)
    assert metrics.ssim(np.full((16, 16), c), np.full((16, 16), d), data_range=L) == pytest.approx(expected)
    # an affine brightening keeps the structure term at 1: only luminance/contrast terms drop
    assert 0.5 < metrics.ssim(a, 0.5 * a + 0.25, data_range=1.0) < 1.0


def test_ssim_of_a_single_window_by_hand():
    """An 11×11 map is one window: SSIM is the formula on Gaussian-weighted moments."""
    rng = np.random.default_rng(2)
    x, y = rng.uniform(size=(11, 11)), rng.uniform(size=(11, 11))
    t = np.arange(11) - 5.0
    g = np.exp(-t**2 / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * x * x).sum() - mx**2, (w * y * y).sum() - my**2
    cxy = (w * x * y).sum() - mx * my
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert metrics.ssim(x, y, data_range=1.0) == pytest.approx(expected, rel=1e-9)


def test_similarity_accepts_tensors():
    a = torch.rand(12, 12)
    assert metrics.spearman(a, a * 2) == pytest.approx(1.0)
    assert metrics.ssim(a, a) == pytest.approx(1.0)
