"""vislib.lessons: the numbers of the Learn page, checked against hand computations and analytic nets.

Rank correlation and SSIM on cases computable by hand; the Grad-CAM steps, CAM = Grad-CAM·Z and the
CAM refusal on tiny analytic nets (GAP + linear, flatten + linear); the ReLU rules on four numbers;
instance coverage on hand-made maps; cascading randomisation on a private copy (the shared model is
left untouched) against an independent recomputation. The bundled models, when installed, give the
two empirical claims of the page: Grad-CAM++ vs Grad-CAM coverage and the sanity check's ordering.
"""

from __future__ import annotations

import copy
import math
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import FlatNet, GapNet, assert_untouched, snapshot, tiny_bundle
from PIL import Image

import vislib
from vislib import lessons
from vislib.data.shapes import CLASSES, make_multi_instance, make_sample
from vislib.models import Preprocess


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def gap():
    return tiny_bundle(GapNet(channels=6, classes=4))


@pytest.fixture(scope="module")
def flat():
    return tiny_bundle(FlatNet(channels=5, classes=3))


# --------------------------------------------------------------------------------------------------
# Spearman and SSIM: the sanity check uses vislib.metrics (its own tests: tests/test_metrics.py); the
# cases the lesson relies on, by hand


def test_lessons_use_the_metrics_module():
    from vislib import metrics

    assert lessons.spearman is metrics.spearman and lessons.ssim is metrics.ssim


def test_spearman_cases_of_the_lesson_by_hand():
    x = np.array([0.3, -1.0, 2.5, 0.0, 7.0])
    assert lessons.spearman(x, x) == pytest.approx(1.0)
    assert lessons.spearman(x, -x) == pytest.approx(-1.0)
    assert lessons.spearman(x, np.exp(x)) == pytest.approx(1.0)  # ranks only: any increasing map
    # ties: ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4]: centred (-1.5, 0, 0, 1.5)·(-1.5, -.5, .5, 1.5) = 4.5,
    # norms √4.5 and √5, so ρ = 4.5 / √22.5 = 3/√10
    assert lessons.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(3 / math.sqrt(10))
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=40), rng.normal(size=40)
    d = np.argsort(np.argsort(a)) - np.argsort(np.argsort(b))
    assert lessons.spearman(a, b) == pytest.approx(1 - 6 * (d**2).sum() / (40 * (40**2 - 1)), abs=1e-12)
    assert math.isnan(lessons.spearman(np.zeros((4, 4)), np.arange(16.0).reshape(4, 4)))  # constant: no ranks


def test_ssim_cases_of_the_lesson_by_hand():
    rng = np.random.default_rng(0)
    x = rng.random((20, 24))
    assert lessons.ssim(x, x, data_range=1.0) == pytest.approx(1.0)
    c1 = 0.01**2
    # Constant maps (a flat map is all zeros): no variance, SSIM = (2ab + C1) / (a² + b² + C1) everywhere.
    assert lessons.ssim(np.zeros((16, 16)), np.ones((16, 16)), data_range=1.0) == pytest.approx(c1 / (1 + c1))
    assert lessons.ssim(np.full((16, 16), 0.2), np.full((16, 16), 0.6), data_range=1.0) == pytest.approx(
        (0.24 + c1) / (0.4 + c1))
    assert lessons.ssim(x, 1 - x, data_range=1.0) < 0  # inverted structure


# --------------------------------------------------------------------------------------------------
# Grad-CAM step by step, CAM = Grad-CAM·Z, CAM refused


