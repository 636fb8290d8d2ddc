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
from vislib.methods.scorecam import NoiseRows, integration_coefficients

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
# SS-CAM and IS-CAM (the Score-CAM template with n draws per mask)


def masks_of(model, x, align_corners=False):
    """N×C×H×W masks norm(up(A^k)) written out channel by channel (constant map → 0)."""
    A = features_of(model, x)
    up = F.interpolate(A, x.shape[-2:], mode="bilinear", align_corners=align_corners)
    lo = up.amin(dim=(2, 3), keepdim=True)
    hi = up.amax(dim=(2, 3), keepdim=True)
    return torch.where(hi > lo, (up - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi)), 0.0), A


def smoothed_reference(model, x, targets, masked_inputs, n):
    """softmax_k of the mean over draws i of S^c(masked_inputs(i, sample, k)); map ReLU(Σ_k w_k A^k).
    One forward per draw, sample and channel, in the order draw → sample → channel."""
    masks, A = masks_of(model, x)
    total = torch.zeros(A.shape[:2])
    for i in range(n):
        for s in range(len(x)):
            for k in range(A.shape[1]):
                inp = masked_inputs(i, x[s : s + 1], masks[s, k])
                total[s, k] += target_scores(model, inp, targets[s : s + 1])[0]
    weights = torch.softmax(total / n, dim=1)
    return F.relu(torch.einsum("nc,nchw->nhw", weights, A)), weights


def test_iscam_coefficients_by_hand():
    # c_i = Σ_{j≤i} j/n for n = 4: 1/4, 3/4, 6/4, 10/4; their mean (n+1)(n+2)/(6n) = 30/24
    torch.testing.assert_close(integration_coefficients(4), torch.tensor([0.25, 0.75, 1.5, 2.5]))
    assert float(integration_coefficients(4).mean()) == pytest.approx(1.25)
    assert integration_coefficients(1).tolist() == [1.0]


def test_iscam_equals_reference_loop():
    torch.manual_seed(0)
    bundle = bundle_of(DeepNet())
    x, n = inputs(2), 3
    c = [i * (i + 1) / (2 * n) for i in range(1, n + 1)]
    result = vislib.explain(bundle, x, methods=["iscam"], target=[0, 2],
                            options={"iscam": {"n_samples": n, "batch_size": 4}})
    expected, _ = smoothed_reference(bundle.model, x, torch.tensor([0, 2]),
                                     lambda i, xs, mask: xs * (c[i] * mask), n)
    torch.testing.assert_close(raw(result, "iscam"), expected, rtol=1e-4, atol=1e-6)
    extra = result.extras["iscam"]
    flat = features_of(bundle.model, x).flatten(2)
    constant = bool((flat.amax(dim=2) == flat.amin(dim=2)).any())  # then one zero-image forward
    assert extra["n_samples"] == n and extra["forwards"] == n * extra["channels_evaluated"] + int(constant)


def test_iscam_with_one_sample_is_scorecam():
    """c_1 = 1/1: the one masked input per channel is Score-CAM's."""
    torch.manual_seed(0)
    bundle = bundle_of(ChannelNet())
    x = inputs(2)
    options = {"return_weights": True, "batch_size": 3}
    a = vislib.explain(bundle, x, ["scorecam", "iscam"], target=[1, 3],
                       options={"scorecam": options, "iscam": {**options, "n_samples": 1}})
    torch.testing.assert_close(torch.tensor(a.extras["iscam"]["weights"]), torch.tensor(a.extras["scorecam"]["weights"]))
    torch.testing.assert_close(raw(a, "iscam"), raw(a, "scorecam"))


def test_iscam_on_a_linear_net_scales_every_score_by_the_mean_coefficient():
    """logits = W·x + b and A = x (an identity layer): S(c·m_k ⊙ x) = c·W_t(m_k ⊙ x) + b_t, so the mean
    over the draws is c̄·s_k + b_t with c̄ = (n+1)(n+2)/(6n), and b_t leaves the softmax."""
    torch.manual_seed(9)
    net = LinearNet()
    x, n, t = inputs(1), 4, 2
    result = vislib.explain(bundle_of(net), x, ["iscam"], target=t,
                            options={"iscam": {"n_samples": n, "return_weights": True}})
    masks, _ = masks_of(net, x)  # 3 channels: the colour planes of x
    W = net.fc.weight.detach()[t].view(3, SIZE, SIZE)
    s = torch.stack([(W * masks[0, k] * x[0]).sum() for k in range(3)])
    expected = torch.softmax(1.25 * s, dim=0)  # c̄ = 5·6/24
    torch.testing.assert_close(torch.tensor(result.extras["iscam"]["weights"][0]), expected, rtol=1e-4, atol=1e-6)
    assert result.extras["iscam"]["mean_scale"] == pytest.approx(1.25)


