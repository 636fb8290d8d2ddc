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


# --------------------------------------------------------------------------------------------------
# Average Drop % and % Increase in Confidence


def test_average_drop_and_increase_by_hand():
    y, o = [0.8, 0.5, 0.4], [0.4, 0.6, 0.4]
    # drops: 0.4/0.8 = 0.5, 0 (an increase), 0 → mean 1/6; increases: 1 of 3
    assert metrics.average_drop(y, o) == pytest.approx(100 / 6)
    assert metrics.increase_in_confidence(y, o) == pytest.approx(100 / 3)
    assert metrics.average_drop(y, y) == 0.0 and metrics.increase_in_confidence(y, y) == 0.0


# --------------------------------------------------------------------------------------------------
# An analytic model: logit_0 = a · Σ_R x (all channels), logit_1 = 0, so p_0 = sigmoid(a · Σ_R x)


class RegionNet(torch.nn.Module):
    def __init__(self, region: np.ndarray, a: float = 0.05):
        super().__init__()
        self.register_buffer("region", torch.as_tensor(region, dtype=torch.float32))
        self.a = a

    def forward(self, x):
        s = self.a * (x * self.region).sum(dim=(1, 2, 3))
        return torch.stack([s, torch.zeros_like(s)], dim=1)


SIZE = 16
REGION = np.zeros((SIZE, SIZE), bool)
REGION[3:9, 5:12] = True  # 42 object pixels of 256
IMAGE = torch.where(torch.as_tensor(REGION), 1.0, 0.0).expand(3, SIZE, SIZE).clone()
RAMP = np.linspace(0, 0.01, SIZE * SIZE).reshape(SIZE, SIZE)[::-1].copy()  # breaks ties, no ties left
PERFECT = REGION + RAMP
INVERTED = (~REGION) + RAMP


def sigmoid(v):
    return 1 / (1 + np.exp(-v))


def expected_curves(saliency: np.ndarray, steps: int, blurred: np.ndarray, a: float = 0.05):
    """The two curves of RegionNet, computed pixel by pixel from the definition."""
    order = np.argsort(-saliency.ravel(), kind="stable")
    x = IMAGE.numpy()
    deletion, insertion = [], []
    for k in range(steps + 1):
        n = round(k * SIZE * SIZE / steps)
        chosen = np.zeros(SIZE * SIZE, bool)
        chosen[order[:n]] = True
        chosen = chosen.reshape(SIZE, SIZE)
        deleted = np.where(chosen, 0.0, x)
        inserted = np.where(chosen, x, blurred)
        deletion.append(sigmoid(a * (deleted * REGION).sum()))
        insertion.append(sigmoid(a * (inserted * REGION).sum()))
    return np.array(deletion), np.array(insertion)


def test_gaussian_blur_matches_scipy_with_mirrored_borders():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    ours = metrics.gaussian_blur(x, 11, 5.0)[0].numpy()
    # kernel 11 = radius 5 = truncate 1.0 at σ 5; torch "reflect" = scipy "mirror"
    ref = np.stack([ndimage.gaussian_filter(c.astype(np.float64), 5.0, mode="mirror", truncate=1.0)
                    for c in x[0].numpy()])
    np.testing.assert_allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("saliency", [PERFECT, INVERTED], ids=["perfect", "inverted"])
def test_deletion_insertion_curves_match_the_definition(saliency):
    net = RegionNet(REGION)
    steps = 16
    curves = metrics.deletion_insertion(net, IMAGE[None], torch.as_tensor(saliency.copy())[None], [0],
                                        steps=steps)
    blurred = metrics.gaussian_blur(IMAGE[None])[0].numpy()
    deletion, insertion = expected_curves(saliency, steps, blurred)
    np.testing.assert_allclose(curves.fractions, np.arange(steps + 1) / steps)
    np.testing.assert_allclose(curves.deletion[0], deletion, rtol=1e-5)
    np.testing.assert_allclose(curves.insertion[0], insertion, rtol=1e-5)
    # both ends: the image itself, and the substrates
    assert curves.deletion[0, 0] == pytest.approx(sigmoid(0.05 * 3 * REGION.sum()))
    assert curves.deletion[0, -1] == pytest.approx(0.5)
    assert curves.insertion[0, -1] == pytest.approx(curves.deletion[0, 0])


def test_perfect_map_beats_random_beats_inverted():
    net = RegionNet(REGION)
    rng = np.random.default_rng(0)
    maps = np.stack([PERFECT, rng.uniform(size=(SIZE, SIZE)), INVERTED])
    curves = metrics.deletion_insertion(net, IMAGE[None].expand(3, -1, -1, -1), maps, [0, 0, 0], steps=32)
    d, i = curves.deletion_auc, curves.insertion_auc
    assert d[0] < d[1] < d[2]
    assert i[0] > i[1] > i[2]
    # the perfect map removes the 42 object pixels at 8 per step, all gone by step 6 of 32: the
    # deletion curve is 0.5 from there on and at most p_full before
    p_full = sigmoid(0.05 * 3 * REGION.sum())
    assert 0.5 < d[0] <= 0.5 + 6 / 32 * (p_full - 0.5)


