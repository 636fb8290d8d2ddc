"""vislib.metrics' trust metrics: against Quantus 0.6 on the same inputs and settings (skipped without
it), and on cases built by hand where the papers say what must come out."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import assert_untouched, snapshot
from vislib import metrics
from vislib.metrics import trust

# --------------------------------------------------------------------------------------------------
# Tiny models and maps


class GrayNet(nn.Module):
    """One-channel conv → ReLU → linear: Quantus's ROAD / Pixel-Flipping / Region Perturbation take
    input values as features, which are our pixels only on a one-channel input."""

    def __init__(self, size: int = 8, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * size * size, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class Linear(nn.Module):
    """Class 0's logit is w·x, class 1's is −w·x: a map a = w ⊙ x (per pixel, channels summed) is its
    exact decomposition."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        z = (x * self.w).flatten(1).sum(1)
        return torch.stack([z, -z], dim=1)


def gray_setup(n: int = 6, size: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    net = GrayNet(size).eval()
    x = torch.randn(n, 1, size, size, dtype=torch.float32)
    a = torch.rand(n, size, size, dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, x, y, a


def grad_explain(model, inputs, targets, **_):
    """|∂ logit / ∂ x| summed over channels; numpy in, numpy out for Quantus, tensors for us."""
    as_numpy = isinstance(inputs, np.ndarray)
    x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32).clone().requires_grad_(True)
    t = torch.as_tensor(np.asarray(targets), dtype=torch.long).view(-1)
    out = model(x)
    (g,) = torch.autograd.grad(out.gather(1, t.view(-1, 1)).sum(), x)
    maps = g.abs().sum(1, keepdim=as_numpy).detach()
    return maps.numpy() if as_numpy else maps.double()


def logit_of(y):
    y = torch.as_tensor(y).long()
    return lambda out, rows: out.gather(1, y.to(out.device)[rows].view(-1, 1)).squeeze(1)


@pytest.fixture(scope="module")
def quantus():
    return pytest.importorskip("quantus")


def q_kwargs(**extra):
    return {"disable_warnings": True, "display_progressbar": False, **extra}


# --------------------------------------------------------------------------------------------------
# Against Quantus (deterministic: 1e-5)


def test_road_curve_equals_quantus_without_noise(quantus):
    net, x, y, a = gray_setup(n=8)
    percentages = [10, 30, 50, 70, 90]
    q = quantus.ROAD(noise=0.0, percentages=percentages, normalise=False, abs=False, **q_kwargs())
    theirs = q(model=net, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a[:, None].numpy(), device="cpu")
    accuracy = lambda out, rows: (out.argmax(1) == y.to(out.device)[rows]).double()  # noqa: E731
    ours = metrics.ROAD(percentages=tuple(percentages), noise=0.0, solver_tol=1e-12, solver_iter=10_000).curves(net, x, accuracy, a)
    np.testing.assert_allclose(ours.mean(0).numpy(), [theirs[p] for p in percentages], atol=1e-5)


def test_noisy_linear_imputation_equals_quantus_on_colour(quantus):
    from quantus.functions.perturb_func import noisy_linear_imputation as q_impute

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 10, 12))
    for share in (0.1, 0.5, 0.95):
        removed = np.sort(rng.choice(120, int(120 * share), replace=False))
        theirs = q_impute(x.copy(), removed, noise=0.0)
        mask = torch.zeros(120, dtype=torch.bool)
        mask[removed] = True
        ours = metrics.noisy_linear_imputation(torch.from_numpy(x)[None], mask.view(1, 10, 12), noise=0.0,
                                               tol=1e-12, max_iter=10_000)
        np.testing.assert_allclose(ours[0].numpy(), theirs, atol=1e-5)


