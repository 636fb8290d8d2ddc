"""The bundled offline model: reproduces its model card and its Grad-CAM points at the object."""

import numpy as np
import pytest
import torch

import vislib
from vislib.data import shapes

NAME = "shapes_resnet"
pytestmark = pytest.mark.skipif(NAME not in vislib.list_models(), reason=f"{NAME} is not bundled yet")


@pytest.fixture(scope="module")
def bundle():
    return vislib.load_model(NAME, device="cpu")


def test_card_describes_the_model(bundle):
    card = bundle.card
    assert card["labels"] == list(shapes.CLASSES) == bundle.labels
    assert card["default_layer"] == bundle.default_layer
    assert set(card["metrics"]["per_class_test_accuracy"]) == set(shapes.CLASSES)
    assert 0.8 <= card["metrics"]["test_accuracy"] < 1.0, "the model should make a few real mistakes"
    assert bundle.weights.endswith(".safetensors")


def test_reproduces_model_card_accuracy_on_fixed_subset(bundle):
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


def test_gradcam_peak_lands_inside_the_object(bundle):
    """Pointing game on single-object test images, with the image-centre baseline beside it."""
    samples = [shapes.make_sample("test", i) for i in range(200)]
    result = vislib.explain(bundle, [s.image for s in samples], methods=["gradcam"],
                            target=[s.label for s in samples])
    hits, centre_hits = [], []
    size = shapes.IMAGE_SIZE
    for sample, heat in zip(samples, result.maps["gradcam"], strict=True):
        y, x = np.unravel_index(np.argmax(heat), heat.shape)
        hits.append(bool(sample.mask[y, x]))
        centre_hits.append(bool(sample.mask[size // 2, size // 2]))
    rate, centre = float(np.mean(hits)), float(np.mean(centre_hits))
    print(f"Grad-CAM pointing: {rate:.3f}; image-centre baseline: {centre:.3f}")
    assert rate >= 0.9
    assert rate > centre + 0.3


def test_sample_images_are_bundled():
    samples = vislib.sample_images()
    assert len(samples) >= 4
    for path in samples:
        assert vislib.load_image(path).size[0] >= 64
