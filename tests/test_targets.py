"""Targets (vislib.targets): each score equals an independent computation on a small hand-built model,
every method explains any target it accepts, and the others refuse with a reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import PLAIN, GapNet, tiny_bundle
from torch import nn

import vislib
from vislib.errors import MethodError, TargetError
from vislib.targets import Class, Label, Regression, Similarity, output_scores, resolve_target

FAST = ["gradient", "deconvnet", "guided_backprop", "guided_gradcam", "input_x_gradient", "fullgrad",
        "lrp", "cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "gradcam_elementwise",
        "eigengradcam", "kpcacam", "shapleycam", "eigencam"]
SLOW = {"smoothgrad": {"n_samples": 3}, "integrated_gradients": {"steps": 4}, "scorecam": {},
        "ablationcam": {}, "occlusion": {"patch": 8, "stride": 8}}


class SoftmaxNet(GapNet):
    """GapNet whose head returns probabilities (a softmax at the end)."""

    def forward(self, x):
        return F.softmax(super().forward(x), dim=1)


@pytest.fixture(scope="module")
def gap():
    return tiny_bundle(GapNet())


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(3)
    return torch.rand(2, 3, 16, 16) * 2 - 0.5


def input_gradient(model: nn.Module, x: torch.Tensor, score) -> torch.Tensor:
    """∂ score(model(x)).sum() / ∂x, by hand."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(score(model(x)).sum(), x)
    return g


# --------------------------------------------------------------------------------------------------
# Scores by hand


def test_class_scores_are_the_logit_softmax_and_difference(gap, x):
    z = gap.model(x).detach()
    assert torch.equal(Class(2)(z), z[:, 2])
    assert torch.allclose(Class(2, score="probability")(z), F.softmax(z, dim=1)[:, 2])
    assert torch.allclose(Class(2, contrast=0)(z), z[:, 2] - z[:, 0])
    bound = Class(None).bind(z, gap)
    assert bound.class_index.tolist() == z.argmax(dim=1).tolist()
    assert Class("class 1").bind(z, gap).class_index.tolist() == [1, 1]
    assert Class([0, "class 3"]).bind(z, gap).class_index.tolist() == [0, 3]
    with pytest.raises(TargetError, match="out of range"):
        Class(9).bind(z, gap)
    with pytest.raises(TargetError, match="did you mean"):
        Class("clas 1").bind(z, gap)


def test_label_is_the_logit_or_its_sigmoid_never_a_softmax():
    z = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    assert torch.equal(Label(1)(z), z[:, 1])
    assert torch.allclose(Label(1, score="probability")(z), 1 / (1 + torch.exp(-z[:, 1])))
    # a softmax would depend on the other labels: the sigmoid does not
    other = z.clone()
    other[:, 0] += 5
    assert torch.equal(Label(1, score="probability")(other), Label(1, score="probability")(z))


def test_regression_and_similarity_by_hand():
    y = torch.tensor([[1.5, -2.0], [0.25, 4.0]])
    assert torch.equal(Regression(1)(y), y[:, 1])
    assert torch.equal(Regression(0, sign=-1)(y), -y[:, 0])
    ref = torch.tensor([3.0, 4.0])
    expected = (y @ ref) / (y.norm(dim=1) * ref.norm())
    assert torch.allclose(Similarity(vector=ref)(y), expected)
    with pytest.raises(TargetError):
        Regression(0, sign=2)
    with pytest.raises(TargetError):
        Similarity()


def test_scores_of_rows_that_repeat_images(gap, x):
    """Rows of noisy copies / path points are scored against their image's target."""
    z = gap.model(x).detach()
    bound = Class([1, 3], contrast=[0, 2]).bind(z, gap)
    rows = torch.tensor([0, 0, 1, 1, 0])
    out = torch.randn(5, 4)
    expected = torch.stack([out[i, [1, 1, 3, 3, 1][i]] - out[i, [0, 0, 2, 2, 0][i]] for i in range(5)])
    assert torch.allclose(bound.score(out, rows), expected)


# --------------------------------------------------------------------------------------------------
# Through explain: the gradient of each target is the gradient of the hand-computed score


