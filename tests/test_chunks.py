"""Chunked recorded graphs on the CPU: a batch explained in chunks equals the batch explained in one
graph (maps, raw signals, probabilities, targets, per-sample extras), and progress runs over the
whole batch."""

import sys

import numpy as np
import pytest
import torch
from helpers import PLAIN, GapNet

import vislib
from vislib.explain import graph_chunks

explain_module = sys.modules["vislib.explain"]  # the module (vislib.explain is also the function)

VIEW = ["cam", "gradcam", "gradcam++", "layercam", "guided_backprop", "deconvnet", "gradient"]


@pytest.fixture
def bundle():
    torch.manual_seed(0)
    return vislib.load_model(GapNet(channels=6, classes=4), preprocess=PLAIN, default_layer="features",
                             device="cpu")


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.rand(5, 3, 16, 16)


def test_chunk_sizes_follow_the_largest_activation(bundle, x, monkeypatch):
    per_image = max(r.view.channels * int(np.prod(r.view.grid)) for r in bundle.layer_table if r.view) * 4
    monkeypatch.setattr(explain_module, "GRAPH_CHUNK_BYTES", 2 * per_image)  # two images per graph
    assert graph_chunks(bundle, x, ["gradcam"]) == [2, 2, 1]
    assert graph_chunks(bundle, x[:1], ["gradcam"]) == [1]
    assert graph_chunks(bundle, x, ["occlusion"]) == [5]  # no recorded graph: the method batches itself
    # an input of four times the pixels: four times the activation per image, one image per graph
    big = torch.rand(3, 3, 32, 32)
    assert graph_chunks(bundle, big, ["gradcam"]) == [1, 1, 1]
    monkeypatch.setattr(explain_module, "GRAPH_CHUNK_BYTES", 10**12)
    assert graph_chunks(bundle, x, ["gradcam"]) == [5]


@pytest.mark.parametrize("target", [None, 2, [0, 1, 2, 3, 0]])
def test_a_batch_in_chunks_equals_the_batch_in_one_graph(bundle, x, monkeypatch, target):
    monkeypatch.setattr(explain_module, "GRAPH_CHUNK_BYTES", 10**12)
    whole = vislib.explain(bundle, x, VIEW + ["smoothgrad"], target=target,
                           options={"smoothgrad": {"n_samples": 3, "seed": 0}})
    monkeypatch.setattr(explain_module, "GRAPH_CHUNK_BYTES", 1)  # every image its own graph
    steps = []
    chunked = vislib.explain(bundle, x, VIEW + ["smoothgrad"], target=target,
                             options={"smoothgrad": {"n_samples": 3, "seed": 0}},
                             progress=lambda done, total: steps.append((done, total)))
    assert chunked.target == whole.target
    np.testing.assert_allclose(chunked.probs, whole.probs, rtol=1e-5, atol=1e-7)
    for m in VIEW:
        np.testing.assert_allclose(chunked.raw[m], whole.raw[m], rtol=1e-5, atol=1e-7, err_msg=m)
        np.testing.assert_allclose(chunked.maps[m], whole.maps[m], rtol=0, atol=1e-5, err_msg=m)
    assert chunked.raw["smoothgrad"].shape == whole.raw["smoothgrad"].shape
    assert set(chunked.pass_timings) == set(whole.pass_timings)
    if steps:  # progress never goes back, and ends at its total
        assert all(b[0] >= a[0] for a, b in zip(steps, steps[1:], strict=False))
        assert steps[-1][0] == steps[-1][1]


def test_a_contrast_and_a_wrong_target_list_with_chunks(bundle, x, monkeypatch):
    monkeypatch.setattr(explain_module, "GRAPH_CHUNK_BYTES", 10**12)
    whole = vislib.explain(bundle, x, ["gradcam"], target=[0] * 5, contrast=[1, 2, 3, 1, 2])
    monkeypatch.setattr(explain_module, "GRAPH_CHUNK_BYTES", 1)
    chunked = vislib.explain(bundle, x, ["gradcam"], target=[0] * 5, contrast=[1, 2, 3, 1, 2])
    assert chunked.contrast == whole.contrast == [1, 2, 3, 1, 2]
    np.testing.assert_allclose(chunked.raw["gradcam"], whole.raw["gradcam"], rtol=1e-5, atol=1e-7)
    with pytest.raises(vislib.VislibError, match="5"):  # the whole batch's count, not a chunk's
        vislib.explain(bundle, x, ["gradcam"], target=[0, 1])
