"""Tests of the generated multi-object scenes (vislib.data.scenes) and the object training helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vislib.data import scenes
from vislib.data.train_objects import dihedral_boxes


@pytest.fixture(scope="module")
def test_scenes() -> list[scenes.Scene]:
    return [scenes.make_scene("test", i) for i in range(60)]


def test_same_split_and_index_give_identical_scenes() -> None:
    for split, index in [("train", 0), ("train", 19_999), ("val", 3), ("test", 999)]:
        a, b = scenes.make_scene(split, index), scenes.make_scene(split, index)
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert (a.labels, a.boxes) == (b.labels, b.boxes)
        assert all(np.array_equal(m, n) for m, n in zip(a.masks, b.masks, strict=True))


def test_splits_differ() -> None:
    a, b = scenes.make_scene("train", 5), scenes.make_scene("test", 5)
    assert not np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_boxes_are_the_masks_extent_and_objects_never_overlap(test_scenes) -> None:
    counts = set()
    for s in test_scenes:
        counts.add(len(s.labels))
        assert len(s.labels) == len(s.boxes) == len(s.masks)
        total = np.zeros((scenes.IMAGE_SIZE,) * 2, int)
        for box, mask in zip(s.boxes, s.masks, strict=True):
            ys, xs = np.nonzero(mask)
            assert box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            total += mask
        assert total.max() == 1
    assert counts == set(range(1, scenes.MAX_OBJECTS + 1))


def test_class_map_and_target_agree(test_scenes) -> None:
    for s in test_scenes[:10]:
        cmap = s.class_map
        for label, mask in zip(s.labels, s.masks, strict=True):
            assert (cmap[mask] == label + 1).all()
        assert (cmap[~np.any(s.masks, 0)] == 0).all()
        target = s.target()
        assert target["labels"].tolist() == [c + 1 for c in s.labels]
        assert target["boxes"].shape == (len(s.labels), 4)


def test_materialise_matches_single_scenes() -> None:
    images, maps, targets = scenes.materialise_scenes("val", 10, 14)
    for i, index in enumerate(range(10, 14)):
        s = scenes.make_scene("val", index)
        assert np.array_equal(images[i].permute(1, 2, 0).numpy(), np.asarray(s.image))
        assert np.array_equal(maps[i].numpy(), s.class_map)
        assert torch.equal(targets[i]["boxes"], s.target()["boxes"])


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("flip", [False, True])
def test_dihedral_boxes_follow_the_pixels(k: int, flip: bool) -> None:
    s = scenes.make_scene("train", 7)
    cmap = torch.from_numpy(s.class_map)
    moved = cmap.flip(-1) if flip else cmap
    moved = torch.rot90(moved, k, dims=(-2, -1))
    boxes = dihedral_boxes(s.target()["boxes"], scenes.IMAGE_SIZE, k, flip)
    for label, box in zip(s.labels, boxes.tolist(), strict=True):
        ys, xs = torch.nonzero(moved == label + 1, as_tuple=True)
        assert box == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_bad_split_and_index() -> None:
    with pytest.raises(ValueError):
        scenes.make_scene("nope", 0)
    with pytest.raises(IndexError):
        scenes.make_scene("test", scenes.SCENE_SIZES["test"])
