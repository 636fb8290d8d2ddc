"""Zeiler & Fergus feature visualisations: feature maps, top-channel Deconvnet projections with their
receptive fields, whole-layer projections, first-layer filters.

Expected values come from hand-built reconstructions (unpool with the recorded switches, ReLU,
transposed convolution), analytic receptive fields of conv/pool chains, and direct weight reads.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

import vislib
from vislib import features
from vislib.errors import InputError, LayerError
from vislib.models import Preprocess, load_model

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


class ZFStack(nn.Module):
    """conv(3, p1) → ReLU → max-pool 2, twice, then a linear head (16×16 input)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def zf():
    torch.manual_seed(0)
    net = ZFStack()
    bundle = load_model(net, preprocess=Preprocess(resize=16, crop=16), device="cpu")
    torch.manual_seed(1)
    return net, bundle, torch.randn(3, 16, 16)


def forward_record(net: ZFStack, x: torch.Tensor) -> dict:
    with torch.no_grad():
        f1 = net.conv1(x[None])
        p1, idx1 = F.max_pool2d(F.relu(f1), 2, return_indices=True)
        f2 = net.conv2(p1)
        p2, idx2 = F.max_pool2d(F.relu(f2), 2, return_indices=True)
    return {"f1": f1, "idx1": idx1, "conv2": f2, "idx2": idx2, "pool2": p2}


def deconv_by_hand(net: ZFStack, rec: dict, layer: str, signal: torch.Tensor) -> torch.Tensor:
    """Project ``signal`` at ``layer`` ("pool2" or "conv2") down to the input, Zeiler & Fergus style."""
    with torch.no_grad():
        return _deconv_by_hand(net, rec, layer, signal)


def _deconv_by_hand(net, rec, layer, signal):
    R = signal
    if layer == "pool2":
        R = F.relu(F.max_unpool2d(R, rec["idx2"], 2, output_size=rec["conv2"].shape[-2:]))
    R = F.conv_transpose2d(R, net.conv2.weight, padding=1)
    R = F.relu(F.max_unpool2d(R, rec["idx1"], 2, output_size=rec["f1"].shape[-2:]))
    return F.conv_transpose2d(R, net.conv1.weight, padding=1)[0]


def outside_box(t) -> np.ndarray:
    """The reconstruction outside its receptive-field box."""
    top, left, bottom, right = t.box
    outside = t.reconstruction.copy()
    outside[:, top:bottom, left:right] = 0
    return outside


def analytic_rf(chain: list[tuple[int, int, int]], i: int, size: int) -> tuple[int, int]:
    """Input rows [start, stop) seen by unit ``i`` after a chain of (kernel, stride, padding)."""
    jump, start, extent = 1, 0, 1
    for k, s, p in chain:
        start -= p * jump
        extent += (k - 1) * jump
        jump *= s
    lo = start + i * jump
    return max(lo, 0), min(lo + extent, size)


# ------------------------------------------------------------------------------------------ feature maps


def test_feature_maps_are_the_layer_activation(zf):
    net, bundle, x = zf
    maps = features.feature_maps(bundle, x, "conv2")
    np.testing.assert_allclose(maps, forward_record(net, x)["conv2"][0].numpy(), rtol=1e-6, atol=1e-7)
    assert maps.shape == (6, 8, 8) and maps.dtype == np.float32


def test_tile_maps_layout_and_normalisation():
    maps = np.stack([np.full((2, 3), 5.0), np.arange(6.0).reshape(2, 3), -np.arange(6.0).reshape(2, 3)])
    grid = np.asarray(features.tile_maps(maps, columns=2, pad=1, background=7))
    assert grid.shape == (2 * 2 + 3, 2 * 3 + 3, 3)
    tile = lambda r, c: grid[1 + r * 3:1 + r * 3 + 2, 1 + c * 4:1 + c * 4 + 3, 0]  # noqa: E731
    assert np.all(tile(0, 0) == 0)  # a constant map is flat → 0
    np.testing.assert_array_equal(tile(0, 1), np.round(np.arange(6).reshape(2, 3) / 5 * 255))
    np.testing.assert_array_equal(tile(1, 0), np.round((5 - np.arange(6).reshape(2, 3)) / 5 * 255))
    assert np.all(tile(1, 1) == 7) and grid[0, 0, 0] == 7  # empty cell and padding
    big = features.tile_maps(maps, columns=3, pad=0, scale=4, colormap="viridis")
    assert big.size == (3 * 3 * 4, 2 * 4) and big.mode == "RGB"
    with pytest.raises(InputError):
        features.tile_maps(np.zeros((2, 3)))


