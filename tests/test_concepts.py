"""Deep Feature Factorization: the NMF, the concept maps and the classes through the head, checked
against hand computations on small networks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import FlatNet, GapNet, assert_untouched, snapshot, tiny_bundle
from PIL import Image
from torch import nn

import vislib
from vislib.concepts import concept_colors, concept_image, legend_html, nmf


@pytest.fixture
def gap():
    torch.manual_seed(1)
    return tiny_bundle(GapNet(channels=8, classes=5))


@pytest.fixture
def x():
    torch.manual_seed(2)
    return torch.rand(3, 3, 16, 16)


def test_nmf_error_never_increases_and_factors_are_nonnegative():
    torch.manual_seed(0)
    V = torch.rand(12, 40).pow(2)
    fit = nmf(V, 4, iterations=200, tol=0.0)
    losses = np.array(fit.losses)
    assert len(losses) == 200
    assert np.all(np.diff(losses) <= 1e-9 * losses[:-1])  # Lee & Seung: monotone
    assert losses[-1] < 0.5 * losses[0]
    assert (fit.W >= 0).all() and (fit.H >= 0).all() and (fit.W @ fit.H >= 0).all()
    expected = float((V.double() - fit.W @ fit.H).norm() / V.double().norm())
    assert abs(fit.relative_error - expected) < 1e-12


def test_nmf_recovers_an_exact_low_rank_matrix_and_is_deterministic():
    gen = torch.Generator().manual_seed(3)
    V = torch.rand(10, 3, generator=gen) @ torch.rand(3, 30, generator=gen)
    fit = nmf(V, 3, iterations=3000, tol=0.0)
    assert fit.relative_error < 1e-2
    again = nmf(V, 3, iterations=3000, tol=0.0)
    assert torch.equal(fit.W, again.W) and torch.equal(fit.H, again.H)
    other = nmf(V, 3, iterations=10, seed=1)
    assert not torch.equal(nmf(V, 3, iterations=10).W, other.W)
    with pytest.raises(ValueError, match="non-negative"):
        nmf(V - 1, 2)


def test_concept_maps_and_classes_by_hand_on_a_gap_head(gap, x):
    before = snapshot(gap.model)
    result = vislib.concepts(gap, x[0], k=3)
    assert_untouched(gap.model, before)
    assert result.maps.shape == (3, 16, 16) and result.maps.dtype == np.float32
    assert result.maps.min() >= 0 and result.maps.max() <= 1
    assert result.raw.shape == (3, 8, 8)
    np.testing.assert_allclose(result.raw.reshape(3, -1).max(axis=1), 1.0)  # each row H_d scaled to max 1
    assert np.all(np.diff(result.share) <= 0) and abs(result.share.sum() - 1) < 1e-6
    # the factorization, rebuilt from what is returned: A ≈ offset + Σ_d (vector_d − offset) ⊗ map_d
    A = gap.model.features(x[:1]).detach()[0].double().reshape(8, -1)
    offset = A.amin(dim=1, keepdim=True)
    vectors = torch.from_numpy(result.vectors).double()
    rebuilt = offset + (vectors.T - offset) @ torch.from_numpy(result.raw).double().reshape(3, -1)
    error = float((A - rebuilt).norm() / (A - offset).norm())
    assert abs(error - result.relative_error) < 1e-5
    # classes: the linear layer after GAP applied to each concept vector, then the softmax
    assert result.head == "gap_linear"
    logits = F.linear(vectors.float(), gap.model.fc.weight.detach(), gap.model.fc.bias.detach())
    np.testing.assert_allclose(result.logits, logits.numpy(), rtol=1e-5, atol=1e-6)
    probs = F.softmax(logits, dim=1)
    for d in range(3):
        top = torch.argsort(probs[d], descending=True)[:3].tolist()
        assert [c for c, _, _ in result.top_classes[d]] == top
        np.testing.assert_allclose([p for _, _, p in result.top_classes[d]], probs[d, top].numpy(), rtol=1e-5)
        assert [label for _, label, _ in result.top_classes[d]] == [gap.labels[c] for c in top]


def test_a_batch_is_factorized_jointly(gap, x):
    result = vislib.concepts(gap, x[:2], k=2)
    assert result.batched and result.maps.shape == (2, 2, 16, 16) and result.raw.shape == (2, 2, 8, 8)
    assert len(result.input_image) == 2
    # one concept vector per concept, shared by both images: the maxima of H_d are over the batch
    np.testing.assert_allclose(result.raw.transpose(1, 0, 2, 3).reshape(2, -1).max(axis=1), 1.0)


def test_classes_through_a_traced_head_on_a_flatten_head():
    torch.manual_seed(4)
    bundle = tiny_bundle(FlatNet(channels=5, classes=3))
    result = vislib.concepts(bundle, torch.rand(3, 16, 16), k=2)
    assert result.head == "traced_head"
    tiled = torch.from_numpy(result.vectors)[:, :, None, None].expand(-1, -1, 8, 8)  # the concept everywhere
    expected = bundle.model.fc(tiled.flatten(1)).detach()
    np.testing.assert_allclose(result.logits, expected.numpy(), rtol=1e-5, atol=1e-6)


class SkipNet(nn.Module):
    """A skip connection around the target layer ``inner``: the head reads a value from below it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.inner = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.stem(x)
        return self.fc((self.inner(y) + y).mean(dim=(2, 3)))


