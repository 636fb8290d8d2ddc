"""timm: names and tags, preprocessing equal to timm's own transform, labels, cached and missing weights."""

import types

import numpy as np
import pytest
import torch
from helpers import gradcam_top5
from PIL import Image

import vislib
from vislib.models import Preprocess, sample_images
from vislib.models.timm_zoo import imagenet_labels, preprocess_from_timm

timm = pytest.importorskip("timm")
from timm.data import create_transform, resolve_data_config  # noqa: E402


@pytest.fixture
def images(rand_image):
    rng = np.random.default_rng(2)
    odd = Image.fromarray(rng.integers(0, 256, size=(211, 297, 3), dtype=np.uint8))
    return [Image.open(sample_images()[1]).convert("RGB"), rand_image, odd]


def _config(**overrides):
    base = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center"}
    return {**base, **overrides}


@pytest.mark.parametrize("config", [
    _config(crop_pct=0.95),                                                     # resnet a1 recipes
    _config(),                                                                  # convnext
    _config(input_size=(3, 240, 240), crop_pct=0.9, interpolation="bilinear"),  # odd scale: floor(240 / 0.9)
    _config(crop_mode="squash", crop_pct=1.0, input_size=(3, 192, 160)),        # exact resize, non-square
    _config(crop_mode="squash", crop_pct=0.9, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
], ids=["crop95", "crop875", "bilinear240", "squash-nonsquare", "squash90"])
def test_preprocessing_equals_timms_eval_transform(config, images):
    ours, note = preprocess_from_timm(config)
    assert isinstance(ours, Preprocess) and note is None
    theirs = create_transform(**config, is_training=False)
    for img in images:
        torch.testing.assert_close(ours(img), theirs(img), rtol=0, atol=1e-6)


@pytest.mark.parametrize("config", [_config(crop_mode="border"), _config(input_size=(3, 192, 256))],
                         ids=["border", "center-nonsquare"])
def test_preprocessing_timm_cannot_be_expressed_keeps_timms_transform(config, images):
    ours, note = preprocess_from_timm(config)
    assert not isinstance(ours, Preprocess) and "timm's preprocessing" in note
    theirs = create_transform(**config, is_training=False)
    torch.testing.assert_close(ours(images[2]), theirs(images[2]), rtol=0, atol=0)


def test_model_preprocessing_comes_from_its_data_config(images):
    bundle = vislib.load_model("timm:resnet18", weights=None, device="cpu")
    expected = create_transform(**resolve_data_config({}, model=bundle.model), is_training=False)
    for img in images:
        torch.testing.assert_close(bundle.preprocess(img), expected(img), rtol=0, atol=1e-6)
    assert bundle.labels[:2] == ["tench", "goldfish"] and len(bundle.labels) == 1000
    assert bundle.source == "timm" and bundle.weights == "random" and "imagenet-1k" in bundle.labels_from


def test_labels_from_timms_imagenet_info():
    labels, origin = imagenet_labels(21841)
    assert len(labels) == 21841 and "imagenet-22k" in origin
    labels, origin = imagenet_labels(11821)
    assert len(labels) == 11821 and "imagenet-12k" in origin
    assert imagenet_labels(10) == (None, "class indices")
    offset = types.SimpleNamespace(label_offset=1, label_names=None, label_descriptions=None)
    labels, _ = imagenet_labels(1001, offset)
    assert labels[:2] == ["background", "tench"]


def test_random_model_with_another_class_count_gets_numbered_labels():
    bundle = vislib.load_model("timm:resnet18", weights=None, kwargs={"num_classes": 3}, device="cpu")
    assert bundle.labels == ["class 0", "class 1", "class 2"]


def test_names_and_tags_are_checked():
    with pytest.raises(vislib.ModelError, match="did you mean timm:resnet18"):
        vislib.load_model("timm:resnt18", weights=None)
    with pytest.raises(vislib.ModelError, match="no pretrained tag 'nope'.*a1_in1k"):
        vislib.load_model("timm:resnet18.nope", weights=None)
    assert "timm:vit_tiny_patch16_224" in vislib.list_models("timm")
    assert not any(n.startswith("timm:") for n in vislib.list_models())  # never listed eagerly


def test_a_feature_extractor_tag_is_refused():
    with pytest.raises(vislib.ModelError, match="no classifier head"):
        vislib.load_model("timm:vit_small_patch16_224.dino", weights=None, device="cpu")


def _fake_hf_cache(root, repo, files: dict):
    """A Hugging Face hub cache holding ``files`` of ``repo`` at one commit (what a download leaves)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, write in files.items():
        write(snapshot / name)
    return snapshot


def _no_network(monkeypatch):
    import socket

    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("tried the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_pretrained_weights_are_read_from_the_hf_cache_offline(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    _no_network(monkeypatch)
    torch.manual_seed(11)
    reference = timm.create_model("resnet18")
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    _fake_hf_cache(tmp_path, "timm/resnet18.a1_in1k", {"model.safetensors": lambda p: save_file(state, str(p))})
    assert vislib.models.pretrained_available("timm:resnet18")
    bundle = vislib.load_model("timm:resnet18", device="cpu")  # the default tag, a1_in1k
    assert bundle.weights == "timm:resnet18.a1_in1k"
    torch.testing.assert_close(bundle.model.fc.weight, reference.fc.weight, rtol=0, atol=0)


def test_missing_pretrained_weights_offline_give_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    _no_network(monkeypatch)
    assert not vislib.models.pretrained_available("timm:convnext_tiny.fb_in22k_ft_in1k")
    with pytest.raises(vislib.WeightsError) as info:
        vislib.load_model("timm:convnext_tiny.fb_in22k_ft_in1k", device="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert "timm/convnext_tiny.fb_in22k_ft_in1k" in message and str(tmp_path) in message
    assert "weights=None" in message


def test_a_state_dict_with_another_head_builds_that_many_classes(tmp_path):
    from safetensors.torch import save_file

    reference = timm.create_model("resnet18", num_classes=7)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "w.safetensors"))
    bundle = vislib.load_model("timm:resnet18", weights=tmp_path / "w.safetensors", device="cpu")
    assert len(bundle.labels) == 7 and any("7-class head" in n for n in bundle.notes)
    torch.testing.assert_close(bundle.model.fc.bias, reference.fc.bias, rtol=0, atol=0)


#: A sample of timm's CNNs and transformers (random weights), with an input size each allows.
SAMPLE = [("resnet18", 128), ("convnext_atto", 128), ("efficientnet_b0", 128), ("mobilenetv3_small_050", 128),
          ("vit_tiny_patch16_224", 224), ("deit_tiny_distilled_patch16_224", 224),
          ("swin_tiny_patch4_window7_224", 224), ("levit_128s", 224)]


@pytest.mark.parametrize("name, side", SAMPLE, ids=[n for n, _ in SAMPLE])
def test_timm_sample_builds_and_explains(name, side):
    """Grad-CAM of the top five classes (see ``gradcam_top5``). A random LeViT is flat past its first
    stage by construction: timm starts the attention-downsample projections at zero (BatchNorm weight
    0), so every token after them is the same; its default layer is checked, and the maps at its
    first stage."""
    image = Image.open(sample_images()[0]).convert("RGB")
    cfg = timm.models.get_pretrained_cfg(name)
    small = Preprocess(resize=side, crop=side, mean=cfg.mean, std=cfg.std)  # the native size for transformers
    bundle = vislib.load_model(f"timm:{name}", weights=None, device="cpu", preprocess=small)
    layer = "stages.0" if name.startswith("levit") else None
    result = gradcam_top5(bundle, image, layer)
    c, h, w = bundle.layers[bundle.default_layer]
    assert h > 1 and w > 1
    assert result.raw["gradcam"].shape[1:] == bundle.layers[layer or bundle.default_layer][1:]
    assert not result.flat["gradcam"].all(), f"{name}: flat at {result.layer}"