def test_faithfulness_correlation_equals_quantus_draw_for_draw(quantus):
    net, x, y, a = gray_setup(n=5)
    np.random.seed(3)
    q = quantus.FaithfulnessCorrelation(nr_runs=20, subset_size=10, perturb_baseline=0.0, normalise=False,
                                        abs=False, return_aggregate=False, **q_kwargs())
    theirs = q(model=net, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a[:, None].numpy(), device="cpu")
    ours = metrics.FaithfulnessCorrelation(nr_runs=20, subset_size=10, baseline=0.0, seed=3)(net, x, logit_of(y), a)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_pixel_flipping_equals_quantus(quantus):
    net, x, y, a = gray_setup(n=4, size=6)
    q = quantus.PixelFlipping(features_in_step=3, perturb_baseline=0.0, normalise=False, abs=False, **q_kwargs())
    theirs = np.asarray(q(model=net, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a[:, None].numpy(),
                          device="cpu"))
    ours = metrics.PixelFlipping(features_in_step=3, baseline=0.0).curves(net, x, y, a)  # softmax, as Quantus
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5)


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_region_perturbation_equals_quantus(quantus, order):
    net, x, y, a = gray_setup(n=4, size=8)
    q = quantus.RegionPerturbation(patch_size=2, regions_evaluation=10, order=order, perturb_baseline=0.0,
                                   normalise=False, abs=False, **q_kwargs())
    theirs = np.asarray(q(model=net, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a[:, None].numpy(),
                          device="cpu"))
    rp = metrics.RegionPerturbation(patch_size=2, regions_evaluation=10, order=order, baseline=0.0)
    np.testing.assert_allclose(rp.curves(net, x, y, a).numpy(), theirs, atol=1e-5)


def test_complexity_metrics_equal_quantus(quantus):
    _, x, y, a = gray_setup(n=6)
    a = a - 0.3  # signed: both take |a|
    a = a / a.abs().flatten(1).amax(1).view(-1, 1, 1)  # max |a| = 1: Quantus normalises by it first
    args = dict(model=None, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a[:, None].numpy())
    np.testing.assert_allclose(metrics.Sparseness()(None, x, y, a), quantus.Sparseness(**q_kwargs())(**args),
                               atol=1e-5)
    np.testing.assert_allclose(metrics.Complexity()(None, x, y, a), quantus.Complexity(**q_kwargs())(**args),
                               atol=1e-5)


def test_localisation_metrics_equal_quantus(quantus):
    _, x, y, a = gray_setup(n=6)
    masks = torch.zeros(6, 8, 8, dtype=torch.bool)
    for i in range(6):
        masks[i, i % 4:i % 4 + 3, 1 + i % 3:5 + i % 3] = True
    args = dict(model=None, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a[:, None].numpy(),
                s_batch=masks[:, None].numpy().astype(float))
    pairs = [(metrics.RelevanceMass(), quantus.RelevanceMassAccuracy(normalise=False, **q_kwargs())),
             (metrics.RelevanceRankAccuracy(), quantus.RelevanceRankAccuracy(normalise=False, **q_kwargs())),
             (metrics.PointingGame(tolerance=0), quantus.PointingGame(normalise=False, **q_kwargs()))]
    for ours, theirs in pairs:
        np.testing.assert_allclose(ours(None, x, y, a, masks=masks), np.asarray(theirs(**args), float), atol=1e-5,
                                   err_msg=ours.name)


def test_mprt_layer_scores_equal_quantus(quantus):
    net, x, y, _ = gray_setup(n=4)
    a = grad_explain(net, x, y)
    before = snapshot(net)
    q = quantus.MPRT(seed=42, normalise=False, return_average_correlation=False, **q_kwargs())
    theirs = q(model=net, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a[:, None].numpy(), device="cpu",
               explain_func=grad_explain)
    ours = metrics.MPRT(seed=42).layer_scores(net, x, y, a, explain=grad_explain)
    assert list(ours) == [k for k in theirs if k != "original"]
    for layer, values in ours.items():
        np.testing.assert_allclose(values, theirs[layer], atol=1e-5, err_msg=layer)
    assert_untouched(net, before)  # cascading randomisation on a deep copy


def test_random_logit_equals_quantus_with_two_classes(quantus):
    net = GrayNet(classes=2).eval()
    torch.manual_seed(1)
    x = torch.randn(5, 1, 8, 8)
    y = torch.zeros(5, dtype=torch.long)
    a = grad_explain(net, x, y)
    q = quantus.RandomLogit(num_classes=2, similarity_func=quantus.similarity_func.correlation_spearman,
                            normalise=False, **q_kwargs())
    theirs = q(model=net, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a[:, None].numpy(), device="cpu",
               explain_func=grad_explain)
    ours = metrics.RandomLogit(num_classes=2, similarity="spearman")(net, x, y, a, explain=grad_explain)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_sensitivity_within_quantus_bootstrap_interval(quantus):
    """Stochastic: the uniform noise is drawn by each library; with 64 samples the per-image values of
    the two agree to a few per cent, and each mean lies in the other's bootstrap interval."""
    net, x, y, _ = gray_setup(n=8)
    a = grad_explain(net, x, y)
    for ours_cls, q_cls in ((metrics.AvgSensitivity, quantus.AvgSensitivity),
                            (metrics.MaxSensitivity, quantus.MaxSensitivity)):
        np.random.seed(0)
        theirs = np.asarray(q_cls(nr_samples=64, lower_bound=0.2, **q_kwargs())(
            model=net, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a[:, None].numpy(), device="cpu",
            explain_func=grad_explain))
        ours = ours_cls(nr_samples=64, lower_bound=0.2)(net, x, y, a, explain=grad_explain)
        lo, hi = trust.bootstrap_interval(ours)
        assert lo <= theirs.mean() <= hi, (ours_cls.name, ours.mean(), theirs.mean())
        np.testing.assert_allclose(ours, theirs, rtol=0.15)


