"""Any model: exact inputs, output selection, input channels, non-square inputs, and layers as the
methods see them (token layers of vision transformers, channels-last layers of Swin)."""

import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from helpers import PLAIN, GapNet, assert_untouched, snapshot
from PIL import Image
from torch import nn

import vislib
from vislib.layers import LayerView, classify_outputs, grid_candidates
from vislib.models import sample_images


def independent_gradcam(model: nn.Module, x: torch.Tensor, module_name: str, target: int, to_map) -> torch.Tensor:
    """Grad-CAM from plain autograd on a private copy: the layer's output with retain_grad, one
    backward of the target logit, the output and its gradient read as maps by ``to_map``."""
    model = copy.deepcopy(model)
    store = {}

    def hook(_m, _i, out):
        out.retain_grad()
        store["out"] = out

    handle = model.get_submodule(module_name).register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(x)
            logits[0, target].backward()
    finally:
        handle.remove()
    A, g = to_map(store["out"].detach()), to_map(store["out"].grad)
    return F.relu(torch.einsum("nc,nchw->nhw", g.mean(dim=(2, 3)), A))[0]


def tokens_to_map(prefix: int, h: int, w: int):
    return lambda t: t[:, prefix:, :].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def image():
    return vislib.load_image(sample_images()[0])


# --------------------------------------------------------------------------------------------------
# Layer views: the pure functions


def test_layer_view_round_trip_tokens_and_channels_last():
    torch.manual_seed(0)
    tokens = torch.randn(2, 2 + 3 * 4, 5)
    view = LayerView("tokens", 5, (3, 4), prefix=2)
    A = view.to_map(tokens)
    assert A.shape == (2, 5, 3, 4)
    assert torch.equal(A[1, :, 2, 1], tokens[1, 2 + 2 * 4 + 1])  # row-major: token 2 + (i·w + j)
    assert torch.equal(view.from_map(A, tokens), tokens)
    nhwc = torch.randn(2, 3, 4, 5)
    view = LayerView("nhwc", 5, (3, 4))
    assert torch.equal(view.to_map(nhwc), nhwc.permute(0, 3, 1, 2))
    assert torch.equal(view.from_map(view.to_map(nhwc), nhwc), nhwc)


def test_grids_come_from_the_patch_embedding_and_its_halvings():
    assert grid_candidates((14, 14)) == {(14, 14), (7, 7), (4, 4), (3, 3), (2, 2), (1, 1)}
    shapes = {
        "patch": (1, 768, 14, 14),  # the patch embedding's convolution
        "block.norm1": (1, 197, 768),  # class token + 14×14
        "block.attn.k_norm": (1, 12, 197, 64),  # heads: no map
        "distilled": (1, 198, 768),  # class + distillation tokens
        "swin": (1, 7, 7, 768),  # channels-last
        "registers": (1, 201, 768),  # class + 4 register tokens
        "sequence": (1, 230, 768),  # no grid fits with ≤ 16 leading tokens: no map
        "merged": (1, 49, 768),  # a halved grid (patch merging)
    }
    views = classify_outputs(shapes, list(shapes), "patch", (224, 224))
    assert views["patch"] == LayerView("nchw", 768, (14, 14))
    assert views["block.norm1"] == LayerView("tokens", 768, (14, 14), 1)
    assert views["distilled"] == LayerView("tokens", 768, (14, 14), 2)
    assert views["swin"] == LayerView("nhwc", 768, (7, 7))
    assert views["merged"] == LayerView("tokens", 768, (7, 7), 0)
    assert views["registers"] == LayerView("tokens", 768, (14, 14), 5)
    assert "block.attn.k_norm" not in views and "sequence" not in views


def test_cnn_maps_stay_channels_first():
    shapes = {"conv1": (1, 64, 112, 112), "layer4": (1, 512, 7, 7), "odd": (1, 8, 147, 147)}
    views = classify_outputs(shapes, list(shapes), "conv1", (224, 224))
    assert all(v.layout == "nchw" for v in views.values()) and views["odd"].grid == (147, 147)


# --------------------------------------------------------------------------------------------------
# Vision transformers and Swin


def small_vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=5)


