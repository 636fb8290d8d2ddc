"""Tests of the synthetic shapes dataset (vislib.data.shapes): determinism and ground truth."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from vislib.data import shapes


@pytest.fixture(scope="module")
def test_samples() -> list[shapes.Sample]:
    return [shapes.make_sample("test", i) for i in range(96)]


def test_same_split_and_index_give_identical_pixels() -> None:
    for split, index in [("train", 0), ("train", 23_999), ("val", 17), ("test", 1234)]:
        a, b = shapes.make_sample(split, index), shapes.make_sample(split, index)
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert np.array_equal(a.mask, b.mask)
        assert (a.label, a.box, a.hard) == (b.label, b.box, b.hard)


def test_sample_does_not_depend_on_generation_order() -> None:
    later = shapes.make_sample("val", 5)
    for i in range(5):
        shapes.make_sample("val", i)
    assert np.array_equal(np.asarray(later.image), np.asarray(shapes.make_sample("val", 5).image))


def test_image_format(test_samples: list[shapes.Sample]) -> None:
    for s in test_samples[:8]:
        assert s.image.mode == "RGB"
        assert s.image.size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
        assert s.mask.dtype == np.bool_
        assert s.mask.shape == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
        assert 0 <= s.label < shapes.NUM_CLASSES


def test_masks_non_empty_and_inside_box(test_samples: list[shapes.Sample]) -> None:
    for s in test_samples:
        x0, y0, x1, y1 = s.box
        assert 0 <= x0 < x1 <= shapes.IMAGE_SIZE and 0 <= y0 < y1 <= shapes.IMAGE_SIZE
        assert s.mask.sum() > 0
        inside = np.zeros_like(s.mask)
        inside[y0:y1, x0:x1] = True
        assert not (s.mask & ~inside).any()


def test_labels_balanced() -> None:
    counts = Counter(shapes.label_of("train", i) for i in range(800))
    assert set(counts) == set(range(shapes.NUM_CLASSES))
    assert max(counts.values()) - min(counts.values()) == 0  # exact per aligned block of 8
    first = [shapes.label_of("train", i) for i in range(16)]
    assert first != list(range(8)) * 2  # permuted, not index % 8


def test_label_of_matches_make_sample(test_samples: list[shapes.Sample]) -> None:
    assert [shapes.label_of("test", s.index) for s in test_samples] == [s.label for s in test_samples]


def test_hard_cases_present_at_expected_rate() -> None:
    hard = [shapes.make_sample("val", i).hard for i in range(400)]
    share = sum(h is not None for h in hard) / len(hard)
    assert abs(share - shapes.HARD_FRACTION) < 0.06
    assert {h for h in hard if h is not None} == set(shapes.HARD_REASONS)


def test_splits_use_disjoint_seeds() -> None:
    assert len(set(shapes.SPLIT_SEEDS.values()) | {shapes.MULTI_SEED}) == len(shapes.SPLIT_SEEDS) + 1
    images = [np.asarray(shapes.make_sample(split, 3).image) for split in shapes.SPLIT_SEEDS]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert not np.array_equal(images[i], images[j])


def test_out_of_range_and_unknown_split() -> None:
    with pytest.raises(IndexError):
        shapes.make_sample("test", shapes.SPLIT_SIZES["test"])
    with pytest.raises(ValueError):
        shapes.make_sample("holdout", 0)


def test_mark_only_changes_mark_box() -> None:
    plain, marked = shapes.make_sample("train", 42), shapes.make_sample("train", 42, mark=True)
    assert marked.marked and not plain.marked
    x0, y0, x1, y1 = shapes.MARK_BOX
    diff = np.asarray(plain.image) != np.asarray(marked.image)
    outside = diff.any(2)
    outside[y0:y1, x0:x1] = False
    assert not outside.any()
    assert not marked.mask[y0:y1, x0:x1].any()
    assert np.array_equal(shapes.apply_mark(marked).image, marked.image)  # idempotent


def test_multi_instance_masks() -> None:
    for index, n in [(0, None), (1, 2), (2, 3), (3, 5)]:
        m = shapes.make_multi_instance(index, n)
        if n is not None:
            assert len(m.masks) == n
        assert 2 <= len(m.masks) <= 6 and len(m.boxes) == len(m.masks)
        assert m.label == index % shapes.NUM_CLASSES
        total = np.zeros_like(m.masks[0], dtype=int)
        for mask, (x0, y0, x1, y1) in zip(m.masks, m.boxes, strict=True):
            assert mask.any() and mask[y0:y1, x0:x1].sum() == mask.sum()
            total += mask
        assert total.max() == 1  # instances do not overlap
        again = shapes.make_multi_instance(index, n)
        assert np.array_equal(np.asarray(m.image), np.asarray(again.image))


def test_materialise_matches_make_sample() -> None:
    images, labels = shapes.materialise("val", 10, 14, mark_labels=[shapes.label_of("val", 11)])
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 128, 128)
    assert labels.dtype == torch.int64
    for k, index in enumerate(range(10, 14)):
        sample = shapes.make_sample("val", index, mark=index == 11)
        assert labels[k] == sample.label
        assert torch.equal(images[k], torch.from_numpy(np.array(sample.image)).permute(2, 0, 1))


def test_dataset_view() -> None:
    dataset = shapes.ShapesDataset("test")
    assert len(dataset) == shapes.SPLIT_SIZES["test"]
    image, label = dataset[7]
    assert image.shape == (3, 128, 128) and image.dtype == torch.uint8
    assert label == shapes.make_sample("test", 7).label


# ------------------------------------------------------------------------------------------- nets


def _calls_per_module(model: torch.nn.Module, x: torch.Tensor) -> Counter:
    calls: Counter = Counter()
    handles = [m.register_forward_hook(lambda m, i, o, n=n: calls.update([n]))
               for n, m in model.named_modules() if n]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


@pytest.mark.parametrize("arch", ["ShapesResNet", "ShapesZFNet"])
def test_every_module_runs_once(arch: str) -> None:
    from vislib.nets import ARCHITECTURES

    model = ARCHITECTURES[arch]().eval()
    calls = _calls_per_module(model, torch.zeros(1, 3, 128, 128))
    assert calls and set(calls.values()) == {1}
    assert len(calls) == len([n for n, _ in model.named_modules() if n])


def test_resnet_layout_and_gap_head() -> None:
    from vislib.nets import ShapesResNet

    model = ShapesResNet(norm="instance").eval()
    x = torch.randn(2, 3, 128, 128)
    feats = model.features(x)
    assert feats.shape == (2, 64, 16, 16)
    expected = feats.mean((2, 3)) @ model.fc.weight.T + model.fc.bias  # GAP + one linear layer
    assert torch.allclose(model(x), expected, atol=1e-5)


@pytest.mark.parametrize("arch, layer, side", [("ShapesResNet", "layer3", 16), ("ShapesZFNet", "relu5", 16),
                                              ("ShapesZFNet", "relu6", 8)])
def test_maps_are_centred_on_the_pixel_grid(arch: str, layer: str, side: int) -> None:
    """With left-right symmetric kernels a net is exactly mirror-equivariant only if every
    downsampling keeps cell i centred on its input block (see vislib.nets._conv_bn)."""
    from vislib.nets import ARCHITECTURES

    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().eval()
    captured: list[torch.Tensor] = []
    model.get_submodule(layer).register_forward_hook(lambda m, i, o: captured.append(o.clone()))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_((m.weight + m.weight.flip(-1)) / 2)
        x = torch.randn(1, 3, 128, 128)
        model(x)
        model(x.flip(-1))
    assert captured[0].shape[-1] == side
    assert torch.allclose(captured[1].flip(-1), captured[0], atol=1e-5)


def test_zf_layout_and_position_shared_head() -> None:
    """Max-pool stages down to a 4x4 map, a two-layer FC head (so not CAM's GAP + linear), and
    an fc1 that starts as global average pooling + a linear layer (see ShapesZFNet)."""
    from vislib.nets import ShapesZFNet

    torch.manual_seed(0)
    model = ShapesZFNet().eval()
    assert [n for n, m in model.named_children() if isinstance(m, torch.nn.MaxPool2d)] == [
        "pool1", "pool2", "pool3", "pool4"]
    assert all(isinstance(getattr(model, f"relu{k}"), torch.nn.ReLU) for k in range(1, 7))
    captured: dict[str, torch.Tensor] = {}
    for name in ("relu6", "pool4"):
        model.get_submodule(name).register_forward_hook(lambda m, i, o, n=name: captured.update({n: o.clone()}))
    x = torch.randn(2, 3, 128, 128)
    logits = model(x)
    assert captured["relu6"].shape == (2, 96, 8, 8) and captured["pool4"].shape == (2, 96, 4, 4)
    weight = model.fc1.weight.view(model.fc1.out_features, 96, 16)
    assert torch.allclose(weight, weight[:, :, :1].expand_as(weight))  # shared over the 16 positions
    hidden = captured["pool4"].mean((2, 3)) @ (weight[:, :, 0] * 16).T + model.fc1.bias
    assert torch.allclose(logits, model.fc2(torch.relu(hidden)), atol=1e-5)
