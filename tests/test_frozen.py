"""The frozen inference copy behind the many-forward methods (vislib.methods.frozen): same scores as
the eager model, never stale, never used when it cannot be trusted, the shared model untouched."""

from __future__ import annotations

import pytest
import torch
from helpers import Counter, assert_untouched, snapshot
from torch import nn

import vislib
from vislib.errors import MethodError
from vislib.methods import frozen
from vislib.methods.frozen import BatchForward, build_frozen, cached_frozen

SIZE = 16
PLAIN = vislib.Preprocess(resize=SIZE, crop=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


class BnNet(nn.Module):
    """conv → batch norm (non-trivial running statistics) → ReLU → max-pool → conv → ReLU (target
    ``features``) → GAP → linear: the batch norm is what a frozen copy folds into the conv."""

    def __init__(self):
        super().__init__()
        self.count = Counter()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.features = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            bn = self.stem[1]
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        return self.fc(self.pool(self.features(self.stem(self.count(x)))).flatten(1))


class DataDependentNet(BnNet):
    """A forward whose branch depends on the data: a trace would freeze one branch."""

    def forward(self, x):
        out = super().forward(x)
        return out if out.sum() > 0 else -out


def bundle_of(net: nn.Module) -> vislib.ModelBundle:
    return vislib.load_model(net.eval(), preprocess=PLAIN, default_layer="features", device="cpu")


def inputs(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def scorecam(bundle, x, mode):
    return vislib.explain(bundle, x, ["scorecam"], target=[0, 1][: len(x)],
                          options={"scorecam": {"fast_forward": mode, "batch_size": 4}})


def test_frozen_copy_gives_the_eager_scores_and_leaves_the_model_alone():
    torch.manual_seed(0)
    bundle = bundle_of(BnNet())
    x = inputs()
    before = snapshot(bundle.model)
    eager = scorecam(bundle, x, False)
    seen_eager = bundle.model.count.images
    fast = scorecam(bundle, x, True)
    seen_fast = bundle.model.count.images - seen_eager
    assert eager.extras["scorecam"]["forward"] == "eager"
    assert fast.extras["scorecam"]["forward"] == "frozen TorchScript copy"
    # the masked inputs went through the copy: the eager model saw the clean batch (and at most
    # one zero image for constant channels), not the channels' forwards
    forwards = fast.extras["scorecam"]["forwards"]
    assert seen_eager >= len(x) + forwards - 1
    assert seen_fast <= len(x) + 1
    torch.testing.assert_close(torch.as_tensor(fast.raw["scorecam"]), torch.as_tensor(eager.raw["scorecam"]),
                               rtol=1e-4, atol=1e-5)
    assert_untouched(bundle.model, before)


def test_occlusion_through_the_frozen_copy_equals_eager():
    torch.manual_seed(1)
    bundle = bundle_of(BnNet())
    x = inputs(1)
    options = {"patch": 4, "stride": 4}
    eager, fast = (vislib.explain(bundle, x, ["occlusion"], options={"occlusion": {**options, "fast_forward": m}})
                   for m in (False, True))
    assert fast.extras["occlusion"]["forward"] == "frozen TorchScript copy"
    torch.testing.assert_close(torch.as_tensor(fast.raw["occlusion"]), torch.as_tensor(eager.raw["occlusion"]),
                               rtol=1e-4, atol=1e-5)


def test_a_data_dependent_forward_is_never_frozen():
    torch.manual_seed(2)
    net = DataDependentNet().eval()
    module, why = build_frozen(net, inputs(1))
    assert module is None and "depends on the data" in why
    bundle = bundle_of(net)
    result = scorecam(bundle, inputs(), True)
    assert result.extras["scorecam"]["forward"] == "eager"
    assert "depends on the data" in result.extras["scorecam"]["forward_why"]


def test_changed_weights_are_never_served_by_a_stale_copy():
    torch.manual_seed(3)
    net = BnNet().eval()
    x = inputs(1)
    first = cached_frozen(net, x)
    assert cached_frozen(net, x) is first  # cached while the weights stay
    with torch.no_grad():
        net.fc.weight.mul_(-2.0)  # an in-place change bumps the version counter
    second = cached_frozen(net, x)
    assert second is not first
    with torch.inference_mode():
        torch.testing.assert_close(second.frozen(x), net(x), rtol=1e-4, atol=1e-5)
    net.load_state_dict(BnNet().state_dict())
    assert cached_frozen(net, x) is not second


def test_a_copy_that_disagrees_with_the_model_is_refused(monkeypatch):
    torch.manual_seed(4)
    net = BnNet().eval()

    def off_by_one(model, example):
        return (lambda batch: model(batch) + 1.0), ""

    monkeypatch.setattr(frozen, "build_frozen", off_by_one)
    monkeypatch.setattr(frozen, "_CACHE", frozen.weakref.WeakKeyDictionary())
    x = inputs(2)
    with torch.no_grad():
        runner = BatchForward(net, x, net(x), mode=True, rows=8)
    assert runner.path == "eager" and "differ" in runner.reason
    with torch.inference_mode():
        torch.testing.assert_close(runner(x), net(x))


@pytest.fixture
def fresh(monkeypatch):
    """An empty cache and no learnt costs: every test starts as a new process would."""
    monkeypatch.setattr(frozen, "_CACHE", frozen.weakref.WeakKeyDictionary())
    monkeypatch.setattr(frozen, "_BUILD_RATE", [])
    monkeypatch.setattr(frozen, "_RATIOS", {})
    return monkeypatch


def test_auto_times_both_paths_then_keeps_one(fresh):
    torch.manual_seed(5)
    net = BnNet().eval()
    fresh.setattr(frozen, "BUILD_S_PER_LAYER", 0.0)  # building looks free: build whatever the eager time
    x = inputs(2)
    batches = [inputs(4, seed) for seed in range(10, 18)]
    with torch.no_grad():
        runner = BatchForward(net, x, net(x), mode="auto", rows=4 * len(batches))
        expected = [net(b) for b in batches]
    paths = []
    with torch.inference_mode():
        for batch, want in zip(batches, expected, strict=True):
            paths.append(runner.path)
            torch.testing.assert_close(runner(batch), want, rtol=1e-4, atol=1e-5)
    # eager timed twice, the copy built and warmed up, the copy timed twice, then one path kept
    assert paths[:5] == ["eager", "eager", "trial", "frozen", "frozen"]
    assert runner.decided and "timed" in runner.reason and "built as" in runner.reason
    assert set(paths[5:]) == {runner.path}
    assert len(frozen._BUILD_RATE) == 1 and frozen.architecture(net, x) in frozen._RATIOS  # costs learnt
    # a second call finds the copy and the eager timing in the cache: it times only the copy
    with torch.no_grad():
        again = BatchForward(net, x, net(x), mode="auto", rows=4 * len(batches))
    paths = []
    with torch.inference_mode():
        for batch in batches[:4]:
            paths.append(again.path)
            again(batch)
    assert paths[:3] == ["trial", "frozen", "frozen"] and again.decided


def test_auto_keeps_eager_when_a_copy_cannot_pay_off(fresh):
    net = BnNet().eval()
    x = inputs(2)
    with torch.no_grad():
        runner = BatchForward(net, x, net(x), mode="auto", rows=12)
    with torch.inference_mode():
        runner(inputs(4))
        runner(inputs(4))
    assert runner.decided and runner.path == "eager" and "would not pay" in runner.reason
    assert cached_frozen(net, x, build=False) is None  # nothing was built


def test_the_build_pays_when_the_saving_on_the_forwards_left_exceeds_its_cost(fresh):
    """saving = rows_left · t_eager · (1 − ratio) against build = rate · leaf modules; the prior rate and
    ratio until this process has measured them."""
    net = BnNet().eval()
    x = inputs(1)
    layers = frozen.leaf_modules(net)
    assert layers == 9  # Counter; conv, bn, ReLU, max-pool; conv, ReLU; GAP; linear
    fresh.setattr(frozen, "BUILD_S_PER_LAYER", 0.1)  # build estimated at 0.9 s
    fresh.setattr(frozen, "EXPECTED_RATIO", 0.75)
    with torch.no_grad():
        runner = BatchForward(net, x, net(x), mode=False, rows=0)
    runner.signature = frozen.architecture(net, x)
    runner.rows_left = 360  # saving 360 · 10 ms · 0.25 = 0.9 s: not more than the build
    assert runner._worth_building(0.010)[0] is False
    runner.rows_left = 361
    worth, why = runner._worth_building(0.010)
    assert worth and "expected at 0.75×" in why and "(estimated)" in why
    frozen._BUILD_RATE.append(0.2)  # a build measured in this process: 1.8 s for this model
    assert runner._worth_building(0.010)[0] is False
    frozen._BUILD_RATE.append(0.01)
    frozen._RATIOS[runner.signature] = 1.1  # this architecture was timed slower frozen: never worth it
    worth, why = runner._worth_building(0.010)
    assert not worth and "measured at 1.10×" in why


def test_a_copy_is_built_with_one_thread_and_the_count_restored(fresh):
    """Two intra-op threads make tracing and freezing ~5× dearer (the idle worker spins): one is used."""
    net = BnNet().eval()
    x = inputs(2)
    seen = []
    real = frozen.build_frozen

    def build(model, example):
        seen.append(torch.get_num_threads())
        return real(model, example)

    fresh.setattr(frozen, "build_frozen", build)
    before = torch.get_num_threads()
    with torch.no_grad():
        runner = BatchForward(net, x, net(x), mode=True, rows=8)
    assert seen == [1] and torch.get_num_threads() == before
    assert runner.path == "frozen" and len(frozen._BUILD_RATE) == 1  # the build's cost was learnt


def test_fast_forward_option_is_checked():
    bundle = bundle_of(BnNet())
    for bad in ("yes", 1, None):
        with pytest.raises(MethodError, match="fast_forward"):
            vislib.explain(bundle, inputs(1), ["scorecam"], options={"scorecam": {"fast_forward": bad}})