def test_average_drop_of_perfect_and_inverted_maps():
    net = RegionNet(REGION)
    x = IMAGE[None].expand(2, -1, -1, -1)
    maps = np.stack([REGION, ~REGION]).astype(np.float32)
    y = metrics.target_probabilities(net, x, [0, 0])
    o = metrics.masked_confidence(net, x, maps, [0, 0])
    full = sigmoid(0.05 * 3 * REGION.sum())
    np.testing.assert_allclose(y.numpy(), [full, full], rtol=1e-6)
    np.testing.assert_allclose(o.numpy(), [full, 0.5], rtol=1e-6)  # map ⊙ image keeps / drops R
    assert metrics.average_drop(y[:1], o[:1]) == pytest.approx(0.0)
    assert metrics.average_drop(y[1:], o[1:]) == pytest.approx(100 * (full - 0.5) / full)


def test_constant_curve_and_known_aucs():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 4))
    torch.nn.init.zeros_(net[1].weight)
    torch.nn.init.zeros_(net[1].bias)
    curves = metrics.deletion_insertion(net, IMAGE[None], PERFECT[None], [2], steps=8)
    np.testing.assert_allclose(curves.deletion, 0.25, rtol=1e-6)  # a model that ignores the input
    np.testing.assert_allclose(curves.insertion, 0.25, rtol=1e-6)
    assert curves.deletion_auc[0] == pytest.approx(0.25) and curves.insertion_auc[0] == pytest.approx(0.25)
    assert metrics.auc([0, 1]) == pytest.approx(0.5)
    assert metrics.auc(np.linspace(1, 0, 7)) == pytest.approx(0.5)
    x = np.linspace(0, 1, 11)
    assert metrics.auc(x**2) == pytest.approx(1 / 3 + 0.1**2 / 6)  # trapezoid error h²/6 for x²
    assert metrics.auc([0, 1, 1], fractions=[0, 0.5, 1]) == pytest.approx(0.75)


def test_batched_curves_equal_one_image_at_a_time():
    """Several images in one call (chunked forwards) give the same curves as one by one."""
    from helpers import GapNet

    torch.manual_seed(0)
    net = GapNet().eval()
    x = torch.randn(3, 3, SIZE, SIZE)
    maps = torch.rand(3, 4, 4)  # upsampled to 16×16 inside
    together = metrics.deletion_insertion(net, x, maps, [0, 1, 2], steps=8, batch_size=20)
    for i in range(3):
        alone = metrics.deletion_insertion(net, x[i:i + 1], maps[i:i + 1], [i], steps=8)
        np.testing.assert_allclose(together.deletion[i], alone.deletion[0], atol=1e-6)
        np.testing.assert_allclose(together.insertion[i], alone.insertion[0], atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Pointing game and energy


def test_pointing_hits_tolerance_flat_maps_and_centre_baseline():
    mask = np.zeros((128, 128), bool)
    mask[60:70, 60:70] = True
    assert metrics.default_tolerance(128, 128) == 9 and metrics.default_tolerance(224, 224) == 15

    def peak_at(y, x):
        m = np.zeros((128, 128), np.float32)
        m[y, x] = 1
        return m

    maps = np.stack([peak_at(65, 65), peak_at(65, 78), peak_at(65, 79), np.zeros((128, 128))])
    masks = np.stack([mask] * 4)
    # inside; 9 px right of the mask's last column 69 (hit); 10 px (miss); flat map (miss)
    assert metrics.pointing_hits(maps, masks).tolist() == [True, True, False, False]
    assert metrics.pointing_hits(maps, masks, tolerance=0).tolist() == [True, False, False, False]
    np.testing.assert_allclose(metrics.distance_to_mask(np.array([[65, 79]]), mask[None]), [10.0])
    corner = np.zeros((128, 128), bool)
    corner[:10, :10] = True
    assert metrics.centre_hits(np.stack([mask, corner])).tolist() == [True, False]


def test_energy_inside_mask():
    mask = np.zeros((8, 8), bool)
    mask[:2] = True  # a quarter of the image
    maps = np.stack([mask, ~mask, np.ones((8, 8)), np.zeros((8, 8)), np.where(mask, 3.0, -1.0)])
    np.testing.assert_allclose(metrics.energy_inside(maps, np.stack([mask] * 5)), [1, 0, 0.25, 0, 1])
    c = metrics.centre_map(9, 9)
    assert c[4, 4] == 1.0 and c[0, 0] < c[4, 0] < c[4, 4]


def test_per_class_mean_weighs_classes_equally():
    # class 0: 3 hits of 3; class 1: 0 of 1 → per-class mean 0.5 (overall mean would be 0.75)
    assert metrics.per_class_mean([1, 1, 1, 0], [0, 0, 0, 1]) == pytest.approx(0.5)
    assert metrics.per_class_mean([1, np.nan, 0], [0, 0, 1]) == pytest.approx(0.5)


def test_near_mask_is_the_distance_test():
    rng = np.random.default_rng(3)
    masks = rng.uniform(size=(40, 24, 24)) > 0.97
    masks[0] = False  # an empty mask: never near
    points = rng.integers(0, 24, size=(40, 2))
    for tol in (0, 1, 2.5, 5):
        expected = metrics.distance_to_mask(points, masks) <= tol
        np.testing.assert_array_equal(metrics.near_mask(points, masks, tol), expected)
    one = masks[1]  # one mask shared by every point
    np.testing.assert_array_equal(metrics.near_mask(points, one, 3),
                                  metrics.distance_to_mask(points, np.stack([one] * 40)) <= 3)
