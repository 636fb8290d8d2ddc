"""Model spec files: what they register and build, every error naming the file and key, ModelRef."""

import pickle
import textwrap

import pytest
import torch
import torchvision
from PIL import Image

import vislib
from vislib.models import (
    Preprocess,
    model_ref,
    read_spec_file,
    register_models,
    register_spec_files,
    sample_images,
    spec_files_from_env,
    unregister_models,
)

FACTORY_MODULE = '''
import torch
from torch import nn


class Net(nn.Module):
    """conv → ReLU → conv → ReLU (``features``) → GAP → linear, for 1, 3 or 4 input channels."""

    def __init__(self, num_classes=3, width=6, in_channels=3, output="tensor"):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, width, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)
        self.output = output

    def forward(self, x):
        logits = self.fc(self.features(x).mean(dim=(2, 3)))
        if self.output == "dict":
            return {"aux": logits.detach() * 0, "scores": logits}
        if self.output == "tuple":
            return (logits.mean(dim=1), logits)
        return logits


def build(**kwargs):
    return Net(**kwargs)


def second(output):
    return output[1]
'''


@pytest.fixture
def spec(tmp_path):
    """Write a spec file (and the factory module next to it); unregister its models afterwards."""
    written = []
    (tmp_path / "specnets.py").write_text(FACTORY_MODULE)

    def write(text, name="models.toml"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        written.append(path)
        return path

    yield write
    for path in written:
        unregister_models(path)


def _image():
    return Image.open(sample_images()[0]).convert("RGB")


def test_a_torchvision_model_with_its_own_weights_labels_and_layer(tmp_path, spec):
    from safetensors.torch import save_file

    torch.manual_seed(2)
    reference = torchvision.models.resnet18(num_classes=4)
    (tmp_path / "w").mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "w" / "r.safetensors"))
    (tmp_path / "labels.txt").write_text("cat\ndog\n\nfox\nowl\n")
    path = spec("""
        [models.pets]
        source = "resnet18"
        weights = "w/r.safetensors"
        labels = "labels.txt"
        layer = "layer3"
        description = "four animals"
    """)
    assert register_models(path) == ["pets"]
    assert "pets" in vislib.list_models() and "pets" in vislib.list_models("spec")
    bundle = vislib.load_model("pets", device="cpu")
    assert bundle.labels == ["cat", "dog", "fox", "owl"] and bundle.default_layer == "layer3"
    assert bundle.source == "spec" and bundle.weights.endswith("r.safetensors")
    torch.testing.assert_close(bundle.model.fc.weight, reference.fc.weight, rtol=0, atol=0)
    assert bundle.preprocess == vislib.load_model("resnet18", weights=None, device="cpu").preprocess
    assert vislib.models.model_spec("pets").description == "four animals"


def test_a_factory_with_kwargs_and_json_labels(tmp_path, spec):
    (tmp_path / "labels.json").write_text('["a", "b", "c", "d", "e"]')
    path = spec("""
        [models.mine]
        source = "specnets:build"
        kwargs = { num_classes = 5, width = 4 }
        labels = "labels.json"
        input_size = 48
    """)
    register_models(path)
    bundle = vislib.load_model("mine", device="cpu")
    assert bundle.labels == ["a", "b", "c", "d", "e"]
    assert bundle.layers["features"][0] == 4 and bundle.default_layer == "features"
    assert bundle.preprocess.crop == 48 and bundle.preprocess.resize == 48
    result = vislib.explain(bundle, _image(), methods=["cam", "gradcam"])
    assert result.maps["cam"].shape == (48, 48)


def test_registering_again_is_idempotent_and_follows_the_file(spec):
    path = spec("""
        [models.one]
        source = "specnets:build"
        [models.two]
        source = "specnets:build"
    """)
    assert register_models(path) == ["one", "two"]
    assert register_models(path) == ["one", "two"]
    path.write_text('[models.one]\nsource = "specnets:build"\n')
    assert register_models(path) == ["one"]
    assert "two" not in vislib.list_models()


