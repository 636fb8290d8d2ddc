"""The newer CAM-family methods and options against their definitions (shared METHODS.md, "More
methods"), on small analytic networks: each expected value is computed here, independently of the
engine (plain autograd, numpy linear algebra)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import GapNet, assert_untouched, snapshot, tiny_bundle
from torch import nn

import vislib
from vislib.methods.perturbation import eigen_cam

NEW = ["gradcam_elementwise", "eigengradcam", "kpcacam", "shapleycam", "finercam"]
GRADIENT_NEW = ["gradcam_elementwise", "eigengradcam", "shapleycam", "finercam"]


class SmoothHeadNet(nn.Module):
    """conv → ReLU (target ``features``) → GAP → linear → GELU → linear: the head above A is smooth,
    so ∂²S/∂A² ≠ 0 (ShapleyCAM's Hessian term) and Grad-CAM's weights vary with the image."""

    def __init__(self, channels: int = 6, hidden: int = 7, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, classes)

    def head(self, A):
        return self.fc2(self.act(self.fc1(self.pool(A).flatten(1))))

    def forward(self, x):
        return self.head(self.features(x))


class TwoStageNet(nn.Module):
    """``stage1`` (8×8 grid) → ``stage2`` (4×4) → GAP → linear → tanh → linear: two layers to fuse."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(5, 6, 3, stride=2, padding=1), nn.ReLU())
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, classes)

    def forward(self, x):
        a = self.stage2(self.stage1(x)).mean(dim=(2, 3))
        return self.fc2(torch.tanh(self.fc1(a)))


@pytest.fixture
def smooth():
    torch.manual_seed(5)
    return tiny_bundle(SmoothHeadNet())


@pytest.fixture
def gap():
    torch.manual_seed(1)
    return tiny_bundle(GapNet())


@pytest.fixture
def x():
    torch.manual_seed(2)
    return torch.rand(3, 3, 16, 16)


def by_hand(bundle, inputs, score_fn):
    """A, g = ∂S/∂A and H·A for the head above ``features``, by plain autograd on the model's parts."""
    model = bundle.model
    A = model.features(inputs).detach()

    def total(a):
        return score_fn(model.head(a) if hasattr(model, "head") else model.fc(model.pool(a).flatten(1))).sum()

    A1 = A.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(total(A1), A1)
    _, hv = torch.autograd.functional.hvp(total, A, A)  # an independent route to H·A
    return A, g, hv


def pick(targets, contrast=None):
    def score(logits):
        s = logits.gather(1, targets.view(-1, 1)).squeeze(1)
        return s if contrast is None else s - logits.gather(1, contrast.view(-1, 1)).squeeze(1)

    return score


def projection_by_hand(M: torch.Tensor, reference: torch.Tensor | None) -> np.ndarray:
    """numpy: channel-centred HW×C, first right singular vector, sign by the reference (else the peak)."""
    out = []
    for i, m in enumerate(M.double().numpy()):
        X = m.reshape(m.shape[0], -1).T
        X = X - X.mean(axis=0)
        _, _, vt = np.linalg.svd(X, full_matrices=False)
        p = X @ vt[0]
        ref = None if reference is None else reference[i].double().numpy().ravel()
        s = np.sign(p @ ref) if ref is not None and abs(p @ ref) > 1e-9 else np.sign(p[np.argmax(np.abs(p))])
        out.append((s * p).reshape(m.shape[1:]))
    return np.stack(out)


def raw(result, method):
    return torch.from_numpy(result.raw[method])


# --------------------------------------------------------------------------------------------------
# The definitions


def test_shapleycam_is_gradcam_on_a_gap_linear_head(gap, x):
    result = vislib.explain(gap, x, ["gradcam", "shapleycam"])
    torch.testing.assert_close(raw(result, "shapleycam"), raw(result, "gradcam"), rtol=1e-6, atol=1e-8)


