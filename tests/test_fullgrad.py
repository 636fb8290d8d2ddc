"""FullGrad (Srinivas & Fleuret 2019): completeness before ψ, ψ itself, one shared backward.

The expected values come from definitions, computed independently of vislib: the bias-gradients
from autograd on the *parameters* of a private copy (∂S/∂b of every conv / linear bias, ∂S/∂β of
batch norm, whose folded bias β − γμ/√(σ²+ε) has the same gradient), and ψ from per-position
gradients recorded with ``retain_grad`` on that copy.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import assert_untouched, snapshot
from torch import nn

import vislib
from vislib.errors import Cancelled, MethodError, TargetError
from vislib.methods.fullgrad import folded_bias
from vislib.models import Preprocess, load_model

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def randomize_batch_norms(net: nn.Module, seed: int = 0) -> nn.Module:
    """Batch-norm statistics and affine parameters away from their defaults (which fold to a zero bias)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(0.5 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                    m.bias.copy_(0.3 * torch.randn(c, generator=gen))
    return net.eval()


class BiasNet(nn.Module):
    """A ReLU net with every kind of bias: conv bias, affine and plain batch norm, linear bias;
    in-place ReLUs after batch norms, max-pool, global average pool."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(5)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(5, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6, affine=False)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(6, 4, 3, stride=2, padding=1, bias=bias)
        self.relu3 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3, bias=bias)

    def forward(self, x):
        x = self.pool(self.relu1(self.bn1(self.conv1(x))))
        x = self.relu3(self.conv3(self.relu2(self.bn2(self.conv2(x)))))
        return self.fc(self.gap(x).flatten(1))


def bias_net(bias: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = BiasNet(bias)
    if not bias:  # no bias anywhere: plain batch norms at their identity defaults, no affine shift
        net.bn1, net.bn2 = nn.Identity(), nn.Identity()
    return randomize_batch_norms(net, seed)


def bundle_of(net: nn.Module, size: int = 16):
    return load_model(net, preprocess=Preprocess(resize=size, crop=size), device="cpu")


def param_completeness(net: nn.Module, x: torch.Tensor, target: int, contrast: int | None = None):
    """(S, x·∇ₓS, Σ b·∂S/∂b) for one image from parameter gradients of a private copy."""
    ref = copy.deepcopy(net).requires_grad_(True)
    xg = x.detach().clone().requires_grad_(True)
    logits = ref(xg)
    score = logits[0, target] - (logits[0, contrast] if contrast is not None else 0)
    pairs = []  # (bias value, parameter whose gradient is ∂S/∂bias)
    for m in ref.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.GroupNorm)) and m.bias is not None:
            pairs.append((m.bias.detach(), m.bias))
    params = [p for _, p in pairs]
    grads = torch.autograd.grad(score, [xg, *params])
    bias_term = sum((b * g).sum() for (b, _), g in zip(pairs, grads[1:], strict=True))
    # batch norms: ∂S/∂(folded bias) = Σ_p ∂S/∂z(p), whatever its affine parameters
    outs = {}

    def record(mod, _inputs, out):
        outs[mod] = out
        return out.clone()  # the in-place ReLU after it must not overwrite it

    hooks = [m.register_forward_hook(record) for m in ref.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        logits = ref(xg)
    finally:
        for h in hooks:
            h.remove()
    score2 = logits[0, target] - (logits[0, contrast] if contrast is not None else 0)
    mods = list(outs)
    gz = torch.autograd.grad(score2, [outs[m] for m in mods]) if mods else []
    for m, g in zip(mods, gz, strict=True):
        inv = torch.rsqrt(m.running_var + m.eps)
        gamma = m.weight.detach() if m.affine else torch.ones_like(inv)
        beta = m.bias.detach() if m.affine else torch.zeros_like(inv)
        folded = beta - gamma * m.running_mean * inv
        bias_term = bias_term + (folded.view(1, -1, 1, 1) * g).sum()
    return float(score.detach()), float((xg * grads[0]).detach().sum()), float(bias_term)


def test_folded_bias_is_what_batch_norm_adds_in_eval_mode():
    for bn in (nn.BatchNorm2d(4), nn.BatchNorm2d(4, affine=False)):
        randomize_batch_norms(bn, seed=3)
        u = torch.randn(2, 4, 3, 3)
        scale = torch.rsqrt(bn.running_var + bn.eps) * (bn.weight if bn.affine else 1)
        expected = u * scale.view(1, -1, 1, 1) + folded_bias(bn).view(1, -1, 1, 1)
        torch.testing.assert_close(bn(u), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_completeness_before_psi_on_a_relu_net_with_biases_and_batch_norm(bias):
    net = bias_net(bias)
    bundle = bundle_of(net)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    r = vislib.explain(bundle, x, methods=["fullgrad"], target=[0, 2])
    extras = r.extras["fullgrad"]
    for i, t in enumerate((0, 2)):
        score, input_term, bias_term = param_completeness(net, x[i:i + 1], t)
        assert abs(score - (input_term + bias_term)) <= 1e-5 * max(1.0, abs(score))  # the identity itself
        assert abs(bias_term) > 1e-2 if bias else bias_term == 0
        np.testing.assert_allclose(extras["score"][i], score, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(extras["input_term"][i], input_term, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(extras["bias_term"][i], bias_term, rtol=1e-4, atol=1e-6)
        assert abs(extras["completeness_gap"][i]) <= 1e-5 * max(1.0, abs(score))
    assert extras["bias_layers"] == (5 if bias else 0)  # conv1, bn1, bn2 (plain), conv3, fc
    assert extras["spatial_terms"] == (4 if bias else 0)  # the linear bias has no map


def test_group_norm_shifts_count_as_biases_and_the_gap_says_completeness_fails_through_them():
    """Instance norm (GroupNorm(c, c), as in the bundled models): its β is a bias term, computed from
    the same backward; its statistics depend on x, so completeness does not hold and the gap says so."""
    torch.manual_seed(12)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.GroupNorm(4, 4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        net[1].bias.normal_(0, 0.5)
    bundle = bundle_of(net)
    x = torch.randn(1, 3, 16, 16)
    extras = vislib.explain(bundle, x[0], methods=["fullgrad"], target=2).extras["fullgrad"]
    score, input_term, bias_term = param_completeness(net, x, 2)
    assert extras["bias_layers"] == 2 and extras["spatial_terms"] == 1
    np.testing.assert_allclose(extras["bias_term"][0], bias_term, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(extras["input_term"][0], input_term, rtol=1e-4, atol=1e-6)
    assert abs(input_term) < 1e-3 * abs(score)  # scale-invariant below the norm (up to its eps): x·∇ₓS ≈ 0
    assert extras["relative_gap"][0] > 0.05


def test_completeness_holds_for_a_contrastive_score():
    net = bias_net()
    bundle = bundle_of(net)
    torch.manual_seed(2)
    x = torch.randn(1, 3, 16, 16)
    r = vislib.explain(bundle, x[0], methods=["fullgrad"], target=1, contrast=2)
    score, input_term, bias_term = param_completeness(net, x, 1, contrast=2)
    extras = r.extras["fullgrad"]
    with torch.no_grad():
        logits = net(x)[0]
    np.testing.assert_allclose(extras["score"][0], float(logits[1] - logits[2]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(extras["bias_term"][0], bias_term, rtol=1e-4, atol=1e-6)
    assert abs(extras["completeness_gap"][0]) <= 1e-5 * max(1.0, abs(score))


def test_completeness_on_resnet18_with_folded_batch_norms():
    net = randomize_batch_norms(torchvision.models.resnet18(weights=None), seed=4)
    bundle = load_model(net, preprocess=Preprocess(resize=32, crop=32), device="cpu")
    r = vislib.explain(bundle, torch.randn(3, 32, 32), methods=["fullgrad"], target=5)
    extras = r.extras["fullgrad"]
    assert extras["bias_layers"] == 21 and extras["spatial_terms"] == 20  # 20 batch norms + fc
    assert abs(extras["bias_term"][0]) > 1e-2
    assert extras["relative_gap"][0] < 1e-4


def psi_reference(net: nn.Module, x: torch.Tensor, target: int, mode: str) -> np.ndarray:
    """FullGrad's map from its definition, with per-position gradients from ``retain_grad``."""
    ref = copy.deepcopy(net)
    outs = []

    def keep(mod, _inputs, out):
        out.retain_grad()
        outs.append((mod, out))
        return out.clone()  # the in-place ReLU after it must not overwrite it

    spatial = [m for m in ref.modules() if isinstance(m, nn.Conv2d) and m.bias is not None
               or isinstance(m, nn.BatchNorm2d)]
    hooks = [m.register_forward_hook(keep) for m in spatial]
    xg = x.clone().requires_grad_(True)
    try:
        ref(xg)[0, target].backward()
    finally:
        for h in hooks:
            h.remove()
    size = x.shape[-2:]

    def minmax(a, axes):
        lo, hi = a.min(axis=axes, keepdims=True), a.max(axis=axes, keepdims=True)
        return np.where(hi > lo, (a - lo) / np.where(hi > lo, hi - lo, 1), 0.0)

    axes = (1, 2) if mode == "channel" else (0, 1, 2)
    total = minmax(np.abs((xg * xg.grad)[0].detach().numpy()), axes).sum(0)
    for mod, out in outs:
        if isinstance(mod, nn.BatchNorm2d):
            inv = torch.rsqrt(mod.running_var + mod.eps)
            gamma = mod.weight if mod.affine else torch.ones_like(inv)
            beta = mod.bias if mod.affine else torch.zeros_like(inv)
            b = (beta - gamma * mod.running_mean * inv).detach()
        else:
            b = mod.bias.detach()
        term = np.abs((b.view(-1, 1, 1) * out.grad[0]).numpy())
        layer_map = torch.from_numpy(minmax(term, axes).sum(0)).float()[None, None]
        up = F.interpolate(layer_map, size=size, mode="bilinear", align_corners=mode == "layer")
        total = total + up[0, 0].numpy()
    return total


@pytest.mark.parametrize("mode", ["channel", "layer"])
def test_map_is_psi_of_the_input_and_bias_terms(mode):
    net = bias_net(seed=5)
    bundle = bundle_of(net)
    torch.manual_seed(6)
    x = torch.randn(1, 3, 16, 16)
    r = vislib.explain(bundle, x[0], methods=["fullgrad"], target=1, options={"fullgrad": {"psi": mode}})
    expected = psi_reference(net, x, 1, mode)
    assert r.raw["fullgrad"].shape == (16, 16)
    np.testing.assert_allclose(r.raw["fullgrad"], expected, rtol=1e-4, atol=1e-5)
    assert r.extras["fullgrad"]["psi"] == mode


def test_one_forward_and_one_gradient_backward_serve_gradient_input_x_gradient_and_fullgrad():
    net = bias_net(seed=7)
    bundle = bundle_of(net)
    torch.manual_seed(8)
    x = torch.randn(2, 3, 16, 16)
    methods = ["gradient", "input_x_gradient", "fullgrad", "deconvnet"]
    together = vislib.explain(bundle, x, methods=methods, target=[1, 0])
    assert {k for k in together.pass_timings if k.startswith("backward")} == {"backward_gradient",
                                                                              "backward_deconvnet"}
    np.testing.assert_allclose(together.raw["input_x_gradient"], x.numpy() * together.raw["gradient"],
                               rtol=1e-6, atol=0)
    alone = vislib.explain(bundle, x, methods=["fullgrad"], target=[1, 0])
    np.testing.assert_allclose(together.raw["fullgrad"], alone.raw["fullgrad"], rtol=1e-5, atol=1e-6)


def test_options_are_checked():
    bundle = bundle_of(bias_net())
    for opts in ({"psi": "pixel"}, {"abs": False}):
        with pytest.raises(MethodError, match="fullgrad"):
            vislib.explain(bundle, torch.randn(3, 16, 16), methods=["fullgrad"], options={"fullgrad": opts})


class Bomb(nn.Module):
    armed = False

    def forward(self, x):
        if Bomb.armed:
            raise RuntimeError("boom")
        return x


def test_model_untouched_and_no_hook_left_after_success_and_failures():
    net = bias_net(seed=9)
    net.relu3 = nn.Sequential(nn.ReLU(), Bomb())
    bundle = bundle_of(net)
    before = snapshot(net)
    x = torch.randn(2, 3, 16, 16)
    vislib.explain(bundle, x, methods=["fullgrad", "guided_gradcam"], layer="conv3")
    assert_untouched(net, before)
    Bomb.armed = True
    try:
        with pytest.raises(RuntimeError, match="boom"):
            vislib.explain(bundle, x, methods=["fullgrad"])
    finally:
        Bomb.armed = False
    assert_untouched(net, before)
    with pytest.raises(TargetError):
        vislib.explain(bundle, x, methods=["fullgrad"], target=7)
    assert_untouched(net, before)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        vislib.explain(bundle, x, methods=["fullgrad"], cancel=cancel)
    assert_untouched(net, before)
    assert torch._C._len_torch_function_stack() == 0