def test_torchvision_vit_default_is_the_last_blocks_first_norm_and_gradcam_matches_tokens(image):
    model = small_vit()
    pre = vislib.Preprocess(resize=64, crop=64)
    bundle = vislib.load_model(model, preprocess=pre, device="cpu")
    assert bundle.default_layer == "encoder.layers.encoder_layer_1.ln_1"
    assert "last block's first norm" in bundle.default_reason
    assert bundle.layers[bundle.default_layer] == (32, 4, 4)
    assert bundle.view(bundle.default_layer) == LayerView("tokens", 32, (4, 4), 1)
    assert bundle.layers["conv_proj"] == (32, 4, 4)  # the patch embedding is a layer, not the default
    assert "classifier's input" in bundle.default_reason  # torchvision initialises a ViT's head to zero
    with torch.no_grad():
        model.heads.head.weight.normal_()  # a head that makes the class scores depend on the image
    before = snapshot(bundle.model)
    result = vislib.explain(bundle, image, ["gradcam"], target=3)
    x, _ = bundle.prepare([image])
    expected = independent_gradcam(model, x, bundle.default_layer, 3, tokens_to_map(1, 4, 4))
    np.testing.assert_allclose(result.raw["gradcam"], expected.numpy(), rtol=1e-4, atol=1e-6)
    assert not result.flat["gradcam"]
    assert_untouched(bundle.model, before)


def test_a_layer_the_score_does_not_reach_gives_flat_maps_and_a_note(image):
    bundle = vislib.load_model(small_vit(), preprocess=vislib.Preprocess(resize=64, crop=64), device="cpu")
    result = vislib.explain(bundle, image, ["gradcam", "gradcam++", "layercam"], layer="encoder.ln")
    assert all(result.flat[m] for m in result.maps)
    assert all(np.isfinite(result.maps[m]).all() for m in result.maps)
    assert any("gradient is zero" in n for n in result.notes)


