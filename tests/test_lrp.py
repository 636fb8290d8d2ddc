"""LRP through zennit: conservation, an independent hand computation of the rules, refusals, isolation.

The hand computation writes every layer as a matrix (its response to the unit inputs) and applies
the rules from their definitions in float64 (as zennit documents them, including its stabiliser
ε·sign(z) with sign(0) = +1 and the positive bias that its z⁺ rule adds to the denominator):

    ε     R_i = x_i Σ_j w_ij R_j / (z_j + ε)                      z_j = Σ_i x_i w_ij + b_j
    z⁺    R_i = Σ_j (x⁺_i w⁺_ij + x⁻_i w⁻_ij) R_j / (Σ_i (x⁺w⁺ + x⁻w⁻) + b⁺_j)
    flat  R_i = Σ_j m_ij R_j / Σ_i m_ij                            m: the connectivity
    z^B   R_i = Σ_j (x_i w_ij − l_i w⁺_ij − h_i w⁻_ij) R_j / (z_j − Σ l w⁺ − Σ h w⁻ − b⁺ − b⁻)
    γ     R_i = Σ_j x_i (w_ij + γ w⁺_ij) R_j / (Σ_i x_i (w + γw⁺) + b + γb⁺)   for z_j > 0 (x ≥ 0)
    sum   R_a = a R / (a + b)  for a residual sum a + b (zennit's Norm rule)
"""

from __future__ import annotations

import copy
import math
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import assert_untouched, snapshot
from torch import nn
from torchvision.models.resnet import BasicBlock

import vislib
from vislib.errors import Cancelled, MethodError, TargetError
from vislib.methods.lrp import cached_copy, has_hooks, unsupported_reason
from vislib.models import Preprocess, load_model