def test_iscam_skips_constant_and_duplicate_channels_exactly():
    torch.manual_seed(0)
    net = ChannelNet()
    bundle = bundle_of(net)
    x, n = inputs(1), 3
    net.count.images = 0
    skipped = vislib.explain(bundle, x, ["iscam"], target=1, options={"iscam": {"n_samples": n}})
    images = net.count.images
    full = vislib.explain(bundle, x, ["iscam"], target=1, options={"iscam": {"n_samples": n, "skip": False}})
    extra = skipped.extras["iscam"]
    # 4 distinct masks (channels 0, 5, 6, 7) at 3 scales, and one zero image for channels 1 and 2
    assert extra["channels_evaluated"] == 4 and extra["forwards"] == 4 * n + 1 and images == 1 + 4 * n + 1
    assert full.extras["iscam"]["forwards"] == 8 * n
    torch.testing.assert_close(raw(skipped, "iscam"), raw(full, "iscam"), rtol=1e-5, atol=1e-7)


def documented_noise(seed, n, rows, size, sigma):
    """SS-CAM's noise as documented: σ·randn(H, W) per row from a CPU generator, rows in the order
    draw → sample → channel."""
    gen = torch.Generator().manual_seed(seed)
    return sigma * torch.stack([torch.randn(size, size, generator=gen) for _ in range(n * rows)]).view(n, rows, size, size)


