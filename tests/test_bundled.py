"""The bundled offline models: each reproduces its model card, and Grad-CAM points at the object."""

import numpy as np
import pytest
import torch

import vislib
from vislib.data import shapes

NAME = "shapes_resnet"
CARD_MODELS = [pytest.param(name, marks=pytest.mark.skipif(name not in vislib.list_models(),
                                                          reason=f"{name} is not bundled yet"))
               for name in ("shapes_resnet", "shapes_zf")]
needs_resnet = pytest.mark.skipif(NAME not in vislib.list_models(), reason=f"{NAME} is not bundled yet")


@pytest.fixture(scope="module", params=CARD_MODELS)
def card_bundle(request):
    return vislib.load_model(request.param, device="cpu")


@pytest.fixture(scope="module")
def bundle():
    return vislib.load_model(NAME, device="cpu")


def test_card_describes_the_model(card_bundle):
    bundle = card_bundle
    card = bundle.card
    assert card["labels"] == list(shapes.CLASSES) == bundle.labels
    assert card["default_layer"] == bundle.default_layer
    assert set(card["metrics"]["per_class_test_accuracy"]) == set(shapes.CLASSES)
    assert 0.8 <= card["metrics"]["test_accuracy"] < 1.0, "the model should make a few real mistakes"
    assert bundle.weights.endswith(".safetensors")


def test_reproduces_model_card_accuracy_on_fixed_subset(card_bundle):
    bundle = card_bundle
    subset = bundle.card["metrics"]["subset"]
    samples = [shapes.make_sample(subset["split"], i) for i in range(subset["start"], subset["stop"])]
    correct = 0
    for start in range(0, len(samples), 100):
        chunk = samples[start:start + 100]
        with torch.no_grad():
            logits = bundle.model(bundle.to_input([bundle.input_view(s.image) for s in chunk]))
        correct += (logits.argmax(1).cpu() == torch.tensor([s.label for s in chunk])).sum().item()
    accuracy = correct / len(samples)
    assert accuracy == pytest.approx(subset["accuracy"], abs=1.5 / len(samples))


def pointing(bundle, n: int = 300) -> dict[str, float]:
    """Grad-CAM of the true class on the first ``n`` single-object test images: the pointing game
    (METHODS.md: within 15 px at 224, i.e. 9 px here) and the strict one (on an object pixel), each
    with the image-centre baseline."""
    from vislib import metrics

    samples = [shapes.make_sample("test", i) for i in range(n)]
    result = vislib.explain(bundle, [s.image for s in samples], methods=["gradcam"],
                            target=[s.label for s in samples])
    masks = np.stack([s.mask for s in samples])
    maps, flat = result.maps["gradcam"], result.flat["gradcam"]
    scores = {"hits": metrics.pointing_hits(maps, masks, flat=flat).mean(),
              "strict": metrics.pointing_hits(maps, masks, tolerance=0, flat=flat).mean(),
              "centre": metrics.centre_hits(masks).mean(),
              "centre_strict": metrics.centre_hits(masks, tolerance=0).mean()}
    print(f"{bundle.name} Grad-CAM pointing game {scores['hits']:.3f} (centre baseline {scores['centre']:.3f}); "
          f"strictly inside the mask {scores['strict']:.3f} (centre {scores['centre_strict']:.3f})")
    return scores


@needs_resnet
def test_gradcam_points_at_the_object(bundle):
    """Pointing game on single-object test images, with the image-centre baseline beside it.

    Two readings are measured: the pointing game of Zhang et al. 2016 as defined in METHODS.md (the
    map's maximum within 15 px of the object at 224 px, scaled to this 128-px input: 9 px), which
    must reach 0.9; and the strict one (the maximum on an object pixel), which is printed and must
    beat the centre baseline. Grad-CAM of a GAP network peaks on the shapes' edges and corners, and
    the centre of a ring is its hole, so the strict reading stays lower (figures in the model card).
    """
    scores = pointing(bundle)
    assert scores["hits"] >= 0.9
    assert scores["hits"] > scores["centre"] + 0.3
    assert scores["strict"] > scores["centre_strict"] + 0.2


@pytest.mark.skipif("shapes_zf" not in vislib.list_models(), reason="shapes_zf is not bundled yet")
def test_zf_gradcam_beats_the_image_centre():
    """The fully connected head of shapes_zf mixes positions, and its Grad-CAM (relu6, 8×8) localises
    far less well than the GAP network's: measured on these 300 images, pointing game 0.56 (centre
    0.52), strictly inside 0.41 (centre 0.30). The card and the Learn page say so."""
    scores = pointing(vislib.load_model("shapes_zf", device="cpu"))
    assert scores["strict"] > scores["centre_strict"] + 0.08
    assert scores["hits"] > scores["centre"]


def test_sample_images_are_bundled():
    samples = vislib.sample_images()
    assert len(samples) >= 4
    for path in samples:
        assert vislib.load_image(path).size[0] >= 64