pytest.importorskip("zennit")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
EPS = 1e-6  # zennit's default ε and stabiliser
SIZE = 8
NORM = Preprocess(resize=SIZE, crop=SIZE, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


class Bomb(nn.Identity):
    """An identity (a layer LRP passes through) that raises while armed."""

    armed = False

    def forward(self, x):
        if Bomb.armed:
            raise RuntimeError("boom")
        return x


class LrpNet(nn.Module):
    """conv1 → ReLU → conv2 (→ batch norm) → ReLU → flatten → fc, on 8×8 inputs."""

    def __init__(self, bias: bool = True, bn: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(5) if bn else nn.Identity()
        self.relu2 = nn.ReLU(inplace=True)
        self.bomb = Bomb()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(5 * 4 * 4, 3, bias=bias)

    def forward(self, x):
        x = self.relu2(self.bn2(self.conv2(self.relu1(self.conv1(x)))))
        return self.fc(self.flatten(self.bomb(x)))


def lrp_net(bias: bool = True, bn: bool = False, seed: int = 0) -> LrpNet:
    torch.manual_seed(seed)
    net = LrpNet(bias, bn)
    with torch.no_grad():
        if bias:
            for layer in (net.conv1, net.conv2, net.fc):
                layer.bias.normal_(0, 0.2)
        if bn:
            net.bn2.running_mean.normal_(0, 0.3)
            net.bn2.running_var.uniform_(0.5, 1.5)
            net.bn2.weight.uniform_(0.5, 1.5)
            net.bn2.bias.normal_(0, 0.2)
    return net.eval()


def bundle_of(net: nn.Module):
    return load_model(net, preprocess=NORM, device="cpu")


# ------------------------------------------------------------------------------------ the hand rules


def dense(layer, in_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of an affine layer acting on flattened inputs (float64)."""
    n = math.prod(in_shape)
    with torch.no_grad():
        zero = layer(torch.zeros(1, *in_shape)).reshape(-1)
        basis = layer(torch.eye(n).view(n, *in_shape)).reshape(n, -1) - zero
    return basis.T.double(), zero.double()


def stab(z):
    return z + EPS * torch.where(z >= 0, 1.0, -1.0).double()


def eps_rule(x, W, b, R):
    return x * (W.T @ (R / stab(W @ x + b)))


def zplus_rule(x, W, b, R):
    Wp, Wn, xp, xn = W.clamp(min=0), W.clamp(max=0), x.clamp(min=0), x.clamp(max=0)
    s = R / stab(Wp @ xp + b.clamp(min=0) + Wn @ xn)
    return xp * (Wp.T @ s) + xn * (Wn.T @ s)


def flat_rule(M, R):
    return M.T @ (R / stab(M @ torch.ones(M.shape[1], dtype=M.dtype)))


def zbox_rule(x, W, b, low, high, R):
    Wp, Wn = W.clamp(min=0), W.clamp(max=0)
    s = R / stab((W @ x + b) - (Wp @ low + b.clamp(min=0)) - (Wn @ high + b.clamp(max=0)))
    return x * (W.T @ s) - low * (Wp.T @ s) - high * (Wn.T @ s)


def gamma_rule(x, W, b, R, gamma=0.25):
    """zennit's generalised γ rule on non-negative inputs (after a ReLU): z > 0 and z < 0 apart."""
    assert bool((x >= 0).all())
    z = W @ x + b
    Wpos, Wneg = W + gamma * W.clamp(min=0), W + gamma * W.clamp(max=0)
    s_pos = (z > 0) * R / stab(Wpos @ x + b + gamma * b.clamp(min=0))
    s_neg = (z < 0) * R / stab(Wneg @ x + b + gamma * b.clamp(max=0))
    return x * (Wpos.T @ s_pos) + x * (Wneg.T @ s_neg)


def connectivity(conv: nn.Conv2d, in_shape) -> torch.Tensor:
    ones = copy.deepcopy(conv)
    with torch.no_grad():
        ones.weight.fill_(1.0)
    ones.bias = None
    return dense(ones, in_shape)[0]


def merged(conv: nn.Conv2d, bn) -> nn.Conv2d:
    """The convolution with the batch norm after it folded in (what zennit's canonizer does)."""
    out = copy.deepcopy(conv)
    if isinstance(bn, nn.BatchNorm2d):
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        with torch.no_grad():
            out.weight.mul_(scale.view(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.bias)
            out.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
    return out


def bounds(n_pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = torch.tensor(NORM.mean).double(), torch.tensor(NORM.std).double()
    return ((0 - mean) / std).repeat_interleave(n_pixels), ((1 - mean) / std).repeat_interleave(n_pixels)


def hand_lrp(net: LrpNet, x: torch.Tensor, R_out: torch.Tensor, composite: str):
    """(input relevance 3×8×8, absorbed relevance) of one image."""
    with torch.no_grad():
        y1 = net.relu1(net.conv1(x))
    conv2 = merged(net.conv2, net.bn2)
    with torch.no_grad():
        y2 = F.relu(conv2(y1))
    W1, b1 = dense(net.conv1, (3, SIZE, SIZE))
    W2, b2 = dense(conv2, tuple(y1.shape[1:]))
    Wf, bf = dense(net.fc, (y2.numel(),))
    x0, x1, x2 = x.reshape(-1).double(), y1.reshape(-1).double(), y2.reshape(-1).double()
    R2 = eps_rule(x2, Wf, bf, R_out.double())
    if composite == "epsilon_plus_flat":
        R1 = zplus_rule(x1, W2, b2, R2)
        R0 = flat_rule(connectivity(net.conv1, (3, SIZE, SIZE)), R1)
    else:
        R1 = gamma_rule(x1, W2, b2, R2)
        low, high = bounds(SIZE * SIZE)
        R0 = zbox_rule(x0, W1, b1, low, high, R1)
    return R0.view(3, SIZE, SIZE), float(R_out.sum() - R0.sum())


# ------------------------------------------------------------------------------------- conservation


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box"])
def test_relevance_is_conserved_on_a_bias_free_relu_net(composite):
    net = lrp_net(bias=False, seed=1)
    bundle = bundle_of(net)
    torch.manual_seed(2)
    x = torch.randn(3, 3, SIZE, SIZE)
    r = vislib.explain(bundle, x, methods=["lrp"], target=[0, 1, 2], options={"lrp": {"composite": composite}})
    with torch.no_grad():
        logits = net(x)[[0, 1, 2], [0, 1, 2]].numpy()
    sums = r.raw["lrp"].reshape(3, -1).sum(axis=1)
    np.testing.assert_allclose(sums, logits, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(r.extras["lrp"]["output_relevance"], logits, rtol=1e-5)
    np.testing.assert_allclose(r.extras["lrp"]["relevance_sum"], sums, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box"])
@pytest.mark.parametrize("bn", [False, True])
def test_zennit_equals_the_hand_computation_with_biases(composite, bn):
    """With biases, Σ R = logit − what the biases absorb; the batch norm is merged into conv2."""
    net = lrp_net(bias=True, bn=bn, seed=3)
    bundle = bundle_of(net)
    torch.manual_seed(4)
    x = torch.randn(2, 3, SIZE, SIZE)
    r = vislib.explain(bundle, x, methods=["lrp"], target=[2, 0], options={"lrp": {"composite": composite}})
    with torch.no_grad():
        logits = net(x)
    for i, t in enumerate((2, 0)):
        R_out = torch.zeros(3)
        R_out[t] = logits[i, t]
        expected, absorbed = hand_lrp(net, x[i:i + 1], R_out, composite)
        scale = float(expected.abs().max())
        np.testing.assert_allclose(r.raw["lrp"][i], expected.numpy(), rtol=1e-4, atol=1e-5 * scale)
        assert abs(absorbed) > 1e-3  # the biases do absorb relevance here
        np.testing.assert_allclose(r.extras["lrp"]["absorbed"][i], absorbed, rtol=1e-3, atol=1e-5)
    assert r.extras["lrp"]["canonizers"] == ["SequentialMergeBatchNorm"]


class ResidualNet(nn.Module):
    """conv → batch norm → ReLU → a torchvision BasicBlock → flatten → fc (8×8 inputs)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.block = BasicBlock(4, 4)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * SIZE * SIZE, 3)

    def forward(self, x):
        return self.fc(self.flatten(self.block(self.relu(self.bn(self.conv(x))))))


def test_resnet_blocks_split_relevance_between_the_branches():
    torch.manual_seed(5)
    net = ResidualNet()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    net.eval()
    bundle = bundle_of(net)
    x = torch.randn(1, 3, SIZE, SIZE)
    r = vislib.explain(bundle, x[0], methods=["lrp"], target=1)
    assert r.extras["lrp"]["canonizers"] == ["ResNetCanonizer"]
    # by hand: fc ε; ReLU; the sum by the Norm rule; conv2, conv1 (batch norms merged) by z⁺; flat
    blk = net.block
    conv1, conv2 = merged(blk.conv1, blk.bn1), merged(blk.conv2, blk.bn2)
    with torch.no_grad():
        h0 = net.relu(net.bn(net.conv(x)))
        y1 = F.relu(conv1(h0))
        c2 = conv2(y1)
        out_b = F.relu(c2 + h0)
        logits = net.fc(out_b.flatten(1))
    shape = tuple(h0.shape[1:])
    Wf, bf = dense(net.fc, (out_b.numel(),))
    W1, b1 = dense(conv1, shape)
    W2, b2 = dense(conv2, shape)
    h, y, c, o = (t.reshape(-1).double() for t in (h0, y1, c2, out_b))
    R_out = torch.zeros(3, dtype=torch.float64)
    R_out[1] = logits[0, 1]
    R_sum = eps_rule(o, Wf, bf, R_out)
    R_c2 = c * R_sum / stab(c + h)
    R_identity = h * R_sum / stab(c + h)
    R_h = zplus_rule(h, W1, b1, zplus_rule(y, W2, b2, R_c2)) + R_identity
    expected = flat_rule(connectivity(net.conv, (3, SIZE, SIZE)), R_h).view(3, SIZE, SIZE)
    scale = float(expected.abs().max())
    np.testing.assert_allclose(r.raw["lrp"], expected.numpy(), rtol=1e-4, atol=1e-5 * scale)


def test_contrast_starts_from_both_logits():
    """R_out = e_A·z_A − e_B·z_B: the relevance of S_A − S_B (and, the rules being linear in R_out, the
    difference of the two classes' relevances)."""
    net = lrp_net(seed=6)
    bundle = bundle_of(net)
    torch.manual_seed(7)
    x = torch.randn(1, 3, SIZE, SIZE)
    r = vislib.explain(bundle, x[0], methods=["lrp"], target=0, contrast=2)
    with torch.no_grad():
        logits = net(x)[0]
    R_out = torch.tensor([logits[0], 0.0, -logits[2]])
    expected, _ = hand_lrp(net, x, R_out, "epsilon_plus_flat")
    np.testing.assert_allclose(r.raw["lrp"], expected.numpy(), rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    np.testing.assert_allclose(r.extras["lrp"]["output_relevance"][0], float(logits[0] - logits[2]), rtol=1e-5)
    a = vislib.explain(bundle, x[0], methods=["lrp"], target=0).raw["lrp"]
    b = vislib.explain(bundle, x[0], methods=["lrp"], target=2).raw["lrp"]
    np.testing.assert_allclose(r.raw["lrp"], a - b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("build,expected", [
    (lambda: torchvision.models.densenet121(weights=None), r"\(DenseNet\).*BatchNorm2d.*does not follow"),
    (lambda: torchvision.models.efficientnet_b0(weights=None), r"\(EfficientNet\).*SiLU activation"),
    (lambda: torchvision.models.mobilenet_v3_small(weights=None), r"\(MobileNet\).*Hardswish activation"),
    (lambda: torchvision.models.convnext_tiny(weights=None), r"\(ConvNeXt\).*(LayerNorm|own parameters)"),
    (lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                                  hidden_dim=8, mlp_dim=16), r"\(vision transformer\)"),
])
def test_architectures_zennit_cannot_canonize_are_refused_by_their_module_types(build, expected):
    torch.manual_seed(0)
    reason = unsupported_reason(build())
    assert reason is not None
    assert reason.startswith("lrp cannot explain this model")
    assert __import__("re").search(expected, reason), reason


def test_supported_architectures_pass_the_type_check():
    for build in (torchvision.models.resnet18, torchvision.models.vgg11_bn, torchvision.models.alexnet):
        assert unsupported_reason(build(weights=None)) is None
    assert unsupported_reason(lrp_net(bn=True)) is None


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.relu, self.pool, self.fc = nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Linear(4, 3)

    def forward(self, x):
        h = self.relu(self.conv1(x))
        return self.fc(self.pool(self.relu(h + self.conv2(h))).flatten(1))


class FunctionalGelu(Residual):
    def forward(self, x):
        return self.fc(self.pool(F.gelu(self.conv2(self.relu(self.conv1(x))))).flatten(1))


class Gated(Residual):
    def forward(self, x):
        h = self.relu(self.conv1(x))
        return self.fc(self.pool(h * torch.sigmoid(self.conv2(h))).flatten(1))


class InstanceNormNet(Residual):
    def __init__(self):
        super().__init__()
        self.norm = nn.GroupNorm(4, 4)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.norm(self.conv1(x)))).flatten(1))


@pytest.mark.parametrize("net,expected", [
    (Residual, "adds two branches"), (FunctionalGelu, "calls gelu"), (Gated, "sigmoid"),
    (InstanceNormNet, "GroupNorm"),
])
def test_what_module_types_cannot_show_is_refused_during_the_forward(net, expected):
    torch.manual_seed(8)
    model = net()
    bundle = bundle_of(model)
    before = snapshot(model)
    with pytest.raises(MethodError, match=expected):
        vislib.explain(bundle, torch.randn(3, SIZE, SIZE), methods=["lrp"])
    assert_untouched(model, before)
    entry = cached_copy(bundle)
    assert entry is None or not has_hooks(entry.bundle.model)


def test_options_probability_and_bounds_are_checked():
    bundle = bundle_of(lrp_net())
    x = torch.randn(3, SIZE, SIZE)
    for opts in ({"composite": "epsilon_alpha2_beta1"}, {"epsilon": -1.0}, {"gamma": "big"}, {"rule": "z+"}):
        with pytest.raises(MethodError, match="lrp"):
            vislib.explain(bundle, x, methods=["lrp"], options={"lrp": opts})
    with pytest.raises(MethodError, match="score='logit'"):
        vislib.explain(bundle, x, methods=["lrp"], score="probability")
    torch.manual_seed(9)
    custom = load_model(Residual(), preprocess=lambda img: torch.zeros(3, SIZE, SIZE), device="cpu")
    with pytest.raises(MethodError, match="normalisation"):
        vislib.explain(custom, x, methods=["lrp"], options={"lrp": {"composite": "epsilon_gamma_box"}})


def test_without_zennit_the_error_says_how_to_install_it(monkeypatch):
    bundle = bundle_of(lrp_net())
    for name in [m for m in sys.modules if m == "zennit" or m.startswith("zennit.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MethodError, match=r'pip install "vislib\[lrp\]".*pip install -r requirements-extras\.txt'):
        vislib.explain(bundle, torch.randn(3, SIZE, SIZE), methods=["lrp"])


# ------------------------------------------------------------------------------------------ isolation


def test_the_shared_model_is_untouched_and_no_hook_stays_on_the_copy():
    net = lrp_net(bn=True, seed=10)
    bundle = bundle_of(net)
    before = snapshot(net)
    x = torch.randn(2, 3, SIZE, SIZE)
    first = vislib.explain(bundle, x, methods=["lrp", "gradient"])
    assert first.extras["lrp"]["copy"] == "built now"
    assert_untouched(net, before)
    entry = cached_copy(bundle)
    assert entry is not None and entry.bundle.model is not net and not has_hooks(entry.bundle.model)
    for a, b in zip(entry.bundle.model.state_dict().values(), net.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the canonizer's merge was undone
    again = vislib.explain(bundle, x, methods=["lrp"], options={"lrp": {"composite": "epsilon_gamma_box"}})
    assert again.extras["lrp"]["copy"] == "cached" and cached_copy(bundle) is entry
    for failure, kwargs in ((TargetError, {"target": 9}), (Cancelled, {"cancel": threading.Event()})):
        if "cancel" in kwargs:
            kwargs["cancel"].set()
        with pytest.raises(failure):
            vislib.explain(bundle, x, methods=["lrp"], **kwargs)
        assert_untouched(net, before)
        assert cached_copy(bundle) is entry and not has_hooks(entry.bundle.model)
    Bomb.armed = True
    try:
        with pytest.raises(RuntimeError, match="boom"):
            vislib.explain(bundle, x, methods=["lrp"])
    finally:
        Bomb.armed = False
    assert_untouched(net, before)
    assert cached_copy(bundle) is None  # an unexpected failure drops the copy
    assert not has_hooks(entry.bundle.model)
    assert torch._C._len_torch_function_stack() == 0
    after = vislib.explain(bundle, x, methods=["lrp"])
    assert after.extras["lrp"]["copy"] == "built now"
    np.testing.assert_allclose(after.raw["lrp"], first.raw["lrp"], rtol=1e-6, atol=0)


def test_changed_weights_make_a_new_copy():
    net = lrp_net(seed=11)
    bundle = bundle_of(net)
    x = torch.randn(1, 3, SIZE, SIZE)
    old = vislib.explain(bundle, x[0], methods=["lrp"], target=1).raw["lrp"]
    with torch.no_grad():
        net.conv2.weight.mul_(-1.5)  # in place: same tensors, new version counters
    new = vislib.explain(bundle, x[0], methods=["lrp"], target=1)
    assert new.extras["lrp"]["copy"] == "built now"
    with torch.no_grad():
        logit = net(x)[0, 1]
    expected, _ = hand_lrp(net, x, torch.tensor([0.0, float(logit), 0.0]), "epsilon_plus_flat")
    np.testing.assert_allclose(new.raw["lrp"], expected.numpy(), rtol=1e-4,
                               atol=1e-5 * float(expected.abs().max()))
    assert np.abs(new.raw["lrp"] - old).max() > 1e-3 * np.abs(old).max()


def test_two_threads_share_the_copy_safely():
    net = lrp_net(bn=True, seed=12)
    bundle = bundle_of(net)
    x = torch.randn(1, 3, SIZE, SIZE)
    expected = {t: vislib.explain(bundle, x, methods=["lrp"], target=t).raw["lrp"] for t in (0, 2)}
    errors: list[int] = []
    barrier = threading.Barrier(2)

    def worker(target: int):
        barrier.wait()
        for _ in range(8):
            got = vislib.explain(bundle, x, methods=["lrp", "gradient"], target=target).raw["lrp"]
            if not np.allclose(got, expected[target], rtol=1e-6, atol=1e-9):
                errors.append(target)

    threads = [threading.Thread(target=worker, args=(t,)) for t in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
