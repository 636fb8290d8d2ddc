"""The dashboard's model catalogue, card and method applicability (vislib.ui), without Streamlit:
search order by hand, refusals that never import code, the card read back from the bundle, and each
"not for this model" reason checked against what the method really does."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import PLAIN, Counter, FlatNet, GapNet, assert_untouched, snapshot, tiny_bundle
from PIL import Image
from torch import nn

import vislib
from vislib import models, ui
from vislib.errors import MethodError
from vislib.layers import LayerView
from vislib.methods.base import METHODS, Method, register_method

# --------------------------------------------------------------------------------------------------
# Search and sources


NAMES = ["timm:resnet50", "timm:resnet18", "timm:seresnet50", "timm:vit_small_patch16_224",
         "timm:deit_tiny_patch16_224", "timm:convnext_tiny", "timm:resnetv2_50", "timm:eca_resnet33ts"]


def test_search_orders_exact_then_prefix_then_word_start_then_inside():
    found, total = ui.search_models(NAMES, "resnet50")
    # exact name first, then names starting with it, then a word of the name starting with it
    # (after "_"), then anywhere inside ("seresnet50")
    assert found == ["timm:resnet50", "timm:seresnet50"] and total == 2
    found, _ = ui.search_models(NAMES, "resnet")
    assert found[:3] == ["timm:resnet18", "timm:resnet50", "timm:resnetv2_50"]  # prefix, shorter first
    assert found[3:] == ["timm:eca_resnet33ts", "timm:seresnet50"]  # "_resnet" starts a word: before "seresnet"


def test_search_needs_every_word_and_ignores_the_scheme_prefix():
    assert ui.search_models(NAMES, "patch16 tiny")[0] == ["timm:deit_tiny_patch16_224"]
    assert ui.search_models(NAMES, "TIMM")[1] == 0  # the prefix is not part of what is searched
    assert ui.search_models(NAMES, "  ") == (NAMES, len(NAMES))


def test_search_limit_reports_how_many_match():
    names = [f"timm:net{i:04d}" for i in range(1300)]
    found, total = ui.search_models(names, "net", limit=100)
    assert len(found) == 100 and total == 1300
    assert found == sorted(names)[:100]  # equal rank and length: alphabetical


def test_model_source_of_every_scheme():
    assert ui.model_source("shapes_resnet") == "bundled"
    assert ui.model_source("resnet18") == "torchvision"
    assert ui.model_source("timm:resnet18") == "timm"
    assert ui.model_source("hf:org/model") == "hf"
    assert ui.model_source("upload:my_net") == "upload"
    assert ui.model_source("mypkg.nets:build") == "factory"
    assert ui.model_source("no_such_model") == "unknown"


def test_the_catalogue_groups_hold_the_registered_models():
    assert ui.catalogue("bundled") == vislib.list_models("bundled")
    assert set(ui.catalogue("torchvision")) >= {"resnet18", "resnet50"}
    assert ui.catalogue("upload") == []  # a session's own: the page adds them


def test_factory_names_from_a_link_are_refused_without_importing(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "sidefx_vislib_test.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\ndef build():\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reason = ui.dashboard_refusal("sidefx_vislib_test:build")
    assert reason is not None and "spec files" in reason
    parsed, notes = ui.parse_query({"model": "sidefx_vislib_test:build"}, models=[], methods=[],
                                   check_model=ui.dashboard_refusal)
    assert parsed.model is None and len(notes) == 1 and "Python code" in notes[0]
    assert not marker.exists() and "sidefx_vislib_test" not in sys.modules


def test_server_folders_cannot_be_named_from_a_link_or_the_model_box(tmp_path, monkeypatch):
    # A real Hugging Face model folder on the server: the library loads it (hf:/path), a browser must
    # not (links and typed names reach only hub repo ids; folders go through the operator's spec files).
    folder = tmp_path / "hf_model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    for name in (f"hf:{folder}", "hf:./hf_model", "hf:hf_model", "hf:~/x", "hf:../etc", "hf:file:///etc",
                 "hf:a--b/c", "hf:org/na..me"):
        reason = ui.dashboard_refusal(name)
        assert reason is not None and "spec files" in reason, name
        parsed, notes = ui.parse_query({"model": name}, models=[], methods=[], check_model=ui.dashboard_refusal)
        assert parsed.model is None and len(notes) == 1, name
    with pytest.raises(vislib.ModelError, match="not a Hugging Face repo id"):
        models.model_spec("hf:file:///etc")
    assert not ui.dashboard_refusal("hf:google/vit-base-patch16-224")  # a hub repo id is fine


def test_an_uploaded_model_in_a_link_says_so():
    parsed, notes = ui.parse_query({"model": "upload:my_net"}, models=["resnet18"], methods=[],
                                   check_model=ui.dashboard_refusal)
    assert parsed.model is None
    assert len(notes) == 1 and "uploaded" in notes[0] and "cannot be in a link" in notes[0]
    parsed, notes = ui.parse_query({"model": "resnet18"}, models=[], methods=[], check_model=ui.dashboard_refusal)
    assert parsed.model == "resnet18" and not notes


def test_offline_note_names_the_file_and_the_folder(monkeypatch):
    import torchvision

    monkeypatch.setattr(models, "pretrained_available", lambda name: False)
    note = ui.offline_note("resnet18")
    path = models.pretrained_cache_path(torchvision.models.get_model_weights("resnet18").DEFAULT)
    assert path.name in note and str(path.parent) in note and "random" in note
    monkeypatch.setattr(models, "pretrained_available", lambda name: True)
    assert ui.offline_note("resnet18") is None
    assert ui.offline_note("shapes_resnet") is None  # bundled: always at hand


# --------------------------------------------------------------------------------------------------
# Layers and the card


def test_layer_labels_say_how_the_methods_read_the_layer():
    assert ui.layer_label("layer4", (512, 7, 7)) == "layer4 · 512×7×7"
    tokens = LayerView("tokens", 192, (14, 14), prefix=1)
    assert ui.layer_label("blocks.11.norm1", tokens.shape, tokens) == "blocks.11.norm1 · 192×14×14 (tokens)"
    swin = LayerView("nhwc", 768, (7, 7))
    assert ui.layer_label("norm", swin.shape, swin) == "norm · 768×7×7 (channels-last)"
    conv = LayerView("nchw", 64, (16, 16))
    assert ui.layer_label("layer3", conv.shape, conv) == "layer3 · 64×16×16"


def test_card_rows_come_from_the_bundle():
    bundle = vislib.load_model("shapes_resnet")
    rows = dict(ui.model_card(bundle, source="bundled"))
    assert rows["About"] == bundle.description  # a spec file's description, or the source's own
    assert rows["Source"].startswith("bundled")
    assert rows["Weights"] == bundle.weights
    assert rows["Classes"].startswith(f"{len(bundle.labels)} · labels: ")
    c, h, w = bundle.input_shape
    assert rows["Input"] == f"{c}×{h}×{w} · RGB"
    assert rows["Default layer"].startswith(ui.bundle_layer_label(bundle, bundle.default_layer))
    assert bundle.default_reason in rows["Default layer"]
    random = tiny_bundle(GapNet())
    random.weights = "random"
    assert "random initialisation" in dict(ui.model_card(random))["Weights"]


# --------------------------------------------------------------------------------------------------
# Which methods apply


class GeluNet(nn.Module):
    """GapNet with GELU instead of ReLU: a GAP + linear head, but no ReLU for the backprop rules."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(),
                                      nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.GELU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


