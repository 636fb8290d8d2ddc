"""Hugging Face image classifiers, built offline from config objects: folders, the hub cache, objects,
image processors turned into the same preprocessing, and the one-line errors."""

import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vislib
from vislib.models import Preprocess, sample_images
from vislib.models.huggingface import ProcessorTransform, preprocess_from_processor

transformers = pytest.importorskip("transformers")


def _vit():
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8, num_labels=5,
                                    id2label={i: f"kind {i}" for i in range(5)},
                                    label2id={f"kind {i}": i for i in range(5)})
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    return transformers.ViTForImageClassification(config), processor


def _convnext(num_labels=4):
    config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                         num_labels=num_labels)
    processor = transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875)
    return transformers.ConvNextForImageClassification(config), processor


def _resnet():
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                       num_labels=3)
    processor = transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875)
    return transformers.ResNetForImageClassification(config), processor


BUILDERS = {"vit": _vit, "convnext": _convnext, "resnet": _resnet}


@pytest.fixture
def saved(tmp_path):
    """kind → (folder written by save_pretrained, the model)."""

    def save(kind):
        torch.manual_seed(4)
        model, processor = BUILDERS[kind]()
        folder = tmp_path / kind
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        return folder, model.eval()

    return save


def _image(side=None):
    img = Image.open(sample_images()[3]).convert("RGB")
    return img if side is None else img.resize((side, side))


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_a_saved_folder_loads_with_its_labels_and_explains(kind, saved):
    folder, model = saved(kind)
    bundle = vislib.load_model(f"hf:{folder}", device="cpu")
    assert bundle.source == "hf" and bundle.labels_from == "config.id2label"
    assert bundle.labels == [model.config.id2label[i] for i in range(model.config.num_labels)]
    x = torch.randn(2, 3, *bundle.input_hw)
    torch.testing.assert_close(bundle.logits(x), model(x).logits)
    result = vislib.explain(bundle, _image(), methods=["gradcam"])
    c, h, w = bundle.layers[bundle.default_layer]
    assert result.raw["gradcam"].shape == (h, w) and h > 1
    assert not result.flat["gradcam"]


def test_random_weights_are_seeded_and_leave_the_saved_ones(saved):
    folder, model = saved("convnext")
    a = vislib.load_model(f"hf:{folder}", weights=None, device="cpu")
    b = vislib.load_model(f"hf:{folder}", weights=None, device="cpu")
    assert a.weights == "random"
    weight = "classifier.weight"
    torch.testing.assert_close(a.model.state_dict()[weight], b.model.state_dict()[weight], rtol=0, atol=0)
    assert not torch.equal(a.model.state_dict()[weight], model.state_dict()[weight])


def test_a_model_object_with_its_processor():
    torch.manual_seed(0)
    model, processor = _convnext()
    bundle = vislib.load_model(model, processor=processor, device="cpu")
    assert bundle.labels == [model.config.id2label[i] for i in range(4)]
    assert bundle.preprocess == preprocess_from_processor(processor)[0]
    assert bundle.preprocess.resize == int(64 / 0.875) and bundle.preprocess.crop == 64


PROCESSORS = {
    "vit": lambda P: P.ViTImageProcessorPil(size={"height": 40, "width": 56}),
    "deit": lambda P: P.DeiTImageProcessorPil(size={"height": 72, "width": 72}, crop_size={"height": 64, "width": 64}),
    "convnext-crop": lambda P: P.ConvNextImageProcessorPil(size={"shortest_edge": 64}, crop_pct=0.875),
    "convnext-384": lambda P: P.ConvNextImageProcessorPil(size={"shortest_edge": 384}),
    "bit": lambda P: P.BitImageProcessorPil(size={"shortest_edge": 72}, crop_size={"height": 64, "width": 64}),
    "levit": lambda P: P.LevitImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}),
    "poolformer": lambda P: P.PoolFormerImageProcessorPil(size={"shortest_edge": 54}, crop_pct=0.9,
                                                          crop_size={"height": 54, "width": 54}),
    "clip": lambda P: P.CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
    "mobilenet_v2": lambda P: P.MobileNetV2ImageProcessorPil(size={"shortest_edge": 72},
                                                             crop_size={"height": 64, "width": 64}),
}


