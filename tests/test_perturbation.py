"""The perturbation family (Score-CAM, Ablation-CAM, Eigen-CAM, occlusion) against hand-written
reference loops, analytic models and exact identities; cancellation and model hygiene."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import Counter, assert_untouched, snapshot
from torch import nn

import vislib
from vislib.methods.perturbation import eigen_cam, trace_head, upsampled_masks, window_starts

SIZE = 8
PLAIN = vislib.Preprocess(resize=SIZE, crop=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


class ChannelNet(nn.Module):
    """conv → ReLU (target ``features``) → GAP → linear, with hand-set special channels.

    Channel 1 is identically zero (bias −100), channel 2 is the constant 2 (zero kernel), channel 3
    duplicates channel 0 and channel 4 is exactly 4× channel 0 (same normalised map): only channels
    0, 5, 6, 7 (and one zero-image pass) need their own forward in Score-CAM.
    """

    def __init__(self, channels: int = 8, classes: int = 4, logit_shift: float = 0.0):
        super().__init__()
        self.count = Counter()
        self.features = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)
        conv = self.features[0]
        with torch.no_grad():
            conv.bias[1] = -100.0
            conv.weight[2] = 0.0
            conv.bias[2] = 2.0
            conv.weight[3] = conv.weight[0]
            conv.bias[3] = conv.bias[0]
            conv.weight[4] = 4 * conv.weight[0]
            conv.bias[4] = 4 * conv.bias[0]
            self.fc.bias += logit_shift

    def forward(self, x):
        return self.fc(self.pool(self.features(self.count(x))).flatten(1))


class DeepNet(nn.Module):
    """conv → ReLU → conv → ReLU (target ``features``) → conv → ReLU → flatten → linear."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.count = Counter()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.ReLU()
        )
        self.top = nn.Sequential(nn.Conv2d(5, 4, 3, padding=1), nn.ReLU(inplace=True))
        self.fc = nn.Linear(4 * (SIZE // 2) ** 2, classes)

    def forward(self, x):
        return self.fc(self.top(self.features(self.count(x))).flatten(1))


class SkipNet(DeepNet):
    """DeepNet with a skip connection around the target layer: no fx head can be cut there."""

    def forward(self, x):
        x = self.count(x)
        skip = F.avg_pool2d(x, 2)[:, :1]  # read from below the target layer
        return self.fc(self.top(self.features(x) + skip).flatten(1))


class LinearNet(nn.Module):
    """logits = W · x + b, through a 4-D identity layer (so the bundle has a target layer)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.features = nn.Identity()
        self.fc = nn.Linear(3 * SIZE * SIZE, classes)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def bundle_of(net: nn.Module, layer: str = "features") -> vislib.ModelBundle:
    return vislib.load_model(net, preprocess=PLAIN, default_layer=layer, device="cpu")


def inputs(n: int = 2, seed: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.rand(n, 3, SIZE, SIZE) * 2 - 0.5


def target_scores(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, score: str = "logit"):
    with torch.no_grad():
        logits = model(x)
    picked = logits if score == "logit" else F.softmax(logits, dim=1)
    return picked.gather(1, targets.view(-1, 1)).squeeze(1)


def features_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.features(x)


def raw(result, method: str) -> torch.Tensor:
    value = torch.from_numpy(result.raw[method])
    return value if result.batched else value.unsqueeze(0)


# --------------------------------------------------------------------------------------------------
# Score-CAM


def score_cam_reference(model, x, targets, score="logit", align_corners=False):
    """Straight from the definition: one masked forward per sample and channel, no batching."""
    A = features_of(model, x)
    maps = []
    for i in range(len(x)):
        scores = []
        for k in range(A.shape[1]):
            up = F.interpolate(A[i : i + 1, k : k + 1], x.shape[-2:], mode="bilinear", align_corners=align_corners)
            lo, hi = up.min(), up.max()
            mask = (up - lo) / (hi - lo) if hi > lo else torch.zeros_like(up)
            scores.append(target_scores(model, x[i : i + 1] * mask, targets[i : i + 1], score))
        weights = torch.softmax(torch.cat(scores), dim=0)
        maps.append(F.relu((weights.view(-1, 1, 1) * A[i]).sum(dim=0)))
    return torch.stack(maps)


@pytest.mark.parametrize("score, align_corners", [("logit", False), ("probability", False), ("logit", True)])
def test_scorecam_equals_reference_loop(score, align_corners):
    torch.manual_seed(0)
    bundle = bundle_of(DeepNet())
    x = inputs(2)
    options = {"scorecam": {"batch_size": 3, "align_corners": align_corners}}
    result = vislib.explain(bundle, x, methods=["scorecam"], target=[0, 2], score=score, options=options)
    expected = score_cam_reference(bundle.model, x, torch.tensor([0, 2]), score, align_corners)
    torch.testing.assert_close(raw(result, "scorecam"), expected, rtol=1e-4, atol=1e-6)
    assert result.extras["scorecam"]["approximate"] is False


def test_scorecam_skipping_is_exact_and_saves_forwards():
    torch.manual_seed(0)
    net = ChannelNet()
    bundle = bundle_of(net)
    x = inputs(1)
    A = features_of(net, x)
    assert torch.all(A[0, 1] == 0) and torch.all(A[0, 2] == 2.0)

    net.count.images = 0
    skipped = vislib.explain(bundle, x, methods=["scorecam"], target=1)
    skip_images = net.count.images
    net.count.images = 0
    full = vislib.explain(bundle, x, methods=["scorecam"], target=1, options={"scorecam": {"skip": False}})
    full_images = net.count.images

    extra = skipped.extras["scorecam"]
    # channels 0, 5, 6, 7 have distinct masks; 1 and 2 share the zero image; 3 and 4 repeat 0
    assert extra["channels_evaluated"] == 4 and extra["channels_skipped"] == 4 and extra["forwards"] == 5
    assert skip_images == 1 + 5  # the shared activation pass, then the masked forwards
    assert full.extras["scorecam"]["forwards"] == 8 and full_images == 1 + 8
    torch.testing.assert_close(raw(skipped, "scorecam"), raw(full, "scorecam"), rtol=1e-5, atol=1e-7)
    maps = [torch.from_numpy(r.maps["scorecam"]) for r in (skipped, full)]
    torch.testing.assert_close(maps[0], maps[1], rtol=1e-5, atol=1e-6)
    expected = score_cam_reference(net, x, torch.tensor([1]))
    torch.testing.assert_close(raw(skipped, "scorecam"), expected, rtol=1e-4, atol=1e-6)


def test_scorecam_weights_are_a_softmax_invariant_to_a_score_shift():
    x = inputs(2)
    options = {"scorecam": {"return_weights": True, "batch_size": 4}}
    torch.manual_seed(0)
    plain = vislib.explain(bundle_of(ChannelNet()), x, methods=["scorecam"], target=0, options=options)
    torch.manual_seed(0)
    shifted = vislib.explain(bundle_of(ChannelNet(logit_shift=7.5)), x, methods=["scorecam"], target=0,
                             options=options)
    w = torch.tensor(plain.extras["scorecam"]["weights"])
    w_shifted = torch.tensor(shifted.extras["scorecam"]["weights"])
    assert w.shape == (2, 8) and torch.all(w > 0)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(2))
    torch.testing.assert_close(w_shifted, w, rtol=1e-5, atol=1e-7)  # every channel score + 7.5
    torch.testing.assert_close(raw(shifted, "scorecam"), raw(plain, "scorecam"), rtol=1e-5, atol=1e-7)


def test_scorecam_top_k_is_labelled_approximate():
    torch.manual_seed(0)
    net = DeepNet()
    bundle = bundle_of(net)
    result = vislib.explain(bundle, inputs(1), methods=["scorecam"], options={"scorecam": {"top_k": 2}})
    extra = result.extras["scorecam"]
    assert extra["approximate"] is True and "approximate" in extra["title"]
    assert extra["channels_evaluated"] <= 2 and extra["channels_dropped"] == 3
    exact = vislib.explain(bundle, inputs(1), methods=["scorecam"], options={"scorecam": {"top_k": 5}})
    assert exact.extras["scorecam"]["approximate"] is False


def test_upsampled_masks_are_min_max_normalised():
    feats = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[4.0, 4.0], [4.0, 4.0]]])
    masks = upsampled_masks(feats, (6, 6))
    assert masks[0].min() == 0 and masks[0].max() == 1
    assert torch.all(masks[1] == 0)  # constant map: 0/0 → mask 0 (the masked input is the zero image)
    # invariant to a positive affine change of the feature map
    torch.testing.assert_close(upsampled_masks(5 * feats[:1] + 2, (6, 6)), masks[:1])


# --------------------------------------------------------------------------------------------------
# Ablation-CAM


def ablation_reference(model, x, targets, head):
    """(S − S_{A^k=0}) / S channel by channel, with the head written out by hand."""
    A = features_of(model, x)
    base = target_scores(model, x, targets)
    maps = []
    with torch.no_grad():
        for i in range(len(x)):
            weights = []
            for k in range(A.shape[1]):
                ablated = A[i : i + 1].clone()
                ablated[0, k] = 0
                dropped = head(ablated)[0, targets[i]]
                weights.append((base[i] - dropped) / base[i])
            maps.append(F.relu((torch.stack(weights).view(-1, 1, 1) * A[i]).sum(dim=0)))
    return torch.stack(maps)


def test_ablationcam_fx_head_equals_full_forward_and_reference():
    torch.manual_seed(0)
    net = DeepNet()
    bundle = bundle_of(net)
    x = inputs(2)
    net.count.images = 0
    fast = vislib.explain(bundle, x, methods=["ablationcam"], target=[1, 2],
                          options={"ablationcam": {"batch_size": 3}})
    fast_images = net.count.images
    slow = vislib.explain(bundle, x, methods=["ablationcam"], target=[1, 2],
                          options={"ablationcam": {"path": "full-forward", "batch_size": 3}})
    assert fast.extras["ablationcam"]["path"] == "fx-head"
    assert slow.extras["ablationcam"]["path"] == "full-forward"
    assert fast_images == 2  # the layers below ran once (the shared pass), never per channel
    assert type(net.count.images) is int  # fx traced a clone: the forward's side effect missed the model
    torch.testing.assert_close(raw(fast, "ablationcam"), raw(slow, "ablationcam"), rtol=1e-5, atol=1e-6)
    expected = ablation_reference(net, x, torch.tensor([1, 2]), lambda a: net.fc(net.top(a).flatten(1)))
    torch.testing.assert_close(raw(fast, "ablationcam"), expected, rtol=1e-4, atol=1e-6)


def test_ablationcam_head_is_traced_again_after_a_submodule_is_replaced():
    torch.manual_seed(0)
    net = DeepNet()
    bundle = bundle_of(net)
    x = inputs(1)
    vislib.explain(bundle, x, methods=["ablationcam"], target=0)  # traces and caches the head
    net.fc = nn.Linear(net.fc.in_features, 3)  # the cached head still holds the old layer
    result = vislib.explain(bundle, x, methods=["ablationcam"], target=0)
    assert result.extras["ablationcam"]["path"] == "fx-head"
    expected = ablation_reference(net, x, torch.tensor([0]), lambda a: net.fc(net.top(a).flatten(1)))
    torch.testing.assert_close(raw(result, "ablationcam"), expected, rtol=1e-4, atol=1e-6)


def test_tracing_leaves_other_threads_forwards_alone():
    """fx patches nn.Module.__call__ for the whole process while it traces: a forward run by another
    thread at that moment must still compute real tensors."""
    torch.manual_seed(0)
    other, x = DeepNet(), inputs(1)
    with torch.no_grad():
        expected = other(x)
    seen = {}

    class SpawnsAForward(nn.Module):
        def forward(self, h):
            def work():
                with torch.no_grad():
                    seen["out"] = other(x)

            thread = threading.Thread(target=work)
            thread.start()
            thread.join()
            return h

    torch.manual_seed(0)
    net = DeepNet()
    net.top.append(SpawnsAForward())
    head, _ = trace_head(net, "features")
    assert head is not None
    assert type(seen["out"]) is torch.Tensor
    torch.testing.assert_close(seen["out"], expected)


def test_ablationcam_falls_back_when_a_skip_connection_crosses_the_layer():
    torch.manual_seed(0)
    net = SkipNet()
    head, reason = trace_head(net, "features")
    assert head is None and "below" in reason
    x = inputs(1)
    result = vislib.explain(bundle_of(net), x, methods=["ablationcam"], target=0)
    extra = result.extras["ablationcam"]
    assert extra["path"] == "full-forward" and extra["why_full_forward"]
    skip = F.avg_pool2d(x, 2)[:, :1]
    expected = ablation_reference(net, x, torch.tensor([0]), lambda a: net.fc(net.top(a + skip).flatten(1)))
    torch.testing.assert_close(raw(result, "ablationcam"), expected, rtol=1e-4, atol=1e-6)


def test_ablationcam_skips_zero_channels_and_cuts_a_torchvision_resnet():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    bundle = vislib.load_model(model, preprocess=vislib.Preprocess(resize=64, crop=64), device="cpu",
                               default_layer="layer4")
    x = torch.randn(1, 3, 64, 64)
    result = vislib.explain(bundle, x, methods=["ablationcam"], target=3)
    extra = result.extras["ablationcam"]
    assert extra["path"] == "fx-head"
    # GAP + linear head: S − S_{A^k=0} = w_k · mean(A^k) exactly
    with torch.no_grad():
        A = nn.Sequential(*list(model.children())[:-2])(x)  # conv1 … layer4
        S = model(x)[0, 3]
    zero = A.flatten(2).amax(dim=2)[0] == 0
    assert extra["channels_skipped"] == int(zero.sum())
    assert extra["channels_evaluated"] == 512 - int(zero.sum())
    weights = model.fc.weight[3].detach() * A.mean(dim=(2, 3))[0] / S
    expected = F.relu(torch.einsum("c,chw->hw", weights, A[0]))
    torch.testing.assert_close(raw(result, "ablationcam")[0], expected, rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Eigen-CAM


@pytest.mark.parametrize("center", [False, True])
def test_eigencam_same_map_for_negated_activations(center):
    torch.manual_seed(4)
    A = torch.rand(3, 16, 5, 5) * (torch.rand(3, 16, 1, 1) > 0.3)
    proj, share = eigen_cam(A, center=center)
    proj_neg, share_neg = eigen_cam(-A, center=center)
    torch.testing.assert_close(proj_neg, proj, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(share_neg, share)
    if not center:  # A ≥ 0: the first singular vectors are non-negative, so is the projection
        assert proj.sum() > 0 and proj.min() >= -1e-5


def test_eigencam_rank_one_activation_is_its_spatial_factor():
    torch.manual_seed(5)
    u, v = torch.rand(1, 4, 4), torch.rand(7)  # A^k_ij = v_k u_ij
    A = torch.einsum("k,nij->nkij", v, u)
    proj, share = eigen_cam(A)
    torch.testing.assert_close(proj, u * v.norm(), rtol=1e-4, atol=1e-6)  # A v̂ = u ‖v‖
    torch.testing.assert_close(share, torch.ones(1))


def test_eigencam_through_explain_with_a_negating_layer():
    class Negate(nn.Module):
        def forward(self, x):
            return -x

    torch.manual_seed(0)
    plain, x = DeepNet(), inputs(2)
    torch.manual_seed(0)
    negated = DeepNet()
    negated.features.append(Negate())  # the target layer now outputs −A
    a = vislib.explain(bundle_of(plain), x, methods=["eigencam"])
    b = vislib.explain(bundle_of(negated), x, methods=["eigencam"])
    torch.testing.assert_close(raw(b, "eigencam"), raw(a, "eigencam"), rtol=1e-4, atol=1e-5)
    A = features_of(plain, x)
    torch.testing.assert_close(raw(a, "eigencam"), F.relu(eigen_cam(A)[0]), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Occlusion


def test_occlusion_1x1_zero_patch_on_linear_model_is_gradient_times_input():
    torch.manual_seed(6)
    net = LinearNet()
    x = inputs(2)
    result = vislib.explain(bundle_of(net), x, methods=["occlusion"], target=[0, 2],
                            options={"occlusion": {"patch": 1, "stride": 1, "fill": 0.0, "batch_size": 50}})
    W = net.fc.weight.detach().view(3, 3, SIZE, SIZE)[torch.tensor([0, 2])]  # = ∂logit/∂x
    expected = (W * x).sum(dim=1)  # f(x) − f(x with pixel i zeroed) = Σ_c w_ci x_ci
    torch.testing.assert_close(raw(result, "occlusion"), expected, rtol=1e-4, atol=1e-5)
    assert result.extras["occlusion"]["forwards"] == 2 * SIZE * SIZE


def test_occlusion_windows_average_over_the_pixels_that_they_cover():
    torch.manual_seed(7)
    net = LinearNet()
    x = inputs(1)
    fill = 0.25
    result = vislib.explain(bundle_of(net), x, methods=["occlusion"], target=1,
                            options={"occlusion": {"patch": 3, "stride": 3, "fill": fill}})
    starts = window_starts(SIZE, 3, 3)
    assert starts == [0, 3, 5]  # the last window sits flush with the edge
    contrib = (net.fc.weight.detach()[1].view(3, SIZE, SIZE) * (x[0] - fill)).sum(dim=0)
    total, count = torch.zeros(SIZE, SIZE), torch.zeros(SIZE, SIZE)
    for r in starts:
        for c in starts:
            total[r : r + 3, c : c + 3] += contrib[r : r + 3, c : c + 3].sum()
            count[r : r + 3, c : c + 3] += 1
    torch.testing.assert_close(raw(result, "occlusion")[0], total / count, rtol=1e-4, atol=1e-5)


def test_occlusion_probability_score_and_gray_fill():
    torch.manual_seed(8)
    net = LinearNet()
    bundle = bundle_of(net)
    bundle.preprocess = vislib.Preprocess(resize=SIZE, crop=SIZE, mean=(0.5, 0.4, 0.3), std=(0.5, 0.5, 0.5))
    x = inputs(1)
    options = {"occlusion": {"patch": 4, "stride": 4, "fill": "gray", "score": "probability"}}
    result = vislib.explain(bundle, x, methods=["occlusion"], target=2, options=options)
    gray = torch.tensor([0.0, 0.2, 0.4]).view(3, 1, 1)
    occluded = x.repeat(4, 1, 1, 1)
    for w, (r, c) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
        occluded[w, :, r : r + 4, c : c + 4] = gray
    drops = target_scores(net, x, torch.tensor([2]), "probability") - target_scores(
        net, occluded, torch.tensor([2] * 4), "probability")
    expected = drops.view(2, 2).repeat_interleave(4, 0).repeat_interleave(4, 1)
    torch.testing.assert_close(raw(result, "occlusion")[0], expected, rtol=1e-4, atol=1e-6)
    assert result.extras["occlusion"]["score"] == "probability"


# --------------------------------------------------------------------------------------------------
# Cancellation, progress, hygiene


@pytest.mark.parametrize("method, options", [
    ("scorecam", {"batch_size": 2}),
    ("ablationcam", {"batch_size": 2}),
    ("ablationcam", {"batch_size": 2, "path": "full-forward"}),
    ("occlusion", {"batch_size": 4, "patch": 2, "stride": 2}),
])
def test_cancel_half_way_stops_promptly_and_leaves_the_model_clean(method, options):
    torch.manual_seed(0)
    net = DeepNet()
    bundle = bundle_of(net)
    before = snapshot(net)
    cancel = threading.Event()
    seen = []

    def progress(done, total):
        seen.append((done, total, net.count.images))
        if done >= total / 2:
            cancel.set()

    with pytest.raises(vislib.Cancelled):
        vislib.explain(bundle, inputs(1), methods=[method], options={method: options},
                       progress=progress, cancel=cancel)
    done, total, images = seen[-1]
    assert 0 < done < total
    assert net.count.images == images  # no forward after the cancelling report
    assert_untouched(net, before)
    assert bundle.lock.acquire(blocking=False)  # the lock was released
    bundle.lock.release()


def test_progress_covers_all_forwards_and_the_model_is_untouched():
    torch.manual_seed(0)
    net = DeepNet()
    bundle = bundle_of(net)
    before = snapshot(net)
    seen = []
    methods = ["gradcam", "scorecam", "ablationcam", "eigencam", "occlusion"]
    result = vislib.explain(bundle, inputs(2), methods=methods, progress=lambda d, t: seen.append((d, t)),
                            options={"occlusion": {"patch": 4, "stride": 2}})
    mine = [(d, t) for d, t in seen if t == seen[-1][1]]
    dones = [d for d, _ in mine]
    assert dones == sorted(dones) and dones[0] == 0 and dones[-1] == mine[-1][1]
    forwards = sum(result.extras[m]["forwards"] for m in ("scorecam", "ablationcam", "occlusion"))
    assert mine[-1][1] == forwards
    assert set(result.pass_timings) <= {"forward", "backward"}  # the CAM pass's activation was reused
    for m in methods[1:]:
        assert result.maps[m].shape == (2, SIZE, SIZE) and result.maps[m].max() <= 1
    assert_untouched(net, before)


def test_unknown_or_bad_options_are_user_errors():
    bundle = bundle_of(DeepNet())
    with pytest.raises(vislib.MethodError, match="unknown option"):
        vislib.explain(bundle, inputs(1), methods=["scorecam"], options={"scorecam": {"batchsize": 4}})
    with pytest.raises(vislib.MethodError, match="batch_size"):
        vislib.explain(bundle, inputs(1), methods=["occlusion"], options={"occlusion": {"batch_size": 0}})
    with pytest.raises(vislib.MethodError, match="patch"):
        vislib.explain(bundle, inputs(1), methods=["occlusion"], options={"occlusion": {"patch": 99}})
    with pytest.raises(vislib.MethodError, match="no fx head"):
        vislib.explain(bundle_of(SkipNet()), inputs(1), methods=["ablationcam"],
                       options={"ablationcam": {"path": "fx-head"}})


def test_registered_metadata():
    for name in ("scorecam", "ablationcam", "eigencam", "occlusion"):
        cls = vislib.METHODS[name]
        assert cls.family == "perturbation" and cls.title and cls.paper and cls.__doc__
