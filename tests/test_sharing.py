"""Shared passes: one forward for the CAM and backprop families of a view, and reuse across calls."""

import numpy as np
import pytest
import torch
import torchvision
from helpers import PLAIN, Counter, GapNet, assert_untouched, snapshot
from torch import nn

import vislib

CAMS = ["cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"]
BACKPROP = ["gradient", "deconvnet", "guided_backprop", "guided_gradcam", "input_x_gradient", "fullgrad"]


class CountedNet(nn.Module):
    """GapNet behind a Counter: how many images the model's forwards saw."""

    def __init__(self):
        super().__init__()
        self.counter = Counter()
        self.net = GapNet(channels=6, classes=4)

    def forward(self, x):
        return self.net(self.counter(x))


@pytest.fixture
def counted():
    torch.manual_seed(0)
    model = CountedNet()
    return vislib.load_model(model, preprocess=PLAIN, default_layer="net.features", device="cpu"), model.counter


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.rand(3, 3, 16, 16)


def assert_same(a, b, names):
    for m in names:
        np.testing.assert_allclose(a.raw[m], b.raw[m], rtol=1e-6, atol=1e-7, err_msg=m)
        np.testing.assert_allclose(a.maps[m], b.maps[m], rtol=0, atol=1e-6, err_msg=m)


def test_the_default_view_runs_one_forward_and_equals_separate_passes(counted, x):
    bundle, counter = counted
    before = snapshot(bundle.model)
    counter.images = 0
    together = vislib.explain(bundle, x, CAMS + BACKPROP, target=[0, 1, 2])
    assert counter.images == 3  # one forward of the batch for both families
    assert {"forward", "backward", "backward_gradient", "backward_deconvnet", "backward_guided"} \
        <= set(together.pass_timings)
    assert "backprop_forward" not in together.pass_timings
    cams = vislib.explain(bundle, x, CAMS, target=[0, 1, 2])
    backprop = vislib.explain(bundle, x, BACKPROP, target=[0, 1, 2])
    assert_same(together, cams, CAMS)
    assert_same(together, backprop, BACKPROP)
    assert together.extras["guided_gradcam"]["gradcam_pass"] == "shared with the CAM family"
    assert_untouched(bundle.model, before)


def test_sharing_holds_on_a_torchvision_resnet_with_inplace_relus():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    bundle = vislib.load_model(model, preprocess=vislib.Preprocess(resize=64, crop=64), device="cpu")
    x = torch.rand(2, 3, 64, 64)
    names = ["gradcam", "gradcam++", "layercam", "gradient", "deconvnet", "guided_backprop"]
    together = vislib.explain(bundle, x, names)
    apart = {**vislib.explain(bundle, x, names[:3]).raw, **vislib.explain(bundle, x, names[3:]).raw}
    for m in names:
        np.testing.assert_allclose(together.raw[m], apart[m], rtol=1e-5, atol=1e-6, err_msg=m)


def test_options_that_need_their_own_pass_are_left_to_the_runners(counted, x):
    bundle, counter = counted
    counter.images = 0
    result = vislib.explain(bundle, x, ["gradcam", "finercam", "guided_backprop"])
    assert counter.images == 6  # Finer-CAM's other score: the CAM family keeps its own forward
    counter.images = 0
    vislib.explain(bundle, x, ["gradcam", "guided_backprop"], options={"gradcam": {"aug_smooth": True}})
    assert counter.images == 3 * 7  # six augmented CAM forwards + the backprop forward
    assert set(result.maps) == {"gradcam", "finercam", "guided_backprop"}


def test_the_cache_reuses_passes_and_results(counted, x):
    bundle, counter = counted
    cache = vislib.PassCache()
    counter.images = 0
    first = vislib.explain(bundle, x, ["gradcam", "guided_backprop", "scorecam"], cache=cache)
    seen = counter.images
    assert first.reused == []
    counter.images = 0
    second = vislib.explain(bundle, x, ["gradcam", "guided_backprop", "scorecam", "layercam"], cache=cache)
    assert counter.images == 0  # LayerCAM from the recorded CAM pass, the rest from the cache
    assert second.reused == ["gradcam", "guided_backprop", "scorecam"]
    assert_same(first, second, ["gradcam", "guided_backprop", "scorecam"])
    third = vislib.explain(bundle, x, ["gradcam", "layercam", "deconvnet"], cache=cache)
    assert counter.images == 3  # a new ReLU rule: its own forward and backward, nothing else
    fresh = vislib.explain(bundle, x, ["layercam", "deconvnet"])
    assert_same(third, fresh, ["layercam", "deconvnet"])
    assert seen > 3  # Score-CAM's masked forwards were not run again
    assert cache.hits == 3 + 2


def test_the_cache_misses_on_other_weights_inputs_layers_and_targets(counted, x):
    bundle, counter = counted
    cache = vislib.PassCache()
    vislib.explain(bundle, x, ["gradcam"], cache=cache)
    counter.images = 0
    vislib.explain(bundle, x, ["gradcam"], target=[3, 3, 3], cache=cache)
    vislib.explain(bundle, x[:2], ["gradcam"], cache=cache)
    vislib.explain(bundle, x, ["gradcam"], layer="net.features.1", cache=cache)
    assert counter.images == 3 + 2 + 3
    with torch.no_grad():
        bundle.model.net.fc.weight.mul_(2.0)
    counter.images = 0
    changed = vislib.explain(bundle, x, ["cam"], cache=cache)
    assert counter.images == 3 and changed.reused == []
    assert len(cache._entries) <= cache.max_entries


def test_the_cache_is_bounded():
    cache = vislib.PassCache(max_entries=2)
    torch.manual_seed(0)
    bundle = vislib.load_model(GapNet(), preprocess=PLAIN, device="cpu", default_layer="features")
    for i in range(4):
        vislib.explain(bundle, torch.full((1, 3, 16, 16), float(i)), ["gradcam"], cache=cache)
    assert len(cache._entries) == 2


def test_a_view_that_adds_a_method_reuses_the_rest(counted, x):
    from vislib import ui

    bundle, counter = counted
    cache = vislib.PassCache()
    image = vislib.sample_images()[0]
    first = ui.compute_view(bundle, str(image), ["gradcam", "guided_backprop"], layer="net.features", cache=cache)
    counter.images = 0
    second = ui.compute_view(bundle, str(image), ["gradcam", "guided_backprop", "hirescam"],
                             layer="net.features", cache=cache)
    assert counter.images == 0 and second.reused == ["gradcam", "guided_backprop"]
    a, b = first.rows[0].explanations["gradcam"], second.rows[0].explanations["gradcam"]
    np.testing.assert_array_equal(a.maps["gradcam"], b.maps["gradcam"])