def test_a_head_that_reads_below_the_layer_is_refused_with_the_reason():
    torch.manual_seed(5)
    bundle = vislib.load_model(SkipNet(), preprocess=tiny_bundle(GapNet()).preprocess, default_layer="inner",
                               device="cpu")
    before = snapshot(bundle.model)
    with pytest.raises(vislib.MethodError, match="not a function of that layer alone.*classes=False"):
        vislib.concepts(bundle, torch.rand(3, 16, 16), k=2)
    assert_untouched(bundle.model, before)
    maps_only = vislib.concepts(bundle, torch.rand(3, 16, 16), k=2, classes=False)
    assert maps_only.head == "none" and maps_only.top_classes == [] and maps_only.maps.shape == (2, 16, 16)
    assert maps_only.legend() == [f"Concept {d + 1} ({maps_only.share[d]:.0%} of the layer)" for d in range(2)]


def test_bad_k_and_layer_are_user_errors(gap, x):
    with pytest.raises(vislib.MethodError, match="k must be an integer from 1 to 8"):
        vislib.concepts(gap, x[0], k=9)
    with pytest.raises(vislib.MethodError, match="k must be"):
        vislib.concepts(gap, x[0], k=0)
    with pytest.raises(vislib.LayerError):
        vislib.concepts(gap, x[0], layer="nope")


def test_model_untouched_after_a_failure(gap, x):
    before = snapshot(gap.model)
    original = gap.model.fc.forward
    gap.model.fc.forward = lambda _: (_ for _ in ()).throw(RuntimeError("boom"))
    try:
        with pytest.raises(RuntimeError, match="boom"):
            vislib.concepts(gap, x[0], k=2)
    finally:
        gap.model.fc.forward = original
    assert_untouched(gap.model, before)


def test_concept_image_colours_each_pixel_by_its_strongest_concept():
    image = Image.fromarray(np.full((2, 2, 3), 100, np.uint8))
    maps = np.zeros((2, 2, 2), np.float32)
    maps[0, 0, 0], maps[1, 0, 0] = 1.0, 0.5  # concept 1 wins at (0, 0), fully present
    maps[1, 1, 1] = 0.5  # concept 2 at (1, 1), half present
    colours = [(255, 0, 0), (0, 0, 255)]
    out = np.asarray(concept_image(image, maps, alpha=0.8, colors=colours)).astype(float)
    np.testing.assert_allclose(out[0, 0], 0.2 * 100 + 0.8 * np.array([255, 0, 0]), atol=0.5)
    np.testing.assert_allclose(out[1, 1], 0.6 * 100 + 0.4 * np.array([0, 0, 255]), atol=0.5)
    np.testing.assert_allclose(out[0, 1], [100, 100, 100], atol=0.5)  # no concept: the image
    assert len(set(concept_colors(7))) == 7


def test_legend_names_the_top_classes_and_escapes_them(x):
    torch.manual_seed(1)
    bundle = tiny_bundle(GapNet(channels=8, classes=3), labels=["<cat>", "dog & co", "car"])
    result = vislib.concepts(bundle, x[0], k=2)
    text = legend_html(result, top=3)
    assert "&lt;cat&gt;" in text and "dog &amp; co" in text and "<cat>" not in text
    assert text.count("&#9632;") == 2


def test_concept_lesson_places_each_concept_by_its_share_on_the_objects():
    from types import SimpleNamespace

    from vislib.lessons import ConceptLesson

    masks = np.zeros((1, 10, 10), bool)
    masks[0, :2] = True  # objects: 20% of the pixels
    fake = SimpleNamespace(k=3, layer="layer3", top_classes=[[(0, "circle", 0.9)], [(1, "star", 0.6)],
                                                             [(2, "cross", 0.5)]])
    lesson = ConceptLesson("m", fake, [0], masks, np.array([0.5, 0.3, 0.1]))
    np.testing.assert_allclose(lesson.enrichment, [2.5, 1.5, 0.5])
    assert [lesson.kind(d) for d in range(3)] == ["object", "mixed", "background"]
    text = lesson.sentence()
    assert "1 sits on the objects" in text and "concept 1 (circle)" in text
    assert "1 lies partly on the objects: concept 2 (star)" in text
    assert "1 lies on the background: concept 3 (cross)." in text