def test_shapleycam_hessian_term_by_hand(smooth, x):
    result = vislib.explain(smooth, x, ["shapleycam", "gradcam"], target=[0, 3, 1])
    A, g, hv = by_hand(smooth, x, pick(torch.tensor([0, 3, 1])))
    assert hv.abs().max() > 1e-4 * g.abs().max()  # the test means something: H·A ≠ 0 here
    w = (g - 0.5 * hv).mean(dim=(2, 3))
    expected = F.relu(torch.einsum("nc,nchw->nhw", w, A))
    torch.testing.assert_close(raw(result, "shapleycam"), expected, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(raw(result, "shapleycam"), raw(result, "gradcam"))


def test_elementwise_equals_layercam_when_activations_and_gradients_are_nonnegative(gap, x):
    with torch.no_grad():
        gap.model.fc.weight.abs_()  # g = w_c / Z ≥ 0; A ≥ 0 after the ReLU
    result = vislib.explain(gap, x, ["gradcam_elementwise", "layercam", "hirescam"])
    torch.testing.assert_close(raw(result, "gradcam_elementwise"), raw(result, "layercam"))
    torch.testing.assert_close(raw(result, "gradcam_elementwise"), raw(result, "hirescam"))


def test_elementwise_by_hand_on_a_smooth_head(smooth, x):
    result = vislib.explain(smooth, x, ["gradcam_elementwise"], target=2)
    A, g, _ = by_hand(smooth, x, pick(torch.tensor([2, 2, 2])))
    torch.testing.assert_close(raw(result, "gradcam_elementwise"), F.relu(g * A).sum(dim=1), rtol=1e-5, atol=1e-8)


def test_eigengradcam_is_eigencam_of_g_times_a(smooth, x):
    result = vislib.explain(smooth, x, ["eigengradcam"], target=1)
    A, g, _ = by_hand(smooth, x, pick(torch.tensor([1, 1, 1])))
    product = g * A
    expected = np.maximum(projection_by_hand(product, product.sum(dim=1)), 0)
    np.testing.assert_allclose(result.raw["eigengradcam"], expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    # and Eigen-CAM's own (centred) projection of g ⊙ A, up to its sign convention
    proj, _ = eigen_cam(product, center=True)
    ours = raw(result, "eigengradcam")
    for i in range(len(x)):
        assert any(torch.allclose(ours[i], F.relu(s * proj[i]), rtol=1e-4, atol=1e-6 * float(ours[i].max()))
                   for s in (1, -1))


def kpca_by_hand(A: torch.Tensor, kernel: str = "sigmoid") -> np.ndarray:
    """numpy: centred HW×C rows, kernel, J K J with J = I − 11ᵀ/n, top eigenpair, v·√λ, peak positive."""
    out = []
    for a in A.double().numpy():
        X = a.reshape(a.shape[0], -1).T
        X = X - X.mean(axis=0)
        n, c = X.shape
        K = np.tanh(X @ X.T / c + 1.0) if kernel == "sigmoid" else X @ X.T
        J = np.eye(n) - np.ones((n, n)) / n
        values, vectors = np.linalg.eigh(J @ K @ J)
        p = vectors[:, -1] * np.sqrt(max(values[-1], 0.0))
        out.append((p * np.sign(p[np.argmax(np.abs(p))])).reshape(a.shape[1:]))
    return np.stack(out)


@pytest.mark.parametrize("kernel", ["sigmoid", "linear"])
def test_kpcacam_against_an_independent_kernel_pca(gap, x, kernel):
    result = vislib.explain(gap, x, ["kpcacam"], options={"kpcacam": {"kernel": kernel}})
    A = gap.model.features(x).detach()
    expected = np.maximum(kpca_by_hand(A, kernel), 0)
    np.testing.assert_allclose(result.raw["kpcacam"], expected, rtol=1e-4, atol=1e-6 * expected.max())
    if kernel == "linear":  # linear-kernel PCA is PCA: the centred Eigen-CAM projection
        proj, _ = eigen_cam(A, center=True)
        np.testing.assert_allclose(result.raw["kpcacam"], F.relu(proj).numpy(), rtol=1e-3, atol=1e-5)


def finer_by_hand(logits, targets, alpha, count, weighting):
    gap = (logits - logits.gather(1, targets.view(-1, 1))).abs()
    gap[torch.arange(len(targets)), targets] = float("inf")
    classes = gap.argsort(dim=1)[:, :count]
    if weighting == "softmax":
        p = F.softmax(logits, dim=1).gather(1, classes)
        weights = p / p.sum(dim=1, keepdim=True)
    else:
        weights = torch.full(classes.shape, 1.0 / count)

    def score(lg):
        return lg.gather(1, targets.view(-1, 1)).squeeze(1) - alpha * (weights * lg.gather(1, classes)).sum(1)

    return classes, weights, score


@pytest.mark.parametrize("alpha,count,weighting", [(1.0, 3, "softmax"), (0.6, 2, "mean")])
def test_finercam_is_gradcam_of_the_contrastive_score(smooth, x, alpha, count, weighting):
    opts = {"alpha": alpha, "comparisons": count, "weighting": weighting}
    result = vislib.explain(smooth, x, ["finercam"], options={"finercam": opts})
    targets = torch.tensor(result.target)
    with torch.no_grad():
        logits = smooth.model(x)
    classes, weights, score = finer_by_hand(logits, targets, alpha, count, weighting)
    assert result.extras["finercam"]["comparisons"] == classes.tolist()
    A, g, _ = by_hand(smooth, x, score)
    expected = F.relu(torch.einsum("nc,nchw->nhw", g.mean(dim=(2, 3)), A))
    torch.testing.assert_close(raw(result, "finercam"), expected, rtol=1e-4, atol=1e-7)


def test_finercam_on_a_gap_head_is_the_difference_of_class_rows(gap, x):
    result = vislib.explain(gap, x, ["finercam"], target=0, options={"finercam": {"comparisons": 1}})
    d = torch.tensor(result.extras["finercam"]["comparisons"])[:, 0]
    A = gap.model.features(x).detach()
    W = gap.model.fc.weight.detach()
    Z = A.shape[2] * A.shape[3]
    expected = F.relu(torch.einsum("nc,nchw->nhw", (W[0] - W[d]) / Z, A))
    torch.testing.assert_close(raw(result, "finercam"), expected, rtol=1e-5, atol=1e-8)


def test_finercam_with_a_base_method(smooth, x):
    opts = {"finercam": {"base": "layercam"}}
    result = vislib.explain(smooth, x, ["finercam"], target=4, options=opts)
    with torch.no_grad():
        logits = smooth.model(x)
    _, _, score = finer_by_hand(logits, torch.tensor([4, 4, 4]), 1.0, 3, "softmax")
    A, g, _ = by_hand(smooth, x, score)
    torch.testing.assert_close(raw(result, "finercam"), (F.relu(g) * A).sum(dim=1), rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# Contrastive targets


@pytest.mark.parametrize("method", GRADIENT_NEW)
def test_every_new_gradient_method_explains_the_contrast(smooth, x, method):
    """explain(target=A, contrast=B) is the method applied to the gradient (and H·A) of S_A − S_B."""
    targets, contrast = torch.tensor([1, 2, 0]), torch.tensor([3, 0, 4])
    result = vislib.explain(smooth, x, [method], target=targets.tolist(), contrast=contrast.tolist())
    assert result.contrast == contrast.tolist()
    A, g, hv = by_hand(smooth, x, pick(targets, contrast))
    if method in ("gradcam_elementwise",):
        expected = F.relu(g * A).sum(dim=1)
    elif method == "eigengradcam":
        expected = torch.from_numpy(np.maximum(projection_by_hand(g * A, (g * A).sum(dim=1)), 0)).float()
    else:  # shapleycam; finercam with its contrast is Grad-CAM of S_A − α·S_B (α = 1)
        w = (g - 0.5 * hv if method == "shapleycam" else g).mean(dim=(2, 3))
        expected = F.relu(torch.einsum("nc,nchw->nhw", w, A))
    torch.testing.assert_close(raw(result, method), expected, rtol=1e-4, atol=1e-6 * float(expected.max()))


def test_finercam_with_a_contrast_compares_with_that_class_only(gap, x):
    result = vislib.explain(gap, x, ["finercam", "gradcam"], target=1, contrast=2)
    assert result.extras["finercam"]["comparisons"] == [[2]] * 3
    torch.testing.assert_close(raw(result, "finercam"), raw(result, "gradcam"), rtol=1e-5, atol=1e-9)


def test_contrastive_gradcam_is_the_difference_before_the_relu(smooth, x):
    """Grad-CAM's weights are linear in the score, on any head: the contrastive map is
    ReLU(Grad-CAM(A) − Grad-CAM(B)) with both maps taken before their ReLU."""
    ab = vislib.explain(smooth, x, ["gradcam"], target=1, contrast=3)
    A, g_a, _ = by_hand(smooth, x, pick(torch.tensor([1, 1, 1])))
    _, g_b, _ = by_hand(smooth, x, pick(torch.tensor([3, 3, 3])))
    before_relu = lambda g: torch.einsum("nc,nchw->nhw", g.mean(dim=(2, 3)), A)  # noqa: E731
    torch.testing.assert_close(raw(ab, "gradcam"), F.relu(before_relu(g_a) - before_relu(g_b)), rtol=1e-4,
                               atol=1e-8)


def test_kpcacam_refuses_a_contrast(gap, x):
    with pytest.raises(vislib.MethodError, match="gradient-based"):
        vislib.explain(gap, x, ["kpcacam"], contrast=1)


# --------------------------------------------------------------------------------------------------
# Options: eigen_smooth, aug_smooth, fuse_layers


@pytest.mark.parametrize("method", ["gradcam", "layercam"])
def test_eigen_smooth_is_the_first_component_of_the_weighted_activations(smooth, x, method):
    result = vislib.explain(smooth, x, [method], target=2, options={method: {"eigen_smooth": True}})
    A, g, _ = by_hand(smooth, x, pick(torch.tensor([2, 2, 2])))
    weighted = g.mean(dim=(2, 3))[:, :, None, None] * A if method == "gradcam" else F.relu(g) * A
    expected = np.maximum(projection_by_hand(weighted, weighted.sum(dim=1)), 0)
    np.testing.assert_allclose(result.raw[method], expected, rtol=1e-4, atol=1e-6 * expected.max())


def test_aug_smooth_is_the_mean_of_six_unflipped_min_maxed_maps(smooth, x):
    result = vislib.explain(smooth, x, ["gradcam", "hirescam"], options={"gradcam": {"aug_smooth": True}})
    target = result.target
    assert result.extras["gradcam"]["augmentations"] == 6
    maps = []
    for flip in (False, True):
        for factor in (0.9, 1.0, 1.1):
            xi = (x.flip(-1) if flip else x) * factor
            m = raw(vislib.explain(smooth, xi, ["gradcam"], target=target), "gradcam")
            m = m.flip(-1) if flip else m
            lo, hi = m.amin(dim=(1, 2), keepdim=True), m.amax(dim=(1, 2), keepdim=True)
            maps.append((m - lo) / (hi - lo))
    torch.testing.assert_close(raw(result, "gradcam"), torch.stack(maps).mean(dim=0), rtol=1e-4, atol=1e-6)
    # the other method did not take the option: its map is the plain one
    plain = vislib.explain(smooth, x, ["hirescam"], target=target)
    np.testing.assert_allclose(result.raw["hirescam"], plain.raw["hirescam"], rtol=1e-6)


def test_fuse_layers_is_layercams_max_of_scaled_maps():
    torch.manual_seed(7)
    bundle = vislib.load_model(TwoStageNet(), preprocess=tiny_bundle(GapNet()).preprocess,
                               default_layer="stage2", device="cpu")
    inputs = torch.rand(2, 3, 16, 16)
    fused = vislib.explain(bundle, inputs, ["layercam"], target=1,
                           options={"layercam": {"fuse_layers": ["stage1"]}})
    deep = raw(vislib.explain(bundle, inputs, ["layercam"], target=1, layer="stage2"), "layercam")
    shallow = raw(vislib.explain(bundle, inputs, ["layercam"], target=1, layer="stage1"), "layercam")
    assert deep.shape[-2:] == (4, 4) and shallow.shape[-2:] == (8, 8)
    unit = lambda m: m / m.amax(dim=(1, 2), keepdim=True)  # noqa: E731
    up = F.interpolate(unit(deep).unsqueeze(1), size=(8, 8), mode="bilinear", align_corners=False).squeeze(1)
    expected = torch.maximum(torch.tanh(2 * unit(shallow)), up)  # tanh(2·M̂) for the shallow map only
    torch.testing.assert_close(raw(fused, "layercam"), expected, rtol=1e-4, atol=1e-6)
    assert fused.extras["layercam"]["fused_layers"] == "stage2, stage1"


def test_options_are_checked():
    bundle = tiny_bundle(GapNet())
    inputs = torch.rand(1, 3, 16, 16)
    bad = [
        ({"gradcam": {"smooth": True}}, vislib.MethodError, "unknown option"),
        ({"gradcam": {"aug_smooth": "yes"}}, vislib.MethodError, "True or False"),
        ({"cam": {"fuse_layers": ["features.0"]}}, vislib.MethodError, "unknown option"),
        ({"eigengradcam": {"eigen_smooth": True}}, vislib.MethodError, "unknown option"),
        ({"kpcacam": {"kernel": "laplace"}}, vislib.MethodError, "kernel"),
        ({"kpcacam": {"gamma": -1}}, vislib.MethodError, "gamma"),
        ({"finercam": {"alpha": -1}}, vislib.MethodError, "alpha"),
        ({"finercam": {"comparisons": 0}}, vislib.MethodError, "comparisons"),
        ({"finercam": {"base": "scorecam"}}, vislib.MethodError, "base must be one of"),
        ({"finercam": {"weighting": "max"}}, vislib.MethodError, "weighting"),
        ({"layercam": {"fuse_layers": ["feature.0"]}}, vislib.LayerError, "did you mean"),
        ({"layercam": {"fuse_layers": 3}}, vislib.MethodError, "list of layer names"),
    ]
    for options, error, message in bad:
        method = next(iter(options))
        with pytest.raises(error, match=message):
            vislib.explain(bundle, inputs, [method], options=options)


# --------------------------------------------------------------------------------------------------
# Passes, batches, and the model left as it was


def test_passes_are_shared(gap, x, monkeypatch):
    calls = {"forward": 0, "grad": 0}
    handle = gap.model.register_forward_pre_hook(lambda *a: calls.__setitem__("forward", calls["forward"] + 1))
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls["grad"] += 1
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    try:
        vislib.explain(gap, x, ["gradcam", "gradcam_elementwise", "eigengradcam", "kpcacam", "hirescam"])
        assert calls == {"forward": 1, "grad": 1}
        calls.update(forward=0, grad=0)
        vislib.explain(gap, x, ["gradcam", "shapleycam", "finercam"])
        assert calls == {"forward": 1, "grad": 3}  # class score (graph kept), H·A, Finer-CAM's score
        calls.update(forward=0, grad=0)
        vislib.explain(gap, x, ["gradcam", "layercam"], options={"gradcam": {"aug_smooth": True},
                                                                 "layercam": {"aug_smooth": True}})
        assert calls == {"forward": 6, "grad": 6}
    finally:
        handle.remove()


def test_batch_equals_single_images(smooth, x):
    methods = NEW
    batch = vislib.explain(smooth, x, methods, target=[0, 3, None])
    for i, t in enumerate([0, 3, None]):
        single = vislib.explain(smooth, x[i], methods, target=t)
        for m in methods:
            np.testing.assert_allclose(single.maps[m], batch.maps[m][i], atol=2e-5)


OPTION_CASES = [
    (m, {}) for m in NEW
] + [
    ("gradcam", {"eigen_smooth": True}),
    ("shapleycam", {"aug_smooth": True}),
    ("finercam", {"base": "shapleycam", "fuse_layers": ["features.0"]}),
    ("kpcacam", {"fuse_layers": ["features.0"]}),
]


@pytest.mark.parametrize("method,opts", OPTION_CASES)
def test_model_untouched_after_success_and_failure(smooth, x, method, opts):
    before = snapshot(smooth.model)
    result = vislib.explain(smooth, x, [method], options={method: opts})
    assert np.isfinite(result.maps[method]).all() and result.maps[method].max() <= 1
    assert_untouched(smooth.model, before)
    original = smooth.model.fc2.forward
    smooth.model.fc2.forward = lambda _: (_ for _ in ()).throw(RuntimeError("boom"))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            vislib.explain(smooth, x, [method], options={method: opts})
    finally:
        smooth.model.fc2.forward = original
    assert_untouched(smooth.model, before)
    with torch.no_grad():
        vislib.explain(smooth, x, [method], options={method: opts})
        assert not torch.is_grad_enabled()


def test_shapleycam_refuses_a_head_without_second_derivatives(x):
    """torch has no double backward for hardsigmoid (in MobileNetV3's squeeze-excitation): a clear refusal."""
    torch.manual_seed(6)
    net = SmoothHeadNet()
    net.act = nn.Hardsigmoid()
    bundle = tiny_bundle(net)
    before = snapshot(bundle.model)
    with pytest.raises(vislib.MethodError, match="second derivatives.*use gradcam"):
        vislib.explain(bundle, x, ["shapleycam"])
    assert_untouched(bundle.model, before)
    assert vislib.explain(bundle, x, ["gradcam"]).maps["gradcam"].shape == (3, 16, 16)


def test_the_dashboard_lists_them_in_the_cam_group():
    from vislib import ui

    groups = ui.methods_by_family()
    assert set(NEW) <= set(groups["cam"])
    assert not any(ui.is_slow(m) for m in NEW)  # one forward each (ShapleyCAM: one more backward)
    assert all(ui.method_summary(m) for m in NEW)