@pytest.mark.parametrize("text, fragment", [
    ('[models.m]\nsource = "resnet18"\ncolour = "red"\n', "[models.m]: unknown key 'colour'"),
    ('[models.m]\nweights = "none"\n', "[models.m]: missing key 'source'"),
    ('[models.m]\nsource = 18\n', "[models.m] source: must be a string"),
    ('[models.m]\nsource = "resnet18"\ninput_size = "big"\n', "[models.m] input_size: must be a positive integer"),
    ('[models.m]\nsource = "resnet18"\nweights = "nowhere.safetensors"\n', "[models.m] weights: file not found"),
    ('[models.m]\nsource = "resnet18"\nlabels = "nowhere.txt"\n', "[models.m] labels: file not found"),
    ('[models.m]\nsource = "resnet18"\nmean = [0.5, 0.5]\n', "[models.m] mean: 2 values for 3 input channels"),
    ('[models.m]\nsource = "resnet18"\ninterpolation = "smooth"\n', "[models.m] interpolation: unknown"),
    ('[models.m]\nsource = "resnet18"\nkwargs = 3\n', "[models.m] kwargs: must be a table"),
    ('[models.m]\nsource = "resnet5000"\n', "[models.m] source: 'resnet5000' is no torchvision or bundled"),
    ('[models.m]\nsource = "timm:resnt18"\n', "[models.m] source: timm has no model"),
    ('[models."a:b"]\nsource = "resnet18"\n', "[models.a:b]: a model name takes"),
    ('[models.resnet18]\nsource = "resnet50"\n', "already taken by the torchvision models"),
    ('[model.m]\nsource = "resnet18"\n', "unknown top-level key 'model'"),
    ('[models.m\nsource = "resnet18"\n', "not valid TOML"),
])
def test_every_problem_names_the_file_and_key(spec, text, fragment):
    path = spec(text)
    with pytest.raises(vislib.ModelError) as info:
        register_models(path)
    assert str(path) in str(info.value) and fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_problems_found_when_building_name_the_key(tmp_path, spec):
    (tmp_path / "labels.txt").write_text("a\nb\n")
    path = spec("""
        [models.few]
        source = "specnets:build"
        labels = "labels.txt"
        [models.deep]
        source = "specnets:build"
        layer = "features.9"
        [models.broken]
        source = "specnets:nothing"
    """)
    register_models(path)
    with pytest.raises(vislib.ModelError, match=r"\[models.few\] labels: 2 labels but the model has 3 outputs"):
        vislib.load_model("few", device="cpu")
    with pytest.raises(vislib.LayerError, match=r"\[models.deep\] layer: .*features.9"):
        vislib.load_model("deep", device="cpu")
    with pytest.raises(vislib.ModelError, match=r"\[models.broken\]: factory 'specnets:nothing'"):
        vislib.load_model("broken", device="cpu")


def test_a_name_clash_between_two_files(spec):
    first = spec('[models.same]\nsource = "specnets:build"\n', "a.toml")
    second = spec('[models.same]\nsource = "specnets:build"\n', "b.toml")
    register_models(first)
    with pytest.raises(vislib.ModelError, match=f"already taken by {first}"):
        register_models(second)


def test_several_files_report_their_errors_without_raising(spec, tmp_path, monkeypatch):
    good = spec('[models.fine]\nsource = "specnets:build"\n', "good.toml")
    bad = spec('[models.bad]\nsource = "resnet18"\nlayer = 4\n', "bad.toml")
    reports = register_spec_files([good, bad, tmp_path / "missing.toml"])
    assert reports[0].names == ("fine",) and reports[0].error is None
    assert "layer: must be a string" in reports[1].error and reports[1].names == ()
    assert "spec file not found" in reports[2].error
    monkeypatch.setenv("VISLIB_MODELS", f"{good}:{bad}")
    assert spec_files_from_env() == [str(good), str(bad)]


@pytest.mark.parametrize("output, kind", [("1", "tuple"), ('"scores"', "dict"), ('"specnets:second"', "tuple")])
def test_output_selection_from_the_spec(spec, output, kind):
    path = spec(f"""
        [models.picked]
        source = "specnets:build"
        kwargs = {{ output = "{kind}" }}
        output = {output}
        input_size = 32
    """)
    register_models(path)
    bundle = vislib.load_model("picked", device="cpu")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(bundle.logits(x), bundle.model.fc(bundle.model.features(x).mean(dim=(2, 3))))
    assert not vislib.explain(bundle, _image(), methods=["gradcam"]).flat["gradcam"]


@pytest.mark.parametrize("channels", [1, 4])
def test_grayscale_and_four_channel_models(spec, channels):
    stats = ", ".join(["0.5"] * channels)
    path = spec(f"""
        [models.ch]
        source = "specnets:build"
        kwargs = {{ in_channels = {channels} }}
        channels = {channels}
        mean = [{stats}]
        std = [{stats}]
        input_size = [40, 56]
    """)
    register_models(path)
    bundle = vislib.load_model("ch", device="cpu")
    assert bundle.preprocess.channels == channels and bundle.input_hw == (40, 56)
    result = vislib.explain(bundle, _image(), methods=["gradcam"])
    assert result.maps["gradcam"].shape == (40, 56) and result.input_image.mode == "RGB"
    assert not result.flat["gradcam"]


