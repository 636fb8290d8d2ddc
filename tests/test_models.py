"""Model registry, weights loading (pretrained cache, user files) and torchvision coverage."""

import os

import pytest
import torch
from torch import nn

import vislib
from vislib.models import TORCHVISION_DEFAULT_LAYERS, pretrained_cache_path

TORCHVISION = sorted(TORCHVISION_DEFAULT_LAYERS)  # the classic eight at full size; every other one: test_sources_torchvision


def test_registry_lists_required_models():
    import torchvision

    listed = vislib.list_models("torchvision")
    assert set(TORCHVISION_DEFAULT_LAYERS) <= set(listed)
    modules = (torchvision.models, torchvision.models.detection, torchvision.models.segmentation)
    assert set(listed) == {n for m in modules for n in torchvision.models.list_models(module=m)}
    with pytest.raises(vislib.ModelError, match="unknown model"):
        vislib.load_model("resnet5000")


def test_registry_refuses_duplicates():
    from vislib.models import register_model

    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet18", source="torchvision")(lambda w: None)


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_model_builds_and_explains(name, rand_image):
    bundle = vislib.load_model(name, weights=None)
    assert not bundle.model.training
    assert bundle.default_layer in bundle.layers
    assert len(bundle.labels) == 1000 and bundle.labels[0] == "tench"
    assert bundle.weights == "random"
    result = vislib.explain(bundle, rand_image, methods=["gradcam", "gradcam++", "layercam"])
    assert result.maps["gradcam"].shape == (224, 224)
    assert result.input_image.size == (224, 224)
    c, h, w = bundle.layers[bundle.default_layer]
    assert result.raw["gradcam"].shape == (h, w) and h > 1


def test_cam_applies_on_resnet_but_not_vgg(rand_image):
    resnet = vislib.load_model("resnet18", weights=None)
    assert vislib.explain(resnet, rand_image, methods=["cam"]).maps["cam"].shape == (224, 224)
    vgg = vislib.load_model("alexnet", weights=None)
    with pytest.raises(vislib.MethodError, match="gradcam"):
        vislib.explain(vgg, rand_image, methods=["cam"])


def test_pretrained_weights_read_from_torch_home_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    enum = torchvision.models.ResNet18_Weights.DEFAULT
    path = pretrained_cache_path(enum)
    assert str(path).startswith(str(tmp_path))
    torch.manual_seed(5)
    reference = torchvision.models.resnet18()
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    assert vislib.models.pretrained_available("resnet18")
    bundle = vislib.load_model("resnet18")  # "default"
    assert bundle.weights == str(enum)
    torch.testing.assert_close(bundle.model.fc.weight, reference.fc.weight)


def test_missing_pretrained_weights_offline_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("VISLIB_OFFLINE", "1")
    with pytest.raises(vislib.WeightsError) as info:
        vislib.load_model("resnet50")
    message = str(info.value)
    assert "resnet50-" in message and ".pth" in message and str(tmp_path) in message
    assert "weights=None" in message


def test_user_state_dict_safetensors_and_pt(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(7)
    reference = torchvision.models.resnet18()
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        bundle = vislib.load_model("resnet18", weights=tmp_path / name)
        torch.testing.assert_close(bundle.model.conv1.weight, reference.conv1.weight)
        assert bundle.weights.endswith(name)


def test_mismatched_state_dict_names_keys_and_shapes(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in torchvision.models.resnet18().state_dict().items()}
    del state["layer1.0.conv1.weight"]
    state["fc.weight"] = torch.zeros(10, 512)
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(vislib.WeightsError) as info:
        vislib.load_model("resnet18", weights=tmp_path / "bad.safetensors")
    message = str(info.value)
    assert "layer1.0.conv1.weight" in message and "extra.weight" in message
    assert "fc.weight: file (10, 512) vs model (1000, 512)" in message


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"weight": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(vislib.WeightsError):
        vislib.load_model("resnet18", weights=tmp_path / "evil.pt")
    assert not marker.exists()


def test_users_own_module_is_accepted(rand_image):
    class Mine(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2))
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.body(x).mean(dim=(2, 3)))

    bundle = vislib.load_model(Mine(), device="cpu")
    assert bundle.labels == ["class 0", "class 1", "class 2"]
    assert bundle.default_layer == "body"
    assert "body.0" in bundle.layers and bundle.layers["body"][0] == 6
    result = vislib.explain(bundle, rand_image, methods=["cam", "gradcam"])
    assert result.maps["cam"].shape == (224, 224)


def test_shared_relu_module_is_not_offered_as_a_layer():
    import torchvision

    bundle = vislib.load_model(torchvision.models.resnet18(num_classes=3), device="cpu")
    assert "layer1.0.relu" not in bundle.layers  # called twice per forward
    with pytest.raises(vislib.LayerError, match="once per forward"):
        vislib.explain(bundle, torch.rand(3, 64, 64), layer="layer1.0.relu")


def test_random_init_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = vislib.load_model("resnet18", weights=None)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is untouched
    b = vislib.load_model("resnet18", weights=None)
    torch.testing.assert_close(a.model.fc.weight, b.model.fc.weight, rtol=0, atol=0)
