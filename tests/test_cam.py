"""The CAM family against the equivalences of METHODS.md, on small analytic networks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import FlatNet, GapNet, assert_untouched, snapshot, tiny_bundle

import vislib
from vislib.hooks import capture_layer
from vislib.methods.cam import GradCAMPlusPlus, HiResCAM

SIX = ["cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"]


@pytest.fixture
def gap():
    torch.manual_seed(1)
    return tiny_bundle(GapNet())


@pytest.fixture
def x():
    torch.manual_seed(2)
    return torch.rand(3, 3, 16, 16)


def activation_and_gradient(bundle, inputs, targets):
    """A and ∂logit/∂A computed independently of the engine (plain autograd, no early stop)."""
    feats = bundle.model.features(inputs).detach().requires_grad_(True)
    logits = bundle.model.fc(bundle.model.pool(feats).flatten(1))
    (g,) = torch.autograd.grad(logits.gather(1, targets.view(-1, 1)).sum(), feats)
    return feats.detach(), g, logits.detach()


def test_gap_head_equivalences(gap, x):
    result = vislib.explain(gap, x, methods=SIX)
    targets = torch.tensor(result.target)
    A, g, logits = activation_and_gradient(gap, x, targets)
    Z = A.shape[2] * A.shape[3]
    W = gap.model.fc.weight.detach()[targets]  # N×C

    # g = w_ck / Z everywhere
    torch.testing.assert_close(g, (W / Z)[:, :, None, None].expand_as(g))
    raw = {m: torch.from_numpy(result.raw[m]) for m in SIX}
    cam_hand = F.relu(torch.einsum("nc,nchw->nhw", W, A))
    torch.testing.assert_close(raw["cam"], cam_hand)
    torch.testing.assert_close(raw["gradcam"] * Z, raw["cam"], rtol=1e-5, atol=1e-6)  # Grad-CAM·Z = CAM
    torch.testing.assert_close(raw["hirescam"], raw["gradcam"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(raw["xgradcam"], raw["gradcam"], rtol=1e-5, atol=1e-7)
    layercam_hand = F.relu(torch.einsum("nc,nchw->nhw", F.relu(W), A))  # CAM without negative channels
    torch.testing.assert_close(raw["layercam"] * Z, layercam_hand, rtol=1e-5, atol=1e-6)
    # the normalised maps agree too
    np.testing.assert_allclose(result.maps["gradcam"], result.maps["cam"], atol=1e-5)


def test_gradcampp_closed_form_on_gap_head(gap, x):
    targets = torch.tensor([0, 1, 2])
    A, g, _ = activation_and_gradient(gap, x, targets)
    Z = A.shape[2] * A.shape[3]
    gk = g[:, :, 0, 0]
    expected = Z * F.relu(gk) / (2 + gk * A.sum(dim=(2, 3)))  # w_k ∝ relu(g_k)/(2 + g_k Σ A^k)
    torch.testing.assert_close(GradCAMPlusPlus().channel_weights(A, g), expected, rtol=1e-5, atol=1e-9)


def test_gradcampp_weights_not_distorted_at_small_gradient_scale(gap, x):
    """Scaling the gradients by 1e-4 (deep-layer scale) must not change the normalised weights."""
    A, g, _ = activation_and_gradient(gap, x, torch.tensor([0, 1, 2]))
    method = GradCAMPlusPlus()
    w = method.channel_weights(A, g)
    w_small = method.channel_weights(A * 1e4, g * 1e-4)  # same g·ΣA products, tiny g
    torch.testing.assert_close(w / w.sum(1, keepdim=True), w_small / w_small.sum(1, keepdim=True), rtol=1e-4,
                               atol=1e-7)


def test_gradcampp_zero_denominator_gives_zero_weight():
    A = torch.zeros(1, 2, 2, 2)
    g = torch.zeros(1, 2, 2, 2)
    g[0, 1] = 0.5
    A[0, 1] = 1.0
    w = GradCAMPlusPlus().channel_weights(A, g)
    assert torch.isfinite(w).all() and w[0, 0] == 0 and w[0, 1] > 0


def test_flatten_head_hirescam_sums_to_logit():
    torch.manual_seed(3)
    bundle = tiny_bundle(FlatNet())
    inputs = torch.rand(2, 3, 16, 16)
    targets = torch.tensor([2, 0])
    module = bundle.model.features
    with capture_layer(module, grad=True) as cap, torch.no_grad():
        logits = bundle.model(inputs)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(logits.gather(1, targets.view(-1, 1)).sum(), cap.activation)
    saliency = HiResCAM().saliency(cap.activation.detach(), g)
    bias = bundle.model.fc.bias.detach()[targets]
    expected = logits.detach().gather(1, targets.view(-1, 1))[:, 0]
    torch.testing.assert_close(saliency.sum(dim=(1, 2)) + bias, expected)
    result = vislib.explain(bundle, inputs, methods=["hirescam"], target=targets.tolist())
    torch.testing.assert_close(torch.from_numpy(result.raw["hirescam"]), F.relu(saliency))


def test_cam_refuses_a_head_without_gap():
    bundle = tiny_bundle(FlatNet())
    with pytest.raises(vislib.MethodError, match="global-average-pool"):
        vislib.explain(bundle, torch.rand(1, 3, 16, 16), methods=["cam"])


def test_probability_score_uses_softmax_gradient(gap, x):
    result = vislib.explain(gap, x, methods=["gradcam"], target=1, score="probability")
    A, _, logits = activation_and_gradient(gap, x, torch.tensor([1, 1, 1]))
    Z = A.shape[2] * A.shape[3]
    p = F.softmax(logits, dim=1)
    W = gap.model.fc.weight.detach()
    # ∂p_c/∂A = p_c (∂S_c/∂A − Σ_j p_j ∂S_j/∂A), and ∂S_j/∂A = W_j / Z on a GAP head
    alpha = p[:, 1:2] * (W[1][None] - p @ W) / Z
    expected = F.relu(torch.einsum("nc,nchw->nhw", alpha, A))
    torch.testing.assert_close(torch.from_numpy(result.raw["gradcam"]), expected, rtol=1e-4, atol=1e-8)


def test_batch_equals_single_images(gap, x):
    batch = vislib.explain(gap, x, methods=SIX, target=[0, 3, None])
    assert batch.maps["gradcam"].shape == (3, 16, 16)
    for i, t in enumerate([0, 3, None]):
        single = vislib.explain(gap, x[i], methods=SIX, target=t)
        assert single.target == batch.target[i]
        for m in SIX:
            np.testing.assert_allclose(single.maps[m], batch.maps[m][i], atol=1e-5)
        np.testing.assert_allclose(single.probs, batch.probs[i], atol=1e-6)


def test_maps_range_dtype_and_resolution(gap, x):
    result = vislib.explain(gap, x[0], methods=SIX)
    for m in SIX:
        assert result.maps[m].dtype == np.float32 and result.maps[m].shape == (16, 16)
        assert result.maps[m].min() >= 0 and result.maps[m].max() <= 1
        assert result.raw[m].shape == (8, 8)
        assert result.timings[m] >= 0
    assert result.input_image.size == (16, 16)
    assert abs(result.probs.sum() - 1) < 1e-5


def test_flat_map_is_zeros_with_flag():
    net = GapNet()
    with torch.no_grad():
        net.features[2].weight.zero_()
        net.features[2].bias.fill_(-1.0)  # the target ReLU outputs zeros everywhere
    bundle = tiny_bundle(net)
    result = vislib.explain(bundle, torch.rand(1, 3, 16, 16), methods=SIX)
    for m in SIX:
        assert result.flat[m]
        assert np.all(result.maps[m] == 0) and np.isfinite(result.maps[m]).all()


def test_one_forward_and_one_backward_for_all_six(gap, x, monkeypatch):
    calls = {"forward": 0, "grad": 0}
    gap.model.register_forward_pre_hook(lambda *a: calls.__setitem__("forward", calls["forward"] + 1))
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls["grad"] += 1
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    vislib.explain(gap, x, methods=SIX)
    assert calls == {"forward": 1, "grad": 1}
    gap.model._forward_pre_hooks.clear()


def test_model_untouched_after_success_and_failure(gap, x):
    before = snapshot(gap.model)
    vislib.explain(gap, x, methods=SIX)
    assert_untouched(gap.model, before)
    with pytest.raises(vislib.TargetError):
        vislib.explain(gap, x, methods=SIX, target=99)
    assert_untouched(gap.model, before)
    with pytest.raises(vislib.LayerError):
        vislib.explain(gap, x, methods=SIX, layer="features.9")
    assert_untouched(gap.model, before)
    with torch.no_grad():  # caller's grad mode is respected and restored
        vislib.explain(gap, x, methods=SIX)
        assert not torch.is_grad_enabled()


def test_failure_inside_the_forward_leaves_model_clean(gap, x):
    before = snapshot(gap.model)
    original = gap.model.fc.forward

    def broken(_):
        raise RuntimeError("boom")

    gap.model.fc.forward = broken
    try:
        with pytest.raises(RuntimeError, match="boom"):
            vislib.explain(gap, x, methods=SIX)
    finally:
        gap.model.fc.forward = original
    assert_untouched(gap.model, before)


def test_targets_by_label_and_errors(gap, x):
    labelled = tiny_bundle(GapNet(), labels=["cat", "dog", "car", "tree"])
    assert vislib.explain(labelled, x[0], methods=["gradcam"], target="Dog").target == 1
    with pytest.raises(vislib.TargetError, match="did you mean"):
        vislib.explain(labelled, x[0], methods=["gradcam"], target="dgo")
    with pytest.raises(vislib.MethodError, match="unknown method"):
        vislib.explain(gap, x[0], methods=["gradcamm"])
    with pytest.raises(vislib.TargetError):
        vislib.explain(gap, x, methods=["gradcam"], target=[0, 1])


def test_inplace_op_above_the_target_layer():
    """A target whose output is modified in place above it (ResNet's bn3 then `+=`) still works."""
    import torchvision

    torch.manual_seed(0)
    bundle = vislib.load_model(torchvision.models.resnet18(num_classes=5), device="cpu")
    result = vislib.explain(bundle, torch.rand(3, 64, 64), methods=["gradcam", "hirescam"],
                            layer="layer4.1.bn2")
    assert result.raw["gradcam"].shape == (2, 2)