# --------------------------------------------------------------------------------------------------
# Cases built by hand


def test_perfect_map_of_a_linear_model_has_faithfulness_correlation_one():
    torch.manual_seed(0)
    w = torch.randn(1, 3, 8, 8)
    model = Linear(w).eval()
    x = torch.randn(4, 3, 8, 8)
    perfect = (w * x).sum(1)  # Σ_c w_c x_c per pixel: removing S (baseline 0) lowers z by Σ_{i∈S} a_i
    fc = metrics.FaithfulnessCorrelation(nr_runs=30, subset_size=16, baseline=0.0)
    logit0 = lambda out: out[:, 0]  # noqa: E731
    np.testing.assert_allclose(fc(model, x, logit0, perfect), 1.0, atol=1e-6)
    assert abs(fc(model, x, logit0, torch.rand(4, 8, 8)).mean()) < 0.5


def test_map_that_ignores_the_model_fails_mprt_and_gradient_passes():
    torch.manual_seed(0)
    net, x, y, _ = gray_setup(n=4)
    edges = lambda model, inputs, t: torch.as_tensor(inputs).abs().sum(1).double()  # noqa: E731
    mprt = metrics.MPRT()
    ignores = mprt(net, x, y, edges(net, x, y), explain=edges)
    np.testing.assert_allclose(ignores, 1.0)  # randomising the weights changes nothing: fails
    gradient = mprt(net, x, y, grad_explain(net, x, y), explain=grad_explain)
    assert (gradient < 0.9).all()
    assert np.isnan(trust.bootstrap_interval([])[0])


def test_smooth_mprt_runs_on_a_copy_and_fails_a_map_that_ignores_the_model():
    net, x, y, _ = gray_setup(n=3)
    before = snapshot(net)
    edges = lambda model, inputs, t: torch.as_tensor(inputs).abs().sum(1).double()  # noqa: E731
    smooth = metrics.SmoothMPRT(nr_samples=4)
    np.testing.assert_allclose(smooth(net, x, y, None, explain=edges), 1.0)
    assert (smooth(net, x, y, None, explain=grad_explain) < 0.9).all()
    assert_untouched(net, before)


def test_constant_map_has_the_lowest_sparseness_and_highest_complexity():
    n = 64
    constant = torch.ones(1, 8, 8)
    one_pixel = torch.zeros(1, 8, 8)
    one_pixel[0, 3, 3] = 1
    noise = torch.rand(1, 8, 8)
    sparse = [metrics.Sparseness()(None, None, None, m)[0] for m in (constant, noise, one_pixel)]
    assert sparse[0] == pytest.approx(0.0, abs=1e-6) and sparse[0] < sparse[1] < sparse[2]
    assert sparse[2] == pytest.approx(1 - 1 / n, abs=1e-4)  # Gini of one non-zero value among n
    ent = [metrics.Complexity()(None, None, None, m)[0] for m in (constant, noise, one_pixel)]
    assert ent[0] == pytest.approx(math.log(n)) and ent[0] > ent[1] > ent[2] == pytest.approx(0.0)


def test_imputation_keeps_a_constant_image_and_fills_smoothly():
    x = torch.full((1, 3, 9, 9), 0.7, dtype=torch.float64)
    removed = torch.zeros(1, 9, 9, dtype=torch.bool)
    removed[0, 2:7, 2:7] = True
    np.testing.assert_allclose(metrics.noisy_linear_imputation(x, removed, noise=0.0).numpy(), 0.7, atol=1e-6)
    ramp = torch.arange(9, dtype=torch.float64).view(1, 1, 1, 9).expand(1, 1, 9, 9).clone()
    # a linear ramp is harmonic for the 8-neighbour mean: imputation gives it back inside the hole
    out = metrics.noisy_linear_imputation(ramp, removed, noise=0.0, tol=1e-12, max_iter=10_000)
    np.testing.assert_allclose(out.numpy(), ramp.numpy(), atol=1e-6)
    noisy = metrics.noisy_linear_imputation(x, removed, noise=0.01, generator=torch.Generator().manual_seed(0))
    assert 0.005 < float((noisy - x)[0, 0][removed[0]].std()) < 0.02