class FunctionalReluNet(nn.Module):
    """ReLUs called as functions (no nn.ReLU module): only a probe can find them."""

    def __init__(self):
        super().__init__()
        self.count = Counter()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.features = nn.Identity()  # the target layer: after the ReLU, under the GAP head
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.features(F.relu(self.conv(self.count(x)))).mean(dim=(2, 3)))


@pytest.fixture
def image():
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8))


def _unavailable(bundle, layer=None) -> dict[str, str]:
    found = ui.method_availability(bundle, layer or bundle.default_layer)
    assert set(found) == set(METHODS)
    return {m: why for m, why in found.items() if why}


def test_everything_applies_to_a_relu_network_with_a_gap_head(image):
    bundle = tiny_bundle(GapNet(), labels=list("abcd"))
    before = snapshot(bundle.model)
    assert _unavailable(bundle) == {}
    assert_untouched(bundle.model, before)  # the probe leaves no hook, flag or gradient behind
    vislib.explain(bundle, image, ["cam", "deconvnet", "guided_backprop"])  # and indeed they run


def test_cam_without_a_gap_head_is_unavailable_and_really_fails(image):
    bundle = tiny_bundle(FlatNet(), labels=list("abc"))
    off = _unavailable(bundle)
    assert list(off) == ["cam"] and "global-average-pool + linear head" in off["cam"]
    with pytest.raises(MethodError):
        vislib.explain(bundle, image, ["cam"])