def test_model_ref_rebuilds_the_same_bundle_after_pickling(tmp_path, spec):
    from safetensors.torch import save_file

    from vislib.models.factory import resolve_callable

    path = spec('[models.again]\nsource = "specnets:build"\nkwargs = { num_classes = 4 }\n')
    register_models(path)
    torch.manual_seed(8)
    net = resolve_callable("specnets:build", tmp_path)(num_classes=4)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "again.safetensors"))
    bundle = vislib.load_model("again", weights=tmp_path / "again.safetensors", device="cpu",
                               default_layer="features.1")
    ref = pickle.loads(pickle.dumps(model_ref(bundle)))
    unregister_models(path)  # a fresh process knows nothing of the spec file
    again = ref.load(device="cpu")
    assert again.name == "again" and again.default_layer == "features.1" and again.labels == bundle.labels
    for key, value in bundle.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value), key


def test_a_python_object_has_no_ref():
    bundle = vislib.load_model(torchvision.models.resnet18(num_classes=2), device="cpu",
                               preprocess=Preprocess(resize=32, crop=32))
    with pytest.raises(vislib.ModelError, match="spec file"):
        model_ref(bundle)
    named = vislib.load_model("resnet18", weights=None, device="cpu", output=lambda out: out)
    with pytest.raises(vislib.ModelError, match="cannot be pickled"):
        model_ref(named)


def test_the_reader_checks_without_building(spec):
    path = spec("""
        [models.x]
        source = "timm:resnet18"
        weights = "none"
        resize = [64, 80]
        input_size = [56, 72]
        std = 0.25
    """)
    (entry,) = read_spec_file(path)
    assert entry.weights is None and entry.resize == (64, 80) and entry.input_size == (56, 72)
    assert entry.std == (0.25, 0.25, 0.25) and entry.file == str(path.resolve())


def test_missing_pretrained_weights_of_a_spec_model_name_the_file(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = spec('[models.pre]\nsource = "timm:resnet18.a1_in1k"\n[models.tv]\nsource = "resnet50"\n')
    register_models(path)
    assert not vislib.models.pretrained_available("pre") and not vislib.models.pretrained_available("tv")
    for name, missing in (("pre", "timm/resnet18.a1_in1k"), ("tv", "resnet50-")):
        with pytest.raises(vislib.WeightsError) as info:
            vislib.load_model(name, device="cpu")
        message = str(info.value)
        assert f"{path} [models.{name}]:" in message and missing in message and "not cached" in message
        assert "\n" not in message


def test_the_ray_engines_model_ref_finds_the_spec_file(tmp_path, spec):
    from vislib.evaluate import ModelRef as EngineRef

    path = spec('[models.far]\nsource = "specnets:build"\nkwargs = { num_classes = 2 }\n')
    register_models(path)
    bundle = vislib.load_model("far", device="cpu")
    ref = pickle.loads(pickle.dumps(EngineRef.of(bundle)))
    assert ref.spec_file == str(path.resolve())
    unregister_models(path)
    again = ref.build(device="cpu")  # checks the weights' fingerprint against the driver's
    assert again.labels == bundle.labels


def test_a_broken_table_does_not_hide_the_valid_ones_beside_it(spec):
    path = spec('[models.fine]\nsource = "specnets:build"\n\n[models.bad]\nsource = "resnet18"\nlayer = 4\n'
                '\n[models.also_fine]\nsource = "specnets:build"\ndescription = "kept"\n', "mixed.toml")
    (report,) = register_spec_files([path])
    assert report.names == ("fine", "also_fine")
    assert len(report.errors) == 1 and f"{path} [models.bad] layer: must be a string" in report.errors[0]
    assert {"fine", "also_fine"} <= set(vislib.list_models()) and "bad" not in vislib.list_models()
    with pytest.raises(vislib.ModelError, match=r"\[models.bad\] layer"):  # the strict API still refuses
        register_models(path)
    path.write_text('[models.fine]\nsource = "specnets:build"\n')  # edited: also_fine goes, fine stays
    (report,) = register_spec_files([path])
    assert report.names == ("fine",) and not report.errors and "also_fine" not in vislib.list_models()