# ------------------------------------------------------------------------------------ Deconvnet projections


@pytest.mark.parametrize("layer", ["conv2", "pool2"])
def test_top_channels_match_hand_built_single_activation_reconstructions(zf, layer):
    net, bundle, x = zf
    rec = forward_record(net, x)
    A = rec[layer][0]
    peak = A.flatten(1).max(dim=1).values
    expected_order = [c for c in torch.argsort(peak, descending=True).tolist() if peak[c] > 0][:4]
    tops = features.top_channels(bundle, x, layer, n=4)
    assert [t.channel for t in tops] == expected_order
    for t in tops:
        i, j = t.position
        assert A[t.channel, i, j] == pytest.approx(t.value) and t.value == pytest.approx(float(peak[t.channel]))
        signal = torch.zeros_like(rec[layer])
        signal[0, t.channel, i, j] = A[t.channel, i, j]
        expected = deconv_by_hand(net, rec, layer, signal).numpy()
        assert np.abs(expected).max() > 0
        np.testing.assert_allclose(t.reconstruction, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_receptive_fields_of_a_conv_pool_chain_are_analytic(zf):
    _, bundle, x = zf
    chains = {"conv1": [(3, 1, 1)], "pool1": [(3, 1, 1), (2, 2, 0)],
              "pool2": [(3, 1, 1), (2, 2, 0), (3, 1, 1), (2, 2, 0)]}
    for layer, chain in chains.items():
        positions = [(0, 0), (1, 2), (3, 1)]
        boxes = features.receptive_fields(bundle, layer, positions, x[None])
        for i, j in positions:
            top, bottom = analytic_rf(chain, i, 16)
            left, right = analytic_rf(chain, j, 16)
            assert boxes[(i, j)] == (top, left, bottom, right), (layer, i, j)


def test_receptive_field_of_torchvision_resnet_stem():
    torch.manual_seed(2)
    bundle = load_model(torchvision.models.resnet18(weights=None), preprocess=Preprocess(resize=64, crop=64),
                        device="cpu")
    stem = [(7, 2, 3)]
    for layer, chain in (("conv1", stem), ("maxpool", [*stem, (3, 2, 1)])):
        top, bottom = analytic_rf(chain, 10, 64)
        left, right = analytic_rf(chain, 5, 64)
        assert features.receptive_field(bundle, layer, (10, 5)) == (top, left, bottom, right)


@pytest.mark.parametrize("layer", ["relu3", "relu6"])
def test_zf_style_net_receptive_fields_and_projections(layer):
    """ShapesZFNet (random weights): conv 6/2 → pool 2 → conv 3, conv 3 (relu3) → pool 2 → conv 3,
    conv 3 → pool 2 → conv 3 (relu6)."""
    nets = pytest.importorskip("vislib.nets")
    torch.manual_seed(5)
    net = nets.ShapesZFNet(widths=(8, 8, 12, 12, 16, 16), hidden=16, input_size=64)
    bundle = load_model(net, preprocess=Preprocess(resize=64, crop=64), device="cpu")
    x = torch.randn(3, 64, 64)
    conv, pool = (3, 1, 1), (2, 2, 0)
    chain = [(6, 2, 2), pool, conv, conv]
    if layer == "relu6":
        chain += [pool, conv, conv, pool, conv]
    tops = features.top_channels(bundle, x, layer, n=5)
    assert len(tops) == 5
    for t in tops:
        i, j = t.position
        top, bottom = analytic_rf(chain, i, 64)
        left, right = analytic_rf(chain, j, 64)
        assert t.box == (top, left, bottom, right)
        assert np.abs(t.reconstruction_patch).sum() > 0 and not outside_box(t).any()


def test_projections_stay_inside_their_receptive_field_on_resnet():
    torch.manual_seed(3)
    bundle = load_model(torchvision.models.resnet18(weights=None), preprocess=Preprocess(resize=64, crop=64),
                        device="cpu")
    x = torch.randn(3, 64, 64)
    tops = features.top_channels(bundle, x, "layer1", n=3)
    assert len(tops) == 3 and tops[0].value >= tops[1].value >= tops[2].value
    for t in tops:
        top, left, bottom, right = t.box
        assert 0 < (bottom - top) * (right - left) < 64 * 64  # layer1 units see part of the image
        assert np.abs(t.reconstruction_patch).sum() > 0 and not outside_box(t).any()
        assert t.patch.size == (right - left, bottom - top) and t.render().size == t.patch.size


def test_patch_is_the_input_view_crop(zf):
    _, bundle, _ = zf
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    (t,) = features.top_channels(bundle, image, "pool1", n=1)
    top, left, bottom, right = t.box
    np.testing.assert_array_equal(np.asarray(t.patch), np.asarray(image)[top:bottom, left:right])


def test_project_layer_sends_the_whole_activation_down(zf):
    net, bundle, x = zf
    rec = forward_record(net, x)
    whole = features.project_layer(bundle, x, "pool2")
    np.testing.assert_allclose(whole, deconv_by_hand(net, rec, "pool2", rec["pool2"]).numpy(), atol=1e-5)
    keep = torch.zeros(1, 6, 1, 1)
    keep[0, [1, 4]] = 1
    some = features.project_layer(bundle, x, "pool2", channels=[1, 4])
    np.testing.assert_allclose(some, deconv_by_hand(net, rec, "pool2", rec["pool2"] * keep).numpy(), atol=1e-5)
    with pytest.raises(LayerError):
        features.project_layer(bundle, x, "pool2", channels=[6])


# ------------------------------------------------------------------------------------------------ filters


def test_first_layer_filters_are_the_conv1_weights(zf):
    net, bundle, _ = zf
    w = net.conv1.weight.detach().numpy().transpose(0, 2, 3, 1)
    each = features.first_layer_filters(bundle)
    assert each.shape == (4, 3, 3, 3)
    for k in range(4):
        np.testing.assert_allclose(each[k], (w[k] - w[k].min()) / (w[k].max() - w[k].min()), rtol=1e-6)
    shared = features.first_layer_filters(bundle, normalize="all")
    np.testing.assert_allclose(shared, 0.5 + 0.5 * w / np.abs(w).max(), rtol=1e-6)
    grid = features.filters_grid(bundle, scale=5, pad=1)
    assert grid.size == (2 * 15 + 3, 2 * 15 + 3)


# ------------------------------------------------------------------------------------------ hygiene


def test_model_is_left_clean_and_bad_input_is_refused(zf):
    net, bundle, x = zf
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules())  # noqa: E731
    flags = [p.requires_grad for p in net.parameters()]
    features.top_channels(bundle, x, "pool2", n=2)
    features.project_layer(bundle, x, "conv2")
    features.feature_maps(bundle, x, "conv1")
    with pytest.raises(LayerError):
        features.top_channels(bundle, x, "nope")
    with pytest.raises(InputError):
        features.top_channels(bundle, torch.randn(2, 3, 16, 16), "pool2")
    assert hooks() == 0 and [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters()) and not net.training
    assert torch._C._len_torch_function_stack() == 0 and torch.is_grad_enabled()