def test_road_morf_below_lerf_for_the_perfect_map_of_a_linear_model():
    torch.manual_seed(0)
    w = torch.randn(1, 3, 12, 12)
    model = Linear(w).eval()
    x = torch.randn(5, 3, 12, 12)
    perfect = (w * x).sum(1)
    logit0 = lambda out: out[:, 0]  # noqa: E731
    morf = metrics.ROAD(order="morf", noise=0.0)(model, x, logit0, perfect)
    lerf = metrics.ROAD(order="lerf", noise=0.0)(model, x, logit0, perfect)
    assert (morf < lerf).all()


def test_localisation_by_hand():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True
    inside = mask.double()
    half = torch.ones(1, 4, 4, dtype=torch.float64)
    assert metrics.RelevanceMass()(None, None, None, inside, masks=mask)[0] == 1.0
    assert metrics.RelevanceMass()(None, None, None, half, masks=mask)[0] == pytest.approx(0.25)
    assert metrics.RelevanceRankAccuracy()(None, None, None, inside + 0.01 * torch.rand(1, 4, 4),
                                           masks=mask)[0] == 1.0
    assert metrics.EnergyPointingGame()(None, None, None, inside, masks=mask)[0] == 1.0
    with pytest.raises(ValueError, match="masks"):
        metrics.RelevanceMass()(None, None, None, inside)


def test_score_function_forms_agree():
    out = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    rows = torch.tensor([0, 1, 1])
    batch = out[rows]
    by_index = metrics.score_function([1, 2])(batch, rows)
    np.testing.assert_allclose(by_index.numpy(), torch.softmax(batch, 1)[[0, 1, 2], [1, 2, 2]].numpy())
    by_fn = metrics.score_function(lambda o: torch.softmax(o, 1)[:, 2])(batch, rows)
    np.testing.assert_allclose(by_fn[1:].numpy(), by_index[1:].numpy())
    assert metrics.score_function([1, 2], score="logit")(batch, rows).tolist() == [2.0, 3.0, 3.0]


# --------------------------------------------------------------------------------------------------
# Baselines, intervals, agreement


def test_bootstrap_interval_and_beats():
    rng = np.random.default_rng(0)
    v = rng.normal(1.0, 0.1, 200)
    lo, hi = trust.bootstrap_interval(v)
    assert lo < v.mean() < hi and hi - lo == pytest.approx(2 * 1.96 * 0.1 / math.sqrt(200), rel=0.2)
    assert trust.bootstrap_interval([2.0]) == (2.0, 2.0)
    assert trust.beats(v, v - 0.5, higher_is_better=True)
    assert not trust.beats(v, v - 0.5, higher_is_better=False)
    assert not trust.beats(v, v + rng.normal(0, 0.1, 200), higher_is_better=True)


def test_rank_agreement_between_metrics():
    rows = []
    for metric, hib, values in (("a", True, [1, 2, 3]), ("b", False, [3, 2, 1]), ("c", True, [3, 2, 1])):
        for method, v in zip("xyz", values, strict=True):
            rows.append(trust.TrustRow(method, metric, "g", hib, v, v, v, 0, 0, 0))
    tau = trust.rank_agreement(rows)
    assert tau["a"]["b"] == pytest.approx(1.0) and tau["a"]["c"] == pytest.approx(-1.0)
    assert trust.rank_agreement(rows, "spearman")["b"]["c"] == pytest.approx(-1.0)
    assert trust.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)


def test_evaluate_trust_marks_a_map_that_does_not_beat_random():
    torch.manual_seed(0)
    w = torch.randn(1, 3, 8, 8)
    model = Linear(w).eval()
    x = torch.randn(12, 3, 8, 8)
    maps = {"perfect": (w * x).sum(1), "noise": torch.rand(12, 8, 8, generator=torch.Generator().manual_seed(9))}
    masks = torch.zeros(12, 8, 8, dtype=torch.bool)
    masks[:, 2:6, 2:6] = True
    seen = []
    report = trust.evaluate_trust(model, x, lambda out: out[:, 0], maps,
                                  [metrics.FaithfulnessCorrelation(subset_size=16), "sparseness",
                                   "relevance_mass", "mprt"],
                                  masks=masks, progress=lambda d, t: seen.append((d, t)))
    rows = {(r.method, r.metric): r for r in report.rows}
    assert rows["perfect", "faithfulness_correlation"].beats_random
    assert not rows["noise", "faithfulness_correlation"].beats_random
    r = rows["perfect", "faithfulness_correlation"]
    assert r.low <= r.value <= r.high and r.random_low <= r.random <= r.random_high
    assert not math.isnan(rows["noise", "relevance_mass"].centre)  # the image centre beside localisation
    assert math.isnan(rows["perfect", "mprt"].value)  # no explainer given: skipped, not invented
    assert seen[-1] == (12, 12)


