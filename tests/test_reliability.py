"""Faults and shared state: out-of-memory recovery, bounded memory, concurrent users."""

import importlib
import resource

import numpy as np
import pytest
import torch
from helpers import GapNet, assert_untouched, snapshot, tiny_bundle

import vislib
from vislib.methods.registry import FAMILY_RUNNERS

explain_module = importlib.import_module("vislib.explain")  # the module, not the function

SIX = ["cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam"]


@pytest.fixture
def gap():
    torch.manual_seed(1)
    return tiny_bundle(GapNet())


def oom_when(predicate):
    """Wrap the CAM runner so that it raises a CUDA out-of-memory error when predicate(ctx) holds."""
    real = FAMILY_RUNNERS["cam"]
    calls = []

    def runner(ctx, names, options):
        calls.append((ctx.bundle, ctx.inputs.shape[0]))
        if predicate(ctx):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(ctx, names, options)

    return runner, calls


def test_oom_with_a_batch_retries_in_halves(gap, monkeypatch):
    x = torch.rand(4, 3, 16, 16)
    reference = vislib.explain(gap, x, methods=SIX, target=[0, 1, 2, 3])
    runner, calls = oom_when(lambda ctx: ctx.inputs.shape[0] > 1)
    monkeypatch.setitem(FAMILY_RUNNERS, "cam", runner)
    before = snapshot(gap.model)
    result = vislib.explain(gap, x, methods=SIX, target=[0, 1, 2, 3])
    assert [n for _, n in calls] == [4, 2, 1, 1, 2, 1, 1]
    for m in SIX:
        np.testing.assert_allclose(result.maps[m], reference.maps[m], atol=1e-6)
    np.testing.assert_allclose(result.probs, reference.probs, atol=1e-6)
    assert result.target == [0, 1, 2, 3]
    assert any("retried in two halves" in note for note in result.notes)
    assert_untouched(gap.model, before)


def test_oom_on_one_image_falls_back_to_a_private_cpu_copy(gap, monkeypatch):
    x = torch.rand(3, 16, 16)
    reference = vislib.explain(gap, x, methods=["gradcam"])
    runner, calls = oom_when(lambda ctx: ctx.bundle is gap)  # the shared bundle always fails
    monkeypatch.setitem(FAMILY_RUNNERS, "cam", runner)
    monkeypatch.setattr(explain_module, "can_fall_back_to_cpu", lambda bundle: True)
    result = vislib.explain(gap, x, methods=["gradcam"])
    assert calls[0][0] is gap and calls[1][0] is gap.cpu_fallback
    assert gap.cpu_fallback.model is not gap.model  # the shared model was never moved
    np.testing.assert_allclose(result.maps["gradcam"], reference.maps["gradcam"], atol=1e-6)
    assert any("on the CPU" in note for note in result.notes)


def test_oom_without_a_fallback_is_raised(gap, monkeypatch):
    runner, _ = oom_when(lambda ctx: True)
    monkeypatch.setitem(FAMILY_RUNNERS, "cam", runner)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        vislib.explain(gap, torch.rand(3, 16, 16), methods=["gradcam"])


def test_memory_stays_bounded_over_200_explanations(gap):
    x = torch.rand(2, 3, 16, 16)
    for _ in range(20):  # warm up allocator and caches
        vislib.explain(gap, x, methods=SIX)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(200):
        vislib.explain(gap, x, methods=SIX, target=i % 4)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 30, f"peak RSS grew by {grown_mb:.1f} MB over 200 explanations"


# --------------------------------------------------------------------------------------------------
# Concurrency: many sessions share one cached model

REQUESTS = [
    dict(methods=["gradcam", "gradcam++", "layercam"], target=0, layer="features"),
    dict(methods=["cam", "hirescam"], target=3, layer="features"),
    dict(methods=["gradcam", "xgradcam"], target=1, layer="features.1"),
    dict(methods=["gradient", "guided_backprop"], target=2, layer="features"),
    dict(methods=["deconvnet"], target=0, layer="features"),
    dict(methods=["guided_gradcam", "gradcam"], target=1, layer="features"),
    dict(methods=["eigencam", "ablationcam"], target=2, layer="features"),
    dict(methods=["scorecam"], target=3, layer="features.1"),
    dict(methods=["occlusion"], target=None, layer="features", options={"occlusion": {"patch": 4, "stride": 4}}),
    dict(methods=["integrated_gradients"], target=1, layer="features", options={"integrated_gradients": {"steps": 8}}),
]
FAILING = [
    dict(methods=["gradcam", "deconvnet"], target=99, layer="features"),  # raises after the forward
    dict(methods=["cam"], target=0, layer="features.1"),  # CAM does not apply on that layer
]


def _run(bundle, x, request):
    return vislib.explain(bundle, x, methods=request["methods"], target=request["target"],
                          layer=request["layer"], options=request.get("options"))


def test_threads_get_their_single_thread_results_and_leave_the_model_clean(gap):
    import random
    import threading

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # many threads on a small machine: keep each one single-threaded
    x = torch.rand(3, 16, 16)
    reference = [_run(gap, x, r) for r in REQUESTS]
    before = snapshot(gap.model)
    errors, mismatches = [], []

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(20):
            if rng.random() < 0.15:
                request = rng.choice(FAILING)
                try:
                    _run(gap, x, request)
                    mismatches.append(("no error", request))
                except vislib.VislibError:
                    pass
                except Exception as exc:  # pragma: no cover - reported below
                    errors.append(repr(exc))
                continue
            i = rng.randrange(len(REQUESTS))
            try:
                result = _run(gap, x, REQUESTS[i])
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(repr(exc))
                continue
            for m in REQUESTS[i]["methods"]:
                if not np.allclose(result.maps[m], reference[i].maps[m], atol=1e-5):
                    mismatches.append((i, m))
            if result.target != reference[i].target:
                mismatches.append((i, "target"))

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.set_num_threads(threads_before)
    assert not errors, errors[:3]
    assert not mismatches, mismatches[:5]
    assert_untouched(gap.model, before)


def test_gpu_slots_bound_concurrent_explanations_and_report_waiting(monkeypatch):
    """At most VISLIB_GPU_SLOTS explanations hold the GPU; a waiting one is told so (on_wait)."""
    import threading

    explain_module = importlib.import_module("vislib.explain")
    slots = threading.BoundedSemaphore(1)
    monkeypatch.setattr(explain_module, "GPU_SLOTS", slots)
    cuda = torch.device("cuda")
    waited = []
    with explain_module.device_slot(cuda):
        holder_inside = threading.Event()

        def second():
            with explain_module.device_slot(cuda, on_wait=lambda: waited.append(True)):
                holder_inside.set()

        t = threading.Thread(target=second)
        t.start()
        assert not holder_inside.wait(0.3)  # blocked while the slot is taken
    t.join(5)
    assert holder_inside.is_set() and waited == [True]
    with explain_module.device_slot(torch.device("cpu"), on_wait=lambda: waited.append("cpu")):
        pass  # the CPU takes no slot
    assert waited == [True]