@pytest.mark.parametrize("name, prefix", [("vit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2)])
def test_timm_vits_read_tokens_on_the_patch_grid(name, prefix, image):
    model = timm.create_model(name, pretrained=False, num_classes=7)
    bundle = vislib.load_model(model, device="cpu")
    assert bundle.default_layer == "blocks.11.norm1"
    assert bundle.view("blocks.11.norm1") == LayerView("tokens", 192, (14, 14), prefix)
    assert not any(n.endswith("k_norm") or n.endswith("q_norm") for n in bundle.layers)
    result = vislib.explain(bundle, image, ["gradcam", "scorecam"], target=2,
                            options={"scorecam": {"batch_size": 64}})
    x, _ = bundle.prepare([image])
    expected = independent_gradcam(model, x, "blocks.11.norm1", 2, tokens_to_map(prefix, 14, 14))
    np.testing.assert_allclose(result.raw["gradcam"], expected.numpy(), rtol=1e-4, atol=1e-7)
    assert result.raw["scorecam"].shape == (14, 14)


def test_timm_swin_reads_its_channels_last_norm(image):
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=4,
                              depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 4, 8))
    bundle = vislib.load_model(model, device="cpu")
    assert bundle.default_layer == "norm"
    assert bundle.view("norm") == LayerView("nhwc", 256, (7, 7))
    assert bundle.layers["layers.0"] == (32, 56, 56)
    result = vislib.explain(bundle, image, ["gradcam"], target=1)
    x, _ = bundle.prepare([image])
    expected = independent_gradcam(model, x, "norm", 1, lambda t: t.permute(0, 3, 1, 2))
    np.testing.assert_allclose(result.raw["gradcam"], expected.numpy(), rtol=1e-4, atol=1e-7)


def test_levit_default_is_not_its_stem():
    model = timm.create_model("levit_128s", pretrained=False, num_classes=3)
    bundle = vislib.load_model(model, device="cpu")
    assert bundle.default_layer.startswith("stages"), bundle.default_reason
    assert bundle.layers[bundle.default_layer][1:] == (4, 4)


def test_cnn_defaults_reproduce_the_peers_choices():
    for name, layer in [("resnet18", "layer4"), ("alexnet", "features.11"), ("mobilenet_v3_small", "features")]:
        model = torchvision.models.get_model(name, weights=None)
        bundle = vislib.load_model(model, preprocess=vislib.Preprocess(resize=112, crop=112), device="cpu")
        assert bundle.default_layer == layer, (name, bundle.default_reason)
        assert "gradient reaches" in bundle.default_reason


# --------------------------------------------------------------------------------------------------
# Exact inputs, outputs, channels, sizes


def test_a_preprocessing_callable_is_applied_once_and_exactly(image):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    transform = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    bundle = vislib.load_model(model, preprocess=transform, device="cpu")
    result = vislib.explain(bundle, image, ["gradcam"])
    with torch.no_grad():
        expected = torch.softmax(model(transform(image).unsqueeze(0)), dim=1)[0].numpy()
    np.testing.assert_allclose(result.probs, expected, rtol=0, atol=1e-6)
    view = result.input_image  # from the geometry: resize 256 + centre crop 224 of the image
    assert view.size == (224, 224)
    geometric = torchvision.transforms.CenterCrop(224)(torchvision.transforms.Resize(256)(image))
    assert np.array_equal(np.asarray(view), np.asarray(geometric))


def test_a_preprocessing_that_is_not_idempotent_is_not_fed_back(image):
    """A transpose: applied twice it would undo itself; the model must see it once."""
    torch.manual_seed(0)
    model = GapNet(channels=4, classes=3).eval()

    def transposed(img):
        t = torchvision.transforms.functional.to_tensor(img.resize((16, 16)))
        return t.transpose(1, 2).contiguous()

    bundle = vislib.load_model(model, preprocess=transposed, device="cpu")
    result = vislib.explain(bundle, image, ["gradcam"])
    with torch.no_grad():
        expected = torch.softmax(model(transposed(image).unsqueeze(0)), dim=1)[0].numpy()
    np.testing.assert_allclose(result.probs, expected, atol=1e-6)


class DictNet(GapNet):
    def forward(self, x):
        return {"logits": super().forward(x), "features": self.features(x)}


class TupleNet(GapNet):
    def forward(self, x):
        logits = super().forward(x)
        return logits.sum(dim=1), logits  # (an auxiliary output, the class scores)


def test_dict_and_model_outputs_give_their_logits():
    torch.manual_seed(0)
    bundle = vislib.load_model(DictNet(), preprocess=PLAIN, device="cpu")
    x = torch.rand(2, 3, 16, 16)
    result = vislib.explain(bundle, x, ["gradcam", "gradient", "scorecam"])
    with torch.no_grad():
        logits = bundle.model(x)["logits"]
    np.testing.assert_allclose(result.probs, torch.softmax(logits, 1).numpy(), atol=1e-6)


def test_a_tuple_output_needs_output_and_the_error_shows_its_structure():
    torch.manual_seed(0)
    with pytest.raises(vislib.ModelError, match=r"tuple\(Tensor\[1\], Tensor\[1×4\]\).*output="):
        vislib.load_model(TupleNet(), preprocess=PLAIN, device="cpu")
    bundle = vislib.load_model(TupleNet(), preprocess=PLAIN, device="cpu", output=1)
    x = torch.rand(3, 16, 16)
    result = vislib.explain(bundle, x, ["cam", "gradcam", "occlusion"])
    assert result.probs.shape == (4,)
    with pytest.raises(vislib.ModelError, match="output=5"):
        vislib.load_model(TupleNet(), preprocess=PLAIN, device="cpu", output=5)


class InputNet(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, 6, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


@pytest.mark.parametrize("channels, mode", [(1, "L"), (4, "RGBA")])
def test_grayscale_and_four_channel_models(channels, mode, image):
    torch.manual_seed(0)
    bundle = vislib.load_model(InputNet(channels), device="cpu")
    assert bundle.channels == channels and bundle.input_shape == (channels, 224, 224)
    result = vislib.explain(bundle, image, ["cam", "gradcam", "guided_backprop", "occlusion"])
    assert result.input_image.mode == "RGB" and result.input_image.size == (224, 224)
    x = bundle.preprocess(image)
    view = image.resize((224, 224), Image.BILINEAR) if image.size != (224, 224) else image
    expected = torchvision.transforms.functional.pil_to_tensor(
        bundle.preprocess.view(view).convert(mode)).float() / 255
    np.testing.assert_allclose(x.numpy(), ((expected - 0.5) / 0.5).numpy(), atol=1e-6)
    assert result.maps["guided_backprop"].shape == (224, 224)
    tensor = torch.rand(2, channels, 32, 32)
    assert vislib.explain(bundle, tensor, ["gradcam"]).maps["gradcam"].shape == (2, 32, 32)
    with pytest.raises(vislib.InputError, match=f"{channels}×H×W"):
        vislib.explain(bundle, torch.rand(2, 5 - channels if channels == 4 else 3, 32, 32), ["gradcam"])


def test_non_square_inputs(image):
    torch.manual_seed(0)
    pre = vislib.Preprocess(resize=(48, 64), crop=None, mean=(0.5,) * 3, std=(0.5,) * 3)
    bundle = vislib.load_model(GapNet(), preprocess=pre, default_layer="features", device="cpu")
    assert bundle.input_hw == (48, 64) and bundle.layers["features"] == (6, 24, 32)
    result = vislib.explain(bundle, image, ["gradcam", "scorecam", "gradient"])
    assert result.input_image.size == (64, 48)
    for m in result.maps:
        assert result.maps[m].shape == (48, 64)


def test_preprocess_refuses_what_it_cannot_make():
    with pytest.raises(vislib.ModelError, match="crop or an exact"):
        vislib.Preprocess(resize=224, crop=None)
    with pytest.raises(vislib.ModelError, match="one per input channel"):
        vislib.Preprocess(resize=8, crop=8, channels=1)
    with pytest.raises(vislib.ModelError, match="1, 3 or 4"):
        vislib.Preprocess(resize=8, crop=8, mean=(0.5,) * 2, std=(0.5,) * 2, channels=2)


def test_ablationcam_on_tokens_zeroes_one_channel_of_the_patch_tokens(image):
    """(S − S_{A^k=0}) / S with channel k zeroed in the patch tokens only (the class token kept)."""
    model = small_vit()
    with torch.no_grad():
        model.heads.head.weight.normal_()
    bundle = vislib.load_model(model, preprocess=vislib.Preprocess(resize=64, crop=64), device="cpu")
    layer = bundle.default_layer
    result = vislib.explain(bundle, image, ["ablationcam"], target=2)
    x, _ = bundle.prepare([image])
    module = model.get_submodule(layer)

    def score(channel=None):
        def hook(_m, _i, out):
            out = out.clone()
            out[:, 1:, channel] = 0.0
            return out

        handle = module.register_forward_hook(hook) if channel is not None else None
        try:
            with torch.no_grad():
                return model(x)[0, 2].item()
        finally:
            if handle is not None:
                handle.remove()

    base = score()
    weights = torch.tensor([(base - score(k)) / base for k in range(32)])
    store = {}
    handle = module.register_forward_hook(lambda _m, _i, out: store.setdefault("A", out.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    A = tokens_to_map(1, 4, 4)(store["A"])[0]
    expected = F.relu(torch.einsum("c,chw->hw", weights, A))
    np.testing.assert_allclose(result.raw["ablationcam"], expected.numpy(), rtol=1e-4, atol=1e-6)
    assert result.extras["ablationcam"]["path"] == "full-forward"


def test_the_registered_torchvision_defaults_come_from_the_rule():
    from vislib.models import TORCHVISION_DEFAULT_LAYERS

    for name in ("alexnet", "resnet18", "mobilenet_v3_large"):
        bundle = vislib.load_model(name, weights=None, device="cpu")
        assert bundle.default_layer == TORCHVISION_DEFAULT_LAYERS[name]
        assert bundle.default_reason.startswith("the last layer with a spatial map")


def test_cli_layers_prints_the_table_and_the_reason(capsys):
    from vislib.cli import main

    assert main(["layers", "--model", "shapes_zf"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("default layer: relu6 — the model card's choice")
    row = next(line for line in out if line.startswith("relu6 "))
    assert "96×8×8" in row and "← default" in row
    assert main(["layers", "--model", "shapes_zf", "--all"]) == 0
    assert any("no spatial map" in line or "—" in line for line in capsys.readouterr().out.splitlines())
    assert main(["layers", "--model", "no_such_model"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_metrics_use_the_selected_scores():
    from vislib import metrics

    torch.manual_seed(0)
    bundle = vislib.load_model(DictNet(), preprocess=PLAIN, device="cpu")
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        expected = torch.softmax(bundle.model(x)["logits"], 1)[torch.arange(3), torch.tensor([0, 1, 2])]
    got = metrics.target_probabilities(bundle, x, [0, 1, 2])
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-6)
    curves = metrics.deletion_insertion(bundle, x, torch.rand(3, 16, 16), [0, 1, 2], steps=4)
    np.testing.assert_allclose(curves.deletion[:, 0], expected.numpy(), atol=1e-6)
