"""The torchvision zoo: every classifier, its own preprocessing, its head, offline weights."""

import os
import re
import time

import numpy as np
import pytest
import torch
import torchvision
from helpers import gradcam_top5
from PIL import Image

import vislib
from vislib.models import Preprocess, sample_images
from vislib.models.torchvision_zoo import preprocess_from_torchvision

NAMES = torchvision.models.list_models(module=torchvision.models)


def _images(rand_image):
    rng = np.random.default_rng(1)
    odd = Image.fromarray(rng.integers(0, 256, size=(233, 301, 3), dtype=np.uint8))  # odd crop margins
    return [Image.open(sample_images()[0]).convert("RGB"), rand_image, odd]


def test_preprocessing_equals_weights_transforms_for_every_model(rand_image):
    images = _images(rand_image)
    seen = set()
    for name in NAMES:
        transform = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        if repr(transform) in seen:
            continue
        seen.add(repr(transform))
        ours = preprocess_from_torchvision(transform)
        assert isinstance(ours, Preprocess)
        for img in images:
            expected = transform(img)
            got = ours(img)
            assert got.shape == expected.shape, name
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=name)
    assert len(seen) > 15  # resize / crop / interpolation really vary between the models


def test_bundle_uses_the_models_own_preprocessing_and_categories():
    bundle = vislib.load_model("efficientnet_b1", weights=None, device="cpu")
    transform = torchvision.models.EfficientNet_B1_Weights.DEFAULT.transforms()
    assert bundle.preprocess == preprocess_from_torchvision(transform)
    assert bundle.labels == torchvision.models.EfficientNet_B1_Weights.DEFAULT.meta["categories"]
    assert bundle.source == "torchvision" and bundle.weights == "random"


def test_a_state_dict_with_another_head_builds_the_model_with_that_many_classes(tmp_path, rand_image):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    reference = torchvision.models.resnet18(num_classes=10)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "ten.safetensors"))
    bundle = vislib.load_model("resnet18", weights=tmp_path / "ten.safetensors", device="cpu")
    assert bundle.labels == [f"class {i}" for i in range(10)]
    assert any("10-class head" in note for note in bundle.notes)
    torch.testing.assert_close(bundle.model.fc.weight, reference.fc.weight, rtol=0, atol=0)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(bundle.logits(x), reference.eval()(x))


def test_kwargs_reach_the_builder():
    bundle = vislib.load_model("mobilenet_v3_small", weights=None, kwargs={"num_classes": 4}, device="cpu")
    assert bundle.labels == ["class 0", "class 1", "class 2", "class 3"]
    with pytest.raises(vislib.ModelError, match="resnet18.*no_such_argument"):
        vislib.load_model("resnet18", weights=None, kwargs={"no_such_argument": 1}, device="cpu")


#: One model per torchvision architecture family (the smallest): the members of a family differ in
#: depth and width only. ``VISLIB_SWEEP=all`` sweeps all 80 (about 4× the time: the giants —
#: ViT-H/14, RegNetY-128GF, the VGGs — spend it building their random weights).
REPRESENTATIVE = [
    "alexnet", "vgg11", "resnet18", "resnext50_32x4d", "wide_resnet50_2", "densenet121", "googlenet",
    "inception_v3", "squeezenet1_1", "shufflenet_v2_x0_5", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5",
    "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny", "vit_b_32",
    "swin_t", "swin_v2_t", "maxvit_t",
]
SWEEP = NAMES if os.environ.get("VISLIB_SWEEP") == "all" else REPRESENTATIVE


def test_the_representatives_cover_every_family():
    family = lambda name: re.split(r"\d|_", name)[0]  # noqa: E731
    assert {family(n) for n in REPRESENTATIVE} == {family(n) for n in NAMES}
    assert set(REPRESENTATIVE) <= set(NAMES)


def _sweep_input(name: str, own: Preprocess) -> tuple[Preprocess, dict]:
    """A small input where the architecture allows: 128 px for the convolutional networks (inception
    needs 75+), the native size for the transformers (a random ViT-H/14 built at 224, not 518)."""
    if name.startswith(("vit_", "swin", "maxvit")):
        side = 256 if name.startswith("swin_v2") else 224
        kwargs = {"image_size": 224} if name.startswith("vit_") else {}
    else:
        side, kwargs = 128, {}
    pre = Preprocess(resize=side, crop=side, mean=own.mean, std=own.std, interpolation=own.interpolation)
    return pre, kwargs


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEP)
def test_every_torchvision_family_explains_gradcam_at_its_default_layer(name):
    image = Image.open(sample_images()[0]).convert("RGB")
    own = preprocess_from_torchvision(torchvision.models.get_model_weights(name).DEFAULT.transforms())
    pre, kwargs = _sweep_input(name, own)
    start, cpu = time.perf_counter(), time.process_time()
    bundle = vislib.load_model(name, weights=None, preprocess=pre, kwargs=kwargs, device="cpu")
    built = time.perf_counter() - start
    result = gradcam_top5(bundle, image)
    c, h, w = bundle.layers[bundle.default_layer]
    assert h > 1 and w > 1, bundle.default_layer
    assert result.raw["gradcam"].shape == (5, h, w)
    assert result.maps["gradcam"].shape == (5, pre.crop, pre.crop)
    assert not result.flat["gradcam"].all(), f"{name}: flat Grad-CAM at {bundle.default_layer}"
    assert np.isfinite(result.maps["gradcam"]).all()
    print(f"\n{name}: {time.perf_counter() - start:.1f}s wall ({built:.1f}s to load), "
          f"{time.process_time() - cpu:.1f}s CPU, at {bundle.default_layer} {bundle.layers[bundle.default_layer]}")