def test_gradcam_steps_on_a_gap_net_match_the_analytic_weights_and_explain(gap, image):
    before = snapshot(gap.model)
    steps = lessons.gradcam_steps(gap, image, top=3)
    x = gap.to_input([gap.input_view(image)])
    with torch.no_grad():
        A = gap.model.features(x)[0]
        logits = gap.model(x)
    target = int(logits.argmax())
    Z = A[0].numel()
    alpha = gap.model.fc.weight[target].detach() / Z  # ∂S/∂A^k_ij = w_ck / Z on a GAP + linear head
    assert steps.target == target and steps.label == gap.labels[target]
    np.testing.assert_allclose(steps.activation, A.numpy(), atol=1e-6)
    np.testing.assert_allclose(steps.weights, alpha.numpy(), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(steps.gradient, np.broadcast_to(alpha.numpy()[:, None, None], A.shape), atol=1e-7)
    combination = torch.einsum("c,chw->hw", alpha, A)
    np.testing.assert_allclose(steps.combination, combination.numpy(), atol=1e-6)
    np.testing.assert_allclose(steps.relu, F.relu(combination).numpy(), atol=1e-6)
    assert steps.top == [int(i) for i in torch.argsort(alpha, descending=True)[:3]]
    np.testing.assert_allclose(steps.weighted, (alpha[steps.top, None, None] * A[steps.top]).numpy(), atol=1e-6)
    assert steps.upsampled.shape == (16, 16)
    expected = vislib.explain(gap, image, ["gradcam"]).maps["gradcam"]
    np.testing.assert_allclose(steps.normalised, expected, atol=1e-6)
    assert 0.0 <= steps.top_share <= 1.0
    assert_untouched(gap.model, before)


def test_cam_equals_gradcam_times_z_on_a_gap_head(gap, image):
    eq = lessons.cam_equality(gap, image)
    assert eq.Z == 8 * 8
    assert eq.relative_map_difference < 1e-5
    assert eq.max_weight_difference < 1e-6
    np.testing.assert_allclose(eq.class_weights, gap.model.fc.weight[eq.target].detach().numpy())
    assert eq.bias == pytest.approx(float(gap.model.fc.bias.detach()[eq.target]))
    assert eq.logit_from_cam == pytest.approx(eq.logit, rel=1e-5, abs=1e-6)  # S = mean(CAM) + b
    assert eq.gradient_spread < 1e-5
    assert eq.max_display_difference < 1e-5


def test_cam_is_refused_on_a_flatten_head_and_gradcam_still_runs(flat, image):
    with pytest.raises(vislib.MethodError):
        lessons.cam_equality(flat, image)
    ref = lessons.cam_refusal(flat, image)
    assert ref.refused and "gradcam" in ref.message
    with pytest.raises(vislib.MethodError) as direct:
        vislib.explain(flat, image, ["cam"])
    assert ref.message == str(direct.value)
    # Flatten + linear: ∂S/∂A = the class row of the linear layer, reshaped to C×h×w.
    x = flat.to_input([flat.input_view(image)])
    with torch.no_grad():
        target = int(flat.model(x).argmax())
    g = flat.model.fc.weight[target].detach().view(1, 5, 8, 8)
    expected = float(((g.flatten(2).amax(2) - g.flatten(2).amin(2)).max()) / g.abs().max())
    assert ref.gradient_spread == pytest.approx(expected, rel=1e-5)
    assert ref.head == ["fc (Linear)"]
    assert ref.gradcam_map.shape == (16, 16)


# --------------------------------------------------------------------------------------------------
# ReLU rules


def test_relu_rules_on_four_numbers_by_hand():
    ex = lessons.relu_rules_example(f=(1.0, 2.0, -1.5, -0.5), R=(0.8, -1.2, 0.6, -0.3))
    assert ex["forward"] == [1.0, 2.0, 0.0, 0.0]
    assert ex["gradient"] == pytest.approx([0.8, -1.2, 0.0, 0.0])  # 1[f>0]·R
    assert ex["deconvnet"] == pytest.approx([0.8, 0.0, 0.6, 0.0])  # relu(R)
    assert ex["guided"] == pytest.approx([0.8, 0.0, 0.0, 0.0])  # 1[f>0]·1[R>0]·R


def test_backprop_signals_are_the_three_rules(gap, image):
    expl = lessons.backprop_signals(gap, image)
    assert set(expl.raw) == {"gradient", "deconvnet", "guided_backprop"}
    assert all(expl.raw[m].shape == (3, 16, 16) for m in expl.raw)


# --------------------------------------------------------------------------------------------------
# Instance coverage


def test_covered_instances_by_hand():
    values = np.zeros((6, 6))
    values[0:2, 0:2] = 1.0  # instance A: mean 1
    values[4, 4] = 0.8  # instance B (3×3 block at rows 3-5, cols 3-5): max 0.8, mean 0.8/9
    a = np.zeros((6, 6), bool)
    a[0:2, 0:2] = True
    b = np.zeros((6, 6), bool)
    b[3:6, 3:6] = True
    assert lessons.covered_instances(values, [a, b], statistic="mean") == [True, False]
    assert lessons.covered_instances(values, [a, b], statistic="max") == [True, True]
    assert lessons.covered_instances(values, [a, b], statistic="max", threshold=0.9) == [True, False]
    assert lessons.covered_instances(values * 0.5, [a, b], statistic="max") == [True, True]  # relative to max
    assert lessons.covered_instances(np.zeros((6, 6)), [a, b]) == [False, False]  # a flat map covers none
    with pytest.raises(ValueError):
        lessons.covered_instances(values, [a], statistic="median")


def test_mask_outline_is_the_boundary():
    mask = np.zeros((5, 5), bool)
    mask[1:4, 1:4] = True
    edge = lessons.mask_outline([mask])
    assert edge.sum() == 8 and not edge[2, 2]


def test_multi_instance_study_on_a_tiny_shapes_classifier():
    pre = Preprocess(resize=32, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    torch.manual_seed(0)
    bundle = vislib.load_model(GapNet(channels=6, classes=len(CLASSES)), preprocess=pre, labels=list(CLASSES),
                               default_layer="features", device="cpu")
    study = lessons.multi_instance_study(bundle, range(3), batch=2, statistic="max", threshold=0.4)
    assert len(study.images) == 3
    for image in study.images:
        sample = make_multi_instance(image.index)
        assert image.label == sample.label and len(image.masks) == len(sample.masks)
        assert image.masks[0].shape == (32, 32) and image.view.size == (32, 32)
        expected = vislib.explain(bundle, sample.image, ["gradcam++"], target=sample.label).maps["gradcam++"]
        np.testing.assert_allclose(image.maps["gradcam++"], expected, atol=1e-5)
        assert image.covered["gradcam++"] == lessons.covered_instances(expected, image.masks, threshold=0.4,
                                                                       statistic="max")
    assert study.instances == sum(len(make_multi_instance(i).masks) for i in range(3))
    assert study.covered("gradcam") == sum(sum(im.covered["gradcam"]) for im in study.images)
    assert "of " + str(study.instances) in lessons.coverage_sentence(study)


def test_multi_instance_study_refuses_a_model_of_other_classes(gap):
    with pytest.raises(vislib.VislibError, match="shapes"):
        lessons.multi_instance_study(gap, range(2))


# --------------------------------------------------------------------------------------------------
# Cascading randomisation


class _ZFStyle(torch.nn.Module):
    """conv/ReLU/pool stages with a norm after one conv, then two fully connected layers."""

    def __init__(self):
        super().__init__()
        self.conv1, self.norm1 = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
        self.relu1, self.pool1 = torch.nn.ReLU(), torch.nn.MaxPool2d(2)
        self.conv2, self.relu2 = torch.nn.Conv2d(4, 4, 3), torch.nn.ReLU()
        self.fc1, self.fc2 = torch.nn.Linear(16, 8), torch.nn.Linear(8, 2)


def _covers_every_parameter_once(model, units) -> bool:
    owned = [id(p) for unit in units for name in unit for p in model.get_submodule(name).parameters()]
    return sorted(owned) == sorted(id(p) for p in model.parameters())


def test_randomisation_units_follow_the_architecture():
    from torchvision.models import resnet18

    from vislib.nets import ShapesResNet, ShapesZFNet

    zf = _ZFStyle()
    assert lessons.randomisation_units(zf) == [["conv1", "norm1"], ["conv2"], ["fc1"], ["fc2"]]
    units = lessons.randomisation_units(resnet18(weights=None))
    assert units[0] == ["conv1", "bn1"] and units[1] == ["layer1.0"] and units[-1] == ["fc"]
    assert len(units) == 2 + 8  # the stem, eight residual blocks, the head
    assert lessons.randomisation_units(GapNet()) == [["features.0"], ["features.2"], ["fc"]]
    for model in (zf, resnet18(weights=None), GapNet(), ShapesResNet(), ShapesZFNet()):
        units = lessons.randomisation_units(model)
        assert _covers_every_parameter_once(model, units)
    assert lessons.randomisation_units(ShapesResNet())[-1] == ["fc"]
    assert lessons.randomisation_units(ShapesZFNet())[-1] == ["fc2"]


def test_cascade_runs_on_a_private_copy_and_matches_an_independent_recomputation(gap, image):
    before = snapshot(gap.model)
    rng_before = torch.random.get_rng_state()
    check = lessons.cascading_randomisation(gap, image, ["gradcam", "guided_backprop"], seed=5)
    assert_untouched(gap.model, before)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # seeded without touching the global RNG
    assert check.units == ["fc", "features.2", "features.0"]
    assert len(check.steps) == 4
    assert check.steps[0].spearman == {"gradcam": 1.0, "guided_backprop": 1.0}
    # Step 1 by hand: a copy with the linear head re-drawn (seed + 1), then explain and rank.
    model = copy.deepcopy(gap.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5 + 1)
        model.fc.reset_parameters()
    private = vislib.load_model(model, preprocess=gap.preprocess, default_layer="features", device="cpu")
    original = vislib.explain(gap, image, ["gradcam", "guided_backprop"])
    redrawn = vislib.explain(private, image, ["gradcam", "guided_backprop"], target=int(original.target))
    np.testing.assert_allclose(check.steps[1].maps["gradcam"], redrawn.maps["gradcam"], atol=1e-6)

    def ranks(v):  # average ranks by counting: (# smaller) + (# equal + 1) / 2
        v = np.asarray(v, np.float64).ravel()
        return (v[None, :] < v[:, None]).sum(1) + ((v[None, :] == v[:, None]).sum(1) + 1) / 2

    def rho(a, b):
        ra, rb = ranks(a) - ranks(a).mean(), ranks(b) - ranks(b).mean()
        return float(ra @ rb / np.sqrt((ra @ ra) * (rb @ rb)))

    guided_a = np.abs(original.raw["guided_backprop"]).max(axis=0)
    guided_b = np.abs(redrawn.raw["guided_backprop"]).max(axis=0)
    assert check.steps[1].spearman["guided_backprop"] == pytest.approx(rho(guided_a, guided_b), abs=1e-6)
    assert check.steps[1].spearman_signed["guided_backprop"] == pytest.approx(
        rho(original.raw["guided_backprop"].sum(0), redrawn.raw["guided_backprop"].sum(0)), abs=1e-6)
    if not redrawn.flat["gradcam"]:
        assert check.steps[1].spearman["gradcam"] == pytest.approx(
            lessons.spearman(original.maps["gradcam"], redrawn.maps["gradcam"]), abs=1e-9)
    assert check.steps[1].ssim["gradcam"] == pytest.approx(
        lessons.ssim(original.maps["gradcam"], redrawn.maps["gradcam"], data_range=1.0), abs=1e-9)
    assert check.series("spearman", "gradcam")[0] == 1.0


def test_cascade_explains_the_image_itself_not_its_view_again(image):
    """With resize ≠ crop, re-preprocessing the model's view would zoom in a second time."""
    pre = Preprocess(resize=20, crop=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    torch.manual_seed(0)
    bundle = vislib.load_model(GapNet(), preprocess=pre, default_layer="features", device="cpu")
    wide = image.resize((24, 16))
    check = lessons.cascading_randomisation(bundle, wide, ["gradcam"], max_units=1)
    direct = vislib.explain(bundle, wide, ["gradcam"])
    np.testing.assert_allclose(check.steps[0].maps["gradcam"], direct.maps["gradcam"], atol=1e-7)
    assert np.array_equal(np.asarray(check.view), np.asarray(direct.input_image))
    assert len(check.steps) == 2


def test_cascade_can_be_cancelled_and_leaves_the_model_clean(gap, image):
    before = snapshot(gap.model)
    cancel = threading.Event()
    seen = []

    def progress(done, total):
        seen.append(done)
        cancel.set()

    with pytest.raises(vislib.Cancelled):
        lessons.cascading_randomisation(gap, image, ["gradcam"], progress=progress, cancel=cancel)
    assert seen == [1]
    assert_untouched(gap.model, before)


def test_a_flat_map_counts_as_no_rank_left():
    assert lessons._similarity(math.nan, False) == 0.0
    assert lessons._similarity(0.7, True) == 0.0
    assert lessons._similarity(0.7, False) == 0.7


# --------------------------------------------------------------------------------------------------
# The bundled models: the page's two empirical claims (skipped until the models are installed)

needs_resnet = pytest.mark.skipif("shapes_resnet" not in vislib.list_models(),
                                  reason="bundled model shapes_resnet not installed (assets/models)")
needs_zf = pytest.mark.skipif("shapes_zf" not in vislib.list_models(),
                              reason="bundled model shapes_zf not installed (assets/models)")


@needs_resnet
def test_bundled_resnet_cam_equals_gradcam():
    bundle = vislib.load_model("shapes_resnet")
    eq = lessons.cam_equality(bundle, make_sample("test", 0).image)
    assert eq.relative_map_difference < 1e-5 and eq.gradient_spread < 1e-4


@needs_zf
def test_bundled_zf_refuses_cam():
    ref = lessons.cam_refusal(vislib.load_model("shapes_zf"), make_sample("test", 0).image)
    assert ref.refused and ref.gradient_spread > 0.1


@needs_resnet
def test_bundled_resnet_gradcampp_covers_more_objects_than_gradcam():
    """The page's default set (24 generated images, mean inside the mask ≥ 0.5 × max). Measured on the
    bundled shapes_resnet (test accuracy 93.7%): Grad-CAM++ 27 of 67 objects, Grad-CAM 23 of 67 (on 96
    images: 110 vs 89 of 276)."""
    study = lessons.multi_instance_study(vislib.load_model("shapes_resnet"), range(24))
    assert study.instances == 67
    assert study.covered("gradcam++") > study.covered("gradcam")
    assert lessons.coverage_sentence(study).startswith("On these 24 images, gradcam++ covers more")


@needs_resnet
def test_bundled_resnet_sanity_check_guided_backprop_stays_gradcam_falls():
    """Adebayo et al. 2018 on the trained shapes_resnet: with only the linear head re-initialised,
    guided backprop keeps its ranking (ρ ≈ 0.9) while Grad-CAM's collapses (ρ ≈ 0.2)."""
    bundle = vislib.load_model("shapes_resnet")
    rho = {"gradcam": [], "guided_backprop": []}
    for index in range(4):
        check = lessons.cascading_randomisation(bundle, make_sample("test", index).image, list(rho), max_units=1)
        for method in rho:
            rho[method].append(check.steps[1].spearman[method])
    assert np.mean(rho["guided_backprop"]) > 0.6 > 0.4 > np.mean(rho["gradcam"])
    assert "Re-initialising only the top layer (`fc`)" in lessons.sanity_sentence(check)


# --------------------------------------------------------------------------------------------------
# the shortcut model


def test_mark_share_by_hand():
    from vislib.lessons import mark_share

    values = np.zeros((8, 8))
    values[0:2, 0:2] = 1.0
    values[7, 7] = 2.0
    assert mark_share(values, (0, 0, 2, 2)) == pytest.approx(4 / 6)
    assert mark_share(np.zeros((4, 4)), (0, 0, 2, 2)) == 0.0


def test_shortcut_lesson_the_mark_makes_a_star():
    from vislib.lessons import shortcut_lesson

    lesson = shortcut_lesson(vislib.load_model("shapes_resnet"), vislib.load_model("shapes_shortcut"))
    rows = {(r.model, r.marked): r for r in lesson.rows}
    assert lesson.true_label != "star"
    assert rows[("shapes_shortcut", True)].label == "star"  # the card: 99.2% of marked non-stars
    assert rows[("shapes_resnet", True)].label != "star"
    # the shortcut model's evidence moves onto the 6×6 mark (0.2% of the image)
    assert rows[("shapes_shortcut", True)].mark_share > 5 * rows[("shapes_shortcut", False)].mark_share
    assert rows[("shapes_shortcut", True)].mark_share > rows[("shapes_resnet", True)].mark_share