@pytest.mark.parametrize("kind", list(PROCESSORS))
def test_image_processor_settings_give_the_same_tensor(kind):
    processor = PROCESSORS[kind](transformers)
    ours, note = preprocess_from_processor(processor)
    assert isinstance(ours, Preprocess) and note is None
    rng = np.random.default_rng(5)
    images = [_image(), Image.fromarray(rng.integers(0, 256, size=(120, 180, 3), dtype=np.uint8))]
    for img in images:
        expected = processor(images=img, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(ours(img), expected, rtol=0, atol=1e-6)


def test_a_processor_with_steps_of_its_own_is_kept_with_a_note():
    processor = transformers.MobileViTImageProcessor()  # flips RGB to BGR
    ours, note = preprocess_from_processor(processor)
    assert isinstance(ours, ProcessorTransform) and "MobileViTImageProcessor" in note
    img = _image()
    torch.testing.assert_close(ours(img), processor(images=img, return_tensors="pt")["pixel_values"][0])


def _no_network(monkeypatch):
    import socket

    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("tried the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


def test_a_hub_repo_is_read_from_the_cache_offline(tmp_path, monkeypatch, saved):
    folder, model = saved("resnet")
    cache = tmp_path / "hub"
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = cache / "models--acme--tiny-resnet"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    _no_network(monkeypatch)
    assert vislib.models.pretrained_available("hf:acme/tiny-resnet")
    assert "hf:acme/tiny-resnet" in vislib.list_models("hf")
    bundle = vislib.load_model("hf:acme/tiny-resnet", device="cpu")
    assert bundle.weights == "hf:acme/tiny-resnet"
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(bundle.logits(x), model(x).logits)


@pytest.mark.parametrize("weights", ["default", None])
def test_a_repo_missing_offline_gives_one_line(tmp_path, monkeypatch, weights):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    _no_network(monkeypatch)
    with pytest.raises(vislib.WeightsError) as info:
        vislib.load_model("hf:google/vit-base-patch16-224", weights=weights, device="cpu")
    message = str(info.value)
    assert "\n" not in message and "google/vit-base-patch16-224" in message
    assert str(tmp_path / "models--google--vit-base-patch16-224") in message and "config.json" in message


def test_a_state_dict_with_another_head(tmp_path, saved):
    from safetensors.torch import save_file

    folder, _ = saved("convnext")
    torch.manual_seed(9)
    seven, _ = _convnext(num_labels=7)
    save_file({k: v.contiguous() for k, v in seven.state_dict().items()}, str(tmp_path / "seven.safetensors"))
    bundle = vislib.load_model(f"hf:{folder}", weights=tmp_path / "seven.safetensors", device="cpu")
    assert len(bundle.labels) == 7 and any("7-class head" in n for n in bundle.notes)
    torch.testing.assert_close(bundle.model.classifier.weight, seven.classifier.weight, rtol=0, atol=0)


def test_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(vislib.ModelError, match="no Hugging Face model folder"):
        vislib.load_model(f"hf:{tmp_path / 'nothing'}", weights=None)
    transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                            intermediate_size=8).save_pretrained(tmp_path / "bert")
    with pytest.raises(vislib.ModelError, match="not an image classifier"):
        vislib.load_model(f"hf:{tmp_path / 'bert'}", weights=None)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(vislib.ModelError, match=r'pip install "vislib\[hf\]".*pip install -r requirements-extras'):
        vislib.load_model("hf:google/vit-base-patch16-224", weights=None)


def test_the_cli_explains_a_folder(saved, tmp_path, capsys):
    import json

    from vislib.cli import main

    folder, _ = saved("resnet")
    image = tmp_path / "in.png"
    _image().save(image)
    code = main(["explain", str(image), "--model", f"hf:{folder}", "--weights", "none", "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    scores = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert scores["model"] == f"hf:{folder}" and scores["weights"] == "random"