def test_sscam_equals_reference_loop_with_the_documented_noise():
    torch.manual_seed(0)
    bundle = bundle_of(DeepNet())
    x, n, sigma, seed = inputs(2), 3, 0.5, 7
    channels = 5
    noise = documented_noise(seed, n, 2 * channels, SIZE, sigma).view(n, 2, channels, SIZE, SIZE)
    result = vislib.explain(bundle, x, ["sscam"], target=[1, 0],
                            options={"sscam": {"n_samples": n, "sigma": sigma, "seed": seed, "batch_size": 4}})
    calls = iter(range(n * 2 * channels))

    def noisy(i, xs, mask):
        r = next(calls)  # the reference loop runs draw → sample → channel as well
        return xs * (mask + noise[i, (r // channels) % 2, r % channels])

    expected, _ = smoothed_reference(bundle.model, x, torch.tensor([1, 0]), noisy, n)
    torch.testing.assert_close(raw(result, "sscam"), expected, rtol=1e-4, atol=1e-6)
    extra = result.extras["sscam"]
    assert extra["forwards"] == n * 2 * channels and extra["channels_skipped"] == 0
    assert (extra["n_samples"], extra["sigma"], extra["seed"]) == (n, sigma, seed)


def test_sscam_on_a_linear_net_adds_the_mean_noise_to_each_score():
    """S((m_k + σε_ik) ⊙ x) = W_t((m_k + σε_ik) ⊙ x) + b_t: the mean over draws is s_k + W_t(ε̄_k ⊙ x)."""
    torch.manual_seed(10)
    net = LinearNet()
    x, n, sigma, t = inputs(1), 4, 0.3, 1
    result = vislib.explain(bundle_of(net), x, ["sscam"], target=t,
                            options={"sscam": {"n_samples": n, "sigma": sigma, "return_weights": True}})
    masks, _ = masks_of(net, x)
    mean_noise = documented_noise(0, n, 3, SIZE, sigma).mean(dim=0)
    W = net.fc.weight.detach()[t].view(3, SIZE, SIZE)
    s = torch.stack([(W * (masks[0, k] + mean_noise[k]) * x[0]).sum() for k in range(3)])
    torch.testing.assert_close(torch.tensor(result.extras["sscam"]["weights"][0]), torch.softmax(s, dim=0),
                               rtol=1e-4, atol=1e-6)


def test_sscam_with_zero_sigma_is_scorecam():
    torch.manual_seed(0)
    net = ChannelNet()
    bundle = bundle_of(net)
    x = inputs(2)
    result = vislib.explain(bundle, x, ["scorecam", "sscam"], target=[0, 2],
                            options={"sscam": {"sigma": 0.0, "n_samples": 5}})
    torch.testing.assert_close(raw(result, "sscam"), raw(result, "scorecam"))
    # the draws coincide: one per distinct mask, with Score-CAM's exact skipping
    assert result.extras["sscam"]["forwards"] == result.extras["scorecam"]["forwards"]


def test_sscam_is_reproducible_whatever_the_batch_size():
    torch.manual_seed(0)
    bundle = bundle_of(DeepNet())
    x = inputs(1)

    def run(**options):
        opts = {"n_samples": 4, "sigma": 1.0, **options}
        return raw(vislib.explain(bundle, x, ["sscam"], target=1, options={"sscam": opts}), "sscam")

    first = run(seed=3, batch_size=3)
    torch.testing.assert_close(run(seed=3, batch_size=3), first, rtol=0, atol=0)
    torch.testing.assert_close(run(seed=3, batch_size=20), first, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(run(seed=4, batch_size=3), first)


def test_noise_rows_are_one_stream_and_torch_cams_after_manual_seed():
    rows = NoiseRows(seed=5, shape=(4, 8), sigma=2.0, device=torch.device("cpu"))
    a, b = rows.rows(0, 3), rows.rows(3, 7)
    torch.testing.assert_close(rows.rows(3, 5), b[:2], rtol=0, atol=0)  # a retried batch: the same rows
    torch.testing.assert_close(rows.rows(5, 7), b[2:], rtol=0, atol=0)
    torch.manual_seed(5)  # torch-cam: Normal(0, σ).sample((rows, H, W)) from the global generator
    torch_cam = torch.distributions.normal.Normal(0, 2.0).sample((7, 4, 8))
    torch.testing.assert_close(torch.cat([a, b]), torch_cam, rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_is_labelled_and_compared_with_fp32(precision):
    torch.manual_seed(0)
    bundle = bundle_of(DeepNet())
    x = inputs(1)
    options = {"scorecam": {"precision": precision, "compare_fp32": True, "fast_forward": True}}
    result = vislib.explain(bundle, x, ["scorecam"], target=0, options=options)
    extra = result.extras["scorecam"]
    assert extra["approximate"] is True and precision in extra["title"] and extra["precision"] == precision
    assert extra["forward"] == "eager"  # autocast does not reach a frozen graph
    assert extra["fp32_pearson"] > 0.99 and 0 <= extra["fp32_max_abs_diff"] < 0.1
    exact = vislib.explain(bundle, x, ["scorecam"], target=0)
    expected = raw(exact, "scorecam")
    got = raw(result, "scorecam")
    # the reported agreement is the one between this map and the fp32 map
    a, b = (m.flatten() - m.mean() for m in (got, expected))
    assert float((a @ b) / (a.norm() * b.norm())) == pytest.approx(extra["fp32_pearson"], abs=1e-6)
    plain = vislib.explain(bundle, x, ["scorecam"], target=0, options={"scorecam": {"precision": precision}})
    assert plain.extras["scorecam"]["fp32_pearson"] is None  # not measured unless asked


def test_masked_batches_are_halved_after_a_cuda_out_of_memory_error():
    """The loop's retry logic, on the CPU: the session believes it runs on CUDA, the forward fails
    above 2 rows; rows are rebuilt from the same start and every score arrives once, in order."""
    from vislib.methods.base import ExplainContext
    from vislib.methods.perturbation import Session

    torch.manual_seed(0)
    bundle = bundle_of(DeepNet())
    x = inputs(1)
    ctx = ExplainContext(bundle=bundle, inputs=x, layer="features", score="logit", target_spec=None,
                         resolve_targets=lambda logits, spec: logits.argmax(dim=1))
    session = Session(ctx)
    session.device = torch.device("cuda")
    session.total = 7
    starts = []

    def make_batch(start, stop):
        starts.append((start, stop))
        return torch.arange(start, stop, dtype=torch.float32).view(-1, 1)

    def forward(batch):
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return torch.cat([batch, -batch], dim=1)

    scores = session.scores(7, make_batch, torch.zeros(7, dtype=torch.long), "logit", 8, forward)
    assert scores.tolist() == list(range(7))
    assert starts[:3] == [(0, 7), (0, 4), (0, 2)] and starts[3:] == [(2, 4), (4, 6), (6, 7)]
    assert "halved 2×" in session.forward_info["out_of_memory"]
    session.device = torch.device("cpu")  # on the CPU there is nothing to halve: the error is the user's
    with pytest.raises(torch.cuda.OutOfMemoryError):
        session.scores(7, make_batch, torch.zeros(7, dtype=torch.long), "logit", 8, forward)


def test_smoothed_options_are_checked():
    bundle = bundle_of(DeepNet())
    bad = [("sscam", {"sigma": -1.0}, "sigma"), ("sscam", {"n_samples": 0}, "n_samples"),
           ("sscam", {"seed": -2}, "seed"), ("sscam", {"skip": False}, "unknown option"),
           ("iscam", {"n_samples": 1.5}, "n_samples"), ("scorecam", {"precision": "fp8"}, "precision"),
           ("iscam", {"compare_fp32": True}, "compare_fp32"), ("sscam", {"sigma": "big"}, "sigma")]
    for method, options, match in bad:
        with pytest.raises(vislib.MethodError, match=match):
            vislib.explain(bundle, inputs(1), [method], options={method: options})


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
    ("sscam", {"batch_size": 2, "n_samples": 2}),
    ("iscam", {"batch_size": 2, "n_samples": 2}),
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
    for name in ("scorecam", "sscam", "iscam", "ablationcam", "eigencam", "occlusion"):
        cls = vislib.METHODS[name]
        assert cls.family == "perturbation" and cls.title and cls.paper and cls.__doc__