def test_concurrent_projections_agree_with_single_thread(zf):
    _, bundle, x = zf
    expected = features.project_layer(bundle, x, "pool2")
    expected_grad = vislib.explain(bundle, x, methods=["gradient"]).raw["gradient"]
    errors: list[str] = []

    def project():
        for _ in range(15):
            if not np.allclose(features.project_layer(bundle, x, "pool2"), expected, rtol=1e-6, atol=1e-8):
                errors.append("deconvnet")

    def gradient():
        for _ in range(15):
            got = vislib.explain(bundle, x, methods=["gradient"]).raw["gradient"]
            if not np.allclose(got, expected_grad, rtol=1e-6, atol=1e-8):
                errors.append("gradient")

    threads = [threading.Thread(target=project), threading.Thread(target=gradient)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


ZF_WEIGHTS = Path(vislib.models.MODELS_DIR) / "shapes_zf.safetensors"


@pytest.mark.skipif(not ZF_WEIGHTS.is_file(), reason="bundled shapes_zf weights not trained yet")
def test_top_channels_on_the_bundled_zf_net():
    bundle = load_model("shapes_zf", device="cpu")
    images = vislib.sample_images()
    image = images[0] if images else torch.randn(3, bundle.input_size, bundle.input_size)
    for layer in ("relu1", "relu2", "relu3"):
        tops = features.top_channels(bundle, image, layer, n=4)
        assert tops and all(t.value > 0 for t in tops)
        for t in tops:
            assert np.abs(t.reconstruction_patch).sum() > 0 and not outside_box(t).any()