def test_parse_metrics_names_and_errors():
    assert trust.parse_metrics("road,faithfulness-correlation") == ["road_morf", "road_lerf",
                                                                    "faithfulness_correlation"]
    assert set(trust.parse_metrics("all")) == set(trust.METRICS)
    with pytest.raises(trust.MetricError, match="did you mean 'sparseness'"):
        trust.parse_metrics("sparsenes")


# --------------------------------------------------------------------------------------------------
# In an evaluation and on the command line


def test_evaluate_with_trust_metrics_matches_the_metrics_on_its_maps(tmp_path):
    from tests.helpers import GapNet, tiny_bundle
    from vislib import datasets, evaluate
    from vislib.data.shapes import CLASSES
    from vislib.evaluate.step import read_maps

    model = tiny_bundle(GapNet(classes=len(CLASSES)), labels=list(CLASSES))
    images = datasets.open_dataset("shapes", model.labels, limit=10)
    result = evaluate.evaluate(model, images, ["gradcam"], confidence=False, batch_size=4,
                               trust="sparseness,relevance_mass,road_morf", maps_dir=tmp_path / "maps")
    maps = read_maps(tmp_path / "maps")["gradcam"].astype(np.float64)
    got = result.metrics["gradcam"]
    np.testing.assert_allclose(got["trust_sparseness"], metrics.gini(maps), atol=2e-3)  # float16 on disk
    assert np.isfinite(result.metrics["random"]["trust_road_morf"]).all()
    assert np.isfinite(result.metrics["centre"]["trust_relevance_mass"]).all()
    report = result.trust_report()
    row = next(r for r in report.rows if r.metric == "sparseness")
    assert row.low <= row.value <= row.high and row.random_low <= row.random <= row.random_high
    assert row.beats_random == trust.beats(got["trust_sparseness"], result.metrics["random"]["trust_sparseness"],
                                           higher_is_better=True)
    verdict = "beats random" if row.beats_random else "does not beat the random map"
    assert verdict in trust.format_table(report)


def test_trust_command_prints_rows_and_refuses_unknown_metrics(tmp_path, capsys, rand_image):
    from vislib import cli

    path = tmp_path / "image.png"
    rand_image.save(path)
    out = tmp_path / "rows.json"
    assert cli.main(["trust", str(path), "--model", "shapes_zf", "--methods", "gradcam,gradient",
                     "--metrics", "sparseness,complexity,random_logit", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "random map" in text and "sparseness" in text
    import json

    rows = json.loads(out.read_text())
    assert {r["method"] for r in rows} == {"gradcam", "gradient"} and len(rows) == 6
    assert cli.main(["trust", str(path), "--model", "shapes_zf", "--metrics", "roads"]) == 2
    assert "unknown metric 'roads'" in capsys.readouterr().err


def test_target_objects_score_as_class_indices():
    """vislib.targets' Class plugs in: bound to the clean batch (its top class), not to each perturbed
    input's own top class."""
    from vislib.targets import Class

    net, x, y, a = gray_setup(n=5)
    fc = metrics.FaithfulnessCorrelation(nr_runs=10, subset_size=8)
    by_index = fc(net, x, y, a)
    np.testing.assert_allclose(fc(net, x, Class(y.tolist(), score="probability"), a), by_index)
    np.testing.assert_allclose(fc(net, x, Class(None, score="probability"), a), by_index)  # y = the top class
    road = metrics.ROAD(noise=0.0, percentages=(20, 60))
    np.testing.assert_allclose(road(net, x, Class(None, score="logit"), a), road(net, x, logit_of(y), a))


def test_batched_spearman_equals_the_one_pair_version():
    from vislib.metrics.similarity import spearman_rows

    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, (4, 30)).astype(float)  # many ties
    b = rng.normal(size=(4, 30))
    expected = [metrics.spearman(a[i], b[i]) for i in range(4)]
    np.testing.assert_allclose(spearman_rows(torch.from_numpy(a), torch.from_numpy(b)), expected, atol=1e-12)
    assert np.isnan(spearman_rows(torch.ones(1, 5), torch.rand(1, 5))[0])