@pytest.mark.parametrize("target, hand", [
    (Class(2), lambda z: z[:, 2]),
    (Class(2, score="probability"), lambda z: F.softmax(z, dim=1)[:, 2]),
    (Class(2, contrast=1), lambda z: z[:, 2] - z[:, 1]),
    (Label(1, score="probability"), lambda z: torch.sigmoid(z[:, 1])),
    (Regression(3, sign=-1), lambda z: -z[:, 3]),
])
def test_each_target_explains_its_own_score(gap, x, target, hand):
    result = vislib.explain(gap, x, ["gradient"], target=target)
    expected = input_gradient(gap.model, x, hand)
    np.testing.assert_allclose(result.raw["gradient"], expected.numpy(), rtol=1e-4, atol=1e-6)


def test_similarity_gradient_and_identical_images(gap, x):
    """cos(f(x), f(ref)) on the penultimate features: the gradient by hand; an image against itself
    scores 1, and two identical images explained against each other give the same maps."""
    embedded = vislib.as_embedding(gap)
    assert embedded.scores == "embedding" and "fc" in embedded.description
    features = lambda m, inp: m.pool(m.features(inp)).flatten(1)  # noqa: E731
    ref = x[1]
    f_ref = features(gap.model, ref[None]).detach()[0]
    result = vislib.explain(gap, x[:1], ["gradient", "gradcam"], target=Similarity(ref))
    assert any("penultimate" in n for n in result.notes)
    leaf = x[:1].clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(
        F.cosine_similarity(features(gap.model, leaf), f_ref[None], dim=1).sum(), leaf)
    np.testing.assert_allclose(result.raw["gradient"], expected.numpy(), rtol=1e-4, atol=1e-7)
    same = torch.stack([x[0], x[0]])
    a = vislib.explain(gap, same[:1], ["gradcam"], target=Similarity(same[1]))
    b = vislib.explain(gap, same[1:], ["gradcam"], target=Similarity(same[0]))
    assert a.what.score(embedded.logits(same[:1].clone())).item() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_array_equal(a.maps["gradcam"], b.maps["gradcam"])


def test_embedding_shares_the_weights_and_outputs_the_heads_input(gap, x):
    embedded = vislib.as_embedding(gap)
    assert embedded is vislib.as_embedding(gap)  # made once
    with torch.no_grad():
        expected = gap.model.pool(gap.model.features(x)).flatten(1)
        assert torch.allclose(embedded.logits(x), expected)
    assert {id(p) for p in embedded.model.parameters()} <= {id(p) for p in gap.model.parameters()}
    assert "fc" not in embedded.layers and embedded.default_layer == gap.default_layer


# --------------------------------------------------------------------------------------------------
# Every method on a target that is not a class; the old forms mean what they meant