def test_cam_at_a_layer_the_head_does_not_read(image):
    bundle = tiny_bundle(GapNet(channels=6), labels=list("abcd"))
    off = _unavailable(bundle, "features.0")  # 8 channels; the head reads 6
    assert list(off) == ["cam"] and "8 channels" in off["cam"]
    with pytest.raises(MethodError):
        vislib.explain(bundle, image, ["cam"], layer="features.0")


def test_a_linear_layer_of_the_right_size_that_is_not_a_gap_head(image):
    """Structure alone would allow CAM (a 6 → 4 linear layer exists); the probe shows that the logits
    are not W·GAP(A)+b, as the method itself finds."""

    class NotGap(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            return self.fc(self.features(x).amax(dim=(2, 3)))  # max-pooling, not averaging

    bundle = tiny_bundle(NotGap(), labels=list("abcd"))
    off = _unavailable(bundle)
    assert list(off) == ["cam"] and "W·GAP(A)+b" in off["cam"]
    with pytest.raises(MethodError, match=r"W·GAP\(A\)\+b"):
        vislib.explain(bundle, image, ["cam"])


def test_relu_rules_on_a_network_without_relus(image):
    bundle = tiny_bundle(GeluNet(), labels=list("abcd"))
    off = _unavailable(bundle)
    rules = {n for n, c in METHODS.items() if getattr(c, "rule", "gradient") != "gradient"}
    assert set(off) - {"lrp"} == rules and {"deconvnet", "guided_backprop"} <= rules
    assert all("GELU" in off[m] and "plain gradient" in off[m] for m in rules)
    if "lrp" in METHODS:  # zennit has no rule for GELU either: the method's own reason
        assert "GELU" in off["lrp"]
    # the reason's claim: on this network Deconvnet and guided backprop are the plain gradient
    result = vislib.explain(bundle, image, ["gradient", "deconvnet", "guided_backprop"])
    for name in ("deconvnet", "guided_backprop"):
        np.testing.assert_allclose(result.raw[name], result.raw["gradient"], rtol=1e-5, atol=1e-7)


def test_functional_relus_are_found_by_one_probe_and_cached():
    net = FunctionalReluNet()
    bundle = vislib.load_model(net, preprocess=PLAIN, labels=list("abcd"), default_layer="features",
                               device="cpu")
    seen = net.count.images
    # the probe met the functional ReLU (zennit has no rule for the counting module: LRP says so)
    assert set(_unavailable(bundle)) <= {"lrp"}
    assert net.count.images == seen + 1  # one probe forward
    ui.method_availability(bundle, "features")
    assert net.count.images == seen + 1  # cached per bundle and layer


def test_a_method_can_say_why_it_does_not_apply():
    @register_method
    class Picky(Method):
        name, family, title = "picky_test", "cam", "Picky"

        @classmethod
        def unavailable(cls, bundle, layer):
            return f"{layer} is not good enough" if bundle.layers[layer][0] != 6 else None

    try:
        bundle = tiny_bundle(GapNet(channels=6), labels=list("abcd"))
        assert ui.method_availability(bundle, "features")["picky_test"] is None
        assert ui.method_availability(bundle, "features.0")["picky_test"] == "features.0 is not good enough"
    finally:
        METHODS.pop("picky_test")


def test_a_vision_transformer_token_layer():
    """timm's DeiT-tiny (random weights, built offline): token layers on the 14×14 patch grid, GELU
    only (no ReLU rules), and a head on the class token (CAM's GAP check fails on the probe)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=5)
    bundle = vislib.load_model(net, labels=list("abcde"), device="cpu")
    layer = bundle.default_layer
    assert ui.bundle_layer_label(bundle, layer) == f"{layer} · 192×14×14 (tokens)"
    off = _unavailable(bundle)
    assert {"deconvnet", "guided_backprop", "cam"} <= set(off)
    assert "GELU" in off["deconvnet"]