def test_every_method_explains_a_regression_output_as_the_same_class_logit(gap, x):
    """On a logits model, Regression(i) is the logit of class i: every method that accepts both gives
    the same maps (the methods never look at the target's kind)."""
    names = FAST + list(SLOW)
    a = vislib.explain(gap, x, names, target=Regression(2), options=SLOW)
    b = vislib.explain(gap, x, names, target=2, options=SLOW)
    for name in names:
        np.testing.assert_allclose(a.raw[name], b.raw[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert a.target == [None, None] and b.target == [2, 2]
    assert a.describe_target() == "class 2 (up)" and b.describe_target() == "logit of class 'class 2'"


def test_old_forms_are_class_targets(gap, x):
    for spec, kwargs in [(None, {}), (1, {}), ("class 3", {}), ([0, 2], {}), (1, {"contrast": 3}),
                         (2, {"score": "probability"})]:
        old = vislib.explain(gap, x, ["gradcam", "gradient"], target=spec, **kwargs)
        score = kwargs.get("score", "logit")
        new = vislib.explain(gap, x, ["gradcam", "gradient"],
                             target=Class(spec, score=score, contrast=kwargs.get("contrast")))
        assert old.target == new.target and old.score == new.score == score
        for name in ("gradcam", "gradient"):
            np.testing.assert_array_equal(old.raw[name], new.raw[name])
    assert isinstance(resolve_target(gap, None), Class)


def test_methods_that_need_a_class_refuse_other_targets(gap, x):
    with pytest.raises(MethodError, match="cam needs a score linear"):
        vislib.explain(gap, x, ["cam"], target=Similarity(x[0]))
    with pytest.raises(MethodError, match="lrp needs a score linear"):
        vislib.explain(gap, x, ["lrp"], target=Similarity(vector=torch.ones(6)))
    with pytest.raises(MethodError, match="finercam needs a class axis"):
        vislib.explain(gap, x, ["finercam"], target=Regression(0))
    with pytest.raises(TargetError, match="contrast"):
        vislib.explain(gap, x, ["gradcam"], target=Label(1), contrast=2)


def test_label_target_on_a_multilabel_model_and_cam_on_its_head(x):
    """A sigmoid model's old-form target is a Label; CAM reads the label's head row."""
    torch.manual_seed(0)
    bundle = vislib.load_model(GapNet(), preprocess=PLAIN, default_layer="features", device="cpu",
                               scores="sigmoid")
    assert isinstance(resolve_target(bundle, 1), Label)
    result = vislib.explain(bundle, x, ["cam", "gradient"], target=1, score="probability")
    z = bundle.model(x)
    np.testing.assert_allclose(result.probs, torch.sigmoid(z).detach().numpy(), rtol=1e-6)
    expected = input_gradient(bundle.model, x, lambda out: torch.sigmoid(out[:, 1]))
    np.testing.assert_allclose(result.raw["gradient"], expected.numpy(), rtol=1e-4, atol=1e-7)
    logits_view = vislib.load_model(bundle.model, preprocess=PLAIN, default_layer="features", device="cpu")
    reference = vislib.explain(logits_view, x, ["cam"], target=1)
    np.testing.assert_allclose(result.raw["cam"], reference.raw["cam"], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Output kinds


def test_a_probabilities_model_is_detected_and_its_chart_is_its_output(x):
    torch.manual_seed(0)
    bundle = vislib.load_model(SoftmaxNet(), preprocess=PLAIN, default_layer="features", device="cpu")
    assert bundle.scores == "probabilities" and any("probabilities" in n for n in bundle.notes)
    result = vislib.explain(bundle, x, ["gradient"], target=1)
    p = bundle.model(x).detach()
    np.testing.assert_allclose(result.probs, p.numpy(), rtol=1e-6)  # never a softmax of probabilities
    expected = input_gradient(bundle.model, x, lambda out: torch.log(out[:, 1]))  # the honest logit
    np.testing.assert_allclose(result.raw["gradient"], expected.numpy(), rtol=1e-4, atol=1e-7)
    plain = vislib.load_model(GapNet(), preprocess=PLAIN, default_layer="features", device="cpu")
    assert plain.scores == "logits" and not any("probabilities" in n for n in plain.notes)


def test_output_scores_by_kind():
    z = torch.tensor([[0.2, 0.8], [1.0, 0.0]])
    assert torch.allclose(output_scores("logits", z), F.softmax(z, dim=1))
    assert torch.equal(output_scores("probabilities", z), z)
    assert torch.allclose(output_scores("sigmoid", z), torch.sigmoid(z))
    assert torch.equal(output_scores("regression", z), z)


def test_saturated_probabilities_get_a_note(x):
    class Saturated(GapNet):
        def forward(self, inp):
            return F.softmax(1e4 * super().forward(inp), dim=1)

    torch.manual_seed(0)
    bundle = vislib.load_model(Saturated(), preprocess=PLAIN, default_layer="features", device="cpu",
                               scores="probabilities")
    result = vislib.explain(bundle, x, ["gradient"])
    assert any("saturated" in n for n in result.notes)
    with pytest.raises(vislib.ModelError, match="scores must be one of"):
        vislib.load_model(GapNet(), preprocess=PLAIN, device="cpu", scores="softmax")


def test_methods_listing_says_which_targets_each_method_explains(capsys):
    from vislib.cli import main

    assert main(["methods"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "targets" in rows["name"]
    assert "head rows" in rows["cam"] and "head rows" in rows["lrp"] and "compare" in rows["finercam"]
    assert "any" in rows["gradcam"] and "any" in rows["occlusion"]


# --------------------------------------------------------------------------------------------------
# Multi-label: every label above the threshold in one call


def test_explain_labels_shares_one_forward_and_equals_each_label_alone(x):
    from vislib.multilabel import explain_labels

    torch.manual_seed(0)
    bundle = vislib.load_model(GapNet(classes=6), preprocess=PLAIN, default_layer="features", device="cpu",
                               scores="sigmoid")
    sig = torch.sigmoid(bundle.model(x)).detach()
    threshold = float(sig.amax(dim=0).sort(descending=True).values[2])  # three labels reach it
    for score in ("logit", "probability"):
        got = explain_labels(bundle, x, ["gradcam", "hirescam", "gradient"], threshold=threshold, score=score)
        assert got.selected == sig.amax(dim=0).argsort(descending=True)[:3].tolist()
        np.testing.assert_allclose(got.sigmoid, sig.numpy(), rtol=1e-6)
        for c in got.selected:
            alone = vislib.explain(bundle, x, ["gradcam", "hirescam", "gradient"], target=Label(c, score=score))
            for name in ("gradcam", "hirescam", "gradient"):
                np.testing.assert_allclose(got[c].raw[name], alone.raw[name], rtol=1e-5, atol=1e-7)
            assert got[c].reused == [] and got[c].target == [c, c]
    only_cam = explain_labels(bundle, x[:1], ["gradcam"], labels=["class 1", 4])
    assert only_cam.selected == [1, 4] and "forward" not in only_cam[1].pass_timings
    assert [r[0] for r in only_cam.rows()] == [1, 4]
    assert explain_labels(bundle, x, ["gradcam"], threshold=1.0).explanations == {}


# --------------------------------------------------------------------------------------------------
# The command line


@pytest.fixture
def cli_models(tmp_path):
    from PIL import Image

    from vislib.models import unregister_models

    (tmp_path / "targetnets.py").write_text(
        "from torch import nn\n\n"
        "def build(num_classes=3):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, num_classes))\n")
    path = tmp_path / "models.toml"
    path.write_text('[models.tags]\nsource = "targetnets:build"\nlabels = ["red", "green", "blue"]\n'
                    'input_size = 32\nscores = "sigmoid"\n\n'
                    '[models.price]\nsource = "targetnets:build"\ninput_size = 32\nscores = "regression"\n')
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / name)
    yield path
    unregister_models(path)


def run_main(capsys, *args):
    from vislib.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_label_regression_and_similar(capsys, tmp_path, cli_models):
    import json

    image, other = tmp_path / "a.png", tmp_path / "b.png"
    cases = [
        (["--model", "tags", "--label", "green", "--score", "probability"], "sigmoid of label 'green'"),
        (["--model", "price", "--regression", "1:down"], "output 1 (down)"),
        (["--model", "price", "--regression", "2"], "output 2 (up)"),
        (["--model", "tags", "--similar", other], "cosine similarity to b.png"),
    ]
    for flags, explained in cases:
        out = tmp_path / "out"
        code, stdout, err = run_main(capsys, "--models", cli_models, "explain", image, *flags,
                                     "--methods", "gradcam,gradient", "--out", out)
        assert code == 0, err
        scores = json.loads((out / "scores.json").read_text())
        assert scores["explained"] == explained and explained in stdout
    assert scores["outputs"] == "embedding" and scores["target"]["index"] is None
    code, _, err = run_main(capsys, "--models", cli_models, "explain", image, "--model", "price",
                            "--regression", "1:sideways", "--out", tmp_path / "x")
    assert code == 2 and "--regression takes" in err
    code, _, err = run_main(capsys, "--models", cli_models, "explain", image, "--model", "tags",
                            "--prompts", "a dog", "a cat", "--out", tmp_path / "x")
    assert code == 2 and "--prompts is for CLIP-like models" in err


# --------------------------------------------------------------------------------------------------
# The dashboard's helpers (vislib.ui.targets_view: no Streamlit)


def test_dashboard_helpers_for_prompts_labels_and_similar_images(tmp_path):
    from PIL import Image

    from vislib import ui

    assert ui.parse_prompts("a dog\n\n a cat ; a dog\n") == ["a dog", "a cat"]
    assert "as given" in ui.chart_title("probabilities") and "sigmoid" in ui.chart_title("sigmoid", 0.5)
    assert "softmax" in ui.chart_title("logits")
    torch.manual_seed(0)
    tags = vislib.load_model(GapNet(classes=5), preprocess=PLAIN, default_layer="features", device="cpu",
                             scores="sigmoid")
    rng = np.random.default_rng(1)
    a = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    found = ui.label_rows(tags, a, ["gradcam", "cam", "occlusion"], threshold=0.3)
    x = tags.prepare([a])[0]
    sig = torch.sigmoid(tags.model(x))[0].detach()
    assert [r[0] for r in found.rows] == [int(c) for c in sig.argsort(descending=True) if sig[c] >= 0.3]
    assert "occlusion" in found.refused and all(r[3].methods == ["gradcam", "cam"] for r in found.rows)
    same = ui.compare_images(tags, a, a.copy(), ["gradcam", "cam"])
    assert same.similarity == pytest.approx(1.0, abs=1e-6) and "cam" in same.refused
    np.testing.assert_array_equal(same.first.maps["gradcam"], same.second.maps["gradcam"])
    assert "penultimate" in same.embedding
